"""A deterministic "toy world" in which the paper's pipeline runs for real on 2 CPU cores.

Everything is trained here, from a seed, in minutes (SPEC 10): drawn concept
images (colour x shape at 32 px) with captions, a toy CLIP trained
contrastively on them, a toy Stable Diffusion (its text encoder is the toy
CLIP's text tower, a small VAE and a ~1M-parameter UNet trained with the DDPM
loss), a binary ViT classifier for the target concept, unlearned copies of the
base model made with ``tools/unlearn.py`` (ESD-x and UCE), curriculum datasets
in imagefolder format and validation prompts. Quality figures go to
``card.json`` with the target each one should meet and whether it did.

The target concept is the colour+shape "a red circle" (``TARGET``): class 1 of
the classifier is a red circle, and its negatives include the related
concepts (red squares, red rings, blue/orange circles, ...), so it detects the
conjunction, not the colour or the shape alone. The retained concept is
"a blue square" (``RETAINED``); it is judged with the toy CLIP: the share of
images whose top-1 caption among all 48 "a {colour} {shape}" captions is
"a blue square".

Budget on 2 CPU cores: the full build took 401 s and 644 s in two builds on
2026-11-29 (the second while a test job shared the cores; its card records
the per-part timings); ``scale="reduced"`` builds the same world with tiny
step counts in about a minute, for tests. The CLI sets OMP_WAIT_POLICY=PASSIVE
because spinning OpenMP threads slowed steps on a shared machine (seen while
the builder was developed, 2026-11-28; not re-measured since).

The world is cached in a directory (default ``toy_world/`` at the repo root)
and rebuilt only when ``card.json`` is missing or records another
configuration (``VERSION``, seed, scale, settings). It is built in a temporary
sibling directory and renamed into place, ``card.json`` written last, so a
directory with a card is complete.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from tqdm.auto import tqdm

from . import tiny
from .results import slug

VERSION = 2
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DIR = os.path.join(ROOT, "toy_world")
UNLEARN_TOOL = os.path.join(ROOT, "tools", "unlearn.py")
CARD_FILE = "card.json"
RESOLUTION = 32

TARGET = ("red", "circle")
RETAINED = ("blue", "square")
# The target's nearest concepts: the card reports how the unlearned models treat them (collateral damage).
NEIGHBOURS = (("red", "square"), ("red", "ring"), ("orange", "circle"), ("blue", "circle"))
# Caption phrasings: the models are trained on all of them, and the validation prompts are these phrasings.
TEMPLATES = (
    "a {colour} {shape}", "a picture of a {colour} {shape}", "an image of a {colour} {shape}",
    "a drawing of a {colour} {shape}", "a photo of a {colour} {shape}", "a {colour} {shape} on a grey background",
    "a small {colour} {shape}", "one {colour} {shape}", "{colour} {shape}", "a simple {colour} {shape}",
)
CONCEPTS = tuple((c, s) for c in tiny.COLOURS for s in tiny.SHAPES)  # 8 x 6 = 48, colour-major
# Curriculum order as in the paper: general concepts first, the closest to the target last.
RELATED = (
    ("green", "triangle"), ("yellow", "cross"), ("purple", "diamond"), ("white", "square"),  # unrelated
    ("red", "square"), ("blue", "circle"), ("red", "triangle"), ("yellow", "circle"),  # same colour / same shape
    ("orange", "circle"), ("red", "ring"),  # closest: same shape near colour, same colour near shape
)
# Far from the target: no red/orange/purple, no circle/ring (and not the retained concept).
UNRELATED = (
    ("green", "square"), ("blue", "triangle"), ("yellow", "diamond"), ("white", "cross"), ("black", "triangle"),
    ("green", "cross"), ("blue", "diamond"), ("yellow", "square"), ("white", "triangle"), ("black", "diamond"),
)
PER_CONCEPT = 50
VALIDATION_REPEATS = 3  # lines per phrasing in the validation prompt files
CURRICULUM = ",".join(str(PER_CONCEPT * (i + 1)) for i in range(len(RELATED)))

# Architectures (the same at both scales; only step and image counts differ).
ARCH = {
    "text": dict(hidden_size=64, layers=2, projection_dim=64),
    "vision": dict(image_size=RESOLUTION, patch_size=4, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, projection_dim=64),
    "vae": dict(block_out_channels=(16, 32, 32), norm_num_groups=8, latent_channels=4),
    # Cross-attention at the 4 x 4 level and in the mid block; diffusers' attention_head_dim is the number
    # of heads here: 2 heads (of 32 channels) are ~30% faster per step on a CPU than 8 tiny ones.
    "unet": dict(block_out_channels=(32, 64), layers_per_block=1,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=2,
                 norm_num_groups=32),
    "classifier": dict(patch_size=4, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=128),
}

SCALES = {
    "full": dict(
        clip_images_per_concept=32, heldout_per_concept=10, clip_steps=400, clip_lr=3e-3,
        sd_images_per_concept=48, vae_steps=600, vae_batch=16, vae_lr=2e-3, vae_kl_weight=1e-6,
        unet_steps=1100, unet_batch=64, unet_lr=4e-3, snr_gamma=5.0, caption_dropout=0.1,
        classifier_steps=800, classifier_batch=64, classifier_heldout=300, classifier_lr=2e-3,
        esd_iterations=200, esd_learning_rate=5e-4, esd_ddim_steps=20,
        eval_images_per_prompt=3, eval_inference_steps=20, guidance_scale=7.5,
    ),
    "reduced": dict(
        clip_images_per_concept=4, heldout_per_concept=2, clip_steps=40, clip_lr=3e-3,
        sd_images_per_concept=4, vae_steps=12, vae_batch=16, vae_lr=2e-3, vae_kl_weight=1e-6,
        unet_steps=12, unet_batch=32, unet_lr=4e-3, snr_gamma=5.0, caption_dropout=0.1,
        classifier_steps=40, classifier_batch=32, classifier_heldout=64, classifier_lr=2e-3,
        esd_iterations=4, esd_learning_rate=2e-3, esd_ddim_steps=4,
        eval_images_per_prompt=1, eval_inference_steps=4, guidance_scale=7.5,
    ),
}
UNLEARN_METHODS = ("esd-x", "uce")
BOUNDS = {  # figure -> (comparison, bound): the card records each figure against its target
    "clip_top1_retrieval": (">=", 0.9),
    "base_classifier_acc_target": (">=", 0.8),
    "base_retained_top1": (">=", 0.7),
    "unlearned_classifier_acc_target": ("<=", 0.2),
    "unlearned_retained_top1": (">=", 0.7),
}


def caption(colour: str, shape: str, template: int = 0) -> str:
    """The caption of a (colour, shape) concept in phrasing ``template``."""
    return TEMPLATES[template % len(TEMPLATES)].format(colour=colour, shape=shape)


def concept_prompts(concept: Tuple[str, str]) -> List[str]:
    """The validation prompts of a concept: one per phrasing."""
    return [caption(*concept, template=t) for t in range(len(TEMPLATES))]


def paths(out_dir: str = DEFAULT_DIR) -> Dict[str, object]:
    """Where each part of the world lives under ``out_dir``."""
    return {
        "root": out_dir,
        "card": os.path.join(out_dir, CARD_FILE),
        "clip": os.path.join(out_dir, "clip"),
        "sd_base": os.path.join(out_dir, "sd_base"),
        "classifier": os.path.join(out_dir, "classifier"),
        "unlearned": {m: os.path.join(out_dir, "unlearned", m) for m in UNLEARN_METHODS},
        "data_related": os.path.join(out_dir, "data", "related"),
        "data_unrelated": os.path.join(out_dir, "data", "unrelated"),
        # Named after the concept: tools/report.py labels runs by their prompt file's name.
        "prompts_target": os.path.join(out_dir, "prompts", slug(caption(*TARGET)) + ".txt"),
        "prompts_retained": os.path.join(out_dir, "prompts", slug(caption(*RETAINED)) + ".txt"),
    }


def load_card(out_dir: str = DEFAULT_DIR) -> Optional[dict]:
    """The world's card, or None when the world is missing or incomplete."""
    try:
        with open(os.path.join(out_dir, CARD_FILE), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def world_config(seed: int, scale: str) -> dict:
    """Everything the world depends on; a card recording another config means a rebuild."""
    if scale not in SCALES:
        raise ValueError(f"scale {scale!r}: expected one of {', '.join(SCALES)}")
    config = {"version": VERSION, "seed": seed, "scale": scale, "settings": SCALES[scale], "arch": ARCH,
              "target": TARGET, "retained": RETAINED, "templates": TEMPLATES, "related": RELATED,
              "unrelated": UNRELATED, "per_concept": PER_CONCEPT, "curriculum": CURRICULUM,
              "resolution": RESOLUTION}
    return json.loads(json.dumps(config))  # tuples -> lists, as the card stores it


def _seed(seed: int, *stream: int) -> int:
    """An independent 32-bit seed per (world seed, stream), so stages do not share random streams."""
    return int(np.random.SeedSequence([seed, *stream]).generate_state(1)[0])


# ---- images ------------------------------------------------------------------------------------------

def draw_concepts(concepts: Sequence[Tuple[str, str]], per_concept: int, seed: int) -> Tuple[List[Image.Image], List[int]]:
    """``per_concept`` drawn images of each concept (concept-major) and each image's concept index."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for k, (colour, shape) in enumerate(concepts):
        for _ in range(per_concept):
            images.append(tiny.draw_shape(shape, colour, RESOLUTION, rng))
            labels.append(k)
    return images, labels


def pixels(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL RGB images -> float tensor [n, 3, H, W] in [-1, 1] (what the VAE sees)."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def degrade(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A random blur and pixel noise, so the classifier also judges decoded (soft-edged) images by their shape."""
    if rng.random() < 0.7:
        image = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.6))))
    if rng.random() < 0.5:
        arr = np.asarray(image, dtype=np.float32) + rng.normal(0, rng.uniform(2, 12), (RESOLUTION, RESOLUTION, 3))
        image = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return image


