"""The toolkit's one CLIP score (docs/protocols.md: criteria).

Per image: the cosine similarity of the CLIP image embedding and the text
embedding of its prompt, on the 0..1 scale the thresholds use (the paper's
0.31). The reference evaluation printed 100 x cosine, the scale of CLIP's
logits; ``LOGIT_SCALE`` converts and reports always label which one they show.

Models: a transformers CLIPModel directory or id (default
``openai/clip-vit-base-patch32``, which resolves to a local directory of that
name when one exists), or an open_clip model written
``open_clip:ARCH[:PRETRAINED]`` (PRETRAINED a tag or a weights file).
"""

from __future__ import annotations

import os
from typing import List, Sequence

import torch

from .errors import InputError
from .models import local_dir, looks_local, resolve_model_path
from .precision import MASTER_DTYPE

DEFAULT_CLIP = "openai/clip-vit-base-patch32"
LOGIT_SCALE = 100.0  # "logits" scale of the reference's eval printout = 100 x cosine
OPEN_CLIP_PREFIX = "open_clip:"


def check_clip_spec(spec: str, flag: str = "--clip_model") -> None:
    """Raise InputError for a CLIP model that cannot exist (before anything loads)."""
    if spec.startswith(OPEN_CLIP_PREFIX):
        parts = spec[len(OPEN_CLIP_PREFIX):].split(":", 1)
        if not parts[0]:
            raise InputError(f"{flag} {spec}: expected open_clip:ARCH[:PRETRAINED]")
        if len(parts) == 2 and looks_local(parts[1]) and not os.path.isfile(parts[1]):
            raise InputError(f"{flag} {spec}: weights file {parts[1]} does not exist")
        return
    local = local_dir(spec, flag)
    if local is not None and not os.path.isfile(os.path.join(local, "config.json")):
        raise InputError(f"{flag} {spec}: no config.json (not a transformers CLIP directory)")


class ClipScorer:
    """Cosine similarity between images and texts under one CLIP model."""

    def __init__(self, spec: str = DEFAULT_CLIP, device: str | torch.device = "cpu"):
        self.spec = spec
        self.device = torch.device(device)
        if spec.startswith(OPEN_CLIP_PREFIX):
            self._init_open_clip(spec[len(OPEN_CLIP_PREFIX):])
        else:
            self._init_transformers(resolve_model_path(spec))

    def _init_transformers(self, path: str) -> None:
        from transformers import CLIPModel, CLIPProcessor

        self.kind = "transformers"
        # fp32 whatever the files hold (transformers 5 keeps a saved fp16 model in fp16: common/precision.py).
        self.model = CLIPModel.from_pretrained(path, dtype=MASTER_DTYPE).to(self.device).eval()
        self.processor = CLIPProcessor.from_pretrained(path)

    def _init_open_clip(self, spec: str) -> None:
        import open_clip

        self.kind = "open_clip"
        arch, _, pretrained = spec.partition(":")
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained or None)
        self.model = model.to(self.device).eval()
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(arch)

    @staticmethod
    def _features(out) -> torch.Tensor:
        # transformers 5 returns a model output whose pooler_output is the projected embedding.
        return getattr(out, "pooler_output", out)

    @torch.no_grad()
    def embed_images(self, images: Sequence) -> torch.Tensor:
        """L2-normalised image embeddings, one row per PIL image."""
        if self.kind == "open_clip":
            pixels = torch.stack([self.preprocess(im) for im in images]).to(self.device)
            feats = self.model.encode_image(pixels)
        else:
            pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
            feats = self._features(self.model.get_image_features(pixel_values=pixels))
        return torch.nn.functional.normalize(feats.float(), dim=-1)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings, one row per text."""
        if self.kind == "open_clip":
            feats = self.model.encode_text(self.tokenizer(list(texts)).to(self.device))
        else:
            tok = self.processor.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
            feats = self._features(self.model.get_text_features(
                input_ids=tok["input_ids"].to(self.device), attention_mask=tok["attention_mask"].to(self.device)))
        return torch.nn.functional.normalize(feats.float(), dim=-1)

    def score(self, images: Sequence, texts: Sequence[str], batch_size: int = 64) -> List[float]:
        """Cosine similarity (0..1 scale) of each image with its own text."""
        assert len(images) == len(texts), "one text per image"
        out: List[float] = []
        for b in range(0, len(images), batch_size):
            img = self.embed_images(images[b : b + batch_size])
            txt = self.embed_texts(texts[b : b + batch_size])
            out.extend((img * txt).sum(-1).cpu().tolist())
        return out
