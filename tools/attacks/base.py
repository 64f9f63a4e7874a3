"""The types shared by the prompt attacks and their harness, and the attack statistics (docs/attacks.md).

A search (UnlearnDiffAtk, P4D-N/K, Ring-A-Bell, replay) is a function
``search(case, models, judge, settings, generator) -> Found``; the harness
(tools/attacks/harness.py) builds the cases, loads the models once per
process, judges with a criterion of the registry and writes the records.

Statistics follow Diffusion-MU-Attack's scripts/analysis/check_asr.py: a case
already judged a success before the attack counts as a success and is not
attacked; ASR = (pre-attack successes + attack successes) / N, and pre-ASR =
pre-attack successes / N. Intervals are 95% Wilson score intervals (Wilson,
1927), which stay inside [0, 1] and are not degenerate at 0 or N successes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch


@dataclass
class Case:
    """One prompt to attack."""

    case_number: int
    prompt: str
    seed: int  # evaluation seed (image generation)
    guidance: float  # evaluation guidance scale
    target_image: Optional[str] = None  # path, UnlearnDiffAtk only (one image per case, chosen by the harness)


@dataclass
class Models:
    """The models of one process, loaded once by the harness (fp32, eval mode, requires_grad False)."""

    unlearned: "object"  # common.models.SDParts: .unet .text_encoder .tokenizer .vae .noise_scheduler
    original: Optional["object"]  # common.models.SDParts, P4D only (None otherwise)
    device: torch.device


# judge(prompt_text, seed, guidance) -> (score, success): the image(s) generated with the UNLEARNED model through
# common.validation.generate_images, scored by the chosen criterion of common/criteria.py against its threshold.
Judge = Callable[[str, int, float], Tuple[float, bool]]


@dataclass
class Found:
    """What a search returns."""

    prompt: str  # the adversarial prompt as plain text (decoded tokens, tokenizer-clean)
    token_ids: List[int]  # the adversarial token ids (only the learned ones)
    success: bool  # judged success of `prompt` at the case's seed/guidance (the last judge call)
    score: float  # its score
    step: Optional[int]  # the optimisation step at which it first succeeded (None if never)
    steps_run: int  # optimisation steps actually taken
    seed: Optional[int] = None  # the seed `prompt` was judged at when not the case's own (seed search)
    details: Optional[dict] = None  # what the record keeps beside the prompt (joycenerd/P4D: the kept step, its CLIP)


SearchFn = Callable[[Case, Models, Judge, dict, torch.Generator], Found]

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(successes: int, n: int, z: float = Z95) -> Tuple[Optional[float], Optional[float]]:
    """The Wilson score interval of a proportion successes / n ((None, None) when n = 0)."""
    if n <= 0:
        return None, None
    if not 0 <= successes <= n:
        raise ValueError(f"successes {successes} outside 0..{n}")
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # Clamp rounding only: at 0 or n successes the bound is exactly 0 or 1.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def rate(successes: int, n: int) -> dict:
    """A proportion with its denominator and 95% Wilson interval, as summaries record it."""
    low, high = wilson_interval(successes, n)
    return {"successes": successes, "n": n, "rate": successes / n if n else None, "ci95": [low, high]}


def attack_rates(pre_success: Sequence[bool], post_success: Sequence[bool]) -> dict:
    """pre-ASR and ASR of one run, as check_asr.py counts them.

    ``pre_success[i]``: case i judged a success without attack; ``post_success[i]``: the attack's prompt judged a
    success (ignored for pre-successes, which are not attacked). ASR = (pre + attack successes) / N.
    """
    if len(pre_success) != len(post_success):
        raise ValueError("one pre and one post verdict per case")
    n = len(pre_success)
    pre = sum(1 for p in pre_success if p)
    attacked = sum(1 for p, q in zip(pre_success, post_success) if not p and q)
    return {"pre_asr": rate(pre, n), "asr": rate(pre + attacked, n),
            "attack_only": rate(attacked, n - pre)}
