"""From parsed command-line flags to a protocol run: the only module that reads ``args``."""

from __future__ import annotations

import argparse
import os
from typing import Callable, List, Sequence

import torch

from . import cli, criteria
from . import curriculum as cur
from .data import read_prompts
from .errors import InputError, loading
from .models import unet_safetensors
from .protocol import Criterion, ValidationConfig, run_individual, run_sequential
from .session import DataConfig, open_run
from .training import TrainConfig
from .utility import FidConfig


def data_config(args) -> DataConfig:
    return DataConfig(
        train_data_dir=args.train_data_dir, dataset_name=args.dataset_name, caption_column=args.caption_column,
        image_column=args.image_column, dataset_config_name=args.dataset_config_name, cache_dir=args.cache_dir,
        resolution=args.resolution, center_crop=args.center_crop, random_flip=args.random_flip,
        cache_latents=args.cache_latents, row_order="file_name" if args.compat == "reference" else "metadata",
    )


def train_config(args, num_processes: int = 1, compat_reference: bool = False) -> TrainConfig:
    lr = args.learning_rate
    if args.scale_lr:
        lr *= args.train_batch_size * args.gradient_accumulation_steps * num_processes
    return TrainConfig(
        learning_rate=lr, lr_scheduler=args.lr_scheduler, lr_warmup_steps=args.lr_warmup_steps,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_weight_decay=args.adam_weight_decay,
        adam_epsilon=args.adam_epsilon, max_grad_norm=args.max_grad_norm, train_batch_size=args.train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, snr_gamma=args.snr_gamma,
        noise_offset=args.noise_offset, input_perturbation=args.input_perturbation,
        prediction_type=args.prediction_type, params=args.params, use_ema=args.use_ema, ema_decay=args.ema_decay,
        lora_rank=args.lora_rank or TrainConfig.lora_rank, lora_alpha=args.lora_alpha, lora_targets=cli.lora_targets(args.lora_targets),
        gradient_checkpointing=args.gradient_checkpointing, seed=args.seed,
        compat_reference=compat_reference, offload_ema=args.offload_ema, use_8bit_adam=args.use_8bit_adam,
        restore_from_disk=(unet_safetensors(args.pretrained_model_name_or_path, args.variant)
                           if args.restore_from_disk else None),
    )


def validation_config(args) -> ValidationConfig:
    image_dir = os.path.join(args.output_dir, "validation_images") if args.save_validation_images else None
    return ValidationConfig(
        prompts=read_prompts(args.validation_prompts), seed=args.seed,
        num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
        batch_size=args.validation_batch_size, resolution=args.resolution, image_dir=image_dir,
        retention_prompts=read_prompts(args.retention_prompts) if args.retention_prompts else (),
        utility_prompts=read_prompts(args.utility_prompts) if args.utility_prompts else (),
        utility_fid=FidConfig(args.utility_reference, args.fid_features, args.inception_weights, args.kid_subsets,
                              args.kid_subset_size) if args.utility_fid else None,
    )


# The model each kind loads (Q16's prompts file is read at parse time; what can fail here is its CLIP model).
CRITERION_MODEL_FLAGS = {"clip": "--clip_model", "classifier": "--model_path", "q16": "--clip_model",
                         "i2p": "--clip_model"}


def build_criteria(args, device, names: Sequence[str]) -> List[Criterion]:
    """The registered criteria ``names`` (common.criteria) this run uses, built on ``device``; a model that fails
    to load is an InputError naming its flag and file (exit 2)."""
    built = []
    for name in names:
        flag = CRITERION_MODEL_FLAGS.get(name, f"criterion {name}:")
        path = getattr(args, flag[2:], None) if flag.startswith("--") else None
        with loading(flag, path or (f"(--theme {args.theme})" if getattr(args, "theme", "") else "")):
            criterion = criteria.CRITERIA[name].build(args, device)
        if criterion is not None:
            built.append(criterion)
    return built


def one_criterion(args, name: str) -> Callable[[torch.device], List[Criterion]]:
    """The registered criterion ``name`` (common.criteria), built on the run's device: an individual script's one."""
    return lambda device: build_criteria(args, device, [name])


