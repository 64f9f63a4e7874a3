#!/usr/bin/env python
"""Check on one CUDA GPU what a CPU cannot show: memory, speed, fp16 skips, determinism and dtypes, in one table.

    python tools/gpu_check.py                  # one GPU, a few minutes (under 8); prints one table
    python tools/gpu_check.py --json out.json  # the rows as JSON too

The model is a randomly initialised one of Stable Diffusion 1.4's shapes (UNet
860M, CLIP-L text encoder; tools/benchmark.py --sd14 builds it), trained at
512 px, fp16, batch 10, on drawn shapes (latent cache, centre crop, flips).
The table's rows:

- peak ``torch.cuda.max_memory_allocated`` of two training updates with the
  default levers (``--use_ema``) and with the leanest combination
  (``--gradient_checkpointing --offload_ema --use_8bit_adam``; without
  bitsandbytes the 8-bit optimizer is left out and the row says so), beside
  the memory budget common/memory.py predicts before activations;
- training samples/s and validation images/s (10 prompts batched, 20 guided
  steps) against one H100's compute limits as docs/performance.md states them
  (~330 samples/s, ~23 images/s at ~800 TFLOP/s dense fp16; target >= 30%);
- updates the fp16 GradScaler skipped among the first 50;
- determinism: two runs under ``--deterministic`` give bit-equal weights, and
  what it costs in training speed;
- the fp16 set-up: trainable parameters fp32, frozen text encoder and VAE fp16,
  autocast active in the UNet's forward, a GradScaler present.

Without CUDA it says so in one line and exits 0. Its measuring functions take a
device and a ``Shapes``; tests/test_gpu_check.py runs them on the CPU with the
tiny model (where the limits and the fp16 rows do not apply).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

# docs/performance.md: one H100 at ~800 TFLOP/s dense fp16; a 512-px SD-1.x sample costs 2.41 TFLOP for the UNet's
# forward+backward (-> ~330 samples/s), a 20-step guided validation image ~35 TFLOP (-> ~23 images/s).
TRAINING_LIMIT = 330.0  # samples/s
VALIDATION_LIMIT = 23.0  # images/s
TARGET_SHARE = 0.30  # docs/performance.md's goal: at least 30% of those limits


@dataclass(frozen=True)
class Shapes:
    """What the check trains and generates; SD14 is the GPU check, TINY the CPU test's stand-in."""

    model: str = "sd14"  # "sd14" (random weights, SD 1.4's shapes) or "tiny" (tools/tiny.py)
    resolution: int = 512
    batch_size: int = 10
    mixed_precision: str = "fp16"
    images: int = 100  # dataset rows (drawn shapes)
    memory_updates: int = 2  # updates per lever combination whose peak is measured
    skip_window: int = 50  # the first updates, among which fp16 skips are counted
    timed_updates: int = 20  # training updates timed after the skip window (its warm-up)
    determinism_updates: int = 5  # updates per determinism run
    prompts: int = 10
    inference_steps: int = 20

    @property
    def limits_apply(self) -> bool:
        """The README's compute limits are for SD-1.x at 512 px in fp16."""
        return self.model == "sd14" and self.resolution == 512 and self.mixed_precision == "fp16"


SD14 = Shapes()
TINY = Shapes(model="tiny", resolution=32, batch_size=2, mixed_precision="no", images=8, memory_updates=1,
              skip_window=3, timed_updates=2, determinism_updates=2, prompts=2, inference_steps=2)


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


