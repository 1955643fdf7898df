"""Gated linear attention (GLA; RetNet-style and simple GLA with one decay per head; plain linear attention),
as one op with its dim annotation.

Per batch and head, with state S [dk, dv]: ``S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T`` and
``o_t = S_t^T (scale q_t)``; ``g`` is one log-decay per key channel ([b, l, h, dk], GLA), one per head
([b, l, h]) or None. Batch, heads and the value dim split; sequence and key dim stay whole.

On CUDA a verified flash-linear-attention kernel runs it when one passes its check
(``backends.select``); everywhere else the chunked PyTorch reference (``chunked.py``).
"""

from __future__ import annotations

from typing import Any

import torch

from dimshard.planner.ops.registry import OpCall, RecurrenceDims, register_op

from .backends import Candidate, fla_refusal, load_attribute, relative_error, select
from .call_specs import annotation_rule, is_symbolic, symbolic_result
from .chunked import Recurrence, chunked_recurrence


def gated_linear_attention_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                     g: torch.Tensor | None = None, initial_state: torch.Tensor | None = None,
                                     scale: float | None = None, chunk_size: int = 64,
                                     recurrence: Recurrence = chunked_recurrence) -> tuple[torch.Tensor, torch.Tensor]:
    """``gated_linear_attention`` in chunked PyTorch: (output in the query's dtype, final state fp32);
    ``recurrence`` runs the chunked form (``sequence_split.py`` passes its state-passing one)."""
    q = query * (query.shape[-1] ** -0.5 if scale is None else scale)
    heads_first = [x.transpose(1, 2) for x in (q, key, value)]
    gates = None if g is None else g.transpose(1, 2)
    out, state = recurrence(*heads_first, gates, None, initial_state, chunk_size)
    return out.transpose(1, 2).to(query.dtype).contiguous(), state


def _candidates(g: torch.Tensor | None) -> list[Candidate]:
    if g is None:
        return []
    if g.dim() == 4:
        return [("fla.chunk_gla", lambda: load_attribute("fla.ops.gla", "chunk_gla"))]
    return [("fla.chunk_simple_gla", lambda: load_attribute("fla.ops.simple_gla", "chunk_simple_gla"))]


def _check(per_channel: bool):
    def check(kernel, device: torch.device) -> float:
        generator = torch.Generator(device="cpu").manual_seed(0)
        b, length, h, dk, dv = 1, 200, 2, 64, 64
        q, k, v = (torch.randn(b, length, h, d, generator=generator).to(device, torch.bfloat16) for d in (dk, dk, dv))
        g = -torch.rand(b, length, h, *((dk,) if per_channel else ()), generator=generator).to(device) * 0.1
        fla = lambda q, k, v, g: kernel(q, k, v, g, scale=None)[0]  # noqa: E731
        ref = lambda q, k, v, g: gated_linear_attention_reference(q, k, v, g)[0]  # noqa: E731
        return relative_error(fla, ref, [q, k, v, g])
    return check


def _specs(call: OpCall) -> dict[str, str]:
    g = call.arg(3, "g")
    return {"query": "b l^ h e^", "key": "b l^ h e^", "value": "b l^ h f",
            "g": "b l^ h e^" if g is not None and len(g.shape) == 4 else "b l^ h", "initial_state": "b h e^ f"}


def _outputs(call: OpCall) -> list[str]:
    return ["b l^ h f", "b h e^ f"] if call.kwargs.get("output_final_state") else ["b l^ h f"]


def _recurrence(op: Any, shapes: list[tuple[int, ...]]) -> RecurrenceDims:
    """The chunked recurrence of a call with inputs of ``shapes`` (query [b, l, h, dk], key, value [b, l, h, dv], ...)."""
    (batch, tokens, heads, key_dim), value_dim = shapes[0], shapes[2][3]
    return RecurrenceDims(batch * heads, tokens, key_dim, value_dim, int(op.kwargs.get("chunk_size", 64)))


@register_op(annotation_rule(["query", "key", "value", "g", "initial_state"], _specs, _outputs),
             cost="recurrent", recurrence=_recurrence,
             sequence_split=f"{__package__}.sequence_split.split_gated_linear_attention")
def gated_linear_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, g: torch.Tensor | None = None,
                           initial_state: torch.Tensor | None = None, *, scale: float | None = None,
                           chunk_size: int = 64,
                           output_final_state: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Gated linear attention over query, key [b, l, h, dk] and value [b, l, h, dv].

    ``g``: log-decays <= 0, [b, l, h, dk] (GLA), [b, l, h] (one per head) or None. ``scale`` multiplies
    the queries (default dk ** -0.5). ``initial_state`` [b, h, dk, dv] (fp32). Returns the output
    [b, l, h, dv] in the query's dtype and, with ``output_final_state``, the final state [b, h, dk, dv] fp32.
    """
    if is_symbolic(query, key, value):
        out = torch.empty(value.shape, dtype=query.dtype, device=query.device)
        state = torch.empty(key.shape[0], key.shape[2], key.shape[3], value.shape[3], device=query.device)
        return symbolic_result(*((out, state) if output_final_state else (out,)),
                               inputs=(query, key, value, g, initial_state))
    chosen = None
    if query.is_cuda and g is not None and fla_refusal(query.device, gated=True) is None:
        per_channel = g.dim() == 4
        chosen = select(f"gated_linear_attention[{'channel' if per_channel else 'head'}]", query.device,
                        _candidates(g), _check(per_channel), 2e-2)
    if chosen is not None:
        out, state = chosen[1](query, key, value, g, scale=scale, initial_state=initial_state,
                               output_final_state=output_final_state)
    else:
        out, state = gated_linear_attention_reference(query, key, value, g, initial_state, scale, chunk_size)
    return (out, state) if output_final_state else out
