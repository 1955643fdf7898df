"""Stage 6, what compiling writes: the per-rank code (sequence-split pieces included) and ``plan_report.md``."""
