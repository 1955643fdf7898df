"""The cost model: step time and peak memory per GPU of a resolved plan, from op shapes and a hardware profile.

Time. Every op runs on its local shards (``ResolvedPlan.local_shape``). Matmuls (linear, matmul,
the chunked cross-entropy's projection) cost ``2*m*n*k`` FLOPs, attention ``4*b*h*l*s*d`` (half
of it when causal), each at the profile's sustained rate, or the time to move its bytes when that
is longer (a roofline); every other op is memory bound: the bytes it reads and writes over the
copy bandwidth. Views cost nothing. Backward costs twice the forward; the chunked cross-entropy
takes its gradients in the forward (three products there) and its backward only scales them. A collective costs ``alpha + bytes / busbw`` with the
bytes of ``redistribute.step_bytes`` and the bus bandwidth of its kind (nccl-tests' convention,
under which every kind moves ``step_bytes`` per rank). Its backward is the transposed collective
(all-gather <-> reduce-scatter, all-reduce and all-to-all themselves, a local slice none); a
recomputed scope runs its forward, collectives included, twice. Nothing is assumed to overlap.

Memory per GPU, at the peak of a training step:

- parameters in their dtype, gradients in the fp32 buffers of ``runtime/grad_reducer.py``, and
  Adam state (two fp32 moments, plus an fp32 master copy for low-precision parameters: 12 bytes
  per bf16 parameter), the optimizer state divided by ``dp_size`` under ZeRO-1;
- activations kept for backward. The approximation: an op that has a backward keeps the
  activations it reads (in the placement it reads them, so an all-gathered input is kept whole),
  except ops whose backward needs no values: views, casts, additions, concatenations, means and
  sums, and a product with a constant. Attention keeps its output as well. A tensor kept by
  several ops counts once. A recomputed scope keeps only its inputs;
- the transient: while a recomputed scope is run again in backward its kept activations come back
  (the peak checks every such moment, with the activations of earlier ops still held), plus a
  working set: the largest gradient-carrying op's local inputs and outputs (their gradients are
  alive while it runs backward) and a custom loss's chunk of logits.

``GB`` in this module is 10^9 bytes.
"""

from __future__ import annotations

import bisect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .graph import ACTIVATION, INPUT, Graph, Op
from .plan import REPLICATE, Mesh, ResolvedPlan, Shard, TensorPlacement
from .redistribute import Step, redistribution_steps, step_bytes

GB = 1e9
PROFILE_DIR = Path(__file__).parent / "hw_profiles"
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")
# The collective each forward step's gradient needs in backward (runtime/comm.py's table).
BACKWARD_KIND = {"all_gather": "reduce_scatter", "reduce_scatter": "all_gather", "all_reduce": "all_reduce",
                 "all_to_all": "all_to_all", "local_slice": None}

