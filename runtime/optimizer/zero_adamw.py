"""AdamW over local parameter shards with fp32 master weights and ZeRO-1 state sharding.

Layout. A rank's local shards, flattened in ``local_params`` order, form one flat range of
``N`` elements. The ranks of ``ctx.dp_group`` (same unit rank, one per copy) hold identical
shards, so with ZeRO the flat range is split into ``dp_size`` contiguous parts of
``ceil(N / dp_size)`` elements and copy ``c`` owns part ``c``: it keeps fp32 master weights and
AdamW moments only for that part, updates it, and all-gathers the updated parameters over the
dp group. A part intersects each shard in at most one contiguous range, a *piece*; pieces are
what the state is stored and checkpointed in, named by the parameter's original name and the
piece's ``[lo, hi)`` range within the flattened shard (whose place in the full tensor is given by
the shard's ``slices``).

Master weights: parameters kept in fp32 are their own master (pieces are views into them);
for bf16 parameters a separate fp32 copy of each owned piece is kept, taken from the parameter
values before they are cast (pass ``param_dtype``), so no precision is lost at start.

The update itself is ``torch.optim.adamw.adamw`` (the functional form of torch.optim.AdamW), so
a step equals torch.optim.AdamW's on the same gradients.

Offload (``offload=True``): masters and moments of the owned pieces live in page-locked host memory
(``runtime/optimizer/host_adamw.py``), a separate fp32 master even for fp32 parameters, and the update
runs on the CPU or on the GPU over streamed chunks (``update_device``; ``auto`` times both once at
construction). Gradients, their norm, clipping and the ZeRO all-gather stay on the device; the
checkpointed tensors and metadata are the same as without offload.

Gradients may come in the parameters' dtype (single-holder shards of a one-micro-batch step,
``runtime/optimizer/grad_reducer.py``); the update widens them to fp32 in bounded temporaries and applies
the clipping factor to the widened copy, so its arithmetic is that of fp32 gradients.
"""

from __future__ import annotations

import bisect
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.optim.adamw import adamw

from .host_adamw import (
    UPDATE_DEVICES,
    HostAdamState,
    choose_update_device,
    scale_fp32_in_place,
    widen_and_scale,
)

if TYPE_CHECKING:
    from ..distributed import ParallelContext
    from ..module import LocalParameter

# torch renamed all_gather_into_tensor to all_gather_single; use whichever this torch has.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

OPTIMIZER_KEYS = ("optimizer.exp_avg", "optimizer.exp_avg_sq")
MASTER_KEY = "master"


def offloads_optimizer(plan: Mapping[str, Any]) -> bool:
    """Whether plan.json puts the optimizer state in host memory (its ``offload.optimizer``): pass it as
    ``ZeroAdamW(offload=...)``, so the run holds what the plan's estimate priced."""
    return bool((plan.get("offload") or {}).get("optimizer"))


@dataclass
class StepResult:
    """Outcome of one optimizer step."""

    grad_norm: float  # global L2 norm of the gradient before clipping (inf/nan when non-finite)
    skipped: bool  # True when the step was skipped because grad_norm was not finite


@dataclass
class _Piece:
    index: int  # into local_params
    lo: int  # [lo, hi) within the flattened local shard
    hi: int
    master: torch.Tensor  # fp32; a view into the parameter when it is fp32
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    decay: bool


