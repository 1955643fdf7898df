"""Collectives with autograd that move a tensor between placements over one process group.

The generated per-rank code calls these where the planner inserted a redistribution
(docs/design.md, "Placements and redistribution"). Each function names its placement transition; its backward follows the
gradient convention of docs/contract.md:

- the gradient of a Replicate tensor is held as a Partial (its sum over the group is the true
  gradient),
- the gradient of a Partial tensor is held as a Replicate,
- the gradient of a Shard(dim) tensor is held as the same Shard(dim).

So every forward transition A -> B has the backward transition grad(B) -> grad(A):

| function        | forward                     | backward                          |
|-----------------|-----------------------------|-----------------------------------|
| all_gather      | Shard(dim) -> Replicate     | reduce-scatter(sum) along dim     |
| all_reduce      | Partial -> Replicate        | all-reduce(sum)                   |
| reduce_scatter  | Partial -> Shard(dim)       | all-gather along dim              |
| all_to_all      | Shard(g) -> Shard(s)        | all-to-all Shard(s) -> Shard(g)   |
| local_slice     | Replicate -> Shard(dim)     | zero-padded placement, no comm    |
| replicate_to_partial | Replicate -> Partial   | itself: first rank keeps, no comm |
| scale_grad      | identity                    | grad * factor                     |
| token_all_to_all | rows to the ranks counted  | the same with the counts transposed |

The planner's table of collectives (``planner/plan/collectives.py``) names each of these functions
with its backward kind, bytes and the call codegen writes; a new collective is an entry there,
its function here and a case in tests/test_comm.py (the table test runs every entry).

Shards are contiguous, equal chunks ordered by rank inside the group (torch.distributed orders
a group's ranks by ascending global rank). A group of size 1 makes every function the identity,
returning its input unchanged. `group` None means the default process group, as in
torch.distributed. Works on NCCL (CUDA tensors) and gloo (CPU tensors).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.function import FunctionCtx, once_differentiable
from torch.distributed import ProcessGroup

__all__ = ["all_gather", "all_reduce", "all_to_all", "exchange_counts", "local_slice", "reduce_scatter",
           "replicate_to_partial", "scale_grad", "token_all_to_all"]

# torch renamed the single-tensor collectives (all_gather_into_tensor -> all_gather_single);
# the old names still work on the torch versions we support but emit a FutureWarning.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_to_all_single = dist.all_to_all_single

# gloo's support for the single-tensor collectives (reduce_scatter_tensor, all_to_all_single) and
# for list all_to_all varies across torch releases, so on gloo we use only list all_gather and
# all_reduce (gloo runs CPU tests, where their extra traffic does not matter). Tests set this to
# False to run the NCCL code path on gloo, which supports the single-tensor calls in torch 2.11+.
_GLOO_FALLBACKS = True

_LOW_PRECISION = (torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------
# helpers


def _group_size_and_rank(group: ProcessGroup | None, op: str) -> tuple[int, int]:
    if group is dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError(f"{op}: this rank is not a member of the process group it was given")
    return dist.get_world_size(group), dist.get_rank(group)


def _normalize_dim(x: torch.Tensor, dim: int, op: str, name: str = "dim") -> int:
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"{op}: {name}={dim} is out of range for a tensor of shape {tuple(x.shape)}")
    return dim % x.dim()


def _check_even_split(x: torch.Tensor, dim: int, size: int, op: str) -> None:
    if x.shape[dim] % size != 0:
        raise ValueError(
            f"{op}: dim {dim} has size {x.shape[dim]}, which does not split evenly over a group of "
            f"{size} ranks (tensor shape {tuple(x.shape)}); only even splits are supported, so the "
            f"plan must not split this dim {size} ways"
        )


def _uses_gloo(x: torch.Tensor, group: ProcessGroup | None) -> bool:
    backend = str(dist.get_backend(group))
    if ":" in backend:  # a per-device backend string such as "cpu:gloo,cuda:nccl"
        per_device = dict(item.split(":", 1) for item in backend.split(","))
        return per_device.get(x.device.type) == "gloo"
    return backend == "gloo"


def _reduction_dtype(x: torch.Tensor, group: ProcessGroup | None) -> torch.dtype:
    # gloo's bf16/fp16 sums are not available on every build and accumulate in low precision;
    # summing in float32 is always supported and matches a float32 reference more closely.
    if x.dtype in _LOW_PRECISION and _uses_gloo(x, group):
        return torch.float32
    return x.dtype


def _contiguous_as(x: torch.Tensor, dtype: torch.dtype, fresh: bool = False) -> torch.Tensor:
    """`x`'s values as a contiguous tensor of `dtype`, copied at most once; a new tensor when `fresh`.

    Tensors handed to NCCL must be contiguous (it reads raw memory). Note that
    `Tensor.to(memory_format=torch.contiguous_format)` does not guarantee that for a transposed view.
    """
    if not fresh and x.dtype == dtype and x.is_contiguous():
        return x
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    out.copy_(x)
    return out


def _gather_along(x: torch.Tensor, dim: int, group: ProcessGroup | None, size: int) -> torch.Tensor:
    if _GLOO_FALLBACKS and _uses_gloo(x, group):
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts, dim=dim)
    # The single-tensor collective concatenates along dim 0, so move `dim` to the front.
    front = x.movedim(dim, 0).contiguous()
    out = front.new_empty((size * front.shape[0], *front.shape[1:]))
    _all_gather_single(out, front, group=group)
    return out.movedim(0, dim).contiguous()


def _reduce_scatter_along(
    x: torch.Tensor, dim: int, group: ProcessGroup | None, size: int, rank: int
) -> torch.Tensor:
    dtype = _reduction_dtype(x, group)
    if _GLOO_FALLBACKS and _uses_gloo(x, group):
        total = _contiguous_as(x, dtype, fresh=True)  # all_reduce works in place
        dist.all_reduce(total, group=group)
        # a compact copy, so the result does not keep the whole reduced tensor alive
        return _contiguous_as(total.chunk(size, dim)[rank], x.dtype, fresh=True)
    front = _contiguous_as(x.movedim(dim, 0), dtype)
    out = front.new_empty((front.shape[0] // size, *front.shape[1:]))
    _reduce_scatter_single(out, front, group=group)
    return _contiguous_as(out.movedim(0, dim), x.dtype)


def _sum_over(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    # A fresh tensor, since all_reduce works in place and the input may be saved or used elsewhere.
    total = _contiguous_as(x, _reduction_dtype(x, group), fresh=True)
    dist.all_reduce(total, group=group)
    return total.to(x.dtype)


def _exchange(
    x: torch.Tensor, gather_dim: int, scatter_dim: int, group: ProcessGroup | None, size: int, rank: int
) -> torch.Tensor:
    if _GLOO_FALLBACKS and _uses_gloo(x, group):
        # every rank gets every input and keeps its own scatter chunk of each (size x the memory)
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x, group=group)
        return torch.cat([part.chunk(size, scatter_dim)[rank] for part in parts], dim=gather_dim)
    # all_to_all_single sends equal slices of dim 0, so stack the scatter chunks along a new dim 0;
    # received slice i is rank i's chunk for this rank.
    send = torch.stack(x.chunk(size, scatter_dim))
    received = torch.empty_like(send)
    _all_to_all_single(received, send, group=group)
    return torch.cat(received.unbind(0), dim=gather_dim)


def _exchange_rows(x: torch.Tensor, counts: list[list[int]], group: ProcessGroup | None, size: int,
                   rank: int) -> torch.Tensor:
    """Rows of ``x`` to other ranks: ``counts[i][j]`` rows go from rank i to rank j, in rank order both ways."""
    send, receive = counts[rank], [row[rank] for row in counts]
    x = x.contiguous()
    if _GLOO_FALLBACKS and _uses_gloo(x, group):
        # every rank gets every rank's rows (padded to the longest) and keeps those sent to it
        longest = max(sum(row) for row in counts)
        padded = x.new_zeros((longest, *x.shape[1:]))
        padded[:x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(size)]
        dist.all_gather(parts, padded, group=group)
        starts = [sum(row[:rank]) for row in counts]
        return torch.cat([part[start:start + n] for part, start, n in zip(parts, starts, receive)])
    out = x.new_empty((sum(receive), *x.shape[1:]))
    _all_to_all_single(out, x, receive, send, group=group)
    return out


def _take_chunk(x: torch.Tensor, dim: int, size: int, rank: int) -> torch.Tensor:
    # a compact copy, so the full replicated tensor can be freed once its other uses are done
    return _contiguous_as(x.chunk(size, dim)[rank], x.dtype, fresh=True)


def _place_chunk(chunk: torch.Tensor, dim: int, size: int, rank: int) -> torch.Tensor:
    full_shape = list(chunk.shape)
    full_shape[dim] *= size
    full = chunk.new_zeros(full_shape)
    full.narrow(dim, rank * chunk.shape[dim], chunk.shape[dim]).copy_(chunk)
    return full


# ----------------------------------------------------------------------------------------------
# autograd functions


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx, x: torch.Tensor, dim: int, group: ProcessGroup | None, size: int, rank: int
    ) -> torch.Tensor:
        ctx.dim, ctx.group, ctx.size, ctx.rank = dim, group, size, rank
        return _gather_along(x, dim, group, size)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return _reduce_scatter_along(grad, ctx.dim, ctx.group, ctx.size, ctx.rank), None, None, None, None


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        return _sum_over(x, group)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return _sum_over(grad, ctx.group), None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx, x: torch.Tensor, dim: int, group: ProcessGroup | None, size: int, rank: int
    ) -> torch.Tensor:
        ctx.dim, ctx.group, ctx.size = dim, group, size
        return _reduce_scatter_along(x, dim, group, size, rank)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return _gather_along(grad, ctx.dim, ctx.group, ctx.size), None, None, None, None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx,
        x: torch.Tensor,
        gather_dim: int,
        scatter_dim: int,
        group: ProcessGroup | None,
        size: int,
        rank: int,
    ) -> torch.Tensor:
        ctx.gather_dim, ctx.scatter_dim = gather_dim, scatter_dim
        ctx.group, ctx.size, ctx.rank = group, size, rank
        return _exchange(x, gather_dim, scatter_dim, group, size, rank)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        # the inverse exchange: split the gradient along gather_dim, concatenate along scatter_dim
        grad_input = _exchange(grad, ctx.scatter_dim, ctx.gather_dim, ctx.group, ctx.size, ctx.rank)
        return grad_input, None, None, None, None, None


class _TokenAllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, x: torch.Tensor, counts: list[list[int]], group: ProcessGroup | None,
                size: int, rank: int) -> torch.Tensor:
        ctx.counts, ctx.group, ctx.size, ctx.rank = counts, group, size, rank
        return _exchange_rows(x, counts, group, size, rank)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        # the rows' gradients go back where the rows came from: the counts transposed
        transposed = [list(column) for column in zip(*ctx.counts)]
        return _exchange_rows(grad, transposed, ctx.group, ctx.size, ctx.rank), None, None, None, None


class _LocalSlice(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, x: torch.Tensor, dim: int, size: int, rank: int) -> torch.Tensor:
        ctx.dim, ctx.size, ctx.rank = dim, size, rank
        return _take_chunk(x, dim, size, rank)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return _place_chunk(grad, ctx.dim, ctx.size, ctx.rank), None, None, None


class _ReplicateToPartial(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, x: torch.Tensor, keep: bool) -> torch.Tensor:
        ctx.keep = keep
        return x.view_as(x) if keep else torch.zeros_like(x)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        # Zeros, not None: the other ranks' parameter still gets a gradient for the reducer to sum.
        return (grad if ctx.keep else torch.zeros_like(grad)), None


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return grad * ctx.factor, None


# ----------------------------------------------------------------------------------------------
# public API


def all_gather(x: torch.Tensor, dim: int, group: ProcessGroup | None) -> torch.Tensor:
    """Shard(dim) -> Replicate: concatenate every rank's `x` along `dim`, in group-rank order.

    The result has `x.shape[dim] * group_size` along `dim`. Backward reduce-scatters (sums) the
    Partial gradient of the result back to this rank's Shard(dim).
    """
    size, rank = _group_size_and_rank(group, "all_gather")
    dim = _normalize_dim(x, dim, "all_gather")
    if size == 1:
        return x
    return _AllGather.apply(x, dim, group, size, rank)


def all_reduce(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Partial -> Replicate: the sum of `x` over the group, same shape, on every rank.

    Backward all-reduces (sums) the Partial gradient of the result, which gives the Replicate
    gradient of the Partial input. The input is never modified.
    """
    size, _ = _group_size_and_rank(group, "all_reduce")
    if size == 1:
        return x
    return _AllReduce.apply(x, group)