def total_updates(bounds, chunks, epochs_per_chunk: dict, batch: int, accumulation: int, processes: int) -> int:
    """Optimizer updates of a whole run (the progress bar's total): per chunk, updates per epoch x its epochs."""
    sizes = dict(enumerate(b - a for a, b in cur.chunk_ranges(bounds)))
    return sum(cur.updates_per_epoch(sizes[i], batch, accumulation, processes) * epochs_per_chunk[i] for i in chunks)


def _open(args, bounds, horizon_epochs, make_criteria, protocol, progress_total=0, resume_path=None):
    return open_run(
        model_path=args.pretrained_model_name_or_path, revision=args.revision, variant=args.variant,
        requested_precision=args.mixed_precision, allow_tf32=args.allow_tf32, output_dir=args.output_dir,
        logging_dir=args.logging_dir, log_file=args.log_file, bounds=bounds, data=data_config(args),
        train=train_config(args, int(os.environ.get("WORLD_SIZE", "1")),
                           compat_reference=protocol == "individual" and args.compat == "reference"),
        horizon_epochs=horizon_epochs, validation=validation_config(args), make_criteria=make_criteria,
        config_record={"script": args.script, "protocol": protocol, "args": vars(args),
                       "tags": cli.parse_tags(args.tag)},
        report_to=args.report_to, progress_total=progress_total, retention_clip=args.clip_model,
        deterministic=args.deterministic,
        resume_path=resume_path,  # checked against this run's settings before anything is written
    )


def _resume_path(args):
    """The checkpoint to resume from (None: a fresh start), resolved before the run opens (open_run checks it)."""
    from .checkpointing import resolve_resume

    return resolve_resume(args.resume_from_checkpoint, args.output_dir)


def _checkpointing(args, run, resume):
    """The run's Checkpointer; a fresh start (``resume`` None) voids the results of a run that never checkpointed."""
    from .checkpointing import Checkpointer

    checkpointer = Checkpointer(run.accelerator, run.trainer, args.output_dir, args.checkpointing_steps,
                                args.checkpoints_total_limit, log=run.recorder.log, run_config=run.recorder.run_config)
    if resume is None:
        run.recorder.keep_validations(0)  # a fresh start: results of a run that never checkpointed are void
    return checkpointer


INPUT_ERROR_EXIT_CODE = 2  # bad input (argparse's status)
DIVERGED_EXIT_CODE = 3
LOCKED_EXIT_CODE = 2  # another run holds the output directory: bad input, like the other status-2 errors
WRITE_FAILED_EXIT_CODE = 4  # a checkpoint, pipeline or results file could not be written (full disk)


def _exit_codes(fn):
    """Decorator: a diverged run exits 3, a locked output directory or bad input found while loading 2, a failed
    write 4; one line on stderr each, on every process."""
    import functools

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        import sys

        from .results import WriteFailed
        from .runlock import RunLocked
        from .training import NonFiniteLoss

        codes = {NonFiniteLoss: DIVERGED_EXIT_CODE, RunLocked: LOCKED_EXIT_CODE, WriteFailed: WRITE_FAILED_EXIT_CODE}
        try:
            return fn(*a, **kw)
        except InputError as err:  # the same line and status as the flags' own checks (common.cli.finish)
            print(f"{getattr(a[0], 'script', 'error')}: error: {err}", file=sys.stderr, flush=True)
            raise SystemExit(INPUT_ERROR_EXIT_CODE) from None
        except tuple(codes) as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            raise SystemExit(next(code for cls, code in codes.items() if isinstance(err, cls))) from None

    return wrapper


