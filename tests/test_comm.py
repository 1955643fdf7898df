"""Collectives and process groups against single-process references, on 2 and 4 gloo processes.

Every case builds the same full tensor on every rank (same seed), gives each rank its local
piece in the source placement, runs the collective and compares with the target placement of
the full tensor. For gradients each rank q adds `sum(y_q * W_q)` with its own random W_q, so the
reference loss of the full tensor is `sum over q of sum(target_piece_q(full) * W_q)`; the input
gradients must follow the contract's convention (Shard grads exact, Replicate grads sum over the
group to the reference, Partial grads equal the reference on every rank).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed
from test_redistribute_nesting import NESTED_REDISTRIBUTIONS, planned_steps
from token_exchange_check import check_token_all_to_all

from dimshard.planner.cost.hardware import COLLECTIVES
from dimshard.planner.plan.collectives import COLLECTIVES_TABLE
from dimshard.planner.plan.placements import PARTIAL, REPLICATE, Shard
from dimshard.planner.plan.redistribute import redistribution_steps
from dimshard.runtime import comm
from dimshard.runtime.comm import (
    all_gather,
    all_reduce,
    all_to_all,
    local_slice,
    reduce_scatter,
    replicate_to_partial,
    scale_grad,
)
from dimshard.runtime.distributed import destroy_parallel, init_parallel

# ----------------------------------------------------------------------------------------------
# placements on a mesh: "S<dim>" shard, "R" replicate, "P" partial (sum)


@dataclass
class Mesh:
    sizes: list[int]  # per axis
    groups: list[dist.ProcessGroup | None]  # this rank's group per axis
    coords: list[list[int]]  # coordinates of every global rank


def _piece(
    parts: Sequence[torch.Tensor], placements: Sequence[str], coords: Sequence[int], sizes: Sequence[int]
) -> torch.Tensor:
    """The local tensor at `coords`; over a Partial axis, rank k holds parts[k] (they sum to the full)."""
    partial_axes = [a for a, p in enumerate(placements) if p == "P"]
    x = parts[coords[partial_axes[0]]] if partial_axes else parts[0]
    for a, p in enumerate(placements):
        if p.startswith("S"):
            x = x.chunk(sizes[a], int(p[1:]))[coords[a]]
    return x


def _check_case(
    op: Callable[[torch.Tensor], torch.Tensor],
    src: Sequence[str],
    dst: Sequence[str],
    shape: Sequence[int],
    mesh: Mesh,
    seed: int,
    dtype: torch.dtype,
    non_contiguous: bool = False,
) -> None:
    rank = dist.get_rank()
    me = mesh.coords[rank]
    generator = torch.Generator().manual_seed(seed)
    partial_axes = [a for a, p in enumerate(src) if p == "P"]
    n_parts = mesh.sizes[partial_axes[0]] if partial_axes else 1
    parts = [torch.randn(*shape, generator=generator).to(dtype) for _ in range(n_parts)]
    full = sum(p.float() for p in parts)
    # A Partial result stands for its sum over the axis, so the loss may depend on that sum only:
    # one weight per group of ranks that differ only on Partial axes.
    partial_out = [a for a, p in enumerate(dst) if p == "P"]
    whole = ["R" if p == "P" else p for p in dst]

    def key(coords: Sequence[int]) -> tuple[int, ...]:
        return tuple(0 if a in partial_out else c for a, c in enumerate(coords))

    weights = {
        k: torch.randn(_piece([full], whole, k, mesh.sizes).shape, generator=generator)
        for k in dict.fromkeys(key(coords) for coords in mesh.coords)
    }

    x = _piece(parts, src, me, mesh.sizes).clone()
    if non_contiguous:
        x = x.transpose(0, -1).contiguous().transpose(0, -1)
        assert not x.is_contiguous()
    x.requires_grad_(True)
    y = op(x)
    assert y.dtype == dtype
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 5e-2, "rtol": 2e-2}
    total = y.detach().float().clone()  # summed in place below; y stays as computed
    for a in partial_out:
        dist.all_reduce(total, group=mesh.groups[a])
    torch.testing.assert_close(total, _piece([full], whole, me, mesh.sizes), **tol)
    (y.float() * weights[key(me)]).sum().backward()

    reference = full.clone().requires_grad_(True)
    sum((_piece([reference], whole, k, mesh.sizes) * w).sum() for k, w in weights.items()).backward()
    grad = x.grad.float()
    assert x.grad.shape == x.shape and x.grad.dtype == dtype
    for a, p in enumerate(src):
        if p == "R":  # the gradient of a Replicate input is a Partial: sum it to compare
            dist.all_reduce(grad, group=mesh.groups[a])
    expected = _piece([reference.grad], [p if p.startswith("S") else "R" for p in src], me, mesh.sizes)
    torch.testing.assert_close(grad, expected, **tol)


# ----------------------------------------------------------------------------------------------
# 1-D: every collective over the whole world, both code paths, float32 and bfloat16


def _one_axis_cases(group: dist.ProcessGroup | None) -> list[tuple[Callable, list[str], list[str], bool]]:
    cases = []
    for dim in (0, 1, -1):
        cases.append((functools.partial(all_gather, dim=dim, group=group), [f"S{dim}"], ["R"], dim == 1))
        cases.append((functools.partial(reduce_scatter, dim=dim, group=group), ["P"], [f"S{dim}"], dim == -1))
        cases.append((functools.partial(local_slice, dim=dim, group=group), ["R"], [f"S{dim}"], dim == 0))
    cases.append((functools.partial(all_reduce, group=group), ["P"], ["R"], True))
    cases.append((functools.partial(replicate_to_partial, group=group), ["R"], ["P"], True))
    for gather_dim, scatter_dim in ((0, 2), (-1, 1), (1, 0)):
        op = functools.partial(all_to_all, gather_dim=gather_dim, scatter_dim=scatter_dim, group=group)
        cases.append((op, [f"S{gather_dim}"], [f"S{scatter_dim}"], gather_dim == 1))
    return cases


def _require_contiguous(collective: Callable) -> Callable:
    # NCCL reads a tensor's raw memory, while gloo also accepts strided tensors; check here what
    # would otherwise only fail on GPUs.
    def checked(output: torch.Tensor, input: torch.Tensor, *args, **kwargs):
        assert output.is_contiguous() and input.is_contiguous(), f"{collective.__name__} got a strided tensor"
        return collective(output, input, *args, **kwargs)

    return checked


def _check_collectives_one_axis() -> None:
    for name in ("_all_gather_single", "_reduce_scatter_single", "_all_to_all_single"):
        setattr(comm, name, _require_contiguous(getattr(comm, name)))
    world = dist.get_world_size()
    mesh = Mesh(sizes=[world], groups=[None], coords=[[q] for q in range(world)])
    shape = (4, 8, 12)  # every dim divisible by 2 and 4
    for fallbacks in (True, False):
        comm._GLOO_FALLBACKS = fallbacks
        for dtype in (torch.float32, torch.bfloat16):
            for i, (op, src, dst, non_contiguous) in enumerate(_one_axis_cases(None)):
                try:
                    _check_case(
                        op, src, dst, shape, mesh, seed=100 + i, dtype=dtype, non_contiguous=non_contiguous
                    )
                except AssertionError as error:
                    raise AssertionError(
                        f"{op} {src} -> {dst}, {dtype}, gloo fallbacks={fallbacks}"
                    ) from error
    comm._GLOO_FALLBACKS = True

    # scale_grad: identity forward, scaled gradient
    x = torch.randn(3, 5, requires_grad=True)
    y = scale_grad(x, 0.25)
    torch.testing.assert_close(y, x)
    (y * 2).sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 0.5))
    assert scale_grad(x, 1.0) is x

    # chained: Partial -> Shard(1) -> Shard(0) -> Replicate, one autograd graph
    chain = lambda x: all_gather(all_to_all(reduce_scatter(x, 1, None), 1, 0, None), 0, None)  # noqa: E731
    _check_case(chain, ["P"], ["R"], shape, mesh, seed=7, dtype=torch.float32)


def _check_edge_cases() -> None:
    world, rank = dist.get_world_size(), dist.get_rank()
    singles = [dist.new_group([q]) for q in range(world)]  # every rank creates every group
    alone = singles[rank]
    x = torch.randn(4, 6, requires_grad=True)
    assert all_gather(x, 1, alone) is x
    assert all_reduce(x, alone) is x
    assert reduce_scatter(x, -1, alone) is x
    assert all_to_all(x, 0, 1, alone) is x
    assert local_slice(x, 0, alone) is x
    assert replicate_to_partial(x, alone) is x

    odd = torch.randn(world + 1, 2 * world)
    for call in (
        lambda: reduce_scatter(odd, 0, None),
        lambda: local_slice(odd, -2, None),
        lambda: all_to_all(odd, 1, 0, None),
    ):
        with pytest.raises(
            ValueError,
            match=rf"dim 0 has size {world + 1}, which does not split evenly over a group of {world}",
        ):
            call()
    with pytest.raises(ValueError, match="dim=2 is out of range"):
        all_gather(odd, 2, None)
    with pytest.raises(ValueError, match="gather_dim and scatter_dim are both 1"):
        all_to_all(odd, 1, -1, None)
    # bf16 sums on gloo run in float32: exactly the float32 sum of the parts, rounded once
    for fallbacks in (True, False):
        comm._GLOO_FALLBACKS = fallbacks
        parts = torch.randn(world, 64, world, generator=torch.Generator().manual_seed(3)).bfloat16()
        expected = parts.float().sum(0).bfloat16()
        assert torch.equal(all_reduce(parts[rank], None), expected)
        assert torch.equal(reduce_scatter(parts[rank], -1, None), expected.chunk(world, -1)[rank])
    comm._GLOO_FALLBACKS = True
    # the input of a reduction is never modified in place
    before = odd.clone()
    all_reduce(odd, None)
    reduce_scatter(odd, 1, None)
    torch.testing.assert_close(odd, before)


def _table_placement(kind: str, dim: int) -> tuple[object, str]:
    """A per-axis planner placement of the table's ``kind`` and the same placement in this file's notation."""
    if kind == "shard":
        return Shard(dim), f"S{dim}"
    return (PARTIAL, "P") if kind == "partial" else (REPLICATE, "R")


def _check_table_entries() -> None:
    """Every entry of the planner's collectives table, through the code codegen writes for it."""
    world = dist.get_world_size()
    mesh = Mesh(sizes=[world], groups=[None], coords=[[q] for q in range(world)])
    for i, collective in enumerate(COLLECTIVES_TABLE.values()):
        if not collective.redistributes:  # run inside an op; checked by check_token_all_to_all
            continue
        (src, src_tag), (dst, dst_tag) = _table_placement(collective.source, 1), _table_placement(collective.target, 2)
        [step] = redistribution_steps((src,), (dst,))
        assert step.kind == collective.kind
        code = collective.code("x", (step.dim, step.dim2)[:len(collective.dims)], "group")
        op = lambda x, code=code: eval(code, {"comm": comm, "group": None}, {"x": x})  # noqa: E731
        try:
            _check_case(op, [src_tag], [dst_tag], (4, 8, 12), mesh, seed=300 + i, dtype=torch.float32)
        except AssertionError as error:
            raise AssertionError(f"table entry {collective.kind}: {code}") from error


