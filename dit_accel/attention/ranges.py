"""Tile attention over contiguous key ranges, without copying keys: the fast CPU path of ``hilbert``.

When tokens are already in curve order, the exact keys of tile ``j`` (tiles ``j - r .. j + r``) are one
contiguous range of the sequence, and for all interior tiles these ranges are equally spaced. A strided view of
the key tensor then gives every tile its key window with no gather, and one SDPA call attends all of them. The
pooled tile keys and the text keys form a second, small attention; the two are merged exactly through their
log-sum-exps.

Layout: (B, H, N, D), like SDPA. Tiles start at ``j * tile - offset`` (the first and last tiles may be shorter).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def attention_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, attn_mask: torch.Tensor | None = None,
                  scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPA that also returns the log-sum-exp of each query's scores: (out (..., Lq, Dv), lse (..., Lq) fp32, fp64
    for fp64 input).

    On CPU this is torch's flash kernel (strided, even overlapping, key views are read in place); elsewhere, and
    where the value head size differs from the query's (the flash kernel refuses it), the math form (the Triton
    kernels add the GPU path).
    """
    if (query.device.type == "cpu" and _FLASH_CPU is not None and query.ndim == 4
            and value.shape[-1] == query.shape[-1] == key.shape[-1]):
        out, lse = _FLASH_CPU(query, key, value, 0.0, False, attn_mask=attn_mask, scale=scale)
        return out, lse if lse.dtype == torch.float64 else lse.float()
    work = torch.float64 if query.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = (query.to(work) @ key.to(work).transpose(-1, -2)) * scale
    if attn_mask is not None:
        scores = scores + attn_mask.to(work)
    lse = scores.logsumexp(-1)
    return ((scores - lse[..., None]).exp() @ value.to(work)).to(query.dtype), lse


