"""Stage 1, the op language: dim annotations, the op registry (``register_op``, ``set_rule``) and the
built-in rules of the torch ops Hugging Face models call. Imports nothing else of the planner."""
