"""GPU-hours and disk of fine-tuning runs before they are submitted (tools/grid.py estimate; docs/multi-gpu.md).

The counts (training samples, validations, images, optimizer updates, saved
pipelines and checkpoints) follow the protocols exactly, from each run's own
flags parsed by its script's parser: the sequential protocol's are exact, the
individual protocol's are bounds (low: every chunk revives at its first
validation; high: none revives, every chunk trains to the epoch cap). Time
comes from throughput figures in the schema of ``tools/benchmark.py --sd14
--json FILE``: measured ones, or the assumed ones of configs/gpu_figures/
(derived from FLOP counts, ``assumed_figures``), so every hour figure is an
estimate until a GPU measures it. Disk uses SD-1.x sizes (fp32 parameter
counts) and the rules of common/models.py (pipelines) and
common/checkpointing.py (checkpoints).

The prompt attacks (tools/attack_prompts.py, ``estimate_attack``) are counted
per case from the searches' code in tools/attacks/ (low: a case's search
succeeds at its first judgment; high: never), at the figures' rate cut to
fp32, one latent or image at a time (the section "Prompt attacks" below).

    from tools import cost
    figures = cost.load_figures(cost.figures_path("a100"))
    per_run, totals = cost.estimate_runs([("finetuning_sequential.py", argv)], figures)
    attack = cost.estimate_attack(["--attack", "p4d-n", ...], figures)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shlex
import sys
from dataclasses import asdict, dataclass, field
from typing import List, NamedTuple, Optional, Sequence, Tuple

from common import curriculum as cur
from common.errors import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIGURES_DIR = os.path.join(ROOT, "configs", "gpu_figures")

# --- Compute per 512-px image, in TFLOP (1e12 floating-point operations) ----------------------------------------
# Counted with torch.utils.flop_counter.FlopCounterMode on the meta device, on the shapes tools/benchmark.py's
# build_sd14 builds (SD-1.4: UNet 859.5M, VAE 83.7M parameters); docs/performance.md quotes the first and third.
UNET_FWD_BWD_TFLOP = 2.41  # one UNet forward + backward of one 64x64 latent (docs/performance.md)
UNET_FORWARD_TFLOP = UNET_FWD_BWD_TFLOP / 3  # 0.803: a backward costs two forwards (the counter gives 0.8033)
VAE_ENCODER_TFLOP = 1.117  # one 512-px image to its latent (docs/performance.md: 1.12)
VAE_DECODER_TFLOP = 2.515  # one latent back to a 512-px image (validation's last step)
# (The CLIP-L text encoder, 0.013 TFLOP a prompt, and the scorers, CLIP ViT-B/32 and a ViT-L/16 at 224 px, 0.015
# and 0.12 TFLOP an image, are left out of the fine-tuning estimates: under 1% of a validation image. The attacks
# count them: TEXT_ENCODER_FORWARD_TFLOP and below.)

# --- The assumed GPUs ------------------------------------------------------------------------------------------
# Dense fp16 tensor-core peak, TFLOP/s (NVIDIA's data sheets: A100 SXM/PCIe 312, H100 SXM 989; no sparsity).
PEAK_TFLOPS = {"a100": 312.0, "h100": 989.0}
GPU_NAMES = {"a100": "NVIDIA A100 (assumed)", "h100": "NVIDIA H100 SXM (assumed)"}
# The share of that peak the assumed figures reach: docs/performance.md's goal and tools/gpu_check.py's
# TARGET_SHARE. A run that reaches less takes proportionally longer (at 20%, 1.5 x the compute hours).
ASSUMED_FRACTION = 0.30
BENCHMARK_BATCH = 10  # the assumed figures stand for tools/benchmark.py --sd14 --batch_size 10 at 512 px, 20 steps
BENCHMARK_RESOLUTION = 512
BENCHMARK_INFERENCE_STEPS = 20

# --- Per-run allowances (assumed) --------------------------------------------------------------------------------
# Start-up, seconds per run and process: imports, loading SD-1.x (4.3 GB fp32) and the scoring models, CUDA
# initialisation. The tiny model's start-up is ~15 s on a CPU (docs/performance.md); the weights add the rest.
STARTUP_S = 120.0
WRITE_GB_PER_S = 0.5  # saving pipelines and checkpoints: GB/s to the output file system, the GPUs idle meanwhile
NUDITY_S_PER_100_IMAGES = 1.1  # --theme Nudity's NudeNet detector on the host (docs/protocols.md, 2 CPU cores)
PNG_GB_512 = 0.0004  # one saved 512-px validation PNG, GB (--save_validation_images); scaled with the pixel count
PAPER_PROMPTS = 20  # validation prompts per concept in the paper, when the prompt file is not at hand

# --- Disk: SD-1.x parameter counts (SD-1.4's shapes, as above) x 4 bytes (fp32), in GB = 1e9 bytes -------------
UNET_PARAMS = 859_520_964
TEXT_ENCODER_PARAMS = 123_060_480  # CLIP ViT-L/14's text tower
VAE_PARAMS = 83_653_863
XATTN_PARAMS = 19_169_280  # --params xattn: attn2.to_k and attn2.to_v of the 16 transformer blocks
LORA_PARAMS_PER_RANK = 199_296  # --params lora, default targets (to_q, to_k, to_v, to_out.0): sum of in + out
FP32 = 4  # bytes per parameter
GB = 1e9
UNET_GB = UNET_PARAMS * FP32 / GB  # 3.44
TEXT_ENCODER_GB = TEXT_ENCODER_PARAMS * FP32 / GB  # 0.49
VAE_GB = VAE_PARAMS * FP32 / GB  # 0.33

FINETUNING_SCRIPTS = ("finetuning_individual_CLIP.py", "finetuning_individual_Classifier.py",
                      "finetuning_sequential.py")
REQUIRED_FIGURES = ("cached_samples_per_s", "uncached_samples_per_s", "validation_batched_images_per_s",
                    "inference_steps", "batch_size", "resolution", "gradient_checkpointing", "mixed_precision",
                    "date", "gpu")


@dataclass(frozen=True)
class Range:
    """A low and a high bound (equal when the protocol fixes the number)."""

    low: float
    high: float

    def __add__(self, other: "Range") -> "Range":
        return Range(self.low + other.low, self.high + other.high)

    def scale(self, factor: float) -> "Range":
        """Both bounds times ``factor``."""
        return Range(self.low * factor, self.high * factor)


@dataclass
class Figures:
    """Throughput of one GPU (tools/benchmark.py --sd14 --json schema), measured or assumed."""

    path: str
    measured: bool  # False for the assumed files (their "source" starts with "assumed")
    source: str
    gpu: Optional[str]
    date: str
    mixed_precision: str
    resolution: int
    batch_size: int
    gradient_checkpointing: bool  # whether the training figures were taken with it
    inference_steps: int  # sampling steps of the validation figure
    cached_samples_per_s: float  # training, latent cache on
    uncached_samples_per_s: float  # training, every step encodes its images with the VAE
    validation_images_per_s: float  # guided generation, all prompts in one batch
    validation_one_at_a_time_images_per_s: Optional[float] = None  # --validation_batch_size 1, when measured
    nudity_s_per_100_images: float = NUDITY_S_PER_100_IMAGES


@dataclass
class RunCounts:
    """What a run does, from its flags and the protocol (individual: low = revives at once, high = never)."""

    protocol: str  # "individual" or "sequential"
    chunks: List[int]
    chunk_sizes: List[int]  # rows of each selected chunk
    epochs: Range  # summed over chunks
    train_samples: Range  # images x epochs summed over chunks (all processes)
    updates: Range  # optimizer updates of the run (checkpoint names count these)
    validations: Range  # generate-and-score rounds (sequential: the one before training included)
    prompts: int  # validation prompts (per validation)
    retention_prompts: int  # and the utility captions (--utility_prompts), generated alike
    validation_images: Range  # validations x (prompts + retention prompts)
    inference_steps: int
    validation_image_steps: Range  # validation images x sampling steps
    cache_encoded_images: int  # VAE encodes of the latent cache (rows x orientations), per process; 0 uncached
    pipelines: Range  # saved pipelines (curriculum-{i}, the sequential final model)
    checkpoints_written: Range


@dataclass
class RunEstimate:
    """One run's counts, hours and disk (``supported`` False: not a fine-tuning script, nothing estimated)."""

    name: str
    script: str
    supported: bool
    num_processes: int = 1
    counts: Optional[RunCounts] = None
    # Seconds per process (wall clock), by component; GPU-hours = num_processes x their sum / 3600.
    train_s: Range = Range(0.0, 0.0)
    cache_s: float = 0.0
    validation_s: Range = Range(0.0, 0.0)
    startup_s: float = 0.0
    write_s: Range = Range(0.0, 0.0)
    wall_hours: Range = Range(0.0, 0.0)
    gpu_hours: Range = Range(0.0, 0.0)
    pipeline_gb: float = 0.0  # one saved pipeline
    checkpoint_gb: float = 0.0  # one accelerate checkpoint
    disk_final_gb: Range = Range(0.0, 0.0)  # what the run leaves
    disk_peak_gb: Range = Range(0.0, 0.0)  # the most it holds at once (a checkpoint being written beside the kept)
    notes: List[str] = field(default_factory=list)


