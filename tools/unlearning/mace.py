"""MACE: Lu et al., CVPR 2024, "MACE: Mass Concept Erasure in Diffusion Models" (docs/unlearning.md: MACE).

https://arxiv.org/abs/2403.06135 (code: https://github.com/Shilin-LU/MACE). Three stages on the UNet's
cross-attention key/value projections:

1. closed-form refinement (CFR): UCE's closed form (tools/unlearning/uce.py, reused), with the embeddings of the
   tokens around the concept words (and the EOS/padding after them) mapped to those of the same prompt with a
   mapping concept (``--guide``) in the concept's place;
2. one rank-``--rank`` LoRA per concept on every ``attn2.to_k``/``attn2.to_v``, trained to drive the attention of
   the image's concept region to the concept's tokens to zero (their attention loss: the Frobenius norm of those
   attention probabilities, summed over the cross-attention layers);
3. the closed-form fusion of the LoRAs into one weight per projection: the least-squares weight that gives each
   concept's prompts the keys/values its own LoRA gives them, pulled to the CFR weights by ``--lamb``.

Our reading of their code is cited as "cfr_lora_training.py", "cfr_utils.py", "fuse_lora_close_form.py",
"dataset.py", "mace_lora_atten_processor.py" (src/ of Shilin-LU/MACE at 6f7b544) and their object config
(configs/object/erase_ship.yaml), whose values are the defaults here.
"""

from __future__ import annotations

import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from common.cli import check_resolution

from . import base, register
from .ac import sample_indices
from .base import (DATA, GUIDE, RESOLVED, Flag, ImageSet, Method, RunContext, check_text, check_vae_multiple, encode,
                   finite, generate_image_set, image_latents, load_image_set, noised, require,
                   step_generator, train_loop)
from .uce import apply_uce, uce_modules, uce_transform

PAPER = "Lu et al., CVPR 2024, https://arxiv.org/abs/2403.06135"
CODE = "https://github.com/Shilin-LU/MACE"

# AdamW as their config (adam_beta1/2, adam_weight_decay, adam_epsilon), constant rate.
ADAMW = {"betas": (0.9, 0.999), "weight_decay": 1e-2, "eps": 1e-8}
# Their relation-focal importance sampling of timesteps (cfr_utils.py importance_sampling_fn): a window over
# t = 200 .. 400 of the 1000-step schedule, edges of logistic width 1/0.05 = 20 steps.
IMPORTANCE_WINDOW, IMPORTANCE_TEMPERATURE = (200, 400), 0.05
# Phrasings of the concept the prompts are built from (theirs: 30 object templates, dataset.py/cfr_utils.py
# prompt_augmentation; ours are our own, give theirs with --prompt_templates).
TEMPLATES = ("{}", "a photo of {}", "an image of {}", "a picture of {}", "a drawing of {}", "a painting of {}",
             "{} in a photo", "a close-up of {}")
GENERATION_PROMPT = "a photo of the {}"  # their data_preparation.py / inference.py: 8 images per concept
MASK_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
# The fallback mask's timestep (a fraction of the schedule): mid-way, where the layout is set but not the details.
FALLBACK_T = 0.5
# Seed streams of step_generator.
DRAW_STREAM, ORDER_STREAM, INIT_STREAM, MASK_STREAM, PROBE_STREAM = 10, 11, 12, 13, 14


# ---- stage 1: closed-form refinement ------------------------------------------


def matched_positions(old: Sequence[int], new: Sequence[int], length: int = 77) -> Tuple[List[int], List[int]]:
    """Positions of two token sequences (BOS ... EOS) that correspond: the common prefix, then the common suffix and
    every padding position after it, the two sequences aligned at their ends (cfr_utils.py find_matching_indices and
    the extension to 77 in prepare_k_v). The differing middle (the concept's and the guide's words) is left out.
    """
    start = 0
    while start < min(len(old), len(new)) and old[start] == new[start]:
        start += 1
    i, j = len(old) - 1, len(new) - 1
    while i >= start and j >= start and old[i] == new[j]:
        i, j = i - 1, j - 1
    shift = (len(old) - 1) - (len(new) - 1)  # old position p <-> new position p - shift after the middle
    tail_old = list(range(i + 1, length if shift >= 0 else length + shift))
    return list(range(start)) + tail_old, list(range(start)) + [p - shift for p in tail_old]


