"""Training data: loading in curriculum order, image transforms, caption tokens.

Row order is the curriculum order. For a local directory that order is the
line order of its ``metadata.jsonl`` (one JSON object per line with
``file_name`` and the caption column), which we read ourselves so that no file
system listing or sort can reorder rows; the images are then decoded through
datasets' ``Image`` feature as imagefolder would. ``--dataset_name`` datasets
keep their own row order.

The published scripts ran with datasets 3.0.1, whose imagefolder builder
yields rows in the sorted order of the image paths (string order, so
``10.png`` before ``2.png``) and looks each file's metadata up; datasets 3.4
and later follow the metadata lines. ``row_order="file_name"`` reproduces the
former (``--compat reference``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from .errors import InputError

METADATA_FILE = "metadata.jsonl"


def find_metadata(train_data_dir: str) -> str:
    """Path of the one metadata.jsonl of an imagefolder directory (top level or one split folder)."""
    if not os.path.isdir(train_data_dir):
        raise InputError(f"--train_data_dir {train_data_dir}: no such directory")
    top = os.path.join(train_data_dir, METADATA_FILE)
    if os.path.isfile(top):
        return top
    found = sorted(
        os.path.join(train_data_dir, d, METADATA_FILE)
        for d in os.listdir(train_data_dir)
        if os.path.isfile(os.path.join(train_data_dir, d, METADATA_FILE))
    )
    if len(found) == 1:
        return found[0]
    if not found:
        raise InputError(f"--train_data_dir {train_data_dir}: no {METADATA_FILE} (imagefolder with captions expected)")
    raise InputError(f"--train_data_dir {train_data_dir}: several {METADATA_FILE} files {found}; point at one split")


ROW_ORDERS = ("metadata", "file_name")


def read_metadata(train_data_dir: str, caption_column: str, verify_images: bool = True,
                  row_order: str = "metadata") -> tuple[List[str], List[str]]:
    """Image paths and captions of an imagefolder directory, in metadata.jsonl line order (or sorted paths).

    Every row is checked: valid JSON, a ``file_name``, a string caption in
    ``caption_column``, an image file that exists and that PIL can read.
    """
    meta_path = find_metadata(train_data_dir)
    root = os.path.dirname(meta_path)
    paths, captions = [], []
    with open(meta_path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{meta_path} line {line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{where}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict) or "file_name" not in row:
                raise InputError(f"{where}: no 'file_name' field")
            if caption_column not in row:
                raise InputError(
                    f"--caption_column {caption_column!r}: not in {where} (fields: {', '.join(sorted(row))})"
                )
            if not isinstance(row[caption_column], str):
                raise InputError(f"{where}: caption {caption_column!r} is not a string")
            path = os.path.join(root, row["file_name"])
            if not os.path.isfile(path):
                raise InputError(f"{where}: image {path} does not exist")
            if verify_images:
                try:
                    with Image.open(path) as im:
                        im.verify()
                except Exception as err:  # PIL raises many types for corrupt files
                    raise InputError(f"{path}: unreadable image ({type(err).__name__}: {err})") from None
            paths.append(path)
            captions.append(row[caption_column])
    if not paths:
        raise InputError(f"{meta_path}: no rows")
    if row_order == "file_name":
        paths, captions = map(list, zip(*sorted(zip(paths, captions), key=lambda pc: pc[0])))
    elif row_order != "metadata":
        raise ValueError(f"row_order must be one of {ROW_ORDERS}, got {row_order!r}")
    return paths, captions


def load_training_data(
    train_data_dir: Optional[str],
    dataset_name: Optional[str],
    caption_column: str,
    image_column: str = "image",
    dataset_config_name: Optional[str] = None,
    cache_dir: Optional[str] = None,
    row_order: str = "metadata",
):
    """A datasets.Dataset with columns ``image`` (decoded to PIL) and ``caption``, in curriculum order."""
    import datasets

    if train_data_dir is not None:
        paths, captions = read_metadata(train_data_dir, caption_column, row_order=row_order)
        ds = datasets.Dataset.from_dict({"image": paths, "caption": captions})
        return ds.cast_column("image", datasets.Image())
    try:
        ds = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, split="train")
    except Exception as err:
        raise InputError(f"--dataset_name {dataset_name}: cannot be loaded ({type(err).__name__}: {err})") from None
    for flag, col in (("--image_column", image_column), ("--caption_column", caption_column)):
        if col not in ds.column_names:
            raise InputError(f"{flag} {col!r}: not a column of {dataset_name} ({', '.join(ds.column_names)})")
    ds = ds.select_columns([image_column, caption_column])
    ds = ds.rename_columns({image_column: "image", caption_column: "caption"}) if image_column != "image" or caption_column != "caption" else ds
    return ds


@dataclass(frozen=True)
class ImageTransform:
    """diffusers' text-to-image preprocessing: resize, centre or random crop, optional flip, scale to [-1, 1].

    The random choices (crop position as fractions in [0, 1), flip) are
    arguments, drawn by the trainer, so seeded and resumed runs repeat them.
    """

    resolution: int
    center_crop: bool
    random_flip: bool

    def resize_crop(self, image: Image.Image, crop=(0.5, 0.5)) -> Image.Image:
        """Resize the short side to ``resolution`` (bilinear) and crop a square (centre, or at ``crop`` fractions)."""
        image = image.convert("RGB")
        w, h = image.size
        scale = self.resolution / min(w, h)
        nw, nh = max(self.resolution, round(w * scale)), max(self.resolution, round(h * scale))
        image = image.resize((nw, nh), Image.BILINEAR)
        if self.center_crop:
            left, top = (nw - self.resolution) // 2, (nh - self.resolution) // 2
        else:
            left = min(int(float(crop[0]) * (nw - self.resolution + 1)), nw - self.resolution)
            top = min(int(float(crop[1]) * (nh - self.resolution + 1)), nh - self.resolution)
        return image.crop((left, top, left + self.resolution, top + self.resolution))

    @staticmethod
    def to_tensor(image: Image.Image) -> torch.Tensor:
        """uint8 HWC RGB -> float CHW in [-1, 1]."""
        arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()

    def __call__(self, image: Image.Image, flip: bool = False, crop=(0.5, 0.5)) -> torch.Tensor:
        x = self.to_tensor(self.resize_crop(image, crop))
        return x.flip(-1) if (self.random_flip and bool(flip)) else x


def tokenize_captions(tokenizer, captions: Sequence[str]) -> torch.Tensor:
    """Token ids padded/truncated to the tokenizer's max length (77 for CLIP)."""
    return tokenizer(
        list(captions),
        max_length=tokenizer.model_max_length,
        padding="max_length",
        truncation=True,
        return_tensors="pt",
    ).input_ids


def to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """``tensor`` on ``device`` without a host wait: a CPU tensor bound for CUDA is pinned and copied non-blocking.

    (The caching host allocator keeps the pinned copy alive until the copy is done.) Elsewhere a plain ``to``.
    """
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: Sequence[str], device=None, batch_size: int = 0) -> torch.Tensor:
    """Last hidden states [n, max_length, d]: what a pipeline feeds the UNet's cross-attention (in batches)."""
    step = batch_size or max(1, len(prompts))
    out = []
    for b in range(0, len(prompts), step):
        ids = tokenize_captions(tokenizer, prompts[b:b + step])
        out.append(text_encoder(to_device(ids, device) if device is not None else ids, return_dict=False)[0])
    return torch.cat(out)


def read_prompts(path: str, flag: str = "--validation_prompts") -> List[str]:
    """Validation prompts: one per non-empty line of a UTF-8 text file."""
    if not path:
        raise InputError(f"{flag}: a prompt file is required")
    if not os.path.isfile(path):
        raise InputError(f"{flag} {path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError:
        raise InputError(f"{flag} {path}: not a UTF-8 text file") from None
    if not prompts:
        raise InputError(f"{flag} {path}: the file has no prompts (one per non-empty line)")
    return prompts