def reduce_scatter(x: torch.Tensor, dim: int, group: ProcessGroup | None) -> torch.Tensor:
    """Partial -> Shard(dim): sum `x` over the group and keep this rank's chunk along `dim`.

    `x.shape[dim]` must be divisible by the group size (ValueError otherwise); the result has
    `x.shape[dim] // group_size` along `dim`. Backward all-gathers the Shard gradient into the
    Replicate gradient of the Partial input.
    """
    size, rank = _group_size_and_rank(group, "reduce_scatter")
    dim = _normalize_dim(x, dim, "reduce_scatter")
    _check_even_split(x, dim, size, "reduce_scatter")
    if size == 1:
        return x
    return _ReduceScatter.apply(x, dim, group, size, rank)


def all_to_all(
    x: torch.Tensor, gather_dim: int, scatter_dim: int, group: ProcessGroup | None
) -> torch.Tensor:
    """Shard(gather_dim) -> Shard(scatter_dim): split `x` along `scatter_dim` into group-size chunks,
    send chunk j to rank j, and concatenate the chunks received along `gather_dim` in rank order.

    `x.shape[scatter_dim]` must be divisible by the group size (ValueError otherwise). The result
    has `x.shape[gather_dim] * size` along `gather_dim` and `x.shape[scatter_dim] // size` along
    `scatter_dim`. Backward is the inverse all-to-all, Shard(scatter_dim) -> Shard(gather_dim).
    """
    size, rank = _group_size_and_rank(group, "all_to_all")
    gather_dim = _normalize_dim(x, gather_dim, "all_to_all", "gather_dim")
    scatter_dim = _normalize_dim(x, scatter_dim, "all_to_all", "scatter_dim")
    if gather_dim == scatter_dim:
        raise ValueError(
            f"all_to_all: gather_dim and scatter_dim are both {gather_dim}; "
            f"Shard({gather_dim}) -> Shard({gather_dim}) needs no redistribution"
        )
    _check_even_split(x, scatter_dim, size, "all_to_all")
    if size == 1:
        return x
    return _AllToAll.apply(x, gather_dim, scatter_dim, group, size, rank)


