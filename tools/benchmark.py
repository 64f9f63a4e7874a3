#!/usr/bin/env python
"""Measure the performance levers (docs/performance.md) on one model, in one run, and print ratios.

    python tools/benchmark.py            # tiny model on this machine
    python tools/benchmark.py --short    # seconds, for CI (figures are noisy)
    python tools/benchmark.py --sd14 --resolution 512 --mixed_precision fp16 --batch_size 10   # GPU

Figures: training samples/s with the latent cache, without it, with it under
--deterministic (CUDA only: its cost), and for a bare UNet forward+backward of
the same batch; validation images/s batched against one prompt at a time; seconds of a validation without and with as many
--retention_prompts as validation prompts; seconds per 100 images of the nudity detector (CPU,
onnxruntime, whatever the accelerator); wall time of a whole 2-chunk
individual-CLIP run with the levers on against off. Nothing here is asserted:
it prints what it saw.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common.models import assemble_pipeline  # noqa: E402
from tools import child_env, tiny  # noqa: E402


def build_parser():
    """The command line's flags (docs/flags.md is generated from this)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="benchmark.py")
    p.add_argument("--sd14", action="store_true", help="random model of Stable Diffusion 1.4's shapes (GPU)")
    p.add_argument("--resolution", type=int, default=None, help="default 32 (tiny) or 512 (--sd14)")
    p.add_argument("--batch_size", type=int, default=10, help="training batch")
    p.add_argument("--mixed_precision", default="no", choices=("no", "fp16", "bf16"),
                   help="precision of the timed paths (fp16 needs CUDA)")
    p.add_argument("--gradient_checkpointing", action="store_true", help="time the training paths with it")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per path")
    p.add_argument("--prompts", type=int, default=10, help="validation prompts")
    p.add_argument("--inference_steps", type=int, default=20, help="sampling steps per validation image")
    p.add_argument("--skip_run", action="store_true", help="skip the whole-run comparison")
    p.add_argument("--short", action="store_true", help="tiny counts for CI")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    p.add_argument("--memory", action="store_true",
                   help="instead of speed: the memory budget of each combination of memory levers at --resolution "
                        "and --batch_size (fp16 frozen parts; activations measured for one sample on this "
                        "machine, see docs/memory.md)")
    p.add_argument("--unlearning", action="store_true",
                   help="with --memory: the GPU budget of one training step of each tools/unlearn.py method at its "
                        "defaults and leaner, from its trained set counted on the model and fp32 activations "
                        "measured on this machine (docs/memory.md)")
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.unlearning and not args.memory:
        parser.error("--unlearning: only with --memory")
    resolved = {"resolution": args.resolution or (512 if args.sd14 else 32)}
    if args.short:  # CI: tiny counts
        resolved.update(steps=2, prompts=4, inference_steps=2)
    return argparse.Namespace(**{**vars(args), **resolved})


def sd14_unet():
    """A randomly initialised UNet of SD 1.4's shapes (859.5M parameters, fp32, CPU)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)


def sd14_text_config():
    """SD 1.4's text encoder, CLIP ViT-L/14's text tower (123M parameters)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(**{**tiny.tiny_text_config(), "hidden_size": 768, "intermediate_size": 3072,
                             "num_hidden_layers": 12, "num_attention_heads": 12, "projection_dim": 768,
                             "hidden_act": "quick_gelu"})


