"""Pieces of ``chunk_linear_cross_entropy``: tile sizes, the call plan, the logit map of the final projection,
fp32-result products and small gradient helpers (the tile loops and the autograd function stay there)."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

# Auto tiling: up to 16 vocabulary blocks, none narrower than 4096 words.
_MAX_VOCAB_SPLITS = 16
_MIN_VOCAB_TILE = 4096
# Recompute path: full-vocabulary rows of logits per tile when chunk_size is None.
_RECOMPUTE_CHUNK = 1024
# Precompute path: logits bytes of one chunk when chunk_size is None. At Llama-3-8B sizes (bf16)
# that is 2560 tokens: with the weight gradient's residual (0.98 GiB) about 1.65 GiB above the
# inputs and gradients, under the 2 GB budget with some room, while the per-chunk pass over the
# [n, d] accumulator (~1.4 ms on an H100) stays about an eighth of the chunk's 3 products.
_PRECOMPUTE_LOGITS_BYTES = 640 * 2**20
_GEMM_ROWS = 256  # automatic precompute chunks are a multiple of this where they can be
# Precompute path, bf16/fp16 weights: chunk products added into the residual between two
# renormalisations of the (gradient, residual) pair. Each renormalisation reads and writes both
# [n, d] buffers (about 1 ms at Llama-3-8B sizes on an H200, against ~11 ms for a chunk's three
# products); every 4 chunks it costs a quarter of that, while the residual only ever holds 4
# chunks' share of the sum, so its bf16 roundings stay far below the single rounding of an eager
# bf16 gradient.
_RENORMALISE_EVERY = 4

_FP32_OUT_MATMUL: dict[torch.device, bool] = {}


def tile_sizes(num_tokens: int, vocab_size: int, chunk_size: int, vocab_splits: int | None) -> tuple[int, int]:
    """(tokens per tile, vocabulary words per tile) of the recompute path for the given arguments.

    ``vocab_splits=None`` picks as many vocabulary blocks as the tokens fill (at most 16, each
    at least 4096 words wide); a tile never exceeds ``chunk_size`` full-vocabulary rows.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if vocab_splits is None:
        vocab_splits = max(1, min(_MAX_VOCAB_SPLITS, math.ceil(num_tokens / chunk_size), vocab_size // _MIN_VOCAB_TILE))
    if vocab_splits < 1:
        raise ValueError(f"vocab_splits must be >= 1 or None, got {vocab_splits}")
    return chunk_size * vocab_splits, max(1, math.ceil(vocab_size / vocab_splits))


def precompute_tile_sizes(
    num_tokens: int, vocab_size: int, itemsize: int, chunk_size: int | None, vocab_splits: int | None
) -> tuple[int, int]:
    """(tokens per chunk, vocabulary words per block) of the precompute path.

    A chunk holds the logits of its tokens over the whole vocabulary (``itemsize`` bytes each):
    ``chunk_size`` tokens, or with None as many as fit in 640 MiB (a multiple of 256 when that
    is at least 256), never more than ``num_tokens``. The blocks only bound the fp32 temporaries
    of the elementwise passes and of mixed-dtype products: ``vocab_splits`` blocks, or with None
    up to 16 of at least 4096 words.
    """
    if chunk_size is None:
        chunk_size = max(1, _PRECOMPUTE_LOGITS_BYTES // max(1, vocab_size * itemsize))
        if chunk_size >= _GEMM_ROWS:
            chunk_size -= chunk_size % _GEMM_ROWS
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if vocab_splits is None:
        vocab_splits = max(1, min(_MAX_VOCAB_SPLITS, vocab_size // _MIN_VOCAB_TILE))
    if vocab_splits < 1:
        raise ValueError(f"vocab_splits must be >= 1 or None, got {vocab_splits}")
    return max(1, min(chunk_size, num_tokens)), max(1, math.ceil(vocab_size / vocab_splits))


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


@dataclass(frozen=True)
class _Plan:
    """How one call runs: recompute tiles, and precompute tiles when the forward takes the gradients."""

    recompute_tiles: tuple[int, int]
    precompute_tiles: tuple[int, int] | None
    need_hidden: bool
    need_weight: bool
    need_bias: bool = False
    logit_scale: float | None = None
    softcap: float | None = None
