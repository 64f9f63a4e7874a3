"""From dataset rows to UNet inputs: image latents and caption embeddings.

The VAE and text encoder are frozen, so the work is the same every epoch.
``OnlineEncoder`` encodes each micro-batch as it comes (the reference
behaviour). The random choices (flip, crop, the noise of the posterior sample)
are drawn by the trainer and passed in, which is what lets a cache of posterior
parameters reproduce the online path exactly.
"""

from __future__ import annotations

import math

import torch

from .data import ImageTransform, encode_prompts, to_device  # noqa: F401 - to_device: the trainer's too
from .models import vae_scale_factor


class OnlineEncoder:
    """Encode a micro-batch: transform images, VAE posterior sample x scaling factor, text embeddings."""

    def __init__(self, parts, transform: ImageTransform, device, weight_dtype):
        self.parts = parts
        self.transform = transform
        self.device = device
        self.weight_dtype = weight_dtype
        self.scaling_factor = parts.vae.config.scaling_factor
        factor = vae_scale_factor(parts.vae.config)
        self.latent_shape = (parts.vae.config.latent_channels, transform.resolution // factor,
                             transform.resolution // factor)

    def encode_text(self, captions) -> torch.Tensor:
        """Caption embeddings of a micro-batch (the token ids copied without a host wait: data.to_device)."""
        return encode_prompts(self.parts.tokenizer, self.parts.text_encoder, captions, self.device)

    def prepare(self, dataset, row_range) -> None:
        """Nothing to precompute: every micro-batch is encoded as it comes."""

    def _sample(self, mean, std, latent_noise):
        """Posterior sample mean + std * noise, in the UNet's latent scale (fp32)."""
        latents = mean + std * to_device(latent_noise, mean.device).to(mean.dtype)
        return (latents * self.scaling_factor).float()

    @torch.no_grad()
    def __call__(self, dataset, rows, flip, crop, latent_noise):
        batch = dataset[[int(r) for r in rows]]
        pixels = torch.stack([self.transform(img, f, c) for img, f, c in zip(batch["image"], flip, crop)])
        posterior = self.parts.vae.encode(to_device(pixels, self.device).to(self.weight_dtype)).latent_dist
        return self._sample(posterior.mean, posterior.std, latent_noise), self.encode_text(batch["caption"])


class CachedEncoder(OnlineEncoder):
    """Encode a chunk's images and captions once; per step only draw the latent sample (docs/protocols.md: performance).

    Keeps the VAE posterior (mean and std) of every image of the current chunk,
    in both orientations when random flips are on, and the caption embeddings.
    Given the same draws it returns what ``OnlineEncoder`` returns, so the
    training semantics do not change. Needs a deterministic crop
    (--center_crop); random crops use the online path.
    """

    def __init__(self, parts, transform: ImageTransform, device, weight_dtype, encode_batch_size: int = 32):
        super().__init__(parts, transform, device, weight_dtype)
        if not transform.center_crop:
            raise ValueError("the latent cache needs --center_crop (random crops differ every step)")
        self.encode_batch_size = encode_batch_size
        self.row_range = None

    def cache_bytes(self, rows: int) -> int:
        """Bytes the cache of a chunk of ``rows`` images holds: posterior mean and std per orientation, captions."""
        flips = 2 if self.transform.random_flip else 1
        elem = torch.empty((), dtype=self.weight_dtype).element_size()
        text = self.parts.tokenizer.model_max_length * self.parts.text_encoder.config.hidden_size
        return rows * elem * (2 * flips * math.prod(self.latent_shape) + text)

    @torch.no_grad()
    def prepare(self, dataset, row_range) -> None:
        """Encode rows [start, stop) unless they are the cached chunk already."""
        if self.row_range == tuple(row_range):
            return
        start, stop = row_range
        means, stds, texts = [], [], []
        flips = (False, True) if self.transform.random_flip else (False,)
        for b in range(start, stop, self.encode_batch_size):
            batch = dataset[list(range(b, min(stop, b + self.encode_batch_size)))]
            pixels = torch.stack([self.transform(im) for im in batch["image"]])
            pixels = to_device(pixels, self.device).to(self.weight_dtype)
            posts = [self.parts.vae.encode(pixels.flip(-1) if f else pixels).latent_dist for f in flips]
            means.append(torch.stack([p.mean for p in posts], 1))  # [b, flips, c, h, w]
            stds.append(torch.stack([p.std for p in posts], 1))
            texts.append(self.encode_text(batch["caption"]))
        self.mean, self.std, self.text = torch.cat(means), torch.cat(stds), torch.cat(texts)
        self.row_range = (start, stop)

    @torch.no_grad()
    def __call__(self, dataset, rows, flip, crop, latent_noise):
        assert self.row_range is not None, "prepare() the chunk first"
        idx = torch.as_tensor([int(r) - self.row_range[0] for r in rows], dtype=torch.long)
        flip = flip.long() if self.transform.random_flip else torch.zeros(len(rows), dtype=torch.long)
        idx, flip = to_device(idx, self.mean.device), to_device(flip, self.mean.device)
        latents = self._sample(self.mean[idx, flip], self.std[idx, flip], latent_noise)
        return latents, self.text[idx]


def make_encoder(parts, transform: ImageTransform, device, weight_dtype, cache: bool):
    """The cached encoder when asked for and possible (centre crop), else the online one."""
    if cache and transform.center_crop:
        return CachedEncoder(parts, transform, device, weight_dtype)
    return OnlineEncoder(parts, transform, device, weight_dtype)
