#!/usr/bin/env python
"""Revival tables and plots from run output directories (made from their machine-readable files).

    python tools/report.py RUN_DIR [RUN_DIR ...] --out report/

Writes revival_table.{md,csv,tex} (method, concept, data, criterion, per-chunk
epochs to revival or the Revival Point) and PNG plots: score against epoch per
chunk with the threshold line, epochs to revival against chunk (individual
runs), and score against images seen (sequential runs).

A run tagged ``--tag role=control`` is a control: the original (not unlearned)
model fine-tuned on the same curriculum. Each sequential run is paired with the
control of the same concept, data, seed and thresholds: control_table.md puts
the score changes side by side, the run's plot draws the control's line, and
the control's score before training (the original model's) is the base line.

Prompt-attack runs (tools/attack_prompts.py's output directories) join only
probes_table.{md,csv,tex}: a column per attack beside the fine-tuning, LoRA
and inversion probes, and the original model's row as the positive control.

With --utility EVAL_DIR (eval_model.py --utility's output directories),
utility_table.{md,csv,tex} gives per model FID, KID, CLIP score and SSIM/PSNR
against the base model, and the probes table a utility column.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
from typing import Optional


from common import criteria  # noqa: E402
from common.errors import InputError, exit_on_input_error  # noqa: E402
from common.results import CONFIG_FILE, SUMMARY_FILE, VALIDATIONS_FILE, read_jsonl  # noqa: E402

PROG = "report.py"


def build_parser():
    """The command line's flags (docs/flags.md is generated from this)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog=PROG)
    p.add_argument("runs", nargs="+", help="output directories of the fine-tuning scripts")
    p.add_argument("--out", "--output_dir", dest="out", default="report",
                   help="folder for tables and plots (--output_dir: the same, as tools/grid.py passes it)")
    p.add_argument("--title", default="Concept revival", help="title prefix of the plots")
    p.add_argument("--base_score", action="append", default=[], metavar="CRITERION=VALUE",
                   help="the original (not unlearned) model's score, drawn as a reference line on every plot of "
                        "that criterion, e.g. clip=0.93 (repeatable; from eval_model.py on the base model)")
    p.add_argument("--concept", default=None,
                   help="concept name for every run (default: the run's concept tag, else its validation prompt "
                        "file name)")
    p.add_argument("--utility", action="append", default=[], metavar="EVAL_DIR",
                   help="an eval_model.py --utility output directory (repeatable): utility_table.{md,csv,tex} and a "
                        "utility column in the probes table, from its utility/*/utility.json")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    with exit_on_input_error(PROG):
        base_scores(args.base_score)
        for run in args.runs:
            if is_attack_run(run):  # an attack writes no validations, and its summary only when it finished
                if not os.path.isfile(os.path.join(run, SUMMARY_FILE)):
                    raise InputError(f"{run}: no {SUMMARY_FILE} (an attack run that has not finished)")
                continue
            for name in (CONFIG_FILE, SUMMARY_FILE, VALIDATIONS_FILE):
                if not os.path.isfile(os.path.join(run, name)):
                    raise InputError(f"{run}: no {name} (not a finished or running fine-tuning output directory)")
        for folder in args.utility:
            if not utility_files(folder):
                raise InputError(f"--utility {folder}: no utility/*/utility.json (not an eval_model.py --utility "
                                 "output directory, or not finished)")
    return args


def utility_files(folder: str) -> list:
    """The utility.json files of an eval_model.py --utility output directory, in model order."""
    root = os.path.join(folder, "utility")
    if not os.path.isdir(root):
        return []
    return [os.path.join(root, d, "utility.json") for d in sorted(os.listdir(root))
            if os.path.isfile(os.path.join(root, d, "utility.json"))]


def load_utility(folders) -> list:
    """Every model's utility summary from the given eval_model.py output directories."""
    out = []
    for folder in folders:
        for path in utility_files(folder):
            with open(path) as f:
                out.append(json.load(f))
    return out


def _num(value, fmt: str) -> str:
    return "-" if value is None else f"{value:{fmt}}"


def utility_rows(summaries) -> tuple:
    """Per model (eval_model.py --utility): images, features and reference size, FID, KID mean +- std over its
    subsets, CLIP cosine, and mean SSIM / PSNR (dB) / LPIPS (when computed) against the base model's images at
    equal seeds."""
    header = ["model", "role", "images", "features (reference images)", "FID", "KID (mean +- std)",
              "CLIP cosine (0..1)", "SSIM vs base", "PSNR vs base (dB)", "LPIPS vs base"]
    rows = []
    for s in summaries:
        kid = (f"{s['kid_mean']:.4f} +- {s['kid_std']:.4f}" if s.get("kid_mean") is not None else "-")
        feats = f"{s['features']} ({s['reference_images']})" if s.get("features") else "-"
        rows.append([s["label"], s.get("role", "checkpoint"), str(s["images"]), feats, _num(s.get("fid"), ".2f"), kid,
                     _num(s.get("clip_cosine"), ".4f"), _num((s.get("ssim") or {}).get("mean"), ".4f"),
                     _num((s.get("psnr") or {}).get("mean"), ".2f"), _num((s.get("lpips") or {}).get("mean"), ".4f")])
    return header, rows


def utility_cell(s) -> str:
    """A model's utility in one probes-table cell: FID and CLIP cosine, and SSIM against the base when known."""
    parts = [f"FID {s['fid']:.2f}" if s.get("fid") is not None else None, f"CLIP {s['clip_cosine']:.3f}",
             f"SSIM vs base {s['ssim']['mean']:.3f}" if s.get("ssim") else None]
    return ", ".join(p for p in parts if p)


