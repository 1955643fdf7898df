"""The dim-annotation language: parse and bind strings such as ``b l d^, n^ d^, b l -> b l``.

Grammar (whitespace separates dims, commas separate tensors)::

    annotation := tensors '->' tensors
    tensors    := tensor (',' tensor)*          # a tensor may be empty: a 0-d tensor
    tensor     := ['+'] dim*                    # '+': a summand (inputs only)
    dim        := NAME ['^'] | '1' | '(' NAME['^'] NAME['^']+ ')' | '...'

- the same NAME in two tensors means those dims split together;
- ``^`` marks a NAME that must never be split (anywhere it appears);
- ``1`` is a size-1 (broadcast) dim, never split;
- ``(h d)`` is one tensor dim made of several NAMEs, outermost first (views and reshapes);
- ``...`` stands for any number of leading dims and is bound to fresh names per call;
- a NAME in the inputs but in no output is a reduction: splitting it makes the outputs Partial;
- ``+`` before an input marks a *summand*, a tensor the op adds to its result (a linear layer's
  bias: ``... k, n k, +n -> ... n``). Where a split reduction leaves partial sums, the summand must
  be added once, not on every rank, so the plan gives it the Partial placement too (one rank holds
  it, the others zeros: docs/design.md, "Placements and redistribution"). Its names must be
  output names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class AnnotationError(ValueError):
    """A malformed or inconsistent dim annotation."""


@dataclass(frozen=True)
class Dim:
    """One tensor dim: the NAMEs it is made of (outermost first); empty for a ``1`` dim."""

    names: tuple[str, ...]

    @property
    def is_broadcast(self) -> bool:
        return not self.names

    def __str__(self) -> str:
        if not self.names:
            return "1"
        if len(self.names) == 1:
            return self.names[0]
        return "(" + " ".join(self.names) + ")"


@dataclass(frozen=True)
class TensorSpec:
    """The dims of one tensor; ``ellipsis_at`` is the index of ``...`` or None; ``summand``: marked ``+``."""

    dims: tuple[Dim, ...]
    ellipsis_at: int | None = None
    summand: bool = False

    def names(self) -> list[str]:
        return [n for d in self.dims for n in d.names]

    def __str__(self) -> str:
        parts = [str(d) for d in self.dims]
        if self.ellipsis_at is not None:
            parts.insert(self.ellipsis_at, "...")
        return ("+" if self.summand else "") + " ".join(parts)


@dataclass(frozen=True)
class Annotation:
    """A parsed annotation. ``frozen`` holds the NAMEs marked ``^`` (never split)."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    frozen: frozenset[str] = field(default_factory=frozenset)

    def __str__(self) -> str:
        def fmt(spec: TensorSpec) -> str:
            parts = []
            for d in spec.dims:
                if len(d.names) == 1:
                    parts.append(d.names[0] + ("^" if d.names[0] in self.frozen else ""))
                elif d.names:
                    parts.append("(" + " ".join(n + ("^" if n in self.frozen else "") for n in d.names) + ")")
                else:
                    parts.append("1")
            if spec.ellipsis_at is not None:
                parts.insert(spec.ellipsis_at, "...")
            return ("+" if spec.summand else "") + " ".join(parts)

        return ", ".join(fmt(s) for s in self.inputs) + " -> " + ", ".join(fmt(s) for s in self.outputs)

    @property
    def input_names(self) -> set[str]:
        return {n for s in self.inputs for n in s.names()}

    @property
    def output_names(self) -> set[str]:
        return {n for s in self.outputs for n in s.names()}

    @property
    def reductions(self) -> set[str]:
        """NAMEs that appear in some input and in no output."""
        return self.input_names - self.output_names

    def splittable(self) -> list[str]:
        """NAMEs a plan may split: present in an input, not frozen, in first-seen order."""
        seen: list[str] = []
        for spec in self.inputs:
            for n in spec.names():
                if n not in self.frozen and n not in seen:
                    seen.append(n)
        return seen

    def bind(self, input_ranks: list[int], output_ranks: list[int]) -> Annotation:
        """Expand ``...`` for concrete tensor ranks; check every tensor's rank matches.

        The dims ``...`` stands for get fresh names ``_e0, _e1, ...`` aligned from the right,
        so broadcasting tensors with fewer leading dims share the innermost names.
        """
        if len(input_ranks) != len(self.inputs) or len(output_ranks) != len(self.outputs):
            raise AnnotationError(
                f"annotation '{self}' names {len(self.inputs)} input and {len(self.outputs)} output tensors, "
                f"but the call has {len(input_ranks)} tensor inputs and {len(output_ranks)} tensor outputs"
            )
        has_ellipsis = any(s.ellipsis_at is not None for s in self.inputs + self.outputs)
        specs = list(self.inputs) + list(self.outputs)
        ranks = list(input_ranks) + list(output_ranks)
        extra = [r - len(s.dims) for s, r in zip(specs, ranks)]
        max_extra = max([e for s, e in zip(specs, extra) if s.ellipsis_at is not None], default=0)
        fresh = [f"_e{i}" for i in range(max_extra)]
        bound = []
        for spec, e, rank in zip(specs, extra, ranks):
            if spec.ellipsis_at is None:
                if e != 0:
                    raise AnnotationError(
                        f"annotation '{self}': tensor '{spec}' has {len(spec.dims)} dims but the call's tensor has {rank}"
                    )
                bound.append(spec)
                continue
            if e < 0:
                raise AnnotationError(
                    f"annotation '{self}': tensor '{spec}' needs at least {len(spec.dims)} dims, the call's has {rank}"
                )
            names = fresh[max_extra - e :]
            dims = spec.dims[: spec.ellipsis_at] + tuple(Dim((n,)) for n in names) + spec.dims[spec.ellipsis_at :]
            bound.append(TensorSpec(dims, summand=spec.summand))
        if not has_ellipsis:
            return self
        n_in = len(self.inputs)
        return Annotation(tuple(bound[:n_in]), tuple(bound[n_in:]), self.frozen)


