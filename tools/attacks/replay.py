"""replay: no search; the case's prompt is judged as written (docs/attacks.md: replay).

Scores a CSV of adversarial prompts (found on one model by any attack, or a
published set) on another model: every prompt's record then says whether it
still works there. Nothing is searched, so a run's ASR equals its pre-ASR.
"""

from __future__ import annotations

import torch

from .base import Case, Found, Judge, Models

FLAGS: list = []  # replay has no flags of its own


def search(case: Case, models: Models, judge: Judge, settings: dict, generator: torch.Generator) -> Found:
    """The case's own prompt, judged at its seed and guidance."""
    score, success = judge(case.prompt, case.seed, case.guidance)
    return Found(prompt=case.prompt, token_ids=[], success=success, score=score, step=0 if success else None,
                 steps_run=0)
