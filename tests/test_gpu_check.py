"""tools/gpu_check.py's logic, run on the CPU with the tiny shapes: every row is there and holds what was measured.

The GPU figures themselves (peak memory, speed against the compute limits, fp16 skips, host syncs) need CUDA; here
the same functions run on the CPU in fp32, where the memory rows say "n/a" and the fp16 rows expect the fp32 set-up.
The end-to-end and smoke sections run as the rehearsal runs them (``python -m tools.gpu_check --rehearse``, a new
interpreter), so a flag a script no longer takes fails here, not in a GPU machine's first minutes.
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path of the check")


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    from tools import gpu_check

    return gpu_check.run_checks(str(tmp_path_factory.mktemp("gpu_check")), gpu_check.TINY,
                                sections={"memory", "training", "validation", "determinism"})


def _row(rows, prefix):
    found = [r for r in rows if r.check.startswith(prefix)]
    assert len(found) == 1, [r.check for r in rows]
    return found[0]


def test_table_has_every_row_and_passes_on_tiny_shapes(rows):
    from tools import gpu_check

    checks = [r.check for r in rows]
    assert checks[0] == "device" and rows[0].measured.startswith("cpu")
    assert sum(c.startswith("peak GPU memory") for c in checks) == 3
    for prefix in ("training speed (the toolkit", "training speed, default", "training speed, leanest",
                   "training speed, --gradient_checkpointing",
                   "training speed, published-style", "training speed, bare UNet", "host syncs per update",
                   "fp16 updates skipped in the first 3", "trainable parameters dtype",
                   "frozen text encoder + VAE dtype", "autocast in the UNet forward", "GradScaler",
                   "validation speed (2 prompts batched, 2 steps)", "validation speed, one prompt at a time",
                   "validation out of memory", "--deterministic: two runs of 2 updates",
                   "--deterministic training speed"):
        _row(rows, prefix)
    # Every row with a verdict passes on the CPU's fp32 set-up.
    assert [r.check for r in rows if r.verdict == "FAIL"] == []
    assert sum(r.verdict == "ok" for r in rows) == 7
    table = gpu_check.format_table(rows).splitlines()
    assert len(table) == len(rows) + 2 and all(line.count("|") == 5 for line in table)


def test_memory_rows_carry_the_budget_of_each_lever_combination(rows):
    default, checkpointed, leanest = (r for r in rows if r.check.startswith("peak GPU memory"))
    assert default.measured == checkpointed.measured == leanest.measured == "n/a (no CUDA)"
    assert checkpointed.data["levers"] == {"use_ema": True, "gradient_checkpointing": True}
    assert "8-bit Adam left out" in leanest.check  # no bitsandbytes on a CPU
    assert default.data["levers"] == {"use_ema": True} and default.data["predicted_bytes"] is None  # tiny: none
    assert leanest.data["levers"] == {"use_ema": True, "gradient_checkpointing": True, "offload_ema": True}
    # On the CPU the budget counts everything as host memory (nothing on an accelerator), the peak is not measured.
    for r in (default, checkpointed, leanest):
        assert r.data["peak_bytes"] is None and r.data["budget_bytes"] == 0 and r.data["host_bytes"] > 0
        assert r.reference == "budget before activations 0.00 GiB"


def test_fp16_rows_report_the_fp32_set_up_measured(rows):
    assert _row(rows, "trainable parameters dtype").measured == "float32"
    assert _row(rows, "frozen text encoder + VAE dtype").measured == "float32"
    assert _row(rows, "autocast in the UNet forward").measured == "off"
    assert _row(rows, "GradScaler").measured == "none"
    assert _row(rows, "fp16 updates skipped").measured == 0


def test_speed_rows_are_positive_and_limits_do_not_apply(rows):
    for prefix in ("training speed (the toolkit", "training speed, published", "training speed, bare",
                   "training speed, default", "training speed, leanest", "validation speed (",
                   "validation speed, one", "--deterministic training speed"):
        r = _row(rows, prefix)
        assert float(r.measured.split()[0]) > 0 and r.verdict == "-"  # the H100 limits are for SD-1.x at 512 px
    toolkit = _row(rows, "training speed (the toolkit").data["value"]
    published = _row(rows, "training speed, published")
    assert published.data["toolkit_over_published"] == pytest.approx(toolkit / published.data["samples_per_s"])


def test_the_out_of_memory_fallback_is_exercised(rows):
    """The forced error (on the CPU raised above one prompt) halves the batch and still makes every image."""
    r = _row(rows, "validation out of memory")
    assert r.verdict == "ok" and r.data["images"] == 2 and r.data["batch_after"] == 1, r


def test_the_memory_prediction_is_the_budget_plus_the_measured_activations():
    from tools import gpu_check

    budget = 10 * gpu_check.GiB
    # docs/memory.md: 1.56 GiB a pass + 0.88 a sample without checkpointing, 0.26 + 0.25 with it, at batch 10.
    assert gpu_check.predicted_peak(budget, gpu_check.SD14, False) == pytest.approx((10 + 1.56 + 8.8) * 2 ** 30)
    assert gpu_check.predicted_peak(budget, gpu_check.SD14, True) == pytest.approx((10 + 0.26 + 2.5) * 2 ** 30)
    assert gpu_check.predicted_peak(budget, gpu_check.TINY, False) is None


def test_each_trainer_starts_from_a_fresh_gradient_scaler():
    """The sections share one accelerator; a scaler moved by one section (here: backed off to 2**10 by
    overflows) must not be the next section's start, or its skips and determinism runs differ (a false FAIL)."""
    from types import SimpleNamespace

    from tools.gpu_check import fresh_scaler

    acc = SimpleNamespace(scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 20, growth_interval=7))
    acc.scaler.scale(torch.ones(1))  # the scaler's state starts with its first use
    acc.scaler.update(new_scale=2.0 ** 10)
    moved = acc.scaler
    fresh_scaler(acc)
    assert acc.scaler is not moved and acc.scaler.get_scale() == 2.0 ** 20
    assert acc.scaler.get_growth_interval() == 7 and acc.scaler.state_dict()["_growth_tracker"] == 0
    none = SimpleNamespace(scaler=None)
    fresh_scaler(none)
    assert none.scaler is None


