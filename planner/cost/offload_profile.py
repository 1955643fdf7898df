"""Measure the rates CPU offload is priced with: pinned host-device copies and the CPU AdamW update.

    python -m dimshard.planner.cost.offload_profile            # prints the profile fields as JSON

``h2d_gbps`` / ``d2h_gbps``: page-locked host to device and back, one direction at a time
(10^9 bytes/s); ``duplex_gbps``: each direction's rate while both run at once on two streams;
``cpu_adam_gelems``: torch's fused CPU AdamW over fp32 tensors of ``--adam_mb`` MB each, with this
process's intra-op threads (10^9 elements/s); ``host_memory_gb``: MemTotal (on machines whose RAM
grows as it is used, the profile's figure should be the machine's full RAM instead). Without CUDA
only the CPU update is measured. ``planner/cost/profile_hw.py`` merges these into its profile.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field

import torch
from torch.optim.adamw import adamw

from ...cli import parse_dataclass_args


@dataclass
class OffloadProfileArgs:
    """Flags of the offload profiling command (one field per flag)."""

    copy_mb: int = field(default=1024, metadata={"help": "MB per timed host-device copy"})
    adam_mb: int = field(default=256, metadata={"help": "MB per fp32 tensor of the timed CPU AdamW"})
    iters: int = field(default=10, metadata={"help": "timed repetitions per measurement (after warm-up)"})


def _cuda_seconds(fn, iters: int) -> float:
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def measure_copies(megabytes: int, iters: int) -> dict[str, float]:
    """Pinned host-to-device, device-to-host and simultaneous both-way copy rates in GB/s."""
    n = megabytes * 2**20
    host_in = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    host_out = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dev_a = torch.empty(n, dtype=torch.uint8, device="cuda")
    dev_b = torch.empty(n, dtype=torch.uint8, device="cuda")
    up, down = torch.cuda.Stream(), torch.cuda.Stream()

    def h2d() -> None:
        dev_a.copy_(host_in, non_blocking=True)

    def d2h() -> None:
        host_out.copy_(dev_b, non_blocking=True)

    def both() -> None:
        with torch.cuda.stream(up):
            dev_a.copy_(host_in, non_blocking=True)
        with torch.cuda.stream(down):
            host_out.copy_(dev_b, non_blocking=True)

    return {"h2d_gbps": round(n / _cuda_seconds(h2d, iters) / 1e9, 1),
            "d2h_gbps": round(n / _cuda_seconds(d2h, iters) / 1e9, 1),
            "duplex_gbps": round(n / _cuda_seconds(both, iters) / 1e9, 1)}


def measure_cpu_adam(megabytes: int, iters: int) -> float:
    """Fused CPU AdamW rate over fp32 tensors of ``megabytes`` MB, in 10^9 elements/s."""
    n = megabytes * 2**20 // 4
    param, grad = torch.randn(n), torch.randn(n)
    exp_avg, exp_avg_sq = torch.zeros(n), torch.zeros(n)
    step = torch.zeros(())

    def run() -> None:
        adamw([param], [grad], [exp_avg], [exp_avg_sq], [], [step], fused=True, amsgrad=False, beta1=0.9,
              beta2=0.95, lr=1e-5, weight_decay=0.1, eps=1e-8, maximize=False)

    run()
    start = time.perf_counter()
    for _ in range(iters):
        run()
    return round(n * iters / (time.perf_counter() - start) / 1e9, 3)


def host_memory_gb() -> float | None:
    """MemTotal of this machine in 10^9 bytes."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) * 1024 / 1e9, 1)
    except OSError:
        return None
    return None


def measure_offload_rates(copy_mb: int = 1024, adam_mb: int = 256, iters: int = 10) -> dict[str, float]:
    """The profile fields of the module docstring (copies only with CUDA)."""
    rates: dict[str, float] = {}
    if torch.cuda.is_available():
        rates.update(measure_copies(copy_mb, iters))
    rates["cpu_adam_gelems"] = measure_cpu_adam(adam_mb, iters)
    memory = host_memory_gb()
    if memory is not None:
        rates["host_memory_gb"] = memory
    rates["cpu_threads"] = torch.get_num_threads()
    return rates


def main(argv: list[str] | None = None) -> dict:
    """Measure and print the rates as JSON; returns them."""
    args = parse_dataclass_args(OffloadProfileArgs, argv, description=__doc__.split("\n\n")[0])
    rates = measure_offload_rates(args.copy_mb, args.adam_mb, args.iters)
    print(json.dumps(rates), flush=True)
    return rates


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
