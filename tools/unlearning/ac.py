"""Concept Ablation: Kumari et al., ICCV 2023, "Ablating Concepts in Text-to-Image Diffusion Models"
(docs/unlearning.md: AC).

https://arxiv.org/abs/2303.13516 (code: https://github.com/nupurkmr9/concept-ablation). Fine-tunes the UNet so
that prompts of the target concept give what prompts of an anchor concept give ("grumpy cat" -> "cat"), on
images of the anchor: the model-based variant regresses the target prompt's prediction to the model's own
prediction for the anchor prompt, the noise-based one is the denoising loss of anchor images under target
prompts. Our reading of their code is cited as "train.py line N" (diffusers/train.py), "utils.py line N"
(diffusers/utils.py), "model.py line N" (compvis/src/model.py) of nupurkmr9/concept-ablation at c11fb1b.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from common.cli import check_resolution

from . import base, register
from .base import (DATA, GUIDE, RESOLVED, Flag, Method, Parallel, RunContext, check_text, check_vae_multiple, encode,
                   finite, frozen_copy, generate_image_set, image_latents, load_image_set, noised, require,
                   step_generator, train_loop)

PAPER = "Kumari et al., ICCV 2023, https://arxiv.org/abs/2303.13516"
CODE = "https://github.com/nupurkmr9/concept-ablation"

# --train_params -> the UNet parameters trained: their --parameter_group (train.py lines 59-79 and 912-929).
TRAIN_PARAMS = ("xattn", "attn", "full")
XATTN = ("attn2.to_k", "attn2.to_v")  # their "cross-attn": the text-to-key/value projections
ATTN = ("to_q", "to_k", "to_v", "to_out")  # their "attn": every attention projection, self and cross
ABLATIONS = ("model", "noise")  # their --loss_type_reverse model-based / noise-based
TARGET_MODELS = ("training", "frozen")
CONCEPT_TYPES = ("object", "style")
REGULARIZATION = ("auto", "on", "off")

BASE_LEARNING_RATE = 2e-6  # their --learning_rate in every object/style command (diffusers/README.md)
PUBLISHED_BATCH = 8  # their one-GPU advice: --train_batch_size=8 (diffusers/README.md), = 4 x 2 GPUs
ADAMW = {"betas": (0.9, 0.999), "weight_decay": 1e-2, "eps": 1e-8}  # train.py lines 425-443 (AdamW defaults)

# Seed streams of step_generator: each a pure function of (seed, position), so a resumed run needs no state.
DRAW_STREAM, ORDER_STREAM, PRIOR_ORDER_STREAM, PROBE_STREAM = 0, 1, 2, 3


def trainable_names(unet: torch.nn.Module, train_params: str) -> List[str]:
    """UNet parameter names AC trains: cross-attention k/v (xattn), every attention projection (attn), all (full)."""
    names = [n for n, _ in unet.named_parameters()]
    if train_params == "xattn":
        return [n for n in names if any(p in n for p in XATTN)]
    if train_params == "attn":
        return [n for n in names if any(p in n for p in ATTN)]
    if train_params == "full":
        return names
    raise ValueError(f"unknown --train_params {train_params!r}")


def _word(text: str) -> "re.Pattern":
    """``text`` as a whole word or phrase, any case ("cat" does not match "category")."""
    return re.compile(r"(?<!\w)" + re.escape(text.strip()) + r"(?!\w)", re.IGNORECASE)


def mentions(prompt: str, anchor: str) -> bool:
    """Whether ``prompt`` names ``anchor`` (a whole word or phrase, any case)."""
    return _word(anchor).search(prompt) is not None


def object_prompt(anchor_prompt: str, anchor: str, concept: str) -> str:
    """The target prompt of an anchor prompt: the anchor's words replaced by the concept's.

    Their object ablation (utils.py lines 197-199; CompVis finetune_data.py replaces in the lower-cased caption):
    "a photo of a cat" -> "a photo of a grumpy cat". Whole words, any case: "cat" stays in "category".
    """
    return _word(anchor).sub(lambda _: concept.strip(), anchor_prompt)


def style_prompts(anchor_prompt: str, concept: str) -> Tuple[str, str]:
    """The two target prompts of a painting prompt in their style ablation (utils.py lines 179-187).

    Drawn 1 in 3 and 2 in 3 (their r = 0, and r = 1 or 2 giving the same text).
    """
    return f"{anchor_prompt}, in the style of {concept}", f"in {concept}'s style, {anchor_prompt}"


def regularized(setting: str, anchor: str, concept: str) -> bool:
    """Whether the prior loss is on: "auto" turns it on when the concept names the anchor ("grumpy cat"/"cat").

    Their README adds --with_prior_preservation "when ablating for target objects with overlapping text prompt
    between the anchor and the target": the anchor's own prompts then share words with the target's, and the
    prior loss keeps the anchor's prediction in place.
    """
    if setting == "auto":
        return mentions(concept, anchor)
    return setting == "on"


def default_learning_rate(batch_size: int, regularize: bool) -> float:
    """Their --scale_lr: 2e-6 x batch (x 2 with the prior batch concatenated), train.py lines 861-869."""
    return BASE_LEARNING_RATE * batch_size * (2 if regularize else 1)


# ---- data ---------------------------------------------------------------------


@torch.no_grad()
@lru_cache(maxsize=8)
def _order(seed: int, epoch: int, n: int, stream: int) -> torch.Tensor:
    return torch.randperm(n, generator=step_generator(seed, epoch, stream))


def sample_indices(seed: int, start: int, count: int, n: int, stream: int) -> torch.Tensor:
    """Images ``start`` .. ``start+count-1`` of an endless stream of shuffled passes over ``n`` images.

    Each pass is a permutation seeded by (seed, pass): as a shuffled DataLoader, every image once per pass, and a
    pure function of the position, so a resumed run draws the same images.
    """
    return torch.stack([_order(seed, k // n, n, stream)[k % n] for k in range(start, start + count)])


class AnchorData:
    """The anchor images' latents (both orientations) and the encoded prompts of each image."""

    def __init__(self, parts, images, anchor: str, concept: str, concept_type: str, resolution: int, hflip: bool,
                 device):
        self.n = len(images.paths)
        mean, std = image_latents(parts, images, resolution, device)
        if hflip:
            flipped = image_latents(parts, images, resolution, device, flip=True)  # their --hflip: before the VAE
            mean, std = torch.stack([mean, flipped[0]]), torch.stack([std, flipped[1]])
        else:
            mean, std = mean[None], std[None]
        self.mean, self.std = mean, std  # [orientations, n, c, h, w]
        anchors = sorted(set(images.prompts))
        if concept_type == "object":
            variants = [[object_prompt(p, anchor, concept) for p in anchors]]
        else:
            variants = [list(v) for v in zip(*(style_prompts(p, concept) for p in anchors))]
        row = {p: i for i, p in enumerate(anchors)}
        self.prompt_row = torch.tensor([row[p] for p in images.prompts])
        self.anchor_context = encode(parts, anchors, device)  # [prompts, 77, d]
        self.target_context = torch.stack([encode(parts, v, device) for v in variants])  # [phrasings, prompts, ...]
        self.target_prompts = sorted({p for v in variants for p in v})

    def latents(self, idx: torch.Tensor, flips: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """A VAE posterior sample of each image (their latent_dist.sample(), train.py line 1074), CPU."""
        side = flips.long() if self.mean.shape[0] == 2 else torch.zeros_like(idx)
        return self.mean[side, idx] + self.std[side, idx] * eps

    def anchor(self, idx: torch.Tensor) -> torch.Tensor:
        """The encoded anchor prompt of each image."""
        return self.anchor_context[self.prompt_row[idx].to(self.anchor_context.device)]

    def target(self, idx: torch.Tensor, phrasing: torch.Tensor) -> torch.Tensor:
        """The encoded target prompt of each image (a style ablation: in the drawn ``phrasing``)."""
        rows = self.prompt_row[idx]
        if self.target_context.shape[0] == 1:
            phrasing = torch.zeros_like(rows)
        device = self.target_context.device
        return self.target_context[phrasing.to(device), rows.to(device)]


def draw_batch(data: AnchorData, seed: int, step: int, batch: int, prior: bool, latent_shape) -> dict:
    """Everything random in training step ``step``, a pure function of (seed, step), on the CPU.

    Images: ``batch`` for the ablation loss and, with the prior loss, ``batch`` more from a pass of their own
    (their diffusers batch concatenates instance and class images, utils.py lines 37-40). The generator is left
    where the timesteps and the added noise are drawn (base.noised).
    """
    g = step_generator(seed, step, DRAW_STREAM)
    idx = sample_indices(seed, step * batch, batch, data.n, ORDER_STREAM)
    if prior:
        idx = torch.cat([idx, sample_indices(seed, step * batch, batch, data.n, PRIOR_ORDER_STREAM)])
    n = idx.shape[0]
    flips = torch.rand(n, generator=g) < 0.5
    phrasing = (torch.randint(0, 3, (n,), generator=g) > 0).long()  # style: their r = 0 -> phrasing 0, else 1
    eps = torch.randn((n, *latent_shape[1:]), generator=g)
    return {"idx": idx, "flips": flips, "phrasing": phrasing, "eps": eps, "generator": g, "timesteps": None}


def probe_batch(data: AnchorData, seed: int, count: int, latent_shape, num_train_timesteps: int) -> Optional[dict]:
    """``count`` fixed held-out examples, each twice: under the target and under the anchor prompt; None if 0.

    Their own seed stream, no flips, timesteps spread over the schedule. ``generator`` is made anew for each
    model probed (the same added noise).
    """
    if count <= 0:
        return None
    g = step_generator(seed, 0, PROBE_STREAM)
    idx = sample_indices(seed, 0, count, data.n, PROBE_STREAM)
    eps = torch.randn((count, *latent_shape[1:]), generator=g)
    timesteps = torch.tensor([int((k + 0.5) * num_train_timesteps / count) for k in range(count)])
    return {"idx": idx.repeat(2), "flips": torch.zeros(2 * count, dtype=torch.bool),
            "phrasing": torch.zeros(2 * count, dtype=torch.long), "eps": eps.repeat(2, 1, 1, 1),
            "timesteps": timesteps.repeat(2), "count": count, "seed": seed}


# ---- the loss -----------------------------------------------------------------


def _predict(unet, x, t, context):
    return unet(x, t, encoder_hidden_states=context).sample


def ac_losses(unet, teacher, noise_scheduler, data: AnchorData, draws: dict, batch: int, ablation: str,
              device, parallel: Optional[Parallel] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(ablation loss, prior loss or None) on one batch of draws (train.py lines 1071-1149, without their mask).

    The first ``batch`` images are noised and predicted under the target prompt; the target is the prediction of
    ``teacher`` for the anchor prompt at the same x_t and t (model-based, stop-gradient: train.py lines 1103-1114,
    model.py lines 258-260) or the added noise (noise-based). Images after the first ``batch`` are the prior:
    anchor images under their anchor prompts, the plain denoising loss (train.py lines 1127-1143).

    With several processes (``parallel``) every process draws the whole batch and predicts its rows of each half,
    each half's mean weighted by its share: summed over the processes, the losses and gradients of the whole batch.
    """
    parallel = parallel or Parallel()
    idx, n = draws["idx"], draws["idx"].shape[0]
    latents = data.latents(idx, draws["flips"], draws["eps"]).to(device)
    x_t, t, noise_target = noised(noise_scheduler, latents, draws["generator"], draws["timesteps"])
    mine = parallel.rows(batch)
    rows = torch.arange(batch)[mine]
    prior_rows = batch + torch.arange(n - batch)[parallel.rows(n - batch)] if n > batch else rows[:0]
    kept = len(rows)
    context = data.target(idx[rows], draws["phrasing"][rows])
    if n > batch:
        context = torch.cat([context, data.anchor(idx[prior_rows])])
    both = torch.cat([rows, prior_rows]).to(x_t.device)
    pred = _predict(unet, x_t[both], t[both], context)
    if ablation == "model":
        with torch.no_grad():
            target = _predict(teacher, x_t[rows.to(x_t.device)], t[rows.to(t.device)], data.anchor(idx[rows]))
    else:
        target = noise_target[rows.to(noise_target.device)]
    loss = F.mse_loss(pred[:kept].float(), target.float())
    prior = F.mse_loss(pred[kept:].float(), noise_target[prior_rows.to(x_t.device)].float()) if n > batch else None
    if parallel.world > 1:
        loss = loss * parallel.share(batch)
        prior = prior * parallel.share(n - batch) if prior is not None else None
    return loss, prior


@torch.no_grad()
def probe_objective(unet, teacher, noise_scheduler, data: AnchorData, probe: Optional[dict], ablation: str,
                    device) -> Optional[Dict[str, float]]:
    """The ablation loss and the anchor images' denoising loss on the fixed probes (None: no probes).

    ``teacher`` None: the model probed gives the model-based target, as in training.
    """
    if probe is None:
        return None
    draws = {**probe, "generator": step_generator(probe["seed"], 1, PROBE_STREAM)}
    was = unet.training
    unet.eval()
    try:
        loss, prior = ac_losses(unet, teacher or unet, noise_scheduler, data, draws, probe["count"], ablation,
                                device)
    finally:
        unet.train(was)
    return {"ablation": float(loss), "anchor_denoising": float(prior)}


def train_ac(unet, teacher, noise_scheduler, data: AnchorData, params: Dict[str, torch.Tensor], ablation: str,
             iterations: int, batch: int, learning_rate: float, prior_weight: Optional[float], max_grad_norm: float,
             seed: int, latent_shape, device, progress: bool = True,
             ctx: Optional[RunContext] = None, use_8bit_adam: bool = False) -> Tuple[List[float], List[float]]:
    """AC fine-tuning: AdamW at a constant rate, gradients clipped (train.py lines 932-938, 1175-1187).

    ``prior_weight`` None: no prior loss. ``teacher`` None: the model being trained gives the model-based target
    (their code). Returns the per-step total losses and the prior losses of the steps run in this process.
    """
    optimizer = base.optimizer(list(params.values()), "adamw", use_8bit_adam, lr=learning_rate, **ADAMW)
    prior_losses: List[float] = []
    unet.train()

    parallel = (ctx or RunContext()).parallel

    def step(i: int):
        draws = draw_batch(data, seed, i, batch, prior_weight is not None, latent_shape)
        loss, prior = ac_losses(unet, teacher or unet, noise_scheduler, data, draws, batch, ablation, device,
                                parallel)
        total = loss if prior is None else loss + prior_weight * prior
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        parallel.sum_gradients(params.values())  # the whole batch's gradient on every process
        torch.nn.utils.clip_grad_norm_(list(params.values()), max_grad_norm)
        optimizer.step()
        if prior is None:
            return parallel.sum(total.item())
        prior_losses.append(parallel.sum(prior.item()))
        return parallel.sum(total.item()), {"prior": f"{prior_losses[-1]:.4g}"}

    losses = train_loop(ctx or RunContext(), iterations, step, params, {"optimizer": optimizer}, {}, desc="AC",
                        progress=progress)
    unet.eval()
    return losses, prior_losses


# ---- the method ---------------------------------------------------------------

FLAGS = (  # defaults: their diffusers README's object command on one GPU (docs/unlearning.md: AC)
    Flag("--anchor", None, "the anchor concept the concept is mapped to ('ball' for 'golf ball', 'painting' for "
         "a style)", default_text="required"),
    Flag("--concept_type", "object", "object: target prompts are the anchor prompts with the anchor replaced by "
         "the concept; style: the anchor prompts 'in the style of' the concept", choices=CONCEPT_TYPES),
    Flag("--anchor_prompts", [], "prompts the anchor images are generated from (object: each names --anchor)",
         nargs="+", default_text="the anchor itself"),
    Flag("--anchor_images", 1000, "anchor images generated with the base model, prompts in turn", int),
    Flag("--generation_steps", 25, "sampling steps of the generated anchor images", int),
    Flag("--generation_guidance", 6.0, "classifier-free guidance of the generated anchor images", float),
    Flag("--anchor_data", None, "an imagefolder of anchor images (metadata.jsonl with a 'prompt' column; object: "
         "each prompt names --anchor) instead of generating them", default_text="none: generate them"),
    Flag("--ablation", "model", "model: regress the target prompt's prediction to the model's prediction for the "
         "anchor prompt; noise: the denoising loss of anchor images under target prompts", choices=ABLATIONS),
    Flag("--target_model", "training", "model-based target from the model being trained (stop-gradient, as the "
         "authors' code) or from a frozen copy of the base model", choices=TARGET_MODELS),
    Flag("--train_params", "xattn", "UNet parameters trained: xattn (cross-attention key/value), attn (every "
         "attention projection), full", choices=TRAIN_PARAMS),
    Flag("--regularization", "auto", "the prior loss (anchor images under anchor prompts, denoising); auto: on "
         "when the concept names the anchor", choices=REGULARIZATION),
    Flag("--prior_loss_weight", 1.0, "weight of the prior loss", float),
    Flag("--iterations", 100, "optimizer steps", int),
    Flag("--learning_rate", None, "AdamW learning rate", float,
         default_text="2e-6 x --batch_size, x 2 with the prior loss (their --scale_lr)"),
    Flag("--batch_size", PUBLISHED_BATCH, "images per step for the ablation loss (as many more for the prior loss)",
         int),
    Flag("--max_grad_norm", 1.0, "gradient clipping", float),
    Flag("--no_hflip", False, "no random horizontal flips of the anchor images", switch=True),
    base.RESOLUTION_FLAG,
    Flag("--probe_samples", 4, "fixed held-out anchor images on which the losses are reported before and after; "
         "0: off", int),
    *base.MEMORY_FLAGS,  # --gradient_checkpointing, --use_8bit_adam
)



def _check_prompts(prompts: Sequence[str], settings: dict, where: str) -> None:
    """Object ablation: every anchor prompt names the anchor, the words the concept takes the place of."""
    if settings["concept_type"] != "object":
        return
    for k, p in enumerate(prompts):
        require(mentions(p, settings["anchor"]),
                f"{where}: prompt {p!r}{f' (row {k + 1})' if where.startswith('--anchor_data') else ''} does not "
                f"name --anchor {settings['anchor']!r}; its target prompt puts the concept in the anchor's place")


def check(settings: dict, concept: Optional[str], model_dir: Optional[str]) -> dict:
    """AC's flags: the concept and its anchor, the anchor images, the training settings."""
    require(concept is not None, "--concept: required for --method ac (the concept to ablate)")
    anchor = settings["anchor"]
    require(anchor is not None, "--anchor: required for --method ac (the concept the target is mapped to, e.g. "
                                "'ball' for 'golf ball')")
    check_text(anchor, "--anchor")
    require(anchor.strip().lower() != concept.strip().lower(),
            f"--anchor {anchor!r}: the same as --concept; give the broader concept it is mapped to")
    require(settings["iterations"] >= 1, f"--iterations {settings['iterations']}: must be at least 1")
    require(settings["batch_size"] >= 1, f"--batch_size {settings['batch_size']}: must be at least 1")
    if settings["learning_rate"] is not None:
        finite(settings["learning_rate"], "--learning_rate", 0, strict=True)
    finite(settings["prior_loss_weight"], "--prior_loss_weight", 0, strict=False)
    finite(settings["max_grad_norm"], "--max_grad_norm", 0, strict=True)
    finite(settings["generation_guidance"], "--generation_guidance", 0, strict=False)
    require(settings["generation_steps"] >= 1, f"--generation_steps {settings['generation_steps']}: must be at least 1")
    require(settings["probe_samples"] >= 0, f"--probe_samples {settings['probe_samples']}: must be >= 0")
    check_resolution(settings["resolution"])
    for p in settings["anchor_prompts"]:
        check_text(p, "--anchor_prompts")
    if settings["anchor_data"] is not None:
        require(not settings["anchor_prompts"], "--anchor_prompts: not used with --anchor_data (the folder's prompts "
                                                "are the anchor prompts)")
        images = load_image_set(settings["anchor_data"], "--anchor_data")
        _check_prompts(images.prompts, settings, f"--anchor_data {settings['anchor_data']}")
    else:
        require(settings["anchor_images"] >= 1, f"--anchor_images {settings['anchor_images']}: must be at least 1")
        _check_prompts(settings["anchor_prompts"] or [anchor], settings, "--anchor_prompts")
    check_vae_multiple(settings["resolution"], model_dir)
    return {**settings, "concept": concept}


def anchor_images(settings: dict, parts, seed: int, resolution: int, device, ctx: RunContext, quiet: bool):
    """The anchor images: the --anchor_data folder, or generated by the base model (before any edit).

    Their code generates --num_class_images images from the anchor prompts in turn (train.py lines 704-744) with
    25 DPM-Solver steps at guidance 6 (lines 728-733); ours uses the model's own scheduler.
    """
    if settings["anchor_data"] is not None:
        return load_image_set(settings["anchor_data"], "--anchor_data")
    prompts = settings["anchor_prompts"] or [settings["anchor"]]
    return generate_image_set(parts, prompts, settings["anchor_images"], seed, ctx.data_dir("anchor"), device,
                              num_inference_steps=settings["generation_steps"],
                              guidance_scale=settings["generation_guidance"], resolution=resolution,
                              progress=not quiet, name="anchor", parallel=ctx.parallel)


def run(settings: dict, parts, device, seed: int, quiet: bool, ctx: RunContext) -> dict:
    """Fine-tune the UNet with concept ablation in place; return what the card records."""
    from common.models import vae_scale_factor
    from common.training import select_trainable

    unet = parts.unet
    factor = vae_scale_factor(parts.vae.config)
    resolution = settings["resolution"] or unet.config.sample_size * factor
    latent_shape = (1, unet.config.in_channels, resolution // factor, resolution // factor)
    regularize = regularized(settings["regularization"], settings["anchor"], settings["concept"])
    batch = settings["batch_size"]
    learning_rate = settings["learning_rate"] or default_learning_rate(batch, regularize)

    images = anchor_images(settings, parts, seed, resolution, device, ctx, quiet)
    data = AnchorData(parts, images, settings["anchor"], settings["concept"], settings["concept_type"], resolution,
                      not settings["no_hflip"], device)
    unet.to(device)
    frozen = frozen_copy(unet) if settings["target_model"] == "frozen" and settings["ablation"] == "model" else None
    noise_scheduler = parts.noise_scheduler
    probe = probe_batch(data, seed, settings["probe_samples"], latent_shape,
                        noise_scheduler.config.num_train_timesteps)
    before = probe_objective(unet, None, noise_scheduler, data, probe, settings["ablation"], device)  # the base model
    if settings["gradient_checkpointing"]:
        unet.enable_gradient_checkpointing()
    names = trainable_names(unet, settings["train_params"])
    params = dict(zip(names, select_trainable(unet, names)))
    losses, priors = train_ac(unet, frozen, noise_scheduler, data, params, settings["ablation"],
                              settings["iterations"], batch, learning_rate,
                              settings["prior_loss_weight"] if regularize else None, settings["max_grad_norm"], seed,
                              latent_shape, device, progress=not quiet, ctx=ctx,
                              use_8bit_adam=settings["use_8bit_adam"])
    after = probe_objective(unet, frozen, noise_scheduler, data, probe, settings["ablation"], device)
    if settings["gradient_checkpointing"]:
        unet.disable_gradient_checkpointing()
    del frozen
    unet.requires_grad_(False).to("cpu")
    tail = losses[-max(1, len(losses) // 10):]
    return {
        "trained_parameters": {"tensors": len(params), "numel": sum(p.numel() for p in params.values())},
        "loss": {"first": losses[0] if losses else None, "last": losses[-1] if losses else None,
                 "mean_last_10pct": sum(tail) / len(tail) if tail else None,
                 "prior_last": priors[-1] if priors else None},
        "objective_on_probes": {"samples": settings["probe_samples"], "before": before, "after": after},
        "target_prompts": data.target_prompts[:20],
        "latent_shape": list(latent_shape),
        GUIDE: [settings["anchor"]],
        DATA: {"anchor": images.card()},
        RESOLVED: {"resolution": resolution, "learning_rate": learning_rate,
                   "regularization": "on" if regularize else "off"},
    }


def _erased(settings: dict) -> List[str]:
    return [settings["concept"]]


register(Method(name="ac", family="AC", summary="Concept Ablation: the concept's prompts mapped to an anchor's",
                paper=PAPER, code=CODE, flags=FLAGS, check=check, run=run, erased=_erased, trains=True,
                checkpoint_every=50, multi_gpu=True))  # their README: accelerate launch, 2 GPUs recommended
