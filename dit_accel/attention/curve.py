"""Space-filling-curve token orders for image and video token grids.

A DiT flattens its latent patches in raster order (row after row), so a run of consecutive tokens is a thin strip
of one or a few rows: tokens that are neighbours on the image (one row apart) end up ``width`` positions apart in
the sequence. Reordering the tokens along a space-filling curve fixes that. Every run of consecutive tokens of a
curve order is a compact, roughly square 2-D region, so

* tile-local attention (each token attends within its tile of ``k`` consecutive tokens, or a window of tiles)
  sees the token's true spatial neighbourhood instead of a strip, and
* a pooled key/value per tile summarises one coherent region, so attending to pooled tile keys approximates the
  far field of full attention well.

The curve is the generalized Hilbert curve ("gilbert", after Jakub Červený), which works for any rectangle, not
only power-of-two squares: the rectangle is split recursively along its major axis into two halves (when it is
much longer than wide) or into three parts (a half-height block entered from the start corner, the rest run along
the major axis, and a block returning to the end corner), with split sizes nudged to even lengths so the pieces
join up. The path steps between grid neighbours, except for exactly one diagonal step when the longer side is odd
and the shorter side even and > 2 (the path ends at the corner next to its start along the longer side, and on such
a grid the two have the same checkerboard colour, so no neighbour-only path can join them).
On power-of-two squares it coincides with the Hilbert curve, so each aligned ``2^k x 2^k`` block is contiguous.

Video convention: tokens are frame-major, ``index = (f * height + y) * width + x``. Every frame is traversed
along the same 2-D curve, frames one after another. A tile of ``k`` consecutive tokens (``k`` dividing
``height * width``) therefore covers the same spatial region in every frame, and "the same tile in the
neighbouring frame" is simply tile index ``+- tiles_per_frame``.

All orders are int64 tensors of raster indices: ``tokens[:, order]`` puts tokens in curve order and
``x[:, inverse_order(order)]`` puts them back.
"""

from __future__ import annotations

from functools import lru_cache

import torch

__all__ = ["curve_order", "gilbert_order", "inverse_order", "locality"]


def _check_size(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def _sign(v: int) -> int:
    return (v > 0) - (v < 0)


def _fill(out: list[int], width: int, x: int, y: int, ax: int, ay: int, bx: int, by: int) -> None:
    """Append, in curve order, the raster indices of the rectangle at corner ``(x, y)`` spanned by the major
    vector ``(ax, ay)`` and the minor vector ``(bx, by)`` (both axis-aligned, one of each pair zero).

    Each split at least halves one side, so the recursion depth is O(log width + log height).
    """
    major = abs(ax + ay)  # length along the major axis
    minor = abs(bx + by)
    ux, uy = _sign(ax), _sign(ay)  # unit steps along the major / minor axes
    vx, vy = _sign(bx), _sign(by)
    start = y * width + x
    if minor == 1 or major == 1:  # a single line: walk straight along it
        length, step = (major, uy * width + ux) if minor == 1 else (minor, vy * width + vx)
        out.extend(range(start, start + length * step, step))
        return
    hax, hay = ax // 2, ay // 2  # half of each vector (floor; nudged to even lengths below)
    hbx, hby = bx // 2, by // 2
    if 2 * major > 3 * minor:
        # Long rectangle: two halves side by side along the major axis, both traversed in the same sense.
        if abs(hax + hay) % 2 and major > 2:
            hax, hay = hax + ux, hay + uy
        _fill(out, width, x, y, hax, hay, bx, by)
        _fill(out, width, x + hax, y + hay, ax - hax, ay - hay, bx, by)
        return
    # Squarish rectangle: go up half the minor side (axes swapped), run the full major length across the far
    # half, and come back down the remaining part to the corner next to the end of the major vector.
    if abs(hbx + hby) % 2 and minor > 2:
        hbx, hby = hbx + vx, hby + vy
    _fill(out, width, x, y, hbx, hby, hax, hay)
    _fill(out, width, x + hbx, y + hby, ax, ay, bx - hbx, by - hby)
    _fill(out, width, x + (ax - ux) + (hbx - vx), y + (ay - uy) + (hby - vy),
          -hbx, -hby, -(ax - hax), -(ay - hay))


@lru_cache(maxsize=64)
def _gilbert_cached(height: int, width: int) -> torch.Tensor:
    out: list[int] = []
    if width >= height:
        _fill(out, width, 0, 0, width, 0, 0, height)
    else:
        _fill(out, width, 0, 0, 0, height, width, 0)
    return torch.tensor(out, dtype=torch.int64)


def gilbert_order(height: int, width: int) -> torch.Tensor:
    """Raster indices (``row * width + col``) of a ``height x width`` grid in generalized-Hilbert-curve order.

    Returns a fresh int64 tensor of length ``height * width`` (a permutation of ``range(height * width)``) that
    starts at cell (0, 0); the computed order is cached per size, the returned tensor is a clone.
    """
    return _gilbert_cached(_check_size("height", height), _check_size("width", width)).clone()


def curve_order(frames: int, height: int, width: int) -> torch.Tensor:
    """Curve order of a frame-major video token grid (``index = (f * height + y) * width + x``).

    Each frame is visited along the same 2-D :func:`gilbert_order`, frames one after another, so slice ``f`` of
    the result equals ``gilbert_order(height, width) + f * height * width``.
    """
    frames = _check_size("frames", frames)
    plane = gilbert_order(_check_size("height", height), _check_size("width", width))
    offsets = torch.arange(frames, dtype=torch.int64) * (height * width)
    return (offsets[:, None] + plane[None, :]).reshape(-1)


def inverse_order(order: torch.Tensor) -> torch.Tensor:
    """Inverse permutation of a 1-D ``order``: ``inverse[order[i]] = i``."""
    if order.dim() != 1:
        raise ValueError(f"order must be a 1-D permutation, got shape {tuple(order.shape)}")
    inverse = torch.empty_like(order, dtype=torch.int64)
    inverse[order.long()] = torch.arange(order.numel(), dtype=torch.int64, device=order.device)
    return inverse


def locality(order: torch.Tensor, height: int, width: int, tile: int) -> float:
    """Mean spatial spread of tiles of ``tile`` consecutive tokens of ``order`` (smaller is better).

    For each tile (the last one may be shorter), the mean Euclidean distance of its cells to the tile's centroid,
    in grid units; the result is the mean over tiles. ``order`` holds frame-major raster indices of
    ``frames * height * width`` tokens; for video the frame index counts as a third coordinate, one unit per frame.
    Raster order (``torch.arange(height * width)``) is the natural baseline.
    """
    height, width, tile = _check_size("height", height), _check_size("width", width), _check_size("tile", tile)
    idx = order.reshape(-1).long().cpu()
    if idx.numel() == 0 or idx.numel() % (height * width):
        raise ValueError(f"order length {idx.numel()} is not a positive multiple of height*width={height * width}")
    coords = torch.stack(
        [idx % width, (idx // width) % height, idx // (height * width)], dim=1
    ).to(torch.float64)
    tile_id = torch.arange(idx.numel()) // tile
    num_tiles = int(tile_id[-1]) + 1
    counts = torch.bincount(tile_id, minlength=num_tiles).to(torch.float64)
    centroid = torch.zeros(num_tiles, 3, dtype=torch.float64).index_add_(0, tile_id, coords) / counts[:, None]
    dist = (coords - centroid[tile_id]).norm(dim=1)
    per_tile = torch.zeros(num_tiles, dtype=torch.float64).index_add_(0, tile_id, dist) / counts
    return float(per_tile.mean())