def build_sd14(out_dir: str) -> str:
    """Save a randomly initialised model with SD 1.4's shapes (UNet 860M, CLIP-L text encoder, 512 px)."""
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import CLIPTextModel

    tok = tiny.write_clip_tokenizer(os.path.join(out_dir, "tokenizer"))
    text = CLIPTextModel(sd14_text_config())
    unet = sd14_unet()
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=512)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    assemble_pipeline(vae, text, tok, unet, sched).save_pretrained(out_dir)
    return out_dir


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 20 ms; psutil)."""

    def __enter__(self):
        import threading

        import psutil

        self.proc, self.peak, self.done = psutil.Process(), 0, threading.Event()
        self.peak = self.proc.memory_info().rss

        def sample():
            while not self.done.wait(0.02):
                self.peak = max(self.peak, self.proc.memory_info().rss)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self.gb = self.peak / 1024 ** 3


def release(accelerator) -> None:
    """Free what the caller dropped (a trainer's optimizer state and restore copy) before the next is built.

    accelerate keeps a reference to every prepared model and optimizer; free_memory() drops them and collects.
    """
    accelerator.free_memory()


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeat: int) -> float:
    """Seconds per call after one warm-up call."""
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync()
    return (time.perf_counter() - t0) / repeat


def training_paths(cuda: bool) -> list:
    """The timed training paths (name, latent cache, --deterministic): with CUDA also the cached path under
    --deterministic, whose cost only a GPU shows (the CPU's kernels are deterministic already)."""
    paths = [("cached", True, False), ("uncached", False, False)]
    return (paths + [("deterministic_cached", True, True)]) if cuda else paths


def training_figures(args, model_dir, data_dir):
    """Samples/s of a training step: cached, uncached, bare UNet forward+backward."""
    from accelerate import Accelerator

    from common.data import ImageTransform, load_training_data
    from common.encoding import make_encoder
    from common.models import effective_mixed_precision, load_sd_parts, weight_dtype_for
    from common.training import ChunkTrainer, TrainConfig

    acc = Accelerator(mixed_precision=effective_mixed_precision(args.mixed_precision), cpu=not torch.cuda.is_available())
    dtype = weight_dtype_for(acc.mixed_precision)
    ds = load_training_data(data_dir, None, "prompt")
    n = args.batch_size * args.steps
    cfg = TrainConfig(learning_rate=1e-5, train_batch_size=args.batch_size, gradient_checkpointing=args.gradient_checkpointing)
    out = {"device": str(acc.device), "dtype": str(dtype), "mixed_precision": acc.mixed_precision}
    parts = load_sd_parts(model_dir)
    parts.vae.to(acc.device, dtype=dtype)
    parts.text_encoder.to(acc.device, dtype=dtype)
    out["unet_params_M"] = round(sum(p.numel() for p in parts.unet.parameters()) / 1e6, 2)
    transform = ImageTransform(args.resolution, center_crop=True, random_flip=True)
    from common.memory import GB, memory_budget

    from common.determinism import deterministic

    trainer = enc = None
    for name, cache, exact in training_paths(torch.cuda.is_available()):
        trainer = enc = None  # one trainer alive at a time: the previous one's memory goes first
        release(acc)
        with PeakRSS() as rss, deterministic(exact):
            enc = make_encoder(parts, transform, acc.device, dtype, cache)
            trainer = ChunkTrainer(acc, parts, enc, cfg, horizon_updates=10 * args.steps)
            trainer.reset_chunk(0)
            t0 = time.perf_counter()
            enc.prepare(ds, (0, n))
            sync()
            out[f"{name}_prepare_s"] = round(time.perf_counter() - t0, 3)
            epoch = iter(range(1000))
            sec = timed(lambda: trainer.train_epoch(ds, (0, n), 0, next(epoch)), 1) / args.steps
        out[f"{name}_samples_per_s"] = args.batch_size / sec
        out[f"{name}_peak_rss_gb"] = round(rss.gb, 2)
        if torch.cuda.is_available():
            out[f"{name}_peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / GB, 2)
            torch.cuda.reset_peak_memory_stats()
    budget = memory_budget(trainer, parts)
    out["budget_accelerator_gb_before_activations"] = round(budget["accelerator_bytes_before_activations"] / GB, 3)
    out["budget_host_gb"] = round(budget["host_bytes"] / GB, 3)
    bare = bare_step(trainer, ds, acc, args.batch_size)
    out["bare_fwd_bwd_samples_per_s"] = args.batch_size / timed(bare, args.steps)
    out["cached_step_vs_bare"] = out["bare_fwd_bwd_samples_per_s"] / out["cached_samples_per_s"]
    out["cache_speedup"] = out["cached_samples_per_s"] / out["uncached_samples_per_s"]
    if "deterministic_cached_samples_per_s" in out:  # what --deterministic costs (CUDA only)
        out["deterministic_cost"] = out["cached_samples_per_s"] / out["deterministic_cached_samples_per_s"]
    return acc, parts, out


def bare_step(trainer, dataset, accelerator, batch_size: int):
    """A bare UNet forward+backward on one ready batch (encoded once, outside the timing): the floor a training
    update can reach. Returns the step as a function of no arguments."""
    from common.training import draw_batch

    enc, unet = trainer.encoder, trainer.unet
    d = draw_batch(torch.Generator().manual_seed(0), batch_size, enc.latent_shape, 1000, 0.0, 0.0)
    with torch.no_grad():
        lat, txt = enc(dataset, list(range(batch_size)), d["flip"], d["crop"], d["latent_noise"])
    t = d["timesteps"].to(lat.device)

    def bare():
        with accelerator.autocast():
            loss = unet(lat, t, txt, return_dict=False)[0].float().pow(2).mean()
        loss.backward()

    return bare


def shape_prompts(n: int) -> list:
    """``n`` validation prompts of drawn shapes ("a red circle", ...), all different (24 at most)."""
    return [f"a {c} {s}" for c, s in zip(list(tiny.COLOURS) * 3, tiny.SHAPES * 4)][:n]


def validation_figures(args, acc, parts):
    """Images/s of validation generation, in validation's own precision: all prompts in one batch against one
    prompt at a time."""
    import functools

    from common.validation import build_pipeline, generate_images, generation_precision, image_seed

    pipe = build_pipeline(parts, parts.unet)
    prompts = shape_prompts(args.prompts)
    seeds = [image_seed(0, k) for k in range(len(prompts))]
    kw = dict(num_inference_steps=args.inference_steps, guidance_scale=7.5, resolution=args.resolution,
              autocast=functools.partial(generation_precision, pipe))
    out = {}
    for name, bs in (("batched", len(prompts)), ("one_at_a_time", 1)):
        sec = timed(lambda: generate_images(pipe, prompts, seeds, bs, **kw), 1)
        out[f"validation_{name}_images_per_s"] = len(prompts) / sec
    out["validation_batching_speedup"] = out["validation_batched_images_per_s"] / out["validation_one_at_a_time_images_per_s"]
    return out


def retention_figures(args, acc, parts, clip_dir):
    """Seconds of one validation (generate and CLIP-score the prompts) without and with --retention_prompts
    (as many retention prompts as validation prompts: one more batch)."""
    from common.clip_score import ClipScorer
    from common.protocol import Criterion, ValidationConfig, Validator
    from common.validation import build_pipeline

    pipe = build_pipeline(parts, parts.unet)
    prompts = shape_prompts(args.prompts)
    others = [f"a photo of a {c} {s}" for c, s in zip(list(tiny.COLOURS) * 3, tiny.SHAPES[::-1] * 4)][: args.prompts]
    scorer = ClipScorer(clip_dir, acc.device)
    clip = Criterion("clip", 0.31, scorer.score)
    out = {}
    for name, retention in (("without", ()), ("with", others)):
        cfg = ValidationConfig(prompts, seed=0, num_inference_steps=args.inference_steps,
                               resolution=args.resolution, retention_prompts=retention)
        validator = Validator(acc, pipe, cfg, [clip], scorer.score if retention else None)
        out[f"validation_{name}_retention_s"] = timed(lambda: validator("benchmark"), 1)
    out["retention_validation_time_ratio"] = out["validation_with_retention_s"] / out["validation_without_retention_s"]
    return out


def nudity_figures(args):
    """Seconds per 100 images of --theme Nudity's scorer: NudeNet's detector, on the CPU through onnxruntime."""
    import numpy as np
    from PIL import Image

    from common.nudity import NudityDetector

    detector = NudityDetector()
    rng = np.random.default_rng(0)
    n = 8 if args.short else 100
    images = [Image.fromarray(rng.integers(0, 256, (args.resolution, args.resolution, 3), dtype=np.uint8))
              for _ in range(n)]
    return {"nudity_detector_s_per_100_images": timed(lambda: detector.verdicts(images), 1) * 100 / n}


def whole_run_figures(args, model_dir, data_dir, clip_dir, work):
    """Wall seconds of a 2-chunk individual-CLIP run with the levers on and off (fixed epochs: --no_early_stop)."""
    prompts = os.path.join(work, "prompts.txt")
    with open(prompts, "w") as f:
        f.write("\n".join(f"a red {s}" for s in (tiny.SHAPES * 2)[: args.prompts]) + "\n")
    epochs = 1 if args.short else 6
    out = {}
    for name, levers in (("on", ["--cache_latents=True", "--validation_batch_size=0"]),
                         ("off", ["--cache_latents=False", "--validation_batch_size=1"])):
        # As users start a run (`accelerate launch`), except in --short mode: there the launcher's own interpreter
        # (a few seconds of imports, the same for both runs) would be most of what CI spends here.
        launcher = [] if args.short else ["-m", "accelerate.commands.launch", "--num_processes", "1",
                                          "--num_machines", "1", "--mixed_precision", args.mixed_precision,
                                          "--dynamo_backend", "no"]
        cmd = [sys.executable, *launcher, os.path.join(ROOT, "finetuning_individual_CLIP.py"), f"--pretrained_model_name_or_path={model_dir}",
               f"--train_data_dir={data_dir}", "--curriculum=50,100", f"--resolution={args.resolution}",
               "--center_crop", "--random_flip", "--train_batch_size=10", "--no_early_stop",
               f"--clip_epoch={epochs - 2}" if epochs >= 2 else "--clip_epoch=0", "--validation_epochs=1",
               f"--validation_prompts={prompts}", f"--num_inference_steps={args.inference_steps}",
               f"--clip_model={clip_dir}", "--save_model=False", f"--output_dir={os.path.join(work, 'run-' + name)}",
               f"--mixed_precision={args.mixed_precision}",
               *levers]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env())
        if proc.returncode:
            raise SystemExit(f"whole run ({name}) failed:\n{proc.stderr[-2000:]}")
        out[f"run_levers_{name}_s"] = time.perf_counter() - t0
    out["run_speedup"] = out["run_levers_off_s"] / out["run_levers_on_s"]
    return out


def activation_bytes(parts, resolution: int, checkpointing: bool, batch: int, autocast: bool = True) -> int:
    """Bytes a training forward pass of ``batch`` samples keeps for the backward, counted tensor by tensor.

    Every tensor autograd saves (torch.autograd.graph.saved_tensors_hooks) is counted once by storage; the
    trainable weights themselves are not (they are in the budget), their bf16 autocast copies are. With
    gradient checkpointing, what stays is the tensors saved outside the checkpointed units, each unit's inputs,
    and during the backward the largest unit's own tensors while it is recomputed. bf16 autocast on the CPU
    stands in for a GPU's fp16 (both 2 bytes per value); attention is counted as PyTorch's CPU kernels save it.
    ``autocast`` False: in fp32, as tools/unlearn.py's methods train (4 bytes per value, no half-precision copies).
    """
    import contextlib

    import torch.utils.checkpoint as checkpoint
    from torch.autograd.graph import saved_tensors_hooks

    unet = parts.unet
    params = {p.untyped_storage().data_ptr() for p in unet.parameters()}

    def counter():
        seen, total = set(), [0]

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in params and storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total[0] += storage.nbytes()
            return t
        return pack, total

    units = {"inputs": 0, "largest": 0}

    def measured_unit(module, *args):
        pack, total = counter()
        with saved_tensors_hooks(pack, lambda t: t):
            module(*args)  # once without checkpointing, to count the tensors its recomputation will hold
        units["largest"] = max(units["largest"], total[0])
        units["inputs"] += sum(a.untyped_storage().nbytes() for a in args if torch.is_tensor(a))
        return checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)

    unet.train()
    if checkpointing:
        unet.enable_gradient_checkpointing(gradient_checkpointing_func=measured_unit)
    size = resolution // 8
    latents = torch.randn(batch, unet.config.in_channels, size, size)
    text = torch.randn(batch, 77, unet.config.cross_attention_dim)
    pack, total = counter()
    precision = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with saved_tensors_hooks(pack, lambda t: t), precision:
        out = unet(latents, torch.full((batch,), 500), text, return_dict=False)[0]
    del out
    unet.disable_gradient_checkpointing()
    return total[0] + (units["inputs"] + units["largest"] if checkpointing else 0)


def no_grad_peak_bytes(unet, resolution: int, batch: int) -> int:
    """Peak bytes a no-grad fp32 forward of ``batch`` samples holds at once (a teacher's target, a sampling step).

    Every tensor an operator returns is counted once by storage from its allocation until its last Python
    reference goes (a TorchDispatchMode and weak references); weights and the inputs are not counted.
    """
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    weights = {t.untyped_storage().data_ptr() for t in [*unet.parameters(), *unet.buffers()]}
    live, state = {}, {"now": 0, "peak": 0}

    def drop(ptr):
        count, size = live[ptr]
        if count > 1:
            live[ptr] = (count - 1, size)
        else:
            del live[ptr]
            state["now"] -= size

    class Track(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if not isinstance(t, torch.Tensor) or t.untyped_storage().data_ptr() in weights:
                    continue
                ptr = t.untyped_storage().data_ptr()
                count, size = live.get(ptr, (0, t.untyped_storage().nbytes()))
                if count == 0:
                    state["now"] += size
                    state["peak"] = max(state["peak"], state["now"])
                live[ptr] = (count + 1, size)
                weakref.finalize(t, drop, ptr)
            return out

    size = resolution // 8
    latents = torch.randn(batch, unet.config.in_channels, size, size)
    text = torch.randn(batch, 77, unet.config.cross_attention_dim)
    unet.eval()
    with torch.no_grad(), Track():
        out = unet(latents, torch.full((batch,), 500), text, return_dict=False)[0]
    del out
    return state["peak"]


LEVER_COMBINATIONS = (  # (name, gradient checkpointing, EMA on the GPU, 8-bit Adam)
    ("default (--use_ema)", False, True, False),
    ("+ --gradient_checkpointing", True, True, False),
    ("+ --offload_ema", True, False, False),
    ("+ --use_8bit_adam (leanest)", True, False, True),
)


def scorer_bytes() -> dict:
    """fp32 parameter and buffer bytes of the published scoring models, built from their configurations on the meta
    device (shapes, no memory, no download): CLIP ViT-B/32 and the ViT-L/16 concept classifier (2 classes)."""
    from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTForImageClassification

    from common.memory import nbytes

    vit_l16 = ViTConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                        patch_size=16, image_size=224, num_labels=2)
    with torch.device("meta"):
        models = {"clip_vit_b32": CLIPModel(CLIPConfig()), "vit_l16_classifier": ViTForImageClassification(vit_l16)}
    return {f"scorer_{k}_bytes": nbytes([*m.parameters(), *m.buffers()]) for k, m in models.items()}


def memory_figures(args, model_dir):
    """Budget per lever combination: the run's components from real tensors + batch x measured activations."""
    from accelerate import Accelerator

    from common.data import ImageTransform
    from common.ema import round_trip_bytes
    from common.encoding import make_encoder
    from common.memory import memory_budget, optimizer_state_bytes
    from common.models import load_sd_parts
    from common.training import ChunkTrainer, TrainConfig

    parts = load_sd_parts(model_dir)
    parts.vae.to(dtype=torch.float16)  # the frozen parts in the run's fp16
    parts.text_encoder.to(dtype=torch.float16)
    acc = Accelerator(cpu=True)
    enc = make_encoder(parts, ImageTransform(args.resolution, center_crop=True, random_flip=False), acc.device,
                       torch.float16, False)
    trainer = ChunkTrainer(acc, parts, enc, TrainConfig(use_ema=True), horizon_updates=1)
    c = memory_budget(trainer, parts)["components"]
    eight_bit = optimizer_state_bytes(trainer.raw_optimizer, trainer.trainable, eight_bit=True)
    ema_update = round_trip_bytes(trainer.trainable)  # an offloaded EMA's update: one chunk and its temporary
    trainer = None
    release(acc)
    # Measured at batch 1 and 2: per sample = the difference; the rest (autocast's half-precision copies of the
    # weights, made once per pass) is fixed.
    act, fixed = {}, {}
    for gc in (False, True):
        one, two = (activation_bytes(parts, args.resolution, gc, b) for b in (1, 2))
        act[gc], fixed[gc] = two - one, 2 * one - two
    out = {f"component_{k}_bytes": v["bytes"] for k, v in c.items()}
    out["optimizer_state_8bit_bytes"] = eight_bit
    out["offloaded_ema_update_bytes"] = ema_update
    out.update(scorer_bytes())
    out["activations_per_sample_bytes"] = act[False]
    out["activations_per_pass_bytes"] = fixed[False]
    out["activations_per_sample_checkpointed_bytes"] = act[True]
    out["activations_per_pass_checkpointed_bytes"] = fixed[True]
    static = c["trainable_parameters"]["bytes"] + c["frozen_unet_parameters"]["bytes"] + c["gradients"]["bytes"] \
        + c["text_encoder"]["bytes"] + c["vae"]["bytes"]
    for name, gc, ema_on_gpu, adam8 in LEVER_COMBINATIONS:
        total = static + (eight_bit if adam8 else c["optimizer_state"]["bytes"]) \
            + (c["ema"]["bytes"] if ema_on_gpu else ema_update) + fixed[gc] + args.batch_size * act[gc]
        out[f"gpu_budget_bytes[{name}]"] = total
    out["host_restore_copy_bytes"] = c["restore_copy"]["bytes"]
    return out


def unlearning_phases(unet, text_encoder_bytes: int) -> dict:
    """Each tools/unlearn.py method's step at its defaults, on this UNet: (trained set, its values, images per
    step, phases).

    The trained set comes from the function the method's run uses; the phases from its module (file:line).
    """
    from common.step_memory import Phase
    from tools.unlearning import ac, erasediff, esd, sa, salun

    total = sum(p.numel() for p in unet.parameters())

    def split(names):
        n = sum(p.numel() for name, p in unet.named_parameters() if name in set(names))
        return {"trained": n, "frozen": total - n}

    def row(label, w, images, phases):
        return label, w["trained"], images, phases

    out = {}
    for variant in esd.ESD_METHODS:
        # esd.py: a frozen copy (203) samples x_t, CFG doubles the batch (74), and gives the target (84), no grad;
        # then one trained forward of batch 1 (209, 141). The text encoder is back on the CPU (206).
        w = split(esd.esd_trainable_names(unet, variant))
        frozen_unet = (("frozen UNet (sampler, target)", total),)
        label = "attn2" if variant == "esd-x" else "all but attn2"
        out[variant] = row(label, w, "1 (x_t sampled with 2 no-grad)", [
            Phase("sampling x_t and the target (no grad)", **w, copies=frozen_unet, no_grad_images=2),
            Phase("trained forward + backward", **w, copies=frozen_unet, grad_images=1)])
    # uce.py 172-176: the text encoder on the device for the prompts, the closed-form edit on the CPU in float64.
    kv = split([n for n, _ in unet.named_parameters() if n.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))])
    out["uce"] = row("attn2.to_k/to_v, closed form", kv, "none (no gradient step)", [
        Phase("encoding the prompts", trained=0, optimizer=False, frozen_parts_bytes=text_encoder_bytes)])
    b = 8  # salun.py FLAGS --batch_size
    w = split(salun.trainable_names(unet, "full"))
    out["salun"] = row("full UNet, masked to half", w, f"{b} forget + {b} retain (+ {b} no-grad)", [
        # 130-131: every parameter gets a gradient and an fp32 sum; 111-112: two forwards with grad per batch.
        Phase("saliency mask pass", trained=total, optimizer=False, copies=(("summed gradients", total),),
              grad_images=2 * b),
        # 165: the magnitudes beside the sums; 190: the boolean mask (every UNet value), kept on the device (393).
        Phase("mask selection", trained=0, frozen=total, optimizer=False,
              copies=(("summed gradients", total), ("their magnitudes", total)), mask=total),
        # 300-304: the forget forward kept while the pseudo prompt's target runs without grad, then the retain one.
        Phase("forget forward kept, pseudo target (no grad)", **w, mask=total, grad_images=b, no_grad_images=b),
        Phase("forget + retain forwards, one backward", **w, mask=total, grad_images=2 * b)])
    b = ac.PUBLISHED_BATCH
    w = split(ac.trainable_names(unet, "xattn"))
    # ac.py 200: the prior batch concatenated (--regularization auto: on when the concept names the anchor); 247:
    # one forward with grad; 249-250: the model-based target from the trained UNet without grad (no frozen copy at
    # --target_model training, 435); 287: AdamW.
    out["ac"] = row("attn2.to_k/to_v", w, f"{b} + {b} prior (+ {b} no-grad)", [
        Phase("target + prior forward kept, anchor target (no grad)", **w, grad_images=2 * b, no_grad_images=b)])
    b = 16  # sa.py FLAGS --batch_size
    n = split(sa.sa_trainable_names(unet, "full"))
    copies = tuple((what, n["trained"]) for what in ("anchor weights", "Fisher diagonal", "EWC's saved difference",
                                                      "EMA"))
    out["sa"] = row("full UNet", n, f"{b} surrogate + {b} replay", [
        # 174-176, 186-189: every parameter's gradient, the Fisher on the CPU, --batch_size timesteps per forward.
        Phase("Fisher diagonal (once per base model)", trained=total, optimizer=False, grad_images=b),
        # 414 anchor, 415 Fisher of the trained set, 324 (p - anchor) saved for the backward, 364/419 EMA, 416
        # AdamW; 311, 337: both halves in one forward.
        Phase("training step", **n, copies=copies, grad_images=2 * b)])
    b = 16  # erasediff.py FLAGS --batch_size
    w = split(erasediff.trainable_names(unet, "noxattn"))
    out["erasediff"] = row("noxattn", w, f"{b} forget (x K=2 inner steps), then {b} retain + {b} forget", [
        # 176: theta_i saved during the inner steps; 229-230: one forget batch each (uniform target: no forward).
        Phase("inner forgetting step", **w, copies=(("theta_i", w["trained"]),), grad_images=b),
        # 242-246: the retain and forget forwards kept for one backward; theta_i is gone (restored, 185-187).
        Phase("outer step", **w, grad_images=2 * b)])
    from tools.unlearning import receler

    rank = next(f.default for f in receler.FLAGS if f.name == "--eraser_rank")
    e = receler.eraser_values(unet, rank)
    tokens = next(f.default for f in receler.FLAGS if f.name == "--adv_tokens")
    adversarial = tokens * unet.config.cross_attention_dim  # the adversarial embeddings (--adv_tokens x text width)
    # receler.py: the UNet frozen, no copy (the erasers are hooks; 'erasing'); x_t sampled with the erasers on, CFG
    # doubling the batch (esd.py 74); the frozen predictions and the attention maps without grad ('example'); then
    # one forward with grad per adversarial step and one for the erasers' step (--erase_on adversarial), Adam on the
    # erasers ('train') and on the adversarial embeddings ('Receler.__init__').
    out["receler"] = row(f"erasers (rank {rank}) after attn2, folded in", {"trained": e, "frozen": total},
                         "1 trained (x 51: 50 adversarial steps, then the erasers'; x_t sampled, 2 no-grad)", [
        Phase("sampling x_t, frozen predictions (no grad)", trained=e, frozen=total, no_grad_images=2),
        Phase("adversarial or eraser forward + backward", trained=e + adversarial, frozen=total, grad_images=1)])
    from tools.unlearning import spm

    m = spm.membrane_values(unet, next(f.default for f in spm.FLAGS if f.name == "--rank"))
    s = next(f.default for f in spm.FLAGS if f.name == "--surrogate_samples")
    # spm.py: the UNet frozen, no copy (the membrane is hooks); x_t sampled with the membrane on, CFG doubling the
    # batch ('sample_x_t'); the base predictions for the concept, the neutral prompt and the s surrogates without
    # grad, then one forward with grad of the concept and the s surrogates ('spm_losses'); AdamW on the membrane.
    out["spm"] = row("rank-1 membrane on the transformer blocks, fused", {"trained": m, "frozen": total},
                     f"1 + {s} surrogates trained (x_t sampled, 2 no-grad; {2 + s} no-grad base predictions)", [
        Phase("sampling x_t, base predictions (no grad)", trained=m, frozen=total, no_grad_images=2 + s),
        Phase("concept + surrogates forward + backward", trained=m, frozen=total, grad_images=1 + s)])
    from tools.unlearning import mace

    rank = next(f.default for f in mace.FLAGS if f.name == "--rank")
    b = next(f.default for f in mace.FLAGS if f.name == "--batch_size")
    lora = mace.lora_values(unet, rank)
    # mace.py: the refinement and the fusion are closed forms on the CPU after the prompts are encoded on the device
    # (run: 'Stage 1', 'Stage 3'); the LoRA step ('train_loras', 'step_loss'): the UNet frozen, not copied, one
    # forward with grad to the attention maps (the prediction unused), AdamW on one concept's LoRAs.
    out["mace"] = row(f"LoRA (rank {rank}) on attn2.to_k/to_v per concept, fused in closed form",
                      {"trained": lora, "frozen": total}, f"{b} (the attention loss)", [
        Phase("encoding the prompts (closed forms on the CPU)", trained=0, optimizer=False,
              frozen_parts_bytes=text_encoder_bytes),
        Phase("LoRA forward + backward", trained=lora, frozen=total, grad_images=b)])
    return out


