"""The demo's check of its figures against the committed expected values (tools/toy_world/expected.py)."""

import json
import os

import pytest

from conftest import ROOT
from tools.toy_world import expected

ENV = {"cpu_model": "AMD EPYC", "torch_cpu_capability": "AVX2", "torch_threads": 1, "pinned": True,
       "pin": {"MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "AVX2"}, "library_versions": {"torch": "2.14.1"}}

CARD = {"figures": {"clip": {"top1_retrieval_heldout": 0.93125},
                    "models": {"base": {"clip_score_target": 0.92049, "classifier_acc_target": 1.0},
                               "uce": {"clip_score_target": 0.47051, "classifier_acc_target": 0.2}}}}

REVIVAL = """| method | concept | data | criterion | threshold | chunk 0 | Revival Point |
|---|---|---|---|---|---|---|
| esd-x | a red circle | related | clip | 0.7 | - | not revived |
| uce | a red circle | related | classifier | 0.6 | 8 | chunk 8 |
"""


def _demo_dir(tmp_path, revival=REVIVAL):
    (tmp_path / "report").mkdir(parents=True)
    (tmp_path / "report" / "revival_table.md").write_text(revival)
    (tmp_path / "thresholds.json").write_text(json.dumps({"clip_threshold": 0.8298, "bc_threshold": 0.5833}))
    return tmp_path


def test_figures_are_the_printed_strings_named_by_row_and_column(tmp_path):
    figs = expected.demo_figures(str(_demo_dir(tmp_path)), CARD)
    assert figs["card: CLIP top-1 retrieval (held-out)"] == "0.9313"  # 4 decimals, as printed
    assert figs["card: uce clip_score_target"] == "0.4705"
    assert figs["card: uce clip_top1_target"] == "n/a"  # a figure the card lacks is named, not dropped
    assert figs["thresholds: classifier"] == "0.5833"
    assert figs["revival_table: uce a red circle related classifier / Revival Point"] == "chunk 8"
    assert figs["revival_table: esd-x a red circle related clip / chunk 0"] == "-"
    assert list(figs)[0].startswith("card:")  # the order is the demo's: card, thresholds, tables


def test_check_passes_on_equal_figures_and_names_the_first_difference(tmp_path):
    path = str(tmp_path / "expected.json")
    found = expected.demo_figures(str(_demo_dir(tmp_path / "a")), CARD)
    expected.write_section(found, "demo", ENV, path)
    assert expected.check(found, "demo", ENV, path) == len(found)
    # A deliberately changed expected value: the check fails, naming that figure and both environments.
    doc = json.loads(open(path).read())
    doc["sections"]["demo"]["figures"]["revival_table: uce a red circle related classifier / Revival Point"] = "chunk 4"
    open(path, "w").write(json.dumps(doc))
    with pytest.raises(expected.DemoCheckFailed) as err:
        expected.check(found, "demo", dict(ENV, cpu_model="Intel Xeon"), path)
    msg = str(err.value)
    assert "uce a red circle related classifier / Revival Point: got chunk 8, expected chunk 4" in msg
    assert "this machine:  Intel Xeon, torch 2.14.1 AVX2 kernels, 1 thread(s), pinned" in msg
    assert "expected from: AMD EPYC" in msg


def test_a_changed_run_and_a_new_row_are_differences(tmp_path):
    path = str(tmp_path / "expected.json")
    expected.write_section(expected.demo_figures(str(_demo_dir(tmp_path / "a")), CARD), "demo", ENV, path)
    story = REVIVAL.replace("| 8 | chunk 8 |", "| - | not revived |")
    with pytest.raises(expected.DemoCheckFailed, match="chunk 0: got -, expected 8"):
        expected.check(expected.demo_figures(str(_demo_dir(tmp_path / "b", story)), CARD), "demo", ENV, path)
    extra = REVIVAL + "| uce | a red circle | unrelated | clip | 0.7 | - | not revived |\n"
    with pytest.raises(expected.DemoCheckFailed, match="unrelated clip / threshold: got 0.7, not in the expected"):
        expected.check(expected.demo_figures(str(_demo_dir(tmp_path / "c", extra)), CARD), "demo", ENV, path)


def test_no_section_means_not_checked(tmp_path):
    assert expected.check({"x": "1"}, "demo-seeds 0,1,2", ENV, str(tmp_path / "none.json")) == 0
    assert expected.section_name(None) == "demo" and expected.section_name([0, 1, 2]) == "demo-seeds 0,1,2"


def test_only_a_pinned_demo_with_default_numbers_is_checked():
    from tools import demo

    assert demo.expected_section(demo.parse_args([])) == "demo"
    assert demo.expected_section(demo.parse_args(["--run_seeds", "0,1,2"])) == "demo-seeds 0,1,2"
    assert demo.expected_section(demo.parse_args(["--jobs", "1"])) == "demo"  # jobs do not change the numbers
    assert demo.expected_section(demo.parse_args(["--no_pin"])) is None
    assert demo.expected_section(demo.parse_args(["--num_train_epochs", "3"])) is None


def test_the_committed_expected_values_come_from_a_pinned_avx2_run():
    doc = expected.load_expected()
    assert "demo" in doc["sections"], "tools/toy_world/expected_demo.json has no values for make demo"
    for name, section in doc["sections"].items():
        env = section["numeric_environment"]
        assert env["pinned"] and env["pin"]["ATEN_CPU_CAPABILITY"] == "avx2" and env["torch_threads"] == 1, name
        assert len(section["figures"]) > 50, name


def _attack_run(path, attack, tags, pre, post):
    """An attack run's files as tools/attack_prompts.py writes those tools/report.py reads (hand-counted rates)."""
    from tools.attacks.base import attack_rates

    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"script": "tools/attack_prompts.py", "attack": attack,
                                                  "args": {"seed": 0}, "tags": tags}))
    (path / "summary.json").write_text(json.dumps({"attack": attack, "judge": {"criterion": "classifier"},
                                                   "model": str(path), "n": len(pre),
                                                   **attack_rates(pre, post)}))
    return str(path)


