"""Sequence-split (context-parallel) attention in the planner: the split rule and the zigzag layout pass.

**The rule.** An attention op's annotation freezes its sequence dims
(``b (h r^) l^ e^, b h s^ e^, b h s^ f^ -> b (h r^) l^ f^``): a query shard alone would need every
key. With communication inside the op it may split them after all: query, key, value and output
all split along the sequence together, as if the annotation read
``b (h r^) l e^, b h l e^, b h l f^ -> b (h r^) l f^``. That is one more choice per mesh axis for
the search (``extra_split_names``) and for user policies (split the query's sequence name, ``l``).
``resolve.op_placements`` places such a split with that annotation (``effective_annotation``);
codegen calls ``kernels.context_parallel.sequence_split_attention`` with the process group of the
axis (``codegen/sequence_split_code.py``), with what ``attention_call`` reads from the traced call.
Causal attention only: an attention mask,
a sliding window, document masks, logit softcapping or dropout are refused with a PlanError that
says what to do instead, and so is a sequence that does not cut into ``2P`` equal chunks.

**The zigzag layout.** Causal attention over a contiguous split gives the last rank ``2P - 1``
times the work of the first. So on a mesh axis where attention is sequence split, every
sequence-aligned tensor that the plan splits on that axis is held in the zigzag layout of
``kernels/sequence_split/layout.py``: ``2P`` chunks, rank i holding chunks i and ``2P-1-i``. Sequence-aligned
means: in the class of the attention query's sequence dim, where the classes join tensor dims
that carry the same annotation name in one op (the outermost name of a grouped dim). That reaches
the residual stream, the token ids' split for the embedding, the rotary tables (positions),
the shifted labels and the per-token loss, but never a parameter. Since an op may only split a
name when every shard computes independently of the others (the annotation language's promise),
which positions a shard holds does not change what the op computes; only the places where
tensors change placement see the layout, and codegen wraps those collectives in reorders
(``codegen/sequence_split_code.py``'s ``zigzag_step``).

**Recurrent layers.** An op whose record names a sequence-split form (``OpRecord.sequence_split``:
the gated delta rule, linear attention, Mamba2's and Mamba's scans, the short causal convolution;
``kernels/recurrent/``) freezes its sequence ``l`` too, and may split it the same way: the annotation
with ``l`` unfrozen, its state passed between the ranks inside the op (one all-gather of every
rank's state and transition, or of the convolution's k - 1 tokens before each chunk). It adds no
layout of its own: where softmax attention makes an axis zigzag, the recurrent op's sequence is in
the same class (the residual stream joins them) and runs with ``layout="zigzag"``; elsewhere (a
model without attention, or attention kept whole) with ``layout="contiguous"``, the natural order.
``ZigzagLayout.recurrent_ops`` records each one's axis and layout; codegen calls the record's
split form with the axis's process group (``codegen/sequence_split_code.py``'s ``recurrent_code``).

The user's data and model stay as they are: inputs arrive whole and in natural order, and a
tensor a consumer needs whole (the logits of the Hugging Face loss, a full-sequence output) is
gathered back into natural order. A reduction over the sequence that is a sum (the token loss
summed before dividing by the count) needs no reorder at all.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..graph.ir import Graph, Op, TensorRef
from ..ops.annotations import Annotation, Dim, TensorSpec
from .placements import Mesh, PlanError, ResolvedPlan, Shard, TensorPlacement

SDPA = "torch.nn.functional.scaled_dot_product_attention"

_ALT: dict[int, tuple[Op, Annotation | None, Annotation | None]] = {}
_LAYOUTS: dict[int, tuple[object, ZigzagLayout]] = {}
_OFFERED = [True]  # whether extra_split_names offers the split (see not_offered)


# --------------------------------------------------------------------------------------------
# Which ops are attention, and what their call asks for
# --------------------------------------------------------------------------------------------


def is_attention(op: Op) -> bool:
    """Whether ``op`` is an attention op: its record's cost class is attention (torch's sdpa, dimshard's op)."""
    return op.record.cost == "attention"


# The annotation name of a recurrent op's sequence (``OpRecord.sequence_split``'s contract).
RECURRENT_SEQUENCE = "l"


