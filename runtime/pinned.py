"""Exact-size page-locked host buffers, for copies between host and GPU that run asynchronously.

``torch.empty(..., pin_memory=True)`` goes through PyTorch's caching host allocator, which rounds
each block up to a power of two: a 2.1 GB embedding shard would pin 4.3 GB. Offloaded optimizer
state and activations are sized against a host-memory budget, so this module pins exactly what it
allocates: an ordinary host tensor whose pages are touched (the GPU machines' host RAM grows as it
is used) and then registered with ``cudaHostRegister``. Without CUDA the buffers are ordinary host
tensors, so the same code runs on a CPU-only machine.
"""

from __future__ import annotations

import weakref

import torch


def cuda_pinning_available() -> bool:
    """True when host buffers can be page-locked (a CUDA device is visible)."""
    return torch.cuda.is_available()


def _unregister(pointer: int) -> None:
    try:
        torch.cuda.cudart().cudaHostUnregister(pointer)
    except Exception:  # noqa: BLE001 — interpreter shutdown: the driver may already be gone
        pass


def pinned_empty(numel: int, dtype: torch.dtype, *, zero: bool = False) -> torch.Tensor:
    """A 1-D host tensor of exactly ``numel`` elements, page-locked when CUDA is available.

    ``zero`` fills it with zeros (the fill also commits the pages before they are locked). The
    registration is released when the tensor is garbage-collected.
    """
    buffer = torch.empty(numel, dtype=dtype)
    if zero or cuda_pinning_available():
        buffer.zero_()  # touches every page, with torch's intra-op threads
    if cuda_pinning_available() and numel > 0:
        nbytes = numel * buffer.element_size()
        # cudaHostRegisterDefault = 0; portable pinned memory on every context.
        status = torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), nbytes, 0)
        code = int(getattr(status, "value", status))
        if code != 0:
            raise RuntimeError(
                f"cudaHostRegister of {nbytes / 2**30:.2f} GiB of host memory failed (CUDA error {code}): the host "
                "cannot lock that much memory; lower --host_memory_budget_gb or offload less"
            )
        weakref.finalize(buffer, _unregister, buffer.data_ptr())
    return buffer


class HostBufferPool:
    """Reuses page-locked host buffers by (numel, dtype), so each step does not pin memory again.

    ``take`` returns a free buffer of that size or pins a new one; ``give`` returns it to the pool.
    ``in_use_bytes`` and ``peak_bytes`` track what is handed out (the host peak the planner prices).
    """

    def __init__(self) -> None:
        self._free: dict[tuple[int, torch.dtype], list[torch.Tensor]] = {}
        self.in_use_bytes = 0
        self.peak_bytes = 0
        self.pinned_bytes = 0

    def take(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A 1-D host buffer of ``numel`` elements of ``dtype`` (contents undefined)."""
        free = self._free.get((numel, dtype))
        if free:
            buffer = free.pop()
        else:
            buffer = pinned_empty(numel, dtype)
            self.pinned_bytes += buffer.numel() * buffer.element_size()
        self.in_use_bytes += buffer.numel() * buffer.element_size()
        self.peak_bytes = max(self.peak_bytes, self.in_use_bytes)
        return buffer

    def give(self, buffer: torch.Tensor) -> None:
        """Return a buffer from ``take``; it may be handed out again."""
        self.in_use_bytes -= buffer.numel() * buffer.element_size()
        self._free.setdefault((buffer.numel(), buffer.dtype), []).append(buffer)
