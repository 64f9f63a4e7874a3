#!/usr/bin/env python
"""Check on one CUDA GPU what a CPU cannot show: memory, speed, host syncs, fp16 skips, determinism, dtypes and the
scripts end to end, in one table (docs/gpu.md).

    python -m tools.gpu_check --json rows.json   # one GPU, under 8 minutes; exit 1 on any FAIL row
    python -m tools.gpu_check --rehearse         # no GPU: every section on the CPU with the tiny model

Run it from the repository root as a module (``-m``): the current directory is then on the import path, so it also
runs where this repository is not pip-installed (the GPU machine of docs/gpu.md, whose Python gets the missing
packages as wheels). It starts with an import preflight: every missing package named in one line, exit 2.

The model is a randomly initialised one of Stable Diffusion 1.4's shapes (UNet 860M, CLIP-L text encoder;
tools/benchmark.py's ``build_sd14``), trained at 512 px, fp16, batch 10, on drawn shapes (latent cache, centre
crop, flips). Each section starts from a fresh gradient scaler, as a run does. The rows:

- peak ``torch.cuda.max_memory_allocated`` of training with the default levers (``--use_ema``), with
  ``--gradient_checkpointing`` and with the leanest (``--gradient_checkpointing --offload_ema``, plus
  ``--use_8bit_adam`` where bitsandbytes is installed), against
  the total docs/memory.md predicts (the budget common/memory.py takes from the run's tensors, plus the activations
  measured by ``tools/benchmark.py --memory``), and the speed of each;
- training samples/s against one H100's compute limit (docs/performance.md), and the same run as the published
  scripts do it (images and captions encoded every step) and as a bare UNet forward+backward: ratios from one run;
- host synchronisations per update (``torch.cuda.set_sync_debug_mode``) over the timed updates;
- updates the fp16 GradScaler skipped among the first 50; the fp16 set-up (dtypes, autocast, scaler);
- validation images/s, all prompts batched against one prompt at a time, and a forced out-of-memory error
  (``torch.cuda.set_per_process_memory_fraction``) that the batch-halving fallback must survive;
- ``--deterministic``: two runs give bit-equal weights, and its cost;
- end to end: ``accelerate launch finetuning_individual_CLIP.py`` on the SD-shaped model (killed after a
  checkpoint, resumed, saved), ``eval_model.py`` on the saved pipeline in fp16, and short runs of
  ``tools/unlearn.py``, ``tools/concept_inversion.py`` and ``tools/attack_prompts.py`` on tiny models.

Exit status: 0 when no row says FAIL, 1 when one does, 2 when a package is missing, 3 without CUDA (unless
``--rehearse``), so a job script can gate on it. ``--json`` writes every row with its raw figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Callable, List, Optional

PROG = "gpu_check.py"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # for the scripts it launches, not for imports

# What the check imports, as (distribution, module). On the GPU machine of docs/gpu.md some come as carried wheels;
# ``common`` is this repository, importable when run from its root with -m.
NEEDED = (("torch", "torch"), ("numpy", "numpy"), ("pillow", "PIL"), ("safetensors", "safetensors"),
          ("transformers", "transformers"), ("diffusers", "diffusers"), ("accelerate", "accelerate"),
          ("datasets", "datasets"), ("open_clip_torch", "open_clip"), ("tqdm", "tqdm"),
          ("this repository (run from its root: python -m tools.gpu_check)", "common.training"))


def missing_packages() -> List[str]:
    """The packages in NEEDED that do not import, each with the module it lacks when that is another one (a
    package the repository needs that is already named is not named again under the repository)."""
    missing, named = [], set()
    for dist, module in NEEDED:
        try:
            importlib.import_module(module)
        except ImportError as err:
            lacks = (getattr(err, "name", None) or module).split(".")[0]
            top = module.split(".")[0]
            if lacks == top:
                missing.append(dist)
            elif lacks not in named:
                missing.append(f"{dist} (needs {lacks})")
            named.add(lacks)
    return missing


try:  # the preflight names it if it is missing; nothing below runs without it
    import torch
except ImportError:  # pragma: no cover - reported by the preflight
    torch = None

# docs/performance.md: one H100 at ~800 TFLOP/s dense fp16; a 512-px SD-1.x sample costs 2.41 TFLOP for the UNet's
# forward+backward (-> ~330 samples/s), a 20-step guided validation image ~35 TFLOP (-> ~23 images/s).
TRAINING_LIMIT = 330.0  # samples/s
VALIDATION_LIMIT = 23.0  # images/s
TARGET_SHARE = 0.30  # docs/performance.md's goal: at least 30% of those limits
GiB = 1024 ** 3
# Activations of SD-1.x at 512 px under fp16 autocast, measured by tools/benchmark.py --memory (docs/memory.md):
# (fixed per pass, per sample) in bytes, without and with gradient checkpointing.
ACTIVATIONS = {False: (1.56 * GiB, 0.88 * GiB), True: (0.26 * GiB, 0.25 * GiB)}
PREDICTION_MARGIN = 1.10  # a peak up to 10% above the prediction passes (allocator rounding, kernel workspaces)
SYNCS_PER_UPDATE = 2  # docs/gpu.md: the host waits once per update (GradScaler's overflow check); one spare


@dataclass(frozen=True)
class Shapes:
    """What the check trains and generates; SD14 is the GPU check, TINY the rehearsal's and the tests' stand-in."""

    model: str = "sd14"  # "sd14" (random weights, SD 1.4's shapes) or "tiny" (tools/tiny.py)
    resolution: int = 512
    batch_size: int = 10
    mixed_precision: str = "fp16"
    images: int = 100  # dataset rows (drawn shapes)
    memory_updates: int = 2  # updates per lever combination whose peak is measured
    lever_timed_updates: int = 4  # then timed, per lever combination
    skip_window: int = 50  # the first updates, among which fp16 skips are counted
    timed_updates: int = 20  # training updates timed after the skip window (its warm-up)
    path_updates: int = 4  # updates timed per comparison path (published-style, bare)
    determinism_updates: int = 5  # updates per determinism run
    prompts: int = 10
    inference_steps: int = 20

    @property
    def limits_apply(self) -> bool:
        """The compute limits and the memory prediction are for SD-1.x at 512 px in fp16, batch 10."""
        return (self.model == "sd14" and self.resolution == 512 and self.mixed_precision == "fp16"
                and self.batch_size == 10)


SD14 = Shapes()
TINY = Shapes(model="tiny", resolution=32, batch_size=2, mixed_precision="no", images=8, memory_updates=1,
              lever_timed_updates=1, skip_window=3, timed_updates=2, path_updates=1, determinism_updates=2,
              prompts=2, inference_steps=2)


@dataclass
class Row:
    """One line of the table: what was checked, what was measured, what it is held against, the verdict."""

    check: str
    measured: object
    reference: object = "-"
    verdict: str = "-"  # "ok", "FAIL", or "-" (a figure to read, nothing to pass)
    data: dict = dataclasses.field(default_factory=dict)  # the raw numbers behind the text (JSON, tests)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def verdict(ok: bool) -> str:
    return "ok" if ok else "FAIL"


# ---- the world and the trainers ----------------------------------------------------------------------------------

def build_world(work: str, shapes: Shapes) -> dict:
    """The model (random weights), a tiny CLIP scorer and a dataset of drawn shapes at the check's resolution."""
    from tools import tiny

    tok = tiny.write_clip_tokenizer(os.path.join(work, "tokenizer"))
    if shapes.model == "sd14":
        from tools.benchmark import build_sd14

        model_dir = build_sd14(os.path.join(work, "sd14"))
    else:
        model_dir = tiny.build_tiny_sd(os.path.join(work, "sd"), resolution=shapes.resolution, tokenizer=tok)
    data_dir = tiny.shapes_dataset(os.path.join(work, "data"), [("red", "circle"), ("blue", "square")],
                                   per_concept=-(-shapes.images // 2), size=shapes.resolution)
    return {"work": work, "model": model_dir, "data": data_dir, "tokenizer": tok}


def free(accelerator) -> None:
    """Drop accelerate's references to prepared models and optimizers and return the memory (between trainers)."""
    accelerator.free_memory()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def fresh_scaler(accelerator) -> None:
    """Give the accelerator a new GradScaler with its first one's settings, so that each section starts from the
    initial loss scale as a run does (a ChunkTrainer takes the scaler's state when it is built as its per-chunk
    reset; the sections share one accelerator, whose scaler the previous section moved)."""
    old = getattr(accelerator, "scaler", None)
    if old is None:
        return
    accelerator.scaler = torch.amp.GradScaler(old._device, init_scale=old._init_scale,
                                              growth_factor=old._growth_factor, backoff_factor=old._backoff_factor,
                                              growth_interval=old._growth_interval, enabled=old._enabled)


def new_trainer(accelerator, model_dir: str, shapes: Shapes, cache: bool = True, **train):
    """A ChunkTrainer on fresh model parts (the frozen ones in the run's weight dtype) and a fresh gradient scaler,
    chunk 0 begun."""
    from common.data import ImageTransform
    from common.encoding import make_encoder
    from common.models import cast_frozen, load_sd_parts, weight_dtype_for
    from common.training import ChunkTrainer, TrainConfig

    device, dtype = accelerator.device, weight_dtype_for(accelerator.mixed_precision)
    parts = load_sd_parts(model_dir)
    cast_frozen(parts, device, dtype)
    encoder = make_encoder(parts, ImageTransform(shapes.resolution, center_crop=True, random_flip=True), device,
                           dtype, cache=cache)
    cfg = TrainConfig(learning_rate=1e-5, train_batch_size=shapes.batch_size, **train)
    fresh_scaler(accelerator)
    trainer = ChunkTrainer(accelerator, parts, encoder, cfg, horizon_updates=1000)
    trainer.reset_chunk(0)
    return trainer, parts


def row_range(shapes: Shapes, updates: int) -> tuple:
    """Rows of one epoch: as many whole batches as the data and ``updates`` allow (at least one)."""
    per_epoch = max(1, min(updates, shapes.images // shapes.batch_size))
    return 0, per_epoch * shapes.batch_size


def train_updates(trainer, dataset, shapes: Shapes, updates: int,
                  on_update: Optional[Callable[[], None]] = None) -> int:
    """Train whole epochs until at least ``updates`` optimizer updates are done; return how many were."""
    rows = row_range(shapes, updates)
    per_epoch = (rows[1] - rows[0]) // shapes.batch_size
    done = 0
    while done < updates:
        epoch = trainer.global_updates  # a new epoch index each call: new draws, as a run's epochs have
        trainer.train_epoch(dataset, rows, 0, epoch, on_update=(lambda n, loss: on_update()) if on_update else None)
        done += per_epoch
    return done


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_updates(trainer, dataset, shapes: Shapes, updates: int, device) -> tuple:
    """(samples/s, updates) of ``updates`` training updates, the device drained before and after."""
    _sync(device)
    t0 = time.perf_counter()
    done = train_updates(trainer, dataset, shapes, updates)
    _sync(device)
    return done * shapes.batch_size / (time.perf_counter() - t0), done


def _bitsandbytes() -> bool:
    import importlib.util

    return torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None


# ---- memory ------------------------------------------------------------------------------------------------------

LEVERS = (  # (row name, TrainConfig levers); the leanest drops 8-bit Adam where bitsandbytes cannot run. The middle
    # one isolates what --offload_ema costs in speed (without bitsandbytes, the leanest differs from it by that alone).
    ("default (--use_ema)", {"use_ema": True}),
    ("--gradient_checkpointing", {"use_ema": True, "gradient_checkpointing": True}),
    ("leanest (--gradient_checkpointing --offload_ema --use_8bit_adam)",
     {"use_ema": True, "gradient_checkpointing": True, "offload_ema": True, "use_8bit_adam": True}),
)


def predicted_peak(budget_bytes: int, shapes: Shapes, checkpointing: bool) -> Optional[float]:
    """docs/memory.md's total: the budget before activations plus the measured activations (SD-1.x, 512 px)."""
    if not shapes.limits_apply:
        return None
    per_pass, per_sample = ACTIVATIONS[checkpointing]
    return budget_bytes + per_pass + shapes.batch_size * per_sample


def measure_memory(accelerator, world: dict, dataset, shapes: Shapes) -> List[Row]:
    """Per lever combination: the peak of ``memory_updates`` training updates (latent cache encoded before the
    window opens) against the predicted total, then the speed of ``lever_timed_updates`` more."""
    from common.memory import memory_budget, peak_record, reset_peak

    rows = []
    for name, levers in LEVERS:
        if levers.get("use_8bit_adam") and not _bitsandbytes():
            levers = {k: v for k, v in levers.items() if k != "use_8bit_adam"}
            name = name.replace(" --use_8bit_adam", "") + " [no bitsandbytes: 8-bit Adam left out]"
        free(accelerator)
        trainer, parts = new_trainer(accelerator, world["model"], shapes, **levers)
        rng = row_range(shapes, shapes.memory_updates)
        budget = memory_budget(trainer, parts, largest_chunk=rng[1] - rng[0])
        trainer.encoder.prepare(dataset, row_range(shapes, max(shapes.memory_updates, shapes.lever_timed_updates)))
        _sync(accelerator.device)
        reset_peak(accelerator.device)
        train_updates(trainer, dataset, shapes, shapes.memory_updates)
        peak = peak_record(accelerator.device)
        speed, _ = timed_updates(trainer, dataset, shapes, shapes.lever_timed_updates, accelerator.device)
        before = budget["accelerator_bytes_before_activations"]
        predicted = predicted_peak(before, shapes, bool(levers.get("gradient_checkpointing")))
        data = {"peak_bytes": peak["peak_gpu_bytes"] if peak else None, "budget_bytes": before,
                "predicted_bytes": predicted, "host_bytes": budget["host_bytes"], "levers": levers,
                "samples_per_s": speed}
        if peak is None:
            measured, reference, ok = "n/a (no CUDA)", f"budget before activations {before / GiB:.2f} GiB", "-"
        elif predicted is None:
            measured, reference, ok = f"{peak['peak_gpu_bytes'] / GiB:.2f} GiB", \
                f"budget before activations {before / GiB:.2f} GiB", "-"
        else:
            ratio = peak["peak_gpu_bytes"] / predicted
            measured = f"{peak['peak_gpu_bytes'] / GiB:.2f} GiB ({ratio:.0%} of the prediction)"
            reference = f"docs/memory.md's total {predicted / GiB:.2f} GiB (at most +{PREDICTION_MARGIN - 1:.0%})"
            ok = verdict(ratio <= PREDICTION_MARGIN)
            data["peak_over_predicted"] = ratio
        rows.append(Row(f"peak GPU memory, {name}", measured, reference, ok, data=data))
        rows.append(Row(f"training speed, {name.split(' [')[0]}", f"{speed:.2f} samples/s", data={"samples_per_s": speed}))
        trainer = parts = None
    free(accelerator)
    return rows


# ---- training: skips, speed, host syncs, dtypes -------------------------------------------------------------------

def _share_row(check: str, value: float, limit: float, unit: str, applies: bool, data: Optional[dict] = None) -> Row:
    data = {"value": value, **(data or {})}
    if not applies:
        return Row(check, f"{value:.2f} {unit}", data=data)
    share = value / limit
    return Row(check, f"{value:.2f} {unit} ({share:.0%} of the limit)",
               f"limit ~{limit:.0f} {unit}, target >= {TARGET_SHARE:.0%}", verdict(share >= TARGET_SHARE),
               data={**data, "share_of_limit": share})


class SyncCounter:
    """Host synchronisations CUDA reports while the block runs (``torch.cuda.set_sync_debug_mode('warn')``),
    counted by the line of Python that caused them; nothing on the CPU."""

    def __init__(self, device):
        self.active = device.type == "cuda"
        self.count, self.where = 0, {}

    def __enter__(self):
        if self.active:
            self._warnings = warnings.catch_warnings(record=True)
            self._seen = self._warnings.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        if self.active:
            torch.cuda.set_sync_debug_mode("default")
            self._warnings.__exit__(*exc)
            for w in self._seen:
                if "synchroniz" in str(w.message):
                    self.count += 1
                    where = f"{os.path.relpath(w.filename, ROOT) if w.filename.startswith(ROOT) else w.filename}" \
                            f":{w.lineno}"
                    self.where[where] = self.where.get(where, 0) + 1


def measure_training(accelerator, world: dict, dataset, shapes: Shapes) -> tuple:
    """fp16 skips among the first ``skip_window`` updates, then samples/s and host syncs of ``timed_updates`` more,
    and the fp16 set-up seen in those updates. Returns (rows, samples/s, trainer, parts): validation reuses them."""
    free(accelerator)
    trainer, parts = new_trainer(accelerator, world["model"], shapes)
    seen = {}
    unet = accelerator.unwrap_model(trainer.unet)
    device_type = accelerator.device.type

    def record_autocast(module, args):
        seen.setdefault("autocast", torch.is_autocast_enabled(device_type))
        seen.setdefault("autocast_dtype", torch.get_autocast_dtype(device_type))

    hook = unet.register_forward_pre_hook(record_autocast)
    skipped = [0]

    def count_skip():
        skipped[0] += int(bool(trainer.optimizer.step_was_skipped))

    try:
        window = train_updates(trainer, dataset, shapes, shapes.skip_window, on_update=count_skip)
    finally:
        hook.remove()
    with SyncCounter(accelerator.device) as syncs:
        samples_per_s, done = timed_updates(trainer, dataset, shapes, shapes.timed_updates, accelerator.device)
    fp16 = shapes.mixed_precision == "fp16"
    rows = [
        _share_row("training speed (the toolkit: cached latents)", samples_per_s, TRAINING_LIMIT, "samples/s",
                   shapes.limits_apply),
        Row(f"fp16 updates skipped in the first {window}", skipped[0], "a few at most (the scaler's first scales)",
            verdict(skipped[0] <= max(1, window // 10)), data={"skipped": skipped[0], "updates": window}),
    ]
    if syncs.active:
        per_update = syncs.count / done
        top = ", ".join(f"{k} x{v}" for k, v in sorted(syncs.where.items(), key=lambda kv: -kv[1])[:3])
        rows.append(Row(f"host syncs per update (over {done} updates)", f"{per_update:.2f} ({top or 'none'})",
                        f"at most {SYNCS_PER_UPDATE} (docs/gpu.md: the scaler's overflow check)",
                        verdict(per_update <= SYNCS_PER_UPDATE),
                        data={"per_update": per_update, "total": syncs.count, "where": syncs.where}))
    else:
        rows.append(Row("host syncs per update", "n/a (no CUDA)"))
    rows += dtype_rows(trainer, parts, accelerator, seen, fp16)
    return rows, samples_per_s, trainer, parts


def dtype_rows(trainer, parts, accelerator, seen: dict, fp16: bool) -> List[Row]:
    """The fp16 set-up: trainable parameters fp32, frozen parts in fp16, autocast on in the UNet, a GradScaler."""
    trainable = sorted({str(p.dtype).replace("torch.", "") for p in trainer.trainable})
    frozen = sorted({str(p.dtype).replace("torch.", "")
                     for m in (parts.text_encoder, parts.vae) for p in m.parameters()})
    autocast = seen.get("autocast", False)
    autocast_text = f"on, {str(seen['autocast_dtype']).replace('torch.', '')}" if autocast else "off"
    scaler = getattr(accelerator, "scaler", None)
    return [
        Row("trainable parameters dtype", ",".join(trainable), "float32", verdict(trainable == ["float32"])),
        Row("frozen text encoder + VAE dtype", ",".join(frozen), "float16" if fp16 else "float32",
            verdict(frozen == ["float16" if fp16 else "float32"])),
        Row("autocast in the UNet forward", autocast_text, "on, float16" if fp16 else "off",
            verdict(autocast_text == ("on, float16" if fp16 else "off"))),
        Row("GradScaler", type(scaler).__name__ if scaler is not None else "none",
            "GradScaler" if fp16 else "none", verdict((scaler is not None) == fp16)),
    ]


def measure_paths(accelerator, world: dict, dataset, shapes: Shapes, toolkit_samples_per_s: float) -> List[Row]:
    """The same updates as the published scripts run them (every step encodes its images and captions) and as a
    bare UNet forward+backward on one ready batch (the floor an update can reach), against the toolkit's speed."""
    from tools.benchmark import bare_step

    free(accelerator)
    trainer, parts = new_trainer(accelerator, world["model"], shapes, cache=False)
    train_updates(trainer, dataset, shapes, 1)  # warm-up
    published, _ = timed_updates(trainer, dataset, shapes, shapes.path_updates, accelerator.device)
    bare = bare_step(trainer, dataset, accelerator, shapes.batch_size)
    bare()
    _sync(accelerator.device)
    t0 = time.perf_counter()
    for _ in range(shapes.path_updates):
        bare()
    _sync(accelerator.device)
    bare_speed = shapes.path_updates * shapes.batch_size / (time.perf_counter() - t0)
    trainer = parts = bare = None
    free(accelerator)
    return [
        Row("training speed, published-style (encode every step)", f"{published:.2f} samples/s",
            f"the toolkit is {toolkit_samples_per_s / published:.2f}x this", data={"samples_per_s": published,
                                                                                  "toolkit_over_published":
                                                                                  toolkit_samples_per_s / published}),
        Row("training speed, bare UNet forward+backward", f"{bare_speed:.2f} samples/s",
            f"the toolkit reaches {toolkit_samples_per_s / bare_speed:.0%} of it",
            data={"samples_per_s": bare_speed, "toolkit_over_bare": toolkit_samples_per_s / bare_speed}),
    ]


# ---- validation --------------------------------------------------------------------------------------------------

def measure_validation(accelerator, parts, trainer, shapes: Shapes) -> List[Row]:
    """Images/s of one batched validation (all prompts in one batch, guided) after a warm-up one, against one
    prompt at a time (the published scripts); then the out-of-memory fallback."""
    from common.validation import BatchLimit, build_pipeline, generate_images, generation_precision, image_seed
    from tools.benchmark import shape_prompts

    pipe = build_pipeline(parts, accelerator.unwrap_model(trainer.unet))
    prompts = shape_prompts(shapes.prompts)
    seeds = [image_seed(0, k) for k in range(len(prompts))]
    precision = functools.partial(generation_precision, pipe)  # validation's own (common/protocol.py)

    def generate(batch, limit=None):
        return generate_images(pipe, prompts, seeds, batch, num_inference_steps=shapes.inference_steps,
                               guidance_scale=7.5, resolution=shapes.resolution, autocast=precision, limit=limit)

    def timed(batch) -> float:
        _sync(accelerator.device)
        t0 = time.perf_counter()
        generate(batch)
        _sync(accelerator.device)
        return len(prompts) / (time.perf_counter() - t0)

    generate(len(prompts))
    batched, single = timed(len(prompts)), timed(1)
    rows = [_share_row(f"validation speed ({len(prompts)} prompts batched, {shapes.inference_steps} steps)",
                       batched, VALIDATION_LIMIT, "images/s", shapes.limits_apply),
            Row("validation speed, one prompt at a time (published)", f"{single:.2f} images/s",
                f"batched is {batched / single:.2f}x this", data={"images_per_s": single,
                                                                   "batched_over_single": batched / single})]
    limit = BatchLimit(log=lambda line: None)
    with forced_out_of_memory(accelerator.device, pipe, shapes.resolution, precision) as how:
        images = generate(len(prompts), limit)
    ok = len(images) == len(prompts) and limit.limit is not None and limit.limit < len(prompts)
    rows.append(Row(f"validation out of memory ({how})",
                    f"{len(images)} images, batch {len(prompts)} -> {limit.limit}",
                    f"{len(prompts)} images at a smaller batch", verdict(ok),
                    data={"images": len(images), "batch_after": limit.limit, "how": how}))
    return rows


class forced_out_of_memory:
    """Make a batch of ``batch`` images run out of memory: on CUDA by capping this process's share of the card
    (``set_per_process_memory_fraction``) at what is in use plus three single-image generations; on the CPU by
    raising CUDA's out-of-memory error from the UNet for any batch of more than one prompt (the fallback's logic,
    without the memory)."""

    def __init__(self, device, pipe, resolution: int, autocast):
        self.device, self.pipe, self.resolution, self.autocast = device, pipe, resolution, autocast

    def __enter__(self) -> str:
        if self.device.type == "cuda":
            total = torch.cuda.get_device_properties(self.device).total_memory
            per_image = self._one_image_bytes()
            torch.cuda.empty_cache()
            cap = torch.cuda.memory_allocated(self.device) + 3 * per_image
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), self.device)
            return f"memory capped at {cap / GiB:.1f} GiB"
        def capped(module, args, kwargs):
            sample = args[0] if args else kwargs["sample"]
            if sample.shape[0] > 2:  # one prompt and its unconditional twin (classifier-free guidance)
                raise torch.cuda.OutOfMemoryError("forced by gpu_check (CPU rehearsal)")

        # A hook, not a replaced forward: generation lends the UNet accelerate's original forward
        # (validation.unet_outputs_as_computed), and hooks run whichever forward is in place.
        self._hook = self.pipe.unet.register_forward_pre_hook(capped, with_kwargs=True)
        return "forced on the CPU above 1 prompt"

    def _one_image_bytes(self) -> int:
        """Peak bytes one guided image adds at the check's resolution (a 2-step generation)."""
        from common.validation import generate_images

        torch.cuda.synchronize(self.device)
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        generate_images(self.pipe, ["a red circle"], [0], 1, num_inference_steps=2, guidance_scale=7.5,
                        resolution=self.resolution, autocast=self.autocast)
        return max(torch.cuda.max_memory_allocated(self.device) - base, 1)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0, self.device)
            torch.cuda.empty_cache()
        else:
            self._hook.remove()


# ---- --deterministic ---------------------------------------------------------------------------------------------

def measure_determinism(accelerator, world: dict, dataset, shapes: Shapes,
                        default_samples_per_s: Optional[float] = None) -> List[Row]:
    """Two runs of ``determinism_updates`` updates under --deterministic from the same seed, each with a fresh
    scaler: bit-equal weights? And their speed against ``default_samples_per_s`` (the cost of --deterministic)."""
    from common.determinism import deterministic

    weights, speeds = [], []
    with deterministic(True):
        for _ in range(2):
            free(accelerator)
            trainer, parts = new_trainer(accelerator, world["model"], shapes)
            trainer.encoder.prepare(dataset, row_range(shapes, shapes.determinism_updates))
            speed, _ = timed_updates(trainer, dataset, shapes, shapes.determinism_updates, accelerator.device)
            speeds.append(speed)
            weights.append([p.detach().to("cpu", copy=True) for p in trainer.trainable])
            trainer = parts = None
    free(accelerator)
    diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(*weights))
    equal = all(torch.equal(a, b) for a, b in zip(*weights))
    rows = [Row(f"--deterministic: two runs of {shapes.determinism_updates} updates, same seed",
                "bit-equal weights" if equal else f"weights differ (max |diff| {diff:.3g})", "bit-equal weights",
                verdict(equal), data={"max_abs_diff": diff})]
    if default_samples_per_s:
        rows.append(Row("--deterministic training speed", f"{max(speeds):.2f} samples/s",
                        f"{max(speeds) / default_samples_per_s:.0%} of the default's {default_samples_per_s:.2f}",
                        data={"samples_per_s": max(speeds), "over_default": max(speeds) / default_samples_per_s}))
    return rows


# ---- the scripts end to end --------------------------------------------------------------------------------------

def _run(cmd: list, log: str, env_extra: Optional[dict] = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run one command from the repository root (the repository on PYTHONPATH: tools/*.py import ``common``
    without a pip install), its output appended to ``log``."""
    from tools import child_env

    env = child_env(HF_HUB_OFFLINE="1", **(env_extra or {}))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n[exit {proc.returncode}]\n{proc.stdout}\n{proc.stderr}\n")
    return proc


def _accelerate(script: str, mixed_precision: str) -> list:
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
            "--mixed_precision", mixed_precision, "--dynamo_backend", "no", os.path.join(ROOT, script)]


def _failure(proc) -> str:
    lines = [line for line in (proc.stderr or proc.stdout or "").strip().splitlines() if line.strip()]
    return f"exit {proc.returncode}: {lines[-1][:200] if lines else 'no output'}"


def _tiny_world(world: dict) -> dict:
    """The tiny model, CLIP and 32-px data the smoke runs use (built once, beside the check's own)."""
    from tools import tiny

    if "tiny_sd" not in world:
        work = world["work"]
        world["tiny_sd"] = tiny.build_tiny_sd(os.path.join(work, "tiny_sd"), resolution=32,
                                              tokenizer=world["tokenizer"])
        world["tiny_data"] = tiny.shapes_dataset(os.path.join(work, "tiny_data"), [("red", "circle"),
                                                                                  ("blue", "square")],
                                                 per_concept=4, size=32)
    if "clip" not in world:
        world["clip"] = tiny.build_tiny_clip(os.path.join(world["work"], "clip"), tokenizer=world["tokenizer"])
    return world


def measure_end_to_end(world: dict, shapes: Shapes) -> List[Row]:
    """finetuning_individual_CLIP.py killed after a checkpoint, resumed and saved; eval_model.py on the saved
    pipeline; the log of every command in ``work/end_to_end.log``."""
    _tiny_world(world)
    work, log = world["work"], os.path.join(world["work"], "end_to_end.log")
    prompts = os.path.join(work, "prompts.txt")
    with open(prompts, "w") as f:
        f.write("a red circle\na blue square\n")
    out = os.path.join(work, "e2e_run")
    # One chunk of (on the GPU) 20 rows at batch 10: 2 updates an epoch, 3 epochs (--clip_epoch 1 and a threshold
    # never crossed), a checkpoint every 2 updates; the first run is killed at its 5th update and resumes from
    # checkpoint-4 (the tiny rehearsal: 8 rows at batch 2, 4 updates an epoch, the same kill and checkpoint).
    flags = [f"--pretrained_model_name_or_path={world['model']}", f"--train_data_dir={world['data']}",
             "--caption_column=prompt", f"--resolution={shapes.resolution}", "--center_crop", "--random_flip",
             f"--train_batch_size={shapes.batch_size}", f"--curriculum={min(20, shapes.images)}", "--params=xattn", "--learning_rate=1e-5",
             "--clip_threshold=1.0", "--clip_epoch=1", "--validation_epochs=1", "--checkpointing_steps=2",
             f"--validation_prompts={prompts}", "--num_inference_steps=5", f"--clip_model={world['clip']}",
             "--save_model=True", f"--output_dir={out}", f"--mixed_precision={shapes.mixed_precision}"]
    script = _accelerate("finetuning_individual_CLIP.py", shapes.mixed_precision)
    t0 = time.perf_counter()
    killed = _run(script + flags, log, {"REVIVAL_FAULT": "update:5"})
    resumed = _run(script + flags + ["--resume_from_checkpoint=latest"], log)
    run_s = time.perf_counter() - t0
    saved = os.path.join(out, "curriculum-0")
    ok = (killed.returncode != 0 and resumed.returncode == 0 and "resumed from" in resumed.stdout
          and os.path.isfile(os.path.join(saved, "model_index.json")))
    rows = [Row("end to end: finetuning_individual_CLIP.py killed at update 5, resumed, saved",
                f"{run_s:.0f} s" if ok else f"killed {_failure(killed)}; resumed {_failure(resumed)}",
                "exit 0, 'resumed from', a saved pipeline", verdict(ok), data={"seconds": run_s})]
    if not ok:
        return rows
    evaluated = os.path.join(work, "e2e_eval")
    t0 = time.perf_counter()
    proc = _run([sys.executable, os.path.join(ROOT, "eval_model.py"), saved, "", "red circle",
                 f"--prompt_file={prompts}", f"--clip_model={world['clip']}", "--images_per_prompt=1",
                 "--num_inference_steps=5", f"--resolution={shapes.resolution}", f"--output_dir={evaluated}"], log)
    results = os.path.join(evaluated, "results.jsonl")
    ok = proc.returncode == 0 and os.path.isfile(results)
    row = json.loads(open(results).readline()) if ok else {}
    rows.append(Row("end to end: eval_model.py on the saved pipeline",
                    f"{time.perf_counter() - t0:.0f} s, dtype {row.get('dtype')}, CLIP {row.get('clip_cosine')}"
                    if ok else _failure(proc), "exit 0, one results row", verdict(ok), data=row))
    return rows


def tool_runs(world: dict, dev: str) -> dict:
    """The smoke runs, by name: (the tool and its flags, the file a finished run leaves), on the tiny model."""
    _tiny_world(world)
    work = world["work"]
    sd, clip, data = world["tiny_sd"], world["clip"], world["tiny_data"]
    prompts = os.path.join(work, "tool_prompts.txt")
    with open(prompts, "w") as f:
        f.write("a photo of a <concept>\na red circle\n")
    runs = {
        "tools/unlearn.py --method esd-x": (
            [os.path.join(ROOT, "tools/unlearn.py"), "--method", "esd-x", "--concept", "red circle", "--model", sd,
             "--output_dir", os.path.join(work, "unlearned"), "--iterations", "5", "--ddim_steps", "5",
             "--probe_samples", "2", "--device", dev, "--quiet"], os.path.join(work, "unlearned", "model_index.json")),
        "tools/concept_inversion.py": (
            [os.path.join(ROOT, "tools/concept_inversion.py"), "--pretrained_model_name_or_path", sd,
             "--train_data_dir", data, "--validation_prompts", prompts, "--placeholder_token", "<concept>",
             "--initializer_token", "circle", "--concept_name", "red circle", "--resolution", "32",
             "--num_inference_steps", "2", "--max_train_steps", "4", "--validation_steps", "2",
             "--train_batch_size", "2", "--clip_model", clip, "--clip_threshold", "-1", "--center_crop",
             "--device", dev, "--output_dir", os.path.join(work, "inversion"), "--quiet"],
            os.path.join(work, "inversion", "summary.json")),
        "tools/attack_prompts.py --attack p4d-n": (
            [os.path.join(ROOT, "tools/attack_prompts.py"), "--attack", "p4d-n", "--pretrained_model_name_or_path",
             sd, "--original_model", sd, "--prompts", prompts, "--criterion", "clip", "--clip_model", clip,
             "--clip_threshold", "1.0", "--num_inference_steps", "2", "--target_inference_steps", "2",
             "--resolution", "32", "--iterations", "4", "--judge_every", "2", "--num_tokens", "2",
             "--heldout_seeds", "1", "--output_dir", os.path.join(work, "attack"), "--quiet"],
            os.path.join(work, "attack", "summary.json")),
    }
    return runs


def measure_tools(world: dict, device) -> List[Row]:
    """Short runs of the tools that train or search on the device, on the tiny model: exit 0 and their outputs."""
    dev = "cuda" if device.type == "cuda" else "cpu"
    log = os.path.join(world["work"], "end_to_end.log")
    rows = []
    for name, (argv, product) in tool_runs(world, dev).items():
        t0 = time.perf_counter()
        proc = _run([sys.executable, *argv], log)
        ok = proc.returncode == 0 and os.path.exists(product)
        rows.append(Row(f"smoke run: {name} on {dev}", f"{time.perf_counter() - t0:.0f} s" if ok else _failure(proc),
                        f"exit 0, {os.path.basename(product)}", verdict(ok)))
    return rows


# ---- the table ---------------------------------------------------------------------------------------------------

def guarded(section: str, measure: Callable[[], List[Row]]) -> List[Row]:
    """The section's rows, or one FAIL row naming its error: one failing measurement still leaves a table."""
    try:
        return measure()
    except Exception as err:  # noqa: BLE001 - reported in the table, the other sections still run
        return [Row(section, f"error: {type(err).__name__}: {' '.join(str(err).split())[:300]}", "-", "FAIL")]


def device_row(accelerator, shapes: Shapes) -> Row:
    """What ran: the device, torch and CUDA versions, the shapes."""
    name = torch.cuda.get_device_name(accelerator.device) if accelerator.device.type == "cuda" else ""
    versions = f"torch {torch.__version__}, CUDA {torch.version.cuda or '-'}, Python {sys.version.split()[0]}"
    return Row("device", f"{accelerator.device} {name}".strip() + f" ({versions})",
               f"{shapes.model}, {shapes.resolution} px, batch {shapes.batch_size}, {accelerator.mixed_precision}",
               data={"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]})


def run_checks(work: str, shapes: Shapes, requested_precision: Optional[str] = None,
               sections: Optional[set] = None) -> List[Row]:
    """Every row of the table, measured on the device the accelerator gets (CUDA when there is one);
    ``sections`` limits it to some of: memory, training, validation, determinism, end_to_end, tools."""
    from common.data import load_training_data
    from common.session import make_accelerator

    wanted = (lambda s: sections is None or s in sections)
    world = build_world(work, shapes)
    dataset = load_training_data(world["data"], None, "prompt")
    accelerator = make_accelerator(requested_precision or shapes.mixed_precision, work, "logs")
    rows = [device_row(accelerator, shapes)]
    if wanted("memory"):
        rows += guarded("peak GPU memory", lambda: measure_memory(accelerator, world, dataset, shapes))
    trained = {}

    def training():
        section, trained["samples_per_s"], trained["trainer"], trained["parts"] = measure_training(
            accelerator, world, dataset, shapes)
        return section

    if wanted("training") or wanted("validation"):
        rows += guarded("training", training)
    if "trainer" in trained and wanted("validation"):
        rows += guarded("validation", lambda: measure_validation(accelerator, trained["parts"], trained["trainer"],
                                                                 shapes))
    for model_part in ("trainer", "parts"):  # the later sections build their own: free these first
        trained.pop(model_part, None)
    if "samples_per_s" in trained and wanted("training"):
        rows += guarded("published-style and bare training",
                        lambda: measure_paths(accelerator, world, dataset, shapes, trained["samples_per_s"]))
    if wanted("determinism"):
        rows += guarded("--deterministic", lambda: measure_determinism(accelerator, world, dataset, shapes,
                                                                       trained.get("samples_per_s")))
    free(accelerator)
    if wanted("end_to_end"):
        rows += guarded("end to end", lambda: measure_end_to_end(world, shapes))
    if wanted("tools"):
        rows += guarded("smoke runs", lambda: measure_tools(world, accelerator.device))
    return rows


def format_table(rows: List[Row]) -> str:
    """The rows as one Markdown table."""
    lines = ["| check | measured | reference | verdict |", "|---|---|---|---|"]
    lines += [f"| {r.check} | {r.measured} | {r.reference} | {r.verdict} |" for r in rows]
    return "\n".join(lines)


SECTIONS = ("memory", "training", "validation", "determinism", "end_to_end", "tools")


def build_parser():
    """The command line's flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog=PROG)
    p.add_argument("--json", default=None, help="also write every row, with its raw figures, to this file")
    p.add_argument("--rehearse", action="store_true",
                   help="without CUDA: run every section on the CPU with the tiny model (the code paths, not the "
                        "figures): what docs/gpu.md's rehearsal of the GPU machine runs")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated sections to run (default: all of {','.join(SECTIONS)})")
    p.add_argument("--work_dir", default=None,
                   help="keep the models, runs and end_to_end.log here (default: a temporary folder, deleted)")
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown or not chosen:
        parser.error(f"--sections {args.sections}: choose among {','.join(SECTIONS)}")
    args.sections = set(chosen)
    return args


def main(args) -> int:
    t0 = time.perf_counter()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported: it reads it then
    missing = missing_packages()
    if missing:
        print(f"{PROG}: missing packages: {', '.join(missing)} (docs/gpu.md: carry them as wheels)",
              file=sys.stderr)
        return 2
    cuda = torch.cuda.is_available()
    if not cuda and not args.rehearse:
        print(f"{PROG}: no CUDA GPU here (torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'}: "
              "torch.cuda.is_available() is False); nothing checked. --rehearse runs the sections on the CPU")
        return 3
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from common.determinism import CUBLAS_WORKSPACE

    for library in (diffusers_logging, transformers_logging):  # one table, not a log of every model load
        library.set_verbosity_error()
        library.disable_progress_bar()
    # Before cuBLAS starts, so the --deterministic runs can be deterministic (the other rows share the setting).
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    shapes = SD14 if cuda else TINY
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or tmp
        os.makedirs(work, exist_ok=True)
        rows = run_checks(work, shapes, sections=args.sections)
    wall = time.perf_counter() - t0
    rows.append(Row("wall time of this check", f"{wall:.0f} s", "under 480 s on an H100" if cuda else "-",
                    verdict(wall < 480) if cuda and args.sections == set(SECTIONS) else "-", data={"seconds": wall}))
    if not cuda:
        rows.insert(1, Row("rehearsal", "no CUDA: the tiny model on the CPU; speeds and memory are not the GPU's"))
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.as_dict() for r in rows], f, indent=2, default=str)
    failed = [r.check for r in rows if r.verdict == "FAIL"]
    if failed:
        print(f"{PROG}: FAIL: {'; '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
