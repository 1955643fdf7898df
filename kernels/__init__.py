"""dimshard.kernels: custom ops with their dim annotations, each with a pure-PyTorch reference.

Each op below is registered for the planner with ``register_op`` where it is defined, so the
tracer records it as one op:

- ``attention``                   ``b (h r^) l^ e^, b h s^ e^, b h s^ f^[, b l^] -> b (h r^) l^ f^`` (causal,
  sliding window, soft-cap, document ids; Hugging Face models call it with
  ``attn_implementation="dimshard"``, see ``hf_attention.py``; import it from
  ``dimshard.kernels.attention``: re-exported here it would hide that module)
- ``chunk_linear_cross_entropy``  ``b l d^, n^ d^, b l[, n^] -> b l`` (optional bias, logit scale, soft-cap)
- ``rms_norm``                    ``... d^, d^ -> ... d^``
- ``swiglu``                      ``... n, ... n -> ... n``
- ``apply_rotary``                ``b (g r^) l d^, b g l d^, 1 l d^, 1 l d^ -> b (g r^) l d^, b g l d^`` (GQA form)

``scaled_dot_product_attention`` is a drop-in for torch's sdpa that picks the backend (not an op
of its own: the planner annotates torch's sdpa with its own rule and substitutes this).
``context_parallel.sequence_split_attention`` is the attention of a sequence split across ranks.

Beside the op modules: ``chunk_loss/`` (how the chunked loss is tiled, the arithmetic on a tile),
``sequence_split/`` (the zigzag layout, blocks and transfers of sequence-split attention),
``triton_kernels/`` (the Triton implementations, imported only when Triton runs) and
``_cp_reorder.py`` (the zigzag reorders generated code calls around collectives).
"""

from __future__ import annotations

if "." not in __name__:  # imported by its bare name from the repository root: see _shadow_guard.py
    from _shadow_guard import step_aside

    step_aside(__name__, __path__[0])
else:
    from .attention import attention_reference, scaled_dot_product_attention
    from .chunk_linear_cross_entropy import chunk_linear_cross_entropy, chunk_linear_cross_entropy_reference
    from .rms_norm import rms_norm, rms_norm_reference
    from .rotary import apply_rotary, apply_rotary_reference
    from .swiglu import swiglu, swiglu_reference

    __all__ = [
        "apply_rotary",
        "attention_reference",
        "apply_rotary_reference",
        "chunk_linear_cross_entropy",
        "chunk_linear_cross_entropy_reference",
        "rms_norm",
        "rms_norm_reference",
        "scaled_dot_product_attention",
        "swiglu",
        "swiglu_reference",
    ]
