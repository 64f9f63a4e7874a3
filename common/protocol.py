"""The revival protocols (docs/protocols.md), written as their algorithm boxes."""

from __future__ import annotations

import functools
import itertools
import json
import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .checkpointing import STATE_FILE
from .faults import maybe_fail
from .results import RunRecorder, score_stats
from .training import check_finite
from .validation import (RETENTION_STREAM, UTILITY_STREAM, BatchLimit, generate_images, generation_precision,
                         image_seed, shard)


@dataclass
class Criterion:
    """A revival test on per-image scores: CLIP (mean cosine > threshold) or classifier (accuracy >= threshold)."""

    name: str  # a kind in common.criteria.CRITERIA ("clip", "classifier", ...)
    threshold: float
    score_images: Callable[[list, list], List[float]]  # (images, prompts) -> per-image scores
    scale: str = ""  # how the score is expressed, for the results
    # (images, prompts) -> (per-image scores, per-image details or None); used instead of score_images when set
    score_details: Optional[Callable[[list, list], tuple]] = None
    strict: Optional[bool] = None  # None: the registered kind's comparison

    def met(self, mean: float) -> bool:
        """Criteria (docs/protocols.md): a strict kind (CLIP) needs mean > threshold, others mean >= threshold."""
        from .criteria import CRITERIA

        strict = self.strict if self.strict is not None else CRITERIA[self.name].strict
        return mean > self.threshold if strict else mean >= self.threshold


@dataclass
class ValidationConfig:
    """How validation images are made."""

    prompts: Sequence[str]
    seed: int
    num_inference_steps: int = 20
    guidance_scale: float = 7.5
    batch_size: int = 0  # 0: all of this process's prompts in one batch
    resolution: Optional[int] = None
    image_dir: Optional[str] = None  # save PNGs here when set
    # Concepts that must survive (--retention_prompts): generated at every validation, scored by CLIP with their
    # own prompt. One more batch per validation; their own noise stream (validation.RETENTION_STREAM).
    retention_prompts: Sequence[str] = ()
    # A caption set for utility (--utility_prompts): generated and CLIP-scored at every validation as the retention
    # prompts are (the same code), in a noise stream of its own (validation.UTILITY_STREAM).
    utility_prompts: Sequence[str] = ()
    # --utility_fid (common.utility.FidConfig): FID and KID of the utility captions' images at a chunk's last
    # validation, from the images that validation drew (the protocols ask for it: Validator.utility_fid).
    utility_fid: Optional[object] = None


