"""Generated code stays readable and predictable; redistributions pick the table's collectives."""

from __future__ import annotations

import ast
import re

import pytest
import torch
from parallel_harness import mini_llama_config

from dimshard.planner import CompileConfig, compile_model
from dimshard.planner.plan.placements import PARTIAL, REPLICATE, Mesh, Plan, PlanError, Shard
from dimshard.planner.plan.redistribute import redistribution_steps
from dimshard.planner.plan.resolve import resolve_placements


@pytest.fixture(scope="module")
def tp_output(tmp_path_factory):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(mini_llama_config())
    ids = torch.randint(0, 128, (2, 16))
    out = tmp_path_factory.mktemp("tp")
    compile_model(model, {"input_ids": ids, "labels": ids}, out, CompileConfig(plan_ngpus=2, policy="tp", recompute="layer"))
    return out


@pytest.mark.smoke
def test_tp_rank1_reduces_after_row_parallel_projections(tp_output):
    src = (tp_output / "gencode" / "rank1.py").read_text()
    ast.parse(src)
    lines = src.splitlines()
    for proj in ("o_proj", "down_proj"):
        for layer in (0, 1):
            weight = f"self.model__layers__{layer}__{'self_attn' if proj == 'o_proj' else 'mlp'}__{proj}__weight"
            at = next(i for i, line in enumerate(lines) if weight in line and "linear(" in line)
            out_var = lines[at].split("=")[0].strip()
            after = "\n".join(lines[at + 1:at + 4])
            assert f"comm.all_reduce({out_var}, self.groups['tp'])" in after, (proj, layer, after)
    assert src.count("comm.all_reduce(") == 4
    assert "comm.all_gather(" not in src and "comm.reduce_scatter(" not in src


def test_tp_rank1_declares_its_column_and_row_shards(tp_output):
    src = (tp_output / "gencode" / "rank1.py").read_text()
    q = re.search(r"'model.layers.0.self_attn.q_proj.weight', full_shape=\(64, 64\), slices=\(\(32, 64\), \(0, 64\)\)", src)
    o = re.search(r"'model.layers.0.self_attn.o_proj.weight', full_shape=\(64, 64\), slices=\(\(0, 64\), \(32, 64\)\)", src)
    norm = re.search(r"'model.norm.weight', full_shape=\(64,\), slices=\(\(0, 64\),\), dtype=torch.float32, "
                     r"unit_ranks=\(0, 1\)", src)
    assert q and o and norm
    assert "class Rank1Module(ParallelModule):" in src
    assert "checkpoint(self._recompute_model__layers__0_" in src and "use_reentrant=False" in src


@pytest.mark.parametrize(
    "src,dst,kinds",
    [
        ((Shard(1),), (REPLICATE,), ["all_gather"]),
        ((PARTIAL,), (REPLICATE,), ["all_reduce"]),
        ((PARTIAL,), (Shard(0),), ["reduce_scatter"]),
        ((Shard(0),), (Shard(2),), ["all_to_all"]),
        ((REPLICATE,), (Shard(1),), ["local_slice"]),
        ((Shard(1),), (Shard(1),), []),
        # 2-D: shrink before growing, so each collective moves the smallest tensor
        ((Shard(0), PARTIAL), (REPLICATE, REPLICATE), ["all_reduce", "all_gather"]),
        ((REPLICATE, PARTIAL), (Shard(2), Shard(1)), ["local_slice", "reduce_scatter"]),
        ((Shard(2), REPLICATE), (REPLICATE, Shard(1)), ["local_slice", "all_gather"]),
        # the same dim moves from the outer axis to the inner one: slicing first would cut the outer
        # axis's chunk, not the whole dim (shards nest in axis order), so it is gathered first
        ((Shard(1), REPLICATE), (REPLICATE, Shard(1)), ["all_gather", "local_slice"]),
    ],
)
def test_redistribution_steps_follow_the_table(src, dst, kinds):
    assert [s.kind for s in redistribution_steps(src, dst)] == kinds


def test_mesh_groups_are_row_major():
    mesh = Mesh(("tp", "sp"), (2, 2))
    assert mesh.groups(0) == [[0, 2], [1, 3]]
    assert mesh.groups(1) == [[0, 1], [2, 3]]
    assert mesh.coords(3) == (1, 1)


def test_uneven_split_is_a_clear_error():
    from transformers import LlamaForCausalLM

    from dimshard.planner import trace

    model = LlamaForCausalLM(mini_llama_config(num_attention_heads=6, num_key_value_heads=6, hidden_size=48))
    ids = torch.randint(0, 128, (1, 8))
    graph = trace(model, {"input_ids": ids, "labels": ids})
    q = next(op for op in graph.ops if op.scope.endswith("q_proj"))
    plan = Plan(Mesh(("tp",), (5,)), {q.index: ("n",)})
    with pytest.raises(PlanError, match="cannot split dim 'n' \\(size 48\\) evenly over mesh axis 'tp' of size 5"):
        resolve_placements(graph, plan)
    frozen = next(op for op in graph.ops if op.name == "torch.nn.functional.embedding")
    with pytest.raises(PlanError, match="may not be split"):
        resolve_placements(graph, Plan(Mesh(("tp",), (2,)), {frozen.index: ("n",)}))


class _Unflatten(torch.nn.Module):
    """A projection whose output features are unflattened into (heads, head_dim)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(16, 64, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x).unflatten(-1, (4, 16))
        return (h * h).sum()


def test_unflatten_of_a_split_outer_dim_gets_local_sizes():
    from dimshard.planner import trace
    from dimshard.planner.codegen.rank_code import generate_rank_code

    torch.manual_seed(0)
    model, x = _Unflatten(), torch.randn(2, 3, 16)
    graph = trace(model, {"x": x})
    proj = next(op for op in graph.ops if op.name == "torch.nn.functional.linear")
    unflatten = next(op for op in graph.ops if op.name == "torch.Tensor.unflatten")
    heads = unflatten.annotation.inputs[0].dims[-1].names[0]  # the outer name of (h d)
    plan = Plan(Mesh(("tp",), (2,)), {proj.index: ("n",), unflatten.index: (heads,)})
    resolved = resolve_placements(graph, plan)
    assert resolved.op_inputs[unflatten.index][0] == (Shard(2),)
    line = next(line.strip() for line in generate_rank_code(graph, resolved, 1).splitlines()
                if ".unflatten(" in line)
    target, expr = line.split("#")[0].split(" = ", 1)
    # Rank 1 holds features 32..63 of the projection: heads 2 and 3 once unflattened.
    full = model.proj(x)
    local = {expr.split(".unflatten")[0]: full[..., 32:]}
    assert "(2, 16)" in expr
    torch.testing.assert_close(eval(expr, {"torch": torch}, local), full.unflatten(-1, (4, 16))[..., 2:, :])
