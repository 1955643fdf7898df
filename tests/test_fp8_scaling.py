"""FP8 scaling and casts (kernels/fp8/scaling.py) and fp8_linear (kernels/fp8/linear.py) against float64.

The reference rounds to e4m3fn / e5m2 by their definition (sign, exponent range, mantissa bits,
round half to even, subnormals), in float64, independently of torch's FP8 casts; the linear's
three products are checked per recipe against that quantisation done in float64, and the
emulated products against ``torch._scaled_mm`` where torch runs it on CPU.
"""

from __future__ import annotations

import pytest
import torch

from dimshard.kernels.fp8.linear import _Fp8LinearFunction, fp8_linear, shapes_fit_fp8
from dimshard.kernels.fp8.scaling import (
    E4M3,
    E5M2,
    RECIPES,
    amax,
    amax_to_scale,
    dequantize,
    quantize,
    recipe_named,
    saturated_cast,
)

# (largest finite value, smallest normal exponent, mantissa bits) of each FP8 format.
FORMATS = {E4M3: (448.0, -6, 3), E5M2: (57344.0, -14, 2)}


def round_to_fp8_reference(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 ``v`` clamped to the format's range and rounded to its nearest value (ties to even)."""
    largest, min_exp, mantissa = FORMATS[dtype]
    v = v.double().clamp(-largest, largest)
    exponent = torch.floor(torch.log2(v.abs().clamp(min=2.0**-60))).clamp(min=min_exp)
    step = torch.exp2(exponent - mantissa)
    return torch.round(v / step) * step


def scale_reference(x: torch.Tensor, dtype: torch.dtype, dim: int | None, power_of_2: bool) -> torch.Tensor:
    """float64 encode scale: fp8 max over max |x| (per slice along ``dim``), optionally a power of two below."""
    m = x.double().abs().amax() if dim is None else x.double().abs().amax(dim=dim, keepdim=True)
    scale = FORMATS[dtype][0] / m.clamp(min=1e-12)
    return torch.exp2(torch.floor(torch.log2(scale))) if power_of_2 else scale


def quantized_reference(x: torch.Tensor, dtype: torch.dtype, dim: int | None, power_of_2: bool) -> torch.Tensor:
    """``x`` after the FP8 round trip, in float64, with the float32-rounded scale the kernels use.

    The kernels multiply in float32 and then round to FP8, so the reference rounds the exact
    product (exact in float64) to float32 first: a product that float32 rounds onto an FP8 tie
    then rounds to even, as on the GPU.
    """
    scale = scale_reference(x, dtype, dim, power_of_2).float().double()
    return round_to_fp8_reference((x.double() * scale).float(), dtype) / scale


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_saturated_cast_rounds_like_the_format_definition(dtype):
    torch.manual_seed(0)
    largest = FORMATS[dtype][0]
    # Normal values of every magnitude, subnormals, exact zeros, values beyond the range both ways.
    x = torch.cat([torch.randn(4096) * 10.0 ** torch.randint(-6, 5, (4096,)).float(),
                   torch.tensor([0.0, -0.0, largest * 3, -largest * 3, largest, 2.0**-9, 2.0**-17])])
    scale = torch.tensor(1.0)  # a power of two: x * scale is exact, the cast alone rounds
    got = saturated_cast(x, scale, dtype).double()
    assert torch.equal(got, round_to_fp8_reference(x, dtype))
    assert got.abs().max() == largest  # saturated, never inf or NaN


@pytest.mark.parametrize("power_of_2", [False, True])
def test_scales_match_float64(power_of_2):
    torch.manual_seed(1)
    x = torch.randn(32, 48, dtype=torch.bfloat16) * 3
    for dim in (None, -1, 0):
        for dtype in (E4M3, E5M2):
            got = amax_to_scale(amax(x, dim), dtype, power_of_2).double()
            want = scale_reference(x, dtype, dim, power_of_2)
            assert got.shape == want.shape
            assert torch.allclose(got, want, rtol=2**-23, atol=0), (dim, dtype)
    # An all-zero tensor gets a finite scale and zero FP8 values.
    q, scale = quantize(torch.zeros(16, 16), E4M3)
    assert torch.isfinite(scale) and not q.float().any()


@pytest.mark.parametrize("dim", [None, -1, 0])
def test_quantize_round_trip_matches_float64(dim):
    torch.manual_seed(2)
    x = torch.randn(64, 32, dtype=torch.bfloat16) * torch.logspace(-3, 3, 32, dtype=torch.bfloat16)
    for dtype in (E4M3, E5M2):
        for power_of_2 in (False, True):
            q, scale = quantize(x, dtype, dim, power_of_2)
            assert q.dtype == dtype and scale.dtype == torch.float32
            got = dequantize(q, scale).double()
            want = quantized_reference(x, dtype, dim, power_of_2)
            assert torch.allclose(got, want, rtol=2**-21, atol=0), (dtype, power_of_2)  # float32 decode
            if not power_of_2:  # each scaled group reaches the format's largest value exactly
                peak = q.float().abs().amax() if dim is None else q.float().abs().amax(dim=dim)
                assert torch.all(peak == FORMATS[dtype][0])


def _linear_reference(x, w, g, recipe_name):
    """(y, dx, dw) of the recipe's FP8 products computed in float64 (module docstring of linear.py)."""
    recipe = recipe_named(recipe_name)
    fwd, grad = recipe.forward_dtype, recipe.gradient_dtype
    if recipe.rowwise:
        y = quantized_reference(x, fwd, -1, True) @ quantized_reference(w, fwd, -1, True).T
        dx = quantized_reference(g, grad, -1, True) @ quantized_reference(w, fwd, 0, True)
        if recipe.weight_gradient_fp8:
            dw = quantized_reference(g, grad, 0, True).T @ quantized_reference(x, fwd, 0, True)
        else:
            dw = g.double().T @ x.double()
    else:
        xq, wq, gq = (quantized_reference(t, d, None, False) for t, d in ((x, fwd), (w, fwd), (g, grad)))
        y, dx, dw = xq @ wq.T, gq @ wq, gq.T @ xq
    return y, dx, dw


def _run_linear(x, w, g, recipe_name, emulate=True):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = _Fp8LinearFunction.apply(x, w, RECIPES[recipe_name], (), (), (), emulate)
    y.backward(g)
    return y.detach(), x.grad, w.grad


@pytest.mark.parametrize("recipe_name", sorted(RECIPES))
def test_fp8_linear_matches_float64_quantisation(recipe_name):
    torch.manual_seed(3)
    x, w, g = torch.randn(2, 24, 32) * 2, torch.randn(48, 32) * 0.05, torch.randn(2, 24, 48) * 1e-3
    y, dx, dw = _run_linear(x, w, g, recipe_name)
    ry, rdx, rdw = _linear_reference(x.reshape(-1, 32), w, g.reshape(-1, 48), recipe_name)
    for got, want in ((y.reshape(-1, 48), ry), (dx.reshape(-1, 32), rdx), (dw, rdw)):
        assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6 * want.abs().max()), recipe_name
    # And FP8 stays close to the exact linear (e4m3 keeps 3 mantissa bits).
    exact = x @ w.T
    assert (y - exact).norm() / exact.norm() < 0.05
    assert y.dtype == x.dtype and dx.dtype == x.dtype and dw.dtype == w.dtype


