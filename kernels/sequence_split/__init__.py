"""The machinery of ``sequence_split_attention``: zigzag layout, blocks, K/V transfers, simulation."""
