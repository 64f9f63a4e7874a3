"""ChunkTrainer.reset_chunk: what is fresh per chunk and what --compat reference carries over."""

import pytest
import torch

from common.data import ImageTransform, load_training_data
from common.encoding import CachedEncoder
from common.models import load_sd_parts
from common.training import ChunkTrainer, TrainConfig

LR = 1e-3


def _flat(params):
    return torch.cat([p.detach().flatten().cpu() for p in params])


@pytest.fixture(scope="module")
def trained(assets):
    """A trainer with EMA and a cosine schedule with warm-up, after one epoch on chunk 0, and its start weights."""
    from accelerate import Accelerator

    ds = load_training_data(assets["data"], None, "prompt")
    parts = load_sd_parts(assets["sd"])
    enc = CachedEncoder(parts, ImageTransform(32, center_crop=True, random_flip=True), "cpu", torch.float32)
    cfg = TrainConfig(learning_rate=LR, lr_scheduler="cosine", lr_warmup_steps=2, train_batch_size=10, seed=3,
                      use_ema=True)
    trainer = ChunkTrainer(Accelerator(cpu=True), parts, enc, cfg, horizon_updates=20)
    trainer.reset_chunk(0)
    start = _flat(trainer.trainable)
    return trainer, ds, start


def _train_one_epoch(trainer, ds, chunk=0):
    trainer.train_epoch(ds, (0, 50), chunk, 0)
    assert not torch.equal(_flat(trainer.trainable), _flat(trainer.restore.copies))


def test_reset_restores_weights_and_starts_optimizer_schedule_and_ema_afresh(trained):
    trainer, ds, start = trained
    _train_one_epoch(trainer, ds)
    assert len(trainer.raw_optimizer.state) > 0 and trainer.ema.optimization_step == 5
    assert trainer.lr_scheduler.last_epoch == 5
    trainer.reset_chunk(1)
    assert torch.equal(_flat(trainer.trainable), start)  # bit for bit the unlearned weights
    assert len(trainer.raw_optimizer.state) == 0  # no Adam moments, no step count
    assert all(p.grad is None for p in trainer.trainable)
    assert trainer.ema.optimization_step == 0 and torch.equal(_flat(trainer.ema.shadow_params), start)
    # The schedule restarts at its warm-up: lr 0 at update 0, LR / 2 after one update of a 2-update warm-up.
    assert trainer.lr_scheduler.last_epoch == 0 and trainer.raw_optimizer.param_groups[0]["lr"] == 0.0
    trainer.train_epoch(ds, (50, 60), 1, 0)  # one batch: one update
    assert trainer.raw_optimizer.param_groups[0]["lr"] == pytest.approx(LR / 2)


def test_compat_reset_restores_only_the_weights(trained):
    trainer, ds, start = trained
    trainer.reset_chunk(0)
    _train_one_epoch(trainer, ds)
    moments = {id(p): s["exp_avg"].clone() for p, s in trainer.raw_optimizer.state.items()}
    ema_before = _flat(trainer.ema.shadow_params)
    trainer.reset_chunk(1, carry_state=True)
    assert torch.equal(_flat(trainer.trainable), start)
    # Adam moments, the schedule's position and the EMA copy carry over, as in the published scripts.
    assert {id(p): s["exp_avg"] for p, s in trainer.raw_optimizer.state.items()}.keys() == moments.keys()
    assert all(torch.equal(s["exp_avg"], moments[id(p)]) for p, s in trainer.raw_optimizer.state.items())
    assert trainer.lr_scheduler.last_epoch == 5 and trainer.ema.optimization_step == 5
    assert torch.equal(_flat(trainer.ema.shadow_params), ema_before)
    assert not torch.equal(ema_before, start)
