"""The launch's nodes against the plan's: a mesh axis the plan keeps inside a node must stay inside one.

torchrun starts one agent per node and gives each of its processes the node's rank
(``GROUP_RANK``) and the node's process count (``LOCAL_WORLD_SIZE``); global ranks are numbered
node after node. plan.json's ``nodes`` entry (docs/contract.md) records the node size the plan was
costed for (the hardware profile's ``gpus_per_node``) and the mesh axes it lets cross nodes. A
launch over several nodes must run the same number of processes on every node, read one compile
output everywhere, and keep each group of every other mesh axis on one node: a group split over
nodes would run its collectives over the network the plan priced as NVLink. A launch on one node
(every torchrun launch without ``--nnodes``) is not checked.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

__all__ = ["NodeLayoutError", "RankPlace", "check_node_layout", "layout_error", "spans_nodes"]

SEVERAL_NODES_DOCS = 'examples/llama3_128k/README.md, "Several nodes"'


class NodeLayoutError(ValueError):
    """The launch's nodes do not fit the plan; the message says which flag or profile to change."""


@dataclass(frozen=True)
class RankPlace:
    """Where one rank runs: its node (torchrun's node rank, else the host name), host and node size."""

    node: str
    host: str
    local_world_size: int
    plan_fingerprint: str | None


def _this_rank(plan: Mapping[str, Any]) -> RankPlace:
    host = socket.gethostname()
    # Two launches on one machine (a CPU test's two "nodes") share the host name but not GROUP_RANK.
    node = os.environ.get("GROUP_RANK")
    return RankPlace(f"node {node}" if node is not None else f"host {host}", host,
                     int(os.environ["LOCAL_WORLD_SIZE"]), plan.get("fingerprint"))


def spans_nodes(world_size: int) -> bool:
    """Whether torchrun launched this job over several nodes (its processes per node < the world size)."""
    local = os.environ.get("LOCAL_WORLD_SIZE")
    return local is not None and int(local) < world_size


def check_node_layout(plan: Mapping[str, Any], rank: int, world_size: int) -> int:
    """Collective on the default group when the launch spans nodes: check it against ``plan``; return the node count.

    Every rank gathers every rank's place and raises the same NodeLayoutError when they do not fit
    (``layout_error``). A job on one node returns 1 without any collective. When the launch's node
    size differs from the one the plan was costed for but no axis is split, rank 0 prints a note.
    """
    if not spans_nodes(world_size):
        return 1
    places: list[Any] = [None] * world_size
    dist.all_gather_object(places, _this_rank(plan))
    error = layout_error(plan, places)
    if error:
        raise NodeLayoutError(error)
    nodes = len({p.node for p in places})
    planned = (plan.get("nodes") or {}).get("gpus_per_node")
    if rank == 0 and planned and planned != places[0].local_world_size:
        launched = places[0].local_world_size
        print(f"[dimshard] note: this launch runs {launched} process{'es' if launched != 1 else ''} on each of "
              f"{nodes} nodes, but the plan was costed for {_gpus(planned)} per node (hardware profile "
              f"{plan['nodes'].get('hw_profile')}): its estimate prices the links between nodes for another layout",
              file=sys.stderr, flush=True)
    return nodes


def _gpus(count: int) -> str:
    return f"{count} GPU{'s' if count != 1 else ''}"


def layout_error(plan: Mapping[str, Any], places: Sequence[RankPlace]) -> str:
    """Why the launch described by ``places`` (one per global rank) cannot run ``plan``, or '' when it can."""
    by_node: dict[str, list[int]] = {}
    for rank, place in enumerate(places):
        by_node.setdefault(place.node, []).append(rank)
    counts = {node: len(ranks) for node, ranks in by_node.items()}
    if len(set(counts.values())) > 1 or any(p.local_world_size != counts[p.node] for p in places):
        shown = ", ".join(f"{node}: {count}" for node, count in counts.items())
        return (f"the nodes run different numbers of processes ({shown}): launch every node with the same "
                f"--nproc_per_node (torchrun) so that each runs the same part of the plan")
    first = places[0]
    for rank, place in enumerate(places):
        if place.plan_fingerprint != first.plan_fingerprint:
            return (f"rank {rank} ({place.node}, {place.host}) reads another compile output than rank 0 (plan "
                    f"{str(place.plan_fingerprint)[:12]} vs {str(first.plan_fingerprint)[:12]}): every node must read "
                    f"the one compile output: put --compile_dir on a file system all nodes share ({SEVERAL_NODES_DOCS})")
    entry = plan.get("nodes")
    if not entry:  # a compile output of an older version records no node size: nothing to check against
        return ""
    plan_ngpus, per_node, launched = int(plan["plan_ngpus"]), int(entry["gpus_per_node"]), first.local_world_size
    across = set(entry.get("axes_across_nodes", []))
    for axis, size in zip(plan["mesh"]["axis_names"], plan["mesh"]["shape"]):
        if axis in across or int(size) == 1:
            continue
        for copy in range(len(places) // plan_ngpus):
            for group in plan["axis_groups"][axis]:
                ranks = [copy * plan_ngpus + u for u in group]
                nodes = sorted({places[r].node for r in ranks})
                if len(nodes) == 1:
                    continue
                kept = (f"keeps mesh axis '{axis}' (size {size}) inside a node, which this launch splits (ranks "
                        f"{ranks} on {' and '.join(nodes)})")
                if launched != per_node:
                    return (f"--nproc_per_node {launched} gives {_gpus(launched)} per node, but the plan was costed "
                            f"for {per_node} per node (hardware profile {entry.get('hw_profile')}) and {kept}: "
                            f"compile with --hw_profile <a profile JSON with \"gpus_per_node\": {launched}> or "
                            f"launch {per_node} per node")
                return (f"the plan {kept}: copies of plan_ngpus {plan_ngpus} do not line up with nodes of {per_node} "
                        f"GPUs; compile with a --plan_ngpus that divides {per_node} or is a multiple of it")
    return ""