def _token_ids(tokenizer, prompt: str) -> List[int]:
    return tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids


@torch.no_grad()
def cfr_rows(tokenizer, text_encoder, old_prompts: Sequence[str], new_prompts: Sequence[str], all_words: bool,
             device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rows E (the concept prompts' embeddings) and G (their mapped prompts' embeddings at the same places), float64
    on the CPU: the matched positions, or every position with ``all_words`` (cfr_utils.py prepare_k_v)."""
    from common.data import encode_prompts

    E, G = [], []
    for old, new in zip(old_prompts, new_prompts):
        emb = encode_prompts(tokenizer, text_encoder, [old, new], device).double().cpu()
        if all_words:
            E.append(emb[0])
            G.append(emb[1])
        else:
            po, pn = matched_positions(_token_ids(tokenizer, old), _token_ids(tokenizer, new), emb.shape[1])
            E.append(emb[0, po])
            G.append(emb[1, pn])
    return torch.cat(E), torch.cat(G)


@torch.no_grad()
def prompt_rows(tokenizer, text_encoder, prompts: Sequence[str], device) -> torch.Tensor:
    """Every position's embedding of each prompt, [n * 77, d] float64 on the CPU (their COCO cache and fusion
    contexts use all 77)."""
    from common.data import encode_prompts

    if not prompts:
        return torch.zeros(0, text_encoder.config.hidden_size, dtype=torch.float64)
    return encode_prompts(tokenizer, text_encoder, list(prompts), device).double().cpu().flatten(0, 1)


def concept_prompts(concept: str, templates: Sequence[str]) -> List[str]:
    """The concept in each phrasing ("{}" is the concept), spaces tidied (an empty guide leaves none)."""
    return [" ".join(t.format(concept).split()) for t in templates]


# ---- stage 2: LoRA with the attention loss ------------------------------------


def concept_positions(tokenizer, prompt: str, concept: str, use_pooler: bool) -> torch.Tensor:
    """[77] bool: the concept's tokens in ``prompt`` and, with ``use_pooler``, every EOS token (the padding too,
    where it is the EOS token, as in SD's tokenizer): dataset.py's concept_positions."""
    ids = tokenizer(prompt, truncation=True, padding="max_length", max_length=tokenizer.model_max_length).input_ids
    word = tokenizer(concept, add_special_tokens=False).input_ids
    out = torch.zeros(len(ids), dtype=torch.bool)
    for i in range(len(ids) - len(word) + 1):
        if word and ids[i:i + len(word)] == word:
            out[i:i + len(word)] = True
    if use_pooler:
        out |= torch.tensor(ids) == tokenizer.eos_token_id
    return out


def importance_probabilities(num_train_timesteps: int) -> torch.Tensor:
    """Their timestep distribution (cfr_utils.py importance_sampling_fn, normalised): a soft window on t 200..400."""
    t = torch.arange(num_train_timesteps, dtype=torch.float64)
    lo, hi = IMPORTANCE_WINDOW
    p = torch.sigmoid(IMPORTANCE_TEMPERATURE * (t - lo)) - torch.sigmoid(IMPORTANCE_TEMPERATURE * (t - hi))
    return p / p.sum()


class LoRA(torch.nn.Module):
    """A low-rank update x -> up(down(x)) (diffusers' LoRALinearLayer: down ~ N(0, 1/rank^2), up = 0)."""

    def __init__(self, in_features: int, out_features: int, rank: int, generator: torch.Generator):
        super().__init__()
        self.down = torch.nn.Parameter(torch.randn(rank, in_features, generator=generator) / rank)
        self.up = torch.nn.Parameter(torch.zeros(out_features, rank))

    def forward(self, x):
        return x @ self.down.T @ self.up.T

    def delta(self) -> torch.Tensor:
        """The weight update up @ down, [out, in]."""
        return self.up @ self.down


class AttentionCapture:
    """Cross-attention processors that add a LoRA to the key and value projections and keep the attention
    probabilities (mace_lora_atten_processor.py with cfr_utils.py AttnController)."""

    def __init__(self):
        self.probs: List[torch.Tensor] = []  # per cross-attention call: [batch, heads, pixels, tokens]
        self.loras: Dict[str, Tuple[Optional[LoRA], Optional[LoRA]]] = {}

    def processor(self, name: str) -> "_CaptureProcessor":
        return _CaptureProcessor(self, name)

    def install(self, unet) -> dict:
        """Put the capturing processors on every attn2; return the processors to restore."""
        old = dict(unet.attn_processors)
        unet.set_attn_processor({k: (self.processor(k[:-len(".processor")]) if k.endswith("attn2.processor") else v)
                                 for k, v in old.items()})
        return old


class _CaptureProcessor:
    """One cross-attention's processor: diffusers' AttnProcessor with the LoRA added to the key and value, and the
    attention probabilities kept."""

    def __init__(self, capture: AttentionCapture, name: str):
        self.capture, self.name = capture, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        residual = hidden_states
        ndim = hidden_states.ndim
        if ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        context = encoder_hidden_states if encoder_hidden_states is not None else hidden_states
        if attn.norm_cross and encoder_hidden_states is not None:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        lora_k, lora_v = self.capture.loras.get(self.name, (None, None))
        if lora_k is not None:
            key = key + lora_k(context)
            value = value + lora_v(context)
        mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
        probs = attn.get_attention_scores(attn.head_to_batch_dim(query), attn.head_to_batch_dim(key), mask)
        self.capture.probs.append(probs.view(batch, attn.heads, *probs.shape[1:]))
        out = attn.batch_to_head_dim(torch.bmm(probs, attn.head_to_batch_dim(value)))
        out = attn.to_out[1](attn.to_out[0](out))
        if ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def attention_loss(probs: Sequence[torch.Tensor], masks: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Sum over the cross-attention layers of the Frobenius norm of the attention probabilities from the masked
    pixels to the concept's positions (cfr_utils.py AttnController.__call__ and loss).

    ``probs``: [batch, heads, pixels, tokens] per layer (square maps); ``masks``: [batch, 1, H, W] in [0, 1], resized
    to each layer's map (nearest, > 0.5, as theirs); ``positions``: [batch, tokens] bool.
    """
    total = 0.0
    for p in probs:
        side = int(round(math.sqrt(p.shape[2])))
        m = F.interpolate(masks.float(), size=(side, side), mode="nearest").flatten(1) > 0.5  # [batch, pixels]
        sel = m[:, None, :, None] & positions[:, None, None, :].to(m.device)
        total = total + torch.linalg.vector_norm(p * sel.to(p.dtype))
    return total


# ---- stage 3: fusion ----------------------------------------------------------


def fuse_weight(w_cfr: torch.Tensor, w_base: torch.Tensor, deltas: Sequence[torch.Tensor],
                contexts: Sequence[torch.Tensor], preserve: torch.Tensor, lamb: float,
                preserve_scale: float) -> torch.Tensor:
    """The fused projection (fuse_lora_close_form.py with cfr_utils.py closed_form_refinement), float64:

        argmin_W  sum_k ||(W - W_cfr - D_k) C_k^T||^2 + s ||(W - W_base) P^T||^2 + lamb ||W - W_cfr||^2
        = (W_cfr (S + lamb I) + sum_k D_k C_k^T C_k + s W_base P^T P) (S + s P^T P + lamb I)^-1,  S = sum_k C_k^T C_k

    with C_k the rows of concept k's prompt embeddings (all positions), D_k its LoRA's update, P the preserved rows.
    """
    W1, W0 = w_cfr.double().cpu(), w_base.double().cpu()
    d = W1.shape[1]
    P = preserve.double()
    S = sum((C.double().T @ C.double() for C in contexts), torch.zeros(d, d, dtype=torch.float64))
    left = W1 @ (S + lamb * torch.eye(d, dtype=torch.float64)) + preserve_scale * W0 @ (P.T @ P)
    for D, C in zip(deltas, contexts):
        left = left + D.double().cpu() @ (C.double().T @ C.double())
    right = S + preserve_scale * P.T @ P + lamb * torch.eye(d, dtype=torch.float64)
    return torch.linalg.solve(right, left.T).T  # right is symmetric


# ---- data and masks -----------------------------------------------------------


def mask_paths(folder: str, images: ImageSet, flag: str) -> List[str]:
    """The mask of each image: the file of ``folder`` with the image's name (or its name + "_mask", theirs), any image
    extension. One InputError naming ``flag`` for a missing or empty folder, a count that differs, a missing mask."""
    require(os.path.isdir(folder), f"{flag} {folder}: no such directory")
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(MASK_EXTENSIONS))
    require(files, f"{flag} {folder}: no mask images (white = the concept, one per training image)")
    require(len(files) == len(images.paths),
            f"{flag} {folder}: {len(files)} masks for {len(images.paths)} images of {images.folder}")
    by_stem = {os.path.splitext(f)[0]: os.path.join(folder, f) for f in files}
    out = []
    for path in images.paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        found = by_stem.get(stem) or by_stem.get(stem + "_mask")
        require(found is not None, f"{flag} {folder}: no mask for image {os.path.basename(path)}")
        out.append(found)
    return out


@torch.no_grad()
def load_masks(paths: Sequence[str], resolution: int) -> torch.Tensor:
    """Masks [n, 1, res, res] in [0, 1], resized and cropped as the images are (common.data.ImageTransform)."""
    from PIL import Image

    from common.data import ImageTransform

    transform = ImageTransform(resolution, center_crop=True, random_flip=False)
    out = []
    for path in paths:
        with Image.open(path) as im:
            out.append((transform(im.convert("L").convert("RGB"))[:1] + 1) / 2)
    return torch.stack(out)


@torch.no_grad()
def attention_masks(unet, noise_scheduler, latents: torch.Tensor, context: torch.Tensor, positions: torch.Tensor,
                    threshold: float, seed: int, device) -> torch.Tensor:
    """The fallback masks [n, 1, h, w] (latent size): where the base model's cross-attention to the concept's words,
    averaged over heads and layers (each map upsampled to the latent size), reaches ``threshold`` x its maximum,
    on each image noised to the mid-schedule timestep with seeded noise."""
    capture = AttentionCapture()
    old = capture.install(unet)
    try:
        n = latents.shape[0]
        t = torch.full((n,), int(FALLBACK_T * noise_scheduler.config.num_train_timesteps))
        x_t, t, _ = noised(noise_scheduler, latents.to(device), step_generator(seed, 0, MASK_STREAM), t)
        unet(x_t, t, encoder_hidden_states=context.expand(n, -1, -1).to(device))
        side = latents.shape[-1]
        maps = []
        for p in capture.probs:
            s = int(round(math.sqrt(p.shape[2])))
            a = p[..., positions.to(p.device)].sum(-1).mean(1).view(n, 1, s, s).float().cpu()
            maps.append(F.interpolate(a, size=(side, side), mode="bilinear", align_corners=False))
        heat = torch.stack(maps).mean(0)
        peak = heat.flatten(1).amax(1).clamp_min(1e-12)[:, None, None, None]
        return (heat >= threshold * peak).float()
    finally:
        unet.set_attn_processor(old)


# ---- the method ---------------------------------------------------------------

FLAGS = (  # defaults: their object config (configs/object/erase_ship.yaml); docs/unlearning.md: MACE
    Flag("--erase", [], "more concepts to erase (with --concept): one LoRA each, fused", nargs="+"),
    Flag("--guide", [""], "the mapping concept each erased one's prompts are refined towards (their "
         "mapping_concept): one for all, or one per erased concept", nargs="+"),
    Flag("--preserve", [], "concepts whose cross-attention outputs the closed forms keep (their cached COCO prior)",
         nargs="*"),
    Flag("--preserve_scale", 1.0, "weight of the preserved concepts in both closed forms", float),
    Flag("--lamb", 1e3, "pull of both closed forms toward the weights they start from", float),
    Flag("--all_words", False, "refinement: map every token position (not only those around the concept words)",
         switch=True),
    Flag("--prompt_templates", list(TEMPLATES), "phrasings of the concepts ('{}' is the concept)", nargs="+",
         default_text="8 of ours: '{}', 'a photo of {}', ..."),
    Flag("--concept_data", [], "an imagefolder of images of each erased concept (in --erase order, --concept last)",
         nargs="+", default_text="none: generate them"),
    Flag("--concept_images", 8, "images generated per concept with the base model when no --concept_data", int),
    Flag("--generation_steps", 30, "sampling steps of the generated images", int),
    Flag("--generation_guidance", 7.5, "classifier-free guidance of the generated images", float),
    Flag("--masks", [], "a folder of masks per --concept_data folder (one per image, same file name, white = the "
         "concept)", nargs="+", default_text="none: from the base model's cross-attention of the concept"),
    Flag("--attention_mask_threshold", 0.5, "without --masks: the share of the attention map's maximum above which a "
         "pixel is the concept's", float),
    Flag("--rank", 1, "LoRA rank", int),
    Flag("--iterations", 50, "LoRA steps per concept", int),
    Flag("--learning_rate", 1e-5, "AdamW learning rate", float),
    Flag("--batch_size", 1, "images per LoRA step", int),
    Flag("--max_grad_norm", 1.0, "gradient clipping", float),
    Flag("--no_importance_sampling", False, "uniform timesteps instead of their window on t 200-400", switch=True),
    Flag("--no_pooler", False, "attention loss on the concept's words only, not also on the EOS/padding tokens",
         switch=True),
    base.RESOLUTION_FLAG,
    *base.MEMORY_FLAGS,  # --gradient_checkpointing, --use_8bit_adam (for the LoRA training)
)


def _concepts(settings: dict, concept: Optional[str]) -> List[str]:
    return list(settings["erase"]) + ([concept] if concept is not None else [])


def check(settings: dict, concept: Optional[str], model_dir: Optional[str]) -> dict:
    """MACE's flags: the concepts, their guides and data folders, the masks (counted against the images)."""
    s = dict(settings)
    for c in s["erase"]:
        check_text(c, "--erase")
    erase = _concepts(s, concept)
    require(erase, "--concept (or --erase): give at least one concept to erase")
    require(len(set(c.strip().lower() for c in erase)) == len(erase), "--erase: a concept is given twice")
    require(len(s["guide"]) in (1, len(erase)),
            f"--guide: give one guide, or one per erased concept ({len(erase)}), not {len(s['guide'])}")
    for c in s["preserve"]:
        check_text(c, "--preserve")
        require(c not in erase, f"--preserve {c!r}: also erased; a concept cannot be both")
    finite(s["lamb"], "--lamb", 0, strict=True)
    finite(s["preserve_scale"], "--preserve_scale", 0, strict=False)
    finite(s["learning_rate"], "--learning_rate", 0, strict=True)
    finite(s["max_grad_norm"], "--max_grad_norm", 0, strict=True)
    finite(s["generation_guidance"], "--generation_guidance", 0, strict=False)
    a = s["attention_mask_threshold"]
    require(math.isfinite(a) and 0 < a <= 1, f"--attention_mask_threshold {a}: must be in (0, 1]")
    for flag in ("rank", "iterations", "batch_size", "concept_images", "generation_steps"):
        require(s[flag] >= 1, f"--{flag} {s[flag]}: must be at least 1")
    for t in s["prompt_templates"]:
        require("{}" in t and t.count("{") == 1 and t.count("}") == 1,
                f"--prompt_templates {t!r}: must hold '{{}}' (the concept) once and no other braces")
    check_resolution(s["resolution"])
    check_vae_multiple(s["resolution"], model_dir)
    if s["concept_data"]:
        require(len(s["concept_data"]) == len(erase),
                f"--concept_data: give one folder per erased concept ({len(erase)}), not {len(s['concept_data'])}")
        sets = [load_image_set(folder, "--concept_data") for folder in s["concept_data"]]
    if s["masks"]:
        require(bool(s["concept_data"]), "--masks: needs --concept_data (the masks are of those images)")
        require(len(s["masks"]) == len(erase),
                f"--masks: give one folder per --concept_data folder ({len(erase)}), not {len(s['masks'])}")
        for folder, images in zip(s["masks"], sets):
            mask_paths(folder, images, "--masks")
    return {**s, "erase": erase, "concept": concept}


def concept_images(settings: dict, parts, k: int, concept: str, seed: int, resolution: int, device,
                   ctx: RunContext, quiet: bool) -> ImageSet:
    """Concept ``k``'s images: its --concept_data folder, or generated by the base model as theirs (8 images of
    'a photo of the {concept}', data_preparation.py; 30 steps at guidance 7.5)."""
    if settings["concept_data"]:
        return load_image_set(settings["concept_data"][k], "--concept_data")
    return generate_image_set(parts, [GENERATION_PROMPT.format(concept)], settings["concept_images"], seed + k,
                              ctx.data_dir(f"concept{k}"), device, num_inference_steps=settings["generation_steps"],
                              guidance_scale=settings["generation_guidance"], resolution=resolution,
                              progress=not quiet, name=f"concept{k}")


def cross_attention_layers(unet) -> List[Tuple[str, torch.nn.Module]]:
    """(name, Attention) of every cross-attention (attn2) of the UNet, in module order."""
    return [(n, m) for n, m in unet.named_modules() if n.endswith("attn2")]


def make_loras(unet, rank: int, seed: int, k: int) -> Dict[str, Tuple[LoRA, LoRA]]:
    """Concept ``k``'s LoRA pair (key, value) for every cross-attention, seeded from (seed, k)."""
    g = step_generator(seed, k, INIT_STREAM)
    return {name: (LoRA(m.to_k.in_features, m.to_k.out_features, rank, g),
                   LoRA(m.to_v.in_features, m.to_v.out_features, rank, g))
            for name, m in cross_attention_layers(unet)}


def lora_values(unet, rank: int) -> int:
    """Values of one concept's LoRAs on this UNet: rank x (in + out) per key and value projection of each attn2."""
    return sum(rank * (m.in_features + m.out_features) for _, m in uce_modules(unet))


def lora_params(loras: Sequence[Dict[str, Tuple[LoRA, LoRA]]]) -> Dict[str, torch.nn.Parameter]:
    """Every LoRA tensor by a stable name (the checkpoint's keys)."""
    out = {}
    for k, layers in enumerate(loras):
        for name, pair in layers.items():
            for kind, lora in zip(("to_k", "to_v"), pair):
                out[f"concept{k}.{name}.{kind}.down"] = lora.down
                out[f"concept{k}.{name}.{kind}.up"] = lora.up
    return out


class ConceptData:
    """One concept's training examples: image latents (posterior mean, std), masks, prompts and their positions."""

    def __init__(self, parts, images: ImageSet, masks: torch.Tensor, prompts: Sequence[str], concept: str,
                 use_pooler: bool, resolution: int, device):
        self.n = len(images.paths)
        self.mean, self.std = image_latents(parts, images, resolution, device)
        self.masks = masks
        self.context = encode(parts, prompts, device).cpu()
        self.positions = torch.stack([concept_positions(parts.tokenizer, p, concept, use_pooler) for p in prompts])

    def batch(self, seed: int, step: int, batch: int, k: int, timestep_probs: Optional[torch.Tensor],
              num_train_timesteps: int) -> dict:
        """Step ``step``'s images (shuffled passes), prompts, latent samples, timesteps and generator: a pure function
        of (seed, step)."""
        g = step_generator(seed, step, DRAW_STREAM)
        idx = sample_indices(seed + k, step * batch, batch, self.n, ORDER_STREAM)
        prompt = torch.randint(0, self.context.shape[0], (batch,), generator=g)
        eps = torch.randn(self.mean[idx].shape, generator=g)
        if timestep_probs is not None:
            t = torch.multinomial(timestep_probs, batch, replacement=True, generator=g)
        else:
            t = torch.randint(0, num_train_timesteps, (batch,), generator=g)
        return {"latents": self.mean[idx] + self.std[idx] * eps, "masks": self.masks[idx],
                "context": self.context[prompt], "positions": self.positions[prompt], "timesteps": t, "generator": g}


def step_loss(unet, capture: AttentionCapture, noise_scheduler, draws: dict, device) -> torch.Tensor:
    """The attention loss of one batch (the UNet's prediction itself is not used: their loss is the attention's)."""
    x_t, t, _ = noised(noise_scheduler, draws["latents"].to(device), draws["generator"], draws["timesteps"])
    capture.probs = []
    unet(x_t, t, encoder_hidden_states=draws["context"].to(device))
    loss = attention_loss(capture.probs, draws["masks"].to(device), draws["positions"])
    capture.probs = []
    return loss


def train_loras(unet, noise_scheduler, data: Sequence[ConceptData], loras, iterations: int, batch: int,
                learning_rate: float, max_grad_norm: float, importance: bool, seed: int, device,
                progress: bool = True, ctx: Optional[RunContext] = None, use_8bit_adam: bool = False) -> List[float]:
    """Train each concept's LoRA in turn (their train_seperate), ``iterations`` steps each, in one resumable loop.

    Each concept's LoRA sees the refined UNet alone (theirs: the processors are reset per concept). AdamW per concept
    at a constant rate, gradients clipped (cfr_lora_training.py). Returns every step's loss.
    """
    capture = AttentionCapture()
    old = capture.install(unet)
    probs = importance_probabilities(noise_scheduler.config.num_train_timesteps) if importance else None
    optimizers = [base.optimizer(list(lora_params([layers]).values()), "adamw", use_8bit_adam, lr=learning_rate, **ADAMW)
                  for layers in loras]
    params = lora_params(loras)

    def step(i: int):
        k = i // iterations
        capture.loras = loras[k]
        draws = data[k].batch(seed, i, batch, k, probs, noise_scheduler.config.num_train_timesteps)
        loss = step_loss(unet, capture, noise_scheduler, draws, device)
        optimizers[k].zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(lora_params([loras[k]]).values()), max_grad_norm)
        optimizers[k].step()
        return loss.item(), {"concept": k}

    try:
        unet.train()
        return train_loop(ctx or RunContext(), iterations * len(loras), step, params,
                          {f"optimizer{k}": o for k, o in enumerate(optimizers)}, {}, desc="MACE LoRA",
                          progress=progress)
    finally:
        unet.eval()
        unet.set_attn_processor(old)


@torch.no_grad()
def probe_loss(unet, noise_scheduler, data: ConceptData, loras, seed: int, device) -> float:
    """The attention loss of every image of a concept at the mid-schedule timestep, first prompt, fixed noise: the
    number the card reports before and after (the fused model: no LoRA)."""
    capture = AttentionCapture()
    capture.loras = loras or {}
    old = capture.install(unet)
    try:
        n = data.n
        draws = {"latents": data.mean, "masks": data.masks, "context": data.context[:1].expand(n, -1, -1),
                 "positions": data.positions[:1].expand(n, -1), "generator": step_generator(seed, 0, PROBE_STREAM),
                 "timesteps": torch.full((n,), int(FALLBACK_T * noise_scheduler.config.num_train_timesteps))}
        return float(step_loss(unet, capture, noise_scheduler, draws, device)) / n
    finally:
        unet.set_attn_processor(old)


def run(settings: dict, parts, device, seed: int, quiet: bool, ctx: RunContext) -> dict:
    """Refine, train the LoRAs, fuse them into the UNet's cross-attention keys/values in place; return the card's."""
    from common.models import vae_scale_factor

    unet, tok, te = parts.unet, parts.tokenizer, parts.text_encoder
    erase, templates = settings["erase"], settings["prompt_templates"]
    guides = settings["guide"] * len(erase) if len(settings["guide"]) == 1 else list(settings["guide"])
    factor = vae_scale_factor(parts.vae.config)
    resolution = settings["resolution"] or unet.config.sample_size * factor
    latent_side = resolution // factor
    use_pooler = not settings["no_pooler"]
    unet.requires_grad_(False).eval()

    # Data first: generated images come from the base model.
    data, cards, mask_sources = [], {}, []
    images_all = [concept_images(settings, parts, k, c, seed, resolution, device, ctx, quiet)
                  for k, c in enumerate(erase)]
    base_unet_state = {n: w.detach().clone() for n, w in unet.state_dict().items()
                       if n.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))}
    for k, (c, images) in enumerate(zip(erase, images_all)):
        prompts = concept_prompts(c, templates)
        if settings["masks"]:
            masks = load_masks(mask_paths(settings["masks"][k], images, "--masks"), resolution)
            source = {"source": "folder", "folder": os.path.abspath(settings["masks"][k])}
        else:
            masks = torch.zeros(len(images.paths), 1, latent_side, latent_side)
            source = {"source": "attention", "threshold": settings["attention_mask_threshold"],
                      "prompt": prompts[0], "timestep": int(FALLBACK_T * parts.noise_scheduler.config.num_train_timesteps),
                      "note": "the base model's cross-attention map of the concept's words (the authors segment with "
                              "GroundingDINO + SAM)"}
        d = ConceptData(parts, images, masks, prompts, c, use_pooler, resolution, device)
        if not settings["masks"]:
            words = concept_positions(tok, prompts[0], c, use_pooler=False)
            unet.to(device)
            d.masks = attention_masks(unet, parts.noise_scheduler, d.mean, d.context[:1], words,
                                      settings["attention_mask_threshold"], seed + k, device)
            source["mean_area"] = float(d.masks.mean())
        else:
            source["mean_area"] = float(d.masks.gt(0.5).float().mean())
        data.append(d)
        mask_sources.append(source)
        cards[f"concept{k}"] = {**images.card(), "concept": c, "masks": source}
    unet.to(device)
    before = [probe_loss(unet, parts.noise_scheduler, d, None, seed, device) for d in data]

    # Stage 1: closed-form refinement (UCE's transform, all concepts at once).
    old_prompts = [p for c in erase for p in concept_prompts(c, templates)]
    new_prompts = [p for g in guides for p in concept_prompts(g, templates)]
    te.to(device)
    E, G = cfr_rows(tok, te, old_prompts, new_prompts, settings["all_words"], device)
    P = prompt_rows(tok, te, settings["preserve"], device)
    contexts = [prompt_rows(tok, te, concept_prompts(c, templates), device) for c in erase]
    te.to("cpu")
    unet.to("cpu")
    M = uce_transform(E, G, P, settings["lamb"], 1.0, settings["preserve_scale"])
    apply_uce(unet, M)
    unet.to(device)

    # Stage 2: one LoRA per concept on the refined UNet.
    loras = [make_loras(unet, settings["rank"], seed, k) for k in range(len(erase))]
    for layers in loras:
        for pair in layers.values():
            for lora in pair:
                lora.to(device)
    if settings["gradient_checkpointing"]:
        unet.enable_gradient_checkpointing()
    losses = train_loras(unet, parts.noise_scheduler, data, loras, settings["iterations"], settings["batch_size"],
                         settings["learning_rate"], settings["max_grad_norm"],
                         not settings["no_importance_sampling"], seed, device, progress=not quiet, ctx=ctx,
                         use_8bit_adam=settings["use_8bit_adam"])
    if settings["gradient_checkpointing"]:
        unet.disable_gradient_checkpointing()
    with_lora = [probe_loss(unet, parts.noise_scheduler, d, l, seed, device) for d, l in zip(data, loras)]

    # Stage 3: fuse every concept's LoRA into each projection.
    unet.to("cpu")
    modules = dict(uce_modules(unet))
    with torch.no_grad():
        for name, module in modules.items():
            layer, kind = name.rsplit(".", 1)
            deltas = [layers[layer][0 if kind == "to_k" else 1].delta().detach().cpu() for layers in loras]
            w = fuse_weight(module.weight, base_unet_state[name + ".weight"], deltas, contexts, P,
                            settings["lamb"], settings["preserve_scale"])
            module.weight.copy_(w.to(module.weight.dtype))
    unet.to(device)
    after = [probe_loss(unet, parts.noise_scheduler, d, None, seed, device) for d in data]
    unet.to("cpu")
    it = settings["iterations"]
    return {
        "stages": ["closed-form refinement", "LoRA per concept (attention loss)", "closed-form fusion"],
        "cfr_rows": {"erase": E.shape[0], "preserve": P.shape[0]},
        "trained_parameters": {"loras": len(erase), "tensors": len(lora_params(loras)),
                               "numel": sum(p.numel() for p in lora_params(loras).values())},
        "loss": {c: {"first": losses[k * it], "last": losses[(k + 1) * it - 1]} for k, c in enumerate(erase)},
        "attention_on_probes": {c: {"base": before[k], "refined_with_lora": with_lora[k], "fused": after[k]}
                                for k, c in enumerate(erase)},
        "attention_note": "attention loss per image (their loss) at the mid-schedule timestep, first phrasing, fixed "
                          "noise: the base model, the refined model with the concept's LoRA, the final fused model",
        "mask_source": [m["source"] for m in mask_sources],
        "prompts": {c: concept_prompts(c, templates) for c in erase},
        GUIDE: guides,
        DATA: cards,
        RESOLVED: {"resolution": resolution},
    }


def _erased(settings: dict) -> List[str]:
    return list(settings["erase"])


register(Method(name="mace", family="MACE", summary="closed-form refinement, LoRA per concept, closed-form fusion",
                paper=PAPER, code=CODE, flags=FLAGS, check=check, run=run, erased=_erased, trains=True,
                checkpoint_every=25, target_flags=("erase", "guide", "preserve")))
