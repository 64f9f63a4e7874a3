"""Making unlearned models to measure: ESD and UCE (tools/unlearn.py, docs/unlearning.md).

ESD: Gandikota et al., ICCV 2023, "Erasing Concepts from Diffusion Models",
https://arxiv.org/abs/2303.07345 (code: https://github.com/rohitgandikota/erasing).
UCE: Gandikota et al., WACV 2024, "Unified Concept Editing in Diffusion Models",
https://arxiv.org/abs/2308.14761 (code: https://github.com/rohitgandikota/unified-concept-editing).

Functions take plain values (modules, tensors, numbers), never the argument
namespace, so tests drive them directly.
"""

from __future__ import annotations

import random
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from common import numerics
from common.data import encode_prompts

ESD_METHODS = ("esd-x", "esd-u")
METHODS = ESD_METHODS + ("uce",)
UCE_PROJECTIONS = ("attn2.to_k", "attn2.to_v")
# "all": every word token and the EOS of a concept prompt; "last": only its last
# word token (as the UCE authors' current script, trainscripts/uce_sd_erase.py).
TOKEN_MODES = ("all", "last")


# ---- shared -------------------------------------------------------------------

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


def _noise(shape, generator: torch.Generator, device) -> torch.Tensor:
    # Drawn on the CPU so a seed gives the same latents on any device.
    return torch.randn(shape, generator=generator).to(device)


def esd_probe_set(frozen, scheduler, cond, uncond, count: int, latent_shape, seed: int, guidance: float,
                  eta: float, device) -> List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``count`` fixed held-out examples, step indices spread over the schedule, for the ESD objective."""
    generator = torch.Generator("cpu").manual_seed(seed)
    steps = len(scheduler.timesteps)
    probes = []
    for k in range(count):
        step_index = (k * steps) // max(count, 1)
        probes.append(esd_example(frozen, scheduler, _noise(latent_shape, generator, device), step_index,
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
              progress: bool = True, on_step: Optional[Callable[[int, float], None]] = None) -> List[float]:
    """ESD fine-tuning: per iteration, sample x_t with the frozen model, regress the concept prediction to the target.

    One example per iteration, Adam, MSE, as in both reference scripts. Returns
    the per-iteration losses.
    """
    optimizer = numerics.adam(params, lr=learning_rate)
    rng = random.Random(seed)  # step indices
    generator = torch.Generator("cpu").manual_seed(seed)  # starting noise
    steps = len(scheduler.timesteps)
    unet.train()
    losses = []
    bar = tqdm(range(iterations), desc="ESD", disable=not progress)
    for it in bar:
        step_index = rng.randrange(steps)
        z, t, target = esd_example(frozen, scheduler, _noise(latent_shape, generator, device), step_index,
                                   cond, uncond, guidance, eta)
        loss = F.mse_loss(_predict(unet, z, t, cond).float(), target.float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4g}", t=int(t))
        if on_step is not None:
            on_step(it, losses[-1])
    bar.close()
    unet.eval()
    return losses


# ---- UCE ----------------------------------------------------------------------

def token_count(tokenizer, prompt: str) -> int:
    """Tokens of ``prompt`` including BOS and EOS, after truncation to the tokenizer's length."""
    return len(tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids)


def token_positions(n_tokens: int, mode: str) -> List[int]:
    """Sequence positions that stand for a prompt of ``n_tokens`` (BOS and EOS included).

    "all": the word tokens and the EOS, 1 .. n-1. BOS is left out: its
    embedding is the same for every prompt (causal attention), so an erase
    constraint on it would only restate a preservation one. The EOS is kept:
    it summarises the whole prompt. "last": the last word token alone, n-2, as
    the UCE authors' script (for the empty prompt that is BOS).
    """
    if mode == "all":
        return list(range(1, n_tokens))
    if mode == "last":
        return [n_tokens - 2]
    raise ValueError(f"unknown token mode {mode!r}")


