"""eval_model.py's work (docs/protocols.md: evaluation): N images per prompt per checkpoint, CLIP and classifier."""

from __future__ import annotations

import csv
import functools
import io
import json
import os
import re
import shutil
import time
from typing import List, Optional, Sequence

import torch

from . import numerics
from .errors import InputError
from .models import EMA_UNET, LORA_BASE_FILE, LORA_EMA_FILE, LORA_FILE, TRAINED_UNET, is_lora_dir, resolve_model_path
from .results import atomic_write_text, writing
from .validation import generate_images, generation_precision, image_seed

CURRICULUM_DIR = re.compile(r"^curriculum-(\d+)$")


def is_pipeline_dir(path: str) -> bool:
    """A diffusers pipeline, or a --params lora run's adapter folder (which names its base pipeline)."""
    return os.path.isfile(os.path.join(path, "model_index.json")) or is_lora_dir(path)


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
    for p in found:
        if is_lora_dir(p):
            lora_base(p)  # its base pipeline must still be there
    return found


def checkpoint_label(path: str) -> str:
    """A short readable name: 'run/curriculum-3' or 'model'."""
    path = os.path.normpath(path)
    base = os.path.basename(path)
    return f"{os.path.basename(os.path.dirname(path))}/{base}" if CURRICULUM_DIR.match(base) else base


WEIGHTS = ("trained", "ema")


def unet_folder(path: str, weights: str) -> tuple:
    """(subfolder, what it holds) for the requested UNet weights of a saved pipeline.

    Our runs save with --use_ema either ``unet/`` (trained) + ``unet_ema/``
    (curriculum-{i} folders) or ``unet/`` (EMA) + ``unet_trained/`` (the
    sequential script's final model). A pipeline with one UNet gives it for
    either choice, labelled 'single'.
    """
    if is_lora_dir(path):  # the adapter files: trained, and EMA when the run kept one
        if os.path.isfile(os.path.join(path, LORA_EMA_FILE)):
            return (LORA_EMA_FILE, "ema") if weights == "ema" else (LORA_FILE, "trained")
        return LORA_FILE, "single"
    if os.path.isdir(os.path.join(path, TRAINED_UNET)):
        return (TRAINED_UNET, "trained") if weights == "trained" else ("unet", "ema")
    if os.path.isdir(os.path.join(path, EMA_UNET)):
        return (EMA_UNET, "ema") if weights == "ema" else ("unet", "trained")
    return "unet", "single"


def generation_dtype(requested: Optional[str], cuda: bool) -> torch.dtype:
    """eval_model.py's precision, the text encoder's and VAE's dtype and autocast's (the UNet stays fp32):
    --mixed_precision, by default fp16 on CUDA and fp32 on the CPU (fp16 needs CUDA)."""
    from .models import effective_mixed_precision, weight_dtype_for

    return weight_dtype_for(effective_mixed_precision(requested or ("fp16" if cuda else "no"), cuda))


