"""Measure the memory margins of the default budgets (planner/cost/budgets.py) on this machine; print them as profile fields.

    python benchmarks/memory_margin.py                                   # one GPU
    torchrun --nproc_per_node 8 benchmarks/memory_margin.py --plan_ngpus 8 --policy tp   # NCCL of 8 ranks

First, before this process imports torch, the host's /proc/meminfo: ``host_os_gb`` is MemTotal less
MemAvailable, what the OS and other processes hold (run it on the idle machine). Then the data
loader: a ``PackedBatchLoader`` as train.py's ``--data_sources`` starts it (``--data_workers``
tokenizer processes, ``--data_prefetch`` batches of ``--seq_len`` tokens, on the demo corpus or
``--data_sources`` with ``--tokenizer``); its cost is the resident set it adds (this process's
growth plus its worker processes'). Then benchmarks/train_mfu.py's training steps in this
process, with expandable segments (as every rank runs), and after the steps:

- ``gpu_context_gb``: the card's used memory (``torch.cuda.mem_get_info``) less PyTorch's
  ``memory_reserved``: CUDA context, NCCL buffers, cuBLAS/cuDNN handles, kernel images;
- ``reserved_over_estimate``: ``max_memory_reserved`` over the plan's estimate (plan.json), less 1,
  or 0 when the reserve stayed under the estimate: what the card held beyond what the budget
  check counted (fragmentation, per-stream pools, the estimate's own error);
- ``host_process_gb``: this process's resident set after the steps (VmRSS: libraries, CUDA's host
  side, the compile) plus the data loader's; null when the plan offloads (its state is in that
  resident set too): measure it with a plan that does not (``--policy dp``).

Prints one JSON object to paste into ``planner/cost/hw_profiles/<gpu>.json`` (the four fields and
``memory_margin_source``), then the raw readings. GB are 10^9 bytes. The reserve over the estimate
depends on the workload: measure the shapes you train (``--num_layers``, ``--seq_len``,
``--policy``, ``--recompute``, ``--memory_budget_gb``; the flags are train_mfu.py's) and keep the
largest; for plans that offload, benchmarks/offload_mfu.py prints the same readings
(``gpu_reserved_gib`` over ``est_peak_gib``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9


def meminfo() -> dict[str, float]:
    """/proc/meminfo's MemTotal and MemAvailable in bytes."""
    found = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("MemTotal", "MemAvailable"):
            found[key] = float(value.split()[0]) * 1024
    return found


def _rss_bytes(pid: int | str) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return float(line.split()[1]) * 1024
    except OSError:  # the process ended
        pass
    return 0.0


def _descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (workers of spawn and forkserver contexts included)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def loader_rss(seq_len: int, workers: int, prefetch: int, sources: str, tokenizer: str, batches: int = 8) -> float:
    """Bytes of resident set a data-spec loader adds: this process's growth plus its worker processes'."""
    import tempfile

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import data_loader

    from dimshard.runtime.data.packed_loader import PackedBatchLoader
    from dimshard.runtime.data.spec import parse_data_spec

    with tempfile.TemporaryDirectory() as tmp:
        if not sources:
            sources, demo_tokenizer = data_loader._demo_sources(Path(tmp), 2_000_000)
            tokenizer = tokenizer or demo_tokenizer
        spec = parse_data_spec(sources, "", tokenizer=tokenizer, cache_dir=str(Path(tmp) / "cache"))
        before = _rss_bytes(os.getpid())
        loader = PackedBatchLoader(spec, sequence_length=seq_len, micro_batch_size=1, dp_size=1, copy_index=0, seed=0,
                                   workers=workers, prefetch=prefetch)
        try:
            for _ in range(batches):
                next(loader)
            time.sleep(1.0)  # let the workers refill the prefetch queue: its batches count too
            return max(0.0, _rss_bytes(os.getpid()) - before) + sum(map(_rss_bytes, _descendants(os.getpid())))
        finally:
            loader.close()


def _take(argv: list[str], flag: str, default: str) -> tuple[str, list[str]]:
    """The value of ``flag`` (removed from argv, which otherwise goes to train_mfu.py) or ``default``."""
    if flag in argv:
        i = argv.index(flag)
        return argv[i + 1], argv[:i] + argv[i + 2:]
    return default, argv


def main(argv: list[str] | None = None) -> dict:
    """Measure, print the profile fields and the readings as JSON; returns the fields."""
    host = meminfo()  # before torch is imported: what the OS and other processes hold
    argv = list(sys.argv[1:] if argv is None else argv)
    workers, argv = _take(argv, "--data_workers", "1")
    prefetch, argv = _take(argv, "--data_prefetch", "4")
    sources, argv = _take(argv, "--data_sources", "")
    tokenizer, argv = _take(argv, "--tokenizer", "")
    seq_len, _ = _take(argv, "--seq_len", "32768")
    if "--num_layers" not in argv:
        argv += ["--num_layers", "2"]
    if "--seq_len" not in argv:
        argv += ["--seq_len", seq_len]
    rank = int(os.environ.get("RANK", "0"))
    loader, loader_note = 0.0, f"{workers} worker(s), {prefetch} batches of {seq_len} tokens"
    if rank == 0:
        try:
            loader = loader_rss(int(seq_len), int(workers), int(prefetch), sources, tokenizer)
        except Exception as error:  # noqa: BLE001 — a missing library or corpus: measure the rest, say so
            loader_note = f"NOT MEASURED: {type(error).__name__}: {error}"

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch
    import train_mfu

    record = train_mfu.main(argv)
    if record.get("gpu_outside_allocator_gib") is None:
        sys.exit("benchmarks/memory_margin.py measures a GPU: the training steps ran without CUDA")
    # Offloaded state is in the resident set: the process's own share is measured only without it.
    offloaded = record["offload_optimizer"] or record["offload_activation_scopes"]
    fields = {
        "gpu_context_gb": round(record["gpu_outside_allocator_gib"] * 2**30 / GB, 2),
        "reserved_over_estimate": max(0.0, record["reserved_over_estimate"]),
        "host_os_gb": round((host["MemTotal"] - host["MemAvailable"]) / GB, 2),
        "host_process_gb": None if offloaded else round((record["host_rss_gib"] * 2**30 + loader) / GB, 2),
        "memory_margin_source": (
            f"benchmarks/memory_margin.py {' '.join(argv)} on {record['gpu']}, {record['world_size']} rank(s), "
            f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}: used - reserved after the steps "
            f"{record['gpu_outside_allocator_gib']:.2f} GiB, reserved peak / estimate / allocated peak "
            f"{record['peak_reserved_gib']:.2f} / {record['est_peak_gib']:.2f} / {record['peak_mem_gb']:.2f} GiB "
            "(expandable segments), "
            f"MemTotal {host['MemTotal'] / GB:.1f} GB with {host['MemAvailable'] / GB:.1f} available before, "
            f"rank RSS {record['host_rss_gib']:.2f} GiB + data loader {loader / 2**30:.2f} GiB ({loader_note})"),
    }
    if rank == 0:
        print(json.dumps(fields, indent=1), flush=True)
        print(json.dumps({"meminfo_gb": {k: round(v / GB, 2) for k, v in host.items()},
                          "data_loader_gb": round(loader / GB, 3), "train_mfu": record}), flush=True)
    return fields


if __name__ == "__main__":
    main()
