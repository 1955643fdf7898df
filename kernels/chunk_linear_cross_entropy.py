"""Output projection + cross-entropy over a large vocabulary, one tile of logits at a time.

At 131072 tokens and a 128256-word vocabulary the logits alone are 34 GB in bf16 (67 GB once
upcast to fp32). This op never holds more than one tile of them. The forward computes, per
token, the logsumexp (fp32) and the target logit, and saves only the inputs and the logsumexp;
the backward recomputes each tile's logits, turns them into ``(softmax - onehot) * grad`` in
place, and multiplies them into the two gradients.

Tiles: the tokens (flattened batch x sequence) are cut into chunks of ``chunk_size *
vocab_splits`` rows and the vocabulary into ``vocab_splits`` blocks, so a tile holds at most
``chunk_size`` rows' worth of full-vocabulary logits. Splitting the vocabulary lets the token
chunk grow without more memory, which matters for the weight gradient: it is accumulated once
per token chunk, and at Llama-3-8B sizes a read-modify-write of the whole [n, d] gradient after
only 1024 tokens (4.2 GB of fp32 traffic, ~1.4 ms on an H100) takes about as long as that chunk's
1.1 TFLOP product (~1.5 ms).

Accumulation: the hidden-state gradient of a token chunk is summed over the vocabulary blocks in
an fp32 buffer of one chunk. The weight gradient is summed over token chunks in fp32 when the
weight is fp32; for bf16/fp16 weights, an fp32 buffer of the whole weight (2.1 GB for Llama-3-8B)
would break the memory budget, so it is kept as the gradient itself plus a second buffer of the
weight's dtype holding the rounding residual (compensated summation: about 16 significant bits
carried between chunks, against fp32's 24 and bf16's 8; the product inside each chunk
accumulates in fp32 in the GEMM).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from dimshard.planner.registry import register_op

from ._triton_common import use_triton

# Auto tiling: up to 16 vocabulary blocks, none narrower than 4096 words.
_MAX_VOCAB_SPLITS = 16
_MIN_VOCAB_TILE = 4096

_FP32_OUT_MATMUL: dict[torch.device, bool] = {}


def chunk_linear_cross_entropy_reference(
    hidden_states: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, padding_idx: int
) -> torch.Tensor:
    """Eager reference: full logits in the input dtype, upcast to fp32, ``F.cross_entropy``.

    This is what Hugging Face's causal-LM loss does before its mean. Returns per-token loss
    [b, l] in fp32, 0 where ``labels == padding_idx``.
    """
    logits = F.linear(hidden_states, weight).float()
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=padding_idx, reduction="none"
    )
    return loss.view(labels.shape)


def tile_sizes(num_tokens: int, vocab_size: int, chunk_size: int, vocab_splits: int | None) -> tuple[int, int]:
    """(tokens per tile, vocabulary words per tile) for the given arguments.

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


def _row_logsumexp(logits: torch.Tensor) -> torch.Tensor:
    if use_triton(logits):
        from . import _triton_cross_entropy as kernels

        return kernels.row_logsumexp(logits)
    return torch.logsumexp(logits.float(), dim=-1)