@torch.no_grad()
def uce_embeddings(tokenizer, text_encoder, erase: Sequence[str], guides: Sequence[str], preserve: Sequence[str],
                   mode: str, device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows c_i (erase), their guide rows c_guide, and rows c_j (preserve), float64 on the CPU, [n, d] each.

    With "all" the guide row of erase position p is the guide prompt's
    embedding at position p (padding included when the guide is shorter):
    what the UNet would see there for the guide prompt. With "last" it is the
    guide's own last-token embedding.
    """
    if len(guides) != len(erase):
        raise ValueError("one guide per erased concept")
    erase_rows, guide_rows, preserve_rows = [], [], []
    for concept, guide in zip(erase, guides):
        emb = encode_prompts(tokenizer, text_encoder, [concept, guide], device).double().cpu()
        pos = token_positions(token_count(tokenizer, concept), mode)
        guide_pos = pos if mode == "all" else token_positions(token_count(tokenizer, guide), mode)
        erase_rows.append(emb[0, pos])
        guide_rows.append(emb[1, guide_pos])
    for concept in preserve:
        emb = encode_prompts(tokenizer, text_encoder, [concept], device).double().cpu()
        preserve_rows.append(emb[0, token_positions(token_count(tokenizer, concept), mode)])
    d = text_encoder.config.hidden_size

    def stack(rows):
        return torch.cat(rows) if rows else torch.zeros(0, d, dtype=torch.float64)

    return stack(erase_rows), stack(guide_rows), stack(preserve_rows)


def uce_transform(erase: torch.Tensor, guide: torch.Tensor, preserve: torch.Tensor, lamb: float,
                  erase_scale: float = 1.0, preserve_scale: float = 1.0) -> torch.Tensor:
    """The d x d matrix M with W_new = W_old M for every edited projection (UCE's closed form, paper eq. 7).

    W_new = (e sum W c_guide c_i^T + s sum W c_j c_j^T + lamb W)(e sum c_i c_i^T + s sum c_j c_j^T + lamb I)^-1
          = W (e G^T E + s P^T P + lamb I)(e E^T E + s P^T P + lamb I)^-1   (rows E, G, P)
    Both factors are the same for every layer, so M is solved for once; the
    targets W_old c_guide and W_old c_j are each layer's old outputs. float64:
    the system's conditioning follows the embeddings' spread, not the weights'.
    """
    E, G, P = (x.to(torch.float64) for x in (erase, guide, preserve))
    d = E.shape[1]
    eye = torch.eye(d, dtype=torch.float64)
    left = erase_scale * G.T @ E + preserve_scale * P.T @ P + lamb * eye
    right = erase_scale * E.T @ E + preserve_scale * P.T @ P + lamb * eye
    # M = left @ right^-1; right is symmetric, so solve right M^T = left^T.
    return torch.linalg.solve(right, left.T).T


def uce_modules(unet: torch.nn.Module) -> List[Tuple[str, torch.nn.Linear]]:
    """The cross-attention key and value projections UCE edits (text embedding -> keys/values)."""
    found = []
    for name, module in unet.named_modules():
        if name.endswith(UCE_PROJECTIONS):
            if not isinstance(module, torch.nn.Linear):
                raise ValueError(f"{name}: expected a Linear layer, found {type(module).__name__}")
            if module.bias is not None:
                raise ValueError(f"{name}: has a bias; UCE's closed form here edits bias-free projections")
            found.append((name, module))
    if not found:
        raise ValueError("no cross-attention key/value projections (attn2.to_k / attn2.to_v) in this UNet")
    return found


@torch.no_grad()
def apply_uce(unet: torch.nn.Module, transform: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Replace each projection weight W by W M (in float64, stored back in W's dtype); return the old weights."""
    old = {}
    for name, module in uce_modules(unet):
        w = module.weight
        old[name + ".weight"] = w.detach().clone()
        new = w.detach().to(torch.float64).cpu() @ transform
        w.copy_(new.to(device=w.device, dtype=w.dtype))
    return old


@torch.no_grad()
def uce_residuals(w_old: torch.Tensor, w_new: torch.Tensor, erase, guide, preserve) -> Dict[str, float]:
    """How well one edited projection meets UCE's goals.

    erase: ||W_new c_i - W_old c_guide|| / ||W_old c_i - W_old c_guide|| (share of the gap left; 0 = reached).
    preserve: ||W_new c_j - W_old c_j|| / ||W_old c_j|| (relative drift of the preserved outputs).
    """
    W0, W1 = w_old.double().cpu(), w_new.double().cpu()
    E, G, P = (x.double() for x in (erase, guide, preserve))
    target = G @ W0.T
    gap = torch.linalg.norm(E @ W0.T - target)
    out = {"erase": float(torch.linalg.norm(E @ W1.T - target) / gap) if gap > 0 else 0.0}
    if P.shape[0]:
        out["preserve"] = float(torch.linalg.norm(P @ W1.T - P @ W0.T) / torch.linalg.norm(P @ W0.T))
    return out
