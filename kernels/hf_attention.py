"""dimshard's attention as a Hugging Face attention implementation: ``attn_implementation="dimshard"``.

Importing this module registers ``dimshard_attention_forward`` with transformers'
``AttentionInterface`` and ``dimshard_attention_mask`` with its ``AttentionMaskInterface`` under
the name ``"dimshard"``. A model built with that implementation (``planner.graph.hf.build_on_meta``
does) calls ``dimshard.kernels.attention.attention`` in every attention layer, one traced op,
with the layer's scale, causality, sliding window and logit soft-cap as the model passes them,
and the batch's ``document_ids`` when the caller passes them to the model as a keyword. The mask
function builds nothing: windows, causality and documents are the op's arguments, so no
[L, L] mask is ever materialised.

Packed sequences are expressed by ``document_ids``; ``position_ids`` alone (which Hugging Face's
sdpa masks inspect for packing) do not restrict attention here.
"""

from __future__ import annotations

from typing import Any

import torch

from .attention import attention

ATTN_IMPLEMENTATION = "dimshard"


def dimshard_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Hugging Face attention-interface function: [b, h, l, e] inputs, returns ([b, l, h, f] output, None).

    Raises a ValueError for what the op does not compute (dropout, a padding or custom mask,
    attention sinks, position biases), naming the way out, instead of computing something else.
    """
    if dropout:
        raise ValueError(f"dimshard attention has no dropout (got attention_dropout={dropout}); set the "
                         "config's attention_dropout to 0 for training with dimshard")
    if attention_mask is not None:
        raise ValueError("dimshard attention takes no attention_mask: pass packed documents as document_ids "
                         "[batch, seq] (no padding mask), or build the model with attn_implementation='sdpa'")
    for name in ("s_aux", "sinks", "position_bias", "alibi"):
        if kwargs.get(name) is not None:
            raise ValueError(f"dimshard attention does not support {name!r} ({type(module).__name__}); "
                             "build this model with attn_implementation='eager' instead")
    causal = kwargs.get("is_causal")
    if causal is None:
        causal = getattr(module, "is_causal", True)
    out = attention(query, key, value, scale=scaling, causal=bool(causal), window=sliding_window,
                    softcap=softcap, document_ids=kwargs.get("document_ids"))
    return out.transpose(1, 2).contiguous(), None


def dimshard_attention_mask(*args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> None:
    """Hugging Face attention-mask-interface function: no mask (the op masks from its arguments).

    A 2-D padding mask that hides any token is refused: dimshard attention does not mask padding.
    """
    if attention_mask is not None and not attention_mask.is_meta and not bool(attention_mask.all()):
        raise ValueError("dimshard attention does not mask padding tokens: pack documents and pass "
                         "document_ids instead, or build the model with attn_implementation='sdpa'")
    return None


def register() -> str:
    """Register ``"dimshard"`` with transformers' attention and mask interfaces (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, dimshard_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, dimshard_attention_mask)
    return ATTN_IMPLEMENTATION


register()
