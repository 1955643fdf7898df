"""dimshard.runtime."""
