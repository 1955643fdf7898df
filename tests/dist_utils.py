"""Run a test function on N local gloo processes and bring back each rank's result or traceback.

Usage from a test file in tests/ (tests/ is on sys.path under pytest):

    from dist_utils import run_distributed

    def _check(n):                    # module level, so spawned children can import it
        rank = torch.distributed.get_rank()
        ...
        return something_picklable

    def test_it():
        results = run_distributed(_check, 2, 3)   # one result per rank, in rank order
"""

from __future__ import annotations

import io
import multiprocessing
import os
import queue
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["run_distributed"]

# Once a rank has failed, the others are usually blocked in a collective with it; give them this
# long to report their own failure before they are killed.
_FAILURE_GRACE_S = 2.0


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = 120.0,
    init_process_group: bool = True,
) -> list[Any]:
    """Run `fn(*args)` on `world_size` spawned processes joined in a gloo default process group.

    `fn` must be importable by module path (a module-level function); inside it,
    torch.distributed is initialized (rank via `torch.distributed.get_rank()`), with a process
    group timeout of at most 60 s, one CPU thread per process. With `init_process_group=False`
    the children start with no process group, e.g. to test code that creates one itself. Returns the ranks' return values in
    rank order (they must be picklable; tensors are fine). Raises RuntimeError with the traceback
    of every rank that raised or died, and TimeoutError (after killing all children) when the ranks
    have not all finished within `timeout_s` seconds. Never leaves a child process behind.
    """
    context = _context()
    # The parent hosts the rendezvous store on a port chosen by the OS: no port race with other
    # tests, and nothing to clean up in the children.
    store = dist.TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=timeout_s)
    )
    pg_timeout_s = min(60.0, timeout_s)
    reports = context.Queue()
    processes = [
        context.Process(
            target=_child_main,
            args=(
                fn,
                args,
                rank,
                world_size,
                store.port if init_process_group else None,
                pg_timeout_s,
                reports,
            ),
            name=f"run_distributed-rank{rank}",
            daemon=True,
        )
        for rank in range(world_size)
    ]
    # One OpenMP thread per child: set before the children import torch, restored right after.
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        for process in processes:
            process.start()
    finally:
        if saved is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = saved

    results: dict[int, Any] = {}
    failures: dict[int, str] = {}
    deadline = time.monotonic() + timeout_s
    failed_at: float | None = None
    try:
        while len(results) + len(failures) < world_size:
            now = time.monotonic()
            if now > deadline or (failed_at is not None and now > failed_at + _FAILURE_GRACE_S):
                break
            try:
                rank, ok, payload = reports.get(timeout=0.1)
            except queue.Empty:
                _note_silent_deaths(processes, reports, results, failures)
            else:
                _record(rank, ok, payload, results, failures)
            if failures and failed_at is None:
                failed_at = time.monotonic()
    finally:
        _stop(processes, patient=not failures and len(results) == world_size)
        reports.close()

    if failures:
        details = "\n".join(f"---- rank {rank} ----\n{failures[rank]}" for rank in sorted(failures))
        raise RuntimeError(
            f"{len(failures)} of {world_size} ranks failed running {fn.__qualname__}:\n{details}"
        )
    if len(results) < world_size:
        missing = sorted(set(range(world_size)) - set(results))
        raise TimeoutError(
            f"ranks {missing} of {world_size} did not finish {fn.__qualname__} within {timeout_s} s "
            f"(a hang in a collective, or a rank waiting for another); all ranks were killed"
        )
    return [results[rank] for rank in range(world_size)]


# Children fork from one server process that has imported these once, instead of each
# importing them afresh (seconds per child on a small machine). The server starts on first use,
# with no threads and no process group, so a fork of it is as clean as a spawned child.
_PRELOAD = ["torch", "torch.distributed", "transformers", "transformers.models.llama.modeling_llama",
            "dimshard.planner", "dimshard.runtime.module"]


def _context() -> multiprocessing.context.BaseContext:
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)
    return context


def _child_main(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    rank: int,
    world_size: int,
    port: int | None,
    pg_timeout_s: float,
    reports: Any,
) -> None:
    torch.set_num_threads(1)
    try:
        if port is not None:
            store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=pg_timeout_s))
            dist.init_process_group(
                "gloo", store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=pg_timeout_s)
            )
        result = fn(*args)
        # Serialized by torch.save: tensors sent through a multiprocessing queue would otherwise go
        # through shared memory, which breaks when the child exits before the parent reads them.
        buffer = io.BytesIO()
        torch.save(result, buffer)
        reports.put((rank, True, buffer.getvalue()))
    except BaseException:
        reports.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    reports.close()
    reports.join_thread()


def _record(rank: int, ok: bool, payload: Any, results: dict[int, Any], failures: dict[int, str]) -> None:
    if ok:
        results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    else:
        failures[rank] = payload


def _note_silent_deaths(
    processes: list[multiprocessing.process.BaseProcess],
    reports: Any,
    results: dict[int, Any],
    failures: dict[int, str],
) -> None:
    exited = [
        r
        for r, p in enumerate(processes)
        if p.exitcode is not None and r not in results and r not in failures
    ]
    if not exited:
        return
    # A child writes its report before it exits, so whatever an exited child reported is readable now.
    while True:
        try:
            _record(*reports.get(timeout=0.5), results, failures)
        except queue.Empty:
            break
    for rank in exited:
        if rank not in results and rank not in failures:
            failures[rank] = (
                f"process exited with code {processes[rank].exitcode} without reporting a result "
                f"(crashed, killed, or called os._exit)"
            )


def _stop(processes: list[multiprocessing.process.BaseProcess], patient: bool) -> None:
    # After a success the children are only tearing down; otherwise they may be stuck in a
    # collective with a failed rank and are terminated (SIGTERM, then SIGKILL).
    for process in processes:
        process.join(timeout=10.0 if patient else 0.2)
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout=5.0)
        if process.is_alive():
            process.kill()
            process.join(timeout=5.0)