def add_utility_column(header, rows, summaries) -> tuple:
    """The probes table with a utility column: each row's model matched by name with a utility summary's label."""
    by_model = {s["label"]: s for s in summaries}
    suffix = f" ({POSITIVE_CONTROL})"
    cells = [by_model.get(r[0][: -len(suffix)] if r[0].endswith(suffix) else r[0]) for r in rows]
    if not any(cells):
        return header, rows
    return header + ["utility: FID, CLIP, SSIM vs base"], [r + [utility_cell(c) if c else "-"]
                                                             for r, c in zip(rows, cells)]


def base_scores(items) -> dict:
    """--base_score CRITERION=VALUE items as {criterion: value} (InputError when malformed)."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise InputError(f"--base_score {item!r}: expected CRITERION=NUMBER, e.g. clip=0.93") from None
        if not sep or not name.strip():
            raise InputError(f"--base_score {item!r}: expected CRITERION=NUMBER, e.g. clip=0.93")
    return out


def _base_line(ax, base: dict, criterion: str) -> None:
    """The original model's score, when known, as a dotted reference line."""
    if criterion in base:
        ax.axhline(base[criterion], color="grey", ls=":", lw=1.2, label=f"base model {base[criterion]:.3g}")


def _stem(path) -> str:
    return os.path.splitext(os.path.basename(os.path.normpath(str(path or ""))))[0] or "-"


def load_run(run: str) -> dict:
    """A run's config, summary and validation records, with its method, concept and data names.

    Each name comes from the run's config.json tags (``--tag method=...``,
    ``concept=``, ``data=``; tools/grid.py sets them) when present, else from
    its flags' paths: method = the model directory's name, concept = the
    validation prompt file's name (underscores read as spaces), data = the
    training data directory's name.
    """
    if is_attack_run(run):
        return load_attack_run(run)
    with open(os.path.join(run, CONFIG_FILE)) as f:
        config = json.load(f)
    with open(os.path.join(run, SUMMARY_FILE)) as f:
        summary = json.load(f)
    a, tags = config.get("args", {}), config.get("tags") or {}
    run = {"dir": run, "config": config, "summary": summary, "records": read_jsonl(os.path.join(run, VALIDATIONS_FILE)),
            "method": tags.get("method") or _stem(a.get("pretrained_model_name_or_path")),
            "concept": tags.get("concept") or _stem(a.get("validation_prompts")).replace("_", " "),
            "data": tags.get("data") or _stem(a.get("train_data_dir") or a.get("dataset_name")),
            "protocol": summary.get("protocol"), "seed": a.get("seed"),
            "unlearn_seed": tags.get(UNLEARN_SEED_TAG), "control": tags.get("role") == CONTROL_ROLE}
    run["model"] = run["method"]  # the model probed, whatever the probe
    run["probe"] = probe_name(config, run["protocol"])
    if run["probe"] == LORA_PROBE:
        run["method"] += " (LoRA)"
    if run["control"] and "control" not in run["method"]:
        run["method"] += " (control)"
    return run


FULL_PROBE, LORA_PROBE, INVERSION_PROBE = "fine-tuning", "LoRA fine-tuning", "concept inversion"
ATTACK_PROBE = "prompt attack"  # a run's probe and protocol: only the probes table shows it
ATTACK_SCRIPT = "tools/attack_prompts.py"  # config.json's "script" in an attack run (attack_prompts.SCRIPT)
# --attack name -> (its probes-table column, what its cells start with: P4D-N and P4D-K share a column).
ATTACK_COLUMNS = {"unlearndiffatk": ("UnlearnDiffAtk", ""), "p4d-n": ("P4D", "P4D-N: "), "p4d-k": ("P4D", "P4D-K: "),
                  "ringabell": ("Ring-A-Bell", ""), "mma": ("MMA-Diffusion", ""), "replay": ("replayed prompts", ""),
                  "none": ("no attack", ""), "random": ("random tokens", ""), "seed_search": ("seed search", "")}
POSITIVE_CONTROL = "positive control"  # the original model's row in the probes table


def attack_column(attack: str) -> tuple:
    """(probes-table column, cell prefix) of an --attack name; an attack registered elsewhere: its own name."""
    return ATTACK_COLUMNS.get(attack, (attack, ""))


def is_attack_run(run: str) -> bool:
    """Whether a directory holds a prompt-attack run: its config.json names tools/attack_prompts.py."""
    path = os.path.join(run, CONFIG_FILE)
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        return json.load(f).get("script") == ATTACK_SCRIPT


def _attack_concept(prompts: Optional[str]) -> str:
    """An untagged attack run's concept: its prompt file's name; for a replay of another run's adv_prompts.csv,
    that run's concept (its tag, else its own prompt file's name), when the folder is still there."""
    from tools.attacks.harness import ADV_PROMPTS_FILE

    seen = set()
    while os.path.basename(str(prompts or "")) == ADV_PROMPTS_FILE:  # a replay of a replay: back to the search
        source = os.path.normpath(os.path.dirname(str(prompts)))
        if source in seen or not is_attack_run(source) or not os.path.isfile(os.path.join(source, SUMMARY_FILE)):
            break
        seen.add(source)
        with open(os.path.join(source, CONFIG_FILE)) as f:
            config = json.load(f)
        with open(os.path.join(source, SUMMARY_FILE)) as f:
            summary = json.load(f)
        concept = (config.get("tags") or summary.get("tags") or {}).get("concept")
        if concept:
            return concept
        prompts = summary.get("prompts")
    return _stem(prompts).replace("_", " ")


def load_attack_run(run: str) -> dict:
    """An attack run's config and summary, named like the other runs: model = the --tag method or the attacked
    model directory's name, concept = the --tag concept or the prompt file's name, criterion = the judge's."""
    with open(os.path.join(run, CONFIG_FILE)) as f:
        config = json.load(f)
    with open(os.path.join(run, SUMMARY_FILE)) as f:
        summary = json.load(f)
    tags = config.get("tags") or summary.get("tags") or {}
    model = tags.get("method") or _stem(summary.get("model"))
    return {"dir": run, "config": config, "summary": summary, "records": [], "method": model, "model": model,
            "concept": tags.get("concept") or _attack_concept(summary.get("prompts")), "data": None,
            "protocol": ATTACK_PROBE, "probe": ATTACK_PROBE, "seed": config.get("args", {}).get("seed"),
            "control": tags.get("role") == CONTROL_ROLE}


