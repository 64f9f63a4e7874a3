"""The EMA copy of the trained weights: diffusers' EMAModel, and its offloaded form for --offload_ema.

``--offload_ema`` keeps the copy in pinned host memory and brings it to the
device only for its update, as diffusers' train_text_to_image.py does. Each
update is one round trip: the pinned copy goes to the device without blocking
the host, is updated there (``foreach``: a few fused kernels instead of one per
tensor), and comes back into the same pinned buffers without blocking. The host
waits for that copy only when it reads the EMA itself (a checkpoint, a saved
pipeline), never inside the training loop.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from diffusers.training_utils import EMAModel


def round_trip_step(ema: EMAModel, parameters: list, device: torch.device) -> Optional[object]:
    """Update host-resident ``ema`` on ``device``: copy in, step, copy back into the same host buffers.

    Returns the CUDA event that marks the copy back (None elsewhere: a CPU copy is done when it returns).
    ``copy=True`` makes the copy real even when ``device`` is the CPU (the tests' stand-in for a GPU).
    """
    cuda = device.type == "cuda"
    host = ema.shadow_params
    ema.shadow_params = [s.to(device, non_blocking=cuda, copy=True) for s in host]  # pinned: no host wait
    try:
        EMAModel.step(ema, parameters)  # the library's update, whatever subclass ``ema`` is
        with torch.no_grad():
            for h, d in zip(host, ema.shadow_params):
                h.copy_(d, non_blocking=cuda)  # into the same pinned buffers: no new allocation, no re-pin
    finally:
        ema.shadow_params = host
    if not cuda:
        return None
    event = torch.cuda.Event()
    event.record()
    return event


class OffloadedEMA(EMAModel):
    """EMAModel whose copy lives in host memory (pinned when CUDA is there) and visits the device per update."""

    def __init__(self, parameters: Iterable[torch.nn.Parameter], **kwargs):
        super().__init__(parameters, **kwargs)
        self._copied_back = None  # the last update's copy back to the host (a CUDA event), not yet waited for
        self._to_host()

    def _to_host(self) -> None:
        """Shadow tensors into host memory, pinned when there is a GPU to copy to and from."""
        super().to("cpu")
        if torch.cuda.is_available():
            super().pin_memory()

    def wait(self) -> None:
        """Block until the last update's copy back to host memory has landed (before the host reads it)."""
        if self._copied_back is not None:
            self._copied_back.synchronize()
            self._copied_back = None

    @torch.no_grad()
    def step(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        parameters = list(parameters)
        device = parameters[0].device if parameters else torch.device("cpu")
        if device.type == "cpu":  # no accelerator: the host copy is where the update runs
            self.wait()
            super().step(parameters)
            return
        # The device-to-host copy of the previous update is ordered before this one's host-to-device copy on the
        # same stream, so no wait is needed here either.
        self._copied_back = round_trip_step(self, parameters, device)

    # Everything that reads or replaces the host copy waits for the copy back first.
    def state_dict(self) -> dict:
        self.wait()
        return super().state_dict()

    def copy_to(self, parameters) -> None:
        self.wait()
        super().copy_to(parameters)

    def to(self, device=None, dtype=None, non_blocking=False) -> None:
        self.wait()
        super().to(device=device, dtype=dtype, non_blocking=non_blocking)

    def pin_memory(self) -> None:
        self.wait()
        super().pin_memory()

    def load_state_dict(self, state_dict: dict) -> None:
        self.wait()
        super().load_state_dict(state_dict)
        self._to_host()  # a loaded copy is pageable: back into pinned host memory


def make_ema(parameters, decay: float, offload: bool) -> EMAModel:
    """The run's EMA copy: on the parameters' device, or offloaded to host memory; updated with ``foreach``."""
    cls = OffloadedEMA if offload else EMAModel
    return cls(parameters, decay=decay, foreach=True)
