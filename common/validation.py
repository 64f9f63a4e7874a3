"""Validation image generation: one routine for the whole toolkit (docs/protocols.md: criteria).

Image j of prompt k is drawn from its own CPU generator seeded by
(seed, k, j), so it does not depend on batch size, order or the number of
processes; prompts are split across processes and results gathered.
"""

from __future__ import annotations

import contextlib
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm


RETENTION_STREAM = 1  # image_seed's stream of the retention prompts: their noise differs from the target prompts'


def image_seed(seed: int, prompt_index: int, image_index: int = 0, stream: int = 0) -> int:
    """A 63-bit seed for image ``image_index`` of prompt ``prompt_index``, from the run seed.

    ``stream`` separates prompt lists that share indices (0: the validation
    prompts, whose seeds it leaves as they always were; RETENTION_STREAM: the
    retention prompts).
    """
    entropy = [seed, prompt_index, image_index] + ([stream] if stream else [])
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def shard(items: Sequence, num_processes: int, process_index: int) -> list:
    """This process's share of ``items`` (strided, so shares differ in size by at most one)."""
    return list(items[process_index::num_processes])


def build_pipeline(parts, unet):
    """A StableDiffusionPipeline around the (trained) UNet and the frozen parts, no safety checker."""
    from .models import assemble_pipeline

    pipe = assemble_pipeline(parts.vae, parts.text_encoder, parts.tokenizer, unet, parts.inference_scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


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
) -> List:
    """Generate one PIL image per (prompt, seed) pair, ``batch_size`` at a time."""
    assert len(prompts) == len(seeds)
    images = []
    was_training = pipe.unet.training
    pipe.unet.eval()
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, leave=False)
    try:
        b = 0
        while b < len(prompts):
            batch_prompts = list(prompts[b : b + batch_size])
            generators = [torch.Generator("cpu").manual_seed(s) for s in seeds[b : b + batch_size]]
            try:
                with autocast():
                    out = pipe(
                        batch_prompts,
                        num_inference_steps=num_inference_steps,
                        guidance_scale=guidance_scale,
                        generator=generators,
                        height=resolution,
                        width=resolution,
                    )
            except torch.cuda.OutOfMemoryError:
                if batch_size == 1:
                    raise
                # "All prompts that fit": halve the batch and retry; images do not depend on it.
                batch_size = max(1, batch_size // 2)
                torch.cuda.empty_cache()
                continue
            images.extend(out.images)
            bar.update(len(batch_prompts))
            b += len(batch_prompts)
    finally:
        bar.close()
        pipe.unet.train(was_training)
    return images
