"""dimshard.planner: trace a model, annotate its ops, plan the partition and write per-rank code."""

from . import op_rules as _op_rules  # noqa: F401  (registers the built-in rules)
from . import search as _search  # noqa: F401  (registers the auto policy)
from .annotations import Annotation, AnnotationError, parse_annotation
from .graph import Graph
from .registry import register_op, set_rule
from .trace import TraceError, trace

__all__ = ["Annotation", "AnnotationError", "Graph", "TraceError", "parse_annotation", "register_op", "set_rule",
           "trace"]
