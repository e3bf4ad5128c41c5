"""GNA: generalized neighbourhood attention on the token grid (Hassani et al., arXiv 2504.16922; NATTEN).

Each image query attends to a ``kernel`` x ``kernel`` window of image keys (x ``kernel_frames`` frames in video)
around it, plus every text key exactly. ``dilation`` spreads the window over every ``dilation``-th token (the
window then stays within the query's residue class, as NATTEN's dilated neighbourhoods do); ``stride`` groups the
queries in ``stride`` x ``stride`` tiles that share one window, the one of the tile's centre: stride 1 is sliding
neighbourhood attention, stride = kernel is blocked (Swin-style) window attention, and everything between trades
the two. Windows never leave the grid: at a border they shift inward, so every query sees a full window (NATTEN's
rule). The window of each query is a product of one window per axis, so the math is done per axis in pure
functions (:func:`axis_windows`). The CPU path groups neighbouring query tiles into runs (:func:`merged_axis`)
that gather the union of their windows once, each query masked to its own window (exact), and runs one batched
SDPA per chunk of runs; the text keys are one separate attention over all queries, merged through the
log-sum-exps. Runs of a few tiles read far fewer keys per query than one gather per small tile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dit_accel.attention.base import ImageAttentionConfig, ImageAttentionPlugin, dense_image_attention
from dit_accel.attention.ranges import attention_lse, merge_lse
from dit_accel.core.blocks import TokenGrid
from dit_accel.core.plugin import register_plugin
from dit_accel.recipe import check_range, register_config

# Gathered key rows per chunk of query runs, and mask entries per chunk (bound the copies at large grids).
_CHUNK_KEYS = 1 << 20
_CHUNK_MASK = 1 << 22
_RUN_COST = 16.0  # queries' worth of per-run overhead (gather, kernel set-up): few queries per key set are slow


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


def merged_axis(window: torch.Tensor, dilation: int, merge: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Runs of up to ``merge`` consecutive query groups of one axis (same residue class mod ``dilation``).

    ``window`` (G, kernel) is :func:`axis_windows`'s. Returns ``(run, union, offset)``: ``run[g]`` the run of group
    ``g``; ``union[r]`` (R, U) the positions every window of run ``r`` lies in (its first window's start to its
    last window's end, stepping by ``dilation``; padded with the run's last position, which no window of the run
    reaches beyond, so padding is never attended); ``offset[g]`` where group ``g``'s window starts in its run's
    union (windows start no earlier than the ones before them in their class, so each run's union is contiguous).
    """
    groups, kernel = window.shape
    residue = (window[:, 0] % dilation).tolist()
    firsts, run = [], []
    for g in range(groups):
        if not firsts or g - firsts[-1] == merge or residue[g] != residue[firsts[-1]]:
            firsts.append(g)
        run.append(len(firsts) - 1)
    run = torch.tensor(run, dtype=torch.long)
    lasts = torch.tensor(firsts[1:] + [groups], dtype=torch.long) - 1
    first_start = window[firsts, 0]
    span = (window[lasts, 0] - first_start) // dilation + kernel
    steps = torch.minimum(torch.arange(int(span.max()))[None, :], span[:, None] - 1)
    union = first_start[:, None] + dilation * steps
    offset = (window[:, 0] - first_start[run]) // dilation
    return run, union, offset


def _choose_merge(axes: list[tuple[torch.Tensor, torch.Tensor]], dilation: tuple[int, int, int], num_tokens: int,
                  cost: float = _RUN_COST) -> tuple[int, int, int]:
    """The merge (same on every axis, 1-8) that minimises the keys a query's run reads, ``U x (1 + cost / S)``
    for unions of ``U`` keys shared by ``S`` queries on average: merging tiles whose windows overlap reads fewer
    keys per query (each union gathered once) but attends the union's keys outside a query's own window in vain,
    and the SDPA kernel is less efficient on few queries per key set."""
    best = None
    for merge in range(1, 9):
        runs = [merged_axis(window, d, merge)[1] for (_, window), d in zip(axes, dilation)]
        union = math.prod(r.shape[1] for r in runs)
        queries = num_tokens / math.prod(r.shape[0] for r in runs)
        score = union * (1.0 + cost / queries)
        if best is None or score < best[0] - 1e-9:
            best = (score, merge)
    return (best[1],) * 3