def is_recurrent(op: Op) -> bool:
    """Whether ``op`` has a sequence-split form that passes state between ranks (``OpRecord.sequence_split``)."""
    return op.record.sequence_split is not None


@dataclass(frozen=True)
class AttentionCall:
    """What an attention call computes, as far as a sequence split cares."""

    causal: bool
    scale: float | None
    refusal: str | None  # why it cannot be sequence split, None when it can


def _argument(op: Op, index: int | None, name: str, default: Any = None) -> Any:
    if index is not None and len(op.args) > index:
        return op.args[index]
    return op.kwargs.get(name, default)


def attention_call(op: Op) -> AttentionCall:
    """The causal flag, scale and refusal reason of an attention op's traced call.

    torch's sdpa is read by its signature (``attn_mask, dropout_p, is_causal, scale``); a registered
    attention op by its keywords (``causal`` (default True), ``scale``, ``window``, ``softcap``,
    ``document_ids``, ``attn_mask``/``mask``, ``dropout_p``).
    """
    if op.name == SDPA:  # torch's positional signature; registered attention ops take keywords
        causal = bool(_argument(op, 5, "is_causal", False))
        scale = _argument(op, 6, "scale")
        mask = _argument(op, 3, "attn_mask")
        dropout = _argument(op, 4, "dropout_p", 0.0) or 0.0
        window = softcap = documents = None
    else:
        causal = bool(op.kwargs.get("causal", op.kwargs.get("is_causal", True)))
        scale = op.kwargs.get("scale")
        mask = op.kwargs.get("attn_mask", op.kwargs.get("mask"))
        dropout = op.kwargs.get("dropout_p", 0.0) or 0.0
        window, softcap, documents = op.kwargs.get("window"), op.kwargs.get("softcap"), op.kwargs.get("document_ids")
    refusal = None
    if isinstance(documents, TensorRef):
        refusal = "document masks (document_ids) are not supported under a sequence split yet"
    elif window is not None:
        refusal = f"sliding-window attention (window={window}) is not supported under a sequence split yet"
    elif isinstance(mask, TensorRef):
        refusal = "an explicit attention mask is not supported under a sequence split (only the causal mask)"
    elif softcap:
        refusal = f"logit softcapping (softcap={softcap}) is not supported under a sequence split yet"
    elif dropout:
        refusal = f"attention dropout (dropout_p={dropout}) is not supported under a sequence split"
    elif not causal:
        refusal = "only causal attention can be sequence split (this call is not causal)"
    if scale is not None and not isinstance(scale, int | float):
        refusal = refusal or f"the attention scale {scale!r} is not a number known at compile time"
    return AttentionCall(causal, float(scale) if isinstance(scale, int | float) else None, refusal)


# --------------------------------------------------------------------------------------------
# The rule
# --------------------------------------------------------------------------------------------


def _annotations(op: Op) -> tuple[Annotation | None, Annotation | None]:
    """(the sequence-split annotation, the same when the call may use it else None), cached per op."""
    cached = _ALT.get(id(op))
    if cached is not None and cached[0] is op:
        return cached[1], cached[2]
    alt = allowed = None
    ann = op.annotation
    if ann is not None and is_recurrent(op) and RECURRENT_SEQUENCE in ann.frozen & ann.input_names:
        alt = allowed = Annotation(ann.inputs, ann.outputs, frozenset(ann.frozen - {RECURRENT_SEQUENCE}))
    elif ann is not None and is_attention(op) and len(ann.inputs) >= 3 and ann.outputs:
        q, k, v, out = ann.inputs[0], ann.inputs[1], ann.inputs[2], ann.outputs[0]
        if all(len(s.dims) == 4 and len(s.dims[2].names) == 1 for s in (q, k, v, out)):
            seq, kv_seq = q.dims[2].names[0], k.dims[2].names[0]
            if v.dims[2].names[0] == kv_seq and out.dims[2].names[0] == seq:

                def rename(spec: TensorSpec) -> TensorSpec:
                    return TensorSpec(tuple(Dim((seq,)) if d.names == (kv_seq,) else d for d in spec.dims),
                                      spec.ellipsis_at)

                alt = Annotation((q,) + tuple(rename(s) for s in ann.inputs[1:]), ann.outputs,
                                 frozenset(ann.frozen - {seq, kv_seq}))
                allowed = alt if attention_call(op).refusal is None else None
    _ALT[id(op)] = (op, alt, allowed)
    return alt, allowed


