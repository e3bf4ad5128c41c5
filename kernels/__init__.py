"""Triton kernels and PyTorch reference implementations of the same math (8-bit and block-sparse attention)."""
