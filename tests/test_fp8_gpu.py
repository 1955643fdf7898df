"""fp8_linear on a GPU with FP8 GEMMs (skipped elsewhere): torch._scaled_mm against the emulation.

The GPU path (one compiled cast kernel, column-major copies, torch._scaled_mm with the recipe's
scale shapes) must give what the CPU-tested emulation gives on the same FP8 values, per recipe,
forward and both gradients, in bf16; fp8_linear itself runs the GEMM path with bf16 in and out.
"""

from __future__ import annotations

import pytest
import torch

from dimshard.kernels.fp8.linear import _Fp8LinearFunction, fp8_gemm_supported, fp8_linear
from dimshard.kernels.fp8.scaling import RECIPES

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or not fp8_gemm_supported(torch.device("cuda")),
    reason="needs a CUDA GPU with FP8 GEMMs (compute capability >= 8.9)")


def _run(x, w, g, recipe, emulate):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = _Fp8LinearFunction.apply(x, w, RECIPES[recipe], (), (), (), emulate)
    y.backward(g)
    return y.detach(), x.grad, w.grad


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_scaled_mm_matches_the_emulation(recipe):
    torch.manual_seed(0)
    dev = "cuda"
    x = torch.randn(2, 512, 1024, device=dev, dtype=torch.bfloat16)
    w = torch.randn(768, 1024, device=dev, dtype=torch.bfloat16) * 0.02
    g = torch.randn(2, 512, 768, device=dev, dtype=torch.bfloat16) * 1e-3
    real, emulated = _run(x, w, g, recipe, False), _run(x, w, g, recipe, True)
    for a, b, name in zip(real, emulated, ("y", "dx", "dw")):
        assert a.dtype == b.dtype == torch.bfloat16
        err = ((a.float() - b.float()).norm() / b.float().norm()).item()
        assert err < 1e-2, (recipe, name, err)  # the same FP8 values; sums in another order, rounded to bf16
    exact = x.float() @ w.float().T
    assert ((real[0].float() - exact).norm() / exact.norm()).item() < 0.06


def test_fp8_linear_runs_the_gemm_and_keeps_dtypes():
    torch.manual_seed(1)
    x = torch.randn(4096, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(4096, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = fp8_linear(x, w)
    y.sum().backward()
    assert y.dtype == x.grad.dtype == w.grad.dtype == torch.bfloat16
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()