def _check_one_axis() -> None:
    _check_collectives_one_axis()
    _check_edge_cases()
    _check_table_entries()
    check_token_all_to_all()


@pytest.mark.parametrize("world_size", [2, 4])
def test_collectives_match_single_process_reference(world_size: int) -> None:
    run_distributed(_check_one_axis, world_size, timeout_s=90)


# The gradient of a tensor in a placement is in this placement (sum over the group of a Replicate's
# gradient is the true one: it is Partial; a Partial's gradient is the same on every rank).
_GRADIENT_KIND = {"shard": "shard", "replicate": "partial", "partial": "replicate"}


def test_collectives_table_names_runtime_functions_and_transposed_backwards() -> None:
    for kind, collective in COLLECTIVES_TABLE.items():
        assert callable(getattr(comm, collective.function, None)), f"{kind}: no comm.{collective.function}"
        assert collective.function in comm.__all__
        # The backward turns the output's gradient placement into the input's.
        grad_src, grad_dst = _GRADIENT_KIND[collective.target], _GRADIENT_KIND[collective.source]
        if collective.backward is None:
            assert (grad_src, grad_dst) == ("shard", "partial"), kind  # zero-padding, no communication
        else:
            back = COLLECTIVES_TABLE[collective.backward]
            assert (back.source, back.target) == (grad_src, grad_dst), kind
        assert collective.sent_bytes(1000, 1) == 0
        assert (collective.sent_bytes(1000, 4) > 0) == collective.communicates
    assert set(COLLECTIVES) == {k for k, c in COLLECTIVES_TABLE.items() if c.communicates}


