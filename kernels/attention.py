"""Scaled dot-product attention through the fastest fused backend available.

On Hopper, cuDNN's attention beats PyTorch's flash backend by a wide margin at long context
(docs/design.md, "Kernels": 553 against 326 TFLOP/s fwd+bwd at 128K on an H200), but PyTorch's default order
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

``attention`` is dimshard's own attention op, registered for the planner with ``register_op``
(Hugging Face models reach it through ``kernels/hf_attention.py``). Beyond plain causal attention
it takes a sliding window, logit soft-capping (Gemma 2) and per-token document ids (packed
sequences): plain calls run through ``scaled_dot_product_attention`` above; the variants run on
CUDA through ``flash_attn`` when it is installed and applicable, else FlexAttention with a block
mask (never a dense L x S mask), and elsewhere through ``attention_reference``, exact plain
PyTorch. ``scaled_dot_product_attention`` itself is not registered: the planner has its own
rule for PyTorch's sdpa, which models traced with ``attn_implementation="sdpa"`` record.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from dimshard.planner.ops.registry import OpCall, register_op

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
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0, is_causal: bool = False, enable_gqa: bool = False,
) -> bool:
    """Whether PyTorch's cuDNN attention backend accepts a call with these ``SDPAParams`` (False off CUDA)."""
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
    backend_order: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if query.is_cuda:
        checks = (query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
        flash_attn_func = _load_flash_attn()
        if (
            flash_attn_func is not None
            and flash_attn_applicable(query, key, value, attn_mask, is_causal, enable_gqa)
            and not cudnn_can_run(*checks)
        ):
            return flash_attn_sdpa(flash_attn_func, query, key, value, dropout_p, is_causal, scale)
        backend_order = _prefer_cudnn(checks)
    with backend_order:
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
            enable_gqa=enable_gqa,
        )


# --------------------------------------------------------------------------------------------
# dimshard's attention op: windows, soft-capping and document masks
# --------------------------------------------------------------------------------------------


def attention_dim_rule(call: OpCall) -> str:
    """Dim annotation of ``attention``: batch and K/V head groups split, sequence dims whole.

    ``l`` (queries) and ``s`` (keys) stay unsplit (``^``): splitting the sequence needs the
    sequence-split attention of context parallelism, which will relax ``l`` here. Grouped-query
    attention names query heads ``(h r^)``: a split of ``h`` keeps each query group with its K/V
    head. ``document_ids`` [b, l] follows the queries.
    """
    q, k = call.inputs[0], call.inputs[1]
    heads = "h" if q.shape[1] == k.shape[1] else "(h r^)"
    specs = [f"b {heads} l^ e^", "b h s^ e^", "b h s^ f^"]
    if len(call.inputs) > 3:
        specs.append("b l^")
    return ", ".join(specs) + f" -> b {heads} l^ f^"


def _check_attention_args(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          window: int | None, softcap: float | None, document_ids: torch.Tensor | None) -> None:
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(f"attention takes query [b, hq, l, e] and key/value [b, hk, s, e]; got shapes "
                         f"{list(query.shape)}, {list(key.shape)}, {list(value.shape)}")
    if query.shape[1] % key.shape[1] or key.shape[1] != value.shape[1]:
        raise ValueError(f"attention needs query heads ({query.shape[1]}) a multiple of key/value heads "
                         f"({key.shape[1]}, {value.shape[1]})")
    if window is not None and window < 1:
        raise ValueError(f"attention window must be a positive number of tokens, got {window}")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"attention softcap must be positive, got {softcap}")
    if document_ids is not None and (document_ids.shape != (query.shape[0], query.shape[2])
                                     or key.shape[2] != query.shape[2]):
        raise ValueError(f"document_ids must be [batch, seq] = {[query.shape[0], query.shape[2]]} for "
                         f"self-attention over as many keys; got {list(document_ids.shape)} with "
                         f"{key.shape[2]} keys")


