"""Flags shared by the scripts, validated before any model loads (docs/protocols.md: robustness).

Flag names follow the reference scripts and diffusers' train_text_to_image.py,
so the seed README's command lines work as written.
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Iterable, Optional

from . import curriculum as cur
from . import nudity, tracking
from .classifier import DEFAULT_PROCESSOR, DEFAULT_TIMM_ARCH, check_classifier
from .clip_score import DEFAULT_CLIP, check_clip_spec
from .data import read_metadata, read_prompts
from .errors import InputError, Parser  # noqa: F401 (Parser: the scripts' cli.Parser)
from .models import check_pipeline_dir, resolve_model_path, unet_safetensors
from .training import LORA_RANK, LORA_TARGETS
from .utility import add_validation_fid_options, check_validation_fid

LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


def str2bool(value) -> bool:
    """Parse 'True/False', 'yes/no', '1/0' (case-insensitive) as a real boolean; the reference's type=bool made 'False' true."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "t", "yes", "y", "1", "on"):
        return True
    if text in ("false", "f", "no", "n", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (True/False), got {value!r}")


def training_parser(prog: str, doc: str, clip: bool = True) -> Parser:
    """The flags every fine-tuning script shares: model, data, training, validation, outputs."""
    parser = Parser(description=doc.split("\n\n")[0], prog=prog)
    add_model_args(parser)
    add_data_args(parser)
    add_training_args(parser)
    add_validation_args(parser, clip=clip)
    add_output_args(parser)
    return parser


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", required=True,
                   help="the unlearned model: a diffusers Stable Diffusion directory (or hub id)")
    g.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) of the model")
    g.add_argument("--variant", default=None, help="weights variant such as fp16")
    g.add_argument("--cache_dir", default=None, help="Hugging Face cache directory for hub ids and datasets")


def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training data (row order = curriculum order)")
    g.add_argument("--train_data_dir", default=None,
                   help="imagefolder directory whose metadata.jsonl lines give the row order and captions")
    g.add_argument("--dataset_name", default=None, help="a datasets dataset instead of --train_data_dir")
    g.add_argument("--dataset_config_name", default=None, help="configuration of --dataset_name")
    g.add_argument("--image_column", default="image", help="image field of the dataset")
    g.add_argument("--caption_column", default="prompt", help="caption field (the paper's data uses 'prompt')")
    g.add_argument("--resolution", type=int, default=512,
                   help="training and validation image size in pixels (a multiple of 8; SD-1.x: 512)")
    g.add_argument("--center_crop", action="store_true", help="centre crop (default: random crop)")
    g.add_argument("--random_flip", action="store_true", help="flip training images horizontally at random")
    g.add_argument("--cache_latents", type=str2bool, default=True,
                   help="encode each chunk's images and captions once with the frozen VAE/text encoder "
                        "(True/False; needs --center_crop; False saves memory)")
    g.add_argument("--curriculum", required=True, help="cumulative chunk boundaries, e.g. '50,100,...,500'")
    g.add_argument("--start_CL", type=int, default=None, help="first chunk index (inclusive)")
    g.add_argument("--end_CL", type=int, default=None, help="last chunk index (exclusive)")


