"""GNA: generalized neighbourhood attention on the token grid (Hassani et al., arXiv 2504.16922; NATTEN).

Each image query attends to a ``kernel`` x ``kernel`` window of image keys (x ``kernel_frames`` frames in video)
around it, plus every text key exactly. ``dilation`` spreads the window over every ``dilation``-th token (the
window then stays within the query's residue class, as NATTEN's dilated neighbourhoods do); ``stride`` groups the
queries in ``stride`` x ``stride`` tiles that share one window, the one of the tile's centre: stride 1 is sliding
neighbourhood attention, stride = kernel is blocked (Swin-style) window attention, and everything between trades
the two. Windows never leave the grid: at a border they shift inward, so every query sees a full window (NATTEN's
rule). The window of each query is a product of one window per axis, so the math is done per axis in pure
functions (:func:`axis_windows`), and the CPU path gathers each query tile's window once and runs one batched SDPA
over all tiles (chunked to bound memory).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dit_accel.attention.base import ImageAttentionConfig, ImageAttentionPlugin, dense_image_attention
from dit_accel.core.blocks import TokenGrid
from dit_accel.core.plugin import register_plugin
from dit_accel.recipe import check_range, register_config

# Gathered key rows per chunk of query tiles (bounds the (tiles, window, D) copies at large grids).
_CHUNK_KEYS = 1 << 20


# ------------------------------------------------------------------------------------------------- the math
def axis_windows(length: int, kernel: int, stride: int = 1, dilation: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The neighbourhoods along one axis of ``length`` positions.

    Returns ``(group, window)``: ``group[i]`` numbers the query group of position ``i`` (positions of one residue
    class mod ``dilation`` grouped ``stride`` at a time), and ``window[g]`` (``kernel`` positions) is the window of
    group ``g``: centred on the group's centre (``start + size // 2``; an even kernel reaches one further back, as in
    NATTEN), stepping by ``dilation``, shifted inward at the borders. Raises ``ValueError`` when the window does not
    fit (``kernel > ceil(length / dilation)`` for some residue class).
    """
    if kernel < 1 or stride < 1 or dilation < 1:
        raise ValueError(f"kernel, stride and dilation must be >= 1, got {kernel}, {stride}, {dilation}")
    group = torch.empty(length, dtype=torch.long)
    windows = []
    for residue in range(min(dilation, length)):
        members = list(range(residue, length, dilation))  # this class, in order
        count = len(members)
        if kernel > count:
            raise ValueError(f"a window of {kernel} does not fit {count} positions (axis of {length}, dilation "
                             f"{dilation})")
        for first in range(0, count, stride):
            size = min(stride, count - first)
            centre = first + size // 2
            start = min(max(centre - kernel // 2, 0), count - kernel)
            for i in range(first, first + size):
                group[members[i]] = len(windows)
            windows.append([members[start + j] for j in range(kernel)])
    return group, torch.tensor(windows, dtype=torch.long)


@dataclass(frozen=True)
class NeighbourhoodPlan:
    """Query tiles and their key windows over a ``frames x height x width`` grid (token indices in grid order).

    ``queries`` (T, S): each tile's query tokens, padded by repeating its first token (``valid`` marks the real
    ones); ``keys`` (T, K): each tile's window. Key density: ``K / N``.
    """

    queries: torch.Tensor
    valid: torch.Tensor
    keys: torch.Tensor
    num_tokens: int

    def key_density(self) -> float:
        return self.keys.shape[1] / self.num_tokens

    def to(self, device: torch.device) -> "NeighbourhoodPlan":
        return NeighbourhoodPlan(self.queries.to(device), self.valid.to(device), self.keys.to(device),
                                 self.num_tokens)


def neighbourhood_plan(grid: TokenGrid, kernel: tuple[int, int, int], stride: tuple[int, int, int],
                       dilation: tuple[int, int, int]) -> NeighbourhoodPlan:
    """The plan of ``(frames, height, width)`` kernels, strides and dilations over ``grid``."""
    sizes = (grid.frames, grid.height, grid.width)
    axes = [axis_windows(n, k, s, d) for n, k, s, d in zip(sizes, kernel, stride, dilation)]
    (gf, wf), (gh, wh), (gw, ww) = axes
    # A token's tile is the triple of its axis groups; a tile's window the product of the axis windows.
    tile_of = (gf[:, None, None] * len(wh) + gh[None, :, None]) * len(ww) + gw[None, None, :]
    tile_of = tile_of.reshape(-1)
    order = torch.argsort(tile_of, stable=True)
    counts = torch.bincount(tile_of, minlength=len(wf) * len(wh) * len(ww))
    width = int(counts.max())
    offsets = torch.cumsum(counts, 0) - counts
    slot = torch.arange(order.numel()) - offsets[tile_of[order]]
    queries = order[offsets].unsqueeze(1).repeat(1, width)  # padding: the tile's first token
    queries[tile_of[order], slot] = order
    valid = torch.arange(width)[None, :] < counts[:, None]
    keys = ((wf[:, None, None, :, None, None] * grid.height + wh[None, :, None, None, :, None]) * grid.width
            + ww[None, None, :, None, None, :])
    keys = keys.reshape(len(wf) * len(wh) * len(ww), -1)
    return NeighbourhoodPlan(queries, valid, keys, grid.num_tokens)


def neighbourhood_mask(grid: TokenGrid, kernel: tuple[int, int, int], stride: tuple[int, int, int],
                       dilation: tuple[int, int, int]) -> torch.Tensor:
    """Boolean ``(N, N)`` mask: query ``i`` may attend to key ``j`` (the masked-dense reference of the plan)."""
    plan = neighbourhood_plan(grid, kernel, stride, dilation)
    mask = torch.zeros(grid.num_tokens, grid.num_tokens, dtype=torch.bool)
    for tile in range(plan.queries.shape[0]):
        rows = plan.queries[tile][plan.valid[tile]]
        mask[rows[:, None], plan.keys[tile][None, :]] = True
    return mask


def neighbourhood_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: NeighbourhoodPlan, *,
                            text_key: torch.Tensor | None = None, text_value: torch.Tensor | None = None,
                            scale: float | None = None) -> torch.Tensor:
    """Image queries (B, H, N, D) against their tile's window of image keys plus every text key (B, H, L, D)."""
    batch, heads, _, dim = query.shape
    tiles, width = plan.queries.shape
    window = plan.keys.shape[1]
    text = 0 if text_key is None else text_key.shape[2]
    out = query.new_empty((batch, heads, query.shape[2], value.shape[-1]))
    chunk = max(1, _CHUNK_KEYS // max(1, batch * heads * (window + text)))
    for first in range(0, tiles, chunk):
        rows = slice(first, min(first + chunk, tiles))
        q_index, k_index = plan.queries[rows], plan.keys[rows]
        count = q_index.shape[0]
        q = query[:, :, q_index.reshape(-1)].reshape(batch, heads, count, width, dim)
        k = key[:, :, k_index.reshape(-1)].reshape(batch, heads, count, window, dim)
        v = value[:, :, k_index.reshape(-1)].reshape(batch, heads, count, window, value.shape[-1])
        if text:
            k = torch.cat([k, text_key[:, :, None].expand(-1, -1, count, -1, -1)], 3)
            v = torch.cat([v, text_value[:, :, None].expand(-1, -1, count, -1, -1)], 3)
        part = F.scaled_dot_product_attention(q, k, v, scale=scale)
        valid = plan.valid[rows]
        out[:, :, q_index[valid]] = part[:, :, valid]
    return out


# ------------------------------------------------------------------------------------------------ the plugin
@register_config("gna")
@dataclass(frozen=True)
class GNAConfig(ImageAttentionConfig):
    """Generalized neighbourhood attention over the image tokens.

    Args:
        kernel (`int`, defaults to `0`): window side in tokens over height and width; 0 sizes it by ``coverage``.
            Allowed: 0-512.
        coverage (`float`, defaults to `0.5`): with ``kernel=0``, the window side as a fraction of the grid's
            shorter side (0.5: a quarter of the keys), so one setting fits every resolution. Recommended 0.3-0.6;
            smaller windows lose the global layout. Allowed: 0.05-1.
        kernel_frames (`int`, defaults to `0`): window length over frames (video); 0 keeps every frame.
            Allowed: 0-512.
        stride (`int`, defaults to `1`): queries grouped ``stride`` x ``stride`` share their tile centre's window;
            1 is sliding neighbourhood attention, ``kernel`` is blocked window attention. Allowed: 1-512.
        dilation (`int`, defaults to `1`): window taps every ``dilation`` tokens. Allowed: 1-64.
        start / end: fractions of the schedule to act on; ``start=0.2`` keeps the layout-forming first steps dense.
    """

    kernel: int = 0
    coverage: float = 0.5
    kernel_frames: int = 0
    stride: int = 1
    dilation: int = 1

    def validate(self) -> None:
        super().validate()
        check_range(self, "kernel", 0, 512, integer=True)
        check_range(self, "coverage", 0.05, 1.0)
        check_range(self, "kernel_frames", 0, 512, integer=True)
        check_range(self, "stride", 1, 512, integer=True)
        check_range(self, "dilation", 1, 64, integer=True)


@register_plugin(GNAConfig)
class GNAPlugin(ImageAttentionPlugin):
    def install(self) -> None:
        super().install()
        self._plans: dict = {}

    def _settings(self, grid: TokenGrid):
        config = self.config
        side = config.kernel or max(1, round(min(grid.height, grid.width) * config.coverage))
        frames = config.kernel_frames or grid.frames
        return (min(frames, grid.frames), side, side), (1, config.stride, config.stride), (1, config.dilation,
                                                                                            config.dilation)

    def image_attention(self, query, key, value, text_key, text_value, grid, layer, call):
        kernel, stride, dilation = self._settings(grid)
        key_ = (grid, kernel, stride, dilation, query.device)
        plan = self._plans.get(key_)
        if plan is None:
            try:
                plan = neighbourhood_plan(grid, kernel, stride, dilation).to(query.device)
            except ValueError as error:  # a resolution too small for the setting: never a crash
                self._fallback(f"gna window {kernel[1]} x dilation {dilation[1]} does not fit the "
                               f"{grid.height}x{grid.width} token grid ({error})", call)
                return dense_image_attention(query, key, value, text_key, text_value, call), 1.0
            self._plans[key_] = plan
        density = plan.key_density()
        if density >= 1.0:
            return dense_image_attention(query, key, value, text_key, text_value, call), 1.0
        out = neighbourhood_attention(query, key, value, plan, text_key=text_key, text_value=text_value,
                                      scale=call.options.get("scale"))
        return out, density