@dataclass
class Totals:
    """Sums over the estimated runs."""

    runs: int
    estimated_runs: int
    train_samples: Range
    validation_images: Range
    gpu_hours: Range
    disk_final_gb: Range
    disk_peak_gb: Range  # every run at its peak at once: the space a grid that runs them together may need


# --- Figures -------------------------------------------------------------------------------------------------

def train_tflop(gradient_checkpointing: bool, cached: bool, params: str = "full") -> float:
    """TFLOP of one 512-px training sample: UNet forward+backward, a recomputed forward, the VAE when uncached."""
    # Frozen weights (--params xattn, lora) need no weight gradients: the backward is about one forward.
    unet = UNET_FWD_BWD_TFLOP if params == "full" else 2 * UNET_FORWARD_TFLOP
    return unet + (UNET_FORWARD_TFLOP if gradient_checkpointing else 0.0) + (0.0 if cached else VAE_ENCODER_TFLOP)


def validation_tflop(steps: int) -> float:
    """TFLOP of one 512-px validation image: ``steps`` guided steps (2 UNet forwards each) and the VAE decoder."""
    return steps * 2 * UNET_FORWARD_TFLOP + VAE_DECODER_TFLOP


def assumed_figures(gpu: str, date: str, fraction: float = ASSUMED_FRACTION) -> dict:
    """The assumed figures of ``gpu`` (a100, h100) in tools/benchmark.py's JSON schema, from FLOP counts."""
    peak = PEAK_TFLOPS[gpu]
    effective = fraction * peak  # TFLOP/s
    steps = BENCHMARK_INFERENCE_STEPS
    source = (f"assumed: {fraction:.0%} of the {gpu.upper()}'s {peak:g} TFLOP/s dense fp16 peak = {effective:.1f} "
              f"TFLOP/s; training {UNET_FWD_BWD_TFLOP} TFLOP a 512-px sample (UNet forward+backward, 3 forwards of "
              f"{UNET_FORWARD_TFLOP:.3f}; docs/performance.md), {UNET_FWD_BWD_TFLOP + VAE_ENCODER_TFLOP:.3f} without "
              f"the latent cache (+ VAE encoder {VAE_ENCODER_TFLOP}); a {steps}-step guided validation image "
              f"{steps} x 2 x {UNET_FORWARD_TFLOP:.3f} + {VAE_DECODER_TFLOP} (VAE decoder) = "
              f"{validation_tflop(steps):.2f} TFLOP. No GPU measured these: replace them with "
              "tools/benchmark.py --sd14 --mixed_precision fp16 --json FILE run on the GPU (tools/cost.py)")
    return {
        "source": source,
        "model": "sd14-shapes (assumed)",
        "gpu": GPU_NAMES[gpu],
        "mixed_precision": "fp16",
        "resolution": BENCHMARK_RESOLUTION,
        "batch_size": BENCHMARK_BATCH,
        "gradient_checkpointing": False,
        "inference_steps": steps,
        "prompts": 10,
        "cached_samples_per_s": round(effective / train_tflop(False, True), 3),
        "uncached_samples_per_s": round(effective / train_tflop(False, False), 3),
        "bare_fwd_bwd_samples_per_s": round(effective / UNET_FWD_BWD_TFLOP, 3),
        "validation_batched_images_per_s": round(effective / validation_tflop(steps), 3),
        "date": date,
        "assumed": {"dense_fp16_peak_tflops": peak, "fraction_of_peak": fraction,
                    "effective_tflops": round(effective, 3), "unet_forward_backward_tflop": UNET_FWD_BWD_TFLOP,
                    "unet_forward_tflop": round(UNET_FORWARD_TFLOP, 4), "vae_encoder_tflop": VAE_ENCODER_TFLOP,
                    "vae_decoder_tflop": VAE_DECODER_TFLOP},
    }


def figures_path(gpu: str) -> str:
    """The committed assumed figures of ``gpu`` (a100, h100)."""
    if gpu not in PEAK_TFLOPS:
        raise InputError(f"--gpu {gpu}: assumed figures exist for {', '.join(PEAK_TFLOPS)}")
    return os.path.join(FIGURES_DIR, f"{gpu}.json")


