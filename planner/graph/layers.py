"""The repeated decoder layers of a traced graph: their scopes, MLP scopes and op-level structure."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .ir import ACTIVATION, Graph

# A decoder layer's module path as Hugging Face names it (``model.layers.3``).
_LAYER = re.compile(r"^(.*\.layers\.\d+)(\.|$)")


def decoder_layer_scopes(graph: Graph) -> list[str]:
    """Module paths of the repeated decoder layers (``model.layers.0``, ...), in order."""
    seen: list[str] = []
    for op in graph.ops:
        m = _LAYER.match(op.scope)
        if m and m.group(1) not in seen:
            seen.append(m.group(1))
    return seen


def _in_scope(scope: str, root: str) -> bool:
    return scope == root or scope.startswith(root + ".")


@dataclass
class LayerStructure:
    """Identical decoder layers: op ranges and the residual tensor entering and leaving each layer."""

    scopes: list[str]
    starts: list[int]  # first op index of each layer
    length: int  # ops per layer
    inputs: list[int]  # tensor id of the residual each layer reads
    outputs: list[int]  # tensor id of the residual each layer produces

    def locate(self, op_index: int) -> tuple[int, int] | None:
        """(layer, position in layer) of an op, or None for prologue and epilogue ops."""
        if op_index < self.starts[0] or op_index >= self.starts[-1] + self.length:
            return None
        layer = (op_index - self.starts[0]) // self.length
        return layer, op_index - self.starts[layer]


def layer_structure(graph: Graph) -> LayerStructure | None:
    """The repeated-layer structure of ``graph``, or None when its layers cannot share one plan.

    Promises, when not None: layers are consecutive op ranges of equal length whose ops match by
    position (name, annotation, input and output shapes, tensor kinds); layer i >= 1 reads, from
    outside itself, only layer i-1's output at fixed positions and the same prologue tensors as
    layer 0; each layer's output is read only by the next layer (the last: by the epilogue).
    """
    scopes = decoder_layer_scopes(graph)
    if len(scopes) < 2:
        return None
    members = [[op.index for op in graph.ops if _in_scope(op.scope, s)] for s in scopes]
    n = len(members[0])
    starts = [m[0] for m in members]
    for i, m in enumerate(members):
        if len(m) != n or m != list(range(m[0], m[0] + n)) or (i and m[0] != starts[i - 1] + n):
            return None
    for i in range(1, len(scopes)):
        for j in range(n):
            a, b = graph.ops[starts[0] + j], graph.ops[starts[i] + j]
            if a.name != b.name or str(a.annotation) != str(b.annotation):
                return None
            ta = [graph.tensors[t] for t in a.input_ids() + a.output_ids()]
            tb = [graph.tensors[t] for t in b.input_ids() + b.output_ids()]
            if [(t.shape, t.dtype, t.kind) for t in ta] != [(t.shape, t.dtype, t.kind) for t in tb]:
                return None
    consumers = graph.consumers()
    graph_out = set(graph.output_ids())

    def outside_reads(i: int) -> dict[tuple[int, int], int]:
        reads = {}
        lo, hi = starts[i], starts[i] + n
        for j in range(n):
            for pos, tid in enumerate(graph.ops[lo + j].input_ids()):
                t = graph.tensors[tid]
                if t.kind == ACTIVATION and t.producer is not None and not lo <= t.producer < hi:
                    reads[(j, pos)] = tid
        return reads

    epilogue = starts[-1] + n

    def leaving(i: int) -> list[tuple[int, int, int]]:
        """(op offset, output position, tensor) of what layer i's ops write and something outside reads."""
        lo, hi = starts[i], starts[i] + n
        return [(j - lo, pos, tid) for j in range(lo, hi) for pos, tid in enumerate(graph.ops[j].output_ids())
                if tid in graph_out or any(not lo <= c < hi for c in consumers.get(tid, []))]

    def side_output(tid: int, i: int) -> bool:
        # Outside layer i, read by the epilogue alone (a mixture-of-experts router's logits, for the auxiliary loss).
        lo, hi = starts[i], starts[i] + n
        return tid not in graph_out and all(c >= epilogue for c in consumers.get(tid, []) if not lo <= c < hi)

    layers_out = [leaving(i) for i in range(len(scopes))]
    residual_at = [(j, pos) for j, pos, tid in layers_out[0] if not side_output(tid, 0)]
    if len(residual_at) != 1:
        return None
    outputs = []
    for i, found in enumerate(layers_out):
        where = {(j, pos): tid for j, pos, tid in found}
        residual = where.get(residual_at[0])
        sides = [tid for key, tid in where.items() if key != residual_at[0]]
        if residual is None or set(where) != {key[:2] for key in layers_out[0]} \
                or not all(side_output(tid, i) for tid in sides):
            return None
        outputs.append(residual)
        lo, hi = starts[i], starts[i] + n
        later = [c for c in consumers[residual] if not lo <= c < hi]
        if tid_out_of_place(later, i, starts, n, len(scopes)) or residual in graph_out:
            return None
    reads = [outside_reads(i) for i in range(len(scopes))]
    residual_at = {k for k, t in reads[1].items() if t == outputs[0]}
    side = {k: t for k, t in reads[1].items() if k not in residual_at}
    if not residual_at or any(graph.tensors[t].producer >= starts[0] for t in side.values()):
        return None
    for i in range(2, len(scopes)):
        if {k for k, t in reads[i].items() if t == outputs[i - 1]} != residual_at:
            return None
        if {k: t for k, t in reads[i].items() if k not in residual_at} != side:
            return None
    first = {reads[0].get(k) for k in residual_at}
    if len(first) != 1 or None in first or {k: t for k, t in reads[0].items() if k not in residual_at} != side:
        return None
    layer0_input = first.pop()
    if graph.tensors[layer0_input].producer >= starts[0]:
        return None
    return LayerStructure(scopes, starts, n, [layer0_input] + outputs[:-1], outputs)


def tid_out_of_place(readers: list[int], layer: int, starts: list[int], n: int, layers: int) -> bool:
    """True when a layer's output is read anywhere but the next layer (the epilogue for the last)."""
    if layer == layers - 1:
        return any(c < starts[-1] + n for c in readers)
    lo = starts[layer + 1]
    return any(not lo <= c < lo + n for c in readers)


def mlp_scopes(graph: Graph, layers: list[str]) -> list[str] | None:
    """``<layer>.mlp`` for every decoder layer, when every layer has such a child scope, else None."""
    scopes = {op.scope for op in graph.ops}
    mlps = [f"{layer}.mlp" for layer in layers]
    has = all(any(s == m or s.startswith(m + ".") for s in scopes) for m in mlps)
    return mlps if layers and has else None
