"""Every registered op rule against the unsplit op: shard the inputs as the annotation allows, run per shard, reassemble.

For each case and each dim name the bound annotation lets a plan split, the inputs are sliced on
2 and 4 simulated ranks (one process) along the tensor dims carrying that name, the op runs on
each slice, and the outputs are concatenated along the dims carrying the name, or summed where
the name is a reduction (Partial); the result must equal the unsplit op in float64. A summand
(``+``, a bias) of a split reduction is Partial as the plan places it: the first rank holds it,
the others zeros. A case key ``name#variant`` is another call of op ``name`` (a linear with a bias).
A registered rule without a case fails ``test_every_rule_has_a_case`` (add one to CASES, or to
UNCOVERED with the reason).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dimshard.kernels  # noqa: F401  (registers the kernels' rules, whatever ran before)
import dimshard.planner  # noqa: F401  (registers the built-in rules)
from dimshard.planner.ops.annotations import parse_annotation
from dimshard.planner.ops.registry import OpCall, TensorMeta, registered_ops

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
    # The index is shorter than the source in the gathered dim (1) and in dim 2: both rule branches.
    "torch.gather": (torch.gather, (_t(2, 10, 6), 1, torch.randint(0, 10, (2, 4, 3), generator=G))),
    "torch.Tensor.gather": (torch.Tensor.gather, (_t(2, 10, 6), 1, torch.randint(0, 10, (2, 4, 6), generator=G))),
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
    # Products with a summand (a bias): the summed dim k splits too, the summand added once.
    "torch.nn.functional.linear#bias": (F.linear, (_t(2, 4, 8), _t(8, 8), _t(8))),
    "torch.addmm": (torch.addmm, (_t(4), _t(4, 8), _t(8, 4))),  # GPT-2's Conv1D
    "torch.addmm#bias_mn": (torch.addmm, (_t(4, 1), _t(4, 8), _t(8, 4))),
    "torch.baddbmm": (lambda s, a, b: torch.baddbmm(s, a, b, beta=0.5, alpha=2.0), (_t(4, 1, 4), _t(4, 4, 8),
                                                                                     _t(4, 8, 4))),
    "torch.Tensor.baddbmm": (torch.Tensor.baddbmm, (_t(4, 4), _t(4, 4, 8), _t(4, 8, 4))),
})
# The recurrent ops (kernels/recurrent/): batch, heads (Mamba2's head groups) and value channels split.
from dimshard.kernels import recurrent  # noqa: E402

_GATES = -torch.rand(2, 8, 4, generator=G, dtype=torch.float64)
CASES.update({
    "dimshard.kernels.recurrent.delta_rule.gated_delta_rule": (recurrent.gated_delta_rule, (
        _t(2, 8, 4, 3), F.normalize(_t(2, 8, 4, 3), dim=-1), _t(2, 8, 4, 4), _GATES, _pos(2, 8, 4) - 0.5)),
    "dimshard.kernels.recurrent.linear_attention.gated_linear_attention": (recurrent.gated_linear_attention, (
        _t(2, 8, 4, 3), _t(2, 8, 4, 3), _t(2, 8, 4, 4), -torch.rand(2, 8, 4, 3, generator=G, dtype=torch.float64))),
    "dimshard.kernels.recurrent.ssd.state_space_dual": (recurrent.state_space_dual, (
        _t(2, 8, 4, 4), _pos(2, 8, 4), -_pos(4), _t(2, 8, 2, 3), _t(2, 8, 2, 3), _t(4), _t(4))),
    "dimshard.kernels.recurrent.selective_scan.selective_scan": (recurrent.selective_scan, (
        _t(2, 4, 8), _pos(2, 4, 8), -_pos(4, 3), _t(2, 3, 8), _t(2, 3, 8), _t(4), _t(2, 4, 8), _t(4))),
    "dimshard.kernels.recurrent.conv.causal_conv1d": (recurrent.causal_conv1d, (_t(2, 4, 8), _t(4, 3), _t(4))),
})

# Routers and the load-balancing loss (planner/ops/rules/moe.py): top-k values, counts, scatters.
_PICKS = torch.randint(0, 8, (4, 3), generator=G)
CASES.update({
    "torch.topk#values": (lambda x: torch.topk(x, 2, dim=-1).values, (_t(4, 8),)),
    "torch.Tensor.topk#indices": (lambda x: torch.Tensor.topk(x, 3, dim=-1).indices.double(), (_t(4, 8),)),
    "torch.histc": (torch.histc, (_t(16), 4, -1.0, 1.0)),
    "torch.Tensor.histc": (torch.Tensor.histc, (_t(4, 6), 5, -2.0, 2.0)),
    "torch.Tensor.scatter": (torch.Tensor.scatter, (_t(4, 8), 1, _PICKS, _t(4, 3))),
    "torch.scatter_add": (torch.scatter_add, (_t(4, 8), 1, _PICKS, _t(4, 3))),
    "torch.Tensor.scatter_add": (torch.Tensor.scatter_add, (_t(4, 8), 1, _PICKS, _t(4, 3))),
    "torch.scatter": (torch.scatter, (_t(4, 8), 1, _PICKS, _t(4, 3))),
    "torch.bincount#counts": (lambda x: torch.bincount(x, minlength=8).double(), (_PICKS.reshape(-1),)),
    "torch.Tensor.bincount#weighted": (lambda x, w: torch.Tensor.bincount(x, w, minlength=8),
                                       (_PICKS.reshape(-1), _t(12))),
})
# Writes through views (planner/graph/functionalize.py): a strided slice of the last dim, a select of dim 1.
CASES.update({
    "torch.slice_scatter": (torch.slice_scatter, (_t(4, 8, 6), _t(4, 8, 3), 2, 1, 6, 2)),
    "torch.select_scatter": (torch.select_scatter, (_t(4, 8, 6), _t(4, 6), 1, 3)),
})

# Registered rules without a generic case yet (factories, indexing, rules of kernels tested in
# tests/test_kernels_*.py, integer and comparison ops): listed so that a new rule still fails.
UNCOVERED = {
    # dimshard's kernels: each tested against its reference (tests/test_kernels_*.py) and split in the
    # fused-kernel and chunked-loss parallel equivalence cases.
    'dimshard.kernels.attention.attention', 'dimshard.kernels.chunk_linear_cross_entropy.chunk_linear_cross_entropy',
    'dimshard.kernels.rms_norm.rms_norm', 'dimshard.kernels.rotary.apply_rotary', 'dimshard.kernels.swiglu.swiglu',
    # A split FP8 linear equals the unsplit one only with its amaxes reduced over the split's process
    # group, which one process cannot give: tested on 2 gloo ranks in tests/test_fp8_split.py.
    'dimshard.kernels.fp8.linear.fp8_linear',
    'torch.Tensor.T.__get__', 'torch.Tensor.__and__', 'torch.Tensor.__eq__', 'torch.Tensor.__floordiv__',
    'torch.Tensor.__ge__', 'torch.Tensor.__getitem__', 'torch.Tensor.__gt__', 'torch.Tensor.__invert__',
    'torch.Tensor.__le__', 'torch.Tensor.__lt__', 'torch.Tensor.__mod__', 'torch.Tensor.__ne__',
    'torch.Tensor.__or__', 'torch.Tensor.__pow__', 'torch.Tensor.__rpow__', 'torch.Tensor.__setitem__',
    'torch.Tensor.add_', 'torch.Tensor.addcmul', 'torch.Tensor.all', 'torch.Tensor.amin', 'torch.Tensor.any',
    'torch.Tensor.bfloat16', 'torch.Tensor.bitwise_and', 'torch.Tensor.bitwise_not',
    'torch.Tensor.bitwise_or', 'torch.Tensor.bmm', 'torch.Tensor.bool', 'torch.Tensor.chunk',
    'torch.Tensor.clamp', 'torch.Tensor.clamp_', 'torch.Tensor.clamp_max', 'torch.Tensor.clamp_min',
    'torch.Tensor.clip', 'torch.Tensor.copy_', 'torch.Tensor.cumprod', 'torch.Tensor.cumsum',
    'torch.Tensor.div_', 'torch.Tensor.empty_like', 'torch.Tensor.eq', 'torch.Tensor.exp2', 'torch.Tensor.exp_',
    'torch.Tensor.expand', 'torch.Tensor.expand_as', 'torch.Tensor.floor_divide', 'torch.Tensor.fmod',
    'torch.Tensor.full_like', 'torch.Tensor.ge', 'torch.Tensor.gt', 'torch.Tensor.half',
    'torch.Tensor.index_select', 'torch.Tensor.int', 'torch.Tensor.isfinite', 'torch.Tensor.isinf',
    'torch.Tensor.isnan', 'torch.Tensor.le', 'torch.Tensor.lerp', 'torch.Tensor.log_softmax',
    'torch.Tensor.logical_and', 'torch.Tensor.logical_not', 'torch.Tensor.logical_or', 'torch.Tensor.logsumexp',
    'torch.Tensor.long', 'torch.Tensor.lt', 'torch.Tensor.masked_fill_', 'torch.Tensor.max', 'torch.Tensor.min',
    'torch.Tensor.mul_', 'torch.Tensor.nan_to_num', 'torch.Tensor.ne', 'torch.Tensor.neg_',
    'torch.Tensor.new_empty', 'torch.Tensor.new_full', 'torch.Tensor.new_ones', 'torch.Tensor.new_tensor',
    'torch.Tensor.new_zeros', 'torch.Tensor.norm', 'torch.Tensor.ones_like', 'torch.Tensor.pow',
    'torch.Tensor.pow_', 'torch.Tensor.prod', 'torch.Tensor.relu', 'torch.Tensor.remainder',
    'torch.Tensor.repeat', 'torch.Tensor.repeat_interleave', 'torch.Tensor.requires_grad_',
    'torch.Tensor.reshape_as', 'torch.Tensor.rsqrt_', 'torch.Tensor.sigmoid_', 'torch.Tensor.softmax',
    'torch.Tensor.split', 'torch.Tensor.sqrt_', 'torch.Tensor.squeeze', 'torch.Tensor.std', 'torch.Tensor.sub_',
    'torch.Tensor.tanh_', 'torch.Tensor.to', 'torch.Tensor.tril', 'torch.Tensor.triu', 'torch.Tensor.type',
    'torch.Tensor.type_as', 'torch.Tensor.var', 'torch.Tensor.view_as', 'torch.Tensor.where',
    'torch.Tensor.zeros_like', 'torch.__add__', 'torch.__and__', 'torch.__eq__', 'torch.__floordiv__',
    'torch.__ge__', 'torch.__gt__', 'torch.__invert__', 'torch.__le__', 'torch.__lt__', 'torch.__mod__',
    'torch.__mul__', 'torch.__ne__', 'torch.__neg__', 'torch.__or__', 'torch.__pow__', 'torch.__radd__',
    'torch.__rmul__', 'torch.__rpow__', 'torch.__rsub__', 'torch.__rtruediv__', 'torch.__sub__',
    'torch.__truediv__', 'torch.add_', 'torch.addcmul', 'torch.all', 'torch.amax', 'torch.amin',
    'torch.any', 'torch.arange', 'torch.as_tensor', 'torch.bfloat16', 'torch.bitwise_and',
    'torch.bitwise_not', 'torch.bitwise_or', 'torch.bool', 'torch.chunk', 'torch.clamp', 'torch.clamp_',
    'torch.clamp_max', 'torch.clamp_min', 'torch.clip', 'torch.concat', 'torch.concatenate', 'torch.contiguous',
    'torch.copy_', 'torch.cumprod', 'torch.diff', 'torch.div_', 'torch.double', 'torch.empty',
    'torch.empty_like', 'torch.eq', 'torch.exp2', 'torch.exp_', 'torch.flatten', 'torch.float',
    'torch.floor_divide', 'torch.fmod', 'torch.full', 'torch.full_like', 'torch.functional.split', 'torch.ge',
    'torch.gt', 'torch.half', 'torch.index_select', 'torch.int', 'torch.isfinite', 'torch.isinf', 'torch.isnan',
    'torch.layer_norm', 'torch.le', 'torch.lerp', 'torch.linspace', 'torch.log_softmax', 'torch.logical_and',
    'torch.logical_not', 'torch.logical_or', 'torch.logsumexp', 'torch.long', 'torch.lt', 'torch.masked_fill',
    'torch.masked_fill_', 'torch.max', 'torch.mean', 'torch.min', 'torch.mul_', 'torch.nan_to_num', 'torch.ne',
    'torch.neg_', 'torch.nn.functional.celu', 'torch.nn.functional.cross_entropy',
    'torch.nn.functional.cumprod', 'torch.nn.functional.cumsum', 'torch.nn.functional.dropout',
    'torch.nn.functional.gelu_new', 'torch.nn.functional.layer_norm', 'torch.nn.functional.log_softmax',
    'torch.nn.functional.logsigmoid', 'torch.nn.functional.pad', 'torch.nn.functional.relu6',
    'torch.nn.functional.rms_norm', 'torch.nn.functional.selu', 'torch.norm', 'torch.ones', 'torch.ones_like',
    'torch.permute', 'torch.pow', 'torch.pow_', 'torch.prod', 'torch.rand', 'torch.randn', 'torch.relu',
    'torch.remainder', 'torch.repeat_interleave', 'torch.requires_grad_', 'torch.reshape', 'torch.rms_norm',
    'torch.rsqrt_', 'torch.scalar_tensor', 'torch.sigmoid_', 'torch.split', 'torch.sqrt_', 'torch.squeeze',
    'torch.std', 'torch.sub_', 'torch.tanh_', 'torch.tensor', 'torch.transpose', 'torch.tril', 'torch.triu',
    'torch.type', 'torch.unflatten', 'torch.unsqueeze', 'torch.var', 'torch.zeros', 'torch.zeros_like',
}
# The in-place scatters share their rule with the cases above; the experts op is tested against its
# reference, split over experts, in tests/test_moe_experts.py.
UNCOVERED |= {"torch.Tensor.scatter_", "torch.Tensor.scatter_add_", "dimshard.kernels.moe.experts.moe_experts"}

# Tuple outputs, like torch.split's; Mamba's scan wrapper calls it (tests/test_recurrent_families.py).
UNCOVERED.add("torch.tensor_split")

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


def _op_name(case: str) -> str:
    """The op a case key names: ``torch.nn.functional.linear#bias`` is a call of ``torch.nn.functional.linear``."""
    return case.split("#")[0]


