"""EraseDiff: Wu et al., 2024, "EraseDiff: Erasing Data Influence in Diffusion Models" (docs/unlearning.md: EraseDiff).

https://arxiv.org/abs/2401.05779 (CVPR 2025 as "Erasing Undesirable Influence in Diffusion Models"; code:
https://github.com/JingWu321/EraseDiff, its sd/ part). Trains the UNet on two data sets: images of the concept
(the forget set), whose noise prediction is pulled to a target that is not the added noise, and other images (the
retain set), whose denoising loss is kept. The constrained problem min L_r s.t. L_f(theta) <= min L_f is solved
with BOME's first-order step: K forgetting steps give the reference value L_f(theta^K), then one step on
L_r + lambda (L_f(theta) - L_f(theta^K)).

Their code is cited as "FILE line N" of JingWu321/EraseDiff at commit 14f4e98 (its newest), or at the commit named.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from common.cli import check_resolution

from . import base, register
from .base import (DATA, RESOLVED, Flag, ImageSet, Method, RunContext, check_text, check_vae_multiple, encode, finite,
                   generate_image_set, image_latents, load_image_set, loss_summary, noised, require,
                   step_generator, train_loop)

PAPER = ("Wu, Le, Hayat, Harandi, arXiv 2024 (CVPR 2025 as \"Erasing Undesirable Influence in Diffusion Models\"), "
         "https://arxiv.org/abs/2401.05779")
CODE = "https://github.com/JingWu321/EraseDiff"

# Their --train_method choices (erasediff_nsfw.py lines 86-123, ESD's list), in their order.
TRAIN_METHODS = ("noxattn", "selfattn", "xattn", "full", "notime", "xlayer", "selflayer")
# The CompVis blocks of "xlayer" (output_blocks.6 and .8) and "selflayer" (input_blocks.4 and .7) under their
# diffusers names: SD-1.x has two resnets per level, so output_blocks 6..8 are up_blocks.2 and input_blocks 4, 7
# are the first attention of down_blocks.1 and .2.
XLAYER_BLOCKS = ("up_blocks.2.attentions.0.", "up_blocks.2.attentions.2.")
SELFLAYER_BLOCKS = ("down_blocks.1.attentions.0.", "down_blocks.2.attentions.0.")
# CompVis "time_embed" and "out." (the final norm and conv) under their diffusers names.
TIME_AND_OUT = ("time_embedding.", "conv_norm_out.", "conv_out.")

FORGET_TARGETS = ("uniform", "prompt")
PROBE_STREAM = 0x6572617365  # "erase": the fixed probe batches' seed stream, apart from the training draws
RETAIN_SEED_OFFSET = 1  # generated retain images use seed + 1, so their noises are not the forget images'


def trainable_names(unet: torch.nn.Module, method: str) -> List[str]:
    """UNet parameter names their ``--train_method`` trains (erasediff_nsfw.py lines 86-123), in diffusers names."""
    names = [n for n, _ in unet.named_parameters()]
    rules: Dict[str, Callable[[str], bool]] = {
        # "all layers except x-attns and time_embed layers" (and the output layers: their name test is "out.").
        "noxattn": lambda n: "attn2" not in n and not n.startswith(TIME_AND_OUT),
        "selfattn": lambda n: "attn1" in n,
        "xattn": lambda n: "attn2" in n,
        "full": lambda n: True,
        "notime": lambda n: not n.startswith(TIME_AND_OUT),
        "xlayer": lambda n: "attn2" in n and n.startswith(XLAYER_BLOCKS),
        "selflayer": lambda n: "attn1" in n and n.startswith(SELFLAYER_BLOCKS),
    }
    if method not in rules:
        raise ValueError(f"unknown train method {method!r}")
    return [n for n in names if rules[method](n)]


# ---- data ---------------------------------------------------------------------


@dataclass
class EncodedSet:
    """An image set as training reads it: VAE posterior per image (CPU) and the embedding of each image's prompt."""

    mean: torch.Tensor  # [n, c, h, w], latent scale
    std: torch.Tensor
    prompt_ids: torch.Tensor  # [n] index into contexts
    contexts: torch.Tensor  # [prompts, tokens, d]

    def __len__(self) -> int:
        return self.mean.shape[0]

    def batch(self, size: int, generator: torch.Generator, device):
        """``size`` images without replacement (all of them when fewer): latents sampled from the posterior, prompts.

        Their get_input samples the posterior (LatentDiffusion.get_first_stage_encoding); their loaders, unshuffled,
        gave the first batch every time (dataset.py lines 203, 206 with next(iter(...)) in erasediff_nsfw.py
        lines 155, 205-206): we draw a new batch each step so every image is used.
        """
        idx = torch.randperm(len(self), generator=generator)[:size]
        eps = torch.randn(self.mean[idx].shape, generator=generator)
        latents = self.mean[idx] + self.std[idx] * eps
        return latents.to(device), self.contexts[self.prompt_ids[idx]].to(device)


