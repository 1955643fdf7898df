"""Gradient reduction for local parameter shards, bucketed and overlapped with backward.

Per docs/contract.md, after ``loss.backward()`` the true gradient of a shard is the sum of its
local gradients over the ranks of the copy holding it; averaging the ``dp_size`` copies then
gives the gradient of the global batch. Both are done by one all-reduce(sum) over the shard's
global holders (``ctx.shard_group(unit_ranks)``) followed by a division by ``dp_size``.

Gradients are accumulated in fp32 buffers owned by the reducer (``main_grad``), whatever the
parameter dtype: a post-accumulate-grad hook adds ``param.grad`` into the parameter's slot of a
flat bucket and frees ``param.grad``. So bf16 parameters accumulate micro-batches in fp32, and
no full-size ``param.grad`` stays alive after its hook ran.

With ``keep_param_dtype`` (plan.json's ``gradients.param_dtype_single_holder``, valid for one
micro-batch per step only) a shard held by one rank of the whole world keeps its gradient in the
parameter's dtype instead: nothing is summed into it (one micro-batch, no reduction), so an fp32
buffer would only hold the widened autograd gradient, and the optimizer widens it itself
(docs/design.md, "Gradient buffers"). That halves the gradient memory of a one-GPU bf16 run. Buckets hold shards with the same
holders (one communicator per bucket); when the last shard of a bucket got its gradient on the
synchronizing micro-step, the bucket's all-reduce is launched asynchronously while backward
continues.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from ..distributed import ParallelContext
    from ..module import LocalParameter


def global_holders(unit_ranks: Sequence[int], plan_ngpus: int, dp_size: int) -> list[int]:
    """Sorted global ranks holding a shard held by ``unit_ranks`` in every copy (contract, Ranks)."""
    return sorted(c * plan_ngpus + u for u in unit_ranks for c in range(dp_size))


@dataclass
class _Bucket:
    group_key: tuple[int, ...]
    members: list[int]  # indices into the reducer's parameter list, in bucket order
    offsets: list[int]  # element offset of each member in ``flat``
    flat: torch.Tensor  # gradient buffer (fp32, or the members' dtype); main grads are views into it
    ready: set[int] = field(default_factory=set)
    work: dist.Work | None = None


class GradReducer:
    """Owns the gradient buffers of local shards and reduces them across holders.

    Usage per optimizer step::

        for k in range(accumulation_steps):
            with reducer.no_sync() if k < accumulation_steps - 1 else contextlib.nullcontext():
                (loss / accumulation_steps).backward()
        grads = reducer.finish()      # reduced gradients, one per local parameter
        ...optimizer step...
        reducer.zero_grad()

    Requires every rank holding a shard group to list that group's shards in the same order in
    ``local_params`` (the generated modules list parameters in plan order); the constructor checks
    this once with a collective over the whole world, so it must be called on every rank.
    ``keep_param_dtype``: see the module docstring; the caller guarantees one micro-batch per step.
    """

    def __init__(
        self,
        local_params: Sequence[LocalParameter],
        ctx: ParallelContext,
        bucket_size_mb: float = 25.0,
        keep_param_dtype: bool = False,
    ) -> None:
        self.ctx = ctx
        self.keep_param_dtype = keep_param_dtype
        self.local_params = list(local_params)
        self._sync = True
        self._reduced = False
        self._bucket_of: list[_Bucket] = []
        self._grads: list[torch.Tensor] = []
        self._groups: dict[tuple[int, ...], dist.ProcessGroup | None] = {}
        self._buckets_by_group: dict[tuple[int, ...], list[_Bucket]] = {}
        self._next_launch: dict[tuple[int, ...], int] = {}
        bucket_cap = max(1, int(bucket_size_mb * 2**20 / 4))

        # Gradients arrive roughly in reverse declaration order, so buckets are filled from the
        # last parameter backwards; within a group, buckets are launched strictly in this order
        # so that every holder issues the group's collectives in the same sequence.
        by_group: dict[tuple[int, ...], list[int]] = {}
        for index in reversed(range(len(self.local_params))):
            lp = self.local_params[index]
            if not lp.param.requires_grad:
                raise ValueError(f"local parameter {lp.name} does not require grad; the reducer "
                                 "expects every local shard to be trainable")
            by_group.setdefault(tuple(sorted(lp.unit_ranks)), []).append(index)
        bucket_of: dict[int, _Bucket] = {}
        grads: dict[int, torch.Tensor] = {}
        for key, indices in by_group.items():
            self._groups[key] = ctx.shard_group(key)
            buckets: list[_Bucket] = []
            chunk: list[int] = []
            size = 0
            for index in indices + [-1]:
                numel = self.local_params[index].param.numel() if index >= 0 else 0
                dtype = self._grad_dtype(key, index) if index >= 0 else None
                if chunk and (index < 0 or size + numel > bucket_cap or dtype != self._grad_dtype(key, chunk[0])):
                    buckets.append(self._make_bucket(key, chunk, bucket_of, grads))
                    chunk, size = [], 0
                if index >= 0:
                    chunk.append(index)
                    size += numel
            self._buckets_by_group[key] = buckets
            self._next_launch[key] = 0
        self._bucket_of = [bucket_of[i] for i in range(len(self.local_params))]
        self._grads = [grads[i] for i in range(len(self.local_params))]
        self._check_layout_matches_holders()
        self._hooks = [
            lp.param.register_post_accumulate_grad_hook(self._make_hook(i))
            for i, lp in enumerate(self.local_params)
        ]

    def _grad_dtype(self, key: tuple[int, ...], index: int) -> torch.dtype:
        """The dtype of parameter ``index``'s gradient buffer: its own when nothing is ever summed into it."""
        single_holder = len(key) == 1 and self.ctx.dp_size == 1
        if self.keep_param_dtype and single_holder:
            return self.local_params[index].param.dtype
        return torch.float32

    def _make_bucket(
        self,
        key: tuple[int, ...],
        members: list[int],
        bucket_of: dict[int, _Bucket],
        grads: dict[int, torch.Tensor],
    ) -> _Bucket:
        device = self.local_params[members[0]].param.device
        offsets, total = [], 0
        for index in members:
            offsets.append(total)
            total += self.local_params[index].param.numel()
        flat = torch.zeros(total, dtype=self._grad_dtype(key, members[0]), device=device)
        bucket = _Bucket(key, list(members), offsets, flat)
        for index, offset in zip(members, offsets):
            param = self.local_params[index].param
            if param.device != device:
                raise ValueError(f"local parameter {self.local_params[index].name} is on {param.device}, "
                                 f"others of its shard group on {device}")
            bucket_of[index] = bucket
            grads[index] = flat[offset:offset + param.numel()].view(param.shape)
        return bucket

    def _check_layout_matches_holders(self) -> None:
        # A flat bucket is summed element-wise across holders, so the holders must lay out the
        # same shards in the same order; a mismatch would silently mix different gradients.
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return
        layout = {
            key: [[(self.local_params[i].name, tuple(self.local_params[i].slices)) for i in b.members]
                  for b in buckets]
            for key, buckets in self._buckets_by_group.items()
        }
        layouts: list[dict] = [None] * dist.get_world_size()  # type: ignore[list-item]
        dist.all_gather_object(layouts, layout)
        ctx = self.ctx
        for key, mine in layout.items():
            for other in global_holders(key, ctx.plan_ngpus, ctx.dp_size):
                theirs = layouts[other].get(key)
                if theirs != mine:
                    raise RuntimeError(
                        f"gradient buckets of shards held by unit ranks {list(key)} differ between global "
                        f"rank {ctx.rank} and {other}: {mine} vs {theirs}. Every holder must list these "
                        "shards in the same order in local_parameters(); regenerate the compile output"
                    )

    def _make_hook(self, index: int):
        def hook(param: torch.Tensor) -> None:
            if self._grads[index].dtype != torch.float32 and index in self._bucket_of[index].ready:
                raise RuntimeError(f"{self.local_params[index].name} received a second gradient in one backward; "
                                   "its buffer keeps the parameter dtype and cannot sum exactly: build the reducer "
                                   "without keep_param_dtype")
            self._grads[index].add_(param.grad)
            # The buffer now holds the gradient; dropping param.grad keeps at most one
            # parameter-sized gradient alive during backward.
            param.grad = None
            if self._sync:
                bucket = self._bucket_of[index]
                bucket.ready.add(index)
                if len(bucket.ready) == len(bucket.members):
                    self._launch_ready(bucket.group_key)
        return hook

    def _launch_ready(self, key: tuple[int, ...], force: bool = False) -> None:
        buckets = self._buckets_by_group[key]
        while self._next_launch[key] < len(buckets):
            bucket = buckets[self._next_launch[key]]
            if not force and len(bucket.ready) < len(bucket.members):
                return
            group = self._groups[key]
            if group is not None:
                bucket.work = dist.all_reduce(bucket.flat, op=dist.ReduceOp.SUM, group=group, async_op=True)
            self._next_launch[key] += 1

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Inside, backward only accumulates into the buffers; nothing is communicated.

        Use it for every micro-step but the last of an optimizer step.
        """
        if self.keep_param_dtype:
            raise RuntimeError("gradients kept in the parameter dtype cannot accumulate micro-batches; build the "
                               "reducer without keep_param_dtype for gradient accumulation")
        previous, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = previous

    def finish(self) -> list[torch.Tensor]:
        """Complete the reduction and return the reduced gradients.

        Launches buckets whose parameters got no gradient in the last backward (unused shards,
        or a last micro-step run inside ``no_sync``), waits for all, and divides by ``dp_size``.
        Returns one tensor per local parameter (fp32, or the parameter's dtype under
        ``keep_param_dtype``), in ``local_params`` order, shaped like it:
        the true gradient of the global batch's mean loss, identical on every holder.
        """
        if self._reduced:
            raise RuntimeError("finish() called twice without zero_grad() in between")
        for key in self._buckets_by_group:
            self._launch_ready(key, force=True)
        for buckets in self._buckets_by_group.values():
            for bucket in buckets:
                if bucket.work is not None:
                    bucket.work.wait()
                    bucket.work = None
                if self.ctx.dp_size > 1:
                    bucket.flat.div_(self.ctx.dp_size)
        self._reduced = True
        return list(self._grads)

    @property
    def launched_buckets(self) -> tuple[int, int]:
        """(buckets whose all-reduce was launched this step, total buckets); shows the overlap."""
        total = sum(len(b) for b in self._buckets_by_group.values())
        return sum(self._next_launch.values()), total

    @property
    def grads(self) -> list[torch.Tensor]:
        """The gradient buffers (views), one per local parameter; reduced only after finish()."""
        return list(self._grads)

    def zero_grad(self) -> None:
        """Zero the buffers and forget which buckets were reduced, ready for the next step."""
        for buckets in self._buckets_by_group.values():
            for bucket in buckets:
                if bucket.work is not None:
                    raise RuntimeError("zero_grad() called while a gradient all-reduce is in flight; "
                                       "call finish() first")
                bucket.flat.zero_()
                bucket.ready.clear()
        for key in self._next_launch:
            self._next_launch[key] = 0
        self._reduced = False
        for lp in self.local_params:
            lp.param.grad = None

    def close(self) -> None:
        """Remove the backward hooks; the reducer must not be used afterwards."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []


def keeps_param_dtype(plan: Mapping[str, Any], accumulation: int) -> bool:
    """Whether this run's reducer may keep single-holder gradients in the parameter dtype.

    True when plan.json's ``gradients.param_dtype_single_holder`` says the plan was priced that
    way and the run has one micro-batch per step (``accumulation``). A plan priced that way run
    with accumulation keeps fp32 buffers (exact, but above the plan's memory estimate) and warns.
    """
    priced = bool((plan.get("gradients") or {}).get("param_dtype_single_holder", False))
    if priced and accumulation > 1:
        warnings.warn(f"the plan was compiled for one micro-batch per step but the run accumulates {accumulation}: "
                      "gradients stay in fp32, above the plan's memory estimate; compile with policy option "
                      f"grad_accumulation_steps={accumulation} to plan for it", stacklevel=2)
    return priced and accumulation == 1
