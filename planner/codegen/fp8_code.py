"""The generated call of a linear chosen for FP8: ``fp8_linear`` with the process groups of its split.

``planner/search/fp8_choice.py`` decides which linears run in FP8; here each becomes
``fp8_linear(x, w, recipe=..., token_groups=..., k_groups=..., n_groups=...)`` (kernels/fp8/linear.py),
each group tuple naming the mesh axes that split the product's tokens, input or output features,
so its amaxes are reduced over them and the split op equals the unsplit one (docs/design.md, "FP8").
"""

from __future__ import annotations

from ..plan.placements import ResolvedPlan
from ..search.fp8_choice import split_dims

FP8_IMPORT = "from dimshard.kernels.fp8.linear import fp8_linear"
_GROUP_ARGUMENTS = {"m": "token_groups", "k": "k_groups", "n": "n_groups"}


def fp8_linear_code(op_index: int, args: list[str], kwargs: dict[str, str], recipe: str,
                    resolved: ResolvedPlan) -> str:
    """Source of the ``fp8_linear`` call replacing a linear: ``args`` / ``kwargs`` as already written
    for the local call (x, weight[, bias]); a ``recipe`` the call already names is kept."""
    names = resolved.plan.mesh.axis_names
    written = dict(kwargs)
    written.setdefault("recipe", repr(recipe))
    for dim, axes in split_dims(resolved, op_index).items():
        if axes:
            groups = ", ".join(f"self.groups[{names[a]!r}]" for a in axes)
            written[_GROUP_ARGUMENTS[dim]] = f"({groups},)"
    return f"fp8_linear({', '.join(args)}" + "".join(f", {k}={v}" for k, v in written.items()) + ")"
