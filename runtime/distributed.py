"""Process groups of one compile output: init_parallel builds every group a plan.json needs.

Rank layout (docs/contract.md): global rank g runs unit rank `g % plan_ngpus` of the data-parallel
copy `g // plan_ngpus`. Mesh-axis groups, the unit group and the shard groups live inside or across
copies as the plan says; the dp groups join the same unit rank of every copy.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from .node_layout import check_node_layout
from .reliability import collective_order
from .reliability.gpu_memory import enable_expandable_segments

__all__ = ["ParallelContext", "destroy_parallel", "init_parallel"]


@dataclass
class ParallelContext:
    """This process's place in the job and its process groups, built by `init_parallel`.

    Groups are created once, for every rank, at init; the methods only look them up.
    """

    rank: int
    world_size: int
    plan_ngpus: int
    dp_size: int
    unit_rank: int
    copy_index: int
    device: torch.device
    unit_group: ProcessGroup  # the plan_ngpus ranks of this copy
    dp_group: ProcessGroup | None  # this unit rank in every copy; None when dp_size == 1
    axis_names: tuple[str, ...] = ()
    nodes: int = 1  # nodes the launch spans (torchrun --nnodes), checked against the plan at init
    _axis_sizes: dict[str, int] = field(default_factory=dict, repr=False)
    _axis_coords: dict[str, int] = field(default_factory=dict, repr=False)
    _axis_groups: dict[str, ProcessGroup] = field(default_factory=dict, repr=False)
    # every group this rank belongs to, keyed by its sorted global ranks
    _groups: dict[tuple[int, ...], ProcessGroup] = field(default_factory=dict, repr=False)

    def axis_group(self, axis: str) -> ProcessGroup:
        """This rank's group along mesh axis `axis`, inside its copy; group rank = axis_index(axis)."""
        return self._axis_groups[self._known_axis(axis)]

    def axis_size(self, axis: str) -> int:
        """Number of unit ranks along mesh axis `axis`."""
        return self._axis_sizes[self._known_axis(axis)]

    def axis_index(self, axis: str) -> int:
        """This rank's coordinate along mesh axis `axis` (from plan["unit_rank_coords"])."""
        return self._axis_coords[self._known_axis(axis)]

    def shard_ranks(self, unit_ranks: Sequence[int]) -> tuple[int, ...]:
        """Sorted global ranks holding a shard held by `unit_ranks`, over all data-parallel copies."""
        return tuple(sorted(c * self.plan_ngpus + u for c in range(self.dp_size) for u in set(unit_ranks)))

    def shard_group(self, unit_ranks: Sequence[int]) -> ProcessGroup | None:
        """The group of global ranks holding a shard held by `unit_ranks` (this rank included),
        over all copies; None when that is only this rank.

        Only groups for unit_ranks sets listed in plan["parameters"] (or equal to another group
        of the plan) exist, since groups must be created on every rank at init.
        """
        ranks = self.shard_ranks(unit_ranks)
        if self.rank not in ranks:
            raise ValueError(
                f"shard_group({list(unit_ranks)}): this rank (unit rank {self.unit_rank}) does not hold "
                f"that shard, so it is not a member of its group"
            )
        if len(ranks) == 1:
            return None
        group = self._groups.get(ranks)
        if group is None:
            raise KeyError(
                f"no process group for unit_ranks {sorted(set(unit_ranks))} (global ranks {list(ranks)}): "
                f"init_parallel creates shard groups only for the unit_ranks sets in "
                f"plan['parameters'][*]['shards']"
            )
        return group

    def _known_axis(self, axis: str) -> str:
        if axis not in self._axis_groups:
            raise KeyError(f"no mesh axis {axis!r}; the plan's mesh axes are {list(self.axis_names)}")
        return axis


