"""Router and auxiliary-loss ops where a device lacks a kernel: a ``histc`` drop-in and a meta ``bincount``.

The compile stage traces on the meta device, where transformers' load-balancing loss takes the
GPU branch and counts expert picks with ``torch.histc`` of int32; PyTorch's CPU histogram has no
integer kernel. Generated code calls ``histc`` here instead (planner/ops/rules/moe.py names it):
the same counts on every device. transformers 5.17 counts with ``bincount(ids, minlength=e)``,
which has no meta kernel in PyTorch: importing this module registers one (``minlength`` bins).
"""

from __future__ import annotations

import torch


def histc(input: torch.Tensor, bins: int = 100, min: float = 0, max: float = 0) -> torch.Tensor:  # noqa: A002
    """``torch.histc`` with the same arguments and result; integer input on a CPU is counted as float32."""
    if not input.is_floating_point() and input.device.type == "cpu":
        return torch.histc(input.float(), bins=bins, min=min, max=max).to(input.dtype)
    return torch.histc(input, bins=bins, min=min, max=max)


def _bincount_on_meta(input: torch.Tensor, weights: torch.Tensor | None = None, minlength: int = 0) -> torch.Tensor:  # noqa: A002
    """Meta kernel of ``bincount``: ``minlength`` bins, the count of expert picks whose ids are below it.

    transformers 5.17's load-balancing loss counts expert picks with ``bincount(ids, minlength=experts)``;
    on the meta device of a trace the values are unknown, and ids below ``minlength`` give exactly that size.
    """
    if minlength <= 0:
        raise NotImplementedError("bincount on the meta device needs minlength (the number of bins) to know its size")
    dtype = torch.int64 if weights is None else weights.dtype
    return torch.empty(minlength, dtype=dtype, device="meta")


def _needs_meta_bincount() -> bool:
    try:
        torch.bincount(torch.empty(1, dtype=torch.int64, device="meta"), minlength=1)
    except NotImplementedError:
        return True
    return False


if _needs_meta_bincount():
    _ATEN = torch.library.Library("aten", "IMPL")  # kept alive: the registration lasts as long as it does
    _ATEN.impl("bincount", _bincount_on_meta, "Meta")
