"""The gated delta rule (Gated DeltaNet, Qwen3-Next; the per-channel gate of Kimi Delta Attention) and the plain
delta rule, as one op with its dim annotation.

Per batch and head, with state S [dk, dv]:
``S_t = (I - beta_t k_t k_t^T) diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T`` and ``o_t = S_t^T (scale q_t)``;
``g`` is one log-decay per head ([b, l, h]), one per key channel ([b, l, h, dk], Kimi's KDA) or None (the
delta rule). The value channels of the state are independent, so the annotation lets batch, heads and
the value dim split; the sequence and the key dim stay whole (sequence split passes states between
ranks: docs/design.md, "Recurrent layers").

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


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim (the normalisation fla and Hugging Face apply to q and k)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def gated_delta_rule_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, g: torch.Tensor | None,
                               beta: torch.Tensor, initial_state: torch.Tensor | None = None,
                               scale: float | None = None, use_qk_l2norm: bool = False, chunk_size: int = 64,
                               recurrence: Recurrence = chunked_recurrence) -> tuple[torch.Tensor, torch.Tensor]:
    """``gated_delta_rule`` in chunked PyTorch: (output [b, l, h, dv] in the query's dtype, final state fp32).

    ``recurrence`` runs the chunked form (``sequence_split.py`` passes its state-passing one)."""
    q, k = query.float() if query.dtype != torch.float64 else query, key.float() if key.dtype != torch.float64 else key
    if use_qk_l2norm:
        q, k = l2_normalize(q), l2_normalize(k)
    q = q * (query.shape[-1] ** -0.5 if scale is None else scale)
    groups = value.shape[2] // key.shape[2]
    if groups > 1:  # each query/key head serves ``groups`` consecutive value heads
        q, k = q.repeat_interleave(groups, dim=2), k.repeat_interleave(groups, dim=2)
    heads_first = [x.transpose(1, 2) for x in (q, k, value)]
    gates = None if g is None else g.transpose(1, 2)
    out, state = recurrence(*heads_first, gates, beta.transpose(1, 2), initial_state, chunk_size)
    return out.transpose(1, 2).to(query.dtype).contiguous(), state


def _fla_candidates(g: torch.Tensor | None) -> list[Candidate]:
    if g is None:
        return [("fla.chunk_delta_rule", lambda: load_attribute("fla.ops.delta_rule", "chunk_delta_rule"))]
    if g.dim() == 4:
        return [("fla.chunk_kda", lambda: load_attribute("fla.ops.kda", "chunk_kda"))]
    return [("fla.chunk_gated_delta_rule", lambda: load_attribute("fla.ops.gated_delta_rule", "chunk_gated_delta_rule"))]


def _call_fla(kernel, query, key, value, g, beta, initial_state, scale, use_qk_l2norm, output_final_state):
    gates = () if g is None else (g,)
    return kernel(query, key, value, *gates, beta, scale=scale, initial_state=initial_state,
                  output_final_state=output_final_state, use_qk_l2norm_in_kernel=use_qk_l2norm)


def _fla_check(gate_kind: str, use_qk_l2norm: bool):
    def check(kernel, device: torch.device) -> float:
        generator = torch.Generator(device="cpu").manual_seed(0)
        b, length, h, dk, dv = 1, 200, 2, 64, 64
        q, k, v = (torch.randn(b, length, h, d, generator=generator).to(device, torch.bfloat16) for d in (dk, dk, dv))
        gates = {"none": [], "head": [-torch.rand(b, length, h, generator=generator).to(device)],
                 "channel": [-torch.rand(b, length, h, dk, generator=generator).to(device) * 0.1]}[gate_kind]
        beta = torch.rand(b, length, h, generator=generator).to(device)

        def run(use):
            def call(q, k, v, *rest):
                g = rest[0] if gates else None
                if not use_qk_l2norm:
                    k = l2_normalize(k.float()).to(k.dtype)
                return use(q, k, v, g, rest[-1])[0]
            return call

        fla = run(lambda q, k, v, g, beta: _call_fla(kernel, q, k, v, g, beta, None, None, use_qk_l2norm, False))
        ref = run(lambda q, k, v, g, beta: gated_delta_rule_reference(q, k, v, g, beta, None, None, use_qk_l2norm))
        return relative_error(fla, ref, [q, k, v, *gates, beta])
    return check


def _value_heads(call: OpCall) -> str:
    """Value heads: ``h`` as many as the key heads, else ``(h r^)``, each key head with its group of value heads."""
    key, value = call.arg(1, "key"), call.arg(2, "value")
    return "h" if key.shape[2] == value.shape[2] else "(h r^)"


def _specs(call: OpCall) -> dict[str, str]:
    g, heads = call.arg(3, "g"), _value_heads(call)
    return {"query": "b l^ h e^", "key": "b l^ h e^", "value": f"b l^ {heads} f",
            "g": f"b l^ {heads} e^" if g is not None and len(g.shape) == 4 else f"b l^ {heads}",
            "beta": f"b l^ {heads}", "initial_state": f"b {heads} e^ f"}


def _outputs(call: OpCall) -> list[str]:
    heads = _value_heads(call)
    return [f"b l^ {heads} f"] + ([f"b {heads} e^ f"] if call.kwargs.get("output_final_state") else [])


def _recurrence(op: Any, shapes: list[tuple[int, ...]]) -> RecurrenceDims:
    """The chunked delta rule of a call with inputs of ``shapes`` (query [b, l, hk, dk], key, value [b, l, h, dv], ...)."""
    (batch, tokens, _, key_dim), (_, _, heads, value_dim) = shapes[0], shapes[2]
    return RecurrenceDims(batch * heads, tokens, key_dim, value_dim, int(op.kwargs.get("chunk_size", 64)), delta=True)


@register_op(annotation_rule(["query", "key", "value", "g", "beta", "initial_state"], _specs, _outputs),
             cost="recurrent", recurrence=_recurrence, sequence_split=f"{__package__}.sequence_split.split_gated_delta_rule")
def gated_delta_rule(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, g: torch.Tensor | None,
                     beta: torch.Tensor, initial_state: torch.Tensor | None = None, *, scale: float | None = None,
                     use_qk_l2norm: bool = False, chunk_size: int = 64,
                     output_final_state: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule over query, key [b, l, hk, dk], value [b, l, h, dv], beta [b, l, h].

    ``h`` is a multiple of ``hk``: query/key head i serves value heads i*h/hk .. (i+1)*h/hk - 1.
    ``g``: log-decays <= 0, [b, l, h] (per head), [b, l, h, dk] (per key channel) or None (no decay:
    the delta rule). ``scale`` multiplies the queries (default dk ** -0.5); ``use_qk_l2norm``
    normalises q and k first (eps 1e-6, in fp32). ``initial_state`` [b, h, dk, dv] (fp32) is the state
    before the first token. Returns the output [b, l, h, dv] in the query's dtype and, with
    ``output_final_state``, the state after the last token [b, h, dk, dv] in fp32.
    """
    if is_symbolic(query, key, value):
        out = torch.empty(value.shape, dtype=query.dtype, device=query.device)
        state = torch.empty(key.shape[0], value.shape[2], key.shape[3], value.shape[3], device=query.device)
        return symbolic_result(*((out, state) if output_final_state else (out,)),
                               inputs=(query, key, value, g, beta, initial_state))
    chosen = None
    if query.is_cuda and fla_refusal(query.device, gated=g is not None) is None:
        kind = "none" if g is None else ("channel" if g.dim() == 4 else "head")
        chosen = select(f"gated_delta_rule[{kind},l2norm={use_qk_l2norm}]", query.device,
                        _fla_candidates(g), _fla_check(kind, use_qk_l2norm), 2e-2)
    if chosen is not None:
        groups = value.shape[2] // key.shape[2]  # the check ran equal heads: give the kernel those
        q, k = (query, key) if groups == 1 else (query.repeat_interleave(groups, 2), key.repeat_interleave(groups, 2))
        out, state = _call_fla(chosen[1], q, k, value, g, beta, initial_state, scale, use_qk_l2norm,
                               output_final_state)
    else:
        out, state = gated_delta_rule_reference(query, key, value, g, beta, initial_state, scale, use_qk_l2norm,
                                                chunk_size)
    return (out, state) if output_final_state else out