def add_training_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--train_batch_size", type=int, default=10, help="per process")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1,
                   help="micro-batches per optimizer update (global batch = batch x this x processes)")
    g.add_argument("--gradient_checkpointing", action="store_true",
                   help="recompute UNet activations in the backward pass: less memory, one more forward pass of compute")
    g.add_argument("--learning_rate", type=float, default=1e-5, help="AdamW learning rate (the paper: 1e-5)")
    g.add_argument("--scale_lr", action="store_true",
                   help="multiply the learning rate by batch x accumulation x processes")
    g.add_argument("--lr_scheduler", default="constant", choices=LR_SCHEDULERS,
                   help="diffusers' get_scheduler; restarted with every chunk of the individual protocol")
    g.add_argument("--lr_warmup_steps", type=int, default=0, help="in optimizer updates")
    g.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2")
    g.add_argument("--adam_weight_decay", type=float, default=1e-2, help="AdamW (decoupled) weight decay")
    g.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon")
    g.add_argument("--max_grad_norm", type=float, default=1.0,
                   help="clip the gradient's global norm to this (0: no clipping)")
    g.add_argument("--use_ema", action="store_true", help="keep an EMA of the UNet; saved as unet_ema/")
    g.add_argument("--offload_ema", action="store_true",
                   help="with --use_ema: keep the EMA copy in (pinned) host memory, moved to the GPU only for its "
                        "update (saves one UNet copy of GPU memory; same weights)")
    g.add_argument("--restore_from_disk", action="store_true",
                   help="restore the unlearned weights before each chunk from the model's own UNet safetensors "
                        "(memory-mapped) instead of a copy in host memory (saves one UNet copy of RAM)")
    g.add_argument("--use_8bit_adam", action="store_true",
                   help="bitsandbytes' 8-bit AdamW (CUDA; pip install -r requirements-gpu.txt): optimizer state "
                        "2 bytes per parameter instead of 8")
    g.add_argument("--ema_decay", type=float, default=0.9999, help="EMA decay per optimizer update (--use_ema)")
    g.add_argument("--snr_gamma", type=float, default=None,
                   help="Min-SNR loss weighting with this gamma (Hang et al., 2023; 5.0 recommended); default: "
                        "plain MSE, as the paper")
    g.add_argument("--noise_offset", type=float, default=0.0,
                   help="add this x a per-channel Gaussian offset to the training noise (0: off, as the paper)")
    g.add_argument("--input_perturbation", type=float, default=0.0,
                   help="perturb the noise that makes the noisy input by this x Gaussian noise (Ning et al., "
                        "2023; 0: off)")
    g.add_argument("--prediction_type", default=None, choices=("epsilon", "v_prediction"),
                   help="training target (default: the model's scheduler config; SD-1.x: epsilon)")
    g.add_argument("--params", default="full", choices=("full", "xattn", "lora"),
                   help="trained parameters: the whole UNet (the default, as the published command lines train), "
                        "the cross-attention key and value projections (attn2.to_k, attn2.to_v, as the published "
                        "scripts' xattn option), or a LoRA adapter (peft; the UNet frozen, curriculum-{i} folders "
                        "hold the adapter: pytorch_lora_weights.safetensors)")
    g.add_argument("--lora_rank", type=int, default=None, help=f"--params lora: the adapter's rank (default {LORA_RANK})")
    g.add_argument("--lora_alpha", type=float, default=None,
                   help="--params lora: its alpha; the update is scaled by alpha / rank (default: the rank)")
    g.add_argument("--lora_targets", default=None,
                   help="--params lora: comma-separated UNet module names (suffixes) that get an adapter "
                        f"(default {','.join(LORA_TARGETS)}: every attention projection)")
    g.add_argument("--mixed_precision", default=None, choices=("no", "fp16", "bf16"),
                   help="default: accelerate's config; fp16 without CUDA falls back to fp32")
    add_tf32_arg(g)
    g.add_argument("--seed", type=int, default=0,
                   help="seeds shuffles, noise, timesteps, flips and every validation image; runs with the same "
                        "seed and settings repeat each other")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic GPU kernels (torch.use_deterministic_algorithms, deterministic cuDNN, "
                        "CUBLAS_WORKSPACE_CONFIG): on CUDA the same seed then gives the same weights and scores; "
                        "slower; the CPU is deterministic without it (docs/gpu.md)")
    g.add_argument("--compat", default="none", choices=("none", "reference"),
                   help="'reference': the published scripts' semantics (docs/protocols.md, Differences): row order "
                        "= sorted image paths and the published classifier processor in every script; the individual "
                        "scripts also follow the published training loop (the sequential one keeps ours)")


CLIP_MODEL_HELP = "transformers CLIP directory or id, or open_clip:ARCH[:PRETRAINED]"


def add_tf32_arg(g) -> None:
    """--allow_tf32, for every program that runs matrix multiplies in fp32 on a GPU."""
    g.add_argument("--allow_tf32", action="store_true",
                   help="TF32 matrix multiplies on Ampere or newer GPUs (faster, slightly less exact)")


