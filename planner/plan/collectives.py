"""One table of collectives: per kind, the placements it converts, its backward, bytes, code and measurement.

Every other module reads ``COLLECTIVES_TABLE``: ``redistribute`` (which kind turns one placement
into another, and in what order), ``op_costs`` (bytes, backward kind, local size after),
``codegen`` (the call it writes: ``comm.<function>(x, <step dims>, group)``), ``hardware`` (the
kinds a profile must give a bus bandwidth for) and ``profile_hw`` (the NCCL call it times). The
runtime function is named by string, so the planner never imports the runtime.

Adding a collective: one ``Collective`` entry here, its autograd function in ``runtime/comm.py``
(forward and the backward named here), and a test in ``tests/test_comm.py``. A communicating kind
that the shipped profiles have not measured yet names the measured kind it is priced like
(``priced_like``) until ``profile_hw`` measures it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .placements import Partial, Replicate, Shard


@dataclass(frozen=True)
class Collective:
    """One collective kind on one mesh axis.

    ``source`` / ``target``: the placement kinds (``shard``, ``replicate``, ``partial``) it
    converts between. ``order``: its position among one redistribution's steps (lower first:
    shrink the local tensor before growing it). ``backward``: the kind the gradient's
    redistribution runs, None when the backward needs no communication. ``function``: the
    ``dimshard.runtime.comm`` function generated code calls as ``comm.<function>(x, *dims,
    group)``. ``dims``: the tensor dims the call takes, each the ``source`` or ``target``
    placement's shard dim. ``growth``: the local tensor is multiplied (1), divided (-1) or kept
    (0) by the group size. ``sent_bytes(local_bytes, n)``: bytes each rank sends (nccl-tests' bus
    bandwidth convention, for the cost model and the profiler). ``measure(x, n)``: a call of
    ``torch.distributed`` on the default group that moves ``x`` the way this kind does (profile_hw
    times it); None for kinds that do not communicate. ``writes_local``: a kind that does not
    communicate but writes a tensor of its local result's size (zeros); the cost model prices
    that write at the copy bandwidth, forward and backward. ``priced_like``: the kind whose bus
    bandwidth and latency stand in for this one's in a profile that does not give its own.
    ``redistributes``: False for a kind an op runs inside itself (the experts' token dispatch), which
    ``collective_for`` never picks to convert one placement into another.
    """

    kind: str
    source: str
    target: str
    order: int
    backward: str | None
    function: str
    dims: tuple[str, ...]
    growth: int
    sent_bytes: Callable[[int, int], int]
    measure: Callable[[Any, int], Callable[[], object]] | None = None
    writes_local: bool = False
    priced_like: str | None = None
    redistributes: bool = True

    @property
    def communicates(self) -> bool:
        """Whether the kind moves data between ranks (a profile gives its bus bandwidth)."""
        return self.measure is not None

    def local_after(self, local: float, n: int) -> float:
        """Local bytes (or elements) after this step, given those before it and the group size."""
        if self.growth > 0:
            return local * n
        if self.growth < 0:
            return local / n
        return local

    def code(self, tensor: str, dims: tuple[int, ...], group: str) -> str:
        """The expression generated code writes for this step (``comm.all_gather(t3, 1, group)``)."""
        return f"comm.{self.function}({', '.join([tensor, *map(str, dims), group])})"


def _measure_all_reduce(x: Any, n: int) -> Callable[[], object]:
    import torch.distributed as dist

    return lambda: dist.all_reduce(x)


def _measure_all_gather(x: Any, n: int) -> Callable[[], object]:
    import torch.distributed as dist

    out = x.new_empty(x.numel() * n)
    return lambda: dist.all_gather_into_tensor(out, x)


def _measure_reduce_scatter(x: Any, n: int) -> Callable[[], object]:
    import torch.distributed as dist

    out = x.new_empty(x.numel() // n)
    return lambda: dist.reduce_scatter_tensor(out, x)


def _measure_all_to_all(x: Any, n: int) -> Callable[[], object]:
    import torch.distributed as dist

    out = x.new_empty(x.numel())
    return lambda: dist.all_to_all_single(out, x)


def _measure_token_all_to_all(x: Any, n: int) -> Callable[[], object]:
    import torch.distributed as dist

    out = x.new_empty(x.numel())
    splits = [x.numel() // n] * n  # the split-size form the dispatch calls, at even routing
    return lambda: dist.all_to_all_single(out, x, splits, splits)


COLLECTIVES_TABLE: dict[str, Collective] = {c.kind: c for c in (
    Collective("all_reduce", "partial", "replicate", 3, "all_reduce", "all_reduce", (), 0,
               lambda local, n: 2 * local * (n - 1) // n, _measure_all_reduce),
    Collective("all_gather", "shard", "replicate", 4, "reduce_scatter", "all_gather", ("source",), 1,
               lambda local, n: local * (n - 1), _measure_all_gather),
    Collective("reduce_scatter", "partial", "shard", 1, "all_gather", "reduce_scatter", ("target",), -1,
               lambda local, n: local * (n - 1) // n, _measure_reduce_scatter),
    Collective("all_to_all", "shard", "shard", 2, "all_to_all", "all_to_all", ("source", "target"), 0,
               lambda local, n: local * (n - 1) // n, _measure_all_to_all),
    # No communication: each rank keeps its chunk; the backward zero-pads (a Partial gradient).
    Collective("local_slice", "replicate", "shard", 0, None, "local_slice", ("target",), -1,
               lambda local, n: 0),
    # No communication: the group's first rank keeps the tensor, the others hold zeros, so it is
    # summed once (a summand of a split reduction, such as a row-parallel linear's bias). Its own
    # backward: the Replicate gradient of the result, kept on the first rank, is the Partial
    # gradient of the input. Last, after any all-gather of a sharded summand on the same axis.
    Collective("replicate_to_partial", "replicate", "partial", 5, "replicate_to_partial", "replicate_to_partial",
               (), 0, lambda local, n: 0, writes_local=True),
    # Inside the experts op split by expert with its tokens split on the same axis
    # (kernels/moe/dispatch.py): rows of (token, slot) pairs go to the rank holding their expert, with
    # uneven counts; its backward is the same exchange with the counts transposed (dispatch <->
    # combine). ``local`` is the rows a rank sends; at even routing (n-1)/n of them leave it.
    Collective("token_all_to_all", "shard", "shard", 2, "token_all_to_all", "token_all_to_all", (), 0,
               lambda local, n: local * (n - 1) // n, _measure_token_all_to_all, priced_like="all_to_all",
               redistributes=False),
)}
# The kinds that move data, in the order profiles list them.
COMMUNICATING = tuple(k for k, c in COLLECTIVES_TABLE.items() if c.communicates)


def placement_kind(p: object) -> str:
    """``shard``, ``replicate`` or ``partial``: what a per-axis placement is, as the table names it."""
    if isinstance(p, Shard):
        return "shard"
    if isinstance(p, Partial):
        return "partial"
    if isinstance(p, Replicate):
        return "replicate"
    raise TypeError(f"not a placement: {p!r}")


def collective_for(source: object, target: object) -> Collective | None:
    """The table entry turning per-axis placement ``source`` into ``target``, or None when none does."""
    src, dst = placement_kind(source), placement_kind(target)
    return next((c for c in COLLECTIVES_TABLE.values() if c.redistributes and c.source == src and c.target == dst),
                None)