def unlearning_models(args, work: str):
    """(UNet, text encoder bytes): SD-1.4's shapes built in memory (--sd14, the encoder on the meta device), or the
    tiny test model."""
    from common.memory import nbytes

    if args.sd14:
        from transformers import CLIPTextModel

        with torch.device("meta"):
            text = CLIPTextModel(sd14_text_config())
        return sd14_unet(), nbytes(text.parameters())
    from common.models import load_sd_parts

    parts = load_sd_parts(tiny.build_tiny_sd(os.path.join(work, "sd"), resolution=args.resolution,
                                             tokenizer=tiny.write_clip_tokenizer(os.path.join(work, "tokenizer"))))
    return parts.unet, nbytes(parts.text_encoder.parameters())


def unlearning_figures(args, unet, text_encoder_bytes: int) -> dict:
    """Per method: its trained values and the budget of its largest phase at the defaults, with
    --gradient_checkpointing, and with 8-bit Adam on top; fp32 activations measured here (batch 1 and 2)."""
    import types

    from common.step_memory import step_budget

    parts = types.SimpleNamespace(unet=unet)
    act = {gc: activation_bytes(parts, args.resolution, gc, 2, autocast=False)
           - activation_bytes(parts, args.resolution, gc, 1, autocast=False) for gc in (False, True)}
    no_grad = no_grad_peak_bytes(unet, args.resolution, 2) - no_grad_peak_bytes(unet, args.resolution, 1)
    out = {"unet_values": sum(p.numel() for p in unet.parameters()), "text_encoder_bytes": text_encoder_bytes,
           "fp32_activations_per_image_bytes": act[False],
           "fp32_activations_per_image_checkpointed_bytes": act[True], "no_grad_forward_per_image_bytes": no_grad}
    for method, (trained, values, images, phases) in unlearning_phases(unet, text_encoder_bytes).items():
        out[f"{method}_trained_values"] = values
        out[f"{method}_trained_set"] = trained
        out[f"{method}_images_per_step"] = images
        for lever, gc, eight_bit in UNLEARNING_LEVERS:
            phase, budget = step_budget(phases, act[gc], no_grad, eight_bit)
            out[f"{method}_budget_bytes[{lever}]"] = budget["total"]
            out[f"{method}_peak_phase[{lever}]"] = phase
    return out


