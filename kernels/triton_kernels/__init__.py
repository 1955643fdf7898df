"""Triton kernels of RMSNorm, SwiGLU, rotary and the cross-entropy passes (``common`` says when they run)."""
