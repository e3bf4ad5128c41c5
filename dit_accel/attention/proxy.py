"""Training-free proxy-token attention: exact local windows plus one pooled proxy per far window.

PT-DiT (arXiv 2409.04005) trains a proxy-token architecture; on a pretrained DiT the same idea works without
training in the pooled form: each query attends exactly to the keys of its own window and the neighbouring windows,
and to one average-pooled key/value per other window, whose logit is raised by ``log(window size)`` so the proxy
carries its window's softmax mass. Windows shift by half a window on every other layer (Swin style), so tokens
cut apart by one layer's window boundary meet in the next. Text keys are always exact.
"""

from __future__ import annotations

from dataclasses import dataclass

from dit_accel.attention.base import ImageAttentionConfig, TiledAttentionPlugin, dense_image_attention
from dit_accel.attention.plans import window_plan
from dit_accel.attention.windows import window_attention, window_density, window_layout
from dit_accel.core.blocks import TokenGrid
from dit_accel.core.plugin import register_plugin
from dit_accel.recipe import check_bool, check_range, register_config


def auto_window(grid: TokenGrid) -> int:
    """About eight windows per side, at least 2x2 tokens: the exact part stays a small share at large grids."""
    return max(1, min(max(2, min(grid.height, grid.width) // 8), grid.height, grid.width))


@register_config("proxy")
@dataclass(frozen=True)
class ProxyConfig(ImageAttentionConfig):
    """Local windows + pooled proxy tokens.

    Args:
        window (`int`, defaults to `0`): window side in tokens (square windows); 0 picks about eight windows per
            grid side (``max(2, side // 8)``). Must fit the token grid. Allowed: 0-256.
        radius (`int`, defaults to `1`): windows within this Chebyshev distance are attended exactly (1: the 3x3
            neighbourhood). Allowed: 0-8.
        pooled (`bool`, defaults to `True`): attend to one pooled proxy per other window (False: local only).
        shift (`bool`, defaults to `True`): shift windows by half a window on every other layer.
        start / end: fractions of the schedule to act on; ``start=0.2`` keeps the layout-forming first steps dense.
    """

    window: int = 0
    radius: int = 1
    pooled: bool = True
    shift: bool = True

    def validate(self) -> None:
        super().validate()
        check_range(self, "window", 0, 256, integer=True)
        check_range(self, "radius", 0, 8, integer=True)
        check_bool(self, "pooled", "shift")


@register_plugin(ProxyConfig)
class ProxyPlugin(TiledAttentionPlugin):
    """On CUDA the window plan runs on the block-sparse kernel (through ``tiled_attention``); on the CPU through
    :func:`~dit_accel.attention.windows.window_attention`, which reads the neighbour windows as strided views
    instead of gathering them (the same attention; attention-cpu.md: 1.12x -> 3.08x over SDPA at 4096 tokens)."""

    def install(self) -> None:
        super().install()
        self._cpu_windows: dict = {}

    def window(self, grid: TokenGrid, shifted: bool) -> tuple[int, tuple[int, int]]:
        """(window side, shift offset) at ``grid``."""
        side = self.config.window or auto_window(grid)
        if side > grid.height or side > grid.width:
            raise ValueError(f"proxy window {side} does not fit the {grid.height}x{grid.width} token grid; "
                             f"use a window of at most {min(grid.height, grid.width)} (or 0 for automatic)")
        return side, ((side // 2, side // 2) if shifted else (0, 0))

    def build_plan(self, grid: TokenGrid, shifted: bool):
        side, offset = self.window(grid, shifted)
        return window_plan(grid, (side, side), self.config.radius, offset, self.config.pooled)

    def cpu_windows(self, grid: TokenGrid, shifted: bool) -> tuple[int, tuple[int, int], float]:
        """(window side, offset, key density; 1.0 when every window neighbours every other) at ``grid``, computed
        once per grid and shift rather than on every attention call."""
        entry = self._cpu_windows.get((grid, shifted))
        if entry is None:
            side, offset = self.window(grid, shifted)
            layout = window_layout(grid, (side, side), self.config.radius, offset)
            density = 1.0 if bool(layout.near.all()) else window_density(layout, grid.num_tokens, self.config.pooled)
            entry = self._cpu_windows[(grid, shifted)] = (side, offset, density)
        return entry

    def image_attention(self, query, key, value, text_key, text_value, grid, layer, call):
        if query.is_cuda:
            return super().image_attention(query, key, value, text_key, text_value, grid, layer, call)
        side, offset, density = self.cpu_windows(grid, self.is_shifted(layer))
        if density >= 1.0:  # every window is a neighbour of every other: all keys exact, plain SDPA
            return dense_image_attention(query, key, value, text_key, text_value, call), 1.0
        out = window_attention(query, key, value, grid, window=(side, side), radius=self.config.radius,
                               offset=offset, pooled=self.config.pooled, shared_key=text_key,
                               shared_value=text_value, scale=call.options.get("scale"))
        return out, density
