"""What a sequence-split attention costs: its compute per rank, its K/V exchange and how much of that overlaps.

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

import functools
import inspect
from dataclasses import dataclass

from ..graph.ir import Graph, Op, dtype_bytes
from ..plan.placements import Mesh, Shard, TensorPlacement, local_shape
from ..plan.sequence_split import is_attention
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
    """Bytes of K/V exchange buffers alive while a sequence-split attention runs backward (0 for any other op)."""
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
