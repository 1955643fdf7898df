"""One attention block with its log-sum-exp, forward and backward, on the fastest backend that works.

A block is queries [b, hq, lq, e] against keys/values [b, hk, lk, e] under the top-left causal
mask (lq == lk) or none. Its forward returns the block output and the natural-log
log-sum-exp of its scaled scores, lse [b, hq, lq] fp32; partial results of blocks that share
query rows are merged by `merge_block` into the output over all their keys. Its backward takes
the *merged* output and lse, so each block's gradients are exact contributions to the gradients of
the whole attention (the flash-attention backward only needs softmax probabilities, which
exp(scores - lse_total) gives per block, and rowsum(dout * out_total)).

Backends:
- "cudnn": torch.ops.aten._scaled_dot_product_cudnn_attention and its backward (fastest on
  Hopper);
- "flash": torch.ops.aten._scaled_dot_product_flash_attention and its backward;
- "math": plain PyTorch in fp32 (float64 stays float64), any device; the CPU path.

GQA without repeating K/V: query head h uses K/V head h // (hq / hk). Both aten ops take hk < hq
natively (their kernels index the K/V head per query head and sum dK/dV over the group); the
math path views the query as [b, hk, hq/hk, lq, e] and broadcasts K/V. Before a fused backend
is used on a device it is checked once on a small GQA problem against the math path
(`fused_backend_works`), so a build whose op rejects or miscomputes a case falls back instead of
failing mid-training.
"""

from __future__ import annotations

import functools
import warnings

import torch

from .layout import KV_SEQ_DIM, AttentionBlock, gathered_from_natural, natural_from_gathered, unpack_kv

__all__ = [
    "BACKENDS",
    "BlockRunner",
    "accumulator_dtype",
    "block_backward",
    "block_forward",
    "choose_backend",
    "empty_accumulators",
    "fused_backend_works",
    "merge_block",
    "strided_like",
]

BACKENDS = ("cudnn", "flash", "math")
_aten = torch.ops.aten


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype partial results are computed and accumulated in: float64 for float64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------
# math (plain PyTorch)


def _math_scores(q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    """Scaled scores [b, hk, groups, lq, lk] in the compute dtype, -inf where the causal mask hides a key."""
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    dtype = accumulator_dtype(q.dtype)
    grouped = q.to(dtype).reshape(batch, kv_heads, q_heads // kv_heads, q_len, head_dim)
    scores = torch.einsum("bgrle,bgse->bgrls", grouped, k.to(dtype)) * scale
    if causal:
        hidden = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(hidden, float("-inf"))
    return scores


def _math_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, q_heads, q_len, _ = q.shape
    scores = _math_scores(q, k, scale, causal)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1))
    out = torch.einsum("bgrls,bgsf->bgrlf", probs, v.to(scores.dtype))
    out = out.reshape(batch, q_heads, q_len, v.shape[-1]).to(q.dtype)
    return out, lse.reshape(batch, q_heads, q_len).to(accumulator_dtype(q.dtype))


def _math_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    scale: float, causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads = k.shape[1]
    groups = q_heads // kv_heads
    scores = _math_scores(q, k, scale, causal)
    dtype = scores.dtype

    def grouped(x: torch.Tensor) -> torch.Tensor:
        return x.to(dtype).reshape(batch, kv_heads, groups, q_len, x.shape[-1])

    probs = torch.exp(scores - lse.to(dtype).reshape(batch, kv_heads, groups, q_len, 1))
    dout_g = grouped(dout)
    dv = torch.einsum("bgrls,bgrlf->bgsf", probs, dout_g)
    dprobs = torch.einsum("bgrlf,bgsf->bgrls", dout_g, v.to(dtype))
    row_dot = (dout_g * grouped(out)).sum(-1, keepdim=True)
    dscores = probs * (dprobs - row_dot) * scale
    dq = torch.einsum("bgrls,bgse->bgrle", dscores, k.to(dtype)).reshape(batch, q_heads, q_len, head_dim)
    dk = torch.einsum("bgrls,bgrle->bgse", dscores, grouped(q))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# ----------------------------------------------------------------------------------------------
# one block on a backend: the fused aten ops (CUDA) or the math path


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}: choose one of {', '.join(BACKENDS)}")


