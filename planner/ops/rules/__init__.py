"""Dim-annotation rules for the torch ops that Hugging Face decoder models call, one module per op family.

Importing this package registers them all (``set_rule``). String rules cover fixed signatures;
rule functions build the annotation from the call's arguments and shapes. Conventions: a
reduction over a dim is a partial sum only for sum-like ops (``sum``, ``linear``, ``matmul``);
other reductions (``mean``, ``softmax``, ``max``) mark the reduced dim ``^`` so it is never split.
A tensor a product adds to its result (the bias of ``linear``, ``addmm``, ``baddbmm``) is a ``+``
summand, so the product's sum may still be split: the plan adds the summand on one rank of the
axis (``plan/resolve.py``). Each rule has a case in tests/test_op_rules.py; further decoder
families are exercised end to end by tests/test_model_breadth.py.
"""

from . import (
    attention,
    elementwise,
    embedding,
    factories,
    losses,
    moe,
    products,
    recurrent,
    reductions,
    shapes,
)

__all__ = ["attention", "elementwise", "embedding", "factories", "losses", "moe", "products", "recurrent", "reductions",
           "shapes"]
