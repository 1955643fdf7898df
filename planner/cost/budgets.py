"""Default memory budgets: what the GPU and the host hold, less margins measured on that hardware.

The GPU budget (per GPU, in GB of 10^9 bytes) bounds the cost model's estimate of the allocated
peak (``model.Estimate.peak_bytes``). By default it is

    (capacity - held by other processes - gpu_context_gb) / (1 + reserved_over_estimate)

- capacity: the card this process runs on (``torch.cuda.mem_get_info``), or, when compiling
  without that GPU, the hardware profile's ``memory_gb``; other processes' memory is what the card
  has in use at launch beyond this process's own (counted only above ``OTHERS_MIN_GB``);
- ``gpu_context_gb``: what a training process holds on the card outside PyTorch's allocator
  (CUDA context, NCCL buffers, cuBLAS/cuDNN handles, kernel images): the card's used memory
  less ``torch.cuda.memory_reserved`` after training steps;
- ``reserved_over_estimate``: how far the allocator's reserved peak (``max_memory_reserved``,
  expandable segments on, as ``runtime/reliability/gpu_memory.py`` sets every rank) exceeded the plan's
  estimate, as a fraction of the estimate, at worst over the measured runs (0 when it never
  did). It is relative to the estimate, not to the allocated peak, because the estimate is what
  the budget bounds: it holds the allocator's fragmentation and per-stream pools together with
  the estimate's own error, so a plan accepted at the budget fits the card as those runs did.
  Calibrating the cost model changes it: measure again (``benchmarks/memory_margin.py``).

The host budget (per rank) bounds the offloaded state (``model.Estimate.host_bytes``). By default

    (RAM - host_os_gb) / ranks on the host - host_process_gb

- RAM: MemTotal of this machine (or its cgroup's limit when lower) when it has the run's GPUs,
  else the profile's ``host_memory_gb``; ranks: its GPUs, else the profile's ``gpus_per_node``;
- ``host_os_gb``: what the OS and other processes hold (MemTotal - MemAvailable, idle machine);
- ``host_process_gb``: what one training rank holds in host memory besides its offloaded state
  (libraries, CUDA's host side, the compile on rank 0, the data loader): its resident set after
  training steps less its offloaded buffers. With it the planner's host estimate is the resident
  set to expect (plan.json ``host_offload_bytes + host_process_bytes``).

The margins are fields of the hardware profile measured by ``benchmarks/memory_margin.py``
(``memory_margin_source`` says where); a profile without them uses the ``FALLBACK_*`` values
and the budget's source says so. Every budget carries its source, which ``plan_report.md`` and
``plan.json`` show next to the number.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .hardware import HardwareProfile

GB = 1e9
# Margins for a profile that has none measured: the one-H100 machine's (planner/cost/hw_profiles/h100.json,
# memory_margin_source), rounded up, until benchmarks/memory_margin.py runs on that hardware.
FALLBACK_GPU_CONTEXT_GB = 1.5
FALLBACK_RESERVED_OVER_ESTIMATE = 0.09
FALLBACK_HOST_OS_GB = 1.0
FALLBACK_HOST_PROCESS_GB = 4.5
# Memory in use on the card beyond this process's own estimate counts as another process's only above
# this: the context estimate is not exact, and a budget that moves with noise would recompile each run.
OTHERS_MIN_GB = 1.0


@dataclass(frozen=True)
class MemoryBudget:
    """A memory budget in GB (10^9 bytes; None: no limit) and, for a person, where it came from."""

    gb: float | None
    source: str

    @property
    def bytes(self) -> float | None:
        return None if self.gb is None else self.gb * GB


@dataclass(frozen=True)
class DeviceMemory:
    """The card this process uses, in bytes: its size, what is free now, what this process's allocator holds."""

    name: str
    index: int
    total: float
    free: float
    reserved: float


def device_memory() -> DeviceMemory | None:
    """This process's current CUDA device, or None without one (starts CUDA in this process)."""
    if not torch.cuda.is_available():
        return None
    index = torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    return DeviceMemory(torch.cuda.get_device_name(index), index, float(total), float(free),
                        float(torch.cuda.memory_reserved(index)))


def _floor(gb: float) -> float:
    return max(0.0, math.floor(gb * 10) / 10)


def _measured(hw: HardwareProfile) -> str:
    return f"margins measured on the hardware of profile '{hw.name}': its memory_margin_source"


def gpu_margin(hw: HardwareProfile) -> tuple[float, float, str]:
    """``(gpu_context_gb, reserved_over_estimate, where measured)`` of the profile, or the fallbacks."""
    if hw.gpu_context_gb is not None and hw.reserved_over_estimate is not None:
        return float(hw.gpu_context_gb), float(hw.reserved_over_estimate), _measured(hw)
    return (FALLBACK_GPU_CONTEXT_GB, FALLBACK_RESERVED_OVER_ESTIMATE,
            f"profile '{hw.name}' has no measured margin: fallback values; measure with benchmarks/memory_margin.py")