def block_forward(
    backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """One block's output [b, hq, lq, e] (q's dtype) and lse [b, hq, lq] (fp32; float64 on the math path for float64)."""
    _check_backend(backend)
    if backend == "cudnn":
        out, lse, *_ = _aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, causal, False, scale=scale
        )
        # cuDNN returns its softmax statistics as [b, h, lq, 1].
        return out, lse.reshape(q.shape[:3])
    if backend == "flash":
        out, lse, *_ = _aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
        return out, lse
    return _math_forward(q, k, v, scale, causal)


def block_backward(
    backend: str,
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One block's contributions (dq, dk, dv) to the gradients, given the merged `out`/`lse` of its query rows.

    dout and out must have the same strides (the fused ops read them as one layout).
    """
    _check_backend(backend)
    if backend == "math":
        return _math_backward(dout, q, k, v, out, lse, scale, causal)
    # Dropout is never used, so the random-state arguments of the backward ops are never read; they
    # still have to be tensors of the kinds the forward ops return (left uninitialised: uint64 has
    # few CUDA kernels, and nothing reads them).
    if backend == "cudnn":
        seed = torch.empty((), dtype=torch.int64, device=q.device)
        offset = torch.empty((), dtype=torch.int64, device=q.device)
        dq, dk, dv = _aten._scaled_dot_product_cudnn_attention_backward(
            dout, q, k, v, out, lse.contiguous().unsqueeze(-1), seed, offset, None, None, None,
            q.shape[2], k.shape[2], 0.0, causal, scale=scale,
        )
        return dq, dk, dv
    seed = torch.empty(2, dtype=torch.uint64, device=q.device)
    offset = torch.empty((), dtype=torch.uint64, device=q.device)
    dq, dk, dv = _aten._scaled_dot_product_flash_attention_backward(
        dout, q, k, v, out, lse.contiguous(), None, None, q.shape[2], k.shape[2], 0.0, causal, seed, offset,
        scale=scale,
    )
    return dq, dk, dv


def strided_like(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`x` with the strides of `like` (same shape): `x` itself when they already agree, else a copy."""
    if x.stride() == like.stride():
        return x
    return torch.empty_like(like, dtype=x.dtype).copy_(x)


def empty_accumulators(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Running output [b, hq, l, e] (zeros) and lse [b, hq, l] (-inf) for the queries q, in the accumulator dtype."""
    acc_dtype = accumulator_dtype(q.dtype)
    out = torch.zeros_like(q, dtype=acc_dtype)
    lse = torch.full(q.shape[:3], float("-inf"), dtype=acc_dtype, device=q.device)
    return out, lse


def merge_block(
    acc_out: torch.Tensor, acc_lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
) -> None:
    """Fold a block's (out, lse) into running fp32 accumulators over the same query rows, in place.

    acc_out [b, h, l, e] and acc_lse [b, h, l] may be views (a range of rows); rows whose running
    lse is still -inf take the block's values.
    """
    # out_new = (out e^lse + block e^block_lse) / e^new_lse, i.e. a lerp towards the block by its
    # weight sigmoid(block_lse - lse): one pass over the output instead of four.
    weight = torch.sigmoid(block_lse - acc_lse).unsqueeze(-1)
    acc_out.lerp_(block_out.to(acc_out.dtype), weight)
    acc_lse.copy_(torch.logaddexp(acc_lse, block_lse))


class BlockRunner:
    """The forward and backward of `AttentionBlock`s on one backend: rows sliced out of the rank's
    tensors, results merged (forward) or accumulated (backward) into them in place."""

    def __init__(self, backend: str, scale: float) -> None:
        self.backend = backend
        self.scale = scale

    def forward(
        self, block: AttentionBlock, q: torch.Tensor, kv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor
    ) -> None:
        """Merge the block of queries q [b, hq, l, e] against packed kv into the accumulators out, lse."""
        k, v = unpack_kv(kv)
        rows, keys = slice(block.q_start, block.q_stop), slice(block.kv_start, block.kv_stop)
        block_out, block_lse = block_forward(
            self.backend, q[:, :, rows], k[:, :, keys], v[:, :, keys], self.scale, block.causal
        )
        merge_block(out[:, :, rows], lse[:, :, rows], block_out, block_lse)

    def backward(
        self,
        block: AttentionBlock,
        saved: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
        kv: torch.Tensor,
        dq: torch.Tensor,
        dkv: torch.Tensor,
    ) -> None:
        """Add the block's gradients into dq [b, hq, l, e] and packed dkv; saved = (q, out, lse, dout) of the rank."""
        q, out, lse, dout = saved
        k, v = unpack_kv(kv)
        dk, dv = unpack_kv(dkv)
        rows, keys = slice(block.q_start, block.q_stop), slice(block.kv_start, block.kv_stop)
        block_dq, block_dk, block_dv = block_backward(
            self.backend, dout[:, :, rows], q[:, :, rows], k[:, :, keys], v[:, :, keys], out[:, :, rows],
            lse[:, :, rows], self.scale, block.causal,
        )
        dq[:, :, rows] += block_dq
        dk[:, :, keys] += block_dk
        dv[:, :, keys] += block_dv

    def forward_on_gathered(
        self, blocks: list[AttentionBlock], q: torch.Tensor, gathered: torch.Tensor, out: torch.Tensor,
        lse: torch.Tensor,
    ) -> None:
        """`forward` for blocks whose key rows index the whole sequence in natural order (`gathered_blocks`'
        unmasked ones), given every rank's packed K/V shard stacked [P, 2, b, l, hk, e] as an all-gather
        delivers it."""
        if not blocks:
            return
        natural = natural_from_gathered(gathered, KV_SEQ_DIM)
        for block in blocks:
            self.forward(block, q, natural, out, lse)

    def backward_on_gathered(
        self,
        blocks: list[AttentionBlock],
        saved: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
        gathered: torch.Tensor,
        dq: torch.Tensor,
    ) -> torch.Tensor:
        """`backward` for the blocks `forward_on_gathered` ran: adds into dq and returns their dK/dV as every
        rank's packed shard stacked [P, 2, b, l, hk, e] in dq's dtype (what a reduce-scatter sums)."""
        natural = natural_from_gathered(gathered, KV_SEQ_DIM)
        dkv_natural = torch.zeros_like(natural, dtype=dq.dtype)
        for block in blocks:
            self.backward(block, saved, natural, dq, dkv_natural)
        return gathered_from_natural(dkv_natural, gathered.shape[0], KV_SEQ_DIM)


# ----------------------------------------------------------------------------------------------
# backend choice


@functools.cache
def fused_backend_works(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether a fused backend runs GQA blocks of this dtype/head dim on `device` and matches the math path.

    Checked once per (backend, device, dtype, head_dim) on a small problem: a causal block and
    two unmasked blocks of unequal lengths, 4 query heads over 2 K/V heads, forward and backward.
    """
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        # [b, l, h, e] storage viewed as [b, h, l, e]: the layout the model's projections give.
        return torch.randn(shape[0], shape[2], shape[1], shape[3], generator=gen).to(device, dtype).transpose(1, 2)

    try:
        for q_len, kv_len, causal in ((128, 128, True), (128, 64, False), (64, 128, False)):
            q, k, v = rand(1, 4, q_len, head_dim), rand(1, 2, kv_len, head_dim), rand(1, 2, kv_len, head_dim)
            dout = rand(1, 4, q_len, head_dim)
            scale = head_dim**-0.5
            out, lse = block_forward(backend, q, k, v, scale, causal)
            ref_out, ref_lse = block_forward("math", q, k, v, scale, causal)
            dout = strided_like(dout, out)
            grads = block_backward(backend, dout, q, k, v, out, lse, scale, causal)
            ref_grads = block_backward("math", dout, q, k, v, ref_out, ref_lse, scale, causal)
            pairs = [(out, ref_out), (lse, ref_lse), *zip(grads, ref_grads)]
            for ours, ref in pairs:
                ref = ref.float()
                if ours.shape != ref.shape or (ours.float() - ref).abs().max() > 0.05 * (1 + ref.abs().max()):
                    raise RuntimeError(f"result differs from the math path (q {q_len}, kv {kv_len}, causal {causal})")
    except RuntimeError as error:
        warnings.warn(f"context parallel attention: the {backend} backend is not used on {device} ({error})",
                      stacklevel=2)
        return False
    return True


def choose_backend(query: torch.Tensor, key: torch.Tensor, preferred: str | None = None) -> str:
    """The backend for blocks of these inputs: `preferred` if given, else cuDNN, then flash, then math.

    The fused backends need CUDA, fp16/bf16 and equal dtypes; each is used only once
    `fused_backend_works` has accepted it for the device, dtype and head dim.
    """
    if preferred is not None:
        _check_backend(preferred)
        return preferred
    fused_ok = query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and key.dtype == query.dtype
    if fused_ok:
        for backend in ("cudnn", "flash"):
            if fused_backend_works(backend, query.device, query.dtype, query.shape[-1]):
                return backend
    return "math"
