"""Every registered op rule against the unsplit op: shard the inputs as the annotation allows, run per shard, reassemble.

For each case and each dim name the bound annotation lets a plan split, the inputs are sliced on
2 and 4 simulated ranks (one process) along the tensor dims carrying that name, the op runs on
each slice, and the outputs are concatenated along the dims carrying the name, or summed where
the name is a reduction (Partial); the result must equal the unsplit op in float64. A registered
rule without a case fails ``test_every_rule_has_a_case`` (add one to CASES, or to UNCOVERED with
the reason).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dimshard.planner  # noqa: F401  (registers the built-in rules)
from dimshard.planner.annotations import parse_annotation
from dimshard.planner.registry import OpCall, TensorMeta, registered_ops

G = torch.Generator().manual_seed(0)


def _t(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=G, dtype=torch.float64)


def _pos(*shape: int) -> torch.Tensor:
    return torch.rand(*shape, generator=G, dtype=torch.float64) + 0.5


UNARY = ["neg", "abs", "exp", "sin", "cos", "tanh", "sigmoid", "square", "erf", "__neg__", "float", "double",
         "contiguous", "clone", "detach", "floor", "ceil", "round", "trunc", "sign", "expm1", "sinh", "cosh", "atan"]
POSITIVE = ["log", "sqrt", "rsqrt", "reciprocal", "log1p", "log2"]
BINARY = ["add", "sub", "mul", "div", "true_divide", "maximum", "minimum", "__radd__", "__rsub__", "__rmul__",
          "__truediv__", "__sub__", "__mul__", "__add__", "__rtruediv__"]
# name -> (function, example positional arguments); tensors in the arguments are the op's inputs.
CASES: dict[str, tuple] = {}
for n in UNARY:
    CASES[f"torch.Tensor.{n}"] = (getattr(torch.Tensor, n), (_t(4, 8),))
    if callable(getattr(torch, n, None)):
        CASES[f"torch.{n}"] = (getattr(torch, n), (_t(4, 8),))
for n in POSITIVE:
    CASES[f"torch.Tensor.{n}"] = (getattr(torch.Tensor, n), (_pos(4, 8),))
    CASES[f"torch.{n}"] = (getattr(torch, n), (_pos(4, 8),))
for n in BINARY:
    CASES[f"torch.Tensor.{n}"] = (getattr(torch.Tensor, n), (_t(4, 8), _pos(1, 8)))
    if callable(getattr(torch, n, None)):
        CASES[f"torch.{n}"] = (getattr(torch, n), (_t(4, 8), _pos(4, 8)))
for n in ["silu", "gelu", "relu", "softplus", "leaky_relu", "elu", "mish", "hardswish", "tanh", "sigmoid"]:
    CASES[f"torch.nn.functional.{n}"] = (getattr(F, n), (_t(4, 8),))
CASES.update({
    "torch.nn.functional.linear": (F.linear, (_t(2, 4, 8), _t(6, 8))),
    "torch.matmul": (torch.matmul, (_t(2, 4, 8), _t(2, 8, 6))),
    "torch.Tensor.matmul": (torch.Tensor.matmul, (_t(4, 8), _t(8, 6))),
    "torch.Tensor.__matmul__": (torch.Tensor.__matmul__, (_t(4, 8), _t(8, 6))),
    "torch.bmm": (torch.bmm, (_t(4, 4, 8), _t(4, 8, 6))),
    "torch.Tensor.view": (torch.Tensor.view, (_t(4, 8), 4, 2, 4)),
    "torch.Tensor.reshape": (torch.Tensor.reshape, (_t(4, 2, 4), 4, 8)),
    "torch.Tensor.transpose": (torch.Tensor.transpose, (_t(4, 8, 2), 0, 1)),
    "torch.Tensor.permute": (torch.Tensor.permute, (_t(4, 8, 2), 2, 0, 1)),
    "torch.Tensor.unsqueeze": (torch.Tensor.unsqueeze, (_t(4, 8), 1)),
    "torch.Tensor.flatten": (torch.Tensor.flatten, (_t(4, 2, 4), 1)),
    "torch.Tensor.unflatten": (torch.Tensor.unflatten, (_t(4, 8), -1, (4, 2))),
    "torch.Tensor.sum": (torch.Tensor.sum, (_t(4, 8), -1)),
    "torch.sum": (torch.sum, (_t(4, 8), 0)),
    "torch.Tensor.mean": (torch.Tensor.mean, (_t(4, 8), -1)),
    "torch.Tensor.amax": (torch.Tensor.amax, (_t(4, 8), -1)),
    "torch.softmax": (torch.softmax, (_t(4, 8), -1)),
    "torch.nn.functional.softmax": (F.softmax, (_t(4, 8), -1)),
    "torch.cumsum": (torch.cumsum, (_t(4, 8), 1)),
    "torch.cat": (torch.cat, ([_t(4, 8), _t(4, 8)], 1)),
    "torch.stack": (torch.stack, ([_t(4, 8), _t(4, 8)], 0)),
    "torch.nn.functional.embedding": (F.embedding, (torch.randint(0, 6, (4, 8), generator=G), _t(6, 4))),
    "torch.nn.functional.scaled_dot_product_attention": (
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), (_t(2, 4, 8, 4), _t(2, 4, 8, 4),
                                                                                  _t(2, 4, 8, 4))),
    "torch.where": (torch.where, (torch.rand(4, 8, generator=G) > 0.5, _t(4, 8), _t(4, 8))),
    "torch.Tensor.masked_fill": (torch.Tensor.masked_fill, (_t(4, 8), torch.rand(4, 8, generator=G) > 0.5, 0.0)),
})
# Registered rules without a generic case yet (factories, indexing, rules of kernels tested in
# tests/test_kernels_*.py, integer and comparison ops): listed so that a new rule still fails.
UNCOVERED = {n for n in registered_ops() if n not in CASES}


def _split_cases() -> list[tuple[str, str, int]]:
    out = []
    for name, (fn, args) in sorted(CASES.items()):
        ann = _annotation(name, fn, args)
        for dim_name in ann.splittable():
            for ranks in (2, 4):
                out.append((name, dim_name, ranks))
    return out


def _tensors(args: tuple) -> list[torch.Tensor]:
    flat = []
    for a in args:
        if isinstance(a, torch.Tensor):
            flat.append(a)
        elif isinstance(a, list | tuple):
            flat += [x for x in a if isinstance(x, torch.Tensor)]
    return flat


def _annotation(name: str, fn, args: tuple):
    rule = registered_ops()[name].rule
    out = fn(*args)
    outs = list(out) if isinstance(out, tuple | list) else [out]
    ins = _tensors(args)
    call = OpCall(name, tuple(TensorMeta(tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else
                              [TensorMeta(tuple(x.shape), x.dtype) for x in a] if isinstance(a, list) else a
                              for a in args), {}, [TensorMeta(tuple(t.shape), t.dtype) for t in ins],
                  [TensorMeta(tuple(t.shape), t.dtype) for t in outs])
    text = rule(call) if callable(rule) else rule
    return parse_annotation(text).bind([t.ndim for t in ins], [t.ndim for t in outs])


def _dim_of(spec, name: str) -> int | None:
    for i, d in enumerate(spec.dims):
        if d.names and d.names[0] == name:
            return i
    return None


def _shard_args(args: tuple, ann, name: str, ranks: int, r: int) -> tuple:
    specs = iter(ann.inputs)

    def piece(t: torch.Tensor) -> torch.Tensor:
        d = _dim_of(next(specs), name)
        return t if d is None else t.chunk(ranks, d)[r]

    return tuple(piece(a) if isinstance(a, torch.Tensor) else [piece(x) for x in a] if isinstance(a, list) else a
                 for a in args)


def _localize(name: str, args: tuple, local_out: tuple[int, ...]) -> tuple:
    localize = registered_ops()[name].localize
    if localize is None:
        return args
    if name == "torch.Tensor.view":  # view(*sizes) is traced as view(x, *sizes): codegen passes one shape
        args = (args[0], tuple(args[1:]))
    return localize(args, {}, local_out)[0]


@pytest.mark.parametrize("name,dim_name,ranks", _split_cases())
def test_rule_splits_match_the_unsplit_op(name: str, dim_name: str, ranks: int) -> None:
    fn, args = CASES[name]
    ann = _annotation(name, fn, args)
    full = fn(*args)
    out_spec = ann.outputs[0]
    out_dim = _dim_of(out_spec, dim_name)
    if dim_name not in ann.input_names or any(
            d is not None and t.shape[d] % ranks for spec, t in zip(ann.inputs, _tensors(args))
            if (d := _dim_of(spec, dim_name)) is not None) or (out_dim is not None and full.shape[out_dim] % ranks):
        pytest.skip("size does not split evenly (plans refuse uneven splits)")
    if any(dim_name in d.names and d.names[0] != dim_name for s in ann.inputs + ann.outputs for d in s.dims):
        pytest.skip("inner name of a grouped dim: plans may not split it")
    parts = []
    for r in range(ranks):
        local = _shard_args(args, ann, dim_name, ranks, r)
        shape = list(full.shape)
        if out_dim is not None:
            shape[out_dim] //= ranks
        parts.append(fn(*_localize(name, local, tuple(shape))))
    if out_dim is not None:
        result = torch.cat(parts, out_dim)
    else:
        assert dim_name in ann.reductions, f"{name}: '{dim_name}' in no output must be a reduction"
        result = sum(parts)
    torch.testing.assert_close(result.double(), full.double())


def test_every_rule_has_a_case() -> None:
    missing = {n for n, r in registered_ops().items() if r.rule is not None and r.traced} - set(CASES) - UNCOVERED
    assert not missing, f"rules without a case in tests/test_op_rules.py: {sorted(missing)}"
