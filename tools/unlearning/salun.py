"""SalUn: Fan et al., ICLR 2024, "SalUn: Empowering Machine Unlearning via Gradient-based Weight Saliency in Both
Image Classification and Generation" (docs/unlearning.md: SalUn).

https://arxiv.org/abs/2310.12508 (code: https://github.com/OPTML-Group/Unlearn-Saliency, its SD/ directory). Two
steps: a saliency mask, the top share of UNet weights by the size of the forgetting loss's gradient on the forget
set; then random-label forgetting (the forget images under the concept prompt pulled to the model's own prediction
for another concept's prompt) plus the retain set's denoising loss, training only the masked weights.

Line references (generate_mask.py, random_label.py, dataset.py) are to SD/train-scripts/ of the authors' code at
commit a6e89fd.
"""

from __future__ import annotations

import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from common.cli import check_resolution
from common.errors import InputError

from . import base, register
from .base import (DATA, RESOLVED, Flag, ImageSet, Method, RunContext, check_text, finite, require, step_generator,
                   train_loop)

PAPER = "Fan et al., ICLR 2024, https://arxiv.org/abs/2310.12508"
CODE = "https://github.com/OPTML-Group/Unlearn-Saliency"
MASK_FILE = "saliency_mask.safetensors"  # beside the model in --output_dir; --mask reads one back
TRAIN_METHODS = ("full", "xattn")  # the published train_method values random_label.py acts on

# Seed streams of step_generator(seed, step, stream): each draw a pure function of (seed, step, stream), so a
# resumed run needs no generator state.
TRAIN_STREAM = 0  # step i: the forget and retain examples' latent samples, timesteps and noise
MASK_STREAM = 1  # mask batch b
PROBE_STREAM = 2  # the fixed probe examples (step 0: forget, 1: retain)
DATA_STREAM = 3  # the generated data sets' seeds (step 0: forget, 1: retain)
RETAIN_ORDER_STREAM = 1 << 20  # + pass p: the retain set's order in pass p of an epoch (step = epoch)


# ---- data ---------------------------------------------------------------------


def data_seed(seed: int, role: int) -> int:
    """The seed a generated data set is drawn with (role 0: forget, 1: retain), apart from the training draws."""
    return int(step_generator(seed, role, DATA_STREAM).initial_seed() % (2 ** 31))


def retain_batch(count: int, batch_size: int, seed: int, epoch: int, index: int) -> torch.Tensor:
    """Row indices of the retain set's ``index``-th batch in ``epoch``.

    As random_label.py lines 66-76: the retain loader (shuffled, dataset.py
    line 152; last batch short) starts afresh each epoch and starts a new
    shuffled pass whenever it runs out before the forget set does. Each pass's
    order is its own seeded draw, so any batch is computed without the ones
    before it (resume).
    """
    per_pass = math.ceil(count / batch_size)
    p, k = divmod(index, per_pass)
    order = torch.randperm(count, generator=step_generator(seed, epoch, RETAIN_ORDER_STREAM + p))
    return order[k * batch_size:(k + 1) * batch_size]


