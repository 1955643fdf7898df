"""Costs of single ops, redistributions and parameter shards (the terms ``model.analyze`` adds up).

The model they implement is described in ``cost/model.py``'s docstring.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..graph.ir import ACTIVATION, INPUT, Graph, Op, Tensor, dtype_bytes, numel
from ..plan.collectives import COLLECTIVES_TABLE
from ..plan.gradient_buffers import grad_buffer_bytes
from ..plan.placements import Mesh, Shard, TensorPlacement, local_shape
from ..plan.redistribute import Step, redistribution_steps, step_bytes
from .hardware import HardwareProfile
from .sequence_split_cost import exchange_buffer_bytes, recurrent_split_cost, sequence_split_cost
from .topology import axis_collective_seconds, collective_seconds, replicas_cross_nodes


def local_bytes(tensor: Tensor, placement: TensorPlacement, mesh: Mesh) -> float:
    """Bytes of one rank's shard of ``tensor`` under ``placement``."""
    return float(numel(local_shape(tensor.shape, placement, mesh)) * dtype_bytes(tensor.dtype))


@dataclass(frozen=True)
class OpCost:
    """One op on its local shards: FLOPs, bytes moved, seconds forward and backward."""

    flops: float  # forward
    nbytes: float
    forward_s: float
    backward_s: float
    kind: str  # matmul | attention | memory | view
    backward_flops: float = 0.0


