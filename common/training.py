"""UNet fine-tuning: the diffusion loss and one pass over a chunk.

The loss is the text-to-image objective of diffusers' train_text_to_image.py:
epsilon or v-prediction targets, optional Min-SNR weighting
(Hang et al. 2023, https://arxiv.org/abs/2303.09556), noise offset
(https://www.crosslabs.org/blog/diffusion-with-offset-noise) and input
perturbation (Ning et al. 2023, https://arxiv.org/abs/2301.11706).
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from . import numerics
from .curriculum import epoch_batches, reference_schedule, updates_per_epoch
from .encoding import to_device
from .faults import maybe_fail, maybe_poison


LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")  # every attention projection, as diffusers' LoRA scripts
LORA_RANK = 4  # --lora_rank's default, as diffusers' LoRA scripts
ADAPTER_FILE = "adapter.safetensors"  # a --params lora checkpoint's trained tensors, by parameter name
LORA_WEIGHTS = "lora_"  # the substring of a LoRA parameter's name (peft: lora_A, lora_B)


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
    params: str = "full"  # "full", "xattn" (cross-attention keys and values: attn2.to_k, attn2.to_v) or "lora"
    lora_rank: int = LORA_RANK  # --params lora: the adapter's rank r
    lora_alpha: Optional[float] = None  # its alpha (None: = rank, so a scale alpha / r of 1)
    lora_targets: tuple = LORA_TARGETS  # the UNet's modules (name suffixes) that get an adapter
    use_ema: bool = False
    ema_decay: float = 0.9999
    gradient_checkpointing: bool = False
    seed: int = 0
    compat_reference: bool = False  # the published scripts' in-order, first-batch-only epochs (curriculum.reference_schedule)
    offload_ema: bool = False  # the EMA copy in host memory, moved to the device only for its update
    restore_from_disk: Optional[str] = None  # the model's unet/ folder: restore from its safetensors, memory-mapped
    use_8bit_adam: bool = False  # bitsandbytes' AdamW8bit (CUDA)


class HostRestore:
    """The unlearned weights of the trained tensors, kept in host memory (touched once per chunk)."""

    def __init__(self, trainable):
        self.copies = [p.detach().to("cpu", copy=True) for p in trainable]

    def restore(self, trainable) -> None:
        with torch.no_grad():
            for p, p0 in zip(trainable, self.copies):
                p.copy_(p0.to(p.device))

    def budget(self) -> dict:
        from .memory import nbytes

        return {"bytes": nbytes(self.copies), "device": "cpu"}


class DiskRestore:
    """The unlearned weights read back from the model's own safetensors (memory-mapped) at each restore."""

    def __init__(self, weights_file: str, names):
        import json
        import os

        from safetensors import safe_open

        self.names = list(names)
        if weights_file.endswith(".index.json"):  # sharded: the index names each tensor's file
            with open(weights_file) as f:
                folder = os.path.dirname(weights_file)
                self.file_of = {k: os.path.join(folder, v) for k, v in json.load(f)["weight_map"].items()}
        else:
            self.file_of = {k: weights_file for k in self.names}
        self._open = lambda path: safe_open(path, framework="pt", device="cpu")

    def restore(self, trainable) -> None:
        by_file = {}
        for name, p in zip(self.names, trainable):
            by_file.setdefault(self.file_of[name], []).append((name, p))
        with torch.no_grad():
            for path, items in by_file.items():
                with self._open(path) as f:
                    for name, p in items:
                        p.copy_(f.get_tensor(name).to(p.device))

    def budget(self) -> dict:
        return {"bytes": 0, "device": "disk"}


XATTN_PROJECTIONS = ("attn2.to_k", "attn2.to_v")  # what the published scripts' --params xattn trains


