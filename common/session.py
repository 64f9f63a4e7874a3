"""Wiring of one fine-tuning run: accelerator, model parts, data, trainer, validator, outputs.

Shared by the individual and sequential scripts so that each script's body is
its protocol and nothing else.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
from tqdm.auto import tqdm

from .checkpointing import check_resume_settings
from .curriculum import check_against_dataset, chunk_ranges
from .data import ImageTransform, load_training_data
from .encoding import make_encoder
from .memory import budget_lines, memory_budget
from .models import SDParts, cast_frozen, load_sd_parts
from . import numerics
from .precision import amp_mode, effective_mixed_precision, weight_dtype_for
from .protocol import Criterion, ValidationConfig, Validator
from .errors import loading
from .results import RunRecorder
from .runlock import lock_run_dir
from .tracking import Tracking, log_with
from .training import ChunkTrainer, TrainConfig
from .validation import build_pipeline


@dataclass(frozen=True)
class DataConfig:
    """Where the fine-tuning images come from and how they are prepared."""

    train_data_dir: Optional[str]
    dataset_name: Optional[str]
    caption_column: str = "prompt"
    image_column: str = "image"
    dataset_config_name: Optional[str] = None
    cache_dir: Optional[str] = None
    resolution: int = 512
    center_crop: bool = False
    random_flip: bool = False
    cache_latents: bool = True  # encode each chunk once (needs center_crop)
    row_order: str = "metadata"  # or "file_name": sorted image paths, as datasets 3.0.1 (--compat reference)


@dataclass
class Run:
    accelerator: object
    parts: SDParts
    dataset: object
    chunk_rows: dict
    trainer: ChunkTrainer
    validator: Validator
    recorder: RunRecorder
    model_path: str = ""  # the unlearned model, which a LoRA folder names as its base

    def save_pipeline(self, path: str, ema_as_unet: bool = False) -> None:
        """Save the current UNet (and EMA copy) as a full pipeline, or with --params lora the adapter in
        diffusers' LoRA format beside the name of its base; main process only, others wait."""
        from .models import save_lora, save_pipeline
        from .results import writing, written_together

        acc = self.accelerator
        unet = acc.unwrap_model(self.trainer.unet)
        with written_together(acc):  # a failed save stops every process, not the main one only
            if acc.is_main_process:
                with writing("pipeline", path):  # atomic: a failed save leaves no partial pipeline
                    if self.trainer.cfg.params == "lora":
                        save_lora(unet, path, self.model_path, ema=self.trainer.ema,
                                  trainable=self.trainer.trainable)
                    else:
                        save_pipeline(self.parts, unet, path, ema=self.trainer.ema, trainable=self.trainer.trainable,
                                      ema_as_unet=ema_as_unet)


def retention_scorer(criteria: Sequence[Criterion], clip_model: Optional[str], device):
    """CLIP cosine of each image with its own prompt for the retention prompts and utility captions: the run's CLIP
    criterion's scorer when it has one (one CLIP model in memory), else ``clip_model`` loaded for it."""
    clip = next((c for c in criteria if c.name == "clip"), None)
    if clip is not None:
        return clip.score_images
    from .criteria import clip_scorer

    return clip_scorer(clip_model, device).score  # the shared instance: --utility_fid's CLIP features use it too


def _utility_fid(validation: ValidationConfig, clip_model: Optional[str], output_dir: str, acc):
    """--utility_fid's extractor (CLIP features: the run's one CLIP model) and, on the main process, the reference
    features, read or computed and cached under OUTPUT_DIR/utility/reference_stats/ (common/utility.py)."""
    from .criteria import clip_scorer
    from .utility import CLIP_FEATURES, validation_fid

    cfg = validation.utility_fid
    with loading("--clip_model", clip_model):
        scorer = clip_scorer(clip_model, acc.device) if cfg.features == CLIP_FEATURES else None
    return validation_fid(cfg, scorer, validation.resolution, output_dir, acc.device, validation.seed,
                          acc.is_main_process)


def make_accelerator(requested_precision: Optional[str], output_dir: str, logging_dir: str, allow_tf32: bool = False,
                     log_with: Optional[str] = None, deterministic: bool = False):
    """An Accelerator with our precision policy (fp16 without CUDA -> fp32, warned once, unless emulated: see
    common/precision.py), the run's trackers, DDP's gradients as views of its buckets, and --deterministic."""
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    from . import precision
    from .determinism import set_deterministic

    # Before any CUDA work: cuBLAS reads its workspace setting when it starts.
    set_deterministic(deterministic)
    requested = requested_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    mixed = effective_mixed_precision(requested, warn=int(os.environ.get("RANK", "0")) == 0)
    precision.set_tf32(allow_tf32)
    project = ProjectConfiguration(project_dir=output_dir, logging_dir=os.path.join(output_dir, logging_dir))
    # Several processes: the gradients live in DDP's all-reduce buckets instead of beside them (one copy of the
    # trainable parameters' size less; common/memory.py counts the buckets).
    ddp = DistributedDataParallelKwargs(gradient_as_bucket_view=True)
    return precision.make_accelerator(mixed, project_config=project, log_with=log_with, kwargs_handlers=[ddp])


