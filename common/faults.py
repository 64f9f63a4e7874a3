"""Deterministic fault injection for the kill-and-resume tests.

``REVIVAL_FAULT=point:n`` makes the process SIGKILL itself the n-th time it
reaches ``point`` ("update", "validation" or "checkpoint"); unset, this is a
no-op costing one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

_counts: dict = {}


def maybe_fail(point: str) -> None:
    """SIGKILL this process at the configured occurrence of ``point`` (no cleanup, like a real crash)."""
    spec = os.environ.get("REVIVAL_FAULT")
    if not spec:
        return
    name, _, n = spec.partition(":")
    if name != point:
        return
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] == int(n or 1):
        os.kill(os.getpid(), signal.SIGKILL)
