"""dimshard.kernels."""
