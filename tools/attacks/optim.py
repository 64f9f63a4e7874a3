"""The token-optimisation pieces the prompt attacks share (docs/attacks.md).

- ``project_simplex``: Euclidean projection of each row onto the probability simplex (UnlearnDiffAtk keeps each
  adversarial token as a distribution over the vocabulary);
- ``straight_through_one_hot``: a one-hot token per row (sampled, or the argmax) in the forward pass, the gradient
  passed to the probabilities in the backward pass;
- ``nearest_tokens``: the vocabulary entries nearest (cosine) to continuous embeddings (PEZ, used by P4D);
- ``Layout`` / ``make_layout``: where the adversarial slots sit in the text encoder's 77 positions (prefix, suffix,
  one before every n prompt tokens, or free tokens without the prompt), the prompt tokens fixed;
- ``encode_embeds``: the toolkit's CLIPTextModel run on given input embeddings (fp32), through its own forward
  (``encode_embeds_in_slices``: 77 positions at a time, for P4D-K's long prompts);
- ``noise_matching_loss``: MSE between a target (the noise, or another UNet's prediction) and a UNet's prediction
  on a noised latent at timestep t;
- ``Trail``: what the judge said about the prompts a search tried.

Everything random draws from a CPU ``torch.Generator`` (the harness's, seeded per case), so results do not depend on
the device, the process count or a resume.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from common.training import noisy_inputs


# --- the probability simplex -------------------------------------------------------------------------------------

def project_simplex(x: torch.Tensor) -> torch.Tensor:
    """The Euclidean projection of each row (last dimension) of ``x`` onto {p : p >= 0, sum p = 1}.

    The sort-based exact algorithm (Held, Wolfe & Crowder 1974; Duchi et al. 2008): with u the row sorted
    descending and rho the largest j such that u_j > (sum_{i<=j} u_i - 1) / j, the projection is
    max(x - theta, 0) with theta = (sum_{i<=rho} u_i - 1) / rho. Diffusion-MU-Attack finds the same theta by
    bisection (tolerance 1e-5); this one is exact up to rounding.
    """
    u, _ = torch.sort(x, dim=-1, descending=True)
    css = u.cumsum(dim=-1) - 1.0
    j = torch.arange(1, x.shape[-1] + 1, device=x.device, dtype=x.dtype)
    rho = (u - css / j > 0).sum(dim=-1, keepdim=True)  # >= 1: the first entry always qualifies
    theta = css.gather(-1, rho - 1) / rho.to(x.dtype)
    return (x - theta).clamp_min(0.0)


def sample_rows(probs: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """One index per row of ``probs`` [rows, V], drawn with probability proportional to the row (inverse CDF).

    The uniforms come from ``generator`` on the CPU, so the draw is the same on every device (torch.multinomial
    would need a generator on the probabilities' device).
    """
    cdf = probs.detach().float().cumsum(dim=-1)
    u = torch.rand(probs.shape[0], 1, generator=generator).to(cdf.device) * cdf[:, -1:]
    # The first index whose cumulative mass exceeds u: an entry of zero mass can never be chosen.
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)


class _StraightThrough(torch.autograd.Function):
    """Forward: the given one-hot rows; backward: the incoming gradient, clipped to [-1, 1], to the probabilities."""

    @staticmethod
    def forward(ctx, probs, ids):
        return F.one_hot(ids, probs.shape[-1]).to(probs.dtype)

    @staticmethod
    def backward(ctx, grad):
        # Diffusion-MU-Attack's STERandSelect passes hardtanh(grad): the same clipping here.
        return grad.clamp(-1.0, 1.0), None


def straight_through_one_hot(probs: torch.Tensor, generator: Optional[torch.Generator] = None,
                             sample: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """(one-hot rows [rows, V], their indices): sampled from each row (``sample``) or its argmax; gradients flow
    to ``probs`` straight through the one-hot."""
    ids = sample_rows(probs, generator) if sample else probs.detach().argmax(dim=-1)
    return _StraightThrough.apply(probs, ids), ids


# --- continuous embeddings to tokens (PEZ) -------------------------------------------------------------------------

@torch.no_grad()
def nearest_tokens(embeds: torch.Tensor, table: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(ids [n], their embeddings [n, d]): for each row of ``embeds`` [n, d] the row of ``table`` [V, d] of highest
    cosine similarity (PEZ's projection, as P4D does it: normalised dot product, top 1)."""
    sims = F.normalize(embeds.float(), dim=-1) @ F.normalize(table.float(), dim=-1).T
    ids = sims.argmax(dim=-1)
    return ids, table[ids]


# --- where the adversarial tokens go ------------------------------------------------------------------------------

POSITIONS = ("prefix", "suffix", "insert", "free")


@dataclass
class Layout:
    """The text encoder's input with adversarial slots: ``ids`` [max_length] (longer for a P4D-K prompt in chunks;
    slots hold the pad id until filled),
    ``adv`` the slot positions (ascending), ``prompt`` the positions of the prompt's own tokens (never changed)."""

    ids: torch.Tensor
    adv: torch.Tensor
    prompt: torch.Tensor
    end: int  # position of the end-of-text token

    @property
    def num_adv(self) -> int:
        return int(self.adv.numel())

    def with_tokens(self, adv_ids: torch.Tensor) -> torch.Tensor:
        """The full id row with ``adv_ids`` in the slots."""
        ids = self.ids.clone()
        ids[self.adv.to(ids.device)] = adv_ids.to(ids.device, torch.long)
        return ids

    def content(self, adv_ids: torch.Tensor) -> List[int]:
        """The ids between start- and end-of-text: what the prompt text decodes from."""
        return self.with_tokens(adv_ids)[1:self.end].tolist()

    def text(self, tokenizer, adv_ids: torch.Tensor) -> str:
        """The prompt as plain text (prompt and adversarial tokens, in order)."""
        return tokenizer.decode(self.content(adv_ids), skip_special_tokens=True).strip()


def insert_count(prompt_len: int, every: int) -> int:
    """P4D-K's number of learned tokens for a prompt of ``prompt_len`` tokens: int(len / every) + 1 (optimize_k.py)."""
    return prompt_len // every + 1


def make_layout(tokenizer, prompt: str, position: str, num_tokens: int = 0, every: int = 3,
                long_prompts: str = "truncate") -> Layout:
    """The layout of ``prompt`` with adversarial slots.

    prefix / suffix: ``num_tokens`` slots before / after the prompt tokens (UnlearnDiffAtk's prefix_k / suffix_k);
    insert (P4D-K, as optimize_k.py places them): for a prompt of L tokens, int(L/every) + 1 slots at content
    positions 0, every+1, 2(every+1), ...; each slot but the last is followed by the next ``every`` prompt tokens
    and the last slot by the remaining L mod every tokens, so the prompt ends with a slot only when ``every``
    divides L (L = 0: one slot); free: ``num_tokens`` slots and no prompt tokens (P4D-N, Ring-A-Bell). Prompt
    tokens that do not fit the encoder's length (with their slots) are cut from the end, and L counts what is kept;
    with ``long_prompts`` "chunks" (insert only, joycenerd/P4D's P4D-K) none is cut: the ids run past the encoder's
    length (start, content, end-of-text, no padding) and are encoded in slices (``encode_embeds_in_slices``).
    """
    if position not in POSITIONS:
        raise ValueError(f"position {position!r} not one of {POSITIONS}")
    max_len = tokenizer.model_max_length
    room = max_len - 2  # start- and end-of-text
    words = [] if position == "free" else list(tokenizer.encode(prompt, add_special_tokens=False))
    if position == "insert":
        while long_prompts != "chunks" and words and len(words) + insert_count(len(words), every) > room:
            words.pop()
        n_adv = insert_count(len(words), every)
        kinds = ["adv" if i % (every + 1) == 0 else "word" for i in range(len(words) + n_adv)]
    else:
        if num_tokens < 1 or num_tokens > room:
            raise ValueError(f"num_tokens {num_tokens} outside 1..{room}")
        words = words[: room - num_tokens]
        kinds = ["adv"] * num_tokens + ["word"] * len(words)
        if position == "suffix":
            kinds = ["word"] * len(words) + ["adv"] * num_tokens
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = [tokenizer.bos_token_id]
    adv, kept = [], []
    it = iter(words)
    for kind in kinds:
        if kind == "adv":
            adv.append(len(ids))
            ids.append(pad)
        else:
            kept.append(len(ids))
            ids.append(next(it))
    end = len(ids)
    ids.append(tokenizer.eos_token_id)
    ids += [pad] * (max_len - len(ids))
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return Layout(ids=as_long(ids), adv=as_long(adv), prompt=as_long(kept), end=end)


# --- the text encoder on embeddings ------------------------------------------------------------------------------

def allowed_ids(tokenizer, vocab_size: int, exclude: Sequence[int] = ()) -> torch.Tensor:
    """The token ids an adversarial slot may take: the vocabulary without special tokens (start/end-of-text would
    end or restart the prompt when its text is tokenized again) and without ``exclude``."""
    banned = set(int(i) for i in tokenizer.all_special_ids) | set(int(i) for i in exclude)
    return torch.tensor([i for i in range(vocab_size) if i not in banned], dtype=torch.long)


def token_table(text_encoder) -> torch.Tensor:
    """The text encoder's token-embedding matrix [V, d] (detached: the attacks never change it)."""
    return text_encoder.get_input_embeddings().weight.detach()


def assemble_embeds(table: torch.Tensor, layout: Layout, adv_embeds: torch.Tensor) -> torch.Tensor:
    """Input embeddings [max_length, d]: the layout's token embeddings with ``adv_embeds`` [num_adv, d] in the slots
    (differentiable in ``adv_embeds``; every other row is the token's own embedding)."""
    base = table[layout.ids.to(table.device)]
    return base.index_copy(0, layout.adv.to(table.device), adv_embeds.to(base.dtype))


@contextlib.contextmanager
def _embeddings_replaced(text_encoder, embeds: torch.Tensor):
    """Inside: the text encoder's token-embedding layer returns ``embeds`` instead of looking ids up."""
    handle = text_encoder.get_input_embeddings().register_forward_hook(lambda module, args, out: embeds)
    try:
        yield
    finally:
        handle.remove()


def encode_embeds(text_encoder, ids: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
    """The encoder's last hidden states [B, L, d] for input embeddings ``embeds`` [B, L, d] (or [L, d]).

    ``ids`` (same leading shape) only tell the model the sequence shape and where end-of-text is; the position
    embeddings, causal mask and layers are the model's own forward (transformers' CLIPTextModel takes no
    inputs_embeds, so the token-embedding layer's output is replaced by a hook).
    """
    if embeds.dim() == 2:
        embeds, ids = embeds.unsqueeze(0), ids.unsqueeze(0)
    device = embeds.device
    with _embeddings_replaced(text_encoder, embeds):
        return text_encoder(ids.to(device), return_dict=False)[0]


def encode_embeds_in_slices(text_encoder, ids: torch.Tensor, embeds: torch.Tensor, width: int) -> torch.Tensor:
    """``encode_embeds`` ``width`` positions at a time (common.long_prompts.encode_in_slices: each slice on its own,
    the states concatenated), for ids [B, L] (or [L]) longer than the encoder's positions; one slice when they fit."""
    from common.long_prompts import encode_in_slices

    if embeds.dim() == 2:
        embeds, ids = embeds.unsqueeze(0), ids.unsqueeze(0)
    return encode_in_slices(lambda part, vectors: encode_embeds(text_encoder, part, vectors), ids, width, embeds)


def encode_ids(text_encoder, ids: torch.Tensor) -> torch.Tensor:
    """The encoder's last hidden states [B, L, d] for token ids [B, L] (or [L])."""
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    return text_encoder(ids.to(text_encoder.device), return_dict=False)[0]


def prompt_ids(tokenizer, prompt: str) -> torch.Tensor:
    """The prompt's ids [max_length], padded and truncated as the pipeline does."""
    return tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids[0]


# --- the diffusion side ------------------------------------------------------------------------------------------

def timestep_schedule(num_train_timesteps: int, count: int) -> List[int]:
    """UnlearnDiffAtk's ``count`` timesteps, visited in this order: start T/count/2, stride T/count (classifier_.py:
    10, 30, ..., 990 for T = 1000, count = 50)."""
    stride = max(1, num_train_timesteps // count)
    return list(range(stride // 2, num_train_timesteps, stride))[:count]


def noise_matching_loss(unet, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                        noise_scheduler, target: Optional[torch.Tensor] = None) -> torch.Tensor:
    """MSE between ``target`` and ``unet``'s prediction on ``latents`` noised with ``noise`` at timesteps ``t``,
    conditioned on ``cond``.

    ``target`` None: the diffusion target itself (the noise for epsilon models, the velocity for v-prediction, as
    the training loss has it); otherwise e.g. another UNet's prediction (``unet_prediction``) on the same input.
    """
    noisy, own_target = noisy_inputs(latents, noise_scheduler, noise, noise, t)
    pred = unet(noisy, t, encoder_hidden_states=cond).sample
    return F.mse_loss(pred.float(), (own_target if target is None else target).float())


@torch.no_grad()
def unet_prediction(unet, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                    noise_scheduler) -> torch.Tensor:
    """``unet``'s prediction on ``latents`` noised with ``noise`` at ``t`` (no gradient): a noise-matching target."""
    noisy, _ = noisy_inputs(latents, noise_scheduler, noise, noise, t)
    return unet(noisy, t, encoder_hidden_states=cond).sample


def model_resolution(parts) -> int:
    """The image side in pixels the model was built for (UNet sample size x the VAE's downsampling)."""
    from common.models import vae_scale_factor

    return int(parts.unet.config.sample_size) * vae_scale_factor(parts.vae.config)


@torch.no_grad()
def image_latents(vae, image, resolution: int, device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The latent [1, C, h, w] of a PIL image or image path (resized, centre-cropped, scaled by the VAE's factor):
    the posterior mean, or a posterior sample drawn from ``generator`` when given."""
    from PIL import Image

    from common.data import ImageTransform

    if not isinstance(image, Image.Image):
        with Image.open(image) as img:
            image = img.convert("RGB")
    pixels = ImageTransform(resolution, True, False)(image).unsqueeze(0).to(device, torch.float32)
    posterior = vae.encode(pixels).latent_dist
    latents = posterior.mean
    if generator is not None:
        latents = latents + posterior.std * torch.randn(latents.shape, generator=generator).to(device)
    return latents * vae.config.scaling_factor


def randn(shape, generator: torch.Generator, device) -> torch.Tensor:
    """Standard normal draws from the CPU ``generator``, moved to ``device``."""
    return torch.randn(tuple(shape), generator=generator).to(device)


# --- the judge's verdicts ----------------------------------------------------------------------------------------

@dataclass
class Verdict:
    step: int
    prompt: str
    token_ids: List[int]
    score: float
    success: bool


@dataclass
class Trail:
    """Every prompt a search put to the judge, in order."""

    verdicts: List[Verdict] = field(default_factory=list)

    def judge(self, judge, case, step: int, prompt: str, token_ids: Sequence[int]) -> bool:
        """Judge ``prompt`` at the case's seed and guidance; record and return its success."""
        score, success = judge(prompt, case.seed, case.guidance)
        self.verdicts.append(Verdict(step, prompt, [int(i) for i in token_ids], float(score), bool(success)))
        return bool(success)

    @property
    def first_success(self) -> Optional[Verdict]:
        return next((v for v in self.verdicts if v.success), None)

    @property
    def last(self) -> Optional[Verdict]:
        return self.verdicts[-1] if self.verdicts else None

    @property
    def best(self) -> Optional[Verdict]:
        """The first success, else the highest score (earliest on ties)."""
        if self.first_success is not None:
            return self.first_success
        return max(self.verdicts, key=lambda v: v.score, default=None)

    def found(self, steps_run: int, prefer_last: bool):
        """The search's base.Found: the first success, else the last judged prompt (``prefer_last``, as
        check_asr.py reads a log's last entry) or the best-scoring one."""
        from .base import Found

        first = self.first_success
        chosen = first or (self.last if prefer_last else self.best)
        if chosen is None:
            return Found(prompt="", token_ids=[], success=False, score=float("nan"), step=None, steps_run=steps_run)
        return Found(prompt=chosen.prompt, token_ids=chosen.token_ids, success=chosen.success, score=chosen.score,
                     step=first.step if first else None, steps_run=steps_run)


def positive_settings(settings: dict, names: Sequence[str], minimum=1) -> None:
    """Raise InputError naming the flag when one of ``names`` is below ``minimum``."""
    from common.errors import InputError

    for name in names:
        value = settings.get(name)
        if value is not None and value < minimum:
            raise InputError(f"--{name} {value}: must be at least {minimum}")


def rate_setting(settings: dict, names: Sequence[str]) -> None:
    """Raise InputError naming the flag when one of ``names`` is outside [0, 1]."""
    from common.errors import InputError

    for name in names:
        value = settings.get(name)
        if value is not None and not 0.0 <= value <= 1.0:
            raise InputError(f"--{name} {value}: must be between 0 and 1")