def probe_name(config: dict, protocol: Optional[str]) -> str:
    """How a run probes its model: fine-tuning of UNet weights, a LoRA adapter, or concept inversion."""
    if protocol == "inversion":
        return INVERSION_PROBE
    return LORA_PROBE if config.get("args", {}).get("params") == "lora" else FULL_PROBE


def original_models(runs) -> set:
    """Names of the original (not unlearned) model: the model of every control run (--tag role=control, fine-tuning
    or attack) and every P4D run's --original_model."""
    names = {r["model"] for r in runs if r["control"]}
    return names | {_stem(r["summary"]["original_model"]) for r in runs
                    if r["probe"] == ATTACK_PROBE and r["summary"].get("original_model")}


def attack_cell(r) -> str:
    """An attack run's cell: ASR [95% Wilson interval] (successes/N), then pre-ASR (the prompts without attack),
    then the held-out ASR (each found prompt judged again with other seeds: how much of the ASR is selection)."""
    from tools.attacks.harness import ADV_PROMPTS_FILE, _pct  # the attack log's own figures, as it writes them

    s = r["summary"]
    prefix = attack_column(s["attack"])[1]
    if s["attack"] == "replay":  # whose prompts: the run that found them (its folder), else the prompt file
        prompts = os.path.normpath(str(s.get("prompts") or ""))
        source = (os.path.basename(os.path.dirname(prompts)) if os.path.basename(prompts) == ADV_PROMPTS_FILE
                  else _stem(prompts))
        prefix = f"{source}: "
    held = s.get("heldout_asr")
    held = "n/a" if not held or not held.get("n") else _pct(held)
    return f"{prefix}{_pct(s['asr'])}, pre-ASR {_pct(s['pre_asr'])}, held-out {held}"


def probe_rows(runs) -> tuple:
    """Per probed model, concept and criterion, the probes side by side: the sequential Revival Point of full and
    of LoRA fine-tuning (per fine-tuning data), the concept-inversion probe's best score (and whether it
    crossed the threshold) and, per prompt attack run among ``runs``, its ASR and pre-ASR. Rows: every model with
    an attack run or with two probes; the original model's row (its attacks: the positive control, its pre-ASR
    the ceiling) comes last."""
    header = ["model", "concept", "criterion", FULL_PROBE + ": Revival Point", LORA_PROBE + ": Revival Point",
              INVERSION_PROBE + ": best score (threshold) -> crossed"]
    fixed = len(header)
    order = list(dict.fromkeys(column for column, _ in ATTACK_COLUMNS.values()))
    attacks = list(dict.fromkeys(attack_column(r["summary"]["attack"])[0] for r in runs if r["probe"] == ATTACK_PROBE))
    attacks.sort(key=lambda c: order.index(c) if c in order else len(order))  # stable: unknown ones as they came
    header += [f"{column}: ASR [95% CI] (successes/N), pre-ASR, held-out seeds" for column in attacks]
    originals = original_models(runs)
    cells = {}
    for r in runs:
        s = r["summary"]
        if r["probe"] == ATTACK_PROBE:
            column = fixed + attacks.index(attack_column(s["attack"])[0])
            key = (r["model"], r["concept"], s["judge"]["criterion"])
            cells.setdefault(key, {}).setdefault(column, []).append(attack_cell(r))
            continue
        if r["control"]:
            continue
        if r["protocol"] == "sequential":
            column = 3 if r["probe"] == FULL_PROBE else 4
            for name in s["criteria"]:
                point = s["revival_point"].get(name)
                text = f"{r['data']}: " + (f"chunk {point['chunk']} ({point['images_seen']} images)" if point
                                           else "not reached")
                cells.setdefault((r["model"], r["concept"], name), {}).setdefault(column, []).append(text)
        elif r["protocol"] == "inversion":
            for name, threshold in s["criteria"].items():
                best, crossed = s["best"][name], s["crossed"].get(name)
                text = (f"{best['mean']:.3f} at step {best['step']} ({threshold:g}) -> "
                        + (f"yes, at step {crossed}" if crossed is not None else "no"))
                cells.setdefault((r["model"], r["concept"], name), {}).setdefault(5, []).append(text)
    kept = [(key, c) for key, c in cells.items() if len(c) > 1 or any(k >= fixed for k in c)]  # where probes meet
    kept.sort(key=lambda item: item[0][0] in originals)  # stable: the positive control after the unlearned models
    rows = [[f"{model} ({POSITIVE_CONTROL})" if model in originals else model, concept, name]
            + ["; ".join(c.get(k, [])) or "-" for k in range(3, len(header))]
            for (model, concept, name), c in kept]
    return header, rows


CONTROL_ROLE = "control"  # --tag role=control: the original model fine-tuned on the same curriculum
UNLEARN_SEED_TAG = "unlearn_seed"  # --tag unlearn_seed=N: the unlearning run's seed (tools/grid.py's unlearn_seed axis)


def _pair_key(r) -> tuple:
    """What a run and its control share: concept, data, seed, protocol, probe (a LoRA run's control is LoRA
    fine-tuning of the original model) and the criteria with their thresholds."""
    return r["concept"], r["data"], str(r["seed"]), r["protocol"], r["probe"], _criteria_key(r)


def pair_controls(runs) -> dict:
    """{index of an unlearned run: its control run} for every run with a control of the same concept, data,
    seed, protocol and thresholds (the first such control when there are several)."""
    controls = {}
    for r in runs:
        if r["control"]:
            controls.setdefault(_pair_key(r), r)
    return {k: controls[_pair_key(r)] for k, r in enumerate(runs) if not r["control"] and _pair_key(r) in controls}


