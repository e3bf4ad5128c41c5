"""Window attention over a window-major layout read through strided views: the fast CPU path of ``proxy``.

The gather path (:func:`~dit_accel.attention.tiled.tiled_attention`) copies every window's ``(2r+1)^2`` neighbour
windows of keys before attending; on a CPU those copies cost as much as the attention they save. Here the image
tokens are scattered once into window-major order -- frame, window row, window column, then the window's own
tokens -- over a grid padded to whole windows (the shift pads the top and left). For a query window at
``(f, wy, wx)`` and one (frame, row) offset ``(of, oy)``, the keys of windows ``(f + of, wy + oy, wx - r .. wx + r)``
are then one contiguous range of ``(2r+1) W`` tokens, and these ranges are ``W`` tokens apart from one window to the
next: one strided view per offset, no copy. Neighbours that wrap past a row end or fall outside the grid, and
padding tokens, are masked. The offsets' partial results and the pooled-proxy/text part are merged exactly through
their log-sum-exps.

Layout: (B, H, N, D) like SDPA, image tokens in frame-major raster order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from dit_accel.attention.ranges import attention_lse
from dit_accel.core.blocks import TokenGrid


@dataclass(frozen=True)
class WindowLayout:
    """Where each token lives in the padded window-major sequence, and the masks of each (frame, row) offset."""

    windows: tuple[int, int, int]  # (frames, ny, nx) windows of the real grid
    size: int  # tokens per window (rows x cols)
    pad: int  # empty windows before (and after) the real ones, so that every offset's range stays in bounds
    slot: torch.Tensor  # (N,) position of raster token i in the padded sequence
    shifts: tuple[int, ...]  # per offset: first key window of window 0, relative to window 0 (in windows)
    masks: tuple[torch.Tensor | None, ...]  # per offset: (windows, (2r+1) size) additive 0 / -inf, None if none
    near: torch.Tensor  # (windows, windows) bool: attended exactly (Chebyshev distance <= radius)
    counts: torch.Tensor  # (windows,) real tokens per window


@lru_cache(maxsize=64)
def window_layout(grid: TokenGrid, window: tuple[int, int], radius: int, offset: tuple[int, int]) -> WindowLayout:
    rows_per, cols_per = window
    dy, dx = offset
    if not (1 <= rows_per <= grid.height and 1 <= cols_per <= grid.width):
        raise ValueError(f"window {rows_per}x{cols_per} must fit the {grid.height}x{grid.width} token grid")
    if not (0 <= dy < rows_per and 0 <= dx < cols_per):
        raise ValueError(f"window offset {offset} must lie inside one window ({rows_per}x{cols_per})")
    frames = grid.frames
    ny = (grid.height + dy + rows_per - 1) // rows_per
    nx = (grid.width + dx + cols_per - 1) // cols_per
    size = rows_per * cols_per
    count = frames * ny * nx
    frame_radius = radius if frames > 1 else 0
    pad = (frame_radius * ny + radius) * nx + radius
    total = count + 2 * pad

    f, y, x = torch.meshgrid(torch.arange(frames), torch.arange(grid.height), torch.arange(grid.width), indexing="ij")
    py, px = y + dy, x + dx
    window_index = (f * ny + py // rows_per) * nx + px // cols_per
    slot = ((window_index + pad) * size + (py % rows_per) * cols_per + px % cols_per).reshape(-1)
    valid = torch.zeros(total * size, dtype=torch.bool)
    valid[slot] = True

    wf, wy, wx = torch.meshgrid(torch.arange(frames), torch.arange(ny), torch.arange(nx), indexing="ij")
    wf, wy, wx = wf.reshape(-1), wy.reshape(-1), wx.reshape(-1)
    span = 2 * radius + 1
    shifts, masks = [], []
    offsets = [(of, oy) for of in range(-frame_radius, frame_radius + 1) for oy in range(-radius, radius + 1)]
    offsets.sort(key=lambda o: o != (0, 0))  # the window's own row first: never fully masked (a merge base)
    for of, oy in offsets:
        shift = (of * ny + oy) * nx - radius
        neighbour_ok = []
        for ox in range(-radius, radius + 1):
            inside = ((wf + of >= 0) & (wf + of < frames) & (wy + oy >= 0) & (wy + oy < ny) & (wx + ox >= 0)
                      & (wx + ox < nx))
            neighbour_ok.append(inside[:, None].expand(-1, size))
        key_slots = (torch.arange(count)[:, None] + pad + shift) * size + torch.arange(span * size)[None, :]
        ok = torch.cat(neighbour_ok, 1) & valid[key_slots]
        if not bool(ok.any(1).any()):
            continue  # this offset reaches no real window from anywhere (e.g. a single row of windows)
        shifts.append(shift)
        masks.append(None if bool(ok.all()) else torch.zeros(ok.shape).masked_fill(~ok, -math.inf))
    distance = torch.stack([(a[:, None] - a[None, :]).abs() for a in (wf, wy, wx)]).amax(0)
    counts = valid.view(total, size)[pad:pad + count].sum(1)
    return WindowLayout((frames, ny, nx), size, pad, slot, tuple(shifts), tuple(masks), distance <= radius, counts)


def window_density(layout: WindowLayout, num_tokens: int, pooled: bool) -> float:
    """The fraction of dense attention's image keys each query attends on average (exact keys plus proxies)."""
    counts = layout.counts.double()
    exact = (layout.near.double() @ counts)  # real keys of each window's neighbourhood
    far = (~layout.near).sum(1).double() if pooled else torch.zeros_like(exact)
    return float((counts * (exact + far)).sum() / (num_tokens * num_tokens))


