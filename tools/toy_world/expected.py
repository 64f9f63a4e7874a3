"""The demo's figures, and their check against the values committed beside it (expected_demo.json).

Under the pinned numeric environment (common/numerics.py) the demo computes the same bits on every x86-64 AVX2
machine, so every figure it prints is a contract: the world card's figures, the calibrated thresholds, the
eval_model.py table and every cell of tools/report.py's tables. ``demo_figures`` reads them from a finished demo
as the strings the demo prints (so "equal" means what a reader sees is equal); ``check`` compares them, in order,
with the committed values and names the first that differs, with the numeric environment of both machines.

A demo with non-default flags, or unpinned, has no expected values: it is not checked (and says so).
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from typing import Dict, List, Optional

EXPECTED_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "expected_demo.json")

# Per report table: how many leading columns name a row (the rest are figures). The prompt attacks are columns of
# probes_table.md (model, concept, criterion): each attack cell is a figure.
TABLE_KEYS = {"revival_table.md": 4, "probes_table.md": 3, "control_table.md": 5, "revival_table_seeds.md": 4,
              "revival_table_seed_sources.md": 6, "methods_table.md": 1, "utility_table.md": 1}

# The card's figures per model (world.py's evaluate_model), as the demo prints them: 4 decimals.
MODEL_FIGURES = ("clip_score_target", "classifier_acc_target", "clip_top1_target", "clip_score_retained",
                 "clip_top1_retained", "neighbours_mean_clip_top1", "neighbours_mean_classifier_rate")

# Measured times, not figures: they differ on every run.
TIMINGS = ("wall_s", "seconds", "wall_seconds")

# The environment fields that say which machine and which kernels computed the figures.
ENV_FIELDS = ("cpu_model", "cpu_isa", "torch_cpu_capability", "torch_threads", "pinned", "pin", "mkl", "onednn",
              "library_versions")


class DemoCheckFailed(RuntimeError):
    """A demo figure differs from the committed expected value."""


def _fmt(value) -> str:
    return "n/a" if value is None else f"{float(value):.4f}"


def card_figures(card: dict) -> "OrderedDict[str, str]":
    """The world card's quality figures (CLIP retrieval, each model's scores) as 4-decimal strings."""
    out = OrderedDict()
    out["card: CLIP top-1 retrieval (held-out)"] = _fmt(card["figures"]["clip"]["top1_retrieval_heldout"])
    for model, fig in card["figures"]["models"].items():
        for key in MODEL_FIGURES:
            out[f"card: {model} {key}"] = _fmt(fig.get(key))
    return out


def markdown_table(text: str) -> tuple:
    """(header, rows) of a markdown table as tools/report.py writes it."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("|")]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    if len(cells) < 2:
        return [], []
    return cells[0], [r for r in cells[2:]]  # cells[1] is the |---| line


def table_figures(path: str, keys: int) -> "OrderedDict[str, str]":
    """Every figure cell of a report table, named '<table>: <row key> / <column>'."""
    with open(path, encoding="utf-8") as f:
        header, rows = markdown_table(f.read())
    name = os.path.splitext(os.path.basename(path))[0]
    out = OrderedDict()
    seen: Dict[str, int] = {}
    for row in rows:
        key = " ".join(row[:keys])
        seen[key] = seen.get(key, 0) + 1
        if seen[key] > 1:  # e.g. an individual and a sequential run of the same model, data and criterion
            key += f" (row {seen[key]})"
        for col, cell in zip(header[keys:], row[keys:]):
            out[f"{name}: {key} / {col}"] = cell
    return out


def eval_figures(results_jsonl: str) -> "OrderedDict[str, str]":
    """eval_model.py's table: each evaluated checkpoint's scores (4 decimals), named by its label."""
    from common.results import read_jsonl

    out = OrderedDict()
    for row in read_jsonl(results_jsonl):
        label = row.get("label") or os.path.basename(str(row.get("checkpoint", "")))
        for key in sorted(k for k, v in row.items() if isinstance(v, float) and k not in TIMINGS):
            out[f"eval: {label} / {key}"] = _fmt(row[key])
    return out


