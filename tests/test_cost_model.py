"""The cost model on hand-computable cases: FLOPs, collective times, parameter state, memory and recompute."""

from __future__ import annotations

import pytest
import torch
from parallel_harness import mini_llama_config

from dimshard.planner import trace
from dimshard.planner.cost.hardware import HardwareProfile, load_hw_profile, shipped_profiles
from dimshard.planner.cost.model import analyze, estimate
from dimshard.planner.cost.op_costs import op_cost, param_state, redistribution_cost
from dimshard.planner.plan.placements import PARTIAL, REPLICATE, Mesh, Plan, Shard
from dimshard.planner.plan.resolve import resolve_placements
from dimshard.planner.search.policies import POLICIES, PolicyContext

# Round numbers: 1 TFLOP/s for every matmul, 1 TB/s copies, 100 GB/s links, 10 us latency, no launch cost.
HW = HardwareProfile(
    name="round", matmul_tflops={"float32": 1.0}, attention_tflops={"float32": 0.5}, copy_gbps=1000.0,
    busbw_gbps={k: 100.0 for k in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")},
    alpha_us={k: 10.0 for k in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")},
)


class _Linear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(256, 512, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).sum()


def test_linear_flops_and_time_follow_shapes_and_splits():
    g = trace(_Linear(), {"x": torch.randn(4, 128, 256)})
    linear = next(op for op in g.ops if op.name == "torch.nn.functional.linear")
    one = Mesh(("tp",), (1,))
    rep = [(REPLICATE,)] * 2
    cost = op_cost(g, linear, rep, [(REPLICATE,)], one, HW)
    assert cost.flops == 2 * (4 * 128) * 512 * 256  # 2*m*n*k
    assert cost.forward_s == pytest.approx(cost.flops / 1e12)  # compute bound at 1 TFLOP/s
    assert cost.backward_s == pytest.approx(2 * cost.forward_s)
    # Column-parallel over 4 ranks: each rank does a quarter of the work.
    four = Mesh(("tp",), (4,))
    split = op_cost(g, linear, [(REPLICATE,), (Shard(0),)], [(Shard(2),)], four, HW)
    assert split.flops == cost.flops / 4


def test_collective_time_is_alpha_plus_step_bytes_over_bus_bandwidth():
    mesh = Mesh(("tp",), (4,))
    shape = (1024, 256)  # fp32: 1 MiB in full
    full = 1024 * 256 * 4
    reduce = redistribution_cost(shape, 4, (PARTIAL,), (REPLICATE,), mesh, HW, backward=True)
    ((kind, axis, nbytes, seconds),) = reduce.forward
    assert (kind, axis) == ("all_reduce", 0)
    assert nbytes == 2 * full * 3 / 4
    assert seconds == pytest.approx(10e-6 + nbytes / 100e9)
    assert [s[0] for s in reduce.backward] == ["all_reduce"]
    gather = redistribution_cost(shape, 4, (Shard(0),), (REPLICATE,), mesh, HW, backward=True)
    assert gather.forward[0][:3] == ("all_gather", 0, full / 4 * 3)
    assert gather.backward[0][:3] == ("reduce_scatter", 0, full / 4 * 3)  # the gradient moves the same bytes
    sliced = redistribution_cost(shape, 4, (REPLICATE,), (Shard(1),), mesh, HW, backward=True)
    assert sliced.forward == () and sliced.backward == ()  # a local slice; its gradient is zero-padded locally
    assert HW.collective_seconds("all_gather", 1e6, 1) == 0.0


def test_sdpa_causal_flops():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    ids = torch.randint(0, 128, (2, 16))
    g = trace(LlamaForCausalLM(mini_llama_config()), {"input_ids": ids, "labels": ids.clone()})
    sdpa = next(op for op in g.ops if op.name.endswith("scaled_dot_product_attention"))
    one = Mesh(("tp",), (1,))
    cost = op_cost(g, sdpa, [(REPLICATE,)] * 3, [(REPLICATE,)], one, HW)
    b, h, s, d = 2, 8, 16, 8
    assert cost.flops == 4 * b * h * s * s * d / 2  # causal: half of 4*b*h*l*s*d
    assert cost.forward_s == pytest.approx(cost.flops / 0.5e12)


def test_parameter_state_bytes_and_zero():
    bf16 = param_state(1000, torch.bfloat16, holders=1, hw=HW)
    # fp32 master + 2 moments; one holder and one micro-batch: the gradient keeps the bf16 dtype
    assert (bf16.parameters, bf16.gradients, bf16.optimizer) == (2000, 2000, 12000)
    assert param_state(1000, torch.bfloat16, 1, HW, accumulation=2).gradients == 4000  # summed: fp32
    assert param_state(1000, torch.bfloat16, 2, HW).gradients == 4000  # reduced over holders: fp32
    assert param_state(1000, torch.bfloat16, 1, HW, dp_size=2).gradients == 4000  # averaged over copies: fp32
    assert param_state(1000, torch.float32, 1, HW).gradients == 4000
    assert param_state(1000, torch.bfloat16, 1, HW, dp_size=2).optimizer == 6000  # ZeRO-1 halves it
    assert param_state(1000, torch.bfloat16, 1, HW, dp_size=2, zero=False).optimizer == 12000
    assert param_state(1000, torch.float32, 1, HW).optimizer == 8000  # an fp32 parameter is its own master
    assert bf16.sync_s == 0.0 and param_state(1000, torch.float32, 2, HW).sync_s > 0  # replicas all-reduce


@pytest.fixture(scope="module")
def mini():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    ids = torch.randint(0, 128, (4, 16))
    return trace(LlamaForCausalLM(mini_llama_config()), {"input_ids": ids, "labels": ids.clone()})


def test_estimate_memory_categories_and_recompute(mini):
    n_params = sum(mini.tensors[t].numel for t in mini.parameters.values())
    plan = POLICIES["dp"](mini, PolicyContext(1))
    analysis = analyze(mini, resolve_placements(mini, plan), HW)
    plain = analysis.estimate([])
    assert plain.memory["parameters"] == 4 * n_params and plain.memory["gradients"] == 4 * n_params
    assert plain.memory["optimizer"] == 8 * n_params
    assert plain.comm_s == 0 and plain.grad_sync_s == 0
    layers = ["model.layers.0", "model.layers.1"]
    recomputed = analysis.estimate(layers)
    assert recomputed.memory["activations"] < plain.memory["activations"]
    assert recomputed.peak_bytes < plain.peak_bytes
    # Recompute costs exactly one more forward of each recomputed layer.
    forward = sum(analysis.regions[s].forward_compute_s for s in layers)
    assert recomputed.compute_s == pytest.approx(plain.compute_s + forward)
    assert estimate(mini, resolve_placements(mini, Plan(plan.mesh, {}, layers, "dp")), HW).peak_bytes == \
        recomputed.peak_bytes


def test_selective_recompute_of_mlps_and_whole_layers_over_nested_regions(mini):
    resolved = resolve_placements(mini, POLICIES["tp_sp"](mini, PolicyContext(2)))
    layers = ["model.layers.0", "model.layers.1"]
    mlps = [f"{layer}.mlp" for layer in layers]
    flat = analyze(mini, resolved, HW, regions=layers)
    nested = analyze(mini, resolved, HW, regions=layers + mlps)  # MLP ops land in the MLP regions
    assert nested.regions["model.layers.0.mlp"].forward_flops > 0
    for choice in ([], layers[:1], layers):
        # A layer recomputed whole keeps its input only, however finely it was analysed.
        a, b = flat.estimate(choice), nested.estimate(choice)
        assert (a.compute_s, a.comm_s) == pytest.approx((b.compute_s, b.comm_s))
        assert a.memory.keys() == b.memory.keys()
        assert a.memory == pytest.approx(b.memory)
    none, whole, mlp_only = nested.estimate([]), nested.estimate(layers), nested.estimate(mlps)
    # The MLPs alone: less memory than no recompute, less extra time than whole layers.
    assert mlp_only.memory["activations"] < none.memory["activations"]
    assert none.compute_s < mlp_only.compute_s < whole.compute_s
    assert mlp_only.compute_s == pytest.approx(none.compute_s + sum(nested.regions[m].forward_compute_s for m in mlps))
    # A scope inside a recomputed scope adds nothing (the outer checkpoint holds it, as in codegen).
    assert nested.estimate(layers + mlps).compute_s == pytest.approx(whole.compute_s)
    mixed = nested.estimate(layers[:1] + mlps[1:])
    assert whole.compute_s > mixed.compute_s > none.compute_s


def test_auto_searches_selective_recompute(mini):
    from dimshard.planner.search.auto import _recompute_choices

    choices = _recompute_choices(mini, "auto")
    assert ["model.layers.0", "model.layers.1.mlp"] in choices and ["model.layers.0.mlp", "model.layers.1.mlp"] in choices
    assert len(choices) == 2 * 2 + 1


def test_tensor_parallel_estimate_counts_its_all_reduces(mini):
    plan = POLICIES["tp"](mini, PolicyContext(2))
    est = estimate(mini, resolve_placements(mini, plan), HW)
    forward_all_reduces = [c for c in est.collectives if c.kind == "all_reduce" and c.phase == "forward"]
    assert len(forward_all_reduces) >= 4  # after o_proj and down_proj of each of 2 layers
    assert est.comm_s == pytest.approx(sum(c.seconds for c in est.collectives), rel=1e-6, abs=1e-5)
    assert est.memory["parameters"] < estimate(mini, resolve_placements(mini, POLICIES["dp"](
        mini, PolicyContext(1))), HW).memory["parameters"]


class _BiasedLinear(torch.nn.Module):
    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(256, 512, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).sum()


def test_a_row_split_bias_is_priced_as_zeros_written_on_the_other_ranks():
    import dataclasses

    hw = dataclasses.replace(HW, kernel_launch_us=5.0)
    mesh = Mesh(("tp",), (2,))
    fill = 512 * 4 / 1e12 + 5e-6  # the zeros (or their gradient) of a 512-float bias, plus a launch
    made_partial = redistribution_cost((512,), 4, (REPLICATE,), (PARTIAL,), mesh, hw, backward=True)
    assert made_partial.forward == (("replicate_to_partial", 0, 0.0, pytest.approx(fill)),)
    assert made_partial.backward == made_partial.forward
    comm = {}
    for bias in (True, False):
        g = trace(_BiasedLinear(bias), {"x": torch.randn(4, 128, 256)})
        linear = next(op for op in g.ops if op.name == "torch.nn.functional.linear")
        est = estimate(g, resolve_placements(g, Plan(mesh, {linear.index: ("k",)})), hw)
        assert [c.kind for c in est.collectives].count("all_reduce") == 2  # the Partial output, forward and backward
        comm[bias] = est.comm_s
    assert comm[True] - comm[False] == pytest.approx(2 * fill)


def test_shipped_profiles_load_and_mark_estimates():
    assert {"h100", "h200", "cpu"} <= set(shipped_profiles())
    h200, h100 = load_hw_profile("h200"), load_hw_profile("h100")
    assert h200.matmul_tflops["bfloat16"] == 791 and h200.copy_gbps == 3940
    assert h200.attention_tflops["bfloat16"] == pytest.approx(553 * 6 / 7, abs=1)  # backward counted as 2x
    # Bus bandwidth per group size: 345 GB/s all-reduce over 8 GPUs, the nearest size for 6.
    alpha = h200.alpha_us["all_reduce"] * 1e-6
    assert h200.collective_seconds("all_reduce", 345e9, 8) == pytest.approx(1 + alpha)
    assert h200.collective_seconds("all_reduce", 345e9, 6) == pytest.approx(1 + alpha)
    assert h200.collective_seconds("all_reduce", 299.1e9, 2) == pytest.approx(1 + alpha)
    assert abs(h100.copy_gbps - 3000) < 100 and "busbw_gbps" in h100.estimated  # measured on an H100
    with pytest.raises(ValueError, match="no hardware profile 'tpu'"):
        load_hw_profile("tpu")


def test_profile_hw_needs_a_gpu_and_documents_its_flags():
    import subprocess
    import sys

    help_text = subprocess.run([sys.executable, "-m", "dimshard.planner.cost.profile_hw", "--help"], check=True,
                               capture_output=True, text=True).stdout
    for flag in ("--output", "--matmul_size", "--attention_seq_len", "--collective_mb", "--base"):
        assert flag in help_text
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the refusal path does not apply")
    run = subprocess.run([sys.executable, "-m", "dimshard.planner.cost.profile_hw", "--output", "unused.json"],
                         capture_output=True, text=True)
    assert run.returncode != 0 and "no CUDA device is visible" in run.stderr


def test_a_collective_no_profile_has_measured_is_priced_like_the_kind_it_names(monkeypatch):
    import dataclasses
    import json

    from dimshard.planner.cost import hardware
    from dimshard.planner.plan import collectives

    # A new communicating kind: an entry and its runtime function are all it takes (docs/design.md,
    # "Adding a collective"); shipped profiles price it like the kind it names until measured.
    new = dataclasses.replace(collectives.COLLECTIVES_TABLE["all_gather"], kind="new_gather", priced_like="all_gather")
    monkeypatch.setitem(collectives.COLLECTIVES_TABLE, "new_gather", new)
    monkeypatch.setattr(hardware, "COLLECTIVES", (*hardware.COLLECTIVES, "new_gather"))
    data = json.loads((hardware.PROFILE_DIR / "h100.json").read_text())
    hw = HardwareProfile.from_dict(data)
    assert hw.collective_seconds("new_gather", 1e8, 8) == hw.collective_seconds("all_gather", 1e8, 8) > 0
    monkeypatch.setitem(collectives.COLLECTIVES_TABLE, "new_gather", dataclasses.replace(new, priced_like=None))
    with pytest.raises(ValueError, match="busbw_gbps has no 'new_gather'"):
        HardwareProfile.from_dict(data)


class _SwiGLUMLP(torch.nn.Module):
    def __init__(self, d: int, f: int) -> None:
        super().__init__()
        self.gate = torch.nn.Linear(d, f, bias=False)
        self.up = torch.nn.Linear(d, f, bias=False)
        self.down = torch.nn.Linear(f, d, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        from dimshard.kernels import swiglu

        return self.down(swiglu(self.gate(h), self.up(h)))


class _GatedMLP(torch.nn.Module):
    """h = x + bias, then a SwiGLU MLP of width f under the scope ``mlp``: the backward is hand-countable."""

    def __init__(self, d: int, f: int, residual: bool = False) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(d))
        self.mlp = _SwiGLUMLP(d, f)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.bias
        return (h + self.mlp(h)).sum() if self.residual else self.mlp(h).sum()


def test_the_backward_sweep_frees_what_each_backward_is_done_with():
    # Tokens t, width d, MLP width f >> d, fp32: every [t, f] tensor is 4*t*f bytes.
    t, d, f = 64, 8, 1024
    wide = 4 * t * f
    graph = trace(_GatedMLP(d, f), {"x": torch.randn(t, d)}, output_fn=lambda out: out)
    resolved = resolve_placements(graph, POLICIES["dp"](graph, PolicyContext(1)))
    analysis = analyze(graph, resolved, HW, regions=["mlp"])
    # Recomputed: the MLP brings back gate, up and SwiGLU's output (its input h is kept anyway, not
    # counted twice) while the down projection runs backward, its working set the gradients of its
    # input and output. (SwiGLU's own backward holds less: its output was freed by the down
    # projection's backward, and it writes the gradients of gate and up into their storage.)
    recomputed = analysis.estimate(["mlp"])
    assert recomputed.peak_phase == "recomputing mlp"
    assert recomputed.memory["recompute"] == 3 * wide
    assert recomputed.memory["working"] == wide + 4 * t * d
    assert recomputed.memory["activations"] == 4 * t * d  # h, the checkpoint's input
    # Not recomputed: the same moment, with gate, up and SwiGLU's output kept from the forward.
    plain = analysis.estimate([])
    assert plain.memory["activations"] == 4 * t * d + 3 * wide and plain.memory["working"] == wide + 4 * t * d
    assert plain.peak_bytes == recomputed.peak_bytes
    # With a residual h + mlp(h), h's gradient (from the addition's backward) is alive meanwhile.
    graph = trace(_GatedMLP(d, f, residual=True), {"x": torch.randn(t, d)}, output_fn=lambda out: out)
    resolved = resolve_placements(graph, POLICIES["dp"](graph, PolicyContext(1)))
    with_residual = analyze(graph, resolved, HW, regions=["mlp"]).estimate(["mlp"])
    assert with_residual.memory["activations"] == recomputed.memory["activations"] + 4 * t * d


class _AttentionOut(torch.nn.Module):
    """Attention whose output is read back the Hugging Face way: ``transpose(1, 2).contiguous()`` into o_proj."""

    def __init__(self, heads: int, e: int) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(heads * e, 3 * heads * e, bias=False)
        self.o_proj = torch.nn.Linear(heads * e, heads * e, bias=False)
        self.heads, self.e = heads, e

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        y = self.qkv(x).view(b, n, 3 * self.heads, self.e).transpose(1, 2)
        q, k, v = y[:, :self.heads], y[:, self.heads:2 * self.heads], y[:, 2 * self.heads:]
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).contiguous().view(b, n, -1)).sum()


def test_kept_views_hold_their_base_once():
    # The attention output (kept by attention's backward) and its contiguous transpose (kept by
    # o_proj) are one storage: attention kernels write it sequence-major. q, k and v are views of
    # one qkv product: it is kept once, whole.
    b, n, heads, e = 2, 32, 4, 8
    graph = trace(_AttentionOut(heads, e), {"x": torch.randn(b, n, heads * e)}, output_fn=lambda out: out)
    resolved = resolve_placements(graph, POLICIES["dp"](graph, PolicyContext(1)))
    kept = analyze(graph, resolved, HW, regions=[]).estimate([])
    one = 4 * b * n * heads * e
    assert kept.memory["activations"] == one + 3 * one + one  # x, qkv whole, attention output