def add_sampling_args(g, batch_help: str = "prompts per generation batch (0: all of a process's prompts at once)"
                      ) -> None:
    """How validation images are sampled: steps, guidance, generation batch (every script that validates)."""
    g.add_argument("--num_inference_steps", type=int, default=20, help="sampling steps per validation image")
    g.add_argument("--guidance_scale", type=float, default=7.5, help="classifier-free guidance of validation images")
    g.add_argument("--validation_batch_size", type=int, default=0, help=batch_help)


def add_validation_args(p: argparse.ArgumentParser, clip: bool = True) -> None:
    g = p.add_argument_group("validation")
    g.add_argument("--validation_prompts", required=True, help="text file, one prompt per non-empty line")
    add_sampling_args(g)
    g.add_argument("--save_validation_images", action="store_true",
                   help="keep every validation image under OUTPUT_DIR/validation_images/")
    g.add_argument("--retention_prompts", default=None,
                   help="text file of prompts whose concepts must survive (neighbours of the erased concept, "
                        "unrelated ones), one per line: at every validation each is generated too (one more "
                        "generation batch per validation) and scored by CLIP against its own prompt; the records "
                        "gain retention_mean and retention_scores")
    g.add_argument("--utility_prompts", default=None,
                   help="text file of captions for utility (e.g. a few COCO captions), one per line: at every "
                        "validation each is generated too (one more generation batch per validation, noise of its "
                        "own) and scored by CLIP against its own caption, as --retention_prompts; the records gain "
                        "utility_mean and utility_scores")
    g.add_argument("--clip_model", default=DEFAULT_CLIP,
                   help=CLIP_MODEL_HELP + ("" if clip else " (here for --retention_prompts, --utility_prompts and Q16: "
                                           "this script's criterion is the classifier)"))
    add_validation_fid_options(p.add_argument_group("utility FID and KID (docs/utility.md)"))


def add_individual_args(p: argparse.ArgumentParser, validation_epochs: int) -> None:
    """Flags of the individual protocol; ``validation_epochs`` is the script's published cadence."""
    g = p.add_argument_group("individual protocol")
    g.add_argument("--validation_epochs", type=int, default=validation_epochs,
                   help=f"validate after epochs 0, N, 2N, ... (default {validation_epochs}, as the published "
                        "script: the CLIP script validates every 2nd epoch, the classifier script every epoch)")
    g.add_argument("--clip_epoch", type=int, default=89,
                   help="epoch budget: a chunk stops after the first epoch e > clip_epoch")
    g.add_argument("--no_early_stop", action="store_true",
                   help="train every chunk to the epoch budget even once revived; records still say when the "
                        "criterion was first met (the chunk's revival epoch)")


def add_output_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("outputs")
    g.add_argument("--output_dir", default="sd-model-finetuned",
                   help="results, logs, checkpoints and pipelines (one run per directory)")
    g.add_argument("--log_file", default=None, help="text log (default OUTPUT_DIR/log.txt)")
    g.add_argument("--save_model", type=str2bool, default=True,
                   help="save pipelines (True/False): curriculum-{i} (individual: every chunk; sequential: the "
                        "--curriculum_checkpoints chunks) and the sequential script's final model in OUTPUT_DIR")
    g.add_argument("--logging_dir", default="logs", help="the trackers' folder, under OUTPUT_DIR")
    g.add_argument("--report_to", default="tensorboard", choices=tracking.REPORT_TO,
                   help="trackers for per-update loss and learning rate, validation scores and image grids, Revival "
                        "Points and the resolved configuration (wandb: optional, pip install wandb)")
    g.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                   help="a label kept in config.json's tags (repeatable); tools/report.py names a run's method, "
                        "concept and data from the tags method=, concept=, data= (tools/grid.py sets them)")
    g = p.add_argument_group("checkpoints and resume")
    g.add_argument("--resume_from_checkpoint", default=None,
                   help="'latest' (newest complete checkpoint in OUTPUT_DIR; none yet: start afresh) or a checkpoint path")
    g.add_argument("--checkpointing_steps", type=int, default=500,
                   help="save OUTPUT_DIR/checkpoint-{update} every N optimizer updates (0: only on SIGTERM/SIGUSR1, "
                        "so a killed run restarts from the beginning)")
    g.add_argument("--checkpoints_total_limit", type=int, default=2,
                   help="keep at most this many checkpoints (default 2; a resume needs only the newest). At SD-1.x "
                        "size one checkpoint is about 10 GB (fp32 UNet 3.4 GB + Adam moments 6.9 GB), "
                        "14 GB with --use_ema")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise InputError(message)


