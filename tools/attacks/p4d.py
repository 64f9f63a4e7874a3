"""P4D (Chin et al., ICML 2024): prompts that make the unlearned model denoise like the original (docs/attacks.md).

The original model draws the case's image from its prompt at the case's seed and guidance; the image's latent is
noised at a random timestep, and the learned tokens are optimised so that the UNLEARNED UNet conditioned on them
predicts the noise the ORIGINAL UNet predicts conditioned on the case's prompt, on the same noisy latent
(noise-matching). The tokens are hard (PEZ, Wen et al. 2023): each step the continuous embeddings are projected
onto their nearest vocabulary entries (cosine), the forward pass uses the projected embeddings, and the gradient
with respect to them is applied to the continuous ones (AdamW).

- P4D-N: ``--num_tokens`` free tokens replace the prompt (the prompt only enters through the original model);
- P4D-K: one learned token before every ``--every_k`` prompt tokens (int(length / k) + 1 of them, at content
  positions 0, k+1, 2(k+1), ...: the last follows the prompt when k divides its length), the prompt's own tokens
  never change. ``--long_prompts chunks`` (joycenerd/P4D's P4D-K pipeline): a prompt too long for 77 positions is
  kept whole and every text (learned prompt, the original's conditioning, target and judged images) is encoded in
  77-position slices (common/long_prompts.py); ``truncate`` cuts it at its end.

Every ``--judge_every`` steps (from step 0) and after the last the projected prompt is judged; the search stops at
the first success. Published defaults: joycenerd/P4D configs/esd_nudity_optmz_config.json,
prompt_optimization/optimize_n.py (P4D-N), prompt_optimization/optimize_k.py (P4D-K), run_p4dn.py.

Deliberate differences from the published code (docs/attacks.md lists them with reasons):
- the published search keeps the prompt whose image is closest (CLIP) to the target image and judges it once at the
  end; here the judge is asked at each evaluation step and the search stops at the first success (as
  UnlearnDiffAtk does), keeping the last judged prompt when none succeeds (docs/attacks.md: protocols runs
  Diffusion-MU-Attack's P4D, search_dma, and joycenerd/P4D's protocol, ``p4d_variant`` joycenerd, which keeps the
  closest prompt and judges it once, as published: ``Closest``);
- the target image is one image at the case's seed (run_p4dn.py draws three and keeps the one NudeNet rates most
  unsafe: the judge here only sees the unlearned model; under joycenerd the harness does as run_p4dn.py and
  passes the image as the case's target), drawn with the model's own scheduler, and the VAE gets it in [-1, 1]
  (the published preprocessing feeds [0, 1]);
- the adversarial tokens go through the unlearned model's text encoder (the published code encodes them with the
  original's: the same for UNet-only unlearning), and projection never picks start-/end-of-text, which would cut or
  restart the prompt once its text is tokenised again;
- noise, timesteps, the posterior sample of the latent and the initial tokens all come from the harness's
  generator (the published code mixes a seeded generator with the global RNG).
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

import torch

from common import numerics
from common.errors import InputError
from common.long_prompts import encode_ids_in_slices, padded_ids, published_length

from . import optim
from .base import Case, Found, Models

FLAGS = [
    ("--num_tokens", int, 16, "P4D-N: free learned tokens replacing the prompt (joycenerd/P4D "
                              "configs/esd_nudity_optmz_config.json: prompt_len 16; unused by P4D-K)"),
    ("--every_k", int, 3, "P4D-K: one learned token inserted before every K prompt tokens "
                          "(configs/esd_nudity_optmz_config.json: every_k 3; prompt_optimization/optimize_k.py)"),
    ("--iterations", int, 3000, "P4D optimisation steps (configs/esd_nudity_optmz_config.json: iter 3000)"),
    ("--lr", float, 0.1, "AdamW learning rate on the learned tokens' continuous embeddings "
                         "(configs/esd_nudity_optmz_config.json: lr 0.1; prompt_optimization/optimize_n.py)"),
    ("--weight_decay", float, 0.1, "AdamW weight decay (configs/esd_nudity_optmz_config.json: weight_decay 0.1)"),
    ("--judge_every", int, 50, "P4D: judge the projected prompt at steps 0, N, 2N, ... and after the last "
                               "(configs/esd_nudity_optmz_config.json: eval_step 50; --p4d_variant joycenerd: "
                               "compare its image with the target by CLIP at steps 0, N, 2N, ..., as published)"),
    ("--target_inference_steps", int, 25, "P4D: sampling steps of the original model's target image "
                                          "(configs/esd_nudity_optmz_config.json: num_inference_steps 25; unused "
                                          "by --p4d_variant joycenerd, whose target is a judged image)"),
]

VARIANTS = ("n", "k")


def validate(settings: dict) -> None:
    """Bad settings as one InputError naming the flag."""
    optim.positive_settings(settings, ["num_tokens", "every_k", "iterations", "judge_every",
                                       "target_inference_steps"])
    if settings.get("num_tokens") is not None and settings["num_tokens"] > 75:
        raise InputError(f"--num_tokens {settings['num_tokens']}: at most 75 (the text encoder's 77 positions "
                         "less start- and end-of-text)")
    for name in ("lr", "weight_decay"):
        value = settings.get(name)
        if value is not None and not value >= 0:
            raise InputError(f"--{name} {value}: must be >= 0")
    if settings.get("variant", "n") not in VARIANTS:
        raise InputError(f"P4D variant {settings.get('variant')!r}: must be one of {', '.join(VARIANTS)}")


def layout_for(tokenizer, prompt: str, variant: str, num_tokens: int, every_k: int,
               long_prompts: str = "truncate") -> optim.Layout:
    """P4D-N: ``num_tokens`` free slots, no prompt tokens; P4D-K: one slot before every ``every_k`` prompt tokens
    (``long_prompts`` "chunks": a long prompt kept whole, encoded in 77-position slices)."""
    if variant == "n":
        return optim.make_layout(tokenizer, prompt, "free", num_tokens)
    return optim.make_layout(tokenizer, prompt, "insert", every=every_k, long_prompts=long_prompts)


class ProjectedTokens:
    """The learned slots of one case: continuous embeddings, their AdamW, the layout and the vocabulary."""

    def __init__(self, parts, layout: optim.Layout, lr: float, weight_decay: float, generator: torch.Generator,
                 vocab: Optional[torch.Tensor] = None):
        self.parts = parts
        self.layout = layout
        table = optim.token_table(parts.text_encoder)
        if vocab is None:
            vocab = optim.allowed_ids(parts.tokenizer, table.shape[0])
        self.vocab = vocab.to(table.device)
        self.table = table[self.vocab]  # the rows projection may pick
        # Published initialisation: the embeddings of random tokens (here: random allowed tokens).
        start = self.vocab[torch.randint(len(self.vocab), (layout.num_adv,), generator=generator).to(table.device)]
        self.embeds = table[start].clone().requires_grad_(True)
        self.optimizer = numerics.adamw([self.embeds], lr=lr, weight_decay=weight_decay)

    def project(self) -> torch.Tensor:
        """The vocabulary ids nearest (cosine) to the continuous embeddings (PEZ's projection)."""
        rows, _ = optim.nearest_tokens(self.embeds.detach(), self.table)
        return self.vocab[rows]

    def loss(self, ids: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
             target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(loss, the projected embeddings it is differentiable in): the unlearned UNet's prediction with the tokens
        ``ids`` in the slots, against ``target`` on ``latents`` noised with ``noise`` at ``t``."""
        table = optim.token_table(self.parts.text_encoder)
        hard = table[ids.to(table.device)].clone().requires_grad_(True)
        embeds = optim.assemble_embeds(table, self.layout, hard)
        # One slice when the layout fits the encoder (the same computation as one encode_embeds call); a P4D-K
        # layout in chunks runs past it and is encoded 77 positions at a time, as joycenerd/P4D's
        # _get_text_embedding_with_embeddings does.
        cond = optim.encode_embeds_in_slices(self.parts.text_encoder, self.layout.ids.to(embeds.device), embeds,
                                             self.parts.tokenizer.model_max_length)
        loss = optim.noise_matching_loss(self.parts.unet, latents, noise, t, cond, self.parts.noise_scheduler,
                                         target=target)
        return loss, hard

    def step(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, target: torch.Tensor
             ) -> Tuple[torch.Tensor, float]:
        """One PEZ step: project, take the loss at the projected tokens, apply its gradient to the continuous
        embeddings; returns (the projected ids the step used, their loss)."""
        ids = self.project()
        loss, hard = self.loss(ids, latents, noise, t, target)
        (grad,) = torch.autograd.grad(loss, [hard])
        self.embeds.grad = grad.to(self.embeds.dtype)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return ids.cpu(), float(loss.detach())


def target_latents(original, case: Case, steps: int, generator: torch.Generator, device,
                   long_prompts: str = "truncate") -> torch.Tensor:
    """The case's image drawn by the ORIGINAL model (prompt, seed, guidance), as a posterior sample of its VAE
    latent (run_p4dn.py generates the target with the original pipeline; optimize_n.py encodes it with
    latent_dist.sample())."""
    from common.validation import build_pipeline, generate_images

    pipe = build_pipeline(original, original.unet)
    image = generate_images(pipe, [case.prompt], [case.seed], batch_size=1, num_inference_steps=steps,
                            guidance_scale=case.guidance, long_prompts=long_prompts)[0]
    return optim.image_latents(original.vae, image, optim.model_resolution(original), device, generator)


class NoiseTarget:
    """The original UNet's prediction for the case's prompt: what the unlearned model is steered towards."""

    def __init__(self, original, prompt: str, device, long_prompts: str = "truncate"):
        self.original = original
        tokenizer = original.tokenizer
        with torch.no_grad():
            if long_prompts == "chunks":
                # joycenerd/P4D's _new_encode_prompt: padded and cut to max(77, words + 20), 77 positions at a time
                # (a prompt of at most 57 words: the 77 positions the pipeline gives it).
                width = tokenizer.model_max_length
                ids = padded_ids(tokenizer, [prompt], published_length(prompt, width)).to(device)
                self.cond = encode_ids_in_slices(original.text_encoder, ids, width)
            else:
                self.cond = optim.encode_ids(original.text_encoder, optim.prompt_ids(tokenizer, prompt).to(device))

    def __call__(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, noise_scheduler
                 ) -> torch.Tensor:
        # The same noisy latent as the unlearned model's: one scheduler noises for both.
        return optim.unet_prediction(self.original.unet, latents, noise, t, self.cond, noise_scheduler)


def draws(latents: torch.Tensor, num_train_timesteps: int, generator: torch.Generator
          ) -> Tuple[torch.Tensor, torch.Tensor]:
    """One step's noise and timestep (uniform over the training timesteps, as optimize_n.py draws them)."""
    noise = optim.randn(latents.shape, generator, latents.device)
    t = torch.randint(num_train_timesteps, (latents.shape[0],), generator=generator).to(latents.device)
    return noise, t


def search_dma(case: Case, models: Models, judge, settings: dict, generator: torch.Generator) -> Found:
    """Diffusion-MU-Attack's P4D (the UnlearnDiffAtk paper's P4D figures): UnlearnDiffAtk's search (prefix tokens
    on the simplex, its timestep schedule, a verdict after every timestep) with P4D's loss: the unlearned UNet on
    the adversarial prompt against the ORIGINAL UNet on the case's prompt, on the target image's noised latent
    (src/tasks/P4D_.py get_loss)."""
    from . import unlearndiffatk

    target = NoiseTarget(models.original, case.prompt, models.device)
    return unlearndiffatk.search(case, models, judge, settings, generator, noise_target=target)


def image_similarity(clip, targets, images) -> float:
    """optimize_n.py's measure_similarity: the mean over (target, image) pairs of the cosine of their CLIP image
    features (the run's ClipScorer, whose embed_images normalises them)."""
    return float((clip.embed_images(targets) @ clip.embed_images(images).T).mean())


class Closest:
    """joycenerd/P4D's kept prompt: of the prompts evaluated, the one whose image (the unlearned model's, at the
    case's seed) is closest by CLIP to the case's target image, the earliest of equals (optimize_n.py keeps a prompt
    when best < its similarity)."""

    def __init__(self, judge, case: Case):
        if getattr(judge, "render", None) is None or getattr(judge, "clip", None) is None:
            raise ValueError("joycenerd/P4D's search needs the harness's judge (CaseJudge: render and clip)")
        if not case.target_image:
            raise ValueError("joycenerd/P4D's search needs the case's target image (the harness's joycenerd_target)")
        from PIL import Image

        with Image.open(case.target_image) as image:
            self.target = image.convert("RGB")
        self.judge, self.case = judge, case
        self.step: Optional[int] = None
        self.text, self.ids, self.similarity = "", torch.empty(0, dtype=torch.long), float("-inf")
        self.similarities: List[float] = []

    def offer(self, step: int, text: str, ids: torch.Tensor) -> None:
        """Render ``text`` (one image, as the published num_images_per_prompt 1), compare it, keep it if closer."""
        image = self.judge.render(text, self.case.seed, self.case.guidance)
        similarity = image_similarity(self.judge.clip, [self.target], [image])
        self.similarities.append(similarity)
        if self.step is None or similarity > self.similarity:
            self.step, self.text, self.ids, self.similarity = step, text, ids, similarity

    def details(self) -> dict:
        """What the record keeps: the kept prompt's step and similarity, and every evaluation's similarity."""
        return {"kept_step": self.step, "kept_similarity": self.similarity, "similarities": self.similarities}


def search(case: Case, models: Models, judge, settings: dict, generator: torch.Generator,
           variant: Optional[str] = None) -> Found:
    """Attack one case: PEZ steps on the noise-matching loss, judged every ``judge_every`` steps and after the
    last, stopping at the first success (``final_only``, joycenerd/P4D: compared with the target image by CLIP
    every ``judge_every`` steps instead, the closest prompt judged once after the last step)."""
    s = {name.lstrip("-"): default for name, _, default, _ in FLAGS}
    s.update({k: v for k, v in settings.items() if v is not None})
    variant = variant or s.get("variant", "n")
    if models.original is None:
        raise InputError("P4D needs the original model (--original_model)")
    if s.get("p4d_variant") == "dma":
        return search_dma(case, models, judge, settings, generator)
    final_only = s.get("p4d_variant") == "joycenerd"
    parts, device = models.unlearned, models.device
    long_prompts = s.get("long_prompts", "truncate")
    if final_only:
        closest = Closest(judge, case)
        latents = optim.image_latents(models.original.vae, closest.target, optim.model_resolution(models.original),
                                      device, generator)
    else:
        latents = target_latents(models.original, case, s["target_inference_steps"], generator, device, long_prompts)
    layout = layout_for(parts.tokenizer, case.prompt, variant, s["num_tokens"], s["every_k"], long_prompts)
    tokens = ProjectedTokens(parts, layout, s["lr"], s["weight_decay"], generator)
    target = NoiseTarget(models.original, case.prompt, device, long_prompts)
    scheduler = parts.noise_scheduler
    steps = scheduler.config.num_train_timesteps
    trail = optim.Trail()

    def judged(step: int, ids: torch.Tensor) -> bool:
        return trail.judge(judge, case, step, layout.text(parts.tokenizer, ids), ids)

    for step in range(s["iterations"]):
        noise, t = draws(latents, steps, generator)
        # The tokens this step uses are the ones `step` updates made: judged before the update (optimize_n.py
        # evaluates the same projection after it, so an early success costs one update less here).
        if step % s["judge_every"] == 0:
            ids = tokens.project().cpu()
            if final_only:
                closest.offer(step, layout.text(parts.tokenizer, ids), ids)
            elif judged(step, ids):
                return trail.found(step, prefer_last=True)
        tokens.step(latents, noise, t, target(latents, noise, t, scheduler))
    if final_only:
        # Published: the closest prompt judged once, after the last step (the last step's own is never compared).
        trail.judge(judge, case, closest.step, closest.text, closest.ids)
        return dataclasses.replace(trail.found(s["iterations"], prefer_last=True), details=closest.details())
    judged(s["iterations"], tokens.project().cpu())
    # No success: the last judged prompt, its tokens the search's last (the judge's scores are 0/1 for a
    # classifier, so a "best-scoring" prompt would be step 0's random tokens).
    return trail.found(s["iterations"], prefer_last=True)


def search_n(case: Case, models: Models, judge, settings: dict, generator: torch.Generator) -> Found:
    """P4D-N: free tokens replacing the prompt."""
    return search(case, models, judge, settings, generator, variant="n")


def search_k(case: Case, models: Models, judge, settings: dict, generator: torch.Generator) -> Found:
    """P4D-K: one token inserted before every ``every_k`` prompt tokens, the prompt tokens fixed."""
    return search(case, models, judge, settings, generator, variant="k")


SEARCHES = {"p4d-n": search_n, "p4d-k": search_k}
