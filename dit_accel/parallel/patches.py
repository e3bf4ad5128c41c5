"""The pure geometry and math of displaced patch parallelism: who owns which rows, who sends what to whom.

The image tokens of one call form a grid of ``rows x width`` tokens (video: the rows of every frame stacked, frame
after frame, so ``rows = frames * height``) in row-major order, which is the order of the model's sequence. Rank
``r`` of ``world`` owns the patch of rows ``[r * R, (r + 1) * R)`` with ``R = rows / world``: a contiguous chunk of
the sequence, which is exactly the chunk diffusers' ``EquipartitionSharder`` gives it when a ``_cp_plan`` splits
the image tokens along the sequence dimension.

What rank ``src`` sends to rank ``dst`` each exchange is a :class:`Share`:

* DistriFusion (``band=None``): every row of its patch, exact.
* PCPP (``band=k``): only the rows of its patch that lie within ``k`` rows of ``dst``'s patch (the *halo* of
  ``dst``: ``k`` rows above it and ``k`` below), exact; the rest of its patch (the *far* rows, one contiguous range
  on the side away from ``dst``) either dropped (``pool=0``) or summarised as ``pool x pool`` tiles of mean keys
  and values (:func:`pool_rows`). A patch not adjacent to ``dst`` has no row in the halo once ``k <= R`` and is
  then sent as tiles only.

A pooled tile stands for the ``c`` keys it averages: attending to it with a logit bias of ``log(c)`` gives it the
weight ``c * exp(q . mean(k))``, which to first order in the spread of the tile's keys is ``sum_i exp(q . k_i)``,
the softmax mass of the whole tile; its value is then the tile's mean value. Without the bias one tile would weigh
as much as one key, and far regions would be under-weighted by their area (:func:`tile_bias`).

Everything here is deterministic in the geometry alone, so every rank computes the same send and receive sizes
without asking the others, and the bytes exchanged are counted, not timed (:func:`exchange_bytes`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PatchGrid:
    """``rows x width`` image tokens split into ``world`` patches of whole rows (rank order = row order).

    Raises ``ValueError`` when the rows do not split evenly, or a dimension is not positive.
    """

    rows: int
    width: int
    world: int

    def __post_init__(self) -> None:
        if self.rows < 1 or self.width < 1 or self.world < 1:
            raise ValueError(f"a patch grid needs rows, width and world >= 1, got {self.rows}, {self.width}, "
                             f"{self.world}")
        if self.rows % self.world:
            fits = [n for n in range(2, self.rows + 1) if self.rows % n == 0]
            raise ValueError(
                f"patch-parallel splits the token grid into one patch of whole rows per process: {self.rows} token "
                f"rows do not split into {self.world} equal patches; use an image height (in tokens) that is a "
                f"multiple of {self.world}, or run {', '.join(map(str, fits[:6])) or 'no'} processes")

    @property
    def rows_per_patch(self) -> int:
        return self.rows // self.world

    @property
    def tokens_per_patch(self) -> int:
        return self.rows_per_patch * self.width

    def patch(self, rank: int) -> tuple[int, int]:
        """The rows ``[start, end)`` of the grid that ``rank`` owns."""
        if not 0 <= rank < self.world:
            raise ValueError(f"rank {rank} is outside a world of {self.world}")
        return rank * self.rows_per_patch, (rank + 1) * self.rows_per_patch


@dataclass(frozen=True)
class Share:
    """What one rank sends another in one exchange, as row ranges *local to the sender's patch*.

    ``exact``: rows sent as they are; ``far``: rows sent as ``pool x pool`` tiles (empty without pooling);
    ``tiles``: how many tiles ``far`` makes; ``width``: tokens per row.
    """

    exact: tuple[int, int]
    far: tuple[int, int]
    tiles: int
    width: int

    @property
    def exact_tokens(self) -> int:
        return (self.exact[1] - self.exact[0]) * self.width

    @property
    def tokens(self) -> int:
        """Token rows of the payload (exact tokens plus tiles)."""
        return self.exact_tokens + self.tiles


def tile_count(rows: int, width: int, pool: int) -> int:
    """Tiles of ``pool x pool`` tokens (the last row and column of tiles may be partial) over ``rows x width``."""
    if rows <= 0 or pool <= 0:
        return 0
    return math.ceil(rows / pool) * math.ceil(width / pool)


def share(grid: PatchGrid, src: int, dst: int, band: int | None, pool: int = 0) -> Share:
    """What ``src`` sends ``dst``: every row (``band=None``: DistriFusion), or the rows within ``band`` rows of
    ``dst``'s patch exact and the rest pooled in ``pool x pool`` tiles (``pool=0``: dropped)."""
    if src == dst:
        return Share((0, 0), (0, 0), 0, grid.width)
    start, end = grid.patch(src)
    count = end - start
    if band is None:
        return Share((0, count), (0, 0), 0, grid.width)
    if band < 0 or pool < 0:
        raise ValueError(f"band and pool must be >= 0, got {band} and {pool}")
    dst_start, dst_end = grid.patch(dst)
    if src < dst:  # src lies above: its rows nearest dst are its last ones
        cut = min(max(start, dst_start - band), end) - start
        exact, far = (cut, count), (0, cut)
    else:  # src lies below: its first rows are nearest
        cut = min(max(start, dst_end + band), end) - start
        exact, far = (0, cut), (cut, count)
    if pool == 0:
        far = (far[0], far[0])
    return Share(exact, far, tile_count(far[1] - far[0], grid.width, pool), grid.width)


