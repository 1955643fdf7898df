"""Write ``gencode/rank{r}.py``: plain PyTorch for one unit rank of a resolved plan.

The file defines ``Rank{r}Module(ParallelModule)``: ``__init__`` declares this rank's parameter
shards by their original names, ``forward`` calls the traced ops in order with the collectives
the plan needs, and recomputed scopes become methods wrapped in ``torch.utils.checkpoint``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..cost.op_costs import grads_written_in_place
from ..graph.ir import BUFFER, CONSTANT, DEVICE, INPUT, PARAMETER, Graph, Op, TensorRef
from ..ops.registry import reachable_as
from ..plan.collectives import COLLECTIVES_TABLE
from ..plan.placements import Replicate, ResolvedPlan, Shard, TensorPlacement
from ..plan.redistribute import redistribution_steps
from ..plan.sequence_split import plan_layout
from .fp8_code import FP8_IMPORT, fp8_linear_code
from .sequence_split_code import attention_code, recurrent_code, reorder_import, zigzag_step


class CodegenError(RuntimeError):
    """The plan cannot be written as code (an argument type codegen cannot express)."""


def attr_name(state_name: str) -> str:
    """Attribute name of a parameter or buffer in generated code: dots become double underscores."""
    return state_name.replace(".", "__")


def shard_slices(shape: tuple[int, ...], placement: TensorPlacement, mesh_shape: tuple[int, ...],
                 coords: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """[start, stop) per dim of the shard a rank at ``coords`` holds of a tensor with ``placement``."""
    slices = [[0, s] for s in shape]
    for axis, p in enumerate(placement):
        if isinstance(p, Shard):
            start, stop = slices[p.dim]
            step = (stop - start) // mesh_shape[axis]
            slices[p.dim] = [start + coords[axis] * step, start + (coords[axis] + 1) * step]
    return tuple((a, b) for a, b in slices)


def shard_holders(placement: TensorPlacement, mesh: Any, unit_rank: int) -> tuple[int, ...]:
    """Unit ranks that hold the same shard as ``unit_rank`` (agree on every sharded axis)."""
    mine = mesh.coords(unit_rank)
    sharded = [a for a, p in enumerate(placement) if isinstance(p, Shard)]
    return tuple(r for r in range(mesh.size) if all(mesh.coords(r)[a] == mine[a] for a in sharded))


def _emit_value(x: Any) -> str:
    if type(x).__module__ == "numpy" and hasattr(x, "item"):
        x = x.item()  # a numpy scalar (CTRL's np.sqrt(d)) as the Python number: generated code imports no numpy
    if isinstance(x, bool) or x is None:
        return repr(x)
    if isinstance(x, float):
        if math.isinf(x) or math.isnan(x):
            return f"float('{x}')"
        return repr(x)
    if isinstance(x, int | str):
        return repr(x)
    if x is DEVICE:
        return "self.device"
    if x is Ellipsis:
        return "..."
    if isinstance(x, torch.dtype):
        return str(x)
    if isinstance(x, torch.device):
        return "self.device"
    if isinstance(x, torch.memory_format | torch.layout):
        return str(x)
    if isinstance(x, slice):
        return f"slice({_emit_value(x.start)}, {_emit_value(x.stop)}, {_emit_value(x.step)})"
    if isinstance(x, tuple):
        inner = ", ".join(_emit_value(v) for v in x)
        return f"({inner},)" if len(x) == 1 else f"({inner})"
    if isinstance(x, list):
        return "[" + ", ".join(_emit_value(v) for v in x) + "]"
    raise CodegenError(f"cannot write an argument of type {type(x).__name__} ({x!r:.60}) into generated code")


def _emit_index(x: Any, emit: Any) -> str:
    items = x if isinstance(x, tuple) else (x,)
    parts = []
    for it in items:
        if isinstance(it, slice):
            a = "" if it.start is None else emit(it.start)
            b = "" if it.stop is None else emit(it.stop)
            parts.append(f"{a}:{b}" + ("" if it.step is None else f":{emit(it.step)}"))
        else:
            parts.append(emit(it))
    return ", ".join(parts) if parts else "()"


@dataclass
class _Block:
    region: str | None  # recompute scope, or None for the main body
    lines: list[tuple[str, list[str], list[str]]] = field(default_factory=list)  # (code, defines, uses)


class _Writer:
    def __init__(self, graph: Graph, resolved: ResolvedPlan, unit_rank: int,
                 fp8: dict[int, str] | None = None) -> None:
        self.graph = graph
        self.fp8 = fp8 or {}  # op index -> FP8 recipe (planner/search/fp8_choice.py)
        self.resolved = resolved
        self.mesh = resolved.plan.mesh
        self.unit_rank = unit_rank
        self.imports: dict[str, str] = {}
        self.blocks: list[_Block] = []
        # (tensor id, placement) -> (variable, block): a redistributed copy is reused inside its block.
        self.cache: dict[tuple[int, TensorPlacement], tuple[str, _Block]] = {}
        self.methods: list[str] = []
        # Sequence-split attention: its axes hold sequence-aligned tensors in the zigzag layout.
        self.zigzag = plan_layout(graph, resolved)

    # --- naming -------------------------------------------------------------------------------
    def base_var(self, tid: int) -> str:
        t = self.graph.tensors[tid]
        if t.kind in (PARAMETER, BUFFER):
            return f"self.{attr_name(t.name)}"
        if t.kind == CONSTANT:
            return f"self.{attr_name(f'constant_{tid}')}"
        if t.kind == INPUT:
            return t.name
        return f"t{tid}"

    def local_var(self, tid: int, want: TensorPlacement, block: _Block) -> str:
        have = self.resolved.stored[tid]
        base = self.base_var(tid)
        if have == want:
            return base
        key = (tid, want)
        if key in self.cache and self.cache[key][1] is block:
            return self.cache[key][0]
        var = base.replace("self.", "") + "_" + "_".join(_placement_tag(p) for p in want)
        cur = base
        for step in redistribution_steps(have, want):
            group = f"self.groups[{self.mesh.axis_names[step.axis]!r}]"
            zigzag = zigzag_step(self.zigzag, tid, step.kind, step.axis, step.dim, step.dim2, cur, group,
                                 self.mesh.coords(self.unit_rank)[step.axis])
            if zigzag is not None:
                code = zigzag[0]
                self.imports.update({h: reorder_import([h]) for h in zigzag[1]})
            else:
                collective = COLLECTIVES_TABLE[step.kind]
                code = collective.code(cur, (step.dim, step.dim2)[:len(collective.dims)], group)
            block.lines.append((f"{var} = {code}", [var], [cur]))
            cur = var
        self.cache[key] = (var, block)
        return var

    # --- ops ----------------------------------------------------------------------------------
    def emit_op(self, op: Op, block: _Block) -> None:
        wants = self.resolved.op_inputs[op.index]
        in_ids = op.input_ids()
        local: dict[int, str] = {}
        uses: list[str] = []
        for tid, want in zip(in_ids, wants):
            var = self.local_var(tid, want, block)
            local[tid] = var
            uses.append(var)

        def emit(x: Any) -> str:
            if isinstance(x, TensorRef):
                return local[x.id]
            if isinstance(x, tuple | list) and any(isinstance(v, TensorRef) for v in x):
                inner = ", ".join(emit(v) for v in x)
                return f"({inner},)" if isinstance(x, tuple) and len(x) == 1 else (
                    f"({inner})" if isinstance(x, tuple) else f"[{inner}]")
            return _emit_value(x)

        args, kwargs = op.args, op.kwargs
        localize = op.record.localize
        if localize is not None:
            # Arguments that carry global sizes (view's shape) get this rank's local sizes.
            out_id = op.output_ids()[0]
            shape = self.resolved.local_shape(self.graph.tensors[out_id].shape, self.resolved.stored[out_id])
            args, kwargs = localize(tuple(args), dict(kwargs), tuple(shape))
        axis = self.zigzag.attention_ops.get(op.index)
        if axis is not None:  # attention split along the sequence: the op exchanges K/V over the axis's group
            self.imports["sequence_split_attention"], call = attention_code(
                op, axis, [local[t] for t in in_ids[:3]], f"self.groups[{self.mesh.axis_names[axis]!r}]")
        elif op.index in self.zigzag.recurrent_ops:  # a recurrent op split along the sequence: state passed inside
            axis, layout = self.zigzag.recurrent_ops[op.index]
            name, self.imports[name], call = recurrent_code(
                op, [emit(a) for a in args], {k: emit(v) for k, v in kwargs.items()},
                f"self.groups[{self.mesh.axis_names[axis]!r}]", layout)
        elif op.index in self.fp8:  # a linear chosen for FP8: fp8_linear with its split's groups
            self.imports["fp8_linear"] = FP8_IMPORT
            call = fp8_linear_code(op.index, [emit(a) for a in args], {k: emit(v) for k, v in kwargs.items()},
                                   self.fp8[op.index], self.resolved)
        else:
            if grads_written_in_place(self.graph, op):  # the backward writes its input gradients into its inputs
                kwargs = {**kwargs, op.record.grads_in_place: True}
            call = self.call_expr(op, list(args), kwargs, emit)
        outs = self.output_target(op)
        defines = [f"t{t}" for t in op.output_ids()]
        block.lines.append((f"{outs} = {call}  # {op.annotation}", defines, uses))

    def output_target(self, op: Op) -> str:
        def fmt(x: Any) -> str:
            if isinstance(x, TensorRef):
                return f"t{x.id}"
            if isinstance(x, tuple | list):
                inner = ", ".join(fmt(v) for v in x)
                return f"({inner},)" if len(x) == 1 else f"({inner})"
            return "_"
        return fmt(op.output)

    def call_expr(self, op: Op, args: list[Any], kwargs: dict[str, Any], emit: Any) -> str:
        kw = "".join(f", {k}={emit(v)}" for k, v in kwargs.items())
        name = op.name
        record = op.record
        if op.is_custom:
            impl = op.target
            module = impl.__module__
            short = impl.__name__
            self.imports[short] = f"from {module} import {short}" if module != "__main__" else (
                f"{short} = __import__('__main__').{short}  # registered in the training script")
            rest = ", ".join(emit(a) for a in args)
            return f"{short}({rest}{kw})"
        if record.substitute is not None:
            module, short = record.substitute.rsplit(".", 1)
            self.imports[short] = f"from {module} import {short}"
            joined = ", ".join(emit(a) for a in args)
            return f"{short}({joined}{kw if joined else kw.lstrip(', ')})"
        if record.operator == "[]":
            return f"{emit(args[0])}[{_emit_index(args[1], emit)}]"
        if record.operator is not None and not kwargs and len(args) == 2:
            return f"{emit(args[0])} {record.operator} {emit(args[1])}"
        if record.dunder is not None and args:
            joined = ", ".join(emit(a) for a in args)
            return f"torch.Tensor.{record.dunder}({joined}{kw})"
        if record.method is not None and args:
            rest = ", ".join(emit(a) for a in args[1:])
            return f"{emit(args[0])}.{record.method}({rest}{kw.lstrip(', ') if not rest else kw})"
        if not reachable_as(name, op.target):
            raise CodegenError(f"op {name} ({op.target!r}) is not reachable by that name from generated code")
        joined = ", ".join(emit(a) for a in args)
        return f"{name}({joined}{kw if joined else kw.lstrip(', ')})"

    # --- layout -------------------------------------------------------------------------------
    def region_of(self, op: Op) -> str | None:
        for scope in self.resolved.plan.recompute_scopes:
            if op.scope == scope or op.scope.startswith(scope + "."):
                return scope
        return None

    def build(self) -> None:
        for op in self.graph.ops:
            region = self.region_of(op)
            if not self.blocks or self.blocks[-1].region != region or region is None and self.blocks[-1].region:
                self.blocks.append(_Block(region))
            self.emit_op(op, self.blocks[-1])
        out_id = self.graph.output_ids()[0]
        final = _Block(None)
        replicated = (Replicate(),) * len(self.mesh.shape)
        loss = self.local_var(out_id, replicated, final)
        final.lines.append((f"return comm.scale_grad({loss}, {1.0 / self.mesh.size!r})", [], [loss]))
        self.blocks.append(final)


def _placement_tag(p: Any) -> str:
    if isinstance(p, Shard):
        return f"s{p.dim}"
    return "r" if isinstance(p, Replicate) else "p"


def _main_body(writer: _Writer) -> list[str]:
    """Lines of forward(): region calls and plain statements, with ``del`` after each last use."""
    stmts: list[tuple[str, list[str], list[str]]] = []
    # Uses of each block's variables after that block, to know a region's outputs.
    all_blocks = writer.blocks
    uses_after: list[set[str]] = [set() for _ in all_blocks]
    acc: set[str] = set()
    for i in range(len(all_blocks) - 1, -1, -1):
        uses_after[i] = set(acc)
        for _, _, u in all_blocks[i].lines:
            acc.update(u)
    for i, block in enumerate(all_blocks):
        if block.region is None:
            stmts.extend(block.lines)
            continue
        defined = [d for _, ds, _ in block.lines for d in ds]
        used_inside = [u for _, _, us in block.lines for u in us]
        inputs = []
        for u in used_inside:
            if u not in defined and not u.startswith("self.") and u not in inputs:
                inputs.append(u)
        outputs = [d for d in dict.fromkeys(defined) if d in uses_after[i]]
        fname = f"_recompute_{attr_name(block.region)}_{i}"
        body = [f"    def {fname}(self, {', '.join(inputs)}):",
                f'        """Ops of {block.region}, recomputed in backward."""']
        body += [f"        {code}" for code, _, _ in block.lines]
        body.append(f"        return ({', '.join(outputs)}{',' if len(outputs) == 1 else ''})")
        writer.methods.append("\n".join(body))
        target = ", ".join(outputs) + ("," if len(outputs) == 1 else "")
        call = (f"offloaded_checkpoint(self.activation_offload, self.{fname}, {', '.join(inputs)})"
                if block.region in writer.resolved.plan.offload_scopes else
                f"checkpoint(self.{fname}, {', '.join(inputs)}, use_reentrant=False)")
        stmts.append((f"{target} = {call}",
                      outputs, inputs))
    last_use: dict[str, int] = {}
    for k, (_, _, us) in enumerate(stmts):
        for u in us:
            last_use[u] = k
    lines: list[str] = []
    for k, (code, _, us) in enumerate(stmts):
        lines.append(f"        {code}")
        dead = [u for u in dict.fromkeys(us) if last_use.get(u) == k and not u.startswith("self.")
                and u not in writer.graph.inputs and not code.startswith("return")]
        if dead:
            lines.append(f"        del {', '.join(dead)}")
    return lines


def generate_rank_code(graph: Graph, resolved: ResolvedPlan, unit_rank: int, header: str = "",
                       fp8: dict[int, str] | None = None) -> str:
    """Source of ``gencode/rank{unit_rank}.py`` for a resolved plan; ``fp8``: op index -> recipe of the
    linears written as ``fp8_linear`` (``search/fp8_choice.py``'s ``Fp8Choice.ops()``)."""
    writer = _Writer(graph, resolved, unit_rank, fp8)
    writer.build()
    body = _main_body(writer)
    mesh = resolved.plan.mesh
    coords = mesh.coords(unit_rank)
    decl: list[str] = []
    for name, tid in graph.parameters.items():
        t = graph.tensors[tid]
        placement = resolved.stored[tid]
        slices = shard_slices(t.shape, placement, mesh.shape, coords)
        holders = shard_holders(placement, mesh, unit_rank)
        decl.append(f"        self.declare_parameter({attr_name(name)!r}, {name!r}, full_shape={tuple(t.shape)}, "
                    f"slices={slices}, dtype={t.dtype}, unit_ranks={holders})  # {list(placement)}")
    for name, tid in graph.buffers.items():
        t = graph.tensors[tid]
        decl.append(f"        self.declare_buffer({attr_name(name)!r}, {name!r}, full_shape={tuple(t.shape)}, "
                    f"dtype={t.dtype})")
    for tid in graph.constants:
        t = graph.tensors[tid]
        name = f"constant_{tid}"
        decl.append(f"        self.declare_buffer({attr_name(name)!r}, {name!r}, full_shape={tuple(t.shape)}, "
                    f"dtype={t.dtype})")
    inputs = ", ".join(graph.inputs)
    lines = [
        f'"""Generated by dimshard for unit rank {unit_rank} of {mesh.size} '
        f'(mesh {dict(zip(mesh.axis_names, mesh.shape))}, coords {coords}). {header}',
        "",
        "Plain PyTorch: read it, step through it; regenerate it with `train.py --run_mode compile`.",
        '"""',
        "",
        "import torch",
        "from torch.utils.checkpoint import checkpoint",
        "",
        "from dimshard.runtime import comm",
        *(["from dimshard.runtime.activation_offload import ActivationOffloader, offloaded_checkpoint"]
          if resolved.plan.offload_scopes else []),
        "from dimshard.runtime.module import ParallelModule",
    ]
    lines += sorted(set(writer.imports.values()))
    lines += [
        "",
        "",
        f"class Rank{unit_rank}Module(ParallelModule):",
        f'    """Unit rank {unit_rank}: its parameter shards and its part of the forward pass."""',
        "",
        f"    unit_rank = {unit_rank}",
        "",
        "    def __init__(self, ctx):",
        "        super().__init__(ctx)",
        f"        self.groups = {{axis: ctx.axis_group(axis) for axis in {tuple(mesh.axis_names)!r}}}",
        *(["        self.activation_offload = ActivationOffloader(self.device)  # plan.json offload"]
          if resolved.plan.offload_scopes else []),
        *decl,
        "",
        f"    def forward(self, {inputs}):",
        *body,
    ]
    for m in writer.methods:
        lines += ["", m]
    return "\n".join(lines) + "\n"
