"""The pieces of ``chunk_linear_cross_entropy``: how a call is tiled and the arithmetic on each tile."""
