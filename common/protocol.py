"""The revival protocols (SPEC 4 and 5), written as their algorithm boxes."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .results import RunRecorder, score_stats
from .validation import generate_images, image_seed, shard


@dataclass
class Criterion:
    """A revival test on per-image scores: CLIP (mean cosine > threshold) or classifier (accuracy >= threshold)."""

    name: str  # "clip" or "classifier"
    threshold: float
    score_images: Callable[[list, list], List[float]]  # (images, prompts) -> per-image scores
    scale: str = ""  # how the score is expressed, for the results

    def met(self, mean: float) -> bool:
        """SPEC 4: CLIP needs mean > threshold, the classifier accuracy >= threshold."""
        return mean > self.threshold if self.name == "clip" else mean >= self.threshold


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


class Validator:
    """Generate one image per validation prompt (sharded across processes) and score it under each criterion."""

    def __init__(self, accelerator, pipe, cfg: ValidationConfig, criteria: Sequence[Criterion]):
        self.accelerator = accelerator
        self.pipe = pipe
        self.cfg = cfg
        self.criteria = list(criteria)

    def __call__(self, tag: str) -> Dict[str, List[float]]:
        """Scores per criterion name, in prompt order, identical on every process."""
        from accelerate.utils import gather_object

        acc, cfg = self.accelerator, self.cfg
        mine = shard(range(len(cfg.prompts)), acc.num_processes, acc.process_index)
        prompts = [cfg.prompts[k] for k in mine]
        images = generate_images(
            self.pipe, prompts, [image_seed(cfg.seed, k) for k in mine],
            batch_size=cfg.batch_size or max(1, len(prompts)),
            num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
            resolution=cfg.resolution, autocast=acc.autocast, progress=acc.is_local_main_process,
            desc=f"validation {tag}",
        ) if prompts else []
        if cfg.image_dir:
            import os

            folder = os.path.join(cfg.image_dir, tag)
            os.makedirs(folder, exist_ok=True)
            for k, im in zip(mine, images):
                im.save(os.path.join(folder, f"{k:04d}.png"))
        local = {c.name: (c.score_images(images, prompts) if images else []) for c in self.criteria}
        rows = [(k, {name: local[name][j] for name in local}) for j, k in enumerate(mine)]
        gathered = sorted(gather_object(rows) if acc.num_processes > 1 else rows, key=lambda r: r[0])
        return {c.name: [r[1][c.name] for r in gathered] for c in self.criteria}


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

    def as_dict(self) -> dict:
        return dict(self.__dict__, rows=list(self.rows))


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
) -> List[ChunkOutcome]:
    """SPEC 4: per chunk, train from the unlearned weights until the criterion is met or the epoch cap passes.

    ``compat_reference`` reproduces the reference's semantics: after epoch 0
    every "epoch" is one update on the chunk's first batch, and optimizer, LR
    schedule and EMA carry over between chunks.
    """
    outcomes: List[ChunkOutcome] = []
    for i in chunks:
        rows = chunk_rows[i]
        # Phase 1: back to the unlearned model; fresh optimizer, LR schedule, EMA.
        trainer.reset_chunk(i, carry_state=compat_reference)
        steps = images = 0
        outcome = None
        for epoch in itertools.count():
            # Phase 2: one pass over the chunk (the reference: one batch after epoch 0).
            single = compat_reference and epoch > 0
            stats = trainer.train_epoch(dataset, rows, i, epoch, max_updates=1 if single else None)
            steps += stats["updates"]
            images += stats["images"]
            recorder.log(f"chunk {i} epoch {epoch}: {stats['updates']} updates, loss {stats['loss']:.5f}")
            # Phase 3: validate every validation_epochs epochs; stop once revived.
            if epoch % validation_epochs == 0:
                t0 = time.perf_counter()
                scores = validator(f"chunk{i}-epoch{epoch}")[criterion.name]
                st = score_stats(scores)
                revived = criterion.met(st["mean"])
                recorder.validation({
                    "chunk": i, "epoch": epoch, "optimizer_steps": steps, "images_seen": images,
                    "criterion": criterion.name, "scale": criterion.scale, "scores": scores,
                    "min": st["min"], "max": st["max"], "mean": st["mean"],
                    "threshold": criterion.threshold, "revived": revived,
                    "loss": stats["loss"], "wall_s": round(time.perf_counter() - t0, 3),
                })
                recorder.log(f"chunk {i} epoch {epoch}: {criterion.name} mean {st['mean']:.4f} "
                             f"(threshold {criterion.threshold}) -> {'revived' if revived else 'not revived'}")
                if revived:
                    outcome = ChunkOutcome(i, rows, True, epoch, epoch + 1, steps, images, st["mean"])
                    break
                last_mean = st["mean"]
            # Phase 4: give up past the epoch budget.
            if epoch > max_epoch:
                outcome = ChunkOutcome(i, rows, False, None, epoch + 1, steps, images, last_mean)
                break
        outcomes.append(outcome)
        # Phase 5: keep the chunk's model and the results so far.
        if save_chunk is not None:
            save_chunk(i)
        recorder.summary({**(summary_extra or {}), "protocol": "individual", "criterion": criterion.name,
                          "threshold": criterion.threshold, "chunks": [o.as_dict() for o in outcomes]})
    return outcomes


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
) -> dict:
    """SPEC 5: train chunk after chunk with no reset; after each, score under every criterion.

    A criterion's Revival Point is the first chunk after which it is met,
    reported as chunk index and as images seen (the chunk's cumulative
    boundary c(i)).
    """
    revival = {c.name: None for c in criteria}
    per_chunk = []
    steps = images = 0
    # Phase 1: start from the unlearned UNet with a fresh optimizer, LR schedule and EMA, once.
    trainer.reset_chunk(chunks[0])
    for i in chunks:
        rows = chunk_rows[i]
        trainer.begin_chunk(i)
        # Phase 2: num_train_epochs passes over chunk i, no reset.
        for epoch in range(epochs_per_chunk[i]):
            stats = trainer.train_epoch(dataset, rows, i, epoch)
            steps += stats["updates"]
            images += stats["images"]
            recorder.log(f"chunk {i} epoch {epoch}: {stats['updates']} updates, loss {stats['loss']:.5f}")
        # Phase 3: generate once, score under every criterion.
        t0 = time.perf_counter()
        scores = validator(f"chunk{i}")
        wall = round(time.perf_counter() - t0, 3)
        entry = {"chunk": i, "images_seen": rows[1], "training_images": images, "optimizer_steps": steps}
        for c in criteria:
            st = score_stats(scores[c.name])
            met = c.met(st["mean"])
            if met and revival[c.name] is None:
                revival[c.name] = {"chunk": i, "images_seen": rows[1]}
            recorder.validation({
                "chunk": i, "epoch": epochs_per_chunk[i] - 1, "optimizer_steps": steps, "images_seen": rows[1],
                "training_images": images, "criterion": c.name, "scale": c.scale, "scores": scores[c.name],
                "min": st["min"], "max": st["max"], "mean": st["mean"], "threshold": c.threshold,
                "revived": met, "wall_s": wall,
            })
            recorder.log(f"after chunk {i} ({rows[1]} images): {c.name} mean {st['mean']:.4f} "
                         f"(threshold {c.threshold}) -> {'met' if met else 'not met'}")
            entry[c.name] = {"mean": st["mean"], "revived": met}
        per_chunk.append(entry)
        # Phase 4: keep the requested curriculum checkpoints.
        if save_chunk is not None and i in checkpoint_chunks:
            save_chunk(i)
        summary = {**(summary_extra or {}), "protocol": "sequential",
                   "criteria": {c.name: c.threshold for c in criteria}, "revival_point": revival,
                   "chunks": per_chunk}
        recorder.summary(summary)
        if stop_at_revival and all(v is not None for v in revival.values()):
            recorder.log(f"every criterion met by chunk {i}; stopping (--stop_at_revival)")
            break
    return summary