def load_pipeline(path: str, device: torch.device, dtype: torch.dtype, weights: str = "trained",
                  scheduler: Optional[str] = None):
    """The pipeline at ``path`` with the requested UNet weights (see ``unet_folder``): text encoder and VAE in
    ``dtype``, the UNet in fp32, as a run validates (drawn under ``validation.generation_precision``)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from .precision import MASTER_DTYPE

    sub, _ = unet_folder(path, weights)
    if is_lora_dir(path):
        # The base pipeline the run fine-tuned, plus its adapter (unfused: the computation of the run's own
        # validation, so the same seed gives the same image).
        pipe = load_pipeline(lora_base(path), device, dtype, scheduler=scheduler)
        pipe.load_lora_weights(path, weight_name=sub)
        return pipe.to(device)
    # The UNet in fp32 whatever ``dtype``, as validation runs the trained weights (fp32 masters under autocast): an
    # fp16 copy would differ where autocast computes in float32 (norms), and its outputs would not be autocast's.
    unet = UNet2DConditionModel.from_pretrained(path, subfolder=sub, dtype=MASTER_DTYPE)
    pipe = StableDiffusionPipeline.from_pretrained(path, dtype=dtype, unet=unet, safety_checker=None,
                                                   requires_safety_checker=False)
    numerics.portable_scheduler(pipe.scheduler)  # its step's roots: the same bits on every CPU
    if scheduler is not None:  # --scheduler: another sampler on the model's own noise schedule
        from .validation import scheduler_from_name

        pipe.scheduler = scheduler_from_name(scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def lora_base(path: str) -> str:
    """The base pipeline a LoRA folder names (InputError when it is gone)."""
    with open(os.path.join(path, LORA_BASE_FILE)) as f:
        base = json.load(f)["base_model"]
    if os.path.isabs(base) and not os.path.isdir(base):
        raise InputError(f"{path}: its base pipeline {base} (named in {LORA_BASE_FILE}) is not there")
    return base


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
    weights: str = "trained",
    scheduler: Optional[str] = None,
    q16=None,
) -> dict:
    """Generate, save and score one checkpoint's images; return its results row (``q16``: a common.q16.Q16 or
    I2PJudge)."""
    from .validation import scheduler_name

    t0 = time.perf_counter()
    pipe = load_pipeline(path, device, dtype, weights, scheduler)
    sampler = scheduler_name(pipe.scheduler)
    jobs = [(k, j) for k in range(len(prompts)) for j in range(images_per_prompt)]
    texts = [prompts[k] for k, _ in jobs]
    images = generate_images(pipe, texts, [image_seed(seed, k, j) for k, j in jobs], batch_size,
                             num_inference_steps, guidance_scale, resolution,
                             autocast=functools.partial(generation_precision, pipe), progress=True,
                             desc=checkpoint_label(path))
    unet_dtype = pipe.unet.dtype
    # A fresh folder per checkpoint: a rerun never mixes in stale images. The metadata lets
    # `eval_model.py --images` score the folder again later without the model.
    shutil.rmtree(image_dir, ignore_errors=True)
    with writing("images", image_dir):
        os.makedirs(image_dir)
        meta = []
        for (k, j), im, text in zip(jobs, images, texts):
            name = f"p{k:03d}_{j:02d}.png"
            im.save(os.path.join(image_dir, name))
            meta.append(json.dumps({"file_name": name, "prompt": text, "seed": image_seed(seed, k, j)}) + "\n")
        atomic_write_text(os.path.join(image_dir, IMAGE_METADATA), "".join(meta))
    del pipe
    row = score_images(path, checkpoint_label(path), images, texts, concept, clip_scorer, classifier, image_dir, t0,
                       q16)
    # dtype: the text encoder's and VAE's, and autocast's when not float32; unet_dtype: the UNet's weights.
    return {**row, "weights": unet_folder(path, weights)[1], "scheduler": sampler,
            "num_inference_steps": num_inference_steps, "dtype": str(dtype).replace("torch.", ""),
            "unet_dtype": str(unet_dtype).replace("torch.", "")}


def score_images(checkpoint: str, label: str, images, texts, concept: str, clip_scorer, classifier,
                 image_dir: str, t0: float, q16=None) -> dict:
    """The results row of a set of images: each criterion's columns (common.criteria), from its per-image scores."""
    from .criteria import CRITERIA

    row = {"checkpoint": checkpoint, "label": label, "concept": concept, "images": len(images),
           "image_dir": image_dir}
    row.update(CRITERIA["clip"].summarise(clip_scorer.score(images, texts)))
    if classifier is not None:
        pred, details = classifier.score_with_details(images)
        row.update(CRITERIA["classifier"].summarise(pred))
        if details is not None:  # nudity: how many images show each counted class (the MACE / ESD table)
            classes = getattr(classifier.nudity, "classes", ("UNSAFE",))
            row["nudity_class_counts"] = {c: sum(1 for d in details if c in d["exposed_classes"]) for c in classes}
    if q16 is not None:  # Q16, or I2P's Q16-or-NudeNet judge: its own columns, and each image's verdicts
        scores, details = q16.score_with_details(images)
        row.update(CRITERIA[q16.criterion].summarise(scores))
        row[f"{q16.criterion}_per_image"] = details
    row["wall_s"] = round(time.perf_counter() - t0, 2)
    return row


IMAGE_METADATA = "metadata.jsonl"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_EVAL_NAME = re.compile(r"^p(\d+)_\d+\.png$")