def score_path(r, criterion: str) -> list:
    """(images seen, mean score) after each validation of a sequential run, from 0 images when it was recorded."""
    return [(x["images_seen"], x["mean"]) for x in r["records"] if x["criterion"] == criterion]


def retention_path(r) -> list:
    """(images seen, retention mean) per validation of a sequential run with --retention_prompts."""
    seen, out = set(), []
    for x in r["records"]:
        if "retention_mean" in x and x["images_seen"] not in seen:
            seen.add(x["images_seen"])
            out.append((x["images_seen"], x["retention_mean"]))
    return out


def control_base(control) -> dict:
    """The original model's score per criterion: the control's validation before any fine-tuning."""
    before = control["summary"].get("before_training") or {}
    return {name: v["mean"] for name, v in before.items() if isinstance(v, dict) and "mean" in v}


def control_rows(runs) -> tuple:
    """Sequential runs beside their controls: the score before and after the curriculum, its change, and how much
    of the change the control (fine-tuning alone, on a model that never unlearned) also shows."""
    header = ["method", "concept", "data", "seed", "criterion", "unlearned: start -> end (change)",
              "control: start -> end (change)", "change beyond the control", "Revival Point", "control crosses"]
    rows = []
    for k, control in pair_controls(runs).items():
        r = runs[k]
        if r["protocol"] != "sequential":
            continue
        for name in r["summary"]["criteria"]:
            mine, theirs = score_path(r, name), score_path(control, name)
            if not mine or not theirs:
                continue
            d_mine, d_theirs = mine[-1][1] - mine[0][1], theirs[-1][1] - theirs[0][1]
            point, cpoint = r["summary"]["revival_point"].get(name), control["summary"]["revival_point"].get(name)
            rows.append([r["method"], r["concept"], r["data"], r["seed"], name,
                         f"{mine[0][1]:.3f} -> {mine[-1][1]:.3f} ({d_mine:+.3f})",
                         f"{theirs[0][1]:.3f} -> {theirs[-1][1]:.3f} ({d_theirs:+.3f})",
                         f"{d_mine - d_theirs:+.3f}",
                         f"chunk {point['chunk']}" if point else "not reached",
                         "met before training" if (control["summary"].get("before_training") or {}).get(name, {})
                         .get("revived") else (f"chunk {cpoint['chunk']}" if cpoint else "never")])
    return header, rows


def _slug(*names) -> str:
    """A file-name part from run names: 'esd-x', 'golf ball', 'related' -> 'esd-x_golf_ball_related'."""
    return "_".join("".join(c if c.isalnum() or c in "-." else "_" for c in str(n)) for n in names)


def table_rows(runs) -> tuple:
    """Header and rows: individual runs give epochs to revival per chunk ('>N' when not revived)."""
    chunks = sorted({c["chunk"] for r in runs if r["protocol"] == "individual" for c in r["summary"]["chunks"]})
    header = ["method", "concept", "data", "criterion", "threshold"] + [f"chunk {i}" for i in chunks] + ["Revival Point"]
    rows = []
    for r in runs:
        s = r["summary"]
        if r["protocol"] == "inversion":
            continue  # not a curriculum: probe_rows shows it
        if r["protocol"] == "individual":
            by_chunk = {c["chunk"]: (str(c["revival_epoch"]) if c["revived"] else f">{c['epochs_trained'] - 1}")
                        for c in s["chunks"]}
            rows.append([r["method"], r["concept"], r["data"], s["criterion"], s["threshold"]]
                        + [by_chunk.get(i, "") for i in chunks] + [""])
        else:
            for name, threshold in s["criteria"].items():
                point = s["revival_point"].get(name)
                rp = f"chunk {point['chunk']} ({point['images_seen']} images)" if point else "not reached"
                rows.append([r["method"], r["concept"], r["data"], name, threshold] + [""] * len(chunks) + [rp])
    if len({str(r["seed"]) for r in runs if r["protocol"] != "inversion"}) > 1:  # which seed each row is
        header.insert(3, "seed")
        kept = [r for r in runs if r["protocol"] != "inversion"]
        seeds = [r["seed"] for r in kept for _ in (r["summary"]["criteria"] if r["protocol"] == "sequential" else [0])]
        rows = [row[:3] + [seed] + row[3:] for row, seed in zip(rows, seeds)]
    kept = [r for r in runs if r["protocol"] != "inversion"]
    if len({str(r.get("unlearn_seed")) for r in kept}) > 1:  # which unlearned model of several seeds each row is
        at = header.index("seed") + 1 if "seed" in header else 3
        header.insert(at, "unlearning seed")
        useeds = [r.get("unlearn_seed") or "-" for r in kept
                  for _ in (r["summary"]["criteria"] if r["protocol"] == "sequential" else [0])]
        rows = [row[:at] + [u] + row[at:] for row, u in zip(rows, useeds)]
    return header, rows


BOOTSTRAP_RESAMPLES = 10_000  # resamples of the seeds' values per interval
BOOTSTRAP_SEED = 0  # the intervals are reproducible: the same runs give the same table


