"""Exact min-sum over a factor graph by variable elimination (the solver behind the ``auto`` policy)."""

from __future__ import annotations

import numpy as np

from ..plan.placements import PlanError

# A table over more entries than this means the problem is too entangled for exact search.
MAX_TABLE_ENTRIES = 40_000_000


class SearchTooLarge(PlanError):
    """Exact search of a placement problem would need a table over MAX_TABLE_ENTRIES entries."""


def elimination_order(sizes: list[int], scopes: list[tuple[int, ...]]) -> tuple[list[int], float]:
    """A variable elimination order by weighted min-fill, and the largest table it creates.

    Each step eliminates the variable whose elimination joins the fewest new value pairs among
    its neighbours (ties: the smallest table), which keeps the induced tables small on the
    chain-like graphs of decoder layers.
    """
    adjacent: dict[int, set[int]] = {v: set() for v in range(len(sizes))}
    for scope in scopes:
        for v in scope:
            adjacent[v].update(u for u in scope if u != v)
    order: list[int] = []
    largest = 0.0

    def table(v: int) -> float:
        return float(sizes[v]) * float(np.prod([sizes[u] for u in adjacent[v]], dtype=np.float64))

    def fill(v: int) -> float:
        nb = sorted(adjacent[v])
        return sum(sizes[a] * sizes[b] for i, a in enumerate(nb) for b in nb[i + 1:] if b not in adjacent[a])

    remaining = set(adjacent)
    while remaining:
        v = min(remaining, key=lambda u: (fill(u), table(u), u))
        largest = max(largest, table(v))
        neighbours = adjacent.pop(v)
        for a in neighbours:
            adjacent[a].discard(v)
            adjacent[a].update(neighbours - {a})
        remaining.discard(v)
        order.append(v)
    return order, largest


def minimize(sizes: list[int], factors: list[tuple[tuple[int, ...], np.ndarray]],
             order: tuple[list[int], float] | None = None) -> tuple[list[int], float]:
    """Assignment minimising the sum of ``factors`` (scope: sorted distinct variables, table over their values).

    Exact variable elimination (min-sum) in ``order`` (default: ``elimination_order``). Raises
    PlanError when a table would exceed MAX_TABLE_ENTRIES (the graph is too entangled for exact search).
    """
    order, largest = order if order is not None else elimination_order(sizes, [scope for scope, _ in factors])
    if largest > MAX_TABLE_ENTRIES:
        raise SearchTooLarge(f"the per-layer placement problem needs a table of {largest:,.0f} entries; "
                        "use a built-in policy or a 1-D mesh for this model")
    alive: dict[int, tuple[tuple[int, ...], np.ndarray]] = {}
    by_var: dict[int, set[int]] = {v: set() for v in range(len(sizes))}
    for fid, (scope, table) in enumerate(factors):
        alive[fid] = (scope, table.astype(np.float32))
        for v in scope:
            by_var[v].add(fid)
    next_id = len(factors)
    eliminated: list[tuple[int, tuple[int, ...], np.ndarray]] = []
    for v in order:
        union = tuple(sorted({u for fid in by_var[v] for u in alive[fid][0]} | {v}))
        combined = np.zeros([sizes[u] for u in union], dtype=np.float32)
        for fid in list(by_var[v]):
            scope, table = alive.pop(fid)
            for u in scope:
                by_var[u].discard(fid)
            combined += table.reshape([sizes[u] if u in scope else 1 for u in union])
        axis = union.index(v)
        rest = union[:axis] + union[axis + 1:]
        best = combined.argmin(axis=axis)
        eliminated.append((v, rest, best))
        if rest:
            alive[next_id] = (rest, np.take_along_axis(combined, np.expand_dims(best, axis), axis).squeeze(axis))
            for u in rest:
                by_var[u].add(next_id)
            next_id += 1
    assignment = [0] * len(sizes)
    for v, rest, best in reversed(eliminated):
        assignment[v] = int(best[tuple(assignment[u] for u in rest)]) if rest else int(best)
    total = sum(float(table[tuple(assignment[u] for u in scope)]) for scope, table in factors)
    return assignment, total