def sequence_split_name(op: Op) -> str | None:
    """The annotation name of an attention op's query sequence dim, or of a recurrent op's sequence, when it
    is frozen (splittable only with communication inside the op), else None."""
    alt, _ = _annotations(op)
    if alt is None:
        return None
    name = RECURRENT_SEQUENCE if is_recurrent(op) else alt.inputs[0].dims[2].names[0]
    return name if name in op.annotation.frozen else None


def extra_split_names(op: Op) -> list[str]:
    """Names the search may split besides ``annotation.splittable()``: the sequence of a causal
    attention op that can run sequence split, or of a recurrent op (none for a refused call, or
    inside ``not_offered``)."""
    if not _OFFERED[0]:
        return []
    name = sequence_split_name(op)
    return [name] if name is not None and _annotations(op)[1] is not None else []


@contextlib.contextmanager
def not_offered() -> Iterator[None]:
    """Inside this context the search is offered no sequence split (for a mesh whose layer problem
    the extra choices would make too entangled for exact search)."""
    _OFFERED[0] = False
    try:
        yield
    finally:
        _OFFERED[0] = True


def sequence_split_axis(op: Op, split: tuple[str | None, ...], mesh: Mesh) -> int | None:
    """The mesh axis (of size > 1) on which ``split`` splits an attention or recurrent op's sequence, else None."""
    name = sequence_split_name(op)
    if name is None or name not in split:
        return None
    axis = split.index(name)
    return axis if mesh.shape[axis] > 1 else None


def effective_annotation(graph: Graph, op: Op, split: tuple[str | None, ...], mesh: Mesh) -> Annotation:
    """The annotation ``resolve.op_placements`` places ``op`` with under ``split``.

    The op's own, unless ``split`` splits an attention or recurrent op's sequence on an axis of size
    P > 1: then the sequence-split annotation. Raises PlanError when that attention call cannot be
    sequence split (a mask, a window, ...) or its sequence does not cut into 2P equal chunks (the
    zigzag layout's need; a recurrent op's layout is checked with the plan's, ``zigzag_layout``).
    """
    axis = sequence_split_axis(op, split, mesh)
    if axis is None:
        return op.annotation
    alt, allowed = _annotations(op)
    if is_recurrent(op):
        return alt
    where = f"op {op.index} {op.name} @ {op.scope or '<root>'}"
    axis_name, size = mesh.axis_names[axis], mesh.shape[axis]
    if allowed is None:
        raise PlanError(f"{where}: {attention_call(op).refusal}; keep this attention's sequence whole on mesh "
                        f"axis '{axis_name}' (split its heads or batch instead)")
    q_id, k_id = op.input_ids()[0], op.input_ids()[1]
    length, kv_length = graph.tensors[q_id].shape[2], graph.tensors[k_id].shape[2]
    if length != kv_length:
        raise PlanError(f"{where}: {length} queries against {kv_length} keys; only self-attention (equal "
                        "lengths) can be sequence split")
    if length % (2 * size):
        raise PlanError(
            f"{where}: sequence length {length} does not cut into {2 * size} equal chunks, as the zigzag "
            f"layout of a sequence split over mesh axis '{axis_name}' ({size} ranks) needs: use a sequence "
            f"length that is a multiple of {2 * size} (pad the batch) or fewer ranks on that axis")
    return alt


# --------------------------------------------------------------------------------------------
# The zigzag layout pass
# --------------------------------------------------------------------------------------------


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[tuple[int, int], tuple[int, int]] = {}

    def find(self, x: tuple[int, int]) -> tuple[int, int]:
        self.parent.setdefault(x, x)
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: tuple[int, int], b: tuple[int, int]) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[ra] = rb


@dataclass
class ZigzagLayout:
    """Where the zigzag layout applies: mesh axes with their size, and the sequence-aligned tensor dims."""

    axes: dict[int, int] = field(default_factory=dict)  # mesh axis -> P
    members: set[tuple[int, int]] = field(default_factory=set)  # (tensor id, dim)
    attention_ops: dict[int, int] = field(default_factory=dict)  # op index -> mesh axis of its split
    # op index -> (mesh axis of its split, "zigzag" | "contiguous"): recurrent ops passing state
    recurrent_ops: dict[int, tuple[int, str]] = field(default_factory=dict)

    def is_zigzag(self, tid: int, dim: int | None, axis: int) -> bool:
        """Whether Shard(dim) of tensor ``tid`` on mesh axis ``axis`` is held in the zigzag layout."""
        return dim is not None and axis in self.axes and (tid, dim) in self.members


