"""UNet fine-tuning: the diffusion loss and one pass over a chunk.

The loss is the text-to-image objective of diffusers' train_text_to_image.py:
epsilon or v-prediction targets, optional Min-SNR weighting
(Hang et al. 2023, https://arxiv.org/abs/2303.09556), noise offset
(https://www.crosslabs.org/blog/diffusion-with-offset-noise) and input
perturbation (Ning et al. 2023, https://arxiv.org/abs/2301.11706).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .curriculum import epoch_batches


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of UNet fine-tuning (flat, as on the command line)."""

    learning_rate: float = 1e-5
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    train_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    snr_gamma: Optional[float] = None
    noise_offset: float = 0.0
    input_perturbation: float = 0.0
    prediction_type: Optional[str] = None
    params: str = "full"  # "full" or "xattn" (cross-attention only: modules named attn2)
    use_ema: bool = False
    ema_decay: float = 0.9999
    gradient_checkpointing: bool = False
    seed: int = 0


def select_trainable(unet: torch.nn.Module, params: str) -> list:
    """Mark the trained parameter set (full UNet or cross-attention only) and return it."""
    if params not in ("full", "xattn"):
        raise ValueError(f"params must be 'full' or 'xattn', got {params!r}")
    trainable = []
    for name, p in unet.named_parameters():
        keep = params == "full" or "attn2" in name
        p.requires_grad_(keep)
        if keep:
            trainable.append(p)
    return trainable