def init_parallel(
    plan: Mapping[str, Any], backend: str | None = None, timeout: timedelta | None = None
) -> ParallelContext:
    """Initialize torch.distributed (if needed) and every process group of `plan` (a plan.json dict).

    Rank and world size come from an initialized default group, else from the torchrun
    environment (RANK, WORLD_SIZE, LOCAL_RANK), else a single process is assumed. The world size
    must be a multiple of plan["plan_ngpus"] (ValueError otherwise, before any initialization).
    `backend` defaults to nccl when CUDA is available, else gloo; with nccl the current device
    becomes cuda:LOCAL_RANK. Every group is created in the same order on every rank, as
    torch.distributed.new_group requires. `timeout` applies to the default group (when this call
    creates it) and to all new groups; None inherits the default group's timeout. CUDA's allocator
    gets expandable segments unless the user configured it (``gpu_memory.enable_expandable_segments``).
    A torchrun launch over several nodes is checked against plan["nodes"] first
    (``node_layout.check_node_layout``): NodeLayoutError, a ValueError, on every rank when its nodes
    split a mesh axis the plan keeps inside one, run unequal process counts or read other compile outputs.
    """
    enable_expandable_segments()  # the budgets the plan was made under were measured with it
    plan_ngpus = int(plan["plan_ngpus"])
    axis_names, axis_sizes = _check_plan(plan, plan_ngpus)
    collective_order.enable_from_env()  # the debug log must see the groups' first collectives

    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        active = str(dist.get_backend())
        if backend is not None and backend != active:
            raise ValueError(
                f"torch.distributed is already initialized with backend {active!r}, but backend "
                f"{backend!r} was requested; pass backend=None to use the active one"
            )
        backend = active
    else:
        rank, world_size = _rank_and_world_from_env()
    if world_size % plan_ngpus != 0:
        raise ValueError(
            f"runtime_ngpus (world size) {world_size} is not a multiple of plan_ngpus {plan_ngpus}: "
            f"launch with a multiple of {plan_ngpus} processes"
        )

    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    device = torch.device("cpu")
    # "fake" (torch's fake process group: one rank of a larger job, collectives move no data)
    # computes on the GPU like the NCCL job it stands for.
    if "nccl" in backend or (backend == "fake" and torch.cuda.is_available()):
        local_rank = int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1)))
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)

    if not dist.is_initialized():
        kwargs: dict[str, Any] = {
            "backend": backend,
            "rank": rank,
            "world_size": world_size,
            "timeout": timeout,
        }
        if device.type == "cuda":
            kwargs["device_id"] = device  # eager NCCL init lets new_group split the communicator
        if "MASTER_ADDR" not in os.environ and world_size == 1:
            kwargs["store"] = dist.HashStore()  # a single process without torchrun needs no rendezvous
        dist.init_process_group(**kwargs)
    if timeout is None:
        timeout = _default_group_timeout()
    # Before any group: a launch whose nodes split an axis the plan keeps inside one stops here.
    # A fake group (one rank standing for a larger job) has no other ranks to ask.
    nodes = check_node_layout(plan, rank, world_size) if backend != "fake" else 1

    dp_size = world_size // plan_ngpus
    unit_rank, copy_index = rank % plan_ngpus, rank // plan_ngpus
    groups = _create_groups(plan, plan_ngpus, dp_size, rank, world_size, axis_names, timeout)

    def copy_ranks(unit_ranks: Sequence[int]) -> tuple[int, ...]:
        return tuple(sorted(copy_index * plan_ngpus + u for u in unit_ranks))

    axis_groups = {}
    for axis in axis_names:
        mine = next(g for g in plan["axis_groups"][axis] if unit_rank in g)
        axis_groups[axis] = groups[copy_ranks(mine)]
    coords = plan["unit_rank_coords"][unit_rank]
    dp_ranks = tuple(c * plan_ngpus + unit_rank for c in range(dp_size))
    return ParallelContext(
        rank=rank,
        world_size=world_size,
        plan_ngpus=plan_ngpus,
        dp_size=dp_size,
        unit_rank=unit_rank,
        copy_index=copy_index,
        device=device,
        unit_group=groups[copy_ranks(range(plan_ngpus))],
        dp_group=groups[dp_ranks] if dp_size > 1 else None,
        axis_names=axis_names,
        nodes=nodes,
        _axis_sizes=dict(zip(axis_names, axis_sizes)),
        _axis_coords={axis: int(coords[i]) for i, axis in enumerate(axis_names)},
        _axis_groups=axis_groups,
        _groups=groups,
    )


def destroy_parallel() -> None:
    """Destroy the default process group and every group created from it; a no-op if none exists."""
    if dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# helpers


def _rank_and_world_from_env() -> tuple[int, int]:
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        return 0, 1
    try:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except KeyError as missing:
        raise RuntimeError(
            f"environment variable {missing} is not set while RANK/WORLD_SIZE partly are: launch with "
            f"torchrun, or set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT"
        ) from None


def _default_group_timeout() -> timedelta | None:
    # new_group does not inherit the default group's timeout (it falls back to the backend's
    # 10-30 minute default), which would let a failing job or test hang for that long.
    # torch has no public getter, so read the backend options and fall back to torch's default.
    device = torch.device("cuda" if "nccl" in str(dist.get_backend()) else "cpu")
    try:
        return dist.group.WORLD._get_backend(device).options._timeout
    except (AttributeError, RuntimeError):
        return None


