"""Sequence-split attention chosen by the planner: equivalence with one process, errors, zigzag codegen, search.

The equivalence cases force a plan with a small policy (attention split along the sequence on
axis ``sp``, Megatron roles on axis ``tp``) and compare loss, gradients and updated parameters on
gloo with the single-process Hugging Face model, as tests/test_parallel_equivalence.py does.
"""

from __future__ import annotations

import pytest
import torch
from dist_utils import run_distributed
from parallel_harness import assemble, max_diff, mini_llama_config, rank_step, reference_step, save_weights

from dimshard.planner import CompileConfig, compile_model
from dimshard.planner.graph.ir import Graph, Op
from dimshard.planner.plan.placements import Mesh, Plan, PlanError
from dimshard.planner.plan.sequence_split import sequence_split_name
from dimshard.planner.search.policies import (
    PolicyContext,
    _plan_by_seeds,
    _sequence_seed,
    _tp_seed,
    register_policy,
)

TOL = 1e-5


def _sequence_seed_with_attention(graph: Graph, op: Op) -> str | None:
    """Residual stream, loss and attention split along the sequence."""
    return sequence_split_name(op) or _sequence_seed(graph, op)


def _mlp_tp_seed(graph: Graph, op: Op) -> str | None:
    """Attention along the sequence, the MLP tensor parallel on the same axis (gather / reduce-scatter)."""
    if ".mlp." in op.scope + ".":
        return _tp_seed(graph, op)
    return _sequence_seed_with_attention(graph, op)


_SEEDS = {"sp": _sequence_seed_with_attention, "tp": _tp_seed, "sp_mlp_tp": _mlp_tp_seed}


def sequence_policy(axes: dict[str, int]):
    """A policy over mesh ``axes`` (name -> size): each axis seeded by its role in ``_SEEDS``."""

    def policy(graph: Graph, ctx: PolicyContext) -> Plan:
        mesh = Mesh(tuple(a.split("_")[0] for a in axes), tuple(axes.values()))
        return _plan_by_seeds(graph, mesh, [_SEEDS[a] for a in axes], ctx, "sequence_test", split_partials=True)

    return policy


def _compile(tmp_path, model, input_ids, axes, **config):
    name = "cp_test_" + "_".join(f"{a}{s}" for a, s in axes.items())
    register_policy(name, sequence_policy(axes), replace=True)
    plan_ngpus = 1
    for size in axes.values():
        plan_ngpus *= size
    return compile_model(model, {"input_ids": input_ids, "labels": input_ids.clone()}, tmp_path / "out",
                         CompileConfig(plan_ngpus=plan_ngpus, policy=name, **config))


CASES = [
    # (mesh axes, config overrides, compile options, optimizer); the mini Llama has GQA 8:4
    ({"sp": 2}, {}, {}, "adamw"),  # the Hugging Face loss: logits gathered back into natural order
    # GQA 4:1, recomputed layers, train.py's loss over zigzag shards (3-token chunks cut across chunk edges)
    ({"sp": 4}, {"num_key_value_heads": 2}, {"loss": "chunked_cross_entropy", "loss_chunk_size": 3,
                                             "recompute": "layer"}, "sgd"),
    # heads x sequence, through dimshard's attention op (the Hugging Face "dimshard" attention implementation)
    ({"tp": 2, "sp": 2}, {"attn_implementation": "dimshard"}, {}, "adamw"),
    ({"sp_mlp_tp": 2}, {}, {"loss": "chunked_cross_entropy"}, "adamw"),  # zigzag gathers and reduce-scatters
]


