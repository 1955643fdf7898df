"""Triton kernel for rotary position embedding of q and k (forward and backward).

Imported only when Triton is used. One program handles one (batch, position): it loads that
position's cos and sin once and rotates every query and key head there, reading q and k through
their strides, so the [b, l, h, d] -> [b, h, l, d] transposed views that Hugging Face passes in
need no copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import next_power_of_2


@triton.jit
def _rotate_heads(
    X, OUT, b, t, c1, c2, s1, s2,
    stride_xb, stride_xh, stride_xl, stride_ob, stride_oh, stride_ol,
    HEADS, HALF,
    BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr, BACKWARD: tl.constexpr,
):
    heads = tl.arange(0, BLOCK_HEADS)[:, None]
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < HEADS) & (cols < HALF)
    x_base = X + b * stride_xb + t * stride_xl + heads * stride_xh + cols
    o_base = OUT + b * stride_ob + t * stride_ol + heads * stride_oh + cols
    x1 = tl.load(x_base, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_base + HALF, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        # Transpose of the forward map: [c1, -s1; s2, c2]^T.
        o1 = x1 * c1 + x2 * s2
        o2 = x2 * c2 - x1 * s1
    else:
        # out = x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1).
        o1 = x1 * c1 - x2 * s1
        o2 = x2 * c2 + x1 * s2
    tl.store(o_base, o1.to(OUT.dtype.element_ty), mask=mask)
    tl.store(o_base + HALF, o2.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    Q, K, COS, SIN, QO, KO,
    stride_qb, stride_qh, stride_ql, stride_kb, stride_kh, stride_kl,
    stride_qob, stride_qoh, stride_qol, stride_kob, stride_koh, stride_kol,
    stride_cb, stride_cl, stride_sb, stride_sl,
    L, HEADS_Q, HEADS_K, HALF,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr, BACKWARD: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // L
    t = pid % L
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    cmask = cols < HALF
    c_base = COS + b * stride_cb + t * stride_cl + cols
    s_base = SIN + b * stride_sb + t * stride_sl + cols
    c1 = tl.load(c_base, mask=cmask, other=0.0).to(tl.float32)
    c2 = tl.load(c_base + HALF, mask=cmask, other=0.0).to(tl.float32)
    s1 = tl.load(s_base, mask=cmask, other=0.0).to(tl.float32)
    s2 = tl.load(s_base + HALF, mask=cmask, other=0.0).to(tl.float32)
    _rotate_heads(Q, QO, b, t, c1, c2, s1, s2, stride_qb, stride_qh, stride_ql, stride_qob, stride_qoh, stride_qol,
                  HEADS_Q, HALF, BLOCK_HQ, BLOCK_HALF, BACKWARD)
    _rotate_heads(K, KO, b, t, c1, c2, s1, s2, stride_kb, stride_kh, stride_kl, stride_kob, stride_koh, stride_kol,
                  HEADS_K, HALF, BLOCK_HK, BLOCK_HALF, BACKWARD)


def rotate(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [b, h, l, d] and k [b, g, l, d] by cos, sin [b, l, d] (already expanded to b).

    Every tensor needs last stride 1; outputs keep the strides of q and k. ``backward`` applies
    the transposed rotation (the gradient map).
    """
    batch, heads_q, length, dim = q.shape
    heads_k = k.shape[1]
    half = dim // 2
    q_out = torch.empty_like(q)
    k_out = torch.empty_like(k)
    if q.numel() == 0 and k.numel() == 0:
        return q_out, k_out
    block_half = next_power_of_2(half)
    block_hq = next_power_of_2(heads_q)
    block_hk = next_power_of_2(heads_k)
    num_warps = 4 if (block_hq + block_hk) * block_half <= 4096 else 8
    _rotary_kernel[(batch * length,)](
        q, k, cos, sin, q_out, k_out,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        q_out.stride(0), q_out.stride(1), q_out.stride(2), k_out.stride(0), k_out.stride(1), k_out.stride(2),
        cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
        length, heads_q, heads_k, half,
        BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_HALF=block_half, BACKWARD=backward, num_warps=num_warps,
    )
    return q_out, k_out