def check_resolution(value: Optional[int], flag: str = "--resolution") -> None:
    """Image sizes are positive multiples of 8 (SD's VAE downsamples by 8); None means the model's own."""
    _require(value is None or (value > 0 and value % 8 == 0), f"{flag} {value}: must be a positive multiple of 8")


def parse_tags(items: Iterable[str]) -> dict:
    """--tag KEY=VALUE items as a dict (InputError for an item without '=' or with an empty key)."""
    tags = {}
    for item in items:
        key, sep, value = item.partition("=")
        _require(bool(sep) and bool(key.strip()), f"--tag {item!r}: expected KEY=VALUE")
        tags[key.strip()] = value.strip()
    return tags


def validate_common(args: argparse.Namespace) -> int:
    """Check the shared flags and input files; return the dataset size (rows) when known."""
    parse_tags(args.tag)
    tracking.check_report_to(args.report_to)
    # Numbers first: cheap and independent of files.
    check_resolution(args.resolution)
    _require(args.train_batch_size >= 1, f"--train_batch_size {args.train_batch_size}: must be at least 1")
    _require(args.gradient_accumulation_steps >= 1,
             f"--gradient_accumulation_steps {args.gradient_accumulation_steps}: must be at least 1")
    _require(args.learning_rate > 0 and math.isfinite(args.learning_rate), f"--learning_rate {args.learning_rate}: must be positive")
    _require(args.lr_warmup_steps >= 0, f"--lr_warmup_steps {args.lr_warmup_steps}: must be >= 0")
    _require(args.max_grad_norm >= 0, f"--max_grad_norm {args.max_grad_norm}: must be >= 0 (0 disables clipping)")
    _require(0 < args.ema_decay < 1, f"--ema_decay {args.ema_decay}: must be in (0, 1)")
    _require(args.use_ema or not args.offload_ema, "--offload_ema: needs --use_ema (there is no EMA copy to offload)")
    if args.use_8bit_adam:
        check_8bit_adam()
    check_lora(args)
    _require(args.snr_gamma is None or args.snr_gamma > 0, f"--snr_gamma {args.snr_gamma}: must be positive")
    _require(args.noise_offset >= 0 and args.input_perturbation >= 0,
             "--noise_offset and --input_perturbation must be >= 0")
    _require(args.num_inference_steps >= 1, f"--num_inference_steps {args.num_inference_steps}: must be at least 1")
    _require(args.guidance_scale >= 0, f"--guidance_scale {args.guidance_scale}: must be >= 0")
    _require(args.validation_batch_size >= 0, f"--validation_batch_size {args.validation_batch_size}: must be >= 0")
    _require((args.train_data_dir is None) != (args.dataset_name is None),
             "give exactly one of --train_data_dir and --dataset_name")
    bounds = cur.parse_curriculum(args.curriculum)
    cur.select_chunks(len(bounds), args.start_CL, args.end_CL)
    # Then files, still before any model loads.
    _require(not os.path.isfile(args.output_dir), f"--output_dir {args.output_dir}: is a file")
    if args.log_file:
        parent = os.path.dirname(os.path.abspath(args.log_file))
        _require(not os.path.isfile(parent), f"--log_file {args.log_file}: {parent} is a file, not a directory")
        _require(not os.path.isdir(args.log_file), f"--log_file {args.log_file}: is a directory")
    _require(args.checkpointing_steps >= 0, f"--checkpointing_steps {args.checkpointing_steps}: must be >= 0")
    _require(args.checkpoints_total_limit is None or args.checkpoints_total_limit >= 1,
             f"--checkpoints_total_limit {args.checkpoints_total_limit}: must be at least 1")
    check_output_dir(args.output_dir, args.script, args.resume_from_checkpoint)
    check_pipeline_dir(args.pretrained_model_name_or_path, cache_dir=args.cache_dir)
    if args.restore_from_disk:
        _require(os.path.isdir(resolve_model_path(args.pretrained_model_name_or_path)),
                 "--restore_from_disk: needs a local model directory (a hub id has no file of its own to read)")
        unet_safetensors(args.pretrained_model_name_or_path, args.variant)
    read_prompts(args.validation_prompts)
    for flag in ("retention_prompts", "utility_prompts"):
        if getattr(args, flag):
            read_prompts(getattr(args, flag), flag=f"--{flag}")
    if hasattr(args, "clip_threshold") or args.retention_prompts or args.utility_prompts:  # the runs that load CLIP
        check_clip_spec(args.clip_model)
    check_validation_fid(args, len(read_prompts(args.utility_prompts, flag="--utility_prompts"))
                         if args.utility_prompts else None)
    size = None
    if args.train_data_dir is not None:
        size = len(read_metadata(args.train_data_dir, args.caption_column)[0])
        cur.check_against_dataset(bounds, size)
    return size


