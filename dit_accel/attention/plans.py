"""Tile plans over a token grid: tiles along a Hilbert curve, and rectangular windows. Pure functions, cached.

Both shift their tile boundaries by an offset (a layer with offset 0 and the next with half a tile), so tokens cut
apart at one layer's boundary share a tile at the next and information travels across the whole image over depth.
In video (``frames > 1``) a window's neighbourhood extends over the nearby frames; curve tiles
follow the curve through frame after frame.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from dit_accel.attention.curve import curve_order, inverse_order
from dit_accel.attention.tiled import TilePlan, plan_from_groups
from dit_accel.core.blocks import TokenGrid


def _neighbour_table(rows: list[list[int]]) -> torch.Tensor:
    """Rows of distinct tile indices, padded with -1 to a rectangle."""
    width = max(len(row) for row in rows)
    return torch.tensor([row + [-1] * (width - len(row)) for row in rows], dtype=torch.long)


def _dedupe(values: list[int]) -> list[int]:
    return list(dict.fromkeys(v for v in values if v >= 0))


@lru_cache(maxsize=64)
def curve_tile_plan(grid: TokenGrid, tile_size: int, radius: int, offset: int, pooled: bool) -> TilePlan:
    """Tiles of ``tile_size`` consecutive tokens along the grid's curve order (see ``curve.curve_order``): the
    gather-based reference of what ``hilbert`` computes with :func:`~dit_accel.attention.ranges.curve_tile_attention`.

    Args:
        grid: the token grid (frames x height x width, frame-major raster token indices).
        tile_size: tokens per tile, 1 <= tile_size <= grid.num_tokens.
        radius: each tile attends exactly to the tiles within ``radius`` of it along the curve.
        offset: the first tile holds ``tile_size - offset`` tokens (0 <= offset < tile_size): boundaries shift.
        pooled: also attend to one pooled key per other tile.
    """
    total = grid.num_tokens
    if not 1 <= tile_size <= total:
        raise ValueError(f"tile_size {tile_size} must lie in 1..{total} (the image tokens of this grid)")
    if not 0 <= offset < tile_size:
        raise ValueError(f"offset {offset} must lie in 0..{tile_size - 1}")
    position = inverse_order(curve_order(grid.frames, grid.height, grid.width))  # curve position of each token
    groups = (position + offset) // tile_size
    num_tiles = int(groups.max()) + 1
    rows = [_dedupe([tile] + [t for d in range(1, radius + 1) for t in (tile - d, tile + d) if 0 <= t < num_tiles])
            for tile in range(num_tiles)]
    return plan_from_groups(groups, _neighbour_table(rows), pooled=pooled, num_tokens=total)


@lru_cache(maxsize=64)
def window_plan(grid: TokenGrid, window: tuple[int, int], radius: int, offset: tuple[int, int],
                pooled: bool) -> TilePlan:
    """Rectangular ``window = (rows, cols)`` tiles of every frame, shifted by ``offset = (dy, dx)``.

    Each window attends exactly to the windows within Chebyshev distance ``radius`` (over frame, row and column of
    windows: in video the 3x3 neighbourhood is a 3x3x3 box); edge windows cut by the shift hold fewer tokens.
    """
    rows_per, cols_per = window
    if not (1 <= rows_per <= grid.height and 1 <= cols_per <= grid.width):
        raise ValueError(f"window {rows_per}x{cols_per} must fit the {grid.height}x{grid.width} token grid")
    dy, dx = offset
    if not (0 <= dy < rows_per and 0 <= dx < cols_per):
        raise ValueError(f"window offset {offset} must lie inside one window ({rows_per}x{cols_per})")
    ny = (grid.height + dy + rows_per - 1) // rows_per
    nx = (grid.width + dx + cols_per - 1) // cols_per
    f, y, x = torch.meshgrid(torch.arange(grid.frames), torch.arange(grid.height), torch.arange(grid.width),
                             indexing="ij")
    groups = ((f * ny + (y + dy) // rows_per) * nx + (x + dx) // cols_per).reshape(-1)
    # Windows that hold no token cannot occur (offset < window), but the numbering must stay dense.
    used, groups = torch.unique(groups, return_inverse=True)
    index_of = {int(g): i for i, g in enumerate(used)}
    rows = []
    for g in used.tolist():
        frame, rest = divmod(g, ny * nx)
        wy, wx = divmod(rest, nx)
        row = [index_of[g]]
        for of in range(-radius, radius + 1):
            for oy in range(-radius, radius + 1):
                for ox in range(-radius, radius + 1):
                    if 0 <= frame + of < grid.frames and 0 <= wy + oy < ny and 0 <= wx + ox < nx:
                        row.append(index_of.get(((frame + of) * ny + wy + oy) * nx + wx + ox, -1))
        rows.append(_dedupe(row))
    return plan_from_groups(groups, _neighbour_table(rows), pooled=pooled, num_tokens=grid.num_tokens)
