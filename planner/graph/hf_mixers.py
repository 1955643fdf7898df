"""Hugging Face's recurrent mixers as dimshard's recurrent ops: one traced op per scan and per convolution.

Transformers' linear-attention and state-space mixers (Mamba, Mamba2 and its hybrids Bamba, Falcon-H1,
NemotronH, Granite-4, Jamba, LFM2, Qwen3-Next, Kimi-Linear) call module-level functions of their
modeling module for each scan and short convolution: a hub kernel or package kernel when one is
installed, else a PyTorch path. Inside ``recurrent_mixers(model)`` those functions are dimshard's ops
(``kernels/recurrent/``) with the same arguments and values, so the tracer records one op per call,
with its annotation, where the PyTorch path would be hundreds of ops (and a loop over tokens for
Mamba's). The fused shortcuts that would bypass them (``mamba_inner_fn``,
``mamba2_split_conv1d_scan_combined``) return None inside, which is what the mixers take as "use the
unfused path". Calls the ops do not cover (packed ``seq_idx`` / ``cu_seqlens``) go to the original
function. Everything is restored on exit; models without these functions are untouched.
``planner/graph/hf.py``'s ``chunked_causal_lm_forward`` (the training forward the compile traces)
runs the decoder inside it (docs/design.md, "Recurrent layers").
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch


def _conv(original: Callable) -> Callable:
    def causal_conv1d_fn(hidden_states: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                         activation: str | None = None, seq_idx: Any = None, **kwargs: Any) -> torch.Tensor:
        if seq_idx is not None or kwargs.get("initial_states") is not None:
            return original(hidden_states, weight, bias, activation=activation, seq_idx=seq_idx, **kwargs)
        from dimshard.kernels.recurrent import causal_conv1d

        return causal_conv1d(hidden_states, weight, bias, activation=activation)
    return causal_conv1d_fn


def _mamba2_scan(original: Callable) -> Callable:
    def mamba2_chunk_scan(hidden_states: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                          C: torch.Tensor, chunk_size: int = 256, D: torch.Tensor | None = None,
                          dt_bias: torch.Tensor | None = None, initial_states: torch.Tensor | None = None,
                          dt_softplus: bool = False, dt_limit: tuple[float, float] = (0.0, math.inf),
                          return_final_states: bool = False, **kwargs: Any) -> Any:
        if any(kwargs.get(name) is not None for name in ("seq_idx", "cu_seqlens", "z")):
            return original(hidden_states, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias,
                            initial_states=initial_states, dt_softplus=dt_softplus, dt_limit=dt_limit,
                            return_final_states=return_final_states, **kwargs)
        from dimshard.kernels.recurrent import state_space_dual

        result = state_space_dual(hidden_states, dt, A, B, C, D, dt_bias, initial_states, chunk_size=chunk_size,
                                  dt_softplus=dt_softplus, dt_limit=tuple(dt_limit),
                                  output_final_state=return_final_states)
        y, state = result if return_final_states else (result, None)
        y = y if y.dtype == torch.float32 else y.float()  # transformers' scan returns float32
        return (y, state) if return_final_states else y
    return mamba2_chunk_scan


def _selective_scan(original: Callable) -> Callable:
    def mamba_selective_scan(hidden_states: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                             C: torch.Tensor, D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                             delta_bias: torch.Tensor | None = None, delta_softplus: bool = False,
                             return_last_state: bool = False, **kwargs: Any) -> Any:
        from dimshard.kernels.recurrent import selective_scan

        return selective_scan(hidden_states, dt, A, B, C, D, z, delta_bias, delta_softplus=delta_softplus,
                              output_final_state=return_last_state)
    return mamba_selective_scan


def _delta_rule(original: Callable) -> Callable:
    def chunk_gated_delta_rule(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, g: torch.Tensor,
                               beta: torch.Tensor, chunk_size: int = 64, initial_state: torch.Tensor | None = None,
                               output_final_state: bool = False, use_qk_l2norm_in_kernel: bool = False,
                               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        if kwargs.get("cu_seqlens") is not None:
            return original(query, key, value, g, beta, chunk_size, initial_state, output_final_state,
                            use_qk_l2norm_in_kernel, **kwargs)
        from dimshard.kernels.recurrent import gated_delta_rule

        result = gated_delta_rule(query, key, value, g, beta, initial_state, use_qk_l2norm=use_qk_l2norm_in_kernel,
                                  chunk_size=chunk_size, output_final_state=output_final_state)
        return result if output_final_state else (result, None)
    return chunk_gated_delta_rule


def _no_fused_shortcut(original: Callable) -> Callable:
    def unfused(*args: Any, **kwargs: Any) -> None:
        return None  # the mixer then runs its unfused path, whose scans and convolutions are the ops above
    return unfused


# Module-level names in transformers' modeling modules -> the replacement built from the original.
REPLACEMENTS: dict[str, Callable[[Callable], Callable]] = {
    "causal_conv1d_fn": _conv,
    "mamba2_chunk_scan": _mamba2_scan,
    "mamba_selective_scan": _selective_scan,
    "torch_chunk_gated_delta_rule": _delta_rule,
    "chunk_kimi_delta_attention": _delta_rule,
    "mamba_inner_fn": _no_fused_shortcut,
    "mamba2_split_conv1d_scan_combined": _no_fused_shortcut,
}


def mixer_modules(model: torch.nn.Module) -> list[Any]:
    """The modeling modules of ``model``'s submodules that define at least one function ``REPLACEMENTS`` names."""
    sources: dict[str, Any] = {}
    for module in model.modules():
        source = sys.modules.get(type(module).__module__)
        if source is not None and any(hasattr(source, name) for name in REPLACEMENTS):
            sources.setdefault(source.__name__, source)
    return list(sources.values())


@contextlib.contextmanager
def recurrent_mixers(model: torch.nn.Module) -> Iterator[list[str]]:
    """Inside: the recurrent mixers of ``model`` call dimshard's recurrent ops; yields what was replaced
    (``modeling_mamba2.mamba2_chunk_scan``, ...) and restores every function on exit."""
    patched: list[tuple[Any, str, Any]] = []
    try:
        for source in mixer_modules(model):
            for name, replacement in REPLACEMENTS.items():
                original = getattr(source, name, None)
                if original is not None:
                    setattr(source, name, replacement(original))
                    patched.append((source, name, original))
        yield [f"{source.__name__.rsplit('.', 1)[-1]}.{name}" for source, name, _ in patched]
    finally:
        for source, name, original in reversed(patched):
            setattr(source, name, original)