# ---- toy CLIP ----------------------------------------------------------------------------------------

def make_clip(seed: int):
    """A randomly initialised (seeded) transformers CLIPModel with the real 49408-token vocabulary."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    text = tiny.tiny_text_config(**ARCH["text"])
    config = CLIPConfig(text_config=text, vision_config=dict(ARCH["vision"]),
                        projection_dim=ARCH["text"]["projection_dim"])
    return CLIPModel(config)


def clip_processor(tokenizer):
    """The toy CLIP's processor: CLIP's normalisation at 32 px and the real BPE tokenizer."""
    from transformers import CLIPImageProcessor, CLIPProcessor

    image_processor = CLIPImageProcessor(size={"shortest_edge": RESOLUTION},
                                         crop_size={"height": RESOLUTION, "width": RESOLUTION})
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def train_clip(model, processor, images: Sequence[Image.Image], labels: Sequence[int], steps: int, lr: float,
               seed: int, log: Callable = print) -> List[float]:
    """Contrastive (InfoNCE, learnable logit scale) training on (image, caption); return the losses.

    A batch holds two images of every concept, each with a random phrasing;
    same-concept pairs are all positives (soft targets), so duplicates in a
    batch are not pushed apart.
    """
    gen = torch.Generator().manual_seed(seed)
    pix = processor(images=list(images), return_tensors="pt")["pixel_values"]
    labels_t = torch.tensor(labels)
    n_concepts = int(labels_t.max()) + 1
    by_concept = [torch.nonzero(labels_t == k).flatten() for k in range(n_concepts)]
    texts = [caption(*CONCEPTS[k], template=t) for k in range(n_concepts) for t in range(len(TEMPLATES))]
    tok = processor.tokenizer(texts, padding=True, return_tensors="pt")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 2), pct_start=0.1)
    model.train()
    losses = []
    for _ in tqdm(range(steps), desc="toy CLIP", leave=False, mininterval=2):
        concepts = torch.arange(n_concepts).repeat(2)
        picks = torch.stack([by_concept[k][torch.randint(len(by_concept[k]), (1,), generator=gen)] for k in concepts])
        rows = concepts * len(TEMPLATES) + torch.randint(len(TEMPLATES), (len(concepts),), generator=gen)
        img = model.get_image_features(pixel_values=pix[picks.flatten()])
        txt = model.get_text_features(input_ids=tok["input_ids"][rows], attention_mask=tok["attention_mask"][rows])
        img, txt = (F.normalize(getattr(x, "pooler_output", x), dim=-1) for x in (img, txt))
        logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T
        same = (concepts[:, None] == concepts[None, :]).float()
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (torch.sum(-target * logits.log_softmax(1), 1).mean()
                      + torch.sum(-target * logits.T.log_softmax(1), 1).mean())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    log(f"toy CLIP: loss {losses[0]:.3f} -> {np.mean(losses[-10:]):.3f}, logit scale {model.logit_scale.exp():.1f}")
    return losses


def retrieval_top1(scorer, images: Sequence[Image.Image], labels: Sequence[int]) -> Tuple[float, List[int]]:
    """Top-1 caption retrieval among all 48 "a {colour} {shape}" captions: (accuracy, predicted concept per image)."""
    txt = scorer.embed_texts([caption(c, s) for c, s in CONCEPTS])
    preds: List[int] = []
    for b in range(0, len(images), 128):
        preds.extend((scorer.embed_images(images[b : b + 128]) @ txt.T).argmax(-1).tolist())
    acc = float(np.mean([p == y for p, y in zip(preds, labels)])) if len(labels) else 0.0
    return acc, preds


# ---- toy Stable Diffusion ----------------------------------------------------------------------------

def make_vae(seed: int):
    """A small AutoencoderKL with 4x downsampling: 32 px images -> 8 x 8 x 4 latents."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    a = ARCH["vae"]
    n = len(a["block_out_channels"])
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=a["block_out_channels"],
                         layers_per_block=1, latent_channels=a["latent_channels"],
                         norm_num_groups=a["norm_num_groups"], sample_size=RESOLUTION)


