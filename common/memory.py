"""Where the memory of a fine-tuning run goes: a budget from the run's own tensors, and peaks per chunk.

The budget lists each component with its bytes and device: trainable and
frozen UNet parameters, their gradients and the optimizer's state (the shapes
and dtypes autograd and the optimizer allocate at the first update: one
gradient per trainable tensor; AdamW two fp32 moments, 8-bit Adam two 1-byte
states plus one fp32 scale per 256 values), the EMA copy, the unlearned
weights kept for the per-chunk restore, the frozen text encoder and VAE, and
with several processes DDP's all-reduce buckets beyond the gradients (none
with ``gradient_as_bucket_view``, which our accelerator sets: the gradients are
views of the buckets; otherwise a second copy of the gradients), the device
memory an offloaded EMA update holds (one chunk and its update's temporary:
common/ema.py), and the scoring models the run keeps on the accelerator
between validations (CLIP, the concept classifier: fp32 parameters and
buffers, loaded once and never moved off).
Activations are not in it: they depend on batch and resolution and are
measured as the CUDA peak per chunk (validations.jsonl, ``peak_gpu_bytes``).
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional, Sequence

import torch

GB = 1024 ** 3
BNB_BLOCK = 256  # bitsandbytes' 8-bit optimizers keep one fp32 absmax per block of values


def nbytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes held by the tensors (numel x element size)."""
    return sum(t.numel() * t.element_size() for t in tensors)


def _device(tensors) -> str:
    devices = sorted({str(t.device) for t in tensors})
    return ",".join(devices) if devices else "-"


def _module_tensors(module: torch.nn.Module) -> list:
    return list(module.parameters()) + list(module.buffers())


