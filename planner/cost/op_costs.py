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
from .sequence_split_cost import exchange_buffer_bytes, sequence_split_cost
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
    fwd = nbytes / hw.copy_rate + launch
    return OpCost(0.0, nbytes, fwd, 2 * fwd if has_backward else 0.0, "memory")


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


def working_bytes(graph: Graph, op: Op, ins: list[TensorPlacement], outs: list[TensorPlacement], mesh: Mesh) -> int:
    """Transient bytes while ``op`` runs backward: gradients of its local activations, plus a loss chunk."""
    if not any(graph.tensors[t].requires_grad for t in op.output_ids()):
        return 0
    total = 0
    for tid, p in list(zip(op.input_ids(), ins)) + list(zip(op.output_ids(), outs)):
        t = graph.tensors[tid]
        if t.kind == ACTIVATION and t.dtype.is_floating_point:
            total += numel(local_shape(t.shape, p, mesh)) * dtype_bytes(t.dtype)
    total += int(exchange_buffer_bytes(graph, op, ins, mesh))  # K/V exchange of a sequence-split attention
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