def test_determinism_row_is_bit_equal(rows):
    assert _row(rows, "--deterministic: two runs").measured == "bit-equal weights"


def test_dtype_rows_fail_on_a_wrong_set_up():
    """The fp16 rows catch what they are there for: an fp16 trainable parameter, fp32 frozen parts, no autocast,
    no GradScaler (the verdicts of a GPU run, from a fake set-up)."""
    from types import SimpleNamespace

    from tools.gpu_check import dtype_rows

    half = torch.nn.Linear(2, 2).half()
    parts = SimpleNamespace(text_encoder=torch.nn.Linear(2, 2), vae=torch.nn.Linear(2, 2))
    trainer = SimpleNamespace(trainable=list(half.parameters()))
    got = dtype_rows(trainer, parts, SimpleNamespace(scaler=None), {"autocast": False}, fp16=True)
    assert [r.verdict for r in got] == ["FAIL"] * 4
    good = dtype_rows(SimpleNamespace(trainable=[torch.nn.Parameter(torch.zeros(1))]),
                      SimpleNamespace(text_encoder=torch.nn.Linear(2, 2).half(), vae=torch.nn.Linear(2, 2).half()),
                      SimpleNamespace(scaler=torch.amp.GradScaler("cpu")),
                      {"autocast": True, "autocast_dtype": torch.float16}, fp16=True)
    assert [r.verdict for r in good] == ["ok"] * 4


