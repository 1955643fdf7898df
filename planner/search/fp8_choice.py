"""Which linear layers run their products in FP8: each priced against bf16 (docs/design.md, "FP8").

After the plan is resolved, every ``torch.nn.functional.linear`` is a candidate. The output head and
routers stay in their dtype (their outputs are logits and routing scores, where FP8's 3 mantissa
bits cost accuracy for a small share of the step), as does a product whose local sizes are not
multiples of 16 (the FP8 GEMM's layout rule). The rest, under ``--fp8``:

- ``off``: none;
- ``auto``: those whose FP8 time (``cost.op_costs.fp8_linear_cost``: products at the profile's FP8
  rate, casts, amax reductions) beats the bf16 time (``op_cost``), forward twice when recomputed;
  a profile without measured FP8 rates makes FP8 unavailable, with one line saying so;
- ``all``: every eligible one, priced where the profile allows.

A model that calls ``kernels.fp8.linear.fp8_linear`` itself keeps it in FP8 whatever the mode.
Codegen writes each chosen op as ``fp8_linear`` with the process groups of its split
(``codegen/fp8_code.py``); plan.json's ``fp8`` entry and plan_report.md list every decision.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dimshard.kernels.fp8.linear import FP8_DIM_MULTIPLE, shapes_fit_fp8
from dimshard.kernels.fp8.scaling import RECIPES

from ..cost.hardware import HardwareProfile
from ..cost.op_costs import fp8_linear_cost, op_cost
from ..graph.ir import Graph, Op, dtype_bytes, numel
from ..plan.placements import ResolvedPlan, local_shape

FP8_MODES = ("off", "auto", "all")
LINEAR_OP = "torch.nn.functional.linear"
FP8_OP = "dimshard.kernels.fp8.linear.fp8_linear"
# Module names of output heads and routers (the last part of the op's scope).
_HEAD_NAMES = {"lm_head", "output", "embed_out", "score", "output_layer"}
_ROUTER_NAMES = {"gate", "router", "wg"}
# A linear whose output goes straight into one of these computes routing scores.
_ROUTING_OPS = ("softmax", "topk", "sigmoid")


@dataclass(frozen=True)
class Fp8Decision:
    """One linear: FP8 or not, why, and its step time both ways (seconds; None: not priced).

    ``local_mnk``: this rank's tokens, output features and input features of the product.
    """

    op_index: int
    scope: str
    local_mnk: tuple[int, int, int]
    fp8: bool
    reason: str
    bf16_s: float | None = None
    fp8_s: float | None = None


@dataclass
class Fp8Choice:
    """The FP8 decisions of a compile: ``mode`` and ``recipe`` as asked, one decision per linear.

    ``unavailable`` says why ``auto`` could not price FP8 ("" when it could).
    """

    mode: str = "off"
    recipe: str = "tensorwise"
    decisions: list[Fp8Decision] = field(default_factory=list)
    unavailable: str = ""

    def ops(self) -> dict[int, str]:
        """Op index -> recipe of every op that runs in FP8 (what codegen writes as ``fp8_linear``)."""
        return {d.op_index: self.recipe for d in self.decisions if d.fp8}

    @property
    def saved_s(self) -> float:
        """Estimated seconds per step saved by the FP8 ops, where both times are priced."""
        return sum(d.bf16_s - d.fp8_s for d in self.decisions
                   if d.fp8 and d.bf16_s is not None and d.fp8_s is not None)

    def manifest(self) -> dict[str, Any]:
        """plan.json's ``fp8`` entry: the mode, recipe, the ops in FP8 by scope, and why the others are not."""
        return {
            "mode": self.mode, "recipe": self.recipe, "unavailable": self.unavailable,
            "estimated_saving_s": round(self.saved_s, 6),
            "ops": [{"op": d.op_index, "scope": d.scope, "fp8": d.fp8, "reason": d.reason,
                     "local_mnk": list(d.local_mnk),
                     **({"bf16_s": d.bf16_s} if d.bf16_s is not None else {}),
                     **({"fp8_s": d.fp8_s} if d.fp8_s is not None else {})} for d in self.decisions],
        }


def split_dims(resolved: ResolvedPlan, op_index: int) -> dict[str, list[int]]:
    """The mesh axes splitting a linear's ``m`` (tokens), ``n`` and ``k``: dim -> axis indices."""
    out: dict[str, list[int]] = {"m": [], "n": [], "k": []}
    for axis, name in enumerate(resolved.plan.split_of(op_index)):
        if name is not None:
            out[name if name in ("n", "k") else "m"].append(axis)
    return out


def local_mnk(graph: Graph, resolved: ResolvedPlan, op: Op) -> tuple[int, int, int]:
    """This rank's (tokens, output features, input features) of a linear under the plan."""
    mesh = resolved.plan.mesh
    x_id, w_id = op.input_ids()[:2]
    x = local_shape(graph.tensors[x_id].shape, resolved.op_inputs[op.index][0], mesh)
    n, k = local_shape(graph.tensors[w_id].shape, resolved.op_inputs[op.index][1], mesh)
    return numel(x) // max(x[-1], 1), n, k


