"""ESD: Gandikota et al., ICCV 2023, "Erasing Concepts from Diffusion Models" (docs/unlearning.md: ESD).

https://arxiv.org/abs/2303.07345 (code: https://github.com/rohitgandikota/erasing). Two methods, one
training: esd-x trains the UNet's cross-attention, esd-u everything else.
"""

from __future__ import annotations

import random
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from common import numerics

from . import base, register
from .base import (Flag, Method, RESOLVED, RunContext, finite, frozen_copy, loss_summary, require, train_loop)

ESD_METHODS = ("esd-x", "esd-u")
PAPER = "Gandikota et al., ICCV 2023, https://arxiv.org/abs/2303.07345"
CODE = "https://github.com/rohitgandikota/erasing"


def esd_trainable_names(unet: torch.nn.Module, method: str) -> List[str]:
    """UNet parameter names ESD trains: ESD-x only cross-attention ('attn2'), ESD-u everything else.

    The paper's split: ESD-x edits the prompt-dependent cross-attention
    so the erasure stays specific to the prompt; ESD-u edits the rest so it
    holds whatever the prompt says.
    """
    if method not in ESD_METHODS:
        raise ValueError(f"unknown ESD method {method!r}")
    names = [n for n, _ in unet.named_parameters()]
    if method == "esd-x":
        return [n for n in names if "attn2" in n]
    return [n for n in names if "attn2" not in n]


def esd_target(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, eta: float) -> torch.Tensor:
    """ESD's target: eps(x_t) - eta * (eps(x_t, c) - eps(x_t)), negative guidance away from the concept."""
    return eps_uncond - eta * (eps_cond - eps_uncond)


def make_ddim(scheduler_config, ddim_steps: int):
    """A DDIM scheduler with the model's noise schedule, set to ``ddim_steps`` sampling steps."""
    from diffusers import DDIMScheduler

    scheduler = numerics.portable_scheduler(DDIMScheduler.from_config(scheduler_config))
    scheduler.set_timesteps(ddim_steps)
    return scheduler


def _predict(unet, latents, t, context):
    return unet(latents, t, encoder_hidden_states=context.expand(latents.shape[0], -1, -1)).sample


@torch.no_grad()
def ddim_partial_sample(unet, scheduler, noise: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                        steps: int, guidance: float) -> torch.Tensor:
    """Run the first ``steps`` DDIM steps from ``noise`` with classifier-free guidance; return x_t.

    ESD trains on latents the model itself would produce for the concept (not
    on noised data images): it needs no data set, only the prompt.
    """
    latents = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps[:steps]:
        x = scheduler.scale_model_input(latents, t)
        if guidance == 1.0:
            eps = _predict(unet, x, t, cond)
        else:
            e_u, e_c = _predict(unet, torch.cat([x, x]), t, torch.cat([uncond, cond])).chunk(2)
            eps = e_u + guidance * (e_c - e_u)
        latents = scheduler.step(eps, t, latents).prev_sample
    return latents


@torch.no_grad()
def frozen_esd_target(frozen, latents: torch.Tensor, t, cond: torch.Tensor, uncond: torch.Tensor,
                      eta: float) -> torch.Tensor:
    """The ESD target at (x_t, t) from the frozen model's unconditional and concept-conditioned predictions."""
    e_u, e_c = _predict(frozen, torch.cat([latents, latents]), t, torch.cat([uncond, cond])).chunk(2)
    return esd_target(e_u, e_c, eta)


