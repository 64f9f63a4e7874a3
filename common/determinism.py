"""--deterministic: the same seed gives the same numbers on a GPU too (docs/gpu.md: reproducibility).

On the CPU PyTorch's kernels are already run-to-run deterministic for this
workload; on CUDA some are not (cuBLAS split-K reductions with several
workspaces, cuDNN's benchmarked algorithm choice, atomics in some backward
kernels). PyTorch's recipe (https://pytorch.org/docs/stable/notes/randomness.html):
``torch.use_deterministic_algorithms(True)``, cuDNN deterministic and not
benchmarking, and ``CUBLAS_WORKSPACE_CONFIG`` set before cuBLAS starts (one of
the two values NVIDIA documents for deterministic cuBLAS, CUDA >= 10.2).
"""

from __future__ import annotations

import contextlib
import os

import torch

CUBLAS_WORKSPACE = ":4096:8"  # 8 workspaces of 4 MiB: NVIDIA's larger documented deterministic setting


def set_deterministic(enabled: bool) -> None:
    """Switch PyTorch's deterministic algorithms, cuDNN's deterministic mode and cuBLAS's workspace on or off
    (cuDNN's benchmarking the other way round).

    Call it before the first CUDA matrix multiply: cuBLAS reads its workspace setting when it starts. Turning it
    off leaves ``CUBLAS_WORKSPACE_CONFIG`` as it is (harmless: it only limits cuBLAS's workspace).
    """
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.deterministic = enabled
    # Benchmarking times cuDNN's convolution algorithms for each new shape and keeps the fastest: a training run's
    # shapes repeat every step, so it pays after the first; but the choice varies run to run, hence off when
    # deterministic.
    torch.backends.cudnn.benchmark = not enabled


def deterministic_state() -> dict:
    """What is set now: PyTorch's flag, cuDNN's two flags and the cuBLAS workspace (for logs and checks)."""
    return {"deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
            "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}


@contextlib.contextmanager
def deterministic(enabled: bool = True):
    """``set_deterministic(enabled)`` inside the block, the previous flags restored after it (tools, tests)."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    set_deterministic(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]
