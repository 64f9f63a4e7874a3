"""Prompt attacks on unlearned models (issue #28; docs/attacks.md): the registry of searches.

``ATTACKS`` maps an attack name (the CLI's ``--attack``) to its search
function (a base.SearchFn). Each name's module exposes ``FLAGS`` (the
attack's own flags as (flag, type, default, help), defaults as published),
either ``search`` or, for a module serving several names, ``SEARCHES`` (name
-> search), and may expose ``validate(settings)`` (raises
common.errors.InputError). Modules are imported on first use, so a missing or
broken algorithm module only affects its own attacks.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from types import ModuleType
from typing import Callable, Dict, Iterator, Optional

# attack name -> (module under tools.attacks, settings the name implies beyond the module's flags)
MODULES: Dict[str, tuple] = {
    "unlearndiffatk": ("unlearndiffatk", {}),
    "p4d-n": ("p4d", {"variant": "n"}),
    "p4d-k": ("p4d", {"variant": "k"}),
    "ringabell": ("ringabell", {}),
    "mma": ("mma", {}),
    "replay": ("replay", {}),
    # UnlearnDiffAtk's baselines: no attack (the prompt as written: replay's search), random tokens, other seeds.
    "none": ("replay", {}),
    "random": ("random_tokens", {}),
    "seed_search": ("seed_search", {}),
}


def register(name: str, module_name: str, fixed: Optional[dict] = None) -> None:
    """Add (or replace) an attack: ``module_name`` a module under tools.attacks, or a dotted absolute module path."""
    MODULES[name] = (module_name, dict(fixed or {}))


def module(name: str) -> ModuleType:
    """The module implementing attack ``name`` (ImportError when it is absent or broken)."""
    mod = MODULES[name][0]
    return importlib.import_module(mod if "." in mod else f"{__name__}.{mod}")


def fixed_settings(name: str) -> dict:
    """Settings an attack name implies beyond its flags (P4D's variant)."""
    return dict(MODULES[name][1])


def flags(name: str) -> list:
    """The attack's own flags, (flag, type, default, help); [] when its module cannot be imported."""
    try:
        return list(getattr(module(name), "FLAGS", []))
    except ImportError:
        return []


def search_function(name: str) -> Optional[Callable]:
    """The search of attack ``name``: the module's SEARCHES[name], else its ``search`` (None when it has neither)."""
    mod = module(name)
    searches = getattr(mod, "SEARCHES", None)
    if isinstance(searches, Mapping) and name in searches:
        return searches[name]
    fn = getattr(mod, "search", None)
    return fn if callable(fn) else None


def validator(name: str) -> Optional[Callable]:
    """The module's ``validate(settings)`` when it has one."""
    fn = getattr(module(name), "validate", None)
    return fn if callable(fn) else None


def unavailable(name: str) -> Optional[str]:
    """None when attack ``name`` can run here, else why not (one line)."""
    try:
        fn = search_function(name)
    except ImportError as err:
        return f"its module tools/attacks/{MODULES[name][0]}.py cannot be imported ({err})"
    return None if fn is not None else f"tools/attacks/{MODULES[name][0]}.py has no search function"


class _Registry(Mapping):
    """name -> search function, each module imported when its name is first looked up."""

    def __getitem__(self, name: str) -> Callable:
        if name not in MODULES:
            raise KeyError(name)
        fn = search_function(name)
        if fn is None:
            raise KeyError(f"{name}: {unavailable(name)}")
        return fn

    def __iter__(self) -> Iterator[str]:
        return iter(MODULES)

    def __len__(self) -> int:
        return len(MODULES)


ATTACKS: Mapping = _Registry()
