"""eval_model.py's work (SPEC 7): generate N images per prompt per checkpoint, CLIP score and classifier accuracy."""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import time
from typing import List, Optional, Sequence

import torch

from .clip_score import LOGIT_SCALE
from .errors import InputError
from .models import resolve_model_path
from .results import atomic_write_text
from .validation import generate_images, image_seed

CURRICULUM_DIR = re.compile(r"^curriculum-(\d+)$")


def is_pipeline_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "model_index.json"))


def find_checkpoints(model_paths: Sequence[str], curr: bool) -> List[str]:
    """Each given pipeline directory and, with ``curr``, its curriculum-{i} subdirectories in chunk order."""
    found = []
    for raw in model_paths:
        path = resolve_model_path(raw)
        if not os.path.isdir(path):
            raise InputError(f"MODEL_PATHS: {raw}: no such directory")
        subdirs = []
        if curr:
            subdirs = sorted((int(m.group(1)), os.path.join(path, d)) for d in os.listdir(path)
                             if (m := CURRICULUM_DIR.match(d)) and is_pipeline_dir(os.path.join(path, d)))
        if is_pipeline_dir(path):
            found.append(path)
        elif not curr:
            raise InputError(f"MODEL_PATHS: {raw}: no model_index.json (not a diffusers pipeline; --curr for a "
                             "run's curriculum-* folders)")
        elif not subdirs:
            raise InputError(f"MODEL_PATHS: {raw}: neither a pipeline nor a folder with curriculum-* pipelines")
        found.extend(p for _, p in subdirs)
    return found


def checkpoint_label(path: str) -> str:
    """A short readable name: 'run/curriculum-3' or 'model'."""
    path = os.path.normpath(path)
    base = os.path.basename(path)
    return f"{os.path.basename(os.path.dirname(path))}/{base}" if CURRICULUM_DIR.match(base) else base


def load_pipeline(path: str, device: torch.device, dtype: torch.dtype):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(path, torch_dtype=dtype, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def evaluate_checkpoint(
    path: str,
    prompts: Sequence[str],
    concept: str,
    clip_scorer,
    classifier,
    images_per_prompt: int,
    seed: int,
    batch_size: int,
    num_inference_steps: int,
    guidance_scale: float,
    resolution: Optional[int],
    image_dir: str,
    device: torch.device,
    dtype: torch.dtype,
) -> dict:
    """Generate, save and score one checkpoint's images; return its results row."""
    t0 = time.perf_counter()
    pipe = load_pipeline(path, device, dtype)
    jobs = [(k, j) for k in range(len(prompts)) for j in range(images_per_prompt)]
    texts = [prompts[k] for k, _ in jobs]
    images = generate_images(pipe, texts, [image_seed(seed, k, j) for k, j in jobs], batch_size,
                             num_inference_steps, guidance_scale, resolution, progress=True,
                             desc=checkpoint_label(path))
    # A fresh folder per checkpoint: a rerun never mixes in stale images.
    shutil.rmtree(image_dir, ignore_errors=True)
    os.makedirs(image_dir)
    for (k, j), im in zip(jobs, images):
        im.save(os.path.join(image_dir, f"p{k:03d}_{j:02d}.png"))
    clip = clip_scorer.score(images, texts)
    row = {"checkpoint": path, "label": checkpoint_label(path), "concept": concept, "images": len(images),
           "clip_cosine": sum(clip) / len(clip), "clip_logit_scale": LOGIT_SCALE * sum(clip) / len(clip),
           "image_dir": image_dir}
    if classifier is not None:
        pred = classifier.predict(images)
        row["classifier_accuracy"] = sum(pred) / len(pred)
    row["wall_s"] = round(time.perf_counter() - t0, 2)
    del pipe
    return row


RESULT_FIELDS = ("label", "concept", "images", "clip_cosine", "clip_logit_scale", "classifier_accuracy",
                 "checkpoint", "image_dir", "wall_s")


def write_results(output_dir: str, rows: Sequence[dict]) -> None:
    """results.jsonl and results.csv for this evaluation (rewritten whole, atomically)."""
    import json

    atomic_write_text(os.path.join(output_dir, "results.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=RESULT_FIELDS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    atomic_write_text(os.path.join(output_dir, "results.csv"), buf.getvalue())


def format_table(rows: Sequence[dict]) -> str:
    """Plain-text table with the CLIP scale labelled."""
    head = f"{'checkpoint':<40} {'CLIP cosine (0..1)':>18} {'CLIP x100 (logit)':>18} {'classifier acc':>15}"
    lines = [head, "-" * len(head)]
    for r in rows:
        acc = r.get("classifier_accuracy")
        lines.append(f"{r['label'][:40]:<40} {r['clip_cosine']:>18.4f} {r['clip_logit_scale']:>18.2f} "
                     f"{'n/a' if acc is None else f'{acc:.3f}':>15}")
    return "\n".join(lines)
