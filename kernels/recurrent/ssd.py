"""Mamba2's state-space dual (SSD) scan as one op with its dim annotation.

Per batch and head, with state h [p, n] (head dim by state size):
``dt_t = clamp(softplus?(dt_t + dt_bias), dt_limit)``, ``h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T`` and
``y_t = h_t C_t + D x_t``, where B and C [b, l, g, n] are shared by the h / g heads of each group. This is
linear attention with one decay per head (q = C, k = B, v = dt x, log-decay dt A), computed by the
shared chunked form (``chunked.py``). The annotation splits batch, head groups (with their heads) and
the head dim; sequence and state size stay whole.

On CUDA a verified ``mamba_ssm`` kernel runs it when one passes its check (``backends.select``);
everywhere else the chunked PyTorch reference.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from dimshard.planner.ops.registry import OpCall, RecurrenceDims, register_op

from .backends import load_attribute, relative_error, select
from .call_specs import annotation_rule, is_symbolic, symbolic_result
from .chunked import Recurrence, chunked_recurrence


def discretized_steps(dt: torch.Tensor, dt_bias: torch.Tensor | None, softplus: bool,
                      limit: tuple[float, float]) -> torch.Tensor:
    """The time steps a scan uses: dt (+ dt_bias), softplus when asked, clamped to ``limit``; fp32 at least."""
    dt = dt.float() if dt.dtype != torch.float64 else dt
    if dt_bias is not None:
        dt = dt + dt_bias.to(dt.dtype)
    if softplus:
        dt = F.softplus(dt)
    return dt.clamp(min=limit[0], max=limit[1])


def state_space_dual_reference(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                               D: torch.Tensor | None = None, dt_bias: torch.Tensor | None = None,
                               initial_state: torch.Tensor | None = None, chunk_size: int = 64,
                               dt_softplus: bool = False, dt_limit: tuple[float, float] = (0.0, math.inf),
                               recurrence: Recurrence = chunked_recurrence) -> tuple[torch.Tensor, torch.Tensor]:
    """``state_space_dual`` in chunked PyTorch: (y [b, l, h, p] in x's dtype, final state [b, h, p, n] fp32);
    ``recurrence`` runs the chunked form (``sequence_split.py`` passes its state-passing one)."""
    heads, groups = x.shape[2], B.shape[2]
    steps = discretized_steps(dt, dt_bias, dt_softplus, dt_limit)  # [b, l, h]
    work = steps.dtype
    values = (x.to(work) * steps[..., None]).transpose(1, 2)
    keys = B.to(work).repeat_interleave(heads // groups, dim=2).transpose(1, 2)
    queries = C.to(work).repeat_interleave(heads // groups, dim=2).transpose(1, 2)
    gates = (steps * A.to(work)).transpose(1, 2)
    start = None if initial_state is None else initial_state.transpose(-1, -2)
    y, state = recurrence(queries, keys, values, gates, None, start, chunk_size)
    y = y.transpose(1, 2)
    if D is not None:
        y = y + x.to(work) * D.to(work)[:, None]
    return y.to(x.dtype).contiguous(), state.transpose(-1, -2)


def _check(kernel, device: torch.device) -> float:
    generator = torch.Generator(device="cpu").manual_seed(0)
    b, length, h, p, g, n = 1, 200, 4, 64, 2, 64
    x = torch.randn(b, length, h, p, generator=generator).to(device, torch.bfloat16)
    dt = torch.randn(b, length, h, generator=generator).to(device)
    A = -torch.rand(h, generator=generator).to(device) - 0.5
    B, C = (torch.randn(b, length, g, n, generator=generator).to(device, torch.bfloat16) for _ in range(2))
    D, dt_bias = torch.rand(h, generator=generator).to(device), torch.rand(h, generator=generator).to(device)
    fused = lambda *a: kernel(*a[:5], 64, D=a[5], dt_bias=a[6], dt_softplus=True)  # noqa: E731
    ref = lambda *a: state_space_dual_reference(*a[:5], a[5], a[6], dt_softplus=True)[0]  # noqa: E731
    return relative_error(fused, ref, [x, dt, A, B, C, D, dt_bias])


_CANDIDATES = [("mamba_ssm.mamba_chunk_scan_combined",
                lambda: load_attribute("mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined"))]


def _specs(call: OpCall) -> dict[str, str]:
    heads = "(g r^)"
    return {"x": f"b l^ {heads} p", "dt": f"b l^ {heads}", "A": heads, "B": "b l^ g n^", "C": "b l^ g n^",
            "D": heads, "dt_bias": heads, "initial_state": f"b {heads} p n^"}


def _outputs(call: OpCall) -> list[str]:
    return ["b l^ (g r^) p", "b (g r^) p n^"] if call.kwargs.get("output_final_state") else ["b l^ (g r^) p"]


def _recurrence(op: Any, shapes: list[tuple[int, ...]]) -> RecurrenceDims:
    """The chunked scan of a call with inputs of ``shapes`` (x [b, l, h, p], dt, A, B [b, l, g, n], ...):
    per head a state of n x p (the state size as keys, the head dim as values)."""
    (batch, tokens, heads, head_dim), state_size = shapes[0], shapes[3][3]
    return RecurrenceDims(batch * heads, tokens, state_size, head_dim, int(op.kwargs.get("chunk_size", 64)))


@register_op(annotation_rule(["x", "dt", "A", "B", "C", "D", "dt_bias", "initial_state"], _specs, _outputs),
             cost="recurrent", recurrence=_recurrence, sequence_split=f"{__package__}.sequence_split.split_state_space_dual")
def state_space_dual(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                     D: torch.Tensor | None = None, dt_bias: torch.Tensor | None = None,
                     initial_state: torch.Tensor | None = None, *, chunk_size: int = 64, dt_softplus: bool = False,
                     dt_limit: tuple[float, float] = (0.0, math.inf),
                     output_final_state: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mamba2's scan of x [b, l, h, p] with dt [b, l, h], A [h] (negative), B, C [b, l, g, n] (h a multiple of g).

    ``D`` [h] adds ``D x``; ``dt_bias`` [h] is added to dt, then softplus (``dt_softplus``) and the clamp to
    ``dt_limit``. ``initial_state`` [b, h, p, n] (fp32). Returns y [b, l, h, p] in x's dtype and, with
    ``output_final_state``, the final state [b, h, p, n] in fp32.
    """
    if is_symbolic(x, dt, B, C):
        y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        state = torch.empty(x.shape[0], x.shape[2], x.shape[3], B.shape[3], device=x.device)
        return symbolic_result(*((y, state) if output_final_state else (y,)),
                               inputs=(x, dt, A, B, C, D, dt_bias, initial_state))
    chosen = select("state_space_dual", x.device, _CANDIDATES, _check, 2e-2) if x.is_cuda else None
    if chosen is not None:
        result = chosen[1](x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, initial_states=initial_state,
                           dt_softplus=dt_softplus, dt_limit=dt_limit, return_final_states=output_final_state)
        y, state = result if output_final_state else (result, None)
        y = y.to(x.dtype)
    else:
        y, state = state_space_dual_reference(x, dt, A, B, C, D, dt_bias, initial_state, chunk_size, dt_softplus,
                                              dt_limit)
    return (y, state) if output_final_state else y
