"""Receler: Huang et al., ECCV 2024, "Receler: Reliable Concept Erasing of Text-to-Image Diffusion Models via
Lightweight Erasers" (docs/unlearning.md: Receler).

https://arxiv.org/abs/2311.17717 (code: https://github.com/jasper0314-huang/Receler). The UNet stays frozen; a
small eraser after every cross-attention layer learns ESD's negative-guidance target for the concept, a
regulariser keeps each eraser's output at zero outside the region the concept's words attend to, and adversarial
prompt embeddings, learned in turns with the erasers, look for prompts the erasers miss. Our reading of their
code is cited as "train.py line N" (train_receler.py), "concept_reg.py", "erasers/utils.py" of
jasper0314-huang/Receler at 00ba63e.

The published eraser is ``up(GELU(down(o)))`` added to the cross-attention output ``o``: nonlinear, so no
diffusers UNet can hold it. Ours drops the GELU: ``o + up(down(o))`` is linear in ``o`` and folds exactly into
``attn2.to_out.0`` when the model is written (``fuse_eraser``), so the output loads with plain diffusers.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from common import numerics
from common.errors import InputError

from . import base, register
from .base import (RESOLVED, Flag, Method, RunContext, check_text, encode, finite, loss_summary, require,
                   step_generator, train_loop, check_sampled_training)
from .esd import ddim_partial_sample, esd_objective, esd_probe_set, esd_target, make_ddim

PAPER = "Huang et al., ECCV 2024, https://arxiv.org/abs/2311.17717"
CODE = "https://github.com/jasper0314-huang/Receler"

PUBLISHED_MASK_RESOLUTION = 16  # concept_reg.py: "following MasaCtrl, we only use 16 x 16 cross attn maps"
ADV_WEIGHT_DECAY = 0.1  # train.py line 106: Adam(lr=0.1, weight_decay=0.1) for the adversarial embeddings
MASK_EPS = 1e-9  # train.py line 184: the regulariser's denominator guard
ERASE_ON = ("adversarial", "concept", "both")
# Seed streams of step_generator: the eraser initialisation, the adversarial start, each step's draws.
INIT_STREAM, ADV_STREAM, STEP_STREAM = 1, 2, 0


# ---- the eraser ---------------------------------------------------------------


class Eraser(nn.Module):
    """A low-rank linear eraser: ``up(down(o))`` is added to the cross-attention output ``o``.

    As the published AdapterEraser (erasers/utils.py) without its GELU: ``down`` with nn.Linear's initialisation,
    ``up`` zero, so a new eraser changes nothing.
    """

    def __init__(self, dim: int, rank: int, generator: torch.Generator):
        super().__init__()
        self.down = nn.Linear(dim, rank)
        self.up = nn.Linear(rank, dim)
        bound = 1.0 / math.sqrt(dim)  # nn.Linear's kaiming_uniform(a=sqrt(5)) bound, drawn from our generator
        with torch.no_grad():
            self.down.weight.uniform_(-bound, bound, generator=generator)
            self.down.bias.uniform_(-bound, bound, generator=generator)
            self.up.weight.zero_()
            self.up.bias.zero_()

    def forward(self, o: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(o))


def eraser_sites(unet: nn.Module) -> Dict[str, nn.Module]:
    """Module name -> cross-attention (``attn2``) of every transformer block: where the published erasers sit."""
    from diffusers.models.attention_processor import Attention

    sites = {n: m for n, m in unet.named_modules() if n.endswith("attn2") and isinstance(m, Attention)}
    for name, attn in sites.items():
        # The eraser acts on attn2's output; it is that of to_out.0 only without a residual or a rescale after it.
        if attn.residual_connection or attn.rescale_output_factor != 1.0 or not isinstance(attn.to_out[0], nn.Linear):
            raise InputError(f"--method receler: {name} adds a residual or rescales after to_out; the eraser cannot "
                             "be folded into it")
    return sites


def eraser_values(unet: nn.Module, rank: int) -> int:
    """How many values the erasers of ``unet`` at ``rank`` train (down and up weights and biases per site)."""
    return sum(2 * a.to_out[0].out_features * rank + rank + a.to_out[0].out_features
               for a in eraser_sites(unet).values())


def make_erasers(sites: Dict[str, nn.Module], rank: int, seed: int, device) -> nn.ModuleDict:
    """One Eraser per site (keys: the site's name with '.' as '-'), initialised from ``seed``."""
    generator = step_generator(seed, 0, INIT_STREAM)
    erasers = nn.ModuleDict()
    for name, attn in sites.items():
        erasers[_key(name)] = Eraser(attn.to_out[0].out_features, rank, generator)
    return erasers.to(device)


def _key(site: str) -> str:
    return site.replace(".", "-")


@contextmanager
def erasing(sites: Dict[str, nn.Module], erasers: nn.ModuleDict, outputs: Optional[dict] = None):
    """Within: each site's output ``o`` becomes ``o + eraser(o)``; ``outputs`` (site -> eraser output) if given."""
    handles = []

    def hook_for(name):
        eraser = erasers[_key(name)]

        def hook(module, args, out):
            e = eraser(out)
            if outputs is not None:
                outputs[name] = e
            return out + e
        return hook

    try:
        for name, attn in sites.items():
            handles.append(attn.to_out[0].register_forward_hook(hook_for(name)))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def attention_maps(sites: Dict[str, nn.Module], maps: dict):
    """Within: ``maps[site]`` = that cross-attention's probabilities [batch, heads, pixels, tokens] (no gradient)."""
    handles = []

    def hook_for(name):
        def hook(attn, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            context = kwargs.get("encoder_hidden_states")
            with torch.no_grad():
                q = attn.head_to_batch_dim(attn.to_q(hidden))
                k = attn.head_to_batch_dim(attn.to_k(context))
                probs = attn.get_attention_scores(q, k, None)
            maps[name] = probs.reshape(hidden.shape[0], attn.heads, *probs.shape[1:])
        return hook

    try:
        for name, attn in sites.items():
            handles.append(attn.register_forward_pre_hook(hook_for(name), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


def _side(pixels: int) -> int:
    side = math.isqrt(pixels)
    if side * side != pixels:
        raise ValueError(f"cross-attention over {pixels} pixels: not a square latent")
    return side


def mask_resolution(sides: Sequence[int], wanted: int) -> int:
    """The attention-map side used for the mask: ``wanted`` when a site has it, else the nearest (log scale; ties:
    the larger)."""
    return min(sorted(set(sides), reverse=True), key=lambda s: abs(math.log2(s) - math.log2(wanted)))


def concept_masks(maps: Dict[str, torch.Tensor], word_indices: Sequence[int], threshold: float,
                  wanted_resolution: int) -> Tuple[Dict[str, torch.Tensor], int]:
    """Per site, the binary concept mask [batch, side, side] at that site's side, and the resolution used.

    concept_reg.py's get_mask: each map of the chosen side averaged over the concept's word tokens and the heads,
    the maps averaged, scaled to [0, 1] per image (min-max), 1 where >= ``threshold``, then resized (nearest) to
    every site's side.
    """
    sides = {name: _side(p.shape[2]) for name, p in maps.items()}
    res = mask_resolution(list(sides.values()), wanted_resolution)
    idx = torch.as_tensor(list(word_indices))
    chosen = [p[..., idx.to(p.device)].mean(-1).mean(1).reshape(p.shape[0], res, res)
              for name, p in maps.items() if sides[name] == res]
    avg = torch.stack(chosen, dim=1).mean(1)
    low = avg.amin(dim=(1, 2), keepdim=True)
    high = avg.amax(dim=(1, 2), keepdim=True)
    scaled = (avg - low) / (high - low)
    mask = (scaled >= threshold).float()
    resized = {s: F.interpolate(mask.unsqueeze(0), (s, s)).squeeze(0) for s in set(sides.values())}
    return {name: resized[s] for name, s in sides.items()}, res


def localization_loss(eraser_outputs: Dict[str, torch.Tensor], masks: Dict[str, torch.Tensor]) -> torch.Tensor:
    """The concept-localised regulariser (train.py lines 169-186): per site, the eraser output's squared value,
    averaged over channels, summed over the pixels outside the mask and divided by their count; averaged over
    the sites."""
    terms = []
    for name, e in eraser_outputs.items():
        outside = 1.0 - masks[name].to(e.device).flatten(1).unsqueeze(-1)  # [batch, pixels, 1]
        terms.append(((e * outside) ** 2).mean(-1).sum() / (outside.sum() + MASK_EPS))
    return torch.stack(terms).mean()


@torch.no_grad()
def fuse_eraser(attn: nn.Module, eraser: Eraser) -> None:
    """Fold ``o + up(down(o))`` into attn.to_out.0 (W, b): W' = W + U D W, b' = b + U (D b + b_d) + b_u (float64)."""
    lin = attn.to_out[0]
    W, b = lin.weight.double(), lin.bias.double()
    D, bd = eraser.down.weight.double().to(W.device), eraser.down.bias.double().to(W.device)
    U, bu = eraser.up.weight.double().to(W.device), eraser.up.bias.double().to(W.device)
    lin.weight.copy_((W + U @ (D @ W)).to(lin.weight.dtype))
    lin.bias.copy_((b + U @ (D @ b + bd) + bu).to(lin.bias.dtype))


# ---- training -------------------------------------------------------------------


def _predict(unet, x, t, context):
    return unet(x, t, encoder_hidden_states=context.expand(x.shape[0], -1, -1)).sample


class Receler:
    """The frozen UNet, its erasers, the concept's embeddings and the adversarial prompt: one training step."""

    def __init__(self, unet, scheduler, cond: torch.Tensor, uncond: torch.Tensor, word_count: int, rank: int,
                 eta: float, guidance: float, reg_weight: float, mask_threshold: float, mask_resolution: int,
                 adv_iterations: int, adv_tokens: int, adv_learning_rate: float, adv_start: int, latent_shape,
                 seed: int, device, erase_on: str = "adversarial"):
        self.unet, self.scheduler, self.cond, self.uncond = unet.requires_grad_(False), scheduler, cond, uncond
        self.sites = eraser_sites(unet)
        self.erasers = make_erasers(self.sites, rank, seed, device)
        self.word_indices = list(range(1, 1 + word_count))  # after BOS (train.py lines 121-123)
        self.adv_indices = list(range(1 + word_count, 1 + word_count + adv_tokens))
        self.eta, self.guidance, self.reg_weight = eta, guidance, reg_weight
        self.mask_threshold, self.wanted_resolution = mask_threshold, mask_resolution
        self.adv_iterations, self.adv_start, self.erase_on = adv_iterations, adv_start, erase_on
        self.latent_shape, self.seed, self.device = latent_shape, seed, device
        self.adversarial = None
        if adv_iterations > 0 and adv_tokens > 0:
            # torch.rand, as train.py line 104: uniform [0, 1) in the text encoder's output space.
            start = torch.rand((1, adv_tokens, cond.shape[-1]), generator=step_generator(seed, 0, ADV_STREAM))
            self.adversarial = nn.Parameter(start.to(device))
            self.adv_optimizer = torch.optim.Adam([self.adversarial], lr=adv_learning_rate,
                                                  weight_decay=ADV_WEIGHT_DECAY)
        self.mask_used = None

    def params(self) -> Dict[str, torch.Tensor]:
        """What trains (and what a checkpoint holds): the erasers and the adversarial embeddings."""
        out = {f"eraser.{k}": p for k, p in self.erasers.named_parameters()}
        if self.adversarial is not None:
            out["adversarial.embeddings"] = self.adversarial
        return out

    def adversarial_prompt(self) -> torch.Tensor:
        """The concept's embeddings with the adversarial ones in the positions after its words (EOS and padding)."""
        emb = self.cond.clone()
        emb[:, self.adv_indices] = self.adversarial
        return emb

    def example(self, i: int):
        """Step ``i``'s x_t, t and frozen-model predictions (e_0, e_p) and concept masks; all draws from (seed, i)."""
        g = step_generator(self.seed, i, STEP_STREAM)
        steps = len(self.scheduler.timesteps)
        k = int(torch.randint(0, steps, (1,), generator=g))
        noise = torch.randn(self.latent_shape, generator=g).to(self.device)
        with erasing(self.sites, self.erasers):  # sampled by the model being trained, erasers on (train.py l. 136)
            z = ddim_partial_sample(self.unet, self.scheduler, noise, self.cond, self.uncond, k, self.guidance)
        t = self.scheduler.timesteps[k]
        maps = {}
        with torch.no_grad():  # the frozen model: erasers off (their DisableEraser)
            e_0 = _predict(self.unet, z, t, self.uncond)
            with attention_maps(self.sites, maps):
                e_p = _predict(self.unet, z, t, self.cond)
        masks, self.mask_used = concept_masks(maps, self.word_indices, self.mask_threshold, self.wanted_resolution)
        return z, t, e_0, e_p, masks

    def losses(self, z, t, e_0, e_p, masks, contexts: Sequence[torch.Tensor]
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(total, erase, localisation) of the erasers on (z, t), each term the mean over the prompts ``contexts``."""
        target = esd_target(e_0, e_p, self.eta).float()
        erase, reg = 0.0, 0.0
        for context in contexts:
            outputs = {}
            with erasing(self.sites, self.erasers, outputs):
                e_n = _predict(self.unet, z, t, context)
            erase = erase + F.mse_loss(e_n.float(), target) / len(contexts)
            reg = reg + localization_loss(outputs, masks) / len(contexts)
        return erase + self.reg_weight * reg, erase, reg

    def attack(self, z, t, e_p) -> Tuple[torch.Tensor, float]:
        """``adv_iterations`` Adam steps of the adversarial embeddings toward the concept's frozen prediction
        ``e_p`` through the erasers; returns the prompt of the last one (before its step, as train.py lines 145-164)
        and its loss."""
        for _ in range(self.adv_iterations):
            context = self.adversarial_prompt()
            with erasing(self.sites, self.erasers):
                e_n = _predict(self.unet, z, t, context)
            loss = F.mse_loss(e_n.float(), e_p.float())
            with erasing(self.sites, self.erasers):  # gradient checkpointing recomputes the forward: with the erasers
                grad, = torch.autograd.grad(loss, [self.adversarial])
            self.adversarial.grad = grad
            self.adv_optimizer.step()
            self.adv_optimizer.zero_grad(set_to_none=True)
        return context.detach(), float(loss.detach())

    def train(self, iterations: int, learning_rate: float, ctx: RunContext, progress: bool) -> dict:
        """The training: per step a new example, the attack (when on), one Adam step of the erasers."""
        optimizer = numerics.adam(list(self.erasers.parameters()), lr=learning_rate)
        erase_losses, reg_losses, adv_losses, coverage = [], [], [], []

        def step(i: int):
            z, t, e_0, e_p, masks = self.example(i)
            contexts = [self.cond]
            if self.adversarial is not None and i >= self.adv_start:
                adversarial, adv = self.attack(z, t, e_p)
                adv_losses.append(adv)
                contexts = {"adversarial": [adversarial], "concept": [self.cond],
                            "both": [self.cond, adversarial]}[self.erase_on]
            total, erase, reg = self.losses(z, t, e_0, e_p, masks, contexts)
            optimizer.zero_grad(set_to_none=True)
            with erasing(self.sites, self.erasers):  # as in attack: a recomputed forward must see the erasers
                total.backward()
            optimizer.step()
            erase_losses.append(float(erase.detach()))
            reg_losses.append(float(reg.detach()))
            coverage.append(float(next(iter(masks.values())).mean()))
            return float(total.detach()), {"t": int(t)}

        stateful = {"optimizer": optimizer}
        if self.adversarial is not None:
            stateful["adv_optimizer"] = self.adv_optimizer
        self.erasers.train()
        losses = train_loop(ctx, iterations, step, self.params(), stateful, desc="Receler", progress=progress)
        self.erasers.eval()
        return {"loss": losses, "erase": erase_losses, "localization": reg_losses, "adversarial": adv_losses,
                "mask_coverage": coverage}

    def fuse(self) -> None:
        """Fold every eraser into its site's to_out.0: the UNet alone now computes what UNet + erasers did."""
        for name, attn in self.sites.items():
            fuse_eraser(attn, self.erasers[_key(name)])


# ---- the method ---------------------------------------------------------------

FLAGS = (  # defaults: train_receler.py's argparse (lines 234-261)
    Flag("--iterations", 500, "eraser training steps, one example each", int),
    Flag("--learning_rate", 3e-4, "Adam learning rate of the erasers", float),
    Flag("--eta", 1.0, "negative guidance strength of ESD's target", float),
    Flag("--ddim_steps", 50, "DDIM steps of the schedule x_t is sampled on; each step stops at a random one", int),
    Flag("--sample_guidance", 3.0, "classifier-free guidance when sampling x_t", float),
    Flag("--eraser_rank", 128, "rank of each eraser (its down projection's width)", int),
    Flag("--concept_reg_weight", 0.1, "weight of the concept-localised regulariser", float),
    Flag("--mask_threshold", 0.1, "threshold on the min-max scaled attention map that makes the concept mask", float),
    Flag("--mask_resolution", PUBLISHED_MASK_RESOLUTION, "side of the cross-attention maps the mask is made from "
         "(the nearest the UNet has when it has no such maps)", int),
    Flag("--adv_iterations", 50, "adversarial prompt steps before each eraser step; 0: no adversary", int),
    Flag("--adv_tokens", 16, "adversarial prompt embeddings, in the positions after the concept's words", int),
    Flag("--adv_learning_rate", 0.1, "Adam learning rate of the adversarial embeddings (weight decay 0.1)", float),
    Flag("--erase_on", "adversarial", "the prompt(s) the erasers learn on while the adversary runs: adversarial "
         "(the paper's), concept (what the published code trains on: its adversarial embeddings never reach the "
         "prompt), both (the mean of the two)", choices=ERASE_ON),
    Flag("--adv_start", 0, "the eraser step the adversary starts at (before it: the concept's own prompt)", int),
    base.RESOLUTION_FLAG,
    Flag("--probe_samples", 4, "fixed held-out examples on which the ESD objective is reported before and after; "
         "0: off", int),
    Flag("--gradient_checkpointing", False, "save GPU memory", switch=True),
)


def check(settings: dict, concept: Optional[str], model_dir: Optional[str]) -> dict:
    """Receler's flags, and against the model's own configuration when it is local."""
    require(concept is not None, "--concept: required for --method receler")
    check_text(concept, "--concept")
    require(settings["iterations"] >= 1, f"--iterations {settings['iterations']}: must be at least 1")
    finite(settings["learning_rate"], "--learning_rate", 0, strict=True)
    finite(settings["eta"], "--eta", 0, strict=False)
    require(settings["ddim_steps"] >= 1, f"--ddim_steps {settings['ddim_steps']}: must be at least 1")
    finite(settings["sample_guidance"], "--sample_guidance", 0, strict=False)
    require(settings["eraser_rank"] >= 1, f"--eraser_rank {settings['eraser_rank']}: must be at least 1")
    finite(settings["concept_reg_weight"], "--concept_reg_weight", 0, strict=False)
    t = settings["mask_threshold"]
    require(math.isfinite(t) and 0 <= t <= 1, f"--mask_threshold {t}: must be in [0, 1]")
    require(settings["mask_resolution"] >= 1, f"--mask_resolution {settings['mask_resolution']}: must be at least 1")
    require(settings["adv_iterations"] >= 0, f"--adv_iterations {settings['adv_iterations']}: must be >= 0")
    require(settings["adv_tokens"] >= 1, f"--adv_tokens {settings['adv_tokens']}: must be at least 1")
    finite(settings["adv_learning_rate"], "--adv_learning_rate", 0, strict=True)
    require(settings["adv_start"] >= 0, f"--adv_start {settings['adv_start']}: must be >= 0")
    require(settings["probe_samples"] >= 0, f"--probe_samples {settings['probe_samples']}: must be >= 0")
    check_sampled_training(settings["resolution"], settings["ddim_steps"], model_dir)
    return {**settings, "concept": concept}


def word_count(tokenizer, concept: str, adv_tokens: int) -> int:
    """The concept's tokens (no BOS/EOS); InputError when they and the adversarial tokens overflow the prompt."""
    n = len(tokenizer(concept, add_special_tokens=False)["input_ids"])
    room = tokenizer.model_max_length - 1  # after BOS
    require(n + adv_tokens <= room, f"--adv_tokens {adv_tokens}: the concept's {n} tokens and the adversarial ones "
                                    f"exceed the prompt's {room} positions after BOS")
    return n


def run(settings: dict, parts, device, seed: int, quiet: bool, ctx: RunContext) -> dict:
    """Train erasers for the concept, fold them into the UNet; return what the card records."""
    from common.models import vae_scale_factor

    words = word_count(parts.tokenizer, settings["concept"], settings["adv_tokens"])
    unet = parts.unet.to(device)
    cond, uncond = encode(parts, [settings["concept"], ""], device).chunk(2)
    factor = vae_scale_factor(parts.vae.config)
    resolution = settings["resolution"] or unet.config.sample_size * factor
    latent_shape = (1, unet.config.in_channels, resolution // factor, resolution // factor)
    scheduler = make_ddim(parts.inference_scheduler.config, settings["ddim_steps"])
    receler = Receler(unet, scheduler, cond, uncond, words, settings["eraser_rank"], settings["eta"],
                      settings["sample_guidance"], settings["concept_reg_weight"], settings["mask_threshold"],
                      settings["mask_resolution"], settings["adv_iterations"], settings["adv_tokens"],
                      settings["adv_learning_rate"], settings["adv_start"], latent_shape, seed, device,
                      settings["erase_on"])
    probes = esd_probe_set(unet, scheduler, cond, uncond, settings["probe_samples"], latent_shape, seed + 1,
                           settings["sample_guidance"], settings["eta"], device)
    before = esd_objective(unet, probes, cond)
    if settings["gradient_checkpointing"]:
        unet.enable_gradient_checkpointing()
    history = receler.train(settings["iterations"], settings["learning_rate"], ctx, progress=not quiet)
    if settings["gradient_checkpointing"]:
        unet.disable_gradient_checkpointing()
    with erasing(receler.sites, receler.erasers):
        after_erasers = esd_objective(unet, probes, cond)
        hooked = [_predict(unet, z, t, cond).detach() for z, t, _ in probes[:1]]
    receler.fuse()
    after = esd_objective(unet, probes, cond)
    with torch.no_grad():
        fused = [_predict(unet, z, t, cond) for z, t, _ in probes[:1]]
    fusion_gap = max((float((a - b).abs().max()) for a, b in zip(hooked, fused)), default=None)
    unet.to("cpu")
    eraser_numel = sum(p.numel() for p in receler.erasers.parameters())
    adv = history["adversarial"]
    return {
        "trained_parameters": {"erasers": len(receler.erasers), "rank": settings["eraser_rank"],
                               "tensors": 4 * len(receler.erasers), "numel": eraser_numel,
                               "sites": sorted(receler.sites)},
        "eraser": "linear o + up(down(o)) after each cross-attention, folded into attn2.to_out.0",
        "loss": loss_summary(history["loss"]),
        "erase_loss": loss_summary(history["erase"]),
        "localization_loss": loss_summary(history["localization"]),
        "mask": {"resolution": receler.mask_used, "threshold": settings["mask_threshold"],
                 "mean_coverage": (sum(history["mask_coverage"]) / len(history["mask_coverage"])
                                   if history["mask_coverage"] else None)},
        "adversarial": {"iterations": settings["adv_iterations"], "tokens": settings["adv_tokens"],
                        "learning_rate": settings["adv_learning_rate"], "weight_decay": ADV_WEIGHT_DECAY,
                        "start": settings["adv_start"], "erase_on": settings["erase_on"],
                        "positions": receler.adv_indices,
                        "steps_attacked": len(adv), "loss": loss_summary(adv) if adv else None},
        "objective_on_probes": {"samples": settings["probe_samples"], "before": before if probes else None,
                                "after_with_erasers": after_erasers if probes else None,
                                "after": after if probes else None},
        "fusion_max_abs_difference": fusion_gap,
        "latent_shape": list(latent_shape),
        RESOLVED: {"resolution": resolution, "mask_resolution_used": receler.mask_used},
    }


def _erased(settings: dict) -> List[str]:
    return [settings["concept"]]


register(Method(name="receler", family="Receler", summary="Receler: low-rank erasers after cross-attention, folded in",
                paper=PAPER, code=CODE, flags=FLAGS, check=check, run=run, erased=_erased, trains=True,
                checkpoint_every=100))
