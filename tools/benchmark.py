#!/usr/bin/env python
"""Measure the performance levers (README, Performance) on one model, in one run, and print ratios.

    python tools/benchmark.py            # tiny model on this machine
    python tools/benchmark.py --short    # seconds, for CI (figures are noisy)
    python tools/benchmark.py --sd14 --resolution 512 --mixed_precision fp16 --batch_size 10   # GPU

Figures: training samples/s with the latent cache, without it, and for a bare
UNet forward+backward of the same batch; validation images/s batched against
one prompt at a time; seconds per 100 images of the nudity detector (CPU,
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
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from common import tiny  # noqa: E402


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
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    args.resolution = args.resolution or (512 if args.sd14 else 32)
    if args.short:
        args.steps, args.prompts, args.inference_steps = 2, 4, 2
    return args


def build_sd14(out_dir: str) -> str:
    """Save a randomly initialised model with SD 1.4's shapes (UNet 860M, CLIP-L text encoder, 512 px)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = tiny.write_clip_tokenizer(os.path.join(out_dir, "tokenizer"))
    text = CLIPTextModel(CLIPTextConfig(**{**tiny.tiny_text_config(), "hidden_size": 768, "intermediate_size": 3072,
                                          "num_hidden_layers": 12, "num_attention_heads": 12,
                                          "projection_dim": 768, "hidden_act": "quick_gelu"}))
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=512)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched, safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(out_dir)
    return out_dir


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
    for name, cache in (("cached", True), ("uncached", False)):
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
    # Bare UNet forward+backward on one ready batch (the floor a training step can reach).
    unet = trainer.unet
    from common.training import draw_batch

    d = draw_batch(torch.Generator().manual_seed(0), args.batch_size, enc.latent_shape, 1000, 0.0, 0.0)
    lat, txt = enc(ds, list(range(args.batch_size)), d["flip"], d["crop"], d["latent_noise"])
    t = d["timesteps"].to(lat.device)

    def bare():
        with acc.autocast():
            loss = unet(lat, t, txt, return_dict=False)[0].float().pow(2).mean()
        loss.backward()

    out["bare_fwd_bwd_samples_per_s"] = args.batch_size / timed(bare, args.steps)
    out["cached_step_vs_bare"] = out["bare_fwd_bwd_samples_per_s"] / out["cached_samples_per_s"]
    out["cache_speedup"] = out["cached_samples_per_s"] / out["uncached_samples_per_s"]
    return acc, parts, out


def validation_figures(args, acc, parts):
    """Images/s of validation generation: all prompts in one batch against one prompt at a time."""
    from common.validation import build_pipeline, generate_images, image_seed

    pipe = build_pipeline(parts, parts.unet)
    prompts = [f"a {c} {s}" for c, s in zip(list(tiny.COLOURS) * 3, tiny.SHAPES * 4)][: args.prompts]
    seeds = [image_seed(0, k) for k in range(len(prompts))]
    kw = dict(num_inference_steps=args.inference_steps, guidance_scale=7.5, resolution=args.resolution,
              autocast=acc.autocast)
    out = {}
    for name, bs in (("batched", len(prompts)), ("one_at_a_time", 1)):
        sec = timed(lambda: generate_images(pipe, prompts, seeds, bs, **kw), 1)
        out[f"validation_{name}_images_per_s"] = len(prompts) / sec
    out["validation_batching_speedup"] = out["validation_batched_images_per_s"] / out["validation_one_at_a_time_images_per_s"]
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
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
               "--mixed_precision", args.mixed_precision, "--dynamo_backend", "no",
               os.path.join(ROOT, "finetuning_individual_CLIP.py"), f"--pretrained_model_name_or_path={model_dir}",
               f"--train_data_dir={data_dir}", "--curriculum=50,100", f"--resolution={args.resolution}",
               "--center_crop", "--random_flip", "--train_batch_size=10", "--no_early_stop",
               f"--clip_epoch={epochs - 2}" if epochs >= 2 else "--clip_epoch=0", "--validation_epochs=1",
               f"--validation_prompts={prompts}", f"--num_inference_steps={args.inference_steps}",
               f"--clip_model={clip_dir}", "--save_model=False", f"--output_dir={os.path.join(work, 'run-' + name)}",
               *levers]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
        if proc.returncode:
            raise SystemExit(f"whole run ({name}) failed:\n{proc.stderr[-2000:]}")
        out[f"run_levers_{name}_s"] = time.perf_counter() - t0
    out["run_speedup"] = out["run_levers_off_s"] / out["run_levers_on_s"]
    return out


def main(args):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
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
        figures.update(nudity_figures(args))
        if not args.skip_run:
            figures.update(whole_run_figures(args, model_dir, data_dir, clip_dir, work))
    figures.update(model="sd14-shapes (random)" if args.sd14 else "tiny", resolution=args.resolution,
                   batch_size=args.batch_size, gradient_checkpointing=args.gradient_checkpointing,
                   inference_steps=args.inference_steps, prompts=args.prompts,
                   gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                   date=time.strftime("%Y-%m-%d"), cpu_threads=torch.get_num_threads())
    width = max(map(len, figures))
    for k, v in figures.items():
        print(f"{k:<{width}}  {v:.3f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    return figures


if __name__ == "__main__":
    main(parse_args())