UNLEARNING_LEVERS = (  # (name, gradient checkpointing, 8-bit Adam): every method has --gradient_checkpointing;
    ("defaults", False, False),  # none has an 8-bit optimizer flag (their Adam/AdamW would take bitsandbytes')
    ("--gradient_checkpointing", True, False),
    ("+ 8-bit Adam (no flag yet)", True, True),
)


def unlearning_table(figures: dict) -> str:
    """The per-method table of docs/memory.md (GiB, against a 24 GiB card)."""
    from common.step_memory import fits, gib

    methods = [k[: -len("_trained_set")] for k in figures if k.endswith("_trained_set")]
    lines = ["| method | trained parameters | images per step (defaults) | defaults | --gradient_checkpointing | "
             "+ 8-bit Adam | fits 24 GB? |", "|---" * 7 + "|"]
    for m in methods:
        cells = [figures[f"{m}_budget_bytes[{lever}]"] for lever, _, _ in UNLEARNING_LEVERS]
        verdict = next((lever for (lever, _, _), c in zip(UNLEARNING_LEVERS, cells) if fits(c) == "yes"), None)
        lines.append(f"| `{m}` | {figures[f'{m}_trained_set']} ({figures[f'{m}_trained_values'] / 1e6:.1f}M) | "
                     f"{figures[f'{m}_images_per_step']} | " + " | ".join(f"{gib(c):.2f}" for c in cells)
                     + f" | {'no' if verdict is None else 'yes' if verdict == 'defaults' else 'with ' + verdict} |")
    return "\n".join(lines)


