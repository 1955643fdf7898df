"""Output projection + cross-entropy over a large vocabulary, one tile of logits at a time.

At 131072 tokens and a 128256-word vocabulary the logits alone are 34 GB in bf16 (67 GB once
upcast to fp32). This op never holds more than one tile of them, and takes its gradients by one
of two paths.

Precompute path (the default whenever a gradient is needed; as in Liger-Kernel's fused linear
cross-entropy): the forward takes the gradients too, for an incoming gradient of 1 per token.
For each chunk of tokens it computes the logits of the whole vocabulary into one buffer, their
logsumexp and the loss, turns the buffer into ``softmax - onehot`` in place (0 for padding
tokens), and multiplies it into the hidden-state gradient of the chunk and the running weight
gradient: 3 matrix products of 2*tokens*d*n flops in all. The backward scales these saved
gradients by the real incoming gradient: per token for the hidden states (exact for any
incoming gradient), by one number for the weight, which is exact only when the incoming
gradient is the same for every non-padding token (``loss.sum()``, ``loss.sum() / count``,
``loss.mean()``); otherwise the weight gradient is recomputed as on the recompute path (2 more
products). The whole vocabulary of a chunk must be in memory before any of its gradient is
known, so the chunk is kept short (640 MiB of logits by default) and the weight gradient is
updated once per chunk.

Recompute path (``precompute_grad=False``): the forward saves only the inputs and the
logsumexp (fp32); the backward recomputes each tile's logits, turns them into ``(softmax -
onehot) * grad`` in place and multiplies them into both gradients: 4 products. Tiles: the tokens
(flattened batch x sequence) are cut into chunks of ``chunk_size * vocab_splits`` rows and the
vocabulary into ``vocab_splits`` blocks, so a tile holds at most ``chunk_size`` rows' worth of
full-vocabulary logits. Splitting the vocabulary lets the token chunk grow without more memory,
which matters for the weight gradient: it is accumulated once per token chunk, and at
Llama-3-8B sizes a read-modify-write of the whole [n, d] gradient after only 1024 tokens (4.2 GB
of fp32 traffic, ~1.4 ms on an H100) takes about as long as that chunk's 1.1 TFLOP product
(~1.5 ms).

Accumulation: the weight gradient is summed over token chunks in fp32 when the weight is fp32;
for bf16/fp16 weights, an fp32 buffer of the whole weight (2.1 GB for Llama-3-8B) would break
the memory budget, so it is kept as the gradient itself plus a second buffer of the weight's
dtype holding the rounding residual (compensated summation: about 16 significant bits carried
between chunks, against fp32's 24 and bf16's 8). On the recompute path each chunk's product
arrives in fp32. On the precompute path, when the logits are in the weight's dtype, the product
is added to the residual inside the matrix product (one rounding, relative to the residual's
share of the sum, as the single rounding of an eager bf16 gradient is relative to the whole sum)
and the pair is renormalised once every 4 chunks: much less accumulator traffic per chunk, which
the precompute path's short chunks need, while the residual never holds more than 4 chunks'
share of the sum. The hidden-state gradient of a token is summed over the vocabulary in
fp32 inside the matrix products (or in an fp32 buffer of one chunk) and rounded once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dimshard.planner.ops.registry import OpCall, register_op

from .chunk_loss.tile_math import (
    _add_bias_grad_,
    _add_matmul_,
    _autocast_off,
    _chain_slope_,
    _fp32_matmul,
    _fp32_out_matmul_ok,
    _logit_map_slope,
    _map_logits_,
    _new_weight_grad,
    _rows,
    _uniform_value,
)
from .chunk_loss.tiling import _RECOMPUTE_CHUNK, _RENORMALISE_EVERY, _Plan, precompute_tile_sizes, tile_sizes
from .triton_kernels.common import use_triton


def chunk_linear_cross_entropy_reference(
    hidden_states: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, padding_idx: int,
    bias: torch.Tensor | None = None, logit_scale: float | None = None, softcap: float | None = None,
) -> torch.Tensor:
    """Eager reference: full logits in the input dtype, upcast to fp32, ``F.cross_entropy``.

    This is what Hugging Face's causal-LM loss does before its mean, with the final projection's
    ``bias``, then ``logit_scale`` (a factor: Cohere's ``logit_scale``, Granite's
    ``1 / logits_scaling``), then ``softcap * tanh(logits / softcap)`` (Gemma 2's
    ``final_logit_softcapping``). Returns per-token loss [b, l] in fp32, 0 where
    ``labels == padding_idx``.
    """
    logits = F.linear(hidden_states, weight, bias)
    if logit_scale is not None:
        logits = logits * logit_scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits.float()
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=padding_idx, reduction="none"
    )
    return loss.view(labels.shape)


def _row_logsumexp(logits: torch.Tensor) -> torch.Tensor:
    if use_triton(logits):
        from .triton_kernels import cross_entropy as kernels

        return kernels.row_logsumexp(logits)
    return torch.logsumexp(logits.float(), dim=-1)


def _softmax_grad_(logits: torch.Tensor, lse: torch.Tensor, target: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """In place: (softmax(logits) - onehot(target)) * scale per row; target outside the tile matches no column."""
    if use_triton(logits):
        from .triton_kernels import cross_entropy as kernels

        return kernels.softmax_grad_(logits, lse, target, scale)
    vocab = logits.shape[1]
    grad = (logits.float() - lse[:, None]).exp_()
    in_tile = (target >= 0) & (target < vocab)
    grad.scatter_add_(1, target.clamp(0, vocab - 1)[:, None], -in_tile.to(grad.dtype)[:, None])
    grad.mul_(scale[:, None])
    return logits.copy_(grad)


def _compensated_add_(hi: torch.Tensor, lo: torch.Tensor, part: torch.Tensor | None) -> None:
    """In place: (hi, lo) <- (rounded sum, rounding residual) of hi + lo + part (part fp32; None: 0)."""
    if use_triton(hi):
        from .triton_kernels import cross_entropy as kernels

        kernels.compensated_add_(hi, lo, part)
        return
    total = hi.float().add_(lo.float())
    if part is not None:
        total.add_(part)
    hi.copy_(total)
    lo.copy_(total.sub_(hi.float()))


def _add_weight_grad_(
    grad: torch.Tensor, residual: torch.Tensor | None, dlogits_t: torch.Tensor, hidden: torch.Tensor, fp32_out: bool
) -> None:
    """grad += dlogits_t @ hidden, in fp32: directly for an fp32 weight, else compensated into (grad, residual)."""
    if residual is None:
        _add_matmul_(grad, dlogits_t, hidden, fp32_out)
        return
    part = _fp32_matmul(dlogits_t, hidden, fp32_out)
    _compensated_add_(grad, residual, part)


def _fold_block(
    logits: torch.Tensor, column: torch.Tensor, lse: torch.Tensor, target_logit: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold one vocabulary block's logits into its rows' running logsumexp and target logit.

    ``column`` is each row's target minus the block's first word; one outside the block leaves
    the target logit as it was.
    """
    width = logits.shape[1]
    lse = torch.logaddexp(lse, _row_logsumexp(logits))
    in_block = (column >= 0) & (column < width)
    picked = logits.gather(1, column.clamp(0, width - 1)[:, None])[:, 0].float()
    return lse, torch.where(in_block, picked, target_logit)


