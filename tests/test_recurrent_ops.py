"""The recurrent ops (kernels/recurrent/) against their step-by-step definitions in float64, and against
Hugging Face's own PyTorch paths of the same layers.

Each definition below is the recurrence written one token at a time, independently of the chunked
form the ops compute; lengths are not multiples of the chunk so padding is exercised, and initial
states and final states are checked too. Splits of batch, heads and value channels are checked by
tests/test_op_rules.py's generic cases.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dimshard.kernels import recurrent
from dimshard.kernels.recurrent.chunked import chunked_recurrence, stepwise_recurrence

# Also on the oldest supported torch and transformers (.ci/run): the GPU image's pair.
pytestmark = pytest.mark.smoke

G = torch.Generator().manual_seed(0)
F64 = torch.float64


def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=G, dtype=F64)


def _rand(*shape: int) -> torch.Tensor:
    return torch.rand(*shape, generator=G, dtype=F64)


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("gate", [None, "head", "channel"])
@pytest.mark.parametrize("delta", [False, True])
def test_chunked_form_equals_the_token_by_token_recurrence(gate, delta):
    b, h, length, dk, dv = 2, 3, 37, 5, 4
    q, v = _randn(b, h, length, dk), _randn(b, h, length, dv)
    k = F.normalize(_randn(b, h, length, dk), dim=-1)
    g = None if gate is None else -_rand(b, h, length, *((dk,) if gate == "channel" else ()))
    beta = _rand(b, h, length) if delta else None
    start = _randn(b, h, dk, dv)
    for chunk in (1, 8, 64):
        out, state = chunked_recurrence(q, k, v, g, beta, start, chunk)
        want_out, want_state = stepwise_recurrence(q, k, v, g, beta, start)
        _close(out, want_out)
        _close(state, want_state)


def _delta_rule_steps(q, k, v, g, beta, scale, start):
    """S_t = exp(g_t) S_{t-1}; S_t += k_t (beta_t (v_t - S_t^T k_t))^T; o_t = S_t^T q_t * scale ([b, l, h, d] layout)."""
    state = start.clone()
    outs = []
    for t in range(q.shape[1]):
        if g is not None:
            decay = g[:, t].exp()
            state = state * (decay[..., None] if g.dim() == 4 else decay[..., None, None])
        k_t = k[:, t]
        error = v[:, t] - torch.einsum("bhk,bhkv->bhv", k_t, state)
        state = state + torch.einsum("bhk,bhv->bhkv", k_t, error * beta[:, t, :, None])
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, state))
    return torch.stack(outs, 1), state


@pytest.mark.parametrize("gate", [None, "head", "channel"])
def test_gated_delta_rule_matches_its_definition(gate):
    b, length, h, dk, dv = 2, 21, 3, 4, 5
    q, k, v = _randn(b, length, h, dk), _randn(b, length, h, dk), _randn(b, length, h, dv)
    g = None if gate is None else -_rand(b, length, h, *((dk,) if gate == "channel" else ()))
    beta, start = _rand(b, length, h), _randn(b, h, dk, dv)
    out, state = recurrent.gated_delta_rule(q, k, v, g, beta, start, use_qk_l2norm=True, chunk_size=8,
                                            output_final_state=True)
    norm = lambda x: x / (x.pow(2).sum(-1, keepdim=True) + 1e-6).sqrt()  # noqa: E731
    want_out, want_state = _delta_rule_steps(norm(q), norm(k), v, g, beta, dk ** -0.5, start)
    _close(out, want_out)
    _close(state, want_state)


def test_gated_linear_attention_matches_its_definition():
    b, length, h, dk, dv = 2, 19, 2, 4, 3
    q, k, v, g = _randn(b, length, h, dk), _randn(b, length, h, dk), _randn(b, length, h, dv), -_rand(b, length, h, dk)
    start = _randn(b, h, dk, dv)
    out, state = recurrent.gated_linear_attention(q, k, v, g, start, scale=0.7, chunk_size=4, output_final_state=True)
    s, outs = start.clone(), []
    for t in range(length):
        s = s * g[:, t].exp()[..., None] + torch.einsum("bhk,bhv->bhkv", k[:, t], v[:, t])
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * 0.7, s))
    _close(out, torch.stack(outs, 1))
    _close(state, s)


def test_state_space_dual_matches_its_definition():
    b, length, h, p, groups, n = 2, 23, 4, 3, 2, 5
    x, dt, B, C = _randn(b, length, h, p), _randn(b, length, h), _randn(b, length, groups, n), _randn(b, length, groups, n)
    A, D, dt_bias, start = -_rand(h) - 0.1, _randn(h), _randn(h), _randn(b, h, p, n)
    limit = (0.05, 2.0)
    y, state = recurrent.state_space_dual(x, dt, A, B, C, D, dt_bias, start, chunk_size=8, dt_softplus=True,
                                          dt_limit=limit, output_final_state=True)
    steps = F.softplus(dt + dt_bias).clamp(*limit)
    heads_of = torch.arange(h) // (h // groups)
    s, outs = start.clone(), []
    for t in range(length):
        Bt, Ct = B[:, t, heads_of], C[:, t, heads_of]  # [b, h, n]
        s = s * (steps[:, t] * A).exp()[..., None, None] + torch.einsum("bhp,bhn->bhpn", x[:, t] * steps[:, t, :, None], Bt)
        outs.append(torch.einsum("bhpn,bhn->bhp", s, Ct) + D[:, None] * x[:, t])
    _close(y, torch.stack(outs, 1))
    _close(state, s)


def test_selective_scan_matches_its_definition():
    b, d, length, n = 2, 3, 22, 4
    u, delta, z, B, C = _randn(b, d, length), _randn(b, d, length), _randn(b, d, length), _randn(b, n, length), _randn(b, n, length)
    A, D, bias, start = -_rand(d, n) - 0.1, _randn(d), _randn(d), _randn(b, d, n)
    y, state = recurrent.selective_scan(u, delta, A, B, C, D, z, bias, start, delta_softplus=True, chunk_size=8,
                                        output_final_state=True)
    steps = F.softplus(delta + bias[:, None])
    s, outs = start.clone(), []
    for t in range(length):
        s = (steps[:, :, t, None] * A).exp() * s + (steps[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        outs.append((s * C[:, None, :, t]).sum(-1) + D * u[:, :, t])
    _close(y, torch.stack(outs, -1) * F.silu(z))
    _close(state, s)


@pytest.mark.parametrize("activation", [None, "silu"])
def test_causal_conv1d_matches_its_definition(activation):
    b, d, length, k = 2, 3, 9, 4
    x, w, bias, start = _randn(b, d, length), _randn(d, k), _randn(d), _randn(b, d, k - 1)
    out = recurrent.causal_conv1d(x, w, bias, start, activation=activation)
    padded = torch.cat([start, x], -1)
    want = torch.stack([(padded[:, :, t:t + k] * w).sum(-1) + bias for t in range(length)], -1)
    _close(out, want if activation is None else F.silu(want))
    zero_start = recurrent.causal_conv1d(x, w, None)
    _close(zero_start, torch.stack([(F.pad(x, (k - 1, 0))[:, :, t:t + k] * w).sum(-1) for t in range(length)], -1))


def _close_fp32(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got.to(want.dtype), want, rtol=1e-4, atol=1e-5)


def test_ops_match_hugging_face_torch_paths():
    """The layers' own PyTorch functions in transformers compute what dimshard's ops compute (float64
    inputs; transformers computes the delta rule and Mamba2's scan in float32, hence fp32 tolerance)."""
    from transformers.models.mamba import modeling_mamba
    from transformers.models.mamba2 import modeling_mamba2
    from transformers.models.qwen3_next import modeling_qwen3_next

    b, length, h, dk, dv = 2, 70, 2, 8, 6
    q, k, v, g, beta = _randn(b, length, h, dk), _randn(b, length, h, dk), _randn(b, length, h, dv), -_rand(b, length, h), _rand(b, length, h)
    theirs, _ = modeling_qwen3_next.torch_chunk_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=True)
    _close_fp32(recurrent.gated_delta_rule(q, k, v, g, beta, use_qk_l2norm=True), theirs)
    # Twice as many value heads as query/key heads (Qwen3-Next), each key head serving two in a row.
    v2, g2, beta2 = _randn(b, length, 2 * h, dv), -_rand(b, length, 2 * h), _rand(b, length, 2 * h)
    q2, k2 = q.repeat_interleave(2, dim=2), k.repeat_interleave(2, dim=2)
    theirs, _ = modeling_qwen3_next.torch_chunk_gated_delta_rule(q2, k2, v2, g2, beta2, use_qk_l2norm_in_kernel=True)
    _close_fp32(recurrent.gated_delta_rule(q, k, v2, g2, beta2, use_qk_l2norm=True), theirs)

    x, dt, B, C = _randn(b, length, 4, 3), _randn(b, length, 4), _randn(b, length, 2, 5), _randn(b, length, 2, 5)
    A, D, dt_bias = -_rand(4) - 0.1, _randn(4), _randn(4)
    theirs = modeling_mamba2.mamba2_chunk_scan(x, dt, A, B, C, chunk_size=16, D=D, dt_bias=dt_bias, dt_softplus=True,
                                               dt_limit=(0.0, float("inf")))
    _close_fp32(recurrent.state_space_dual(x, dt, A, B, C, D, dt_bias, dt_softplus=True), theirs)

    u, delta, z, Bm, Cm = _randn(b, 3, length), _randn(b, 3, length), _randn(b, 3, length), _randn(b, 4, length), _randn(b, 4, length)
    Am, Dm, bias = -_rand(3, 4) - 0.1, _randn(3), _randn(3)
    theirs = modeling_mamba.mamba_selective_scan(u, delta, Am, Bm, Cm, D=Dm, z=z, delta_bias=bias, delta_softplus=True)
    _close_fp32(recurrent.selective_scan(u, delta, Am, Bm, Cm, Dm, z, bias, delta_softplus=True), theirs)

    xc, w, wb = _randn(b, 6, length), _randn(6, 4), _randn(6)
    _close_fp32(recurrent.causal_conv1d(xc, w, wb, activation="silu"),
           modeling_mamba2.causal_conv1d_fn(xc, w, wb, activation="silu"))