def train_vae(vae, x: torch.Tensor, steps: int, batch: int, lr: float, kl_weight: float, seed: int,
              log: Callable = print) -> Dict[str, float]:
    """Train the VAE as an autoencoder (MSE + L1 on [-1, 1] pixels + a small KL weight); return its figures.

    The posterior's log-variance starts at -6 (std 0.05): with a tiny KL weight
    the reconstruction keeps it small, so a sampled latent (what the
    fine-tuning scripts draw) stays close to the mean the UNet was trained on.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        half = vae.quant_conv.out_channels // 2  # quant_conv outputs (mean, logvar)
        vae.quant_conv.weight[half:] = 0
        vae.quant_conv.bias[half:] = -6.0
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 2), pct_start=0.1)
    vae.train()
    losses = []
    for _ in tqdm(range(steps), desc="toy VAE", leave=False, mininterval=2):
        xb = x[torch.randint(len(x), (batch,), generator=gen)]
        post = vae.encode(xb).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, xb) + F.l1_loss(rec, xb) + kl_weight * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    vae.eval()
    with torch.no_grad():
        idx = torch.randperm(len(x), generator=gen)[:512]
        post = vae.encode(x[idx]).latent_dist
        mse = float(F.mse_loss(vae.decode(post.mean).sample.clamp(-1, 1), x[idx]))
        rel_std = float(post.std.mean() / post.mean.std())
    # PSNR on the 0..1 pixel scale (the [-1, 1] MSE is 4x the 0..1 one).
    figures = {"recon_mse_pm1": mse, "recon_psnr_db": float(10 * np.log10(4.0 / max(mse, 1e-12))),
               "posterior_std_over_latent_std": rel_std,
               "loss_first": losses[0] if losses else None, "loss_last": float(np.mean(losses[-10:])) if losses else None}
    log(f"toy VAE: reconstruction MSE {mse:.4f} ([-1,1] scale), PSNR {figures['recon_psnr_db']:.1f} dB, "
        f"posterior std / latent std {rel_std:.3f}")
    return figures


@torch.no_grad()
def encode_latents(vae, x: torch.Tensor, batch: int = 256) -> Tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior (mean, std) of every image, unscaled: encoded once, the VAE is frozen afterwards."""
    means, stds = [], []
    for b in range(0, len(x), batch):
        post = vae.encode(x[b : b + batch]).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


