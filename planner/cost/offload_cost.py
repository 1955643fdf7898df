"""Pricing CPU offload: GPU and host memory, and the time the transfers and the host update add.

Two levers, next to recompute and sharding (see ``planner/plan/offload_plan.py`` for what they mean at
run time):

- **Optimizer offload** moves AdamW's fp32 state (masters and two moments, 12 bytes per owned
  element, a master even for fp32 parameters) to host memory; the GPU keeps two staging chunks
  for the streamed update (``STAGING_NUMEL`` elements of three fp32 values each).
  Its update costs the faster of the CPU update (``max`` of the gradients' device-to-host copy,
  the parameters' host-to-device copy and the CPU's AdamW rate: the three overlap chunk by
  chunk) and the GPU-streamed update (``max`` of the state's copy each way, which overlap, and
  the device update itself).
- **Activation offload** of a recomputed scope keeps its gradient-carrying inputs in host memory:
  on the GPU they exist only while the scope is recomputed, together with the prefetched input
  of the scope before it. Each copy hides under compute: the one to the host under the scope's
  forward, the one back under its recomputation and backward; only the excess is added (to the
  communication time). The first scopes in forward order are offloaded first: theirs are held
  longest.

Rates come from the hardware profile (``h2d_gbps``, ``d2h_gbps`` pinned copies,
``cpu_adam_gelems`` the CPU update in 10^9 elements/s), with the defaults below for a profile
without them. The host budget the offloaded bytes must fit is ``planner/cost/budgets.py``'s.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..graph.ir import Graph, dtype_bytes, numel
from ..graph.scopes import outermost_scopes, scopes_within
from ..plan.offload_plan import offload_mode
from ..plan.placements import Plan, ResolvedPlan, local_shape
from .hardware import HardwareProfile
from .model import GB, Estimate, PlanAnalysis

# Profile-less defaults: PCIe Gen5 x16 pinned copies and a 16-core host (estimates).
DEFAULT_H2D_GBPS = 50.0
DEFAULT_D2H_GBPS = 50.0
DEFAULT_CPU_ADAM_GELEMS = 1.0
STAGING_NUMEL = 2**24  # runtime/optimizer/host_adamw.py's default chunk


@dataclass(frozen=True)
class OffloadRates:
    """Host-device copy rates (bytes/s, pinned memory) and the CPU AdamW rate (elements/s)."""

    h2d: float
    d2h: float
    cpu_adam: float

    @classmethod
    def of(cls, hw: HardwareProfile) -> OffloadRates:
        """The profile's rates, or the module defaults where it has none."""
        return cls(h2d=float(getattr(hw, "h2d_gbps", 0) or DEFAULT_H2D_GBPS) * 1e9,
                   d2h=float(getattr(hw, "d2h_gbps", 0) or DEFAULT_D2H_GBPS) * 1e9,
                   cpu_adam=float(getattr(hw, "cpu_adam_gelems", 0) or DEFAULT_CPU_ADAM_GELEMS) * 1e9)


@dataclass(frozen=True)
class OffloadedEstimate:
    """An estimate with offloads applied: GPU side in ``estimate``, host bytes per rank, the update device."""

    estimate: Estimate
    host_bytes: float
    optimizer: bool
    scopes: tuple[str, ...]
    update_device: str | None  # cpu | gpu for an offloaded optimizer (the faster estimate), else None


def owned_state(graph: Graph, resolved: ResolvedPlan, dp_size: int, zero: bool) -> tuple[float, float]:
    """(elements of optimizer state one rank owns, bytes of its parameters in their dtype) under the plan."""
    mesh = resolved.plan.mesh
    elements = param_bytes = 0.0
    share = dp_size if zero else 1
    for tid in graph.parameters.values():
        t = graph.tensors[tid]
        n = numel(local_shape(t.shape, resolved.stored[tid], mesh)) / share
        elements += n
        param_bytes += n * dtype_bytes(t.dtype)
    return elements, param_bytes


