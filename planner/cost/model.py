"""The cost model: step time and peak memory per GPU of a resolved plan, from op shapes and a hardware profile.

Time. Every op runs on its local shards (``ResolvedPlan.local_shape``) and is priced by the cost
class of its record (``registry.OpRecord.cost``, see ``op_costs.op_cost``). Matmuls (linear,
matmul, bmm, the chunked cross-entropy's projection) cost ``2*m*n*k`` FLOPs, attention
``4*b*h*l*s*d`` times the record's ``mask_density`` (half when causal), each at the profile's
sustained rate, or the time to move its bytes when that is longer (a roofline); every other op is
memory bound: the bytes it reads and writes over the copy bandwidth. Views cost nothing. Backward
costs twice the forward; the chunked cross-entropy takes its gradients in the forward (three
products there) and its backward only scales them. A collective costs ``alpha + bytes / busbw``
with the bytes of its entry in ``planner/plan/collectives.py`` (``sent_bytes``) and the bus bandwidth
of its kind (nccl-tests' convention). Its backward is the entry's ``backward`` kind, the
transposed collective (all-gather <-> reduce-scatter, all-reduce and all-to-all themselves, a
local slice none); a recomputed scope runs its forward, collectives included, twice. Nothing is
assumed to overlap.

Memory per GPU, at the peak of a training step:

- parameters in their dtype, gradients in the buffers of ``runtime/optimizer/grad_reducer.py`` (fp32, or the
  parameter dtype for single-holder shards of a one-micro-batch step: ``planner/plan/gradient_buffers.py``), and
  Adam state (two fp32 moments, plus an fp32 master copy for low-precision parameters: 12 bytes
  per bf16 parameter), the optimizer state divided by ``dp_size`` under ZeRO-1;
- activations kept for backward. The approximation: an op that has a backward keeps the
  activations it reads (in the placement it reads them, so an all-gathered input is kept whole),
  except ops whose backward needs no values: views, casts, additions, concatenations, means and
  sums, and a product with a constant (the record's ``saves``). Attention keeps its output as
  well. A tensor kept by several ops counts once. A recomputed scope keeps only its inputs;
- the transient, from a sweep over the backward: while an op runs backward it holds its working
  set (the gradients of its local inputs and outputs, and a custom loss's chunk of logits) on
  top of the activations still kept, those whose first saving op comes no later (a saved tensor
  is freed by the backward of the first op that saves it). A recomputed scope brings back what
  it saves when its backward starts, less what is kept anyway (its inputs), and frees it the same
  way, so the down projection's input is gone before the SwiGLU's backward allocates its
  gradients. The peak is the largest moment: the start of backward, an op's backward, or a
  scope just recomputed.

``GB`` in this module is 10^9 bytes.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from ..graph.ir import ACTIVATION, INPUT, Graph, dtype_bytes
from ..graph.layers import decoder_layer_scopes
from ..graph.scopes import outermost_scopes, scopes_within
from ..plan.placements import REPLICATE, ResolvedPlan, TensorPlacement
from .hardware import HardwareProfile, load_hw_profile
from .op_costs import (
    local_bytes,
    op_cost,
    redistribution_cost,
    saved_inputs,
    saves_output,
    stored_param_state,
    working_bytes,
)

GB = 1e9


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
    host_bytes: float = 0.0  # per rank, offloaded state in host memory (planner/cost/offload_cost.py)

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
    saved_at: dict[tuple, int] = field(default_factory=dict)  # the first op saving each: its backward frees it
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
    regions: dict[str, _Region]
    working: list[tuple[int, str | None, float]]  # (op index, its region, working bytes) of ops with any
    gradients: list[float]  # per op index: gradients alive while it runs backward, besides its own
    other_saved: list[tuple[int, tuple, float]]  # (op index, key, bytes) kept outside every region
    collectives: list[CollectiveRecord]
    dp_size: int
    hw_name: str

    def _recomputed_groups(self, recompute_scopes: list[str]) -> dict[str, list[_Region]]:
        """Each recomputed scope with the analysed regions inside it (itself, nested ones like its MLP).

        A scope inside another recomputed scope adds nothing: the outer checkpoint holds it, as in
        codegen, where an op belongs to the first scope of the list that contains it.
        """
        within = scopes_within(tuple(self.regions))
        groups = {s: [self.regions[name] for name in within.get(s, ())] for s in outermost_scopes(recompute_scopes)}
        unknown = [s for s, members in groups.items() if not members]
        if unknown:
            raise ValueError(f"recompute scopes {unknown} were not analysed; pass them to analyze(regions=...)")
        return groups

    def estimate(self, recompute_scopes: list[str]) -> Estimate:
        """The estimate with these scopes recomputed (each must be, or hold, an analysed region).

        A recomputed scope keeps only what flows into it from outside, so a decoder layer analysed
        as two regions (the layer's own ops and its MLP) and recomputed whole keeps its input only.
        The peak is the largest of the moments of the backward sweep (see the module docstring).
        """
        groups = self._recomputed_groups(recompute_scopes)
        group_of = {r.scope: scope for scope, members in groups.items() for r in members}
        kept: dict[tuple, tuple[int, float]] = {}  # key -> (position that frees it, bytes); first wins

        def keep(key: tuple, pos: int, nbytes: float) -> None:
            if key not in kept or kept[key][0] > pos:
                kept[key] = (pos, nbytes)

        for pos, key, nbytes in self.other_saved:
            kept.setdefault(key, (pos, nbytes))
        for region in self.regions.values():
            if region.scope not in group_of:
                for key, nbytes in region.saved.items():
                    keep(key, region.saved_at.get(key, region.start), nbytes)
        for members in groups.values():
            produced = set().union(*(r.produced for r in members))
            start = min(r.start for r in members)
            for r in members:
                for key, nbytes in r.inputs.items():
                    if key[0] not in produced:
                        keep(key, start, nbytes)
        # What each recomputed scope brings back, less what is held anyway (its inputs, tensors
        # others keep): freed, like any saved tensor, by the backward of the first op saving it.
        again: dict[str, list[tuple[int, float]]] = {}
        for scope, members in groups.items():
            found: dict[tuple, tuple[int, float]] = {}
            for r in members:
                for key, nbytes in r.saved.items():
                    pos = r.saved_at.get(key, r.start)
                    if key not in kept and (key not in found or found[key][0] > pos):
                        found[key] = (pos, nbytes)
            again[scope] = sorted(found.values())
        held = _Prefix(sorted(kept.values()))
        back = {scope: _Prefix(entries) for scope, entries in again.items()}
        # Moments: each op's backward with its working set; each recomputed scope just recomputed.
        moments = [(j, group_of.get(region) if region is not None else None, w, region)
                   for j, region, w in self.working]
        moments += [(entries[-1][0], scope, 0.0, scope) for scope, entries in again.items() if entries]
        memory = dict(self.static)
        memory.update(activations=held.total, recompute=0.0, working=0.0)
        best, phase = held.total, "start of backward"
        for j, group, w, region in moments:
            a = held.upto(j) + self.gradients[j]
            r = back[group].upto(j) if group is not None else 0.0
            if a + r + w > best:
                best = a + r + w
                phase = (f"recomputing {group}" if group is not None
                         else f"backward of {region}" if region is not None else "start of backward")
                memory.update(activations=a, recompute=r, working=w)
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


def _storage_root(graph: Graph, tid: int, roots: dict[int, int]) -> int:
    """The tensor whose storage ``tid`` shares: through views to their base, and through the
    ``contiguous()`` of an attention output's transpose, which is a view too: attention kernels
    write their output sequence-major ([b, l, h, d]), so Hugging Face's
    ``out.transpose(1, 2).contiguous()`` copies nothing. Only activations and inputs are followed.
    """
    if tid in roots:
        return roots[tid]
    root = tid
    producer = graph.tensors[tid].producer
    if producer is not None:
        op = graph.ops[producer]
        ins = [i for i in op.input_ids() if graph.tensors[i].kind in (ACTIVATION, INPUT)]
        if len(ins) == 1 and len(op.output_ids()) == 1:
            base = _storage_root(graph, ins[0], roots)
            made = graph.tensors[base].producer
            if op.record.cost == "view" or (op.name == "torch.Tensor.contiguous" and made is not None
                                            and graph.ops[made].record.cost == "attention"):
                root = base
    roots[tid] = root
    return root


def _gradients_in_flight(graph: Graph, resolved: ResolvedPlan, tensor_bytes) -> list[float]:
    """Per op index j: bytes of gradients alive while op j runs backward, other than those of its own
    inputs and outputs (its working set): a tensor's gradient exists from the backward of its last
    reader until that of its producer, e.g. the residual stream's past the whole MLP.
    """
    n = len(graph.ops)
    delta = [0.0] * (n + 1)
    readers: dict[int, list[int]] = {}
    for op in graph.ops:
        for tid in set(op.input_ids()):
            readers.setdefault(tid, []).append(op.index)
    live = [0.0] * n
    for tid, ops in readers.items():
        t = graph.tensors[tid]
        if t.kind != ACTIVATION or not t.requires_grad or not t.dtype.is_floating_point or t.producer is None:
            continue
        last = max(ops)
        if last <= t.producer + 1:
            continue
        nbytes = tensor_bytes(tid, resolved.stored[tid])
        delta[t.producer + 1] += nbytes
        delta[last] -= nbytes
        for j in ops:  # a reader's own input gradient is in its working set
            if t.producer < j < last:
                live[j] -= nbytes
    running = 0.0
    for j in range(n):
        running += delta[j]
        live[j] += running
    return live


class _Prefix:
    """Sums of (position, bytes) entries: ``upto(j)`` is the bytes of entries at positions <= j."""

    def __init__(self, entries: list[tuple[int, float]]) -> None:
        self.positions = [p for p, _ in entries]
        self.sums = [0.0]
        for _, nbytes in entries:
            self.sums.append(self.sums[-1] + nbytes)
        self.total = self.sums[-1]

    def upto(self, position: int) -> float:
        return self.sums[bisect.bisect_right(self.positions, position)]


def _region_of(scope: str, regions: list[str]) -> str | None:
    for r in regions:
        if scope == r or scope.startswith(r + "."):
            return r
    return None


def analyze(graph: Graph, resolved: ResolvedPlan, hw: HardwareProfile, dp_size: int = 1, zero: bool = True,
            regions: list[str] | None = None, accumulation: int = 1) -> PlanAnalysis:
    """Cost every op, collective and parameter of a resolved plan once.

    ``regions`` are the scopes that may be recomputed (default: the plan's recompute scopes, then
    the decoder layers); an op belongs to the innermost that contains its scope. ``accumulation``
    is the number of micro-batches per optimizer step (it decides the gradient buffers' dtype).
    """
    plan = resolved.plan
    mesh = plan.mesh
    if regions is None:
        regions = list(plan.recompute_scopes) + decoder_layer_scopes(graph)
    # Nested scopes first (a layer's MLP before the layer), so that an op lands in the innermost
    # analysed region; ``estimate`` merges the regions inside a scope recomputed whole.
    regions = sorted(dict.fromkeys(regions), key=lambda r: -r.count("."))
    region_info = {r: _Region(r) for r in regions}
    compute = comm = flops = 0.0
    other: list[tuple[int, tuple, float]] = []
    working_ops: list[tuple[int, str | None, float]] = []
    records: list[CollectiveRecord] = []
    seen_redistribution: set[tuple] = set()

    def tensor_bytes(tid: int, placement: TensorPlacement) -> float:
        return local_bytes(graph.tensors[tid], placement, mesh)

    roots: dict[int, int] = {}

    def storage(tid: int, placement: TensorPlacement) -> tuple[tuple, float]:
        """The key and bytes of what keeping ``tid`` (read in ``placement``) holds: its storage's."""
        if placement == resolved.stored[tid]:
            root = _storage_root(graph, tid, roots)
            if root != tid:
                tid, placement = root, resolved.stored[root]
        return (tid, placement), tensor_bytes(tid, placement)

    # Op scope -> its region: a few hundred scopes for thousands of ops.
    region_of = {s: _region_of(s, regions) for s in {op.scope for op in graph.ops}}
    for op in graph.ops:
        ins, outs = resolved.op_inputs[op.index], resolved.op_outputs[op.index]
        in_ids = op.input_ids()
        scope = region_of[op.scope]
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
                    and region_of[graph.ops[t.producer].scope] != scope:
                # Checkpointing keeps what flows into the scope, as it was stored.
                key, nbytes = storage(tid, have)
                region.inputs[key] = nbytes
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
            key, nbytes = storage(tid, p)
            if region is not None:
                region.saved.setdefault(key, nbytes)
                region.saved_at.setdefault(key, op.index)
            else:
                other.append((op.index, key, nbytes))
        op_working = working_bytes(graph, op, ins, outs, mesh)
        if op_working:
            working_ops.append((op.index, scope, op_working))
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
        state = stored_param_state(t, resolved.stored[tid], mesh, hw, dp_size, zero, accumulation)
        static["parameters"] += state.parameters
        static["gradients"] += state.gradients
        static["optimizer"] += state.optimizer
        sync += state.sync_s
        opt_s += state.optimizer_s
    return PlanAnalysis(compute, comm, flops, static, sync, opt_s, region_info, working_ops,
                        _gradients_in_flight(graph, resolved, tensor_bytes), other, records, dp_size, hw.name)


def estimate(graph: Graph, resolved: ResolvedPlan, hw: HardwareProfile | str | None = None, dp_size: int = 1,
             zero: bool = True, accumulation: int = 1) -> Estimate:
    """Estimated step time (compute / communication split) and peak memory per GPU by category.

    ``hw`` is a profile, a profile name or path, or None for ``default_hw_profile()``;
    ``dp_size`` is the number of data-parallel copies (runtime_ngpus // plan_ngpus);
    ``accumulation`` the micro-batches per optimizer step.
    """
    profile = load_hw_profile(hw)
    return analyze(graph, resolved, profile, dp_size, zero,
                   accumulation=accumulation).estimate(list(resolved.plan.recompute_scopes))
