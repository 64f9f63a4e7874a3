"""The toy CLIP: a transformers CLIPModel trained contrastively on the drawn concepts."""

from __future__ import annotations

from typing import Callable, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from common import numerics
from tools import tiny
from .world import ARCH, CONCEPTS, RESOLUTION, TEMPLATES, caption


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
    opt = numerics.adamw(model.parameters(), lr=lr, weight_decay=0.05)
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