# ----------------------------------------------------------------------------------------------
# 2-D: a 2x2 tp x sp mesh built by init_parallel; and the group layout of P=2 on 4 ranks

MESH_PLAN = {
    "plan_ngpus": 4,
    "mesh": {"axis_names": ["tp", "sp"], "shape": [2, 2]},
    "unit_rank_coords": [[0, 0], [0, 1], [1, 0], [1, 1]],
    "axis_groups": {"tp": [[0, 2], [1, 3]], "sp": [[0, 1], [2, 3]]},
    "parameters": [
        {
            "name": "w",
            "full_shape": [4, 4],
            "dtype": "float32",
            "shards": [
                {"slices": [[0, 2], [0, 4]], "unit_ranks": [0, 1]},
                {"slices": [[2, 4], [0, 4]], "unit_ranks": [2, 3]},
            ],
        },
    ],
}

DP_PLAN = {
    "plan_ngpus": 2,
    "mesh": {"axis_names": ["tp"], "shape": [2]},
    "unit_rank_coords": [[0], [1]],
    "axis_groups": {"tp": [[0, 1]]},
    "parameters": [
        {
            "name": "q",
            "full_shape": [4, 4],
            "dtype": "float32",
            "shards": [
                {"slices": [[0, 2], [0, 4]], "unit_ranks": [0]},
                {"slices": [[2, 4], [0, 4]], "unit_ranks": [1]},
            ],
        },
        {
            "name": "norm",
            "full_shape": [4],
            "dtype": "float32",
            "shards": [{"slices": [[0, 4]], "unit_ranks": [0, 1]}],
        },
    ],
}


