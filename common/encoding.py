"""From dataset rows to UNet inputs: image latents and caption embeddings.

The VAE and text encoder are frozen, so the work is the same every epoch.
``OnlineEncoder`` encodes each micro-batch as it comes (the reference
behaviour). The latent sample is drawn from the VAE's posterior with the
trainer's generator, which is what lets a cache of posterior parameters
reproduce it exactly.
"""

from __future__ import annotations

import torch

from .data import ImageTransform, tokenize_captions


class OnlineEncoder:
    """Encode a micro-batch: transform images, VAE posterior sample x scaling factor, text embeddings."""

    def __init__(self, parts, transform: ImageTransform, device, weight_dtype):
        self.parts = parts
        self.transform = transform
        self.device = device
        self.weight_dtype = weight_dtype
        self.scaling_factor = parts.vae.config.scaling_factor

    @torch.no_grad()
    def encode_text(self, captions) -> torch.Tensor:
        ids = tokenize_captions(self.parts.tokenizer, captions).to(self.device)
        return self.parts.text_encoder(ids, return_dict=False)[0]

    def prepare(self, dataset, row_range) -> None:
        """Nothing to precompute: every micro-batch is encoded as it comes."""

    @torch.no_grad()
    def __call__(self, dataset, rows, generator: torch.Generator):
        batch = dataset[[int(r) for r in rows]]
        pixels = torch.stack([self.transform(img, generator) for img in batch["image"]])
        pixels = pixels.to(self.device, dtype=self.weight_dtype)
        posterior = self.parts.vae.encode(pixels).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator, device=generator.device)
        latents = posterior.mean + posterior.std * noise.to(posterior.mean.device, posterior.mean.dtype)
        latents = (latents * self.scaling_factor).float()
        return latents, self.encode_text(batch["caption"])


class CachedEncoder(OnlineEncoder):
    """Encode a chunk's images and captions once; per step only draw the latent sample (SPEC 11).

    Keeps the VAE posterior (mean and std) of every image of the current chunk
    in both orientations when random flips are on, and the caption embeddings.
    Random draws are made in the same order and from the same generator as
    ``OnlineEncoder`` (one flip coin per image, then the latent noise), so a
    seeded run trains on the same samples with or without the cache.
    Needs a deterministic crop (--center_crop); random crops use the online path.
    """

    def __init__(self, parts, transform: ImageTransform, device, weight_dtype, encode_batch_size: int = 32):
        super().__init__(parts, transform, device, weight_dtype)
        if not transform.center_crop:
            raise ValueError("the latent cache needs --center_crop (random crops differ every step)")
        self.encode_batch_size = encode_batch_size
        self.row_range = None

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
            pixels = torch.stack([self.transform.to_tensor(self.transform.resize_crop(im, None))
                                  for im in batch["image"]]).to(self.device, dtype=self.weight_dtype)
            posts = [self.parts.vae.encode(pixels.flip(-1) if f else pixels).latent_dist for f in flips]
            means.append(torch.stack([p.mean for p in posts], 1))  # [b, flips, c, h, w]
            stds.append(torch.stack([p.std for p in posts], 1))
            texts.append(self.encode_text(batch["caption"]))
        self.mean, self.std, self.text = torch.cat(means), torch.cat(stds), torch.cat(texts)
        self.row_range = (start, stop)

    @torch.no_grad()
    def __call__(self, dataset, rows, generator: torch.Generator):
        assert self.row_range is not None, "prepare() the chunk first"
        idx = torch.as_tensor([int(r) - self.row_range[0] for r in rows], dtype=torch.long)
        if self.transform.random_flip:
            flip = torch.stack([(torch.rand((), generator=generator) < 0.5) for _ in rows]).long()
        else:
            flip = torch.zeros(len(rows), dtype=torch.long)
        idx_d, flip_d = idx.to(self.mean.device), flip.to(self.mean.device)
        mean, std = self.mean[idx_d, flip_d], self.std[idx_d, flip_d]
        noise = torch.randn(mean.shape, generator=generator, device=generator.device)
        latents = mean + std * noise.to(mean.device, mean.dtype)
        return (latents * self.scaling_factor).float(), self.text[idx_d]


def make_encoder(parts, transform: ImageTransform, device, weight_dtype, cache: bool):
    """The cached encoder when asked for and possible (centre crop), else the online one."""
    if cache and transform.center_crop:
        return CachedEncoder(parts, transform, device, weight_dtype)
    return OnlineEncoder(parts, transform, device, weight_dtype)
