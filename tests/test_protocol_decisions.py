"""The protocols' decisions (docs/protocols.md) with a scripted trainer and validator: no model, exact numbers.

The fake trainer counts what it is asked to do; the fake validator returns set
scores per call. Scores are chosen exactly representable in binary floating
point (0.25, 0.5, 0.75), so "a mean exactly at the threshold" really is equal.
"""

import json
import os

import pytest

from common.protocol import Criterion, run_individual, run_sequential
from common.results import RunRecorder


class FakeTrainer:
    """Records resets and epochs; an epoch of a chunk of n rows at batch b is ceil(n / b) updates of b images."""

    def __init__(self, batch=10):
        self.batch = batch
        self.global_updates = 0
        self.calls = []  # ("reset", chunk, carry) and ("epoch", chunk, epoch)

    def reset_chunk(self, chunk, carry_state=False):
        self.calls.append(("reset", chunk, carry_state))

    pending_micro_batches = 0

    def train_epoch(self, dataset, rows, chunk, epoch, start_update=0, loss_before=0.0, on_update=None):
        self.calls.append(("epoch", chunk, epoch))
        size = rows[1] - rows[0]
        updates, images = -(-size // self.batch), size
        self.global_updates += updates
        return {"updates": updates, "images": images, "loss": 0.125, "loss_sum": 0.125 * updates}

    def epochs(self, chunk=None):
        return [c[2] for c in self.calls if c[0] == "epoch" and (chunk is None or c[1] == chunk)]


class ScriptedValidator:
    """Returns, per call, the next scripted {criterion: scores}; the last entry repeats."""

    def __init__(self, script):
        self.script = list(script)
        self.tags = []

    def __call__(self, tag):
        self.tags.append(tag)
        return self.script[min(len(self.tags) - 1, len(self.script) - 1)]


def _criterion(name, threshold):
    return Criterion(name, threshold, score_images=None)


ROWS = {0: (0, 50), 1: (50, 100), 2: (100, 130)}


def _individual(tmp_path, script, criterion, chunks=(0, 1), **kw):
    trainer, validator = FakeTrainer(), ScriptedValidator(script)
    recorder = RunRecorder(str(tmp_path), True)
    try:
        outcomes = run_individual(trainer=trainer, dataset=None, chunk_rows=ROWS, chunks=list(chunks),
                                  criterion=criterion, validator=validator, recorder=recorder, **kw)
    finally:
        recorder.close()
    return outcomes, trainer, validator, _records(tmp_path)


def _sequential(tmp_path, script, criteria, chunks=(0, 1, 2), epochs=1, **kw):
    trainer, validator = FakeTrainer(), ScriptedValidator(script)
    recorder = RunRecorder(str(tmp_path), True)
    try:
        summary = run_sequential(trainer=trainer, dataset=None, chunk_rows=ROWS, chunks=list(chunks),
                                 epochs_per_chunk={i: epochs for i in chunks}, criteria=criteria,
                                 validator=validator, recorder=recorder, **kw)
    finally:
        recorder.close()
    return summary, trainer, validator, _records(tmp_path)


def _records(out):
    path = os.path.join(out, "validations.jsonl")
    return [json.loads(line) for line in open(path)] if os.path.isfile(path) else []


# --- thresholds: CLIP strictly above, classifier at or above -------------------------------------------------


def test_clip_mean_exactly_at_threshold_is_not_revived(tmp_path):
    at, above = {"clip": [0.25, 0.75]}, {"clip": [0.5, 0.75]}  # means 0.5 (== threshold) and 0.625
    outcomes, _, _, recs = _individual(tmp_path, [at, above], _criterion("clip", 0.5), chunks=[0],
                                       validation_epochs=1)
    assert [(r["epoch"], r["mean"], r["revived"]) for r in recs] == [(0, 0.5, False), (1, 0.625, True)]
    assert outcomes[0].revived and outcomes[0].revival_epoch == 1


def test_classifier_accuracy_exactly_at_threshold_is_revived(tmp_path):
    outcomes, trainer, _, recs = _individual(tmp_path, [{"classifier": [1.0, 0.0, 0.0, 1.0]}],
                                             _criterion("classifier", 0.5), chunks=[0], validation_epochs=1)
    assert [(r["epoch"], r["mean"], r["revived"]) for r in recs] == [(0, 0.5, True)]
    assert outcomes[0].revival_epoch == 0 and trainer.epochs() == [0]


def test_criterion_strictness_by_hand():
    assert not _criterion("clip", 0.31).met(0.31) and _criterion("clip", 0.31).met(0.3100001)
    assert _criterion("classifier", 0.3).met(0.3) and not _criterion("classifier", 0.3).met(0.2999999)


# --- individual protocol: per-chunk restart, validation cadence, epoch cap --------------------------------------


def test_individual_revival_after_epoch_0_and_after_chunk_0(tmp_path):
    low, high = {"clip": [0.0, 0.25]}, {"clip": [0.75, 0.75]}
    # Chunk 0: validated at epochs 0, 2 (low), 4 (high). Chunk 1 starts over: epoch 0 low, epoch 2 high.
    outcomes, trainer, validator, recs = _individual(tmp_path, [low, low, high, low, high],
                                                     _criterion("clip", 0.5), validation_epochs=2)
    assert validator.tags == ["chunk0-epoch0", "chunk0-epoch2", "chunk0-epoch4", "chunk1-epoch0", "chunk1-epoch2"]
    assert [(o.chunk, o.revived, o.revival_epoch, o.epochs_trained) for o in outcomes] == [
        (0, True, 4, 5), (1, True, 2, 3)]
    # Each chunk restarts from the unlearned weights with fresh state (no carry) and counts from zero.
    assert [c for c in trainer.calls if c[0] == "reset"] == [("reset", 0, False), ("reset", 1, False)]
    assert trainer.epochs(0) == [0, 1, 2, 3, 4] and trainer.epochs(1) == [0, 1, 2]
    assert [(r["chunk"], r["epoch"], r["optimizer_steps"], r["images_seen"]) for r in recs] == [
        (0, 0, 5, 50), (0, 2, 15, 150), (0, 4, 25, 250), (1, 0, 5, 50), (1, 2, 15, 150)]
    assert outcomes[1].optimizer_steps == 15 and outcomes[1].images_seen == 150
    summary = json.load(open(tmp_path / "summary.json"))
    assert [(c["chunk"], c["revival_epoch"]) for c in summary["chunks"]] == [(0, 4), (1, 2)]


def test_individual_epoch_cap_is_checked_every_epoch(tmp_path):
    # max_epoch 3: epochs 0..4 are trained (stop after the first epoch e > 3); validation_epochs 2 validates 0, 2, 4.
    outcomes, trainer, validator, recs = _individual(tmp_path, [{"clip": [0.0]}], _criterion("clip", 0.5),
                                                     chunks=[1], validation_epochs=2, max_epoch=3)
    assert trainer.epochs() == [0, 1, 2, 3, 4]
    assert [r["epoch"] for r in recs] == [0, 2, 4]
    (o,) = outcomes
    assert (o.revived, o.revival_epoch, o.epochs_trained, o.optimizer_steps, o.last_mean) == (False, None, 5, 25, 0.0)
    # An odd cap: with validation every 2nd epoch the last trained epoch (e = 4 > 3) is still validated, but the
    # cap stops at e = 4 even when e = 4 is not a validation epoch (max_epoch 2 -> epochs 0..3, validations 0, 2).
    outcomes, trainer, _, recs = _individual(tmp_path / "b", [{"clip": [0.0]}], _criterion("clip", 0.5),
                                             chunks=[1], validation_epochs=2, max_epoch=2)
    assert trainer.epochs() == [0, 1, 2, 3] and [r["epoch"] for r in recs] == [0, 2]
    assert outcomes[0].epochs_trained == 4


def test_individual_without_early_stop_trains_to_the_cap_and_keeps_the_first_revival(tmp_path):
    low, high = {"clip": [0.25]}, {"clip": [0.75]}
    outcomes, trainer, _, recs = _individual(tmp_path, [low, high, low, high], _criterion("clip", 0.5), chunks=[0],
                                             validation_epochs=1, max_epoch=2, early_stop=False)
    assert trainer.epochs() == [0, 1, 2, 3] and [r["revived"] for r in recs] == [False, True, False, True]
    (o,) = outcomes
    assert (o.revived, o.revival_epoch, o.epochs_trained, o.last_mean) == (True, 1, 4, 0.75)


def test_individual_validation_epochs_one_validates_every_epoch(tmp_path):
    _, trainer, validator, recs = _individual(tmp_path, [{"classifier": [0.0]}], _criterion("classifier", 0.5),
                                              chunks=[0], validation_epochs=1, max_epoch=1)
    assert [r["epoch"] for r in recs] == [0, 1, 2] and trainer.epochs() == [0, 1, 2]


def test_individual_compat_reference_carries_state_and_caps_on_validation_epochs_only(tmp_path):
    # The published CLIP script checks `epoch > clip_epoch` inside its validation branch: with validation every
    # 2nd epoch and an even cap of 2, epoch 3 is past the cap but not validated, so epoch 4 is trained too.
    outcomes, trainer, _, recs = _individual(tmp_path, [{"clip": [0.0]}], _criterion("clip", 0.5),
                                             validation_epochs=2, max_epoch=2, compat_reference=True)
    assert [c for c in trainer.calls if c[0] == "reset"] == [("reset", 0, True), ("reset", 1, True)]
    assert trainer.epochs(0) == [0, 1, 2, 3, 4] and [r["epoch"] for r in recs if r["chunk"] == 0] == [0, 2, 4]
    assert outcomes[0].epochs_trained == 5
    # The default stops at the first epoch past the cap, validated or not.
    _, trainer, _, _ = _individual(tmp_path / "b", [{"clip": [0.0]}], _criterion("clip", 0.5), chunks=[0],
                                   validation_epochs=2, max_epoch=2)
    assert trainer.epochs(0) == [0, 1, 2, 3]


# --- sequential protocol: Revival Points -----------------------------------------------------------------------


def _both(clip, clf):
    return {"clip": clip, "classifier": clf}


def test_sequential_revival_points_are_per_criterion_and_count_curriculum_images(tmp_path):
    crit = [_criterion("clip", 0.5), _criterion("classifier", 0.5)]
    script = [_both([0.0], [0.0]), _both([0.25], [0.0]), _both([0.25], [0.5]), _both([0.75], [0.0])]
    # Three epochs per chunk: images trained on (3 x rows) differ from the curriculum boundary c(i).
    summary, trainer, validator, recs = _sequential(tmp_path, script, crit, epochs=3)
    assert validator.tags == ["before-training", "chunk0", "chunk1", "chunk2"]
    # The classifier is met at chunk 1 only (and not again at chunk 2): its point stays chunk 1.
    assert summary["revival_point"] == {"clip": {"chunk": 2, "images_seen": 130},
                                        "classifier": {"chunk": 1, "images_seen": 100}}
    assert [(r["chunk"], r["criterion"], r["revived"], r["images_seen"], r["training_images"], r["optimizer_steps"],
             r["epoch"]) for r in recs] == [
        (None, "clip", False, 0, 0, 0, None), (None, "classifier", False, 0, 0, 0, None),
        (0, "clip", False, 50, 150, 15, 2), (0, "classifier", False, 50, 150, 15, 2),
        (1, "clip", False, 100, 300, 30, 2), (1, "classifier", True, 100, 300, 30, 2),
        (2, "clip", True, 130, 390, 39, 2), (2, "classifier", False, 130, 390, 39, 2)]
    # One reset, at the start: sequential training never restores the unlearned weights.
    assert [c for c in trainer.calls if c[0] == "reset"] == [("reset", 0, False)]
    assert trainer.epochs() == [0, 1, 2] * 3
    assert json.load(open(tmp_path / "summary.json"))["revival_point"] == summary["revival_point"]


def test_sequential_continues_after_revival_by_default(tmp_path):
    crit = [_criterion("clip", 0.5), _criterion("classifier", 0.5)]
    summary, trainer, validator, _ = _sequential(tmp_path, [_both([0.0], [0.0]), _both([0.75], [1.0])], crit)
    assert validator.tags == ["before-training", "chunk0", "chunk1", "chunk2"] and len(summary["chunks"]) == 3
    assert summary["revival_point"]["clip"] == {"chunk": 0, "images_seen": 50}


def test_sequential_stop_at_revival_waits_for_every_criterion(tmp_path):
    crit = [_criterion("clip", 0.5), _criterion("classifier", 0.5)]
    script = [_both([0.0], [0.0]), _both([0.75], [0.0]), _both([0.0], [1.0]), _both([0.75], [1.0])]
    summary, trainer, validator, _ = _sequential(tmp_path, script, crit, stop_at_revival=True)
    # CLIP met at chunk 0, the classifier at chunk 1: the run stops after chunk 1, never training chunk 2.
    assert validator.tags == ["before-training", "chunk0", "chunk1"] and trainer.epochs() == [0, 0]
    assert summary["revival_point"] == {"clip": {"chunk": 0, "images_seen": 50},
                                        "classifier": {"chunk": 1, "images_seen": 100}}


def test_sequential_scores_the_unlearned_model_before_training_and_never_calls_it_a_revival(tmp_path):
    """The validation before any training is recorded at 0 images (where every sequential plot starts); a
    criterion already met there is not a Revival Point (chunks only) and does not stop --stop_at_revival."""
    crit = [_criterion("clip", 0.5), _criterion("classifier", 0.5)]
    script = [_both([0.75], [1.0]), _both([0.0], [0.0]), _both([0.0], [1.0]), _both([0.75], [1.0])]
    summary, trainer, validator, recs = _sequential(tmp_path, script, crit, stop_at_revival=True)
    assert validator.tags[0] == "before-training" and trainer.calls[0][0] == "reset"
    assert summary["before_training"] == {"images_seen": 0, "clip": {"mean": 0.75, "revived": True},
                                          "classifier": {"mean": 1.0, "revived": True}}
    assert [(r["images_seen"], r["criterion"], r["mean"]) for r in recs[:2]] == [(0, "clip", 0.75),
                                                                                 (0, "classifier", 1.0)]
    # Met before training, then not after chunk 0: the points are chunk 1 (classifier) and chunk 2 (clip).
    assert summary["revival_point"] == {"clip": {"chunk": 2, "images_seen": 130},
                                        "classifier": {"chunk": 1, "images_seen": 100}}
    assert trainer.epochs() == [0, 0, 0]
    assert "already met before any fine-tuning" in open(tmp_path / "log.txt").read()


def test_sequential_saves_only_the_requested_curriculum_checkpoints(tmp_path):
    saved = []
    _sequential(tmp_path, [_both([0.0], [0.0])], [_criterion("clip", 0.5), _criterion("classifier", 0.5)],
                checkpoint_chunks=[0, 2], save_chunk=saved.append)
    assert saved == [0, 2]


def test_a_third_criterion_through_the_registry_alone(assets, tmp_path, in_assets_root):
    """One scorer function and one registry entry: the sequential script scores it, records it and finds its
    Revival Point, with no other change (here: mean image brightness, met when >= 0, so at chunk 0)."""
    import json
    import os

    import numpy as np

    import finetuning_sequential as script
    from common import criteria
    from common.protocol import Criterion
    from conftest import seed_flags

    def brightness(images, prompts):
        return [float(np.asarray(im, dtype=np.float32).mean() / 255) for im in images]

    criteria.register(criteria.CriterionKind(
        "brightness", strict=False, label="mean brightness (0..1)",
        build=lambda args, device: Criterion("brightness", 0.0, brightness, scale="mean pixel / 255"),
        columns=(("brightness_mean", "brightness", ".3f", 1.0, 12),)))
    try:
        out = str(tmp_path / "seq")
        script.main(script.parse_args(seed_flags(assets, out, **{
            "--num_train_epochs": 1, "--end_CL": 1, "--clip_threshold": 1.0, "--save_model": "False",
            "--log_file": False})))
        # eval_model.py's table and results.csv take the new column from the registry too.
        from common.evaluation import format_table, result_fields

        row = {"label": "m", "weights": "single", **criteria.CRITERIA["clip"].summarise([0.5, 0.7]),
               **criteria.CRITERIA["brightness"].summarise([0.25, 0.75])}
        head, _, line = format_table([row]).splitlines()
        assert head.split()[-1] == "brightness" and "classifier acc" not in head  # only columns with values
        assert line.split()[-3:] == ["0.6000", "60.00", "0.500"]
        assert "brightness_mean" in result_fields() and row["clip_logit_scale"] == pytest.approx(60.0)
    finally:
        criteria.CRITERIA.pop("brightness")
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["criteria"] == {"clip": 1.0, "brightness": 0.0}
    assert summary["revival_point"] == {"clip": None, "brightness": {"chunk": 0, "images_seen": 50}}
    recs = [json.loads(line) for line in open(os.path.join(out, "validations.jsonl"))]
    (rec,) = [r for r in recs if r["criterion"] == "brightness" and r["chunk"] == 0]
    assert rec["revived"] and 0 < rec["mean"] < 1 and len(rec["scores"]) == 3
    assert criteria.label("brightness") == "brightness"  # gone again once unregistered


def test_the_trackers_get_utility_fid_where_a_validation_has_it(tmp_path):
    """--utility_fid's FID and KID reach the trackers at the validations that compute them (every sequential one)."""
    from types import SimpleNamespace

    from common.tracking import Tracking

    class WithFid(ScriptedValidator):
        def utility_fid(self):
            return {"utility_fid": 1.5 + len(self.tags), "utility_kid_mean": 0.25, "utility_kid_std": 0.0,
                    "utility_fid_features": "clip", "utility_fid_images": 2, "utility_fid_reference_images": 40}

    logged = []
    trainer, validator = FakeTrainer(), WithFid([{"clip": [0.0]}])
    recorder = RunRecorder(str(tmp_path), True)
    recorder.tracking = Tracking(SimpleNamespace(log=lambda values, step: logged.append((step, values))), "p", {},
                                 enabled=False)
    recorder.tracking.enabled = True  # a tracker without accelerate's set-up: only what the run logs
    try:
        run_sequential(trainer=trainer, dataset=None, chunk_rows=ROWS, chunks=[0, 1], epochs_per_chunk={0: 1, 1: 1},
                       criteria=[_criterion("clip", 0.5)], validator=validator, recorder=recorder)
    finally:
        recorder.close()
    fids = [(step, v["validation/utility_fid"], v["validation/utility_kid_mean"]) for step, v in logged
            if "validation/utility_fid" in v]
    assert fids == [(0, 2.5, 0.25), (5, 3.5, 0.25), (10, 4.5, 0.25)]  # before training, after chunks 0 and 1
    assert [r["utility_fid"] for r in _records(tmp_path)] == [2.5, 3.5, 4.5]
