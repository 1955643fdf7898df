"""Stage 4, the cost model: hardware profiles and their measurement, node topology, the cost of ops,
collectives, sequence-split attention and offload, the whole plan's estimate and its memory budgets."""