def image_folder_prompts(folder: str, prompts: Optional[Sequence[str]]) -> List[tuple]:
    """(file path, prompt) of each image in a folder, in file-name order.

    The prompt of an image comes from the folder's metadata.jsonl
    (``file_name`` and ``prompt``, as eval_model.py writes it), else from
    ``prompts`` (--prompt_file): line k for files named ``p{k}_{j}.png``, or
    its only line for any file.
    """
    if not os.path.isdir(folder):
        raise InputError(f"MODEL_PATHS: {folder}: no such directory")
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES))
    if not names:
        raise InputError(f"MODEL_PATHS: {folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    meta_path = os.path.join(folder, IMAGE_METADATA)
    if os.path.isfile(meta_path):
        by_name = {}
        with open(meta_path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                        by_name[row["file_name"]] = row["prompt"]
                    except (ValueError, KeyError, TypeError):
                        raise InputError(f"{meta_path} line {line_no}: expected JSON with file_name and prompt") from None
        missing = [n for n in names if n not in by_name]
        if missing:
            raise InputError(f"{meta_path}: no prompt for {missing[0]} ({len(missing)} images without one)")
        return [(os.path.join(folder, n), by_name[n]) for n in names]
    if not prompts:
        raise InputError(f"MODEL_PATHS: {folder}: no {IMAGE_METADATA} beside the images; give --prompt_file")
    out = []
    for n in names:
        m = _EVAL_NAME.match(n)
        if m and int(m.group(1)) < len(prompts):
            out.append((os.path.join(folder, n), prompts[int(m.group(1))]))
        elif len(prompts) == 1:
            out.append((os.path.join(folder, n), prompts[0]))
        else:
            raise InputError(f"{folder}/{n}: which prompt? Name images p{{k}}_{{j}}.png (prompt line k), give a "
                             f"{IMAGE_METADATA} with file_name and prompt, or a one-line --prompt_file")
    return out


def score_image_folder(folder: str, prompts: Optional[Sequence[str]], concept: str, clip_scorer,
                       classifier, q16=None) -> dict:
    """Score images already on disk (no pipeline): the same row evaluate_checkpoint gives."""
    from PIL import Image

    t0 = time.perf_counter()
    pairs = image_folder_prompts(folder, prompts)
    images = []
    for path, _ in pairs:
        with Image.open(path) as im:
            images.append(im.convert("RGB"))
    label = os.path.basename(os.path.normpath(folder))
    return score_images(folder, label, images, [t for _, t in pairs], concept, clip_scorer, classifier, folder, t0,
                        q16)


def result_fields() -> tuple:
    """results.csv's columns: the checkpoint's, then every registered criterion's, then where and how long."""
    from .criteria import result_columns

    return ("label", "weights", "concept", "images", *[key for key, *_ in result_columns()],
            "checkpoint", "image_dir", "dtype", "unet_dtype", "wall_s")


def write_results(output_dir: str, rows: Sequence[dict]) -> None:
    """results.jsonl and results.csv for this evaluation (rewritten whole, atomically)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=result_fields(), extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    with writing("results", output_dir):
        atomic_write_text(os.path.join(output_dir, "results.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
        atomic_write_text(os.path.join(output_dir, "results.csv"), buf.getvalue())


def format_table(rows: Sequence[dict]) -> str:
    """Plain-text table: one column per registered criterion column with a value in any row (CLIP's scale
    labelled), 'n/a' where a checkpoint has none."""
    from .criteria import result_columns

    columns = [c for c in result_columns() if any(c[0] in r for r in rows)]
    head = f"{'checkpoint':<40} {'weights':>8} " + " ".join(f"{h:>{width}}" for _, h, _, _, width in columns)
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = [(f"{r[key]:{fmt}}" if r.get(key) is not None else "n/a").rjust(width)
                 for key, _, fmt, _, width in columns]
        lines.append(f"{r['label'][:40]:<40} {r.get('weights', 'images'):>8} " + " ".join(cells))
    counted = [r for r in rows if r.get("nudity_class_counts")]
    if counted:
        classes = list(counted[0]["nudity_class_counts"])
        lines += ["", "images showing each class (NudeNet), of images per checkpoint:",
                  f"{'checkpoint':<40} {'images':>6} " + " ".join(c.replace("_EXPOSED", "") for c in classes)]
        for r in counted:
            lines.append(f"{r['label'][:40]:<40} {r['images']:>6} " + " ".join(
                f"{r['nudity_class_counts'].get(c, 0):>{len(c.replace('_EXPOSED', ''))}}" for c in classes))
    return "\n".join(lines)
