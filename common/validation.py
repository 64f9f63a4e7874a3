"""Validation image generation: one routine for the whole toolkit (docs/protocols.md: criteria).

Image j of prompt k is drawn from its own CPU generator seeded by
(seed, k, j), so it does not depend on batch size, order or the number of
processes; prompts are split across processes and results gathered.

A run's validation and eval_model.py draw in one precision
(``generation_precision``): under fp16 the text encoder and VAE in fp16, the
UNet's fp32 weights under autocast, latents in fp16. The same seed then gives
the same image in both, on a GPU too (given the same kernels: docs/gpu.md).
"""

from __future__ import annotations

import contextlib
import gc
import logging
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .results import LOGGER_NAME


RETENTION_STREAM = 1  # image_seed's stream of the retention prompts: their noise differs from the target prompts'
UTILITY_STREAM = 2  # and the utility captions' (--utility_prompts) from both


def image_seed(seed: int, prompt_index: int, image_index: int = 0, stream: int = 0) -> int:
    """A 63-bit seed for image ``image_index`` of prompt ``prompt_index``, from the run seed.

    ``stream`` separates prompt lists that share indices (0: the validation
    prompts, whose seeds it leaves as they always were; RETENTION_STREAM: the
    retention prompts; UTILITY_STREAM: the utility captions).
    """
    entropy = [seed, prompt_index, image_index] + ([stream] if stream else [])
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def shard(items: Sequence, num_processes: int, process_index: int) -> list:
    """This process's share of ``items`` (strided, so shares differ in size by at most one)."""
    return list(items[process_index::num_processes])


# --scheduler's names -> diffusers classes (and the config each needs beyond the model's own noise schedule).
SCHEDULERS = {
    "pndm": ("PNDMScheduler", {}),  # SD-1.x's own
    "lms": ("LMSDiscreteScheduler", {}),  # Diffusion-MU-Attack's judged images and targets
    "ddim": ("DDIMScheduler", {}),
    "dpm-solver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),  # joycenerd/P4D's
    "euler": ("EulerDiscreteScheduler", {}),
}


def scheduler_from_name(name: str, config):
    """A sampling scheduler ``name`` (one of SCHEDULERS) on the noise schedule of ``config`` (a model's scheduler
    config: betas, timesteps, prediction type), float64 cumulative alphas as every sampler here has them."""
    import diffusers

    from .numerics import portable_scheduler

    if name not in SCHEDULERS:
        from .errors import InputError

        raise InputError(f"--scheduler {name!r}: one of {', '.join(SCHEDULERS)}")
    cls_name, extra = SCHEDULERS[name]
    return portable_scheduler(getattr(diffusers, cls_name).from_config(config, **extra))


def scheduler_name(scheduler) -> str:
    """The --scheduler name of a scheduler object (its class name when it has none)."""
    cls = type(scheduler).__name__
    for name, (cls_name, extra) in SCHEDULERS.items():
        if cls == cls_name and all(scheduler.config.get(k) == v for k, v in extra.items()):
            return name
    return cls