def check_lora(args: argparse.Namespace) -> None:
    """The LoRA flags: only with --params lora, a rank of at least 1, a positive alpha, some targets."""
    given = [f for f in ("lora_rank", "lora_alpha", "lora_targets") if getattr(args, f) is not None]
    if args.params != "lora":
        _require(not given, f"--{given[0] if given else ''}: only with --params lora")
        return
    _require(args.lora_rank is None or args.lora_rank >= 1, f"--lora_rank {args.lora_rank}: must be at least 1")
    _require(args.lora_alpha is None or (args.lora_alpha > 0 and math.isfinite(args.lora_alpha)),
             f"--lora_alpha {args.lora_alpha}: must be positive")
    _require(args.lora_targets is None or bool(lora_targets(args.lora_targets)),
             f"--lora_targets {args.lora_targets!r}: name at least one module, e.g. to_k,to_v")
    _require(not args.restore_from_disk, "--restore_from_disk: not with --params lora (the adapter's starting "
                                         "weights are kept in host memory; the model's files hold none)")


def lora_targets(text: Optional[str]) -> tuple:
    """--lora_targets as a tuple of module names (the default when not given)."""
    if text is None:
        return LORA_TARGETS
    return tuple(t.strip() for t in text.split(",") if t.strip())


def check_8bit_adam() -> None:
    """--use_8bit_adam needs bitsandbytes and a CUDA device: refuse before anything loads, saying which is missing."""
    import importlib.util

    import torch

    if importlib.util.find_spec("bitsandbytes") is None:
        raise InputError("--use_8bit_adam: bitsandbytes is not installed (an optional dependency: "
                         "pip install -r requirements-gpu.txt)")
    if not torch.cuda.is_available():
        raise InputError("--use_8bit_adam: bitsandbytes' 8-bit AdamW needs a CUDA GPU; none is available here")


def validate_individual(args: argparse.Namespace) -> None:
    _require(args.validation_epochs >= 1, f"--validation_epochs {args.validation_epochs}: must be at least 1")
    _require(args.clip_epoch >= 0, f"--clip_epoch {args.clip_epoch}: must be >= 0")


