"""Hardware profiles: the sustained rates of one GPU kind that the cost model prices plans with.

A profile is a JSON file (shipped ones in ``planner/cost/hw_profiles/``, measured ones written by
``python -m dimshard.planner.cost.profile_hw``) or a ``HardwareProfile`` built in code.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..plan.collectives import COLLECTIVES_TABLE, COMMUNICATING

PROFILE_DIR = Path(__file__).parent / "hw_profiles"
# The collective kinds a profile gives a bus bandwidth and latency for (planner/plan/collectives.py).
COLLECTIVES = COMMUNICATING


def _rated_kind(kind: str, rates: dict[str, Any]) -> str:
    """The kind whose rate prices ``kind``: its own where measured, else its ``priced_like`` entry's."""
    if kind in rates:
        return kind
    return COLLECTIVES_TABLE[kind].priced_like or kind


@dataclass(frozen=True)
class HardwareProfile:
    """Sustained rates of one GPU kind: FLOP/s per dtype, bytes/s, collective bus bandwidth and latency.

    ``busbw_gbps`` and ``alpha_us`` map a collective kind to a number, or to ``{group_size: number}``
    when measured per group size (the nearest size is used).
    """

    name: str
    matmul_tflops: dict[str, float]
    attention_tflops: dict[str, float]
    copy_gbps: float
    busbw_gbps: dict[str, Any]
    alpha_us: dict[str, Any]
    kernel_launch_us: float = 0.0
    memory_gb: float | None = None
    device: str = ""
    estimated: tuple[str, ...] = ()
    source: str = ""
    # CPU offload (planner/cost/offload_cost.py): pinned host-device copy rates (10^9 bytes/s), the CPU
    # AdamW rate (10^9 elements/s) and host RAM per node (10^9 bytes); 0 / None: unknown.
    h2d_gbps: float = 0.0
    d2h_gbps: float = 0.0
    cpu_adam_gelems: float = 0.0
    host_memory_gb: float | None = None
    # Where nodes end (planner/cost/topology.py): GPUs per node, and the inter-node bandwidth per GPU in
    # gigabits/s (400: one 400G InfiniBand NIC per GPU) with its extra latency.
    gpus_per_node: int = 8
    internode_gbps: float = 400.0
    internode_alpha_us: float = 10.0
    # Memory margins of the default budgets (planner/cost/budgets.py), measured by benchmarks/memory_margin.py:
    # GPU memory a training process holds outside PyTorch's allocator (GB), the allocator's reserved
    # peak beyond the plan's estimate (a fraction of the estimate), host memory of the OS (GB per
    # host) and of one training process besides its offloaded state (GB per rank); None: not measured.
    gpu_context_gb: float | None = None
    reserved_over_estimate: float | None = None
    host_os_gb: float | None = None
    host_process_gb: float | None = None
    memory_margin_source: str = ""
    # FP8 products (docs/design.md, "FP8"; planner/search/fp8_choice.py), measured by profile_hw: sustained
    # TFLOP/s of torch._scaled_mm by scaling ({"tensorwise": .., "rowwise": ..}) and high-precision bytes per
    # second through kernels/fp8's quantisation (amax, scale, saturated cast); empty / 0: not measured, and
    # the planner keeps every product in bf16.
    fp8_matmul_tflops: dict[str, float] = field(default_factory=dict)
    fp8_cast_gbps: float = 0.0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HardwareProfile:
        """Build a profile from its JSON form; raises ValueError naming a missing or bad field."""
        missing = [k for k in ("name", "matmul_tflops", "attention_tflops", "copy_gbps", "busbw_gbps", "alpha_us")
                   if k not in d]
        if missing:
            raise ValueError(f"hardware profile '{d.get('name', '?')}' lacks {missing}; "
                             "see planner/cost/hw_profiles/h200.json")
        for kind in COLLECTIVES:
            if _rated_kind(kind, d["busbw_gbps"]) not in d["busbw_gbps"]:
                raise ValueError(f"hardware profile '{d['name']}': busbw_gbps has no '{kind}'")
        return cls(
            name=d["name"], matmul_tflops=dict(d["matmul_tflops"]), attention_tflops=dict(d["attention_tflops"]),
            copy_gbps=float(d["copy_gbps"]), busbw_gbps=dict(d["busbw_gbps"]), alpha_us=dict(d["alpha_us"]),
            kernel_launch_us=float(d.get("kernel_launch_us", 0.0)), memory_gb=d.get("memory_gb"),
            device=d.get("device", ""), estimated=tuple(d.get("estimated", ())), source=d.get("source", ""),
            h2d_gbps=float(d.get("h2d_gbps", 0.0)), d2h_gbps=float(d.get("d2h_gbps", 0.0)),
            cpu_adam_gelems=float(d.get("cpu_adam_gelems", 0.0)), host_memory_gb=d.get("host_memory_gb"),
            gpus_per_node=int(d.get("gpus_per_node", 8)), internode_gbps=float(d.get("internode_gbps", 400.0)),
            internode_alpha_us=float(d.get("internode_alpha_us", 10.0)),
            gpu_context_gb=d.get("gpu_context_gb"), reserved_over_estimate=d.get("reserved_over_estimate"),
            host_os_gb=d.get("host_os_gb"), host_process_gb=d.get("host_process_gb"),
            memory_margin_source=d.get("memory_margin_source", ""),
            fp8_matmul_tflops=dict(d.get("fp8_matmul_tflops", {})), fp8_cast_gbps=float(d.get("fp8_cast_gbps", 0.0)),
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON form ``from_dict`` reads."""
        return {"name": self.name, "device": self.device, "memory_gb": self.memory_gb,
                "matmul_tflops": self.matmul_tflops, "attention_tflops": self.attention_tflops,
                "copy_gbps": self.copy_gbps, "busbw_gbps": self.busbw_gbps, "alpha_us": self.alpha_us,
                "h2d_gbps": self.h2d_gbps, "d2h_gbps": self.d2h_gbps, "cpu_adam_gelems": self.cpu_adam_gelems,
                "host_memory_gb": self.host_memory_gb,
                "kernel_launch_us": self.kernel_launch_us, "estimated": list(self.estimated), "source": self.source,
                "gpus_per_node": self.gpus_per_node, "internode_gbps": self.internode_gbps,
                "internode_alpha_us": self.internode_alpha_us, "gpu_context_gb": self.gpu_context_gb,
                "reserved_over_estimate": self.reserved_over_estimate, "host_os_gb": self.host_os_gb,
                "host_process_gb": self.host_process_gb, "memory_margin_source": self.memory_margin_source,
                # Only once measured: a profile without FP8 keeps the contents (and fingerprints) it had.
                **({"fp8_matmul_tflops": self.fp8_matmul_tflops, "fp8_cast_gbps": self.fp8_cast_gbps}
                   if self.fp8_matmul_tflops else {})}

    def matmul_rate(self, dtype: torch.dtype) -> float:
        """Sustained matmul FLOP/s for inputs of ``dtype`` (float32 rate for unknown dtypes)."""
        return _rate(self.matmul_tflops, dtype) * 1e12

    def fp8_unavailable(self, scaling: str) -> str:
        """Why this profile cannot price FP8 products with ``scaling`` (tensorwise, rowwise); "" when it can."""
        if self.fp8_matmul_tflops.get(scaling, 0.0) > 0 and self.fp8_cast_gbps > 0:
            return ""
        return (f"hardware profile '{self.name}' has no measured {scaling} FP8 rate (fp8_matmul_tflops, "
                "fp8_cast_gbps): run `python -m dimshard.planner.cost.profile_hw --output <profile>.json` on the "
                "GPU and compile with --hw_profile <profile>.json")

    def attention_rate(self, dtype: torch.dtype) -> float:
        """Sustained attention FLOP/s, counting backward as twice the forward FLOPs."""
        return _rate(self.attention_tflops, dtype) * 1e12

    @property
    def copy_rate(self) -> float:
        """Bytes read plus written per second by a memory-bound kernel."""
        return self.copy_gbps * 1e9

    def collective_seconds(self, kind: str, nbytes: float, group_size: int) -> float:
        """``alpha + nbytes / busbw`` for one collective moving ``nbytes`` per rank (step_bytes)."""
        if group_size <= 1 or nbytes <= 0:
            return 0.0
        kind = _rated_kind(kind, self.busbw_gbps)
        busbw = _by_group(self.busbw_gbps[kind], group_size) * 1e9
        return _by_group(self.alpha_us.get(kind, 0.0), group_size) * 1e-6 + nbytes / busbw


def _rate(table: dict[str, float], dtype: torch.dtype) -> float:
    key = str(dtype).replace("torch.", "")
    return float(table.get(key, table.get("float32", min(table.values()))))


def _by_group(value: Any, group_size: int) -> float:
    if not isinstance(value, dict):
        return float(value)
    sizes = sorted(int(k) for k in value)
    nearest = min(sizes, key=lambda s: abs(s - group_size))
    return float(value[str(nearest)] if str(nearest) in value else value[nearest])


def shipped_profiles() -> list[str]:
    """Names of the profiles shipped in planner/cost/hw_profiles."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.json"))


