"""FP8 scaling: the recipes, amax, scales and the saturated cast (docs/design.md, "FP8").

A high-precision tensor ``x`` is carried to FP8 as ``q = saturate(x * scale)`` rounded to the FP8
dtype, with ``scale = fp8_max / amax`` (``amax`` the largest ``|x|`` over the scaled group of
elements). Matrix products take the inverse scale (``1 / scale``, the *decode* scale) per operand,
as ``torch._scaled_mm`` does: ``a @ b = (q_a @ q_b) * decode_a * decode_b``.

The recipes follow the dynamic-scaling float8 training recipes of the literature and torchao:

- ``tensorwise``: one scale per tensor; inputs and weights in e4m3, output gradients in e5m2
  (more range, less precision: gradients span more orders of magnitude);
- ``rowwise``: one scale per row of each operand along the contracted dim, every cast in e4m3,
  scales rounded down to powers of two (exact to invert, so rounding never compounds);
- ``rowwise_gw_hp``: ``rowwise`` for the output and the input gradient, the weight gradient in
  high precision (its accuracy matters most for the update).

Split tensors (tensor parallelism): a tensorwise scale is the whole tensor's, a rowwise scale the
whole row's, so ``amax`` is all-reduced (MAX) over every process group that splits the elements a
scale covers; ``groups`` below are those groups. The result then equals the unsplit op's exactly.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
# A floor for amax so an all-zero tensor gets a finite scale (its FP8 values are all zero anyway).
AMAX_FLOOR = 1e-12


@dataclass(frozen=True)
class Fp8Recipe:
    """How one FP8 linear scales and casts its operands (see the module docstring for the three recipes).

    ``rowwise``: one scale per row along the contracted dim (else one per tensor);
    ``gradient_dtype``: the FP8 dtype of the output gradient; ``power_of_2_scales``: scales
    rounded down to a power of two; ``weight_gradient_fp8``: the weight gradient's product in FP8
    (else in the inputs' dtype).
    """

    name: str
    rowwise: bool
    gradient_dtype: torch.dtype
    power_of_2_scales: bool
    weight_gradient_fp8: bool = True
    forward_dtype: torch.dtype = E4M3


RECIPES = {
    "tensorwise": Fp8Recipe("tensorwise", rowwise=False, gradient_dtype=E5M2, power_of_2_scales=False),
    "rowwise": Fp8Recipe("rowwise", rowwise=True, gradient_dtype=E4M3, power_of_2_scales=True),
    "rowwise_gw_hp": Fp8Recipe("rowwise_gw_hp", rowwise=True, gradient_dtype=E4M3, power_of_2_scales=True,
                               weight_gradient_fp8=False),
}


def recipe_named(name: str) -> Fp8Recipe:
    """The recipe called ``name``; raises ValueError listing the recipes for an unknown name."""
    if name not in RECIPES:
        raise ValueError(f"unknown FP8 recipe {name!r}; the recipes are {sorted(RECIPES)}")
    return RECIPES[name]


def fp8_max(dtype: torch.dtype) -> float:
    """The largest finite value of an FP8 dtype (448 for e4m3fn, 57344 for e5m2)."""
    return float(torch.finfo(dtype).max)


def amax(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """max |x| in float32: over the whole tensor (a 0-dim tensor), or along ``dim`` (kept as size 1).

    The infinity norm is one reduction kernel reading ``x`` once (no ``abs`` temporary).
    """
    if dim is None:
        return torch.linalg.vector_norm(x, ord=float("inf")).float()
    return torch.linalg.vector_norm(x, ord=float("inf"), dim=dim, keepdim=True).float()


def reduce_amax(value: torch.Tensor, groups: Sequence[Any]) -> torch.Tensor:
    """``value`` all-reduced with MAX over each process group in ``groups``, in place; returns it.

    The max over a product of mesh axes is the max over each axis in turn, so one group per
    axis that splits the scaled elements gives the whole tensor's (or row's) amax.
    """
    for group in groups:
        if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return value


def amax_to_scale(value: torch.Tensor, dtype: torch.dtype, power_of_2: bool = False) -> torch.Tensor:
    """The encode scale ``fp8_max(dtype) / max(amax, AMAX_FLOOR)`` in float32.

    ``power_of_2``: rounded down to a power of two, so that ``x * scale`` and its inverse are exact
    and the scaled values still fit the FP8 range.
    """
    scale = fp8_max(dtype) / value.double().clamp(min=AMAX_FLOOR)
    if power_of_2:
        scale = torch.exp2(torch.floor(torch.log2(scale)))
    return scale.float()


# The layouts a cast writes (kernels/fp8/linear.py): row-major, column-major (what torch._scaled_mm
# takes as its second operand, and the transpose of a gradient), or both from one read.
LAYOUTS = ("row", "column", "both")


def _cast(x: torch.Tensor, scale: torch.Tensor, limit: float, dtype: torch.dtype,
          layout: str) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    q = (x.float() * scale).clamp(-limit, limit).to(dtype)
    if layout == "row":
        return q
    # The transpose written contiguously: read back through .t(), it is the column-major matrix.
    return q.t().contiguous() if layout == "column" else (q, q.t().contiguous())


_compile_failed = False
_CAST_GRAPHS = 2 * len(LAYOUTS) * 3 * 3  # FP8 dtypes x layouts x scale ranks (0, 1, 2) x input dtypes


@functools.cache
def _fused_cast() -> Callable | None:
    """``_cast`` compiled into one kernel per layout (eager runs four, with float32 temporaries and a
    separate transposing copy: ~7x the bytes), or None where ``DIMSHARD_FP8_EAGER_CAST=1`` asks for
    eager or compiling failed once."""
    if _compile_failed or os.environ.get("DIMSHARD_FP8_EAGER_CAST", "0") == "1":
        return None
    return torch.compile(_cast, dynamic=True, fullgraph=True)


def saturated_cast(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
                   layout: str = "row") -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``x * scale`` in float32, clamped to the FP8 dtype's finite range, rounded to ``dtype``.

    ``layout``: ``row`` returns it row-major (contiguous); ``column`` returns the same matrix
    column-major (2-D ``x``); ``both`` returns ``(row-major, column-major)`` from one pass.
    Saturating keeps a value beyond the range (possible only when ``scale`` came from another
    tensor's amax) at the largest finite value instead of NaN, as e4m3fn's cast would give. On
    CUDA the cast is one compiled kernel (same values); it falls back to eager ops with a warning
    if compiling fails.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    fused = _fused_cast() if x.is_cuda else None
    out = None
    if fused is not None:
        try:
            # One graph per (FP8 dtype, layout, scale rank, input dtype): more than dynamo's default
            # of 8 recompiles per function, after which it would stop compiling. Detached, a weight
            # is a plain tensor (a Parameter would be one more guard to recompile on).
            with torch._dynamo.config.patch(recompile_limit=_CAST_GRAPHS):
                out = fused(x.detach(), scale.detach(), fp8_max(dtype), dtype, layout)
        except Exception as error:  # noqa: BLE001 — any compile failure: the eager ops compute the same values
            warnings.warn(f"FP8 cast: torch.compile failed ({type(error).__name__}: {str(error)[:200]}); "
                          "casting with eager ops, which move ~7x the bytes", stacklevel=2)
            global _compile_failed
            _compile_failed = True
            _fused_cast.cache_clear()
    if out is None:
        out = _cast(x, scale, fp8_max(dtype), dtype, layout)
    if layout == "row":
        return out
    return out.t() if layout == "column" else (out[0], out[1].t())


def quantize(x: torch.Tensor, dtype: torch.dtype, dim: int | None = None, power_of_2: bool = False,
             groups: Sequence[Any] = (), layout: str = "row") -> tuple[Any, torch.Tensor]:
    """``(q, scale)``: ``x`` cast to FP8 ``dtype`` with its encode scale (float32).

    ``dim`` None: one scale for the tensor (a 0-dim tensor); else one per slice along ``dim`` (the
    amax is taken along ``dim``, kept as size 1: for a matrix, ``dim=-1`` scales each row,
    ``dim=0`` each column). ``groups``: the process groups that split the elements one scale
    covers; the amax is reduced over them first. ``layout`` as in ``saturated_cast`` (``both``:
    ``q`` is the pair). ``dequantize(q, scale)`` recovers ``x`` to FP8 precision.
    """
    value = reduce_amax(amax(x, dim), groups)
    scale = amax_to_scale(value, dtype, power_of_2)
    return saturated_cast(x, scale, dtype, layout), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``q`` in float32 times the decode scale ``1 / scale`` (what ``torch._scaled_mm`` multiplies by)."""
    return q.float() * scale.reciprocal()