def test_without_cuda_it_says_so_in_one_line_and_exits_3():
    """A job script can gate on it: no CUDA is not a pass."""
    proc = subprocess.run([sys.executable, "-m", "tools.gpu_check"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout.splitlines() == [proc.stdout.strip()] and "no CUDA GPU" in proc.stdout


UNDER_FP16 = """
import dataclasses, json, sys
from tools import gpu_check
shapes = dataclasses.replace(gpu_check.TINY, mixed_precision="fp16", determinism_updates=4)
rows = gpu_check.run_checks(sys.argv[1], shapes, sections={"training", "validation", "determinism"})
print(json.dumps([r.as_dict() for r in rows], default=str))
"""


def test_under_emulated_fp16_the_set_up_rows_pass_and_each_section_starts_from_the_initial_scale(tmp_path):
    """Emulated CUDA fp16, as a GPU runs the check: the fp16 set-up rows pass (fp32 masters, fp16 frozen parts,
    autocast, a GradScaler), the forced out-of-memory error reaches the UNet whose forward generation swaps, and
    at an initial scale under which the first two updates overflow, each determinism run skips the same two and
    takes the same two, so their weights are equal (with the scaler carried over, the second run takes all four:
    the false FAIL the shared scaler caused)."""
    from conftest import launch_env
    from test_fp16_emulation import PARTLY_OVERFLOWING

    env = launch_env({"REVIVAL_EMULATE_FP16": "1", "REVIVAL_FP16_INIT_SCALE": str(PARTLY_OVERFLOWING)})
    proc = subprocess.run([sys.executable, "-c", UNDER_FP16, str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert rows[0]["reference"].endswith("fp16")  # the emulation is on
    by_check = {r["check"]: r for r in rows}
    assert [by_check[c]["measured"] for c in ("trainable parameters dtype", "frozen text encoder + VAE dtype",
                                              "autocast in the UNet forward", "GradScaler")] == \
        ["float32", "float16", "on, float16", "GradScaler"]
    assert [r["check"] for r in rows if r["verdict"] == "FAIL"] == ["fp16 updates skipped in the first 3"]  # 2 of 3
    (oom,) = [r for r in rows if r["check"].startswith("validation out of memory")]
    assert oom["verdict"] == "ok" and oom["data"]["batch_after"] == 1, oom
    (equal,) = [r for r in rows if r["check"].startswith("--deterministic: two runs of 4 updates")]
    assert equal["verdict"] == "ok", equal


PREFLIGHT = """
import sys
for name in sys.argv[1:]:
    sys.modules[name] = None  # an import of it fails, as a package that is not installed
from tools import gpu_check
sys.exit(gpu_check.main(gpu_check.parse_args([])))
"""


@pytest.mark.parametrize("blocked, named", [
    # A package missing, one missing a dependency of its own, and the repository not named again for lacking diffusers.
    (["diffusers", "ftfy", "datasets", "dill"], "diffusers, datasets, open_clip_torch (needs ftfy)"),
    (["common"], "this repository (run from its root: python -m tools.gpu_check)"),
])
def test_the_preflight_names_every_missing_package_in_one_line_and_exits_2(blocked, named):
    """The GPU machine lacks some packages: one line naming all of them, before any model is built."""
    proc = subprocess.run([sys.executable, "-c", PREFLIGHT, *blocked], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "" and proc.stderr == f"gpu_check.py: missing packages: {named} " \
                                               "(docs/gpu.md: carry them as wheels)\n"


def test_the_rehearsal_runs_the_scripts_end_to_end(tmp_path):
    """``--rehearse`` on the CPU, a new interpreter: the kill-resume-save run and eval_model.py on its pipeline pass
    with the flags gpu_check gives them; exit 0, every row in the JSON file. (The tools' smoke runs: their flags
    below; their runs in ``make gpu-rehearsal``.)"""
    out, work = tmp_path / "rows.json", tmp_path / "work"
    proc = subprocess.run([sys.executable, "-m", "tools.gpu_check", "--rehearse", "--sections", "end_to_end",
                           "--json", str(out), "--work_dir", str(work)], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    rows = json.loads(out.read_text())
    assert proc.returncode == 0, (proc.stderr[-2000:], [r for r in rows if r["verdict"] == "FAIL"])
    checks = {r["check"]: r for r in rows}
    assert [c for c in checks if c.startswith("end to end")] == [
        "end to end: finetuning_individual_CLIP.py killed at update 5, resumed, saved",
        "end to end: eval_model.py on the saved pipeline"]
    assert all(r["verdict"] == "ok" for c, r in checks.items() if c.startswith("end to end"))
    # The resumed run started from the checkpoint before the kill, and eval_model.py scored the saved pipeline.
    log = (work / "end_to_end.log").read_text()
    assert re.search(r"resumed from .*checkpoint-4", log), log[-3000:]
    assert checks["end to end: eval_model.py on the saved pipeline"]["data"]["images"] == 2
    assert "| rehearsal |" in proc.stdout and proc.stdout.count("\n|") == len(rows) + 1


def test_the_smoke_runs_flags_are_accepted_by_each_tool(tmp_path):
    """Each smoke run's command line passes its tool's own parse_args (flags and files; CPU and CUDA alike save the
    device, which parse_args checks only for CUDA): a renamed flag fails here, not on the GPU machine."""
    import importlib

    from tools import gpu_check

    world = gpu_check.build_world(str(tmp_path), gpu_check.TINY)
    runs = gpu_check.tool_runs(world, "cpu")
    assert list(runs) == ["tools/unlearn.py --method esd-x", "tools/concept_inversion.py",
                          "tools/attack_prompts.py --attack p4d-n"]
    for name, (argv, _) in runs.items():
        module = importlib.import_module("tools." + os.path.splitext(os.path.basename(argv[0]))[0])
        module.parse_args(argv[1:])  # exits 2 with one line on a flag it does not take


def test_no_tool_edits_the_import_path():
    """Every program imports the toolkit as installed (pip install -e .) or, for gpu_check on a machine without
    the install, from the current directory with -m: none inserts its own folder into sys.path."""
    programs = [p for d in ("", "common", "tools", "tools/attacks", "tools/toy_world")
                for p in sorted((ROOT / d).glob("*.py"))]
    assert len(programs) > 30
    offenders = [str(p.relative_to(ROOT)) for p in programs if re.search(r"sys\.path\.(insert|append)", p.read_text())]
    assert offenders == []


def test_a_failing_section_becomes_one_fail_row():
    from tools.gpu_check import guarded

    def broken():
        raise RuntimeError("upsample_bilinear2d_backward_out_cuda does not have a deterministic\nimplementation")

    (row,) = guarded("--deterministic", broken)
    assert row.verdict == "FAIL" and row.check == "--deterministic"
    assert row.measured == ("error: RuntimeError: upsample_bilinear2d_backward_out_cuda does not have a "
                            "deterministic implementation")


def test_the_activation_figures_are_docs_memory_md_s():
    """The predicted peak uses the activations docs/memory.md quotes from tools/benchmark.py --memory: a new
    measurement there must reach the check."""
    from tools.gpu_check import ACTIVATIONS, GiB

    text = (ROOT / "docs" / "memory.md").read_text()
    per_pass = re.search(r"\| activations: half-precision copies .* \| ([\d.]+) \(([\d.]+) checkpointed\) \|", text)
    per_sample = re.search(r"\| activations per sample \| ([\d.]+) \(([\d.]+) checkpointed\) \|", text)
    for checkpointed, group in ((False, 1), (True, 2)):
        assert ACTIVATIONS[checkpointed] == (float(per_pass.group(group)) * GiB, float(per_sample.group(group)) * GiB)


def test_launched_programs_keep_the_callers_pythonpath(monkeypatch):
    """On the GPU machine the carried packages are on PYTHONPATH (no pip install): a program that gpu_check, the
    demo or the benchmark launches must see them too, with the repository first."""
    from tools import child_env

    monkeypatch.setenv("PYTHONPATH", "/tmp/site")
    env = child_env(HF_HUB_OFFLINE="1")
    assert env["PYTHONPATH"] == f"{ROOT}{os.pathsep}/tmp/site" and env["HF_HUB_OFFLINE"] == "1"
    monkeypatch.delenv("PYTHONPATH")
    assert child_env()["PYTHONPATH"] == str(ROOT)