@_exit_codes
def individual(args: argparse.Namespace, make_criteria: Callable[[torch.device], List[Criterion]]) -> list:
    """Run the individual protocol (docs/protocols.md) with the given criterion."""
    bounds = cur.parse_curriculum(args.curriculum)
    chunks = cur.select_chunks(len(bounds), args.start_CL, args.end_CL)
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    cap = total_updates(bounds, chunks, {i: args.clip_epoch + 2 for i in chunks}, args.train_batch_size,
                        args.gradient_accumulation_steps, processes)
    resume = _resume_path(args)
    run = _open(args, bounds, args.clip_epoch + 2, make_criteria, "individual", progress_total=cap, resume_path=resume)
    checkpointer = _checkpointing(args, run, resume)
    criterion = run.validator.criteria[0]
    save = (lambda i: run.save_pipeline(os.path.join(args.output_dir, f"curriculum-{i}"))) if args.save_model else None
    try:
        with checkpointer.divergence_recorded():
            outcomes = run_individual(
                trainer=run.trainer, dataset=run.dataset, chunk_rows=run.chunk_rows, chunks=chunks,
                criterion=criterion, validator=run.validator, recorder=run.recorder,
                validation_epochs=args.validation_epochs,
                max_epoch=args.clip_epoch, compat_reference=args.compat == "reference", save_chunk=save,
                summary_extra={"script": args.script, "compat": args.compat,
                               "num_processes": run.accelerator.num_processes},
                checkpointer=checkpointer, resume_path=resume, early_stop=not args.no_early_stop,
            )
        for o in outcomes:
            run.recorder.log(f"chunk {o.chunk}: " + (f"revived at epoch {o.revival_epoch}" if o.revived
                             else f"not revived within {o.epochs_trained} epochs"))
    finally:
        if run.trainer.progress is not None:
            run.trainer.progress.close()  # ends the bar's line: an error message then starts a line of its own
        run.accelerator.end_training()
        run.recorder.close()
    return outcomes


def sequential_epochs(args, chunks) -> dict:
    """Epochs per chunk: --chunk_epochs "8,8,4,..." (one per curriculum chunk) or --num_train_epochs for all."""
    values = cur.epochs_per_chunk(args.chunk_epochs, args.num_train_epochs,
                                  len(cur.parse_curriculum(args.curriculum)))
    return {i: values[i] for i in chunks}


@_exit_codes
def sequential(args: argparse.Namespace) -> dict:
    """Run the sequential protocol (docs/protocols.md) with CLIP and (when given) the classifier."""
    bounds = cur.parse_curriculum(args.curriculum)
    chunks = cur.select_chunks(len(bounds), args.start_CL, args.end_CL)
    epochs = sequential_epochs(args, chunks)
    checkpoints = cur.parse_chunk_list(args.curriculum_checkpoints, len(bounds), "--curriculum_checkpoints")
    with_classifier = criteria.uses_classifier(args)
    # Every registered criterion the run's flags ask for (CLIP always; the classifier with --model_path).
    total = total_updates(bounds, chunks, epochs, args.train_batch_size, args.gradient_accumulation_steps,
                          int(os.environ.get("WORLD_SIZE", "1")))
    resume = _resume_path(args)
    kinds = [name for name, kind in criteria.CRITERIA.items() if kind.build is not None]  # as criteria.build_all
    run = _open(args, bounds, sum(epochs.values()), lambda device: build_criteria(args, device, kinds), "sequential",
                progress_total=total, resume_path=resume)
    checkpointer = _checkpointing(args, run, resume)
    if not with_classifier:
        names = [c.name for c in run.validator.criteria]
        run.recorder.log("no --model_path given: running with the CLIP criterion only" if names == ["clip"] else
                         f"no --model_path given: running with the criteria {', '.join(names)}")
    try:
        with checkpointer.divergence_recorded():
            summary = run_sequential(
                trainer=run.trainer, dataset=run.dataset, chunk_rows=run.chunk_rows, chunks=chunks,
                epochs_per_chunk=epochs, criteria=run.validator.criteria, validator=run.validator,
                recorder=run.recorder, checkpoint_chunks=checkpoints,
                save_chunk=(lambda i: run.save_pipeline(os.path.join(args.output_dir, f"curriculum-{i}")))
                if args.save_model else None,
                stop_at_revival=args.stop_at_revival,
                summary_extra={"script": args.script, "num_processes": run.accelerator.num_processes,
                               "epochs_per_chunk": epochs, "classifier": with_classifier},
                checkpointer=checkpointer, resume_path=resume,
            )
        # The final pipeline (EMA weights under --use_ema) in the output directory itself.
        if args.save_model:
            run.save_pipeline(args.output_dir, ema_as_unet=args.use_ema)
        else:
            run.recorder.log("--save_model False: no pipeline saved (neither curriculum-{i} nor the final model)")
        for name, point in summary["revival_point"].items():
            run.recorder.log(f"Revival Point ({name}): " + (f"chunk {point['chunk']}, {point['images_seen']} images"
                                                           if point else "not reached"))
    finally:
        if run.trainer.progress is not None:
            run.trainer.progress.close()  # ends the bar's line: an error message then starts a line of its own
        run.accelerator.end_training()
        run.recorder.close()
    return summary
