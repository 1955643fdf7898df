"""Debug check that every rank issues collectives on overlapping communicators in the same order.

Two ranks that share several process groups deadlock (NCCL) or exchange the wrong tensors when
one of them issues collective A on group G1 before collective B on group G2 while the other does
the opposite. The generated code, the gradient buckets, ZeRO's parameter all-gather and the
trainer all issue collectives, on the default group and on sub-communicators, so the order is a
property of the whole run, not of one module.

With ``DIMSHARD_DEBUG_COLLECTIVES=1`` (or after ``enable()``), every collective a process group
runs is logged as ``(group ranks, operation, shapes, dtypes)``. ``check_collective_order()``
(called on every rank together) exchanges the logs and raises ``CollectiveOrderError`` naming
the first event where two ranks disagree: for each pair of ranks, the events on the groups that
hold both must be the same sequence. Point-to-point transfers are checked by counts and shapes
per direction, since the sends and receives of one batch may be issued in any order.

The log hooks the methods of torch's ``ProcessGroup`` class, so collectives are seen whichever
torch.distributed function issued them and whatever name a module bound them to at import.
Disabled, nothing is hooked and nothing costs anything.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist

ENV_FLAG = "DIMSHARD_DEBUG_COLLECTIVES"

# ProcessGroup methods that start a collective on every member of the group.
_COLLECTIVE_METHODS = (
    "allreduce", "allreduce_coalesced", "allgather", "allgather_coalesced", "allgather_into_tensor_coalesced",
    "all_gather_single", "all_gather_single_coalesced", "reduce_scatter", "reduce_scatter_single",
    "reduce_scatter_single_coalesced", "reduce_scatter_tensor_coalesced", "alltoall", "alltoall_base",
    "all_to_all_single", "broadcast", "reduce", "gather", "scatter", "barrier", "_allgather_base",
    "_reduce_scatter_base",
)
_P2P_METHODS = ("send", "recv")
# Rooted collectives take different tensors on the root (a list per rank) and elsewhere: only
# their name and group are compared.
_ROOTED_METHODS = ("gather", "scatter")

Event = tuple  # (kind, group ranks, operation, shapes) or ("p2p", src, dst, shapes)


class CollectiveOrderError(RuntimeError):
    """Two ranks issued collectives on communicators they share in different orders."""


class _Log:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self.originals: dict[str, Callable[..., Any]] = {}
        self.paused = threading.local()
        self.group_ranks: dict[int, tuple[int, ...]] = {}


_LOG = _Log()


def _tensor_facts(value: Any) -> list[tuple[tuple[int, ...], str]]:
    """Shapes and dtypes of every tensor in an argument (tensors, lists of tensors, nested lists)."""
    if isinstance(value, torch.Tensor):
        return [(tuple(value.shape), str(value.dtype).replace("torch.", ""))]
    if isinstance(value, (list, tuple)):
        return [fact for item in value for fact in _tensor_facts(item)]
    return []


def _ranks_of(group: Any) -> tuple[int, ...]:
    key = id(group)
    if key not in _LOG.group_ranks:
        try:
            ranks = tuple(dist.get_process_group_ranks(group))
        except (ValueError, RuntimeError):  # a group torch.distributed did not register (e.g. the world)
            ranks = tuple(range(group.size()))
        _LOG.group_ranks[key] = ranks
    return _LOG.group_ranks[key]


def _logging(method: str, original: Callable[..., Any]) -> Callable[..., Any]:
    def logged(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not getattr(_LOG.paused, "value", False):
            ranks = _ranks_of(self)
            facts = tuple(fact for a in list(args) + list(kwargs.values()) for fact in _tensor_facts(a))
            if method in _P2P_METHODS:
                peer_in_group = args[1] if len(args) > 1 else kwargs.get("dstRank", kwargs.get("srcRank"))
                me, peer = dist.get_rank(), ranks[int(peer_in_group)]
                src, dst = (me, peer) if method == "send" else (peer, me)
                _LOG.events.append(("p2p", src, dst, facts))
            else:
                _LOG.events.append(("collective", ranks, method, () if method in _ROOTED_METHODS else facts))
        return original(self, *args, **kwargs)

    logged.__name__ = f"logged_{method}"
    return logged


def enabled() -> bool:
    """Whether collectives are being logged."""
    return bool(_LOG.originals)


def enable() -> None:
    """Start logging every collective and point-to-point transfer of this process (idempotent)."""
    if _LOG.originals:
        return
    process_group = torch._C._distributed_c10d.ProcessGroup
    for method in _COLLECTIVE_METHODS + _P2P_METHODS:
        original = getattr(process_group, method, None)
        if original is None:
            continue
        _LOG.originals[method] = original
        setattr(process_group, method, _logging(method, original))


def enable_from_env() -> bool:
    """``enable()`` when ``DIMSHARD_DEBUG_COLLECTIVES`` is set to 1/true/yes; returns whether logging is on."""
    if os.environ.get(ENV_FLAG, "").strip().lower() in ("1", "true", "yes", "on"):
        enable()
    return enabled()


def disable() -> None:
    """Stop logging, restore torch's methods and forget the log."""
    process_group = torch._C._distributed_c10d.ProcessGroup
    for method, original in _LOG.originals.items():
        setattr(process_group, method, original)
    _LOG.originals.clear()
    _LOG.events.clear()
    _LOG.group_ranks.clear()