def bootstrap_median_ci(values, level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES,
                        seed: int = BOOTSTRAP_SEED) -> tuple:
    """Median of ``values`` and its percentile-bootstrap interval (Efron & Tibshirani 1993, ch. 13).

    A value of ``inf`` stands for "not revived" (censored past the budget): it sorts last, so the median and
    the bounds are ``inf`` when enough seeds did not revive.
    """
    import numpy as np

    x = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    medians = np.sort(x[rng.integers(0, len(x), size=(resamples, len(x)))], axis=1)
    # The lower median, so that a resample with an inf in the middle does not average it into a finite number.
    medians = medians[:, (len(x) - 1) // 2]
    low, high = np.quantile(medians, [(1 - level) / 2, 1 - (1 - level) / 2], method="inverted_cdf")
    return float(np.sort(x)[(len(x) - 1) // 2]), float(low), float(high)


def _fmt_point(v: float, unit: str, cap_label: str) -> str:
    return cap_label if v == float("inf") else f"{unit}{v:g}"


def seed_rows(runs) -> tuple:
    """Runs that differ only in --seed, aggregated: per criterion the median Revival Point (sequential) or per
    chunk the median epochs to revival (individual), a 95% bootstrap interval, and how many seeds revived."""
    header = ["method", "concept", "data", "criterion", "seeds", "result (median [95% CI], seeds revived)"]
    rows = []
    for members in seed_groups(runs):
        method, concept, data, protocol = (members[0][k] for k in ("method", "concept", "data", "protocol"))
        seeds = members  # each run one seed, or one (fine-tuning, unlearning) pair of seeds
        if len(members) < 2 or protocol == "inversion":
            continue
        if protocol == "sequential":
            for name in members[0]["summary"]["criteria"]:
                points = [m["summary"]["revival_point"].get(name) for m in members]
                values = [p["chunk"] if p else float("inf") for p in points]
                med, low, high = bootstrap_median_ci(values)
                text = (f"{_fmt_point(med, 'chunk ', 'not reached')} [{_fmt_point(low, '', 'not reached')}, "
                        f"{_fmt_point(high, '', 'not reached')}], {sum(p is not None for p in points)}/"
                        f"{len(points)} revived")
                rows.append([method, concept, data, name, len(seeds), text])
        else:
            criterion = members[0]["summary"]["criterion"]
            chunks = sorted({c["chunk"] for m in members for c in m["summary"]["chunks"]})
            for chunk in chunks:
                outcomes = [next((c for c in m["summary"]["chunks"] if c["chunk"] == chunk), None) for m in members]
                outcomes = [o for o in outcomes if o is not None]
                values = [o["revival_epoch"] if o["revived"] else float("inf") for o in outcomes]
                med, low, high = bootstrap_median_ci(values)
                text = (f"chunk {chunk}: {_fmt_point(med, 'epoch ', 'not revived')} [{_fmt_point(low, '', '-')}, "
                        f"{_fmt_point(high, '', '-')}], {sum(o['revived'] for o in outcomes)}/{len(outcomes)} "
                        "revived")
                rows.append([method, concept, data, f"{criterion} (individual)", len(seeds), text])
    return header, rows


def to_markdown(header, rows) -> str:
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def to_csv(header, rows) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def to_latex(header, rows) -> str:
    esc = lambda v: str(v).replace("_", r"\_").replace("%", r"\%").replace(">", r"$>$")  # noqa: E731
    lines = [r"\begin{tabular}{" + "l" * len(header) + "}", r"\toprule", " & ".join(map(esc, header)) + r" \\",
             r"\midrule"] + [" & ".join(map(esc, r)) + r" \\" for r in rows] + [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def epochs_to_revival_figure(individual, title: str):
    """Individual runs, per chunk: epochs to revival (left) and the best validation score against the threshold
    (right), so a run in which nothing revived still shows how close each chunk came."""
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for k, r in enumerate(individual):
        colour = f"C{k}"
        name = f"{r['method']} / {r['data']} ({r['summary']['criterion']})"
        chunks = r["summary"]["chunks"]
        revived = [c for c in chunks if c["revived"]]
        missed = [c for c in chunks if not c["revived"]]
        # One point per chunk, NaN where it did not revive: the line joins neighbouring revived chunks only, never
        # across a chunk that did not revive.
        left.plot([c["chunk"] for c in chunks], [c["revival_epoch"] if c["revived"] else float("nan") for c in chunks],
                  "o-", color=colour, label=f"{name}: revived" if revived else "_none revived")
        if missed:  # side by side when several runs missed the same chunk
            left.plot([c["chunk"] + 0.1 * k for c in missed], [c["epochs_trained"] - 1 for c in missed], "x",
                      color=colour, ls="none",
                      label=f"{name}: not revived by epoch {max(c['epochs_trained'] for c in missed) - 1}")
        best = {}
        for x in r["records"]:
            best[x["chunk"]] = max(best.get(x["chunk"], float("-inf")), x["mean"])
        xs = sorted(best)
        right.plot(xs, [best[c] for c in xs], "o-", color=colour, label=f"{name}: best score")
        right.axhline(r["summary"]["threshold"], color=colour, ls="--", lw=1, label=f"{name}: threshold")
    cap = max((c["epochs_trained"] for r in individual for c in r["summary"]["chunks"]), default=1)
    left.set(xlabel="curriculum chunk", ylabel="epochs to revival", title=f"{title}: epochs to revival",
             ylim=(-0.5, cap + 0.5))
    right.set(xlabel="curriculum chunk", ylabel="best validation score in the chunk",
              title=f"{title}: how close each chunk came")
    for ax in (left, right):
        ax.legend(fontsize=6)
    return fig


SCORE_LABEL = "score after each chunk (at 0 images: before fine-tuning)"


def _legend_below(ax) -> None:
    """The legend under the axes, where it hides no point of the curves."""
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)


def _retention_panel(criteria_) -> str:
    """The criterion whose panel also draws the retention line: CLIP's (the same cosine scale), else the first."""
    return "clip" if "clip" in criteria_ else next(iter(criteria_), "")


def sequential_figure(r, base: Optional[dict] = None, control=None):
    """A sequential run: the score after each chunk per criterion (from 0 images: the unlearned model), its
    threshold, its Revival Point, the retention prompts' score, and (when known) its control and the base
    model's score."""
    import matplotlib.pyplot as plt

    criteria_ = r["summary"]["criteria"]
    fig, axes = plt.subplots(1, len(criteria_), figsize=(5.5 * len(criteria_), 5.2), squeeze=False)
    for ax, (name, threshold) in zip(axes[0], criteria_.items()):
        path = score_path(r, name)
        ax.plot([x for x, _ in path], [y for _, y in path], marker="o", label=SCORE_LABEL)
        ax.axhline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold:g}")
        _base_line(ax, base or {}, name)
        if control is not None and score_path(control, name):
            cpath = score_path(control, name)
            ax.plot([x for x, _ in cpath], [y for _, y in cpath], color="grey", ls="--", marker=".",
                    label="control: original model, same data")
        if name == _retention_panel(criteria_) and retention_path(r):
            n = len(next(x for x in r["records"] if "retention_scores" in x)["retention_scores"])
            rpath = retention_path(r)
            ax.plot([x for x, _ in rpath], [y for _, y in rpath], color="C2", marker="s", ms=3,
                    label=f"retention: CLIP cosine, {n} other prompts")
        point = r["summary"]["revival_point"].get(name)
        if point:
            ax.axvline(point["images_seen"], color="C3", lw=1.5,
                       label=f"Revival Point: chunk {point['chunk']} ({point['images_seen']} images)")
        else:
            ax.plot([], [], " ", label="Revival Point: not reached")
        ax.set(xlabel="fine-tuning images seen", ylabel=_ylabel(name),
               title=f"{r['method']} / {r['concept']} / {r['data']}: {name}")
        _legend_below(ax)
    return fig


METHODS_FIGURE_MIN = 3  # methods on one concept and data before their curves share a figure (2 read well apart)


def method_groups(runs) -> list:
    """Sequential fine-tuning runs of at least METHODS_FIGURE_MIN methods on one concept and data, measured the same
    way (one seed each: the lowest), as lists in run order; with the control of that data where there is one."""
    groups = {}
    for r in runs:
        if r["protocol"] == "sequential" and r["probe"] == FULL_PROBE:
            groups.setdefault((r["concept"], r["data"], _criteria_key(r)), []).append(r)
    out = []
    for members in groups.values():
        by_method = {}
        for r in sorted(members, key=lambda r: _seed_order(str(r["seed"]))):
            by_method.setdefault(r["method"], r)
        if sum(not r["control"] for r in by_method.values()) >= METHODS_FIGURE_MIN:
            out.append(list(by_method.values()))
    return out


def methods_figure(members, base: Optional[dict] = None):
    """Several methods' sequential runs on one concept and data: per criterion every method's score after each
    chunk, the control dashed, the threshold, each method's Revival Point as a marker on its curve."""
    import matplotlib.pyplot as plt

    criteria_ = members[0]["summary"]["criteria"]
    fig, axes = plt.subplots(1, len(criteria_), figsize=(6.5 * len(criteria_), 5.8), squeeze=False)
    # tab10 without its grey (index 7), which the control's dashed curve uses, then black (solid, with markers:
    # apart from the dashed threshold): ten distinct colours.
    palette = [plt.get_cmap("tab10")(i) for i in (0, 1, 2, 3, 4, 5, 6, 8, 9)] + ["black"]

    def colours(k):
        return palette[k % len(palette)]

    for ax, (name, threshold) in zip(axes[0], criteria_.items()):
        k = 0
        for r in members:
            path = score_path(r, name)
            if not path:
                continue
            if r["control"]:
                ax.plot([x for x, _ in path], [y for _, y in path], color="grey", ls="--", marker=".",
                        label=f"{r['method']}")
                continue
            point = r["summary"]["revival_point"].get(name)
            ax.plot([x for x, _ in path], [y for _, y in path], color=colours(k), marker="o", ms=3,
                    label=f"{r['method']} (RP: {'chunk ' + str(point['chunk']) if point else 'not reached'})")
            if point:
                y = dict(path).get(point["images_seen"])
                if y is not None:
                    ax.plot([point["images_seen"]], [y], marker="*", ms=12, color=colours(k))
            k += 1
        ax.axhline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold:g}")
        _base_line(ax, base or {}, name)
        m = members[0]
        ax.set(xlabel="fine-tuning images seen", ylabel=_ylabel(name),
               title=f"{m['concept']} / {m['data']}: {name}, {k} methods (star: Revival Point)")
        _legend_below(ax)
    return fig


def plot(runs, out: str, title: str, base: Optional[dict] = None) -> list:
    """Write the PNG plots; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    individual = [r for r in runs if r["protocol"] == "individual"]
    sequential = [r for r in runs if r["protocol"] == "sequential"]
    for r in individual:
        fig, ax = plt.subplots(figsize=(6, 4))
        for chunk in sorted({x["chunk"] for x in r["records"]}):
            recs = [x for x in r["records"] if x["chunk"] == chunk]
            ax.plot([x["epoch"] for x in recs], [x["mean"] for x in recs], marker="o", ms=3, label=f"chunk {chunk}")
        ax.axhline(r["summary"]["threshold"], color="k", ls="--", lw=1, label="threshold")
        _base_line(ax, base or {}, r["summary"]["criterion"])
        ax.set(xlabel="epoch", ylabel=_ylabel(r["summary"]["criterion"]),
               title=f"{title}: {r['method']} / {r['concept']} / {r['data']}")
        ax.legend(fontsize=7, ncol=2)
        name = _slug(r["method"], r["concept"], r["data"], r["summary"]["criterion"])
        written.append(_save(fig, out, f"score_vs_epoch_{name}.png"))
    if individual:
        written.append(_save(epochs_to_revival_figure(individual, title), out, "epochs_to_revival.png"))
    controls = pair_controls(runs)
    for k, r in enumerate(runs):
        if r["protocol"] != "sequential":
            continue
        name = _slug(r["method"], r["concept"], r["data"]) + (f"_seed{r['seed']}" if _seeded(runs, r) else "") + (
            f"_useed{r['unlearn_seed']}" if r.get("unlearn_seed") is not None else "")
        control = controls.get(k)
        # The base model's score: given on the command line, else a control's before any fine-tuning (the
        # original model's, whatever the control's data or probe, at this run's seed, prompts and thresholds).
        original = _original(runs, r)
        known = {**(control_base(original) if original is not None else {}), **(base or {})}
        written.append(_save(sequential_figure(r, known, control), out, f"sequential_{name}.png"))
    for r in runs:
        if r["protocol"] == "inversion":
            name = _slug(r["method"], r["concept"], r["data"])
            written.append(_save(inversion_figure(r, base), out, f"inversion_{name}.png"))
    for members in method_groups(runs):  # every method's curve on one figure per concept and data
        m = members[0]
        original = next((_original(runs, r) for r in members if _original(runs, r) is not None), None)
        known = {**(control_base(original) if original is not None else {}), **(base or {})}
        written.append(_save(methods_figure(members, known), out,
                             f"sequential_methods_{_slug(m['concept'], m['data'])}.png"))
    for members in seed_groups(sequential):
        if len(members) > 1:
            m = members[0]
            name = _slug(m["method"], m["concept"], m["data"])
            known = {**seeds_base(runs, members), **(base or {})}
            written.append(_save(seeds_figure(members, known), out, f"sequential_seeds_{name}.png"))
    return written


def _original(runs, r):
    """A control whose score before training is the original model's for ``r``: the same prompts (concept),
    seed and thresholds, whatever its data or probe."""
    return next((c for c in runs if c["control"] and (c["concept"], str(c["seed"]), _criteria_key(c))
                 == (r["concept"], str(r["seed"]), _criteria_key(r))), None)


def seeds_base(runs, members) -> dict:
    """The original model's score for runs over seeds: the mean over their seeds of the controls' scores before
    training (each seed draws its own validation images), when every seed has a control."""
    per_seed = []
    for m in members:
        control = _original(runs, m)
        if control is None:
            return {}
        per_seed.append(control_base(control))
    return {name: sum(b[name] for b in per_seed) / len(per_seed) for name in per_seed[0]}


def inversion_figure(r, base: Optional[dict] = None):
    """A concept-inversion probe: each criterion's score against training steps, with its threshold."""
    import matplotlib.pyplot as plt

    criteria_ = r["summary"]["criteria"]
    fig, axes = plt.subplots(1, len(criteria_), figsize=(5.5 * len(criteria_), 5.2), squeeze=False)
    for ax, (name, threshold) in zip(axes[0], criteria_.items()):
        recs = [x for x in r["records"] if x["criterion"] == name]
        ax.plot([x["step"] for x in recs], [x["mean"] for x in recs], marker="o", label="score with the learned token")
        ax.axhline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold:g}")
        _base_line(ax, base or {}, name)
        crossed = r["summary"]["crossed"].get(name)
        ax.plot([], [], " ", label=f"crossed at step {crossed}" if crossed is not None else "never crossed")
        ax.set(xlabel="textual-inversion step", ylabel=_ylabel(name),
               title=f"{r['method']} / {r['concept']}: concept inversion, {name}")
        _legend_below(ax)
    return fig


