"""``fp8_linear``: a linear layer whose three products run in FP8 (docs/design.md, "FP8").

``y = x @ weight.T (+ bias)`` with the annotation of ``torch.nn.functional.linear``, so every
split of a linear applies to it. The planner writes it in generated code in place of a linear it
chose for FP8, with the process groups that split the product (``token_groups``: the rows of
``x``; ``k_groups``: the contracted dim; ``n_groups``: the output features), from which each
cast's amax reduction follows (``scaling.py``).

Per recipe (``scaling.RECIPES``), with ``M`` tokens, ``K`` inputs and ``N`` outputs:

- forward ``y[M,N] = x[M,K] @ w[N,K].T``: x and w in e4m3, tensorwise or one scale per row along K;
- input gradient ``dx[M,K] = dy[M,N] @ w[N,K]``: dy in the recipe's gradient dtype (per row along
  N when rowwise), w scaled per column along N when rowwise;
- weight gradient ``dw[N,K] = dy.T[N,M] @ x[M,K]``: dy.T per row along M and x per column along M
  when rowwise, or in high precision (``rowwise_gw_hp``).

Backward keeps ``x`` and ``weight`` in their own dtype (the tensors the forward already holds, so
activation memory is that of a linear) and casts them again; tensorwise reuses the forward's scales,
giving bit-identical FP8 operands. Weights, their gradients and the output stay in their dtype:
FP8 is compute only.

On CUDA with compute capability >= 8.9 the products are ``torch._scaled_mm`` (operand a row-major,
b column-major, M, N and K multiples of 16, float32 decode scales: 0-dim tensorwise, ``(M, 1)``
and ``(1, N)`` rowwise). Elsewhere the same FP8 values are dequantised and multiplied in float32,
so CPU tests exercise exactly the quantisation the GPU runs.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from dimshard.planner.ops.registry import OpCall, register_op

from .scaling import Fp8Recipe, quantize, recipe_named, saturated_cast

# Multiple of which every dim of a product must be for the FP8 GEMM (torch._scaled_mm's layout rule).
FP8_DIM_MULTIPLE = 16


@functools.cache
def fp8_gemm_supported(device: torch.device) -> bool:
    """Whether ``device`` runs FP8 GEMMs: CUDA with compute capability >= 8.9 (Ada, Hopper and later).

    ``DIMSHARD_FP8_EMULATE=1`` forces the float32 emulation (for A/B checks on a GPU).
    """
    if os.environ.get("DIMSHARD_FP8_EMULATE", "0") == "1" or device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def scaled_mm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
              out_dtype: torch.dtype, emulate: bool) -> torch.Tensor:
    """``(a / a_scale) @ (b / b_scale)`` in ``out_dtype``: a [M,K] and b [K,N] in FP8, encode scales.

    The scales are 0-dim (tensorwise) or ``(M, 1)`` for a and ``(1, N)`` for b (rowwise). Not
    ``emulate``: ``torch._scaled_mm`` (b must be column-major); else float32 arithmetic on the
    dequantised values.
    """
    a_decode, b_decode = a_scale.reciprocal(), b_scale.reciprocal()
    if emulate:
        return ((a.float() * a_decode) @ (b.float() * b_decode)).to(out_dtype)
    rowwise = a_decode.dim() > 0
    # Rowwise GEMMs return bf16 on every torch that has them; tensorwise ones take float32 too.
    gemm_dtype = torch.bfloat16 if rowwise or out_dtype not in (torch.bfloat16, torch.float32) else out_dtype
    out = torch._scaled_mm(a, b, scale_a=a_decode.contiguous(), scale_b=b_decode.contiguous(),
                           out_dtype=gemm_dtype)
    return out if out.dtype == out_dtype else out.to(out_dtype)


class _Fp8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, recipe: Fp8Recipe, token_groups: tuple,
                k_groups: tuple, n_groups: tuple, emulate: bool) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if recipe.rowwise:  # one scale per row of x and of weight, both along K
            xq, x_scale = quantize(x2, recipe.forward_dtype, -1, True, k_groups)
            wq, w_scale = quantize(weight, recipe.forward_dtype, -1, True, k_groups)
            out = scaled_mm(xq, x_scale, wq.t(), w_scale.t(), x.dtype, emulate)
        else:
            xq, x_scale = quantize(x2, recipe.forward_dtype, None, recipe.power_of_2_scales, token_groups + k_groups)
            wq, w_scale = quantize(weight, recipe.forward_dtype, None, recipe.power_of_2_scales, n_groups + k_groups)
            out = scaled_mm(xq, x_scale, wq.t(), w_scale, x.dtype, emulate)
        ctx.save_for_backward(x, weight, x_scale, w_scale)
        ctx.fp8 = (recipe, token_groups, k_groups, n_groups, emulate)
        return out.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> tuple:
        x, weight, x_scale, w_scale = ctx.saved_tensors
        recipe, token_groups, k_groups, n_groups, emulate = ctx.fp8
        x2, g2 = x.reshape(-1, x.shape[-1]), grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_w = None
        # Each cast writes the layout its product takes: torch._scaled_mm's first operand row-major,
        # its second column-major; dy.T row-major is dy column-major.
        if recipe.rowwise:
            if ctx.needs_input_grad[0]:  # dy per row along N, weight per column along N
                gq, g_scale = quantize(g2, recipe.gradient_dtype, -1, True, n_groups)
                wq, w_col_scale = quantize(weight, recipe.forward_dtype, 0, True, n_groups, "column")
                grad_x = scaled_mm(gq, g_scale, wq, w_col_scale, x.dtype, emulate)
            if ctx.needs_input_grad[1] and recipe.weight_gradient_fp8:  # dy.T per row along M, x per column
                gq_col, g_col_scale = quantize(g2, recipe.gradient_dtype, 0, True, token_groups, "column")
                xq, x_col_scale = quantize(x2, recipe.forward_dtype, 0, True, token_groups, "column")
                grad_w = scaled_mm(gq_col.t(), g_col_scale.t(), xq, x_col_scale, weight.dtype, emulate)
            elif ctx.needs_input_grad[1]:
                grad_w = (g2.t() @ x2.to(g2.dtype)).to(weight.dtype)
        else:
            (gq, gq_col), g_scale = quantize(g2, recipe.gradient_dtype, None, recipe.power_of_2_scales,
                                             token_groups + n_groups, "both")
            if ctx.needs_input_grad[0]:  # the forward's scale: the same FP8 weight, laid out column-major
                wq = saturated_cast(weight, w_scale, recipe.forward_dtype, "column")
                grad_x = scaled_mm(gq, g_scale, wq, w_scale, x.dtype, emulate)
            if ctx.needs_input_grad[1]:
                xq = saturated_cast(x2, x_scale, recipe.forward_dtype, "column")
                grad_w = scaled_mm(gq_col.t(), g_scale, xq, x_scale, weight.dtype, emulate)
        if grad_x is not None:
            grad_x = grad_x.reshape(x.shape)
        return grad_x, grad_w, None, None, None, None, None


def _linear_rule(call: OpCall) -> str:
    """The annotation of ``torch.nn.functional.linear`` (planner/ops/rules/products.py): bias a summand."""
    return "... k, n k, +n -> ... n" if len(call.inputs) == 3 else "... k, n k -> ... n"


def shapes_fit_fp8(m: int, n: int, k: int) -> bool:
    """Whether a product of M x K by K x N runs as an FP8 GEMM: all three multiples of 16."""
    return all(d > 0 and d % FP8_DIM_MULTIPLE == 0 for d in (m, n, k))


@register_op(_linear_rule, cost="matmul", role="projection")
def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
               recipe: str = "tensorwise", token_groups: Sequence[Any] = (), k_groups: Sequence[Any] = (),
               n_groups: Sequence[Any] = ()) -> torch.Tensor:
    """``x @ weight.T + bias`` with the three products in FP8 under ``recipe``; dtypes as the linear's.

    x [..., K], weight [N, K], bias [N] or None; returns [..., N] in x's dtype, with gradients
    for x and weight in their dtypes. ``token_groups`` / ``k_groups`` / ``n_groups``: the
    process groups splitting the rows of x, K and N (one per mesh axis; empty: not split), over
    which amaxes are reduced so the split op equals the unsplit one. On a device without FP8 GEMMs,
    or for shapes that are not multiples of 16 on one that has them (with a warning), the same FP8
    values are multiplied in float32.
    """
    spec = recipe_named(recipe)
    emulate = not fp8_gemm_supported(x.device)
    m = x.numel() // max(x.shape[-1], 1)
    if not emulate and not shapes_fit_fp8(m, weight.shape[0], weight.shape[1]):
        warnings.warn(f"fp8_linear: a {m}x{weight.shape[1]} by {weight.shape[1]}x{weight.shape[0]} product is "
                      f"not a multiple of {FP8_DIM_MULTIPLE} in every dim; it runs emulated", stacklevel=2)
        emulate = True
    out = _Fp8LinearFunction.apply(x, weight, spec, tuple(token_groups), tuple(k_groups), tuple(n_groups), emulate)
    return out if bias is None else out + bias