class Validator:
    """Generate one image per validation prompt (sharded across processes) and score it under each criterion."""

    def __init__(self, accelerator, pipe, cfg: ValidationConfig, criteria: Sequence[Criterion],
                 retention_score: Optional[Callable[[list, list], List[float]]] = None):
        self.accelerator = accelerator
        self.pipe = pipe
        self.cfg = cfg
        self.criteria = list(criteria)
        self.details: Dict[str, list] = {}  # per criterion, per image (nudity: scores and classes found)
        if (cfg.retention_prompts or cfg.utility_prompts) and retention_score is None:
            raise ValueError("retention and utility prompts need a CLIP scorer (retention_score)")
        self.retention_score = retention_score  # (images, prompts) -> per-image CLIP cosine
        self.retention: Optional[List[float]] = None  # per retention prompt, after each call when there are any
        self.utility: Optional[List[float]] = None  # per utility caption, likewise
        self.batch_limit = BatchLimit()  # the generation batch that fits (CUDA memory), kept across validations
        # This process's share of each caption set's images of the last call: (caption indices, images).
        self.caption_images: Dict[str, tuple] = {}
        self.fid = None  # common.utility.CaptionSetFid under --utility_fid (common/session.py sets it)

    def _score(self, criterion: Criterion, images, prompts):
        if not images:
            return [], None
        if criterion.score_details is not None:
            return criterion.score_details(images, prompts)
        return criterion.score_images(images, prompts), None

    def _generate(self, prompts, indices, stream: int, desc: str) -> list:
        """This process's images of ``prompts`` (prompt k seeded by (seed, k) in its stream), one batch setting."""
        acc, cfg = self.accelerator, self.cfg
        if not prompts:
            return []
        # eval_model.py's precision, not the accelerator's (whose UNet returns fp32): the same seed, the same image.
        return generate_images(
            self.pipe, prompts, [image_seed(cfg.seed, k, 0, stream) for k in indices],
            batch_size=cfg.batch_size or max(1, len(prompts)),
            num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
            resolution=cfg.resolution, autocast=functools.partial(generation_precision, self.pipe),
            progress=acc.is_local_main_process, desc=desc,
            limit=self.batch_limit,
        )

    def _save(self, images, indices, tag: str) -> None:
        if self.cfg.image_dir:
            folder = os.path.join(self.cfg.image_dir, tag)
            os.makedirs(folder, exist_ok=True)
            for k, im in zip(indices, images):
                im.save(os.path.join(folder, f"{k:04d}.png"))

    def _caption_scores(self, captions: Sequence[str], stream: int, kind: str, tag: str) -> List[float]:
        """Per caption (in file order, on every process): CLIP cosine of its image with its own caption; the
        retention prompts' and the utility captions' one path (``kind`` names the image folder and the bar)."""
        from accelerate.utils import gather_object

        acc = self.accelerator
        mine = shard(range(len(captions)), acc.num_processes, acc.process_index)
        prompts = [captions[k] for k in mine]
        images = self._generate(prompts, mine, stream, f"{kind} {tag}")
        self._save(images, mine, os.path.join(kind, tag))
        self.caption_images[kind] = (list(mine), images)
        rows = list(zip(mine, self.retention_score(images, prompts) if images else []))
        gathered = sorted(gather_object(rows) if acc.num_processes > 1 else rows)
        return [score for _, score in gathered]

    def utility_fid(self) -> dict:
        """FID and KID of the last call's utility images (no new image): each process extracts its share's features,
        the main process gathers them in caption order and scores; the record's fields there, {} elsewhere and
        without --utility_fid. Every process calls it (the gather is collective)."""
        from accelerate.utils import gather_object

        if self.fid is None or "utility" not in self.caption_images:
            return {}
        acc = self.accelerator
        mine, images = self.caption_images["utility"]
        features = self.fid.features(images) if images else None
        rows = [(k, features[j].numpy()) for j, k in enumerate(mine)]
        gathered = sorted(gather_object(rows) if acc.num_processes > 1 else rows, key=lambda r: r[0])
        if not acc.is_main_process:
            return {}
        import numpy as np
        import torch

        return self.fid.fields(torch.from_numpy(np.stack([f for _, f in gathered])))

    def __call__(self, tag: str) -> Dict[str, List[float]]:
        """Scores per criterion name, in prompt order, identical on every process (details in ``self.details``)."""
        from accelerate.utils import gather_object

        acc, cfg = self.accelerator, self.cfg
        maybe_fail("validation")  # tests: a crash during validation
        mine = shard(range(len(cfg.prompts)), acc.num_processes, acc.process_index)
        prompts = [cfg.prompts[k] for k in mine]
        images = self._generate(prompts, mine, 0, f"validation {tag}")
        self._save(images, mine, tag)
        self.last_images = images  # this process's share, for the trackers' image grid
        if cfg.retention_prompts:
            self.retention = self._caption_scores(cfg.retention_prompts, RETENTION_STREAM, "retention", tag)
        if cfg.utility_prompts:
            self.utility = self._caption_scores(cfg.utility_prompts, UTILITY_STREAM, "utility", tag)
        local = {c.name: self._score(c, images, prompts) for c in self.criteria}
        rows = [(k, {name: (scores[j], details[j] if details else None) for name, (scores, details) in local.items()})
                for j, k in enumerate(mine)]
        gathered = sorted(gather_object(rows) if acc.num_processes > 1 else rows, key=lambda r: r[0])
        self.details = {c.name: [r[1][c.name][1] for r in gathered] for c in self.criteria
                        if any(r[1][c.name][1] is not None for r in gathered)}
        return {c.name: [r[1][c.name][0] for r in gathered] for c in self.criteria}


