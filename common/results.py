"""Run outputs (docs/protocols.md: outputs): resolved config, one JSON line per validation, summary, log.

Only the main process writes. Whole files are written under a temporary name
and renamed, so a crash never leaves a half-written JSON a later reader trusts;
JSON lines are appended and flushed to disk one line at a time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import re
import sys
import tempfile
from importlib import metadata
from typing import Iterable, Optional

CONFIG_FILE = "config.json"
VALIDATIONS_FILE = "validations.jsonl"
SUMMARY_FILE = "summary.json"

LOGGER_NAME = "revival"  # the run's log (stdout and log.txt on the main process)

LIBRARIES = ("torch", "torchvision", "diffusers", "transformers", "accelerate", "datasets",
             "open_clip_torch", "numpy", "pillow", "safetensors", "timm")


def library_versions(names: Iterable[str] = LIBRARIES) -> dict:
    """Installed versions of the libraries that decide the numbers (None when absent)."""
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def slug(text: str, sep: str = "_", max_len: int = 40) -> str:
    """A file-system-safe name: lowercase letters and digits, other runs of characters replaced by ``sep``."""
    return re.sub(r"[^a-z0-9]+", sep, text.lower()).strip(sep)[:max_len] or "x"


class WriteFailed(RuntimeError):
    """A file could not be written (a full disk, or any OSError); says what, where and how much space is free."""


def _free_space(path: str) -> str:
    import shutil

    probe = os.path.abspath(path)
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    try:
        free = shutil.disk_usage(probe or "/").free
    except OSError:
        return "free space unknown"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if free < 1024 or unit == "TB":
            return f"{free:.1f} {unit} free there" if unit != "B" else f"{free} B free there"
        free /= 1024


@contextlib.contextmanager
def writing(what: str, path: str, inject: bool = True):
    """Turn an OSError while writing ``what`` to ``path`` into WriteFailed (exit status 4 in the scripts).

    ``inject``: the test fault ``enospc_<what>`` strikes here (False where the
    writer calls ``faults.maybe_disk_full`` itself, in the middle of its work).
    """
    from .faults import maybe_disk_full

    try:
        if inject:
            maybe_disk_full(what)
        yield
    except OSError as err:
        raise WriteFailed(f"could not write the {what} to {path}: {err.strerror or err} "
                          f"({_free_space(path)})") from err


@contextlib.contextmanager
def written_together(accelerator):
    """Around a write that some processes do (usually the main one): a WriteFailed on any process is raised on
    every process, with the same message, after one collective exchange.

    Without it the other processes would go on to the next collective alone and die there on "Connection closed
    by peer" (gloo) or wait for the collective's timeout (NCCL). Also a barrier: every process leaves together.
    """
    failure = None
    try:
        yield
    except WriteFailed as err:
        failure = err
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        message = next((m for m in gather_object([None if failure is None else str(failure)]) if m), None)
        if failure is None and message is not None:
            raise WriteFailed(message)
    if failure is not None:
        raise failure


def atomic_write_text(path: str, text: str) -> None:
    """Write a file under a temporary name in the same directory, fsync, then rename over ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str, obj) -> None:
    """Atomic JSON dump (indented, keys in insertion order)."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def _drop_torn_tail(path: str) -> None:
    """Cut a JSON-lines file back to its last complete line: a kill mid-write leaves a torn last line, and a
    record appended after it would be glued onto it (read_jsonl stops there, losing every later record)."""
    if not os.path.isfile(path):
        return
    with open(path, "rb+") as f:
        end = f.seek(0, os.SEEK_END)
        if end == 0:
            return
        f.seek(end - 1)
        if f.read(1) == b"\n":
            return
        pos = end
        while pos > 0:  # scan back in 64 KiB blocks for the last newline
            start = max(0, pos - 65536)
            f.seek(start)
            block = f.read(pos - start)
            cut = block.rfind(b"\n")
            if cut >= 0:
                f.truncate(start + cut + 1)
                return
            pos = start
        f.truncate(0)


def append_jsonl(path: str, record: dict) -> None:
    """Append one JSON line (after cutting a torn last line left by a kill) and push it to disk."""
    _drop_torn_tail(path)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str) -> list:
    """All complete records of a JSON-lines file (a torn last line is ignored)."""
    if not os.path.isfile(path):
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return out


def score_stats(scores) -> dict:
    """min / max / mean of a list of per-image scores."""
    scores = [float(s) for s in scores]
    return {"min": min(scores), "max": max(scores), "mean": sum(scores) / len(scores), "n": len(scores)}


class RunRecorder:
    """Writes one run's machine-readable outputs into its output directory (main process only)."""

    def __init__(self, output_dir: str, is_main: bool, log_file: Optional[str] = None, logger_name: str = LOGGER_NAME,
                 accelerator=None):
        self.output_dir = output_dir
        self.is_main = is_main
        # With several processes every results write ends in written_together: a failed write stops them all.
        self.accelerator = accelerator
        self.logger = logging.getLogger(logger_name)
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False
        if is_main:
            os.makedirs(output_dir, exist_ok=True)
            if log_file:
                os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
            fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
            handlers = [logging.StreamHandler(sys.stdout),
                        logging.FileHandler(log_file or os.path.join(output_dir, "log.txt"))]
            for h in handlers:
                h.setFormatter(fmt)
                self.logger.addHandler(h)

    def log(self, message: str) -> None:
        if self.is_main:
            self.logger.info(message)

    def write_config(self, config: dict) -> None:
        path = os.path.join(self.output_dir, CONFIG_FILE)
        with written_together(self.accelerator):
            if self.is_main:
                with writing("results", path):
                    atomic_write_json(path, {**config, "library_versions": library_versions()})

    validations_written = 0  # counted on every process, so any of them can describe a checkpoint
    tracking = None  # common.tracking.Tracking, set by the session
    run_config = None  # config.json's content, also written into every checkpoint

    def validation(self, record: dict) -> None:
        self.validations_written += 1
        path = os.path.join(self.output_dir, VALIDATIONS_FILE)
        with written_together(self.accelerator):
            if self.is_main:
                with writing("results", path):
                    append_jsonl(path, record)

    def keep_validations(self, count: int) -> None:
        """On resume: keep the first ``count`` records (those the checkpoint knew), drop any later ones."""
        self.validations_written = count
        path = os.path.join(self.output_dir, VALIDATIONS_FILE)
        with written_together(self.accelerator):
            if self.is_main and os.path.isfile(path):
                records = read_jsonl(path)[:count]
                with writing("results", path):
                    atomic_write_text(path, "".join(json.dumps(r, default=str) + "\n" for r in records))

    def summary(self, summary: dict) -> None:
        path = os.path.join(self.output_dir, SUMMARY_FILE)
        with written_together(self.accelerator):
            if self.is_main:
                with writing("results", path):
                    atomic_write_json(path, summary)

    def close(self) -> None:
        for h in list(self.logger.handlers):
            h.close()
            self.logger.removeHandler(h)