def visible_keys(q_len: int, kv_len: int, causal: bool, window: int | None,
                 document_ids: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """Bool [1 or b, l, s]: which key each query may attend to (None: all), dense.

    Query i sees key j when ``j <= i`` (causal, top-left aligned like torch's sdpa), when
    ``i - window < j`` (and ``j < i + window`` if not causal; a window counts the query's own
    token, as Hugging Face's ``sliding_window``), and when both lie in the same document.
    """
    if not causal and window is None and document_ids is None:
        return None
    i = torch.arange(q_len, device=device)[:, None]
    j = torch.arange(kv_len, device=device)[None, :]
    allowed = torch.ones(q_len, kv_len, dtype=torch.bool, device=device)
    if causal:
        allowed &= j <= i
    if window is not None:
        allowed &= j > i - window
        if not causal:
            allowed &= j < i + window
    allowed = allowed[None]
    if document_ids is not None:
        allowed = allowed & (document_ids[:, :, None] == document_ids[:, None, :])
    return allowed


def attention_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                        scale: float | None = None, causal: bool = True, window: int | None = None,
                        softcap: float | None = None, document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Exact attention in plain PyTorch (dense scores), as Hugging Face's eager attention computes it.

    Scores in the inputs' dtype, scaled, soft-capped (``softcap * tanh(score / softcap)``),
    masked by ``visible_keys``, softmax in float32 (float64 for float64 inputs) cast back, times value. K/V heads are shared by
    their query group through a broadcast, never repeated in memory.
    """
    b, hq, q_len, e = query.shape
    hk, kv_len = key.shape[1], key.shape[2]
    scale = e ** -0.5 if scale is None else scale
    grouped = query.reshape(b, hk, hq // hk, q_len, e)
    scores = torch.matmul(grouped, key.unsqueeze(2).transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    allowed = visible_keys(q_len, kv_len, causal, window, document_ids, query.device)
    if allowed is not None:
        scores = scores.masked_fill(~allowed[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(value.dtype)
    return torch.matmul(probs, value.unsqueeze(2)).reshape(b, hq, q_len, value.shape[-1])


def _flash_attn_variant_applicable(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, causal: bool,
                                   document_ids: torch.Tensor | None) -> bool:
    """``flash_attn_func`` with ``window_size``/``softcap`` computes the same function (no document masks)."""
    if document_ids is not None:
        return False
    gqa = query.shape[1] != key.shape[1]
    # flash_attn aligns causal masks bottom-right; equal lengths make both alignments one.
    return flash_attn_applicable(query, key, value, None, causal, gqa) and query.shape[2] == key.shape[2]


@functools.cache
def _compiled_flex_attention() -> Callable[..., Any]:
    from torch.nn.attention.flex_attention import flex_attention

    # Uncompiled flex_attention materialises the scores; compiled, it is one fused kernel.
    return torch.compile(flex_attention, dynamic=False)


def _flex_mask_mod(causal: bool, window: int | None, document_ids: torch.Tensor | None) -> Callable[..., Any] | None:
    if not causal and window is None and document_ids is None:
        return None

    def mask_mod(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        keep = q_idx >= kv_idx if causal else q_idx == q_idx
        if window is not None:
            keep = keep & (kv_idx > q_idx - window)
            if not causal:
                keep = keep & (kv_idx < q_idx + window)
        if document_ids is not None:
            keep = keep & (document_ids[b, q_idx] == document_ids[b, kv_idx])
        return keep

    return mask_mod


# The last document block mask: (weak reference to its document_ids tensor, arguments, mask).
_DOCUMENT_MASK: dict[str, tuple[Any, tuple, Any]] = {}


@functools.lru_cache(maxsize=16)
def _shared_block_mask(q_len: int, kv_len: int, causal: bool, window: int | None, device: torch.device) -> Any:
    """The block mask of a causal/window pattern, built once per shape (every layer reuses it)."""
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(_flex_mask_mod(causal, window, None), None, None, q_len, kv_len, device=device,
                             _compile=True)


def _flex_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None, causal: bool,
                    window: int | None, softcap: float | None, document_ids: torch.Tensor | None) -> torch.Tensor:
    from torch.nn.attention.flex_attention import create_block_mask

    q_len, kv_len = query.shape[2], key.shape[2]
    if document_ids is not None:
        key_ = (causal, window, q_len, kv_len, document_ids._version)
        cached = _DOCUMENT_MASK.get("entry")
        if cached is not None and cached[0]() is document_ids and cached[1] == key_:
            block_mask = cached[2]  # every layer of one forward passes the same document_ids tensor
        else:
            # _compile=True builds the block mask block by block: no dense L x S mask at long context.
            block_mask = create_block_mask(_flex_mask_mod(causal, window, document_ids), document_ids.shape[0], None,
                                           q_len, kv_len, device=query.device, _compile=True)
            _DOCUMENT_MASK["entry"] = (weakref.ref(document_ids), key_, block_mask)
    elif causal or window is not None:
        block_mask = _shared_block_mask(q_len, kv_len, causal, window, query.device)
    else:
        block_mask = None
    score_mod = None
    if softcap is not None:
        def score_mod(score: Any, b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
            return softcap * torch.tanh(score / softcap)
    return _compiled_flex_attention()(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scale,
                                      enable_gqa=query.shape[1] != key.shape[1])


def attention_mask_density(op: Any, queries: int, keys: int) -> float:
    """About the fraction of the ``queries x keys`` scores a call computes (the cost model's attention FLOPs).

    Causal: a half; a window of ``w`` keys: ``w / keys`` causal, ``2 w / keys`` otherwise (at most 1).
    """
    causal, window = op.arg(99, "causal", True), op.arg(99, "window")
    if window is not None and window < keys:
        return min(window / keys * (1 if causal else 2), 1.0)
    return 0.5 if causal else 1.0


@register_op(attention_dim_rule, cost="attention", mask_density=attention_mask_density)
def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, scale: float | None = None,
              causal: bool = True, window: int | None = None, softcap: float | None = None,
              document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of query [b, hq, l, e] over key/value [b, hk, s, e|f]; returns [b, hq, l, f] (query's dtype).

    ``hq`` a multiple of ``hk`` (grouped-query attention; K/V are never repeated). ``scale``
    multiplies the scores (default ``e ** -0.5``); ``causal`` lets query i see keys j <= i
    (top-left aligned); ``window`` (tokens, counting the query's own, as Hugging Face's
    ``sliding_window``) also hides keys j <= i - window; ``softcap`` caps the scaled scores to
    ``softcap * tanh(score / softcap)`` (Gemma 2); ``document_ids`` [b, l] integer restricts
    each query to keys of its own document (needs s == l). Every path gives the same function:
    plain calls go through ``scaled_dot_product_attention`` (cuDNN first on CUDA); the variants run
    on CUDA through ``flash_attn`` if installed and applicable, else compiled FlexAttention with a
    block mask; elsewhere through ``attention_reference``. Differentiable in query, key and value.
    """
    _check_attention_args(query, key, value, window, softcap, document_ids)
    if query.is_meta:
        # The tracer reads requires_grad off the result: the cost model prices attention's backward by it.
        out = query.new_empty(*query.shape[:3], value.shape[-1])
        return out.requires_grad_(query.requires_grad or key.requires_grad or value.requires_grad)
    gqa = query.shape[1] != key.shape[1]
    if window is not None and window >= max(query.shape[2], key.shape[2]):
        window = None  # the window covers every key: the same function, on the fast path
    if window is None and softcap is None and document_ids is None:
        return scaled_dot_product_attention(query, key, value, is_causal=causal, scale=scale, enable_gqa=gqa)
    if not query.is_cuda:
        return attention_reference(query, key, value, scale=scale, causal=causal, window=window, softcap=softcap,
                                   document_ids=document_ids)
    flash_attn_func = _load_flash_attn()
    if flash_attn_func is not None and _flash_attn_variant_applicable(query, key, value, causal, document_ids):
        left = -1 if window is None else window - 1
        right = 0 if causal else (-1 if window is None else window - 1)
        out = flash_attn_func(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), softmax_scale=scale,
                              causal=causal, window_size=(left, right), softcap=0.0 if softcap is None else softcap)
        return out.transpose(1, 2)
    return _flex_attention(query, key, value, scale, causal, window, softcap, document_ids)
