"""A full disk: exit 4 with one line (what, where, free space), no partial file, the last checkpoint resumable."""

import json
import os
import subprocess

import numpy as np
import pytest
from safetensors.torch import load_file

from conftest import launch, seed_flags

SCRIPT = "finetuning_individual_CLIP.py"
pytestmark = pytest.mark.slow


def _run(assets, out, fault=None, **over):
    # Two 20-row chunks, epochs 0 and 1, 2 updates each: updates 1-4 chunk 0, 5-8 chunk 1; checkpoints every 2.
    flags = seed_flags(assets, out, **{"--curriculum": "20,40", "--clip_threshold": 1.0, "--clip_epoch": 0,
                                       "--validation_epochs": 1, "--checkpointing_steps": 2, "--log_file": False,
                                       **over})
    return launch(SCRIPT, flags, cwd=assets["root"], env_extra={"REVIVAL_FAULT": fault} if fault else None)


def _same_results(out, ref):
    key = lambda r: (r["chunk"], r["epoch"], r["optimizer_steps"], r["scores"], r["revived"])  # noqa: E731
    recs = [key(json.loads(line)) for line in open(os.path.join(out, "validations.jsonl"))]
    assert recs == [key(json.loads(line)) for line in open(os.path.join(ref, "validations.jsonl"))]
    for i in (0, 1):
        for sub in ("unet", "unet_ema"):
            a, b = (load_file(os.path.join(d, f"curriculum-{i}", sub, "diffusion_pytorch_model.safetensors"))
                    for d in (out, ref))
            assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ref") / "run")
    proc = _run(assets, out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def _failed_with_one_line(proc, what, where):
    assert proc.returncode == 4, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: could not write the {what} to {where}: No space left on device")
    assert "free there)" in last and "Traceback" not in proc.stderr


@pytest.mark.parametrize("what, fault", [("checkpoint", "enospc_checkpoint:2"), ("pipeline", "enospc_pipeline:1")])
def test_failed_write_keeps_the_last_checkpoint_and_resumes_to_the_same_results(assets, reference, tmp_path, what,
                                                                                fault):
    out = str(tmp_path / "run")
    proc = _run(assets, out, fault=fault)
    # The 2nd checkpoint (update 4) fails half-way; or the first pipeline (curriculum-0, after update 4's checkpoint).
    where = os.path.join(out, "checkpoint-4" if what == "checkpoint" else "curriculum-0")
    _failed_with_one_line(proc, what, where)
    names = sorted(os.listdir(out))
    assert [n for n in names if n.startswith(".")] == [".run.lock"]  # no temporary leftovers
    assert "curriculum-0" not in names
    complete = sorted(n for n in names if n.startswith("checkpoint-") and os.path.isfile(os.path.join(out, n, "COMPLETE")))
    assert complete == (["checkpoint-2"] if what == "checkpoint" else ["checkpoint-2", "checkpoint-4"])
    resumed = _run(assets, out, **{"--resume_from_checkpoint": "latest"})
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _same_results(out, reference)


def test_failed_results_write_exits_4_and_leaves_readable_records(assets, reference, tmp_path):
    out = str(tmp_path / "run")
    proc = _run(assets, out, fault="enospc_results:3")  # the 3rd results write: config, record 1, then record 2
    _failed_with_one_line(proc, "results", os.path.join(out, "validations.jsonl"))
    recs = [json.loads(line) for line in open(os.path.join(out, "validations.jsonl"))]
    assert [(r["chunk"], r["epoch"]) for r in recs] == [(0, 0)]
    resumed = _run(assets, out, **{"--resume_from_checkpoint": "latest"})
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _same_results(out, reference)


def _eval(assets, out, fault=None):
    return launch("eval_model.py", [assets["sd"], "none", "red circle", f"--prompt_file={assets['prompts']}",
                                    "--images_per_prompt", "2", "--output_dir", out, "--num_inference_steps", "2",
                                    "--resolution", "32", "--clip_model", assets["clip"]],
                  assets["root"], timeout=600, env_extra={"REVIVAL_FAULT": fault or ""})


def test_a_really_full_disk(assets, tmp_path):
    """For real: a 1 MB tmpfs, nearly filled; eval_model.py's images do not fit (exit 4, not a traceback)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root, or no mount permission)")
    try:
        with open(mount / "filler", "wb") as f:
            f.write(b"\0" * (1024 * 1024 - 8 * 1024))
        proc = _eval(assets, str(mount / "ev"))
        assert proc.returncode == 4, proc.stderr[-2000:]
        (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("eval_model.py: error:")]
        assert "No space left on device" in line and "free there" in line
    finally:
        subprocess.run(["umount", str(mount)], check=False)