def _stays_in_dtype(graph: Graph, op: Op, consumers: dict[int, list[int]], embeddings: list[Op],
                    last_linear: int) -> str:
    """Why this linear keeps its dtype whatever the price (output head, router), or ""."""
    last = op.scope.rsplit(".", 1)[-1]
    weight = op.input_ids()[1]
    vocab = {graph.tensors[o.input_ids()[1]].shape[0] for o in embeddings if len(o.input_ids()) > 1}
    tied = any(weight in o.input_ids() for o in embeddings)
    # An untied head by another name: the last linear (``last_linear``), one output per vocabulary entry.
    unnamed_head = op.index == last_linear and graph.tensors[weight].shape[0] in vocab
    if last in _HEAD_NAMES or tied or unnamed_head:
        return "output head: its logits keep the weights' dtype"
    readers = consumers.get(op.output_ids()[0], [])
    if last in _ROUTER_NAMES or any(w in graph.ops[i].name.lower() for i in readers for w in _ROUTING_OPS):
        return "router or gate: its scores keep the weights' dtype"
    return ""


def _priced(graph: Graph, resolved: ResolvedPlan, op: Op, hw: HardwareProfile, recipe: str,
            mnk: tuple[int, int, int]) -> tuple[float, float | None]:
    """(bf16 seconds, FP8 seconds or None) of one linear per step, forward twice when recomputed."""
    mesh = resolved.plan.mesh
    cost = op_cost(graph, op, resolved.op_inputs[op.index], resolved.op_outputs[op.index], mesh, hw)
    has_backward = cost.backward_s > 0
    splits = {dim: [mesh.shape[a] for a in axes] for dim, axes in split_dims(resolved, op.index).items()}
    itemsize = dtype_bytes(graph.tensors[op.input_ids()[0]].dtype)
    fp8 = fp8_linear_cost(*mnk, itemsize, recipe, splits, hw, has_backward)
    runs = 2 if any(op.scope == s or op.scope.startswith(s + ".") for s in resolved.plan.recompute_scopes) else 1
    bf16_s = runs * cost.forward_s + cost.backward_s
    return bf16_s, None if fp8 is None else runs * fp8.forward_s + fp8.backward_s


def choose_fp8(graph: Graph, resolved: ResolvedPlan, hw: HardwareProfile, mode: str = "off",
               recipe: str = "tensorwise") -> Fp8Choice:
    """Decide, for every linear of ``graph`` under ``resolved``, whether it runs in FP8 (module docstring).

    Raises ValueError for an unknown mode or recipe.
    """
    if mode not in FP8_MODES:
        raise ValueError(f"fp8 mode must be one of {FP8_MODES}, got {mode!r}")
    if recipe not in RECIPES:
        raise ValueError(f"unknown FP8 recipe {recipe!r}; the recipes are {sorted(RECIPES)}")
    scaling = "rowwise" if RECIPES[recipe].rowwise else "tensorwise"
    choice = Fp8Choice(mode, recipe, unavailable=hw.fp8_unavailable(scaling) if mode == "auto" else "")
    consumers = graph.consumers() if mode != "off" else {}
    embeddings = [o for o in graph.ops if o.record.role == "embedding"]
    # An untied head by another name is the last linear, unless a token loss op holds the head itself.
    has_token_loss = any(o.record.role == "token_loss" for o in graph.ops)
    last_linear = -1 if has_token_loss else max((o.index for o in graph.ops if o.name == LINEAR_OP), default=-1)
    for op in graph.ops:
        if op.name not in (LINEAR_OP, FP8_OP) or len(op.input_ids()) < 2:
            continue
        mnk = local_mnk(graph, resolved, op)
        if op.name == FP8_OP:
            choice.decisions.append(Fp8Decision(op.index, op.scope, mnk, True, "the model calls fp8_linear itself"))
            continue
        if mode == "off":
            continue
        keep = _stays_in_dtype(graph, op, consumers, embeddings, last_linear)
        if not keep and not shapes_fit_fp8(*mnk):
            keep = f"local sizes m, n, k = {mnk} are not all multiples of {FP8_DIM_MULTIPLE}"
        if keep:
            choice.decisions.append(Fp8Decision(op.index, op.scope, mnk, False, keep))
            continue
        bf16_s, fp8_s = _priced(graph, resolved, op, hw, recipe, mnk)
        if mode == "all":
            fp8, reason = True, "forced by --fp8 all"
        elif fp8_s is None:
            fp8, reason = False, "FP8 unavailable: " + choice.unavailable
        elif fp8_s < bf16_s:
            fp8, reason = True, f"saves {(bf16_s - fp8_s) * 1e6:,.1f} us per step"
        else:
            fp8, reason = False, f"FP8 costs {(fp8_s - bf16_s) * 1e6:,.1f} us more per step (casts outweigh the product)"
        choice.decisions.append(Fp8Decision(op.index, op.scope, mnk, fp8, reason, bf16_s, fp8_s))
    return choice
