"""A non-finite loss: exit 3, the last good checkpoint kept and loadable, a resume refused until asked."""

import json
import os
import signal

import pytest
import torch

from conftest import launch, seed_flags

SCRIPT = "finetuning_individual_CLIP.py"


def _run(assets, out, fault=None, env=None, **over):
    # One process: plain python (accelerate's launcher would turn the exit status into its own).
    flags = seed_flags(assets, out, **{"--clip_threshold": 1.0, "--clip_epoch": 0, "--validation_epochs": 1,
                                       "--start_CL": 1, "--checkpointing_steps": 2, "--save_model": "False",
                                       "--log_file": False, **over})
    return launch(SCRIPT, flags, cwd=assets["root"], env_extra={**({"REVIVAL_FAULT": fault} if fault else {}),
                                                                 **(env or {})} or None)


def test_diverged_run_exits_3_keeps_its_last_good_checkpoint_and_refuses_a_blind_resume(assets, tmp_path):
    out = str(tmp_path / "run")
    # Chunk 1 (50 rows, batch 10): the 3rd update's loss is NaN, so are the weights after it; the checkpoint due
    # at update 4 must not be written.
    proc = _run(assets, out, fault="nan:3")
    assert proc.returncode == 3, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: non-finite loss (nan) in chunk 1, epoch 0, by optimizer update 4")
    assert "Traceback" not in proc.stderr
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint-")) == ["checkpoint-2"]
    marker = json.load(open(os.path.join(out, "DIVERGED")))
    assert marker["last_good_checkpoint"] == os.path.join(out, "checkpoint-2") and "non-finite" in marker["error"]
    from safetensors.torch import load_file

    weights = load_file(os.path.join(out, "checkpoint-2", "model.safetensors"))
    assert weights and all(bool(torch.isfinite(t).all()) for t in weights.values())

    # A resume would repeat the same draws into the same divergence: refused, before anything loads or changes.
    before = {name: os.path.getmtime(os.path.join(out, name)) for name in os.listdir(out)}
    refused = _run(assets, out, **{"--resume_from_checkpoint": "latest"})
    assert refused.returncode == 2
    (line,) = refused.stderr.strip().splitlines()
    assert "diverged" in line and os.path.join(out, "DIVERGED") in line and "checkpoint-2" in line
    assert {name: os.path.getmtime(os.path.join(out, name)) for name in os.listdir(out)} == before

    # Removing the marker is the user's decision; the kept checkpoint then loads and the run finishes.
    os.unlink(os.path.join(out, "DIVERGED"))
    resumed = _run(assets, out, **{"--resume_from_checkpoint": "latest"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {os.path.join(out, 'checkpoint-2')}" in resumed.stdout
    recs = [json.loads(line) for line in open(os.path.join(out, "validations.jsonl"))]
    assert [(r["chunk"], r["epoch"]) for r in recs] == [(1, 0), (1, 1)]
    assert not os.path.exists(os.path.join(out, "DIVERGED"))


def test_a_checkpoint_is_never_written_from_non_finite_weights(assets, tmp_path):
    from accelerate import Accelerator

    from common.checkpointing import Checkpointer
    from common.data import ImageTransform
    from common.encoding import CachedEncoder
    from common.models import load_sd_parts
    from common.training import ChunkTrainer, NonFiniteLoss, TrainConfig

    parts = load_sd_parts(assets["sd"])
    enc = CachedEncoder(parts, ImageTransform(32, center_crop=True, random_flip=False), "cpu", torch.float32)
    trainer = ChunkTrainer(Accelerator(cpu=True), parts, enc, TrainConfig(train_batch_size=10), horizon_updates=5)
    trainer.reset_chunk(0)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        ckpt = Checkpointer(trainer.accelerator, trainer, str(tmp_path), 1, None, log=lambda m: None)
        assert os.path.isdir(ckpt.save({"chunk_pos": 0}))  # finite weights: saved
        with torch.no_grad():
            trainer.trainable[-1].view(-1)[0] = float("inf")  # a finite loss can still precede non-finite weights
        trainer.global_updates = 1
        with pytest.raises(NonFiniteLoss, match="non-finite UNet weights at optimizer update 1"):
            ckpt.save({"chunk_pos": 0})
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-0"]


def test_a_nan_loss_under_fp16_stops_the_run_though_its_scaler_skipped_the_update(assets, tmp_path):
    """Under fp16 (emulated on the CPU) the GradScaler finds the NaN gradients of the poisoned update and skips it,
    so no weight turns NaN; the loss is still non-finite, and the run stops as in fp32: exit 3, the checkpoint
    before it kept (with its loss scale), nothing written after it."""
    out = str(tmp_path / "run")
    proc = _run(assets, out, fault="nan:3", env={"REVIVAL_EMULATE_FP16": "1"})
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: non-finite loss (nan) in chunk 1, epoch 0")
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint-")) == ["checkpoint-2"]
    assert os.path.isfile(os.path.join(out, "checkpoint-2", "scaler.pt")) and os.path.isfile(os.path.join(out, "DIVERGED"))
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["amp"] == "emulated on cpu"