def _merge_into(out: torch.Tensor, lse: torch.Tensor, other: torch.Tensor, other_lse: torch.Tensor) -> torch.Tensor:
    """Fold a disjoint key set's attention (``other``, ``other_lse``) into ``out`` in place; returns the merged
    log-sum-exp. The other part's weight is ``sigmoid(other_lse - lse)``: one lerp, stable, 0 for an empty set
    (whose output the CPU flash kernel leaves finite: zeros)."""
    weight = torch.sigmoid(other_lse - lse).unsqueeze(-1).to(out.dtype)
    out.lerp_(other, weight)
    return torch.logaddexp(lse, other_lse)


def _masked_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                      scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attention_lse` with a (1, windows, 1, keys) additive mask; a window whose keys are all masked gets
    log-sum-exp -inf (torch's CPU flash kernel reports 0 there, which would weigh its zero output in a merge)."""
    out, lse = attention_lse(query, key, value, attn_mask=mask, scale=scale)
    if mask is not None:
        dead = torch.isneginf(mask).all(-1)[0, :, 0]  # (windows,)
        if bool(dead.any()):
            lse = lse.masked_fill(dead[None, :, None], -math.inf)
    return out, torch.nan_to_num(lse, nan=-math.inf)


def window_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, grid: TokenGrid, *,
                     window: tuple[int, int], radius: int, offset: tuple[int, int] = (0, 0), pooled: bool = True,
                     shared_key: torch.Tensor | None = None, shared_value: torch.Tensor | None = None,
                     scale: float | None = None) -> torch.Tensor:
    """Each window attends exactly to the windows within Chebyshev distance ``radius`` (over frames too in video),
    to one average-pooled key/value per other window with logit ``+ log(its token count)`` (if ``pooled``), and to
    the shared (text) keys. The same attention as :func:`~dit_accel.attention.tiled.tiled_attention` with
    :func:`~dit_accel.attention.plans.window_plan`, without copying keys."""
    batch, heads, length, dim = query.shape
    if length != grid.num_tokens:
        raise ValueError(f"{length} image tokens do not match the {grid} token grid")
    layout = window_layout(grid, window, radius, offset)
    frames, ny, nx = layout.windows
    count, size, pad = frames * ny * nx, layout.size, layout.pad
    total = count + 2 * pad
    rows, dv = batch * heads, value.shape[-1]
    device, dtype = query.device, query.dtype
    slot = layout.slot.to(device)

    def scatter(tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.new_zeros(rows, total * size, tensor.shape[-1])
        out[:, slot] = tensor.reshape(rows, length, -1)
        return out

    q, k, v = scatter(query), scatter(key), scatter(value)
    q_windows = q[:, pad * size:(pad + count) * size].view(rows, count, size, dim)
    span = (2 * radius + 1) * size
    out = lse = None
    for shift, mask in zip(layout.shifts, layout.masks):
        start = (pad + shift) * size
        k_view = k.as_strided((rows, count, span, dim), (k.stride(0), size * dim, dim, 1), start * dim)
        v_view = v.as_strided((rows, count, span, dv), (v.stride(0), size * dv, dv, 1), start * dv)
        attn_mask = None if mask is None else mask.to(device, dtype)[None, :, None, :]
        o, l = _masked_attention(q_windows, k_view, v_view, attn_mask, scale)
        if out is None:  # the windows' own row: every query has a real key there
            out, lse = o, l
        else:
            lse = _merge_into(out, lse, o, l)

    extra_k, extra_v, bias = [], [], []
    near = layout.near.to(device)
    if pooled and not bool(near.all()):
        counts = layout.counts.to(device)
        denominator = counts.clamp(min=1)[:, None].to(dtype)
        real = slice(pad * size, (pad + count) * size)
        extra_k.append(k[:, real].view(rows, count, size, dim).sum(2) / denominator)
        extra_v.append(v[:, real].view(rows, count, size, dv).sum(2) / denominator)
        log_counts = counts.to(torch.float32).log()[None, :].expand(count, -1)
        bias.append(torch.where(near, -math.inf, log_counts))
    if shared_key is not None and shared_key.shape[2]:
        extra_k.append(shared_key.reshape(rows, -1, dim))
        extra_v.append(shared_value.reshape(rows, -1, dv))
        bias.append(torch.zeros(count, shared_key.shape[2], device=device))
    if extra_k:
        keys2, values2 = torch.cat(extra_k, 1), torch.cat(extra_v, 1)
        mask = torch.cat(bias, 1).to(dtype)[None, :, None, :]
        o2, l2 = _masked_attention(q_windows, keys2[:, None].expand(-1, count, -1, -1),
                                   values2[:, None].expand(-1, count, -1, -1), mask, scale)
        _merge_into(out, lse, o2, l2)
    result = out.reshape(rows, count * size, dv)[:, slot - pad * size]
    return result.view(batch, heads, length, dv)


__all__ = ["WindowLayout", "window_attention", "window_density", "window_layout"]
