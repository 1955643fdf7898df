"""Dim annotations of the recurrent ops, built per call from one spec per tensor argument.

The recurrent ops take optional tensors (a bias, an initial state, a skip weight) by position or
by keyword, and return their final state only when asked. A rule here lists the traced call's
tensor inputs in the order the tracer records them (positional arguments, then keywords) and
joins their specs, so one record per op serves every combination.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from dimshard.planner.ops.registry import OpCall, TensorMeta


def annotation_rule(parameters: list[str], specs: Callable[[OpCall], dict[str, str]],
                    outputs: Callable[[OpCall], list[str]]) -> Callable[[OpCall], str]:
    """A rule for an op whose parameters are named ``parameters`` (in order): ``specs(call)`` maps parameter
    names to dim specs, ``outputs(call)`` lists the output specs; the annotation has the specs of the
    tensors the call passed, in the tracer's order."""

    def rule(call: OpCall) -> str:
        by_name = specs(call)
        names = [parameters[i] for i, a in enumerate(call.args) if isinstance(a, TensorMeta)]
        names += [n for n, a in call.kwargs.items() if isinstance(a, TensorMeta)]
        return ", ".join(by_name[n] for n in names) + " -> " + ", ".join(outputs(call))

    return rule


def is_symbolic(*tensors: object) -> bool:
    """Whether any argument is a meta tensor: the tracer's run, where only shapes and dtypes matter."""
    return any(getattr(t, "is_meta", False) for t in tensors)


def symbolic_result(*outputs: torch.Tensor, inputs: tuple[object, ...]) -> Any:
    """The tracer's result: ``outputs`` needing a gradient when any of ``inputs`` does (the tracer reads
    requires_grad off the result, and the cost model prices the backward by it); one tensor or a tuple."""
    needs = any(getattr(t, "requires_grad", False) for t in inputs)
    results = tuple(o.requires_grad_(needs) for o in outputs)
    return results[0] if len(results) == 1 else results
