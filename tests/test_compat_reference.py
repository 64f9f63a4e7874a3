"""--compat reference: the published scripts' training loop, row order and epoch semantics, row by row."""

import json

import pytest
import torch

from common.curriculum import reference_schedule
from common.data import ImageTransform, load_training_data, read_metadata
from common.encoding import CachedEncoder
from common.models import load_sd_parts
from common.training import ChunkTrainer, TrainConfig

# --- the published loop's schedule, by hand ----------------------------------------------------------------


def test_reference_schedule_one_micro_batch_per_update():
    # 50 rows, batch 10: epoch 0 is 5 updates over batches 0..4; the chunk's count then reaches its limit (5),
    # so every later epoch breaks after its first batch, which it trains on.
    assert reference_schedule(5, 1, 0, 0, 5) == ([([0], True), ([1], True), ([2], True), ([3], True), ([4], True)], 0)
    assert reference_schedule(5, 1, 0, 5, 5) == ([([0], True)], 0)
    assert reference_schedule(5, 1, 0, 9, 5) == ([([0], True)], 0)


def test_reference_schedule_with_accumulation_updates_every_second_epoch():
    # Accumulation 2: limit ceil(50 / 20) = 3. Epoch 0: batches 0+1, 2+3, then 4 alone (end of the loader syncs).
    assert reference_schedule(5, 2, 0, 0, 3) == ([([0, 1], True), ([2, 3], True), ([4], True)], 0)
    # Epoch 1: batch 0 accumulates but does not update; the limit is already reached, so the epoch ends there.
    assert reference_schedule(5, 2, 0, 3, 3) == ([([0], False)], 1)
    # Epoch 2: batch 0 again, second micro-batch of the pending update: it updates.
    assert reference_schedule(5, 2, 1, 3, 3) == ([([0], True)], 0)


def test_reference_schedule_pending_micro_batches_carry_over_several_epochs():
    # Accumulation 3, 50 rows: limit ceil(50 / 30) = 2, reached in epoch 0 (batches 0-2, then 3-4 at the loader's end).
    assert reference_schedule(5, 3, 0, 0, 2) == ([([0, 1, 2], True), ([3, 4], True)], 0)
    # Then each epoch adds one micro-batch to the pending update: 1, 2, and the third updates.
    assert reference_schedule(5, 3, 0, 2, 2) == ([([0], False)], 1)
    assert reference_schedule(5, 3, 1, 2, 2) == ([([0], False)], 2)
    assert reference_schedule(5, 3, 2, 2, 2) == ([([0], True)], 0)


def test_reference_schedule_short_chunk_can_take_a_full_later_epoch():
    # 23 rows, batch 10: the published sampler drops the short last batch (2 batches); limit ceil(23 / 20) = 2.
    assert reference_schedule(2, 2, 0, 0, 2) == ([([0, 1], True)], 0)
    assert reference_schedule(2, 2, 0, 1, 2) == ([([0, 1], True)], 0)  # below the limit: a whole pass
    assert reference_schedule(2, 2, 0, 2, 2) == ([([0], False)], 1)
    assert reference_schedule(2, 2, 1, 2, 2) == ([([0], True)], 0)


# --- the trainer follows it: the rows of every update ------------------------------------------------------


class RecordingEncoder:
    """Wraps an encoder and records the dataset rows of every micro-batch."""

    def __init__(self, inner):
        self.inner, self.rows = inner, []
        self.latent_shape = inner.latent_shape

    def prepare(self, dataset, row_range):
        self.inner.prepare(dataset, row_range)

    def __call__(self, dataset, rows, *a):
        self.rows.append([int(r) for r in rows])
        return self.inner(dataset, rows, *a)


@pytest.fixture(scope="module")
def parts_and_data(assets):
    return assets, load_training_data(assets["data"], None, "prompt")


def _trainer(assets, compat, accumulation=1):
    from accelerate import Accelerator

    parts = load_sd_parts(assets["sd"])
    enc = RecordingEncoder(CachedEncoder(parts, ImageTransform(32, True, True), "cpu", torch.float32))
    cfg = TrainConfig(learning_rate=1e-4, train_batch_size=10, gradient_accumulation_steps=accumulation, seed=4,
                      compat_reference=compat)
    trainer = ChunkTrainer(Accelerator(cpu=True), parts, enc, cfg, horizon_updates=20)
    trainer.reset_chunk(1, carry_state=compat)
    return trainer, enc


def _epoch(trainer, enc, ds, rows, epoch):
    """(rows of each micro-batch, updates done, whether the weights moved) for one epoch."""
    enc.rows.clear()
    before = torch.cat([p.detach().flatten() for p in trainer.trainable])
    stats = trainer.train_epoch(ds, rows, 1, epoch)
    moved = not torch.equal(before, torch.cat([p.detach().flatten() for p in trainer.trainable]))
    return list(enc.rows), stats["updates"], moved


