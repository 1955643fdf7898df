"""Redistribution where one tensor dim is split over two mesh axes: the steps keep the shards nested.

A dim split over several axes nests in axis order (the first axis outer, ``shard_slices``), so
``redistribution_steps`` may gather only a dim's innermost axis and slice only inside all axes that
split it already. This checks every step of each case below on that bookkeeping; tests/test_comm.py
runs the same cases' steps on data on a 2x2 gloo mesh (``planned_steps``) against the reference.
"""

from __future__ import annotations

import itertools

import torch

from dimshard.planner.plan.collectives import COLLECTIVES_TABLE
from dimshard.planner.plan.placements import PARTIAL, REPLICATE, Shard
from dimshard.planner.plan.redistribute import redistribution_steps
from dimshard.runtime import comm

# (source, target) on the tp x sp mesh, "S0" on both axes meaning dim 0 split by tp, then each piece by sp.
NESTED_REDISTRIBUTIONS = [
    (["R", "S0"], ["S0", "R"]),  # batch split on the inner axis moves to the outer one
    (["P", "S0"], ["S0", "R"]),  # a partial sum on tp, reduce-scattered onto the dim sp splits
    (["R", "S0"], ["S0", "S0"]),  # sp keeps its split of dim 0, tp splits it too (outside sp)
    (["S0", "S0"], ["S1", "S0"]),  # tp moves away from dim 0 while sp keeps it
    (["S0", "S0"], ["S0", "S1"]),  # the inner axis moves: an all-to-all
    (["S1", "S0"], ["S0", "S1"]),  # both swap
    (["R", "S0"], ["S0", "S2"]),  # sp's split moves by all-to-all, tp takes dim 0
    (["S0", "R"], ["S1", "S0"]),  # tp moves off dim 0 before sp splits it (a local batch of 1 would not split)
]


def _placement(tag: str) -> object:
    return REPLICATE if tag == "R" else PARTIAL if tag == "P" else Shard(int(tag[1:]))


def planned_steps(x: torch.Tensor, src: list[str], dst: list[str], groups: tuple) -> torch.Tensor:
    """``x`` through the code generated code runs for ``redistribution_steps(src, dst)``."""
    steps = redistribution_steps(tuple(map(_placement, src)), tuple(map(_placement, dst)))
    for step in steps:
        collective = COLLECTIVES_TABLE[step.kind]
        code = collective.code("x", (step.dim, step.dim2)[:len(collective.dims)], "group")
        x = eval(code, {"comm": comm, "group": groups[step.axis]}, {"x": x})
    return x


def _check_nesting(src: list[str], dst: list[str]) -> None:
    """Every step of ``src -> dst`` keeps each dim's sharding axes in mesh order and ends at ``dst``'s."""
    sharded: dict[int, list[int]] = {}
    for axis, tag in enumerate(src):
        if tag.startswith("S"):
            sharded.setdefault(int(tag[1:]), []).append(axis)
    for step in redistribution_steps(tuple(map(_placement, src)), tuple(map(_placement, dst))):
        gone = step.dim if step.kind in ("all_gather", "all_to_all") else None
        new = step.dim2 if step.kind == "all_to_all" else step.dim if step.kind in (
            "local_slice", "reduce_scatter") else None
        if gone is not None:
            assert sharded[gone][-1] == step.axis, (src, dst, step)
            sharded[gone].pop()
        if new is not None:
            assert all(a < step.axis for a in sharded.get(new, [])), (src, dst, step)
            sharded.setdefault(new, []).append(step.axis)
    final = {int(t[1:]): [a for a, u in enumerate(dst) if u == t] for t in dst if t.startswith("S")}
    assert {d: a for d, a in sharded.items() if a} == final, (src, dst)


def test_nested_redistribution_steps_keep_axis_order() -> None:
    """The cases above (run on data in tests/test_comm.py), then every pair of placements on 2 and 3 axes."""
    for src, dst in NESTED_REDISTRIBUTIONS:
        _check_nesting(src, dst)
    tags = ["R", "P", "S0", "S1", "S2"]
    for axes in (2, 3):
        placements = [list(p) for p in itertools.product(tags, repeat=axes)]
        for src in placements:
            for dst in placements:
                _check_nesting(src, dst)