def op_cost(graph: Graph, op: Op, ins: list[TensorPlacement], outs: list[TensorPlacement], mesh: Mesh,
            hw: HardwareProfile) -> OpCost:
    """Time of ``op`` with its inputs and outputs in the given placements (the op's own, not the producers')."""
    in_ids, out_ids = op.input_ids(), op.output_ids()
    in_t = [graph.tensors[t] for t in in_ids]
    out_t = [graph.tensors[t] for t in out_ids]
    in_shapes = [local_shape(t.shape, p, mesh) for t, p in zip(in_t, ins)]
    out_shapes = [local_shape(t.shape, p, mesh) for t, p in zip(out_t, outs)]
    nbytes = float(sum(numel(s) * dtype_bytes(t.dtype) for s, t in zip(in_shapes + out_shapes, in_t + out_t)))
    has_backward = any(t.requires_grad for t in out_t)
    launch = hw.kernel_launch_us * 1e-6
    record = op.record
    same_dtype = bool(in_t and out_t) and in_t[0].dtype == out_t[0].dtype
    if record.cost == "view" or (record.cost == "cast" and same_dtype):
        return OpCost(0.0, 0.0, 0.0, 0.0, "view")
    recurrent = recurrent_split_cost(graph, op, ins, mesh, hw)  # a sequence split recurrent op: states passed inside
    if recurrent is not None:
        return OpCost(recurrent.flops, nbytes, recurrent.forward_s, recurrent.backward_s,
                      "matmul" if record.recurrence is not None else "memory", 2 * recurrent.flops * has_backward)
    if record.cost == "recurrent" and record.recurrence is not None:  # a chunked scan (RecurrenceDims.flops)
        flops = record.recurrence(op, in_shapes).flops()
        fwd = max(flops / hw.matmul_rate(in_t[0].dtype), nbytes / hw.copy_rate) + launch
        return OpCost(flops, nbytes, fwd, 2 * fwd if has_backward else 0.0, "matmul", 2 * flops * has_backward)
    if record.cost == "matmul" and len(in_shapes) >= 2 and in_shapes[0]:
        flops = 2.0 * numel(out_shapes[0]) * in_shapes[0][-1]
        fwd = max(flops / hw.matmul_rate(in_t[0].dtype), nbytes / hw.copy_rate) + launch
        return OpCost(flops, nbytes, fwd, 2 * fwd if has_backward else 0.0, "matmul", 2 * flops * has_backward)
    if record.cost == "attention" and len(in_shapes) >= 3 and len(in_shapes[0]) == 4:
        split = sequence_split_cost(graph, op, ins, mesh, hw)  # split along the sequence: K/V exchange inside
        if split is not None:  # its compute plus the part of the exchange compute does not hide
            return OpCost(split.flops, 0.0, split.forward_s, split.backward_s, "attention",
                          2 * split.flops if split.backward_s else 0.0)
        (b, hq, lq, e), (_, _, s, _), f = in_shapes[0], in_shapes[1], in_shapes[2][-1]
        flops = 2.0 * b * hq * lq * s * (e + f)
        if record.mask_density is not None:
            flops *= record.mask_density(op, lq, s)
        fwd = flops / hw.attention_rate(in_t[0].dtype) + launch
        return OpCost(flops, nbytes, fwd, 2 * fwd if has_backward else 0.0, "attention", 2 * flops * has_backward)
    if record.cost == "linear_cross_entropy" and len(in_shapes) >= 2 and len(in_shapes[1]) == 2:
        hidden, weight = in_shapes[0], in_shapes[1]
        tokens = numel(hidden) // max(hidden[-1], 1)
        flops = 2.0 * tokens * weight[0] * weight[1]
        if not has_backward:
            fwd = max(flops / hw.matmul_rate(in_t[0].dtype), nbytes / hw.copy_rate) + launch
            return OpCost(flops, nbytes, fwd, 0.0, "matmul")
        # The kernel's precompute path (its default when gradients are needed) takes both gradients
        # in the forward, three products; the backward only scales the saved gradients, one read
        # and one write of each.
        fwd = max(3 * flops / hw.matmul_rate(in_t[0].dtype), nbytes / hw.copy_rate) + launch
        grad_bytes = float(sum(numel(s) * dtype_bytes(t.dtype) for s, t in zip(in_shapes[:2], in_t[:2])))
        bwd = 2 * grad_bytes / hw.copy_rate + launch
        return OpCost(3 * flops, nbytes, fwd, bwd, "matmul", 0.0)
    if record.cost == "grouped_matmul" and len(in_shapes) >= 6 and in_shapes[3]:
        flops = grouped_matmul_flops(in_shapes, in_t[3].shape[0])
        fwd = max(flops / hw.matmul_rate(in_t[0].dtype), nbytes / hw.copy_rate) + 2 * launch
        # Its backward runs the forward again (kernels/moe/experts.py keeps only the inputs), then twice its work.
        return OpCost(flops, nbytes, fwd, 3 * fwd if has_backward else 0.0, "matmul", 3 * flops * has_backward)
    fwd = nbytes / hw.copy_rate + launch
    return OpCost(0.0, nbytes, fwd, 2 * fwd if has_backward else 0.0, "memory")


# Routing is assumed imbalanced by this factor on the busiest rank once experts split: a
# load-balancing loss keeps the mean even, not every step's maximum (docs/design.md, "Mixture of experts").
EXPERT_IMBALANCE = 1.25


def grouped_matmul_flops(in_shapes: list[tuple[int, ...]], experts: int) -> float:
    """Forward FLOPs of the routed experts on one rank: each of its (token, slot) pairs through one expert.

    ``in_shapes`` are the local shapes of (hidden [t, d], top-k ids [t, k], weights, expert ids
    [e_local], gate_up, down, ...): ``2 * t * k * e_local / e`` pairs times the weights of one
    expert, times ``EXPERT_IMBALANCE`` when the experts are split.
    """
    (tokens, _), slots, local = in_shapes[0], in_shapes[1][-1], in_shapes[3][0]
    weights_per_expert = (numel(in_shapes[4]) + numel(in_shapes[5])) / local
    imbalance = EXPERT_IMBALANCE if local < experts else 1.0
    return 2.0 * tokens * slots * (local / experts) * weights_per_expert * imbalance


