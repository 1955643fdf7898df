"""When the Triton kernels run, and small helpers shared by them.

Importing this module never imports Triton: CPU-only installs have no Triton, and every kernel
falls back to its pure-PyTorch reference there.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


@functools.cache
def triton_importable() -> bool:
    """True when the ``triton`` package is installed (it is not imported here)."""
    return importlib.util.find_spec("triton") is not None


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the Triton kernels should run for these tensors: all on CUDA and Triton installed.

    ``DIMSHARD_DISABLE_TRITON=1`` forces the PyTorch references (for A/B checks on a GPU).
    """
    if os.environ.get("DIMSHARD_DISABLE_TRITON", "0") == "1" or not triton_importable():
        return False
    return all(t.is_cuda for t in tensors)


def next_power_of_2(x: int) -> int:
    """The smallest power of two that is >= x (1 for x <= 1)."""
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


def num_programs_hint(device: torch.device, per_sm: int) -> int:
    """How many programs a persistent (row-looping) kernel should launch on ``device``.

    On CUDA: ``per_sm`` programs per multiprocessor. Elsewhere (the Triton interpreter on the
    CPU, used by the tests) a small fixed number, so that the row loop is still exercised.
    """
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count * per_sm
    return 4