def demo_figures(out_dir: str, card: dict) -> "OrderedDict[str, str]":
    """Every figure a finished demo printed: card, thresholds, eval table, report tables (absent parts skipped)."""
    figs = card_figures(card)
    th_path = os.path.join(out_dir, "thresholds.json")
    if os.path.isfile(th_path):
        with open(th_path) as f:
            th = json.load(f)
        figs["thresholds: CLIP"] = _fmt(th["clip_threshold"])
        figs["thresholds: classifier"] = _fmt(th["bc_threshold"])
    eval_path = os.path.join(out_dir, "eval", "results.jsonl")
    if os.path.isfile(eval_path):
        figs.update(eval_figures(eval_path))
    for name, keys in TABLE_KEYS.items():
        path = os.path.join(out_dir, "report", name)
        if os.path.isfile(path):
            figs.update(table_figures(path, keys))
    return figs


def environment_line(env: Optional[dict]) -> str:
    """One line naming the machine and kernels of a numeric environment (common.numerics.describe())."""
    if not env:
        return "unknown"
    pin = env.get("pin") or {}
    torch = (env.get("library_versions") or {}).get("torch")
    return (f"{env.get('cpu_model')}, torch {torch} {env.get('torch_cpu_capability')} kernels, "
            f"{env.get('torch_threads')} thread(s), {'pinned' if env.get('pinned') else 'NOT pinned'} "
            f"(MKL_CBWR={pin.get('MKL_CBWR')}, ONEDNN_MAX_CPU_ISA={pin.get('ONEDNN_MAX_CPU_ISA')})")


def first_difference(found: Dict[str, str], expected: Dict[str, str]) -> Optional[str]:
    """The first expected figure (in the expected file's order) that is missing or differs; None when all match.

    Figures found but not expected are differences too (a new row means the story changed)."""
    for name, want in expected.items():
        got = found.get(name)
        if got != want:
            return f"{name}: got {got if got is not None else 'nothing'}, expected {want}"
    extra = [name for name in found if name not in expected]
    if extra:
        return f"{extra[0]}: got {found[extra[0]]}, not in the expected values"
    return None


def load_expected(path: str = EXPECTED_FILE) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def check(found: Dict[str, str], section: str, env: dict, path: str = EXPECTED_FILE) -> int:
    """Compare with the committed values of ``section``; raise DemoCheckFailed naming the first differing figure.

    Returns how many figures were compared (0 when the file has no such section)."""
    doc = load_expected(path)
    expected = (doc.get("sections") or {}).get(section)
    if not expected:
        return 0
    diff = first_difference(found, expected["figures"])
    if diff is not None:
        raise DemoCheckFailed(
            f"demo check FAILED ({section}): {diff}\n"
            f"  this machine:  {environment_line(env)}\n"
            f"  expected from: {environment_line(expected.get('numeric_environment'))}\n"
            f"  ({len(expected['figures'])} figures expected, in {os.path.relpath(path)}). Under the pin both "
            f"machines should compute the same bits: a different figure means a changed install (library "
            f"versions above), a changed demo, or a kernel the pin does not cover.")
    return len(expected["figures"])


def write_section(found: Dict[str, str], section: str, env: dict, path: str = EXPECTED_FILE) -> None:
    """Record ``found`` as the expected values of ``section`` (tools/demo.py --write_expected)."""
    from common.results import atomic_write_text

    doc = load_expected(path)
    doc.setdefault("about", "Figures of the pinned toy-world demo (tools/toy_world/expected.py); "
                            "written by tools/demo.py --write_expected, checked at the end of every pinned demo.")
    doc.setdefault("sections", {})[section] = {"numeric_environment": {k: env.get(k) for k in ENV_FIELDS},
                                               "figures": found}
    atomic_write_text(path, json.dumps(doc, indent=1) + "\n")


def section_name(run_seeds: Optional[List[int]], unlearn_seeds: Optional[List[int]] = None,
                 unlearn_methods: Optional[List[str]] = None) -> str:
    """The expected file's section of a demo: `make demo`, `make demo-seeds`' seeds, or the unlearning seeds'."""
    if not run_seeds:
        return "demo"
    name = "demo-seeds " + ",".join(map(str, run_seeds))
    if unlearn_seeds:
        name += f" unlearning seeds {','.join(map(str, unlearn_seeds))} of {','.join(unlearn_methods or [])}"
    return name
