"""Module scopes as the tracer records them (``model.layers.3.mlp``): nesting at dots, fast.

The search asks "which regions lie inside this scope" and "which scopes are outermost" for
thousands of candidate plans; a scan with ``startswith`` per pair was a large share of its time.
"""

from __future__ import annotations

import functools


def enclosing(scope: str) -> list[str]:
    """The scopes that strictly contain ``scope``, outermost first (``a.b.c`` -> ``a``, ``a.b``)."""
    parts = scope.split(".")
    return [".".join(parts[:k]) for k in range(1, len(parts))]


def outermost_scopes(scopes: list[str]) -> list[str]:
    """The scopes not nested in another of the list, in order, without repeats."""
    unique = list(dict.fromkeys(scopes))
    chosen = set(unique)
    return [s for s in unique if not any(p in chosen for p in enclosing(s))]


@functools.lru_cache(maxsize=64)
def scopes_within(names: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """For each scope that is or encloses one of ``names``: the names at or below it, in ``names`` order."""
    index: dict[str, list[str]] = {}
    for name in names:
        for scope in (*enclosing(name), name):
            index.setdefault(scope, []).append(name)
    return {scope: tuple(members) for scope, members in index.items()}
