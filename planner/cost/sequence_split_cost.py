"""What a sequence-split op costs: attention's compute per rank, its K/V exchange and how much of that
overlaps; a recurrent op's state passing (``recurrent_split_cost``, at the end).

Under the zigzag layout every rank of a P-way split does 1/P of the causal attention's work:
``2*b*h*(L/P)*L*(e+f)/2`` FLOPs forward at the attention rate, twice that backward, in P blocks.
The K/V exchange, by method (``default_method`` says which one the op runs):

- ``ring``: P-1 steps, each passing this rank's K and V shard (``kv`` bytes) to the next rank while
  the previous block computes; a step exposes only what its transfer takes beyond one block's
  compute. Backward passes K, V and the fp32 dK, dV accumulators (3 ``kv``) the same way, plus one
  last hop that returns dK, dV to their owner. Peer-to-peer steps run at the 2-GPU bus bandwidth.
- ``allgather``: all-gather K and V before the blocks (nothing to overlap with), again in backward
  (the gathered copy is not kept), and reduce-scatter dK, dV; the collective's own bandwidth.

Both are priced on the axis's links: at the inter-node rate where the axis crosses nodes
(``cost/topology.py``). Memory: the op keeps its local inputs and output like any attention;
while it runs, the exchange buffers (two K/V shards and their gradients for the ring, the whole
sequence's K/V and gradients for the all-gather) add to the working set.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from dataclasses import dataclass

import torch

from ..graph.ir import Graph, Op, dtype_bytes, numel
from ..plan.placements import Mesh, Shard, TensorPlacement, local_shape
from ..plan.sequence_split import RECURRENT_SEQUENCE, is_attention, is_recurrent
from .hardware import HardwareProfile
from .topology import axis_collective_seconds, axis_crosses_nodes, collective_seconds

METHODS = ("ring", "allgather")


@functools.cache
def default_method() -> str:
    """The K/V exchange ``sequence_split_attention`` runs when generated code does not name one.

    Read from its signature (``method=...``), so the cost model prices what actually runs; the
    first version of the op takes no ``method`` and all-gathers K/V.
    """
    try:
        from dimshard.kernels.context_parallel import sequence_split_attention
    except ImportError:
        return "allgather"
    parameter = inspect.signature(sequence_split_attention).parameters.get("method")
    if parameter is None or parameter.default is inspect.Parameter.empty:
        return "allgather"
    return str(parameter.default)


@dataclass(frozen=True)
class SequenceSplitCost:
    """One sequence-split attention call on its local shards: seconds, bytes and the exposed part."""

    method: str
    axis: int
    ranks: int
    flops: float  # forward, this rank
    compute_forward_s: float
    compute_backward_s: float
    kv_bytes: float  # this rank's K and V shard
    comm_forward_s: float  # all transfers of the forward
    comm_backward_s: float
    exposed_forward_s: float  # the part of the transfers compute does not hide
    exposed_backward_s: float
    working_bytes: float  # exchange buffers alive while it runs

    @property
    def forward_s(self) -> float:
        return self.compute_forward_s + self.exposed_forward_s

    @property
    def backward_s(self) -> float:
        return self.compute_backward_s + self.exposed_backward_s


def _split_axis(ins: list[TensorPlacement]) -> int | None:
    """The axis on which query and key are both split along their sequence dim (2), else None."""
    if len(ins) < 3:
        return None
    for axis, (q, k) in enumerate(zip(ins[0], ins[1])):
        if isinstance(q, Shard) and q.dim == 2 and isinstance(k, Shard) and k.dim == 2:
            return axis
    return None


def _kv_bytes(graph: Graph, op: Op, ins: list[TensorPlacement], mesh: Mesh) -> float:
    k_t, v_t = (graph.tensors[t] for t in op.input_ids()[1:3])
    b, hk, lk, e = local_shape(k_t.shape, ins[1], mesh)
    f = local_shape(v_t.shape, ins[2], mesh)[-1]
    return float(b * hk * lk * (e + f) * dtype_bytes(k_t.dtype))


def exchange_buffer_bytes(graph: Graph, op: Op, ins: list[TensorPlacement], mesh: Mesh,
                          method: str | None = None) -> float:
    """Bytes of exchange buffers alive while a sequence-split attention (K/V) or recurrent op (states, halos)
    runs backward (0 for any other op)."""
    if _recurrent_split_axis(op, ins, mesh) is not None:
        return recurrent_working_bytes(graph, op, ins, mesh)
    if not is_attention(op):
        return 0.0
    axis = _split_axis(ins)
    if axis is None or mesh.shape[axis] == 1:
        return 0.0
    kv = _kv_bytes(graph, op, ins, mesh)
    has_backward = any(graph.tensors[t].requires_grad for t in op.output_ids())
    if (method or default_method()) == "ring":
        return 2 * kv + (4 * kv if has_backward else 0.0)  # two K/V shards in flight, and their fp32 gradients
    return mesh.shape[axis] * kv * (3 if has_backward else 1)  # the whole K/V, and its fp32 gradient


def sequence_split_cost(graph: Graph, op: Op, ins: list[TensorPlacement], mesh: Mesh, hw: HardwareProfile,
                        method: str | None = None) -> SequenceSplitCost | None:
    """The cost of ``op`` when its placements split an attention's sequence on a mesh axis, else None.

    ``method`` (ring | allgather) defaults to what the op runs (``default_method``).
    """
    if not is_attention(op):
        return None
    axis = _split_axis(ins)
    if axis is None or mesh.shape[axis] == 1:
        return None
    method = method or default_method()
    size = mesh.shape[axis]
    q_t, k_t, v_t = (graph.tensors[t] for t in op.input_ids()[:3])
    b, hq, lq, e = local_shape(q_t.shape, ins[0], mesh)
    _, hk, lk, _ = local_shape(k_t.shape, ins[1], mesh)
    f = local_shape(v_t.shape, ins[2], mesh)[-1]
    full = lk * size
    record = getattr(op, "record", None)
    density = record.mask_density(op, full, full) if getattr(record, "mask_density", None) else 0.5
    flops = 2.0 * b * hq * lq * full * (e + f) * density  # causal: balanced over ranks by the zigzag layout
    launch = hw.kernel_launch_us * 1e-6
    compute_f = flops / hw.attention_rate(q_t.dtype) + size * launch
    has_backward = any(graph.tensors[t].requires_grad for t in op.output_ids())
    compute_b = 2 * compute_f if has_backward else 0.0
    kv = _kv_bytes(graph, op, ins, mesh)
    crosses = axis_crosses_nodes(mesh, axis, hw)
    if method == "ring":
        hop = collective_seconds(hw, "all_gather", kv, 2, crosses)
        hop_back = collective_seconds(hw, "all_gather", 3 * kv, 2, crosses)
        block_f = compute_f / size
        comm_f = (size - 1) * hop
        exposed_f = (size - 1) * max(0.0, hop - block_f)
        comm_b = exposed_b = 0.0
        if has_backward:
            last = collective_seconds(hw, "all_gather", 2 * kv, 2, crosses)
            comm_b = (size - 1) * hop_back + last
            exposed_b = (size - 1) * max(0.0, hop_back - 2 * block_f) + last
    elif method == "allgather":
        gather = axis_collective_seconds(hw, "all_gather", kv * (size - 1), mesh, axis)
        comm_f = exposed_f = gather
        comm_b = exposed_b = 0.0
        if has_backward:
            scatter = axis_collective_seconds(hw, "reduce_scatter", 2 * kv * (size - 1), mesh, axis)
            comm_b = exposed_b = gather + scatter
    else:
        raise ValueError(f"unknown sequence-split method {method!r}; choose one of {METHODS}")
    return SequenceSplitCost(method, axis, size, flops, compute_f, compute_b, kv, comm_f, comm_b, exposed_f,
                             exposed_b, exchange_buffer_bytes(graph, op, ins, mesh, method))


# --------------------------------------------------------------------------------------------
# Recurrent ops split along the sequence (kernels/recurrent/sequence_split.py)
# --------------------------------------------------------------------------------------------

STATE_BYTES = 4  # the passed states and transitions are fp32


@dataclass(frozen=True)
class RecurrentSplitCost:
    """One recurrent op (or short convolution) with its sequence split, on its local shards.

    Nothing overlaps the exchange: the incoming states (or halos) are needed before the outputs.
    """

    axis: int
    ranks: int
    chunks_per_rank: int  # 2 in the zigzag layout, 1 contiguous
    flops: float  # forward, this rank: the widened local run, the fold and the output correction
    compute_forward_s: float
    compute_backward_s: float
    exchanged_bytes: float  # this rank's pieces: [M | S_own] per chunk, or the convolution's chunk tails
    comm_forward_s: float  # the all-gather of every rank's pieces
    comm_backward_s: float  # the all-reduce of every rank's piece gradients
    working_bytes: float  # every rank's pieces (and their gradients) while it runs

    @property
    def forward_s(self) -> float:
        return self.compute_forward_s + self.comm_forward_s

    @property
    def backward_s(self) -> float:
        return self.compute_backward_s + self.comm_backward_s


def _recurrent_split_axis(op: Op, ins: list[TensorPlacement], mesh: Mesh) -> int | None:
    """The axis (of size > 1) on which a recurrent op's first input is split along its sequence ``l``, else None."""
    if not is_recurrent(op) or op.annotation is None or not ins:
        return None
    dims = op.annotation.inputs[0].dims
    seq = next((d for d, dim in enumerate(dims) if RECURRENT_SEQUENCE in dim.names), None)
    for axis, p in enumerate(ins[0]):
        if isinstance(p, Shard) and p.dim == seq and mesh.shape[axis] > 1:
            return axis
    return None


