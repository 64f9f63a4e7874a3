"""Resuming under other settings (docs/protocols.md: robustness): another process count at the same rows per
micro-batch continues the run to the uninterrupted run's results; another precision or batch is refused in one
line naming the difference (exit 2, nothing written), as is fp16 on a checkpoint without the loss scaler's state."""

import json
import os

import pytest

from common.checkpointing import RUN_CONFIG_FILE, SCALER_FILE, check_resume_settings
from common.errors import InputError
from conftest import launch, seed_flags

SCRIPT = "finetuning_individual_CLIP.py"


def _checkpoint(tmp_path, mixed_precision="no", processes=2, batch=5, scaler=False, accumulation=1):
    path = tmp_path / "checkpoint-4"
    path.mkdir()
    (path / RUN_CONFIG_FILE).write_text(json.dumps({
        "num_processes": processes, "mixed_precision": mixed_precision,
        "args": {"train_batch_size": batch, "gradient_accumulation_steps": accumulation, "params": "full"},
        "resolved": {"num_processes": processes, "mixed_precision": mixed_precision}}))
    if scaler:
        (path / SCALER_FILE).write_bytes(b"x")
    return str(path)


def _now(mixed_precision="no", processes=1, batch=10, accumulation=1, params="full"):
    return {"mixed_precision": mixed_precision, "num_processes": processes, "train_batch_size": batch,
            "gradient_accumulation_steps": accumulation, "params": params}


def test_another_process_count_at_the_same_rows_per_micro_batch_is_allowed_and_noted(tmp_path):
    notes = check_resume_settings(_checkpoint(tmp_path), _now(), scaler_expected=False)
    assert notes == [f"resuming {tmp_path / 'checkpoint-4'}, written by 2 process(es), with 1 (the same 10 rows per "
                     "micro-batch)"]
    assert check_resume_settings(None, _now(), scaler_expected=True) == []


@pytest.mark.parametrize("written, now, message", [
    ({"mixed_precision": "bf16"}, {"mixed_precision": "fp16"},
     "written with mixed precision 'bf16', this run resolves --mixed_precision to 'fp16'"),
    ({"mixed_precision": "no"}, {"mixed_precision": "fp16"}, "mixed precision 'no'"),
    ({}, {"batch": 5}, "written with 2 process(es) x --train_batch_size 5 = 10 rows per micro-batch, this run has "
                       "1 x 5 = 5"),
    ({}, {"accumulation": 2, "batch": 10},
     "written with --gradient_accumulation_steps 1, this run has --gradient_accumulation_steps 2"),
    ({}, {"params": "lora"}, "written with --params full, this run has --params lora"),
])
def test_another_precision_batch_or_trained_parameters_is_refused(tmp_path, written, now, message):
    path = _checkpoint(tmp_path, **written)
    with pytest.raises(InputError) as err:
        check_resume_settings(path, _now(**now), scaler_expected=now.get("mixed_precision") == "fp16")
    assert str(err.value).startswith(f"--resume_from_checkpoint {path}: ") and message in str(err.value)


def test_fp16_needs_the_checkpoints_scaler_state(tmp_path):
    # Written under fp16 (run_config says so) but scaler.pt is gone: accelerate would raise FileNotFoundError.
    path = _checkpoint(tmp_path, mixed_precision="fp16", processes=1, batch=10)
    with pytest.raises(InputError, match=f"--resume_from_checkpoint {path}: no scaler.pt"):
        check_resume_settings(path, _now(mixed_precision="fp16"), scaler_expected=True)
    open(os.path.join(path, SCALER_FILE), "wb").write(b"x")
    assert check_resume_settings(path, _now(mixed_precision="fp16"), scaler_expected=True) == []
    # A checkpoint without run_config.json (older ones): the scaler file is still checked.
    os.unlink(os.path.join(path, RUN_CONFIG_FILE))
    os.unlink(os.path.join(path, SCALER_FILE))
    with pytest.raises(InputError, match="no scaler.pt"):
        check_resume_settings(path, _now(mixed_precision="fp16"), scaler_expected=True)


def _flags(assets, out, batch, **over):
    # Two 20-row chunks, 10 rows per update: 2 updates per epoch, epochs 0 and 1; a checkpoint every 2 updates.
    return seed_flags(assets, out, **{"--curriculum": "20,40", "--clip_threshold": 1.0, "--clip_epoch": 0,
                                      "--validation_epochs": 1, "--checkpointing_steps": 2, "--log_file": False,
                                      "--learning_rate": "1e-4", "--train_batch_size": batch, **over})


def _records(out):
    return [json.loads(line) for line in open(os.path.join(out, "validations.jsonl"))]


def _snapshot(out):
    return sorted((root, name, os.path.getmtime(os.path.join(root, name)), os.path.getsize(os.path.join(root, name)))
                  for root, _, names in os.walk(out) for name in names)


@pytest.mark.slow
@pytest.mark.two_processes
def test_two_processes_killed_resume_on_one_to_the_uninterrupted_results(assets, tmp_path):
    ref = str(tmp_path / "ref")
    proc = launch(SCRIPT, _flags(assets, ref, 10), cwd=assets["root"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = str(tmp_path / "run")
    killed = launch(SCRIPT, _flags(assets, out, 5), cwd=assets["root"], num_processes=2,
                    env_extra={"REVIVAL_FAULT": "update:3"})  # both processes die at update 3: checkpoint-2 is left
    assert killed.returncode != 0
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")) == ["checkpoint-2"]
    before = _snapshot(out)
    # Refused, before anything is written: another batch per micro-step, another precision.
    for over, batch, message in [({}, 5, "2 process(es) x --train_batch_size 5 = 10 rows per micro-batch, this run "
                                         "has 1 x 5 = 5"),
                                 ({"--mixed_precision": "bf16"}, 10, "written with mixed precision 'no', this run "
                                                                     "resolves --mixed_precision to 'bf16'")]:
        refused = launch(SCRIPT, _flags(assets, out, batch, **{"--resume_from_checkpoint": "latest", **over}),
                         cwd=assets["root"])
        assert refused.returncode == 2, refused.stderr[-3000:]
        (line,) = [ln for ln in refused.stderr.splitlines() if "error:" in ln]
        assert line.startswith(f"{SCRIPT}: error: --resume_from_checkpoint {os.path.join(out, 'checkpoint-2')}: ")
        assert message in line and "Traceback" not in refused.stderr
        assert _snapshot(out) == before
    # One process, 10 rows per micro-batch as the two processes had: the run continues.
    resumed = launch(SCRIPT, _flags(assets, out, 10, **{"--resume_from_checkpoint": "latest"}), cwd=assets["root"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "written by 2 process(es), with 1 (the same 10 rows per micro-batch)" in resumed.stdout
    mine, theirs = _records(out), _records(ref)
    key = lambda r: (r["chunk"], r["epoch"], r["optimizer_steps"], r["images_seen"], r["revived"])  # noqa: E731
    assert [key(r) for r in mine] == [key(r) for r in theirs] and len(mine) == 4
    for a, b in zip(mine, theirs):  # reduction-order noise only (tests/test_multiprocess.py's tolerance)
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-4)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    from safetensors.torch import load_file

    for chunk in (0, 1):
        w1, w2 = (load_file(os.path.join(d, f"curriculum-{chunk}", "unet", "diffusion_pytorch_model.safetensors"))
                  for d in (ref, out))
        assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < 4e-4
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["num_processes"] == 1
