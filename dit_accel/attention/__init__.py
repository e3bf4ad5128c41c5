"""Attention plugins, one module per technique (ToDo, proxy tokens, Hilbert tiles, window + residual, INT8)."""