def _piece_bytes(op: Op, shapes: list[tuple[int, ...]], in_t: list, count: int) -> float:
    """Bytes of one rank's exchanged pieces: ``[M | S_own]`` per chunk in fp32, or a convolution's chunk tails."""
    if op.record.recurrence is not None:
        local = op.record.recurrence(op, shapes)
        return float(count * local.sequences * local.key_dim * (local.key_dim + local.value_dim) * STATE_BYTES)
    x, weight = shapes[0], shapes[1]
    halo = min(weight[-1] - 1, max(1, x[-1] // count))
    return float(count * numel(x[:-1]) * halo * dtype_bytes(in_t[0].dtype))


def recurrent_working_bytes(graph: Graph, op: Op, ins: list[TensorPlacement], mesh: Mesh,
                            chunks_per_rank: int = 2) -> float:
    """Bytes every rank's gathered pieces (and, with a backward, their gradients) take while a recurrent op
    split along the sequence runs; 0 when its sequence is not split."""
    axis = _recurrent_split_axis(op, ins, mesh)
    if axis is None:
        return 0.0
    in_t = [graph.tensors[t] for t in op.input_ids()]
    shapes = [local_shape(t.shape, p, mesh) for t, p in zip(in_t, ins)]
    has_backward = any(graph.tensors[t].requires_grad for t in op.output_ids())
    return mesh.shape[axis] * _piece_bytes(op, shapes, in_t, chunks_per_rank) * (2 if has_backward else 1)


def recurrent_split_cost(graph: Graph, op: Op, ins: list[TensorPlacement], mesh: Mesh, hw: HardwareProfile,
                         chunks_per_rank: int = 2) -> RecurrentSplitCost | None:
    """The cost of a recurrent op whose placements split its sequence over a mesh axis of P ranks, else None.

    A scan (the record's ``recurrence``: ``sequences`` recurrences of state dk x dv on this rank) runs its
    ``n = chunks_per_rank`` chunks in one local call with the values widened by dk channels (so it
    also yields the chunk's transition M), in fp32: ``RecurrenceDims.flops(dv + dk)``; then every rank
    folds all ``n P`` chunks' ``[M | S_own]`` in order (``2 dk^2 dv`` each per recurrence) and adds
    ``Q S_in`` to its outputs (``2 dk dv`` per local token). It exchanges ``n`` pieces of
    ``dk (dk + dv)`` fp32 values per recurrence, independent of the sequence length: one all-gather
    forward, one all-reduce of every rank's piece gradients backward. A short convolution (no
    ``recurrence``) is priced as its memory traffic and exchanges each chunk's last ``k - 1`` tokens
    the same way. ``chunks_per_rank``: 2 in the zigzag layout (the default, where softmax attention
    shares the axis), 1 contiguous. Compute backward is twice forward, plus the fold recomputed.
    """
    axis = _recurrent_split_axis(op, ins, mesh)
    if axis is None:
        return None
    size, count = mesh.shape[axis], chunks_per_rank
    in_t = [graph.tensors[t] for t in op.input_ids()]
    shapes = [local_shape(t.shape, p, mesh) for t, p in zip(in_t, ins)]
    has_backward = any(graph.tensors[t].requires_grad for t in op.output_ids())
    launch = hw.kernel_launch_us * 1e-6
    record = op.record
    piece = _piece_bytes(op, shapes, in_t, count)
    if record.recurrence is not None:
        local = record.recurrence(op, shapes)
        chunks = dataclasses.replace(local, sequences=local.sequences * count, tokens=max(1, local.tokens // count))
        dk, dv = local.key_dim, local.value_dim
        fold = 2.0 * count * size * local.sequences * dk * dk * dv
        flops = chunks.flops(dv + dk) + fold + 2.0 * local.sequences * local.tokens * dk * dv
        compute_f = flops / hw.matmul_rate(torch.float32) + 3 * launch
        compute_b = (2 * compute_f + fold / hw.matmul_rate(torch.float32)) if has_backward else 0.0
    else:  # the short convolution: memory bound, halos of k - 1 tokens
        x, weight = shapes[0], shapes[1]
        nbytes = float(sum(numel(s) * dtype_bytes(t.dtype) for s, t in zip(shapes, in_t)) +
                       numel(x) * dtype_bytes(in_t[0].dtype))
        flops = 2.0 * numel(x) * weight[-1]
        compute_f = nbytes / hw.copy_rate + 2 * launch
        compute_b = 2 * compute_f if has_backward else 0.0
    gather = axis_collective_seconds(hw, "all_gather", piece * (size - 1), mesh, axis)
    reduce = axis_collective_seconds(hw, "all_reduce", 2 * piece * (size - 1), mesh, axis) if has_backward else 0.0
    working = recurrent_working_bytes(graph, op, ins, mesh, count)
    return RecurrentSplitCost(axis, size, count, flops, compute_f, compute_b, piece, gather, reduce, working)
