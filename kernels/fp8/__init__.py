"""FP8 compute for linear layers: scaling recipes and casts (``scaling.py``), the linear op (``linear.py``).

``fp8_linear`` carries the annotation of ``torch.nn.functional.linear``; the planner writes it in
place of the linears it chooses for FP8 (planner/search/fp8_choice.py, docs/design.md, "FP8").
"""