def token_dispatch_cost(tokens: int, hidden: int, slots: int, itemsize: int, mesh: Mesh, axis: int,
                        hw: HardwareProfile) -> CollectiveCost:
    """The all-to-all dispatch and combine of ``kernels/moe/dispatch.py`` on mesh ``axis``, and their backward.

    ``tokens``: the rank's local tokens; each of its ``tokens * slots`` pairs sends a hidden row
    (``hidden * itemsize`` bytes) to its expert's rank and gets one back, (n - 1) / n of them to
    other ranks at even routing, times ``EXPERT_IMBALANCE`` for the busiest rank's share (the
    grouped product's assumption). Backward runs the same two exchanges (combine's pattern for
    dispatch and the other way round). The counts exchange (n integers a rank) is its latency.
    """
    n = mesh.shape[axis]
    if n <= 1:
        return CollectiveCost((), ())
    rows = float(tokens * slots * hidden * itemsize) * EXPERT_IMBALANCE
    nbytes = float(step_bytes(Step("token_all_to_all", axis), int(rows), n))
    seconds = axis_collective_seconds(hw, "token_all_to_all", nbytes, mesh, axis)
    counts = axis_collective_seconds(hw, "all_gather", 8.0 * (n - 1), mesh, axis)
    both = (("token_all_to_all", axis, nbytes, seconds + counts), ("token_all_to_all", axis, nbytes, seconds))
    return CollectiveCost(both, both)


def saved_inputs(graph: Graph, op: Op) -> list[int]:
    """Positions of the tensor inputs ``op`` keeps for its backward (see the module docstring)."""
    in_ids = op.input_ids()
    saved = op.record.saved
    if not any(graph.tensors[t].requires_grad for t in op.output_ids()) or saved == "nothing":
        return []
    kinds = [graph.tensors[t].kind for t in in_ids]
    keep = [i for i, k in enumerate(kinds) if k in (ACTIVATION, INPUT)]
    if saved == "other_operand":
        # x * y keeps x only when y needs a gradient, and the other way round.
        grads = [graph.tensors[t].requires_grad for t in in_ids]
        keep = [i for i in keep if any(g for j, g in enumerate(grads) if j != i)]
    elif saved == "non_differentiable":
        keep = [i for i in keep if not graph.tensors[in_ids[i]].requires_grad]
    return keep


def saves_output(op: Op) -> bool:
    """Whether ``op`` keeps its output for backward (attention: with a small log-sum-exp)."""
    return op.record.saved == "inputs_and_output"


def grads_written_in_place(graph: Graph, op: Op) -> bool:
    """Whether ``op`` may write its input gradients into its inputs' storage (its record's
    ``grads_in_place`` argument, passed True by codegen; the cost model then leaves those gradients
    out of its working set).

    Conservative: only when nothing else can see those inputs. Each input is a distinct
    floating-point activation of the output's shape and dtype, not a graph output, produced by a
    product (a matmul-class op: a fresh buffer, never a view, and no product keeps its output), and
    read by this op alone; so no other op saves it or reads it through a view, and its value is
    dead once this op's backward has read it.
    """
    if op.record.grads_in_place is None:
        return False
    in_ids, out_ids = op.input_ids(), op.output_ids()
    if not in_ids or len(set(in_ids)) != len(in_ids) or not out_ids:
        return False
    out = graph.tensors[out_ids[0]]
    if not out.requires_grad:
        return False
    readers = _reader_counts(graph)
    graph_outputs = set(graph.output_ids())
    for tid in in_ids:
        t = graph.tensors[tid]
        if (t.kind != ACTIVATION or not t.dtype.is_floating_point or t.shape != out.shape or t.dtype != out.dtype
                or tid in graph_outputs or t.producer is None or readers.get(tid, 0) != 1):
            return False
        if graph.ops[t.producer].record.cost != "matmul":
            return False
    return True


def _reader_counts(graph: Graph) -> dict[int, int]:
    """Tensor id -> number of reads by ops, cached on the graph (the search prices every op many times)."""
    cached = graph.__dict__.get("_reader_counts")
    if cached is None or cached[0] != len(graph.ops):
        counts: dict[int, int] = {}
        for each in graph.ops:
            for tid in each.input_ids():
                counts[tid] = counts.get(tid, 0) + 1
        cached = (len(graph.ops), counts)
        graph.__dict__["_reader_counts"] = cached
    return cached[1]