def merge_lse(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> torch.Tensor:
    """The attention over the union of two disjoint key sets, from each set's output and log-sum-exp (computed in
    the log-sum-exps' dtype)."""
    out_b = torch.where(torch.isfinite(lse_b)[..., None], out_b, torch.zeros((), dtype=out_b.dtype))
    top = torch.maximum(lse_a, lse_b)
    weight_a, weight_b = (lse_a - top).exp(), (lse_b - top).exp()
    total = weight_a + weight_b
    work = lse_a.dtype
    return ((out_a.to(work) * (weight_a / total)[..., None] + out_b.to(work) * (weight_b / total)[..., None])
            .to(out_a.dtype))


def tile_bounds(length: int, tile: int, offset: int) -> list[tuple[int, int]]:
    """(start, end) of every tile: tile ``j`` covers ``[j * tile - offset, (j + 1) * tile - offset)`` clipped."""
    count = -(-(length + offset) // tile)
    return [(max(0, j * tile - offset), min(length, (j + 1) * tile - offset)) for j in range(count)]


def curve_density(length: int, tile: int, radius: int, offset: int, pooled: bool, pool: int | None = None) -> float:
    """The fraction of dense attention's image keys that :func:`curve_tile_attention` attends per query."""
    per_tile = tile // (pool or tile)
    bounds = tile_bounds(length, tile, offset)
    count = len(bounds)
    keys = 0
    for j, (s, e) in enumerate(bounds):
        exact = bounds[min(count - 1, j + radius)][1] - bounds[max(0, j - radius)][0]
        far_tiles = count - (min(count - 1, j + radius) - max(0, j - radius) + 1)
        far = far_tiles * per_tile if pooled and count > 2 * radius + 1 else 0
        keys += (e - s) * (exact + far)
    return keys / float(length * length)


def curve_tile_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, tile: int, radius: int,
                         offset: int = 0, pooled: bool = True, pool: int | None = None,
                         shared_key: torch.Tensor | None = None, shared_value: torch.Tensor | None = None,
                         scale: float | None = None) -> torch.Tensor:
    """Tile attention over tokens already in curve order.

    Each tile attends exactly to the tiles within ``radius`` along the sequence, to one average-pooled key per
    ``pool`` consecutive tokens of every other tile (logit + log(count), if ``pooled``; ``pool`` must divide
    ``tile``, ``None`` pools whole tiles) and to the shared (text) keys. Equal to
    :func:`~dit_accel.attention.tiled.tiled_attention` with the matching plan when ``pool`` is the tile, and to SDPA
    when one tile holds everything or ``pool`` is 1.
    """
    batch, heads, length, dim = query.shape
    if not 1 <= tile <= length:
        raise ValueError(f"tile {tile} must lie in 1..{length} (the image tokens)")
    if not 0 <= offset < tile:
        raise ValueError(f"offset {offset} must lie in 0..{tile - 1}")
    pool = tile if pool is None else pool
    if not 1 <= pool <= tile or tile % pool:
        raise ValueError(f"pool {pool} must divide the tile size {tile}")
    if query.is_cuda:  # the Triton block-sparse kernel computes the same tiles (None: not available)
        from dit_accel.kernels.tile_lut import cuda_curve_tile_attention
        out = cuda_curve_tile_attention(query, key, value, tile=tile, radius=radius, offset=offset, pooled=pooled,
                                        pool=pool, shared_key=shared_key, shared_value=shared_value, scale=scale)
        if out is not None:
            return out
    rows = batch * heads
    q = query.reshape(rows, length, dim)
    k = key.reshape(rows, length, dim).contiguous()
    v = value.reshape(rows, length, value.shape[-1]).contiguous()
    bounds = tile_bounds(length, tile, offset)
    count = len(bounds)
    out = torch.empty(rows, length, v.shape[-1], dtype=query.dtype, device=query.device)
    lse = torch.empty(rows, length, dtype=torch.float32, device=query.device)

    # Interior tiles: full size, key window [start - radius*tile, end + radius*tile) inside the sequence.
    first = radius + (1 if offset else 0)
    last = (length + offset) // tile - radius  # exclusive
    if last > first:
        start = first * tile - offset
        window = (2 * radius + 1) * tile
        n = last - first
        q_view = q.as_strided((rows, n, tile, dim), (q.stride(0), tile * dim, dim, 1), q.storage_offset()
                              + start * dim) if q.is_contiguous() else q[:, start:start + n * tile].reshape(rows, n, tile, dim)
        base = start - radius * tile
        k_view = k.as_strided((rows, n, window, dim), (k.stride(0), tile * dim, dim, 1), k.storage_offset() + base * dim)
        dv = v.shape[-1]
        v_view = v.as_strided((rows, n, window, dv), (v.stride(0), tile * dv, dv, 1), v.storage_offset() + base * dv)
        o, l = attention_lse(q_view, k_view, v_view, scale=scale)
        out[:, start:start + n * tile] = o.reshape(rows, n * tile, dv)
        lse[:, start:start + n * tile] = l.reshape(rows, n * tile)
        interior = range(first, last)
    else:
        interior = range(0)
    for j, (s, e) in enumerate(bounds):
        if j in interior:
            continue
        ks, ke = bounds[max(0, j - radius)][0], bounds[min(count - 1, j + radius)][1]
        o, l = attention_lse(q[None, :, s:e], k[None, :, ks:ke], v[None, :, ks:ke], scale=scale)
        out[:, s:e], lse[:, s:e] = o[0], l[0]

    extra_k, extra_v, bias = [], [], []
    if pooled and count > 2 * radius + 1:
        per_tile, total = tile // pool, count * tile
        k_blocks = F.pad(k, (0, 0, offset, total - offset - length)).view(rows, count * per_tile, pool, dim)
        v_blocks = F.pad(v, (0, 0, offset, total - offset - length)).view(rows, count * per_tile, pool, v.shape[-1])
        present = torch.zeros(total, device=query.device)
        present[offset:offset + length] = 1
        sizes = present.view(count * per_tile, pool).sum(1)
        extra_k.append(k_blocks.sum(2) / sizes.clamp(min=1)[:, None].to(k.dtype))
        extra_v.append(v_blocks.sum(2) / sizes.clamp(min=1)[:, None].to(v.dtype))
        tile_of_block = torch.arange(count * per_tile, device=query.device) // per_tile
        near = (torch.arange(count, device=query.device)[:, None] - tile_of_block[None, :]).abs() <= radius
        bias.append(torch.where(near, -math.inf, sizes.log()[None, :].expand(count, -1)))  # log 0: empty block
    if shared_key is not None and shared_key.shape[2]:
        extra_k.append(shared_key.reshape(rows, -1, dim))
        extra_v.append(shared_value.reshape(rows, -1, shared_value.shape[-1]))
        bias.append(torch.zeros(count, shared_key.shape[2], device=query.device))
    if extra_k:
        keys2, values2 = torch.cat(extra_k, 1), torch.cat(extra_v, 1)
        if len(bias) == 1 and not (pooled and count > 2 * radius + 1):  # text only: one plain call
            o2, l2 = attention_lse(q[None], keys2[None], values2[None], scale=scale)
            o2, l2 = o2[0], l2[0]
        else:
            q_tiles = F.pad(q, (0, 0, offset, count * tile - offset - length)).view(rows, count, tile, dim)
            mask = torch.cat(bias, 1).to(query.dtype)[None, :, None, :]
            o2, l2 = attention_lse(q_tiles, keys2[:, None].expand(-1, count, -1, -1),
                                   values2[:, None].expand(-1, count, -1, -1), attn_mask=mask, scale=scale)
            o2 = o2.reshape(rows, count * tile, -1)[:, offset:offset + length]
            l2 = l2.reshape(rows, count * tile)[:, offset:offset + length]
        out = merge_lse(out, lse, o2, l2)
    return out.view(batch, heads, length, -1)
