"""Stage 3, plans: the mesh, placements and ``Plan``; resolving a plan against the graph's annotations
(sequence-split attention and its zigzag layout included); the collectives table and
redistributions; gradient-buffer and CPU-offload choices."""