def _group_ranks(group: dist.ProcessGroup | None) -> list[int] | None:
    if group is None:
        return None
    # a real collective on the group, so a wrongly built group fails here rather than later
    members = torch.zeros(dist.get_world_size())
    members[dist.get_rank()] = 1.0
    dist.all_reduce(members, group=group)
    ranks = dist.get_process_group_ranks(group)
    assert members.nonzero().flatten().tolist() == ranks
    return ranks


def _check_mesh_and_layout() -> dict:
    ctx = init_parallel(MESH_PLAN, timeout=timedelta(seconds=60))
    assert (ctx.plan_ngpus, ctx.dp_size, ctx.unit_rank, ctx.copy_index) == (4, 1, ctx.rank, 0)
    assert ctx.axis_names == ("tp", "sp")
    for axis in ctx.axis_names:
        assert ctx.axis_size(axis) == 2
        # collectives order chunks by group rank, so it must be the mesh coordinate
        assert dist.get_rank(ctx.axis_group(axis)) == ctx.axis_index(axis)
    assert ctx.dp_group is None
    assert ctx.shard_group([ctx.rank]) is None
    assert _group_ranks(ctx.shard_group([0, 1] if ctx.rank < 2 else [2, 3])) == (
        [0, 1] if ctx.rank < 2 else [2, 3]
    )
    with pytest.raises(KeyError, match="no mesh axis 'dp'"):
        ctx.axis_group("dp")

    tp, sp = ctx.axis_group("tp"), ctx.axis_group("sp")
    mesh = Mesh(sizes=[2, 2], groups=[tp, sp], coords=MESH_PLAN["unit_rank_coords"])
    shape = (4, 6, 8)
    cases = [
        # all-gather on tp while sp stays sharded on another dim
        (lambda x: all_gather(x, 0, tp), ["S0", "S1"], ["R", "S1"]),
        # reduce-scatter on tp, then all-gather on sp
        (lambda x: all_gather(reduce_scatter(x, 0, tp), 1, sp), ["P", "S1"], ["S0", "R"]),
        # all-to-all on sp with tp sharded
        (lambda x: all_to_all(x, 1, 2, sp), ["S0", "S1"], ["S0", "S2"]),
        # local slice on tp, all-reduce on sp
        (lambda x: all_reduce(local_slice(x, -1, tp), sp), ["R", "P"], ["S2", "R"]),
        # replicated on tp: the gradient must be Partial over tp
        (lambda x: all_gather(x, 2, sp), ["R", "S2"], ["R", "R"]),
        # a summand of a sum split on tp (a row-parallel bias), sharded on sp
        (lambda x: replicate_to_partial(x, tp), ["R", "S1"], ["P", "S1"]),
        # a sharded summand: gathered, then Partial on the same axis (planner/plan/redistribute.py)
        (lambda x: replicate_to_partial(all_gather(x, 0, tp), tp), ["S0", "S1"], ["P", "S1"]),
    ]
    # the planner's steps where one dim is split over both axes (tests/test_redistribute_nesting.py)
    cases += [(functools.partial(planned_steps, src=s, dst=d, groups=(tp, sp)), s, d) for s, d in NESTED_REDISTRIBUTIONS]
    for i, (op, src, dst) in enumerate(cases):
        for dtype in (torch.float32, torch.bfloat16):
            try:
                _check_case(op, src, dst, shape if i < len(cases) - len(NESTED_REDISTRIBUTIONS) else (8, 8, 4), mesh, seed=200 + i, dtype=dtype)
            except AssertionError as error:
                raise AssertionError(f"2-D case {i}: {src} -> {dst}, {dtype}") from error

    # P=2 on the same 4 ranks: 2 data-parallel copies
    ctx = init_parallel(DP_PLAN)
    return {
        "rank": ctx.rank,
        "world_size": ctx.world_size,
        "dp_size": ctx.dp_size,
        "unit_rank": ctx.unit_rank,
        "copy_index": ctx.copy_index,
        "device": str(ctx.device),
        "tp": _group_ranks(ctx.axis_group("tp")),
        "tp_index": ctx.axis_index("tp"),
        "tp_size": ctx.axis_size("tp"),
        "unit": _group_ranks(ctx.unit_group),
        "dp": _group_ranks(ctx.dp_group),
        "shard_own": _group_ranks(ctx.shard_group([ctx.unit_rank])),
        "shard_both": _group_ranks(ctx.shard_group([1, 0])),
        "shard_ranks_other": ctx.shard_ranks([1 - ctx.unit_rank]),
    }


