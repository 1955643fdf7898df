"""A failure on one rank ends every rank; a SIGTERM stops every rank at the same step.

Three mechanisms, none of which costs anything per step beyond one tiny overlapped collective:

- ``agree_on_errors``: at the end of a risky collective phase (writing or loading a checkpoint)
  every rank says whether it failed; when any did, every rank raises the same error, so none is
  left waiting in the next collective.
- ``failure_watchdog``: for failures no phase end catches (an exception inside a training step on
  one rank while the others wait in a gradient all-reduce), the failing rank writes its message
  into the job's rendezvous store, and a background thread on every other rank, polling the store
  twice a second, prints it and ends its process at once (``os._exit``): a rank blocked in a
  collective cannot be woken any other way on NCCL, and gloo would wait for its timeout.
- ``StopSignal``: SIGTERM (what torchrun forwards to its workers on preemption) only sets a flag;
  a max-reduction of the flags, started at one step boundary and read at the next, tells every
  rank the same stop step, where the trainer saves a complete checkpoint and returns.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

FAILURE_KEY = "dimshard/failure"
POLL_INTERVAL_S = 0.5


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def agree_on_errors(error: str, error_type: type[Exception] = RuntimeError) -> None:
    """Collective: raise ``error_type`` on every rank when ``error`` (this rank's, '' if none) or
    another rank's is non-empty. This rank's own message wins, else the lowest failing rank's."""
    errors = [error]
    if _distributed():
        errors = [""] * dist.get_world_size()
        dist.all_gather_object(errors, error)
    if error:
        raise error_type(error)
    for rank, other in enumerate(errors):
        if other:
            raise error_type(f"rank {rank}: {other}")


class PeerFailure(RuntimeError):
    """This rank stopped because another rank failed first; the message is that rank's error."""


def _store() -> Any | None:
    try:
        return dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):
        return None


def _failure_key() -> str:
    # An elastic restart runs in the same store: keys of an earlier attempt must not stop this one.
    return f"{FAILURE_KEY}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def announce_failure(message: str) -> None:
    """Tell every rank under ``failure_watchdog`` that this rank failed with ``message``."""
    store = _store() if _distributed() else None
    if store is None:
        return
    with contextlib.suppress(Exception):  # the store may be gone already; the local error still counts
        store.set(_failure_key(), f"rank {dist.get_rank()}: {message}")


def _announced(store: Any) -> str | None:
    try:
        key = _failure_key()
        return store.get(key).decode(errors="replace") if store.check([key]) else None
    except Exception:
        return None


def _watch(store: Any, stop: threading.Event) -> None:
    key = _failure_key()
    while not stop.wait(POLL_INTERVAL_S):
        try:
            if not store.check([key]):
                continue
            message = store.get(key).decode(errors="replace")
        except Exception:  # the store's host is gone: the job is ending anyway
            return
        print(f"error: {message}; rank {dist.get_rank()} stops too", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)


@contextlib.contextmanager
def failure_watchdog() -> Iterator[None]:
    """Within this block: an exception here is announced to every rank (then re-raised), and a
    failure announced by another rank ends this process within about a second with its message
    (an exception here after another rank's announcement becomes a PeerFailure carrying it).

    Enter it on every rank right after the process group exists. A no-op for one process.
    """
    store = _store() if _distributed() else None
    if store is None:
        yield
        return
    stop = threading.Event()
    thread = threading.Thread(target=_watch, args=(store, stop), name="dimshard-failure-watchdog", daemon=True)
    thread.start()
    try:
        yield
    except BaseException as error:
        stop.set()
        # A peer that failed first is the cause; this rank's error (a connection reset by the
        # departed peer, ...) is only its consequence.
        cause = _announced(store)
        if cause is not None and not cause.startswith(f"rank {dist.get_rank()}:"):
            raise PeerFailure(f"{cause}; rank {dist.get_rank()} stopped too") from error
        announce_failure(f"{type(error).__name__}: {error}" if not isinstance(error, SystemExit) else str(error))
        raise
    finally:
        stop.set()


def exit_after_failure(code: int) -> None:
    """End a failed rank of a multi-process job at once (``os._exit``), after flushing its output
    and lingering a moment, so that peers can still read its announcement from the store (rank 0
    hosts the store when there is no torchrun agent). Interpreter teardown is skipped: it could wait
    in collectives that will never complete."""
    sys.stdout.flush()
    sys.stderr.flush()
    time.sleep(3 * POLL_INTERVAL_S)
    os._exit(code)


class StopSignal:
    """SIGTERM sets a flag; ``should_stop()`` at each step boundary says, the same on every rank,
    whether to stop there. Call ``should_stop`` on every rank once per step boundary and ``close``
    at the end (it waits for the last reduction and restores the previous handler)."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for signum in signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        # A gloo group of its own: a CPU flag reduced asynchronously, even in an NCCL job.
        self._group = dist.new_group(backend="gloo") if _distributed() else None
        self._flag = torch.zeros(1, dtype=torch.int32)
        self._pending: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        # Repeats are ignored: a scheduler may signal every process and torchrun forward it again.
        # A rank stuck in a collective is ended by torchrun's SIGKILL after its grace period.
        if not self.requested:
            print(f"[dimshard] {signal.Signals(signum).name} received: saving a checkpoint at the next step "
                  "boundary, then stopping", file=sys.stderr, flush=True)
        self.requested = True

    def should_stop(self) -> bool:
        """Collective, once per step boundary: True on every rank when any rank had been signalled by
        the previous boundary (one step later than the signal, so the reduction overlaps a step)."""
        if self._group is None:
            return self.requested
        decided = False
        if self._pending is not None:
            self._pending.wait()
            decided = bool(self._flag.item())
        self._flag = torch.tensor([int(self.requested)], dtype=torch.int32)
        self._pending = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        return decided

    def close(self) -> None:
        """Wait for the last reduction and restore the signal handlers."""
        if self._pending is not None:
            with contextlib.suppress(Exception):
                self._pending.wait()
            self._pending = None
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