def esd_example(frozen, scheduler, noise: torch.Tensor, step_index: int, cond, uncond, guidance: float,
                eta: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One training example (x_t, t, target): ``step_index`` DDIM steps from ``noise``, then the target at t.

    t is the timestep the sampler would denoise next, the noise level x_t really
    has (as in the authors' diffusers rewrite, esd_sd.py; their first CompVis
    script drew a DDPM timestep from the mirrored bin instead).
    """
    latents = ddim_partial_sample(frozen, scheduler, noise, cond, uncond, step_index, guidance)
    t = scheduler.timesteps[step_index]
    return latents, t, frozen_esd_target(frozen, latents, t, cond, uncond, eta)


def esd_probe_set(frozen, scheduler, cond, uncond, count: int, latent_shape, seed: int, guidance: float,
                  eta: float, device) -> List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``count`` fixed held-out examples, step indices spread over the schedule, for the ESD objective."""
    generator = torch.Generator("cpu").manual_seed(seed)
    steps = len(scheduler.timesteps)
    probes = []
    for k in range(count):
        step_index = (k * steps) // max(count, 1)
        probes.append(esd_example(frozen, scheduler, base.noise(latent_shape, generator, device), step_index,
                                  cond, uncond, guidance, eta))
    return probes


@torch.no_grad()
def esd_objective(unet, probes, cond: torch.Tensor) -> float:
    """Mean MSE of the model's concept-conditioned prediction to the ESD target over fixed examples."""
    if not probes:
        return float("nan")
    losses = [F.mse_loss(_predict(unet, z, t, cond).float(), target.float()).item() for z, t, target in probes]
    return sum(losses) / len(losses)


def train_esd(unet, frozen, scheduler, cond: torch.Tensor, uncond: torch.Tensor, params, iterations: int,
              learning_rate: float, eta: float, guidance: float, latent_shape, seed: int, device,
              progress: bool = True, ctx: Optional[RunContext] = None, use_8bit_adam: bool = False) -> List[float]:
    """ESD fine-tuning: per iteration, sample x_t with the frozen model, regress the concept prediction to the target.

    One example per iteration, Adam, MSE, as in both reference scripts. Returns
    the per-iteration losses. ``ctx``: checkpoints and resume (base.train_loop).
    """
    optimizer = base.optimizer(params, "adam", use_8bit_adam, lr=learning_rate)
    rng = random.Random(seed)  # step indices
    generator = torch.Generator("cpu").manual_seed(seed)  # starting noise
    steps = len(scheduler.timesteps)
    unet.train()

    def step(it: int):
        step_index = rng.randrange(steps)
        z, t, target = esd_example(frozen, scheduler, base.noise(latent_shape, generator, device), step_index,
                                   cond, uncond, guidance, eta)
        loss = F.mse_loss(_predict(unet, z, t, cond).float(), target.float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item(), {"t": int(t)}

    trained = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    losses = train_loop(ctx or RunContext(), iterations, step, trained, {"optimizer": optimizer},
                        {"step_index": rng, "noise": generator}, desc="ESD", progress=progress)
    unet.eval()
    return losses


# ---- the method ---------------------------------------------------------------

FLAGS = (  # esd-x and esd-u share them; defaults: the paper's and its CompVis script's
    Flag("--eta", 1.0, "negative guidance strength", float),
    Flag("--iterations", 1000, "training iterations, one example each", int),
    Flag("--learning_rate", 1e-5, "Adam learning rate", float),
    Flag("--ddim_steps", 50, "DDIM steps of the schedule x_t is sampled on; each iteration stops at a random one",
         int),
    Flag("--sample_guidance", 3.0, "classifier-free guidance when sampling x_t with the frozen model", float),
    base.RESOLUTION_FLAG,
    Flag("--probe_samples", 4, "fixed held-out examples on which the ESD objective is reported before and after; "
         "0: off", int),
    *base.MEMORY_FLAGS,  # --gradient_checkpointing, --use_8bit_adam
)


def check(settings: dict, concept: Optional[str], model_dir: Optional[str]) -> dict:
    """ESD's flags, and against the model's own configuration when it is local."""
    require(concept is not None, "--concept: required for ESD")
    finite(settings["eta"], "--eta", 0, strict=False)
    require(settings["iterations"] >= 1, f"--iterations {settings['iterations']}: must be at least 1")
    finite(settings["learning_rate"], "--learning_rate", 0, strict=True)
    require(settings["ddim_steps"] >= 1, f"--ddim_steps {settings['ddim_steps']}: must be at least 1")
    finite(settings["sample_guidance"], "--sample_guidance", 0, strict=False)
    require(settings["probe_samples"] >= 0, f"--probe_samples {settings['probe_samples']}: must be >= 0")
    base.check_sampled_training(settings["resolution"], settings["ddim_steps"], model_dir)
    return {**settings, "concept": concept}


def run(settings: dict, parts, device, seed: int, quiet: bool, ctx: RunContext) -> dict:
    """Train the UNet with ESD in place; return what the card records."""
    from common.data import encode_prompts
    from common.models import vae_scale_factor
    from common.training import select_trainable

    unet = parts.unet.to(device)
    frozen = frozen_copy(unet)
    parts.text_encoder.to(device)
    cond, uncond = encode_prompts(parts.tokenizer, parts.text_encoder, [settings["concept"], ""], device).chunk(2)
    parts.text_encoder.to("cpu")
    factor = vae_scale_factor(parts.vae.config)
    resolution = settings["resolution"] or unet.config.sample_size * factor
    latent_shape = (1, unet.config.in_channels, resolution // factor, resolution // factor)
    scheduler = make_ddim(parts.inference_scheduler.config, settings["ddim_steps"])
    if settings["gradient_checkpointing"]:
        unet.enable_gradient_checkpointing()

    names = esd_trainable_names(unet, settings["variant"])
    params = select_trainable(unet, names)
    # Held-out: their own seed stream, fixed before training (the frozen model makes them).
    probes = esd_probe_set(frozen, scheduler, cond, uncond, settings["probe_samples"], latent_shape, seed + 1,
                           settings["sample_guidance"], settings["eta"], device)
    before = esd_objective(unet, probes, cond)
    losses = train_esd(unet, frozen, scheduler, cond, uncond, params, iterations=settings["iterations"],
                       learning_rate=settings["learning_rate"], eta=settings["eta"],
                       guidance=settings["sample_guidance"], latent_shape=latent_shape, seed=seed, device=device,
                       progress=not quiet, ctx=ctx, use_8bit_adam=settings["use_8bit_adam"])
    after = esd_objective(unet, probes, cond)
    if settings["gradient_checkpointing"]:
        unet.disable_gradient_checkpointing()
    del frozen
    unet.requires_grad_(False).to("cpu")
    return {
        "trained_parameters": {"tensors": len(params), "numel": sum(p.numel() for p in params)},
        "loss": loss_summary(losses),
        "objective_on_probes": {"samples": settings["probe_samples"], "before": before if probes else None,
                                "after": after if probes else None},
        "latent_shape": list(latent_shape),
        RESOLVED: {"resolution": resolution},  # the card's hyperparameter, resolved from the model when not given
    }


def _erased(settings: dict) -> List[str]:
    return [settings["concept"]]


for _variant, _summary in (("esd-x", "ESD on cross-attention"), ("esd-u", "ESD on everything else")):
    register(Method(name=_variant, family="ESD", summary=_summary, paper=PAPER, code=CODE, flags=FLAGS, check=check,
                    run=run, erased=_erased, fixed={"variant": _variant}, trains=True, checkpoint_every=100))