def working_bytes(graph: Graph, op: Op, ins: list[TensorPlacement], outs: list[TensorPlacement], mesh: Mesh) -> int:
    """Transient bytes while ``op`` runs backward: gradients of its local activations, plus a loss chunk.

    Gradients an op writes into its inputs' storage (``grads_written_in_place``) take no new bytes.
    """
    if not any(graph.tensors[t].requires_grad for t in op.output_ids()):
        return 0
    total = 0
    in_place = set(op.input_ids()) if grads_written_in_place(graph, op) else set()
    for tid, p in [(t, p) for t, p in zip(op.input_ids(), ins) if t not in in_place] + list(zip(op.output_ids(), outs)):
        t = graph.tensors[tid]
        if t.kind == ACTIVATION and t.dtype.is_floating_point:
            total += numel(local_shape(t.shape, p, mesh)) * dtype_bytes(t.dtype)
    total += int(exchange_buffer_bytes(graph, op, ins, mesh))  # K/V (attention) or state exchange of a sequence split
    if op.record.cost == "linear_cross_entropy":
        hidden = local_shape(graph.tensors[op.input_ids()[0]].shape, ins[0], mesh)
        vocab = local_shape(graph.tensors[op.input_ids()[1]].shape, ins[1], mesh)[0]
        from dimshard.kernels.chunk_linear_cross_entropy import precompute_tile_sizes

        chunk = op.arg(4, "chunk_size")
        itemsize = dtype_bytes(graph.tensors[op.input_ids()[0]].dtype)
        tokens = numel(hidden) // max(hidden[-1], 1)
        chunk_tokens, _ = precompute_tile_sizes(tokens, vocab, itemsize, chunk, None)
        # Precompute path: one chunk of logits in the hidden dtype, the hidden and weight gradients
        # taken in the forward and held until the backward, and the weight gradient's rounding
        # residual (low-precision weights).
        weight_numel = numel(local_shape(graph.tensors[op.input_ids()[1]].shape, ins[1], mesh))
        total += chunk_tokens * vocab * itemsize + numel(hidden) * itemsize
        total += weight_numel * itemsize * (1 if itemsize >= 4 else 2)
    return total


# --------------------------------------------------------------------------------------------
# Collectives and parameter state
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CollectiveCost:
    """The collectives of one redistribution: (kind, mesh axis, bytes per rank, seconds) forward and backward."""

    forward: tuple[tuple[str, int, float, float], ...]
    backward: tuple[tuple[str, int, float, float], ...]

    @property
    def forward_s(self) -> float:
        return sum(s for *_, s in self.forward)

    @property
    def backward_s(self) -> float:
        return sum(s for *_, s in self.backward)


def redistribution_cost(shape: tuple[int, ...], itemsize: int, src: TensorPlacement, dst: TensorPlacement,
                        mesh: Mesh, hw: HardwareProfile, backward: bool) -> CollectiveCost:
    """Collectives turning a tensor of full ``shape`` from ``src`` into ``dst``, and their backward.

    A step that does not communicate costs nothing, unless its entry ``writes_local`` (the zeros
    of ``replicate_to_partial``): then it is listed with 0 bytes sent and the seconds of writing
    its local result at the copy bandwidth plus a kernel launch.
    """
    local = float(numel(local_shape(shape, src, mesh)) * itemsize)
    fwd: list[tuple[str, int, float, float]] = []
    bwd: list[tuple[str, int, float, float]] = []

    def priced(kind: str, axis: int, local_before: float, local_after: float) -> tuple[str, int, float, float] | None:
        collective = COLLECTIVES_TABLE[kind]
        if collective.communicates:
            nbytes = float(step_bytes(Step(kind, axis), int(local_before), mesh.shape[axis]))
            return kind, axis, nbytes, axis_collective_seconds(hw, kind, nbytes, mesh, axis)
        if collective.writes_local:
            return kind, axis, 0.0, local_after / hw.copy_rate + hw.kernel_launch_us * 1e-6
        return None

    for step in redistribution_steps(src, dst):
        collective = COLLECTIVES_TABLE[step.kind]
        after = collective.local_after(local, mesh.shape[step.axis])
        if (entry := priced(step.kind, step.axis, local, after)) is not None:
            fwd.append(entry)
        back = collective.backward
        # The backward turns the gradient of the result (local size ``after``) into the input's.
        if backward and back is not None and (entry := priced(back, step.axis, after, local)) is not None:
            bwd.append(entry)
        local = after
    return CollectiveCost(tuple(fwd), tuple(bwd))