@dataclass(frozen=True)
class GroupedWindows:
    """Runs of query tiles that share one gathered key union (see :func:`merged_axis`), the CPU path's work list.

    ``queries`` (R, S) each run's query tokens (padded by repeating its first, ``valid`` marks the real ones);
    ``keys`` (R, U) its union of windows (U = Uf x Uh x Uw, frame-major); ``offsets`` (N, 3) where each token's
    own window starts in its run's union per axis; ``kernel`` and ``union`` the window and union sizes per axis.
    ``offsets`` is ``None`` when every union is exactly its tile's window (nothing to mask).
    """

    queries: torch.Tensor
    valid: torch.Tensor
    keys: torch.Tensor
    offsets: torch.Tensor | None
    kernel: tuple[int, int, int]
    union: tuple[int, int, int]

    def to(self, device: torch.device) -> "GroupedWindows":
        return GroupedWindows(self.queries.to(device), self.valid.to(device), self.keys.to(device),
                              None if self.offsets is None else self.offsets.to(device), self.kernel, self.union)

    def mask_tables(self, dtype: torch.dtype) -> list[torch.Tensor]:
        """Per axis, (N, U_axis) additive masks: 0 where the union position is inside the token's own window."""
        tables = []
        for axis, (kernel, size) in enumerate(zip(self.kernel, self.union)):
            position = torch.arange(size, device=self.offsets.device)
            start = self.offsets[:, axis][:, None]
            table = torch.zeros(start.shape[0], size, dtype=dtype, device=start.device)
            tables.append(table.masked_fill_((position < start) | (position >= start + kernel), -torch.inf))
        return tables