def default_gpu_budget(hw: HardwareProfile, on_device: bool = True) -> MemoryBudget:
    """The default GPU budget of the module docstring; ``on_device``: from this process's card when it has one.

    Without a card (or ``on_device`` False) the profile's ``memory_gb``; None when that is unknown too.
    """
    context, overhead, where = gpu_margin(hw)
    device = device_memory() if on_device else None
    others = 0.0
    if device is not None:
        capacity = _floor(device.total / GB)
        # In use beyond what this process holds: its allocator's segments and (at most) its context.
        held = max(0.0, (device.total - device.free - device.reserved) / GB - context)
        others = held if held >= OTHERS_MIN_GB else 0.0
        what = f"cuda:{device.index} {device.name} {capacity:.1f} GB"
        if others:
            what += f" less {others:.1f} GB held by other processes at launch"
    elif hw.memory_gb:
        capacity = float(hw.memory_gb)
        what = f"hardware profile '{hw.name}' memory_gb {capacity:.1f} GB (compiled without that GPU)"
    else:
        return MemoryBudget(None, f"no GPU visible and profile '{hw.name}' gives no memory_gb")
    gb = _floor((capacity - others - context) / (1 + overhead))
    return MemoryBudget(gb, f"{what}, less {context:.2f} GB CUDA context and {overhead * 100:.1f}% for the "
                            f"allocator's reserve beyond the estimate ({where})")


def _cgroup_limit() -> float | None:
    """This process's cgroup memory limit in bytes (v2 or v1), or None when unlimited or unknown."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # v1 writes a huge number for "no limit"
            return float(text)
    return None


def host_ram() -> tuple[float, str] | None:
    """This machine's RAM in bytes and how it was read: MemTotal (or the page count), or the cgroup limit when lower."""
    total, what = None, ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                total, what = float(line.split()[1]) * 1024, "MemTotal"
                break
    except OSError:
        pass
    if total is None:
        try:
            total, what = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")), "physical pages"
        except (ValueError, OSError, AttributeError):
            return None
    limit = _cgroup_limit()
    if limit is not None and limit < total:
        return limit, "cgroup memory limit"
    return total, what


def host_margin(hw: HardwareProfile) -> tuple[float, float, str]:
    """``(host_os_gb, host_process_gb, where measured)`` of the profile, or the fallbacks."""
    if hw.host_os_gb is not None and hw.host_process_gb is not None:
        return float(hw.host_os_gb), float(hw.host_process_gb), _measured(hw)
    return (FALLBACK_HOST_OS_GB, FALLBACK_HOST_PROCESS_GB,
            f"profile '{hw.name}' has no measured margin: fallback values; measure with benchmarks/memory_margin.py")


def default_host_budget(hw: HardwareProfile, ranks_per_host: int | None = None) -> MemoryBudget:
    """The default host budget per rank of the module docstring; ``gb`` None when the RAM is unknown (no limit).

    On a machine with GPUs (the job's own) its RAM and GPU count are used; elsewhere the
    profile's ``host_memory_gb`` and ``gpus_per_node``. ``ranks_per_host`` overrides the count.
    """
    os_gb, process_gb, where = host_margin(hw)
    ram = host_ram() if torch.cuda.is_available() else None
    if ram is not None:
        ram_gb, what = ram[0] / GB, f"this machine's {ram[1]} {ram[0] / GB:.1f} GB"
        ranks = ranks_per_host or torch.cuda.device_count()
    elif hw.host_memory_gb:
        ram_gb, what = float(hw.host_memory_gb), f"hardware profile '{hw.name}' host_memory_gb {hw.host_memory_gb} GB"
        ranks = ranks_per_host or int(hw.gpus_per_node or 1)
    else:
        return MemoryBudget(None, f"host RAM unknown: no GPU here and profile '{hw.name}' gives no host_memory_gb")
    ranks = max(int(ranks or 1), 1)
    gb = _floor((ram_gb - os_gb) / ranks - process_gb)
    shared = f", shared by {ranks} GPUs," if ranks > 1 else ""
    return MemoryBudget(gb, f"{what} less {os_gb:.1f} GB for the OS{shared} less {process_gb:.1f} GB the training "
                            f"process holds itself ({where})")


def host_budget(extra: Mapping[str, Any] | None, hw: HardwareProfile) -> MemoryBudget:
    """The host budget per rank: the ``host_memory_budget_gb`` policy option, else ``default_host_budget``."""
    given = (extra or {}).get("host_memory_budget_gb")
    if given is not None:
        return MemoryBudget(float(given), "policy option host_memory_budget_gb (--host_memory_budget_gb)")
    return default_host_budget(hw)
