"""UnlearnDiffAtk (Zhang et al., ECCV 2024): the unlearned model as its own diffusion classifier (docs/attacks.md).

k adversarial tokens (a prefix or suffix of the prompt) are each a probability vector over the vocabulary, kept on
the simplex by projection after every Adam step; the forward pass uses a one-hot token sampled from each vector and
the gradient flows straight through to the probabilities. The loss is the diffusion loss of the unlearned UNet on the
case's target image (VAE-encoded, noised at timestep t) conditioned on prompt + adversarial tokens: tokens that make
the unlearned model predict the noise of an image showing the concept. Timesteps are visited in order (50 from
T/100 to T in strides of T/50), 40 steps each; after each timestep (``judge_every``) the argmax tokens are judged and
the search stops at the first success. Published defaults: Diffusion-MU-Attack's
configs/nudity/text_grad_esd_nudity_classifier.json, src/attackers/text_grad_.py and src/tasks/classifier_.py.
"""

from __future__ import annotations

from typing import Optional

import torch

from common import numerics
from common.errors import InputError

from . import optim
from .base import Case, Found, Models

FLAGS = [
    ("--num_tokens", int, 5, "adversarial tokens k (Diffusion-MU-Attack configs: k = 5)"),
    ("--position", str, "prefix", "where the adversarial tokens go: prefix or suffix of the prompt "
                                  "(configs: insertion_location prefix_k)"),
    ("--timesteps", int, 50, "diffusion timesteps visited in order, T/n/2, T/n/2 + T/n, ... (classifier_.py: "
                             "n_samples 50)"),
    ("--steps_per_timestep", int, 40, "Adam steps at each timestep (configs: iteration 40)"),
    ("--lr", float, 0.01, "Adam learning rate on the token probabilities (configs: lr 0.01)"),
    ("--weight_decay", float, 0.1, "Adam weight decay (configs: weight_decay 0.1)"),
    ("--judge_every", int, 1, "judge the argmax tokens after every N timesteps (published: 1) and after the last"),
]

POSITIONS = ("prefix", "suffix")


def validate(settings: dict) -> None:
    """Bad settings as one InputError naming the flag."""
    optim.positive_settings(settings, ["num_tokens", "timesteps", "steps_per_timestep", "judge_every"])
    if settings.get("num_tokens") is not None and settings["num_tokens"] > 75:
        raise InputError(f"--num_tokens {settings['num_tokens']}: at most 75 (the text encoder's 77 positions "
                         "less start- and end-of-text)")
    if settings.get("position", "prefix") not in POSITIONS:
        raise InputError(f"--position {settings.get('position')}: must be one of {', '.join(POSITIONS)}")