def _seeded(runs, r) -> bool:
    """Whether the run is one seed of several (its plot name then needs the seed)."""
    return any(len(g) > 1 and any(m is r for m in g) for g in seed_groups(runs))


def _criteria_key(r) -> tuple:
    """A run's criteria and thresholds: runs measured differently are never seeds of one experiment."""
    s = r["summary"]
    return tuple(sorted(s["criteria"].items())) if "criteria" in s else ((s.get("criterion"), s.get("threshold")),)


def seed_groups(runs) -> list:
    """Runs that differ only in their seed, as lists: the same method, concept, data, protocol, criteria and
    thresholds, and distinct seeds (runs that share a seed as well are not seeds of one experiment: each stands
    alone)."""
    groups = {}
    for r in runs:
        groups.setdefault((r["method"], r["concept"], r["data"], r["protocol"], _criteria_key(r)), []).append(r)
    out = []
    for members in groups.values():
        distinct = len({_seed_pair(m) for m in members}) == len(members)
        out.extend([members] if distinct else [[m] for m in members])
    return out


def _seed_pair(r) -> tuple:
    """(fine-tuning seed, unlearning seed) of a run: runs of one experiment differ in one of them or both."""
    return str(r["seed"]), str(r.get("unlearn_seed"))


def _revival_text(points, unit="chunk ", cap="not reached") -> str:
    """Median [95% bootstrap CI], how many revived, of sequential Revival Points (None: not revived)."""
    med, low, high = bootstrap_median_ci([p["chunk"] if p else float("inf") for p in points])
    return (f"{_fmt_point(med, unit, cap)} [{_fmt_point(low, '', cap)}, {_fmt_point(high, '', cap)}], "
            f"{sum(p is not None for p in points)}/{len(points)} revived")


