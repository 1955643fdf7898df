"""scaled_dot_product_attention against torch's sdpa: values and gradients, GQA, masks, the flash_attn path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dimshard.kernels import scaled_dot_product_attention
from dimshard.kernels.attention import flash_attn_applicable, flash_attn_sdpa


def _qkv(batch, heads, kv_heads, q_len, kv_len, dim, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, dim, generator=gen).to(device, dtype)
    k = torch.randn(batch, kv_heads, kv_len, dim, generator=gen).to(device, dtype)
    v = torch.randn(batch, kv_heads, kv_len, dim, generator=gen).to(device, dtype)
    return q, k, v


def _out_and_grads(fn, q, k, v, grad, **kwargs):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v, **kwargs)
    return (out, *torch.autograd.grad(out, (q, k, v), grad))


@pytest.mark.parametrize(
    "heads, kv_heads, q_len, kv_len, kwargs",
    [
        (4, 4, 9, 9, {"is_causal": True}),
        (8, 2, 12, 12, {"is_causal": True, "enable_gqa": True}),
        (4, 1, 5, 7, {"enable_gqa": True, "scale": 0.3}),
        (4, 4, 6, 6, {"attn_mask": "bool"}),
        (4, 2, 6, 8, {"attn_mask": "float", "enable_gqa": True}),
    ],
)
def test_equals_torch_sdpa_on_cpu(heads, kv_heads, q_len, kv_len, kwargs):
    q, k, v = _qkv(2, heads, kv_heads, q_len, kv_len, 16)
    if kwargs.get("attn_mask") == "bool":
        kwargs = dict(kwargs, attn_mask=torch.rand(q_len, kv_len) > 0.3)
        kwargs["attn_mask"][:, 0] = True  # no fully masked row
    elif kwargs.get("attn_mask") == "float":
        kwargs = dict(kwargs, attn_mask=torch.randn(2, 1, q_len, kv_len))
    grad = torch.randn(2, heads, q_len, 16)
    ours = _out_and_grads(scaled_dot_product_attention, q, k, v, grad, **kwargs)
    torch_ = _out_and_grads(F.scaled_dot_product_attention, q, k, v, grad, **kwargs)
    for a, b in zip(ours, torch_):
        assert torch.equal(a, b)


def _fake_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
    """flash_attn's calling convention ([b, l, h, d], GQA by head count), computed with torch."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p, is_causal=causal,
        scale=softmax_scale, enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)


@pytest.mark.parametrize("kv_heads, causal, scale", [(8, True, None), (2, True, 0.2), (4, False, None)])
def test_flash_attn_path_matches_torch_layout(kv_heads, causal, scale):
    q, k, v = _qkv(2, 8, kv_heads, 10, 10, 16)
    grad = torch.randn(2, 8, 10, 16)
    ours = _out_and_grads(lambda a, b, c: flash_attn_sdpa(_fake_flash_attn_func, a, b, c, 0.0, causal, scale),
                          q, k, v, grad)
    ref = _out_and_grads(F.scaled_dot_product_attention, q, k, v, grad, is_causal=causal, scale=scale,
                         enable_gqa=kv_heads != 8)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)


def test_flash_attn_applicability():
    bf16 = torch.bfloat16
    q, k, v = _qkv(1, 8, 2, 16, 16, 64, dtype=bf16)
    assert flash_attn_applicable(q, k, v, None, True, True)
    assert not flash_attn_applicable(q, k, v, None, True, False)  # torch would reject GQA without enable_gqa
    assert not flash_attn_applicable(q.float(), k.float(), v.float(), None, True, True)
    assert not flash_attn_applicable(q, k, v, torch.ones(16, 16, dtype=torch.bool), False, True)
    q_short, k_long, v_long = _qkv(1, 8, 2, 8, 16, 64, dtype=bf16)
    assert not flash_attn_applicable(q_short, k_long, v_long, None, True, True)  # causal corners differ
    assert flash_attn_applicable(q_short, k_long, v_long, None, False, True)
    q_odd, k_odd, v_odd = _qkv(1, 4, 4, 8, 8, 20, dtype=bf16)
    assert not flash_attn_applicable(q_odd, k_odd, v_odd, None, False, False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kv_heads", [32, 8])
def test_cuda_matches_math_reference(kv_heads):
    q, k, v = _qkv(1, 32, kv_heads, 1024, 1024, 128, dtype=torch.bfloat16, device="cuda")
    grad = torch.randn(1, 32, 1024, 128, device="cuda", dtype=torch.bfloat16)
    gqa = kv_heads != 32
    ours = _out_and_grads(scaled_dot_product_attention, q, k, v, grad, is_causal=True, enable_gqa=gqa)
    ref = _out_and_grads(F.scaled_dot_product_attention, q.double(), k.double(), v.double(), grad.double(),
                         is_causal=True, enable_gqa=gqa)
    for a, b in zip(ours, ref):
        assert a.dtype == torch.bfloat16
        assert ((a.double() - b).norm() / b.norm()).item() < 1e-2
