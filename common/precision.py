"""The one mixed-precision policy (docs/protocols.md: models and precision), and its CPU emulation for the tests.

Policy: every model the toolkit trains or scores is loaded in fp32 (the master
weights); under ``--mixed_precision fp16|bf16`` only the frozen copies used
under autocast (the VAE and text encoder during fine-tuning) are cast to the
weight dtype, and the forward pass runs under autocast. Images are drawn the
same way, in validation and in eval_model.py alike
(``validation.generation_precision``). fp16 needs CUDA: without it we fall
back to full precision with one warning, so GPU command lines also run on a
CPU.

The fall-back hides the fp16 code path from a CPU-only test suite:
``Accelerator(mixed_precision="fp16", cpu=True)`` silently runs fp32 (no
autocast, no GradScaler). ``REVIVAL_EMULATE_FP16=1`` (tests only) keeps fp16 on
the CPU and gives the Accelerator what CUDA would: native AMP, i.e. autocast to
float16 on the CPU, and a CPU ``torch.amp.GradScaler``. That reproduces the
fp16 failure modes of a GPU run (an fp16 trainable parameter raises "Attempting
to unscale FP16 gradients"; an overflow skips the optimizer step), at CPU
speed. ``REVIVAL_FP16_INIT_SCALE`` sets the scaler's initial scale there
(a huge value forces overflows).
"""

from __future__ import annotations

import os
import sys
from typing import Optional

import torch

EMULATE_FP16_ENV = "REVIVAL_EMULATE_FP16"  # "1": fp16 as on a GPU, on the CPU (the test suite's switch)
INIT_SCALE_ENV = "REVIVAL_FP16_INIT_SCALE"  # the emulated GradScaler's initial scale (default 2**16, torch's)
MASTER_DTYPE = torch.float32  # what every trained or scored model is loaded in


def emulating_fp16() -> bool:
    """True when the test suite asked for fp16 on the CPU (and there is no CUDA to run it for real)."""
    return os.environ.get(EMULATE_FP16_ENV) == "1" and not torch.cuda.is_available()


REQUIRE_CUDA_ENV = "REVIVAL_REQUIRE_CUDA"  # 1: stop without CUDA, as inside a SLURM job that requested GPUs
SLURM_GPU_VARS = ("SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS")  # set by SLURM where GPUs were granted
# The pinned torch is a CUDA 13.0 build: NVIDIA's release notes require driver 580 or newer for CUDA 13.0.
CUDA_DRIVER_NOTE = "the pinned torch is built for CUDA 13.0, which needs NVIDIA driver 580 or newer"


def cuda_expected() -> Optional[str]:
    """Why this process must see a CUDA device (a SLURM job granted GPUs, or REVIVAL_REQUIRE_CUDA=1), else None."""
    if os.environ.get(REQUIRE_CUDA_ENV) == "1":
        return f"{REQUIRE_CUDA_ENV}=1"
    for name in SLURM_GPU_VARS:
        value = os.environ.get(name, "")
        if value and value != "0":
            return f"this SLURM job was granted GPUs ({name}={value})"
    return None


def check_cuda(cuda_available: Optional[bool] = None) -> None:
    """Stop before any model loads (InputError: one line, exit 2) where a GPU was asked for and torch sees none: a
    GPU job must not run for hours at CPU speed (or at fp32 where it asked for fp16)."""
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    why = cuda_expected()
    if why and not cuda and not emulating_fp16():
        from .errors import InputError

        raise InputError(f"no CUDA device, but {why}: torch {torch.__version__} sees none (check nvidia-smi, "
                         f"CUDA_VISIBLE_DEVICES, and the driver: {CUDA_DRIVER_NOTE}); stopped before loading models")


def effective_mixed_precision(requested: str, cuda_available: Optional[bool] = None, warn: bool = True) -> str:
    """The mixed-precision mode we actually run: fp16 without CUDA falls back to 'no' with one warning
    (unless the CPU emulation is on), except in a job that asked for a GPU (``check_cuda``: it stops)."""
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    check_cuda(cuda)
    if requested == "fp16" and not cuda and not emulating_fp16():
        if warn:
            print("warning: --mixed_precision fp16 needs CUDA; running in full precision (fp32) on this machine",
                  file=sys.stderr, flush=True)
        return "no"
    return requested