def _annotation(name: str, fn, args: tuple):
    rule = registered_ops()[_op_name(name)].rule
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
        spec = next(specs)
        d = _dim_of(spec, name)
        if d is None and spec.summand and name in ann.reductions:
            return t if r == 0 else torch.zeros_like(t)  # Partial: added once over the ranks
        return t if d is None else t.chunk(ranks, d)[r]

    return tuple(piece(a) if isinstance(a, torch.Tensor) else [piece(x) for x in a] if isinstance(a, list) else a
                 for a in args)


def _localize(name: str, args: tuple, local_out: tuple[int, ...]) -> tuple:
    localize = registered_ops()[_op_name(name)].localize
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
    # "kernels.": transformers probes for a package named kernels, which finds this repository's
    # folder when its root is on sys.path; those registrations are copies of dimshard.kernels'.
    missing = {n for n, r in registered_ops().items()
               if r.rule is not None and r.traced and not n.startswith(("tests.", "test_", "kernels."))}
    missing -= {_op_name(case) for case in CASES} | UNCOVERED
    assert not missing, f"rules without a case in tests/test_op_rules.py: {sorted(missing)}"


def test_a_split_sum_places_its_summand_partial_and_stores_it_whole() -> None:
    """A row-split biased linear: output and bias Partial, the bias stored whole and made Partial locally."""
    from dimshard.planner.graph.trace import trace
    from dimshard.planner.plan.placements import PARTIAL, REPLICATE, Mesh, Plan, Shard
    from dimshard.planner.plan.redistribute import redistribution_steps
    from dimshard.planner.plan.resolve import op_placements, resolve_placements

    graph = trace(torch.nn.Linear(8, 4), {"input": torch.randn(2, 8)})
    [op] = [op for op in graph.ops if op.name == "torch.nn.functional.linear"]
    assert str(op.annotation) == "_e0 k, n k, +n -> _e0 n"
    mesh = Mesh(("tp",), (2,))
    ins, outs = op_placements(graph, op, ("k",), mesh)
    assert ins == [(Shard(1),), (Shard(1),), (PARTIAL,)] and outs == [(PARTIAL,)]
    ins, outs = op_placements(graph, op, ("n",), mesh)  # column split: the bias splits with the features
    assert ins == [(REPLICATE,), (Shard(0),), (Shard(0),)] and outs == [(Shard(1),)]
    resolved = resolve_placements(graph, Plan(mesh, {op.index: ("k",)}))
    bias = op.input_ids()[2]
    assert resolved.stored[bias] == (REPLICATE,)
    assert [s.kind for s in redistribution_steps(resolved.stored[bias], (PARTIAL,))] == ["replicate_to_partial"]
    # A sharded summand is gathered first, then made Partial on the same axis.
    assert [s.kind for s in redistribution_steps((Shard(0),), (PARTIAL,))] == ["all_gather", "replicate_to_partial"]