def build_world(work: str, shapes: Shapes) -> tuple:
    """The model (random weights) and a dataset of drawn shapes at the check's resolution: (model_dir, data_dir)."""
    from tools import tiny

    tok = tiny.write_clip_tokenizer(os.path.join(work, "tokenizer"))
    if shapes.model == "sd14":
        from tools.benchmark import build_sd14

        model_dir = build_sd14(os.path.join(work, "sd14"))
    else:
        model_dir = tiny.build_tiny_sd(os.path.join(work, "sd"), resolution=shapes.resolution, tokenizer=tok)
    data_dir = tiny.shapes_dataset(os.path.join(work, "data"), [("red", "circle"), ("blue", "square")],
                                   per_concept=-(-shapes.images // 2), size=shapes.resolution)
    return model_dir, data_dir


def free(accelerator) -> None:
    """Drop accelerate's references to prepared models and optimizers and return the memory (between trainers)."""
    accelerator.free_memory()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def new_trainer(accelerator, model_dir: str, shapes: Shapes, **train):
    """A ChunkTrainer on fresh model parts (the frozen ones in the run's weight dtype), chunk 0 begun."""
    from common.data import ImageTransform
    from common.encoding import make_encoder
    from common.models import load_sd_parts, weight_dtype_for
    from common.training import ChunkTrainer, TrainConfig

    device, dtype = accelerator.device, weight_dtype_for(accelerator.mixed_precision)
    parts = load_sd_parts(model_dir)
    parts.text_encoder.to(device, dtype=dtype)
    parts.vae.to(device, dtype=dtype)
    encoder = make_encoder(parts, ImageTransform(shapes.resolution, center_crop=True, random_flip=True), device,
                           dtype, cache=True)
    cfg = TrainConfig(learning_rate=1e-5, train_batch_size=shapes.batch_size, **train)
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
    done, epoch = 0, 0
    while done < updates:
        trainer.train_epoch(dataset, rows, 0, epoch, on_update=(lambda n, loss: on_update()) if on_update else None)
        done, epoch = done + per_epoch, epoch + 1
    return done


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _bitsandbytes() -> bool:
    import importlib.util

    return torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None


LEVERS = (  # (row name, TrainConfig levers); the leanest drops 8-bit Adam where bitsandbytes cannot run
    ("default (--use_ema)", {"use_ema": True}),
    ("leanest (--gradient_checkpointing --offload_ema --use_8bit_adam)",
     {"use_ema": True, "gradient_checkpointing": True, "offload_ema": True, "use_8bit_adam": True}),
)


def measure_memory(accelerator, model_dir: str, dataset, shapes: Shapes) -> List[Row]:
    """Per lever combination: the budget before activations (common/memory.py), and on CUDA the measured peak
    of ``memory_updates`` training updates (the latent cache encoded before the peak window opens)."""
    from common.memory import GB, memory_budget, peak_record, reset_peak

    rows = []
    for name, levers in LEVERS:
        if levers.get("use_8bit_adam") and not _bitsandbytes():
            levers = {k: v for k, v in levers.items() if k != "use_8bit_adam"}
            name = name.replace(" --use_8bit_adam", "") + " [no bitsandbytes/CUDA: 8-bit Adam left out]"
        free(accelerator)
        trainer, parts = new_trainer(accelerator, model_dir, shapes, **levers)
        rng = row_range(shapes, shapes.memory_updates)
        budget = memory_budget(trainer, parts, largest_chunk=rng[1] - rng[0])
        trainer.encoder.prepare(dataset, rng)
        _sync(accelerator.device)
        reset_peak(accelerator.device)
        train_updates(trainer, dataset, shapes, shapes.memory_updates)
        peak = peak_record(accelerator.device)
        measured = f"{peak['peak_gpu_bytes'] / GB:.2f} GiB" if peak else "n/a (no CUDA)"
        predicted = budget["accelerator_bytes_before_activations"]
        rows.append(Row(f"peak GPU memory, {name}", measured, f"budget before activations {predicted / GB:.2f} GiB",
                        data={"peak_bytes": peak["peak_gpu_bytes"] if peak else None, "budget_bytes": predicted,
                              "host_bytes": budget["host_bytes"], "levers": levers}))
        trainer = parts = None
    free(accelerator)
    return rows


def _share_row(check: str, value: float, limit: float, unit: str, applies: bool) -> Row:
    if not applies:
        return Row(check, f"{value:.2f} {unit}")
    share = value / limit
    return Row(check, f"{value:.2f} {unit} ({share:.0%} of the limit)",
               f"limit ~{limit:.0f} {unit}, target >= {TARGET_SHARE:.0%}", "ok" if share >= TARGET_SHARE else "FAIL")


def measure_training(accelerator, model_dir: str, dataset, shapes: Shapes) -> tuple:
    """fp16 skips among the first ``skip_window`` updates, then samples/s of ``timed_updates`` more, and the
    fp16 set-up seen in those updates. Returns (rows, samples/s, trainer, parts): validation reuses the model."""
    free(accelerator)
    trainer, parts = new_trainer(accelerator, model_dir, shapes)
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
    _sync(accelerator.device)
    t0 = time.perf_counter()
    done = train_updates(trainer, dataset, shapes, shapes.timed_updates)
    _sync(accelerator.device)
    samples_per_s = done * shapes.batch_size / (time.perf_counter() - t0)
    fp16 = shapes.mixed_precision == "fp16"
    rows = [
        _share_row("training speed (cached latents)", samples_per_s, TRAINING_LIMIT, "samples/s",
                   shapes.limits_apply),
        Row(f"fp16 updates skipped in the first {window}", skipped[0], "a few at most (the scaler's first scales)",
            "ok" if skipped[0] <= max(1, window // 10) else "FAIL"),
    ]
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

    def verdict(ok: bool) -> str:
        return "ok" if ok else "FAIL"

    return [
        Row("trainable parameters dtype", ",".join(trainable), "float32", verdict(trainable == ["float32"])),
        Row("frozen text encoder + VAE dtype", ",".join(frozen), "float16" if fp16 else "float32",
            verdict(frozen == ["float16" if fp16 else "float32"])),
        Row("autocast in the UNet forward", autocast_text, "on, float16" if fp16 else "off",
            verdict(autocast_text == ("on, float16" if fp16 else "off"))),
        Row("GradScaler", type(scaler).__name__ if scaler is not None else "none",
            "GradScaler" if fp16 else "none", verdict((scaler is not None) == fp16)),
    ]


def measure_validation(accelerator, parts, trainer, shapes: Shapes) -> List[Row]:
    """Images/s of one batched validation (all prompts in one batch, guided) after a warm-up one."""
    from common.validation import build_pipeline, generate_images, image_seed
    from tools import tiny

    pipe = build_pipeline(parts, accelerator.unwrap_model(trainer.unet))
    prompts = [f"a {c} {s}" for c, s in zip(list(tiny.COLOURS) * 3, tiny.SHAPES * 4)][: shapes.prompts]
    seeds = [image_seed(0, k) for k in range(len(prompts))]

    def generate():
        return generate_images(pipe, prompts, seeds, len(prompts), num_inference_steps=shapes.inference_steps,
                               guidance_scale=7.5, resolution=shapes.resolution, autocast=accelerator.autocast)

    generate()
    _sync(accelerator.device)
    t0 = time.perf_counter()
    images = generate()
    _sync(accelerator.device)
    per_s = len(images) / (time.perf_counter() - t0)
    return [_share_row(f"validation speed ({len(prompts)} prompts batched, {shapes.inference_steps} steps)", per_s,
                       VALIDATION_LIMIT, "images/s", shapes.limits_apply)]


def measure_determinism(accelerator, model_dir: str, dataset, shapes: Shapes,
                        default_samples_per_s: Optional[float] = None) -> List[Row]:
    """Two runs of ``determinism_updates`` updates under --deterministic from the same seed: bit-equal weights?
    And their speed against ``default_samples_per_s`` (the cost of --deterministic)."""
    from common.determinism import deterministic

    weights, speeds = [], []
    with deterministic(True):
        for _ in range(2):
            free(accelerator)
            trainer, parts = new_trainer(accelerator, model_dir, shapes)
            trainer.encoder.prepare(dataset, row_range(shapes, shapes.determinism_updates))
            _sync(accelerator.device)
            t0 = time.perf_counter()
            done = train_updates(trainer, dataset, shapes, shapes.determinism_updates)
            _sync(accelerator.device)
            speeds.append(done * shapes.batch_size / (time.perf_counter() - t0))
            weights.append([p.detach().to("cpu", copy=True) for p in trainer.trainable])
            trainer = parts = None
    free(accelerator)
    diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(*weights))
    equal = all(torch.equal(a, b) for a, b in zip(*weights))
    rows = [Row(f"--deterministic: two runs of {shapes.determinism_updates} updates, same seed",
                "bit-equal weights" if equal else f"weights differ (max |diff| {diff:.3g})", "bit-equal weights",
                "ok" if equal else "FAIL")]
    if default_samples_per_s:
        rows.append(Row("--deterministic training speed", f"{max(speeds):.2f} samples/s",
                        f"{max(speeds) / default_samples_per_s:.0%} of the default's {default_samples_per_s:.2f}"))
    return rows


def guarded(section: str, measure: Callable[[], List[Row]]) -> List[Row]:
    """The section's rows, or one FAIL row naming its error: one failing measurement still leaves a table."""
    try:
        return measure()
    except Exception as err:  # noqa: BLE001 - reported in the table, the other sections still run
        return [Row(section, f"error: {type(err).__name__}: {' '.join(str(err).split())[:300]}", "-", "FAIL")]


def run_checks(work: str, shapes: Shapes, requested_precision: Optional[str] = None) -> List[Row]:
    """Every row of the table, measured on the device the accelerator gets (CUDA when there is one)."""
    from common.data import load_training_data
    from common.session import make_accelerator

    model_dir, data_dir = build_world(work, shapes)
    dataset = load_training_data(data_dir, None, "prompt")
    accelerator = make_accelerator(requested_precision or shapes.mixed_precision, work, "logs")
    rows = [Row("device", f"{accelerator.device} "
                + (torch.cuda.get_device_name(accelerator.device) if accelerator.device.type == "cuda" else ""),
                f"{shapes.model}, {shapes.resolution} px, batch {shapes.batch_size}, {accelerator.mixed_precision}")]
    rows += guarded("peak GPU memory", lambda: measure_memory(accelerator, model_dir, dataset, shapes))
    trained = {}

    def training():
        section, trained["samples_per_s"], trained["trainer"], trained["parts"] = measure_training(
            accelerator, model_dir, dataset, shapes)
        return section

    rows += guarded("training", training)
    if "trainer" in trained:
        rows += guarded("validation speed",
                        lambda: measure_validation(accelerator, trained["parts"], trained["trainer"], shapes))
    trained.pop("trainer", None), trained.pop("parts", None)
    rows += guarded("--deterministic", lambda: measure_determinism(accelerator, model_dir, dataset, shapes,
                                                                   trained.get("samples_per_s")))
    return rows


def format_table(rows: List[Row]) -> str:
    """The rows as one Markdown table."""
    lines = ["| check | measured | reference | verdict |", "|---|---|---|---|"]
    lines += [f"| {r.check} | {r.measured} | {r.reference} | {r.verdict} |" for r in rows]
    return "\n".join(lines)


def build_parser():
    """The command line's flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="gpu_check.py")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def main(args) -> int:
    if not torch.cuda.is_available():
        print("gpu_check.py: no CUDA GPU on this machine (torch.cuda.is_available() is False); nothing to check")
        return 0
    from common.determinism import CUBLAS_WORKSPACE

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Before cuBLAS starts, so the --deterministic runs can be deterministic (the other rows share the setting).
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        rows = run_checks(work, SD14)
    rows.append(Row("wall time of this check", f"{time.perf_counter() - t0:.0f} s", "under 480 s"))
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.as_dict() for r in rows], f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