def add_lora(unet: torch.nn.Module, rank: int, alpha: Optional[float], targets, seed: int) -> None:
    """Give the UNet a LoRA adapter through peft, as diffusers' LoRA training does (Hu et al. 2021,
    https://arxiv.org/abs/2106.09685): B starts at zero, so the adapted UNet starts as the unlearned one.

    A is drawn from a generator seeded by ``seed`` (every process draws the same), the global RNG untouched.
    """
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, init_lora_weights="gaussian",
                        target_modules=list(targets))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            unet.add_adapter(config)
        except ValueError as err:  # peft: none of the target modules exists in this UNet (bad input: exit 2)
            from .errors import InputError

            raise InputError(f"--lora_targets {','.join(targets)}: {err}") from None


def select_trainable(unet: torch.nn.Module, params) -> list:
    """Mark the trained parameters and return them in ``named_parameters`` order; freeze the rest.

    ``params``: "full" (the whole UNet), "xattn" (the cross-attention key and value projections), "lora" (the
    adapter's weights; add_lora first) or an explicit collection of parameter names (tools/unlearn.py's ESD
    variants).
    """
    if isinstance(params, str) and params not in ("full", "xattn", "lora"):
        raise ValueError(f"params must be 'full', 'xattn', 'lora' or parameter names, got {params!r}")
    names = None if isinstance(params, str) else set(params)
    trainable = []
    for name, p in unet.named_parameters():
        if names is not None:
            keep = name in names
        elif params == "lora":
            keep = LORA_WEIGHTS in name
        else:
            keep = params == "full" or any(proj in name for proj in XATTN_PROJECTIONS)
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
    alphas: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-batch MSE with optional Min-SNR-gamma weighting; ``sample_weights`` rescale samples (sum-normalised
    by caller); ``alphas``: alpha_bar at ``timesteps`` on the loss's device (``alpha_bars``), None: looked up here."""
    per_sample = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma is not None:
        snr = signal_to_noise(noise_scheduler, timesteps, alphas)
        weights = torch.clamp(snr, max=snr_gamma) / snr
        if noise_scheduler.config.prediction_type == "v_prediction":
            weights = torch.clamp(snr, max=snr_gamma) / (snr + 1)
        per_sample = per_sample * weights
    if sample_weights is None:
        return per_sample.mean()
    return (per_sample * sample_weights).sum()


def step_generator(seed: int, chunk: int, epoch: int, update: int) -> torch.Generator:
    """The CPU generator of one optimizer update, a pure function of its position in the run.

    Every process draws the same numbers for the whole global batch and takes
    its own rows, so 1 and N processes train on the same noise, and a run
    resumed mid-epoch needs no generator state.
    """
    state = np.random.SeedSequence([seed, chunk, epoch, update]).generate_state(2, dtype=np.uint32)
    return torch.Generator("cpu").manual_seed((int(state[0]) << 32) | int(state[1]))


def draw_batch(generator: torch.Generator, n: int, latent_shape, num_train_timesteps: int,
               noise_offset: float, input_perturbation: float) -> dict:
    """All random numbers of ``n`` training samples, in a fixed order (CPU, float32)."""
    c = latent_shape[0]
    draws = {
        "flip": torch.rand(n, generator=generator) < 0.5,
        "crop": torch.rand(n, 2, generator=generator),
        "latent_noise": torch.randn(n, *latent_shape, generator=generator),
        "noise": torch.randn(n, *latent_shape, generator=generator),
        "timesteps": torch.randint(0, num_train_timesteps, (n,), generator=generator),
    }
    if noise_offset:
        draws["noise"] = draws["noise"] + noise_offset * torch.randn(n, c, 1, 1, generator=generator)
    draws["applied_noise"] = draws["noise"]
    if input_perturbation:
        draws["applied_noise"] = draws["noise"] + input_perturbation * torch.randn(n, *latent_shape,
                                                                                   generator=generator)
    return draws