def _span(a, b):
    return list(range(a, b))


def test_compat_trains_rows_in_order_then_the_first_batch_with_accumulation(parts_and_data):
    assets, ds = parts_and_data
    trainer, enc = _trainer(assets, compat=True, accumulation=2)
    chunk = (50, 100)
    rows, updates, moved = _epoch(trainer, enc, ds, chunk, 0)
    assert rows == [_span(50, 60), _span(60, 70), _span(70, 80), _span(80, 90), _span(90, 100)]
    assert updates == 3 and moved
    # Epoch 1: the first batch, no update (gradients wait); epoch 2: the first batch again, and the update.
    assert _epoch(trainer, enc, ds, chunk, 1) == ([_span(50, 60)], 0, False)
    assert trainer.pending_micro_batches == 1
    assert _epoch(trainer, enc, ds, chunk, 2) == ([_span(50, 60)], 1, True)
    assert trainer.pending_micro_batches == 0 and trainer.global_updates == 4


def test_compat_trainer_carries_pending_micro_batches_across_epochs(parts_and_data):
    assets, ds = parts_and_data
    trainer, enc = _trainer(assets, compat=True, accumulation=3)
    updates = [_epoch(trainer, enc, ds, (50, 100), e)[1] for e in range(4)]
    assert updates == [2, 0, 0, 1]  # epochs 1 and 2 each add a micro-batch; epoch 3's third one updates


def test_compat_drops_a_short_last_batch_as_the_published_sampler(parts_and_data):
    assets, ds = parts_and_data
    trainer, enc = _trainer(assets, compat=True)
    rows, updates, _ = _epoch(trainer, enc, ds, (50, 73), 0)
    assert rows == [_span(50, 60), _span(60, 70)] and updates == 2  # rows 70-72 are never trained on
    # Below the chunk's limit (3 updates) after epoch 0, so epoch 1 trains its first batch and reaches it.
    assert _epoch(trainer, enc, ds, (50, 73), 1)[:2] == ([_span(50, 60)], 1)


def test_default_epochs_are_shuffled_full_passes(parts_and_data):
    assets, ds = parts_and_data
    trainer, enc = _trainer(assets, compat=False)
    first, updates, _ = _epoch(trainer, enc, ds, (50, 73), 0)
    assert updates == 3 and sorted(sum(first, [])) == _span(50, 73) and sum(first, []) != _span(50, 73)
    second, updates, _ = _epoch(trainer, enc, ds, (50, 73), 1)
    assert updates == 3 and sorted(sum(second, [])) == _span(50, 73) and second != first


# --- row order of an imagefolder -------------------------------------------------------------------------------


def test_compat_row_order_is_the_sorted_file_names_default_the_metadata_lines(tmp_path):
    from PIL import Image

    names = ["c.png", "10.png", "a.png", "2.png"]  # metadata order; string order: 10, 2, a, c
    for i, name in enumerate(names):
        Image.new("RGB", (8, 8), (i * 60, 0, 0)).save(tmp_path / name)
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "prompt": f"p-{n}"}) + "\n"
                                                     for n in names))
    paths, captions = read_metadata(str(tmp_path), "prompt")
    assert captions == ["p-c.png", "p-10.png", "p-a.png", "p-2.png"]
    paths, captions = read_metadata(str(tmp_path), "prompt", row_order="file_name")
    assert captions == ["p-10.png", "p-2.png", "p-a.png", "p-c.png"]
    assert [p.rsplit("/", 1)[1] for p in paths] == ["10.png", "2.png", "a.png", "c.png"]
    ds = load_training_data(str(tmp_path), None, "prompt", row_order="file_name")
    assert ds["caption"] == captions and ds[0]["image"].getpixel((0, 0)) == (60, 0, 0)  # image and caption agree


def test_compat_flag_reaches_row_order_and_trainer(assets, tmp_path, in_assets_root):
    import finetuning_individual_CLIP as clip_script
    import finetuning_sequential as seq_script
    from common import entry
    from conftest import seed_flags

    args = clip_script.parse_args(seed_flags(assets, str(tmp_path / "a"), **{"--compat": "reference"}))
    assert entry.data_config(args).row_order == "file_name"
    assert entry.train_config(args, compat_reference=True).compat_reference
    args = clip_script.parse_args(seed_flags(assets, str(tmp_path / "b")))
    assert entry.data_config(args).row_order == "metadata"
    args = seq_script.parse_args(seed_flags(assets, str(tmp_path / "c"), **{"--compat": "reference"}))
    assert entry.data_config(args).row_order == "file_name"