def logged_events() -> list[Event]:
    """A copy of this rank's events since logging started or since the last check."""
    return list(_LOG.events)


def _pair_sequence(events: Iterable[Event], a: int, b: int) -> list[Event]:
    return [e for e in events if e[0] == "collective" and a in e[1] and b in e[1]]


def _p2p_counts(events: Iterable[Event], src: int, dst: int) -> Counter:
    return Counter(e[3] for e in events if e[0] == "p2p" and e[1] == src and e[2] == dst)


def _describe(event: Event | None) -> str:
    if event is None:
        return "nothing (its log ends here)"
    _, ranks, method, facts = event
    return f"{method} on group {list(ranks)} with tensors {list(facts)}"


def compare_logs(logs: list[list[Event]]) -> None:
    """Raise ``CollectiveOrderError`` unless the per-rank logs ``logs[rank]`` are consistent.

    Consistent: for every pair of ranks, the collectives on groups holding both form the same
    sequence on both ranks, and the point-to-point transfers each sent the other match, in
    number and shapes, those the other received.
    """
    world = len(logs)
    for a in range(world):
        for b in range(a + 1, world):
            seq_a, seq_b = _pair_sequence(logs[a], a, b), _pair_sequence(logs[b], a, b)
            for i in range(max(len(seq_a), len(seq_b))):
                ea = seq_a[i] if i < len(seq_a) else None
                eb = seq_b[i] if i < len(seq_b) else None
                if ea != eb:
                    raise CollectiveOrderError(
                        f"ranks {a} and {b} disagree at their collective #{i} on shared communicators: "
                        f"rank {a} issued {_describe(ea)}, rank {b} issued {_describe(eb)}; a hang or "
                        f"wrong data follows on NCCL (the plan or the runtime issues collectives in a "
                        f"rank-dependent order)"
                    )
            for src, dst in ((a, b), (b, a)):
                sent, received = _p2p_counts(logs[src], src, dst), _p2p_counts(logs[dst], src, dst)
                if sent != received:
                    raise CollectiveOrderError(
                        f"rank {src} sent rank {dst} tensors {dict(sent)} but rank {dst} received "
                        f"{dict(received)} from it: point-to-point transfers do not pair up"
                    )


def check_collective_order() -> int:
    """Exchange every rank's log over the default group (all ranks call this together), compare, clear.

    Returns the number of events this rank logged since the last check; raises
    ``CollectiveOrderError`` as ``compare_logs`` does. The exchange itself is not logged. Does
    nothing (returns 0) while logging is off.
    """
    if not enabled():
        return 0
    events = list(_LOG.events)
    _LOG.paused.value = True
    try:
        logs: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(logs, events)
    finally:
        _LOG.paused.value = False
    _LOG.events.clear()
    compare_logs(logs)
    return len(events)
