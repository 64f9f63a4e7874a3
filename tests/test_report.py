"""tools/report.py on hand-made run directories: exact tables, real PNGs."""

import json
import os

import numpy as np
import pytest

from conftest import ROOT, launch

from tools import report  # noqa: E402


def _run(path, config, summary, records):
    os.makedirs(path)
    json.dump(config, open(os.path.join(path, "config.json"), "w"))
    json.dump(summary, open(os.path.join(path, "summary.json"), "w"))
    with open(os.path.join(path, "validations.jsonl"), "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


def test_tables_and_plots(tmp_path):
    args = {"pretrained_model_name_or_path": "/m/esd-x", "validation_prompts": "/p/target.txt",
            "train_data_dir": "/d/related"}
    ind = _run(tmp_path / "ind", {"args": args},
               {"protocol": "individual", "criterion": "clip", "threshold": 0.31, "chunks": [
                   {"chunk": 0, "revived": True, "revival_epoch": 4, "epochs_trained": 5},
                   {"chunk": 1, "revived": False, "revival_epoch": None, "epochs_trained": 91}]},
               [{"chunk": 0, "epoch": e, "mean": 0.2 + 0.03 * e} for e in (0, 2, 4)]
               + [{"chunk": 1, "epoch": e, "mean": 0.2} for e in range(0, 91, 2)])
    seq = _run(tmp_path / "seq", {"args": {**args, "pretrained_model_name_or_path": "/m/uce"}},
               {"protocol": "sequential", "criteria": {"clip": 0.31, "classifier": 0.3},
                "revival_point": {"clip": {"chunk": 1, "images_seen": 100}, "classifier": None}, "chunks": []},
               [{"criterion": c, "images_seen": n, "mean": m} for c, n, m in
                [("clip", 50, 0.25), ("classifier", 50, 0.0), ("clip", 100, 0.33), ("classifier", 100, 0.1)]])
    out = str(tmp_path / "report")
    header, rows, plots = report.main(report.parse_args([ind, seq, "--out", out]))
    # The command itself, in a new interpreter (the fresh lane), writes the same table.
    fresh = launch("tools/report.py", [ind, seq, "--out", str(tmp_path / "fresh")], cwd=str(tmp_path), fresh=True)
    assert fresh.returncode == 0 and "zygote" not in fresh.how, fresh.stderr[-2000:]
    table = "revival_table.md"
    assert open(os.path.join(out, table)).read() == open(tmp_path / "fresh" / table).read()
    assert header == ["method", "concept", "data", "criterion", "threshold", "chunk 0", "chunk 1", "Revival Point"]
    assert rows == [["esd-x", "target", "related", "clip", 0.31, "4", ">90", ""],
                    ["uce", "target", "related", "clip", 0.31, "", "", "chunk 1 (100 images)"],
                    ["uce", "target", "related", "classifier", 0.3, "", "", "not reached"]]
    md = open(os.path.join(out, "revival_table.md")).read()
    assert "| esd-x | target | related | clip | 0.31 | 4 | >90 |  |" in md
    assert open(os.path.join(out, "revival_table.csv")).read().splitlines()[1] == "esd-x,target,related,clip,0.31,4,>90,"
    assert r"esd-x & target & related & clip & 0.31 & 4 & $>$90 &  \\" in open(os.path.join(out, "revival_table.tex")).read()
    assert len(plots) == 3
    for p in plots:
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(p) > 5000
    # --concept names the concept for every run; a prompt file named a_golf_ball.txt reads "a golf ball".
    header, rows, _ = report.main(report.parse_args([ind, seq, "--out", out, "--concept", "golf ball"]))
    assert {r[1] for r in rows} == {"golf ball"}
    named = _run(tmp_path / "named", {"args": {**args, "validation_prompts": "/p/a_golf_ball.txt"}},
                 {"protocol": "sequential", "criteria": {}, "revival_point": {}, "chunks": []}, [])
    assert report.load_run(named)["concept"] == "a golf ball"


def test_missing_files_is_one_line_exit_2(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit) as exc:
        report.parse_args([str(tmp_path)])
    assert exc.value.code == 2 and "no config.json" in capsys.readouterr().err


def test_example_grid_runs_are_named_by_their_tags_and_plots_do_not_collide(tmp_path):
    """The grid's rendered commands carry --tag method/concept/data; report.py names runs from config.json's
    tags, so 2 methods x 2 concepts x 2 datasets give 8 distinct rows and 8 distinct plots."""
    import shlex

    from common import cli
    from tools import gridspec as grid

    run_dirs = []
    for run in grid.read_grid(str(ROOT / "slurm" / "example_grid.csv"), str(tmp_path / "runs")):
        argv = shlex.split(grid.launch_command(run))
        flags = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
        tags = cli.parse_tags(a.split("=", 1)[1] for a in argv if a.startswith("--tag="))
        run_dirs.append(_run(run.output_dir, {"args": flags, "tags": tags},
                             {"protocol": "sequential", "criteria": {"clip": 0.31},
                              "revival_point": {"clip": None}, "chunks": []},
                             [{"criterion": "clip", "images_seen": 50, "mean": 0.2}]))
    header, rows, plots = report.main(report.parse_args([*run_dirs, "--out", str(tmp_path / "report")]))
    assert [tuple(r[:3]) for r in rows] == [(m, c, d) for m in ("esd-x", "uce") for c in ("golf ball", "church")
                                            for d in ("related", "unrelated")]
    assert len(set(plots)) == 8 and all(os.path.isfile(p) for p in plots)
    # Without tags the names come from the paths: the example grid's model folders end in the method.
    untagged = _run(tmp_path / "untagged", {"args": {"pretrained_model_name_or_path": "models/church/uce",
                                                     "validation_prompts": "prompts/church.txt",
                                                     "train_data_dir": "data/church/related"}},
                    {"protocol": "sequential", "criteria": {}, "revival_point": {}, "chunks": []}, [])
    r = report.load_run(untagged)
    assert (r["method"], r["concept"], r["data"]) == ("uce", "church", "related")


def _individual(path, revived_chunks, records):
    chunks = [{"chunk": c, "revived": c in revived_chunks, "revival_epoch": 2 if c in revived_chunks else None,
               "epochs_trained": 3 if c in revived_chunks else 7} for c in (0, 1)]
    return report.load_run(_run(path, {"args": {"pretrained_model_name_or_path": "/m/esd-x",
                                                "validation_prompts": "/p/t.txt", "train_data_dir": "/d/rel"}},
                                {"protocol": "individual", "criterion": "clip", "threshold": 0.8, "chunks": chunks},
                                records))


def test_epochs_to_revival_figure_shows_something_when_nothing_revived(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    recs = [{"chunk": c, "epoch": e, "mean": 0.3 + 0.1 * c + 0.01 * e} for c in (0, 1) for e in range(7)]
    none = _individual(tmp_path / "none", set(), recs)
    fig = report.epochs_to_revival_figure([none], "t")
    left, right = fig.axes
    # Left: no revival line with points, one 'not revived' marker per chunk at the last epoch trained.
    (revived, missed) = left.get_lines()
    assert np.isnan(revived.get_ydata()).all()
    assert list(missed.get_xdata()) == [0, 1] and list(missed.get_ydata()) == [6, 6]
    assert "not revived by epoch 6" in missed.get_label()
    # Right: each chunk's best score against the threshold line.
    best, threshold = right.get_lines()
    assert list(best.get_ydata()) == pytest.approx([0.36, 0.46]) and list(threshold.get_ydata()) == [0.8, 0.8]
    # A run where chunk 1 revived: its epoch is on the left, chunk 0 stays a 'not revived' marker.
    some = _individual(tmp_path / "some", {1}, recs)
    left, _ = report.epochs_to_revival_figure([some], "t").axes
    (revived, missed) = left.get_lines()
    assert list(revived.get_xdata()) == [0, 1] and np.isnan(revived.get_ydata()[0]) and revived.get_ydata()[1] == 2
    assert list(missed.get_xdata()) == [0]
    # Chunks 0 and 2 revived, 1 did not: the line is broken at chunk 1 (a NaN), not drawn from 0 to 2 across it.
    chunks = [{"chunk": c, "revived": c != 1, "revival_epoch": None if c == 1 else 2 + c, "epochs_trained": 7}
              for c in range(3)]
    gap = dict(some, summary={**some["summary"], "chunks": chunks})
    (revived, _) = report.epochs_to_revival_figure([gap], "t").axes[0].get_lines()
    y = list(revived.get_ydata())
    assert y[0] == 2 and np.isnan(y[1]) and y[2] == 4


def test_sequential_figure_marks_threshold_and_revival_point(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    base = {"args": {"pretrained_model_name_or_path": "/m/uce", "validation_prompts": "/p/t.txt",
                     "train_data_dir": "/d/rel"}}
    recs = [{"criterion": "clip", "images_seen": n, "mean": m} for n, m in ((50, 0.2), (100, 0.4))]
    for name, point in (("none", None), ("some", {"chunk": 1, "images_seen": 100})):
        r = report.load_run(_run(tmp_path / name, base, {"protocol": "sequential", "criteria": {"clip": 0.31},
                                                         "revival_point": {"clip": point}, "chunks": []}, recs))
        (ax,) = report.sequential_figure(r).axes
        labels = [line.get_label() for line in ax.get_lines()]
        assert labels[:2] == [report.SCORE_LABEL, "threshold 0.31"]
        if point:
            (marker,) = [line for line in ax.get_lines() if line.get_label().startswith("Revival Point")]
            assert list(marker.get_xdata()) == [100, 100] and "chunk 1 (100 images)" in marker.get_label()
        else:
            assert "Revival Point: not reached" in labels
        assert ax.get_ylabel() == "mean CLIP cosine (0..1)"


def test_bootstrap_interval_on_known_answers():
    # All seeds agree: the interval collapses onto the value.
    assert report.bootstrap_median_ci([4, 4, 4, 4]) == (4.0, 4.0, 4.0)
    # Two seeds, 1 and 9: a resample's lower median is 1 with probability 3/4 and 9 with 1/4, so the 2.5% and
    # 97.5% quantiles are 1 and 9.
    assert report.bootstrap_median_ci([1, 9]) == (1.0, 1.0, 9.0)
    # Five seeds, 2..6: median 4; the interval is fixed by the bootstrap seed and lies within the data.
    med, low, high = report.bootstrap_median_ci([2, 3, 4, 5, 6])
    assert med == 4 and 2 <= low < 4 < high <= 6
    assert report.bootstrap_median_ci([2, 3, 4, 5, 6]) == (med, low, high)
    # Not revived counts as past the budget: with most seeds censored the median is not reached.
    assert report.bootstrap_median_ci([2, float("inf"), float("inf")])[0] == float("inf")


def test_runs_that_differ_only_in_seed_are_aggregated(tmp_path):
    args = {"pretrained_model_name_or_path": "/m/uce", "validation_prompts": "/p/t.txt", "train_data_dir": "/d/rel"}
    runs = []
    for seed, point in ((0, 4), (1, 4), (2, 4), (3, None)):
        rp = {"chunk": point, "images_seen": 50 * (point + 1)} if point is not None else None
        runs.append(_run(tmp_path / f"s{seed}", {"args": {**args, "seed": seed}},
                         {"protocol": "sequential", "criteria": {"classifier": 0.6},
                          "revival_point": {"classifier": rp}, "chunks": []}, []))
    header, rows = report.seed_rows([report.load_run(r) for r in runs])
    assert rows == [["uce", "t", "rel", "classifier", 4, "chunk 4 [4, not reached], 3/4 revived"]]
    out = tmp_path / "report"
    report.main(report.parse_args([*runs, "--out", str(out)]))
    assert "3/4 revived" in (out / "revival_table_seeds.md").read_text()


def test_base_score_is_a_reference_line(tmp_path, capsys):
    import matplotlib

    matplotlib.use("Agg")
    base = {"args": {"pretrained_model_name_or_path": "/m/uce", "validation_prompts": "/p/t.txt",
                     "train_data_dir": "/d/rel"}}
    run = _run(tmp_path / "seq", base, {"protocol": "sequential", "criteria": {"clip": 0.31, "classifier": 0.3},
                                        "revival_point": {"clip": None, "classifier": None}, "chunks": []},
               [{"criterion": c, "images_seen": 50, "mean": 0.2} for c in ("clip", "classifier")])
    args = report.parse_args([run, "--out", str(tmp_path / "r"), "--base_score", "clip=0.93"])
    assert report.base_scores(args.base_score) == {"clip": 0.93}
    clip_ax, clf_ax = report.sequential_figure(report.load_run(run), {"clip": 0.93}).axes
    (ref,) = [line for line in clip_ax.get_lines() if line.get_label() == "base model 0.93"]
    assert list(ref.get_ydata()) == [0.93, 0.93]
    assert not [line for line in clf_ax.get_lines() if line.get_label().startswith("base model")]  # not known
    with pytest.raises(SystemExit) as exc:
        report.parse_args([run, "--base_score", "clip"])
    assert exc.value.code == 2 and "CRITERION=NUMBER" in capsys.readouterr().err


def _seq(tmp_path, name, method, seed, means, point=None, role=None, data="rel", retention=None):
    """A sequential run over 2 chunks of 50 images: ``means`` = CLIP means at 0, 50 and 100 images."""
    args = {"pretrained_model_name_or_path": f"/m/{method}", "validation_prompts": "/p/t.txt",
            "train_data_dir": f"/d/{data}", "seed": seed}
    tags = {"method": method, **({"role": role} if role else {})}
    recs = [{"criterion": "clip", "chunk": None if k == 0 else k - 1, "images_seen": 50 * k, "mean": m,
             **({"retention_mean": retention[k], "retention_scores": [retention[k]] * 3} if retention else {})}
            for k, m in enumerate(means)]
    summary = {"protocol": "sequential", "criteria": {"clip": 0.8},
               "before_training": {"images_seen": 0, "clip": {"mean": means[0], "revived": means[0] > 0.8}},
               "revival_point": {"clip": point}, "chunks": []}
    return _run(tmp_path / name, {"args": args, "tags": tags}, summary, recs)


def test_a_control_pairs_with_the_unlearned_run_of_its_data_and_seed(tmp_path):
    runs = [report.load_run(p) for p in (
        _seq(tmp_path, "esd-rel-0", "esd-x", 0, [0.3, 0.5, 0.85], point={"chunk": 1, "images_seen": 100}),
        _seq(tmp_path, "esd-rel-1", "esd-x", 1, [0.3, 0.4, 0.6]),
        _seq(tmp_path, "esd-unrel-0", "esd-x", 0, [0.3, 0.3, 0.3], data="unrel"),
        _seq(tmp_path, "base-unrel-0", "base", 0, [0.9, 0.7, 0.6], role="control", data="unrel"),
        _seq(tmp_path, "base-rel-1", "base", 1, [0.9, 0.88, 0.8], role="control"),
        _seq(tmp_path, "base-rel-0", "base", 0, [0.9, 0.95, 0.9], role="control"))]
    # Same data and seed (and thresholds): each unlearned run gets its own control, never another seed's.
    assert {k: runs.index(c) for k, c in report.pair_controls(runs).items()} == {0: 5, 1: 4, 2: 3}
    assert runs[5]["method"] == "base (control)"
    header, rows = report.control_rows(runs)
    assert header[5:8] == ["unlearned: start -> end (change)", "control: start -> end (change)",
                           "change beyond the control"]
    assert rows[0] == ["esd-x", "t", "rel", 0, "clip", "0.300 -> 0.850 (+0.550)", "0.900 -> 0.900 (+0.000)",
                       "+0.550", "chunk 1", "met before training"]
    assert rows[1][6:8] == ["0.900 -> 0.800 (-0.100)", "+0.400"]
    assert rows[2][5:8] == ["0.300 -> 0.300 (+0.000)", "0.900 -> 0.600 (-0.300)", "+0.300"]
    assert len(rows) == 3  # controls are not paired with themselves
    out = tmp_path / "report"
    report.main(report.parse_args([r["dir"] for r in runs] + ["--out", str(out)]))
    assert "| esd-x | t | rel | 0 | clip | 0.300 -> 0.850 (+0.550)" in (out / "control_table.md").read_text()


def test_sequential_figure_starts_at_zero_and_draws_control_base_and_retention(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    for point in (None, {"chunk": 1, "images_seen": 100}):
        run = report.load_run(_seq(tmp_path, f"u{point is not None}", "uce", 0, [0.3, 0.5, 0.85], point=point,
                                   retention=[0.9, 0.8, 0.7]))
        control = report.load_run(_seq(tmp_path, f"c{point is not None}", "base", 0, [0.9, 0.95, 0.9],
                                       role="control"))
        (ax,) = report.sequential_figure(run, report.control_base(control), control).axes
        lines = {line.get_label(): line for line in ax.get_lines()}
        score = lines[report.SCORE_LABEL]
        assert list(score.get_xdata()) == [0, 50, 100] and list(score.get_ydata()) == [0.3, 0.5, 0.85]
        assert list(lines["threshold 0.8"].get_ydata()) == [0.8, 0.8]
        assert list(lines["base model 0.9"].get_ydata()) == [0.9, 0.9]  # the control's score before training
        ctl = lines["control: original model, same data"]
        assert list(ctl.get_xdata()) == [0, 50, 100] and list(ctl.get_ydata()) == [0.9, 0.95, 0.9]
        ret = lines["retention: CLIP cosine, 3 other prompts"]
        assert list(ret.get_xdata()) == [0, 50, 100] and list(ret.get_ydata()) == [0.9, 0.8, 0.7]
        if point:
            assert list(lines["Revival Point: chunk 1 (100 images)"].get_xdata()) == [100, 100]
        else:
            assert "Revival Point: not reached" in lines
    # Without a control or retention prompts the figure has neither line.
    (ax,) = report.sequential_figure(report.load_run(_seq(tmp_path, "bare", "uce", 0, [0.3, 0.5, 0.6]))).axes
    assert [line.get_label() for line in ax.get_lines()] == [report.SCORE_LABEL, "threshold 0.8",
                                                             "Revival Point: not reached"]


def test_seeds_figure_draws_the_mean_and_the_band_across_seeds(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    runs = [report.load_run(_seq(tmp_path, f"s{seed}", "uce", seed, means, point=point)) for seed, means, point in (
        (0, [0.3, 0.5, 0.9], {"chunk": 1, "images_seen": 100}), (1, [0.2, 0.4, 0.6], None),
        (2, [0.4, 0.6, 0.75], None))]
    (ax,) = report.seeds_figure(runs).axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    mean = lines["mean over 3 seeds"]
    assert list(mean.get_xdata()) == [0, 50, 100] and list(mean.get_ydata()) == pytest.approx([0.3, 0.5, 0.75])
    assert "revived: 1/3 seeds" in lines and list(lines["threshold 0.8"].get_ydata()) == [0.8, 0.8]
    (band,) = ax.collections
    assert band.get_label() == "lowest to highest of 3 seeds"
    ys = band.get_paths()[0].vertices[:, 1]
    assert min(ys) == pytest.approx(0.2) and max(ys) == pytest.approx(0.9)
    # Nothing revived in any seed: still the mean, the band and the threshold, and it says so.
    none = [report.load_run(_seq(tmp_path, f"n{seed}", "esd-x", seed, [0.1, 0.2, 0.3 + 0.1 * seed]))
            for seed in (0, 1)]
    (ax,) = report.seeds_figure(none).axes
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels == ["mean over 2 seeds", "threshold 0.8", "revived: 0/2 seeds"] and len(ax.collections) == 1
    out = tmp_path / "report"
    _, _, plots = report.main(report.parse_args([r["dir"] for r in runs] + ["--out", str(out)]))
    names = sorted(os.path.basename(p) for p in plots)
    assert names == ["sequential_seeds_uce_t_rel.png", "sequential_uce_t_rel_seed0.png",
                     "sequential_uce_t_rel_seed1.png", "sequential_uce_t_rel_seed2.png"]


def test_probes_side_by_side_per_unlearned_model(tmp_path):
    full = _seq(tmp_path, "full", "esd-x", 0, [0.3, 0.5, 0.85], point={"chunk": 1, "images_seen": 100})
    lora = _seq(tmp_path, "lora", "esd-x", 0, [0.3, 0.4, 0.6])
    cfg = json.load(open(os.path.join(lora, "config.json")))
    cfg["args"]["params"] = "lora"
    json.dump(cfg, open(os.path.join(lora, "config.json"), "w"))
    inv = _run(tmp_path / "inv", {"args": {"pretrained_model_name_or_path": "/m/esd-x",
                                           "validation_prompts": "/p/inv.txt", "train_data_dir": "/d/imgs"},
                                  "tags": {"method": "esd-x", "concept": "t"}},
               {"protocol": "inversion", "criteria": {"clip": 0.8}, "best": {"clip": {"mean": 0.83, "step": 20}},
                "crossed": {"clip": 10}, "final": {"clip": 0.81}},
               [{"criterion": "clip", "step": k, "mean": m} for k, m in ((0, 0.3), (10, 0.81), (20, 0.83))])
    other = _seq(tmp_path, "uce", "uce", 0, [0.3, 0.4, 0.6])  # one probe only: no row
    runs = [report.load_run(p) for p in (full, lora, inv, other)]
    assert [r["probe"] for r in runs] == ["fine-tuning", "LoRA fine-tuning", "concept inversion", "fine-tuning"]
    assert runs[1]["method"] == "esd-x (LoRA)" and runs[1]["model"] == "esd-x"
    header, rows = report.probe_rows(runs)
    assert rows == [["esd-x", "t", "clip", "rel: chunk 1 (100 images)", "rel: not reached",
                     "0.830 at step 20 (0.8) -> yes, at step 10"]]
    out = tmp_path / "report"
    _, table, plots = report.main(report.parse_args([full, lora, inv, other, "--out", str(out)]))
    assert "| esd-x | t | clip | rel: chunk 1 (100 images) |" in (out / "probes_table.md").read_text()
    assert [r[0] for r in table] == ["esd-x", "esd-x (LoRA)", "uce"]  # the inversion is no curriculum row
    assert sorted(os.path.basename(p) for p in plots)[0] == "inversion_esd-x_t_imgs.png"
    import matplotlib

    matplotlib.use("Agg")
    (ax,) = report.inversion_figure(runs[2]).axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["score with the learned token"].get_xdata()) == [0, 10, 20]
    assert list(lines["threshold 0.8"].get_ydata()) == [0.8, 0.8] and "crossed at step 10" in lines
    runs[2]["summary"]["crossed"]["clip"] = None  # a probe that never crossed
    (ax,) = report.inversion_figure(runs[2]).axes
    assert "never crossed" in [line.get_label() for line in ax.get_lines()]


def test_runs_with_other_criteria_or_the_same_seed_are_not_aggregated(tmp_path):
    """The demo's individual CLIP and classifier runs of one model share method, data and seed: no seed row."""
    args = {"pretrained_model_name_or_path": "/m/esd-x", "validation_prompts": "/p/t.txt", "train_data_dir": "/d/rel",
            "seed": 0}
    chunks = [{"chunk": 0, "revived": False, "revival_epoch": None, "epochs_trained": 7}]
    runs = [report.load_run(_run(tmp_path / name, {"args": args},
                                 {"protocol": "individual", "criterion": crit, "threshold": 0.6, "chunks": chunks}, []))
            for name, crit in (("clip", "clip"), ("clf", "classifier"))]
    assert report.seed_rows(runs)[1] == [] and [len(g) for g in report.seed_groups(runs)] == [1, 1]
    same_seed = runs + [report.load_run(_run(tmp_path / "clip2", {"args": args},
                                             {"protocol": "individual", "criterion": "clip", "threshold": 0.6,
                                              "chunks": chunks}, []))]
    assert report.seed_rows(same_seed)[1] == []


def test_a_lora_run_pairs_only_with_a_lora_control(tmp_path):
    def lora(path):
        cfg = json.load(open(os.path.join(path, "config.json")))
        cfg["args"]["params"] = "lora"
        json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
        return path

    runs = [report.load_run(p) for p in (
        lora(_seq(tmp_path, "esd-lora", "esd-x", 0, [0.3, 0.5, 0.85])),
        _seq(tmp_path, "base-full", "base", 0, [0.9, 0.95, 0.9], role="control"))]
    assert report.pair_controls(runs) == {}  # full fine-tuning of the base is no control for a LoRA run
    runs.append(report.load_run(lora(_seq(tmp_path, "base-lora", "base", 0, [0.9, 0.9, 0.9], role="control"))))
    assert {k: runs.index(c) for k, c in report.pair_controls(runs).items()} == {0: 2}


def test_the_base_line_comes_from_any_control_of_the_same_prompts_seed_and_thresholds(tmp_path, monkeypatch):
    seen = {}
    real = report.sequential_figure

    def spy(r, base=None, control=None):
        seen[r["method"]] = (base, control)
        return real(r, base, control)

    monkeypatch.setattr(report, "sequential_figure", spy)
    lora_dir = _seq(tmp_path, "esd-lora", "esd-x", 0, [0.3, 0.5, 0.85])
    cfg = json.load(open(os.path.join(lora_dir, "config.json")))
    cfg["args"]["params"] = "lora"
    json.dump(cfg, open(os.path.join(lora_dir, "config.json"), "w"))
    other_seed = _seq(tmp_path, "uce1", "uce", 1, [0.3, 0.4, 0.5])
    control = _seq(tmp_path, "base", "base", 0, [0.91, 0.95, 0.9], role="control")
    report.main(report.parse_args([lora_dir, other_seed, control, "--out", str(tmp_path / "r")]))
    assert seen["esd-x (LoRA)"] == ({"clip": 0.91}, None)  # the base score, but no full fine-tuning control curve
    assert seen["uce"] == ({}, None)  # another seed: its images differ, the base score is not known


def test_the_revival_table_names_each_row_s_seed_when_runs_have_several(tmp_path):
    runs = [report.load_run(_seq(tmp_path, f"s{seed}", "uce", seed, [0.3, 0.5, 0.9],
                                 point={"chunk": 1, "images_seen": 100} if seed else None)) for seed in (0, 1)]
    header, rows = report.table_rows(runs)
    assert header[:5] == ["method", "concept", "data", "seed", "criterion"]
    assert [(r[3], r[-1]) for r in rows] == [(0, "not reached"), (1, "chunk 1 (100 images)")]
    assert report.table_rows(runs[:1])[0][3] == "criterion"  # one seed: no seed column


def test_the_seeds_figure_draws_the_mean_base_score_of_the_seeds_controls(tmp_path):
    runs = [report.load_run(p) for p in (
        _seq(tmp_path, "u0", "uce", 0, [0.3, 0.5, 0.6]), _seq(tmp_path, "u1", "uce", 1, [0.3, 0.4, 0.7]),
        _seq(tmp_path, "c0", "base", 0, [0.9, 0.9, 0.9], role="control"),
        _seq(tmp_path, "c1", "base", 1, [0.94, 0.9, 0.9], role="control"))]
    (members,) = [g for g in report.seed_groups(runs) if g[0]["method"] == "uce"]
    assert report.seeds_base(runs, members) == {"clip": pytest.approx(0.92)}
    assert report.seeds_base(runs[:3], members) == {}  # seed 1 has no control: unknown


# 95% Wilson intervals of k/4 (Wilson 1927; z = 1.95996): centre (p + z^2/8) / (1 + z^2/4), half-width
# z sqrt(p(1-p)/4 + z^2/64) / (1 + z^2/4), worked by hand to 4 decimals.
WILSON_4 = {0: [0.0, 0.4899], 1: [0.0456, 0.6994], 2: [0.1500, 0.8500], 3: [0.3006, 0.9544], 4: [0.5101, 1.0]}


def _rate4(k):
    return {"successes": k, "n": 4, "rate": k / 4, "ci95": WILSON_4[k]}


def _attack(tmp_path, name, attack, model, pre, asr, criterion="clip", tags=None, original=None,
            prompts="/p/t.txt", held=None):
    """A finished tools/attack_prompts.py run over 4 prompts: ``pre`` of them judged a success without attack,
    ``asr`` with it (pre-successes included, as check_asr.py counts), ``held`` of 4 held-out verdicts (default:
    one fewer than ``asr``; None and 0 verdicts: none)."""
    path = tmp_path / name
    os.makedirs(path)
    tags = tags or {}
    config = {"script": "tools/attack_prompts.py", "attack": attack, "settings": {}, "tags": tags,
              "args": {"attack": attack, "pretrained_model_name_or_path": model, "original_model": original,
                       "prompts": prompts, "criterion": criterion, "seed": 0}}
    summary = {"attack": attack, "model": model, "original_model": original, "prompts": prompts,
               "judge": {"criterion": criterion, "threshold": 0.8, "success_when": "score > 0.8"}, "n": 4,
               "pre_asr": _rate4(pre), "asr": _rate4(asr),
               "attack_only": {"successes": asr - pre, "n": 4 - pre, "rate": None, "ci95": [None, None]},
               "heldout_asr": ({"successes": 0, "n": 0, "rate": None, "ci95": [None, None], "seeds_per_case": 1}
                               if held == "none" else {**_rate4(max(asr - 1, 0) if held is None else held),
                                                       "seeds_per_case": 1}),
               "settings": {}, "tags": tags,
               "num_processes": 1}
    json.dump(config, open(path / "config.json", "w"))
    json.dump(summary, open(path / "summary.json", "w"))
    (path / "results.jsonl").write_text("")
    return str(path)


def test_the_hand_worked_intervals_are_the_harness_s():
    from tools.attacks.base import rate

    for k, interval in WILSON_4.items():
        assert rate(k, 4)["ci95"] == pytest.approx(interval, abs=5e-5)


def test_prompt_attacks_are_columns_of_the_probes_table_with_the_base_model_as_positive_control(tmp_path):
    full = _seq(tmp_path, "full", "esd-x", 0, [0.3, 0.5, 0.85], point={"chunk": 1, "images_seen": 100})
    uce_full = _seq(tmp_path, "uce", "uce", 0, [0.3, 0.4, 0.6])
    uce_lora = _seq(tmp_path, "uce-lora", "uce", 0, [0.3, 0.4, 0.6])
    cfg = json.load(open(os.path.join(uce_lora, "config.json")))
    cfg["args"]["params"] = "lora"
    json.dump(cfg, open(os.path.join(uce_lora, "config.json"), "w"))
    # The base model is attacked first, yet its row comes last; it is known as the original from P4D's
    # --original_model. The UnlearnDiffAtk run names its model by --tag method, the others by the path's stem.
    base = _attack(tmp_path, "base-udatk", "unlearndiffatk", "/m/base", pre=4, asr=4)
    udatk = _attack(tmp_path, "esd-udatk", "unlearndiffatk", "/m/esd-x-v2", pre=1, asr=3, tags={"method": "esd-x"})
    p4dn = _attack(tmp_path, "esd-p4dn", "p4d-n", "/m/esd-x", pre=1, asr=2, original="/m/base")
    p4dk = _attack(tmp_path, "esd-p4dk", "p4d-k", "/m/esd-x/", pre=1, asr=1, original="/m/base")
    dirs = [base, full, udatk, uce_full, uce_lora, p4dn, p4dk]
    header, rows = report.probe_rows([report.load_run(d) for d in dirs])
    assert header[3:] == ["fine-tuning: Revival Point", "LoRA fine-tuning: Revival Point",
                          "concept inversion: best score (threshold) -> crossed",
                          "UnlearnDiffAtk: ASR [95% CI] (successes/N), pre-ASR, held-out seeds",
                          "P4D: ASR [95% CI] (successes/N), pre-ASR, held-out seeds"]  # no Ring-A-Bell: no column
    assert rows == [
        ["esd-x", "t", "clip", "rel: chunk 1 (100 images)", "-", "-",
         "75.0% [30.1, 95.4] (3/4), pre-ASR 25.0% [4.6, 69.9] (1/4), held-out 50.0% [15.0, 85.0] (2/4)",
         "P4D-N: 50.0% [15.0, 85.0] (2/4), pre-ASR 25.0% [4.6, 69.9] (1/4), held-out 25.0% [4.6, 69.9] (1/4); "
         "P4D-K: 25.0% [4.6, 69.9] (1/4), pre-ASR 25.0% [4.6, 69.9] (1/4), held-out 0.0% [0.0, 49.0] (0/4)"],
        ["uce", "t", "clip", "rel: not reached", "rel: not reached", "-", "-", "-"],  # no attack run: "-"
        ["base (positive control)", "t", "clip", "-", "-", "-",
         "100.0% [51.0, 100.0] (4/4), pre-ASR 100.0% [51.0, 100.0] (4/4), held-out 75.0% [30.1, 95.4] (3/4)", "-"]]
    out = tmp_path / "report"
    revival_header, revival, plots = report.main(report.parse_args([*dirs, "--out", str(out)]))
    # Attack runs are no curriculum: the revival table and the plots are the fine-tuning runs' alone.
    assert [r[0] for r in revival] == ["esd-x", "uce", "uce (LoRA)"] and len(plots) == 3
    md = (out / "probes_table.md").read_text()
    assert ("| base (positive control) | t | clip | - | - | - | 100.0% [51.0, 100.0] (4/4), pre-ASR 100.0% "
            "[51.0, 100.0] (4/4), held-out 75.0% [30.1, 95.4] (3/4) | - |") in md
    csv_lines = (out / "probes_table.csv").read_text().splitlines()
    assert csv_lines[2] == "uce,t,clip,rel: not reached,rel: not reached,-,-,-"
    assert csv_lines[1].startswith('esd-x,t,clip,rel: chunk 1 (100 images),-,-,'
                                   '"75.0% [30.1, 95.4] (3/4), pre-ASR 25.0% [4.6, 69.9] (1/4), held-out 50.0% [15.0, 85.0] (2/4)",')
    assert (r"base (positive control) & t & clip & - & - & - & 100.0\% [51.0, 100.0] (4/4), pre-ASR 100.0\% "
            r"[51.0, 100.0] (4/4), held-out 75.0\% [30.1, 95.4] (3/4) & - \\") in (out / "probes_table.tex").read_text()


def test_the_base_model_is_the_control_by_its_role_tag_and_an_attack_alone_makes_a_row(tmp_path):
    esd = _attack(tmp_path, "esd", "ringabell", "/m/esd-x", pre=0, asr=2, criterion="classifier")
    base = _attack(tmp_path, "base", "ringabell", "/m/sd", pre=3, asr=4, criterion="classifier")
    tagged = _attack(tmp_path, "base-tagged", "ringabell", "/m/sd", pre=3, asr=4, criterion="classifier",
                     tags={"role": "control"})
    # Without a P4D run or a tag nothing says /m/sd is the original: a row like any other. One attack suffices.
    _, rows = report.probe_rows([report.load_run(d) for d in (base, esd)])
    assert [r[:3] for r in rows] == [["sd", "t", "classifier"], ["esd-x", "t", "classifier"]]
    header, rows = report.probe_rows([report.load_run(d) for d in (tagged, esd)])
    assert header[-1] == "Ring-A-Bell: ASR [95% CI] (successes/N), pre-ASR, held-out seeds"
    assert rows == [["esd-x", "t", "classifier", "-", "-", "-",
                     "50.0% [15.0, 85.0] (2/4), pre-ASR 0.0% [0.0, 49.0] (0/4), held-out 25.0% [4.6, 69.9] (1/4)"],
                    ["sd (positive control)", "t", "classifier", "-", "-", "-",
                     "100.0% [51.0, 100.0] (4/4), pre-ASR 75.0% [30.1, 95.4] (3/4), held-out 75.0% [30.1, 95.4] (3/4)"]]
    # A replay names whose prompts it replayed: the run folder of an adv_prompts.csv.
    replay = _attack(tmp_path, "replay", "replay", "/m/uce", pre=0, asr=1, criterion="classifier",
                     prompts=os.path.join(esd, "adv_prompts.csv"), tags={"concept": "t"}, held="none")
    header, rows = report.probe_rows([report.load_run(replay)])
    assert header[-1] == "replayed prompts: ASR [95% CI] (successes/N), pre-ASR, held-out seeds"
    assert rows == [["uce", "t", "classifier", "-", "-", "-",
                     "esd: 25.0% [4.6, 69.9] (1/4), pre-ASR 0.0% [0.0, 49.0] (0/4), held-out n/a"]]
    # Untagged, a replay takes the concept of the run whose prompts it replays (its prompt file's name, "t"), not
    # "adv prompts"; a replay of a replay goes back to the search; a replay of its own file does not loop.
    untagged = _attack(tmp_path, "replay2", "replay", "/m/uce", pre=0, asr=1, criterion="classifier",
                       prompts=os.path.join(esd, "adv_prompts.csv"))
    again = _attack(tmp_path, "replay3", "replay", "/m/uce", pre=0, asr=1, criterion="classifier",
                    prompts=os.path.join(untagged, "adv_prompts.csv"))
    loop = _attack(tmp_path, "replay4", "replay", "/m/uce", pre=0, asr=1, criterion="classifier",
                   prompts=str(tmp_path / "replay4" / "adv_prompts.csv"))
    assert [report.load_run(d)["concept"] for d in (untagged, again, loop)] == ["t", "t", "adv prompts"]


def test_attack_runs_are_recognised_by_their_config_and_need_only_a_summary(tmp_path, capsys):
    from tools import attack_prompts, attacks

    assert report.ATTACK_SCRIPT == attack_prompts.SCRIPT
    assert set(attacks.MODULES) <= set(report.ATTACK_COLUMNS)  # every attack has its column
    run = _attack(tmp_path, "esd", "unlearndiffatk", "/m/esd-x", pre=1, asr=3)
    assert report.parse_args([run, "--out", str(tmp_path / "r")]).runs == [run]  # no validations.jsonl needed
    os.remove(os.path.join(run, "summary.json"))
    with pytest.raises(SystemExit) as exc:
        report.parse_args([run])
    assert exc.value.code == 2 and "an attack run that has not finished" in capsys.readouterr().err


def test_the_spread_over_unlearning_and_fine_tuning_seeds_is_told_apart(tmp_path):
    # Revival Points (chunk) by (fine-tuning seed, unlearning seed): the unlearning seed moves it by 4, the
    # fine-tuning seed by 1 or 2 (not revived at (2, 1): that slice's range is unknown).
    table = {(0, 0): 2, (0, 1): 6, (1, 0): 3, (1, 1): 7, (2, 0): 4, (2, 1): None}
    args = {"pretrained_model_name_or_path": "/m/esd-x", "validation_prompts": "/p/t.txt", "train_data_dir": "/d/rel"}
    runs = []
    for (s, u), point in table.items():
        rp = {"chunk": point, "images_seen": 50 * (point + 1)} if point is not None else None
        runs.append(_run(tmp_path / f"s{s}u{u}", {"args": {**args, "seed": s}, "tags": {"unlearn_seed": str(u)}},
                         {"protocol": "sequential", "criteria": {"clip": 0.3}, "revival_point": {"clip": rp},
                          "chunks": []}, [{"criterion": "clip", "images_seen": 50, "mean": 0.2}]))
    loaded = [report.load_run(r) for r in runs]
    assert [len(g) for g in report.seed_groups(loaded)] == [6]  # one experiment, though fine-tuning seeds repeat
    header, rows = report.seed_source_rows(loaded)
    by = {(r[4], r[5]): r[6] for r in rows}
    assert by[("fine-tuning seed 0", "unlearning seeds 0, 1")].endswith("2/2 revived")
    assert by[("unlearning seed 0", "fine-tuning seeds 0, 1, 2")] == "chunk 3 [2, 4], 3/3 revived"
    assert by[("unlearning seed 1", "fine-tuning seeds 0, 1, 2")].endswith("2/3 revived")
    # Ranges: unlearning seeds 4, 4 (seed 2's slice has a non-revival); fine-tuning seeds 2 (unlearning seed 0).
    assert by[("each slice", "unlearning seeds only")] == "mean range 4.00 chunks over 2/3 slices where all revived"
    assert by[("each slice", "fine-tuning seeds only")] == "mean range 2.00 chunks over 1/2 slices where all revived"
    # The revival table names both seeds; the report writes the sources table and one figure per run.
    header, rows = report.table_rows(loaded)
    assert header[3:5] == ["seed", "unlearning seed"] and [r[3:5] for r in rows][:2] == [[0, "0"], [0, "1"]]
    out = tmp_path / "report"
    _, _, plots = report.main(report.parse_args([*runs, "--out", str(out)]))
    assert "mean range 4.00 chunks" in (out / "revival_table_seed_sources.md").read_text()
    assert len({p for p in plots if "sequential_esd" in os.path.basename(p)}) == 6


def test_three_methods_on_one_concept_and_data_share_a_figure_two_do_not(tmp_path):
    args = {"validation_prompts": "/p/t.txt", "train_data_dir": "/d/rel", "seed": 0}
    summary = {"protocol": "sequential", "criteria": {"clip": 0.5}, "revival_point": {"clip": None}, "chunks": []}
    records = [{"criterion": "clip", "images_seen": n, "mean": 0.1 * n / 50} for n in (0, 50, 100)]
    runs = [_run(tmp_path / m, {"args": {**args, "pretrained_model_name_or_path": f"/m/{m}"}}, summary, records)
            for m in ("esd-x", "uce", "ac")]
    runs.append(_run(tmp_path / "ctl", {"args": {**args, "pretrained_model_name_or_path": "/m/base"},
                                         "tags": {"role": "control"}}, summary, records))
    loaded = [report.load_run(r) for r in runs]
    (group,) = report.method_groups(loaded)
    assert [r["method"] for r in group] == ["esd-x", "uce", "ac", "base (control)"]
    assert report.method_groups(loaded[1:]) == []  # two methods and a control: their own figures suffice
    out = tmp_path / "report"
    _, _, plots = report.main(report.parse_args([*runs, "--out", str(out)]))
    assert str(out / "sequential_methods_t_rel.png") in plots
