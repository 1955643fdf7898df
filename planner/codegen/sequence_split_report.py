"""The plan report's sections on sequence-split ops: each attention's axis, K/V exchange and what compute hides;
each recurrent op's axis, layout and state (or halo) exchange."""

from __future__ import annotations

from ..cost.hardware import HardwareProfile
from ..cost.sequence_split_cost import METHODS, default_method, recurrent_split_cost, sequence_split_cost
from ..cost.topology import axis_crosses_nodes
from ..graph.ir import Graph, Op
from ..plan.placements import ResolvedPlan
from ..plan.sequence_split import is_attention, plan_layout


def report_lines(graph: Graph, resolved: ResolvedPlan, hw: HardwareProfile, ops: list[Op]) -> list[str]:
    """Markdown lines for ``plan_report.md``: each sequence-split attention among ``ops`` (one layer's),
    its axis and method, the K/V bytes it exchanges and how much of the exchange compute hides,
    priced for both methods; no lines when nothing is sequence split."""
    mesh = resolved.plan.mesh
    rows = []
    for op in ops:
        if not is_attention(op):
            continue
        ins = resolved.op_inputs[op.index]
        costs = {m: sequence_split_cost(graph, op, ins, mesh, hw, m) for m in METHODS}
        if costs["ring"] is None:
            continue
        chosen = default_method()
        for method, c in costs.items():
            where = f"{mesh.axis_names[c.axis]} ({c.ranks})" + (", crosses nodes" if axis_crosses_nodes(mesh, c.axis, hw)
                                                                  else "")
            rows.append(f"| {op.index} | {where} | {method}{' (runs)' if method == chosen else ''} | "
                        f"{c.kv_bytes / 1e6:,.2f} MB | {(c.compute_forward_s + c.compute_backward_s) * 1e3:,.2f} ms | "
                        f"{(c.comm_forward_s + c.comm_backward_s) * 1e3:,.2f} ms | "
                        f"{(c.exposed_forward_s + c.exposed_backward_s) * 1e3:,.2f} ms | "
                        f"{c.working_bytes / 1e6:,.1f} MB |")
    recurrent = recurrent_lines(graph, resolved, hw, ops)
    if not rows:
        return recurrent
    return recurrent + ["## Sequence-split attention", "",
            "Attention split along the sequence (zigzag layout: rank i holds chunks i and 2P-1-i of 2P); "
            "its K/V exchange runs inside the op (kernels/context_parallel.py), priced per method. Compute "
            "and exchange are forward plus backward; exposed is the part of the exchange compute does not hide.",
            "", "| op | axis | method | K/V shard | compute | exchange | exposed | buffers |",
            "|---|---|---|---|---|---|---|---|", *rows, ""]


def recurrent_lines(graph: Graph, resolved: ResolvedPlan, hw: HardwareProfile, ops: list[Op]) -> list[str]:
    """Markdown lines for ``plan_report.md``: each recurrent op among ``ops`` whose sequence the plan splits,
    the split form it calls, its axis and layout, the state (or halo) bytes it exchanges and their
    time; no lines when none is split."""
    mesh = resolved.plan.mesh
    layout = plan_layout(graph, resolved)
    rows = []
    for op in ops:
        if op.index not in layout.recurrent_ops:
            continue
        axis, order = layout.recurrent_ops[op.index]
        c = recurrent_split_cost(graph, op, resolved.op_inputs[op.index], mesh, hw, 2 if order == "zigzag" else 1)
        if c is None:
            continue
        where = f"{mesh.axis_names[axis]} ({c.ranks})" + (", crosses nodes" if axis_crosses_nodes(mesh, axis, hw) else "")
        rows.append(f"| {op.index} | {op.record.sequence_split.rsplit('.', 1)[-1]} | {where} | {order} | "
                    f"{c.exchanged_bytes / 1e3:,.1f} kB | {(c.compute_forward_s + c.compute_backward_s) * 1e3:,.3f} ms | "
                    f"{(c.comm_forward_s + c.comm_backward_s) * 1e3:,.3f} ms | {c.working_bytes / 1e6:,.2f} MB |")
    if not rows:
        return []
    return ["## Sequence-split recurrent layers", "",
            "Recurrent ops split along the sequence in the layout of the plan's softmax attention (zigzag, else "
            "contiguous); each passes its state inside the op (kernels/recurrent/sequence_split.py): one all-gather "
            "of every rank's state and transition per chunk (a convolution: its chunks' last k - 1 tokens), "
            "independent of the sequence length, and an all-reduce of their gradients. Compute and exchange are "
            "forward plus backward; nothing hides the exchange.",
            "", "| op | runs | axis | layout | exchanged | compute | exchange | buffers |",
            "|---|---|---|---|---|---|---|---|", *rows, ""]