def shares(grid: PatchGrid, band: int | None, pool: int = 0) -> list[list[Share]]:
    """``shares[src][dst]`` for every pair of ranks (the diagonal is empty)."""
    return [[share(grid, src, dst, band, pool) for dst in range(grid.world)] for src in range(grid.world)]


def tile_index(rows: int, width: int, pool: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For ``rows x width`` tokens in row-major order: the tile of each token (row-major over tiles of ``pool x
    pool``, partial at the bottom and right edges) and the number of tokens per tile."""
    if rows <= 0:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    if pool < 1:
        raise ValueError(f"pool must be >= 1 to form tiles, got {pool}")
    tiles_across = math.ceil(width / pool)
    row_tile = torch.arange(rows) // pool
    col_tile = torch.arange(width) // pool
    index = (row_tile[:, None] * tiles_across + col_tile[None, :]).flatten()
    counts = torch.bincount(index, minlength=tile_count(rows, width, pool))
    return index, counts


def pool_rows(x: torch.Tensor, rows: int, width: int, pool: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of ``x`` over ``pool x pool`` tiles of a ``rows x width`` token block.

    ``x`` holds the block's tokens along dim 0 in row-major order (any trailing shape); returns the tile means
    (tiles along dim 0) and the token count of each tile. Means are accumulated in float32 at least, so fp16
    tiles of many tokens do not lose precision.
    """
    if x.shape[0] != rows * width:
        raise ValueError(f"pool_rows: {x.shape[0]} tokens are not {rows} rows of {width}")
    index, counts = tile_index(rows, width, pool)
    index = index.to(x.device)
    acc = torch.promote_types(x.dtype, torch.float32)
    sums = torch.zeros((counts.numel(), *x.shape[1:]), dtype=acc, device=x.device)
    sums.index_add_(0, index, x.to(acc))
    shape = (-1,) + (1,) * (x.dim() - 1)
    return (sums / counts.to(x.device, acc).view(shape)).to(x.dtype), counts


def tile_bias(counts: torch.Tensor) -> torch.Tensor:
    """The logit bias ``log(count)`` that gives a pooled key the softmax mass of the keys it stands for (see the
    module docstring)."""
    return counts.to(torch.float64).log()


def payload(tokens: torch.Tensor, grid: PatchGrid, item: Share, pool: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The payload of ``item`` cut from the sender's patch ``tokens`` (its ``grid.tokens_per_patch`` tokens along
    dim 0): the exact rows followed by the far tiles, and the tile counts (empty without tiles)."""
    width = grid.width
    exact = tokens[item.exact[0] * width:item.exact[1] * width]
    if not item.tiles:
        return exact, torch.zeros(0, dtype=torch.long)
    far_rows = item.far[1] - item.far[0]
    tiles, counts = pool_rows(tokens[item.far[0] * width:item.far[1] * width], far_rows, width, pool)
    return torch.cat([exact, tiles]), counts


def tokens_sent(grid: PatchGrid, band: int | None, pool: int = 0) -> int:
    """Token rows (exact tokens plus tiles) all ranks together send in one exchange."""
    return sum(item.tokens for row in shares(grid, band, pool) for item in row)


def exchange_bytes(grid: PatchGrid, band: int | None, pool: int, bytes_per_token: int) -> int:
    """Bytes all ranks together send in one exchange of one attention call; ``bytes_per_token`` is one token's
    keys and values over the batch and heads (``batch * (heads_k * dim_k + heads_v * dim_v) * element_size``).
    ``band=None`` is DistriFusion's full exchange, the same bytes as an all-gather of every patch."""
    return tokens_sent(grid, band, pool) * bytes_per_token


def attend_patches(query: torch.Tensor, local: torch.Tensor, before: torch.Tensor, after: torch.Tensor,
                   tiles: torch.Tensor, bias: torch.Tensor, text_key: torch.Tensor, text_value: torch.Tensor, *,
                   text_first: bool = True, dim_k: int, keep_text: torch.Tensor | None = None,
                   scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    """One rank's attention: its queries ``(B, H, Sq, D)`` over the text keys and every patch's image keys.

    ``before`` / ``local`` / ``after`` are the image tokens of the patches above this one, its own and those
    below, and ``tiles`` pooled tiles with their ``bias`` (``log(count)``, see :func:`tile_bias`), all token-first
    ``(n, B, H, dim_k + dim_v)`` (keys and values side by side); ``text_key``/``text_value`` ``(B, H, L, D)`` go
    first or last as in the model's sequence, so that with every patch exact the keys are the model's own, in its
    order. ``keep_text`` ``(B, L)``: a key-padding mask over the text keys (``None``: keep all).
    """
    image = torch.cat([before, local, after, tiles]).permute(1, 2, 0, 3)
    keys = torch.cat([text_key, image[..., :dim_k]] if text_first else [image[..., :dim_k], text_key], 2)
    values = torch.cat([text_value, image[..., dim_k:]] if text_first else [image[..., dim_k:], text_value], 2)
    total, text, count = keys.shape[2], text_key.shape[2], tiles.shape[0]
    mask = None
    if count:
        mask = torch.zeros(total, dtype=query.dtype, device=query.device)
        end = total if text_first else total - text
        mask[end - count:end] = bias.to(mask)
        mask = mask.view(1, 1, 1, total)
    if keep_text is not None:
        keep = torch.ones(query.shape[0], total, dtype=torch.bool, device=query.device)
        keep[:, slice(0, text) if text_first else slice(total - text, total)] = keep_text
        base = mask if mask is not None else torch.zeros((), dtype=query.dtype, device=query.device)
        mask = torch.where(keep[:, None, None, :], base, float("-inf"))
    extra = {"enable_gqa": True} if enable_gqa else {}
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale, **extra)
