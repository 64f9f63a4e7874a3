"""Curriculum parsing and chunk/batch sampling (docs/protocols.md: inputs).

A curriculum "c1,c2,...,cn" lists cumulative row boundaries of the training
data: chunk i is rows [c(i-1), c(i)) with c(-1) = 0. Rows are taken in
dataset order (metadata.jsonl line order); nothing reorders them across chunks.
"""

from __future__ import annotations

import math
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np


class CurriculumError(ValueError):
    """A curriculum string or chunk selection that breaks the curriculum's rules (docs/protocols.md: inputs)."""


def parse_curriculum(text: str) -> List[int]:
    """Parse "50,100,150" into strictly increasing positive cumulative boundaries."""
    parts = [p.strip() for p in str(text).split(",")]
    if not text or any(p == "" for p in parts):
        raise CurriculumError(f"--curriculum {text!r}: expected comma-separated integers such as '50,100,150'")
    bounds = []
    for p in parts:
        try:
            value = int(p)
        except ValueError:
            raise CurriculumError(f"--curriculum {text!r}: {p!r} is not an integer") from None
        if value <= 0:
            raise CurriculumError(f"--curriculum {text!r}: boundaries must be positive, got {value}")
        if bounds and value <= bounds[-1]:
            raise CurriculumError(
                f"--curriculum {text!r}: boundaries must be strictly increasing ({bounds[-1]} then {value})"
            )
        bounds.append(value)
    return bounds


def check_against_dataset(bounds: Sequence[int], dataset_size: int) -> None:
    """Raise if the last boundary exceeds the number of training rows."""
    if bounds[-1] > dataset_size:
        raise CurriculumError(
            f"--curriculum ends at {bounds[-1]} but the training data has only {dataset_size} rows"
        )


def chunk_ranges(bounds: Sequence[int]) -> List[Tuple[int, int]]:
    """Row ranges [start, stop) of every chunk."""
    starts = [0] + list(bounds[:-1])
    return list(zip(starts, bounds))


def select_chunks(num_chunks: int, start: int | None, end: int | None) -> List[int]:
    """Chunk indices [start, end) chosen by --start_CL/--end_CL (defaults: all)."""
    start = 0 if start is None else start
    end = num_chunks if end is None else end
    if not 0 <= start < num_chunks:
        raise CurriculumError(f"--start_CL {start} is outside the curriculum's chunks 0..{num_chunks - 1}")
    if not start < end <= num_chunks:
        raise CurriculumError(f"--end_CL {end} must be in {start + 1}..{num_chunks} (chunks [start, end))")
    return list(range(start, end))


def epochs_per_chunk(chunk_epochs: Optional[str], num_train_epochs: int, num_chunks: int) -> List[int]:
    """Epochs of every curriculum chunk: --chunk_epochs "8,8,4,..." (one positive integer per chunk), else
    --num_train_epochs for each (CurriculumError for a malformed list)."""
    if num_train_epochs < 1:
        raise CurriculumError(f"--num_train_epochs {num_train_epochs}: must be at least 1")
    if not chunk_epochs:
        return [num_train_epochs] * num_chunks
    try:
        values = [int(v) for v in chunk_epochs.split(",")]
    except ValueError:
        raise CurriculumError(f"--chunk_epochs {chunk_epochs!r}: expected comma-separated integers") from None
    if len(values) != num_chunks or min(values) < 1:
        raise CurriculumError(f"--chunk_epochs {chunk_epochs!r}: need {num_chunks} positive integers, one per chunk")
    return values


def parse_chunk_list(text: str | None, num_chunks: int, flag: str) -> List[int]:
    """Parse a comma-separated list of chunk indices such as --curriculum_checkpoints "4,7"."""
    if text is None or str(text).strip() == "":
        return []
    out = []
    for p in str(text).split(","):
        try:
            i = int(p.strip())
        except ValueError:
            raise CurriculumError(f"{flag} {text!r}: {p.strip()!r} is not a chunk index") from None
        if not 0 <= i < num_chunks:
            raise CurriculumError(f"{flag} {text!r}: chunk {i} is outside 0..{num_chunks - 1}")
        out.append(i)
    return sorted(set(out))


def updates_per_epoch(chunk_size: int, batch_size: int, accumulation: int, processes: int) -> int:
    """Optimizer updates in one pass over a chunk (docs/protocols.md: individual protocol)."""
    return math.ceil(chunk_size / (batch_size * accumulation * processes))


class Batch(NamedTuple):
    """This process's rows of one global batch, where they start in it, and the global batch size."""

    rows: np.ndarray
    offset: int
    global_size: int


def epoch_batches(
    row_range: Tuple[int, int],
    batch_size: int,
    num_processes: int,
    process_index: int,
    seed: int,
    chunk: int,
    epoch: int,
    shuffle: bool = True,
) -> Iterator[Batch]:
    """Yield this process's share of each global batch of one pass over a chunk.

    Rows are shuffled within the chunk only, seeded by (seed, chunk, epoch), so
    every process sees the same permutation and a resumed run repeats it. A
    global batch of batch_size * num_processes rows is split across processes;
    the last one may be short (then split as evenly as possible, possibly empty
    on some ranks). A batch never spans two chunks.
    """
    start, stop = row_range
    rows = np.arange(start, stop)
    if shuffle:
        rng = np.random.default_rng(np.random.SeedSequence([seed, chunk, epoch]))
        rows = rng.permutation(rows)
    global_batch = batch_size * num_processes
    for b in range(0, len(rows), global_batch):
        group = rows[b : b + global_batch]
        if len(group) == global_batch:
            offset = process_index * batch_size
            mine = group[offset : offset + batch_size]
        else:
            parts = np.array_split(group, num_processes)
            offset = sum(len(p) for p in parts[:process_index])
            mine = parts[process_index]
        yield Batch(mine, offset, len(group))


def reference_schedule(num_batches: int, accumulation: int, pending: int, updates_done: int,
                       max_updates: int) -> Tuple[List[Tuple[List[int], bool]], int]:
    """One epoch of the published scripts' loop over a chunk's in-order batches (``--compat reference``).

    Their loop counts optimizer updates per chunk, never per epoch, and breaks
    as soon as the chunk's count reaches ``max_updates`` = ceil(rows / (batch x
    accumulation)), so after epoch 0 an epoch stops after its first
    micro-batch. accelerate syncs gradients every ``accumulation`` micro-batches
    (its counter carries across epochs and chunks) and at the end of the data
    loader, where the counter restarts. Returns the epoch's micro-batch indices
    grouped by update, each with whether it ends in an optimizer update (a
    last group may not: its gradients wait for the next epoch), and the
    accumulation counter after the epoch.
    """
    groups: List[Tuple[List[int], bool]] = []
    current: List[int] = []
    for index in range(num_batches):
        current.append(index)
        pending += 1
        if pending == accumulation or index == num_batches - 1:
            groups.append((current, True))
            current, pending = [], 0
            updates_done += 1
        if updates_done >= max_updates:
            break
    if current:
        groups.append((current, False))
    return groups, pending
