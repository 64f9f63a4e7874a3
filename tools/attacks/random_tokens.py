"""random: random tokens in the adversarial slots, judged in turn (docs/attacks.md: baselines).

UnlearnDiffAtk's baseline (Diffusion-MU-Attack src/attackers/random_.py, configs/nudity/random_esd_nudity.json):
the same k slots before (or after) the prompt as UnlearnDiffAtk, each try filled with tokens drawn uniformly from
the vocabulary, the prompt's text judged at the case's seed, stopping at the first success. Its default number of
tries is UnlearnDiffAtk's judged prompts at its published budget (50), so an ASR table compares the two at the same
judged budget: what an attack finds beyond that is more than random tokens. Deliberate differences
(docs/attacks.md): --tries 50 (the published config: 40), the vocabulary without special tokens (the published draw
spans every id), all draws from the harness's per-case generator.
"""

from __future__ import annotations

import torch

from common.errors import InputError

from . import optim
from .base import Case, Found, Models

FLAGS = [
    ("--num_tokens", int, 5, "random tokens k in the slots (Diffusion-MU-Attack configs/nudity/"
                             "random_esd_nudity.json: k 5)"),
    ("--position", str, "prefix", "where the random tokens go, prefix or suffix of the prompt (configs: "
                                  "insertion_location prefix_k)"),
    ("--tries", int, 50, "random: prompts with fresh random tokens judged at most (UnlearnDiffAtk's judged prompts "
                         "at its published budget, 50 timesteps judged after each; the published random config: "
                         "iteration 40)"),
]

POSITIONS = ("prefix", "suffix")


def validate(settings: dict) -> None:
    """Bad settings as one InputError naming the flag."""
    optim.positive_settings(settings, ["num_tokens", "tries"])
    if settings.get("num_tokens") is not None and settings["num_tokens"] > 75:
        raise InputError(f"--num_tokens {settings['num_tokens']}: at most 75 (the text encoder's 77 positions "
                         "less start- and end-of-text)")
    if settings.get("position", "prefix") not in POSITIONS:
        raise InputError(f"--position {settings.get('position')}: must be one of {', '.join(POSITIONS)}")


def search(case: Case, models: Models, judge, settings: dict, generator: torch.Generator) -> Found:
    """Judge up to ``tries`` prompts with random tokens in the slots; stop at the first success (the last judged
    prompt otherwise, as check_asr.py reads a log's last entry)."""
    s = {name.lstrip("-"): default for name, _, default, _ in FLAGS}
    s.update({k: v for k, v in settings.items() if v is not None})
    tok = models.unlearned.tokenizer
    layout = optim.make_layout(tok, case.prompt, s["position"], s["num_tokens"])
    vocab = optim.allowed_ids(tok, optim.token_table(models.unlearned.text_encoder).shape[0])
    # Every try's tokens drawn at once (random_.py draws an iteration x k table): a case's tries do not depend on
    # where it stops.
    draws = vocab[torch.randint(len(vocab), (s["tries"], layout.num_adv), generator=generator)]
    trail = optim.Trail()
    for step, ids in enumerate(draws, 1):
        if trail.judge(judge, case, step, layout.text(tok, ids), ids):
            break
    return trail.found(step, prefer_last=True)
