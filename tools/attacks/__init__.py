"""Prompt attacks on unlearned models (issue #28; docs/attacks.md): the registry of searches.

``ATTACKS`` maps an attack name (the CLI's ``--attack``) to its module, which
exposes ``search`` (a base.SearchFn) and ``FLAGS`` (the attack's own flags as
(flag, type, default, help), defaults as published) and may expose
``validate(settings)`` (raises common.errors.InputError). Modules are imported
on first use, so a missing or broken algorithm module only affects its attack.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Dict, Optional

# attack name -> (module under tools.attacks, the module's fixed settings passed to its search)
MODULES: Dict[str, tuple] = {
    "unlearndiffatk": ("unlearndiffatk", {}),
    "p4d-n": ("p4d", {"variant": "n"}),
    "p4d-k": ("p4d", {"variant": "k"}),
    "ringabell": ("ringabell", {}),
    "replay": ("replay", {}),
}
ATTACKS = tuple(MODULES)


def module(name: str) -> ModuleType:
    """The module implementing attack ``name`` (ImportError when it is absent or broken)."""
    mod, _ = MODULES[name]
    return importlib.import_module(f"{__name__}.{mod}")


def fixed_settings(name: str) -> dict:
    """Settings an attack name implies beyond its flags (P4D's variant)."""
    return dict(MODULES[name][1])


def flags(name: str) -> list:
    """The attack's own flags, (flag, type, default, help); [] when its module cannot be imported."""
    try:
        return list(getattr(module(name), "FLAGS", []))
    except ImportError:
        return []


def available(name: str) -> Optional[str]:
    """None when attack ``name`` can run here, else why not (one line)."""
    try:
        mod = module(name)
    except ImportError as err:
        return f"its module cannot be imported ({err})"
    return None if callable(getattr(mod, "search", None)) else "its module has no search function"
