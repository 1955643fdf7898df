"""The tracer on unmodified Hugging Face models, and the single-rank generated module against them."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from parallel_harness import mini_llama_config
from safetensors.torch import load_file

from dimshard.planner import CompileConfig, TraceError, compile_model, register_op, trace
from dimshard.runtime.distributed import destroy_parallel, init_parallel
from dimshard.runtime.module import load_parallel_module, read_plan


@pytest.fixture(autouse=True)
def _no_process_group_left_open():
    yield
    destroy_parallel()


def _small(kind: str) -> torch.nn.Module:
    import transformers

    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=96, max_position_embeddings=128, attn_implementation="sdpa")
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    if kind == "mistral":
        return transformers.MistralForCausalLM(transformers.MistralConfig(**common, sliding_window=None))
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, tie_word_embeddings=True))


@pytest.mark.smoke
@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_single_rank_module_equals_hf_model(tmp_path, kind):
    torch.manual_seed(0)
    model = _small(kind)
    ids = torch.randint(0, 96, (2, 24))
    labels = ids.clone()
    labels[0, :3] = -100  # ignored positions must be handled like the original
    compile_model(model, {"input_ids": ids, "labels": labels}, tmp_path, CompileConfig(plan_ngpus=1, policy="dp"))
    ctx = init_parallel(read_plan(tmp_path), backend="gloo")  # on the CPU, like the reference model
    module = load_parallel_module(tmp_path, ctx)
    module.load_full_state_dict(model.state_dict())
    new_ids = torch.randint(0, 96, (2, 24))  # other values, same shapes: the graph must not bake them in
    loss = module(new_ids, labels)
    loss.backward()
    ref = model(input_ids=new_ids, labels=labels, use_cache=False).loss
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-5
    grads = {lp.name: lp.param.grad for lp in module.local_parameters()}
    for name, p in model.named_parameters():
        assert (grads[name] - p.grad).abs().max().item() <= 1e-5, name


def test_graph_lists_ops_with_scopes_and_parameters():
    model = _small("llama")
    ids = torch.randint(0, 96, (1, 8))
    graph = trace(model, {"input_ids": ids, "labels": ids})
    names = [op.name for op in graph.ops]
    assert names.count("torch.nn.functional.linear") == 2 * 7 + 1
    assert names.count("torch.nn.functional.scaled_dot_product_attention") == 2
    assert "torch.nn.functional.cross_entropy" in names
    scopes = {op.scope for op in graph.ops if op.name == "torch.nn.functional.linear"}
    assert "model.layers.1.self_attn.q_proj" in scopes
    assert set(graph.parameters) == {n for n, _ in model.named_parameters()}
    listing = str(graph)
    assert "model.layers.0.self_attn.q_proj.weight[64, 64]" in listing and "@ model.layers.0.mlp.down_proj" in listing


@register_op("b l d^, n^ d^, b l -> b l")
def _token_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, padding_idx: int) -> torch.Tensor:
    logits = hidden @ weight.t()
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none",
                                             ignore_index=padding_idx).view_as(labels)


class _WithCustomLoss(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 8, bias=False)
        self.head = torch.nn.Linear(8, 16, bias=False)
        self.embed = torch.nn.Embedding(16, 8)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.proj(self.embed(input_ids))
        return _token_loss(h, self.head.weight, labels, -100).mean()


def test_register_op_is_one_op_and_still_callable(tmp_path):
    model = _WithCustomLoss()
    ids = torch.randint(0, 16, (2, 4))
    graph = trace(model, {"input_ids": ids, "labels": ids})
    custom = [op for op in graph.ops if op.is_custom]
    assert len(custom) == 1 and custom[0].name.endswith("_token_loss")
    assert str(custom[0].annotation) == "b l d^, n^ d^, b l -> b l"
    assert not any(op.name == "torch.nn.functional.cross_entropy" for op in graph.ops)  # nothing inside traced
    eager = model(ids, ids)  # the decorated function runs normally outside tracing
    compile_model(model, {"input_ids": ids, "labels": ids}, tmp_path, CompileConfig(plan_ngpus=1, policy="dp"))
    assert "from tests.test_trace import _token_loss" in (tmp_path / "gencode" / "rank0.py").read_text() or \
        "import _token_loss" in (tmp_path / "gencode" / "rank0.py").read_text()
    ctx = init_parallel(read_plan(tmp_path), backend="gloo")  # on the CPU, like the reference model
    module = load_parallel_module(tmp_path, ctx)
    module.load_full_state_dict(model.state_dict())
    assert torch.allclose(module(ids, ids), eager, atol=1e-6)


class _Unannotated(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.special.erfcx(self.lin(input_ids.float())).sum()


def test_op_without_annotation_is_a_clear_error():
    with pytest.raises(TraceError) as err:
        trace(_Unannotated(), {"input_ids": torch.zeros(2, 4, dtype=torch.long)})
    message = str(err.value)
    assert "no dim annotation for torch.special.erfcx called from the top-level module" in message
    assert "register" in message


def test_buffers_and_inputs_are_saved_with_the_compile_output(tmp_path):
    model = _small("llama")
    ids = torch.randint(0, 96, (1, 8))
    compile_model(model, {"input_ids": ids, "labels": ids}, tmp_path, CompileConfig(plan_ngpus=1, policy="dp"))
    plan = read_plan(tmp_path)
    assert [b["name"] for b in plan["buffers"]] == ["model.rotary_emb.inv_freq"]
    saved = load_file(str(tmp_path / "buffers.safetensors"))
    assert torch.equal(saved["model.rotary_emb.inv_freq"], model.model.rotary_emb.inv_freq)
    assert plan["model_stats"]["num_layers"] == 2 and plan["model_stats"]["seq_len"] == 8


_EIGHT_B = textwrap.dedent(
    """
    import json, resource, sys, time
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from dimshard.planner import trace
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
                      attn_implementation="sdpa")
    start = time.perf_counter()
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    ids = torch.zeros(1, 131072, dtype=torch.long)
    graph = trace(model, {"input_ids": ids}, output_fn=lambda out: out.logits)
    # VmHWM is this process's own peak: ru_maxrss can carry the forking parent's (pytest's) peak.
    try:
        hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
        peak_kib = int(hwm.split()[1])
    except (OSError, IndexError):
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"ops": len(graph.ops), "params": len(graph.parameters), "seconds": time.perf_counter() - start,
                      "peak_rss_mb": peak_kib / 1024}))
    """
)


def test_trace_llama3_8b_config_at_128k_tokens_is_fast_and_small():
    out = subprocess.run([sys.executable, "-c", _EIGHT_B], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    # 32 decoder layers of 55 ops, 11 for the rotary tables, 8 for the final norm, embedding, position
    # ids (3), the last-position slice and lm_head.
    assert stats["ops"] == 32 * 55 + 11 + 8 + 1 + 3 + 1 + 1, stats
    assert stats["params"] == 32 * 9 + 3
    assert stats["peak_rss_mb"] < 2048, stats
    assert stats["seconds"] < 60, stats



def test_param_dtype_applies_to_a_model_built_on_meta():
    # build_on_meta gives float32 meta parameters; traced under param_dtype=bfloat16 every
    # activation, and every cast the model makes to its activations' dtype (the rotary tables),
    # must be bf16, as the runtime will run it. Reading the fp32 meta parameter instead would
    # record fp32 casts and make attention see fp32 queries next to bf16 values.
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(mini_llama_config())
    ids = torch.randint(0, 128, (1, 8))
    graph = trace(model, {"input_ids": ids, "labels": ids.clone()}, param_dtype=torch.bfloat16)
    embedding = next(op for op in graph.ops if op.name == "torch.nn.functional.embedding")
    assert graph.tensors[embedding.output_ids()[0]].dtype == torch.bfloat16
    casts = [op.kwargs["dtype"] for op in graph.ops
             if op.name == "torch.Tensor.to" and "rotary_emb" in op.scope and "dtype" in op.kwargs]
    assert casts and torch.bfloat16 in casts and all(d in (torch.bfloat16, torch.float32) for d in casts)
    sdpa = [op for op in graph.ops if op.name.endswith("scaled_dot_product_attention")]
    assert sdpa and all({graph.tensors[t].dtype for t in op.input_ids()[:3]} == {torch.bfloat16} for op in sdpa)
