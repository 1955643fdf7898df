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