@dataclass
class ChunkOutcome:
    chunk: int
    rows: Tuple[int, int]
    revived: bool
    revival_epoch: Optional[int]
    epochs_trained: int
    optimizer_steps: int
    images_seen: int
    last_mean: Optional[float]
    skipped_updates: int = 0  # fp16: updates the gradient scaler skipped in the chunk

    def as_dict(self) -> dict:
        return dict(self.__dict__, rows=list(self.rows))


class _Progress:
    """The protocol's position and results so far: what a checkpoint stores and a resume restores."""

    def __init__(self, **fields):
        self.__dict__.update(fields)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class _Resumable:
    """Checkpoints at update boundaries (every N updates, on SIGTERM/SIGUSR1) for a protocol's progress."""

    def __init__(self, trainer, checkpointer, recorder, progress: _Progress):
        self.trainer, self.checkpointer, self.recorder, self.p = trainer, checkpointer, recorder, progress

    def state(self, epoch: int, update: int, loss_sum: float) -> dict:
        return {**self.p.as_dict(), "epoch": epoch, "update": update, "loss_sum": loss_sum,
                "validations_written": self.recorder.validations_written}

    def on_update(self, chunk: int, epoch: int, loss_before: float):
        """Callback for train_epoch: save when due, save and exit when preempted."""
        if self.checkpointer is None:
            return None
        acc = self.trainer.accelerator

        def hook(update: int, loss_sum):
            def state():
                total = float(acc.reduce(loss_sum.clone(), reduction="sum")) / acc.num_processes
                check_finite(total, chunk, epoch, self.trainer.global_updates)  # never save a diverged state
                return self.state(epoch, update, loss_before + total)

            n = self.trainer.global_updates
            if self.checkpointer.due(n):
                self.checkpointer.save(state())
            # With several processes the signal check is a collective: every 10 updates, not every step.
            if acc.num_processes == 1 or n % 10 == 0:
                self.checkpointer.exit_if_preempted(state)

        return hook

    def boundary(self, epoch: int) -> None:
        """Between epochs (after validation): the cheap moment to honour a preemption.

        Not while --compat reference holds accumulated gradients that await the
        next epoch's micro-batch: a checkpoint does not store gradients, so the
        preemption waits for the next update.
        """
        if self.checkpointer is not None and not self.trainer.pending_micro_batches:
            self.checkpointer.exit_if_preempted(lambda: self.state(epoch, 0, 0.0))

    def resume(self, path: Optional[str]) -> Optional[dict]:
        """Load a checkpoint into the (freshly reset) trainer; returns its state."""
        if not path:
            return None
        state = self.checkpointer.load(path)
        if getattr(self.trainer, "progress", None) is not None:
            self.trainer.progress.n = self.trainer.global_updates  # the bar continues where the run stopped
        self.recorder.keep_validations(state["validations_written"])
        self.recorder.log(f"resumed from {path}: chunk position {state['chunk_pos']}, epoch {state['epoch']}, "
                          f"update {state['update']}")
        return state


def _peak(trainer) -> dict:
    """The chunk's CUDA memory peak so far (nothing on the CPU or for a scripted trainer)."""
    from .memory import peak_record

    acc = getattr(trainer, "accelerator", None)
    return (peak_record(acc.device) or {}) if acc is not None else {}


def _reset_peak(trainer) -> None:
    from .memory import reset_peak

    acc = getattr(trainer, "accelerator", None)
    if acc is not None:
        reset_peak(acc.device)


class _NoTracking:
    def __getattr__(self, name):
        return lambda *a, **kw: None


def _track(recorder):
    """The run's trackers (common.tracking), or a stand-in that does nothing (scripted tests, no trackers)."""
    return getattr(recorder, "tracking", None) or _NoTracking()


def _track_epoch(recorder, trainer, stats) -> None:
    if "update_losses" in stats:
        _track(recorder).updates(trainer.global_updates, stats["update_losses"], stats["lrs"])


SUMMARY_FID_FIELDS = ("utility_fid", "utility_kid_mean", "utility_kid_std")  # summary.json's, beside "utility"
CAPTION_SETS = ("retention", "utility")  # the Validator's CLIP-scored caption sets (--retention/--utility_prompts)