def load_hw_profile(spec: str | Path | dict | HardwareProfile | None) -> HardwareProfile:
    """A profile from a shipped name (``h200``, ``h100``, ``cpu``), a JSON file path, or a dict.

    None or "" gives ``default_hw_profile()``.
    """
    if spec is None or spec == "":
        return default_hw_profile()
    if isinstance(spec, HardwareProfile):
        return spec
    if isinstance(spec, dict):
        return HardwareProfile.from_dict(spec)
    path = Path(spec)
    if not path.is_file():
        shipped = PROFILE_DIR / f"{spec}.json"
        if not shipped.is_file():
            raise ValueError(f"no hardware profile '{spec}': give a JSON file written by "
                             f"`python -m dimshard.planner.cost.profile_hw` or one of {shipped_profiles()}")
        path = shipped
    return HardwareProfile.from_dict(json.loads(path.read_text()))


def default_hw_profile() -> HardwareProfile:
    """$DIMSHARD_HW_PROFILE if set, else the profile matching the visible GPU, else h100.

    The compile stage usually runs without a GPU; the reference job (docs/design.md, "Measuring: MFU") runs on H100s,
    so that is the default target.
    """
    env = os.environ.get("DIMSHARD_HW_PROFILE")
    if env:
        return load_hw_profile(env)
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name().upper()
        for known in ("H200", "H100"):
            if known in name:
                return load_hw_profile(known.lower())
    return load_hw_profile("h100")

