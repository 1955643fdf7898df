"""The dataflow graph the tracer builds: tensors, ops in execution order, inputs and outputs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from ..ops.annotations import Annotation
from ..ops.registry import OpRecord, op_record

# Where a traced tensor comes from.
ACTIVATION, PARAMETER, BUFFER, INPUT, CONSTANT = "activation", "parameter", "buffer", "input", "constant"


@dataclass(frozen=True)
class TensorRef:
    """A reference to a graph tensor inside an op's arguments or the graph's outputs."""

    id: int


class DeviceRef:
    """Stands for the runtime device wherever the traced call passed a device."""

    def __repr__(self) -> str:
        return "DEVICE"


DEVICE = DeviceRef()


def numel(shape: tuple[int, ...]) -> int:
    """Number of elements of a tensor of ``shape`` (1 for a 0-d tensor)."""
    n = 1
    for s in shape:
        n *= s
    return n


def dtype_bytes(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype``."""
    if dtype == torch.bool:
        return 1
    if dtype.is_floating_point or dtype.is_complex:
        return torch.finfo(dtype).bits // 8
    return torch.iinfo(dtype).bits // 8


@dataclass
class Tensor:
    """A graph tensor: full (unpartitioned) shape and dtype, and where it comes from."""

    id: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    kind: str = ACTIVATION
    name: str | None = None  # state-dict name of a parameter/buffer, argument name of an input
    producer: int | None = None  # index of the op that produces it
    requires_grad: bool = False

    @property
    def numel(self) -> int:
        return numel(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * dtype_bytes(self.dtype)


@dataclass
class Op:
    """One recorded call: ``target(*args, **kwargs)`` with tensors as ``TensorRef``."""

    index: int
    name: str  # e.g. torch.nn.functional.linear, torch.Tensor.view, or a registered op's name
    target: Callable
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: Any  # pytree of TensorRef (and constants) mirroring what the call returned
    scope: str  # module path it was called from, e.g. model.layers.3.self_attn
    annotation: Annotation | None = None
    is_custom: bool = False

    @property
    def record(self) -> OpRecord:
        """Everything the planner knows about this op (``registry.OpRecord``), looked up by name."""
        return op_record(self.name)

    def arg(self, index: int, name: str, default: Any = None) -> Any:
        """The argument given by position ``index`` or keyword ``name`` (tensors as ``TensorRef``)."""
        if len(self.args) > index:
            return self.args[index]
        return self.kwargs.get(name, default)

    def input_ids(self) -> list[int]:
        """Ids of the tensor arguments, in the order the annotation lists them."""
        return list(self._tensor_ids("_input_ids", (self.args, self.kwargs)))

    def output_ids(self) -> list[int]:
        """Ids of the tensors in the output, in pytree order."""
        return list(self._tensor_ids("_output_ids", (self.output,)))

    def _tensor_ids(self, slot: str, sources: tuple) -> tuple[int, ...]:
        # The search asks for these millions of times and flattening was most of its time. The ids
        # are kept with the objects they came from, so reassigning args, kwargs or output (the
        # tracer sets output after the call) recomputes them.
        cached = self.__dict__.get(slot)
        if cached is None or any(a is not b for a, b in zip(cached[0], sources)):
            flat, _ = tree_flatten(sources)
            cached = (sources, tuple(x.id for x in flat if isinstance(x, TensorRef)))
            self.__dict__[slot] = cached
        return cached[1]


@dataclass
class Graph:
    """Ops in execution order plus the tensors they read and write."""

    tensors: dict[int, Tensor] = field(default_factory=dict)
    ops: list[Op] = field(default_factory=list)
    inputs: dict[str, int] = field(default_factory=dict)  # forward argument name -> tensor id
    output: Any = None  # pytree of TensorRef: what forward returns (the loss)
    parameters: dict[str, int] = field(default_factory=dict)  # state-dict name -> tensor id
    buffers: dict[str, int] = field(default_factory=dict)
    constants: dict[int, torch.Tensor] = field(default_factory=dict)  # captured values by tensor id

    def consumers(self) -> dict[int, list[int]]:
        """For each tensor id, the indices of the ops that read it."""
        users: dict[int, list[int]] = {tid: [] for tid in self.tensors}
        for op in self.ops:
            for tid in op.input_ids():
                users[tid].append(op.index)
        return users

    def output_ids(self) -> list[int]:
        flat, _ = tree_flatten(self.output)
        return [x.id for x in flat if isinstance(x, TensorRef)]

    def describe_tensor(self, tid: int) -> str:
        t = self.tensors[tid]
        label = t.name if t.kind in (PARAMETER, BUFFER, INPUT) else f"t{tid}"
        return f"{label}{list(t.shape)}"

    def __str__(self) -> str:
        lines = [f"Graph: {len(self.ops)} ops, {len(self.parameters)} parameters, inputs {list(self.inputs)}"]
        for op in self.ops:
            outs = ", ".join(self.describe_tensor(t) for t in op.output_ids())
            ins = ", ".join(self.describe_tensor(t) for t in op.input_ids())
            ann = f"  [{op.annotation}]" if op.annotation is not None else ""
            lines.append(f"  {op.index:4d} {outs} = {op.name}({ins}){ann}  @ {op.scope or '<root>'}")
        lines.append(f"  return {', '.join(self.describe_tensor(t) for t in self.output_ids())}")
        return "\n".join(lines)

    def summary(self) -> str:
        """A short count of ops by name and the parameter total."""
        counts: dict[str, int] = {}
        for op in self.ops:
            counts[op.name] = counts.get(op.name, 0) + 1
        n_params = sum(self.tensors[t].numel for t in self.parameters.values())
        top = sorted(counts.items(), key=lambda kv: -kv[1])
        rows = "\n".join(f"  {n:6d}  {name}" for name, n in top)
        return f"{len(self.ops)} ops, {len(self.parameters)} parameter tensors ({n_params:,} values)\n{rows}"