def _utility_fid(validator) -> dict:
    """The record's --utility_fid fields (FID and KID of the utility captions' images), for a validator that has them
    (the protocol takes any callable validator)."""
    score = getattr(validator, "utility_fid", None)
    return score() if score is not None else {}


def _retention(validator) -> dict:
    """The record's retention and utility fields: per prompt of each set its CLIP cosine, and their mean (for each
    set the run has)."""
    out = {}
    for kind in CAPTION_SETS:
        scores = getattr(validator, kind, None)
        if scores:
            out.update({f"{kind}_mean": sum(scores) / len(scores), f"{kind}_scores": scores})
    return out


def _log_retention(recorder, validator, where: str, fid: Optional[dict] = None) -> None:
    fields = _retention(validator)
    for kind in CAPTION_SETS:
        if f"{kind}_scores" in fields:
            recorder.log(f"{where}: {kind} (CLIP, {len(fields[f'{kind}_scores'])} prompts) mean "
                         f"{fields[f'{kind}_mean']:.4f}")
    if fid:
        recorder.log(f"{where}: utility FID {fid['utility_fid']:.3f}, KID {fid['utility_kid_mean']:.5f} +- "
                     f"{fid['utility_kid_std']:.5f} ({fid['utility_fid_features']} features, "
                     f"{fid['utility_fid_images']} images vs {fid['utility_fid_reference_images']} reference)")


def last_validation_of_chunk(epoch: int, validation_epochs: int, max_epoch: int, compat_reference: bool) -> bool:
    """Whether the individual protocol validates no more in this chunk after ``epoch``'s validation, unless it stops
    at revival: the chunk ends after the first epoch past ``max_epoch`` (with --compat reference: the first validated
    one), so without --compat reference the last validation is the last multiple of validation_epochs <= max_epoch+1."""
    if compat_reference:
        return epoch > max_epoch
    return epoch + validation_epochs > max_epoch + 1


def _details(validator, name: str) -> dict:
    """The record's per-image details of a criterion, when its scorer gives any."""
    details = getattr(validator, "details", {}).get(name)
    return {"image_details": details} if details else {}


SKIPPED_WARNING = 5  # fp16: more skipped updates than this in one chunk is worth a warning (a few calibrate the scale)


def _count_skips(recorder, p, stats, chunk: int) -> None:
    """Add an epoch's skipped updates (fp16 overflow) to the chunk's per-epoch list; warn once past SKIPPED_WARNING."""
    before = sum(p.skips)
    p.skips.append(stats.get("skipped_updates", 0))
    if before <= SKIPPED_WARNING < sum(p.skips):
        recorder.log(f"warning: chunk {chunk}: {sum(p.skips)} optimizer updates skipped by the fp16 gradient scaler "
                     "(overflow) so far; frequent overflows mean the loss scale keeps collapsing (lower "
                     "--learning_rate, or try --mixed_precision bf16)")


def _updates_text(stats) -> str:
    """'12 updates' or '12 updates (3 skipped: fp16 overflow)' for an epoch's log line."""
    skipped = stats.get("skipped_updates", 0)
    return f"{stats['updates']} updates" + (f" ({skipped} skipped: fp16 overflow)" if skipped else "")


def _skips(p) -> dict:
    """The record's fp16 skipped updates: per epoch of the current chunk so far (index = epoch)."""
    return {"skipped_updates": list(p.skips)}


def read_checkpoint_state(path: Optional[str]) -> Optional[dict]:
    """The protocol position stored in a checkpoint (before the trainer loads it)."""
    if not path:
        return None
    with open(os.path.join(path, STATE_FILE)) as f:
        return json.load(f)


