"""Arithmetic on the tiles of ``chunk_linear_cross_entropy``: products with fp32 results, the logit map
of the final projection and its slope, and gradient helpers (the tile loops and the autograd function
stay in the op's module)."""

from __future__ import annotations

import contextlib
import math

import torch

from .tiling import _Plan

_FP32_OUT_MATMUL: dict[torch.device, bool] = {}


def _fp32_out_matmul_ok(device: torch.device) -> bool:
    """Whether ``torch.mm``/``torch.addmm`` accept bf16 operands with an fp32 result here.

    CUDA builds of recent PyTorch do (cuBLAS accumulates in fp32 and writes fp32, so no rounding
    of partial products); CPU builds do not. Probed once per device on small deterministic data.
    """
    if device.type != "cuda":
        return False
    if device not in _FP32_OUT_MATMUL:
        try:
            a = torch.linspace(-1.0, 1.0, 64 * 32, device=device).view(64, 32).to(torch.bfloat16)
            b = torch.linspace(-2.0, 1.0, 32 * 48, device=device).view(32, 48).to(torch.bfloat16)
            start = torch.linspace(0.0, 1.0, 64 * 48, device=device).view(64, 48)
            product = a.float() @ b.float()
            acc = start.clone()
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            # The backward passes a transposed operand; check that layout too.
            transposed = torch.mm(a.t().contiguous().t(), b, out_dtype=torch.float32)
            ok = torch.allclose(acc, start + product, rtol=1e-3, atol=1e-3) and torch.allclose(
                transposed, product, rtol=1e-3, atol=1e-3
            )
        except (RuntimeError, TypeError, NotImplementedError):
            ok = False
        _FP32_OUT_MATMUL[device] = bool(ok)
    return _FP32_OUT_MATMUL[device]


def _autocast_off(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """Run the tiles in the inputs' dtype even inside an autocast region (forward and backward alike)."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()  # meta tensors (the planner's tracer): autocast does not apply


def _add_matmul_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, fp32_out: bool) -> None:
    """acc += a @ b with acc in a wider dtype than a and b where possible."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif fp32_out and acc.dtype == torch.float32:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.add_(a @ b)


def _fp32_matmul(a: torch.Tensor, b: torch.Tensor, fp32_out: bool) -> torch.Tensor:
    if fp32_out and a.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(a, b, out_dtype=torch.float32)
    return (a @ b).float()


def _new_weight_grad(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A zero weight gradient in the weight's dtype and, for bf16/fp16, its zero rounding residual."""
    grad = torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device)
    residual = None if weight.dtype in (torch.float32, torch.float64) else torch.zeros_like(grad)
    return grad, residual


def _map_logits_(logits: torch.Tensor, bias: torch.Tensor | None, plan: _Plan) -> torch.Tensor:
    """In place: the model's logits from one block's product (bias, then scale, then soft-cap)."""
    if bias is not None:
        logits.add_(bias.to(logits.dtype))
    if plan.logit_scale is not None:
        logits.mul_(plan.logit_scale)
    if plan.softcap is not None:
        logits.div_(plan.softcap).tanh_().mul_(plan.softcap)
    return logits


def _logit_map_slope(logits: torch.Tensor, plan: _Plan) -> torch.Tensor | float | None:
    """d(model logit)/d(product + bias) from the mapped logits z: scale * (1 - (z / softcap)^2); None for 1."""
    if plan.softcap is None:
        return plan.logit_scale
    slope = logits.to(torch.float32, copy=True).div_(plan.softcap).square_().neg_().add_(1.0)
    return slope.mul_(plan.logit_scale) if plan.logit_scale is not None else slope


def _chain_slope_(dlogits: torch.Tensor, slope: torch.Tensor | float | None) -> torch.Tensor:
    """In place: the gradient of the mapped logits times the map's slope (the product's gradient)."""
    return dlogits if slope is None else dlogits.mul_(slope)


def _add_bias_grad_(grad_bias: torch.Tensor | None, dlogits: torch.Tensor) -> None:
    if grad_bias is not None:
        grad_bias.add_(dlogits.float().sum(0))


def _rows(bias: torch.Tensor | None, v0: int, v1: int) -> torch.Tensor | None:
    return None if bias is None else bias[v0:v1]


def _uniform_value(grad_loss: torch.Tensor, valid: torch.Tensor) -> float | None:
    """The value ``grad_loss`` takes on every valid token, or None where it varies (one host sync).

    With no valid token every precomputed gradient is 0 and 1.0 is returned. NaN is never uniform.
    """
    grad = grad_loss.reshape(-1).float()
    low, high = torch.stack(
        [torch.where(valid, grad, math.inf).amin(), torch.where(valid, grad, -math.inf).amax()]
    ).tolist()
    if low == math.inf and high == -math.inf:
        return 1.0
    return high if low == high else None

