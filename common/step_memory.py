"""GPU memory of one training step of an unlearning method (tools/unlearn.py), from plain counts.

Accounting, not a GPU measurement (docs/memory.md: "Unlearning methods at SD-1.4 size"): the parameters, their
gradients and the optimizer's state, the extra copies a method keeps (a frozen UNet, anchor weights, a Fisher
diagonal, an EMA, a saliency mask), the frozen parts on the device, and the activations of the UNet passes a step
holds at once: images whose forwards are kept for one backward x the bytes per image, plus what a no-grad forward
run while they are kept adds (a teacher's target). tools/unlearn.py's methods train in fp32, without autocast.
A step with phases of different size (a mask pass, inner and outer steps) is a list of ``Phase``; its budget is
the largest phase's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Sequence, Tuple

from .memory import BNB_BLOCK, GB

FP32 = 4  # bytes per value of the weights, gradients, copies and activations (the methods train in fp32)
ADAM_STATE = 2 * FP32  # torch Adam/AdamW: two fp32 moments per trained value
ADAM_8BIT_STATE = 2 + 2 * FP32 / BNB_BLOCK  # bitsandbytes: two 1-byte states + one fp32 absmax each per 256 values
MASK = 1  # a torch.bool mask: one byte per value

# SD-1.4's UNet at 512 px in fp32 (no autocast), measured on the CPU by tools/benchmark.py --memory --unlearning
# --sd14 (activation_bytes, no_grad_peak_bytes; batch 1 and 2, per image = the difference; 2026-12-05), bytes.
SD14_512_FP32 = {
    "per_image": 1871072768,  # kept for the backward, per image (1.743 GiB; nothing fixed per pass in fp32)
    "per_image_checkpointed": 587302400,  # the same with gradient checkpointing (0.547 GiB)
    "no_grad_per_image": 136321288,  # peak of a no-grad forward, per image (0.127 GiB)
}


@dataclass(frozen=True)
class Phase:
    """What one phase of a training step holds on the device: counts of values and of images."""

    name: str
    trained: int  # values with gradients (fp32 weights + fp32 gradients)
    frozen: int = 0  # the UNet's other values on the device (fp32)
    optimizer: bool = True  # an Adam/AdamW state for the trained values (a mask or Fisher pass has none)
    copies: Tuple[Tuple[str, int], ...] = ()  # other fp32 tensors on the device: (what, values)
    mask: int = 0  # values of a boolean mask on the device
    frozen_parts_bytes: int = 0  # text encoder and VAE on the device during the step
    grad_images: int = 0  # images whose forward activations are kept for one backward
    no_grad_images: int = 0  # images of a no-grad forward run while those are kept


def phase_budget(phase: Phase, per_image: int, no_grad_per_image: int, eight_bit: bool = False) -> Dict[str, int]:
    """Bytes of each component of ``phase`` and their ``total``; ``per_image``: activations kept per image."""
    state = ADAM_8BIT_STATE if eight_bit else ADAM_STATE
    out = {
        "trained_parameters": FP32 * phase.trained,
        "gradients": FP32 * phase.trained,
        "optimizer_state": int(state * phase.trained) if phase.optimizer else 0,
        "frozen_parameters": FP32 * phase.frozen,
        **{f"copy: {what}": FP32 * values for what, values in phase.copies},
        "mask": MASK * phase.mask,
        "frozen_parts": phase.frozen_parts_bytes,
        "activations": phase.grad_images * per_image + phase.no_grad_images * no_grad_per_image,
    }
    out["total"] = sum(out.values())
    return out


def step_budget(phases: Sequence[Phase], per_image: int, no_grad_per_image: int,
                eight_bit: bool = False) -> Tuple[str, Dict[str, int]]:
    """(name, components) of the largest phase: the step's peak."""
    budgets = [(p.name, phase_budget(p, per_image, no_grad_per_image, eight_bit)) for p in phases]
    return max(budgets, key=lambda b: b[1]["total"])


def fits(total_bytes: int, card_gib: float = 24.0) -> str:
    """'yes', 'tight' (over 90% of the card: the CUDA context and the allocator's slack come on top) or 'no'."""
    card = card_gib * GB
    return "yes" if total_bytes <= 0.9 * card else "tight" if total_bytes <= card else "no"


def gib(n: int) -> float:
    """Bytes in GiB, two decimals."""
    return round(n / GB, 2)
