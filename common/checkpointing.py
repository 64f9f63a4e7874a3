"""Resumable checkpoints and preemption (docs/protocols.md: robustness).

A checkpoint is ``OUTPUT_DIR/checkpoint-{update}/``: accelerate's saved state
(UNet, optimizer, RNG states), our extras (LR schedule, EMA) and the protocol's
position (``state.json``: chunk, epoch, updates done in the epoch, results so
far). It is written under a temporary name, completed by a ``COMPLETE`` marker
and then renamed, so a resume never sees a partial one. Random draws are a pure
function of (seed, chunk, epoch, update), so the position is all a resume
needs to repeat the uninterrupted run.

SIGTERM and SIGUSR1 (SLURM preemption) ask for a checkpoint at the next update
boundary; the run then exits with ``PREEMPTED_EXIT_CODE`` so a job script can
requeue itself.

A run that diverges (non-finite loss) never checkpoints the diverged state: a
save first checks the loss and the weights. It leaves a ``DIVERGED`` marker
naming the last good checkpoint, and a resume refuses to start while the
marker is there: with the same settings it would diverge again at the same
update, since every random draw is a function of the position.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
from typing import Optional

import torch

from .errors import InputError
from .faults import maybe_disk_full, maybe_fail
from .results import WriteFailed, atomic_write_json, writing, written_together

MARKER = "COMPLETE"
STATE_FILE = "state.json"
RUN_CONFIG_FILE = "run_config.json"  # the run's resolved configuration (config.json's content) at save time
EXTRAS_FILE = "trainer_extras.pt"
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later"
PREEMPTED_MARKER = "PREEMPTED"  # written beside the checkpoints on a preemption exit, removed on the next start
DIVERGED_MARKER = "DIVERGED"  # written on a non-finite loss; a resume refuses to start while it is there
_NAME = re.compile(r"^checkpoint-(\d+)$")


def complete_checkpoints(output_dir: str) -> list:
    """(update, path) of every complete checkpoint in ``output_dir``, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = _NAME.match(name)
        path = os.path.join(output_dir, name)
        if m and os.path.isfile(os.path.join(path, MARKER)):
            found.append((int(m.group(1)), path))
    return sorted(found)


def check_not_diverged(output_dir: str) -> None:
    """Raise InputError when the run in ``output_dir`` stopped on a non-finite loss."""
    marker = os.path.join(output_dir, DIVERGED_MARKER)
    if not os.path.isfile(marker):
        return
    try:
        with open(marker) as f:
            info = json.load(f)
    except (OSError, ValueError):
        info = {}
    raise InputError(
        f"--resume_from_checkpoint: the run in {output_dir} diverged ({info.get('error', 'non-finite loss')}); "
        "resumed with the same settings it would diverge again at the same update. Start a new --output_dir "
        f"with other settings (e.g. a lower --learning_rate), or delete {marker} to resume from "
        f"{info.get('last_good_checkpoint') or 'the start'} anyway")


def resolve_resume(spec: Optional[str], output_dir: str) -> Optional[str]:
    """The checkpoint to resume from: None, the newest complete one ('latest'), or a given complete one."""
    if not spec:
        return None
    check_not_diverged(output_dir)
    if spec == "latest":
        found = complete_checkpoints(output_dir)
        return found[-1][1] if found else None  # nothing yet: start from scratch
    if not os.path.isdir(spec):
        raise InputError(f"--resume_from_checkpoint {spec}: no such directory")
    if not os.path.isfile(os.path.join(spec, MARKER)):
        raise InputError(f"--resume_from_checkpoint {spec}: incomplete checkpoint (no {MARKER} marker)")
    return spec


SCALER_FILE = "scaler.pt"  # accelerate's GradScaler state (accelerate.utils.SCALER_NAME), saved under fp16 only


def _written_with(run_config: dict) -> dict:
    """The settings a checkpoint's run_config.json says it was written with (those check_resume_settings compares)."""
    args, resolved = run_config.get("args", {}), run_config.get("resolved", {})
    processes = resolved.get("num_processes", run_config.get("num_processes", 1))
    return {"mixed_precision": resolved.get("mixed_precision", run_config.get("mixed_precision")),
            "num_processes": processes, "train_batch_size": args.get("train_batch_size"),
            "gradient_accumulation_steps": args.get("gradient_accumulation_steps"), "params": args.get("params")}