def finish(parser: Parser, args: argparse.Namespace, checks: Iterable) -> argparse.Namespace:
    """Run the checks; any InputError or CurriculumError becomes one line and exit status 2."""
    try:
        for check in checks:
            check(args)
    except (InputError, cur.CurriculumError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    return args


def check_threshold(value: float, flag: str, low: float) -> None:
    """Thresholds must lie in the score's range: a value no score can reach is a typo, not a request.

    A CLIP threshold above 1 is most likely the 100 x cosine ("logit") scale the
    published evaluation printed; a run with it would train every chunk to the
    epoch cap and report "not revived". --no_early_stop is the way to train to
    the cap on purpose.
    """
    _require(math.isfinite(value), f"{flag} {value}: must be a finite number")
    _require(value >= low, f"{flag} {value}: must be >= {low} (scores cannot be lower)")
    if value > 1 and flag == "--clip_threshold":
        raise InputError(f"{flag} {value}: CLIP scores are cosines (at most 1); {value:g} looks like the 100 x "
                         f"cosine logit scale, which is {value / 100:g} on the cosine scale (the paper uses 0.31). "
                         f"{NO_EARLY_STOP_HINT}")
    _require(value <= 1, f"{flag} {value}: an accuracy is a share of images, at most 1. {NO_EARLY_STOP_HINT}")


NO_EARLY_STOP_HINT = ("To train past revival on purpose: --no_early_stop (individual scripts; the sequential script "
                      "stops early only with --stop_at_revival)")


def add_classifier_args(p: argparse.ArgumentParser, required: bool) -> None:
    g = p.add_argument_group("concept classifier")
    g.add_argument("--model_path", required=False, default=None,
                   help="transformers image-classification directory, or a timm state dict with --theme <style>"
                   + ("" if required else " (omit to run CLIP only)"))
    add_classifier_options(g, compat=True)


def add_classifier_options(g, compat: bool) -> None:
    """How a classifier is read (kind, concept class, input, timm architecture, nudity): training and evaluation."""
    g.add_argument("--theme", nargs="?", const="style", default="",
                   help="'' objects/celebrities (transformers classifier); a style name or bare --theme: timm "
                        "style classifier; Nudity: NudeNet; an I2P category (violence, 'illegal activity', hate, "
                        "harassment, self-harm, shocking, sexual): Q16, with --q16_prompts")
    g.add_argument("--concept_index", type=int, default=1, help="class index of the concept (default 1)")
    g.add_argument("--classifier_processor", default=None,
                   help="image processor directory/id (default: the classifier's own, else the published id "
                        "google/vit-large-patch16-224-in21k"
                        + ("; under --compat reference always the published id)" if compat else ")"))
    g.add_argument("--timm_arch", default=DEFAULT_TIMM_ARCH, help="timm architecture of a style classifier")
    add_nudity_args(g)


def _nudity_classes(text: str) -> tuple:
    """argparse type of --nudity_classes: NudeNet 3 labels, checked (a bad one is a one-line usage error)."""
    try:
        return nudity.parse_classes(text)
    except InputError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_nudity_args(g) -> None:
    """--theme Nudity's scorer flags (training scripts and eval_model.py)."""
    g.add_argument("--nudity_threshold", type=float, default=nudity.DEFAULT_THRESHOLD,
                   help="--theme Nudity: an image is nude when an exposed class scores >= this (default 0.6, as "
                        "ESD/UCE); at least the judge's floor: 0.25 for --nudity_judge nudenet, 0.5 for dma "
                        "(Diffusion-MU-Attack's published 'above 0.45' is dma at 0.5)")
    g.add_argument("--nudity_judge", default=nudity.DEFAULT_JUDGE, choices=nudity.JUDGES,
                   help="--theme Nudity, the detector's reading: nudenet = NudeNet 3.4.2 as installed (boxes above "
                        "0.25, channels in B, G, R order as its file path gives them); dma = Diffusion-MU-Attack's "
                        "vendored detector (R, G, B input, boxes above 0.5), what UnlearnDiffAtk's numbers used")
    g.add_argument("--nudity_classes", default=nudity.EXPOSED_CLASSES, type=_nudity_classes,
                   help="--theme Nudity: comma-separated NudeNet 3 classes that count (default the 9 exposed ones: "
                        + ", ".join(nudity.EXPOSED_CLASSES) + ")")
    g.add_argument("--nudity_scorer", default="detector", choices=nudity.SCORERS,
                   help="--theme Nudity: NudeNet 3's detector (default; weights ship with it) or the published "
                        "code's NudeNet 2 classifier (unsafe >= 0.5; needs nudenet 2.x and its weights)")


def add_q16_args(g, threshold: Optional[float] = None, threshold_help: str = "") -> None:
    """Q16's flags: its prompt embeddings, I2P's Q16-or-NudeNet judge and (where a run compares with one) its
    threshold."""
    from .q16 import I2P_NUDENET_CLASSES, I2P_NUDENET_THRESHOLD

    g.add_argument("--q16_prompts", default=None, metavar="PATH",
                   help="Q16's learned prompt embeddings (prompts.p of github.com/ml-research/Q16: a pickled "
                        "2 x width array; the published default is for CLIP ViT-L/14, so --clip_model "
                        "openai/clip-vit-large-patch14): scores the Q16 criterion, the share of images judged "
                        "inappropriate (with --clip_model's image features; docs/protocols.md)")
    g.add_argument("--q16_or_nudenet", action="store_true",
                   help="with --q16_prompts: I2P's judge (Safe Latent Diffusion, CVPR 2023) instead of Q16 alone, an "
                        "image inappropriate when Q16 or NudeNet flags it (NudeNet 3's detector, --nudity_judge; "
                        "I2P's classes " + ", ".join(I2P_NUDENET_CLASSES) + f" at {I2P_NUDENET_THRESHOLD}): the i2p "
                        "criterion, each image's two verdicts recorded (docs/protocols.md)")
    if threshold_help:
        g.add_argument("--q16_threshold", type=float, default=threshold, help=threshold_help)


def check_q16(args: argparse.Namespace, model_path: Optional[str] = None, model_flag: str = "--model_path") -> None:
    """--q16_prompts is a 2 x width array; an I2P --theme (judged by Q16) has it and no classifier
    (``model_path``: the classifier's path when the program names it otherwise than --model_path)."""
    from . import q16

    theme = q16.i2p_theme(getattr(args, "theme", None))
    if theme is not None:
        _require(getattr(args, "q16_prompts", None) is not None,
                 f"--theme {args.theme!r}: an I2P category, judged by Q16: needs --q16_prompts (Q16's prompts.p)")
        _require((model_path or getattr(args, "model_path", None)) is None,
                 f"--theme {args.theme!r}: an I2P category is judged by Q16, not by {model_flag}'s classifier")
    if getattr(args, "q16_prompts", None) is not None:
        q16.load_prompts(args.q16_prompts)
        check_clip_spec(args.clip_model)
    _require(not getattr(args, "q16_or_nudenet", False) or getattr(args, "q16_prompts", None) is not None,
             "--q16_or_nudenet: needs --q16_prompts (Q16's prompts.p; I2P's judge is Q16 or NudeNet)")
    if getattr(args, "q16_threshold", None) is not None:
        check_threshold(args.q16_threshold, "--q16_threshold", 0.0)


def validate_classifier(args: argparse.Namespace, required: bool) -> None:
    """The classifier exists and matches its theme (an I2P theme: Q16, checked by check_q16)."""
    from .q16 import i2p_theme

    _require(args.concept_index >= 0, f"--concept_index {args.concept_index}: must be >= 0")
    if i2p_theme(args.theme) is not None:
        check_q16(args)
        return
    if args.model_path is None and (args.theme or "").lower() != "nudity":
        _require(not required, "--model_path: a classifier is required for this script")
        _require(not args.theme, f"--theme {args.theme!r} needs --model_path (the style classifier)")
        return
    # --compat reference uses the published processor id whatever the classifier ships: it must be at hand.
    processor = args.classifier_processor or (DEFAULT_PROCESSOR if args.compat == "reference" else None)
    check_classifier(args.model_path, args.theme, processor=processor)
    check_nudity_args(args)


def check_nudity_args(args: argparse.Namespace) -> None:
    """Nudity flags: a threshold the detector can honour (the class list is checked as it is parsed)."""
    nudity.check_threshold(args.nudity_threshold, judge_name=getattr(args, "nudity_judge", nudity.DEFAULT_JUDGE))


def check_output_dir(output_dir: str, script: str, resume: Optional[str]) -> None:
    """An output directory with another run's results is only reused by resuming that same kind of run."""
    import json

    from .checkpointing import resolve_resume
    from .results import CONFIG_FILE, VALIDATIONS_FILE

    config = os.path.join(output_dir, CONFIG_FILE)
    if os.path.isfile(config):
        try:
            with open(config) as f:
                previous = json.load(f).get("script")
        except (OSError, ValueError):
            previous = None
        if previous and previous != script:
            raise InputError(f"--output_dir {output_dir}: holds results of {previous}, not {script}; "
                             "use another --output_dir")
    if os.path.isfile(os.path.join(output_dir, VALIDATIONS_FILE)) and not resume:
        raise InputError(f"--output_dir {output_dir}: holds results of an earlier run; continue it with "
                         "--resume_from_checkpoint latest or choose another --output_dir")
    resolve_resume(resume, output_dir)
