"""Rules of the ops mixture-of-experts routers and their auxiliary losses call, beyond the other rule modules.

Routers pick each token's experts with ``topk`` (after a softmax, before one, or over sigmoid
scores plus a bias and a grouped top-k with ``scatter_``, as DeepSeek-V3), and the load-balancing
loss counts the picks with ``histc`` (``bincount`` in transformers 5.17). The experts themselves are one op, ``kernels/moe/experts.py``
(docs/design.md, "Mixture of experts").
"""

from __future__ import annotations

from ..registry import OpCall, set_rule
from .rule_text import join_dims, normalize_dim


def _topk(call: OpCall) -> str:
    """``topk(x, k, dim)``: the other dims split together; the ranked dim never splits (nor its k)."""
    x = call.inputs[0]
    ranked = normalize_dim(call.arg(2, "dim", -1), x.ndim)
    names = [f"d{i}" for i in range(x.ndim)]
    ins = [n + ("^" if i == ranked else "") for i, n in enumerate(names)]
    outs = ["k^" if i == ranked else n for i, n in enumerate(names)]
    return join_dims(ins) + " -> " + ", ".join([join_dims(outs)] * len(call.outputs))


def _histc(call: OpCall) -> str:
    """``histc(x, bins)``, ``bincount(x[, weights])``: counts add up over any split of ``x``, so every
    dim of ``x`` (and of the weights, split with it) is a sum-like reduction."""
    dims = join_dims([f"d{i}" for i in range(call.inputs[0].ndim)])
    return ", ".join([dims] * len(call.inputs)) + " -> b^"


def _scatter(call: OpCall) -> str:
    """``x.scatter_(dim, index, src|value)`` and ``scatter_add``: the scattered dim whole, the others shared."""
    x = call.inputs[0]
    along = normalize_dim(call.arg(1, "dim"), x.ndim)
    target = [f"d{i}" + ("^" if i == along else "") for i in range(x.ndim)]
    source = [("s^" if i == along else f"d{i}") for i in range(x.ndim)]
    extra = [join_dims(source)] * (len(call.inputs) - 1)  # index, and src when a tensor
    return ", ".join([join_dims(target)] + extra) + " -> " + join_dims(target)


set_rule(["torch.topk", "torch.Tensor.topk"], _topk)
# Generated code counts with a drop-in that has an integer kernel on CPU too (the meta trace takes the GPU dtype).
set_rule(["torch.histc", "torch.Tensor.histc"], _histc, saves="nothing", substitute="dimshard.kernels.moe.routing.histc")
set_rule(["torch.bincount", "torch.Tensor.bincount"], _histc, saves="nothing")  # transformers 5.17's counts
set_rule(["torch.Tensor.scatter_", "torch.Tensor.scatter", "torch.scatter", "torch.Tensor.scatter_add_",
          "torch.Tensor.scatter_add", "torch.scatter_add"], _scatter)
