"""The toy concept classifier: a transformers ViT that says whether an image shows the target concept."""

from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from common import numerics
from tools import tiny
from .world import ARCH, CONCEPTS, RESOLUTION, caption, degrade, pixels


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
    opt = numerics.adamw(model.parameters(), lr=lr, weight_decay=0.05)
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