def optimizer_update_seconds(elements: float, param_bytes: float, device_update_s: float,
                             rates: OffloadRates) -> tuple[str, float]:
    """The faster offloaded update, ``(device, seconds)``, for ``elements`` owned fp32 state elements."""
    cpu = max(4 * elements / rates.d2h, param_bytes / rates.h2d, elements / rates.cpu_adam)
    gpu = max(12 * elements / rates.h2d, 12 * elements / rates.d2h, device_update_s)
    return ("cpu", cpu) if cpu < gpu else ("gpu", gpu)


def _offloadable_inputs(graph: Graph, analysis: PlanAnalysis, members: list, elsewhere: set) -> dict[tuple, float]:
    produced = set().union(*(r.produced for r in members))
    found: dict[tuple, float] = {}
    for r in members:
        for key, nbytes in r.inputs.items():
            t = graph.tensors[key[0]]
            if key[0] not in produced and t.requires_grad and t.dtype.is_floating_point and key not in elsewhere:
                found[key] = nbytes
    return found


def apply_offload(graph: Graph, resolved: ResolvedPlan, analysis: PlanAnalysis, recompute_scopes: list[str],
                  optimizer: bool, offload_scopes: Iterable[str], rates: OffloadRates, dp_size: int = 1,
                  zero: bool = True) -> OffloadedEstimate:
    """The estimate of ``recompute_scopes`` with the optimizer and/or these recomputed scopes offloaded.

    ``offload_scopes`` must be outermost recomputed scopes (``scopes.outermost_scopes``).
    """
    offload_scopes = tuple(offload_scopes)
    outer = outermost_scopes(list(recompute_scopes))
    unknown = [s for s in offload_scopes if s not in outer]
    if unknown:
        raise ValueError(f"offloaded scopes {unknown} are not outermost recomputed scopes of {outer}")
    regions = dict(analysis.regions)
    elsewhere = {key for _, key, _ in analysis.other_saved}
    within = scopes_within(tuple(regions))
    covered = {name for s in outer for name in within.get(s, ())}
    for name, r in regions.items():
        if name not in covered:
            elsewhere.update(r.saved)
    host = 0.0
    exposed = 0.0
    for scope in offload_scopes:
        names = list(within.get(scope, ()))
        members = [regions[n] for n in names]
        moved = _offloadable_inputs(graph, analysis, members, elsewhere)
        nbytes = sum(moved.values())
        host += nbytes
        forward_s = sum(r.forward_compute_s for r in members)
        # Down under the forward; back under the recomputation and the backward (about 3 forwards).
        exposed += max(0.0, nbytes / rates.d2h - forward_s) + max(0.0, nbytes / rates.h2d - 3 * forward_s)
        for i, n in enumerate(names):
            r = regions[n]
            inputs = {k: (0.0 if k in moved else v) for k, v in r.inputs.items()}
            saved = dict(r.saved)
            if i == 0:
                # While the scope is recomputed: its input is back, and the previous scope's is prefetched.
                saved[("offloaded input and prefetch", scope)] = 2 * nbytes
            regions[n] = dataclasses.replace(r, inputs=inputs, saved=saved)
    estimate = dataclasses.replace(analysis, regions=regions).estimate(list(recompute_scopes))
    estimate = dataclasses.replace(estimate, comm_s=estimate.comm_s + exposed)
    device = None
    if optimizer:
        elements, param_bytes = owned_state(graph, resolved, dp_size, zero)
        device, seconds = optimizer_update_seconds(elements, param_bytes, analysis.optimizer_s, rates)
        memory = dict(estimate.memory)
        # Two staging buffers of master and both moments (fp32) for the streamed update.
        memory["optimizer"] = 24.0 * min(elements, STAGING_NUMEL) if device == "gpu" else 0.0
        host += 12.0 * elements
        estimate = dataclasses.replace(estimate, memory=memory, optimizer_s=seconds)
    estimate = dataclasses.replace(estimate, host_bytes=host)
    return OffloadedEstimate(estimate, host, optimizer, offload_scopes, device)