def diffusion_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    noise_scheduler,
    snr_gamma: Optional[float],
    sample_weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-batch MSE with optional Min-SNR-gamma weighting; ``sample_weights`` rescale samples (sum-normalised by caller)."""
    per_sample = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma is not None:
        from diffusers.training_utils import compute_snr

        snr = compute_snr(noise_scheduler, timesteps)
        weights = torch.clamp(snr, max=snr_gamma) / snr
        if noise_scheduler.config.prediction_type == "v_prediction":
            weights = torch.clamp(snr, max=snr_gamma) / (snr + 1)
        per_sample = per_sample * weights
    if sample_weights is None:
        return per_sample.mean()
    return (per_sample * sample_weights).sum()


def noisy_inputs(latents, noise_scheduler, generator, noise_offset: float, input_perturbation: float):
    """Draw noise and timesteps; return (noisy latents, target, timesteps)."""
    bsz = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator, device=generator.device).to(latents.device)
    if noise_offset:
        noise = noise + noise_offset * torch.randn(
            (bsz, latents.shape[1], 1, 1), generator=generator, device=generator.device
        ).to(latents.device)
    timesteps = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (bsz,), generator=generator, device=generator.device
    ).to(latents.device)
    applied = noise
    if input_perturbation:
        applied = noise + input_perturbation * torch.randn(
            latents.shape, generator=generator, device=generator.device
        ).to(latents.device)
    noisy = noise_scheduler.add_noise(latents, applied, timesteps)
    if noise_scheduler.config.prediction_type == "epsilon":
        target = noise
    elif noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unknown prediction type {noise_scheduler.config.prediction_type}")
    return noisy, target, timesteps


class ChunkTrainer:
    """Trains the UNet on curriculum chunks; owns optimizer, LR schedule and EMA.

    ``reset_chunk`` gives the individual protocol its fresh start per chunk
    (unlearned weights, empty optimizer state, new LR schedule, new EMA);
    ``carry_state=True`` (``--compat reference``) restores only the weights.
    """

    def __init__(self, accelerator, parts, encoder, cfg: TrainConfig, horizon_updates: int):
        from diffusers.optimization import get_scheduler

        self.accelerator = accelerator
        self.parts = parts
        self.encoder = encoder  # turns dataset rows into (latents, text embeddings)
        self.cfg = cfg
        self.horizon_updates = max(1, horizon_updates)
        self._get_scheduler = get_scheduler
        unet = parts.unet
        if cfg.prediction_type is not None:
            parts.noise_scheduler.register_to_config(prediction_type=cfg.prediction_type)
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        self.trainable = select_trainable(unet, cfg.params)
        # The unlearned weights, kept on the host to restore before each chunk.
        self.initial_state = [p.detach().to("cpu", copy=True) for p in self.trainable]
        optimizer = torch.optim.AdamW(
            self.trainable,
            lr=cfg.learning_rate,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            weight_decay=cfg.adam_weight_decay,
            eps=cfg.adam_epsilon,
        )
        unet.train()
        self.unet, self.optimizer = accelerator.prepare(unet, optimizer)
        self.lr_scheduler = None
        self.ema = None
        self.generator = None
        self.global_updates = 0

    @property
    def raw_optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer under accelerate's wrapper."""
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def _new_schedule(self):
        for group in self.raw_optimizer.param_groups:
            group["lr"] = self.cfg.learning_rate
            group.pop("initial_lr", None)
        # Not passed to accelerator.prepare: stepped once per optimizer update, so
        # warm-up is counted in updates whatever the number of processes.
        self.lr_scheduler = self._get_scheduler(
            self.cfg.lr_scheduler,
            optimizer=self.raw_optimizer,
            num_warmup_steps=self.cfg.lr_warmup_steps,
            num_training_steps=self.horizon_updates,
        )

    def _new_ema(self):
        if self.cfg.use_ema:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.trainable, decay=self.cfg.ema_decay)

    def reset_chunk(self, chunk: int, carry_state: bool = False) -> None:
        """Restore the unlearned UNet weights; unless ``carry_state``, fresh optimizer, LR schedule and EMA."""
        with torch.no_grad():
            for p, p0 in zip(self.trainable, self.initial_state):
                p.copy_(p0.to(p.device))
        first = self.lr_scheduler is None
        if first or not carry_state:
            self.raw_optimizer.state.clear()
            self.raw_optimizer.zero_grad(set_to_none=True)
            self._new_schedule()
            self._new_ema()
        self.begin_chunk(chunk)

    def begin_chunk(self, chunk: int) -> None:
        """Seed this chunk's noise and timestep draws (weights and optimizer untouched)."""
        # Noise and timesteps per (seed, process, chunk): a chunk trains the same
        # whether it runs alone (--start_CL) or after others.
        seed = np.random.SeedSequence([self.cfg.seed, self.accelerator.process_index, chunk]).generate_state(1)[0]
        self.generator = torch.Generator("cpu").manual_seed(int(seed))

    def ema_state(self):
        """EMA parameter copies (or None)."""
        return None if self.ema is None else self.ema.shadow_params

    def train_epoch(
        self,
        dataset,
        row_range,
        chunk: int,
        epoch: int,
        max_updates: Optional[int] = None,
        on_update: Optional[Callable[[int, torch.Tensor], None]] = None,
    ) -> dict:
        """One pass over a chunk (or its first ``max_updates`` updates); returns updates, images (all processes) and mean loss.

        Gradients accumulate over ``gradient_accumulation_steps`` micro-batches;
        the last group of a chunk may be shorter. Each process's loss is
        weighted by its share of the global batch so that the all-reduced
        gradient equals the gradient of the global-batch mean, even for a short
        last batch split unevenly across processes.
        """
        cfg, acc = self.cfg, self.accelerator
        batches = list(
            epoch_batches(row_range, cfg.train_batch_size, acc.num_processes, acc.process_index,
                          cfg.seed, chunk, epoch)
        )
        self.encoder.prepare(dataset, row_range)
        accum = cfg.gradient_accumulation_steps
        groups = [batches[i : i + accum] for i in range(0, len(batches), accum)]
        if max_updates is not None:
            groups = groups[:max_updates]
        loss_sum = torch.zeros((), device=acc.device)
        updates = images = 0
        for group in groups:
            group_rows = sum(global_n for _, global_n in group)
            images += group_rows
            for j, (rows, _) in enumerate(group):
                is_last = j == len(group) - 1
                sync = contextlib.nullcontext() if is_last else acc.no_sync(self.unet)
                with sync:
                    loss = self._micro_step(dataset, rows, group_rows, row_range[0])
                    acc.backward(loss)
                loss_sum += loss.detach()
            if acc.sync_gradients and cfg.max_grad_norm and cfg.max_grad_norm > 0:
                acc.clip_grad_norm_(self.trainable, cfg.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.step(self.trainable)
            updates += 1
            self.global_updates += 1
            if on_update is not None:
                on_update(updates, loss_sum)
        # One host sync per epoch, not per step.
        # Each process's losses sum to num_processes x its share of the group mean.
        mean_loss = float(acc.reduce(loss_sum, reduction="sum")) / (max(1, updates) * acc.num_processes)
        return {"updates": updates, "images": images, "loss": mean_loss}

    def _micro_step(self, dataset, rows, group_rows: int, first_row: int) -> torch.Tensor:
        """Loss of this process's rows, scaled so summing over processes and micro-batches gives the group mean."""
        acc = self.accelerator
        real = len(rows)
        if real == 0:
            # An empty share of a short last batch still joins the gradient
            # all-reduce: one row of the chunk with weight zero.
            rows = np.array([first_row])
        latents, text_embeds = self.encoder(dataset, rows, self.generator)
        noisy, target, timesteps = noisy_inputs(
            latents, self.parts.noise_scheduler, self.generator, self.cfg.noise_offset, self.cfg.input_perturbation
        )
        with acc.autocast():
            pred = self.unet(noisy, timesteps, text_embeds, return_dict=False)[0]
        # Each process's gradient is averaged over num_processes by DDP, so a
        # weight of P / group_rows per sample makes the sum the group mean.
        weight = (acc.num_processes / group_rows) if real else 0.0
        weights = torch.full((latents.shape[0],), weight, device=latents.device)
        return diffusion_loss(pred, target, timesteps, self.parts.noise_scheduler, self.cfg.snr_gamma, weights)