@dataclass(frozen=True)
class ParamState:
    """Bytes per GPU of one parameter shard's value, fp32 gradient buffer and Adam state; sync seconds."""

    parameters: float
    gradients: float
    optimizer: float
    sync_s: float
    optimizer_s: float


def param_state(numel_local: int, dtype: torch.dtype, holders: int, hw: HardwareProfile, dp_size: int = 1,
                zero: bool = True, crosses_nodes: bool = False, accumulation: int = 1) -> ParamState:
    """State of a local shard of ``numel_local`` elements held by ``holders`` unit ranks.

    Gradients are all-reduced over ``holders * dp_size`` ranks in fp32 (runtime/optimizer/grad_reducer.py);
    a shard with a single holder keeps them in its own dtype when a step has one micro-batch
    (``accumulation``; ``planner/plan/gradient_buffers.py``);
    with ZeRO-1 each copy keeps 1/dp_size of the optimizer state and all-gathers updated parameters.
    ``crosses_nodes`` (``topology.replicas_cross_nodes``): those ranks span nodes, priced at the
    inter-node rate.
    """
    itemsize = dtype_bytes(dtype)
    master = 0 if dtype == torch.float32 else 4
    opt = numel_local * (8 + master) / (dp_size if zero else 1)
    group = holders * dp_size
    grad_bytes = grad_buffer_bytes(numel_local, dtype, group, accumulation)
    sync = collective_seconds(hw, "all_reduce", 2 * grad_bytes * (group - 1) / group, group, crosses_nodes)
    if zero and dp_size > 1:
        sync += collective_seconds(hw, "all_gather", numel_local * itemsize * (dp_size - 1) / dp_size, dp_size,
                                   crosses_nodes)
    # AdamW reads and writes parameter, master and moments and reads the gradient: ~32 bytes per owned element.
    opt_s = numel_local / (dp_size if zero else 1) * 32 / hw.copy_rate
    return ParamState(numel_local * itemsize, grad_bytes, opt, sync, opt_s)


def stored_param_state(tensor: Tensor, placement: TensorPlacement, mesh: Mesh, hw: HardwareProfile, dp_size: int = 1,
                       zero: bool = True, accumulation: int = 1) -> ParamState:
    """``param_state`` of a parameter stored in ``placement``: its local shard, held by ``replica_count``
    unit ranks, which with their ``dp_size`` copies may span nodes (``topology.replicas_cross_nodes``)."""
    return param_state(numel(local_shape(tensor.shape, placement, mesh)), tensor.dtype, replica_count(placement, mesh),
                       hw, dp_size, zero, replicas_cross_nodes(placement, mesh, hw, dp_size), accumulation)


def replica_count(placement: TensorPlacement, mesh: Mesh) -> int:
    """Unit ranks holding the same shard: the product of the axes the tensor is not sharded on."""
    n = 1
    for axis, p in enumerate(placement):
        if not isinstance(p, Shard):
            n *= mesh.shape[axis]
    return n



# --------------------------------------------------------------------------------------------
# FP8 linear layers (docs/design.md, "FP8")
# --------------------------------------------------------------------------------------------

