"""Rotary position embedding of queries and keys in one fused kernel, matching Hugging Face."""

from __future__ import annotations

import torch

from dimshard.planner.ops.registry import register_op

from .triton_kernels.common import use_triton


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(-x2, x1) for the two halves x1, x2 of the last dim (Hugging Face ``rotate_half``)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hugging Face ``apply_rotary_pos_emb`` with ``unsqueeze_dim=1``: the kernel's reference."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def _last_dim_dense(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


class _RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        from .triton_kernels import rotary as kernels

        batch = q.shape[0]
        # A batch-1 table (one set of positions for every sequence) broadcasts with stride 0.
        cos = _last_dim_dense(cos).expand(batch, -1, -1)
        sin = _last_dim_dense(sin).expand(batch, -1, -1)
        ctx.save_for_backward(cos, sin)
        return kernels.rotate(_last_dim_dense(q), _last_dim_dense(k), cos, sin, backward=False)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_q: torch.Tensor, grad_k: torch.Tensor):
        from .triton_kernels import rotary as kernels

        cos, sin = ctx.saved_tensors
        dq, dk = kernels.rotate(_last_dim_dense(grad_q), _last_dim_dense(grad_k), cos, sin, backward=True)
        return (dq if ctx.needs_input_grad[0] else None), (dk if ctx.needs_input_grad[1] else None), None, None


def _fusable(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or sin.dim() != 3:
        return False
    batch, _, length, dim = q.shape
    same_positions = k.shape[0] == batch and k.shape[2] == length and k.shape[3] == dim
    table_ok = cos.shape == sin.shape and cos.shape[0] in (1, batch) and tuple(cos.shape[1:]) == (length, dim)
    dtypes_ok = q.dtype == k.dtype == cos.dtype == sin.dtype
    # The backward returns no gradient for cos and sin (they come from fixed frequencies).
    tables_constant = not (cos.requires_grad or sin.requires_grad)
    return same_positions and table_ok and dtypes_ok and tables_constant and dim % 2 == 0


def _rotary_annotation(call: object) -> str:
    """Batch and key/value heads split; query heads follow their key/value group (GQA).

    A batch-1 position table is broadcast (``1``), never split.
    """
    q, k, cos = call.inputs[0], call.inputs[1], call.inputs[2]  # type: ignore[attr-defined]
    table = "1 l d^" if cos.shape[0] == 1 and q.shape[0] != 1 else "b l d^"
    heads = "g" if q.shape[1] == k.shape[1] else "(g r^)"
    return f"b {heads} l d^, b g l d^, {table}, {table} -> b {heads} l d^, b g l d^"


@register_op(_rotary_annotation, saves="non_differentiable")  # its backward needs cos and sin only
def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of queries and keys, equal to Hugging Face ``apply_rotary_pos_emb`` up to rounding.

    q [b, h, l, d], k [b, g, l, d] (any strides with last stride 1, e.g. transposed views),
    cos and sin [b, l, d] or [1, l, d]. Returns (q_rot [b, h, l, d], k_rot [b, g, l, d]) in the
    input dtype. On CUDA with Triton installed: one fused kernel for both q and k, forward and
    backward, computing in fp32 and rounding once (eager rounds each product, so bf16 results
    can differ by a rounding); q and k get gradients, cos and sin must not require one.
    Elsewhere, or for other shapes/dtypes: ``apply_rotary_reference`` under autograd.
    """
    if use_triton(q, k, cos, sin) and _fusable(q, k, cos, sin):
        return _RotaryFunction.apply(q, k, cos, sin)
    return apply_rotary_reference(q, k, cos, sin)
