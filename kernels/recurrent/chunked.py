"""The chunked form shared by every linear recurrence dimshard runs: gated linear attention, the gated
delta rule, Mamba2's state-space dual and Mamba's selective scan are all instances of it.

Per batch and head, a state ``S`` [dk, dv] evolves over the sequence as

    S_t = (I - beta_t k_t k_t^T) diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T      (delta rule, ``beta`` given)
    S_t =                        diag(exp(g_t)) S_{t-1} +        k_t v_t^T      (linear attention, no ``beta``)
    o_t = S_t^T q_t

with a log-decay ``g_t`` <= 0 that is one number per head ([b, h, l]) or one per key channel
([b, h, l, dk]); no ``g`` means no decay. The sequence is cut into chunks of ``chunk_size`` tokens:
inside a chunk every interaction is a product of matrices (the pairwise decays ``exp(G_t - G_s)``
of the cumulative log-decay ``G`` are at most 1, so nothing overflows), and only the state crosses
chunk boundaries, in a loop over chunks, never over tokens. The delta rule's corrections inside a
chunk are one unit lower-triangular solve: ``u_s = beta_s (v_s - k_s^T exp(g_s) S_{s-1})`` is linear
in the earlier ``u_r``, so ``(I + A) U = beta (V - exp(G) K S_0)`` with ``A_sr = beta_s k_s^T diag(exp(G_s -
G_r)) k_r`` for r < s. docs/design.md, "Recurrent layers", states the derivation in full.

Everything is computed in float32 (float64 stays float64); autograd differentiates it, so the
backward is exact for the same function.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# (query, key, value, gates, beta, initial_state, chunk_size) -> (outputs, final state): ``chunked_recurrence``,
# or its sequence-split form (``sequence_split.py``), which the ops' references take as ``recurrence``.
Recurrence = Callable[..., "tuple[torch.Tensor, torch.Tensor]"]


def _decay_pairs(gates: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """exp(G_t - G_s) for s <= t, zero above the diagonal: [..., c, c] (per head) or [..., c, c, dk]."""
    chunk = gates.shape[-2] if per_channel else gates.shape[-1]
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=gates.device).tril()
    if per_channel:
        diff = gates[..., :, None, :] - gates[..., None, :, :]
        return diff.masked_fill(~causal[..., None], float("-inf")).exp()
    diff = gates[..., :, None] - gates[..., None, :]
    return diff.masked_fill(~causal, float("-inf")).exp()


def _pair_products(left: torch.Tensor, right: torch.Tensor, decay: torch.Tensor, per_channel: bool) -> torch.Tensor:
    """sum_i left_ti right_si decay_tsi: [..., c, c]."""
    if per_channel:
        return torch.einsum("...ti,...si,...tsi->...ts", left, right, decay)
    return (left @ right.transpose(-1, -2)) * decay


def chunked_recurrence(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    gates: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence of the module docstring in chunks; returns (o [b, h, l, dv], final state [b, h, dk, dv]).

    query, key [b, h, l, dk]; value [b, h, l, dv]; gates None, [b, h, l] or [b, h, l, dk] (log-decays,
    <= 0); beta None (linear attention) or [b, h, l] (delta rule); initial_state None (zeros) or
    [b, h, dk, dv]. Inputs are used as given (no scaling, no normalisation); the result is in the
    computation dtype (float32, or float64 for float64 inputs).
    """
    dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    batch, heads, length, key_dim = query.shape
    value_dim = value.shape[-1]
    chunk = max(1, min(chunk_size, length))
    pad = (-length) % chunk
    chunks = (length + pad) // chunk

    def blocks(x: torch.Tensor, vector: bool) -> torch.Tensor:
        x = x.to(dtype)
        x = torch.nn.functional.pad(x, (0, 0, 0, pad) if vector else (0, pad))
        return x.reshape(batch, heads, chunks, chunk, *x.shape[3:])

    q, k, v = blocks(query, True), blocks(key, True), blocks(value, True)
    per_channel = gates is not None and gates.dim() == 4
    if gates is None:
        gates = query.new_zeros(batch, heads, length, dtype=dtype)
    cumulative = blocks(gates, per_channel).cumsum(3)  # padded positions decay by exp(0): the state is kept
    decay = _decay_pairs(cumulative, per_channel)
    inner = cumulative if per_channel else cumulative[..., None]
    to_end = (inner[..., -1:, :] - inner).exp()  # exp(G_last - G_s)
    from_start = inner.exp()  # exp(G_t)
    chunk_decay = inner[..., -1, :].exp()  # [b, h, n, dk] or [b, h, n, 1]
    scores = _pair_products(q, k, decay, per_channel)
    q_start = q * from_start
    k_end = k * to_end

    if beta is not None:
        rate = blocks(beta, False)[..., None]
        strict = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril(-1)
        system = (_pair_products(k, k, decay, per_channel) * rate).masked_fill(~strict, 0.0)
        system = system + torch.eye(chunk, dtype=dtype, device=q.device)
        corrected_values = torch.linalg.solve_triangular(system, v * rate, upper=False, unitriangular=True)
        state_readers = torch.linalg.solve_triangular(system, k * from_start * rate, upper=False, unitriangular=True)

    state = (initial_state.to(dtype) if initial_state is not None
             else q.new_zeros(batch, heads, key_dim, value_dim))
    outputs = []
    for n in range(chunks):
        if beta is not None:
            u = corrected_values[:, :, n] - state_readers[:, :, n] @ state
        else:
            u = v[:, :, n]
        outputs.append(q_start[:, :, n] @ state + scores[:, :, n] @ u)
        state = state * chunk_decay[:, :, n, :, None] + k_end[:, :, n].transpose(-1, -2) @ u
    out = torch.stack(outputs, dim=2).reshape(batch, heads, chunks * chunk, value_dim)
    return out[:, :, :length], state


def stepwise_recurrence(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    gates: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same recurrence one token at a time (the definition; tests compare ``chunked_recurrence`` with it)."""
    batch, heads, length, key_dim = query.shape
    state = (initial_state.clone() if initial_state is not None
             else query.new_zeros(batch, heads, key_dim, value.shape[-1]))
    outputs = []
    for t in range(length):
        if gates is not None:
            step = gates[:, :, t].exp()
            state = state * (step[..., None] if gates.dim() == 4 else step[..., None, None])
        k_t, v_t = key[:, :, t], value[:, :, t]
        if beta is not None:
            predicted = (k_t[..., None] * state).sum(-2)
            v_t = (v_t - predicted) * beta[:, :, t, None]
        state = state + k_t[..., None] * v_t[..., None, :]
        outputs.append((query[:, :, t, :, None] * state).sum(-2))
    return torch.stack(outputs, dim=2), state
