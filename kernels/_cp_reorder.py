"""The zigzag reorders at the path generated code imports them from (``REORDER_MODULE`` in
``planner/codegen/sequence_split_code.py``); ``from_zigzag``, ``to_zigzag`` and ``zigzag_slice`` live in
``sequence_split/reorder.py``."""

from __future__ import annotations

from .sequence_split.reorder import from_zigzag, to_zigzag, zigzag_slice

__all__ = ["from_zigzag", "to_zigzag", "zigzag_slice"]