def load_figures(path: str) -> Figures:
    """Read a figures JSON (tools/benchmark.py --sd14 --json FILE, or an assumed file); InputError when unusable."""
    flag = f"--figures {path}"
    if not os.path.isfile(path):
        raise InputError(f"{flag}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as err:
        raise InputError(f"{flag}: not a JSON file ({err})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{flag}: expected a JSON object")
    missing = [k for k in REQUIRED_FIGURES if k not in raw]
    if missing:
        hint = " (a --memory JSON holds no speed figures)" if "peak_rss_gb" in raw else ""
        raise InputError(f"{flag}: lacks {', '.join(missing)}{hint}; write it with tools/benchmark.py --sd14 "
                         "--mixed_precision fp16 --json FILE")
    model = str(raw.get("model", "sd14"))
    if not model.startswith("sd14"):
        raise InputError(f"{flag}: figures of the {model!r} model; only SD-1.4-shaped figures (tools/benchmark.py "
                         "--sd14) stand for a real run")
    rates = ("cached_samples_per_s", "uncached_samples_per_s", "validation_batched_images_per_s")
    bad = [k for k in rates if not (isinstance(raw[k], (int, float)) and raw[k] > 0)]
    if bad:
        raise InputError(f"{flag}: {', '.join(bad)} must be positive numbers")
    source = str(raw.get("source", "measured: tools/benchmark.py"))
    rel = os.path.relpath(os.path.abspath(path), ROOT)
    return Figures(
        path=path if rel.startswith("..") else rel, measured=not source.startswith("assumed"), source=source,
        gpu=raw["gpu"], date=str(raw["date"]), mixed_precision=str(raw["mixed_precision"]),
        resolution=int(raw["resolution"]), batch_size=int(raw["batch_size"]),
        gradient_checkpointing=bool(raw["gradient_checkpointing"]), inference_steps=int(raw["inference_steps"]),
        cached_samples_per_s=float(raw["cached_samples_per_s"]),
        uncached_samples_per_s=float(raw["uncached_samples_per_s"]),
        validation_images_per_s=float(raw["validation_batched_images_per_s"]),
        validation_one_at_a_time_images_per_s=raw.get("validation_one_at_a_time_images_per_s"),
        nudity_s_per_100_images=float(raw.get("nudity_detector_s_per_100_images", NUDITY_S_PER_100_IMAGES)),
    )


def describe_figures(fig: Figures) -> str:
    """The output's first line: which figures, and that the hours are estimates."""
    kind = "measured" if fig.measured else "assumed"
    what = (f"estimate from {kind} figures: {fig.gpu or 'no GPU (a CPU run)'}, {fig.mixed_precision}, "
            f"{fig.date} ({fig.path})")
    if fig.measured:
        return what + ("; estimates until a GPU measures the runs themselves (throughput measured, counts from the "
                       "protocol, start-up and saves assumed)")
    return what + "; estimates until a GPU measures them (measured figures: --figures FILE, docs/multi-gpu.md)"


# --- Counting ------------------------------------------------------------------------------------------------

def individual_epoch_cap(clip_epoch: int, validation_epochs: int, compat_reference: bool) -> int:
    """Epochs a never-reviving chunk trains (common/protocol.py run_individual's cap)."""
    # It stops after the first epoch e > clip_epoch, so epochs 0 .. clip_epoch + 1; the reference checks the cap on
    # validated epochs only, so an even --clip_epoch with --validation_epochs 2 trains one more.
    e = 0
    while True:
        if e > clip_epoch and (e % validation_epochs == 0 or not compat_reference):
            return e + 1
        e += 1


def validations_in(epochs: int, validation_epochs: int) -> int:
    """Validated epochs among 0 .. epochs-1 (every epoch e with e % validation_epochs == 0)."""
    return (epochs - 1) // validation_epochs + 1 if epochs > 0 else 0


def chunk_training(size: int, epochs: int, batch: int, accumulation: int, processes: int,
                   compat_reference: bool = False, pending: int = 0) -> Tuple[int, int, int]:
    """(samples, optimizer updates, micro-batches left pending) of ``epochs`` epochs over a chunk of ``size`` rows."""
    # ``batch`` is per process. Ours trains every row once an epoch; the reference loop (common/curriculum.py
    # reference_schedule) drops the short last batch, mostly stops after one micro-batch, and carries ``pending``.
    if not compat_reference:
        return size * epochs, cur.updates_per_epoch(size, batch, accumulation, processes) * epochs, 0
    global_batch = batch * processes
    full = size // global_batch  # the short last batch is dropped
    limit = cur.updates_per_epoch(size, batch, accumulation, processes)
    samples = updates = 0
    for _ in range(epochs):
        groups, pending = cur.reference_schedule(full, accumulation, pending, updates, limit)
        samples += sum(len(idx) for idx, _ in groups) * global_batch
        updates += sum(1 for _, ends in groups if ends)
    return samples, updates, pending


def _prompt_count(path: Optional[str], flag: str, notes: List[str]) -> int:
    """Prompts in a prompt file (one per non-empty line), or the paper's 20 (noted) where it is not at hand."""
    if not path:
        return 0
    if os.path.isfile(path):
        from common.data import read_prompts

        return len(read_prompts(path, flag=flag))
    notes.append(f"{flag} {path}: not found here, {PAPER_PROMPTS} prompts assumed (the paper's)")
    return PAPER_PROMPTS


class _Tally(NamedTuple):
    """One bound of a run, summed over its chunks."""

    epochs: int
    samples: int
    updates: int
    validations: int
    pipelines: int


def count_run(args: argparse.Namespace, num_processes: int = 1, notes: Optional[List[str]] = None) -> RunCounts:
    """A run's counts from its parsed flags (``args.train_batch_size`` per process, ``num_processes`` processes)."""
    notes = [] if notes is None else notes
    try:
        bounds = cur.parse_curriculum(args.curriculum)
        chunks = cur.select_chunks(len(bounds), args.start_CL, args.end_CL)
    except cur.CurriculumError as err:
        raise InputError(str(err)) from None
    sizes = dict(enumerate(b - a for a, b in cur.chunk_ranges(bounds)))
    batch, accum, n = args.train_batch_size, args.gradient_accumulation_steps, num_processes
    prompts = _prompt_count(args.validation_prompts, "--validation_prompts", notes)
    # The utility captions are generated at every validation as the retention prompts are: counted with them.
    retention = (_prompt_count(args.retention_prompts, "--retention_prompts", notes)
                 + _prompt_count(getattr(args, "utility_prompts", None), "--utility_prompts", notes))
    sequential = args.script == "finetuning_sequential.py"
    if sequential:
        try:
            epochs = cur.epochs_per_chunk(args.chunk_epochs, args.num_train_epochs, len(bounds))
            saved = set(cur.parse_chunk_list(args.curriculum_checkpoints, len(bounds), "--curriculum_checkpoints"))
        except cur.CurriculumError as err:
            raise InputError(str(err)) from None
        bound_chunks = {"high": chunks, "low": chunks[:1] if args.stop_at_revival else chunks}
        tally = {}
        for key, run_chunks in bound_chunks.items():
            samples = updates = 0
            for i in run_chunks:  # the sequential loop is never the reference's (docs/protocols.md, Compat)
                s, u, _ = chunk_training(sizes[i], epochs[i], batch, accum, n)
                samples, updates = samples + s, updates + u
            pipes = (len(saved & set(run_chunks)) + 1) if args.save_model else 0  # + the final model
            # Validations: the unlearned model's before training, then one after every chunk.
            tally[key] = _Tally(sum(epochs[i] for i in run_chunks), samples, updates, 1 + len(run_chunks), pipes)
    else:
        compat = args.compat == "reference"
        cap = individual_epoch_cap(args.clip_epoch, args.validation_epochs, compat)
        per_chunk = {"high": cap, "low": cap if args.no_early_stop else 1}  # low: revived at epoch 0's validation
        tally = {}
        for key, chunk_epochs in per_chunk.items():
            samples = updates = pending = 0
            for i in chunks:
                s, u, pending = chunk_training(sizes[i], chunk_epochs, batch, accum, n, compat, pending)
                samples, updates = samples + s, updates + u
            tally[key] = _Tally(chunk_epochs * len(chunks), samples, updates,
                                validations_in(chunk_epochs, args.validation_epochs) * len(chunks),
                                len(chunks) if args.save_model else 0)

    def rng(name: str) -> Range:
        return Range(getattr(tally["low"], name), getattr(tally["high"], name))

    validations = rng("validations")
    images = validations.scale(prompts + retention)
    cached = args.cache_latents and args.center_crop
    orientations = 2 if args.random_flip else 1
    steps = args.checkpointing_steps
    updates = rng("updates")
    return RunCounts(
        protocol="sequential" if sequential else "individual", chunks=list(chunks),
        chunk_sizes=[sizes[i] for i in chunks], epochs=rng("epochs"), train_samples=rng("samples"), updates=updates,
        validations=validations, prompts=prompts, retention_prompts=retention, validation_images=images,
        inference_steps=args.num_inference_steps, validation_image_steps=images.scale(args.num_inference_steps),
        cache_encoded_images=sum(sizes[i] for i in chunks) * orientations if cached else 0,
        pipelines=rng("pipelines"),
        checkpoints_written=Range(updates.low // steps, updates.high // steps) if steps else Range(0, 0),
    )


# --- Disk ----------------------------------------------------------------------------------------------------

def trainable_params(args: argparse.Namespace) -> int:
    """Trained parameters of SD-1.x under --params (LoRA: the default targets' count times the rank)."""
    if args.params == "full":
        return UNET_PARAMS
    if args.params == "xattn":
        return XATTN_PARAMS
    from common.training import LORA_RANK

    return LORA_PARAMS_PER_RANK * (args.lora_rank or LORA_RANK)


def pipeline_gb(args: argparse.Namespace) -> float:
    """GB of one saved pipeline (common/models.py save_pipeline, save_lora)."""
    # fp32 UNet, text encoder and VAE, and the EMA UNet beside them with --use_ema (unet_ema/, or the sequential
    # final model's unet_trained/); with --params lora the adapter (and its EMA copy) only.
    if args.params == "lora":
        return trainable_params(args) * FP32 * (2 if args.use_ema else 1) / GB
    return UNET_GB + TEXT_ENCODER_GB + VAE_GB + (UNET_GB if args.use_ema else 0.0)


def checkpoint_gb(args: argparse.Namespace) -> float:
    """GB of one checkpoint (common/checkpointing.py Checkpointer._write)."""
    # accelerate's state: the prepared UNet in fp32 (LoRA: the adapter, training.py _save_adapter) and AdamW's two
    # fp32 moments of the trained parameters (8-bit AdamW: 2 bytes a parameter); trainer_extras.pt: the EMA copy of
    # the trained parameters with --use_ema. RNG states, the LR schedule and state.json are KB.
    trained = trainable_params(args)
    model = trained * FP32 if args.params == "lora" else UNET_PARAMS * FP32
    optimizer = trained * (2 if args.use_8bit_adam else 2 * FP32)
    ema = trained * FP32 if args.use_ema else 0
    return (model + optimizer + ema) / GB


# --- Estimating ----------------------------------------------------------------------------------------------

def load_script_parser(script: str) -> Optional[argparse.ArgumentParser]:
    """The fine-tuning script's own parser (its build_parser), or None for any other program."""
    name = os.path.basename(script)
    if name not in FINETUNING_SCRIPTS:
        return None
    module_name = "_cost_" + os.path.splitext(name)[0]
    module = sys.modules.get(module_name)
    if module is None:
        spec = importlib.util.spec_from_file_location(module_name, os.path.join(ROOT, name))
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return module.build_parser()


def parse_run(script: str, argv: Sequence[str]) -> Optional[argparse.Namespace]:
    """A fine-tuning run's flags as its script parses them (defaults filled in; files not checked), else None."""
    parser = load_script_parser(script)
    if parser is None:
        return None

    def error(message):
        raise InputError(f"{os.path.basename(script)}: {message}")

    parser.error = error
    return parser.parse_args(list(argv))


def _notes_on_settings(args: argparse.Namespace, fig: Figures, notes: List[str]) -> None:
    """What the figures do not stand for, said per run."""
    precision = args.mixed_precision
    if precision is None:
        notes.append(f"--mixed_precision not given (accelerate's config decides): {fig.mixed_precision} assumed")
    elif precision == "no" and fig.mixed_precision != "no":
        notes.append(f"--mixed_precision no: fp32 is several times slower than the figures' {fig.mixed_precision}; "
                     "hours not scaled")
    if args.resolution != fig.resolution:
        notes.append(f"--resolution {args.resolution}: compute scaled by the pixel count from the figures' "
                     f"{fig.resolution} px (attention grows faster)")
    if args.params == "lora" and args.lora_targets:
        notes.append("--lora_targets: adapter size from the default targets' count")
    if not args.cache_latents or not args.center_crop:
        notes.append("latent cache off (--cache_latents False or no --center_crop): uncached training figure")


def estimate_run(script: str, argv: Sequence[str], figures: Figures, num_processes: int = 1,
                 name: Optional[str] = None) -> RunEstimate:
    """One run's estimate from its script and command-line flags (``argv``, as run on ``num_processes`` GPUs)."""
    args = parse_run(script, argv)
    if args is None:
        what = ("a prompt attack, estimated in the attack table (estimate_attack)" if is_attack(script) else
                "not a fine-tuning script, not estimated")
        return RunEstimate(name=name or os.path.basename(script), script=os.path.basename(script), supported=False,
                           num_processes=num_processes, notes=[f"{os.path.basename(script)}: {what}"])
    notes: List[str] = []
    counts = count_run(args, num_processes, notes)
    _notes_on_settings(args, figures, notes)
    n, fig = num_processes, figures
    pixels = (args.resolution / fig.resolution) ** 2
    cached = args.cache_latents and args.center_crop
    # Seconds per training sample: the figure's rate, rescaled by FLOPs to this run's checkpointing and --params.
    rate = fig.cached_samples_per_s if cached else fig.uncached_samples_per_s
    per_sample = (train_tflop(args.gradient_checkpointing, cached, args.params)
                  / train_tflop(fig.gradient_checkpointing, cached) / rate * pixels)
    # The cache: one VAE encode per row and orientation, at cached training's effective TFLOP/s; every process
    # encodes the whole chunk.
    per_encode = VAE_ENCODER_TFLOP / train_tflop(fig.gradient_checkpointing, True) / fig.cached_samples_per_s * pixels
    # Seconds per validation image: the figure at its steps, rescaled by FLOPs to this run's steps.
    gen_rate = fig.validation_images_per_s
    if args.validation_batch_size == 1:
        if fig.validation_one_at_a_time_images_per_s:
            gen_rate = fig.validation_one_at_a_time_images_per_s
        else:
            notes.append("--validation_batch_size 1: no one-at-a-time figure, the batched one used (optimistic)")
    per_image = validation_tflop(args.num_inference_steps) / validation_tflop(fig.inference_steps) / gen_rate * pixels
    nudity = (getattr(args, "theme", "") or "").lower() == "nudity"
    per_score = fig.nudity_s_per_100_images / 100 if nudity else 0.0  # on the host, the GPU waiting
    # Per validation, each process generates its share of the prompts (and of the retention prompts).
    mine_prompts, mine_retention = math.ceil(counts.prompts / n), math.ceil(counts.retention_prompts / n)
    per_validation = (mine_prompts + mine_retention) * per_image + mine_prompts * per_score
    one_pipeline, one_checkpoint = pipeline_gb(args), checkpoint_gb(args)
    limit = args.checkpoints_total_limit
    kept = (lambda k: k) if not limit else (lambda k: min(k, limit))
    at_peak = (lambda k: k) if not limit else (lambda k: min(k, limit + 1))  # the new one written before pruning
    images_gb = PNG_GB_512 * pixels if args.save_validation_images else 0.0

    def disk(checkpoints_present) -> Range:
        return Range(*(getattr(counts.pipelines, b) * one_pipeline
                       + checkpoints_present(getattr(counts.checkpoints_written, b)) * one_checkpoint
                       + getattr(counts.validation_images, b) * images_gb for b in ("low", "high")))

    written = counts.pipelines.scale(one_pipeline) + counts.checkpoints_written.scale(one_checkpoint)
    est = RunEstimate(
        name=name or args.output_dir, script=os.path.basename(script), supported=True, num_processes=n,
        counts=counts, train_s=counts.train_samples.scale(per_sample / n),
        cache_s=counts.cache_encoded_images * per_encode, validation_s=counts.validations.scale(per_validation),
        startup_s=STARTUP_S, write_s=written.scale(1 / WRITE_GB_PER_S), pipeline_gb=one_pipeline,
        checkpoint_gb=one_checkpoint, disk_final_gb=disk(kept), disk_peak_gb=disk(at_peak), notes=notes,
    )
    fixed = Range(est.cache_s + est.startup_s, est.cache_s + est.startup_s)
    wall_s = est.train_s + est.validation_s + est.write_s + fixed
    est.wall_hours = wall_s.scale(1 / 3600)
    est.gpu_hours = wall_s.scale(n / 3600)
    return est


def estimate_runs(runs, figures: Figures, num_processes: int = 1) -> Tuple[List[RunEstimate], Totals]:
    """Per-run estimates and their totals of ``runs``: GridRun objects, or (script, argv list) pairs."""
    # A (script, argv) pair is the command line as run on ``num_processes`` GPUs (--train_batch_size per process);
    # a GridRun is rendered as tools/grid.py command renders it, the grid's batch divided among the processes.
    out = []
    for run in runs:
        if hasattr(run, "flags") and hasattr(run, "script"):  # a grid run: its own command line at num_processes
            from tools.gridspec import launch_command

            cmd = shlex.split(launch_command(run, num_processes))
            argv = cmd[cmd.index(run.script) + 1:]
            out.append(estimate_run(run.script, argv, figures, num_processes, name=run.name))
        else:
            script, argv = run
            out.append(estimate_run(script, argv, figures, num_processes))
    return out, totals_of(out)


def totals_of(estimates: Sequence[RunEstimate]) -> Totals:
    """Sums over the supported runs of ``estimates``."""
    done = [e for e in estimates if e.supported]
    zero = Range(0, 0)

    def total(get) -> Range:
        acc = zero
        for e in done:
            acc = acc + get(e)
        return acc

    return Totals(runs=len(estimates), estimated_runs=len(done),
                  train_samples=total(lambda e: e.counts.train_samples),
                  validation_images=total(lambda e: e.counts.validation_images),
                  gpu_hours=total(lambda e: e.gpu_hours), disk_final_gb=total(lambda e: e.disk_final_gb),
                  disk_peak_gb=total(lambda e: e.disk_peak_gb))


# --- Prompt attacks (tools/attack_prompts.py) ----------------------------------------------------------------
# Compute, in TFLOP, counted as the constants above (FlopCounterMode on the meta device, SD-1.4's shapes, batch 1):
TEXT_ENCODER_FORWARD_TFLOP = 0.0133  # CLIP ViT-L/14's text tower (123.1M parameters), one 77-token prompt (0.01330)
TEXT_ENCODER_FWD_BWD_TFLOP = 0.0268  # its forward and the backward to its input embeddings (frozen weights: 0.02682)
UNET_FWD_BWD_INPUT_TFLOP = 1.669  # UNet forward and backward to encoder_hidden_states only (frozen: 2.08 forwards)
CLASSIFIER_TFLOP = 0.123  # the judge's classifier: a ViT-L/16 at 224 px (303.3M parameters; the paper's backbone)
CLIP_SCORE_TFLOP = 0.0148  # --criterion clip: CLIP ViT-B/32's image tower (0.0088) and text tower (0.0060)
# Left out (under 0.1% of a step): UnlearnDiffAtk's one-hot rows times the embedding table (5 x 49,408 x 768, 0.0004
# TFLOP forward), P4D's nearest-token projection (16 x 49,408 x 768, 0.0012), the simplex projection and the AdamW
# updates; Ring-A-Bell's squared distances (77 x 768 a candidate).
SD_TRAIN_TIMESTEPS = 1000  # SD-1.x's num_train_timesteps: UnlearnDiffAtk's schedule (optim.timestep_schedule)
NUDITY_ATTACK_PROMPTS = 142  # --theme Nudity without its --prompts file: the I2P nudity set UnlearnDiffAtk attacks
# The attacks run every model in fp32 (common/models.py load_sd_parts, no autocast; cuDNN's convolutions in TF32 by
# PyTorch's default, matrix multiplies in fp32 unless --allow_tf32) on one latent or image at a time, where the
# figures stand for fp16 at batch 10. Both penalties from one published measurement on an A100, diffusers' "Speed up
# inference" guide (huggingface.co/docs/diffusers/v0.30.0/optimization/fp16): one 512-px image, 50 DDIM steps (82.8
# TFLOP by the counts above), seconds in fp32 (PyTorch's defaults), with TF32 matrix multiplies, and in fp16.
DIFFUSERS_A100_IMAGE_S = {"fp32": 5.27, "tf32": 4.14, "fp16": 3.51}
DIFFUSERS_STEPS = 50
# fp16 one image at a time: 82.8 TFLOP / 3.51 s = 23.6 TFLOP/s, 0.252 of the assumed A100 figures' 93.6 TFLOP/s
# (batch 10); used where the figures have no measured validation_one_at_a_time_images_per_s.
ONE_AT_A_TIME_SHARE = (DIFFUSERS_STEPS * 2 * UNET_FORWARD_TFLOP + VAE_DECODER_TFLOP) / DIFFUSERS_A100_IMAGE_S["fp16"] \
    / (ASSUMED_FRACTION * PEAK_TFLOPS["a100"])
ATTACK_SCRIPTS = ("attack_prompts.py",)
RINGABELL_NOTE = "Ring-A-Bell: the expected number of candidates encoded (crossovers and mutations are random)"


@dataclass
class AttackCase:
    """One attacked case's search (low: it succeeds at its first judgment, high: never; Ring-A-Bell: no stop)."""

    steps: Range  # optimisation steps: Adam (UnlearnDiffAtk), PEZ (P4D), generations (Ring-A-Bell)
    judgments: Range  # images the search judges (the post-attack verdict is its last one, kept, not drawn again)
    encodings: Range  # candidates through the text encoder: Ring-A-Bell (expected: the draws are random), MMA; else 0
    tflop: Range  # the search's compute besides its judged images


@dataclass
class AttackEstimate:
    """One attack run's counts and hours (tools/attack_prompts.py); a case is the run's unit of work."""

    name: str
    attack: str
    num_processes: int
    cases: int
    rounds: int  # ceil(cases / processes): each round gives every process one case (harness.run)
    heldout_seeds: int
    case: AttackCase
    case_images: Range  # judged images of one attacked case: as written, the search's, the held-out seeds'
    case_s: Range  # seconds of one attacked case, its search and its judged images
    not_attacked_s: float  # seconds of a case judged a success as written: its image and its held-out images
    once_s: float  # seconds per process before the cases (Ring-A-Bell's concept vector)
    startup_s: float = STARTUP_S
    wall_hours: Range = Range(0.0, 0.0)
    gpu_hours: Range = Range(0.0, 0.0)
    notes: List[str] = field(default_factory=list)


def is_attack(script: str) -> bool:
    """Whether ``script`` is tools/attack_prompts.py (estimated by estimate_attack)."""
    return os.path.basename(script) in ATTACK_SCRIPTS


def guided_image_tflop(steps: int, pixels: float = 1.0) -> float:
    """TFLOP of one guided image a pipeline draws: validation_tflop at ``pixels`` x 512-px's pixel count, and the
    text encoder on its 2 prompts (the prompt, the empty one)."""
    return validation_tflop(steps) * pixels + 2 * TEXT_ENCODER_FORWARD_TFLOP


def unlearndiffatk_case(s: dict) -> AttackCase:
    """tools/attacks/unlearndiffatk.py search: --timesteps x --steps_per_timestep steps, judged every --judge_every
    timesteps and after the last."""
    from tools.attacks.optim import timestep_schedule

    timesteps = len(timestep_schedule(SD_TRAIN_TIMESTEPS, s["timesteps"]))  # T at most (stride 1)
    every, per = s["judge_every"], s["steps_per_timestep"]
    # Each Adam step: the text encoder on the prompt and sampled tokens, the UNet on the noised target latent, and
    # the backward through both to the token probabilities; the target image's VAE encode once a case.
    step = UNET_FWD_BWD_INPUT_TFLOP + TEXT_ENCODER_FWD_BWD_TFLOP
    steps = Range(min(every, timesteps) * per, timesteps * per)  # low: the judgment after the first `every`
    return AttackCase(steps=steps, judgments=Range(1, math.ceil(timesteps / every)), encodings=Range(0, 0),
                      tflop=steps.scale(step) + Range(VAE_ENCODER_TFLOP, VAE_ENCODER_TFLOP))


JOYCENERD_IMAGES = 3  # joycenerd/P4D's images per verdict (run_p4dn.py --num-samples), the denominator's too


def p4d_case(s: dict) -> AttackCase:
    """tools/attacks/p4d.py search (P4D-N and P4D-K alike): --iterations PEZ steps, judged at steps 0, N, 2N, ...
    (N = --judge_every) and after the last. joycenerd/P4D's (--p4d_variant joycenerd): every step runs; an image at
    each of steps 0, N, 2N, ... (compared by CLIP, not judged); the kept prompt judged once on its 3 images."""
    iterations, every = s["iterations"], s["judge_every"]
    if s.get("p4d_variant") == "joycenerd":
        # The target is one of the denominator's images (no image of its own); the denominator's 3 + 3 images of the
        # prompt as written are counted with the case: 6 + the evaluations + 3, whatever happens.
        fixed = VAE_ENCODER_TFLOP + TEXT_ENCODER_FORWARD_TFLOP
        step = UNET_FORWARD_TFLOP + UNET_FWD_BWD_INPUT_TFLOP + TEXT_ENCODER_FWD_BWD_TFLOP
        images = 2 * JOYCENERD_IMAGES + len(range(0, iterations, every)) + JOYCENERD_IMAGES
        return AttackCase(steps=Range(iterations, iterations), judgments=Range(images, images),
                          encodings=Range(0, 0), tflop=Range(fixed + iterations * step, fixed + iterations * step))
    # Once a case: the original model's guided target image (--target_inference_steps), its VAE encode, the
    # original text encoder on the prompt (NoiseTarget). Each step: the original UNet's forward (the target noise),
    # the unlearned text encoder and UNet forward and backward to the learned embeddings.
    fixed = guided_image_tflop(s["target_inference_steps"]) + VAE_ENCODER_TFLOP + TEXT_ENCODER_FORWARD_TFLOP
    step = UNET_FORWARD_TFLOP + UNET_FWD_BWD_INPUT_TFLOP + TEXT_ENCODER_FWD_BWD_TFLOP
    steps = Range(0, iterations)  # low: the judgment at step 0 succeeds, before any update
    return AttackCase(steps=steps, judgments=Range(1, len(range(0, iterations, every)) + 1), encodings=Range(0, 0),
                      tflop=steps.scale(step) + Range(fixed, fixed))


def ringabell_encodings(s: dict) -> float:
    """Candidates tools/attacks/ringabell.py evolve encodes, expected: the first population, then each generation
    but the last its children (2 per crossed survivor) and its mutated survivors (the best one never)."""
    keep = max(1, s["population"] // 2)
    per_generation = 2 * keep * s["crossover_rate"] + (keep - 1) * s["mutation_rate"]
    return s["population"] + (s["generations"] - 1) * per_generation


def ringabell_case(s: dict) -> AttackCase:
    """tools/attacks/ringabell.py search: the genetic search in the text encoder, per case (its target is the
    case's prompt), then one judgment; no early stop."""
    encodings = ringabell_encodings(s)
    tflop = (1 + encodings) * TEXT_ENCODER_FORWARD_TFLOP  # + the case prompt's own encoding (the target)
    return AttackCase(steps=Range(s["generations"], s["generations"]), judgments=Range(1, 1),
                      encodings=Range(encodings, encodings), tflop=Range(tflop, tflop))


def replay_case(s: dict) -> AttackCase:
    """tools/attacks/replay.py: no search; its verdict is the one before the attack, kept."""
    return AttackCase(steps=Range(0, 0), judgments=Range(0, 0), encodings=Range(0, 0), tflop=Range(0.0, 0.0))


def mma_case(s: dict) -> AttackCase:
    """tools/attacks/mma.py search: --iterations GCG steps in the text encoder, each one forward and backward to the
    one-hot tokens and at most --candidates candidate forwards (those that tokenize back to themselves), then one
    judgment; no early stop, so low = high (the candidates all counted)."""
    encodings = s["iterations"] * s["candidates"]
    # + the case prompt's own encoding (the target embedding), once.
    tflop = (s["iterations"] * TEXT_ENCODER_FWD_BWD_TFLOP + (1 + encodings) * TEXT_ENCODER_FORWARD_TFLOP)
    return AttackCase(steps=Range(s["iterations"], s["iterations"]), judgments=Range(1, 1),
                      encodings=Range(encodings, encodings), tflop=Range(tflop, tflop))


def random_case(s: dict) -> AttackCase:
    """tools/attacks/random_tokens.py search: no optimisation, up to --tries judged prompts (low: the first)."""
    return AttackCase(steps=Range(0, 0), judgments=Range(1, s["tries"]), encodings=Range(0, 0),
                      tflop=Range(0.0, 0.0))


def seed_search_case(s: dict) -> AttackCase:
    """tools/attacks/seed_search.py search: the prompt on up to --seeds new seeds (low: the first succeeds)."""
    return AttackCase(steps=Range(0, 0), judgments=Range(1, s["seeds"]), encodings=Range(0, 0),
                      tflop=Range(0.0, 0.0))


ATTACK_CASES = {"unlearndiffatk": unlearndiffatk_case, "p4d-n": p4d_case, "p4d-k": p4d_case,
                "ringabell": ringabell_case, "mma": mma_case, "replay": replay_case, "none": replay_case,
                "random": random_case, "seed_search": seed_search_case}


def parse_attack(argv: Sequence[str]) -> Tuple[argparse.Namespace, dict]:
    """An attack command line's flags and the attack's settings (its own defaults filled in, as attack_settings
    does); files not checked, settings checked by the attack's own validator."""
    from tools import attack_prompts, attacks

    parser = attack_prompts.build_parser()

    def error(message):
        raise InputError(f"attack_prompts.py: {message}")

    parser.error = error
    args = parser.parse_args(list(argv))
    if args.attack not in ATTACK_CASES:
        raise InputError(f"--attack {args.attack}: no cost count for it (tools/cost.py ATTACK_CASES)")
    # --protocol published sets the sampler's steps and the judge as the run will (checks as the run's own).
    attack_prompts._apply_protocol(args, attack_prompts.explicit_flags(list(argv)))
    if attack_prompts.p4d_variant(args) == "dma":
        raise InputError(f"--attack {args.attack} --p4d_variant dma: no cost count for Diffusion-MU-Attack's P4D yet "
                         "(price it as unlearndiffatk plus one original-UNet forward per Adam step)")
    settings = attack_prompts.attack_settings(args)
    validate = attacks.validator(args.attack)
    if validate is not None:  # the pairs file is read below, where it exists
        validate({k: v for k, v in settings.items() if k != "pairs_file"})
    return args, settings


def attack_case_count(args: argparse.Namespace, notes: List[str]) -> int:
    """The cases of --prompts (its rows, read as the harness reads them), or an assumption said in ``notes``."""
    from tools.attacks import harness

    if os.path.isfile(args.prompts):
        return len(harness.read_cases(args.prompts, args.seed, args.guidance_scale).cases)
    nudity = (args.theme or "").lower() == "nudity"
    assumed = NUDITY_ATTACK_PROMPTS if nudity else PAPER_PROMPTS
    what = "the I2P nudity set's" if nudity else "the paper's validation prompts"
    notes.append(f"--prompts {args.prompts}: not found here, {assumed} cases assumed ({what})")
    return assumed


def _pair_count(path: Optional[str], notes: List[str]) -> int:
    """Ring-A-Bell's pairs (each encoded twice for the concept vector, once per process); 0 when not at hand."""
    if path and os.path.isfile(path):
        from tools.attacks.ringabell import read_pairs

        return len(read_pairs(path))
    notes.append(f"--pairs_file {path}: not found here, its encodings left out (2 a pair, once per process)")
    return 0


def judge_cost(args: argparse.Namespace, fig: Figures) -> Tuple[float, float]:
    """(TFLOP on the GPU, seconds on the host) of scoring one judged image."""
    if args.criterion == "clip":
        return CLIP_SCORE_TFLOP, 0.0
    if (args.theme or "").lower() == "nudity":
        return 0.0, fig.nudity_s_per_100_images / 100  # NudeNet on the host, the GPU waiting
    return CLASSIFIER_TFLOP, 0.0


def attack_tflops(fig: Figures, allow_tf32: bool = False) -> float:
    """Effective TFLOP/s of an attack's work on the figures' GPU: fp32 (TF32 matrix multiplies with --allow_tf32),
    one latent or image at a time."""
    per_image = validation_tflop(fig.inference_steps)
    if fig.validation_one_at_a_time_images_per_s:
        one = per_image * fig.validation_one_at_a_time_images_per_s
    else:
        one = per_image * fig.validation_images_per_s * ONE_AT_A_TIME_SHARE
    if fig.mixed_precision == "no":  # figures measured in fp32 already
        return one
    s = DIFFUSERS_A100_IMAGE_S
    return one * s["fp16"] / s["tf32" if allow_tf32 else "fp32"]


def estimate_attack(argv: Sequence[str], figures: Figures, num_processes: int = 1,
                    name: Optional[str] = None) -> AttackEstimate:
    """One tools/attack_prompts.py run's estimate from its command-line flags, on ``num_processes`` GPUs."""
    args, settings = parse_attack(argv)
    notes: List[str] = []
    cases = attack_case_count(args, notes)
    case = ATTACK_CASES[args.attack](settings)
    rate = attack_tflops(figures, args.allow_tf32)
    if args.allow_tf32:
        notes.append(f"--allow_tf32: TF32 matrix multiplies, about {rate:.1f} TFLOP/s")
    if figures.measured and not figures.validation_one_at_a_time_images_per_s:
        notes.append("measured figures without validation_one_at_a_time_images_per_s: diffusers' A100 share of "
                     "one-image-at-a-time work assumed for them")
    if args.resolution is None:
        notes.append("--resolution not given (the model's own): 512 px assumed (SD-1.x)")
    pixels = ((args.resolution or BENCHMARK_RESOLUTION) / BENCHMARK_RESOLUTION) ** 2
    score_tflop, score_s = judge_cost(args, figures)
    image_s = (guided_image_tflop(args.num_inference_steps, pixels) + score_tflop) / rate + score_s
    written = 1 + args.heldout_seeds  # the prompt as written, then the counting prompt on the held-out seeds
    case_images = case.judgments + Range(written, written)
    case_s = case.tflop.scale(1 / rate) + case_images.scale(image_s)
    once_s = 0.0
    if settings.get("p4d_variant") == "joycenerd":
        notes.append("--p4d_variant joycenerd: only the prompts the original model renders unsafe and the unlearned "
                     "one does not are attacked; every case is counted as attacked (an upper bound)")
    if args.attack == "ringabell" and not settings.get("concept_vector"):  # a vector file: nothing to compute
        once_s = 2 * _pair_count(settings.get("pairs_file"), notes) * TEXT_ENCODER_FORWARD_TFLOP / rate
        notes.append(RINGABELL_NOTE)
    n = num_processes
    rounds = math.ceil(cases / n)
    wall_s = case_s.scale(rounds) + Range(STARTUP_S + once_s, STARTUP_S + once_s)
    return AttackEstimate(
        name=name or args.output_dir, attack=args.attack, num_processes=n, cases=cases, rounds=rounds,
        heldout_seeds=args.heldout_seeds, case=case, case_images=case_images, case_s=case_s,
        not_attacked_s=written * image_s, once_s=once_s, wall_hours=wall_s.scale(1 / 3600),
        gpu_hours=wall_s.scale(n / 3600), notes=notes)


def estimate_attacks(runs, figures: Figures, num_processes: int = 1) -> List[Tuple[int, AttackEstimate]]:
    """(index, estimate) of each attack run among ``runs`` (GridRun objects, or (script, argv) pairs), as
    estimate_runs takes them."""
    out = []
    for i, run in enumerate(runs):
        if hasattr(run, "flags") and hasattr(run, "script"):
            if not is_attack(run.script):
                continue
            from tools.gridspec import launch_command

            cmd = shlex.split(launch_command(run, num_processes))
            out.append((i, estimate_attack(cmd[cmd.index(run.script) + 1:], figures, num_processes, name=run.name)))
        elif is_attack(run[0]):
            out.append((i, estimate_attack(run[1], figures, num_processes)))
    return out


# --- Output --------------------------------------------------------------------------------------------------

def _count(r: Range) -> str:
    return f"{r.low:,.0f}" if r.low == r.high else f"{r.low:,.0f}-{r.high:,.0f}"


def table(estimates: Sequence[RunEstimate], totals: Totals, figures: Figures, num_processes: int = 1) -> str:
    """The printed estimate: which figures, one row per run, the totals, the assumptions and the notes."""
    gpus = f"{num_processes} GPU{'s' if num_processes > 1 else ''}"
    lines = [describe_figures(figures),
             f"{gpus} per run; GPU-hours = GPUs x (training + latent cache + validation + {STARTUP_S:.0f} s start-up "
             f"+ saves at {WRITE_GB_PER_S} GB/s)",
             "low: every chunk revives at its first validation, high: none does (sequential runs: exact); disk: GB "
             "(1e9 bytes) at SD-1.x sizes, high bound",
             ""]
    width = max([len(e.name) for e in estimates] + [len(f"total ({totals.runs} runs)"), 3])
    head = (f"{'#':>3} {'run':<{width}} {'train samples':>14} {'validation images':>18} {'GPU-h low':>10} "
            f"{'GPU-h high':>10} {'disk GB final':>13} {'disk GB peak':>12}")
    lines += [head, "-" * len(head)]
    for i, e in enumerate(estimates):
        if not e.supported:
            lines.append(f"{i:>3} {e.name:<{width}} {'-':>14} {'-':>18} {'-':>10} {'-':>10} {'-':>13} {'-':>12}")
            continue
        lines.append(f"{i:>3} {e.name:<{width}} {_count(e.counts.train_samples):>14} "
                     f"{_count(e.counts.validation_images):>18} {e.gpu_hours.low:>10.3f} {e.gpu_hours.high:>10.3f} "
                     f"{e.disk_final_gb.high:>13.1f} {e.disk_peak_gb.high:>12.1f}")
    lines.append("-" * len(head))
    label = f"total ({totals.runs} runs)" if totals.estimated_runs == totals.runs else \
        f"total ({totals.estimated_runs} of {totals.runs} runs)"
    lines.append(f"{'':>3} {label:<{width}} {_count(totals.train_samples):>14} {_count(totals.validation_images):>18} "
                 f"{totals.gpu_hours.low:>10.3f} {totals.gpu_hours.high:>10.3f} {totals.disk_final_gb.high:>13.1f} "
                 f"{totals.disk_peak_gb.high:>12.1f}")
    done = [e for e in estimates if e.supported]
    if done:
        parts = {"training": sum(e.train_s.high for e in done), "latent cache": sum(e.cache_s for e in done),
                 "validation": sum(e.validation_s.high for e in done), "start-up": sum(e.startup_s for e in done),
                 "saves": sum(e.write_s.high for e in done)}
        lines.append("")
        lines.append("GPU-hours by part (high, all runs): " + ", ".join(
            f"{k} {v * num_processes / 3600:.3f}" for k, v in parts.items()))
    grouped = {}
    for i, e in enumerate(estimates):
        for note in e.notes:
            grouped.setdefault(note, []).append(i)
    if grouped:
        lines.append("")
        lines += [f"note (run{'s' if len(idx) > 1 else ''} {_indices(idx)}): {note}" for note, idx in grouped.items()]
    return "\n".join(lines)


def _indices(idx: List[int]) -> str:
    """'0-7' for a consecutive run of indices, else '0, 2, 5'."""
    if len(idx) > 1 and idx == list(range(idx[0], idx[-1] + 1)):
        return f"{idx[0]}-{idx[-1]}"
    return ", ".join(map(str, idx))


def as_json(estimates: Sequence[RunEstimate], totals: Totals, figures: Figures, num_processes: int = 1,
            attacks: Sequence[Tuple[int, AttackEstimate]] = ()) -> str:
    """The estimate as JSON: the figures, each run's counts, seconds, hours and disk, the totals, and the attack
    runs' estimates (``attacks``: (index, estimate), as estimate_attacks returns them)."""
    return json.dumps({"figures": asdict(figures), "headline": describe_figures(figures),
                       "num_processes": num_processes,
                       "assumptions": {"startup_s": STARTUP_S, "write_gb_per_s": WRITE_GB_PER_S, "gb": GB,
                                       "attack_tflops": attack_tflops(figures)},
                       "runs": [asdict(e) for e in estimates], "totals": asdict(totals),
                       "attacks": [{"index": i, **asdict(e)} for i, e in attacks]}, indent=2)


def attack_table(rows: Sequence[Tuple[int, AttackEstimate]], figures: Figures) -> str:
    """The printed estimate of the attack runs: one row per run (``rows``: (index, estimate)), the total, the notes."""
    fp16 = validation_tflop(figures.inference_steps) * figures.validation_images_per_s
    rate = attack_tflops(figures)
    lines = [f"prompt attacks (tools/attack_prompts.py): fp32, one latent or image at a time, about {rate:.1f} TFLOP/s "
             f"on these figures ({rate / fp16:.0%} of their batched fp16 rate: diffusers' A100 measurement, "
             "tools/cost.py); GPU-hours = GPUs x (start-up + rounds of one case per GPU)",
             "low: every attacked case succeeds at its search's first judgment, high: none does (Ring-A-Bell, "
             "replay: no early stop); judged images per attacked case include the prompt as written and the "
             "held-out seeds", ""]
    width = max([len(e.name) for _, e in rows] + [len("total"), 3])
    head = (f"{'#':>3} {'run':<{width}} {'attack':<14} {'cases':>5} {'images/case':>11} {'GPU-min/case':>14} "
            f"{'GPU-h low':>10} {'GPU-h high':>10}")
    lines += [head, "-" * len(head)]
    for i, e in rows:
        minutes = Range(e.case_s.low / 60, e.case_s.high / 60)
        per_case = f"{minutes.low:.2f}" if minutes.low == minutes.high else f"{minutes.low:.2f}-{minutes.high:.2f}"
        lines.append(f"{i:>3} {e.name:<{width}} {e.attack:<14} {e.cases:>5} {_count(e.case_images):>11} "
                     f"{per_case:>14} {e.gpu_hours.low:>10.3f} {e.gpu_hours.high:>10.3f}")
    total = Range(sum(e.gpu_hours.low for _, e in rows), sum(e.gpu_hours.high for _, e in rows))
    lines += ["-" * len(head),
              f"{'':>3} {'total':<{width}} {'':<14} {sum(e.cases for _, e in rows):>5} {'':>11} {'':>14} "
              f"{total.low:>10.3f} {total.high:>10.3f}"]
    if rows:
        lines.append("a case judged a success as written is not attacked: its image and its held-out images, at most "
                     f"{max(e.not_attacked_s for _, e in rows):.0f} s a case here")
    grouped = {}
    for i, e in rows:
        for note in e.notes:
            grouped.setdefault(note, []).append(i)
    lines += [f"note (run{'s' if len(idx) > 1 else ''} {_indices(idx)}): {note}" for note, idx in grouped.items()]
    return "\n".join(lines)