def encode_set(parts, images: ImageSet, resolution: int, device) -> EncodedSet:
    """VAE posteriors of every image and the text embeddings of its prompts."""
    mean, std = image_latents(parts, images, resolution, device)
    prompts = sorted(set(images.prompts))
    index = {p: i for i, p in enumerate(prompts)}
    ids = torch.tensor([index[p] for p in images.prompts])
    return EncodedSet(mean, std, ids, encode(parts, prompts, device).cpu())


def image_set(parts, settings: dict, role: str, seed: int, resolution: int, device, ctx: RunContext,
              progress: bool) -> ImageSet:
    """The ``role`` ("forget" or "retain") set: the folder given, or images the base model generates for its prompts."""
    folder = settings[f"{role}_data"]
    if folder is not None:
        return load_image_set(folder, f"--{role}_data")
    prompts = settings[f"{role}_prompts"]
    return generate_image_set(parts, prompts, settings[f"{role}_images"], seed,
                              ctx.data_dir(role), device, num_inference_steps=settings["generation_steps"],
                              guidance_scale=settings["generation_guidance"], resolution=resolution,
                              progress=progress, name=role)


# ---- the losses -----------------------------------------------------------------


def _predict(unet, x_t, t, context):
    return unet(x_t, t, encoder_hidden_states=context).sample


def retain_loss(unet, noise_scheduler, latents, context, generator) -> torch.Tensor:
    """L_r: the DDPM loss on retained images (their model.shared_step, erasediff_nsfw.py line 209)."""
    x_t, t, target = noised(noise_scheduler, latents, generator)
    return F.mse_loss(_predict(unet, x_t, t, context).float(), target.float())


def forget_target(unet, x_t, t, generator, mode: str, pseudo_context: Optional[torch.Tensor]) -> torch.Tensor:
    """What the forget images' prediction is pulled to: uniform noise, or the model's prediction for a pseudo prompt.

    "uniform": U[0, 1) noise drawn anew (torch.rand, erasediff_nsfw_n.py lines 176, 182 and 231, 238 at c3fe211),
    instead of the Gaussian noise the image was noised with. "prompt": the current model's detached prediction
    at the same x_t for ``pseudo_context`` (erasediff_nsfw.py lines 161-182, "a photo of a pokemon").
    """
    if mode == "uniform":
        return torch.rand(x_t.shape, generator=generator).to(x_t.device, x_t.dtype)
    if mode == "prompt":
        with torch.no_grad():
            return _predict(unet, x_t, t, pseudo_context.expand(x_t.shape[0], -1, -1))
    raise ValueError(f"unknown forget target {mode!r}")


def forget_loss(unet, noise_scheduler, latents, context, generator, mode: str = "uniform",
                pseudo_context: Optional[torch.Tensor] = None) -> torch.Tensor:
    """L_f: MSE of the prediction on noised forget images (Gaussian noise, their q_sample) to ``forget_target``."""
    x_t, t, _ = noised(noise_scheduler, latents, generator)
    goal = forget_target(unet, x_t, t, generator, mode, pseudo_context)
    return F.mse_loss(_predict(unet, x_t, t, context).float(), goal.float())


def outer_objective(loss_r: torch.Tensor, loss_f: torch.Tensor, reference: float, lambda_bome: float) -> torch.Tensor:
    """L_r + lambda * q with q = L_f(theta) - L_f(theta^K) (erasediff_nsfw.py lines 240, 281).

    The reference is a number, not a function of theta (their .detach()): the first-order approximation, in which
    the gradient of q is that of L_f at theta.
    """
    return loss_r + lambda_bome * (loss_f - reference)