def _parse_tensor(text: str, whole: str, frozen: set[str]) -> TensorSpec:
    summand = text.lstrip().startswith("+")
    if summand:
        text = text.lstrip()[1:]
    tokens = re.findall(r"\(|\)|\.\.\.|[^\s()]+", text)
    dims: list[Dim] = []
    ellipsis_at = None
    group: list[str] | None = None
    for tok in tokens:
        if tok == "(":
            if group is not None:
                raise AnnotationError(f"nested '(' in annotation '{whole}': groups cannot contain groups")
            group = []
            continue
        if tok == ")":
            if group is None:
                raise AnnotationError(f"unbalanced ')' in annotation '{whole}'")
            if len(group) < 2:
                raise AnnotationError(f"group '({' '.join(group)})' in annotation '{whole}' needs at least two names")
            dims.append(Dim(tuple(group)))
            group = None
            continue
        if tok == "...":
            if group is not None:
                raise AnnotationError(f"'...' inside a group in annotation '{whole}'")
            if ellipsis_at is not None:
                raise AnnotationError(f"tensor '{text.strip()}' in annotation '{whole}' has more than one '...'")
            ellipsis_at = len(dims)
            continue
        if tok == "1":
            if group is not None:
                raise AnnotationError(f"'1' inside a group in annotation '{whole}'")
            dims.append(Dim(()))
            continue
        if tok == "1^":
            raise AnnotationError(f"'1^' in annotation '{whole}': a broadcast dim is never split already")
        name, caret = (tok[:-1], True) if tok.endswith("^") else (tok, False)
        if not _NAME.match(name):
            raise AnnotationError(f"bad dim name '{tok}' in annotation '{whole}': use letters, digits and '_'")
        if caret:
            frozen.add(name)
        if group is not None:
            group.append(name)
        else:
            dims.append(Dim((name,)))
    if group is not None:
        raise AnnotationError(f"unbalanced '(' in annotation '{whole}'")
    spec = TensorSpec(tuple(dims), ellipsis_at, summand)
    names = spec.names()
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise AnnotationError(f"dim name '{dup[0]}' appears twice in tensor '{text.strip()}' of annotation '{whole}'")
    return spec


def parse_annotation(text: str) -> Annotation:
    """Parse an annotation string; raises AnnotationError saying what is wrong and where."""
    if not isinstance(text, str):
        raise AnnotationError(f"an annotation must be a string, got {type(text).__name__}")
    if text.count("->") != 1:
        raise AnnotationError(f"annotation '{text}' must contain exactly one '->' between inputs and outputs")
    left, right = text.split("->")
    frozen: set[str] = set()
    inputs = tuple(_parse_tensor(t, text, frozen) for t in left.split(",")) if left.strip() else ()
    outputs = tuple(_parse_tensor(t, text, frozen) for t in right.split(","))
    if any(s.summand for s in outputs):
        raise AnnotationError(f"annotation '{text}' marks an output '+': only an input the op adds to its "
                              "result can be a summand")
    out_names = {n for s in outputs for n in s.names()}
    for spec in inputs:
        missing = [n for n in spec.names() if n not in out_names] if spec.summand else []
        if missing:
            raise AnnotationError(f"summand '{spec}' of annotation '{text}' has dim '{missing[0]}', which no "
                                  "output has: a summand is added to the result, so its dims are output dims")
    in_names = {n for s in inputs for n in s.names()}
    for spec in outputs:
        for n in spec.names():
            if n not in in_names:
                # A dim created by the op (a factory, an expand) cannot be split by its inputs.
                frozen.add(n)
    return Annotation(inputs, outputs, frozenset(frozen))
