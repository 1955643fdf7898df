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


# --------------------------------------------------------------------------------------------
# dimshard's attention op: windows, soft-capping, document ids
# --------------------------------------------------------------------------------------------


def _dense_eager(q, k, v, scale, causal, window, softcap, document_ids):
    """Hugging Face eager attention with a dense additive mask and repeated K/V: the reference."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = q @ k.transpose(-1, -2) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    i = torch.arange(q.shape[2])[:, None]
    j = torch.arange(k.shape[2])[None, :]
    keep = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool)
    if causal:
        keep &= j <= i
    if window is not None:
        keep &= (i - j < window) & (j - i < window)
    keep = keep.expand(q.shape[0], -1, -1)
    if document_ids is not None:
        keep = keep & (document_ids[:, :, None] == document_ids[:, None, :])
    scores = scores + torch.zeros_like(scores).masked_fill(~keep[:, None], float("-inf"))
    return torch.softmax(scores, -1) @ v


@pytest.mark.parametrize(
    "kv_heads, causal, window, softcap, docs",
    [
        (2, True, None, None, False),
        (2, True, 3, None, False),
        (4, True, 4, 5.0, False),
        (1, True, None, 2.0, False),
        (2, True, None, None, True),
        (2, True, 5, 3.0, True),
        (4, False, 3, None, False),
        (2, True, 64, None, False),  # a window wider than the sequence is plain causal attention
    ],
)
def test_attention_op_matches_dense_eager(kv_heads, causal, window, softcap, docs):
    from dimshard.kernels.attention import attention

    q, k, v = _qkv(2, 4, kv_heads, 12, 12, 16, dtype=torch.float64)
    document_ids = torch.tensor([[0] * 5 + [1] * 4 + [2] * 3, [0] * 12]) if docs else None
    grad = torch.randn(2, 4, 12, 16, dtype=torch.float64)
    kwargs = dict(scale=0.3, causal=causal, window=window, softcap=softcap, document_ids=document_ids)
    ours = _out_and_grads(attention, q, k, v, grad, **kwargs)
    ref = _out_and_grads(lambda a, b, c: _dense_eager(a, b, c, 0.3, causal, window, softcap, document_ids),
                         q, k, v, grad)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)


def test_attention_op_plain_call_is_torch_sdpa():
    from dimshard.kernels.attention import attention

    q, k, v = _qkv(2, 8, 2, 10, 10, 16)
    out = attention(q, k, v, scale=None, causal=True)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))


def test_attention_op_rejects_bad_arguments():
    from dimshard.kernels.attention import attention

    q, k, v = _qkv(1, 6, 4, 8, 8, 16)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        attention(q, k, v)
    q, k, v = _qkv(1, 4, 2, 8, 8, 16)
    with pytest.raises(ValueError, match="document_ids must be"):
        attention(q, k, v, document_ids=torch.zeros(1, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="window"):
        attention(q, k, v, window=0)


def test_attention_op_is_one_traced_op_with_its_rule():
    from dimshard.kernels.attention import attention
    from dimshard.planner.ops.registry import OpCall, TensorMeta, get_rule

    rule = get_rule("dimshard.kernels.attention.attention")
    assert rule is not None and attention.__dimshard_op_name__ == "dimshard.kernels.attention.attention"
    meta = [TensorMeta((2, 8, 16, 32), torch.float32), TensorMeta((2, 2, 16, 32), torch.float32),
            TensorMeta((2, 2, 16, 32), torch.float32)]
    assert rule(OpCall("a", (), {}, meta, meta[:1])) == "b (h r^) l^ e^, b h s^ e^, b h s^ f^ -> b (h r^) l^ f^"
    docs = TensorMeta((2, 16), torch.long)
    assert rule(OpCall("a", (), {}, [meta[0], meta[0], meta[0], docs], meta[:1])).startswith(
        "b h l^ e^, b h s^ e^, b h s^ f^, b l^ ->")


@pytest.mark.parametrize("family", ["llama", "gemma2", "mistral"])
def test_hf_models_with_dimshard_attention_match_eager(family):
    """A whole HF model with attn_implementation="dimshard" equals its eager run (windows, soft-caps)."""
    import transformers

    import dimshard.kernels.hf_attention  # noqa: F401  (registers "dimshard")

    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=64, head_dim=8)
    configs = {
        "llama": lambda: transformers.LlamaConfig(**common),
        "gemma2": lambda: transformers.Gemma2Config(**common, sliding_window=5, attn_logit_softcapping=3.0,
                                                    final_logit_softcapping=None, query_pre_attn_scalar=8),
        "mistral": lambda: transformers.MistralConfig(**common, sliding_window=4),
    }
    torch.manual_seed(0)
    config = configs[family]()
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config).double()
    ids = torch.randint(0, 64, (2, 12))
    docs = torch.tensor([[0] * 7 + [1] * 5, [0] * 12])
    ref = model(input_ids=ids).logits
    model.set_attn_implementation("dimshard")
    torch.testing.assert_close(model(input_ids=ids).logits, ref)
    # Documents: each one alone through the eager model equals its slice of the packed run.
    packed = model(input_ids=ids, document_ids=docs, position_ids=torch.tensor([list(range(7)) + list(range(5)),
                                                                               list(range(12))])).logits
    model.set_attn_implementation("eager")
    torch.testing.assert_close(packed[0, 7:], model(input_ids=ids[:1, 7:]).logits[0])
    torch.testing.assert_close(packed[0, :7], model(input_ids=ids[:1, :7]).logits[0])


@pytest.mark.slow
@pytest.mark.parametrize("window, softcap, docs", [(None, 2.0, False), (7, None, False), (9, 3.0, True)])
def test_flex_attention_path_matches_reference(window, softcap, docs):
    """The GPU variant path (FlexAttention: block mask, score_mod), compiled on the CPU (forward only there)."""
    from dimshard.kernels.attention import _flex_attention, attention_reference

    q, k, v = _qkv(2, 4, 2, 128, 128, 16)
    document_ids = torch.cat([torch.zeros(2, 50, dtype=torch.long), torch.ones(2, 78, dtype=torch.long)], 1)
    document_ids = document_ids if docs else None
    ours = _flex_attention(q, k, v, 0.25, True, window, softcap, document_ids)
    ref = attention_reference(q, k, v, scale=0.25, causal=True, window=window, softcap=softcap,
                              document_ids=document_ids)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)