def alpha_bars(noise_scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """alpha_bar_t at ``timesteps`` (float32), looked up in the scheduler's table where ``timesteps`` are.

    The table is a host tensor (diffusers never moves a scheduler). The
    trainer looks its draws up on the host and sends the values with them
    through ``to_device`` (pinned, non-blocking); device ``timesteps`` copy the
    table over first, a blocking copy (callers outside the training loop).
    """
    table = noise_scheduler.alphas_cumprod
    if table.device != timesteps.device:
        table = table.to(timesteps.device)
    return table[timesteps].float()


def signal_to_noise(noise_scheduler, timesteps: torch.Tensor, alphas: Optional[torch.Tensor] = None) -> torch.Tensor:
    """SNR(t) = alpha_bar_t / (1 - alpha_bar_t) (Min-SNR weighting, https://arxiv.org/abs/2303.09556).

    diffusers' ``compute_snr`` squares torch roots of the same table, whose last
    bits depend on the CPU vendor (common.numerics); the ratio needs no root.
    ``alphas``: alpha_bar at ``timesteps`` already (``alpha_bars``), else looked up.
    """
    alphas = alpha_bars(noise_scheduler, timesteps) if alphas is None else alphas
    return alphas / (1 - alphas)


def noise_levels(noise_scheduler, timesteps: torch.Tensor, like: torch.Tensor,
                 alphas: Optional[torch.Tensor] = None):
    """sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t) at ``timesteps``, shaped to scale ``like``.

    The values of diffusers' ``add_noise`` (float32 table, DDPM eq. 4,
    https://arxiv.org/abs/2006.11239) with correctly rounded roots, so that
    the noised latents are the same bits on every CPU (common.numerics).
    ``alphas``: alpha_bar at ``timesteps`` already (``alpha_bars``), else looked up.
    """
    alphas = alpha_bars(noise_scheduler, timesteps) if alphas is None else alphas
    shape = (-1,) + (1,) * (like.ndim - 1)
    return (numerics.exact_sqrt(alphas).to(like.dtype).view(shape),
            numerics.exact_sqrt(1 - alphas).to(like.dtype).view(shape))


def noisy_inputs(latents, noise_scheduler, noise, applied_noise, timesteps, alphas: Optional[torch.Tensor] = None):
    """Noised latents and the regression target (epsilon or v) for given draws (``alphas``: see ``noise_levels``)."""
    signal, sigma = noise_levels(noise_scheduler, timesteps, latents, alphas)
    noisy = signal * latents + sigma * applied_noise
    if noise_scheduler.config.prediction_type == "epsilon":
        target = noise
    elif noise_scheduler.config.prediction_type == "v_prediction":
        target = signal * noise - sigma * latents  # v (https://arxiv.org/abs/2202.00512), as get_velocity
    else:
        raise ValueError(f"unknown prediction type {noise_scheduler.config.prediction_type}")
    return noisy, target


class NonFiniteLoss(RuntimeError):
    """Training diverged (NaN or infinite loss); no checkpoint is written from this state."""


def check_finite(loss: float, chunk: int, epoch: int, update: int) -> None:
    """Raise NonFiniteLoss naming where training diverged."""
    if not math.isfinite(loss):
        raise NonFiniteLoss(f"non-finite loss ({loss}) in chunk {chunk}, epoch {epoch}, by optimizer update "
                            f"{update}; the last good checkpoint is kept (lower --learning_rate or check the data)")


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
        if cfg.params == "lora":
            add_lora(unet, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.seed)
            # Checkpoints hold the adapter only: the frozen UNet is the model's own, on disk already.
            accelerator.register_save_state_pre_hook(self._save_adapter)
            accelerator.register_load_state_pre_hook(self._load_adapter)
        self.trainable = select_trainable(unet, cfg.params)
        # The unlearned weights, to restore before each chunk: in host memory, or read back from the model's files.
        names = [n for n, p in unet.named_parameters() if p.requires_grad]
        self.restore = DiskRestore(cfg.restore_from_disk, names) if cfg.restore_from_disk else HostRestore(self.trainable)
        # The fused AdamW rounds alike on every CPU (common.numerics). Under fp16's GradScaler, the unfused one:
        # accelerate tells a skipped update by the optimizer step the scaler did not call, and the scaler always
        # calls a fused step (which skips inside it); on a GPU, where fp16 runs, torch's sqrt is exact anyway.
        optimizer_class = numerics.adamw if accelerator.scaler is None else torch.optim.AdamW
        if cfg.use_8bit_adam:
            import bitsandbytes as bnb

            optimizer_class = bnb.optim.AdamW8bit
        optimizer = optimizer_class(
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
        # fp16: accelerate's GradScaler (None otherwise). Its state as new, to give each chunk a fresh one.
        self.scaler = accelerator.scaler
        self._fresh_scaler = None if self.scaler is None else self.scaler.state_dict()
        self.global_updates = 0  # update positions done (an update the scaler skipped included): checkpoint names
        self.epoch_skipped = 0  # updates of the current epoch the scaler skipped (fp16 overflow)
        # --compat reference only: updates in this chunk and micro-batches whose gradients wait for an update,
        # as they stood when the current epoch was planned (a resume re-plans the epoch from them).
        self.chunk_updates = 0
        self.pending_micro_batches = 0
        self.epoch_start = (0, 0)
        self.progress = None  # a tqdm bar over the run's updates (set by the session on the main process)

    def adapter_state(self) -> dict:
        """The trained tensors by parameter name (--params lora: the adapter), on the CPU."""
        unet = self.accelerator.unwrap_model(self.unet)
        return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in unet.named_parameters() if p.requires_grad}

    def _save_adapter(self, models, weights, output_dir) -> None:
        """accelerate's save_state hook: write the adapter's tensors instead of the whole UNet."""
        from safetensors.torch import save_file

        if weights:
            weights.pop()  # the UNet (the only prepared model): not saved whole
        if self.accelerator.is_main_process:
            save_file(self.adapter_state(), os.path.join(output_dir, ADAPTER_FILE))

    def _load_adapter(self, models, input_dir) -> None:
        """accelerate's load_state hook: read the adapter's tensors back into the UNet."""
        from safetensors.torch import load_file

        models.pop()  # nothing whole to load
        state = load_file(os.path.join(input_dir, ADAPTER_FILE))
        unet = self.accelerator.unwrap_model(self.unet)
        with torch.no_grad():
            for name, p in unet.named_parameters():
                if p.requires_grad:
                    p.copy_(state[name].to(p.device, p.dtype))

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
            from .ema import make_ema

            self.ema = make_ema(self.trainable, self.cfg.ema_decay, offload=self.cfg.offload_ema)

    @property
    def ema_device(self) -> torch.device:
        """Where the EMA copy lives between updates: host memory with --offload_ema, else the device."""
        return torch.device("cpu") if self.cfg.offload_ema else self.accelerator.device

    def _ema_step(self) -> None:
        """One EMA update; an offloaded copy makes one non-blocking round trip to the device for it (common/ema.py)."""
        self.ema.step(self.trainable)

    def reset_chunk(self, chunk: int, carry_state: bool = False) -> None:
        """Restore the unlearned UNet weights; unless ``carry_state``, fresh optimizer, LR schedule, EMA and fp16
        gradient scaler (a chunk then trains alone, --start_CL, as it does after others)."""
        self.restore.restore(self.trainable)
        self.chunk_updates = 0  # the published loop counts updates per chunk
        first = self.lr_scheduler is None
        if first or not carry_state:
            self.raw_optimizer.state.clear()
            self.raw_optimizer.zero_grad(set_to_none=True)
            self.pending_micro_batches = 0
            self._new_schedule()
            self._new_ema()
            if self.scaler is not None:
                self.scaler.load_state_dict(self._fresh_scaler)  # the initial loss scale, growth tracker at 0

    def plan_epoch(self, row_range, chunk: int, epoch: int) -> tuple:
        """This process's micro-batches of one epoch grouped by optimizer update, [(batches, ends_in_update)],
        and how many micro-batches' gradients still wait for an update after it.

        By default an epoch is a pass over the chunk shuffled by (seed, chunk,
        epoch), every group of ``gradient_accumulation_steps`` micro-batches
        ending in an update (the last may be shorter). Under
        ``compat_reference`` it is the published loop (``reference_schedule``):
        rows in order, a short last batch dropped as the published sampler does,
        and after epoch 0 usually a single micro-batch.
        """
        cfg, acc = self.cfg, self.accelerator
        batches = list(epoch_batches(row_range, cfg.train_batch_size, acc.num_processes, acc.process_index,
                                     cfg.seed, chunk, epoch, shuffle=not cfg.compat_reference))
        accum = cfg.gradient_accumulation_steps
        if not cfg.compat_reference:
            return [(batches[i : i + accum], True) for i in range(0, len(batches), accum)], 0
        full = [b for b in batches if b.global_size == cfg.train_batch_size * acc.num_processes]
        limit = updates_per_epoch(row_range[1] - row_range[0], cfg.train_batch_size, accum, acc.num_processes)
        pending, done = self.epoch_start
        groups, pending_after = reference_schedule(len(full), accum, pending, done, limit)
        return [([full[i] for i in idx], update) for idx, update in groups], pending_after

    def train_epoch(
        self,
        dataset,
        row_range,
        chunk: int,
        epoch: int,
        start_update: int = 0,
        loss_before: float = 0.0,
        on_update: Optional[Callable[[int, torch.Tensor], None]] = None,
    ) -> dict:
        """One epoch over a chunk (see ``plan_epoch``), from its update ``start_update`` on.

        Returns updates, images (all processes) and mean loss per group of the
        epoch; ``loss_before`` is the loss sum of updates done before a resume.
        Each process's loss is weighted by its share of the global batch so
        that the all-reduced gradient equals the gradient of the update's
        global-batch mean, even for a short last batch split unevenly across
        processes (under ``compat_reference``: each micro-batch's mean divided
        by the accumulation steps, as accelerate does in the published loop).
        ``on_update(n, loss_sum)`` runs after each update (checkpoints,
        signals); it is the only place a host sync may happen.
        """
        cfg, acc = self.cfg, self.accelerator
        self.encoder.prepare(dataset, row_range)
        if start_update == 0:
            self.epoch_start = (self.pending_micro_batches, self.chunk_updates)
            self.epoch_skipped = 0  # (a resumed epoch keeps the count its checkpoint stored)
        groups, pending_after = self.plan_epoch(row_range, chunk, epoch)
        accum = cfg.gradient_accumulation_steps
        loss_sum = torch.zeros((), device=acc.device)
        update_losses, lrs = [], []  # per optimizer update, for the trackers (synced once, at the epoch's end)
        images = sum(b.global_size for g, _ in groups[:start_update] for b in g)
        for u in range(start_update, len(groups)):
            group, ends_in_update = groups[u]
            group_rows = sum(b.global_size for b in group)
            divisor = accum * cfg.train_batch_size * acc.num_processes if cfg.compat_reference else group_rows
            images += group_rows
            draws = draw_batch(step_generator(cfg.seed, chunk, epoch, u), group_rows, self.encoder.latent_shape,
                               self.parts.noise_scheduler.config.num_train_timesteps, cfg.noise_offset,
                               cfg.input_perturbation)
            # The noise schedule's values at the drawn timesteps, looked up on the host (where the table is) and sent
            # with the draws: copying the table to the device per micro-step would be a blocking copy.
            draws["alphas"] = alpha_bars(self.parts.noise_scheduler, draws["timesteps"])
            offset = 0
            group_loss = torch.zeros((), device=acc.device)
            for j, batch in enumerate(group):
                last = ends_in_update and j == len(group) - 1
                sync = contextlib.nullcontext() if last else acc.no_sync(self.unet)
                mine = slice(offset + batch.offset, offset + batch.offset + len(batch.rows))
                with sync:
                    loss = maybe_poison(self._micro_step(dataset, batch.rows, draws, mine, divisor, row_range[0]))
                    acc.backward(loss)
                loss_sum += loss.detach()
                group_loss += loss.detach()
                offset += batch.global_size
            if not ends_in_update:  # --compat reference: these gradients wait for the next epoch's micro-batch
                continue
            if cfg.max_grad_norm and cfg.max_grad_norm > 0:
                acc.clip_grad_norm_(self.trainable, cfg.max_grad_norm)
            lrs.append(self.lr_scheduler.get_last_lr()[0])  # the rate this update uses
            update_losses.append(group_loss)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            # fp16: the GradScaler skips an update whose gradients overflowed (and lowers its scale). A skipped
            # update changed no weight, so neither the LR schedule nor the EMA advance (as accelerate does for a
            # prepared scheduler). The flag is set by scaler.step's own host sync: no extra one here.
            if self.optimizer.step_was_skipped:
                self.epoch_skipped += 1
            else:
                self.lr_scheduler.step()
                if self.ema is not None:
                    self._ema_step()
            self.global_updates += 1
            if self.progress is not None:
                self.progress.update(1)
            maybe_fail("update")  # tests: a crash inside an epoch
            if on_update is not None:
                on_update(u + 1, loss_sum)
        updates = sum(1 for _, ends_in_update in groups if ends_in_update)
        self.pending_micro_batches = pending_after
        self.chunk_updates = self.epoch_start[1] + updates  # the published loop's count: skipped ones included
        # One host sync per epoch. Each process's losses sum to num_processes x
        # its share of each group mean, hence the division.
        # The per-update losses ride on the same sync: one reduce of [epoch sum, update 1, update 2, ...].
        reduced = acc.reduce(torch.stack([loss_sum, *update_losses]), reduction="sum").tolist()
        total = reduced[0] / acc.num_processes + loss_before
        check_finite(total, chunk, epoch, self.global_updates)
        if self.progress is not None:
            self.progress.set_postfix(chunk=chunk, epoch=epoch, loss=f"{total / max(1, len(groups)):.4f}")
        return {"updates": updates - self.epoch_skipped, "skipped_updates": self.epoch_skipped, "images": images,
                "loss": total / max(1, len(groups)), "loss_sum": total,
                "update_losses": [v / acc.num_processes for v in reduced[1:]], "lrs": lrs}

    def _micro_step(self, dataset, rows, draws: dict, mine: slice, divisor: int, first_row: int) -> torch.Tensor:
        """Loss of this process's rows, scaled so summing over processes and micro-batches gives sum / ``divisor``."""
        acc = self.accelerator
        real = len(rows)
        if real == 0:
            # An empty share of a short last batch still joins the gradient
            # all-reduce: one row of the chunk with weight zero.
            rows, mine = np.array([first_row]), slice(0, 1)
        dev = acc.device
        latents, text_embeds = self.encoder(dataset, rows, draws["flip"][mine], draws["crop"][mine],
                                            draws["latent_noise"][mine])
        timesteps = to_device(draws["timesteps"][mine], dev)  # (no host wait: common/encoding.py)
        alphas = to_device(draws["alphas"][mine], dev)
        noisy, target = noisy_inputs(latents, self.parts.noise_scheduler, to_device(draws["noise"][mine], dev),
                                     to_device(draws["applied_noise"][mine], dev), timesteps, alphas)
        with acc.autocast():
            pred = self.unet(noisy, timesteps, text_embeds, return_dict=False)[0]
        # DDP averages gradients over num_processes, so a weight of P / divisor per
        # sample makes the sum over processes and micro-batches sum / divisor
        # (divisor = the group's rows: the group mean).
        weight = (acc.num_processes / divisor) if real else 0.0
        weights = torch.full((latents.shape[0],), weight, device=dev)
        return diffusion_loss(pred, target, timesteps, self.parts.noise_scheduler, self.cfg.snr_gamma, weights, alphas)
