"""The one error type for bad user input, and how scripts report it (docs/protocols.md: robustness)."""

from __future__ import annotations

import contextlib
import sys


class InputError(ValueError):
    """A bad argument or input file; the message names the flag or file."""


@contextlib.contextmanager
def exit_on_input_error(prog: str):
    """Turn an InputError into one line on stderr and exit status 2, no traceback."""
    try:
        yield
    except InputError as err:
        print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