def run_individual(
    *,
    trainer,
    dataset,
    chunk_rows: Dict[int, Tuple[int, int]],
    chunks: Sequence[int],
    criterion: Criterion,
    validator: Validator,
    recorder: RunRecorder,
    validation_epochs: int = 2,
    max_epoch: int = 89,
    compat_reference: bool = False,
    save_chunk: Optional[Callable[[int], None]] = None,
    summary_extra: Optional[dict] = None,
    checkpointer=None,
    resume_path: Optional[str] = None,
    early_stop: bool = True,
) -> List[ChunkOutcome]:
    """The individual protocol (docs/protocols.md): per chunk, train from the unlearned weights until revival or the cap.

    ``compat_reference`` reproduces the reference's semantics: optimizer, LR
    schedule and EMA carry over between chunks and the epoch cap is checked on
    validation epochs only (the trainer, configured alike, reproduces its
    in-order, first-batch-only epochs). With a ``checkpointer`` the run
    can stop at any update and ``resume_path`` continues it where it stopped.
    Without ``early_stop`` every chunk trains to the cap; its outcome still
    names the first epoch the criterion was met.
    """
    saved = read_checkpoint_state(resume_path)
    p = _Progress(chunk_pos=0, steps=0, images=0, last_mean=None, first_revival=None, outcomes=[], skips=[])
    if saved:
        p = _Progress(**{k: saved.get(k) for k in ("chunk_pos", "steps", "images", "last_mean", "first_revival",
                                                   "outcomes")}, skips=saved.get("skips") or [])
    ckpt = _Resumable(trainer, checkpointer, recorder, p)
    p_first = p.chunk_pos

    def summarise():
        recorder.summary({**(summary_extra or {}), "protocol": "individual", "criterion": criterion.name,
                          "threshold": criterion.threshold, "chunks": p.outcomes})

    for pos in range(p.chunk_pos, len(chunks)):
        i, rows = chunks[pos], chunk_rows[chunks[pos]]
        p.chunk_pos = pos
        # Phase 1: back to the unlearned model; fresh optimizer, LR schedule, EMA.
        trainer.reset_chunk(i, carry_state=compat_reference)
        _reset_peak(trainer)
        start_epoch, start_update, loss_before = 0, 0, 0.0
        if saved and pos == saved["chunk_pos"]:
            ckpt.resume(resume_path)
            start_epoch, start_update, loss_before = saved["epoch"], saved["update"], saved["loss_sum"]
        else:
            p.steps = p.images = 0
            p.last_mean = p.first_revival = None
            p.skips = []
            if pos > p_first:
                ckpt.boundary(0)  # after the reset, so a resume here starts the chunk afresh
        outcome = None
        for epoch in itertools.count(start_epoch):
            # Phase 2: one pass over the chunk (the reference: in row order, then mostly its first batch).
            stats = trainer.train_epoch(dataset, rows, i, epoch, start_update=start_update, loss_before=loss_before,
                                        on_update=ckpt.on_update(i, epoch, loss_before))
            start_update, loss_before = 0, 0.0
            p.steps += stats["updates"]
            p.images += stats["images"]
            _count_skips(recorder, p, stats, i)
            _track_epoch(recorder, trainer, stats)
            recorder.log(f"chunk {i} epoch {epoch}: {_updates_text(stats)}, loss {stats['loss']:.5f}")
            # Phase 3: validate every validation_epochs epochs; stop once revived.
            validated = epoch % validation_epochs == 0
            if validated:
                t0 = time.perf_counter()
                scores = validator(f"chunk{i}-epoch{epoch}")[criterion.name]
                retention = _retention(validator)
                st = score_stats(scores)
                revived = criterion.met(st["mean"])
                last = (revived and early_stop) or last_validation_of_chunk(epoch, validation_epochs, max_epoch,
                                                                           compat_reference)
                fid = _utility_fid(validator) if last else {}
                recorder.validation({
                    "chunk": i, "epoch": epoch, "optimizer_steps": p.steps, "images_seen": p.images,
                    "criterion": criterion.name, "scale": criterion.scale, "scores": scores,
                    "min": st["min"], "max": st["max"], "mean": st["mean"],
                    "threshold": criterion.threshold, "revived": revived,
                    "loss": stats["loss"], "wall_s": round(time.perf_counter() - t0, 3), **_skips(p),
                    **_details(validator, criterion.name), **retention, **fid, **_peak(trainer),
                })
                recorder.log(f"chunk {i} epoch {epoch}: {criterion.name} mean {st['mean']:.4f} "
                             f"(threshold {criterion.threshold}) -> {'revived' if revived else 'not revived'}")
                _log_retention(recorder, validator, f"chunk {i} epoch {epoch}", fid)
                step = getattr(trainer, "global_updates", p.steps)
                _track(recorder).validation(step, criterion.name, st["mean"], criterion.threshold, i)
                _track(recorder).retention(step, retention.get("retention_mean"), retention.get("utility_mean"))
                _track(recorder).utility_fid(step, fid)
                _track(recorder).images(step, getattr(validator, "last_images", []))
                if revived and p.first_revival is None:
                    p.first_revival = epoch
                if revived and early_stop:
                    outcome = ChunkOutcome(i, rows, True, epoch, epoch + 1, p.steps, p.images, st["mean"])
                    break
                p.last_mean = st["mean"]
            # Phase 4: give up past the epoch budget (the reference checks it on validation epochs only).
            if epoch > max_epoch and (validated or not compat_reference):
                outcome = ChunkOutcome(i, rows, p.first_revival is not None, p.first_revival, epoch + 1, p.steps,
                                       p.images, p.last_mean)
                break
            ckpt.boundary(epoch + 1)
        # Phase 5: keep the chunk's model and the results so far.
        outcome.skipped_updates = sum(p.skips)
        p.outcomes.append(outcome.as_dict())
        if save_chunk is not None:
            save_chunk(i)
        summarise()
    return [ChunkOutcome(**{**o, "rows": tuple(o["rows"])}) for o in p.outcomes]


