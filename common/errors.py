"""The one error type for bad user input, and how scripts report it (docs/protocols.md: robustness)."""

from __future__ import annotations

import argparse
import contextlib
import sys


class InputError(ValueError):
    """A bad argument or input file; the message names the flag or file."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit status 2 (no usage dump). Here, not in common.cli, so that the light
    programs (tools/grid.py, which every SLURM grid job calls twice; tools/prefetch.py, tools/paper.py) parse their
    flags without importing torch."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


@contextlib.contextmanager
def exit_on_input_error(prog: str):
    """Turn an InputError into one line on stderr and exit status 2, no traceback."""
    try:
        yield
    except InputError as err:
        print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def _first_line(err: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's message, shortened: what a one-line error can carry."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    text = f"{type(err).__name__}: {lines[0] if lines else 'no message'}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _failing_file(err: BaseException, root: str):
    """The file under ``root`` the failing loader was reading: a path-valued local of the deepest frame that
    holds one (safetensors' and torch's loaders take the file name as an argument), else None."""
    import os

    root = os.path.abspath(os.path.expanduser(str(root)))
    frames = []
    tb = err.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        for value in list(frame.f_locals.values()):
            if isinstance(value, os.PathLike):
                value = os.fspath(value)
            if isinstance(value, str) and len(value) < 4096 and os.path.isfile(value):
                found = os.path.abspath(value)
                if found == root or found.startswith(root + os.sep):
                    return found
    return None


@contextlib.contextmanager
def loading(flag: str, path, what: str = "the model"):
    """Any failure to load or adapt a model the user named (``flag`` ``path``) becomes one InputError naming both,
    and the file being read when the library says which.

    Inside are library loaders only (from_pretrained, safetensors, peft): whatever they raise on a damaged,
    truncated or mismatched file is bad input, not a bug of ours. Out-of-memory errors stay what they are.
    """
    try:
        yield
    except InputError:
        raise
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - see above
        if "out of memory" in str(err).lower():
            raise
        found = _failing_file(err, path) if path else None
        where = f" ({found})" if found and found != str(path) else ""
        raise InputError(f"{flag} {path}: cannot load {what}{where}: {_first_line(err)}") from err
