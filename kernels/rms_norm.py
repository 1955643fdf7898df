"""RMSNorm as one fused kernel per pass, matching Hugging Face ``LlamaRMSNorm``."""

from __future__ import annotations

import torch

from dimshard.planner.ops.registry import register_op

from .triton_kernels.common import use_triton

# The fused kernel holds one row in registers; wider rows use the reference.
_MAX_FUSED_HIDDEN = 16384


def rms_norm_reference(hidden: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Hugging Face ``LlamaRMSNorm.forward`` verbatim: the reference the fused kernel is tested against.

    hidden [..., d] any float dtype, weight [d]. The row is normalized in fp32, cast back to
    hidden's dtype, then multiplied by weight; the result has the promoted dtype of the two.
    """
    input_dtype = hidden.dtype
    hidden = hidden.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + eps)
    return weight * hidden.to(input_dtype)


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        from .triton_kernels import rms_norm as kernels

        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        if x.stride(-1) != 1:
            x = x.contiguous()
        out_dtype = torch.promote_types(hidden.dtype, weight.dtype)
        y, rstd = kernels.forward(x, weight.contiguous(), eps, out_dtype)
        ctx.save_for_backward(x, weight, rstd)
        return y.view(shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        from .triton_kernels import rms_norm as kernels

        x, weight, rstd = ctx.saved_tensors
        dy = grad_out.reshape(-1, x.shape[-1])
        if dy.stride(-1) != 1:
            dy = dy.contiguous()
        dx, dw = kernels.backward(dy, x, weight.contiguous(), rstd)
        grad_hidden = dx.view(grad_out.shape) if ctx.needs_input_grad[0] else None
        grad_weight = dw.to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None


@register_op("... d^, d^ -> ... d^")
def rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim, equal to Hugging Face ``LlamaRMSNorm`` up to rounding.

    hidden [..., d] (fp32/bf16/fp16), weight [d]. Returns [..., d] in the promoted dtype of
    hidden and weight. On CUDA with Triton installed this runs one fused kernel forward and one
    backward (fp32 arithmetic throughout); elsewhere it is ``rms_norm_reference`` under autograd.
    Both inputs get gradients.
    """
    if use_triton(hidden, weight) and weight.shape == hidden.shape[-1:] and hidden.shape[-1] <= _MAX_FUSED_HIDDEN:
        return _RMSNormFunction.apply(hidden, weight, eps)
    return rms_norm_reference(hidden, weight, eps)