def _loss_tiles(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    padding_idx: int,
    token_tile: int,
    vocab_tile: int,
    bias: torch.Tensor | None,
    plan: _Plan,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and logsumexp per token (fp32 [tokens]) without gradient work; hidden [tokens, d]."""
    num_tokens, vocab = hidden.shape[0], weight.shape[0]
    lse = torch.empty(num_tokens, dtype=torch.float32, device=hidden.device)
    loss = torch.empty(num_tokens, dtype=torch.float32, device=hidden.device)
    for t0 in range(0, num_tokens, token_tile):
        t1 = min(t0 + token_tile, num_tokens)
        hidden_tile, target_tile = hidden[t0:t1], targets[t0:t1]
        lse_tile = torch.full((t1 - t0,), float("-inf"), dtype=torch.float32, device=hidden.device)
        target_logit = torch.zeros(t1 - t0, dtype=torch.float32, device=hidden.device)
        for v0 in range(0, vocab, vocab_tile):
            v1 = min(v0 + vocab_tile, vocab)
            logits = _map_logits_(hidden_tile @ weight[v0:v1].to(hidden.dtype).t(), _rows(bias, v0, v1), plan)
            lse_tile, target_logit = _fold_block(logits, target_tile - v0, lse_tile, target_logit)
            del logits  # free this tile before the next one is allocated
        lse[t0:t1] = lse_tile
        loss[t0:t1] = torch.where(target_tile != padding_idx, lse_tile - target_logit, 0.0)
    return loss, lse


def _loss_and_grads_tiles(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    padding_idx: int,
    chunk: int,
    vocab_tile: int,
    need_hidden: bool,
    need_weight: bool,
    bias: torch.Tensor | None,
    plan: _Plan,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Precompute path: loss, logsumexp, and the gradients for an incoming gradient of 1 per token.

    Returns (loss, lse) fp32 [tokens], the hidden-state gradient [tokens, d] in hidden's dtype
    (None unless ``need_hidden``), the weight gradient [n, d] in weight's dtype (None unless
    ``need_weight``) and the bias gradient [n] fp32 (None unless ``plan.need_bias``). Padding
    tokens get 0 loss and contribute nothing to any gradient.
    """
    num_tokens, dim = hidden.shape
    vocab, dtype, device = weight.shape[0], hidden.dtype, hidden.device
    fp32_out = _fp32_out_matmul_ok(device)
    # A weight wider than the compute dtype (fp32 master weights, bf16 activations) is cast once
    # rather than twice per block per chunk: its gradient accumulates in fp32 with no residual,
    # so the copy takes the memory the residual takes for a bf16 weight.
    product_weight = weight.to(dtype) if weight.element_size() > hidden.element_size() else weight
    same_dtype = product_weight.dtype == dtype
    valid = targets != padding_idx
    token_scale = valid.float()  # d loss_t / d loss_t, and 0 for padding tokens
    lse = torch.empty(num_tokens, dtype=torch.float32, device=device)
    loss = torch.empty(num_tokens, dtype=torch.float32, device=device)
    grad_hidden = torch.empty((num_tokens, dim), dtype=dtype, device=device) if need_hidden else None
    grad_weight, residual = _new_weight_grad(weight) if need_weight else (None, None)
    grad_bias = torch.zeros(vocab, dtype=torch.float32, device=device) if plan.need_bias else None
    # One buffer for every chunk: its logits, then (in place) their gradient.
    buffer = torch.empty((min(chunk, num_tokens), vocab), dtype=dtype, device=device)
    for index, t0 in enumerate(range(0, num_tokens, chunk)):
        t1 = min(t0 + chunk, num_tokens)
        renormalise = (index + 1) % _RENORMALISE_EVERY == 0 or t1 == num_tokens
        hidden_chunk, target_chunk = hidden[t0:t1], targets[t0:t1]
        logits = buffer[: t1 - t0]
        lse_chunk = torch.full((t1 - t0,), float("-inf"), dtype=torch.float32, device=device)
        target_logit = torch.zeros(t1 - t0, dtype=torch.float32, device=device)
        for v0 in range(0, vocab, vocab_tile):
            v1 = min(v0 + vocab_tile, vocab)
            block = logits[:, v0:v1]
            # A column block of the buffer: cuBLAS writes it in place through its row stride.
            torch.mm(hidden_chunk, product_weight[v0:v1].to(dtype).t(), out=block)
            _map_logits_(block, _rows(bias, v0, v1), plan)
            lse_chunk, target_logit = _fold_block(block, target_chunk - v0, lse_chunk, target_logit)
        lse[t0:t1] = lse_chunk
        loss[t0:t1] = torch.where(valid[t0:t1], lse_chunk - target_logit, 0.0)
        # The softmax needs the whole row's logsumexp, so only now can the gradients start.
        for v0 in range(0, vocab, vocab_tile):
            v1 = min(v0 + vocab_tile, vocab)
            slope = _logit_map_slope(logits[:, v0:v1], plan)  # from the mapped logits, before they are overwritten
            block = _softmax_grad_(logits[:, v0:v1], lse_chunk, target_chunk - v0, token_scale[t0:t1])
            _add_bias_grad_(_rows(grad_bias, v0, v1), _chain_slope_(block, slope))
        if need_hidden:
            if same_dtype and fp32_out and dtype in (torch.bfloat16, torch.float16):
                # fp32 result: cuBLAS may split a K of the whole vocabulary, and its partial sums
                # must not be rounded to bf16 (allow_bf16_reduced_precision_reduction).
                grad_hidden[t0:t1] = torch.mm(logits, product_weight, out_dtype=torch.float32)
            elif same_dtype:
                torch.mm(logits, product_weight, out=grad_hidden[t0:t1])
            else:
                acc = torch.zeros((t1 - t0, dim), dtype=torch.float32, device=device)
                for v0 in range(0, vocab, vocab_tile):
                    v1 = min(v0 + vocab_tile, vocab)
                    _add_matmul_(acc, logits[:, v0:v1], product_weight[v0:v1].to(dtype), fp32_out)
                grad_hidden[t0:t1] = acc
                del acc
        if need_weight:
            for v0 in range(0, vocab, vocab_tile):
                v1 = min(v0 + vocab_tile, vocab)
                dlogits_t = logits[:, v0:v1].t()
                if residual is not None and dlogits_t.dtype == residual.dtype:
                    # Into the residual inside the product, renormalised every few chunks (see
                    # the module docstring).
                    residual[v0:v1].addmm_(dlogits_t, hidden_chunk)
                    if renormalise:
                        _compensated_add_(grad_weight[v0:v1], residual[v0:v1], None)
                else:
                    _add_weight_grad_(grad_weight[v0:v1], None if residual is None else residual[v0:v1],
                                      dlogits_t, hidden_chunk, fp32_out)
    return loss, lse, grad_hidden, grad_weight, grad_bias


def _recompute_grads(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    scale: torch.Tensor,
    token_tile: int,
    vocab_tile: int,
    need_hidden: bool,
    need_weight: bool,
    bias: torch.Tensor | None,
    plan: _Plan,
    grad_weight: torch.Tensor | None = None,
    grad_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Recompute path: gradients for the incoming gradient ``scale`` (fp32 per token, 0 for padding).

    Returns (grad_hidden [tokens, d] or None, grad_weight [n, d] or None, grad_bias [n] fp32 or
    None). ``grad_weight``/``grad_bias``, when given, are zeroed buffers to accumulate into; the
    bias gradient is taken when ``grad_bias`` is given or ``plan.need_bias`` and ``need_weight``.
    """
    num_tokens, dim = hidden.shape
    vocab = weight.shape[0]
    fp32_out = _fp32_out_matmul_ok(hidden.device)
    grad_hidden = torch.empty_like(hidden) if need_hidden else None
    residual = None
    if need_weight:
        if grad_weight is None:
            grad_weight, residual = _new_weight_grad(weight)
        elif weight.dtype not in (torch.float32, torch.float64):
            residual = torch.zeros_like(grad_weight)
    if grad_bias is None and plan.need_bias:
        grad_bias = torch.zeros(vocab, dtype=torch.float32, device=hidden.device)
    for t0 in range(0, num_tokens, token_tile):
        t1 = min(t0 + token_tile, num_tokens)
        hidden_tile = hidden[t0:t1]
        acc_hidden = torch.zeros((t1 - t0, dim), dtype=torch.float32, device=hidden.device) if need_hidden else None
        for v0 in range(0, vocab, vocab_tile):
            v1 = min(v0 + vocab_tile, vocab)
            weight_tile = weight[v0:v1].to(hidden.dtype)
            logits = _map_logits_(hidden_tile @ weight_tile.t(), _rows(bias, v0, v1), plan)
            slope = _logit_map_slope(logits, plan)
            dlogits = _chain_slope_(_softmax_grad_(logits, lse[t0:t1], targets[t0:t1] - v0, scale[t0:t1]), slope)
            _add_bias_grad_(_rows(grad_bias, v0, v1), dlogits)
            if need_hidden:
                _add_matmul_(acc_hidden, dlogits, weight_tile, fp32_out)
            if need_weight:
                _add_weight_grad_(grad_weight[v0:v1], None if residual is None else residual[v0:v1],
                                  dlogits.t(), hidden_tile, fp32_out)
            del logits, dlogits, slope
        if need_hidden:
            grad_hidden[t0:t1] = acc_hidden
            del acc_hidden
    return grad_hidden, grad_weight, grad_bias


class _ChunkLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden_states: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None,
        padding_idx: int, plan: _Plan,
    ) -> torch.Tensor:
        hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
        targets = labels.reshape(-1).long()
        grads: tuple[torch.Tensor | None, ...] = ()
        with _autocast_off(hidden.device):
            if plan.precompute_tiles is not None:
                loss, lse, grad_hidden, grad_weight, grad_bias = _loss_and_grads_tiles(
                    hidden, weight, targets, padding_idx, *plan.precompute_tiles, plan.need_hidden,
                    plan.need_weight, bias, plan,
                )
                grads = (grad_hidden, grad_weight, grad_bias)
            else:
                loss, lse = _loss_tiles(hidden, weight, targets, padding_idx, *plan.recompute_tiles, bias, plan)
        # The precomputed gradients go through save_for_backward, not ctx attributes, so that
        # saved-tensor hooks govern them like any activation: under non-reentrant activation
        # checkpointing they are dropped after the first forward and the recomputed forward's
        # are the ones the backward receives.
        ctx.save_for_backward(hidden_states, weight, labels, bias, lse, *grads)
        ctx.padding_idx = padding_idx
        ctx.plan = plan
        ctx.precomputed_used = False
        return loss.view(labels.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden_states, weight, labels, bias, lse, *precomputed = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        plan: _Plan = ctx.plan
        hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
        targets = labels.reshape(-1).long()
        valid = targets != ctx.padding_idx
        # Padding tokens get no gradient whatever the incoming gradient says.
        scale = torch.where(valid, grad_loss.reshape(-1).float(), 0.0)
        grad_hidden = grad_weight = grad_bias = None
        with _autocast_off(hidden.device):
            if precomputed and not ctx.precomputed_used:
                # The saved buffers are scaled in place and handed out as the gradients (no
                # second gradient-sized buffer). A later backward through a retained graph
                # must not see them again: it takes the recompute path.
                ctx.precomputed_used = True
                grad_hidden, grad_weight, grad_bias = precomputed
                # Only the weight and bias need to know (a hidden-state gradient is always scaled per token).
                uniform = _uniform_value(grad_loss, valid) if need_weight or plan.need_bias else None
                # In place through .data: the saved tensors' version counters stay as saved,
                # so a retained graph can still unpack them for the recompute path.
                if need_hidden and uniform != 1.0:
                    grad_hidden.data.mul_(scale[:, None])  # per token: exact for any incoming gradient
                if (need_weight or plan.need_bias) and uniform is None:
                    # Gradients summed over tokens cannot be rescaled per token: recompute them.
                    for grad in (grad_weight, grad_bias):
                        if grad is not None:
                            grad.data.zero_()
                    _recompute_grads(hidden, weight, targets, lse, scale, *plan.recompute_tiles, False, need_weight,
                                     bias, plan, grad_weight=None if grad_weight is None else grad_weight.data,
                                     grad_bias=None if grad_bias is None else grad_bias.data)
                elif uniform is not None and uniform != 1.0:
                    for grad in (grad_weight, grad_bias):
                        if grad is not None:
                            grad.data.mul_(uniform)
            else:
                grad_hidden, grad_weight, grad_bias = _recompute_grads(
                    hidden, weight, targets, lse, scale, *plan.recompute_tiles, need_hidden, need_weight, bias, plan
                )
        grad_hidden_states = grad_hidden.view(hidden_states.shape) if need_hidden else None
        grad_bias = grad_bias.to(bias.dtype) if plan.need_bias and grad_bias is not None else None
        return grad_hidden_states, grad_weight if need_weight else None, None, grad_bias, None, None


def linear_cross_entropy_dim_rule(call: OpCall) -> str:
    """``b l d^, n^ d^, b l -> b l``, and ``n^`` for the bias when there is one (the vocabulary stays whole)."""
    return "b l d^, n^ d^, b l" + (", n^" if len(call.inputs) > 3 else "") + " -> b l"


@register_op(linear_cross_entropy_dim_rule, cost="linear_cross_entropy", role="token_loss")
def chunk_linear_cross_entropy(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    padding_idx: int,
    chunk_size: int | None = None,
    vocab_splits: int | None = None,
    precompute_grad: bool | None = None,
    *,
    bias: torch.Tensor | None = None,
    logit_scale: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Per-token cross-entropy of ``hidden_states @ weight.T`` against ``labels``, in fp32.

    The logits may be those of a final projection with more than a weight, all applied inside
    each tile (never to full logits): ``bias`` [n] is added, then the logits are multiplied by
    ``logit_scale``, then soft-capped to ``softcap * tanh(logits / softcap)``, in that order (as
    ``chunk_linear_cross_entropy_reference``); the bias gets a gradient (in its dtype) when it
    requires one.

    hidden_states [b, l, d] (any leading dims), weight [n, d], labels [b, l] integer with values
    in [0, n) or equal to ``padding_idx``; hidden_states sets the compute dtype (fp32, bf16 or
    fp16; weight is cast block by block if it differs). Returns loss [b, l] fp32; tokens whose
    label is ``padding_idx`` get 0 loss and 0 gradient. hidden_states and weight get gradients in
    their own dtypes.

    ``precompute_grad``: None (the default) or True takes the gradients in the forward whenever
    one is needed (grad mode on and hidden_states or weight requiring grad; never on the meta
    device); False always recomputes the logits in the backward. With neither input needing a
    gradient (evaluation, ``torch.no_grad``) the forward does no gradient work on either path; a
    forward under grad mode that no backward follows has still paid for the gradients.

    Precompute path: 3 matrix products of 2*tokens*d*n flops, all in the forward. The backward
    scales the saved gradients: the hidden-state gradient per token (exact for any incoming
    gradient); the weight gradient by one number when the incoming gradient is the same for
    every non-padding token (checked on the device, one host sync per backward), otherwise it is
    recomputed (2 more products, with the recompute path's backward memory). Memory: both
    gradients exist from the forward on (they are the gradients the backward returns, scaled in
    place, not copied), plus ``chunk_size`` x n logits (None: 640 MiB of them), during the
    forward a weight-sized buffer in the weight's dtype for a bf16/fp16 weight (the residual) or
    in the compute dtype for a weight wider than hidden_states (its cast copy), and off CUDA an
    fp32 copy of one vocabulary block of the logits. A second backward through a retained graph
    recomputes.

    Recompute path: 4 products (the backward recomputes the logits). Memory: at most
    ``chunk_size`` x n logits (None: 1024 x n; plus, off CUDA, an fp32 copy of them), an fp32
    buffer of ``chunk_size * vocab_splits`` x d, and for a bf16/fp16 weight one weight-sized
    residual during the backward. ``vocab_splits`` (None: automatic, see ``tile_sizes``) cuts
    each chunk's vocabulary into blocks so the token chunk can be ``vocab_splits`` times longer
    at the same memory.

    Under non-reentrant activation checkpointing the forward runs twice with grad enabled, so
    both runs take the gradients; the recomputed run's are the ones the backward uses.
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
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be [vocab] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be positive, got {softcap}")
    num_tokens, vocab = labels.numel(), weight.shape[0]
    recompute_chunk = _RECOMPUTE_CHUNK if chunk_size is None else chunk_size
    recompute_tiles = tile_sizes(num_tokens, vocab, recompute_chunk, vocab_splits)
    # Decided here, not in forward: autograd runs Function.forward with grad mode off.
    grad_on = torch.is_grad_enabled()
    need_hidden, need_weight = grad_on and hidden_states.requires_grad, grad_on and weight.requires_grad
    precompute_tiles = None
    if (need_hidden or need_weight) and precompute_grad is not False and hidden_states.device.type != "meta":
        precompute_tiles = precompute_tile_sizes(
            num_tokens, vocab, hidden_states.element_size(), chunk_size, vocab_splits
        )
    need_bias = grad_on and bias is not None and bias.requires_grad
    if need_bias and precompute_tiles is None and hidden_states.device.type != "meta" and precompute_grad is not False:
        precompute_tiles = precompute_tile_sizes(num_tokens, vocab, hidden_states.element_size(), chunk_size,
                                                 vocab_splits)
    plan = _Plan(recompute_tiles, precompute_tiles, need_hidden, need_weight, need_bias,
                 None if logit_scale is None else float(logit_scale), None if softcap is None else float(softcap))
    return _ChunkLinearCrossEntropy.apply(hidden_states, weight, labels, bias, padding_idx, plan)
