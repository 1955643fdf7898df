"""The built-in training loop: its configuration, the loop itself and the metrics it logs."""
