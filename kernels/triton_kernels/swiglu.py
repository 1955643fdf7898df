"""Triton kernels for SwiGLU, silu(gate) * up (forward and backward). Imported only when Triton is used."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 2048


@triton.jit
def _swiglu_forward_kernel(GATE, UP, OUT, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    gate = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward_kernel(GATE, UP, DOUT, DGATE, DUP, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    gate = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    dout = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    # d silu(g) / dg = sig * (1 + g * (1 - sig))
    dgate = dout * up * sig * (1.0 + gate * (1.0 - sig))
    tl.store(DGATE + offs, dgate.to(DGATE.dtype.element_ty), mask=mask)
    tl.store(DUP + offs, (dout * silu).to(DUP.dtype.element_ty), mask=mask)


def forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for contiguous tensors of one shape and dtype."""
    out = torch.empty_like(gate)
    n = gate.numel()
    if n:
        _swiglu_forward_kernel[(triton.cdiv(n, _BLOCK),)](gate, up, out, n, BLOCK=_BLOCK, num_warps=8)
    return out


def backward(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
             in_place: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(d gate, d up) for contiguous tensors of one shape and dtype.

    ``in_place``: d gate is written into ``gate`` and d up into ``up`` (returned as the gradients),
    allocating nothing; their values are lost. Safe within the kernel: each element is read before
    it is written, by the same program. ``gate`` and ``up`` must not share memory.
    """
    dgate = gate if in_place else torch.empty_like(gate)
    dup = up if in_place else torch.empty_like(up)
    n = gate.numel()
    if n:
        _swiglu_backward_kernel[(triton.cdiv(n, _BLOCK),)](gate, up, dout, dgate, dup, n, BLOCK=_BLOCK, num_warps=8)
    return dgate, dup