def test_gradients_flow_through_every_op():
    """Backward of the chunked forms against the step-by-step recurrence's (float64, autograd on both)."""
    b, h, length, dk, dv = 1, 2, 13, 3, 2
    leaves = [_randn(b, h, length, dk), F.normalize(_randn(b, h, length, dk), dim=-1), _randn(b, h, length, dv),
              -_rand(b, h, length, dk), _rand(b, h, length), _randn(b, h, dk, dv)]
    grads = []
    for fn in (lambda *a: chunked_recurrence(*a, chunk_size=4), stepwise_recurrence):
        inputs = [x.clone().requires_grad_(True) for x in leaves]
        out, state = fn(*inputs)
        (out.sin().sum() + state.cos().sum()).backward()
        grads.append([x.grad for x in inputs])
    for got, want in zip(*grads):
        _close(got, want)


def test_symbolic_calls_give_shapes_only():
    meta = lambda *s: torch.empty(*s, device="meta")  # noqa: E731
    out, state = recurrent.gated_delta_rule(meta(1, 8, 2, 4), meta(1, 8, 2, 4), meta(1, 8, 2, 3), meta(1, 8, 2),
                                            meta(1, 8, 2), output_final_state=True)
    assert out.shape == (1, 8, 2, 3) and state.shape == (1, 2, 4, 3)
    y = recurrent.state_space_dual(meta(1, 8, 4, 3), meta(1, 8, 4), meta(4), meta(1, 8, 2, 5), meta(1, 8, 2, 5))
    assert y.shape == (1, 8, 4, 3) and y.is_meta


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_dispatch_matches_the_reference():
    """On a GPU: whichever kernel each op picks (a verified fused kernel or the reference) matches the float32
    reference from the same bf16 inputs, forward and backward (benchmarks/recurrent_kernels.py times them)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from recurrent_kernels import _problems

    from dimshard.kernels.recurrent.backends import relative_error

    for name, (op, reference, inputs, _) in _problems(512, True, torch.device("cuda")).items():
        assert relative_error(op, reference, inputs) < 3e-2, name
