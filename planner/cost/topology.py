"""Where nodes end: which mesh axes cross node boundaries, and what a collective on them costs.

Global rank ``g`` runs unit rank ``g % plan_ngpus`` of copy ``g // plan_ngpus`` (docs/contract.md),
and a node holds ``hw.gpus_per_node`` consecutive global ranks. A mesh axis crosses nodes when one
of its groups (``Mesh.groups``) holds ranks of two nodes; every collective on such an axis runs
at the inter-node rate. The model: NCCL's rings over one NIC per GPU are bounded by that NIC, so
the bus bandwidth is the profile's intra-node figure capped at ``hw.internode_gbps`` (Gb/s per
GPU, default 400 Gb/s InfiniBand, i.e. 50 GB/s), and the latency is the intra-node one plus
``hw.internode_alpha_us``.
"""

from __future__ import annotations

import functools

from ..plan.placements import Mesh, Shard, TensorPlacement
from .hardware import HardwareProfile

DEFAULT_GPUS_PER_NODE = 8
DEFAULT_INTERNODE_GBPS = 400.0  # gigabits per second per GPU (one 400G InfiniBand NIC per GPU)
DEFAULT_INTERNODE_ALPHA_US = 10.0


def gpus_per_node(hw: HardwareProfile) -> int:
    """GPUs per node of the profile (8 unless the profile says otherwise)."""
    return int(getattr(hw, "gpus_per_node", None) or DEFAULT_GPUS_PER_NODE)


def internode_bytes_per_s(hw: HardwareProfile) -> float:
    """Inter-node bandwidth per GPU in bytes/s (the profile's ``internode_gbps`` is in gigabits/s)."""
    return float(getattr(hw, "internode_gbps", None) or DEFAULT_INTERNODE_GBPS) * 1e9 / 8


def _internode_alpha_s(hw: HardwareProfile) -> float:
    value = getattr(hw, "internode_alpha_us", None)
    return float(DEFAULT_INTERNODE_ALPHA_US if value is None else value) * 1e-6


@functools.lru_cache(maxsize=1024)
def _axis_crosses(shape: tuple[int, ...], axis: int, per_node: int) -> bool:
    mesh = Mesh(tuple(f"a{i}" for i in range(len(shape))), shape)
    return any(len({r // per_node for r in group}) > 1 for group in mesh.groups(axis))


def axis_crosses_nodes(mesh: Mesh, axis: int, hw: HardwareProfile) -> bool:
    """Whether a group of mesh axis ``axis`` spans two nodes (unit ranks of copy 0, consecutive per node)."""
    return _axis_crosses(tuple(mesh.shape), axis, gpus_per_node(hw))


def crossing_axes(mesh: Mesh, hw: HardwareProfile) -> list[int]:
    """The mesh axes whose groups span nodes."""
    return [a for a in range(len(mesh.shape)) if axis_crosses_nodes(mesh, a, hw)]


def node_manifest(mesh: Mesh, hw: HardwareProfile) -> dict:
    """plan.json's ``nodes``: the node size the plan was costed for and the mesh axes it lets cross nodes.

    The runtime (``runtime/node_layout.py``) checks a launch against it: every other axis of size
    above 1 must keep each of its groups on one node.
    """
    return {"hw_profile": hw.name, "gpus_per_node": gpus_per_node(hw),
            "axes_across_nodes": [mesh.axis_names[a] for a in crossing_axes(mesh, hw)]}


def collective_seconds(hw: HardwareProfile, kind: str, nbytes: float, group_size: int,
                       crosses_nodes: bool) -> float:
    """``alpha + nbytes / busbw`` for one collective, at the inter-node rate when its group spans nodes."""
    seconds = hw.collective_seconds(kind, nbytes, group_size)
    if not crosses_nodes or seconds <= 0.0:
        return seconds
    per_gpu = internode_bytes_per_s(hw)
    # The slower of the intra-node figure and the NIC: both are bus bandwidths of the same bytes.
    intra = seconds
    inter = hw.collective_seconds(kind, 0.0, group_size) + _internode_alpha_s(hw) + nbytes / per_gpu
    return max(intra, inter)


def axis_collective_seconds(hw: HardwareProfile, kind: str, nbytes: float, mesh: Mesh, axis: int) -> float:
    """Seconds of one collective on mesh axis ``axis``, priced at the inter-node rate where the axis crosses nodes."""
    return collective_seconds(hw, kind, nbytes, mesh.shape[axis], axis_crosses_nodes(mesh, axis, hw))


def replicas_cross_nodes(placement: TensorPlacement, mesh: Mesh, hw: HardwareProfile, dp_size: int = 1) -> bool:
    """Whether the ranks holding one shard of a tensor with ``placement`` (all copies) span nodes.

    Those ranks reduce the shard's gradient together: they differ on the axes the tensor is not
    sharded on, and across data-parallel copies (``plan_ngpus`` consecutive ranks per copy).
    """
    per_node = gpus_per_node(hw)
    if any(not isinstance(p, Shard) and mesh.shape[a] > 1 and axis_crosses_nodes(mesh, a, hw)
           for a, p in enumerate(placement)):
        return True
    return dp_size > 1 and mesh.size * dp_size > per_node


def node_ordered_meshes(shapes: list[tuple[int, ...]], hw: HardwareProfile) -> list[tuple[int, ...]]:
    """``shapes`` plus, for meshes larger than a node, each 2-D shape with its axes swapped.

    Within a node the axis order of a mesh is immaterial; across nodes it decides which axis stays
    on NVLink (the last axis varies fastest over consecutive ranks), so both orders are searched.
    """
    out = list(dict.fromkeys(tuple(s) for s in shapes))
    for shape in list(out):
        size = 1
        for s in shape:
            size *= s
        if len(shape) == 2 and shape[0] != shape[1] and size > gpus_per_node(hw) and shape[::-1] not in out:
            out.append(shape[::-1])
    return out