def _spread(points) -> Optional[float]:
    """Highest minus lowest Revival Point (chunks) of a slice, or None when one of them did not revive."""
    chunks = [p["chunk"] for p in points if p]
    return max(chunks) - min(chunks) if len(chunks) == len(points) else None


def seed_source_rows(runs) -> tuple:
    """Where a sequential Revival Point's spread comes from, for runs over both seeds (tools/grid.py's seed and
    unlearn_seed axes): per fine-tuning seed the interval over unlearning seeds, per unlearning seed the interval
    over fine-tuning seeds, and per source the mean of those slices' ranges (highest minus lowest chunk, over the
    slices where every run revived)."""
    header = ["method", "concept", "data", "criterion", "held fixed", "varied", "result (median [95% CI], revived)"]
    rows = []
    for members in seed_groups(runs):
        if members[0]["protocol"] != "sequential":
            continue
        ft = sorted({str(m["seed"]) for m in members}, key=_seed_order)
        us = sorted({str(m.get("unlearn_seed")) for m in members}, key=_seed_order)
        if len(us) < 2 or "None" in us:
            continue  # one unlearning seed (or unknown for some runs): seed_rows says it all
        method, concept, data = (members[0][k] for k in ("method", "concept", "data"))
        for name in members[0]["summary"]["criteria"]:
            point = {_seed_pair(m): m["summary"]["revival_point"].get(name) for m in members}
            spreads = {"unlearning": [], "fine-tuning": []}
            for fixed, varied, outer, inner, key in (
                    ("fine-tuning seed", "unlearning seeds", ft, us, lambda a, b: (a, b)),
                    ("unlearning seed", "fine-tuning seeds", us, ft, lambda a, b: (b, a))):
                for a in outer:
                    points = [point[key(a, b)] for b in inner if key(a, b) in point]
                    if len(points) < 2:
                        continue
                    spreads[varied.split()[0]].append(_spread(points))
                    rows.append([method, concept, data, name, f"{fixed} {a}",
                                 f"{varied} {', '.join(b for b in inner if key(a, b) in point)}",
                                 _revival_text(points)])
            for source, values in spreads.items():
                known = [v for v in values if v is not None]
                mean = f"{sum(known) / len(known):.2f} chunks" if known else "-"
                rows.append([method, concept, data, name, "each slice", f"{source} seeds only",
                             f"mean range {mean} over {len(known)}/{len(values)} slices where all revived"])
    return header, rows