# --------------------------------------------------------------------------------------------
# Hardware profiles
# --------------------------------------------------------------------------------------------


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

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HardwareProfile:
        """Build a profile from its JSON form; raises ValueError naming a missing or bad field."""
        missing = [k for k in ("name", "matmul_tflops", "attention_tflops", "copy_gbps", "busbw_gbps", "alpha_us")
                   if k not in d]
        if missing:
            raise ValueError(f"hardware profile '{d.get('name', '?')}' lacks {missing}; see planner/hw_profiles/h200.json")
        for kind in COLLECTIVES:
            if kind not in d["busbw_gbps"]:
                raise ValueError(f"hardware profile '{d['name']}': busbw_gbps has no '{kind}'")
        return cls(
            name=d["name"], matmul_tflops=dict(d["matmul_tflops"]), attention_tflops=dict(d["attention_tflops"]),
            copy_gbps=float(d["copy_gbps"]), busbw_gbps=dict(d["busbw_gbps"]), alpha_us=dict(d["alpha_us"]),
            kernel_launch_us=float(d.get("kernel_launch_us", 0.0)), memory_gb=d.get("memory_gb"),
            device=d.get("device", ""), estimated=tuple(d.get("estimated", ())), source=d.get("source", ""),
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON form ``from_dict`` reads."""
        return {"name": self.name, "device": self.device, "memory_gb": self.memory_gb,
                "matmul_tflops": self.matmul_tflops, "attention_tflops": self.attention_tflops,
                "copy_gbps": self.copy_gbps, "busbw_gbps": self.busbw_gbps, "alpha_us": self.alpha_us,
                "kernel_launch_us": self.kernel_launch_us, "estimated": list(self.estimated), "source": self.source}

    def matmul_rate(self, dtype: torch.dtype) -> float:
        """Sustained matmul FLOP/s for inputs of ``dtype`` (float32 rate for unknown dtypes)."""
        return _rate(self.matmul_tflops, dtype) * 1e12

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
    """Names of the profiles shipped in planner/hw_profiles."""
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
                             f"`python -m dimshard.planner.profile_hw` or one of {shipped_profiles()}")
        path = shipped
    return HardwareProfile.from_dict(json.loads(path.read_text()))


def default_hw_profile() -> HardwareProfile:
    """$DIMSHARD_HW_PROFILE if set, else the profile matching the visible GPU, else h100.

    The compile stage usually runs without a GPU; the reference job (DESIGN.md) runs on H100s,
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


# --------------------------------------------------------------------------------------------
# Per-op cost
# --------------------------------------------------------------------------------------------

_VIEWS = {
    "torch.Tensor.view", "torch.Tensor.reshape", "torch.reshape", "torch.Tensor.view_as", "torch.Tensor.reshape_as",
    "torch.Tensor.transpose", "torch.transpose", "torch.Tensor.permute", "torch.permute", "torch.Tensor.unsqueeze",
    "torch.unsqueeze", "torch.Tensor.squeeze", "torch.squeeze", "torch.Tensor.expand", "torch.Tensor.expand_as",
    "torch.Tensor.flatten", "torch.flatten", "torch.Tensor.unflatten", "torch.unflatten", "torch.Tensor.__getitem__",
    "torch.Tensor.split", "torch.split", "torch.Tensor.chunk", "torch.chunk", "torch.Tensor.detach",
    "torch.Tensor.requires_grad_",
}
_CASTS = {"torch.Tensor.to", "torch.Tensor.float", "torch.Tensor.type", "torch.Tensor.bfloat16", "torch.Tensor.half",
          "torch.Tensor.double", "torch.Tensor.type_as", "torch.Tensor.contiguous", "torch.Tensor.clone"}
_COPIES = {"torch.Tensor.contiguous", "torch.Tensor.clone"}  # casts that copy even within a dtype
_MATMULS = {"torch.nn.functional.linear", "torch.matmul", "torch.Tensor.matmul", "torch.Tensor.__matmul__",
            "torch.bmm", "torch.Tensor.bmm"}
SDPA = "torch.nn.functional.scaled_dot_product_attention"
# Ops whose backward needs no saved values (besides shapes and dtypes).
_SAVES_NOTHING = _VIEWS | _CASTS | {
    "torch.Tensor.add", "torch.add", "torch.Tensor.__add__", "torch.Tensor.__radd__", "torch.Tensor.add_",
    "torch.Tensor.sub", "torch.sub", "torch.Tensor.__sub__", "torch.Tensor.__rsub__", "torch.Tensor.neg",
    "torch.neg", "torch.Tensor.__neg__", "torch.cat", "torch.concat", "torch.concatenate", "torch.stack",
    "torch.Tensor.mean", "torch.mean", "torch.Tensor.sum", "torch.sum", "torch.nn.functional.pad",
    "torch.Tensor.copy_",
}
# Products: the backward of one operand needs the other, so a product with a constant keeps nothing.
_PRODUCTS = {"torch.Tensor.mul", "torch.mul", "torch.Tensor.__mul__", "torch.Tensor.__rmul__", "torch.Tensor.mul_",
             "torch.Tensor.div", "torch.div", "torch.Tensor.__truediv__", "torch.Tensor.__rtruediv__"}


def dtype_bytes(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype``."""
    if dtype == torch.bool:
        return 1
    if dtype.is_floating_point or dtype.is_complex:
        return torch.finfo(dtype).bits // 8
    return torch.iinfo(dtype).bits // 8


def local_shape(shape: tuple[int, ...], placement: TensorPlacement, mesh: Mesh) -> tuple[int, ...]:
    """The per-rank shape of a tensor of ``shape`` under ``placement`` (as ResolvedPlan.local_shape)."""
    out = list(shape)
    for axis, p in enumerate(placement):
        if isinstance(p, Shard):
            out[p.dim] //= mesh.shape[axis]
    return tuple(out)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def is_chunked_loss(op: Op) -> bool:
    """A registered cross-entropy op taking ``(hidden, weight, labels, ...)``: costed as its projection."""
    return op.is_custom and "cross_entropy" in op.name


@dataclass(frozen=True)
class OpCost:
    """One op on its local shards: FLOPs, bytes moved, seconds forward and backward."""

    flops: float  # forward
    nbytes: float
    forward_s: float
    backward_s: float
    kind: str  # matmul | attention | memory | view
    backward_flops: float = 0.0


def op_cost(graph: Graph, op: Op, ins: list[TensorPlacement], outs: list[TensorPlacement], mesh: Mesh,
            hw: HardwareProfile) -> OpCost:
    """Time of ``op`` with its inputs and outputs in the given placements (the op's own, not the producers')."""
    in_ids, out_ids = op.input_ids(), op.output_ids()
    in_t = [graph.tensors[t] for t in in_ids]
    out_t = [graph.tensors[t] for t in out_ids]
    in_shapes = [local_shape(t.shape, p, mesh) for t, p in zip(in_t, ins)]
    out_shapes = [local_shape(t.shape, p, mesh) for t, p in zip(out_t, outs)]
    nbytes = float(sum(_numel(s) * dtype_bytes(t.dtype) for s, t in zip(in_shapes + out_shapes, in_t + out_t)))
    has_backward = any(t.requires_grad for t in out_t)
    launch = hw.kernel_launch_us * 1e-6
    name = op.name
    same_dtype = bool(in_t and out_t) and in_t[0].dtype == out_t[0].dtype
    if name in _VIEWS or (name in _CASTS and same_dtype and name not in _COPIES):
        return OpCost(0.0, 0.0, 0.0, 0.0, "view")
    if name in _MATMULS and len(in_shapes) >= 2 and in_shapes[0]:
        flops = 2.0 * _numel(out_shapes[0]) * in_shapes[0][-1]
        fwd = max(flops / hw.matmul_rate(in_t[0].dtype), nbytes / hw.copy_rate) + launch
        return OpCost(flops, nbytes, fwd, 2 * fwd if has_backward else 0.0, "matmul", 2 * flops * has_backward)
    if name == SDPA and len(in_shapes) >= 3 and len(in_shapes[0]) == 4:
        (b, hq, lq, e), (_, _, s, _), f = in_shapes[0], in_shapes[1], in_shapes[2][-1]
        flops = 2.0 * b * hq * lq * s * (e + f)
        causal = op.kwargs.get("is_causal", op.args[5] if len(op.args) > 5 else False)
        if causal:
            flops /= 2
        fwd = flops / hw.attention_rate(in_t[0].dtype) + launch
        return OpCost(flops, nbytes, fwd, 2 * fwd if has_backward else 0.0, "attention", 2 * flops * has_backward)
    if is_chunked_loss(op) and len(in_shapes) >= 2 and len(in_shapes[1]) == 2:
        hidden, weight = in_shapes[0], in_shapes[1]
        tokens = _numel(hidden) // max(hidden[-1], 1)
        flops = 2.0 * tokens * weight[0] * weight[1]
        if not has_backward:
            fwd = max(flops / hw.matmul_rate(in_t[0].dtype), nbytes / hw.copy_rate) + launch
            return OpCost(flops, nbytes, fwd, 0.0, "matmul")
        # The kernel's precompute path (its default when gradients are needed) takes both gradients
        # in the forward, three products; the backward only scales the saved gradients, one read
        # and one write of each.
        fwd = max(3 * flops / hw.matmul_rate(in_t[0].dtype), nbytes / hw.copy_rate) + launch
        grad_bytes = float(sum(_numel(s) * dtype_bytes(t.dtype) for s, t in zip(in_shapes[:2], in_t[:2])))
        bwd = 2 * grad_bytes / hw.copy_rate + launch
        return OpCost(3 * flops, nbytes, fwd, bwd, "matmul", 0.0)
    fwd = nbytes / hw.copy_rate + launch
    return OpCost(0.0, nbytes, fwd, 2 * fwd if has_backward else 0.0, "memory")


def saved_inputs(graph: Graph, op: Op) -> list[int]:
    """Positions of the tensor inputs ``op`` keeps for its backward (see the module docstring)."""
    in_ids = op.input_ids()
    if not any(graph.tensors[t].requires_grad for t in op.output_ids()) or op.name in _SAVES_NOTHING:
        return []
    kinds = [graph.tensors[t].kind for t in in_ids]
    keep = [i for i, k in enumerate(kinds) if k in (ACTIVATION, INPUT)]
    if op.name in _PRODUCTS:
        # x * y keeps x only when y needs a gradient, and the other way round.
        grads = [graph.tensors[t].requires_grad for t in in_ids]
        keep = [i for i in keep if any(g for j, g in enumerate(grads) if j != i)]
    return keep


def saves_output(op: Op) -> bool:
    """Attention keeps its output (and a small log-sum-exp) for backward."""
    return op.name == SDPA


def working_bytes(graph: Graph, op: Op, ins: list[TensorPlacement], outs: list[TensorPlacement], mesh: Mesh) -> int:
    """Transient bytes while ``op`` runs backward: gradients of its local activations, plus a loss chunk."""
    if not any(graph.tensors[t].requires_grad for t in op.output_ids()):
        return 0
    total = 0
    for tid, p in list(zip(op.input_ids(), ins)) + list(zip(op.output_ids(), outs)):
        t = graph.tensors[tid]
        if t.kind == ACTIVATION and t.dtype.is_floating_point:
            total += _numel(local_shape(t.shape, p, mesh)) * dtype_bytes(t.dtype)
    if is_chunked_loss(op):
        hidden = local_shape(graph.tensors[op.input_ids()[0]].shape, ins[0], mesh)
        vocab = local_shape(graph.tensors[op.input_ids()[1]].shape, ins[1], mesh)[0]
        from dimshard.kernels.chunk_linear_cross_entropy import precompute_tile_sizes

        chunk = op.kwargs.get("chunk_size", op.args[4] if len(op.args) > 4 else None)
        itemsize = dtype_bytes(graph.tensors[op.input_ids()[0]].dtype)
        tokens = _numel(hidden) // max(hidden[-1], 1)
        chunk_tokens, _ = precompute_tile_sizes(tokens, vocab, itemsize, chunk, None)
        # Precompute path: one chunk of logits in the hidden dtype, the hidden and weight gradients
        # taken in the forward and held until the backward, and the weight gradient's rounding
        # residual (low-precision weights).
        weight_numel = _numel(local_shape(graph.tensors[op.input_ids()[1]].shape, ins[1], mesh))
        total += chunk_tokens * vocab * itemsize + _numel(hidden) * itemsize
        total += weight_numel * itemsize * (1 if itemsize >= 4 else 2)
    return total


# --------------------------------------------------------------------------------------------
# Collectives and parameter state
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CollectiveCost:
    """The collectives of one redistribution: (kind, mesh axis, bytes per rank, seconds) forward and backward."""

    forward: tuple[tuple[str, int, float, float], ...]
    backward: tuple[tuple[str, int, float, float], ...]

    @property
    def forward_s(self) -> float:
        return sum(s for *_, s in self.forward)

    @property
    def backward_s(self) -> float:
        return sum(s for *_, s in self.backward)


def redistribution_cost(shape: tuple[int, ...], itemsize: int, src: TensorPlacement, dst: TensorPlacement,
                        mesh: Mesh, hw: HardwareProfile, backward: bool) -> CollectiveCost:
    """Collectives turning a tensor of full ``shape`` from ``src`` into ``dst``, and their backward."""
    local = float(_numel(local_shape(shape, src, mesh)) * itemsize)
    fwd: list[tuple[str, int, float, float]] = []
    bwd: list[tuple[str, int, float, float]] = []
    for step in redistribution_steps(src, dst):
        n = mesh.shape[step.axis]
        after = _local_after(step, local, n)
        if step.kind != "local_slice":
            nbytes = float(step_bytes(step, int(local), n))
            fwd.append((step.kind, step.axis, nbytes, hw.collective_seconds(step.kind, nbytes, n)))
        back = BACKWARD_KIND[step.kind]
        if backward and back is not None:
            nbytes = float(step_bytes(Step(back, step.axis), int(after), n))
            bwd.append((back, step.axis, nbytes, hw.collective_seconds(back, nbytes, n)))
        local = after
    return CollectiveCost(tuple(fwd), tuple(bwd))


def _local_after(step: Step, local: float, n: int) -> float:
    if step.kind == "all_gather":
        return local * n
    if step.kind in ("reduce_scatter", "local_slice"):
        return local / n
    return local


@dataclass(frozen=True)
class ParamState:
    """Bytes per GPU of one parameter shard's value, fp32 gradient buffer and Adam state; sync seconds."""

    parameters: float
    gradients: float
    optimizer: float
    sync_s: float
    optimizer_s: float


def param_state(numel_local: int, dtype: torch.dtype, holders: int, hw: HardwareProfile, dp_size: int = 1,
                zero: bool = True) -> ParamState:
    """State of a local shard of ``numel_local`` elements held by ``holders`` unit ranks.

    Gradients are all-reduced over ``holders * dp_size`` ranks in fp32 (runtime/grad_reducer.py);
    with ZeRO-1 each copy keeps 1/dp_size of the optimizer state and all-gathers updated parameters.
    """
    itemsize = dtype_bytes(dtype)
    master = 0 if dtype == torch.float32 else 4
    opt = numel_local * (8 + master) / (dp_size if zero else 1)
    group = holders * dp_size
    grad_bytes = numel_local * 4.0
    sync = hw.collective_seconds("all_reduce", 2 * grad_bytes * (group - 1) / group, group)
    if zero and dp_size > 1:
        sync += hw.collective_seconds("all_gather", numel_local * itemsize * (dp_size - 1) / dp_size, dp_size)
    # AdamW reads and writes parameter, master and moments and reads the gradient: ~32 bytes per owned element.
    opt_s = numel_local / (dp_size if zero else 1) * 32 / hw.copy_rate
    return ParamState(numel_local * itemsize, grad_bytes, opt, sync, opt_s)


def replica_count(placement: TensorPlacement, mesh: Mesh) -> int:
    """Unit ranks holding the same shard: the product of the axes the tensor is not sharded on."""
    n = 1
    for axis, p in enumerate(placement):
        if not isinstance(p, Shard):
            n *= mesh.shape[axis]
    return n


# --------------------------------------------------------------------------------------------
# Whole-plan estimate
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CollectiveRecord:
    """One collective of the forward (or its backward) feeding op ``op_index``; ``region`` is its recompute scope."""

    op_index: int
    tensor_id: int
    kind: str
    axis: int  # mesh axis index
    group_size: int
    nbytes: float
    seconds: float
    phase: str  # forward | backward
    region: str | None


@dataclass
class Estimate:
    """Estimated time of one training step (one micro-batch per copy) and peak memory per GPU.

    Seconds: ``compute_s`` (forward, backward and recomputation of ops), ``comm_s`` (activation
    collectives, forward, backward and recomputed), ``grad_sync_s`` (gradient all-reduce and ZeRO
    parameter all-gather), ``optimizer_s``. Bytes per GPU by category in ``memory``; ``peak_bytes``
    is their sum at the moment of the peak (``peak_phase``).
    """

    compute_s: float
    comm_s: float
    grad_sync_s: float
    optimizer_s: float
    memory: dict[str, float]
    peak_phase: str
    flops: float  # executed per GPU, recomputation included
    model_flops: float  # forward and backward FLOPs per GPU without recomputation
    recompute_scopes: list[str]
    collectives: list[CollectiveRecord]
    dp_size: int
    hw_name: str

    @property
    def forward_backward_s(self) -> float:
        """Forward plus backward of one micro-batch: what a step costs without the optimizer."""
        return self.compute_s + self.comm_s

    @property
    def step_s(self) -> float:
        return self.compute_s + self.comm_s + self.grad_sync_s + self.optimizer_s

    @property
    def peak_bytes(self) -> float:
        return sum(self.memory.values())

    @property
    def peak_gb(self) -> float:
        return self.peak_bytes / GB

    def summary(self) -> str:
        """One line: step time split and peak memory."""
        return (f"step {self.step_s * 1e3:.1f} ms (compute {self.compute_s * 1e3:.1f}, comm {self.comm_s * 1e3:.1f}, "
                f"grad sync {self.grad_sync_s * 1e3:.1f}, optimizer {self.optimizer_s * 1e3:.1f}), "
                f"peak {self.peak_gb:.2f} GB")


@dataclass
class _Region:
    scope: str
    start: int = 1 << 60
    forward_compute_s: float = 0.0
    forward_comm_s: float = 0.0
    forward_flops: float = 0.0
    saved: dict[tuple, float] = field(default_factory=dict)  # kept for backward when not recomputed
    inputs: dict[tuple, float] = field(default_factory=dict)  # kept when recomputed
    produced: set[int] = field(default_factory=set)  # tensors its ops write


@dataclass
class PlanAnalysis:
    """Per-op costs of one resolved plan, from which ``estimate(recompute_scopes)`` is cheap.

    The search evaluates every recompute choice of a candidate plan with one analysis.
    """

    base_compute_s: float
    base_comm_s: float
    flops: float
    static: dict[str, float]
    grad_sync_s: float
    optimizer_s: float
    working_bytes: float
    regions: dict[str, _Region]
    other_saved: list[tuple[int, tuple, float]]  # (op index, key, bytes) kept outside every region
    collectives: list[CollectiveRecord]
    dp_size: int
    hw_name: str

    def _recomputed_groups(self, recompute_scopes: list[str]) -> dict[str, list[_Region]]:
        """Each recomputed scope with the analysed regions inside it (itself, nested ones like its MLP).

        A scope inside another recomputed scope adds nothing: the outer checkpoint holds it, as in
        codegen, where an op belongs to the first scope of the list that contains it.
        """
        outer = [s for s in dict.fromkeys(recompute_scopes)
                 if not any(o != s and s.startswith(o + ".") for o in recompute_scopes)]
        groups = {s: [r for name, r in self.regions.items() if name == s or name.startswith(s + ".")]
                  for s in outer}
        unknown = [s for s, members in groups.items() if not members]
        if unknown:
            raise ValueError(f"recompute scopes {unknown} were not analysed; pass them to analyze(regions=...)")
        return groups

    def estimate(self, recompute_scopes: list[str]) -> Estimate:
        """The estimate with these scopes recomputed (each must be, or hold, an analysed region).

        A recomputed scope keeps only what flows into it from outside, so a decoder layer analysed
        as two regions (the layer's own ops and its MLP) and recomputed whole keeps its input only.
        """
        groups = self._recomputed_groups(recompute_scopes)
        covered = {r.scope for members in groups.values() for r in members}
        kept: dict[tuple, tuple[int, float]] = {}  # key -> (position, bytes); first position wins

        def keep(key: tuple, pos: int, nbytes: float) -> None:
            if key not in kept or kept[key][0] > pos:
                kept[key] = (pos, nbytes)

        for pos, key, nbytes in self.other_saved:
            kept.setdefault(key, (pos, nbytes))
        for region in self.regions.values():
            if region.scope not in covered:
                for key, nbytes in region.saved.items():
                    keep(key, region.start + 1, nbytes)
        starts, again_bytes = {}, {}
        for scope, members in groups.items():
            produced = set().union(*(r.produced for r in members))
            starts[scope] = min(r.start for r in members)
            again_bytes[scope] = sum(sum(r.saved.values()) for r in members)
            for r in members:
                for key, nbytes in r.inputs.items():
                    if key[0] not in produced:
                        keep(key, starts[scope], nbytes)
        order = sorted(kept.values())
        positions = [p for p, _ in order]
        prefix = [0.0]
        for _, b in order:
            prefix.append(prefix[-1] + b)
        memory = dict(self.static)
        memory.update(activations=prefix[-1], recompute=0.0, working=self.working_bytes)
        phase = "start of backward"
        best = prefix[-1]
        for scope in groups:
            before = prefix[bisect.bisect_right(positions, starts[scope])]
            again = again_bytes[scope]
            if before + again > best:
                best, phase = before + again, f"recomputing {scope}"
                memory.update(activations=before, recompute=again)
        members = [r for group in groups.values() for r in group]
        extra_c = sum(r.forward_compute_s for r in members)
        extra_m = sum(r.forward_comm_s for r in members)
        extra_f = sum(r.forward_flops for r in members)
        return Estimate(
            compute_s=self.base_compute_s + extra_c, comm_s=self.base_comm_s + extra_m,
            grad_sync_s=self.grad_sync_s, optimizer_s=self.optimizer_s, memory=memory, peak_phase=phase,
            flops=self.flops + extra_f, model_flops=self.flops, recompute_scopes=list(recompute_scopes),
            collectives=self.collectives, dp_size=self.dp_size, hw_name=self.hw_name,
        )


def _region_of(scope: str, regions: list[str]) -> str | None:
    for r in regions:
        if scope == r or scope.startswith(r + "."):
            return r
    return None


def analyze(graph: Graph, resolved: ResolvedPlan, hw: HardwareProfile, dp_size: int = 1, zero: bool = True,
            regions: list[str] | None = None) -> PlanAnalysis:
    """Cost every op, collective and parameter of a resolved plan once.

    ``regions`` are the scopes that may be recomputed (default: the plan's recompute scopes, then
    the decoder layers); an op belongs to the innermost that contains its scope.
    """
    from .policies import decoder_layer_scopes

    plan = resolved.plan
    mesh = plan.mesh
    if regions is None:
        regions = list(plan.recompute_scopes) + decoder_layer_scopes(graph)
    # Nested scopes first (a layer's MLP before the layer), so that an op lands in the innermost
    # analysed region; ``estimate`` merges the regions inside a scope recomputed whole.
    regions = sorted(dict.fromkeys(regions), key=lambda r: -r.count("."))
    region_info = {r: _Region(r) for r in regions}
    compute = comm = flops = 0.0
    working = 0.0
    other: list[tuple[int, tuple, float]] = []
    records: list[CollectiveRecord] = []
    seen_redistribution: set[tuple] = set()

    def tensor_bytes(tid: int, placement: TensorPlacement) -> float:
        t = graph.tensors[tid]
        return float(_numel(local_shape(t.shape, placement, mesh)) * dtype_bytes(t.dtype))

    for op in graph.ops:
        ins, outs = resolved.op_inputs[op.index], resolved.op_outputs[op.index]
        in_ids = op.input_ids()
        scope = _region_of(op.scope, regions)
        region = region_info[scope] if scope is not None else None
        cost = op_cost(graph, op, ins, outs, mesh, hw)
        compute += cost.forward_s + cost.backward_s
        flops += cost.flops + cost.backward_flops
        if region is not None:
            region.start = min(region.start, op.index)
            region.forward_compute_s += cost.forward_s
            region.forward_flops += cost.flops
            region.produced.update(op.output_ids())
        for tid, want in zip(in_ids, ins):
            t = graph.tensors[tid]
            have = resolved.stored[tid]
            if region is not None and t.kind == ACTIVATION and t.producer is not None \
                    and _region_of(graph.ops[t.producer].scope, regions) != scope:
                # Checkpointing keeps what flows into the scope, as it was stored.
                region.inputs[(tid, have)] = tensor_bytes(tid, have)
            if have == want or (tid, want, scope) in seen_redistribution:
                continue
            # Codegen emits one redistribution per (tensor, placement) and block; later readers reuse it.
            seen_redistribution.add((tid, want, scope))
            cc = redistribution_cost(t.shape, dtype_bytes(t.dtype), have, want, mesh, hw, t.requires_grad)
            comm += cc.forward_s + cc.backward_s
            if region is not None:
                region.forward_comm_s += cc.forward_s
            for phase, steps in (("forward", cc.forward), ("backward", cc.backward)):
                for kind, axis, nbytes, sec in steps:
                    records.append(CollectiveRecord(op.index, tid, kind, axis, mesh.shape[axis],
                                                    nbytes, sec, phase, scope))
        keeps = saved_inputs(graph, op)
        kept = [(tid, p) for i, (tid, p) in enumerate(zip(in_ids, ins)) if i in keeps]
        if saves_output(op):
            kept += list(zip(op.output_ids(), outs))
        for tid, p in kept:
            key = (tid, p)
            if region is not None:
                region.saved.setdefault(key, tensor_bytes(tid, p))
            else:
                other.append((op.index, key, tensor_bytes(tid, p)))
        working = max(working, working_bytes(graph, op, ins, outs, mesh))
    # The loss is brought to Replicate at the end of forward, as codegen does (a scalar: latency only).
    out_id = graph.output_ids()[0]
    t = graph.tensors[out_id]
    loss = redistribution_cost(t.shape, dtype_bytes(t.dtype), resolved.stored[out_id],
                               (REPLICATE,) * len(mesh.shape), mesh, hw, t.requires_grad)
    comm += loss.forward_s + loss.backward_s
    for phase, steps in (("forward", loss.forward), ("backward", loss.backward)):
        for kind, axis, nbytes, sec in steps:
            records.append(CollectiveRecord(graph.ops[-1].index, out_id, kind, axis, mesh.shape[axis], nbytes, sec,
                                            phase, None))
    static = {"parameters": 0.0, "gradients": 0.0, "optimizer": 0.0}
    sync = opt_s = 0.0
    for tid in graph.parameters.values():
        t = graph.tensors[tid]
        placement = resolved.stored[tid]
        state = param_state(_numel(local_shape(t.shape, placement, mesh)), t.dtype, replica_count(placement, mesh),
                            hw, dp_size, zero)
        static["parameters"] += state.parameters
        static["gradients"] += state.gradients
        static["optimizer"] += state.optimizer
        sync += state.sync_s
        opt_s += state.optimizer_s
    return PlanAnalysis(compute, comm, flops, static, sync, opt_s, working, region_info, other, records, dp_size,
                        hw.name)


def estimate(graph: Graph, resolved: ResolvedPlan, hw: HardwareProfile | str | None = None, dp_size: int = 1,
             zero: bool = True) -> Estimate:
    """Estimated step time (compute / communication split) and peak memory per GPU by category.

    ``hw`` is a profile, a profile name or path, or None for ``default_hw_profile()``;
    ``dp_size`` is the number of data-parallel copies (runtime_ngpus // plan_ngpus).
    """
    profile = load_hw_profile(hw)
    return analyze(graph, resolved, profile, dp_size, zero).estimate(list(resolved.plan.recompute_scopes))
