"""The EMA copy of the trained weights: diffusers' EMAModel, and its offloaded form for --offload_ema.

``--offload_ema`` keeps the copy in pinned host memory and brings it to the
device only for its update, as diffusers' train_text_to_image.py does. Each
update is one round trip in chunks of at most ``ROUND_TRIP_CHUNK_BYTES``: a
chunk of the pinned copy goes into one reusable device buffer without
blocking the host, is updated there by diffusers' own ``EMAModel.step``
(``foreach``: a few fused kernels per chunk; its temporary is as large as the
chunk), and comes back into the same pinned buffers without blocking. The
device so holds one chunk and its temporary, never the whole copy (3.2 GiB
for an SD-1.x UNet, plus as much again for the temporary). The host waits for
the last copy back only when it reads the EMA itself (a checkpoint, a saved
pipeline), never inside the training loop.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from diffusers.training_utils import EMAModel


# Bytes of the EMA copy on the device at a time during an offloaded update (the chunk buffer); the foreach update's
# temporary adds at most as many. 256 MiB: 13 chunks for an SD-1.x UNet (3.2 GiB of fp32), each a few ms of PCIe.
ROUND_TRIP_CHUNK_BYTES = 256 * 2 ** 20
ALIGN = 64  # bytes: where each tensor's piece starts in the chunk buffer (any dtype's alignment)


def chunk_plan(shadow: list, parameters: list, chunk_bytes: int) -> list:
    """The round trip's chunks, each a list of (tensor index, start, end) element ranges of at most ``chunk_bytes``.

    A tensor is split (flat, in its memory order) where a chunk ends; one that
    is not contiguous (or whose parameter is not) travels whole, in a chunk of
    its own when it is larger than ``chunk_bytes``.
    """
    chunks, current, room = [], [], chunk_bytes
    for i, (s, p) in enumerate(zip(shadow, parameters)):
        size, n, start = s.element_size(), s.numel(), 0
        split = s.is_contiguous() and p.is_contiguous()
        while start < n:
            fits = room // size if split else (n if n * size <= room else 0)
            if fits <= 0 and current:  # this chunk is full: the rest goes into the next
                chunks.append(current)
                current, room = [], chunk_bytes
                continue
            end = n if not split else start + max(1, min(n - start, fits))  # an empty chunk takes at least one
            current.append((i, start, end))
            room -= (end - start) * size
            start = end
    return chunks + [current] if current else chunks


def _offsets(pieces: list) -> tuple:
    """Each piece's byte offset in the chunk buffer (ALIGN-aligned) and the buffer's size."""
    offsets, end = [], 0
    for t in pieces:
        start = -(-end // ALIGN) * ALIGN
        offsets.append(start)
        end = start + t.numel() * t.element_size()
    return offsets, end


def round_trip_bytes(tensors: list, chunk_bytes: Optional[int] = None) -> int:
    """The most device memory one offloaded update of ``tensors``' EMA holds: the chunk buffer, and the foreach
    update's temporary (at most the same size)."""
    chunk_bytes = ROUND_TRIP_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    plan = chunk_plan(tensors, tensors, chunk_bytes)
    return 2 * max((_offsets([_piece(tensors[i], a, b) for i, a, b in c])[1] for c in plan), default=0)


def _piece(t: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Elements [start, end) of ``t`` (flat; ``t`` itself when whole), a view with its ``requires_grad`` (which
    EMAModel.step reads: trained tensors are averaged, the others copied)."""
    if start == 0 and end == t.numel():
        return t
    return t.detach().view(-1)[start:end].detach().requires_grad_(t.requires_grad)


def round_trip_step(ema: EMAModel, parameters: list, device: torch.device,
                    chunk_bytes: Optional[int] = None) -> Optional[object]:
    """Update host-resident ``ema`` on ``device`` chunk by chunk: copy in, step, copy back into the same host buffers.

    Each chunk is diffusers' ``EMAModel.step`` on the chunk's pieces, with the
    update's step count (``get_decay`` of the same ``optimization_step``): the
    same numbers as one step over the whole copy, counted once. Returns the
    CUDA event that marks the last copy back (None elsewhere: a CPU copy is
    done when it returns). The pieces go through a real buffer even when
    ``device`` is the CPU (the tests' stand-in for a GPU).
    """
    cuda = device.type == "cuda"
    host, step, foreach = ema.shadow_params, ema.optimization_step, ema.foreach
    plan = chunk_plan(host, parameters, ROUND_TRIP_CHUNK_BYTES if chunk_bytes is None else chunk_bytes)
    chunks = [([_piece(host[i], a, b) for i, a, b in c], [_piece(parameters[i], a, b) for i, a, b in c])
              for c in plan or [[]]]  # no tensors: one empty chunk, so the step still counts
    layouts = [_offsets(pieces) for pieces, _ in chunks]
    buffer = torch.empty(max(1, *(size for _, size in layouts)), dtype=torch.uint8, device=device)  # largest chunk
    try:
        for (pieces, params), (offsets, _) in zip(chunks, layouts):
            on_device = [buffer[o:o + h.numel() * h.element_size()].view(h.dtype).view(h.shape)
                         for o, h in zip(offsets, pieces)]
            with torch.no_grad():
                for d, h in zip(on_device, pieces):
                    d.copy_(h, non_blocking=cuda)  # pinned: no host wait
            ema.shadow_params, ema.optimization_step = on_device, step  # every chunk takes this update's decay
            # The library's foreach path needs a trained tensor; without one its per-tensor path does the same copy.
            ema.foreach = foreach and any(p.requires_grad for p in params)
            EMAModel.step(ema, params)  # the library's update, whatever subclass ``ema`` is
            with torch.no_grad():
                for h, d in zip(pieces, on_device):
                    # Into the same pinned buffers (no allocation, no re-pin). The next chunk's copy into the device
                    # buffer is queued after this one on the same stream, so reusing the buffer needs no wait.
                    h.copy_(d, non_blocking=cuda)
    finally:
        ema.shadow_params, ema.foreach = host, foreach
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