def check_resume_settings(path: Optional[str], current: dict, scaler_expected: bool) -> list:
    """InputError when this run cannot continue the checkpoint at ``path``; else notes for the log (may be empty).

    ``current``: this run's mixed_precision (resolved), num_processes, train_batch_size,
    gradient_accumulation_steps and params. Refused: another precision (the records would mix two numerics, and
    fp16 needs the checkpoint's loss scale, scaler.pt), another batch per micro-step (train_batch_size x processes)
    or accumulation (the updates would not be the same updates), other trained parameters. Allowed: another
    process count at the same batch per micro-step, since every random draw is a function of the position and
    each process takes its rows of the global batch (accelerate's per-process RNG files are then not all used).
    """
    if not path:
        return []
    config_file = os.path.join(path, RUN_CONFIG_FILE)
    flag = f"--resume_from_checkpoint {path}"
    notes = []
    if os.path.isfile(config_file):
        try:
            with open(config_file) as f:
                old = _written_with(json.load(f))
        except (OSError, ValueError) as err:
            raise InputError(f"{flag}: unreadable {RUN_CONFIG_FILE} ({err})") from None
        new = current
        if old["mixed_precision"] is not None and old["mixed_precision"] != new["mixed_precision"]:
            raise InputError(f"{flag}: written with mixed precision '{old['mixed_precision']}', this run resolves "
                             f"--mixed_precision to '{new['mixed_precision']}'; resume with the same precision, or "
                             "start a new --output_dir")
        if None not in (old["train_batch_size"], old["num_processes"]):
            rows_old, rows_new = (old["train_batch_size"] * old["num_processes"],
                                  new["train_batch_size"] * new["num_processes"])
            if rows_old != rows_new:
                raise InputError(
                    f"{flag}: written with {old['num_processes']} process(es) x --train_batch_size "
                    f"{old['train_batch_size']} = {rows_old} rows per micro-batch, this run has "
                    f"{new['num_processes']} x {new['train_batch_size']} = {rows_new}; another process count "
                    "resumes only at the same product")
        for key in ("gradient_accumulation_steps", "params"):
            if old[key] is not None and old[key] != new[key]:
                raise InputError(f"{flag}: written with --{key} {old[key]}, this run has --{key} {new[key]}")
        if old["num_processes"] != new["num_processes"]:
            notes.append(f"resuming {path}, written by {old['num_processes']} process(es), with "
                         f"{new['num_processes']} (the same {new['train_batch_size'] * new['num_processes']} rows per "
                         "micro-batch)")
    if scaler_expected and not os.path.isfile(os.path.join(path, SCALER_FILE)):
        raise InputError(f"{flag}: no {SCALER_FILE} (the fp16 gradient scaler's state), which this run's "
                         "--mixed_precision fp16 needs; the checkpoint was written with another precision")
    return notes


