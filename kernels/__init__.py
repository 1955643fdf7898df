"""dimshard.kernels: custom ops with their dim annotations, each with a pure-PyTorch reference.

Each op below except attention is registered for the planner with ``register_op`` where it is
defined, so the tracer records it as one op:

- ``chunk_linear_cross_entropy``  ``b l d^, n^ d^, b l -> b l``
- ``rms_norm``                    ``... d^, d^ -> ... d^``
- ``swiglu``                      ``... n, ... n -> ... n``
- ``apply_rotary``                ``b (g r^) l d^, b g l d^, 1 l d^, 1 l d^ -> b (g r^) l d^, b g l d^`` (GQA form)

``scaled_dot_product_attention`` is a drop-in for torch's sdpa that picks the backend; the
planner annotates torch's sdpa with its own rule.
"""

from __future__ import annotations

from .attention import scaled_dot_product_attention
from .chunk_linear_cross_entropy import chunk_linear_cross_entropy, chunk_linear_cross_entropy_reference
from .rms_norm import rms_norm, rms_norm_reference
from .rotary import apply_rotary, apply_rotary_reference
from .swiglu import swiglu, swiglu_reference

__all__ = [
    "apply_rotary",
    "apply_rotary_reference",
    "chunk_linear_cross_entropy",
    "chunk_linear_cross_entropy_reference",
    "rms_norm",
    "rms_norm_reference",
    "scaled_dot_product_attention",
    "swiglu",
    "swiglu_reference",
]