def _softmax_grad_(logits: torch.Tensor, lse: torch.Tensor, target: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """In place: (softmax(logits) - onehot(target)) * scale per row; target outside the tile matches no column."""
    if use_triton(logits):
        from . import _triton_cross_entropy as kernels

        return kernels.softmax_grad_(logits, lse, target, scale)
    vocab = logits.shape[1]
    grad = (logits.float() - lse[:, None]).exp_()
    in_tile = (target >= 0) & (target < vocab)
    grad.scatter_add_(1, target.clamp(0, vocab - 1)[:, None], -in_tile.to(grad.dtype)[:, None])
    grad.mul_(scale[:, None])
    return logits.copy_(grad)


def _compensated_add_(hi: torch.Tensor, lo: torch.Tensor, part: torch.Tensor) -> None:
    """In place: (hi, lo) <- (rounded sum, rounding residual) of hi + lo + part (part fp32)."""
    if use_triton(hi):
        from . import _triton_cross_entropy as kernels

        kernels.compensated_add_(hi, lo, part)
        return
    total = hi.float().add_(lo.float()).add_(part)
    hi.copy_(total)
    lo.copy_(total.sub_(hi.float()))


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


class _ChunkLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden_states: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        padding_idx: int,
        token_tile: int,
        vocab_tile: int,
    ) -> torch.Tensor:
        hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
        targets = labels.reshape(-1).long()
        num_tokens, vocab = hidden.shape[0], weight.shape[0]
        lse = torch.empty(num_tokens, dtype=torch.float32, device=hidden.device)
        loss = torch.empty(num_tokens, dtype=torch.float32, device=hidden.device)
        with _autocast_off(hidden.device):
            for t0 in range(0, num_tokens, token_tile):
                t1 = min(t0 + token_tile, num_tokens)
                hidden_tile, target_tile = hidden[t0:t1], targets[t0:t1]
                lse_tile = torch.full((t1 - t0,), float("-inf"), dtype=torch.float32, device=hidden.device)
                target_logit = torch.zeros(t1 - t0, dtype=torch.float32, device=hidden.device)
                for v0 in range(0, vocab, vocab_tile):
                    v1 = min(v0 + vocab_tile, vocab)
                    logits = hidden_tile @ weight[v0:v1].to(hidden.dtype).t()
                    lse_tile = torch.logaddexp(lse_tile, _row_logsumexp(logits))
                    column = target_tile - v0
                    in_tile = (column >= 0) & (column < v1 - v0)
                    picked = logits.gather(1, column.clamp(0, v1 - v0 - 1)[:, None])[:, 0].float()
                    target_logit = torch.where(in_tile, picked, target_logit)
                    del logits  # free this tile before the next one is allocated
                lse[t0:t1] = lse_tile
                loss[t0:t1] = torch.where(target_tile != padding_idx, lse_tile - target_logit, 0.0)
        ctx.save_for_backward(hidden_states, weight, labels, lse)
        ctx.padding_idx = padding_idx
        ctx.tiles = (token_tile, vocab_tile)
        return loss.view(labels.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden_states, weight, labels, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        token_tile, vocab_tile = ctx.tiles
        hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
        targets = labels.reshape(-1).long()
        num_tokens, dim = hidden.shape
        vocab = weight.shape[0]
        # Padding tokens get no gradient whatever the incoming gradient says.
        scale = torch.where(targets != ctx.padding_idx, grad_loss.reshape(-1).float(), 0.0)
        fp32_out = _fp32_out_matmul_ok(hidden.device)

        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = residual = None
        if need_weight:
            grad_weight = torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device)
            if weight.dtype not in (torch.float32, torch.float64):
                residual = torch.zeros_like(grad_weight)

        with _autocast_off(hidden.device):
            for t0 in range(0, num_tokens, token_tile):
                t1 = min(t0 + token_tile, num_tokens)
                hidden_tile = hidden[t0:t1]
                acc_hidden = torch.zeros((t1 - t0, dim), dtype=torch.float32, device=hidden.device) if need_hidden else None
                for v0 in range(0, vocab, vocab_tile):
                    v1 = min(v0 + vocab_tile, vocab)
                    weight_tile = weight[v0:v1].to(hidden.dtype)
                    logits = hidden_tile @ weight_tile.t()
                    dlogits = _softmax_grad_(logits, lse[t0:t1], targets[t0:t1] - v0, scale[t0:t1])
                    if need_hidden:
                        _add_matmul_(acc_hidden, dlogits, weight_tile, fp32_out)
                    if need_weight:
                        if residual is None:
                            _add_matmul_(grad_weight[v0:v1], dlogits.t(), hidden_tile, fp32_out)
                        else:
                            part = _fp32_matmul(dlogits.t(), hidden_tile, fp32_out)
                            _compensated_add_(grad_weight[v0:v1], residual[v0:v1], part)
                            del part
                    del logits, dlogits
                if need_hidden:
                    grad_hidden[t0:t1] = acc_hidden
                    del acc_hidden
        grad_hidden_states = grad_hidden.view(hidden_states.shape) if need_hidden else None
        return grad_hidden_states, grad_weight, None, None, None, None


@register_op("b l d^, n^ d^, b l -> b l")
def chunk_linear_cross_entropy(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    padding_idx: int,
    chunk_size: int = 1024,
    vocab_splits: int | None = None,
) -> torch.Tensor:
    """Per-token cross-entropy of ``hidden_states @ weight.T`` against ``labels``, in fp32.

    hidden_states [b, l, d] (any leading dims), weight [n, d], labels [b, l] integer with values
    in [0, n) or equal to ``padding_idx``; hidden_states sets the compute dtype (fp32, bf16 or
    fp16; weight is cast tile by tile if it differs). Returns loss [b, l] fp32; tokens whose label
    is ``padding_idx`` get 0 loss and 0 gradient. hidden_states and weight get gradients in their
    own dtypes.

    Memory: at most ``chunk_size`` x n logits exist at once (plus, on the PyTorch path used off
    CUDA, an fp32 copy of them), an fp32 buffer of ``chunk_size * vocab_splits`` x d, and for a
    bf16/fp16 weight one extra weight-sized buffer during the backward. ``vocab_splits`` (None:
    automatic, see ``tile_sizes``) cuts each chunk's vocabulary into blocks so the token chunk
    can be ``vocab_splits`` times longer at the same memory. Cost: 4 matrix products of
    2*tokens*d*n flops (the backward recomputes the logits) plus one read of the logits in the
    forward and one read-write in the backward.
    """
    if hidden_states.shape[:-1] != labels.shape:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal hidden_states shape without its last dim "
            f"{tuple(hidden_states.shape[:-1])}"
        )
    if weight.dim() != 2 or weight.shape[1] != hidden_states.shape[-1]:
        raise ValueError(
            f"weight must be [vocab, {hidden_states.shape[-1]}] to match hidden_states, got {tuple(weight.shape)}"
        )
    token_tile, vocab_tile = tile_sizes(labels.numel(), weight.shape[0], chunk_size, vocab_splits)
    return _ChunkLinearCrossEntropy.apply(hidden_states, weight, labels, padding_idx, token_tile, vocab_tile)
