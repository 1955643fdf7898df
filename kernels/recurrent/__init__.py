"""Recurrent layers: linear attention, the delta rule, state-space scans and short convolutions.

Each op is registered for the planner with ``register_op`` where it is defined (one traced op per
layer; Hugging Face mixers reach them through ``planner/graph/hf_mixers.py``), next to its chunked
PyTorch reference (``chunked.py``: no loop over tokens, only over chunks); on CUDA a fused kernel
runs instead only after passing its check against that reference (``backends.py``):

- ``gated_delta_rule``        ``b l^ h e^, b l^ h e^, b l^ (h r^) f, b l^ (h r^)[ e^], b l^ (h r^) -> b l^ (h r^) f``
  (Gated DeltaNet, Qwen3-Next with more value than key heads; per-channel gates: Kimi's KDA; no gate:
  the delta rule)
- ``gated_linear_attention``  ``b l^ h e^, b l^ h e^, b l^ h f[, b l^ h[ e^]] -> b l^ h f`` (GLA, simple GLA)
- ``state_space_dual``        ``b l^ (g r^) p, b l^ (g r^), (g r^), b l^ g n^, b l^ g n^, ... -> b l^ (g r^) p``
  (Mamba2's SSD scan)
- ``selective_scan``          ``b d l^, b d l^, d n^, b n^ l^, b n^ l^, ... -> b d l^`` (Mamba)
- ``causal_conv1d``           ``b d l^, d k^[, d][, b d s^] -> b d l^`` (every family's short convolution)

``sequence_split.py`` holds the same ops with the sequence split across a process group (states passed
rank to rank, convolution halos). docs/design.md, "Recurrent layers", describes the chunked form, the
split and how each family maps onto them.
"""

from __future__ import annotations

from .conv import causal_conv1d, causal_conv1d_reference
from .delta_rule import gated_delta_rule, gated_delta_rule_reference
from .linear_attention import gated_linear_attention, gated_linear_attention_reference
from .selective_scan import selective_scan, selective_scan_reference
from .ssd import state_space_dual, state_space_dual_reference

__all__ = [
    "causal_conv1d",
    "causal_conv1d_reference",
    "gated_delta_rule",
    "gated_delta_rule_reference",
    "gated_linear_attention",
    "gated_linear_attention_reference",
    "selective_scan",
    "selective_scan_reference",
    "state_space_dual",
    "state_space_dual_reference",
]
