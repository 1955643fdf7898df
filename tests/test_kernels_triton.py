"""The Triton kernels themselves, run on the CPU through Triton's interpreter (TRITON_INTERPRET=1).

Each op module is told to take its Triton path for CPU tensors, so the same autograd Functions
that run on the GPU run here on small shapes. The interpreter must be on before Triton is first
imported (Triton's own library functions are built at import), so unless this pytest process
already runs with TRITON_INTERPRET=1, the one test collected here re-runs this file in a fresh
process that does. Needs ``triton`` >= 3.9 (the 3.6 interpreter fails on loops with run-time
bounds under NumPy 2.4); skipped otherwise.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton", minversion="3.9")

from dimshard.kernels import (  # noqa: E402
    apply_rotary,
    apply_rotary_reference,
    chunk_linear_cross_entropy,
    chunk_linear_cross_entropy_reference,
    rms_norm,
    rms_norm_reference,
    swiglu,
)

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_OP_MODULES = ["rms_norm", "swiglu", "rotary", "chunk_linear_cross_entropy"]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def test_kernels_under_interpreter():
    if INTERPRETED:
        pytest.skip("already inside the interpreted run")
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]


@pytest.fixture(autouse=True)
def triton_on_cpu(request, monkeypatch):
    if request.node.name == "test_kernels_under_interpreter":
        return
    if not INTERPRETED:
        pytest.skip("runs in the TRITON_INTERPRET=1 subprocess")
    for name in _OP_MODULES:
        monkeypatch.setattr(sys.modules[f"dimshard.kernels.{name}"], "use_triton", lambda *tensors: True)


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def _check(fn, ref_fn, inputs, grad_outs, dtype):
    ours_in = [x.detach().requires_grad_() for x in inputs]
    ref_in = [x.detach().double().requires_grad_() for x in inputs]
    ours, ref = fn(*ours_in), ref_fn(*ref_in)
    ours = ours if isinstance(ours, tuple) else (ours,)
    ref = ref if isinstance(ref, tuple) else (ref,)
    for o, r in zip(ours, ref):
        assert o.shape == r.shape
        assert _relative_error(o, r) < TOLERANCE[dtype]
    grads = torch.autograd.grad(ours, ours_in, grad_outs)
    ref_grads = torch.autograd.grad(ref, ref_in, [g.double() for g in grad_outs])
    for g, r in zip(grads, ref_grads):
        assert _relative_error(g, r) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_kernel(dtype):
    # 11 rows over 4 programs: the backward's row loop runs past the end on the last program.
    x = torch.randn(11, 40, dtype=dtype) * 2
    w = torch.randn(40, dtype=dtype)
    _check(lambda a, b: rms_norm(a, b, 1e-6), lambda a, b: rms_norm_reference(a, b, 1e-6), [x, w],
           [torch.randn(11, 40, dtype=dtype)], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_kernel(dtype):
    gate, up = torch.randn(3, 1500, dtype=dtype), torch.randn(3, 1500, dtype=dtype)
    _check(swiglu, lambda g, u: F.silu(g) * u, [gate, up], [torch.randn(3, 1500, dtype=dtype)], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_kernel_writes_gradients_in_place(dtype):
    gate, up = torch.randn(3, 1500, dtype=dtype), torch.randn(3, 1500, dtype=dtype)
    grad = torch.randn(3, 1500, dtype=dtype)
    leaves = [gate.clone().requires_grad_(), up.clone().requires_grad_()]
    expected = torch.autograd.grad(swiglu(*leaves), leaves, grad)
    inputs = [gate.clone().requires_grad_() * 1, up.clone().requires_grad_() * 1]
    out = swiglu(*inputs, inplace_grads=True)
    assert type(out.grad_fn).__name__ == "_SwiGLUFunctionBackward"
    grads = torch.autograd.grad(out, inputs, grad)
    for got, want, storage in zip(grads, expected, inputs):
        assert torch.equal(got, want) and got.data_ptr() == storage.data_ptr()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_kernel(dtype):
    # Transposed q/k views, 3 query heads per key head, head dim with a non-power-of-two half.
    q = torch.randn(2, 5, 6, 24, dtype=dtype).transpose(1, 2)
    k = torch.randn(2, 5, 2, 24, dtype=dtype).transpose(1, 2)
    cos, sin = torch.randn(1, 5, 24, dtype=dtype), torch.randn(1, 5, 24, dtype=dtype)
    grads = [torch.randn(q.shape, dtype=dtype), torch.randn(k.shape, dtype=dtype)]
    _check(lambda a, b: apply_rotary(a, b, cos, sin),
           lambda a, b: apply_rotary_reference(a, b, cos.double(), sin.double()), [q, k], grads, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunk_linear_cross_entropy_kernels(dtype):
    hidden = torch.randn(2, 9, 16, dtype=dtype)
    weight = (torch.randn(50, 16) / 4).to(dtype)
    labels = torch.randint(0, 50, (2, 9))
    labels[0, :2] = -100
    grad = torch.randn(2, 9)
    _check(lambda h, w: chunk_linear_cross_entropy(h, w, labels, -100, chunk_size=5, vocab_splits=3),
           lambda h, w: chunk_linear_cross_entropy_reference(h, w, labels, -100), [hidden, weight], [grad], dtype)


def test_compensated_add_kernel():
    from dimshard.kernels.triton_kernels import cross_entropy as kernels

    gen = torch.Generator().manual_seed(0)
    hi = torch.randn(3000, generator=gen).to(torch.bfloat16)
    lo = torch.zeros(3000, dtype=torch.bfloat16)
    exact = hi.double()
    for _ in range(20):
        part = torch.randn(3000, generator=gen) * 0.01
        kernels.compensated_add_(hi, lo, part)
        exact += part.double()
    # hi + lo carries ~16 significant bits. (Whether hi alone is the correctly rounded sum is
    # checked on the GPU only: the interpreter truncates fp32 -> bf16 where the GPU rounds, so
    # there each step's residual loses up to 2^-16 of hi in the same direction: 20 steps, ~3e-4.)
    bound = 1e-3 if INTERPRETED else 2e-4
    assert (hi.double() + lo.double() - exact).abs().max() < bound * exact.abs().max()
