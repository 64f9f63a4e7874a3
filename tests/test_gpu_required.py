"""A job that asked for a GPU and finds none stops in one line (exit 2) before any model loads.

Without CUDA, fp16 falls back to fp32 and ``--device auto`` to the CPU, so the seed README's command lines run
on a laptop. Inside a SLURM job that was granted GPUs (or with REVIVAL_REQUIRE_CUDA=1) the same fall-back would
run a two-day job at CPU speed on a misconfigured node: there it is an error instead.
"""

import os

import pytest

from conftest import launch, seed_flags

SLURM_GPU = {"SLURM_JOB_ID": "77", "SLURM_GPUS_ON_NODE": "1"}


def _one_error_line(proc, prog):
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: no CUDA device, but "), lines
    return lines[0]


def test_a_fp16_run_in_a_slurm_gpu_job_without_cuda_stops_before_loading(assets, tmp_path):
    out = tmp_path / "run"
    # The seed README's fp16 flags, one small chunk: were the check gone, the run would end in seconds, not exit 2.
    flags = seed_flags(assets, str(out), **{"--curriculum": "10", "--clip_epoch": 0, "--save_model": "False"})
    proc = launch("finetuning_individual_CLIP.py", flags, cwd=assets["root"], env_extra=SLURM_GPU)
    line = _one_error_line(proc, "finetuning_individual_CLIP.py")
    assert "this SLURM job was granted GPUs (SLURM_GPUS_ON_NODE=1)" in line and "driver 580" in line
    assert not out.exists()  # nothing written, no model loaded
    assert "loading" not in proc.stdout


def test_unlearn_with_device_auto_stops_when_a_gpu_is_required(assets, tmp_path):
    proc = launch("tools/unlearn.py", ["--method", "uce", "--erase", "red circle", "--model", assets["sd"],
                                       "--output_dir", str(tmp_path / "out")], cwd=assets["root"],
                  env_extra={"REVIVAL_REQUIRE_CUDA": "1"})
    assert "REVIVAL_REQUIRE_CUDA=1" in _one_error_line(proc, "unlearn.py")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"SLURM_JOB_ID": "5"}, None),  # a CPU-only SLURM job: the fall-back stays
    ({"SLURM_JOB_GPUS": ""}, None),
    ({"SLURM_GPUS_ON_NODE": "0"}, None),
    ({"SLURM_JOB_GPUS": "0,1"}, "this SLURM job was granted GPUs (SLURM_JOB_GPUS=0,1)"),
    ({"SLURM_STEP_GPUS": "3"}, "this SLURM job was granted GPUs (SLURM_STEP_GPUS=3)"),
    ({"REVIVAL_REQUIRE_CUDA": "1"}, "REVIVAL_REQUIRE_CUDA=1"),
    ({"REVIVAL_REQUIRE_CUDA": "0"}, None),
])
def test_when_cuda_is_expected(monkeypatch, env, expected):
    from common import precision

    for name in (*precision.SLURM_GPU_VARS, precision.REQUIRE_CUDA_ENV):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert precision.cuda_expected() == expected
    if expected:
        from common.errors import InputError

        with pytest.raises(InputError, match="stopped before loading models"):
            precision.check_cuda(cuda_available=False)
    precision.check_cuda(cuda_available=True)  # a GPU there: nothing to say
    assert os.environ.get("SLURM_GPUS_ON_NODE") == env.get("SLURM_GPUS_ON_NODE")
