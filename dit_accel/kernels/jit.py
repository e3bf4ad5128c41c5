"""Deferred ``triton.jit``: a kernel is wrapped on its first launch, once per interpreter mode.

``triton.jit`` decides at decoration time whether a kernel is compiled for the GPU or run by the CPU interpreter
(``TRITON_INTERPRET=1``, read from the environment then). Decorating at import would freeze that choice for the
process, so a test that sets the variable after something imported the kernels would get GPU kernels on CPU
tensors. :class:`LazyKernel` keeps the plain function and wraps it when launched, in the mode current at that time.
The same freezing applies to Triton's own ``@jit`` library functions (``tl.max``, ``tl.sum``, ``tl.zeros``, ...):
they are wrapped when ``triton.language`` is first imported, often by torch itself, and cannot run in the
interpreter if that import happened without ``TRITON_INTERPRET``. Kernels wrapped here therefore use Triton
*builtins* only: reductions are ``tl.reduce(x, axis, tl.standard._elementwise_max / _sum_combine)`` (what
``tl.max``/``tl.sum`` call; the interpreter runs these combine functions as numpy reductions), ``tl.full`` instead
of ``tl.zeros``, and no ``@triton.jit`` helpers of our own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class LazyKernel:
    """``kernel = LazyKernel(fn)``; ``kernel[grid](*args, **meta)`` launches ``triton.jit(fn)``."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self._wrapped: dict[bool, Any] = {}

    def __getitem__(self, grid):
        import triton
        from triton import knobs

        mode = bool(knobs.runtime.interpret)
        kernel = self._wrapped.get(mode)
        if kernel is None:
            kernel = self._wrapped[mode] = triton.jit(self.fn)
        return kernel[grid]
