"""The toy Stable Diffusion: a small VAE and UNet trained on the drawn concepts, saved in diffusers format."""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from common import numerics
from .world import ARCH, RESOLUTION, TEMPLATES


def make_vae(seed: int):
    """A small AutoencoderKL with 4x downsampling: 32 px images -> 8 x 8 x 4 latents."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    a = ARCH["vae"]
    n = len(a["block_out_channels"])
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=a["block_out_channels"],
                         layers_per_block=1, latent_channels=a["latent_channels"],
                         norm_num_groups=a["norm_num_groups"], sample_size=RESOLUTION)


def train_vae(vae, x: torch.Tensor, steps: int, batch: int, lr: float, kl_weight: float, seed: int,
              log: Callable = print) -> Dict[str, float]:
    """Train the VAE as an autoencoder (MSE + L1 on [-1, 1] pixels + a small KL weight); return its figures.

    The posterior's log-variance starts at -6 (std 0.05): with a tiny KL weight
    the reconstruction keeps it small, so a sampled latent (what the
    fine-tuning scripts draw) stays close to the mean the UNet was trained on.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        half = vae.quant_conv.out_channels // 2  # quant_conv outputs (mean, logvar)
        vae.quant_conv.weight[half:] = 0
        vae.quant_conv.bias[half:] = -6.0
    opt = numerics.adamw(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 2), pct_start=0.1)
    vae.train()
    losses = []
    for _ in tqdm(range(steps), desc="toy VAE", leave=False, mininterval=2):
        xb = x[torch.randint(len(x), (batch,), generator=gen)]
        post = vae.encode(xb).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, xb) + F.l1_loss(rec, xb) + kl_weight * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    vae.eval()
    with torch.no_grad():
        idx = torch.randperm(len(x), generator=gen)[:512]
        post = vae.encode(x[idx]).latent_dist
        mse = float(F.mse_loss(vae.decode(post.mean).sample.clamp(-1, 1), x[idx]))
        rel_std = float(post.std.mean() / post.mean.std())
    # PSNR on the 0..1 pixel scale (the [-1, 1] MSE is 4x the 0..1 one).
    figures = {"recon_mse_pm1": mse, "recon_psnr_db": float(10 * np.log10(4.0 / max(mse, 1e-12))),
               "posterior_std_over_latent_std": rel_std,
               "loss_first": losses[0] if losses else None, "loss_last": float(np.mean(losses[-10:])) if losses else None}
    log(f"toy VAE: reconstruction MSE {mse:.4f} ([-1,1] scale), PSNR {figures['recon_psnr_db']:.1f} dB, "
        f"posterior std / latent std {rel_std:.3f}")
    return figures


def encode_latents(vae, x: torch.Tensor, batch: int = 256) -> Tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior (mean, std) of every image, unscaled: encoded once, the VAE is frozen afterwards."""
    means, stds = [], []
    for b in range(0, len(x), batch):
        post = vae.encode(x[b : b + batch]).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


def make_unet(cross_attention_dim: int, seed: int):
    """A ~1M-parameter UNet2DConditionModel on 8 x 8 x 4 latents, cross-attending to the text hidden states."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=RESOLUTION // 4, in_channels=4, out_channels=4,
                                cross_attention_dim=cross_attention_dim, **ARCH["unet"])


def noise_schedule_config() -> dict:
    """Stable Diffusion's training noise schedule (1000 steps, scaled_linear betas)."""
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def encode_texts(tokenizer, text_encoder, texts: Sequence[str], batch: int = 128) -> torch.Tensor:
    """last_hidden_state [n, 77, d] of each text, padded to the tokenizer's length as the pipeline does."""
    from common.data import encode_prompts

    return encode_prompts(tokenizer, text_encoder, list(texts), batch_size=batch)


