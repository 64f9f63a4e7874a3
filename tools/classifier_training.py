"""Binary concept-classifier training (tools/train_classifier.py): the weights the paper did not release.

Recipe (the paper's supplementary, restated): start from an ImageNet-21k
ViT-L/16 (``google/vit-large-patch16-224-in21k``), replace the head by two
classes (0 = not the concept, 1 = the concept, the index the fine-tuning
scripts read as ``--concept_index``), fine-tune on generated positives and
negatives with light augmentation (random resized crop, horizontal flip),
AdamW with warm-up and cosine decay, and check accuracy, precision and recall
on a held-out split. The style variant is the same with a timm
``vit_large_patch16_224.augreg_in21k`` and a state-dict output, read with
``--theme``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np
import torch

from common import numerics
from common.errors import InputError
from common.precision import MASTER_DTYPE

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CONCEPT_INDEX = 1


def list_images(folder: str, flag: str) -> List[str]:
    """Image files under ``folder`` (recursive), sorted so that the split is reproducible."""
    if not os.path.isdir(folder):
        raise InputError(f"{flag} {folder}: no such directory")
    found = sorted(os.path.join(d, f) for d, _, files in os.walk(folder) for f in files
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if not found:
        raise InputError(f"{flag} {folder}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    return found


def class_folders(train_dir: str, positive_class: str | None) -> Tuple[str, str]:
    """(positive, negative) subfolders of an imagefolder with two class folders."""
    if not os.path.isdir(train_dir):
        raise InputError(f"--train_dir {train_dir}: no such directory")
    subdirs = sorted(d for d in os.listdir(train_dir) if os.path.isdir(os.path.join(train_dir, d)))
    if len(subdirs) != 2:
        raise InputError(f"--train_dir {train_dir}: expected exactly two class folders, found {subdirs}")
    if positive_class is None:
        if set(subdirs) != {"negative", "positive"}:
            raise InputError(f"--train_dir {train_dir}: folders {subdirs}; name the concept's with --positive_class")
        positive_class = "positive"
    if positive_class not in subdirs:
        raise InputError(f"--positive_class {positive_class}: not one of {subdirs}")
    negative = next(d for d in subdirs if d != positive_class)
    return os.path.join(train_dir, positive_class), os.path.join(train_dir, negative)


@dataclass(frozen=True)
class Split:
    train: List[Tuple[str, int]]
    heldout: List[Tuple[str, int]]


def stratified_split(positives: Sequence[str], negatives: Sequence[str], heldout_fraction: float, seed: int) -> Split:
    """Hold out the same fraction of each class (at least one image each), chosen by a seeded shuffle."""
    rng = np.random.default_rng(seed)
    train, held = [], []
    for label, files in ((1, positives), (0, negatives)):
        order = rng.permutation(len(files))
        n_held = max(1, int(round(heldout_fraction * len(files)))) if heldout_fraction > 0 else 0
        if n_held >= len(files):
            raise InputError(f"--validation_split {heldout_fraction}: leaves no training image of class {label}")
        held += [(files[i], label) for i in order[:n_held]]
        train += [(files[i], label) for i in order[n_held:]]
    return Split(train, held)


def binary_metrics(pred: Sequence[int], labels: Sequence[int]) -> dict:
    """Accuracy, precision, recall and F1 of the concept class (1); NaN where undefined."""
    p, y = np.asarray(pred), np.asarray(labels)
    tp = int(((p == 1) & (y == 1)).sum())
    fp = int(((p == 1) & (y == 0)).sum())
    fn = int(((p == 0) & (y == 1)).sum())
    precision = tp / (tp + fp) if tp + fp else math.nan
    recall = tp / (tp + fn) if tp + fn else math.nan
    f1 = 2 * precision * recall / (precision + recall) if tp else (0.0 if (tp + fp) and (tp + fn) else math.nan)
    return {"accuracy": float((p == y).mean()) if len(y) else math.nan, "precision": precision, "recall": recall,
            "f1": f1, "tp": tp, "fp": fp, "fn": fn, "tn": int(((p == 0) & (y == 0)).sum()), "n": int(len(y))}


def processor_size(processor) -> int:
    """The square input side of an image processor (its size may be a dict, a SizeDict or an int)."""
    size = processor.size
    if isinstance(size, int):
        return size
    for key in ("height", "shortest_edge"):
        value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
        if value:
            return int(value)
    return 224


class TransformersBackbone:
    """A transformers image-classification model with a fresh 2-class head, and its processor."""

    kind = "transformers"

    def __init__(self, name_or_path: str, processor: str | None, concept: str):
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(name_or_path)
        config.id2label = {0: f"not {concept}", 1: concept}  # also sets num_labels to 2
        config.label2id = {v: k for k, v in config.id2label.items()}
        # The backbone's own head (e.g. 21k classes) does not fit and is replaced by a fresh one.
        # fp32 masters whatever the files hold: an fp16 backbone would make fp16 training fail ("Attempting to
        # unscale FP16 gradients"); autocast gives the fp16 speed.
        self.model = AutoModelForImageClassification.from_pretrained(name_or_path, config=config,
                                                                     ignore_mismatched_sizes=True,
                                                                     dtype=MASTER_DTYPE)
        self.processor = AutoImageProcessor.from_pretrained(processor or name_or_path)
        self.size = processor_size(self.processor)

    def pixels(self, images) -> torch.Tensor:
        return self.processor(images=images, return_tensors="pt")["pixel_values"]

    def logits(self, model, pixel_values):
        return model(pixel_values=pixel_values).logits

    def save(self, model, output_dir: str) -> str:
        model.save_pretrained(output_dir)
        self.processor.save_pretrained(output_dir)
        return output_dir


class TimmBackbone:
    """A timm model with a 2-class head (the style classifier); optional starting weights from a state dict."""

    kind = "timm"

    def __init__(self, arch: str, init: str | None):
        import timm
        from timm.data import create_transform, resolve_data_config

        from common.classifier import load_state_dict

        self.model = timm.create_model(arch, pretrained=False, num_classes=2)
        self.loaded_from = None
        if init:
            state = load_state_dict(init)
            own = self.model.state_dict()
            # Keep every tensor whose shape fits; the (e.g. 21k-class) head does not and stays fresh.
            kept = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
            if not kept:
                raise InputError(f"--init_weights {init}: no tensor matches timm {arch}")
            self.model.load_state_dict(kept, strict=False)
            self.loaded_from = init
        config = resolve_data_config({}, model=self.model)
        self.eval_transform = create_transform(**config)
        self.size = int(config["input_size"][-1])

    def pixels(self, images) -> torch.Tensor:
        return torch.stack([self.eval_transform(im) for im in images])

    def logits(self, model, pixel_values):
        return model(pixel_values)

    def save(self, model, output_dir: str) -> str:
        from safetensors.torch import save_file

        path = os.path.join(output_dir, "classifier.safetensors")
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, path)
        return path


def augment(image, size: int, rng: np.random.Generator):
    """Random resized crop (80-100% of the area, aspect 3:4..4:3) and horizontal flip, drawn from ``rng``.

    Written out rather than torchvision's RandomResizedCrop, which draws from torch's global generator: here
    each image's augmentation is a function of (seed, epoch, index), the same with any number of workers.
    """
    from PIL import Image

    w, h = image.size
    area = w * h * rng.uniform(0.8, 1.0)
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    cw, ch = min(w, int(round(math.sqrt(area * aspect)))), min(h, int(round(math.sqrt(area / aspect))))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    out = image.crop((x, y, x + cw, y + ch)).resize((size, size), Image.BICUBIC)
    return out.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else out


def load_rgb(path: str):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


class LabelledImages(torch.utils.data.Dataset):
    """(pixels, label) pairs; with ``augment_seed`` each item's crop and flip are drawn from (seed, epoch, index)."""

    def __init__(self, items: Sequence[Tuple[str, int]], backbone, augment_seed: int | None = None):
        self.items, self.backbone, self.augment_seed, self.epoch = list(items), backbone, augment_seed, 0

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, label = self.items[i]
        image = load_rgb(path)
        if self.augment_seed is not None:
            image = augment(image, self.backbone.size, np.random.default_rng([self.augment_seed, self.epoch, i]))
        return self.backbone.pixels([image])[0], label