def _run_mask(tables: list[torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """Additive (..., U) mask of query ``tokens`` over their runs' unions: the per-axis masks, broadcast-summed."""
    sizes = [t.shape[1] for t in tables]
    f, h, w = (t[tokens] for t in tables)
    total = f.view(*tokens.shape, sizes[0], 1, 1) + h.view(*tokens.shape, 1, sizes[1], 1)
    return (total + w.view(*tokens.shape, 1, 1, sizes[2])).reshape(*tokens.shape, -1)


def _tiles(tile_of: torch.Tensor, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tiles, width) tokens of each tile (padded with its first token) and which entries are real."""
    order = torch.argsort(tile_of, stable=True)
    counts = torch.bincount(tile_of, minlength=tiles)
    width = int(counts.max())
    offsets = torch.cumsum(counts, 0) - counts
    slot = torch.arange(order.numel()) - offsets[tile_of[order]]
    queries = order[offsets].unsqueeze(1).repeat(1, width)  # padding: the tile's first token
    queries[tile_of[order], slot] = order
    return queries, torch.arange(width)[None, :] < counts[:, None]


def _product(windows: list[torch.Tensor], grid: TokenGrid) -> torch.Tensor:
    """Token indices of the products of per-axis position lists (frames, height, width), one row per triple."""
    wf, wh, ww = windows
    keys = ((wf[:, None, None, :, None, None] * grid.height + wh[None, :, None, None, :, None]) * grid.width
            + ww[None, None, :, None, None, :])
    return keys.reshape(len(wf) * len(wh) * len(ww), -1)


@dataclass(frozen=True)
class NeighbourhoodPlan:
    """Query tiles and their key windows over a ``frames x height x width`` grid (token indices in grid order).

    ``queries`` (T, S): each tile's query tokens, padded by repeating its first token (``valid`` marks the real
    ones); ``keys`` (T, K): each tile's window. Key density: ``K / N``. ``grouped``: the CPU path's runs of tiles
    sharing one gathered key union (``None``: one run per tile).
    """

    queries: torch.Tensor
    valid: torch.Tensor
    keys: torch.Tensor
    num_tokens: int
    grouped: GroupedWindows | None = None

    def key_density(self) -> float:
        return self.keys.shape[1] / self.num_tokens

    def to(self, device: torch.device) -> "NeighbourhoodPlan":
        return NeighbourhoodPlan(self.queries.to(device), self.valid.to(device), self.keys.to(device),
                                 self.num_tokens, None if self.grouped is None else self.grouped.to(device))


def neighbourhood_plan(grid: TokenGrid, kernel: tuple[int, int, int], stride: tuple[int, int, int],
                       dilation: tuple[int, int, int], merge: tuple[int, int, int] | None = None
                       ) -> NeighbourhoodPlan:
    """The plan of ``(frames, height, width)`` kernels, strides and dilations over ``grid``. ``merge``: query
    groups per axis that share one gathered union of windows on the CPU path (``None``: chosen by the keys read per
    query); it changes the work, never the result."""
    sizes = (grid.frames, grid.height, grid.width)
    axes = [axis_windows(n, k, s, d) for n, k, s, d in zip(sizes, kernel, stride, dilation)]
    (gf, wf), (gh, wh), (gw, ww) = axes
    # A token's tile is the triple of its axis groups; a tile's window the product of the axis windows.
    tile_of = ((gf[:, None, None] * len(wh) + gh[None, :, None]) * len(ww) + gw[None, None, :]).reshape(-1)
    queries, valid = _tiles(tile_of, len(wf) * len(wh) * len(ww))
    keys = _product([wf, wh, ww], grid)
    if merge is None:
        merge = _choose_merge(axes, dilation, grid.num_tokens)
    runs = [merged_axis(w, d, m) for (_, w), d, m in zip(axes, dilation, merge)]
    if all(union.shape[0] == window.shape[0] for (_, union, _), (_, window) in zip(runs, axes)):
        return NeighbourhoodPlan(queries, valid, keys, grid.num_tokens)  # every run is one tile: nothing to group
    (rf, uf, of), (rh, uh, oh), (rw, uw, ow) = runs
    run_of = ((rf[gf][:, None, None] * len(uh) + rh[gh][None, :, None]) * len(uw)
              + rw[gw][None, None, :]).reshape(-1)
    run_queries, run_valid = _tiles(run_of, len(uf) * len(uh) * len(uw))
    offsets = torch.stack(torch.broadcast_tensors(of[gf][:, None, None], oh[gh][None, :, None],
                                                  ow[gw][None, None, :]), -1).reshape(-1, 3)
    exact = all(union.shape[1] == k for (_, union, _), k in zip(runs, kernel))  # unions = windows: no mask
    grouped = GroupedWindows(run_queries, run_valid, _product([uf, uh, uw], grid), None if exact else offsets,
                             tuple(kernel), (uf.shape[1], uh.shape[1], uw.shape[1]))
    return NeighbourhoodPlan(queries, valid, keys, grid.num_tokens, grouped)


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
    """Image queries (B, H, N, D) against their tile's window of image keys plus every text key (B, H, L, D).

    Each run of tiles gathers its union of windows once, its queries masked to their own windows; the text keys
    are one separate attention over all queries, merged exactly through the log-sum-exps."""
    batch, heads, length, dim = query.shape
    grouped = plan.grouped
    if grouped is None:
        grouped = GroupedWindows(plan.queries, plan.valid, plan.keys, None, (0, 0, 0), (0, 0, 0))
    runs, width = grouped.queries.shape
    window = grouped.keys.shape[1]
    text = 0 if text_key is None else text_key.shape[2]
    out = query.new_empty((batch, heads, length, value.shape[-1]))
    lse = None
    tables = None if grouped.offsets is None else grouped.mask_tables(query.dtype)
    chunk = max(1, min(_CHUNK_KEYS // max(1, batch * heads * window), _CHUNK_MASK // (width * window)))
    for first in range(0, runs, chunk):
        rows = slice(first, min(first + chunk, runs))
        q_index, k_index = grouped.queries[rows], grouped.keys[rows]
        count = q_index.shape[0]
        q = query.index_select(2, q_index.reshape(-1)).view(batch * heads, count, width, dim)
        k = key.index_select(2, k_index.reshape(-1)).view(batch * heads, count, window, dim)
        v = value.index_select(2, k_index.reshape(-1)).view(batch * heads, count, window, value.shape[-1])
        mask = None if grouped.offsets is None else _run_mask(tables, q_index)[None]
        part, part_lse = attention_lse(q, k, v, attn_mask=mask, scale=scale)
        valid = grouped.valid[rows]
        tokens = q_index[valid]
        out[:, :, tokens] = part.view(batch, heads, count, width, -1)[:, :, valid]
        if text:
            if lse is None:
                lse = part_lse.new_empty((batch, heads, length))
            lse[:, :, tokens] = part_lse.view(batch, heads, count, width)[:, :, valid]
    if not text:
        return out
    text_out, text_lse = attention_lse(query, text_key, text_value, scale=scale)
    return merge_lse(out, lse, text_out, text_lse)


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
        scale = call.options.get("scale")
        if query.is_cuda:
            from dit_accel.kernels.window_lut import window_attention, window_kernel_usable

            if window_kernel_usable(query, key, value, text_key, text_value):
                out = window_attention(query, key, value, plan, text_key=text_key, text_value=text_value,
                                       scale=scale)
                return out, density
        out = neighbourhood_attention(query, key, value, plan, text_key=text_key, text_value=text_value, scale=scale)
        return out, density