@pytest.mark.slow
@pytest.mark.parametrize("axes,overrides,options,optimizer", CASES)
def test_sequence_split_matches_single_process(tmp_path, axes, overrides, options, optimizer):
    from transformers import LlamaForCausalLM

    if overrides.get("attn_implementation") == "dimshard":
        from dimshard.kernels.hf_attention import register

        register()
    torch.manual_seed(0)
    model = LlamaForCausalLM(mini_llama_config(**overrides))
    input_ids = torch.randint(0, 128, (2, 16))
    result = _compile(tmp_path, model, input_ids, axes, **options)
    # The reference is always the Hugging Face model with its own (sdpa) attention, same weights.
    reference = LlamaForCausalLM(mini_llama_config(**{**overrides, "attn_implementation": "sdpa"}))
    reference.load_state_dict(model.state_dict())
    code = (tmp_path / "out" / "gencode" / "rank1.py").read_text()
    assert "sequence_split_attention(" in code and "zigzag_slice(" in code
    assert "scaled_dot_product_attention(" not in code
    save_weights(model, tmp_path / "weights.safetensors")
    lr = 1e-2 if optimizer == "sgd" else 1e-3
    ref = reference_step(reference, input_ids, optimizer, lr)
    results = run_distributed(rank_step, result.plan.mesh.size, str(tmp_path / "out"),
                              str(tmp_path / "weights.safetensors"), input_ids, optimizer, lr)
    for r in results:
        assert abs(r["loss"] - ref["loss"]) <= TOL, (r["loss"], ref["loss"])
    grads = assemble(results, "grads", ref["grads"])
    worst, where = max_diff(grads, ref["grads"])
    assert worst <= TOL, f"gradient of {where} differs by {worst}"
    params = assemble(results, "params", ref["params"])
    worst, where = max_diff(params, ref["params"])
    assert worst <= TOL, f"updated {where} differs by {worst}"


def test_sequence_that_does_not_cut_into_2p_chunks_is_a_compile_error(tmp_path):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(mini_llama_config(num_hidden_layers=1))
    with pytest.raises(PlanError, match=r"sequence length 12 does not cut into 8 equal chunks.*multiple of 8"):
        _compile(tmp_path, model, torch.randint(0, 128, (1, 12)), {"sp": 4})


def test_sliding_window_attention_is_refused_at_compile_time(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=128, sliding_window=4, attn_implementation="sdpa")
    model = MistralForCausalLM(config)
    with pytest.raises(PlanError, match=r"(sliding-window|attention mask).*sequence split"):
        _compile(tmp_path, model, torch.randint(0, 128, (1, 16)), {"sp": 2})


def test_auto_planner_splits_the_sequence_where_heads_run_out(tmp_path):
    """4 GPUs, 2 K/V heads, long sequence: heads alone cannot use the GPUs; the search picks sequence split."""
    from transformers import LlamaForCausalLM

    config = mini_llama_config(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=8192, num_hidden_layers=2)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    ids = torch.zeros(1, 8192, dtype=torch.long)
    result = compile_model(model, {"input_ids": ids, "labels": ids.clone()}, tmp_path / "out",
                           CompileConfig(plan_ngpus=4, policy="auto", param_dtype=torch.bfloat16,
                                         hw_profile="h200", loss="chunked_cross_entropy"))
    plan = result.plan
    attention = [op for op in result.graph.ops if sequence_split_name(op) is not None]
    assert attention
    assert all(sequence_split_name(op) in plan.split_of(op.index) for op in attention)
    assert "cp" in plan.mesh.axis_names
    report = (tmp_path / "out" / "plan_report.md").read_text()
    assert "Sequence-split attention" in report and "Runner-up plans" in report
    assert "sequence_split_attention(" in (tmp_path / "out" / "gencode" / "rank0.py").read_text()