class PreemptionFlag:
    """Set by SIGTERM/SIGUSR1; the protocol checks it at update boundaries."""

    def __init__(self):
        self.signal = None

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def requested(self, accelerator) -> bool:
        """True on every process when any process was signalled (one all-reduce with several processes)."""
        local = self.signal is not None
        if accelerator.num_processes == 1:
            return local
        flag = torch.tensor([1.0 if local else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


class Checkpointer:
    """Saves and restores the trainer plus a protocol position; keeps at most ``total_limit`` checkpoints."""

    def __init__(self, accelerator, trainer, output_dir: str, every_updates: Optional[int],
                 total_limit: Optional[int], log=print, run_config: Optional[dict] = None):
        self.run_config = run_config  # written into every checkpoint: how it was made
        self.accelerator = accelerator
        self.trainer = trainer
        self.output_dir = output_dir
        self.every_updates = every_updates
        self.total_limit = total_limit
        self.log = log
        self.preemption = PreemptionFlag()
        self.preemption.install()
        for marker in (PREEMPTED_MARKER, DIVERGED_MARKER):  # a resume got past the divergence check
            if accelerator.is_main_process and os.path.isfile(os.path.join(output_dir, marker)):
                os.unlink(os.path.join(output_dir, marker))

    def due(self, global_update: int) -> bool:
        return bool(self.every_updates) and global_update % self.every_updates == 0

    def save(self, state: dict) -> str:
        """Write checkpoint-{update} atomically on every process's behalf; returns its path."""
        acc, tr = self.accelerator, self.trainer
        self._check_weights_finite()
        name = f"checkpoint-{tr.global_updates}"
        final = os.path.join(self.output_dir, name)
        tmp = os.path.join(self.output_dir, f".{name}.tmp")
        try:
            # Every process's files (accelerate writes one RNG file per process) before the main one completes
            # the checkpoint; a failure anywhere stops every process with the same line (written_together).
            with written_together(acc):
                with writing("checkpoint", final, inject=False):
                    self._write(state, tmp)
            with written_together(acc):
                if acc.is_main_process:
                    with writing("checkpoint", final, inject=False):
                        self._complete(tmp, final)
        except WriteFailed:
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)  # never a partial checkpoint; older ones untouched
            raise
        return final

    def _write(self, state: dict, tmp: str) -> None:
        """Write the checkpoint's files under ``tmp`` (every process: accelerate's state; main: ours)."""
        acc, tr = self.accelerator, self.trainer
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        acc.wait_for_everyone()
        acc.save_state(tmp)
        if acc.is_main_process:
            maybe_disk_full("checkpoint")  # tests: the disk fills up half-way through a checkpoint
            extras = {"lr_scheduler": tr.lr_scheduler.state_dict(), "global_updates": tr.global_updates,
                      "ema": None if tr.ema is None else tr.ema.state_dict(),
                      "chunk_updates": tr.chunk_updates, "pending_micro_batches": tr.pending_micro_batches,
                      "epoch_start": list(tr.epoch_start), "epoch_skipped": getattr(tr, "epoch_skipped", 0)}
            torch.save(extras, os.path.join(tmp, EXTRAS_FILE))
            maybe_fail("checkpoint")  # tests: a crash in the middle of a save
            atomic_write_json(os.path.join(tmp, STATE_FILE), state)
            if self.run_config is not None:
                atomic_write_json(os.path.join(tmp, RUN_CONFIG_FILE), self.run_config)

    def _complete(self, tmp: str, final: str) -> None:
        """Main process: complete the checkpoint with its marker, rename it to ``final``, prune."""
        with open(os.path.join(tmp, MARKER), "w") as f:
            f.write("ok\n")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        self._prune()
        self.log(f"saved {final}")

    def _check_weights_finite(self) -> None:
        """Raise NonFiniteLoss rather than save non-finite weights (one host sync per checkpoint)."""
        from .training import NonFiniteLoss

        finite = torch.stack([torch.isfinite(p).all() for p in self.trainer.trainable]).all()
        if not bool(finite):
            raise NonFiniteLoss(f"non-finite UNet weights at optimizer update {self.trainer.global_updates}; "
                                "the last good checkpoint is kept (lower --learning_rate or check the data)")

    @contextlib.contextmanager
    def divergence_recorded(self):
        """On a NonFiniteLoss inside: write the DIVERGED marker (main process) and re-raise."""
        from .training import NonFiniteLoss

        try:
            yield
        except NonFiniteLoss as err:
            marker = os.path.join(self.output_dir, DIVERGED_MARKER)
            try:
                with written_together(self.accelerator):
                    if self.accelerator.is_main_process:
                        found = complete_checkpoints(self.output_dir)
                        with writing("divergence marker", marker):
                            atomic_write_json(marker, {"error": str(err),
                                                       "last_good_checkpoint": found[-1][1] if found else None})
            except WriteFailed as failed:
                raise WriteFailed(f"{failed}; the run had diverged: {err}") from None
            raise

    def _prune(self) -> None:
        if not self.total_limit:
            return
        found = complete_checkpoints(self.output_dir)
        for _, path in found[: max(0, len(found) - self.total_limit)]:
            shutil.rmtree(path, ignore_errors=True)

    def load(self, path: str) -> dict:
        """Restore trainer state (after the protocol rebuilt its objects) and return the protocol position."""
        tr = self.trainer
        self.accelerator.load_state(path)
        extras = torch.load(os.path.join(path, EXTRAS_FILE), map_location="cpu", weights_only=True)
        tr.lr_scheduler.load_state_dict(extras["lr_scheduler"])
        if extras["ema"] is not None and tr.ema is not None:
            tr.ema.load_state_dict(extras["ema"])
            tr.ema.to(tr.ema_device)
        tr.global_updates = extras["global_updates"]
        tr.chunk_updates = extras.get("chunk_updates", 0)
        tr.pending_micro_batches = extras.get("pending_micro_batches", 0)
        tr.epoch_start = tuple(extras.get("epoch_start", (0, 0)))
        tr.epoch_skipped = extras.get("epoch_skipped", 0)
        with open(os.path.join(path, STATE_FILE)) as f:
            return json.load(f)

    def exit_if_preempted(self, state_fn) -> None:
        """On a pending SIGTERM/SIGUSR1: checkpoint now and exit with PREEMPTED_EXIT_CODE."""
        if self.preemption.requested(self.accelerator):
            path = self.save(state_fn())
            marker = os.path.join(self.output_dir, PREEMPTED_MARKER)
            with written_together(self.accelerator):
                if self.accelerator.is_main_process:
                    with writing("preemption marker", marker):
                        # For job scripts whose launcher's own exit status hides ours.
                        atomic_write_json(marker, {"checkpoint": path})
            self.log(f"preempted ({self.preemption.signal or 'signal on another process'}): "
                     f"resume with --resume_from_checkpoint latest (or {path})")
            raise SystemExit(PREEMPTED_EXIT_CODE)
