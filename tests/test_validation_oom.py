"""Validation out of memory: the batch that fits is kept for every later validation (logged once), and the failed
attempt's tensors are freed before the retry (docs/protocols.md: robustness)."""

import gc
import logging
import weakref
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from common.protocol import Criterion, ValidationConfig, Validator
from common.results import LOGGER_NAME
from common.validation import BatchLimit, generate_images


class FakePipe:
    """A pipeline that runs out of CUDA memory above ``fits`` prompts; each image is drawn from its generator."""

    def __init__(self, fits: int):
        self.fits = fits
        self.unet = torch.nn.Linear(1, 1)
        self.text_encoder = SimpleNamespace(dtype=torch.float32)  # fp32: drawn without autocast
        self.device = torch.device("cpu")
        self.calls = []  # batch size of every attempt
        self.failed = []  # weak references to the tensors of failed attempts
        self.alive_at_retry = []  # how many of them were still alive when the next attempt started

    def __call__(self, prompts, generator, **kw):
        self.alive_at_retry.append(sum(ref() is not None for ref in self.failed))
        self.calls.append(len(prompts))
        activations = torch.zeros(len(prompts), 1024)  # what the denoising loop holds when memory runs out
        if len(prompts) > self.fits:
            self.failed.append(weakref.ref(activations))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (fake)")
        images = [Image.fromarray(np.full((2, 2, 3), int(torch.randint(0, 256, (1,), generator=g)), np.uint8))
                  for g in generator]
        return SimpleNamespace(images=images)


def _validator(pipe, prompts, batch_size):
    acc = SimpleNamespace(num_processes=1, process_index=0, is_local_main_process=False)
    pixel = Criterion("clip", 0.5, lambda images, texts: [float(np.asarray(im)[0, 0, 0]) for im in images])
    return Validator(acc, pipe, ValidationConfig(prompts=prompts, seed=7, batch_size=batch_size), [pixel])


@pytest.fixture
def log_lines():
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger(LOGGER_NAME)
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    yield lines
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def test_the_batch_that_fits_is_kept_for_later_validations(log_lines):
    prompts = [f"prompt {k}" for k in range(8)]
    pipe = FakePipe(fits=3)
    validator = _validator(pipe, prompts, batch_size=8)
    first = validator("v1")
    assert pipe.calls == [8, 4, 2, 2, 2, 2]  # halved until it fits
    second = validator("v2")
    assert pipe.calls[6:] == [2, 2, 2, 2]  # the second validation starts at the size that worked
    assert first == second
    # The images (and so the scores) are those of a run with room for all 8 at once.
    assert first == _validator(FakePipe(fits=8), prompts, batch_size=8)("v")
    oom = [ln for ln in log_lines if "out of memory" in ln]
    assert oom == ["validation: CUDA out of memory at batch size 8; generating 4 image(s) at a time from now on "
                   "(images do not depend on the batch size)",
                   "validation: CUDA out of memory at batch size 4; generating 2 image(s) at a time from now on "
                   "(images do not depend on the batch size)"]


def test_the_failed_attempt_is_freed_before_the_cache_is_emptied(monkeypatch):
    pipe = FakePipe(fits=2)
    alive_when_emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache",
                        lambda: alive_when_emptied.append(sum(ref() is not None for ref in pipe.failed)))
    images = generate_images(pipe, ["a"] * 4, list(range(4)), batch_size=4, limit=BatchLimit())
    assert len(images) == 4 and pipe.calls == [4, 2, 2]
    # The cache is emptied once, after the failed attempt's tensors died (the exception's frames held them): the
    # allocator can hand their memory back, and the retry never runs beside them.
    assert alive_when_emptied == [0] and pipe.alive_at_retry == [0, 0, 0]


def test_one_image_that_does_not_fit_is_an_error():
    with pytest.raises(torch.cuda.OutOfMemoryError):
        generate_images(FakePipe(fits=0), ["a", "b"], [0, 1], batch_size=2, limit=BatchLimit())
    gc.collect()