# --- zigzag reorders and node boundaries (one process) ---------------------------------------


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_zigzag_reorders_agree_with_the_layout(world_size):
    from dimshard.kernels._cp_reorder import from_zigzag, to_zigzag, zigzag_slice
    from dimshard.kernels.sequence_split.layout import zigzag_indices, zigzag_permutation

    x = torch.randn(3, 16, 5, requires_grad=True)
    shards = [zigzag_slice(x, 1, world_size, r) for r in range(world_size)]
    for r, shard in enumerate(shards):
        assert torch.equal(shard, x[:, zigzag_indices(16, world_size, r)])
        assert torch.equal(to_zigzag(x, 1, world_size).chunk(world_size, 1)[r], shard)
    # What an all-gather of the shards in rank order returns, put back into natural order.
    assert torch.equal(from_zigzag(torch.cat(shards, 1), 1, world_size), x)
    assert torch.equal(to_zigzag(x, 1, world_size), x[:, zigzag_permutation(16, world_size)])
    # The slice's backward is the zero-padded placement, as comm.local_slice's.
    shards[-1].sum().backward()
    expected = torch.zeros(16)
    expected[zigzag_indices(16, world_size, world_size - 1)] = 1
    assert torch.equal(x.grad[0, :, 0], expected)


def test_zigzag_steps_wrap_collectives_only_on_sequence_dims():
    from dimshard.planner.codegen.sequence_split_code import zigzag_step
    from dimshard.planner.plan.sequence_split import ZigzagLayout

    layout = ZigzagLayout(axes={1: 4}, members={(7, 2)})
    g = "self.groups['cp']"
    assert zigzag_step(layout, 7, "local_slice", 1, 2, None, "x", g, 3)[0] == "zigzag_slice(x, 2, 4, 3)"
    assert zigzag_step(layout, 7, "all_gather", 1, 2, None, "x", g, 0)[0] == f"from_zigzag(comm.all_gather(x, 2, {g}), 2, 4)"
    assert zigzag_step(layout, 7, "reduce_scatter", 1, 2, None, "x", g, 0)[0] == (
        f"comm.reduce_scatter(to_zigzag(x, 2, 4), 2, {g})")
    assert zigzag_step(layout, 7, "all_to_all", 1, 2, 1, "x", g, 0)[0] == f"from_zigzag(comm.all_to_all(x, 2, 1, {g}), 2, 4)"
    assert zigzag_step(layout, 7, "all_to_all", 1, 1, 2, "x", g, 0)[0] == f"comm.all_to_all(to_zigzag(x, 2, 4), 1, 2, {g})"
    assert zigzag_step(layout, 7, "all_gather", 0, 2, None, "x", g, 0) is None  # another axis: contiguous
    assert zigzag_step(layout, 7, "all_gather", 1, 1, None, "x", g, 0) is None  # another dim (heads)
    assert zigzag_step(layout, 8, "local_slice", 1, 2, None, "x", g, 0) is None  # not sequence-aligned


def test_collectives_on_an_axis_that_crosses_nodes_run_at_the_internode_rate():
    from dimshard.planner.cost.hardware import load_hw_profile
    from dimshard.planner.cost.topology import (
        axis_collective_seconds,
        axis_crosses_nodes,
        node_ordered_meshes,
    )

    hw = load_hw_profile("h200")
    assert hw.gpus_per_node == 8 and hw.internode_gbps == 400.0
    mesh = Mesh(("cp", "tp"), (2, 8))
    assert axis_crosses_nodes(mesh, 0, hw) and not axis_crosses_nodes(mesh, 1, hw)
    assert not axis_crosses_nodes(Mesh(("tp",), (8,)), 0, hw)
    nbytes = 1e9
    inter = axis_collective_seconds(hw, "all_gather", nbytes, mesh, 0)
    intra = axis_collective_seconds(hw, "all_gather", nbytes, Mesh(("a", "b"), (8, 2)), 1)
    assert inter == pytest.approx(nbytes / 50e9, rel=0.01)  # 400 Gb/s per GPU
    assert intra < inter / 4
    assert node_ordered_meshes([(16,), (8, 2), (4, 4)], hw) == [(16,), (8, 2), (4, 4), (2, 8)]
    assert node_ordered_meshes([(8,), (4, 2)], hw) == [(8,), (4, 2)]