def _check_plan(plan: Mapping[str, Any], plan_ngpus: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Check that the mesh, coordinates and axis groups of `plan` agree; return axis names and sizes.

    Collectives index chunks by group rank, which torch.distributed orders by ascending global rank,
    so along every axis group the unit ranks in ascending order must have coordinates 0, 1, ....
    """
    if plan_ngpus < 1:
        raise ValueError(f"plan_ngpus must be at least 1, got {plan_ngpus}")
    axis_names = tuple(plan["mesh"]["axis_names"])
    axis_sizes = tuple(int(s) for s in plan["mesh"]["shape"])
    if len(axis_names) != len(axis_sizes) or math.prod(axis_sizes) != plan_ngpus:
        raise ValueError(
            f"plan mesh {dict(zip(axis_names, axis_sizes))} (axis_names {list(axis_names)}, shape "
            f"{list(axis_sizes)}) does not have plan_ngpus = {plan_ngpus} devices"
        )
    coords = [tuple(int(c) for c in rank_coords) for rank_coords in plan["unit_rank_coords"]]
    if len(coords) != plan_ngpus or set(coords) != set(_mesh_points(axis_sizes)):
        raise ValueError(
            f"plan unit_rank_coords {coords} must list one distinct coordinate of the mesh "
            f"{list(axis_sizes)} for each of the {plan_ngpus} unit ranks"
        )
    for i, axis in enumerate(axis_names):
        axis_groups = plan["axis_groups"].get(axis)
        if axis_groups is None:
            raise ValueError(f"plan axis_groups has no entry for mesh axis {axis!r}")
        members = sorted(u for group in axis_groups for u in group)
        if members != list(range(plan_ngpus)):
            raise ValueError(
                f"plan axis_groups[{axis!r}] = {axis_groups} must hold every unit rank 0..{plan_ngpus - 1} once"
            )
        for group in axis_groups:
            ordered = sorted(group)
            along = [coords[u][i] for u in ordered]
            others = {coords[u][:i] + coords[u][i + 1 :] for u in ordered}
            if along != list(range(axis_sizes[i])) or len(others) != 1:
                raise ValueError(
                    f"plan axis_groups[{axis!r}] group {group} is not a line along {axis!r}: sorted by unit "
                    f"rank its coordinates must be 0..{axis_sizes[i] - 1} along {axis!r} and equal on the "
                    f"other axes (got {[coords[u] for u in ordered]}), because collectives order chunks "
                    f"by rank"
                )
    for parameter in plan.get("parameters", []):
        for shard in parameter["shards"]:
            if not shard["unit_ranks"] or not all(0 <= u < plan_ngpus for u in shard["unit_ranks"]):
                raise ValueError(
                    f"parameter {parameter['name']!r} has a shard with unit_ranks {shard['unit_ranks']}; "
                    f"they must be a non-empty subset of 0..{plan_ngpus - 1}"
                )
    return axis_names, axis_sizes


def _mesh_points(shape: Sequence[int]) -> list[tuple[int, ...]]:
    points: list[tuple[int, ...]] = [()]
    for size in shape:
        points = [p + (i,) for p in points for i in range(size)]
    return points


def _create_groups(
    plan: Mapping[str, Any],
    plan_ngpus: int,
    dp_size: int,
    rank: int,
    world_size: int,
    axis_names: tuple[str, ...],
    timeout: timedelta | None,
) -> dict[tuple[int, ...], ProcessGroup]:
    """Create every group the plan may need, collectively and in one deterministic order.

    Returns the groups this rank belongs to, keyed by sorted global ranks. A rank set that repeats
    (a shard group equal to an axis group, ...) reuses the first group.
    """
    mine: dict[tuple[int, ...], ProcessGroup] = {}
    created: set[tuple[int, ...]] = set()

    def create(ranks: Sequence[int]) -> None:
        key = tuple(sorted(ranks))
        if key in created:
            return
        created.add(key)
        if len(key) == world_size:
            group = dist.group.WORLD
        else:
            group = dist.new_group(list(key), timeout=timeout)
        if rank in key:
            mine[key] = group

    for axis in axis_names:
        for copy in range(dp_size):
            for unit_ranks in plan["axis_groups"][axis]:
                create([copy * plan_ngpus + u for u in unit_ranks])
    for copy in range(dp_size):
        create(range(copy * plan_ngpus, (copy + 1) * plan_ngpus))
    if dp_size > 1:
        for unit_rank in range(plan_ngpus):
            create([copy * plan_ngpus + unit_rank for copy in range(dp_size)])
    shard_sets = sorted(
        {tuple(sorted(set(s["unit_ranks"]))) for p in plan.get("parameters", []) for s in p["shards"]}
    )
    for unit_ranks in shard_sets:
        ranks = [copy * plan_ngpus + u for copy in range(dp_size) for u in unit_ranks]
        if len(ranks) > 1:
            create(ranks)
    return mine