class ZeroAdamW:
    """AdamW over this rank's local shards (see the module docstring for the layout).

    ``zero=False`` keeps full state for all local shards on every dp copy (no all-gather).
    Weight decay is applied to shards of parameters whose full tensor has more than one dim;
    1-D parameters (norm weights, biases) are never decayed.
    """

    def __init__(
        self,
        local_params: Sequence[LocalParameter],
        ctx: ParallelContext,
        *,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        zero: bool = True,
        param_dtype: torch.dtype | None = None,
        gather_chunk_numel: int = 2**26,
        offload: bool = False,
        update_device: str = "auto",
        offload_chunk_numel: int = 2**24,
        widen_numel: int = 2**26,
    ) -> None:
        self.ctx = ctx
        self.local_params = list(local_params)
        self.betas = betas
        self.eps = eps
        self.weight_decay = weight_decay
        self.zero = zero
        self.step_count = 0  # optimizer updates applied (skipped steps not counted)
        self.skipped_steps = 0
        self._gather_chunk_numel = gather_chunk_numel
        self._widen_numel = widen_numel
        if update_device not in UPDATE_DEVICES:
            raise ValueError(f"update_device must be one of {UPDATE_DEVICES}, got {update_device!r}")
        self.offload = offload
        self.update_device = update_device if offload else "gpu" if ctx.device.type == "cuda" else "cpu"
        self.update_rates: dict[str, float] = {}  # elements/s per update device, when measured
        self.host_state: HostAdamState | None = None

        self._offsets: list[int] = []
        total = 0
        for lp in self.local_params:
            if not lp.param.is_contiguous():
                raise ValueError(f"local parameter {lp.name} is not contiguous; the optimizer views shards flat")
            self._offsets.append(total)
            total += lp.param.numel()
        self._numel = total
        self._parts = ctx.dp_size if (zero and ctx.dp_size > 1) else 1
        self._part_len = math.ceil(total / self._parts) if total else 0
        part = ctx.copy_index if self._parts > 1 else 0
        own_lo = min(part * self._part_len, total)
        own_hi = min(own_lo + self._part_len, total)
        self._own_lo = part * self._part_len

        final_dtypes = {param_dtype or lp.param.dtype for lp in self.local_params}
        self.keep_master = any(dtype != torch.float32 for dtype in final_dtypes)
        # One dtype for the parameter all-gather: the parameters' own when uniform.
        self._comm_dtype = final_dtypes.pop() if len(final_dtypes) == 1 else torch.float32

        owned = []
        for index, lp in enumerate(self.local_params):
            start = self._offsets[index]
            lo, hi = max(own_lo, start) - start, min(own_hi, start + lp.param.numel()) - start
            if hi > lo:
                owned.append((index, lo, hi))
        if offload:
            self.host_state = HostAdamState([hi - lo for _, lo, hi in owned],
                                            [len(self.local_params[i].full_shape) > 1 for i, _, _ in owned],
                                            ctx.device, chunk_numel=offload_chunk_numel)
        self._pieces: list[_Piece] = []
        for k, (index, lo, hi) in enumerate(owned):
            lp = self.local_params[index]
            flat = lp.param.detach().view(-1)[lo:hi]
            if self.host_state is not None:
                master = self.host_state.master(k)
                master.copy_(flat)  # from the values before any cast, on the host
                exp_avg, exp_avg_sq = self.host_state.exp_avg(k), self.host_state.exp_avg_sq(k)
            else:
                separate = (param_dtype or lp.param.dtype) != torch.float32
                master = flat.float().clone() if separate else flat
                exp_avg, exp_avg_sq = torch.zeros_like(master), torch.zeros_like(master)
            self._pieces.append(_Piece(
                index=index, lo=lo, hi=hi, master=master, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq,
                decay=len(lp.full_shape) > 1,
            ))
        if param_dtype is not None:
            cast = False
            for lp in self.local_params:
                if lp.param.dtype != param_dtype:
                    lp.param.data = lp.param.data.to(param_dtype)
                    cast = True
            if cast and ctx.device.type == "cuda":
                # The full-precision copies just dropped would stay in the allocator's cache: hand
                # them back, so that what a training step reserves is its own (the budget's margin).
                torch.cuda.empty_cache()
        # Squared norms of replicated shards are counted once per holder inside a copy.
        self._norm_weights = [1.0 / len(self.local_params[p.index].unit_ranks) for p in self._pieces]
        if self.host_state is not None and self.update_device == "auto":
            # Before any step or state load: the probe leaves fresh state and parameters unchanged.
            self.update_device, self.update_rates = choose_update_device(
                self.host_state, [self._param_view(p) for p in self._pieces])

    # ------------------------------------------------------------------------------------------
    # step

    def grad_norm(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """Global L2 norm over every distinct shard of every parameter (fp32 scalar on this device).

        Each element of each parameter is counted exactly once: a rank sums squares over its
        owned pieces (dp copies own disjoint parts), weighted by 1/len(unit_ranks) for shards
        held by several unit ranks of the copy, and the sums are all-reduced.
        """
        device = self.local_params[0].param.device if self.local_params else self.ctx.device
        squares = torch.zeros((), dtype=torch.float32, device=device)
        pieces = self._grad_pieces(grads)
        if pieces:
            norms = torch.stack(torch._foreach_norm(pieces, 2, dtype=torch.float32))
            weights = torch.tensor(self._norm_weights, dtype=torch.float32, device=norms.device)
            squares = (norms.square() * weights).sum().to(device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            # With ZeRO the dp copies own disjoint parts, so the whole world sums each element
            # once; without it every copy holds everything and one copy's ranks suffice.
            group = None if self._parts > 1 or self.ctx.dp_size == 1 else self.ctx.unit_group
            dist.all_reduce(squares, op=dist.ReduceOp.SUM, group=group)
        return squares.sqrt()

    def step(self, grads: Sequence[torch.Tensor], lr: float, max_grad_norm: float | None = None) -> StepResult:
        """Clip and apply one AdamW update from reduced gradients; parameters updated on every rank.

        ``grads``: one tensor per local parameter (``GradReducer.finish()``: fp32, or the
        parameter's dtype for single-holder shards), the true gradient of the global batch,
        identical on all holders. The update sees them widened to fp32 and scaled so that the
        global norm is at most ``max_grad_norm`` (like torch.nn.utils.clip_grad_norm_; None or
        <= 0 disables); fp32 gradients are scaled in place, low-precision ones are widened into
        bounded fp32 temporaries and left unchanged. When the global norm is not finite nothing is
        updated, ``skipped_steps`` grows by one and the result says so; every rank takes the same
        decision.
        """
        if len(grads) != len(self.local_params):
            raise ValueError(f"expected {len(self.local_params)} gradients, got {len(grads)}")
        total_norm = self.grad_norm(grads)
        norm = float(total_norm.item())
        if not math.isfinite(norm):
            self.skipped_steps += 1
            return StepResult(grad_norm=norm, skipped=True)
        pieces = self._grad_pieces(grads)
        scale = None
        if max_grad_norm is not None and max_grad_norm > 0 and pieces:
            # Same arithmetic as torch.nn.utils.clip_grad_norm_.
            scale = torch.clamp(max_grad_norm / (total_norm + 1e-6), max=1.0).to(pieces[0].device)
        if self.host_state is not None:
            self.host_state.step(self.update_device, pieces, [self._param_view(p) for p in self._pieces],
                                 step=self.step_count + 1, lr=lr, betas=self.betas, eps=self.eps,
                                 weight_decay=self.weight_decay, grad_scale=scale)
        else:
            self._update_on_device(pieces, scale, lr)
        self.step_count += 1
        self._set_counters(self.step_count, self.skipped_steps)
        if self.keep_master and self._pieces and self.host_state is None:
            torch._foreach_copy_([self._param_view(p) for p in self._pieces], [p.master for p in self._pieces])
        self._all_gather_params()
        return StepResult(grad_norm=norm, skipped=False)

    def _update_on_device(self, grad_pieces: list[torch.Tensor], scale: torch.Tensor | None, lr: float) -> None:
        """AdamW on the device-resident state, in batches whose fp32 gradient copies stay bounded.

        fp32 gradients are used in place (scaled in place when clipping); low-precision ones are
        widened ``widen_numel`` elements at a time, cutting pieces where needed. AdamW's step
        counter is passed per call as a fresh tensor holding the step before this one (``step_count``),
        since a cut piece appears in several calls.
        """
        scale_fp32_in_place(grad_pieces, scale)
        for decay in (True, False):
            for batch in _widening_batches([(i, g) for i, g in enumerate(grad_pieces) if self._pieces[i].decay == decay],
                                           self._widen_numel):
                masters, grads, exp_avgs, exp_avg_sqs = [], [], [], []
                for i, lo, hi in batch:
                    piece, grad = self._pieces[i], grad_pieces[i][lo:hi]
                    masters.append(piece.master[lo:hi])
                    exp_avgs.append(piece.exp_avg[lo:hi])
                    exp_avg_sqs.append(piece.exp_avg_sq[lo:hi])
                    grads.append(grad if grad.dtype == torch.float32 else widen_and_scale(grad, scale))
                steps = [torch.full((), float(self.step_count), dtype=torch.float32, device=m.device) for m in masters]
                adamw(masters, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, beta1=self.betas[0],
                      beta2=self.betas[1], lr=lr, weight_decay=self.weight_decay if decay else 0.0, eps=self.eps,
                      maximize=False)

    def _grad_pieces(self, grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [grads[p.index].reshape(-1)[p.lo:p.hi] for p in self._pieces]

    def _param_view(self, piece: _Piece) -> torch.Tensor:
        return self.local_params[piece.index].param.detach().view(-1)[piece.lo:piece.hi]

    # ------------------------------------------------------------------------------------------
    # parameter all-gather over the dp group

    def _flat_ranges(self, lo: int, hi: int):
        """Yield (param index, start in param, stop in param, start in [lo, hi)) covering [lo, hi)."""
        index = max(0, bisect.bisect_right(self._offsets, lo) - 1)
        while index < len(self.local_params) and self._offsets[index] < hi:
            start = self._offsets[index]
            a, b = max(lo, start), min(hi, start + self.local_params[index].param.numel())
            if b > a:
                yield index, a - start, b - start, a - lo
            index += 1

    def _all_gather_params(self) -> None:
        if self._parts == 1:
            return
        group = self.ctx.dp_group
        device = self.local_params[0].param.device if self.local_params else self.ctx.device
        on_gloo = str(dist.get_backend(group)).endswith("gloo")
        # Chunks bound the temporary buffer to parts * chunk elements.
        for start in range(0, self._part_len, self._gather_chunk_numel):
            length = min(self._gather_chunk_numel, self._part_len - start)
            send = torch.zeros(length, dtype=self._comm_dtype, device=device)
            own = self._own_lo + start
            for index, a, b, at in self._flat_ranges(own, own + length):
                send[at:at + b - a].copy_(self.local_params[index].param.detach().view(-1)[a:b])
            received = torch.empty(length * self._parts, dtype=self._comm_dtype, device=device)
            if on_gloo:
                dist.all_gather(list(received.split(length)), send, group=group)
            else:
                _all_gather_single(received, send, group=group)
            for part in range(self._parts):
                if part == self.ctx.copy_index:
                    continue
                first = part * self._part_len + start
                chunk = received[part * length:(part + 1) * length]
                for index, a, b, at in self._flat_ranges(first, first + length):
                    self.local_params[index].param.detach().view(-1)[a:b].copy_(chunk[at:at + b - a])

    # ------------------------------------------------------------------------------------------
    # state

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """This rank's optimizer state as (tensors, JSON-able metadata).

        Tensors: ``optimizer.exp_avg.<name>``, ``optimizer.exp_avg_sq.<name>`` and, when fp32
        masters are kept apart from bf16 parameters, ``master.<name>``: 1-D fp32 pieces. The
        metadata's ``pieces`` list gives for each ``name`` its shard ``slices`` in the full tensor,
        the shard ``shape`` and the piece's ``flat_range`` ``[lo, hi)`` in the flattened shard.
        """
        tensors: dict[str, torch.Tensor] = {}
        pieces = []
        for piece in self._pieces:
            lp = self.local_params[piece.index]
            tensors[f"optimizer.exp_avg.{lp.name}"] = piece.exp_avg
            tensors[f"optimizer.exp_avg_sq.{lp.name}"] = piece.exp_avg_sq
            if self.keep_master:
                tensors[f"{MASTER_KEY}.{lp.name}"] = piece.master
            pieces.append({"name": lp.name, "slices": [list(s) for s in lp.slices],
                           "shape": list(lp.param.shape), "flat_range": [piece.lo, piece.hi]})
        meta = {"step_count": self.step_count, "skipped_steps": self.skipped_steps, "betas": list(self.betas),
                "eps": self.eps, "weight_decay": self.weight_decay, "zero": self.zero,
                "keep_master": self.keep_master, "pieces": pieces}
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Restore state saved by ``state_dict`` under the same plan and world size.

        Parameters must already hold their checkpointed values: when this optimizer keeps fp32
        masters but the saved state has none (it came from an fp32 run), masters are taken from
        the parameters. Raises ValueError when the pieces differ (another layout: load a merged
        checkpoint instead).
        """
        mine = self.state_dict()[1]["pieces"]
        if meta["pieces"] != mine:
            raise ValueError(
                "the checkpoint's optimizer pieces do not match this rank's layout (different plan, "
                "world size or zero setting); merge the checkpoint with tools/ckpt_merger.py and resume "
                "from the merged file"
            )
        for piece in self._pieces:
            name = self.local_params[piece.index].name
            piece.exp_avg.copy_(tensors[f"optimizer.exp_avg.{name}"])
            piece.exp_avg_sq.copy_(tensors[f"optimizer.exp_avg_sq.{name}"])
            if self.keep_master or self.offload:
                master = tensors.get(f"{MASTER_KEY}.{name}") if self.keep_master else None
                piece.master.copy_(master if master is not None else self._param_view(piece))
        self._set_counters(int(meta["step_count"]), int(meta["skipped_steps"]))

    def load_full_state(
        self,
        read: Callable[[str, tuple[tuple[int, int], ...]], torch.Tensor | None],
        step_count: int,
        skipped_steps: int = 0,
    ) -> None:
        """Restore state from full tensors keyed by original names (a merged checkpoint).

        ``read(key, slices)`` returns the region ``slices`` of full tensor ``key`` (e.g.
        ``optimizer.exp_avg.<name>``) or None when absent. Parameters must already hold their
        loaded values. Missing moments start from zero and AdamW's step counter from 0 (with a
        warning); a missing master is taken from the saved parameter ``<name>``.
        """
        missing = []
        for piece in self._pieces:
            lp = self.local_params[piece.index]
            for key, target in (("optimizer.exp_avg", piece.exp_avg), ("optimizer.exp_avg_sq", piece.exp_avg_sq)):
                region = read(f"{key}.{lp.name}", lp.slices)
                if region is None:
                    missing.append(f"{key}.{lp.name}")
                    target.zero_()
                else:
                    target.copy_(region.reshape(-1)[piece.lo:piece.hi])
            if self.keep_master or self.offload:
                # Without a saved master, the saved parameter (full precision when trained in
                # fp32) is a better start than this rank's possibly bf16 copy of it.
                region = read(f"{MASTER_KEY}.{lp.name}", lp.slices)
                if region is None:
                    region = read(lp.name, lp.slices)
                source = region.reshape(-1)[piece.lo:piece.hi] if region is not None else self._param_view(piece)
                piece.master.copy_(source)
        if missing:
            warnings.warn(f"{len(missing)} optimizer tensors are missing from the checkpoint (first: {missing[0]}); "
                          "AdamW restarts from zero moments", stacklevel=2)
            step_count = 0
        self._set_counters(step_count, skipped_steps)

    def _set_counters(self, step_count: int, skipped_steps: int) -> None:
        self.step_count = step_count
        self.skipped_steps = skipped_steps


def _widening_batches(grads: list[tuple[int, torch.Tensor]], limit: int):
    """Group ``(index, 1-D gradient)`` pairs into lists of ``(index, lo, hi)`` ranges for one update call.

    fp32 gradients join a batch whole; low-precision ones are cut so that each batch widens at
    most ``limit`` elements to fp32.
    """
    batch, widened = [], 0
    for index, grad in grads:
        if grad.dtype == torch.float32:
            batch.append((index, 0, grad.numel()))
            continue
        lo = 0
        while lo < grad.numel():
            if widened >= limit:
                yield batch
                batch, widened = [], 0
            hi = min(grad.numel(), lo + limit - widened)
            batch.append((index, lo, hi))
            widened += hi - lo
            lo = hi
    if batch:
        yield batch