def weight_dtype_for(mixed_precision: str) -> torch.dtype:
    """dtype of the frozen parts (and of inference) for a mixed-precision mode."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def autocast_to(device_type: str, dtype: torch.dtype):
    """torch.autocast to ``dtype`` on ``device_type``, off for fp32; on the CPU under the fp16 emulation with CUDA's
    fp32 op policy, as the emulated Accelerator's autocast has it (a process without an Accelerator, eval_model.py,
    gets the same kernels)."""
    import contextlib

    if dtype == MASTER_DTYPE:
        return contextlib.nullcontext()
    if device_type == "cpu" and dtype == torch.float16 and emulating_fp16():
        follow_cuda_autocast_policy()
    return torch.autocast(device_type, dtype=dtype)


def set_tf32(enabled: bool) -> None:
    """TF32 matrix multiplies (Ampere and newer; --allow_tf32): ~8x the fp32 rate on tensor cores, 10-bit mantissas
    in the products (https://pytorch.org/docs/stable/notes/cuda.html#tensorfloat-32-tf32-on-ampere-and-later-devices).
    cuDNN's convolutions use TF32 by PyTorch's own default either way."""
    torch.backends.cuda.matmul.allow_tf32 = bool(enabled)


DYNAMO_ENV = "ACCELERATE_DYNAMO_BACKEND"  # what `accelerate config` / `accelerate launch --dynamo_backend` set


def make_accelerator(mixed_precision: str, **kwargs):
    """An Accelerator in ``mixed_precision`` (already resolved by effective_mixed_precision); on the CPU under
    the fp16 emulation, with the native AMP and GradScaler a CUDA device would get.

    The model is never compiled: an accelerate config that asks for a dynamo backend is overridden (and said so),
    because compiling the UNet has not been tested with the toolkit's hooks (gradient checkpointing, autocast
    policy, the scaler's skip detection, LoRA) and its first minutes of compilation change every timing."""
    import logging

    from accelerate import Accelerator

    kwargs.setdefault("cpu", not torch.cuda.is_available())
    asked = os.environ.get(DYNAMO_ENV, "no")
    if asked.lower() != "no" and int(os.environ.get("RANK", "0")) == 0:
        logging.getLogger(__name__).warning(f"{DYNAMO_ENV}={asked} (accelerate config): not used; the toolkit runs "
                                            "the model uncompiled")
    acc = Accelerator(mixed_precision=mixed_precision, dynamo_backend="no", **kwargs)
    destroy_process_group_at_exit()
    if acc.mixed_precision == "fp16" and acc.device.type == "cpu" and not acc.native_amp:
        emulate_native_amp(acc)
    return acc


def process_state():
    """accelerate's PartialState on the device this machine has: without ``cpu=True`` a CPU-only
    ``accelerate launch --num_processes N`` gives N processes that each believe they are alone."""
    from accelerate import PartialState

    check_cuda()
    state = PartialState(cpu=not torch.cuda.is_available())
    destroy_process_group_at_exit()
    return state


_group_destroyed_at_exit = False


def destroy_process_group_at_exit() -> None:
    """Destroy the default process group (if any is still alive) when the interpreter exits, however the run ends.

    A rank that exits with gloo's threads still holding work aborts in the interpreter's finalization
    ("terminate called without an active exception", SIGABRT): seen once in a two-process run of
    tools/attack_prompts.py, which, like tools/generate_training_data.py, never ended its group (the fine-tuning
    scripts' Accelerator.end_training does, on their success and error paths alike). An atexit function runs while
    the interpreter is still whole.
    """
    global _group_destroyed_at_exit
    if _group_destroyed_at_exit:
        return
    import atexit

    def destroy():
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    atexit.register(destroy)
    _group_destroyed_at_exit = True


def emulate_native_amp(accelerator) -> None:
    """Give a CPU Accelerator in fp16 accelerate's CUDA fp16 set-up: autocast on, a GradScaler (before prepare)."""
    init_scale = float(os.environ.get(INIT_SCALE_ENV, 2.0 ** 16))
    # oneDNN's float16 convolution backward falls back to a reference kernel on CPUs without native fp16: 1.16 s
    # of a tiny UNet's 1.2 s update, 35x its fp32 time; ATen's own takes 0.28 s, and oneDNN's forward (0.04 s) is
    # 4x faster than ATen's (2-core Xeon, 2026-12-02). The emulation is about code paths and overflows, not oneDNN:
    # backward passes run without it.
    backward = accelerator.backward

    def backward_without_onednn(loss, **kwargs):
        with torch.backends.mkldnn.flags(enabled=False):
            return backward(loss, **kwargs)

    accelerator.backward = backward_without_onednn
    accelerator.native_amp = True
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    follow_cuda_autocast_policy()


# The ops, among those our models, losses and scorers call, that CUDA's autocast runs in float32 and CPU's in their
# inputs' dtype (torch's autocast op reference: "CUDA Ops that can autocast to float32", against the CPU lists). Seen
# on torch 2.14: under CPU autocast, group_norm, layer_norm, softmax, exp and sum of float16 inputs stay float16, and
# a float16 sum of 1000 x 100.0 overflows to inf where CUDA's gives 1e5 in float32.
CUDA_FP32_OPS = (
    "group_norm", "layer_norm", "softmax", "log_softmax", "softplus", "cosine_similarity", "exp", "expm1", "log",
    "log1p", "log2", "log10", "pow", "sum", "cumsum", "cumprod", "norm", "rsqrt", "reciprocal", "cosh", "sinh", "tan",
    "acos", "asin", "erfinv", "dist", "renorm",
)
_cuda_policy_library = None  # the registrations live as long as this object: the rest of the process


def follow_cuda_autocast_policy() -> list:
    """Make CPU autocast run CUDA's float32 ops in float32 (their floating inputs cast, as CUDA's autocast casts
    them); returns the operator overloads given that kernel. Idempotent.

    Registered on the dispatcher's AutocastCPU key, where autocast's own kernels sit, so the policy also holds in a
    gradient-checkpointed block recomputed during backward. Tests only: the fp16 emulation then overflows, and
    mixes dtypes, where a GPU run would.
    """
    global _cuda_policy_library
    if _cuda_policy_library is not None:
        return _cuda_policy_library.registered
    from torch.utils._pytree import tree_map

    def widen(x):
        return x.float() if isinstance(x, torch.Tensor) and x.dtype in (torch.float16, torch.bfloat16) else x

    def fp32_kernel(op):
        def kernel(*args, **kwargs):
            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)):
                if torch.get_autocast_dtype("cpu") == torch.float16:  # the emulation's; bf16 on a CPU is CPU's own
                    args, kwargs = tree_map(widen, (args, kwargs))
                return op(*args, **kwargs)
        return kernel

    lib = torch.library.Library("aten", "IMPL")
    lib.registered = []
    for name in CUDA_FP32_OPS:
        packet = getattr(torch.ops.aten, name)
        for overload in packet.overloads():
            qualified = name if overload == "default" else f"{name}.{overload}"
            if "out" in overload:
                continue
            try:
                if torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{qualified}", "AutocastCPU"):
                    continue  # CPU autocast handles it already
            except RuntimeError:
                continue  # a TorchScript builtin on Python numbers (exp.int, pow.int_float, ...), not a tensor op
            lib.impl(qualified, fp32_kernel(getattr(packet, overload)), "AutocastCPU")
            lib.registered.append(qualified)
    _cuda_policy_library = lib
    return lib.registered


def amp_mode(accelerator) -> str:
    """How the run's precision is realised, for config.json: 'fp32', 'native amp (cuda)', 'emulated on cpu'."""
    if not getattr(accelerator, "native_amp", False):
        return "fp32"
    if accelerator.device.type == "cpu" and accelerator.mixed_precision == "fp16":
        return "emulated on cpu"
    return f"native amp ({accelerator.device.type})"
