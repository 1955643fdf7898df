"""The experts of a mixture-of-experts layer as one op: ``moe_experts`` (docs/design.md, "Mixture of experts").

Every token's hidden state goes through the ``k`` experts its router picked and comes back as
their sum weighted by the router's weights. Dropless: every (token, expert) pair is computed.
The expert weights are 3-D, as transformers holds them: ``gate_up_proj`` [e, 2f, d] and
``down_proj`` [e, d, f], or transposed ([e, d, 2f], [e, f, d]); gate and up concatenated
([gate; up]) or interleaved (gate0, up0, gate1, ...), with optional biases.

The dim annotation (``experts_dim_rule``) makes the expert dim ``e`` a sum-like reduction: the op
also takes ``expert_ids`` [e], the global ids of the experts whose weights it is given, so a rank
holding a slice of the experts (its slice of ``expert_ids`` with them) computes only their
contribution and its output is a partial sum over ``e``, reduced like a row-split linear's.
Tokens ``t`` split freely; the hidden dim, the top-k slots and the expert width do not split.

On CUDA the pairs are sorted by expert and both products run as grouped products
(``grouped_mm.py``); elsewhere, and for what that kernel does not take, ``experts_reference``
loops over the experts in plain PyTorch. Both give the same function. Backward keeps only the
op's inputs and recomputes the experts' forward (their per-pair intermediates are several times
the hidden states), so what the op saves is what the cost model's "inputs" counts.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from dimshard.planner.ops.registry import OpCall, register_op

from .grouped_mm import grouped_mm

# Activations by the names configs give them (``hidden_act``).
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu, "swish": F.silu, "gelu": F.gelu, "relu": F.relu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}
# gpt-oss's clamped SwiGLU: (clamp(up) + 1) * gate * sigmoid(alpha * gate), gate clamped above.
CLAMPED_SWIGLU = "clamped_swiglu"


def experts_dim_rule(call: OpCall) -> str:
    """The annotation of one ``moe_experts`` call: tokens split, experts a partial sum, the rest whole."""
    transposed = bool(call.kwargs.get("transposed", False))
    gate_up = "e d^ g^" if transposed else "e g^ d^"
    down = "e f^ d^" if transposed else "e d^ f^"
    inputs = ["t d^", "t k^", "t k^", "e", gate_up, down]
    if call.kwargs.get("gate_up_bias") is not None or (len(call.args) > 6 and call.args[6] is not None):
        inputs.append("e g^")
    if call.kwargs.get("down_bias") is not None or (len(call.args) > 7 and call.args[7] is not None):
        inputs.append("e d^")
    return ", ".join(inputs) + " -> t d^"


def _activate(projected: torch.Tensor, activation: str, gated: bool, interleaved: bool,
              swiglu_alpha: float | None, swiglu_limit: float | None) -> torch.Tensor:
    """The expert's nonlinearity on its up projection [n, 2f] (gated) or [n, f]."""
    if not gated:
        return ACTIVATIONS[activation](projected)
    if interleaved:
        gate, up = projected[..., ::2], projected[..., 1::2]
    else:
        gate, up = projected.chunk(2, dim=-1)
    if activation == CLAMPED_SWIGLU:
        gate = gate.clamp(max=swiglu_limit)
        up = up.clamp(min=-swiglu_limit, max=swiglu_limit)
        return (up + 1) * (gate * torch.sigmoid(gate * swiglu_alpha))
    return ACTIVATIONS[activation](gate) * up


def check_activation(activation: str) -> None:
    """Raise ValueError naming the known activations when ``activation`` is not one of them."""
    if activation != CLAMPED_SWIGLU and activation not in ACTIVATIONS:
        raise ValueError(f"dimshard's experts op has no activation {activation!r}; it knows "
                         f"{sorted(ACTIVATIONS) + [CLAMPED_SWIGLU]}: add it to kernels/moe/experts.py's ACTIVATIONS")


def experts_reference(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                      expert_ids: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                      gate_up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None, *,
                      activation: str = "silu", gated: bool = True, interleaved: bool = False,
                      transposed: bool = False, swiglu_alpha: float | None = None,
                      swiglu_limit: float | None = None) -> torch.Tensor:
    """``moe_experts`` in plain PyTorch, one expert at a time (same arguments and result)."""
    out = torch.zeros_like(hidden)
    hit = False
    for local, expert in enumerate(expert_ids.tolist()):
        token, slot = torch.where(top_k_index == expert)
        if token.numel() == 0:
            continue
        hit = True
        w1 = gate_up_proj[local] if transposed else gate_up_proj[local].t()
        projected = hidden[token] @ w1
        if gate_up_bias is not None:
            projected = projected + gate_up_bias[local]
        inner = _activate(projected, activation, gated, interleaved, swiglu_alpha, swiglu_limit)
        w2 = down_proj[local] if transposed else down_proj[local].t()
        result = inner @ w2
        if down_bias is not None:
            result = result + down_bias[local]
        out = out.index_add(0, token, (result * top_k_weights[token, slot, None]).to(out.dtype))
    if not hit:  # no local expert was picked: the weights still get a (zero) gradient
        out = out + _zero_touch(hidden, gate_up_proj, down_proj, gate_up_bias, down_bias, top_k_weights)
    return out


def _zero_touch(hidden: torch.Tensor, *tensors: torch.Tensor | None) -> torch.Tensor:
    """A zero scalar in ``hidden``'s dtype that depends on every tensor given (reads none of their elements)."""
    return sum((t[:0].sum().to(hidden.dtype) for t in tensors if t is not None), hidden.new_zeros(()))


