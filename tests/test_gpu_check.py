"""tools/gpu_check.py's logic, run on the CPU with the tiny shapes: every row is there and holds what was measured.

The GPU figures themselves (peak memory, speed against the compute limits, fp16 skips) need CUDA; here the same
functions run on the CPU in fp32, where the memory rows say "n/a" and the fp16 rows expect the fp32 set-up.
"""

import subprocess
import sys

import pytest
import torch

from conftest import ROOT

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path of the check")


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    from tools import gpu_check

    return gpu_check.run_checks(str(tmp_path_factory.mktemp("gpu_check")), gpu_check.TINY)


def _row(rows, prefix):
    found = [r for r in rows if r.check.startswith(prefix)]
    assert len(found) == 1, [r.check for r in rows]
    return found[0]


def test_table_has_every_row_and_passes_on_tiny_shapes(rows):
    from tools import gpu_check

    checks = [r.check for r in rows]
    assert checks[0] == "device" and rows[0].measured.startswith("cpu")
    assert sum(c.startswith("peak GPU memory") for c in checks) == 2
    for prefix in ("training speed", "fp16 updates skipped in the first 3", "trainable parameters dtype",
                   "frozen text encoder + VAE dtype", "autocast in the UNet forward", "GradScaler",
                   "validation speed (2 prompts batched, 2 steps)", "--deterministic: two runs of 2 updates",
                   "--deterministic training speed"):
        _row(rows, prefix)
    # Every row with a verdict passes on the CPU's fp32 set-up.
    assert [r.check for r in rows if r.verdict == "FAIL"] == []
    assert sum(r.verdict == "ok" for r in rows) == 6
    table = gpu_check.format_table(rows).splitlines()
    assert len(table) == len(rows) + 2 and all(line.count("|") == 5 for line in table)


def test_memory_rows_carry_the_budget_of_each_lever_combination(rows):
    default, leanest = (r for r in rows if r.check.startswith("peak GPU memory"))
    assert default.measured == leanest.measured == "n/a (no CUDA)"
    assert "8-bit Adam left out" in leanest.check  # no bitsandbytes on a CPU
    assert default.data["levers"] == {"use_ema": True}
    assert leanest.data["levers"] == {"use_ema": True, "gradient_checkpointing": True, "offload_ema": True}
    # On the CPU the budget counts everything as host memory (nothing on an accelerator), the peak is not measured.
    for r in (default, leanest):
        assert r.data["peak_bytes"] is None and r.data["budget_bytes"] == 0 and r.data["host_bytes"] > 0
        assert r.reference == "budget before activations 0.00 GiB"


def test_fp16_rows_report_the_fp32_set_up_measured(rows):
    assert _row(rows, "trainable parameters dtype").measured == "float32"
    assert _row(rows, "frozen text encoder + VAE dtype").measured == "float32"
    assert _row(rows, "autocast in the UNet forward").measured == "off"
    assert _row(rows, "GradScaler").measured == "none"
    assert _row(rows, "fp16 updates skipped").measured == 0


def test_speed_rows_are_positive_and_limits_do_not_apply(rows):
    for prefix in ("training speed", "validation speed", "--deterministic training speed"):
        r = _row(rows, prefix)
        assert float(r.measured.split()[0]) > 0 and r.verdict == "-"  # the H100 limits are for SD-1.x at 512 px


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


def test_without_cuda_it_says_so_in_one_line_and_exits_0():
    proc = subprocess.run([sys.executable, "tools/gpu_check.py"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0
    assert proc.stdout.splitlines() == [proc.stdout.strip()] and "no CUDA GPU" in proc.stdout


def test_a_failing_section_becomes_one_fail_row():
    from tools.gpu_check import guarded

    def broken():
        raise RuntimeError("upsample_bilinear2d_backward_out_cuda does not have a deterministic\nimplementation")

    (row,) = guarded("--deterministic", broken)
    assert row.verdict == "FAIL" and row.check == "--deterministic"
    assert row.measured == ("error: RuntimeError: upsample_bilinear2d_backward_out_cuda does not have a "
                            "deterministic implementation")