def optimizer_state_bytes(optimizer: torch.optim.Optimizer, trainable, eight_bit: bool = False) -> int:
    """The optimizer's state: the real state tensors once it has stepped, else what its first step allocates."""
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    if state:
        return nbytes(state)
    if eight_bit:
        return sum(2 * (p.numel() + 4 * -(-p.numel() // BNB_BLOCK)) for p in trainable)
    return sum(2 * p.numel() * torch.finfo(torch.float32).bits // 8 for p in trainable)  # exp_avg, exp_avg_sq


def _ema(trainer) -> dict:
    """The EMA copy: its real tensors, or before the first chunk creates it, the clones of the trainable tensors."""
    if trainer.ema is not None:
        return {"bytes": nbytes(trainer.ema.shadow_params), "device": _device(trainer.ema.shadow_params)}
    if trainer.cfg.use_ema:
        return {"bytes": nbytes(trainer.trainable), "device": str(trainer.ema_device)}
    return {"bytes": 0, "device": "-"}


def ddp_bucket_bytes(model: torch.nn.Module, trainable) -> dict:
    """What DDP's gradient buckets hold beyond the gradients: nothing as views, a copy of them otherwise."""
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(model, DistributedDataParallel):
        return {"bytes": 0, "device": "-"}  # one process: no buckets
    return {"bytes": 0 if model.gradient_as_bucket_view else nbytes(trainable), "device": _device(trainable)}


def ema_update_bytes(trainer) -> dict:
    """What an offloaded EMA update holds on the device (a chunk and its temporary); nothing when the EMA stays on
    the device, and nothing on a CPU run (where the host copy is updated in place)."""
    device = trainer.accelerator.device
    if not (trainer.cfg.use_ema and trainer.cfg.offload_ema) or device.type == "cpu":
        return {"bytes": 0, "device": "-"}
    from .ema import round_trip_bytes

    return {"bytes": round_trip_bytes(trainer.trainable), "device": str(device)}


def scorer_model(score) -> Optional[torch.nn.Module]:
    """The torch model behind a scoring function (a ClipScorer's or ConceptClassifier's method), or None (NudeNet:
    onnxruntime on the host)."""
    model = getattr(getattr(score, "__self__", None), "model", None)
    return model if isinstance(model, torch.nn.Module) else None


def scorer_components(criteria: Sequence = (), retention=None) -> Dict[str, dict]:
    """``scorer_<name>`` per criterion with a torch model (and ``scorer_retention`` for a CLIP model of its own),
    each model counted once."""
    scores = [(f"scorer_{c.name}", c.score_images) for c in criteria]
    if retention is not None:
        scores.append(("scorer_retention", retention))
    out, seen = {}, set()
    for name, score in scores:
        model = scorer_model(score)
        if model is None or id(model) in seen:  # the retention prompts share the CLIP criterion's model
            continue
        seen.add(id(model))
        tensors = _module_tensors(model)
        out[name] = {"bytes": nbytes(tensors), "device": _device(tensors)}
    return out


def memory_budget(trainer, parts, largest_chunk: int = 0, criteria: Sequence = (),
                  retention=None) -> Dict[str, dict]:
    """Bytes and device of each component of a ChunkTrainer's run, plus the total on the accelerator.

    ``largest_chunk`` (rows) sizes the latent cache, which holds one chunk at a time. ``criteria`` (common.protocol
    Criterion) and ``retention`` (the retention prompts' scoring function): the scoring models, which stay loaded.
    """
    encoder = trainer.encoder
    cache = encoder.cache_bytes(largest_chunk) if hasattr(encoder, "cache_bytes") else 0
    trainable = trainer.trainable
    frozen = [p for p in parts.unet.parameters() if not p.requires_grad]
    budget = {
        "trainable_parameters": {"bytes": nbytes(trainable), "device": _device(trainable)},
        "frozen_unet_parameters": {"bytes": nbytes(frozen), "device": _device(frozen)},
        "gradients": {"bytes": nbytes(trainable), "device": _device(trainable)},
        "ddp_gradient_buckets": ddp_bucket_bytes(trainer.unet, trainable),
        "optimizer_state": {"bytes": optimizer_state_bytes(trainer.raw_optimizer, trainable, trainer.cfg.use_8bit_adam),
                            "device": _device(trainable)},
        "ema": _ema(trainer),
        "restore_copy": trainer.restore.budget(),
        "text_encoder": {"bytes": nbytes(_module_tensors(parts.text_encoder)),
                         "device": _device(_module_tensors(parts.text_encoder))},
        "vae": {"bytes": nbytes(_module_tensors(parts.vae)), "device": _device(_module_tensors(parts.vae))},
        "latent_cache": {"bytes": cache, "device": str(encoder.device) if cache else "-"},
        "ema_update_buffers": ema_update_bytes(trainer),
        **scorer_components(criteria, retention),
    }
    on_accelerator = sum(c["bytes"] for c in budget.values() if c["device"] not in ("cpu", "-", "disk"))
    host = sum(c["bytes"] for c in budget.values() if c["device"] == "cpu")
    return {"components": budget, "accelerator_bytes_before_activations": on_accelerator, "host_bytes": host}


def budget_lines(budget: dict) -> list:
    """The budget as log lines, in GB."""
    lines = ["memory budget (before activations):"]
    for name, c in budget["components"].items():
        lines.append(f"  {name:<24} {c['bytes'] / GB:8.3f} GB  {c['device']}")
    lines.append(f"  {'on the accelerator':<24} {budget['accelerator_bytes_before_activations'] / GB:8.3f} GB")
    lines.append(f"  {'in host memory':<24} {budget['host_bytes'] / GB:8.3f} GB")
    return lines


def reset_peak(device: torch.device) -> None:
    """Start a new CUDA peak window (one per chunk)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_record(device: torch.device) -> Optional[dict]:
    """{'peak_gpu_bytes': ...} since the last reset on CUDA; None elsewhere."""
    if device.type != "cuda":
        return None
    return {"peak_gpu_bytes": int(torch.cuda.max_memory_allocated(device))}
