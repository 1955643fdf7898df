"""Triton kernels for the elementwise parts of the chunked linear cross-entropy.

The matrix products stay in cuBLAS; these kernels replace the passes over each logits tile that
eager PyTorch would split into several full-size fp32 temporaries: a row-wise logsumexp in fp32
(one read of the tile), the in-place softmax-minus-one-hot gradient (one read, one write), and
the compensated accumulation of the weight gradient (adding an fp32 part, or renormalising a
(value, residual) pair whose residual a matrix product has just added into). Imported only when
Triton is used.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_ROW_BLOCK = 4096
_ELEMENT_BLOCK = 2048


@triton.jit
def _row_logsumexp_kernel(LOGITS, LSE, stride_row, V, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_row
    # Two passes over the row (the second mostly from L2): the max, then the sum of exponentials.
    row_max = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        row_max = tl.maximum(row_max, x)
    m = tl.max(row_max, axis=0)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        total += tl.exp(x - m)
    tl.store(LSE + row, m + tl.log(tl.sum(total, axis=0)))


@triton.jit
def _softmax_grad_kernel(LOGITS, LSE, TARGET, SCALE, stride_row, V, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_row
    lse = tl.load(LSE + row)
    target = tl.load(TARGET + row)
    scale = tl.load(SCALE + row)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < V
        x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        grad = tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)
        tl.store(base + cols, (grad * scale).to(LOGITS.dtype.element_ty), mask=mask)


@triton.jit
def _compensated_add_kernel(HI, LO, PART, N, HAS_PART: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    hi = tl.load(HI + offs, mask=mask, other=0.0).to(tl.float32)
    lo = tl.load(LO + offs, mask=mask, other=0.0).to(tl.float32)
    total = hi + lo
    if HAS_PART:
        total += tl.load(PART + offs, mask=mask, other=0.0)
    new_hi = total.to(HI.dtype.element_ty)
    tl.store(HI + offs, new_hi, mask=mask)
    tl.store(LO + offs, (total - new_hi.to(tl.float32)).to(LO.dtype.element_ty), mask=mask)


def row_logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """fp32 logsumexp of each row of 2-D ``logits`` (last stride 1)."""
    rows, vocab = logits.shape
    lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        _row_logsumexp_kernel[(rows,)](logits, lse, logits.stride(0), vocab, BLOCK=_ROW_BLOCK, num_warps=8)
    return lse


def softmax_grad_(logits: torch.Tensor, lse: torch.Tensor, target: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """In place: ``logits[i, j] = (exp(logits[i, j] - lse[i]) - [j == target[i]]) * scale[i]``.

    lse, scale fp32 [rows]; target int64 [rows] (a column index; one outside [0, V) matches none).
    """
    rows, vocab = logits.shape
    if rows:
        _softmax_grad_kernel[(rows,)](
            logits, lse, target, scale, logits.stride(0), vocab, BLOCK=_ROW_BLOCK, num_warps=8
        )
    return logits


def compensated_add_(hi: torch.Tensor, lo: torch.Tensor, part: torch.Tensor | None = None) -> None:
    """In place: (hi, lo) <- split(hi + lo + part); contiguous tensors of one shape, part fp32.

    ``part=None`` only renormalises: hi becomes the rounded hi + lo, lo its rounding residual.
    """
    n = hi.numel()
    if n:
        has_part = part is not None
        _compensated_add_kernel[(triton.cdiv(n, _ELEMENT_BLOCK),)](
            hi, lo, part if has_part else hi, n, HAS_PART=has_part, BLOCK=_ELEMENT_BLOCK, num_warps=8
        )