def offload_variants(graph: Graph, resolved: ResolvedPlan, analysis: PlanAnalysis, recompute_scopes: list[str],
                     hw: HardwareProfile, gpu_budget: float | None, host_budget: float | None,
                     extra: Mapping[str, Any] | None, dp_size: int = 1, zero: bool = True) -> list[OffloadedEstimate]:
    """Offloaded alternatives to a recompute choice that does not fit ``gpu_budget`` (bytes), by the ``offload`` option.

    For each optimizer choice allowed (``auto``: with and without), the fewest leading recomputed
    scopes whose offload fits the GPU (a bisection: the GPU peak falls as more are offloaded),
    or, when none fits, all of them (the smallest GPU peak, for the error message). Forced modes
    give their one variant. Empty when the option is ``none`` or, under ``auto``, when the plan fits.
    """
    mode = offload_mode(extra)
    if mode == "none":
        return []
    rates = OffloadRates.of(hw)
    outer = outermost_scopes(list(recompute_scopes))

    def variant(opt: bool, k: int) -> OffloadedEstimate:
        return apply_offload(graph, resolved, analysis, recompute_scopes, opt, outer[:k], rates, dp_size, zero)

    if mode == "optimizer":
        return [variant(True, 0)]
    if mode in ("activations", "all"):
        return [variant(mode == "all", len(outer))] if outer else []
    def on_gpu(v: OffloadedEstimate) -> bool:
        return gpu_budget is None or v.estimate.peak_bytes <= gpu_budget

    found = []
    for opt in (False, True):
        most = variant(opt, len(outer))
        if not on_gpu(most):
            if opt or outer:
                found.append(most)
            continue
        lo, hi = 0, len(outer)  # fits with hi scopes offloaded
        while lo < hi:
            mid = (lo + hi) // 2
            if on_gpu(variant(opt, mid)):
                hi = mid
            else:
                lo = mid + 1
        found.append(variant(opt, hi))
        # One more offloaded scope than the least that fits leaves GPU headroom for fragmentation.
        if hi < len(outer):
            found.append(variant(opt, hi + 1))
    # Host feasibility is the caller's (``fits``): every variant is kept for the error message.
    return [v for v in found if v.optimizer or v.scopes]


def offloaded_plan(plan: Plan, variant: OffloadedEstimate) -> Plan:
    """A copy of ``plan`` recording the variant's offloads."""
    return dataclasses.replace(plan, offload_optimizer=variant.optimizer, offload_scopes=list(variant.scopes))


def describe(variant: OffloadedEstimate | None, plan: Plan) -> str:
    """One line for reports: what is offloaded."""
    parts = []
    if plan.offload_optimizer:
        where = f", updated on the {variant.update_device.upper()}" if variant and variant.update_device else ""
        parts.append(f"optimizer state{where}")
    if plan.offload_scopes:
        parts.append(f"inputs of {len(plan.offload_scopes)} recomputed scope(s)")
    return " and ".join(parts) if parts else "nothing"


def peak_summary(gpu_bytes: float, host_bytes: float) -> str:
    """``"X GB per GPU, Y GB host per rank"``."""
    return f"{gpu_bytes / GB:.3g} GB per GPU, {host_bytes / GB:.3g} GB host per rank"


def fits(estimate: Estimate, gpu_budget: float | None, host_budget: float | None) -> bool:
    """Whether the GPU peak and the host bytes are within their budgets (None: no limit)."""
    host = getattr(estimate, "host_bytes", 0.0)
    return (gpu_budget is None or estimate.peak_bytes <= gpu_budget) and (host_budget is None or host <= host_budget)