def build_pipeline(parts, unet, scheduler: Optional[str] = None):
    """A StableDiffusionPipeline around the (trained) UNet and the frozen parts, no safety checker; its sampler the
    model's own, or --scheduler's ``scheduler`` on the model's noise schedule."""
    from .models import assemble_pipeline

    sampler = parts.inference_scheduler
    if scheduler is not None:
        sampler = scheduler_from_name(scheduler, sampler.config)
    pipe = assemble_pipeline(parts.vae, parts.text_encoder, parts.tokenizer, unet, sampler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextlib.contextmanager
def unet_outputs_as_computed(unet):
    """Inside: ``unet`` without accelerate's fp32 conversion of its outputs; training's forward is put back after.

    Under native AMP, accelerator.prepare wraps the module's forward in autocast and a cast of its outputs to fp32
    (for the loss), and unwrap_model keeps that wrapper; inside a pipeline the fp32 noise prediction would turn the
    fp16 latents fp32 from the first step on. The wrapper stays on the module for training: only the forward that
    accelerate saved (``_original_forward``) is lent to generation, which runs under its own autocast.
    """
    wrapped, original = unet.__dict__.get("forward"), unet.__dict__.get("_original_forward")
    if wrapped is None or original is None:  # no wrapper (fp32, or a model loaded for eval_model.py)
        yield unet
        return
    unet.forward = original
    try:
        yield unet
    finally:
        unet.forward = wrapped


@contextlib.contextmanager
def generation_precision(pipe):
    """The one precision images are drawn in, validation's and eval_model.py's (docs/gpu.md: fp16).

    Autocast to the dtype of the pipeline's text encoder and VAE (the weight dtype: fp16 or bf16; off for fp32) on
    its device, the UNet (fp32 weights) without fp32 outputs, so the latents stay in the prompt embeddings' dtype
    as in plain diffusers half-precision inference. eval_model.py loads its pipelines in these dtypes.
    """
    from .precision import autocast_to

    with autocast_to(pipe.device.type, pipe.text_encoder.dtype), unet_outputs_as_computed(pipe.unet):
        yield


class BatchLimit:
    """The largest generation batch known to fit: halved on a CUDA out-of-memory error and kept for every later
    call (a run's later validations start at the size that worked, not at the one that failed)."""

    def __init__(self, limit: Optional[int] = None, log: Optional[Callable[[str], None]] = None):
        self.limit = limit
        self.log = log or logging.getLogger(LOGGER_NAME).info

    def size(self, wanted: int) -> int:
        """``wanted``, capped at the limit."""
        return wanted if self.limit is None else min(wanted, self.limit)

    def shrink(self, failed: int) -> int:
        """After an out-of-memory error at batch size ``failed``: the new limit, half of it (logged)."""
        self.limit = max(1, failed // 2)
        self.log(f"validation: CUDA out of memory at batch size {failed}; generating {self.limit} image(s) at a "
                 "time from now on (images do not depend on the batch size)")
        return self.limit


def _free_failed_attempt() -> None:
    """Release what an out-of-memory attempt left: its tensors died with the exception's frames; return the
    cached blocks to the allocator so that the retry can use them."""
    gc.collect()
    torch.cuda.empty_cache()  # a no-op where CUDA never started


def _one_length(prompts: List[str], width: int):
    """(the leading prompts of one published length, that length or None when it is ``width``: text as today)."""
    from .long_prompts import published_length

    lengths = [published_length(p, width) for p in prompts]
    run = next((i for i, n in enumerate(lengths) if n != lengths[0]), len(prompts))
    return prompts[:run], (None if lengths[0] == width else lengths[0])


@torch.no_grad()
def generate_images(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    batch_size: int,
    num_inference_steps: int = 20,
    guidance_scale: float = 7.5,
    resolution: Optional[int] = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    progress: bool = False,
    desc: str = "generating",
    limit: Optional[BatchLimit] = None,
    long_prompts: str = "truncate",
) -> List:
    """Generate one PIL image per (prompt, seed) pair, ``batch_size`` at a time.

    Each batch is drawn inside ``autocast()``: ``functools.partial(generation_precision, pipe)`` for the toolkit's
    generation precision (validation and eval_model.py pass it); by default the pipeline runs as loaded.

    On a CUDA out-of-memory error the batch is halved and retried ("all prompts that fit"); ``limit`` carries the
    size that worked to later calls (without it, to the rest of this call only).

    ``long_prompts`` "chunks": a prompt whose published length (common.long_prompts) exceeds the encoder's positions
    is encoded in 77-position slices and given to the pipeline as embeddings, as joycenerd/P4D's P4D-K pipeline
    draws it; a batch then holds prompts of one length, and a batch of prompts that fit goes as text, as today.
    """
    assert len(prompts) == len(seeds)
    limit = limit if limit is not None else BatchLimit()
    images = []
    was_training = pipe.unet.training
    pipe.unet.eval()
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, leave=False)
    try:
        b = 0
        while b < len(prompts):
            size = limit.size(batch_size)
            batch_prompts = list(prompts[b : b + size])
            length = None
            if long_prompts == "chunks":
                batch_prompts, length = _one_length(batch_prompts, pipe.tokenizer.model_max_length)
            generators = [torch.Generator("cpu").manual_seed(s) for s in seeds[b : b + len(batch_prompts)]]
            out_of_memory = False
            try:
                with autocast():
                    text, embeds = batch_prompts, {}
                    if length is not None:
                        from .long_prompts import chunked_prompt_embeds

                        cond, uncond = chunked_prompt_embeds(pipe.text_encoder, pipe.tokenizer, batch_prompts, length)
                        text, embeds = None, {"prompt_embeds": cond, "negative_prompt_embeds": uncond}
                    out = pipe(
                        text,  # the pipeline's first parameter, prompt
                        **embeds,
                        num_inference_steps=num_inference_steps,
                        guidance_scale=guidance_scale,
                        generator=generators,
                        height=resolution,
                        width=resolution,
                    )
            except torch.cuda.OutOfMemoryError:
                if len(batch_prompts) == 1:
                    raise
                out_of_memory = True
            if out_of_memory:
                # Outside the except clause: the exception, its traceback and the frames holding the failed
                # attempt's tensors are gone by now, so the retry does not run beside them.
                limit.shrink(len(batch_prompts))
                _free_failed_attempt()
                continue
            images.extend(out.images)
            del out
            bar.update(len(batch_prompts))
            b += len(batch_prompts)
    finally:
        bar.close()
        pipe.unet.train(was_training)
    return images