def test_the_attack_cells_of_the_probes_table_are_figures(tmp_path):
    """The demo's prompt attacks are columns of tools/report.py's probes table: every cell is a checked figure,
    named by its row (model, concept, criterion) and column; the base model's row is the positive control."""
    from tools import report

    red = {"concept": "a red circle"}
    control = {"role": "control", "method": "base", **red}
    runs = [_attack_run(tmp_path / "runs" / "udatk-esd", "unlearndiffatk", {"method": "esd-x", **red},
                        [False] * 4, [True, False, False, True]),
            _attack_run(tmp_path / "runs" / "p4dn-base", "p4d-n", control, [True] * 4, [True] * 4),
            _attack_run(tmp_path / "runs" / "p4dk-base", "p4d-k", control, [True, True, False, True],
                        [True, True, False, True])]
    report.main(report.parse_args(runs + ["--out", str(tmp_path / "demo" / "report")]))
    figs = expected.demo_figures(str(tmp_path / "demo"), CARD)
    col = "ASR [95% CI] (successes/N), pre-ASR, held-out seeds"
    assert figs[f"probes_table: esd-x a red circle classifier / UnlearnDiffAtk: {col}"] == (
        "50.0% [15.0, 85.0] (2/4), pre-ASR 0.0% [0.0, 49.0] (0/4), held-out n/a")  # none re-judged here
    assert figs[f"probes_table: base (positive control) a red circle classifier / P4D: {col}"] == (
        "P4D-N: 100.0% [51.0, 100.0] (4/4), pre-ASR 100.0% [51.0, 100.0] (4/4), held-out n/a; "
        "P4D-K: 75.0% [30.1, 95.4] (3/4), pre-ASR 75.0% [30.1, 95.4] (3/4), held-out n/a")
    assert figs[f"probes_table: esd-x a red circle classifier / P4D: {col}"] == "-"  # no P4D run on ESD-x
    assert len([f for f in figs if f.startswith("probes_table:")]) == 2 * 5  # 2 rows x (3 other probes + 2 attacks)


def test_only_tables_the_report_writes_are_read():
    """Every table the check reads is one tools/report.py writes, or the demo itself (the methods table): a table
    nobody writes is no figure."""
    import inspect

    from tools import demo, report

    source = inspect.getsource(report.main) + inspect.getsource(demo)
    for name in expected.TABLE_KEYS:
        stem = os.path.splitext(name)[0]
        assert f'"{name}"' in source or f'f"{stem}.{{ext}}"' in source, name


