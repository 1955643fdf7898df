"""Stage 5, choosing a plan: the built-in policies and their registry, and the ``auto`` search (the
placement problem, its exact solver, and the offload candidates)."""
