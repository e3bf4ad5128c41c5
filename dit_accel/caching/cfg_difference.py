"""cfg-cache's math, pure functions: which steps rebuild the unconditional output, and the rebuild itself.

The unconditional output of a rebuilt step is ``cond + (uncond - cond)`` with the difference of the last step that
computed both (:func:`rebuild_uncond`); FasterCache's weighting splits the difference into a low and a high spatial
frequency band (:func:`low_band_mask`, :func:`split_difference`, :class:`Bands`) scaled apart over the schedule
(:func:`band_weights`). The patching is :mod:`dit_accel.caching.cfg_cache`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from dit_accel.core.context import CallContext

# FasterCache's weight ranges (diffusers' FasterCacheConfig: low band t in (99, 901), high band t < 301 of 1000),
# as fractions of the schedule.
LOW_BAND_WINDOW = (0.1, 0.9)
HIGH_BAND_FROM = 0.7


def in_window(step: int, num_steps: int | None, start: float, end: float) -> bool:
    """Whether ``step`` lies in the window ``[start, end)`` (fractions of a schedule of known length)."""
    return num_steps is not None and math.ceil(start * num_steps) <= step < end * num_steps


def skips_uncond(step: int, num_steps: int | None, start: float, end: float, interval: int) -> bool:
    """Whether ``step`` rebuilds the unconditional output: it lies in ``[start, end)`` of the schedule (fractions)
    and is not one of the window's full steps, the first step of the window and every ``interval``-th after it."""
    if interval <= 1 or not in_window(step, num_steps, start, end):
        return False
    return (step - math.ceil(start * num_steps)) % interval != 0


def skipped_steps(num_steps: int, start: float, end: float, interval: int,
                  computes: "list[bool] | None" = None) -> set[int]:
    """The steps whose unconditional output is rebuilt. Alone (``computes`` is ``None``): :func:`skips_uncond`.
    Stacked on a plugin whose schedule is fixed (``computes[s]``: the transformer computes at step ``s``), only the
    computing steps of the window are counted, and every ``interval``-th of them computes both branches: on the
    others there is nothing to save, and a window aligned with the plugin's own full steps would save nothing."""
    if computes is None:
        return {s for s in range(num_steps) if skips_uncond(s, num_steps, start, end, interval)}
    window = [s for s in range(math.ceil(start * num_steps), num_steps) if s < end * num_steps and computes[s]]
    return {s for i, s in enumerate(window) if i % interval}


def low_band_mask(height: int, width: int, cutoff: float, device=None) -> torch.Tensor:
    """Boolean ``(height, width)`` mask of the low band of an unshifted 2-D FFT: frequencies within ``cutoff``
    (a fraction of the Nyquist radius) of zero, on the normalised radius so non-square grids split alike."""
    fy = torch.fft.fftfreq(height, device=device).abs() * 2.0  # 1.0 at Nyquist
    fx = torch.fft.fftfreq(width, device=device).abs() * 2.0
    return (fy[:, None] ** 2 + fx[None, :] ** 2).sqrt() <= cutoff


def split_difference(difference: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The difference's spectrum over its last two dimensions, split into low and high band (complex, fp32)."""
    spectrum = torch.fft.fft2(difference.float())
    return spectrum * mask, spectrum * ~mask


@dataclass
class Bands:
    """A difference split into low and high band spectra over its spatial grid; ``layout`` maps the spatial tensor
    back to the output's layout."""

    low: torch.Tensor
    high: torch.Tensor
    layout: Any = None

    def combine(self, low_weight: float, high_weight: float) -> torch.Tensor:
        """``Re(ifft2(low_weight * low + high_weight * high))`` in the output's layout."""
        spatial = torch.fft.ifft2(self.low * low_weight + self.high * high_weight).real
        return spatial if self.layout is None else self.layout(spatial)


def rebuild_uncond(cond: torch.Tensor, difference: "torch.Tensor | Bands", low_weight: float = 1.0,
                   high_weight: float = 1.0) -> torch.Tensor:
    """The unconditional output: ``cond + difference``; a frequency-split difference is weighted per band first."""
    if isinstance(difference, torch.Tensor):
        return cond + difference
    return cond + difference.combine(low_weight, high_weight).to(cond.dtype)


def band_weights(step: int, num_steps: int, low_alpha: float, high_alpha: float) -> tuple[float, float]:
    """This step's growth factors of the low and high band (FasterCache: compounding on every rebuilt step)."""
    position = step / num_steps
    low = low_alpha if LOW_BAND_WINDOW[0] <= position < LOW_BAND_WINDOW[1] else 1.0
    high = high_alpha if position >= HIGH_BAND_FROM else 1.0
    return low, high


def to_grid(value: torch.Tensor, context: CallContext):
    """``(spatial, layout)``: the value with its spatial grid as the last two dimensions, and the map back.
    Image outputs ``(B, C, H, W)`` and video outputs ``(B, C, F, H, W)`` / ``(B, F, C, H, W)`` already are; token
    outputs ``(B, N, C)`` go through the call's token grid; ``None`` if neither fits."""
    if value.ndim >= 4:
        return value, None
    grid = context.grid
    if value.ndim == 3 and grid is not None and value.shape[1] == grid.num_tokens:
        batch, tokens, channels = value.shape
        frames = grid.num_tokens // (grid.height * grid.width)
        spatial = value.reshape(batch, frames, grid.height, grid.width, channels).permute(0, 4, 1, 2, 3)
        return spatial, lambda x: x.permute(0, 2, 3, 4, 1).reshape(batch, tokens, channels)
    return None