def plan_layout(graph: Graph, resolved: ResolvedPlan) -> ZigzagLayout:
    """``zigzag_layout`` of a resolved plan, checked against its placements; computed once per plan."""
    cached = _LAYOUTS.get(id(resolved))
    if cached is not None and cached[0] is resolved:
        return cached[1]
    layout = zigzag_layout(graph, resolved.plan.splits, resolved.plan.mesh,
                           {i: (resolved.op_inputs[i], resolved.op_outputs[i]) for i in resolved.op_inputs})
    _LAYOUTS.clear()  # one plan at a time is written: keep no stale plans alive
    _LAYOUTS[id(resolved)] = (resolved, layout)
    return layout


def zigzag_layout(graph: Graph, splits: dict[int, tuple[str | None, ...]], mesh: Mesh,
                  placements: dict[int, tuple[list[TensorPlacement], list[TensorPlacement]]] | None = None
                  ) -> ZigzagLayout:
    """The zigzag layout of a plan (``splits`` per op index, as ``Plan.splits``); empty without a sequence split.

    With ``placements`` (op index -> (input placements, output placements)), checks that every
    zigzag-split tensor dim cuts into 2P chunks and raises PlanError naming it otherwise.
    """
    layout = ZigzagLayout()
    uf = _UnionFind()
    roots = []
    recurrent: dict[int, tuple[int, tuple[int, int]]] = {}  # op index -> (axis, its first input's sequence dim)
    none = (None,) * len(mesh.shape)
    for op in graph.ops:
        if op.annotation is None:
            continue
        split = splits.get(op.index, none)
        axis = sequence_split_axis(op, split, mesh)
        ann = op.annotation
        if axis is not None and is_attention(op):
            ann = effective_annotation(graph, op, split, mesh)
            layout.axes[axis] = mesh.shape[axis]
            layout.attention_ops[op.index] = axis
            roots.append((op.input_ids()[0], 2))
        elif axis is not None and is_recurrent(op):
            ann = effective_annotation(graph, op, split, mesh)
            dim = next(d for d, names in enumerate(ann.inputs[0].dims) if RECURRENT_SEQUENCE in names.names)
            recurrent[op.index] = (axis, (op.input_ids()[0], dim))
        by_name: dict[str, list[tuple[int, int]]] = {}
        for tid, spec in zip(op.input_ids() + op.output_ids(), list(ann.inputs) + list(ann.outputs)):
            for d, dim in enumerate(spec.dims):
                if dim.names:
                    by_name.setdefault(dim.names[0], []).append((tid, d))
        for nodes in by_name.values():
            for other in nodes[1:]:
                uf.union(nodes[0], other)
    classes = {uf.find(r) for r in roots}
    layout.members = {node for node in list(uf.parent) if uf.find(node) in classes}
    for index, (axis, node) in recurrent.items():
        layout.recurrent_ops[index] = (axis, "zigzag" if layout.is_zigzag(node[0], node[1], axis) else "contiguous")
    if not layout.axes:
        return layout
    for op in graph.ops if placements else []:
        ins, outs = placements[op.index]
        for tid, placement in zip(op.input_ids() + op.output_ids(), list(ins) + list(outs)):
            for axis, p in enumerate(placement):
                if isinstance(p, Shard) and layout.is_zigzag(tid, p.dim, axis):
                    size, chunks = graph.tensors[tid].shape[p.dim], 2 * layout.axes[axis]
                    if size % chunks:
                        raise PlanError(
                            f"op {op.index} {op.name} @ {op.scope or '<root>'}: {graph.describe_tensor(tid)} is split "
                            f"along dim {p.dim} in the zigzag layout of mesh axis '{mesh.axis_names[axis]}', but "
                            f"its size {size} does not cut into {chunks} equal chunks; use a sequence length "
                            f"that is a multiple of {chunks}")
    return layout