def test_the_demo_page_shows_the_expected_figures():
    """docs/demo.md's revival table (sequential and individual rows) and thresholds are the recorded run's (tools/toy_world/expected_demo.json):
    a re-recorded demo whose page was not updated fails here."""
    figures = expected.load_expected()["sections"]["demo"]["figures"]
    page = (ROOT / "docs" / "demo.md").read_text()
    assert f"**{figures['thresholds: CLIP']}**" in page and f"**{figures['thresholds: classifier']}**" in page
    names = {"ESD-x": "esd-x", "UCE": "uce", "ESD-x (LoRA)": "esd-x (LoRA)", "UCE (LoRA)": "uce (LoRA)",
             "base (control)": "base (control)", "base (LoRA) (control)": "base (LoRA) (control)"}
    rows = individual = 0
    for line in page.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 6 or cells[0] not in names or not (cells[5] or cells[4]):
            continue
        method, data, criterion, threshold, per_chunk, point = cells
        if criterion.endswith(" (individual)"):  # "chunks 4-9: 14, >31, ...": epochs to revival per chunk
            key = f"revival_table: {names[method]} a red circle {data} {criterion[:-13].lower()} (row 2)"
            first, values = per_chunk.replace("**", "").removeprefix("chunks ").split(": ")
            start = int(first.split("-")[0])
            for k, value in enumerate(values.split(", ")):
                assert figures[f"{key} / chunk {start + k}"] == value, (key, start + k)
            individual += 1
            continue
        key = f"revival_table: {names[method]} a red circle {data} {criterion.lower()}"
        assert figures[f"{key} / threshold"] == threshold, key
        got = point.replace("**", "").replace(" (met before training too)", " (50 images)")
        assert figures[f"{key} / Revival Point"] == got, key
        rows += 1
    assert rows == 16 and individual == 2  # every sequential and individual row of the page's revival table


def test_the_unlearning_seeds_demo_tags_both_seeds_and_has_a_section_of_its_own():
    from tools import demo

    args = demo.parse_args(["--run_seeds", "0,1", "--unlearn_seeds", "3,4"])
    assert args.unlearn_methods == ["esd-x", "ac"] and args.out.endswith("demo_runs_useeds")
    section = demo.expected_section(args)
    assert section == "demo-seeds 0,1 unlearning seeds 3,4 of esd-x,ac" != demo.expected_section(
        demo.parse_args(["--run_seeds", "0,1"]))
    models = {("esd-x", 3): "m3", ("esd-x", 4): "m4"}
    p = {"classifier": "clf", "clip": "clip"}
    th = {"clip_threshold": 0.5, "bc_threshold": 0.5}
    plan = demo.unlearn_seeds_plan(args, p, th, "ret.txt", models)
    assert [(model, flags["--seed"], flags["--tag"]) for _, _, model, _, flags in plan] == [
        (m, s, ["method=esd-x", f"unlearn_seed={u}"]) for u, m in ((3, "m3"), (4, "m4")) for s in (0, 1)]
    with pytest.raises(SystemExit):
        demo.parse_args(["--unlearn_seeds", "0,1"])  # no fine-tuning seeds
    with pytest.raises(SystemExit):
        demo.parse_args(["--run_seeds", "0", "--unlearn_seeds", "0", "--unlearn_methods", "uce"])


def test_the_methods_demo_table_reads_each_method_s_runs_and_the_control(tmp_path):
    from tools import demo

    args = demo.parse_args(["--methods", "all"])
    assert args.methods[:3] == ["esd-x", "esd-u", "uce"] and demo.expected_section(args).startswith(
        "demo-methods esd-x,esd-u,uce,")
    with pytest.raises(SystemExit):
        demo.parse_args(["--methods", "esd-x,nope"])

    def run(name, method, data, points, paths, control=False):
        d = tmp_path / name
        d.mkdir()
        tags = {"method": method, "data": data, "concept": "a red circle", **({"role": "control"} if control else {})}
        (d / "config.json").write_text(json.dumps({"args": {"seed": 0}, "tags": tags}))
        (d / "summary.json").write_text(json.dumps({"protocol": "sequential", "criteria": {"clip": 0.9, "classifier": 0.5},
                                                    "revival_point": points, "chunks": []}))
        rows = [{"criterion": c, "images_seen": n, "mean": v, "retention_mean": 0.8 - n / 1000}
                for c, path in paths.items() for n, v in path]
        (d / "validations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(d)

    runs = [run("a", "ac", "related", {"clip": {"chunk": 3, "images_seen": 200}, "classifier": None},
                {"clip": [(0, 0.1), (200, 0.95)], "classifier": [(0, 0.0), (200, 0.3)]}),
            run("b", "ac", "unrelated", {"clip": None, "classifier": None},
                {"clip": [(0, 0.1), (200, 0.2)], "classifier": [(0, 0.0), (200, 0.0)]}),
            run("c", "base (control)", "related", {"clip": None, "classifier": None},
                {"clip": [(0, 0.95), (200, 0.96)], "classifier": [(0, 1.0), (200, 0.9)]}, control=True)]
    scores = {"ac": {"classifier_acc_target": 0.0333, "clip_top1_retained": 1.0, "neighbours_mean_clip_top1": 0.95}}
    header, rows = demo.methods_table(scores, runs)
    assert rows == [["ac", "0.033", "1.000", "0.950", "chunk 3", "not reached", "not reached", "not reached",
                     "+0.840", "+0.400", "0.800 -> 0.600"]]