def _seed_order(value: str):
    """Seeds as numbers where they are numbers (so 10 sorts after 2)."""
    return (0, int(value), "") if value.lstrip("-").isdigit() else (1, 0, value)


def seeds_figure(members, base: Optional[dict] = None):
    """Sequential runs that differ only in seed: per criterion the mean score over seeds after each chunk, with
    the band from the lowest to the highest seed, and the threshold."""
    import matplotlib.pyplot as plt
    import numpy as np

    criteria_ = members[0]["summary"]["criteria"]
    fig, axes = plt.subplots(1, len(criteria_), figsize=(5.5 * len(criteria_), 5.2), squeeze=False)
    for ax, (name, threshold) in zip(axes[0], criteria_.items()):
        paths = [dict(score_path(m, name)) for m in members]
        xs = sorted(set.intersection(*(set(p) for p in paths)))  # points every seed reached
        ys = np.array([[p[x] for x in xs] for p in paths])
        ax.fill_between(xs, ys.min(axis=0), ys.max(axis=0), alpha=0.25, color="C0",
                        label=f"lowest to highest of {len(members)} seeds")
        ax.plot(xs, ys.mean(axis=0), marker="o", color="C0", label=f"mean over {len(members)} seeds")
        ax.axhline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold:g}")
        _base_line(ax, base or {}, name)
        points = [m["summary"]["revival_point"].get(name) for m in members]
        ax.plot([], [], " ", label=f"revived: {sum(p is not None for p in points)}/{len(points)} seeds")
        m = members[0]
        ax.set(xlabel="fine-tuning images seen", ylabel=_ylabel(name),
               title=f"{m['method']} / {m['concept']} / {m['data']}: {name}, {len(members)} seeds")
        _legend_below(ax)
    return fig


def _ylabel(criterion: str) -> str:
    return criteria.label(criterion)


def _save(fig, out, name) -> str:
    path = os.path.join(out, name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def main(args):
    every = [load_run(r) for r in args.runs]
    for r in every:
        r["concept"] = args.concept or r["concept"]
    runs = [r for r in every if r["probe"] != ATTACK_PROBE]  # attacks are no curriculum: only the probes table
    os.makedirs(args.out, exist_ok=True)
    header, rows = table_rows(runs)
    for ext, fmt in (("md", to_markdown), ("csv", to_csv), ("tex", to_latex)):
        with open(os.path.join(args.out, f"revival_table.{ext}"), "w") as f:
            f.write(fmt(header, rows))
    probe_header, probe_table = probe_rows(every)
    summaries = load_utility(args.utility)
    probe_header, probe_table = add_utility_column(probe_header, probe_table, summaries)
    utility_header, utility_table = utility_rows(summaries)
    if utility_table:
        for ext, fmt in (("md", to_markdown), ("csv", to_csv), ("tex", to_latex)):
            with open(os.path.join(args.out, f"utility_table.{ext}"), "w") as f:
                f.write(fmt(utility_header, utility_table))
    if probe_table:
        for ext, fmt in (("md", to_markdown), ("csv", to_csv), ("tex", to_latex)):
            with open(os.path.join(args.out, f"probes_table.{ext}"), "w") as f:
                f.write(fmt(probe_header, probe_table))
    control_header, control_table = control_rows(runs)
    if control_table:
        with open(os.path.join(args.out, "control_table.md"), "w") as f:
            f.write(to_markdown(control_header, control_table))
    seed_header, seed_table = seed_rows(runs)
    if seed_table:  # runs that differ only in their seed: one aggregated row each
        with open(os.path.join(args.out, "revival_table_seeds.md"), "w") as f:
            f.write(to_markdown(seed_header, seed_table))
    source_header, source_table = seed_source_rows(runs)
    if source_table:  # runs over fine-tuning and unlearning seeds: which seed the spread comes from
        with open(os.path.join(args.out, "revival_table_seed_sources.md"), "w") as f:
            f.write(to_markdown(source_header, source_table))
    plots = plot(runs, args.out, args.title, base_scores(args.base_score))
    print(to_markdown(header, rows))
    if seed_table:
        print(f"over seeds (median, {BOOTSTRAP_RESAMPLES} bootstrap resamples, bootstrap seed {BOOTSTRAP_SEED}):")
        print(to_markdown(seed_header, seed_table))
    if source_table:
        print("the spread's sources: unlearning seeds at a fixed fine-tuning seed, and the other way round:")
        print(to_markdown(source_header, source_table))
    if probe_table:
        print("probes side by side:")
        print(to_markdown(probe_header, probe_table))
    if utility_table:
        print("utility (eval_model.py --utility):")
        print(to_markdown(utility_header, utility_table))
    if control_table:
        print("beside their controls (the original model fine-tuned on the same data):")
        print(to_markdown(control_header, control_table))
    print("plots:", *plots, sep="\n  ")
    return header, rows, plots


if __name__ == "__main__":
    main(parse_args())
