"""Trace an unmodified ``nn.Module`` into a ``Graph`` by running it once under a TorchFunctionMode.

Parameters and activations derived from them run on the meta device (no memory, no compute),
so tracing Llama-3-8B at 131072 tokens takes seconds. Tensors that depend only on the inputs,
buffers and factory calls (position ids, rotary tables, masks) are computed for real on the CPU:
Hugging Face models branch on their values (``if (mask == 0).all()``), and those branches are
resolved by the concrete run, as the design says. Every such computation is still recorded as
an op, so the generated code recomputes it on the runtime device.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from ..ops.annotations import AnnotationError, parse_annotation
from ..ops.registry import OpCall, TensorMeta, custom_op_name, get_rule, is_recorded, op_name, op_record
from .functionalize import FOLLOWED_VIEWS, ViewFunctionalizer, is_write
from .ir import BUFFER, CONSTANT, DEVICE, INPUT, PARAMETER, Graph, Op, Tensor, TensorRef


class TraceError(RuntimeError):
    """The model could not be traced; the message says which op and scope, and what to do."""


def _is_meta_device(x: Any) -> bool:
    return (isinstance(x, torch.device) and x.type == "meta") or x == "meta"


class _Recorder(TorchFunctionMode):
    """Records every torch-level call into a Graph while running it (meta or concrete)."""

    def __init__(self, graph: Graph, scopes: list[str]) -> None:
        super().__init__()
        self.graph = graph
        self.scopes = scopes
        self.nodes: dict[int, int] = {}  # id(python tensor) -> graph tensor id
        self.alive: list[torch.Tensor] = []  # keep traced tensors alive so ids are not reused
        self.meta_params: dict[int, torch.Tensor] = {}
        self.views = ViewFunctionalizer(self.emit, self.lookup, lambda tid: (
            self.graph.tensors[tid].shape, self.graph.tensors[tid].dtype))

    def new_tensor(self, t: torch.Tensor, kind: str, name: str | None = None, producer: int | None = None) -> int:
        tid = len(self.graph.tensors)
        self.graph.tensors[tid] = Tensor(
            tid, tuple(t.shape), t.dtype, kind, name, producer, bool(t.requires_grad or kind == PARAMETER)
        )
        self.nodes[id(t)] = tid
        self.alive.append(t)
        return tid

    def lookup(self, t: torch.Tensor) -> int:
        tid = self.nodes.get(id(t))
        if tid is not None:
            current = self.views.current(tid)  # after a write through a view: the new version
            self.nodes[id(t)] = current
            return current
        # A tensor that is neither an input, a parameter, a buffer nor an op result: a constant
        # held by the model outside its state (a plain attribute). Capture its value.
        if t.is_meta:
            raise TraceError(
                f"a meta tensor of shape {list(t.shape)} reached an op without coming from the inputs, "
                f"parameters or buffers (scope {self.scope()}); register it as a buffer of its module"
            )
        tid = self.new_tensor(t, CONSTANT)
        self.graph.constants[tid] = t.detach().clone()
        return tid

    def scope(self) -> str:
        return self.scopes[-1] if self.scopes else ""

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = op_name(func)
        if not is_recorded(name):
            return func(*args, **kwargs)
        flat, _ = tree_flatten((args, kwargs))
        tensors = [x for x in flat if isinstance(x, torch.Tensor)]
        symbolic = any(t.is_meta or id(t) in self.meta_params for t in tensors)
        if symbolic:
            run_args, run_kwargs = tree_map(self._to_meta, (args, kwargs))
        else:
            # Concrete path: factories asked for the (meta) runtime device compute on the CPU instead.
            run_args, run_kwargs = tree_map(lambda x: torch.device("cpu") if _is_meta_device(x) else x, (args, kwargs))
        out = func(*run_args, **run_kwargs)

        writes_first_arg = op_record(name).mutates_first_arg
        returned_first = bool(run_args) and out is run_args[0] and isinstance(out, torch.Tensor)
        writes = bool(args) and isinstance(args[0], torch.Tensor) and is_write(name, writes_first_arg, returned_first)
        if writes and self.views.write(name, args, kwargs):
            return out  # recorded as functional ops (planner/graph/functionalize.py)
        out_struct = args[0] if writes_first_arg else out
        out_flat, _ = tree_flatten(out_struct)
        if not any(isinstance(x, torch.Tensor) for x in out_flat):
            return out  # metadata, a Python value, or a side effect we do not model
        ref_args, ref_kwargs = tree_map(self._to_ref, (args, kwargs))
        index = len(self.graph.ops)
        op = Op(index, name, func, ref_args, ref_kwargs, None, self.scope(), is_custom=custom_op_name(func) is not None)
        if writes_first_arg:
            op.output = TensorRef(self.new_tensor(args[0], "activation", producer=index))
        else:
            op.output = tree_map(
                lambda x: TensorRef(self.new_tensor(x, "activation", producer=index))
                if isinstance(x, torch.Tensor) else x,
                out,
            )
        self.graph.ops.append(op)
        if writes:
            self.views.replaced(op.input_ids()[0], op.output_ids()[0])
        elif isinstance(op.output, TensorRef) and op.input_ids() and (returned_first or (
                name in FOLLOWED_VIEWS and out._is_view() and out._base is _storage_root(run_args[0]))):
            self.views.add_view(op.output.id, op.input_ids()[0], op)
        return out

    def emit(self, target: Callable, args: tuple, kwargs: dict) -> int:
        """Record ``target(*args, **kwargs)`` (tensors as ``TensorRef``), run on meta tensors of the
        recorded shapes; returns the output's tensor id. For ops the tracer adds itself."""
        def to_meta(x: Any) -> Any:
            if not isinstance(x, TensorRef):
                return x
            t = self.graph.tensors[x.id]
            meta = torch.empty(t.shape, dtype=t.dtype, device="meta")
            return meta.requires_grad_(t.requires_grad) if t.dtype.is_floating_point else meta
        run_args, run_kwargs = tree_map(to_meta, (args, kwargs))
        out = target(*run_args, **run_kwargs)
        index = len(self.graph.ops)
        op = Op(index, op_name(target), target, tuple(args), dict(kwargs), None, self.scope())
        op.output = TensorRef(self.new_tensor(out, "activation", producer=index))
        self.graph.ops.append(op)
        return op.output.id

    def _to_meta(self, x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            # A parameter first, even one already on meta: its traced copy carries param_dtype.
            cached = self.meta_params.get(id(x))
            if cached is not None:
                return cached
            if x.is_meta:
                return x
            meta = torch.empty_like(x, device="meta").requires_grad_(x.requires_grad)
            self.nodes[id(meta)] = self.lookup(x)
            self.alive.append(meta)
            return meta
        return x

    def _to_ref(self, x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return TensorRef(self.lookup(x))
        if _is_meta_device(x):
            return DEVICE
        if isinstance(x, torch.Size):
            return tuple(x)
        return x


def _storage_root(x: Any) -> Any:
    return x._base if isinstance(x, torch.Tensor) and x._is_view() else x


@contextlib.contextmanager
def _module_scopes(model: torch.nn.Module, scopes: list[str]) -> Iterator[None]:
    handles = []
    for mod_name, module in model.named_modules():
        def pre(_m: Any, _a: Any, mod_name: str = mod_name) -> None:
            scopes.append(mod_name)

        def post(_m: Any, _a: Any, _o: Any) -> None:
            scopes.pop()

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post, always_call=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def default_output(result: Any) -> torch.Tensor:
    """The loss of a Hugging Face output (``.loss``), or the result itself when it is a tensor."""
    loss = getattr(result, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    if isinstance(result, torch.Tensor):
        return result
    if isinstance(result, Mapping) and isinstance(result.get("loss"), torch.Tensor):
        return result["loss"]
    raise TraceError(
        f"the model returned {type(result).__name__} without a tensor loss; pass labels so the loss is "
        "computed in forward, or give trace() an output_fn that picks the tensor to train on"
    )


def trace(
    model: torch.nn.Module,
    example_inputs: Mapping[str, torch.Tensor],
    output_fn: Callable[[Any], torch.Tensor] = default_output,
    annotate: bool = True,
    param_dtype: torch.dtype | None = None,
    forward_fn: Callable[..., Any] | None = None,
) -> Graph:
    """Trace ``model(**example_inputs)`` into a Graph whose output is ``output_fn(result)``.

    With ``forward_fn`` the traced call is ``forward_fn(model, **example_inputs)`` instead, so a
    training loss (e.g. a chunked cross-entropy on the decoder's hidden states) can replace the
    model's own while parameter names stay those of ``model``.

    Parameters are traced on the meta device whether the model holds real weights or meta ones;
    ``example_inputs`` must be real (CPU) tensors. ``param_dtype`` traces floating-point parameters
    in that dtype (the runtime's, e.g. bfloat16) so dtype casts in the model are recorded as they will run. Ops that do not contribute to the output are
    dropped. With ``annotate`` every op gets its bound dim annotation, and an op with no rule
    raises a TraceError naming the op, its scope and how to register one.
    """
    graph = Graph()
    scopes: list[str] = []
    recorder = _Recorder(graph, scopes)
    for name, p in model.named_parameters():
        dtype = param_dtype if param_dtype is not None and p.is_floating_point() else p.dtype
        meta = torch.empty_like(p, device="meta", dtype=dtype).requires_grad_(True)
        tid = recorder.new_tensor(meta, PARAMETER, name)
        recorder.nodes[id(p)] = tid
        graph.parameters[name] = tid
        recorder.meta_params[id(p)] = meta
        recorder.nodes[id(recorder.meta_params[id(p)])] = tid
    for name, b in model.named_buffers():
        if id(b) in recorder.nodes:
            continue
        graph.buffers[name] = recorder.new_tensor(b, BUFFER, name)
    example_inputs = dict(example_inputs)
    for name, x in example_inputs.items():
        if not isinstance(x, torch.Tensor) or x.is_meta:
            raise TraceError(f"example input '{name}' must be a real CPU tensor (token ids), got {x!r:.80}")
        if id(x) in recorder.nodes:
            # The same tensor passed as two arguments (labels=input_ids): keep them apart in the graph.
            x = example_inputs[name] = x.clone()
        graph.inputs[name] = recorder.new_tensor(x, INPUT, name)

    extra = {}
    if "use_cache" in inspect.signature(model.forward).parameters:
        extra["use_cache"] = False  # a KV cache only serves generation; training graphs must not carry one
    with _module_scopes(model, scopes), recorder:
        result = forward_fn(model, **example_inputs) if forward_fn else model(**example_inputs, **extra)
        loss = output_fn(result)
    graph.output = TensorRef(recorder.lookup(loss))
    prune_dead_ops(graph)
    if annotate:
        annotate_graph(graph)
    return graph


def prune_dead_ops(graph: Graph) -> None:
    """Drop ops whose outputs never reach the graph output; renumber the rest in order."""
    needed = set(graph.output_ids())
    keep: list[Op] = []
    for op in reversed(graph.ops):
        if any(t in needed for t in op.output_ids()):
            keep.append(op)
            needed.update(op.input_ids())
    keep.reverse()
    renumber = {op.index: i for i, op in enumerate(keep)}
    for op in keep:
        op.index = renumber[op.index]
    for t in graph.tensors.values():
        if t.producer is not None:
            t.producer = renumber.get(t.producer)
    live = needed | set(graph.inputs.values()) | set(graph.parameters.values())
    graph.tensors = {tid: t for tid, t in graph.tensors.items() if tid in live or t.producer is not None}
    graph.buffers = {n: tid for n, tid in graph.buffers.items() if tid in live}
    graph.constants = {tid: v for tid, v in graph.constants.items() if tid in live}
    graph.ops = keep


def _meta_view(graph: Graph, x: Any) -> Any:
    if isinstance(x, TensorRef):
        t = graph.tensors[x.id]
        return TensorMeta(t.shape, t.dtype)
    return x


def annotate_graph(graph: Graph) -> None:
    """Give every op its annotation bound to the call's tensor ranks (raises on a missing rule)."""
    for op in graph.ops:
        rule = get_rule(op.name)
        where = f"{op.name} called from {op.scope or 'the top-level module'}"
        if rule is None:
            raise TraceError(
                f"no dim annotation for {where} — register one with "
                f"dimshard.planner.set_rule('{op.name}', '... d -> ... d') for a torch op, or decorate your "
                f"function with @register_op('...') (see the annotation language in planner/ops/annotations.py)"
            )
        ins = [graph.tensors[t] for t in op.input_ids()]
        outs = [graph.tensors[t] for t in op.output_ids()]
        call = OpCall(
            op.name,
            tuple(tree_map(lambda x: _meta_view(graph, x), op.args)),
            tree_map(lambda x: _meta_view(graph, x), op.kwargs),
            [TensorMeta(t.shape, t.dtype) for t in ins],
            [TensorMeta(t.shape, t.dtype) for t in outs],
        )
        try:
            text = rule(call) if callable(rule) else rule
            ann = parse_annotation(text).bind([len(t.shape) for t in ins], [len(t.shape) for t in outs])
        except AnnotationError as e:
            raise TraceError(f"bad dim annotation for {where}: {e}") from e
        _check_sizes(ann, ins + outs, where)
        op.annotation = ann


def _check_sizes(ann: Any, tensors: list[Tensor], where: str) -> None:
    """Every single-name dim with the same name must have the same size (broadcast 1s aside)."""
    sizes: dict[str, int] = {}
    specs = list(ann.inputs) + list(ann.outputs)
    for spec, t in zip(specs, tensors):
        for dim, size in zip(spec.dims, t.shape):
            if len(dim.names) != 1:
                continue
            n = dim.names[0]
            if n in sizes and sizes[n] != size and n not in ann.frozen:
                raise TraceError(
                    f"annotation '{ann}' for {where} gives dim '{n}' sizes {sizes[n]} and {size}; "
                    "use '1' for a broadcast dim or different names"
                )
            sizes.setdefault(n, size)
