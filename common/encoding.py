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
