"""The toolkit's tools (README.md lists them); shared here: the environment of the programs they launch."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_env(**extra) -> dict:
    """This process's environment for a program it launches, the repository first on PYTHONPATH and what was
    already there kept (a carried site directory on a machine without the pip install: docs/gpu.md), plus
    ``extra``."""
    path = os.pathsep.join(p for p in [ROOT, os.environ.get("PYTHONPATH", "")] if p)
    return {**os.environ, "PYTHONPATH": path, **extra}
