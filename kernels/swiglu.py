"""SwiGLU activation, silu(gate) * up, as one fused kernel per pass (the Llama MLP's activation).

With ``inplace_grads=True`` the backward writes gate's gradient into gate's storage and up's into
up's, so the backward allocates nothing: at 128K tokens of the 8B shape that is two [tokens, 14336]
bf16 tensors, 7 GiB. Only the caller can know that nothing else still needs gate and up; the
planner decides it (``planner/cost/op_costs.py``'s ``grads_written_in_place``) and generated code
passes the flag.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dimshard.planner.ops.registry import register_op

from .triton_kernels.common import use_triton


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate) * up``, as Hugging Face ``LlamaMLP`` computes it: the kernel's reference."""
    return F.silu(gate) * up


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the memory spans of two tensors intersect (then one gradient would overwrite the other)."""
    a_start, b_start = a.data_ptr(), b.data_ptr()
    a_end = a_start + a.numel() * a.element_size()
    b_end = b_start + b.numel() * b.element_size()
    return a_start < b_end and b_start < a_end


def _mark_written(*tensors: torch.Tensor) -> None:
    # Writes through raw pointers bump no version counter: bump it, so that autograd raises, rather
    # than silently computes with the gradients, if another node saved one of these tensors.
    increment = getattr(torch.autograd.graph, "increment_version", None)
    if increment is not None:
        for t in tensors:
            increment(t)


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, inplace_grads: bool) -> torch.Tensor:
        from .triton_kernels import swiglu as kernels

        gate, up = gate.contiguous(), up.contiguous()
        ctx.in_place = inplace_grads and not _overlap(gate, up)
        ctx.save_for_backward(gate, up)
        return kernels.forward(gate, up)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        from .triton_kernels import swiglu as kernels

        gate, up = ctx.saved_tensors
        dgate, dup = kernels.backward(grad_out.contiguous(), gate, up, in_place=ctx.in_place)
        if ctx.in_place:
            _mark_written(dgate, dup)
        return (dgate if ctx.needs_input_grad[0] else None), (dup if ctx.needs_input_grad[1] else None), None


class _SwiGLUInPlaceReference(torch.autograd.Function):
    """The reference with the in-place backward: the values of ``swiglu_reference`` under autograd,
    bit for bit (the same ops in the same order), the gradients written into gate and up."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return swiglu_reference(gate, up)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = ctx.saved_tensors
        # Autograd of silu(gate) * up: the product's rule, then silu's.
        dup = grad_out * F.silu(gate)
        dgate = torch.ops.aten.silu_backward(grad_out * up, gate)
        gate.copy_(dgate)
        up.copy_(dup)
        return gate, up


@register_op("... n, ... n -> ... n", grads_in_place="inplace_grads")
def swiglu(gate: torch.Tensor, up: torch.Tensor, inplace_grads: bool = False) -> torch.Tensor:
    """silu(gate) * up, elementwise; gate and up of one shape and dtype, result the same.

    On CUDA with Triton installed: one fused kernel forward (reads gate and up, writes the
    result) and one backward, computing in fp32 and rounding once (eager rounds silu(gate) to
    the input dtype before the product, so bf16 results can differ by one rounding).
    Elsewhere, or for broadcasting shapes: ``swiglu_reference`` under autograd.

    ``inplace_grads=True``: the backward writes gate's gradient into gate and up's into up (their
    values are lost) and returns them as the gradients; same values as without. Pass it only when
    nothing else reads gate or up after this call, nor their bases if they are views (the planner
    checks this). Ignored where it cannot apply: shapes or dtypes that differ, tensors that share
    memory; on the GPU a non-contiguous input is copied first, and its copy receives the gradient.
    """
    same = gate.shape == up.shape and gate.dtype == up.dtype
    if use_triton(gate, up) and same:
        return _SwiGLUFunction.apply(gate, up, inplace_grads)
    if (inplace_grads and same and torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad)
            and gate.is_contiguous() and up.is_contiguous() and not _overlap(gate, up)):
        return _SwiGLUInPlaceReference.apply(gate, up)
    return swiglu_reference(gate, up)
