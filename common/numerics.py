"""The pinned numeric environment: the same float bits from torch's CPU kernels on every x86-64 AVX2 machine.

Torch picks its CPU kernels by the instruction set it finds, and the kernels
of different levels round differently (measured on an AMD EPYC with AVX2,
torch 2.14.1, 2026-12-01: ATEN_CPU_CAPABILITY=default changes softmax,
GELU(tanh), SiLU, group and layer norm, attention and torch.randn;
ONEDNN_MAX_CPU_ISA=SSE41 changes convolutions and GELU; MKL_CBWR changes
matrix products; one intra-op thread instead of two changes sums and a GEMM).
Over thousands of training steps a last-bit difference grows into another
model, so the demo and the toy world run under ``PIN``, set before torch is
imported (the libraries read these variables when they load or first run):

- ``ATEN_CPU_CAPABILITY=avx2``: ATen's vectorised kernels (softmax, norms,
  activations, reductions, the normal sampler). Without it an AVX-512 machine
  runs its AVX-512 kernels.
- ``ONEDNN_MAX_CPU_ISA=AVX2``: oneDNN's convolutions and GELU.
- ``MKL_CBWR=COMPATIBLE``: MKL's GEMM on its SSE2 branch, the one branch MKL
  runs the same way on Intel and non-Intel CPUs; its AVX2 branch holds only
  on Intel CPUs (elsewhere MKL falls back to its AUTO branch; MKL_VERBOSE
  shows ``CNR:AUTO`` on this AMD machine). Cost measured here: a toy UNet
  training step 175-180 ms -> 230-237 ms, the toy VAE's no slower.
- One intra-op thread (OpenMP and MKL, MKL not free to use fewer): reductions
  split by thread count; the toy models are so small that one thread was as
  fast as two on 2 cores (toy VAE step 122-134 ms on 1 thread, 131-177 ms on
  2; UNet step 175-257 vs 233-276 ms), and the value does not depend on the
  machine's core count. `accelerate launch` keeps a set OMP_NUM_THREADS (unset,
  it picks 1 or the number of physical cores).

The pin is not the whole story: torch's CPU square root goes to MKL's vector
math, whose rounding under the pin differs between Intel and AMD CPUs (below).
The toolkit's optimizers (``adamw``, ``adam``: the fused kernels), noising
(common.training.noisy_inputs: ``exact_sqrt``) and samplers
(``portable_scheduler``) avoid it; ``probe()`` covers all three.

Top-level scripts call ``pin_process()``; a subprocess gets ``pinned_env()``
(or inherits it). ``describe()`` is the record written into card.json and
every run's config.json. ``python -m common.numerics`` prints it and a hash of
each probed primitive, to compare two machines.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import sys
from typing import Dict, Mapping, Optional

from .errors import InputError

THREADS = 1
PIN: Dict[str, str] = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_CBWR": "COMPATIBLE",
    "OMP_NUM_THREADS": str(THREADS),
    "MKL_NUM_THREADS": str(THREADS),
    "MKL_DYNAMIC": "FALSE",
}
REQUIRED_FLAGS = ("avx2", "fma")  # /proc/cpuinfo flags the pinned kernels execute
_REEXEC_MARK = "REVIVAL_NUMERICS_REEXEC"  # set in the re-executed process: a second re-exec is a bug, not a loop
_pinned_in_process = False  # PIN was put into os.environ by pin_process() before torch was imported


class NumericsError(RuntimeError):
    """The pinned environment was requested but cannot be in force in this process."""


def pinned_env(base: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """A copy of ``base`` (default os.environ) with the pin applied: the environment of a pinned subprocess."""
    return {**(os.environ if base is None else base), **PIN}


def is_pinned(env: Optional[Mapping[str, str]] = None) -> bool:
    """Whether every pinned variable has its pinned value in ``env`` (default os.environ)."""
    env = os.environ if env is None else env
    return all(env.get(k) == v for k, v in PIN.items())


def same_pin(record: Optional[dict]) -> bool:
    """Whether a ``describe()`` record (a card's, a run's) was made pinned exactly when this process is."""
    was = bool(record) and record.get("pinned") is True and record.get("pin") == PIN
    return was == is_pinned()


def _startup_env() -> Optional[Dict[str, str]]:
    """The environment this process was started with (Linux /proc/self/environ), None where unreadable."""
    try:
        with open("/proc/self/environ", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def cpu_info() -> Dict[str, object]:
    """CPU model name and ISA flags from /proc/cpuinfo (empty where there is none)."""
    fields: Dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())  # the first core's
    except OSError:
        pass
    return {"model": fields.get("model name") or platform.processor() or None, "machine": platform.machine(),
            "flags": set(fields.get("flags", "").split())}


def unsupported_reason(info: Optional[dict] = None) -> Optional[str]:
    """Why this CPU cannot run the pinned kernels (None when it can)."""
    info = cpu_info() if info is None else info
    if info["machine"] not in ("x86_64", "AMD64"):
        return f"the pinned numeric environment is for x86-64 CPUs; this one is {info['machine']}"
    missing = [f for f in REQUIRED_FLAGS if f not in info["flags"]]
    if missing:
        return f"the pinned numeric environment needs AVX2 and FMA; this CPU ({info['model']}) lacks {', '.join(missing)}"
    return None


def pin_process(reexec: bool = True) -> None:
    """Put this process under the pin, or fail loudly when it cannot be.

    A CPU without AVX2 and FMA: InputError (the remedy is the caller's flag that
    opts out). Started pinned: nothing to do (torch's state is checked when torch is
    loaded). Torch not imported yet: the pin goes into os.environ here. Torch
    already imported: its kernels, threads and MKL read the old environment,
    so with ``reexec`` the process replaces itself by the same command under
    the pinned environment, else NumericsError.
    """
    global _pinned_in_process
    reason = unsupported_reason()
    if reason:
        raise InputError(reason + "; run without the pin (make demo PIN=0, or --no_pin), and its numbers then "
                                     "differ from the README's")
    start = _startup_env()
    started_pinned = is_pinned(start if start is not None else os.environ)
    if started_pinned or _pinned_in_process:
        check_torch()
        return
    if "torch" not in sys.modules:
        os.environ.update(PIN)
        _pinned_in_process = True
        return
    if reexec and not os.environ.get(_REEXEC_MARK):
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**pinned_env(), _REEXEC_MARK: "1"})
    raise NumericsError("the pinned numeric environment was requested after torch was imported, which has read "
                        "the unpinned one; set it before importing torch (common.numerics.pinned_env() for a "
                        "subprocess)")


def check_torch() -> None:
    """With the pin in force and torch loaded: torch's kernel level and thread count are the pinned ones."""
    if "torch" not in sys.modules:
        return
    import torch

    capability, threads = torch.backends.cpu.get_cpu_capability(), torch.get_num_threads()
    if capability != PIN["ATEN_CPU_CAPABILITY"].upper() or threads != THREADS:
        raise NumericsError(f"the pin is set but torch runs {capability} kernels on {threads} thread(s) "
                            f"(pinned: {PIN['ATEN_CPU_CAPABILITY'].upper()}, {THREADS}): torch was imported, or "
                            "its threads set, before the pin")


