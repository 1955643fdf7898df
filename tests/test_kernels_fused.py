"""rms_norm, swiglu and apply_rotary against Hugging Face / eager references: values and gradients.

On the CPU the public ops are the references themselves (checked bit for bit against Hugging
Face); on CUDA they run the Triton kernels, checked within rounding. The Triton kernels are also
run on the CPU through Triton's interpreter in test_kernels_triton.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from dimshard.kernels import apply_rotary, apply_rotary_reference, rms_norm, rms_norm_reference, swiglu

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# ||out - ref|| / ||ref||: fp32 arithmetic; bf16 results (the kernels round once where eager rounds
# after every op, so they differ from eager by up to a bf16 rounding of the intermediates).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def _check(fn, ref_fn, inputs, grad_outs, dtype):
    """Compare fn with ref_fn (run in fp64 on upcast copies): outputs and input gradients."""
    ours_in = [x.detach().requires_grad_(x.is_floating_point()) for x in inputs]
    ref_in = [x.detach().double().requires_grad_(x.is_floating_point()) for x in inputs]
    ours = fn(*ours_in)
    ref = ref_fn(*ref_in)
    ours = ours if isinstance(ours, tuple) else (ours,)
    ref = ref if isinstance(ref, tuple) else (ref,)
    for o, r in zip(ours, ref):
        assert o.dtype == dtype and o.shape == r.shape
        assert _relative_error(o, r) < TOLERANCE[dtype]
    wrt = [x for x in ours_in if x.requires_grad]
    ref_wrt = [x for x in ref_in if x.requires_grad]
    grads = torch.autograd.grad(ours, wrt, grad_outs)
    ref_grads = torch.autograd.grad(ref, ref_wrt, [g.double() for g in grad_outs])
    for g, r in zip(grads, ref_grads):
        assert _relative_error(g, r) < TOLERANCE[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 7, 64), (3, 100), (1, 5, 3, 48)])
def test_rms_norm(device, dtype, shape):
    x = torch.randn(shape, device=device, dtype=dtype) * 3
    w = torch.randn(shape[-1], device=device, dtype=dtype)
    _check(lambda a, b: rms_norm(a, b, 1e-6), lambda a, b: rms_norm_reference(a, b, 1e-6), [x, w],
           [torch.randn(shape, device=device, dtype=dtype)], dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_fp32_weight_promotes(device):
    x = torch.randn(4, 32, device=device, dtype=torch.bfloat16)
    w = torch.randn(32, device=device)
    out = rms_norm(x, w, 1e-5)
    ref = rms_norm_reference(x, w, 1e-5)
    assert out.dtype == torch.float32
    assert _relative_error(out, ref) < 1e-2


def test_rms_norm_equals_hugging_face_on_cpu():
    norm = LlamaRMSNorm(48, eps=1e-5).to(torch.bfloat16)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(2, 9, 48, dtype=torch.bfloat16)
    assert torch.equal(rms_norm(x, norm.weight, 1e-5), norm(x))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 7, 96), (5001,)])
def test_swiglu(device, dtype, shape):
    gate = torch.randn(shape, device=device, dtype=dtype) * 2
    up = torch.randn(shape, device=device, dtype=dtype)
    _check(swiglu, lambda g, u: F.silu(g) * u, [gate, up], [torch.randn(shape, device=device, dtype=dtype)], dtype)


def _rotary_inputs(batch, heads, kv_heads, length, head_dim, dtype, device, transposed, table_batch):
    if transposed:  # Hugging Face's layout: a [b, l, h, d] projection viewed as [b, h, l, d]
        q = torch.randn(batch, length, heads, head_dim, device=device, dtype=dtype).transpose(1, 2)
        k = torch.randn(batch, length, kv_heads, head_dim, device=device, dtype=dtype).transpose(1, 2)
    else:
        q = torch.randn(batch, heads, length, head_dim, device=device, dtype=dtype)
        k = torch.randn(batch, kv_heads, length, head_dim, device=device, dtype=dtype)
    angles = torch.randn(table_batch, length, head_dim // 2, device=device)
    angles = torch.cat([angles, angles], dim=-1)
    return q, k, angles.cos().to(dtype), angles.sin().to(dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "batch, heads, kv_heads, length, head_dim, transposed, table_batch",
    [(2, 4, 2, 9, 16, True, 1), (1, 3, 3, 5, 12, False, 1), (2, 8, 1, 6, 32, True, 2)],
)
def test_apply_rotary(device, dtype, batch, heads, kv_heads, length, head_dim, transposed, table_batch):
    q, k, cos, sin = _rotary_inputs(batch, heads, kv_heads, length, head_dim, dtype, device, transposed, table_batch)
    grads = [torch.randn(q.shape, device=device, dtype=dtype), torch.randn(k.shape, device=device, dtype=dtype)]
    _check(lambda a, b: apply_rotary(a, b, cos, sin), lambda a, b: apply_rotary_reference(a, b, cos.double(), sin.double()),
           [q, k], grads, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_apply_rotary_general_tables(device):
    # Halves of cos/sin need not repeat: the kernel must use every entry (the backward especially).
    q, k, _, _ = _rotary_inputs(2, 4, 2, 9, 16, torch.float32, device, True, 1)
    cos, sin = torch.randn(2, 9, 16, device=device), torch.randn(2, 9, 16, device=device)
    grads = [torch.randn(q.shape, device=device), torch.randn(k.shape, device=device)]
    _check(lambda a, b: apply_rotary(a, b, cos, sin), lambda a, b: apply_rotary_reference(a, b, cos.double(), sin.double()),
           [q, k], grads, torch.float32)


def test_apply_rotary_equals_hugging_face_on_cpu():
    q, k, cos, sin = _rotary_inputs(2, 4, 2, 9, 16, torch.bfloat16, "cpu", True, 1)
    ours = apply_rotary(q, k, cos, sin)
    theirs = apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_takes_the_fused_kernels():
    x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    assert type(rms_norm(x, w).grad_fn).__name__ == "_RMSNormFunctionBackward"
    assert type(swiglu(x, x).grad_fn).__name__ == "_SwiGLUFunctionBackward"
    q, k, cos, sin = _rotary_inputs(1, 4, 2, 8, 16, torch.bfloat16, "cuda", True, 1)
    q.requires_grad_()
    assert type(apply_rotary(q, k, cos, sin)[0].grad_fn).__name__ == "_RotaryFunctionBackward"


# --- in-place input gradients (SwiGLU) --------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_inplace_grads_equal_out_of_place_and_land_in_the_inputs(device, dtype):
    # gate and up are computed (not leaves), as in the MLP where the projections produce them.
    gate0 = torch.randn(3, 7, 96, device=device, dtype=dtype) * 2
    up0 = torch.randn_like(gate0)
    grad = torch.randn_like(gate0)
    leaves = [gate0.clone().requires_grad_(), up0.clone().requires_grad_()]
    out = swiglu(leaves[0] * 1, leaves[1] * 1)
    expected = torch.autograd.grad(out, leaves, grad)
    leaves = [gate0.clone().requires_grad_(), up0.clone().requires_grad_()]
    gate, up = leaves[0] * 1, leaves[1] * 1
    out_in_place = swiglu(gate, up, inplace_grads=True)
    *grads, leaf_gate, leaf_up = torch.autograd.grad(out_in_place, [gate, up, *leaves], grad)
    assert torch.equal(out_in_place, out)
    # Same kernel (or the same reference ops) either way: equal bit for bit, written into gate and up.
    for got, want, storage in zip(grads, expected, (gate, up)):
        assert torch.equal(got, want)
        assert got.data_ptr() == storage.data_ptr() and torch.equal(storage.detach(), want)
    # Through the rest of the graph (gate = leaf * 1): the leaves' gradients are the same too.
    assert torch.equal(leaf_gate, expected[0]) and torch.equal(leaf_up, expected[1])
    # One tensor as both inputs: the flag cannot apply (one gradient would overwrite the other).
    x, y = gate0.clone().requires_grad_(), gate0.clone().requires_grad_()
    (dx,) = torch.autograd.grad(swiglu(x * 1, x * 1), [x], grad)
    h = y * 1
    (dy,) = torch.autograd.grad(swiglu(h, h, inplace_grads=True), [y], grad)
    assert torch.equal(dx, dy)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_swiglu_inplace_triton_backward_writes_into_the_inputs():
    gate = torch.randn(4096, 3584, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    up = torch.randn_like(gate, requires_grad=True)
    grad = torch.randn_like(gate)
    out = swiglu(gate, up)
    assert type(out.grad_fn).__name__ == "_SwiGLUFunctionBackward"
    expected = torch.autograd.grad(out, [gate, up], grad)
    g, u = gate.detach().clone().requires_grad_(), up.detach().clone().requires_grad_()
    g2, u2 = g.clone(), u.clone()  # non-leaf inputs, as the projections' outputs are
    out = swiglu(g2, u2, inplace_grads=True)
    assert type(out.grad_fn).__name__ == "_SwiGLUFunctionBackward"
    before = torch.cuda.memory_allocated()
    grads = torch.autograd.grad(out, [g2, u2], grad)
    assert torch.cuda.memory_allocated() <= before  # nothing new: the gradients live in gate and up
    for got, want, storage in zip(grads, expected, (g2, u2)):
        assert torch.equal(got, want) and got.data_ptr() == storage.data_ptr()


class _MLP(torch.nn.Module):
    """A SwiGLU MLP over tokens; ``gate_elsewhere`` also reads gate outside it, ``fused_projection`` takes
    gate and up as halves (views) of one projection."""

    def __init__(self, d: int, f: int, gate_elsewhere: bool = False, fused_projection: bool = False) -> None:
        super().__init__()
        self.gate_up = torch.nn.Linear(d, 2 * f, bias=False)
        self.gate = torch.nn.Linear(d, f, bias=False)
        self.up = torch.nn.Linear(d, f, bias=False)
        self.down = torch.nn.Linear(f, d, bias=False)
        self.gate_elsewhere, self.fused_projection = gate_elsewhere, fused_projection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_projection:
            gate, up = self.gate_up(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate(x), self.up(x)
        loss = self.down(swiglu(gate, up)).sum()
        return loss + (gate * gate).sum() if self.gate_elsewhere else loss


def _swiglu_ops(graph):
    return [op for op in graph.ops if op.name.endswith("swiglu")]


def _working_and_code(graph, plan_ngpus=1, policy="dp"):
    """Working bytes of the graph's SwiGLU ops, as estimated and with in-place gradients ruled out, and rank 0's code."""
    from dimshard.planner.codegen.rank_code import generate_rank_code
    from dimshard.planner.cost import op_costs
    from dimshard.planner.plan.resolve import resolve_placements
    from dimshard.planner.search.policies import POLICIES, PolicyContext

    resolved = resolve_placements(graph, POLICIES[policy](graph, PolicyContext(plan_ngpus)))
    mesh = resolved.plan.mesh

    def working() -> list[int]:
        return [op_costs.working_bytes(graph, op, resolved.op_inputs[op.index], resolved.op_outputs[op.index], mesh)
                for op in _swiglu_ops(graph)]

    estimated = working()
    real = op_costs.grads_written_in_place
    op_costs.grads_written_in_place = lambda graph, op: False
    try:
        out_of_place = working()
    finally:
        op_costs.grads_written_in_place = real
    return estimated, out_of_place, generate_rank_code(graph, resolved, 0)


def test_the_planner_writes_swiglu_gradients_in_place_only_where_nothing_else_reads_its_inputs():
    from dimshard.planner import trace
    from dimshard.planner.cost.op_costs import grads_written_in_place

    t, d, f = 32, 8, 48
    x = torch.randn(t, d)
    graph = trace(_MLP(d, f), {"x": x}, output_fn=lambda out: out)
    (op,) = _swiglu_ops(graph)
    assert grads_written_in_place(graph, op)
    estimated, out_of_place, code = _working_and_code(graph)
    # The working set loses exactly the gradients of gate and up: two [tokens, width] fp32 tensors.
    assert out_of_place[0] - estimated[0] == 2 * t * f * 4 and estimated[0] == t * f * 4
    assert "inplace_grads=True" in code
    for variant in (dict(gate_elsewhere=True), dict(fused_projection=True)):
        graph = trace(_MLP(d, f, **variant), {"x": x}, output_fn=lambda out: out)
        (op,) = _swiglu_ops(graph)
        assert not grads_written_in_place(graph, op), variant
        estimated, out_of_place, code = _working_and_code(graph)
        assert estimated == out_of_place and "inplace_grads" not in code


def test_the_llama_mlp_traced_with_fused_kernels_gets_in_place_gradients_under_tensor_parallelism():
    from parallel_harness import mini_llama_config
    from transformers import LlamaForCausalLM

    from dimshard.planner import trace
    from dimshard.planner.graph.fusion import fused_kernels

    torch.manual_seed(0)
    model = LlamaForCausalLM(mini_llama_config())
    ids = torch.randint(0, 128, (2, 16))
    with fused_kernels(model):
        graph = trace(model, {"input_ids": ids, "labels": ids.clone()})
    estimated, out_of_place, code = _working_and_code(graph, plan_ngpus=2, policy="tp")
    tokens, width = 2 * 16, 128 // 2  # the MLP width split over 2 ranks
    assert len(estimated) == 2 and code.count("inplace_grads=True") == 2
    assert all(o - e == 2 * tokens * width * 4 for o, e in zip(out_of_place, estimated))