def run_sequential(
    *,
    trainer,
    dataset,
    chunk_rows: Dict[int, Tuple[int, int]],
    chunks: Sequence[int],
    epochs_per_chunk: Dict[int, int],
    criteria: Sequence[Criterion],
    validator: Validator,
    recorder: RunRecorder,
    checkpoint_chunks: Sequence[int] = (),
    save_chunk: Optional[Callable[[int], None]] = None,
    stop_at_revival: bool = False,
    summary_extra: Optional[dict] = None,
    checkpointer=None,
    resume_path: Optional[str] = None,
) -> dict:
    """The sequential protocol (docs/protocols.md): chunk after chunk, no reset; after each, score every criterion.

    A criterion's Revival Point is the first chunk after which it is met,
    reported as chunk index and as images seen (the chunk's cumulative
    boundary c(i)).
    """
    saved = read_checkpoint_state(resume_path)
    p = _Progress(chunk_pos=0, steps=0, images=0, per_chunk=[], revival={c.name: None for c in criteria},
                  before_training=None, skips=[])
    if saved:
        p = _Progress(**{k: saved.get(k) for k in ("chunk_pos", "steps", "images", "per_chunk", "revival",
                                                   "before_training")}, skips=saved.get("skips") or [])
    ckpt = _Resumable(trainer, checkpointer, recorder, p)

    def summary():
        return {**(summary_extra or {}), "protocol": "sequential",
                "criteria": {c.name: c.threshold for c in criteria}, "revival_point": p.revival,
                "before_training": p.before_training, "chunks": p.per_chunk}

    def score(tag, entry, chunk, epoch, loss, t0):
        """Generate once, score under every criterion, record; returns {criterion: met}."""
        scores = validator(tag)
        wall = round(time.perf_counter() - t0, 3)
        step = getattr(trainer, "global_updates", p.steps)
        _track(recorder).images(step, getattr(validator, "last_images", []))
        retention = _retention(validator)
        _track(recorder).retention(step, retention.get("retention_mean"), retention.get("utility_mean"))
        fid = _utility_fid(validator)  # each sequential validation ends a chunk (or is the unlearned model's own)
        _track(recorder).utility_fid(step, fid)
        where = "before training" if chunk is None else f"after chunk {chunk} ({entry['images_seen']} images)"
        met_by = {}
        for c in criteria:
            st = score_stats(scores[c.name])
            met = met_by[c.name] = c.met(st["mean"])
            _track(recorder).validation(step, c.name, st["mean"], c.threshold, -1 if chunk is None else chunk)
            recorder.validation({
                "chunk": chunk, "epoch": epoch, "optimizer_steps": p.steps, "images_seen": entry["images_seen"],
                "training_images": p.images, "criterion": c.name, "scale": c.scale, "scores": scores[c.name],
                "min": st["min"], "max": st["max"], "mean": st["mean"], "threshold": c.threshold,
                "revived": met, "loss": loss, "wall_s": wall, **_skips(p), **_details(validator, c.name),
                **retention, **fid, **_peak(trainer),
            })
            recorder.log(f"{where}: {c.name} mean {st['mean']:.4f} "
                         f"(threshold {c.threshold}) -> {'met' if met else 'not met'}")
            entry[c.name] = {"mean": st["mean"], "revived": met}
        _log_retention(recorder, validator, where, fid)
        for kind in CAPTION_SETS:
            if f"{kind}_mean" in retention:
                entry[kind] = retention[f"{kind}_mean"]
        entry.update({k: fid[k] for k in SUMMARY_FID_FIELDS if k in fid})
        return met_by

    # Phase 1: start from the unlearned UNet with a fresh optimizer, LR schedule and EMA, once.
    trainer.reset_chunk(chunks[0])
    start_epoch, start_update, loss_before = 0, 0, 0.0
    if saved:
        ckpt.resume(resume_path)
        start_epoch, start_update, loss_before = saved["epoch"], saved["update"], saved["loss_sum"]
    if not saved:  # a resumed run recorded it before its first checkpoint
        # The unlearned model's own score (0 images): where every sequential plot starts. Not a Revival Point:
        # a criterion already met here says the concept was not erased by that criterion's measure.
        p.before_training = {"images_seen": 0}
        met_by = score("before-training", p.before_training, None, None, None, time.perf_counter())
        for name in [n for n, met in met_by.items() if met]:
            recorder.log(f"warning: {name} is already met before any fine-tuning: the unlearned model was not "
                         "unlearned by this criterion's measure; its Revival Point counts chunks only")
        recorder.summary(summary())
    for pos in range(p.chunk_pos, len(chunks)):
        i, rows = chunks[pos], chunk_rows[chunks[pos]]
        p.chunk_pos = pos
        last_loss = None
        _reset_peak(trainer)
        # Phase 2: num_train_epochs passes over chunk i, no reset.
        for epoch in range(start_epoch, epochs_per_chunk[i]):
            stats = trainer.train_epoch(dataset, rows, i, epoch, start_update=start_update, loss_before=loss_before,
                                        on_update=ckpt.on_update(i, epoch, loss_before))
            start_update, loss_before = 0, 0.0
            p.steps += stats["updates"]
            p.images += stats["images"]
            _count_skips(recorder, p, stats, i)
            last_loss = stats["loss"]
            _track_epoch(recorder, trainer, stats)
            recorder.log(f"chunk {i} epoch {epoch}: {_updates_text(stats)}, loss {stats['loss']:.5f}")
            if epoch + 1 < epochs_per_chunk[i]:
                ckpt.boundary(epoch + 1)
        start_epoch = 0
        # Phase 3: generate once, score under every criterion.
        entry = {"chunk": i, "images_seen": rows[1], "training_images": p.images, "optimizer_steps": p.steps,
                 "skipped_updates": sum(p.skips)}
        met_by = score(f"chunk{i}", entry, i, epochs_per_chunk[i] - 1, last_loss, time.perf_counter())
        for name, met in met_by.items():
            if met and p.revival[name] is None:
                p.revival[name] = {"chunk": i, "images_seen": rows[1]}
                _track(recorder).revival(getattr(trainer, "global_updates", p.steps), name, i, rows[1])
        p.per_chunk.append(entry)
        p.skips = []
        # Phase 4: keep the requested curriculum checkpoints.
        if save_chunk is not None and i in checkpoint_chunks:
            save_chunk(i)
        recorder.summary(summary())
        p.chunk_pos = pos + 1
        if stop_at_revival and all(v is not None for v in p.revival.values()):
            recorder.log(f"every criterion met by chunk {i}; stopping (--stop_at_revival)")
            break
        if pos + 1 < len(chunks):
            ckpt.boundary(0)
    return summary()