def _torch_library_versions() -> Dict[str, Optional[str]]:
    """MKL and oneDNN versions torch was built with (from torch.__config__.show())."""
    import torch

    text = torch.__config__.show()
    mkl = re.search(r"Math Kernel Library Version (\S+)", text)
    dnn = re.search(r"MKL-DNN v(\S+)", text)
    blas = re.search(r"BLAS_INFO=(\w+)", text)
    return {"blas": blas and blas.group(1), "mkl": mkl and mkl.group(1), "onednn": dnn and dnn.group(1)}


def describe() -> dict:
    """The numeric environment of this process: CPU, torch's kernel level and threads, the pin, library versions."""
    import torch

    from .results import library_versions

    info = cpu_info()
    return {
        "pinned": is_pinned(),
        "pin": {k: os.environ.get(k) for k in PIN},
        "cpu_model": info["model"],
        "machine": info["machine"],
        "cpu_isa": sorted(f for f in info["flags"] if f in ("sse4_2", "avx", "avx2", "fma")
                          or f.startswith("avx512") or f.startswith("amx")),
        "cpu_count": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        **_torch_library_versions(),
        "library_versions": library_versions(),
    }


# ---- kernels whose bits depend on the CPU vendor even under the pin ------------------------------------------
# torch's CPU sqrt (also x ** 0.5, log10, atan, asin, acos) calls MKL's vector math (VML). Under
# MKL_CBWR=COMPATIBLE its float kernel starts from the rsqrtps estimate, whose bits differ between Intel and AMD
# CPUs, and is not correctly rounded (found 2026-12-02 with gdb, disassembly and qemu-user: a pinned AdamW step
# gave other bits on an Intel Xeon than on an AMD EPYC, and every other probed primitive the same). The toolkit's
# optimizers and noise schedules avoid it with the helpers below.


def adamw(params, **kwargs):
    """torch's AdamW with the fused kernel, whose square root is the exact vector instruction on every CPU."""
    import torch

    return torch.optim.AdamW(params, fused=True, **kwargs)


