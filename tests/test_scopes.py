"""Scope nesting helpers (planner/graph/scopes.py) agree with the plain definition: nested at a dot."""

from __future__ import annotations

import random

from dimshard.planner.graph.scopes import enclosing, outermost_scopes, scopes_within


def _inside(name: str, scope: str) -> bool:
    return name == scope or name.startswith(scope + ".")


def test_helpers_match_the_definition_on_random_scope_trees():
    rng = random.Random(0)
    parts = ["model", "layers", "1", "10", "mlp", "self_attn", "lm_head"]
    for _ in range(200):
        names = [".".join(rng.choice(parts) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 12))]
        assert outermost_scopes(names) == [s for s in dict.fromkeys(names)
                                           if not any(o != s and _inside(s, o) for o in names)]
        within = scopes_within(tuple(dict.fromkeys(names)))
        probes = set(names) | {p for n in names for p in enclosing(n)} | {"model.layers.1", "nothing"}
        for scope in probes:
            assert within.get(scope, ()) == tuple(n for n in dict.fromkeys(names) if _inside(n, scope)), scope


def test_a_layer_does_not_contain_the_layer_whose_number_it_prefixes():
    assert enclosing("model.layers.10.mlp") == ["model", "model.layers", "model.layers.10"]
    assert scopes_within(("model.layers.1", "model.layers.10"))["model.layers.1"] == ("model.layers.1",)
    assert outermost_scopes(["model.layers.1", "model.layers.10", "model.layers.1.mlp"]) == \
        ["model.layers.1", "model.layers.10"]
