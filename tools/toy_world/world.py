"""The toy world's definitions: concepts, captions, sizes per scale, paths, its card, seeds and drawing."""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageFilter

from common.results import slug
from tools import tiny


VERSION = 4  # 3: the UNet trains on two processes (UNET_PROCESSES); 4: fused AdamW, exact noise-schedule roots

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository

DEFAULT_DIR = os.path.join(ROOT, "toy_world")

CARD_FILE = "card.json"

RESOLUTION = 32

TARGET = ("red", "circle")

RETAINED = ("blue", "square")

# The target's nearest concepts: the card reports how the unlearned models treat them (collateral damage).
NEIGHBOURS = (("red", "square"), ("red", "ring"), ("orange", "circle"), ("blue", "circle"))

# Concepts that must survive the unlearning and the fine-tuning (the demo's --retention_prompts): the target's
# neighbours, the retained concept, and three concepts in neither fine-tuning set.
RETENTION = NEIGHBOURS + (RETAINED, ("purple", "cross"), ("black", "square"), ("white", "diamond"))

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

# The UNet trains on this many processes, each on its share of every batch (build.py): the world's bits depend on
# it (it is in the card's config), not on the machine.
UNET_PROCESSES = 2

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
              "resolution": RESOLUTION, "unet_processes": UNET_PROCESSES}
    return json.loads(json.dumps(config))  # tuples -> lists, as the card stores it


def _seed(seed: int, *stream: int) -> int:
    """An independent 32-bit seed per (world seed, stream), so stages do not share random streams."""
    return int(np.random.SeedSequence([seed, *stream]).generate_state(1)[0])


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


def write_audit_preset(out_dir: str) -> str:
    """The toy world's concept as an audit preset folder (tools/audit.py --preset toy), in the layout of
    configs/paper/<concept>/: the target 'red circle', its curricula, validation prompts and classifier prompts."""
    name = lambda c: f"{c[0]} {c[1]}"  # noqa: E731
    files = {
        "concept.json": {"name": name(TARGET), "kind": "object", "theme": "", "initializer_token": TARGET[1],
                         "provenance": "the toy world's definitions (tools/toy_world/world.py)"},
        "related.json": {"concepts": [{"name": name(c), "prompts": concept_prompts(c)} for c in RELATED]},
        "unrelated.json": {"concepts": [{"name": name(c), "prompts": concept_prompts(c)} for c in UNRELATED]},
        "classifier_positive.json": {"concepts": [{"name": name(TARGET), "prompts": concept_prompts(TARGET)}]},
        "classifier_negative.json": {"concepts": [{"name": name(c), "prompts": concept_prompts(c)}
                                                  for c in NEIGHBOURS + UNRELATED[:4]]},
    }
    os.makedirs(out_dir, exist_ok=True)
    for file_name, content in files.items():
        with open(os.path.join(out_dir, file_name), "w", encoding="utf-8") as f:
            json.dump(content, f, indent=1)
    with open(os.path.join(out_dir, "validation_prompts.txt"), "w", encoding="utf-8") as f:
        f.write("".join(p + "\n" for p in concept_prompts(TARGET)))
    return out_dir
