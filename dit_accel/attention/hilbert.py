"""Tile attention along a Hilbert curve (after HilbertA, arXiv 2509.26538), training-free.

Image tokens are ordered along a generalised Hilbert curve (any grid; video frame after frame, see ``curve.py``),
cut into contiguous tiles, and each query tile attends exactly to its own tile and its neighbours along the curve,
to the text tokens and (optionally) to pooled keys of the far tiles (one per ``pool_size`` tokens, eight per tile
by default) with the ``log(count)`` mass correction.
Consecutive curve positions are grid neighbours, so a tile is a compact region and its curve neighbours surround
it. Tile boundaries move by half a tile on every other layer so that information crosses them. The reordering is
applied to the queries, keys and values SDPA receives, after RoPE, and undone on the output, so every token keeps
exactly the rotary position the model gave it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dit_accel.attention.base import ImageAttentionConfig, ImageAttentionPlugin, dense_image_attention
from dit_accel.attention.curve import curve_order, inverse_order
from dit_accel.attention.ranges import curve_density, curve_tile_attention
from dit_accel.core.blocks import TokenGrid
from dit_accel.core.plugin import register_plugin
from dit_accel.recipe import check_bool, check_range, register_config


def auto_tile_size(grid: TokenGrid, tiles: int = 32) -> int:
    """About ``tiles`` tiles per image (at least 4 tokens per tile)."""
    return min(grid.num_tokens, max(4, grid.num_tokens // tiles))


def auto_pool_size(tile: int) -> int:
    """The largest divisor of ``tile`` that is at most ``tile // 8``: eight pooled keys per far tile. On the
    FLUX-size stand-in at 4096 tokens (benchmarks/results/attention-cpu.md) this took cosine 0.979 (one pooled key
    per tile) to 0.999, for 15 % instead of 10 % of the keys."""
    return max(d for d in range(1, max(1, tile // 8) + 1) if tile % d == 0)


def hilbert_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, grid: TokenGrid, *, tile: int,
                      neighbours: int = 1, offset: int = 0, pooled: bool = True, pool: int | None = None,
                      text_key: torch.Tensor | None = None, text_value: torch.Tensor | None = None,
                      scale: float | None = None, order: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Hilbert tile attention of (B, H, N, D) image tokens in grid (raster, frame-major) order; see the module.

    ``order`` may pass the precomputed ``(curve order, inverse)`` on the tokens' device.
    """
    if order is None:
        forward = curve_order(grid.frames, grid.height, grid.width).to(query.device)
        order = (forward, inverse_order(forward))
    forward, inverse = order
    out = curve_tile_attention(query.index_select(2, forward), key.index_select(2, forward),
                               value.index_select(2, forward), tile=tile, radius=neighbours, offset=offset,
                               pooled=pooled, pool=pool, shared_key=text_key, shared_value=text_value, scale=scale)
    return out.index_select(2, inverse)


@register_config("hilbert")
@dataclass(frozen=True)
class HilbertConfig(ImageAttentionConfig):
    """Hilbert-curve tile attention.

    Args:
        tile_size (`int`, defaults to `0`): tokens per tile; 0 picks about 32 tiles (``num_tokens // 32``, at least
            4). Must not exceed the image tokens. Allowed: 0-65536; on GPU kernels prefer multiples of 64.
        neighbours (`int`, defaults to `1`): tiles on each side along the curve attended exactly. Allowed: 0-16.
        pooled (`bool`, defaults to `True`): attend to pooled keys of the far tiles (global context).
        pool_size (`int`, defaults to `0`): tokens per pooled key, a divisor of the tile size; 0 picks
            ``tile_size // 8`` (eight pooled keys per far tile). 1 attends far tokens exactly (dense). Allowed: 0-65536.
        shift (`bool`, defaults to `True`): shift tile boundaries by half a tile on every other layer.
        start / end: fractions of the schedule to act on; ``start=0.2`` keeps the first steps dense.
    """

    tile_size: int = 0
    neighbours: int = 1
    pooled: bool = True
    pool_size: int = 0
    shift: bool = True

    def validate(self) -> None:
        super().validate()
        check_range(self, "tile_size", 0, 65536, integer=True)
        check_range(self, "pool_size", 0, 65536, integer=True)
        if self.tile_size and self.pool_size and self.tile_size % self.pool_size:
            raise ValueError(f"HilbertConfig.pool_size = {self.pool_size} must divide tile_size = {self.tile_size}")
        check_range(self, "neighbours", 0, 16, integer=True)
        check_bool(self, "pooled", "shift")


class CurveTilePlugin(ImageAttentionPlugin):
    """Shared by ``hilbert`` and ``window-residual``: the curve order per grid and device, tile size checks."""

    auto_tiles = 32

    def install(self) -> None:
        super().install()
        self._orders: dict = {}
        self._tilings: dict = {}

    def tile_size(self, grid: TokenGrid) -> int:
        return self.config.tile_size or auto_tile_size(grid, self.auto_tiles)

    def order(self, grid: TokenGrid, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        entry = self._orders.get((grid, device))
        if entry is None:
            forward = curve_order(grid.frames, grid.height, grid.width)
            entry = self._orders[(grid, device)] = (forward.to(device), inverse_order(forward).to(device))
        return entry

    def tiling(self, grid: TokenGrid, shifted: bool, pooled: bool) -> tuple[int, int, int, float]:
        """``(tile size, offset, pool, key density)`` for a grid, computed once (not per attention call)."""
        key = (grid, shifted, pooled)
        entry = self._tilings.get(key)
        if entry is None:
            size = self.tile_size(grid)
            offset = size // 2 if shifted else 0
            pool = getattr(self.config, "pool_size", 0) or auto_pool_size(size)
            if size % pool:
                raise ValueError(f"{self.name} pool_size {pool} must divide the tile size {size} of this call")
            density = curve_density(grid.num_tokens, size, self.config.neighbours, offset, pooled, pool)
            entry = self._tilings[key] = (size, offset, pool, density)
        return entry

    def local_attention(self, query, key, value, text_key, text_value, grid, layer, call, *, pooled: bool,
                        shift: bool) -> tuple[torch.Tensor, float]:
        shifted = shift and self.depth[layer.name] % 2 == 1
        tile = self.tile_size(grid)
        if tile > grid.num_tokens:  # a resolution too small for the setting: never a crash
            self._fallback(f"{self.name} tile_size {tile} is larger than the sequence of "
                           f"{grid.num_tokens} image tokens ({grid.frames}x{grid.height}x{grid.width}); at most "
                           f"{grid.num_tokens} (or 0 for automatic) would act", call)
            return dense_image_attention(query, key, value, text_key, text_value, call), 1.0
        size, offset, pool, density = self.tiling(grid, shifted, pooled)
        if density >= 1.0 and (not pooled or pool == 1):  # the tiles cover every key exactly: plain SDPA is cheaper
            return dense_image_attention(query, key, value, text_key, text_value, call), 1.0
        out = hilbert_attention(query, key, value, grid, tile=size, neighbours=self.config.neighbours, offset=offset,
                                pooled=pooled, pool=pool, text_key=text_key, text_value=text_value,
                                scale=call.options.get("scale"), order=self.order(grid, query.device))
        return out, density


@register_plugin(HilbertConfig)
class HilbertPlugin(CurveTilePlugin):
    def image_attention(self, query, key, value, text_key, text_value, grid, layer, call):
        return self.local_attention(query, key, value, text_key, text_value, grid, layer, call,
                                    pooled=self.config.pooled, shift=self.config.shift)