@torch.no_grad()
def predict(backbone, model, items: Sequence[Tuple[str, int]], batch_size: int, device) -> List[int]:
    """Concept (1) or not (0) for each held-out image, without augmentation."""
    model.eval()
    out: List[int] = []
    for b in range(0, len(items), batch_size):
        images = [load_rgb(p) for p, _ in items[b : b + batch_size]]
        logits = backbone.logits(model, backbone.pixels(images).to(device))
        out += logits.float().argmax(-1).cpu().tolist()
    return out


def train_classifier(backbone, split: Split, epochs: int, batch_size: int, learning_rate: float, weight_decay: float,
                     warmup_fraction: float, seed: int, mixed_precision: str = "no", log=print):
    """Fine-tune ``backbone.model`` on ``split.train``; return (trained unwrapped model, per-epoch metrics, accelerator)."""
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    from common.precision import effective_mixed_precision, make_accelerator

    accelerator = make_accelerator(effective_mixed_precision(mixed_precision, warn=False))
    torch.manual_seed(seed)
    data = LabelledImages(split.train, backbone, augment_seed=seed)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed), drop_last=False)
    optimizer = numerics.adamw(backbone.model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    total = epochs * math.ceil(len(data) / (batch_size * accelerator.num_processes))
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=int(warmup_fraction * total), num_training_steps=total)
    model, optimizer, loader, scheduler = accelerator.prepare(backbone.model, optimizer, loader, scheduler)
    history = []
    for epoch in range(epochs):
        data.epoch = epoch
        model.train()
        losses = []
        for pixels, labels in tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", leave=False,
                                   disable=not accelerator.is_local_main_process):
            loss = torch.nn.functional.cross_entropy(backbone.logits(model, pixels).float(), labels)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            losses.append(loss.detach())  # summed once per epoch: no host sync per step (docs/protocols.md: performance)
        unwrapped = accelerator.unwrap_model(model)
        metrics = {"epoch": epoch + 1, "train_loss": torch.stack(losses).mean().item()}
        if split.heldout:
            with accelerator.autocast():
                pred = predict(backbone, unwrapped, split.heldout, batch_size, accelerator.device)
            metrics.update(binary_metrics(pred, [y for _, y in split.heldout]))
        history.append(metrics)
        if accelerator.is_main_process:
            log(f"epoch {epoch + 1}/{epochs}: train loss {metrics['train_loss']:.4f}"
                + (f", held-out accuracy {metrics['accuracy']:.3f} precision {metrics['precision']:.3f} "
                   f"recall {metrics['recall']:.3f}" if split.heldout else ""))
    accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(model).eval().float()
    return model, history, accelerator
