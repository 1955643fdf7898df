"""dimshard's experts op as a Hugging Face experts implementation: ``experts_implementation="dimshard"``.

Importing this module registers ``dimshard_experts_forward`` with transformers' ``ExpertsInterface``
(``transformers.integrations.moe``, present since transformers 5.x in every family whose experts
class carries ``@use_experts_implementation``) under the name ``"dimshard"``. A model built with
it (``planner.graph.hf.build_on_meta`` does) calls ``dimshard.kernels.moe.moe_experts`` once per
MoE layer: one traced op with the expert dim annotated, instead of a Python loop over the experts
that a trace would unroll for one batch's routing.
"""

from __future__ import annotations

import torch

from .moe.experts import ACTIVATIONS, CLAMPED_SWIGLU, moe_experts

EXPERTS_IMPLEMENTATION = "dimshard"


def experts_activation(module: torch.nn.Module) -> dict:
    """The op's activation arguments for a transformers experts module; ValueError where the op has none.

    The default gate (``act(gate) * up``) takes the config's ``hidden_act``; gpt-oss's clamped SwiGLU
    (its ``alpha`` and ``limit``) is the op's ``"clamped_swiglu"``; any other custom gate is refused.
    """
    from transformers.integrations.moe import _default_apply_gate

    name = type(module).__name__
    gate = getattr(type(module), "_apply_gate", _default_apply_gate)
    if getattr(module, "has_post_expert_norm", False):
        raise ValueError(f"{name} normalises each expert's output, which dimshard's experts op does not; "
                         "build this model with experts_implementation='eager'")
    if getattr(module, "has_gate", True) and gate is not _default_apply_gate:
        if hasattr(module, "alpha") and hasattr(module, "limit"):
            return dict(activation=CLAMPED_SWIGLU, swiglu_alpha=float(module.alpha), swiglu_limit=float(module.limit))
        raise ValueError(f"{name} has its own gate function ({gate.__qualname__}) that dimshard's experts op "
                         "does not know; build this model with experts_implementation='eager'")
    activation = getattr(module.config, "hidden_act", None) or getattr(module.config, "hidden_activation", None)
    if activation not in ACTIVATIONS:
        raise ValueError(f"{name} uses activation {activation!r}, which dimshard's experts op does not have "
                         f"({sorted(ACTIVATIONS)}); build this model with experts_implementation='eager'")
    return dict(activation=activation)


def dimshard_experts_forward(module: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                             top_k_weights: torch.Tensor) -> torch.Tensor:
    """Hugging Face experts-interface function: hidden [t, d], top-k ids and weights [t, k] -> [t, d]."""
    gated = getattr(module, "has_gate", True)
    prefix = "gate_up_proj" if gated else "up_proj"
    biased = getattr(module, "has_bias", False)
    # A real (CPU) constant the planner slices with the experts: each rank learns its experts' ids.
    expert_ids = torch.arange(module.num_experts)
    return moe_experts(hidden_states, top_k_index, top_k_weights, expert_ids, getattr(module, prefix),
                       module.down_proj, getattr(module, prefix + "_bias") if biased else None,
                       module.down_proj_bias if biased else None, gated=gated,
                       interleaved=not getattr(module, "is_concatenated", True),
                       transposed=getattr(module, "is_transposed", False), **experts_activation(module))


def register() -> str:
    """Register ``"dimshard"`` with transformers' experts interface (idempotent); returns the name."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(EXPERTS_IMPLEMENTATION, dimshard_experts_forward)
    return EXPERTS_IMPLEMENTATION


register()