@pytest.mark.parametrize("recipe_name", sorted(RECIPES))
def test_emulation_matches_torch_scaled_mm(recipe_name):
    """The arguments the GPU path builds (layouts, scale shapes, dtypes) run through torch._scaled_mm
    itself where torch implements it on CPU, and agree with the emulation."""
    torch.manual_seed(4)
    x, w, g = torch.randn(32, 64), torch.randn(48, 64) * 0.1, torch.randn(32, 48) * 1e-2
    try:
        real = _run_linear(x, w, g, recipe_name, emulate=False)
    except (RuntimeError, NotImplementedError) as error:  # torch builds without a CPU _scaled_mm
        pytest.skip(f"torch._scaled_mm does not run on CPU here: {str(error).splitlines()[0]}")
    emulated = _run_linear(x, w, g, recipe_name, emulate=True)
    for a, b in zip(real, emulated):
        # The GPU path returns rowwise products in bf16: compare at that precision.
        assert torch.allclose(a.float(), b.float(), rtol=1e-2 if RECIPES[recipe_name].rowwise else 1e-5,
                              atol=1e-2 * b.abs().max())


def test_fp8_linear_with_bias_and_shapes():
    torch.manual_seed(5)
    x, w, b = torch.randn(3, 16), torch.randn(32, 16), torch.randn(32)
    y = fp8_linear(x, w, b)
    assert torch.allclose(y - b, fp8_linear(x, w), atol=1e-6)
    assert shapes_fit_fp8(4096, 1024, 64) and not shapes_fit_fp8(4096, 1000, 64)
    with pytest.raises(ValueError, match="unknown FP8 recipe"):
        fp8_linear(x, w, recipe="blockwise")


def test_cast_layouts_and_the_compiled_cast():
    """Each layout holds the same values in the strides torch._scaled_mm takes; the one-kernel cast CUDA
    runs (torch.compile of the same function, compiled here for CPU) gives the eager values."""
    from dimshard.kernels.fp8 import scaling

    torch.manual_seed(6)
    x, scale = torch.randn(64, 48, dtype=torch.bfloat16) * 3, torch.tensor(17.3)
    row = saturated_cast(x, scale, E4M3)
    column = saturated_cast(x, scale, E4M3, "column")
    both = saturated_cast(x, scale, E4M3, "both")
    assert row.is_contiguous() and column.stride() == (1, 64) and both[1].stride() == (1, 64)
    for q in (column, *both):
        assert torch.equal(q.float(), row.float())
    compiled = torch.compile(scaling._cast, dynamic=True, fullgraph=True)
    for dtype in (E4M3, E5M2):
        limit = FORMATS[dtype][0]
        for layout in scaling.LAYOUTS:
            try:
                got = compiled(x, scale, limit, dtype, layout)
            except torch._dynamo.exc.BackendCompilerFailed as error:  # no C++ compiler for CPU kernels here
                pytest.skip(f"torch.compile cannot build CPU kernels here: {str(error).splitlines()[0]}")
            want = scaling._cast(x, scale, limit, dtype, layout)
            for a, b in zip(got if layout == "both" else [got], want if layout == "both" else [want]):
                assert a.shape == b.shape and torch.equal(a.float(), b.float()), (dtype, layout)
