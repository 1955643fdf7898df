"""Generated code for sequence-split ops: attention's and recurrent ops' calls, and the zigzag reorders.

On a mesh axis where attention is sequence split, sequence-aligned tensors are held in the
zigzag layout (``plan/sequence_split.py``: which tensors, and why). Codegen replaces the attention
call by ``kernels.context_parallel.sequence_split_attention`` with the axis's process group
(``attention_code``), and wraps the collectives that touch a zigzag dim (``zigzag_step``):

| step on a zigzag dim | generated code |
|---|---|
| Replicate -> Shard (local slice) | ``zigzag_slice(x, dim, P, rank)`` |
| Shard -> Replicate (all-gather) | ``from_zigzag(all_gather(x), dim, P)``: natural order again |
| Partial -> Shard (reduce-scatter) | ``reduce_scatter(to_zigzag(x, dim, P))`` |
| Shard(i) -> Shard(j) (all-to-all) | ``to_zigzag`` on j before, ``from_zigzag`` on i after |

A recurrent op split along the sequence calls its record's split form (``OpRecord.sequence_split``,
e.g. ``kernels.recurrent.sequence_split.split_gated_delta_rule``) with the op's own arguments, the
axis's process group and the layout its sequence is held in (``recurrent_code``).
"""

from __future__ import annotations

from ..graph.ir import Op
from ..plan.sequence_split import ZigzagLayout, attention_call

CP_MODULE = "dimshard.kernels.context_parallel"
REORDER_MODULE = "dimshard.kernels._cp_reorder"


def zigzag_step(layout: ZigzagLayout, tid: int, kind: str, axis: int, dim: int | None, dim2: int | None,
                value: str, group: str, rank: int) -> tuple[str, list[str]] | None:
    """Generated code for one collective of tensor ``tid`` on a zigzag dim, and the reorder helpers it
    uses; None when the step does not touch a zigzag dim (codegen writes the plain collective).

    ``value`` is the expression of the input, ``group`` of the axis's process group, ``rank`` this
    unit rank's coordinate on ``axis``.
    """
    if axis not in layout.axes:
        return None
    size = layout.axes[axis]

    def zz(d: int | None) -> bool:
        return layout.is_zigzag(tid, d, axis)

    if kind == "local_slice" and zz(dim):
        return f"zigzag_slice({value}, {dim}, {size}, {rank})", ["zigzag_slice"]
    if kind == "all_gather" and zz(dim):
        return f"from_zigzag(comm.all_gather({value}, {dim}, {group}), {dim}, {size})", ["from_zigzag"]
    if kind == "reduce_scatter" and zz(dim):
        return f"comm.reduce_scatter(to_zigzag({value}, {dim}, {size}), {dim}, {group})", ["to_zigzag"]
    if kind == "all_to_all" and (zz(dim) or zz(dim2)):
        helpers = []
        inner = value
        if zz(dim2):
            inner, helpers = f"to_zigzag({value}, {dim2}, {size})", ["to_zigzag"]
        code = f"comm.all_to_all({inner}, {dim}, {dim2}, {group})"
        if zz(dim):
            code, helpers = f"from_zigzag({code}, {dim}, {size})", helpers + ["from_zigzag"]
        return code, helpers
    return None


def reorder_import(helpers: list[str]) -> str:
    """The import line of the reorder helpers generated code uses."""
    return f"from {REORDER_MODULE} import {', '.join(sorted(set(helpers)))}"


def attention_code(op: Op, axis: int, args: list[str], group: str) -> tuple[str, str]:
    """(import line, call) of the sequence-split attention that replaces ``op`` in generated code.

    ``args`` are the expressions of the op's query, key and value (its first three tensor inputs).
    """
    call = attention_call(op)
    scale = "" if call.scale is None else f", scale={call.scale!r}"
    return (f"from {CP_MODULE} import sequence_split_attention",
            f"sequence_split_attention({args[0]}, {args[1]}, {args[2]}{scale}, group={group})")


def recurrent_code(op: Op, args: list[str], kwargs: dict[str, str], group: str, layout: str) -> tuple[str, str, str]:
    """(name, import line, call) of the sequence-split form that replaces recurrent ``op`` in generated code.

    ``args`` and ``kwargs`` are the expressions of the op's own arguments; the call adds the process
    group ``group`` and ``layout`` ("zigzag" or "contiguous", how each rank holds its sequence).
    """
    module, name = op.record.sequence_split.rsplit(".", 1)
    keywords = "".join(f", {k}={v}" for k, v in kwargs.items())
    return (name, f"from {module} import {name}",
            f"{name}({', '.join(args)}{keywords}, group={group}, layout={layout!r})")