def set_lr(optimizer, lr: float) -> None:
    """Every parameter group's learning rate (the inner and outer steps share one optimizer)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def inner_phase(params: Sequence[torch.nn.Parameter], optimizer, steps: int, lr: float,
                loss_fn: Callable[[], torch.Tensor]) -> List[float]:
    """K forgetting steps from theta_i, then theta_i back; returns their losses (the reference of q is their mean).

    As their code: get_param/set_param (erasediff_nsfw.py lines 149, 198) restore the parameters only, so the
    optimizer's state (Adam's moments and step count) keeps the inner steps, and the inner steps use the outer
    steps' optimizer (line 128).
    """
    saved = [p.detach().clone() for p in params]
    set_lr(optimizer, lr)
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    return losses


class History:
    """Each outer step's losses, checkpointed with the optimizer (train_loop's ``stateful``) so a resume keeps them."""

    KEYS = ("retain", "forget", "reference", "q")

    def __init__(self):
        self.values: Dict[str, List[float]] = {k: [] for k in self.KEYS}

    def add(self, **values: float) -> None:
        for k in self.KEYS:
            self.values[k].append(float(values[k]))

    def state_dict(self) -> dict:
        return {k: list(v) for k, v in self.values.items()}

    def load_state_dict(self, state: dict) -> None:
        self.values = {k: list(state[k]) for k in self.KEYS}


@dataclass
class Trainer:
    """EraseDiff's step on a UNet: the inner forgetting steps, then the outer step (base.train_loop calls ``step``)."""

    unet: torch.nn.Module
    noise_scheduler: object
    forget: EncodedSet
    retain: EncodedSet
    params: List[torch.nn.Parameter]
    optimizer: object
    settings: dict
    seed: int
    device: object
    pseudo_context: Optional[torch.Tensor] = None

    def __post_init__(self):
        self.history = History()

    def _forget_loss(self, generator) -> torch.Tensor:
        z, c = self.forget.batch(self.settings["batch_size"], generator, self.device)
        return forget_loss(self.unet, self.noise_scheduler, z, c, generator, self.settings["forget_target"],
                           self.pseudo_context)

    def step(self, i: int):
        """Outer step ``i``; every draw from step_generator(seed, i), so a resumed run needs no generator state."""
        s = self.settings
        generator = step_generator(self.seed, i)
        inner = inner_phase(self.params, self.optimizer, s["inner_steps"], s["inner_learning_rate"],
                            lambda: self._forget_loss(generator))
        reference = sum(inner) / len(inner)  # their AverageMeter over the inner steps (line 193)
        set_lr(self.optimizer, s["learning_rate"])
        z, c = self.retain.batch(s["batch_size"], generator, self.device)
        loss_r = retain_loss(self.unet, self.noise_scheduler, z, c, generator)
        loss_f = self._forget_loss(generator)
        loss = outer_objective(loss_r, loss_f, reference, s["lambda_bome"])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        q = loss_f.item() - reference
        self.history.add(retain=loss_r.item(), forget=loss_f.item(), reference=reference, q=q)
        return loss.item(), {"r": f"{loss_r.item():.4g}", "q": f"{q:.3g}"}


@torch.no_grad()
def probe_objectives(trainer: Trainer, samples: int) -> Optional[dict]:
    """L_r and L_f on fixed batches (the same images, noise and timesteps at every call), eval mode; None when off."""
    if samples <= 0:
        return None
    was_training = trainer.unet.training
    trainer.unet.eval()
    try:
        generator = step_generator(trainer.seed, 0, PROBE_STREAM)
        z, c = trainer.forget.batch(samples, generator, trainer.device)
        loss_f = forget_loss(trainer.unet, trainer.noise_scheduler, z, c, generator,
                             trainer.settings["forget_target"], trainer.pseudo_context)
        z, c = trainer.retain.batch(samples, generator, trainer.device)
        loss_r = retain_loss(trainer.unet, trainer.noise_scheduler, z, c, generator)
    finally:
        trainer.unet.train(was_training)
    return {"forget": loss_f.item(), "retain": loss_r.item(),
            "objective": loss_r.item() + trainer.settings["lambda_bome"] * loss_f.item()}


# ---- the method ---------------------------------------------------------------