def open_run(
    *,
    model_path: str,
    revision: Optional[str],
    variant: Optional[str],
    requested_precision: Optional[str],
    allow_tf32: bool,
    output_dir: str,
    logging_dir: str,
    log_file: Optional[str],
    bounds: Sequence[int],
    data: DataConfig,
    train: TrainConfig,
    horizon_epochs: int,
    validation: ValidationConfig,
    make_criteria: Callable[[torch.device], List[Criterion]],
    config_record: dict,
    report_to: str = "none",
    progress_total: int = 0,
    retention_clip: Optional[str] = None,
    deterministic: bool = False,
    resume_path: Optional[str] = None,
) -> Run:
    """Build everything a protocol needs, in the order that fails fastest."""
    acc = make_accelerator(requested_precision, output_dir, logging_dir, allow_tf32, log_with(report_to),
                           deterministic=deterministic)
    # Everything that can refuse the run (a checkpoint it cannot continue, data, models: InputError, exit 2) comes
    # before the output directory is written; the log lines of that stage wait in ``notes``.
    notes = check_resume_settings(resume_path, {
        "mixed_precision": acc.mixed_precision, "num_processes": acc.num_processes, "params": train.params,
        "train_batch_size": train.train_batch_size, "gradient_accumulation_steps": train.gradient_accumulation_steps,
    }, scaler_expected=getattr(acc, "scaler", None) is not None)
    weight_dtype = weight_dtype_for(acc.mixed_precision)
    # Data before models: a bad dataset should not cost a model load.
    dataset = load_training_data(data.train_data_dir, data.dataset_name, data.caption_column, data.image_column,
                                 data.dataset_config_name, data.cache_dir, data.row_order)
    if data.train_data_dir is not None:
        notes.append("row order: " + ("sorted image paths (datasets 3.0.1's imagefolder, as published)"
                                      if data.row_order == "file_name" else "metadata.jsonl line order"))
    check_against_dataset(bounds, len(dataset))
    chunk_rows = dict(enumerate(chunk_ranges(bounds)))
    with loading("--pretrained_model_name_or_path", model_path):
        parts = load_sd_parts(model_path, revision, variant)
    cast_frozen(parts, acc.device, weight_dtype)
    transform = ImageTransform(data.resolution, data.center_crop, data.random_flip)
    encoder = make_encoder(parts, transform, acc.device, weight_dtype, data.cache_latents)
    if data.cache_latents and not data.center_crop:
        notes.append("latent cache off: random crops (no --center_crop) are re-encoded every step")
    largest = max(b - a for a, b in chunk_rows.values())
    per_epoch = -(-largest // (train.train_batch_size * train.gradient_accumulation_steps * acc.num_processes))
    trainer = ChunkTrainer(acc, parts, encoder, train, horizon_updates=per_epoch * horizon_epochs)
    pipe = build_pipeline(parts, acc.unwrap_model(trainer.unet))
    criteria = make_criteria(acc.device)
    with loading("--clip_model", retention_clip):
        retention = (retention_scorer(criteria, retention_clip, acc.device)
                     if validation.retention_prompts or validation.utility_prompts else None)
    validator = Validator(acc, pipe, validation, criteria, retention)
    # One run per output directory, before anything is written there (RunLocked: exit 2 on every process).
    lock_run_dir(acc, output_dir)
    if validation.utility_fid is not None:
        validator.fid = _utility_fid(validation, retention_clip, output_dir, acc)
        if acc.is_main_process:  # the only one holding the reference
            notes.append(f"utility FID/KID: {validator.fid.extractor.name} features, reference "
                         f"{validator.fid.reference_path} ({len(validator.fid.reference)} images)")
    recorder = RunRecorder(output_dir, acc.is_main_process, log_file, accelerator=acc)
    for line in notes:
        recorder.log(line)
    # Where the memory goes, from the run's own tensors (activations: the per-chunk CUDA peak in the records).
    budget = memory_budget(trainer, parts, largest_chunk=largest, criteria=criteria, retention=retention)
    for line in budget_lines(budget):
        recorder.log(line)
    config = {**config_record, "num_processes": acc.num_processes, "mixed_precision": acc.mixed_precision,
              "amp": amp_mode(acc),
              "device": str(acc.device), "scored_weights": "trained UNet (not EMA)", "memory_budget": budget,
              "numeric_environment": numerics.describe(),
              "resolved": {"learning_rate": train.learning_rate, "num_processes": acc.num_processes,
                           "mixed_precision": acc.mixed_precision,
                           "global_batch": train.train_batch_size * train.gradient_accumulation_steps
                           * acc.num_processes}}
    recorder.write_config(config)
    hparams = {**config_record.get("args", {}), **{f"resolved_{k}": v for k, v in config["resolved"].items()}}
    recorder.tracking = Tracking(acc, config_record.get("script", "run").replace(".py", ""), hparams,
                                 enabled=log_with(report_to) is not None)
    recorder.run_config = config
    if acc.is_main_process and progress_total:
        # One bar over the run's optimizer updates (for the individual protocol, up to its epoch cap).
        trainer.progress = tqdm(total=progress_total, desc="updates", unit="update", dynamic_ncols=True)
    return Run(acc, parts, dataset, chunk_rows, trainer, validator, recorder, model_path)
