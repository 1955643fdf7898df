"""Scaled dot-product attention through the fastest fused backend available.

On Hopper, cuDNN's attention beats PyTorch's flash backend by a wide margin at long context
(DESIGN.md: 553 against 326 TFLOP/s fwd+bwd at 128K on an H200), but PyTorch's default order
only prefers it on recent builds with a recent cuDNN. This wrapper states the order explicitly:
cuDNN, flash, memory-efficient, math. When cuDNN cannot take a call and the ``flash_attn``
package is installed, that package runs it instead.

Grouped-query attention: PyTorch's ``enable_gqa=True`` is passed through unchanged, and nothing
here repeats K/V: every backend that can be chosen takes the head groups natively. PyTorch's
flash and memory-efficient backends do; its cuDNN backend does on the measured build (torch
2.11 + cuDNN 9.19 on an H100: it accepted 32 query heads over 8 K/V heads and ran at 523
TFLOP/s fwd+bwd at 128K against 319 for torch's default choice, flash; benchmarks/RESULTS.md).
On a build whose cuDNN check rejects GQA, PyTorch moves on to flash, which needs no copy either.
``flash_attn`` takes GQA natively.

Not registered for the planner here: the planner has its own rule for PyTorch's sdpa.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

_PRIORITY = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# ``set_priority`` appeared in PyTorch 2.6; without it, cuDNN can only be preferred by enabling it alone.
_HAS_SET_PRIORITY = "set_priority" in inspect.signature(sdpa_kernel).parameters


@functools.cache
def _load_flash_attn() -> Callable[..., Any] | None:
    """``flash_attn.flash_attn_func`` when the package is installed, else None."""
    if importlib.util.find_spec("flash_attn") is None:
        return None
    try:
        from flash_attn import flash_attn_func
    except ImportError:  # installed but built for another torch/CUDA
        return None
    return flash_attn_func


def cudnn_can_run(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    enable_gqa: bool = False,
) -> bool:
    """Whether PyTorch's cuDNN attention backend accepts this call (False off CUDA)."""
    if not query.is_cuda:
        return False
    try:
        params = torch.backends.cuda.SDPAParams(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
        return bool(torch.backends.cuda.can_use_cudnn_attention(params, False))
    except (RuntimeError, TypeError, AttributeError):
        return False


def flash_attn_applicable(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    enable_gqa: bool,
) -> bool:
    """Whether ``flash_attn_func`` computes exactly what torch's sdpa would for these arguments.

    It takes no mask, needs one half-precision dtype and one head dim (a multiple of 8, at most
    256), and aligns a causal mask to the bottom-right corner where torch aligns it to the
    top-left, so causal calls must have as many queries as keys.
    """
    if attn_mask is not None or query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return False
    if query.dtype not in (torch.float16, torch.bfloat16) or not (query.dtype == key.dtype == value.dtype):
        return False
    head_dim = query.shape[-1]
    if key.shape[-1] != head_dim or value.shape[-1] != head_dim or head_dim % 8 or head_dim > 256:
        return False
    heads_q, heads_kv = query.shape[1], key.shape[1]
    if heads_q != heads_kv and not (enable_gqa and heads_q % heads_kv == 0):
        return False
    return not (is_causal and query.shape[2] != key.shape[2])


def flash_attn_sdpa(
    flash_attn_func: Callable[..., Any],
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
) -> torch.Tensor:
    """torch-layout ([b, h, l, d]) attention through ``flash_attn_func`` (which takes [b, l, h, d])."""
    out = flash_attn_func(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
        dropout_p=dropout_p, softmax_scale=scale, causal=is_causal,
    )
    return out.transpose(1, 2)


def _prefer_cudnn(args: tuple[Any, ...]) -> contextlib.AbstractContextManager[Any]:
    if _HAS_SET_PRIORITY:
        return sdpa_kernel(_PRIORITY, set_priority=True)
    if cudnn_can_run(*args):
        return sdpa_kernel([SDPBackend.CUDNN_ATTENTION])
    return contextlib.nullcontext()


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention``: same arguments, same result.

    query [b, hq, l, e], key [b, hk, s, e], value [b, hk, s, f] (hq a multiple of hk when
    enable_gqa); returns [b, hq, l, f] in the query's dtype. On CUDA the backend order is cuDNN,
    flash, memory-efficient, math; if cuDNN cannot take the call and the ``flash_attn`` package
    is installed and computes the same function, that package runs it. Off CUDA this is torch's
    sdpa unchanged.
    """
    if not query.is_cuda:
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
            enable_gqa=enable_gqa,
        )
    checks = (query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
    flash_attn_func = _load_flash_attn()
    if (
        flash_attn_func is not None
        and flash_attn_applicable(query, key, value, attn_mask, is_causal, enable_gqa)
        and not cudnn_can_run(*checks)
    ):
        return flash_attn_sdpa(flash_attn_func, query, key, value, dropout_p, is_causal, scale)
    with _prefer_cudnn(checks):
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
            enable_gqa=enable_gqa,
        )
