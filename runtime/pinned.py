"""Exact-size page-locked host buffers, for copies between host and GPU that run asynchronously.

``torch.empty(..., pin_memory=True)`` goes through PyTorch's caching host allocator, which rounds
each block up to a power of two: a 2.1 GB embedding shard would pin 4.3 GB. Offloaded optimizer
state and activations are sized against a host-memory budget, so this module pins exactly what it
allocates: an ordinary host tensor whose pages are touched (the GPU machines' host RAM grows as it
is used) and then registered with ``cudaHostRegister``. Without CUDA the buffers are ordinary host
tensors, so the same code runs on a CPU-only machine.
"""

from __future__ import annotations

import warnings
import weakref

import torch

_PAGE = 4096


def cuda_pinning_available() -> bool:
    """True when host buffers can be page-locked (a CUDA device is visible)."""
    return torch.cuda.is_available()


def _unregister(pointer: int) -> None:
    try:
        torch.cuda.cudart().cudaHostUnregister(pointer)
    except Exception:  # noqa: BLE001 — interpreter shutdown: the driver may already be gone
        pass


def page_aligned(numel: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(whole pages as uint8, the first ``numel`` elements of ``dtype`` in them): a fresh allocation."""
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    locked = -(-nbytes // _PAGE) * _PAGE
    raw = torch.empty(locked + _PAGE, dtype=torch.uint8)
    offset = (-raw.data_ptr()) % _PAGE
    region = raw[offset:offset + locked]
    return region, region[:nbytes].view(dtype)


def pinned_empty(numel: int, dtype: torch.dtype, *, zero: bool = False) -> torch.Tensor:
    """A 1-D host tensor of exactly ``numel`` elements, page-locked when CUDA is available.

    ``zero`` fills it with zeros (the fill also commits the pages before they are locked). The
    locked range is whole pages inside this tensor's own allocation, so two buffers never share a
    locked page. When the driver refuses to lock it the buffer stays pageable (copies are then
    synchronous, not wrong) and a warning says so. The registration is released when the tensor is
    garbage-collected.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = numel * itemsize
    if not cuda_pinning_available() or nbytes == 0:
        buffer = torch.empty(numel, dtype=dtype)
        return buffer.zero_() if zero else buffer
    region, buffer = page_aligned(numel, dtype)
    locked = region.numel()
    region.zero_()  # touches every page, with torch's intra-op threads (host RAM may grow as it is used)
    status = torch.cuda.cudart().cudaHostRegister(region.data_ptr(), locked, 0)  # cudaHostRegisterDefault
    code = int(getattr(status, "value", status))
    if code != 0:
        warnings.warn(f"cudaHostRegister of {locked / 2**30:.2f} GiB failed (CUDA error {code}); this host buffer "
                      "stays pageable and its copies synchronous", stacklevel=2)
        return buffer
    weakref.finalize(buffer, _unregister, region.data_ptr())
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