def sample_latents(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A draw from the VAE posterior, mean + std * noise, as LDM's get_input samples it for every batch."""
    return mean + std * torch.randn(mean.shape, generator=generator)


class PromptTable:
    """Text embeddings of a fixed set of prompts, encoded once (the text encoder never trains)."""

    def __init__(self, parts, prompts: Sequence[str], device):
        self.names = list(dict.fromkeys(prompts))
        self.index = {p: i for i, p in enumerate(self.names)}
        self.embeddings = base.encode(parts, self.names, device)

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        """[n, 77, d] for ``prompts``, in order."""
        rows = torch.tensor([self.index[p] for p in prompts], device=self.embeddings.device)
        return self.embeddings.index_select(0, rows)


def pseudo_prompts(forget_count: int, pseudo: Sequence[str]) -> List[str]:
    """The prompt each forget row is mapped to: ``pseudo[j % len]``.

    random_label.py lines 80-83 maps every image of the forgotten class to
    one other class's description, the next class's; given several, the rows
    take them in turn.
    """
    return [pseudo[j % len(pseudo)] for j in range(forget_count)]


# ---- step 1: the saliency mask ---------------------------------------------------


def _predict(unet, x, t, context):
    return unet(x, t, encoder_hidden_states=context).sample


def saliency_loss(unet, x_t: torch.Tensor, t: torch.Tensor, target: torch.Tensor, cond: torch.Tensor,
                  uncond: torch.Tensor, guidance: float) -> torch.Tensor:
    """The forgetting loss whose gradient ranks the weights: -MSE(target, (1 + w) eps(x_t, c) - w eps(x_t, "")).

    generate_mask.py lines 57-62 (its --c_guidance w, 7.5): the guided
    prediction of the concept on its own noised images; the sign does not
    matter, only the gradient's size.
    """
    eps_c = _predict(unet, x_t, t, cond)
    eps_u = _predict(unet, x_t, t, uncond)
    return -F.mse_loss(((1 + guidance) * eps_c - guidance * eps_u).float(), target.float())


def saliency_gradients(unet, noise_scheduler, mean: torch.Tensor, std: torch.Tensor, cond: torch.Tensor,
                       uncond: torch.Tensor, batch_size: int, guidance: float, seed: int, device,
                       progress: bool = False) -> Dict[str, torch.Tensor]:
    """The forgetting loss's gradient summed over one pass of the forget set in row order, per UNet parameter.

    As generate_mask.py lines 33-69: batches in order (its forget loader does
    not shuffle, dataset.py line 163), one timestep and noise per image, every
    batch's mean-loss gradient added up; fp32, on ``device``.
    ``cond``: each forget row's prompt embedding [n, 77, d]; ``uncond`` [1, 77, d].
    """
    from tqdm.auto import tqdm

    params = dict(unet.named_parameters())
    was = {n: p.requires_grad for n, p in params.items()}
    unet.requires_grad_(True)
    total = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    try:
        for b in tqdm(range(0, mean.shape[0], batch_size), desc="SalUn mask", disable=not progress):
            generator = step_generator(seed, b // batch_size, MASK_STREAM)
            z = sample_latents(mean[b:b + batch_size], std[b:b + batch_size], generator).to(device)
            x_t, t, target = base.noised(noise_scheduler, z, generator)
            c = cond[b:b + batch_size]
            unet.zero_grad(set_to_none=True)
            saliency_loss(unet, x_t, t, target, c, uncond.expand(c.shape[0], -1, -1), guidance).backward()
            for n, p in params.items():
                if p.grad is not None:
                    total[n] += p.grad.float()
    finally:
        unet.zero_grad(set_to_none=True)
        for n, p in params.items():
            p.requires_grad_(was[n])
    return total


def _count_at_least(scores: Dict[str, torch.Tensor], bits: int) -> int:
    """How many |scores| have float32 bit patterns >= ``bits`` (non-negative floats order as their bits)."""
    return sum(int((s.view(torch.int32) >= bits).sum()) for s in scores.values())


@torch.no_grad()
def top_fraction_mask(gradients: Dict[str, torch.Tensor], ratio: float) -> Dict[str, torch.Tensor]:
    """A boolean mask per tensor: the int(N * ratio) entries of largest |gradient| over all N entries (at least 1).

    generate_mask.py lines 71-108 ranks every entry of every tensor together
    and keeps ranks below int(N * ratio). Its argsort breaks ties
    arbitrarily; here entries equal to the threshold are taken in
    named_parameters order, then row-major. The threshold is found by
    bisection on the float bits (no sort of all N entries: 860M for SD-1.4).
    """
    scores = {n: g.detach().abs().float() for n, g in gradients.items()}
    for n, s in scores.items():
        if not bool(torch.isfinite(s).all()):
            raise ValueError(f"non-finite saliency gradient in {n}")
    total = sum(s.numel() for s in scores.values())
    k = max(1, int(total * ratio))
    if k >= total:
        return {n: torch.ones_like(s, dtype=torch.bool) for n, s in scores.items()}
    low, high = 0, 0x7F800000  # count(>= low) >= k always; count(>= +inf) < k
    while high - low > 1:  # invariant: count(>= low) >= k > count(>= high)
        mid = (low + high) // 2
        if _count_at_least(scores, mid) >= k:
            low = mid
        else:
            high = mid
    ties = k - _count_at_least(scores, high)  # entries equal to the threshold still to take
    mask = {}
    for n, s in scores.items():
        bits = s.view(torch.int32)
        m = bits > low
        if ties > 0:
            equal = (bits == low).flatten()
            taken = torch.cumsum(equal.to(torch.int64), 0) <= ties
            m = m | (equal & taken).view(m.shape)
            ties -= int((equal & taken).sum())
        mask[n] = m
    return mask


def save_mask(path: str, mask: Dict[str, torch.Tensor], metadata: Dict[str, str]) -> None:
    """The mask as boolean tensors, written under a temporary name and renamed."""
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        save_file({n: m.to("cpu", torch.bool).contiguous() for n, m in mask.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def mask_shapes(path: str, flag: str = "--mask") -> Dict[str, Tuple[int, ...]]:
    """Each tensor's shape in a mask file, read from its header; InputError naming ``flag`` otherwise."""
    from safetensors import safe_open

    require(os.path.isfile(path), f"{flag} {path}: no such file")
    try:
        with safe_open(path, "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for a bad header
        raise InputError(f"{flag} {path}: not a safetensors file ({type(err).__name__})") from None


def model_unet_shapes(model_dir: str) -> Optional[Dict[str, Tuple[int, ...]]]:
    """The UNet's tensor shapes from its safetensors headers (one file or an index), or None when not so stored."""
    import json

    from safetensors import safe_open

    folder = os.path.join(model_dir, "unet")
    single = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    index = single + ".index.json"
    try:
        if os.path.isfile(single):
            files = [single]
        elif os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                files = sorted({os.path.join(folder, v) for v in json.load(f)["weight_map"].values()})
        else:
            return None
        shapes = {}
        for path in files:
            with safe_open(path, "pt") as f:
                shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
        return shapes
    except Exception:  # unreadable here: the model load reports it
        return None


def check_mask_matches(mask: Dict[str, Tuple[int, ...]], model: Dict[str, Tuple[int, ...]], path: str) -> None:
    """InputError naming --mask unless the mask has exactly the UNet's tensors, each of the same shape."""
    missing = sorted(set(model) - set(mask))
    extra = sorted(set(mask) - set(model))
    other = sorted(n for n in set(mask) & set(model) if mask[n] != model[n])
    if not (missing or extra or other):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} UNet tensors missing (e.g. {missing[0]})")
    if extra:
        parts.append(f"{len(extra)} not in the UNet (e.g. {extra[0]})")
    if other:
        parts.append(f"{len(other)} of another shape (e.g. {other[0]}: {list(mask[other[0]])} vs the UNet's "
                     f"{list(model[other[0]])})")
    raise InputError(f"--mask {path}: its tensors do not match this model's UNet: {'; '.join(parts)}")


def load_mask(path: str, unet) -> Dict[str, torch.Tensor]:
    """A mask file as booleans per UNet parameter; InputError naming --mask when it does not fit ``unet``."""
    from safetensors.torch import load_file

    shapes = {n: tuple(p.shape) for n, p in unet.named_parameters()}
    check_mask_matches(mask_shapes(path), shapes, path)
    out = {}
    for n, t in load_file(path).items():
        if t.dtype != torch.bool:
            require(bool(((t == 0) | (t == 1)).all()), f"--mask {path}: {n} holds values other than 0 and 1")
            t = t != 0
        out[n] = t
    return out


def mask_summary(mask: Dict[str, torch.Tensor]) -> dict:
    """How much of the UNet the mask lets train."""
    selected = sum(int(m.sum()) for m in mask.values())
    numel = sum(m.numel() for m in mask.values())
    return {"selected": selected, "of_numel": numel, "share": selected / numel,
            "tensors_with_selected": sum(1 for m in mask.values() if bool(m.any())), "of_tensors": len(mask)}


# ---- step 2: random-label forgetting on the masked weights ----------------------


def salun_losses(unet, forget_x: torch.Tensor, forget_t: torch.Tensor, forget_cond: torch.Tensor,
                 pseudo_cond: torch.Tensor, retain_x: torch.Tensor, retain_t: torch.Tensor,
                 retain_cond: torch.Tensor, retain_target: torch.Tensor, alpha: float):
    """(total, forget, retain): MSE(eps(x_t, c), sg[eps(x_t, c')]) + alpha * the retain set's denoising loss.

    random_label.py lines 86-129: the forget image's noised latent,
    conditioned on its own prompt c, regresses to the model's own (detached)
    prediction for the pseudo prompt c' on the same x_t and t; the retain
    batch keeps LDM's loss (shared_step: noise target, its own t).
    """
    eps = _predict(unet, forget_x, forget_t, forget_cond)
    with torch.no_grad():
        pseudo = _predict(unet, forget_x, forget_t, pseudo_cond)
    forget = F.mse_loss(eps.float(), pseudo.float())
    retain = F.mse_loss(_predict(unet, retain_x, retain_t, retain_cond).float(), retain_target.float())
    return forget + alpha * retain, forget, retain


def trainable_names(unet: torch.nn.Module, train_method: str) -> List[str]:
    """UNet parameter names the mask applies to: all ("full") or cross-attention ("xattn", 'attn2')."""
    return [n for n, _ in unet.named_parameters() if train_method == "full" or "attn2" in n]


def mask_gradients(params: Dict[str, torch.Tensor], mask: Dict[str, torch.Tensor]) -> None:
    """Zero every gradient entry outside the mask (random_label.py lines 132-137)."""
    for n, p in params.items():
        if p.grad is not None:
            p.grad.mul_(mask[n])


class TermLog:
    """The forget and retain losses of every step, saved with the checkpoint so a resumed run reports them all."""

    def __init__(self):
        self.forget: List[float] = []
        self.retain: List[float] = []

    def state_dict(self) -> dict:
        return {"forget": list(self.forget), "retain": list(self.retain)}

    def load_state_dict(self, state: dict) -> None:
        self.forget, self.retain = list(state["forget"]), list(state["retain"])


class Examples:
    """The forget and retain sets as VAE posteriors and prompt embeddings, and the draws of one step from them."""

    def __init__(self, forget_mean, forget_std, forget_cond, pseudo_cond, retain_mean, retain_std, retain_cond,
                 noise_scheduler, device):
        self.forget_mean, self.forget_std = forget_mean, forget_std
        self.retain_mean, self.retain_std = retain_mean, retain_std
        self.forget_cond, self.pseudo_cond, self.retain_cond = forget_cond, pseudo_cond, retain_cond
        self.noise_scheduler, self.device = noise_scheduler, device

    def forget(self, rows: torch.Tensor, generator: torch.Generator, timesteps: Optional[torch.Tensor] = None):
        """(x_t, t, cond, pseudo cond) of forget ``rows``: one x_t for both prompts (random_label.py lines 119-120)."""
        z = sample_latents(self.forget_mean[rows], self.forget_std[rows], generator).to(self.device)
        x_t, t, _ = base.noised(self.noise_scheduler, z, generator, timesteps)
        return x_t, t, self.forget_cond[rows.to(self.forget_cond.device)], \
            self.pseudo_cond[rows.to(self.pseudo_cond.device)]

    def retain(self, rows: torch.Tensor, generator: torch.Generator, timesteps: Optional[torch.Tensor] = None):
        """(x_t, t, cond, target) of retain ``rows``: the denoising loss's inputs."""
        z = sample_latents(self.retain_mean[rows], self.retain_std[rows], generator).to(self.device)
        x_t, t, target = base.noised(self.noise_scheduler, z, generator, timesteps)
        return x_t, t, self.retain_cond[rows.to(self.retain_cond.device)], target


def probe_examples(examples: Examples, count: int, seed: int):
    """``count`` fixed examples of each set (its first rows, timesteps spread over the schedule), drawn once."""
    if count <= 0:
        return None
    total = examples.noise_scheduler.config.num_train_timesteps
    t = torch.tensor([int((k + 0.5) * total / count) for k in range(count)])
    forget_rows = torch.arange(count) % examples.forget_mean.shape[0]
    retain_rows = torch.arange(count) % examples.retain_mean.shape[0]
    return (examples.forget(forget_rows, step_generator(seed, 0, PROBE_STREAM), t),
            examples.retain(retain_rows, step_generator(seed, 1, PROBE_STREAM), t))


@torch.no_grad()
def probe_objective(unet, probes) -> Optional[dict]:
    """The two losses on the fixed examples: forget (the gap to the pseudo prompt's prediction) and retain."""
    if probes is None:
        return None
    (fx, ft, fc, pc), (rx, rt, rc, target) = probes
    _, forget, retain = salun_losses(unet, fx, ft, fc, pc, rx, rt, rc, target, 0.0)
    return {"forget": float(forget), "retain": float(retain)}


def train_salun(unet, examples: Examples, params: Dict[str, torch.Tensor], mask: Dict[str, torch.Tensor],
                epochs: int, batch_size: int, learning_rate: float, alpha: float, seed: int, progress: bool = True,
                ctx: Optional[RunContext] = None, use_8bit_adam: bool = False) -> Tuple[List[float], TermLog]:
    """SalUn's training: per forget batch (row order) and a retain batch, one Adam step on the masked gradients.

    random_label.py lines 56-143: Adam over the trained parameters (no
    weight decay), the forget set once per epoch in row order, gradients
    times the mask before each step. A masked-out entry keeps a zero
    gradient, so Adam's moments stay zero and it never moves.
    """
    optimizer = base.optimizer(list(params.values()), "adam", use_8bit_adam, lr=learning_rate)
    n_forget, n_retain = examples.forget_mean.shape[0], examples.retain_mean.shape[0]
    per_epoch = math.ceil(n_forget / batch_size)
    device_mask = {n: mask[n].to(p.device) for n, p in params.items()}
    terms = TermLog()
    unet.train()

    def step(i: int):
        epoch, b = divmod(i, per_epoch)
        generator = step_generator(seed, i, TRAIN_STREAM)
        fx, ft, fc, pc = examples.forget(torch.arange(b * batch_size, min((b + 1) * batch_size, n_forget)),
                                         generator)
        rx, rt, rc, target = examples.retain(retain_batch(n_retain, batch_size, seed, epoch, b), generator)
        loss, forget, retain = salun_losses(unet, fx, ft, fc, pc, rx, rt, rc, target, alpha)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        mask_gradients(params, device_mask)
        optimizer.step()
        terms.forget.append(float(forget.detach()))
        terms.retain.append(float(retain.detach()))
        return loss.item(), {"epoch": epoch}

    losses = train_loop(ctx or RunContext(), epochs * per_epoch, step, params,
                        {"optimizer": optimizer, "terms": terms}, desc="SalUn", progress=progress)
    unet.eval()
    return losses, terms


# ---- the method ---------------------------------------------------------------

FLAGS = (  # defaults: the SD README's commands and the scripts' own (docs/unlearning.md: SalUn)
    Flag("--mask_ratio", 0.5, "share of the UNet's weights the saliency mask lets train (the largest gradients)",
         float),
    Flag("--mask", None, "a saliency mask file (saliency_mask.safetensors of an earlier run on this base model) "
         "instead of computing it", default_text="computed from the forget set"),
    Flag("--mask_guidance", 7.5, "guidance w of the mask's forgetting loss, (1 + w) eps(c) - w eps('')", float),
    Flag("--epochs", 5, "passes over the forget set", int),
    Flag("--batch_size", 8, "forget and retain images per step (and per mask batch)", int),
    Flag("--learning_rate", 1e-5, "Adam learning rate", float),
    Flag("--alpha", 0.5, "weight of the retain set's loss", float),
    Flag("--train_method", "full", "parameters the mask applies to: full (the whole UNet) or xattn (cross-attention, "
         "'attn2')"),
    Flag("--pseudo_prompt", None, "prompt(s) the forget images are mapped to (forget rows take them in turn)",
         nargs="+", default_text="the retain set's first prompt"),
    Flag("--forget_data", None, "imagefolder of the concept's images (metadata.jsonl with a 'prompt' column)",
         default_text="generated by the base model"),
    Flag("--forget_prompts", None, "prompts the forget images are generated from", nargs="+",
         default_text="the --concept"),
    Flag("--forget_images", 800, "forget images to generate", int),
    Flag("--retain_data", None, "imagefolder of other concepts' images (a 'prompt' column)",
         default_text="generated from --retain_prompts"),
    Flag("--retain_prompts", None, "prompts of other concepts the retain images are generated from", nargs="+"),
    Flag("--retain_images", 800, "retain images to generate", int),
    Flag("--generation_steps", 50, "sampling steps of the generated images", int),
    Flag("--generation_guidance", 7.5, "classifier-free guidance of the generated images", float),
    base.RESOLUTION_FLAG,
    Flag("--probe_samples", 4, "fixed examples of each set on which both losses are reported before and after; "
         "0: off", int),
    *base.MEMORY_FLAGS,  # --gradient_checkpointing, --use_8bit_adam
)


def check(settings: dict, concept: Optional[str], model_dir: Optional[str]) -> dict:
    """SalUn's flags, its data folders and a given mask against the model, all before any model loads."""
    s = dict(settings)
    require(concept is not None, "--concept: required for SalUn (the forget set's default prompt)")
    ratio = s["mask_ratio"]
    require(math.isfinite(ratio) and 0 < ratio <= 1, f"--mask_ratio {ratio}: must be in (0, 1]")
    finite(s["mask_guidance"], "--mask_guidance", 0, strict=False)
    require(s["epochs"] >= 1, f"--epochs {s['epochs']}: must be at least 1")
    require(s["batch_size"] >= 1, f"--batch_size {s['batch_size']}: must be at least 1")
    finite(s["learning_rate"], "--learning_rate", 0, strict=True)
    finite(s["alpha"], "--alpha", 0, strict=False)
    require(s["train_method"] in TRAIN_METHODS,
            f"--train_method {s['train_method']}: must be one of {', '.join(TRAIN_METHODS)}")
    require(s["probe_samples"] >= 0, f"--probe_samples {s['probe_samples']}: must be >= 0")
    require(s["generation_steps"] >= 1, f"--generation_steps {s['generation_steps']}: must be at least 1")
    finite(s["generation_guidance"], "--generation_guidance", 0, strict=False)
    check_resolution(s["resolution"])
    for role in ("forget", "retain"):
        folder, prompts, count = s[f"{role}_data"], s[f"{role}_prompts"], s[f"{role}_images"]
        if folder is not None:
            require(prompts is None, f"--{role}_prompts: not with --{role}_data (the folder's prompts are used)")
            base.load_image_set(folder, f"--{role}_data")  # missing, empty or broken: one line naming the flag
        else:
            require(count >= 1, f"--{role}_images {count}: must be at least 1")
        for p in prompts or []:
            check_text(p, f"--{role}_prompts")
    require(s["retain_data"] is not None or s["retain_prompts"],
            "--retain_data or --retain_prompts: SalUn needs a retain set (images of other concepts)")
    for p in s["pseudo_prompt"] or []:
        check_text(p, "--pseudo_prompt")
        require(p.strip().lower() != concept.strip().lower(),
                f"--pseudo_prompt {p!r}: is the concept itself; give another concept's prompt")
    if s["mask"] is not None:
        shapes = mask_shapes(s["mask"])
        model = model_unet_shapes(model_dir) if model_dir is not None else None
        if model is not None:  # else: checked against the loaded UNet before anything is written
            check_mask_matches(shapes, model, s["mask"])
    base.check_vae_multiple(s["resolution"], model_dir)
    return {**s, "concept": concept}


def _image_set(parts, settings: dict, role: str, seed: int, resolution: int, device, quiet: bool,
               ctx: RunContext) -> ImageSet:
    """The forget or retain set: the folder given, or images of the base model (call before the UNet changes)."""
    if settings[f"{role}_data"] is not None:
        return base.load_image_set(settings[f"{role}_data"], f"--{role}_data")
    prompts = settings[f"{role}_prompts"] or [settings["concept"]]
    return base.generate_image_set(parts, prompts, settings[f"{role}_images"], data_seed(seed, role == "retain"),
                                   ctx.data_dir(role), device, settings["generation_steps"],
                                   settings["generation_guidance"], resolution, progress=not quiet, name=role)


def run(settings: dict, parts, device, seed: int, quiet: bool, ctx: RunContext) -> dict:
    """Compute (or read) the saliency mask, then train the masked UNet weights; return what the card records."""
    from common.models import vae_scale_factor
    from common.training import select_trainable

    unet = parts.unet
    resolution = settings["resolution"] or unet.config.sample_size * vae_scale_factor(parts.vae.config)
    given = settings["mask"]
    if given is not None:  # before anything is written: a mask that does not fit stops the run here
        mask = load_mask(given, unet)
    forget_set = _image_set(parts, settings, "forget", seed, resolution, device, quiet, ctx)
    retain_set = _image_set(parts, settings, "retain", seed, resolution, device, quiet, ctx)
    pseudo = list(settings["pseudo_prompt"] or [retain_set.prompts[0]])
    forget_mean, forget_std = base.image_latents(parts, forget_set, resolution, device)
    retain_mean, retain_std = base.image_latents(parts, retain_set, resolution, device)
    mapped = pseudo_prompts(len(forget_set.paths), pseudo)
    table = PromptTable(parts, [""] + list(forget_set.prompts) + mapped + list(retain_set.prompts), device)
    examples = Examples(forget_mean, forget_std, table(forget_set.prompts), table(mapped), retain_mean, retain_std,
                        table(retain_set.prompts), parts.noise_scheduler, device)

    unet.to(device)
    if settings["gradient_checkpointing"]:
        unet.enable_gradient_checkpointing()
    mask_path = os.path.join(ctx.output_dir, MASK_FILE) if ctx.output_dir is not None else None
    resuming = ctx.resume and ctx.output_dir is not None and base.checkpoint_info(ctx.output_dir) is not None
    if given is None and resuming and os.path.isfile(mask_path):
        mask = load_mask(mask_path, unet)  # the killed run's own mask (a GPU's gradients need not repeat bit for bit)
    elif given is None:
        if not quiet:
            ctx.log(f"saliency mask: the forgetting loss's gradient over {len(forget_set.paths)} forget images")
        gradients = saliency_gradients(unet, parts.noise_scheduler, forget_mean, forget_std, examples.forget_cond,
                                       table([""]), settings["batch_size"], settings["mask_guidance"], seed, device,
                                       progress=not quiet)
        mask = top_fraction_mask(gradients, settings["mask_ratio"])
        del gradients
    if mask_path is not None:
        save_mask(mask_path, mask, {"method": "salun", "concept": settings["concept"],
                                    "mask_ratio": str(settings["mask_ratio"]), "source": given or "computed"})

    trained = select_trainable(unet, trainable_names(unet, settings["train_method"]))
    params = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    probes = probe_examples(examples, settings["probe_samples"], seed)
    before = probe_objective(unet, probes)
    losses, terms = train_salun(unet, examples, params, mask, settings["epochs"], settings["batch_size"],
                                settings["learning_rate"], settings["alpha"], seed, progress=not quiet, ctx=ctx,
                                use_8bit_adam=settings["use_8bit_adam"])
    after = probe_objective(unet, probes)
    if settings["gradient_checkpointing"]:
        unet.disable_gradient_checkpointing()
    unet.requires_grad_(False).to("cpu")

    summary = base.loss_summary

    return {
        "mask": {"file": os.path.abspath(mask_path) if mask_path else None, "source": given or "computed",
                 "ratio": settings["mask_ratio"], **mask_summary(mask)},
        "trained_parameters": {"tensors": len(trained), "numel": sum(p.numel() for p in trained),
                               "masked_in": sum(int(mask[n].sum()) for n in params)},
        "steps": {"epochs": settings["epochs"], "per_epoch": math.ceil(len(forget_set.paths) / settings["batch_size"]),
                  "total": len(losses)},
        "loss": summary(losses), "forget_loss": summary(terms.forget), "retain_loss": summary(terms.retain),
        "objective_on_probes": {"samples": settings["probe_samples"], "before": before, "after": after},
        RESOLVED: {"resolution": resolution, "pseudo_prompt": pseudo},
        DATA: {"forget": forget_set.card(), "retain": retain_set.card()},
    }


def _erased(settings: dict) -> List[str]:
    return list(dict.fromkeys([settings["concept"], *(settings["forget_prompts"] or [])]))


register(Method(name="salun", family="SalUn", summary="saliency-masked random-label forgetting", paper=PAPER,
                code=CODE, flags=FLAGS, check=check, run=run, erased=_erased, trains=True, checkpoint_every=100))
