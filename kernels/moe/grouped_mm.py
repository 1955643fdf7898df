"""Grouped matrix product over experts: rows sorted by expert, one weight matrix per expert.

``grouped_mm(x, weight, offsets)`` multiplies rows ``offsets[g-1]:offsets[g]`` of ``x`` [S, K] by
``weight[g]`` [K, N]. On CUDA it runs PyTorch's grouped GEMM (``torch.nn.functional.grouped_mm``
where the installed torch has it, else ``torch._grouped_mm``: one kernel for every expert, no
Python loop) when the call meets that kernel's rules: bf16 operands, K and N multiples of 8
(16-byte aligned rows), and a card it supports (Hopper for torch < 2.9, Ampere or newer after).
Anything else runs ``grouped_mm_reference``, one ``torch.mm`` per non-empty group, exact in any
dtype (docs/design.md, "Mixture of experts").
"""

from __future__ import annotations

import torch

_FUNCTIONAL = getattr(torch.nn.functional, "grouped_mm", None)
_PRIVATE = getattr(torch, "_grouped_mm", None)


def _torch_at_least(major: int, minor: int) -> bool:
    parts = torch.__version__.split("+")[0].split(".")
    return (int(parts[0]), int(parts[1])) >= (major, minor)


def grouped_kernel_applicable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether PyTorch's grouped GEMM takes ``x`` [S, K] times ``weight`` [G, K, N] on this card."""
    if not x.is_cuda or (_FUNCTIONAL is None and _PRIVATE is None):
        return False
    if x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16:
        return False
    if x.shape[-1] % 8 or weight.shape[-1] % 8:
        return False
    capability = torch.cuda.get_device_capability(x.device)
    if _FUNCTIONAL is None and not _torch_at_least(2, 9):
        return capability[0] == 9
    return capability >= (8, 0)


def grouped_mm_reference(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch: ``x`` [S, K] rows grouped by ``offsets`` (cumulative ends, [G]) times ``weight`` [G, K, N].

    Returns [S, N] in ``x``'s dtype; rows past ``offsets[-1]`` are zero. Differentiable in both.
    """
    pieces, start = [], 0
    for group, end in enumerate(offsets.tolist()):  # one host sync for every group
        if end > start:
            pieces.append(x[start:end] @ weight[group])
        start = end
    tail = x.shape[0] - start
    if tail:
        pieces.append(x.new_zeros(tail, weight.shape[-1]))
    if not pieces:
        return x.new_zeros(0, weight.shape[-1]) + 0 * weight[:0].sum()
    return torch.cat(pieces)


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``x`` [S, K] (rows sorted by group) times ``weight`` [G, K, N] per group; ``offsets`` [G] int32 ends.

    Returns [S, N]; the grouped GEMM kernel where applicable, else ``grouped_mm_reference``.
    """
    if grouped_kernel_applicable(x, weight):
        offsets = offsets.to(torch.int32)
        if _FUNCTIONAL is not None:
            return _FUNCTIONAL(x, weight, offs=offsets)
        return _PRIVATE(x, weight, offs=offsets)
    return grouped_mm_reference(x, weight, offsets)
