"""Triton kernels and PyTorch reference implementations of the same math (8-bit and block-sparse attention).

Importable as ``dit_accel.kernels``; importing it (or any module here) never needs Triton or CUDA: the Triton code
lives in ``_triton_*.py`` modules that are imported on the first kernel launch only. Import the functions from
their modules (``from dit_accel.kernels.int8_attention import int8_attention``).

* :mod:`.int8_attention`: SageAttention-style dense attention (INT8 Q·Kᵀ, FP16/BF16 P·V), ``int8_attention`` and
  its reference ``int8_attention_reference``.
* :mod:`.block_sparse`: attention over a per-query-block lookup table of key blocks plus optional pooled keys,
  ``block_sparse_attention`` and ``block_sparse_reference``.
* :mod:`.tile_lut`: a :class:`~dit_accel.attention.tiled.TilePlan` as block-sparse lookup tables, the GPU path of
  ``tiled_attention`` / ``curve_tile_attention`` (plugins ``proxy``, ``hilbert``, ``window-residual``).
* :mod:`.window_lut`: exact generalized neighbourhood attention over a
  :class:`~dit_accel.attention.gna.NeighbourhoodPlan`'s runs of tiles (queries and key unions by index, each
  (query, key) masked to the query's window in-kernel), the GPU path of plugin ``gna``; registers its own custom op
  ``torch.ops.dit_accel.window_attention``.
* :mod:`.ops`: both kernels as ``torch.library`` custom ops (``torch.ops.dit_accel.*``) with fake implementations,
  so ``torch.compile`` traces through them.

Where kernels run: on CUDA tensors when Triton imports; on CPU tensors only under ``TRITON_INTERPRET=1`` (Triton's
interpreter, slow, for tests). Triton reads that variable when a kernel is wrapped, so the wrapping is deferred to
the first launch in each mode (see :mod:`.jit`) and a test may set the variable at any time before launching.
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

__all__ = ["interpret_mode", "kernel_usable", "triton_available", "triton_importable"]


@functools.cache
def triton_importable() -> bool:
    """Whether ``import triton`` works (it does not on macOS/Windows wheels without Triton)."""
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception:  # ImportError, or a broken install raising anything at import
        return False
    return True


def interpret_mode() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``), read as Triton reads it."""
    if triton_importable():
        from triton import knobs

        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_available() -> bool:
    """Whether the Triton kernels can run at all here: Triton imports and either CUDA is present or the interpreter
    is on (``TRITON_INTERPRET=1``, CPU tensors). False on a plain CPU machine."""
    return triton_importable() and (interpret_mode() or torch.cuda.is_available())


def kernel_usable(tensor: torch.Tensor) -> bool:
    """Whether a kernel can run on ``tensor``'s device: CUDA with Triton, or CPU under ``TRITON_INTERPRET=1``."""
    if not triton_importable():
        return False
    return tensor.is_cuda or (tensor.device.type == "cpu" and interpret_mode())