def test_collectives_on_2x2_mesh_and_dp_group_layout() -> None:
    layouts = run_distributed(_check_mesh_and_layout, 4, timeout_s=90)
    for rank, layout in enumerate(layouts):
        u, c = rank % 2, rank // 2
        assert layout == {
            "rank": rank,
            "world_size": 4,
            "dp_size": 2,
            "unit_rank": u,
            "copy_index": c,
            "device": "cpu",
            "tp": [2 * c, 2 * c + 1],
            "tp_index": u,
            "tp_size": 2,
            "unit": [2 * c, 2 * c + 1],
            "dp": [u, u + 2],
            "shard_own": [u, u + 2],
            "shard_both": [0, 1, 2, 3],
            "shard_ranks_other": (1 - u, 3 - u),
        }, f"rank {rank}"


# ----------------------------------------------------------------------------------------------
# init_parallel without a process group (as under torchrun, or a plain single process)


def _check_init_parallel_without_process_group() -> None:
    import os

    os.environ.update(RANK="0", WORLD_SIZE="3")
    message = r"runtime_ngpus \(world size\) 3 is not a multiple of plan_ngpus 2: launch with a multiple of 2 processes"
    with pytest.raises(ValueError, match=message):
        init_parallel(DP_PLAN, backend="gloo")
    assert not dist.is_initialized()  # the launch is rejected before any rendezvous

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(name, None)
    plan = {
        "plan_ngpus": 1,
        "mesh": {"axis_names": ["tp"], "shape": [1]},
        "unit_rank_coords": [[0]],
        "axis_groups": {"tp": [[0]]},
        "parameters": [{"name": "w", "shards": [{"unit_ranks": [0]}]}],
    }
    ctx = init_parallel(plan, backend="gloo")
    assert (ctx.rank, ctx.world_size, ctx.dp_size, ctx.unit_rank) == (0, 1, 1, 0)
    assert ctx.device == torch.device("cpu")
    assert ctx.dp_group is None and ctx.shard_group([0]) is None
    x = torch.randn(2, 3)
    assert all_gather(x, 0, ctx.axis_group("tp")) is x  # a group of one: identity
    destroy_parallel()
    assert not dist.is_initialized()