def exchange_counts(send_counts: torch.Tensor, group: ProcessGroup | None) -> list[list[int]]:
    """Every rank's row counts for every rank: ``counts[i][j]`` is what rank i sends rank j.

    ``send_counts`` [group size] (integers, on the device of the data) is this rank's row of it. One
    all-gather of group-size integers per rank; the result is on the host, as split sizes must be.
    """
    size, _ = _group_size_and_rank(group, "exchange_counts")
    if size == 1:
        return [send_counts.tolist()]
    mine = send_counts.to(torch.int64).contiguous()
    parts = [torch.empty_like(mine) for _ in range(size)]
    dist.all_gather(parts, mine, group=group)
    return torch.stack(parts).tolist()


def token_all_to_all(x: torch.Tensor, counts: list[list[int]], group: ProcessGroup | None) -> torch.Tensor:
    """Rows of ``x`` [n, ...] to the ranks that want them, uneven counts: ``counts`` from ``exchange_counts``.

    ``x``'s rows are grouped by destination (``counts[me][0]`` rows for rank 0, then rank 1's, ...,
    summing to n); the result holds the rows every rank sent this one, grouped by source in rank order
    ([sum_i counts[i][me], ...]). The experts' dispatch and, with the counts transposed, their combine
    (kernels/moe/dispatch.py). Backward sends each row's gradient back to the rank it came from.
    """
    size, rank = _group_size_and_rank(group, "token_all_to_all")
    if x.shape[0] != sum(counts[rank]):
        raise ValueError(f"token_all_to_all: {x.shape[0]} rows to send, but the counts give {sum(counts[rank])}")
    if size == 1:
        return x
    return _TokenAllToAll.apply(x, counts, group, size, rank)


