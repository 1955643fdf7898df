"""Mamba's selective scan as one op with its dim annotation.

Per batch and channel d, with state h [n]: ``delta_t = softplus?(delta_t + delta_bias)``,
``h_t = exp(delta_t A_d) * h_{t-1} + delta_t u_t B_t`` and ``y_t = C_t . h_t + D_d u_t``, then
``y_t * silu(z_t)`` when z is given. This is gated linear attention with one head per channel, a decay
per state entry (q = C, k = B, v = delta u of width 1, log-decay delta A), computed by the shared
chunked form (``chunked.py``). The annotation splits batch and channels; sequence and state stay whole.

On CUDA a verified ``mamba_ssm`` kernel runs it when one passes its check (``backends.select``);
everywhere else the chunked PyTorch reference.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from dimshard.planner.ops.registry import OpCall, RecurrenceDims, register_op

from .backends import load_attribute, relative_error, select
from .call_specs import annotation_rule, is_symbolic, symbolic_result
from .chunked import Recurrence, chunked_recurrence
from .ssd import discretized_steps


def selective_scan_reference(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                             D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                             delta_bias: torch.Tensor | None = None, initial_state: torch.Tensor | None = None,
                             delta_softplus: bool = False, chunk_size: int = 16,
                             recurrence: Recurrence = chunked_recurrence) -> tuple[torch.Tensor, torch.Tensor]:
    """``selective_scan`` in chunked PyTorch: (y [b, d, l] in u's dtype, final state [b, d, n] fp32);
    ``recurrence`` runs the chunked form (``sequence_split.py`` passes its state-passing one)."""
    batch, channels, length = u.shape
    bias = None if delta_bias is None else delta_bias[:, None]
    steps = discretized_steps(delta, bias, delta_softplus, (0.0, float("inf")))  # [b, d, l]
    work = steps.dtype
    values = (u.to(work) * steps)[..., None]  # [b, d, l, 1]
    keys = B.to(work).transpose(1, 2)[:, None].expand(batch, channels, length, B.shape[1])
    queries = C.to(work).transpose(1, 2)[:, None].expand(batch, channels, length, C.shape[1])
    gates = steps[..., None] * A.to(work)[:, None, :]  # [b, d, l, n]
    start = None if initial_state is None else initial_state[..., None]
    y, state = recurrence(queries, keys, values, gates, None, start, chunk_size)
    y = y[..., 0]
    if D is not None:
        y = y + u.to(work) * D.to(work)[:, None]
    if z is not None:
        y = y * F.silu(z.to(work))
    return y.to(u.dtype), state[..., 0]


def _check(kernel, device: torch.device) -> float:
    generator = torch.Generator(device="cpu").manual_seed(0)
    b, d, length, n = 1, 64, 200, 16
    u, delta, z = (torch.randn(b, d, length, generator=generator).to(device, torch.bfloat16) for _ in range(3))
    A = -torch.rand(d, n, generator=generator).to(device) - 0.5
    B, C = (torch.randn(b, n, length, generator=generator).to(device, torch.bfloat16) for _ in range(2))
    D, bias = torch.rand(d, generator=generator).to(device), torch.rand(d, generator=generator).to(device)
    fused = lambda *a: kernel(*a[:5], a[5], a[6], delta_bias=a[7], delta_softplus=True)  # noqa: E731
    ref = lambda *a: selective_scan_reference(*a[:5], a[5], a[6], a[7], delta_softplus=True)[0]  # noqa: E731
    return relative_error(fused, ref, [u, delta, A, B, C, D, z, bias])


_CANDIDATES = [("mamba_ssm.selective_scan_fn",
                lambda: load_attribute("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn"))]


def _specs(call: OpCall) -> dict[str, str]:
    return {"u": "b d l^", "delta": "b d l^", "A": "d n^", "B": "b n^ l^", "C": "b n^ l^", "D": "d", "z": "b d l^",
            "delta_bias": "d", "initial_state": "b d n^"}


def _outputs(call: OpCall) -> list[str]:
    return ["b d l^", "b d n^"] if call.kwargs.get("output_final_state") else ["b d l^"]


def _recurrence(op: Any, shapes: list[tuple[int, ...]]) -> RecurrenceDims:
    """The chunked scan of a call with inputs of ``shapes`` (u [b, d, l], delta, A [d, n], ...): per channel a
    state of n x 1."""
    (batch, channels, tokens), state_size = shapes[0], shapes[2][1]
    return RecurrenceDims(batch * channels, tokens, state_size, 1, int(op.kwargs.get("chunk_size", 16)))


@register_op(annotation_rule(["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"], _specs, _outputs),
             cost="recurrent", recurrence=_recurrence, sequence_split=f"{__package__}.sequence_split.split_selective_scan")
def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor | None = None, z: torch.Tensor | None = None, delta_bias: torch.Tensor | None = None,
                   initial_state: torch.Tensor | None = None, *, delta_softplus: bool = False, chunk_size: int = 16,
                   output_final_state: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mamba's scan of u, delta [b, d, l] with A [d, n] (negative) and input-dependent B, C [b, n, l].

    ``delta_bias`` [d] is added to delta before the softplus (``delta_softplus``); ``D`` [d] adds ``D u``;
    ``z`` [b, d, l] gates the output by ``silu(z)``. ``initial_state`` [b, d, n] (fp32). Returns y [b, d, l]
    in u's dtype and, with ``output_final_state``, the final state [b, d, n] in fp32.
    """
    if is_symbolic(u, delta, B, C):
        y = torch.empty(u.shape, dtype=u.dtype, device=u.device)
        state = torch.empty(u.shape[0], u.shape[1], A.shape[1], device=u.device)
        return symbolic_result(*((y, state) if output_final_state else (y,)),
                               inputs=(u, delta, A, B, C, D, z, delta_bias, initial_state))
    usable = u.is_cuda and initial_state is None  # the fused kernel starts from zeros
    chosen = select("selective_scan", u.device, _CANDIDATES, _check, 2e-2) if usable else None
    if chosen is not None:
        result = chosen[1](u, delta, A, B, C, D, z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                           return_last_state=output_final_state)
        y, state = result if output_final_state else (result, None)
    else:
        y, state = selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus,
                                            chunk_size)
    return (y, state) if output_final_state else y
