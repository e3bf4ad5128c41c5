"""Training-free proxy-token attention: exact local windows plus one pooled proxy per far window.

PT-DiT (arXiv 2409.04005) trains a proxy-token architecture; on a pretrained DiT the same idea works without
training in the pooled form: each query attends exactly to the keys of its own window and the neighbouring windows,
and to one average-pooled key/value per other window, whose logit is raised by ``log(window size)`` so the proxy
carries its window's softmax mass. Windows shift by half a window on every other layer (Swin style), so tokens
cut apart by one layer's window boundary meet in the next. Text keys are always exact.
"""

from __future__ import annotations

from dataclasses import dataclass

from dit_accel.attention.base import ImageAttentionConfig, TiledAttentionPlugin
from dit_accel.attention.plans import window_plan
from dit_accel.core.blocks import TokenGrid
from dit_accel.core.plugin import register_plugin
from dit_accel.recipe import check_range, register_config


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
        for name in ("pooled", "shift"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ProxyConfig.{name} = {getattr(self, name)!r} must be true or false")


@register_plugin(ProxyConfig)
class ProxyPlugin(TiledAttentionPlugin):
    def build_plan(self, grid: TokenGrid, shifted: bool):
        side = self.config.window or auto_window(grid)
        if side > grid.height or side > grid.width:
            raise ValueError(f"proxy window {side} does not fit the {grid.height}x{grid.width} token grid; "
                             f"use a window of at most {min(grid.height, grid.width)} (or 0 for automatic)")
        offset = (side // 2, side // 2) if shifted else (0, 0)
        return window_plan(grid, (side, side), self.config.radius, offset, self.config.pooled)