def local_slice(x: torch.Tensor, dim: int, group: ProcessGroup | None) -> torch.Tensor:
    """Replicate -> Shard(dim) without communication: this rank's contiguous chunk along `dim`.

    The chunk index is this rank's index in `group`; `x.shape[dim]` must be divisible by the group
    size (ValueError otherwise). The result is a compact copy. Backward places the Shard gradient
    into a zero tensor of the full shape, the Partial gradient of the Replicate input.
    """
    size, rank = _group_size_and_rank(group, "local_slice")
    dim = _normalize_dim(x, dim, "local_slice")
    _check_even_split(x, dim, size, "local_slice")
    if size == 1:
        return x
    return _LocalSlice.apply(x, dim, size, rank)


def replicate_to_partial(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Replicate -> Partial without communication: `x` on the group's first rank, zeros elsewhere.

    The sum over the group is `x` once. Used for a summand of a split reduction (a row-parallel
    linear's bias), which every rank would otherwise add to its partial sum. Backward is the same
    transition: the Replicate gradient of the result, kept on the first rank and zero elsewhere, is
    the Partial gradient of the Replicate input.
    """
    size, rank = _group_size_and_rank(group, "replicate_to_partial")
    if size == 1:
        return x
    return _ReplicateToPartial.apply(x, rank == 0)


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity in the forward pass; multiplies the gradient by `factor` in the backward pass.

    The generated code applies it to the loss with factor 1/plan_ngpus, so that the gradients of
    computation replicated on all unit ranks sum to the true gradient exactly once.
    """
    if factor == 1.0:
        return x
    return _ScaleGrad.apply(x, factor)