FLAGS = (  # defaults: their SD nudity run (README.md, sd/train_scripts/train_nsfw.sh line 4); docs/unlearning.md
    Flag("--forget_data", None, "imagefolder (metadata.jsonl with a 'prompt' column) of images of the concept; "
         "default: generated by the base model from --forget_prompts", default_text="generated"),
    Flag("--forget_prompts", None, "prompts the forget images are generated from (without --forget_data)", nargs="+",
         default_text="the --concept"),
    Flag("--retain_data", None, "imagefolder of images to keep (a 'prompt' column); or give --retain_prompts",
         default_text="generated"),
    Flag("--retain_prompts", None, "prompts the retain images are generated from (required without --retain_data)",
         nargs="+"),
    Flag("--forget_images", 1000, "forget images the base model generates, prompts in turn", int),
    Flag("--retain_images", 250, "retain images the base model generates, prompts in turn", int),
    Flag("--generation_steps", 50, "denoising steps when generating the data sets", int),
    Flag("--generation_guidance", 7.5, "classifier-free guidance when generating the data sets", float),
    Flag("--iterations", 160, "outer steps (each after --inner_steps forgetting steps)", int),
    Flag("--inner_steps", 2, "forgetting steps K before each outer step (their --K_steps)", int),
    Flag("--learning_rate", 1e-5, "Adam learning rate of the outer steps (their --lr)", float),
    Flag("--inner_learning_rate", None, "learning rate of the inner forgetting steps (same Adam)", float,
         default_text="the --learning_rate"),
    Flag("--lambda_bome", 1.0, "weight of the constraint q = L_f(theta) - L_f(theta^K) in the outer step", float),
    Flag("--batch_size", 16, "forget and retain images per step (each)", int),
    Flag("--train_method", "noxattn", "UNet parameters trained, their names: " + ", ".join(TRAIN_METHODS) +
         " (noxattn: all but cross-attention, time embedding and output layers)"),
    Flag("--forget_target", "uniform", "what the forget images' prediction is pulled to: uniform U[0,1) noise, or "
         "the model's prediction for --pseudo_prompt", choices=FORGET_TARGETS),
    Flag("--pseudo_prompt", ["a photo of a pokemon"], "the prompt of --forget_target prompt (one)", nargs="+"),
    base.RESOLUTION_FLAG,
    Flag("--probe_samples", 4, "images per set in the fixed batches on which L_f and L_r are reported before and "
         "after; 0: off", int),
    *base.MEMORY_FLAGS,  # --gradient_checkpointing, --use_8bit_adam
)


def _check_set(settings: dict, role: str, required_prompts: bool) -> None:
    """A set is a folder (read now: a missing or empty one stops here) or prompts, not both."""
    folder, prompts = settings[f"{role}_data"], settings[f"{role}_prompts"]
    require(folder is None or prompts is None, f"--{role}_prompts: give --{role}_data or --{role}_prompts, not both")
    if folder is not None:
        load_image_set(folder, f"--{role}_data")
        return
    require(prompts is not None or not required_prompts,
            f"--{role}_prompts: required without --{role}_data (images to keep, e.g. other concepts)")
    for p in prompts or []:
        check_text(p, f"--{role}_prompts")


def check(settings: dict, concept: Optional[str], model_dir: Optional[str]) -> dict:
    """EraseDiff's flags; the data folders are read here, before any model loads."""
    require(concept is not None, "--concept: required for EraseDiff (the erased concept; the forget prompt by default)")
    require(settings["train_method"] in TRAIN_METHODS,
            f"--train_method {settings['train_method']}: must be one of {', '.join(TRAIN_METHODS)}")
    for flag in ("iterations", "inner_steps", "batch_size", "forget_images", "retain_images", "generation_steps"):
        require(settings[flag] >= 1, f"--{flag} {settings[flag]}: must be at least 1")
    finite(settings["learning_rate"], "--learning_rate", 0, strict=True)
    if settings["inner_learning_rate"] is not None:
        finite(settings["inner_learning_rate"], "--inner_learning_rate", 0, strict=True)
    # Their negative lambda_bome switched to BOME's adaptive weight (erasediff_nsfw.py lines 242-278), which needs
    # an --eta_bome their SD script never defines; not implemented here.
    finite(settings["lambda_bome"], "--lambda_bome", 0, strict=True)
    finite(settings["generation_guidance"], "--generation_guidance", 0, strict=False)
    require(settings["probe_samples"] >= 0, f"--probe_samples {settings['probe_samples']}: must be >= 0")
    require(len(settings["pseudo_prompt"]) == 1, "--pseudo_prompt: one prompt for EraseDiff")
    check_text(settings["pseudo_prompt"][0], "--pseudo_prompt")
    check_resolution(settings["resolution"])
    check_vae_multiple(settings["resolution"], model_dir)
    _check_set(settings, "forget", required_prompts=False)
    _check_set(settings, "retain", required_prompts=True)
    if settings["forget_data"] is None and settings["forget_prompts"] is None:
        settings = {**settings, "forget_prompts": [concept]}
    return {**settings, "concept": concept}