def test_init_parallel_world_size_check_and_single_process() -> None:
    run_distributed(_check_init_parallel_without_process_group, 1, timeout_s=60, init_process_group=False)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p: p["mesh"].update(shape=[3]), r"does not have plan_ngpus = 2 devices"),
        (lambda p: p.update(unit_rank_coords=[[0], [0]]), r"one distinct coordinate"),
        (lambda p: p.update(axis_groups={"tp": [[0], [1]]}), r"is not a line along 'tp'"),
        (lambda p: p.update(unit_rank_coords=[[1], [0]]), r"is not a line along 'tp'"),
        (lambda p: p["parameters"][0]["shards"][0].update(unit_ranks=[2]), r"non-empty subset of 0..1"),
    ],
)
def test_init_parallel_rejects_inconsistent_plans(change: Callable[[dict], None], message: str) -> None:
    import copy

    plan = copy.deepcopy(DP_PLAN)
    change(plan)
    with pytest.raises(ValueError, match=message):
        init_parallel(plan, backend="gloo")  # the plan is checked before torch.distributed is touched


# ----------------------------------------------------------------------------------------------
# the test helper itself: failures carry the rank's traceback, hangs end


def _fail_on_rank_one() -> int:
    if dist.get_rank() == 1:
        raise ArithmeticError("rank one gives up")
    dist.barrier()  # rank 0 would wait here forever without the helper's cleanup
    return 0


def _hang() -> None:
    import time

    time.sleep(600)


def test_run_distributed_reports_failures_and_timeouts() -> None:
    with pytest.raises(RuntimeError, match=r"(?s)rank 1 ----.*ArithmeticError: rank one gives up"):
        run_distributed(_fail_on_rank_one, 2, timeout_s=60)
    with pytest.raises(TimeoutError, match=r"ranks \[0\] of 1 did not finish"):
        run_distributed(_hang, 1, timeout_s=6)
