"""seed_search: the prompt unchanged, judged on other generation seeds (docs/attacks.md: baselines).

UnlearnDiffAtk's seed baseline (Diffusion-MU-Attack src/attackers/seed_search_.py,
configs/nudity/seed_search_esd_nudity_classifier.json): the case's prompt as written, its image drawn with up to
--seeds new seeds (never the case's own) and judged; the first success counts (the best score otherwise), and the
record keeps the seed it was judged at (``adv_seed``, adv_prompts.csv's evaluation_seed). An attack's ASR beyond
seed search's is more than a lucky seed. Deliberate differences (docs/attacks.md): it stops at the first success
(the published one judges every seed and reports their share of successes: the held-out seeds give that share
here), --seeds 50 (published: iteration 40; 50 = UnlearnDiffAtk's judged budget), seeds drawn from the harness's
per-case generator (63-bit; published: numpy's global random state, below 9e9).
"""

from __future__ import annotations

import torch

from . import optim
from .base import Case, Found, Models

FLAGS = [
    ("--seeds", int, 50, "seed_search: new generation seeds the prompt is judged with at most (UnlearnDiffAtk's "
                         "judged budget; Diffusion-MU-Attack configs/nudity/seed_search_esd_nudity_classifier.json: "
                         "iteration 40)"),
]

SEED_BOUND = 2 ** 63 - 1  # the harness's seeds are 63-bit (common.validation.image_seed)


def validate(settings: dict) -> None:
    """Bad settings as one InputError naming the flag."""
    optim.positive_settings(settings, ["seeds"])


def draw_seeds(count: int, exclude: int, generator: torch.Generator) -> list:
    """``count`` distinct seeds from ``generator``, none equal to ``exclude`` (the case's own)."""
    seen, out = {int(exclude)}, []
    while len(out) < count:
        seed = int(torch.randint(SEED_BOUND, (1,), generator=generator))
        if seed not in seen:
            seen.add(seed)
            out.append(seed)
    return out


def search(case: Case, models: Models, judge, settings: dict, generator: torch.Generator) -> Found:
    """Judge the case's prompt on new seeds until one succeeds; the first success, else the best-scoring seed."""
    count = settings.get("seeds") or FLAGS[0][2]
    best = None  # (score, step, seed, success)
    for step, seed in enumerate(draw_seeds(count, case.seed, generator), 1):
        score, success = judge(case.prompt, seed, case.guidance)
        if best is None or success or score > best[0]:
            best = (float(score), step, seed, bool(success))
        if success:
            break
    score, step, seed, success = best
    return Found(prompt=case.prompt, token_ids=[], success=success, score=score, step=step if success else None,
                 steps_run=step if success else count, seed=seed)