def make_unet(cross_attention_dim: int, seed: int):
    """A ~1M-parameter UNet2DConditionModel on 8 x 8 x 4 latents, cross-attending to the text hidden states."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=RESOLUTION // 4, in_channels=4, out_channels=4,
                                cross_attention_dim=cross_attention_dim, **ARCH["unet"])


def noise_schedule_config() -> dict:
    """Stable Diffusion's training noise schedule (1000 steps, scaled_linear betas)."""
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@torch.no_grad()
def encode_texts(tokenizer, text_encoder, texts: Sequence[str], batch: int = 128) -> torch.Tensor:
    """last_hidden_state [n, 77, d] of each text, padded to the tokenizer's length as the pipeline does."""
    from .data import tokenize_captions

    out = []
    for b in range(0, len(texts), batch):
        out.append(text_encoder(tokenize_captions(tokenizer, texts[b : b + batch]))[0])
    return torch.cat(out)


def train_unet(unet, lat_mean: torch.Tensor, lat_std: torch.Tensor, scaling_factor: float, labels: Sequence[int],
               text_table: torch.Tensor, steps: int, batch: int, lr: float, caption_dropout: float, seed: int,
               snr_gamma: Optional[float] = 5.0, log: Callable = print) -> Dict[str, float]:
    """Epsilon-prediction DDPM training in latent space; return the loss figures.

    Min-SNR-gamma loss weighting (Hang et al. 2023, weight min(SNR, gamma) / SNR
    for epsilon prediction) converges several times faster, which the CPU
    budget needs.

    ``text_table`` rows are concept k's phrasing t at row k * len(TEMPLATES) + t,
    and the empty caption last (caption dropout uses it, so classifier-free
    guidance works). Latents are drawn from the cached posterior each step.
    """
    from diffusers import DDPMScheduler

    sched_noise = DDPMScheduler(**noise_schedule_config())
    alphas = sched_noise.alphas_cumprod
    snr = alphas / (1 - alphas)
    gen = torch.Generator().manual_seed(seed)
    labels_t = torch.tensor(labels)
    empty_row = text_table.shape[0] - 1
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 2), pct_start=0.05)
    unet.train()
    losses = []
    for _ in tqdm(range(steps), desc="toy UNet", leave=False, mininterval=2):
        idx = torch.randint(len(labels_t), (batch,), generator=gen)
        z = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=gen)) * scaling_factor
        rows = labels_t[idx] * len(TEMPLATES) + torch.randint(len(TEMPLATES), (batch,), generator=gen)
        rows = torch.where(torch.rand(batch, generator=gen) < caption_dropout, torch.full_like(rows, empty_row), rows)
        t = torch.randint(0, len(alphas), (batch,), generator=gen)
        noise = torch.randn(z.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * z + (1 - a).sqrt() * noise
        per_sample = (unet(noisy, t, text_table[rows]).sample - noise).pow(2).mean((1, 2, 3))
        weight = snr[t].clamp(max=snr_gamma) / snr[t] if snr_gamma else torch.ones_like(per_sample)
        loss = (weight * per_sample).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(per_sample.mean().item())  # the unweighted DDPM loss, comparable across settings
    unet.eval()
    figures = {"loss_first": losses[0], "loss_last": float(np.mean(losses[-20:]))}
    log(f"toy UNet: loss {figures['loss_first']:.3f} -> {figures['loss_last']:.3f}")
    return figures


def save_sd(out_dir: str, tokenizer, text_encoder, vae, unet) -> str:
    """Save the toy pipeline in diffusers format with a DDIM inference scheduler."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = DDIMScheduler(**noise_schedule_config(), clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              prediction_type="epsilon")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out_dir)
    return out_dir


# ---- concept classifier ------------------------------------------------------------------------------

def classifier_batch(target: Tuple[str, str], n: int, rng: np.random.Generator,
                     augment: bool = True) -> Tuple[List[Image.Image], List[int]]:
    """Even rows the target; odd rows negatives: by turns same colour (other shape), same shape (other colour),
    same colour again, any other concept.

    Related negatives dominate because they are what a detector of the colour
    or the shape alone would get wrong; same-colour ones most, since colour is
    the shortcut a small model learns first.
    """
    colour, shape = target
    same_colour = [c for c in CONCEPTS if c[0] == colour and c[1] != shape]
    same_shape = [c for c in CONCEPTS if c[1] == shape and c[0] != colour]
    others = [c for c in CONCEPTS if c[0] != colour and c[1] != shape]
    pools = (same_colour, same_shape, same_colour, others)
    images, labels = [], []
    for i in range(n):
        if i % 2 == 0:
            concept, y = target, 1
        else:
            pool = pools[(i // 2) % 4]
            concept, y = pool[rng.integers(len(pool))], 0
        img = tiny.draw_shape(concept[1], concept[0], RESOLUTION, rng)
        images.append(degrade(img, rng) if augment else img)
        labels.append(y)
    return images, labels


def train_classifier(out_dir: str, target: Tuple[str, str], steps: int, batch: int, heldout: int, seed: int,
                     lr: float = 2e-3, log: Callable = print) -> Dict[str, float]:
    """Train and save a ViTForImageClassification (class 1 = the target concept); return held-out accuracies."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(seed)
    name = caption(*target)
    config = ViTConfig(image_size=RESOLUTION, num_labels=2, id2label={0: "other", 1: name},
                       label2id={"other": 0, name: 1}, **ARCH["classifier"])
    model = ViTForImageClassification(config)
    processor = ViTImageProcessor(size={"height": RESOLUTION, "width": RESOLUTION})
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 2), pct_start=0.1)
    model.train()
    for _ in tqdm(range(steps), desc="classifier", leave=False, mininterval=2):
        images, labels = classifier_batch(target, batch, rng)
        px = pixels(images)  # = the processor's rescale and 0.5/0.5 normalisation at 32 px, without its overhead
        loss = F.cross_entropy(model(pixel_values=px).logits, torch.tensor(labels))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    # Held-out drawn images (their own stream): clean, and with the training augmentation.
    figures = {}
    for kind, augment in (("clean", False), ("augmented", True)):
        images, labels = classifier_batch(target, heldout, np.random.default_rng(seed + 7919), augment=augment)
        with torch.no_grad():
            px = processor(images=images, return_tensors="pt")["pixel_values"]
            pred = model(pixel_values=px).logits.argmax(-1).numpy()
        y = np.array(labels)
        figures[f"heldout_acc_{kind}"] = float((pred == y).mean())
        figures[f"heldout_tpr_{kind}"] = float(pred[y == 1].mean())
        related = np.array([i % 2 == 1 and (i // 2) % 4 != 3 for i in range(len(y))])
        figures[f"heldout_fpr_related_{kind}"] = float(pred[related].mean())
    log(f"classifier: held-out accuracy {figures['heldout_acc_clean']:.3f} (clean), "
        f"{figures['heldout_acc_augmented']:.3f} (blur/noise); false positives on related "
        f"{figures['heldout_fpr_related_clean']:.3f}")
    return figures


# ---- datasets and prompts ----------------------------------------------------------------------------

def write_curriculum_dataset(out_dir: str, concepts: Sequence[Tuple[str, str]], per_concept: int, seed: int) -> str:
    """An imagefolder of ``per_concept`` images per concept, concept by concept (row order = curriculum order).

    Image j of a concept is captioned with phrasing j % len(TEMPLATES).
    """
    rng = np.random.default_rng(seed)
    rows = [(tiny.draw_shape(s, c, RESOLUTION, rng), caption(c, s, template=j))
            for c, s in concepts for j in range(per_concept)]
    return tiny.write_caption_folder(out_dir, rows, caption_column="prompt")


def write_prompts(path: str, prompts: Sequence[str]) -> str:
    """One prompt per line."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(prompts) + "\n")
    return path


# ---- unlearning (tools/unlearn.py) -------------------------------------------------------------------

def unlearn_command(method: str, base: str, out: str, settings: dict, seed: int) -> List[str]:
    """The tools/unlearn.py command line that erases the target from ``base`` into ``out``."""
    cmd = [sys.executable, UNLEARN_TOOL, "--method", method, "--model", base, "--output_dir", out,
           "--seed", str(seed), "--device", "cpu", "--quiet"]
    if method == "esd-x":
        cmd += ["--concept", caption(*TARGET), "--iterations", str(settings["esd_iterations"]),
                "--learning_rate", str(settings["esd_learning_rate"]), "--ddim_steps", str(settings["esd_ddim_steps"]),
                "--probe_samples", "2"]
    elif method == "uce":
        # Erase every phrasing of the target; keep the other 47 concepts' outputs (guide: the empty prompt).
        cmd += ["--erase", *concept_prompts(TARGET), "--preserve", *[caption(*c) for c in CONCEPTS if c != TARGET]]
    else:
        raise ValueError(f"unknown method {method!r}")
    return cmd


def _replace_in_file(path: str, old: str, new: str) -> None:
    """Replace a string in a text file (atomically)."""
    from .results import atomic_write_text

    with open(path, encoding="utf-8") as f:
        text = f.read()
    if old in text:
        atomic_write_text(path, text.replace(old, new))


def run_unlearning(method: str, base: str, out: str, settings: dict, seed: int, log: Callable = print,
                   final_root: Optional[str] = None) -> Optional[dict]:
    """Hook to tools/unlearn.py (a subprocess): the unlearned pipeline in ``out``; None when the tool is absent.

    The tool records absolute paths; with ``final_root`` the temporary build
    directory in them is replaced by where the world will live.
    """
    if not os.path.isfile(UNLEARN_TOOL):
        log(f"unlearning {method}: {UNLEARN_TOOL} not found; skipped")
        return None
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(torch.get_num_threads()),
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(unlearn_command(method, base, out, settings, seed), cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"tools/unlearn.py --method {method} failed ({proc.returncode}):\n"
                           f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    if final_root is not None:
        build_root = os.path.dirname(os.path.dirname(os.path.abspath(out)))  # out is <root>/unlearned/<method>
        for name in ("unlearning_card.json", "README.md"):
            if os.path.isfile(os.path.join(out, name)):
                _replace_in_file(os.path.join(out, name), build_root, final_root)
    with open(os.path.join(out, "unlearning_card.json"), encoding="utf-8") as f:
        return json.load(f)


# ---- evaluation --------------------------------------------------------------------------------------

def evaluate_model(model_dir: str, classifier, scorer, settings: dict, seed: int) -> Dict[str, object]:
    """Generate for the target, retained and neighbour prompts; classifier accuracy, CLIP retrieval, CLIP scores.

    Target and retained: ``eval_images_per_prompt`` images for each of the 10
    phrasings; neighbours: one per phrasing. Image j of prompt k uses
    ``image_seed(seed, k, j)`` as the protocol's validation does.
    """
    from .models import load_sd_parts
    from .validation import build_pipeline, generate_images, image_seed

    parts = load_sd_parts(model_dir)
    pipe = build_pipeline(parts, parts.unet.eval())

    def images_for(concept, k):
        prompts = concept_prompts(concept)
        rows = [(p, image_seed(seed, i, j)) for i, p in enumerate(prompts) for j in range(k)]
        images = generate_images(pipe, [p for p, _ in rows], [s for _, s in rows], batch_size=len(rows),
                                 num_inference_steps=settings["eval_inference_steps"],
                                 guidance_scale=settings["guidance_scale"], resolution=RESOLUTION)
        top1, _ = retrieval_top1(scorer, images, [CONCEPTS.index(concept)] * len(images))
        return {"classifier_rate": float(np.mean(classifier.predict(images))), "clip_top1": top1,
                "clip_score": float(np.mean(scorer.score(images, [p for p, _ in rows]))), "images": len(images)}

    out: Dict[str, object] = {}
    for name, concept in (("target", TARGET), ("retained", RETAINED)):
        r = images_for(concept, settings["eval_images_per_prompt"])
        out[f"classifier_acc_{name}"] = r["classifier_rate"]
        out[f"clip_top1_{name}"] = r["clip_top1"]
        out[f"clip_score_{name}"] = r["clip_score"]
        out[f"images_{name}"] = r["images"]
    out["neighbours"] = {caption(*c): images_for(c, 1) for c in NEIGHBOURS}
    out["neighbours_mean_clip_top1"] = float(np.mean([v["clip_top1"] for v in out["neighbours"].values()]))
    out["neighbours_mean_classifier_rate"] = float(np.mean([v["classifier_rate"] for v in out["neighbours"].values()]))
    return out


def _figure(value, key: str) -> dict:
    op, bound = BOUNDS[key]
    met = None if value is None else (value >= bound if op == ">=" else value <= bound)
    return {"value": value, "target": f"{op} {bound}", "met": met}


# ---- the builder -------------------------------------------------------------------------------------

def build_toy_world(out_dir: str = DEFAULT_DIR, seed: int = 0, scale: str = "full", log: Callable = print,
                    force: bool = False) -> dict:
    """Build the toy world into ``out_dir`` (or reuse it when its card records the same config); return the card."""
    config = world_config(seed, scale)
    card = load_card(out_dir)
    if card is not None and card.get("config") == config and not force:
        log(f"toy world: {out_dir} is up to date (seed {seed}, scale {scale}); reusing it")
        log(format_card(card))
        return card
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out_dir))}.tmp-", dir=parent)
    try:
        card = _build(tmp, config, log, final_root=os.path.abspath(out_dir))
        if os.path.exists(out_dir):
            trash = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out_dir))}.old-", dir=parent)
            os.replace(out_dir, os.path.join(trash, "world"))
            os.replace(tmp, out_dir)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(format_card(card))
    return card


def _relative_paths(p, root: str):
    if isinstance(p, dict):
        return {k: _relative_paths(v, root) for k, v in p.items()}
    return os.path.relpath(p, root)


def _build(root: str, config: dict, log: Callable, final_root: Optional[str] = None) -> dict:
    """Build every part into ``root`` (renamed to ``final_root`` afterwards); write card.json last and return it."""
    from transformers import CLIPTextModel

    from .clip_score import ClipScorer
    from .classifier import ConceptClassifier
    from .results import atomic_write_json, library_versions

    start = time.time()
    torch.set_num_threads(2)
    seed, s = config["seed"], config["settings"]
    p = paths(root)
    timings: Dict[str, float] = {}
    figures: Dict[str, object] = {}

    def lap(name: str, t0: float) -> float:
        timings[name] = round(time.time() - t0, 2)
        return time.time()

    t = time.time()
    tokenizer = tiny.write_clip_tokenizer(os.path.join(root, ".tokenizer"))
    clip_images, clip_labels = draw_concepts(CONCEPTS, s["clip_images_per_concept"], _seed(seed, 1))
    heldout_images, heldout_labels = draw_concepts(CONCEPTS, s["heldout_per_concept"], _seed(seed, 2))
    sd_images, sd_labels = draw_concepts(CONCEPTS, s["sd_images_per_concept"], _seed(seed, 3))
    t = lap("draw", t)

    # 1. Toy CLIP.
    clip = make_clip(_seed(seed, 10))
    processor = clip_processor(tokenizer)
    losses = train_clip(clip, processor, clip_images, clip_labels, s["clip_steps"], s["clip_lr"], _seed(seed, 11), log)
    clip.save_pretrained(p["clip"])
    processor.save_pretrained(p["clip"])
    scorer = ClipScorer(p["clip"])
    top1, _ = retrieval_top1(scorer, heldout_images, heldout_labels)
    figures["clip"] = {"top1_retrieval_heldout": top1, "chance": 1 / len(CONCEPTS), "heldout_images": len(heldout_images),
                       "loss_first": losses[0], "loss_last": float(np.mean(losses[-10:]))}
    log(f"toy CLIP: top-1 caption retrieval on {len(heldout_images)} held-out images {top1:.3f} "
        f"(chance {1 / len(CONCEPTS):.3f})")
    t = lap("clip", t)

    # 2. Toy SD: text encoder = the CLIP text tower; VAE; UNet on cached latents.
    text_encoder = CLIPTextModel(clip.config.text_config)
    getattr(text_encoder, "text_model", text_encoder).load_state_dict(clip.text_model.state_dict())  # transformers 5: no wrapper
    text_encoder.eval().requires_grad_(False)
    x = pixels(sd_images)
    vae = make_vae(_seed(seed, 20))
    figures["vae"] = train_vae(vae, x, s["vae_steps"], s["vae_batch"], s["vae_lr"], s["vae_kl_weight"],
                               _seed(seed, 21), log)
    vae.requires_grad_(False)
    lat_mean, lat_std = encode_latents(vae, x)
    # Scale latents to unit variance, as SD's 0.18215 does for its VAE.
    scaling = float(1.0 / lat_mean.std().clamp(min=1e-6))
    vae.register_to_config(scaling_factor=scaling)
    figures["vae"]["scaling_factor"] = scaling
    t = lap("vae", t)
    texts = [caption(*c, template=j) for c in CONCEPTS for j in range(len(TEMPLATES))] + [""]
    text_table = encode_texts(tokenizer, text_encoder, texts)
    unet = make_unet(text_encoder.config.hidden_size, _seed(seed, 30))
    figures["unet"] = train_unet(unet, lat_mean, lat_std, scaling, sd_labels, text_table, s["unet_steps"],
                                 s["unet_batch"], s["unet_lr"], s["caption_dropout"], _seed(seed, 31),
                                 s["snr_gamma"], log)
    figures["unet"]["parameters"] = sum(q.numel() for q in unet.parameters())
    unet.requires_grad_(False)
    save_sd(p["sd_base"], tokenizer, text_encoder, vae, unet)
    t = lap("unet", t)

    # 3. Classifier for the target concept.
    figures["classifier"] = train_classifier(p["classifier"], TARGET, s["classifier_steps"], s["classifier_batch"],
                                             s["classifier_heldout"], _seed(seed, 40), s["classifier_lr"], log)
    t = lap("classifier", t)

    # 4. Fine-tuning data and prompts.
    write_curriculum_dataset(p["data_related"], RELATED, PER_CONCEPT, _seed(seed, 50))
    write_curriculum_dataset(p["data_unrelated"], UNRELATED, PER_CONCEPT, _seed(seed, 51))
    # Each phrasing VALIDATION_REPEATS times: one image per line (its own seed), so a validation scores
    # 30 images and the classifier accuracy moves in steps of 1/30, not 1/10.
    write_prompts(p["prompts_target"], concept_prompts(TARGET) * VALIDATION_REPEATS)
    write_prompts(p["prompts_retained"], concept_prompts(RETAINED) * VALIDATION_REPEATS)
    t = lap("data", t)

    # 5. Unlearned models.
    unlearned = {}
    for method in UNLEARN_METHODS:
        uc = run_unlearning(method, p["sd_base"], p["unlearned"][method], s, _seed(seed, 60), log, final_root)
        unlearned[method] = None if uc is None else {"results": uc.get("results"), "command": uc.get("command"),
                                                     "wall_seconds": uc.get("wall_seconds")}
        t = lap(f"unlearn_{method}", t)

    # 6. Quality figures of the models.
    classifier = ConceptClassifier(p["classifier"])
    models = {"base": p["sd_base"], **{m: p["unlearned"][m] for m in UNLEARN_METHODS if unlearned[m] is not None}}
    evals = {}
    for name, path in models.items():
        evals[name] = evaluate_model(path, classifier, scorer, s, _seed(seed, 70))
        log(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in evals[name].items() if isinstance(v, float)))
    figures["models"] = evals
    t = lap("evaluate", t)

    targets = {"clip_top1_retrieval": _figure(top1, "clip_top1_retrieval"),
               "base_classifier_acc_target": _figure(evals["base"]["classifier_acc_target"],
                                                     "base_classifier_acc_target"),
               "base_retained_top1": _figure(evals["base"]["clip_top1_retained"], "base_retained_top1")}
    for m in UNLEARN_METHODS:
        e = evals.get(m, {})
        targets[f"{m}_classifier_acc_target"] = _figure(e.get("classifier_acc_target"),
                                                        "unlearned_classifier_acc_target")
        targets[f"{m}_retained_top1"] = _figure(e.get("clip_top1_retained"), "unlearned_retained_top1")
    timings["total"] = round(time.time() - start, 2)
    card = {
        "config": config,
        "target_concept": caption(*TARGET),
        "retained_concept": caption(*RETAINED),
        "classifier_classes": {"0": "other", "1": caption(*TARGET)},
        "retained_criterion": "toy CLIP top-1 caption retrieval among the 48 'a {colour} {shape}' captions "
                              "= 'a blue square'",
        "clip_score_scale": "cosine (0..1)",
        "curriculum": CURRICULUM,
        "datasets": {"related": [caption(*c) for c in RELATED], "unrelated": [caption(*c) for c in UNRELATED]},
        "targets": targets,
        "all_targets_met": all(v["met"] for v in targets.values()),
        "figures": figures,
        "unlearned": unlearned,
        "timings_seconds": timings,
        "library_versions": library_versions(),
        "torch_threads": torch.get_num_threads(),
        "paths": _relative_paths(paths(root), root),
    }
    shutil.rmtree(os.path.join(root, ".tokenizer"), ignore_errors=True)
    atomic_write_json(os.path.join(root, CARD_FILE), card)  # last: marks the world complete
    return card


def format_card(card: dict) -> str:
    """The card's targets as a short table."""
    lines = [f"toy world (seed {card['config']['seed']}, scale {card['config']['scale']}, "
             f"built in {card['timings_seconds']['total']:.0f} s): target concept {card['target_concept']!r}"]
    for name, f in card["targets"].items():
        value = "n/a" if f["value"] is None else f"{f['value']:.3f}"
        met = {True: "met", False: "NOT met", None: "not measured"}[f["met"]]
        lines.append(f"  {name:<36} {value:>7}  target {f['target']:<7} {met}")
    for name, e in card["figures"]["models"].items():
        lines.append(f"  {name:<8} mean CLIP score (cosine 0..1): target prompts {e['clip_score_target']:.3f}, "
                     f"retained prompts {e['clip_score_retained']:.3f}; neighbours' CLIP top-1 "
                     f"{e['neighbours_mean_clip_top1']:.3f} (not a target)")
    return "\n".join(lines)
