"""The unlearning methods tools/unlearn.py makes models with, in one registry (docs/unlearning.md).

``METHODS`` maps a ``--method`` name to its ``base.Method``: its paper and
code, its own flags (one --help group), their defaults and checks, and its
``run``. Each method is one module of this package that calls ``register``
when imported; ``MODULES`` lists them. Adding a method is one module and one
line in ``MODULES`` (docs/unlearning.md: adding a method). The shared pieces
(model loading, the frozen copy, seeded draws, the training loop with
checkpoints and resume, data sets, the card's changed parameters and concept
probe) are in ``base``.
"""

from __future__ import annotations

import importlib
from typing import Dict

from common.errors import InputError

from .base import Method

METHODS: Dict[str, Method] = {}

# The method modules, imported in this order (the order of --method's choices and of --help's groups).
MODULES = (
    "esd",
    "uce",
    "salun",
    "ac",
    "sa",
    "erasediff",
    "spm",
    "receler",
    "mace",
)


def register(method: Method) -> Method:
    """Add (or replace) a method under its name."""
    METHODS[method.name] = method
    return method


def get(name: str) -> Method:
    """The method called ``name``; InputError naming the known ones otherwise."""
    if name not in METHODS:
        raise InputError(f"--method {name}: unknown method (known: {', '.join(METHODS)})")
    return METHODS[name]


for _module in MODULES:
    importlib.import_module(f"{__name__}.{_module}")