# Kernels of one quantisation in kernels/fp8/scaling.py (amax, scale, the cast): a cast takes at least their
# launches; a large one its bytes at the measured rate (whose measurement includes them).
FP8_CAST_KERNELS = 4
# The casts of each recipe's products (kernels/fp8/linear.py): (phase, operand, amax over, two layouts).
# The operand is x [m, k], w [n, k] or g [m, n] (the output gradient); "amax over" names the dims whose
# splits reduce that cast's amax (a rowwise scale covers one row or column; "" for a tensorwise backward
# cast that reuses the forward's scale); a cast writing both layouts from one read (the tensorwise
# gradient, for both of its products) writes its FP8 bytes twice. Each cast writes the layout its product
# takes, so no separate transposing copy runs.
_FP8_CASTS = {
    "tensorwise": (("forward", "x", "mk", False), ("forward", "w", "nk", False),
                   ("backward", "g", "mn", True), ("backward", "w", "", False), ("backward", "x", "", False)),
    "rowwise": (("forward", "x", "k", False), ("forward", "w", "k", False), ("backward", "g", "n", False),
                ("backward", "w", "n", False), ("backward", "g", "m", False), ("backward", "x", "m", False)),
    "rowwise_gw_hp": (("forward", "x", "k", False), ("forward", "w", "k", False), ("backward", "g", "n", False),
                      ("backward", "w", "n", False)),
}


def fp8_linear_cost(m: int, n: int, k: int, itemsize: int, recipe: str, split_sizes: dict[str, list[int]],
                    hw: HardwareProfile, has_backward: bool = True) -> OpCost | None:
    """A linear of local sizes m x k by k x n (``itemsize`` bytes per element) with its products in FP8.

    Products at the profile's FP8 rate for the recipe's scaling (the weight gradient of
    ``rowwise_gw_hp`` at the bf16 rate), each cast's high-precision bytes at ``fp8_cast_gbps`` (at
    least its kernels' launches; a second layout's FP8 bytes at the copy bandwidth), and one all-reduce (MAX) of the amaxes per mesh axis splitting a scale's elements: ``split_sizes``
    maps ``m``, ``n``, ``k`` to the sizes of the axes that split them. None when the profile has no
    measured FP8 rate for the recipe (``HardwareProfile.fp8_unavailable``).
    """
    scaling = "rowwise" if recipe.startswith("rowwise") else "tensorwise"
    if hw.fp8_unavailable(scaling):
        return None
    launch = hw.kernel_launch_us * 1e-6
    sizes = {"x": (m, k), "w": (n, k), "g": (m, n)}
    dims = {"x": "mk", "w": "nk", "g": "mn"}
    seconds = {"forward": 0.0, "backward": 0.0}
    for phase, operand, over, two_layouts in _FP8_CASTS[recipe]:
        if phase == "backward" and not has_backward:
            continue
        rows, cols = sizes[operand]
        seconds[phase] += max(rows * cols * itemsize / (hw.fp8_cast_gbps * 1e9), FP8_CAST_KERNELS * launch)
        if two_layouts:  # the second layout's FP8 bytes
            seconds[phase] += rows * cols / hw.copy_rate
        # amax values reduced: one per tensor, or one per row / column the scale runs along.
        kept = [d for d in dims[operand] if d not in over]
        amax_bytes = 4 * (dict(zip("mnk", (m, n, k)))[kept[0]] if len(over) == 1 else 1)
        for dim in over:
            for size in split_sizes.get(dim, []):
                seconds[phase] += hw.collective_seconds("all_reduce", 2 * amax_bytes * (size - 1) / size, size)
    rate = hw.fp8_matmul_tflops[scaling] * 1e12
    flops = 2.0 * m * n * k
    forward_s = flops / rate + launch + seconds["forward"]
    if not has_backward:
        return OpCost(flops, 0.0, forward_s, 0.0, "matmul")
    weight_gradient_rate = rate if recipe != "rowwise_gw_hp" else hw.matmul_rate(torch.bfloat16)
    backward_s = flops / rate + flops / weight_gradient_rate + 2 * launch + seconds["backward"]
    return OpCost(flops, 0.0, forward_s, backward_s, "matmul", 2 * flops)
