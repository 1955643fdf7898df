"""SwiGLU activation, silu(gate) * up, as one fused kernel per pass (the Llama MLP's activation)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dimshard.planner.ops.registry import register_op

from .triton_kernels.common import use_triton


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate) * up``, as Hugging Face ``LlamaMLP`` computes it: the kernel's reference."""
    return F.silu(gate) * up


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        from .triton_kernels import swiglu as kernels

        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)
        return kernels.forward(gate, up)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        from .triton_kernels import swiglu as kernels

        gate, up = ctx.saved_tensors
        dgate, dup = kernels.backward(grad_out.contiguous(), gate, up)
        return (dgate if ctx.needs_input_grad[0] else None), (dup if ctx.needs_input_grad[1] else None)


@register_op("... n, ... n -> ... n")
def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, elementwise; gate and up of one shape and dtype, result the same.

    On CUDA with Triton installed: one fused kernel forward (reads gate and up, writes the
    result) and one backward, computing in fp32 and rounding once (eager rounds silu(gate) to
    the input dtype before the product, so bf16 results can differ by one rounding).
    Elsewhere, or for broadcasting shapes: ``swiglu_reference`` under autograd.
    """
    if use_triton(gate, up) and gate.shape == up.shape and gate.dtype == up.dtype:
        return _SwiGLUFunction.apply(gate, up)
    return swiglu_reference(gate, up)
