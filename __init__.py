"""dimshard: compile a PyTorch model into per-rank parallel code and train it."""

__version__ = "0.1.0"