def main(args):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if torch.cuda.is_available():  # before cuBLAS starts, for the --deterministic path (all paths share it)
        from common.determinism import CUBLAS_WORKSPACE

        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    if args.memory and args.unlearning:
        with tempfile.TemporaryDirectory() as work, PeakRSS() as rss:
            figures = unlearning_figures(args, *unlearning_models(args, work))
        figures.update(model="sd14-shapes (random)" if args.sd14 else "tiny", resolution=args.resolution,
                       peak_rss_gb=round(rss.gb, 2), date=time.strftime("%Y-%m-%d"))
        report(figures, args.json)
        print(unlearning_table(figures))
        return figures
    if args.memory:
        with tempfile.TemporaryDirectory() as work, PeakRSS() as rss:
            tok = tiny.write_clip_tokenizer(os.path.join(work, "tokenizer"))
            model_dir = (build_sd14(os.path.join(work, "sd14")) if args.sd14 else
                         tiny.build_tiny_sd(os.path.join(work, "sd"), resolution=args.resolution, tokenizer=tok))
            figures = memory_figures(args, model_dir)
        figures.update(model="sd14-shapes (random)" if args.sd14 else "tiny", resolution=args.resolution,
                       batch_size=args.batch_size, peak_rss_gb=round(rss.gb, 2), date=time.strftime("%Y-%m-%d"))
        return report(figures, args.json)
    with tempfile.TemporaryDirectory() as work:
        tok = tiny.write_clip_tokenizer(os.path.join(work, "tokenizer"))
        if args.sd14:
            model_dir = build_sd14(os.path.join(work, "sd14"))
        else:
            model_dir = tiny.build_tiny_sd(os.path.join(work, "sd"), resolution=args.resolution, tokenizer=tok)
        clip_dir = tiny.build_tiny_clip(os.path.join(work, "clip"), image_size=32, tokenizer=tok)
        n_images = max(100, args.batch_size * args.steps)
        data_dir = tiny.shapes_dataset(os.path.join(work, "data"), [("red", "circle"), ("blue", "square")],
                                       per_concept=n_images // 2, size=args.resolution)
        acc, parts, figures = training_figures(args, model_dir, data_dir)
        figures.update(validation_figures(args, acc, parts))
        figures.update(retention_figures(args, acc, parts, clip_dir))
        figures.update(nudity_figures(args))
        if not args.skip_run:
            figures.update(whole_run_figures(args, model_dir, data_dir, clip_dir, work))
    figures.update(model="sd14-shapes (random)" if args.sd14 else "tiny", resolution=args.resolution,
                   batch_size=args.batch_size, gradient_checkpointing=args.gradient_checkpointing,
                   inference_steps=args.inference_steps, prompts=args.prompts,
                   gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                   date=time.strftime("%Y-%m-%d"), cpu_threads=torch.get_num_threads())
    return report(figures, args.json)


def report(figures: dict, json_path=None) -> dict:
    """Print the figures one per line (and write them as JSON)."""
    from common.memory import GB

    width = max(map(len, figures))
    for k, v in figures.items():
        if "_bytes" in k:  # memory figures: bytes in the JSON, GB (GiB) on screen
            print(f"{k.replace('_bytes', '_gb'):<{width}}  {v / GB:.3f}")
        else:
            print(f"{k:<{width}}  {v:.3f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(figures, f, indent=2)
    return figures


if __name__ == "__main__":
    main(parse_args())