def adam(params, **kwargs):
    """torch's Adam with the fused kernel (see ``adamw``)."""
    import torch

    return torch.optim.Adam(params, fused=True, **kwargs)


def exact_sqrt(x):
    """The correctly rounded square root of a float32 (or narrower) tensor, the same bits on every CPU.

    Computed in float64 and rounded back: VML's float64 root is within one ulp
    (its HA accuracy), and rounding a root of a p-bit number to p bits from
    53 >= 2p + 2 bits is exact even from a result a few ulps off, because
    such a root keeps at least 2^-(2p+2) (relative) away from every rounding
    boundary (S. A. Figueroa, "When is double rounding innocuous?", 1995).
    """
    return x.double().sqrt().to(x.dtype)


def portable_scheduler(scheduler):
    """Hold ``scheduler``'s cumulative alphas in float64, so its step's roots round the same on every CPU; returns it.

    DDIM, PNDM and DDPM steps take ``alpha_bar ** 0.5`` and ``(1 - alpha_bar) ** 0.5`` of single entries of
    ``alphas_cumprod``: in float64 those roots are within an ulp (see ``exact_sqrt``) and the step rounds them
    to the sample's float32, exactly. The values themselves are the float32 ones, widened.
    """
    import torch

    for name in ("alphas_cumprod", "final_alpha_cumprod"):
        value = getattr(scheduler, name, None)
        if isinstance(value, torch.Tensor) and value.dtype == torch.float32:
            setattr(scheduler, name, value.double())
    return scheduler


def _digest(t) -> str:
    return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()[:16]


def probe() -> Dict[str, str]:
    """A hash of each primitive the toy models use, on fixed inputs: equal hashes, equal kernels' bits."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(0)  # inputs from numpy's generator: independent of torch's kernels

    def rand(*shape):
        return torch.from_numpy(rng.standard_normal(shape).astype(np.float32))

    out = {}
    for m, k, n in ((64, 64, 64), (7, 300, 33), (1024, 128, 128)):
        out[f"matmul_{m}x{k}x{n}"] = _digest(rand(m, k) @ rand(k, n))
    q, key, v = rand(8, 4, 16, 32), rand(8, 4, 16, 32), rand(8, 4, 16, 32)
    out["attention"] = _digest(F.scaled_dot_product_attention(q, key, v))
    x = rand(64, 1000)
    out["softmax"] = _digest(torch.softmax(x, -1))
    out["gelu"] = _digest(F.gelu(x))
    out["gelu_tanh"] = _digest(F.gelu(x, approximate="tanh"))
    out["silu"] = _digest(F.silu(x))
    out["sum"] = _digest(x.sum())
    out["layer_norm"] = _digest(F.layer_norm(x, (1000,)))
    img = rand(16, 32, 16, 16)
    out["conv3x3"] = _digest(F.conv2d(img, rand(64, 32, 3, 3) * 0.1, padding=1))
    out["conv1x1"] = _digest(F.conv2d(img, rand(64, 32, 1, 1) * 0.1))
    out["group_norm"] = _digest(F.group_norm(img, 8))
    out["randn"] = _digest(torch.randn(10000, generator=torch.Generator().manual_seed(0)))
    # A tiny backward and optimizer steps: conv -> group norm -> SiLU -> linear.
    net = torch.nn.Sequential(torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.GroupNorm(8, 32), torch.nn.SiLU(),
                              torch.nn.Flatten(), torch.nn.Linear(32 * 16 * 16, 10))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(rand(*p.shape) * 0.05)
    opt = adamw(net.parameters(), lr=1e-3)
    target = rand(16, 10)
    for _ in range(3):
        loss = F.mse_loss(net(img), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    out["train_steps"] = _digest(torch.cat([p.detach().flatten() for p in net.parameters()]))
    # The roots of the noise schedule: training's noising (common.training.noisy_inputs) and a DDIM sampling loop.
    from diffusers import DDIMScheduler

    out["exact_sqrt"] = _digest(exact_sqrt(torch.from_numpy((rng.random(50000) * 4 + 1e-3).astype(np.float32))))
    ddim = portable_scheduler(DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                            beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                                            steps_offset=1))
    ddim.set_timesteps(50)
    latents, eps = rand(2, 4, 8, 8), rand(2, 4, 8, 8)
    for t in ddim.timesteps:
        latents = ddim.step(eps * 0.5 + latents * 0.1, t, latents).prev_sample
    out["ddim_steps"] = _digest(latents)
    return out


if __name__ == "__main__":
    if "--pin" in sys.argv[1:]:
        pin_process()
    print(json.dumps({"numeric_environment": describe(), "probe": probe()}, indent=2))
