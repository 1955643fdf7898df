"""Mixture-of-experts kernels: the routed experts as one op (``experts.py``) and the grouped product
it runs on CUDA (``grouped_mm.py``); ``dispatch.py``: the op with experts and tokens split over the same
ranks, pairs sent to their experts by all-to-all. Hugging Face models reach the op through ``kernels/hf_experts.py``."""

from __future__ import annotations

from . import routing  # noqa: F401 — registers bincount's meta kernel for the trace
from .experts import experts_reference, moe_experts
from .grouped_mm import grouped_mm, grouped_mm_reference

__all__ = ["experts_reference", "grouped_mm", "grouped_mm_reference", "moe_experts"]
