"""Triton kernels for RMSNorm (forward and backward). Imported only when Triton is used."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import next_power_of_2, num_programs_hint


@triton.jit
def _rms_norm_forward_kernel(
    X, W, Y, RSTD,
    stride_x, stride_y, D, eps,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=0) / D + eps)
    tl.store(RSTD + row, rstd)
    # Hugging Face rounds the normalized row to the input dtype before the weight multiply.
    normed = (x * rstd).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (normed * w).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_backward_kernel(
    X, W, DY, RSTD, DX, DW_PARTIAL,
    stride_x, stride_dy, stride_dx, M, D, rows_per_program,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    row_start = pid * rows_per_program
    for i in range(0, rows_per_program):
        row = row_start + i
        row64 = row.to(tl.int64)
        # The last program's range can run past M: those rows load zeros and store nothing.
        # (The row test is broadcast explicitly: the Triton interpreter rejects scalar-and-vector masks.)
        row_mask = mask & ((tl.zeros_like(cols) + row) < M)
        x = tl.load(X + row64 * stride_x + cols, mask=row_mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row64 * stride_dy + cols, mask=row_mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + tl.minimum(row64, M - 1))
        xhat = x * rstd
        # The weight sees the rounded normalized row (as in the forward); x sees the exact one.
        dw += dy * xhat.to(X.dtype.element_ty).to(tl.float32)
        dn = dy * w
        dx = rstd * (dn - xhat * (tl.sum(dn * xhat, axis=0) / D))
        tl.store(DX + row64 * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=row_mask)
    tl.store(DW_PARTIAL + pid * D + cols, dw, mask=mask)


def _num_warps(block: int) -> int:
    # 8 elements per thread at 4096 wide: few registers, so two programs fit on a multiprocessor.
    return max(1, min(16, block // 256))


def forward(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of the rows of 2-D ``x`` [M, D] (last stride 1): returns (y [M, D] out_dtype, rstd [M] fp32)."""
    m, d = x.shape
    y = torch.empty((m, d), dtype=out_dtype, device=x.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    if m == 0:
        return y, rstd
    block = next_power_of_2(d)
    _rms_norm_forward_kernel[(m,)](
        x, weight, y, rstd, x.stride(0), y.stride(0), d, eps, BLOCK_D=block, num_warps=_num_warps(block)
    )
    return y, rstd


def backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (dx [M, D] in x's dtype, dw [D] in fp32) of RMSNorm for 2-D ``x`` and ``dy``."""
    m, d = x.shape
    dx = torch.empty_like(x)
    programs = max(1, min(m, num_programs_hint(x.device, per_sm=2)))
    rows_per_program = triton.cdiv(m, programs) if m else 0
    dw_partial = torch.zeros((programs, d), dtype=torch.float32, device=x.device)
    if m:
        block = next_power_of_2(d)
        _rms_norm_backward_kernel[(programs,)](
            x, weight, dy, rstd, dx, dw_partial,
            x.stride(0), dy.stride(0), dx.stride(0), m, d, rows_per_program,
            BLOCK_D=block, num_warps=_num_warps(block),
        )
    return dx, dw_partial.sum(0)