def train_unet(unet, lat_mean: torch.Tensor, lat_std: torch.Tensor, scaling_factor: float, labels: Sequence[int],
               text_table: torch.Tensor, steps: int, batch: int, lr: float, caption_dropout: float, seed: int,
               snr_gamma: Optional[float] = 5.0, log: Callable = print, rank: int = 0,
               world_size: int = 1) -> Dict[str, float]:
    """Epsilon-prediction DDPM training in latent space; return the loss figures.

    With ``world_size`` > 1 each of that many processes (an initialised torch.distributed group) draws the same
    batch and trains on its share of the rows; gradients and the loss are summed across them before the update,
    so every process holds the same weights (the bits depend on ``world_size``, not on timing).

    Min-SNR-gamma loss weighting (Hang et al. 2023, weight min(SNR, gamma) / SNR
    for epsilon prediction) converges several times faster, which the CPU
    budget needs.

    ``text_table`` rows are concept k's phrasing t at row k * len(TEMPLATES) + t,
    and the empty caption last (caption dropout uses it, so classifier-free
    guidance works). Latents are drawn from the cached posterior each step.
    """
    from diffusers import DDPMScheduler

    sched_noise = DDPMScheduler(**noise_schedule_config())
    alphas = sched_noise.alphas_cumprod
    snr = alphas / (1 - alphas)
    gen = torch.Generator().manual_seed(seed)
    labels_t = torch.tensor(labels)
    empty_row = text_table.shape[0] - 1
    opt = numerics.adamw(unet.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 2), pct_start=0.05)
    unet.train()
    losses = []
    mine = slice(rank * batch // world_size, (rank + 1) * batch // world_size)  # this process's rows of each batch
    params = [q for q in unet.parameters() if q.requires_grad]
    for _ in tqdm(range(steps), desc="toy UNet", leave=False, mininterval=2, disable=rank != 0):
        idx = torch.randint(len(labels_t), (batch,), generator=gen)
        z = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=gen)) * scaling_factor
        rows = labels_t[idx] * len(TEMPLATES) + torch.randint(len(TEMPLATES), (batch,), generator=gen)
        rows = torch.where(torch.rand(batch, generator=gen) < caption_dropout, torch.full_like(rows, empty_row), rows)
        t = torch.randint(0, len(alphas), (batch,), generator=gen)
        noise = torch.randn(z.shape, generator=gen)
        z, rows, t, noise = z[mine], rows[mine], t[mine], noise[mine]
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = numerics.exact_sqrt(a) * z + numerics.exact_sqrt(1 - a) * noise  # same bits on every CPU
        per_sample = (unet(noisy, t, text_table[rows]).sample - noise).pow(2).mean((1, 2, 3))
        weight = snr[t].clamp(max=snr_gamma) / snr[t] if snr_gamma else torch.ones_like(per_sample)
        loss = (weight * per_sample).sum() / batch  # this share of the whole batch's mean
        opt.zero_grad()
        loss.backward()
        loss_sum = per_sample.detach().sum()
        if world_size > 1:  # one all-reduce per step: every gradient and the loss, summed over the processes
            flat = torch.cat([q.grad.reshape(-1) for q in params] + [loss_sum.reshape(1)])
            torch.distributed.all_reduce(flat)
            offset = 0
            for q in params:
                q.grad.copy_(flat[offset:offset + q.numel()].view_as(q.grad))
                offset += q.numel()
            loss_sum = flat[-1]
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss_sum) / batch)  # the unweighted DDPM loss, comparable across settings
    unet.eval()
    figures = {"loss_first": losses[0], "loss_last": float(np.mean(losses[-20:]))}
    log(f"toy UNet: loss {figures['loss_first']:.3f} -> {figures['loss_last']:.3f}")
    return figures


def save_sd(out_dir: str, tokenizer, text_encoder, vae, unet) -> str:
    """Save the toy pipeline in diffusers format with a DDIM inference scheduler."""
    from diffusers import DDIMScheduler

    from common.models import assemble_pipeline

    scheduler = DDIMScheduler(**noise_schedule_config(), clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              prediction_type="epsilon")
    assemble_pipeline(vae, text_encoder, tokenizer, unet, scheduler).save_pretrained(out_dir)
    return out_dir
