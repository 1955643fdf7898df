"""Causal depthwise convolution (the short convolutions of Mamba, Mamba2, Gated DeltaNet and LFM2) as one op.

``y[b, d, t] = act(bias[d] + sum_j weight[d, j] * x[b, d, t - (k - 1) + j])`` with x before the sequence
read from ``initial_state`` [b, d, k - 1] (a cache, or the previous rank's last k - 1 tokens under a
sequence split: docs/design.md, "Recurrent layers"), zeros without one. Channels are independent, so
batch and channels split; the sequence stays whole here.

On CUDA a verified ``causal_conv1d`` kernel runs it when one passes its check (``backends.select``);
everywhere else ``torch.nn.functional.conv1d`` with groups = channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dimshard.planner.ops.registry import OpCall, register_op

from .backends import load_attribute, relative_error, select
from .call_specs import annotation_rule, is_symbolic, symbolic_result

_ACTIVATIONS = {None: None, "silu": F.silu, "swish": F.silu, "identity": None}


def causal_conv1d_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                            initial_state: torch.Tensor | None = None, activation: str | None = None) -> torch.Tensor:
    """``causal_conv1d`` with ``F.conv1d``, in the weight's dtype; returns [b, d, l] in x's dtype."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"causal_conv1d takes activation None, 'silu' or 'swish', got {activation!r}")
    kernel_size = weight.shape[-1]
    work = x.to(weight.dtype)
    if initial_state is None:
        work = F.pad(work, (kernel_size - 1, 0))
    else:
        work = torch.cat([initial_state.to(weight.dtype), work], dim=-1)
    out = F.conv1d(work, weight[:, None, :], bias, groups=x.shape[1])
    act = _ACTIVATIONS[activation]
    return (out if act is None else act(out)).to(x.dtype)


def _check(kernel, device: torch.device) -> float:
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(2, 64, 300, generator=generator).to(device, torch.bfloat16)
    weight, bias = torch.randn(64, 4, generator=generator).to(device), torch.randn(64, generator=generator).to(device)
    fused = lambda x, w, b: kernel(x, w, b, activation="silu")  # noqa: E731
    ref = lambda x, w, b: causal_conv1d_reference(x, w, b, activation="silu")  # noqa: E731
    return relative_error(fused, ref, [x, weight.to(torch.bfloat16), bias.to(torch.bfloat16)])


_CANDIDATES = [("causal_conv1d.causal_conv1d_fn", lambda: load_attribute("causal_conv1d", "causal_conv1d_fn"))]


def _specs(call: OpCall) -> dict[str, str]:
    return {"x": "b d l^", "weight": "d k^", "bias": "d", "initial_state": "b d s^"}


@register_op(annotation_rule(["x", "weight", "bias", "initial_state"], _specs, lambda call: ["b d l^"]),
             sequence_split=f"{__package__}.sequence_split.split_causal_conv1d")
def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  initial_state: torch.Tensor | None = None, *, activation: str | None = None) -> torch.Tensor:
    """Causal depthwise convolution of x [b, d, l] with weight [d, k] and optional bias [d].

    ``initial_state`` [b, d, k - 1]: the inputs just before the sequence (zeros when None).
    ``activation``: None, ``"silu"`` or ``"swish"``. Returns [b, d, l] in x's dtype.
    """
    if is_symbolic(x, weight):
        return symbolic_result(torch.empty(x.shape, dtype=x.dtype, device=x.device),
                               inputs=(x, weight, bias, initial_state))
    usable = x.is_cuda and initial_state is None and x.dtype == weight.dtype
    chosen = select("causal_conv1d", x.device, _CANDIDATES, _check, 2e-2) if usable else None
    if chosen is not None:
        return chosen[1](x, weight, bias, activation=activation)
    return causal_conv1d_reference(x, weight, bias, initial_state, activation)
