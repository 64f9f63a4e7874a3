"""Deterministic fault injection: rehearse a node failure, a full disk or a diverging loss on your own cluster
before a long job (docs/long-runs.md); the suite's kill-and-resume tests use the same switch.

``REVIVAL_FAULT=point:n`` makes the process SIGKILL itself the n-th time it
reaches ``point`` ("update", "validation" or "checkpoint"); for ``nan:n`` it
turns the n-th micro-batch loss into NaN (a diverging run); for
``enospc_<what>:n`` the n-th write of that kind (checkpoint, pipeline,
results, images) fails as on a full disk. Unset, each is a no-op costing one
dictionary lookup.
"""

from __future__ import annotations

import os
import signal

_counts: dict = {}


def _due(point: str) -> bool:
    """True at the configured occurrence of ``point``."""
    spec = os.environ.get("REVIVAL_FAULT")
    if not spec:
        return False
    name, _, n = spec.partition(":")
    if name != point:
        return False
    _counts[point] = _counts.get(point, 0) + 1
    return _counts[point] == int(n or 1)


def maybe_fail(point: str) -> None:
    """SIGKILL this process at the configured occurrence of ``point`` (no cleanup, like a real crash)."""
    if _due(point):
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_poison(loss):
    """The loss, or NaN times it at the configured ``nan:n`` micro-batch (so its gradients are NaN too)."""
    return loss * float("nan") if _due("nan") else loss


def maybe_disk_full(what: str) -> None:
    """Raise ENOSPC at the configured ``enospc_<what>:n`` write."""
    if _due(f"enospc_{what}"):
        import errno

        raise OSError(errno.ENOSPC, "No space left on device (injected)")
