"""Tiny models and data the project builds itself, for tests and tools (docs/protocols.md: models and precision).

No weights can be downloaded here, so every code path runs on these: a real
CLIP BPE tokenizer built from the vocabulary open_clip_torch ships, a
diffusers Stable Diffusion directory with a few-thousand-parameter UNet, a
transformers CLIPModel saved with its processor, and imagefolder datasets of
drawn shapes.
"""

from __future__ import annotations

import gzip
import json
import os
from typing import Iterable, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw

from common import numerics

# The merges of CLIP's byte-level BPE: the file's first line is a header and the
# vocabulary has 49408 entries (256 bytes x 2 + 48894 merges + 2 specials).
_NUM_MERGES = 49152 - 256 - 2


def _bytes_to_unicode() -> dict:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_clip_tokenizer(out_dir: str, model_max_length: int = 77):
    """Write a transformers CLIPTokenizer (vocab.json, merges.txt) from open_clip's BPE file; return it loaded."""
    from open_clip.tokenizer import default_bpe
    from transformers import CLIPTokenizer

    os.makedirs(out_dir, exist_ok=True)
    with gzip.open(default_bpe()) as f:
        merges = f.read().decode("utf-8").split("\n")[1 : _NUM_MERGES + 1]
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({tok: i for i, tok in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(
        os.path.join(out_dir, "vocab.json"),
        os.path.join(out_dir, "merges.txt"),
        model_max_length=model_max_length,
        pad_token="<|endoftext|>",
    )
    tok.save_pretrained(out_dir)
    return tok


def tiny_text_config(hidden_size: int = 32, layers: int = 2, projection_dim: int = 32) -> dict:
    """A CLIP text-tower config with the real vocabulary and 77 positions."""
    return dict(
        vocab_size=49408,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        projection_dim=projection_dim,
    )


def build_tiny_sd(
    out_dir: str,
    seed: int = 0,
    resolution: int = 32,
    unet_channels: Sequence[int] = (32, 64),
    vae_channels: Sequence[int] = (16, 32, 32),
    text_encoder=None,
    tokenizer=None,
    prediction_type: str = "epsilon",
) -> str:
    """Save a randomly initialised (seeded) tiny Stable Diffusion pipeline in diffusers format."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    from common.models import assemble_pipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    if tokenizer is None:
        tokenizer = write_clip_tokenizer(os.path.join(out_dir, "tokenizer"))
    if text_encoder is None:
        text_encoder = CLIPTextModel(CLIPTextConfig(**tiny_text_config()))
    cross_dim = text_encoder.config.hidden_size
    vae_down = len(vae_channels) - 1
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
        block_out_channels=tuple(vae_channels),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=min(8, vae_channels[0]),
        sample_size=resolution,
    )
    unet = UNet2DConditionModel(
        sample_size=resolution // (2**vae_down),
        in_channels=4,
        out_channels=4,
        block_out_channels=tuple(unet_channels),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_dim,
        attention_head_dim=8,
        norm_num_groups=min(32, unet_channels[0]),
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    assemble_pipeline(vae, text_encoder, tokenizer, unet, scheduler).save_pretrained(out_dir)
    return out_dir


def build_tiny_clip(out_dir: str, seed: int = 0, image_size: int = 32, tokenizer=None) -> str:
    """Save a randomly initialised (seeded) transformers CLIPModel with its processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(seed)
    vision = dict(image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, projection_dim=32)
    config = CLIPConfig(text_config=tiny_text_config(), vision_config=vision, projection_dim=32)
    model = CLIPModel(config)
    if tokenizer is None:
        tokenizer = write_clip_tokenizer(os.path.join(out_dir, "_tokenizer"))
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": image_size},
                                           crop_size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer,
    )
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


# ---- procedural images -------------------------------------------------------

COLOURS = {
    "red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (235, 215, 30),
    "purple": (140, 40, 180), "orange": (245, 130, 20), "white": (245, 245, 245), "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")


def draw_shape(shape: str, colour: str, size: int = 32, rng: np.random.Generator | None = None,
               background: Tuple[int, int, int] = (128, 128, 128)) -> Image.Image:
    """Draw one coloured shape, with a small random position and scale jitter, on a plain background."""
    rng = rng or np.random.default_rng(0)
    img = Image.new("RGB", (size, size), background)
    d = ImageDraw.Draw(img)
    r = size * rng.uniform(0.28, 0.38)
    cx, cy = size / 2 + rng.uniform(-0.08, 0.08) * size, size / 2 + rng.uniform(-0.08, 0.08) * size
    fill = COLOURS[colour]
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif shape == "cross":
        w = r / 2.5
        d.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
        d.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
    elif shape == "ring":
        d.ellipse(box, outline=fill, width=max(2, int(r / 2.5)))
    elif shape == "diamond":
        d.polygon([(cx, cy - r), (cx - r, cy), (cx, cy + r), (cx + r, cy)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return img


def write_caption_folder(out_dir: str, rows: Iterable[Tuple[Image.Image, str]], caption_column: str = "prompt") -> str:
    """Write images and an imagefolder metadata.jsonl (row order = iteration order)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "metadata.jsonl"), "w", encoding="utf-8") as meta:
        for i, (img, caption) in enumerate(rows):
            name = f"{i:05d}.png"
            img.save(os.path.join(out_dir, name))
            meta.write(json.dumps({"file_name": name, caption_column: caption}) + "\n")
    return out_dir


def shapes_dataset(out_dir: str, concepts: Sequence[Tuple[str, str]], per_concept: int, size: int = 32,
                   seed: int = 0) -> str:
    """An imagefolder of ``per_concept`` images for each (colour, shape), concept by concept in order."""
    rng = np.random.default_rng(seed)
    rows = [
        (draw_shape(shape, colour, size, rng), f"a {colour} {shape}")
        for colour, shape in concepts
        for _ in range(per_concept)
    ]
    return write_caption_folder(out_dir, rows)


def tiny_vit_config(image_size: int, **labels):
    """The tiny ViT of the tests: 8 px patches, 2 layers of width 32."""
    from transformers import ViTConfig

    return ViTConfig(image_size=image_size, patch_size=8, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=64, **labels)


def build_tiny_vit_classifier(out_dir: str, seed: int = 0, image_size: int = 32, concept_colour: str = "red",
                              train_steps: int = 80) -> str:
    """Save a tiny transformers ViTForImageClassification taught (seeded, seconds) that class 1 = ``concept_colour``."""
    from transformers import ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(seed)
    config = tiny_vit_config(image_size, num_labels=2, id2label={0: "other", 1: concept_colour},
                             label2id={"other": 0, concept_colour: 1})
    model = ViTForImageClassification(config)
    processor = ViTImageProcessor(size={"height": image_size, "width": image_size})
    rng = np.random.default_rng(seed)
    colours = list(COLOURS)
    opt = numerics.adamw(model.parameters(), lr=2e-3)
    for _ in range(train_steps):
        # Half the batch shows the concept colour, half any other colour.
        labels = torch.tensor([i % 2 for i in range(32)])
        picks = [concept_colour if y else rng.choice([c for c in colours if c != concept_colour]) for y in labels]
        images = [draw_shape(rng.choice(SHAPES), c, image_size, rng) for c in picks]
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        loss = torch.nn.functional.cross_entropy(model(pixel_values=pixels).logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def build_tiny_timm_classifier(path: str, seed: int = 0, arch: str = "vit_tiny_patch16_224") -> str:
    """Save a randomly initialised (seeded) timm model with a 2-class head as a safetensors state dict."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, num_classes=2)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


def tiny_vit_backbone(out_dir: str, image_size: int = 32, seed: int = 0, num_labels: int = 10) -> str:
    """Save an untrained tiny ViTForImageClassification with a ``num_labels`` head (a stand-in for ViT-L/16 in21k)."""
    from transformers import ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(seed)
    ViTForImageClassification(tiny_vit_config(image_size, num_labels=num_labels)).save_pretrained(out_dir)
    ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(out_dir)
    return out_dir