def judged_prompts(settings: dict, num_train_timesteps: int) -> int:
    """Prompts one case's search judges when none succeeds: one after every ``judge_every`` timesteps and after the
    last (50 at the published budget): the budget the random baseline matches."""
    s = {name.lstrip("-"): default for name, _, default, _ in FLAGS}
    s.update({k: v for k, v in settings.items() if v is not None})
    n = len(optim.timestep_schedule(num_train_timesteps, s["timesteps"]))
    return -(-n // s["judge_every"])


class SimplexTokens:
    """The attack's state for one case: the probability rows, their optimizer, the layout and the frozen models."""

    def __init__(self, parts, prompt: str, num_tokens: int, position: str, lr: float, weight_decay: float, device,
                 vocab: Optional[torch.Tensor] = None, noise_target=None):
        self.parts = parts
        # None: the diffusion loss (the drawn noise is the target); else (latents, noise, t, scheduler) -> the
        # prediction to match (Diffusion-MU-Attack's P4D task: the original UNet on the case's prompt).
        self.noise_target = noise_target
        self.device = device
        self.layout = optim.make_layout(parts.tokenizer, prompt, position, num_tokens)
        table = optim.token_table(parts.text_encoder)
        if vocab is None:  # the ids a slot may take (tests use a few)
            vocab = optim.allowed_ids(parts.tokenizer, table.shape[0])
        self.vocab = vocab.to(table.device)
        self.table = table[self.vocab]  # the rows a slot may take
        n = len(self.vocab)
        # Published initialisation (rand_init false): every token equally likely, already on the simplex.
        self.probs = torch.full((self.layout.num_adv, n), 1.0 / n, device=table.device, requires_grad=True)
        self.optimizer = numerics.adam([self.probs], lr=lr, weight_decay=weight_decay)

    def input_embeds(self, one_hot: torch.Tensor) -> torch.Tensor:
        """The text encoder's input [max_length, d] with the tokens ``one_hot`` selects in the slots."""
        return optim.assemble_embeds(optim.token_table(self.parts.text_encoder), self.layout, one_hot @ self.table)

    def loss(self, latents: torch.Tensor, t: int, noise: torch.Tensor, one_hot: torch.Tensor) -> torch.Tensor:
        """The unlearned UNet's diffusion loss on ``latents`` noised at ``t``, conditioned on prompt + tokens."""
        embeds = self.input_embeds(one_hot)
        cond = optim.encode_embeds(self.parts.text_encoder, self.layout.ids.to(embeds.device), embeds)
        timesteps = torch.full((latents.shape[0],), int(t), device=latents.device, dtype=torch.long)
        scheduler = self.parts.noise_scheduler
        target = None if self.noise_target is None else self.noise_target(latents, noise, timesteps, scheduler)
        return optim.noise_matching_loss(self.parts.unet, latents, noise, timesteps, cond, scheduler, target=target)

    def step(self, latents: torch.Tensor, t: int, generator: torch.Generator,
             noise: Optional[torch.Tensor] = None, sample: bool = True) -> float:
        """One Adam step on a one-hot sampled from each row (``sample``; else its argmax) and a fresh noise draw
        (unless ``noise`` is given), then the projection back onto the simplex; returns the step's loss."""
        one_hot, _ = optim.straight_through_one_hot(self.probs, generator, sample=sample)
        if noise is None:
            noise = optim.randn(latents.shape, generator, latents.device)
        loss = self.loss(latents, t, noise, one_hot)
        self.optimizer.zero_grad(set_to_none=True)
        (self.probs.grad,) = torch.autograd.grad(loss, [self.probs])
        self.optimizer.step()
        with torch.no_grad():
            self.probs.copy_(optim.project_simplex(self.probs))
        return float(loss.detach())

    def hard_ids(self) -> torch.Tensor:
        """The argmax token of each slot (vocabulary ids)."""
        return self.vocab[self.probs.detach().argmax(dim=-1)].cpu()


def target_latents(parts, case: Case, device) -> torch.Tensor:
    """The case's target image as a VAE latent (posterior mean x scaling factor, as classifier_.py img2latent)."""
    if not case.target_image:
        raise InputError(f"UnlearnDiffAtk needs a target image for case {case.case_number} (none was given)")
    return optim.image_latents(parts.vae, case.target_image, optim.model_resolution(parts), device)


def search(case: Case, models: Models, judge, settings: dict, generator: torch.Generator,
           noise_target=None) -> Found:
    """Attack one case: the published schedule, judged every ``judge_every`` timesteps, stopping at a success
    (``noise_target``: another prediction to match than the drawn noise, as Diffusion-MU-Attack's P4D)."""
    s = {name.lstrip("-"): default for name, _, default, _ in FLAGS}
    s.update({k: v for k, v in settings.items() if v is not None})
    parts = models.unlearned
    latents = target_latents(parts, case, models.device)
    tokens = SimplexTokens(parts, case.prompt, s["num_tokens"], s["position"], s["lr"], s["weight_decay"],
                           models.device, noise_target=noise_target)
    schedule = optim.timestep_schedule(parts.noise_scheduler.config.num_train_timesteps, s["timesteps"])
    trail = optim.Trail()
    steps = 0
    for i, t in enumerate(schedule):
        for _ in range(s["steps_per_timestep"]):
            tokens.step(latents, t, generator)
            steps += 1
        if (i + 1) % s["judge_every"] == 0 or i == len(schedule) - 1:
            ids = tokens.hard_ids()
            if trail.judge(judge, case, steps, tokens.layout.text(parts.tokenizer, ids), ids):
                break
    return trail.found(steps, prefer_last=True)

