"""Window attention with residual caching (DiTFastAttn's WA-RS, Yuan et al., arXiv 2406.08552).

Attention changes slowly from step to step, and most of the change is local. On a full step the plugin computes
both dense attention and local tile attention (Hilbert tiles and their neighbours along the curve, see
``hilbert.py``) and keeps their difference, the long-range residual, per layer and per branch; on the cheap steps
in between it computes only the local attention and adds the cached residual. With a window covering everything
the residual is zero and the output is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dit_accel.attention.base import ImageAttentionConfig, dense_image_attention
from dit_accel.attention.hilbert import CurveTilePlugin
from dit_accel.core.plugin import register_plugin
from dit_accel.recipe import check_range, register_config

def is_full_step(step: int, interval: int, first_steps: int) -> bool:
    """Full (dense + residual refresh) on the first ``first_steps`` steps (at least one) and every ``interval``-th
    step after them."""
    return step < max(first_steps, 1) or (step - first_steps) % interval == 0

@register_config("window-residual")
@dataclass(frozen=True)
class WindowResidualConfig(ImageAttentionConfig):
    """Local attention plus a cached long-range residual.

    Args:
        tile_size (`int`, defaults to `0`): tokens per local tile; 0 picks ``num_tokens // 16`` (at least 4).
            Allowed: 0-65536.
        neighbours (`int`, defaults to `1`): tiles on each side along the curve in the local window. Allowed: 0-16.
        interval (`int`, defaults to `3`): a full step (dense attention, residual refreshed) every ``interval``
            steps; 1 computes dense attention always. Allowed: 1-50; recommended 2-4.
        first_steps (`int`, defaults to `2`): dense steps at the start. Allowed: 0-1000.
        start / end: fractions of the schedule to act on.
    """

    tile_size: int = 0
    neighbours: int = 1
    interval: int = 3
    first_steps: int = 2

    def validate(self) -> None:
        super().validate()
        check_range(self, "tile_size", 0, 65536, integer=True)
        check_range(self, "neighbours", 0, 16, integer=True)
        check_range(self, "interval", 1, 50, integer=True)
        check_range(self, "first_steps", 0, 1000, integer=True)

@register_plugin(WindowResidualConfig)
class WindowResidualPlugin(CurveTilePlugin):
    auto_tiles = 16

    def install(self) -> None:
        super().install()
        self.residuals: dict[tuple, torch.Tensor] = {}

    def reset(self) -> None:
        self.residuals.clear()

    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.residuals.values())

    def image_attention(self, query, key, value, text_key, text_value, grid, layer, call):
        local, density = self.local_attention(query, key, value, text_key, text_value, grid, layer, call,
                                              pooled=False, shift=False)
        if density >= 1.0:  # the window is the whole sequence: exact, nothing to cache
            return local, 1.0
        slot = (layer.name, call.index, call.context.slot)
        residual = self.residuals.get(slot)
        full = is_full_step(call.context.step, self.config.interval, self.config.first_steps)
        if full or residual is None or residual.shape != local.shape:
            dense = dense_image_attention(query, key, value, text_key, text_value, call)
            self.residuals[slot] = dense - local
            self.target.stats.set_cache_bytes(self.cache_bytes())
            return dense, 1.0
        return local + residual, density