_summary = loss_summary


def run(settings: dict, parts, device, seed: int, quiet: bool, ctx: RunContext) -> dict:
    """Train the UNet with EraseDiff in place; return what the card records."""
    from common.models import vae_scale_factor
    from common.training import select_trainable

    unet = parts.unet
    names = trainable_names(unet, settings["train_method"])
    require(bool(names), f"--train_method {settings['train_method']}: selects no parameter of this UNet (it names "
                         "SD-1.x blocks)")
    resolution = settings["resolution"] or unet.config.sample_size * vae_scale_factor(parts.vae.config)
    inner_lr = settings["inner_learning_rate"] or settings["learning_rate"]
    settings = {**settings, "inner_learning_rate": inner_lr}

    # The data first, with the base model (generated sets are kept in OUTPUT_DIR/unlearn_data/ and reused on resume).
    sets = {role: image_set(parts, settings, role, seed + offset, resolution, device, ctx, not quiet)
            for role, offset in (("forget", 0), ("retain", RETAIN_SEED_OFFSET))}
    for role, images in sets.items():
        ctx.log(f"{role} set: {len(images.paths)} images, {len(set(images.prompts))} prompts ({images.folder})")
    encoded = {role: encode_set(parts, images, resolution, device) for role, images in sets.items()}
    pseudo = encode(parts, settings["pseudo_prompt"], device) if settings["forget_target"] == "prompt" else None

    unet.to(device)
    params = select_trainable(unet, names)
    if settings["gradient_checkpointing"]:
        unet.enable_gradient_checkpointing()
    # Their torch.optim.Adam (line 128).
    optimizer = base.optimizer(params, "adam", settings["use_8bit_adam"], lr=settings["learning_rate"])
    trainer = Trainer(unet, parts.noise_scheduler, encoded["forget"], encoded["retain"], params, optimizer, settings,
                      seed, device, pseudo)
    before = probe_objectives(trainer, settings["probe_samples"])
    unet.train()
    trained = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    losses = train_loop(ctx, settings["iterations"], trainer.step, trained,
                        {"optimizer": optimizer, "history": trainer.history}, desc="EraseDiff", progress=not quiet)
    after = probe_objectives(trainer, settings["probe_samples"])
    if settings["gradient_checkpointing"]:
        unet.disable_gradient_checkpointing()
    unet.requires_grad_(False).eval().to("cpu")
    history = trainer.history.values
    return {
        "trained_parameters": {"tensors": len(params), "numel": sum(p.numel() for p in params)},
        "loss": _summary(losses),
        "retain_loss": _summary(history["retain"]),
        "forget_loss": _summary(history["forget"]),
        "constraint_q": _summary(history["q"]),
        "objective_on_probes": {"samples": settings["probe_samples"], "before": before, "after": after},
        "latent_shape": [settings["batch_size"], *encoded["forget"].mean.shape[1:]],
        RESOLVED: {"resolution": resolution, "inner_learning_rate": inner_lr},
        DATA: {role: images.card() for role, images in sets.items()},
    }


def _erased(settings: dict) -> List[str]:
    prompts = [settings["concept"]] + list(settings.get("forget_prompts") or [])
    return list(dict.fromkeys(prompts))


register(Method(name="erasediff", family="EraseDiff",
                summary="EraseDiff: forget images pulled to noise, retain images kept (first-order bi-level)",
                paper=PAPER, code=CODE, flags=FLAGS, check=check, run=run, erased=_erased, trains=True,
                checkpoint_every=100))