def _experts_grouped(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                     expert_ids: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                     gate_up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None, *,
                     activation: str = "silu", gated: bool = True, interleaved: bool = False,
                     transposed: bool = False, swiglu_alpha: float | None = None,
                     swiglu_limit: float | None = None) -> torch.Tensor:
    """``moe_experts`` with the (token, expert) pairs sorted by expert and grouped products.

    ``expert_ids`` must be consecutive (a slice of ``arange(e)``, as the planner gives it).
    """
    experts = expert_ids.numel()
    first = int(expert_ids[0])
    slots = top_k_index.shape[-1]
    local_ids = top_k_index.reshape(-1) - first
    pairs = ((local_ids >= 0) & (local_ids < experts)).nonzero().squeeze(1)
    local_ids, order = torch.sort(local_ids[pairs], stable=True)
    pairs = pairs[order]
    token = pairs // slots
    offsets = torch.bincount(local_ids, minlength=experts).cumsum(0).to(torch.int32)
    w1 = gate_up_proj if transposed else gate_up_proj.transpose(-2, -1)
    w2 = down_proj if transposed else down_proj.transpose(-2, -1)
    projected = grouped_mm(hidden[token], w1, offsets)
    if gate_up_bias is not None:
        projected = projected + gate_up_bias[local_ids]
    inner = _activate(projected, activation, gated, interleaved, swiglu_alpha, swiglu_limit)
    result = grouped_mm(inner.to(w2.dtype), w2, offsets)
    if down_bias is not None:
        result = result + down_bias[local_ids]
    weighted = result * top_k_weights.reshape(-1)[pairs, None]
    return torch.zeros_like(hidden).index_add(0, token, weighted.to(hidden.dtype))


def _consecutive(expert_ids: torch.Tensor) -> bool:
    """Whether the ids are ``first, first + 1, ...`` (the grouped path indexes weights from ``first``)."""
    if expert_ids.numel() == 0:
        return False
    ids = expert_ids.cpu()  # the planner's ids are a CPU constant: no device sync
    return bool(torch.equal(ids, torch.arange(int(ids[0]), int(ids[0]) + ids.numel(), dtype=ids.dtype)))


@register_op(experts_dim_rule, cost="grouped_matmul", role="experts")
def moe_experts(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                expert_ids: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
                gate_up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None, *,
                activation: str = "silu", gated: bool = True, interleaved: bool = False, transposed: bool = False,
                swiglu_alpha: float | None = None, swiglu_limit: float | None = None) -> torch.Tensor:
    """Routed experts: returns [t, d], each token's sum over its top-k experts of weight x expert(hidden).

    ``hidden`` [t, d]; ``top_k_index`` [t, k] global expert ids; ``top_k_weights`` [t, k];
    ``expert_ids`` [e] the global ids of the experts given (consecutive); ``gate_up_proj``
    [e, 2f, d] (``transposed``: [e, d, 2f]; ``gated=False``: f instead of 2f), ``down_proj``
    [e, d, f] (transposed: [e, f, d]); biases [e, 2f] and [e, d]. An expert computes
    ``down(act(gate) * up)`` (``gated``) or ``down(act(up))``; ``activation`` is a ``hidden_act``
    name or ``"clamped_swiglu"`` (``swiglu_alpha``, ``swiglu_limit``). Pairs routed to experts not
    given contribute nothing (a partial sum over experts). Differentiable in hidden, weights and
    top_k_weights; the result is in ``hidden``'s dtype.
    """
    check_activation(activation)
    if hidden.is_meta:
        grad = any(t is not None and t.requires_grad for t in (hidden, top_k_weights, gate_up_proj, down_proj))
        return hidden.new_empty(hidden.shape).requires_grad_(grad)
    options = dict(activation=activation, gated=gated, interleaved=interleaved, transposed=transposed,
                   swiglu_alpha=swiglu_alpha, swiglu_limit=swiglu_limit)
    path = _experts_grouped if hidden.is_cuda and _consecutive(expert_ids) else experts_reference
    args = (hidden, top_k_index, top_k_weights, expert_ids, gate_up_proj, down_proj, gate_up_bias, down_bias)
    tensors = [t for t in args if isinstance(t, torch.Tensor)]
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        return path(*args, **options)
    return _RecomputedExperts.apply(functools.partial(path, **options), *args)


class _RecomputedExperts(torch.autograd.Function):
    """The experts as one autograd node, whatever the routing; backward runs their forward again.

    One node: the loop's graph (which experts were hit, or none) depends on the routing, so on
    ranks holding different experts it would differ, and the autograd engine, which orders ready
    nodes by creation, could then run the backward's collectives on other process groups (a tp x
    ep mesh) in a different order on different ranks: a deadlock. Recomputing: the (token, expert)
    pairs' gathered rows and projections are k * (d + 3f) values a token, ~9x its hidden state in
    Qwen3-30B-A3B's shape, more than the cost model's "inputs" saves (planner/cost/op_costs.py
    prices the second forward).
    """

    @staticmethod
    def forward(ctx, path: Callable[..., torch.Tensor], *args: torch.Tensor | None) -> torch.Tensor:  # noqa: ANN001
        ctx.path = path
        ctx.save_for_backward(*args)
        with torch.no_grad():
            return path(*args)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: ANN001
        needs = ctx.needs_input_grad[1:]
        args = [a.detach().requires_grad_(need) if a is not None else None
                for a, need in zip(ctx.saved_tensors, needs)]
        wanted = [a for a, need in zip(args, needs) if need]
        with torch.enable_grad():
            out = ctx.path(*args)
        grads = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True) if wanted else ())
        # Every input that wants a gradient gets one, zeros where no pair used it (an unpicked expert).
        result = [(next(grads) if need else None) for need in needs]
        result = [torch.zeros_like(a) if need and g is None else g for a, need, g in zip(args, needs, result)]
        return (None, *result)
