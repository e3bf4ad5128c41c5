"""A :class:`~dit_accel.attention.tiled.TilePlan` as block-sparse lookup tables: the GPU path of ``tiled_attention``
and ``curve_tile_attention`` (plugins ``proxy``, ``hilbert``, ``window-residual``).

Layout: the image tokens are gathered tile by tile, every tile padded to a whole number of kernel blocks
(``capacity`` rounded up to ``block``; a tile's tokens first, then padding), followed by the shared (text) keys.
Then the plan is exactly a block-sparse pattern:

* query block (tile t, part i) lists the key blocks of t's neighbour tiles that hold tokens, and every text block;
  ``key_len`` masks the padding at the end of each tile and of the text;
* with pooling, one average-pooled key/value per tile joins as a pooled key, its bias ``log(tile count)`` for the
  tiles that are not neighbours of t and ``-inf`` for the neighbours (per query block, shape (blocks, tiles));
* query blocks made only of padding list nothing.

``curve_tile_attention`` may pool several keys per tile (one per ``pool`` tokens); :func:`curve_plan_attention`
then runs the exact part from the plan's LUT and passes those pooled keys with their own bias and LUT.

This is the same math as ``tiled_attention`` (same pooled means, same bias, same masks), computed by
:func:`~dit_accel.kernels.block_sparse.block_sparse_attention` with work proportional to the kept blocks. Padding
costs ``capacity / (ceil(capacity / block) · block)`` of efficiency: tiles of 64 or 128 tokens waste nothing.
LUTs are built once per plan object, text length, block and device, and cached for as long as the plan lives.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import torch
from torch.utils.weak import WeakIdKeyDictionary

from dit_accel.attention.tiled import TilePlan, curve_neighbours, plan_from_groups
from dit_accel.kernels import kernel_usable, triton_importable
from dit_accel.kernels.block_sparse import block_sparse_attention, lut_from_mask

DEFAULT_BLOCK = 64


@dataclass(frozen=True)
class TileLUT:
    """Everything the kernel needs to run one plan (all tensors on one device).

    Attributes:
        block: query and key block size in tokens.
        gather: (tiles · padded capacity,) token index of every padded slot (0 in padding slots).
        inverse: (num_tokens,) position of every token in the padded layout.
        key_len: (image blocks + text blocks,) real keys at the start of every key block.
        counts, indices: the LUT over query blocks (image blocks only: one row per query block).
        pool_weights: (tiles, padded capacity) 1/count on a tile's tokens, 0 on padding; ``None`` without pooling.
        pooled_bias: (query blocks, tiles) ``log(count)`` or ``-inf``; pooled_counts / pooled_indices: its LUT.
    """

    block: int
    gather: torch.Tensor
    inverse: torch.Tensor
    key_len: torch.Tensor
    counts: torch.Tensor
    indices: torch.Tensor
    pool_weights: torch.Tensor | None
    pooled_bias: torch.Tensor | None
    pooled_counts: torch.Tensor | None
    pooled_indices: torch.Tensor | None


def _compact_slots(slots: torch.Tensor) -> torch.Tensor:
    """Slots with each tile's tokens moved to the front (stable), padding (-1) last."""
    order = torch.argsort((slots < 0).to(torch.int8), dim=1, stable=True)
    return torch.gather(slots, 1, order)


def tile_lut(plan: TilePlan, num_text: int = 0, block: int = DEFAULT_BLOCK,
             device: torch.device | str | None = None) -> TileLUT:
    """Build the LUT of ``plan`` for ``num_text`` shared keys, on ``device`` (the plan's if ``None``); built on the
    CPU (small integer tables). See the module docstring."""
    slots = _compact_slots(plan.slots.cpu())
    tiles, capacity = slots.shape
    parts = -(-capacity // block)
    padded = parts * block
    slots = torch.nn.functional.pad(slots, (0, padded - capacity), value=-1)
    valid = slots >= 0
    count = valid.sum(1)
    gather = slots.clamp(min=0).reshape(-1)
    inverse = torch.empty(plan.num_tokens, dtype=torch.long)
    inverse[slots[valid]] = torch.arange(tiles * padded).view(tiles, padded)[valid]

    tile_len = (count[:, None] - torch.arange(parts) * block).clamp(0, block)  # (tiles, parts)
    text_blocks = -(-num_text // block)
    text_len = (num_text - torch.arange(text_blocks) * block).clamp(0, block)
    key_len = torch.cat([tile_len.reshape(-1), text_len]).to(torch.int32)

    neighbours = plan.neighbours.cpu()
    has = neighbours >= 0
    safe = neighbours.clamp(min=0)
    near = torch.zeros(tiles, tiles, dtype=torch.bool)
    near[torch.arange(tiles)[:, None].expand_as(safe)[has], safe[has]] = True
    # Key-block mask per tile: blocks of neighbour tiles that hold tokens, and all text blocks.
    image_mask = (near[:, :, None] & (tile_len[None] > 0)).reshape(tiles, tiles * parts)
    block_mask = torch.cat([image_mask, torch.ones(tiles, text_blocks, dtype=torch.bool)], 1)
    query_live = (tile_len > 0).reshape(-1)  # query blocks holding at least one real token
    block_mask = block_mask.repeat_interleave(parts, 0) & query_live[:, None]
    counts, indices = lut_from_mask(block_mask)

    pool_weights = pooled_bias = pooled_counts = pooled_indices = None
    if plan.pooled and tiles > 1:
        pool_weights = valid.float() / count[:, None].float()
        bias = torch.where(near, -math.inf, count.float().log()[None, :].expand(tiles, tiles))
        pooled_bias = bias.repeat_interleave(parts, 0).contiguous()
        pooled_blocks = -(-tiles // block)
        finite = torch.nn.functional.pad(torch.isfinite(pooled_bias), (0, pooled_blocks * block - tiles))
        pooled_mask = finite.view(-1, pooled_blocks, block).any(-1) & query_live[:, None]
        pooled_counts, pooled_indices = lut_from_mask(pooled_mask)

    device = plan.slots.device if device is None else device
    tables = (gather, inverse, key_len, counts, indices, pool_weights, pooled_bias, pooled_counts, pooled_indices)
    return TileLUT(block, *(None if t is None else t.to(device) for t in tables))


_CACHE = WeakIdKeyDictionary()  # plan.slots -> {settings: TileLUT}; tensors compare by identity here


def cached_tile_lut(plan: TilePlan, num_text: int, block: int, device: torch.device) -> TileLUT:
    """:func:`tile_lut` of ``plan`` moved to ``device``, cached while ``plan.slots`` is alive (plugins keep their
    plans, so a plan's LUT is built once)."""
    entries = _CACHE.setdefault(plan.slots, {})
    key = (id(plan.neighbours), plan.pooled, num_text, block, str(device))
    entry = entries.get(key)
    if entry is None or entry[0] is not plan.neighbours:  # the id of a dead tensor may be reused
        entry = entries[key] = (plan.neighbours, tile_lut(plan, num_text, block, device))
    return entry[1]


def _run(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, lut: TileLUT, shared_key, shared_value,
         scale: float | None, pooled: dict | None = None) -> torch.Tensor:
    """Gather into the padded tile layout, run the kernel, scatter back. ``pooled`` (kernel keyword arguments)
    replaces the plan's one-mean-per-tile pooled keys when given."""
    batch, heads = query.shape[:2]
    q = query.index_select(2, lut.gather)
    k = key.index_select(2, lut.gather)
    v = value.index_select(2, lut.gather)
    if pooled is None and lut.pool_weights is not None:
        tiles = lut.pool_weights.shape[0]
        weights = lut.pool_weights.to(query.dtype)[None, None, :, :, None]
        pooled = {"pooled_k": (k.view(batch, heads, tiles, -1, k.shape[3]) * weights).sum(3),
                  "pooled_v": (v.view(batch, heads, tiles, -1, v.shape[3]) * weights).sum(3),
                  "pooled_bias": lut.pooled_bias, "pooled_lut": (lut.pooled_counts, lut.pooled_indices)}
    if shared_key is not None and shared_key.shape[2]:
        k, v = torch.cat([k, shared_key], 2), torch.cat([v, shared_value], 2)
    out = block_sparse_attention(q, k, v, lut.counts, lut.indices, block_q=lut.block, block_k=lut.block,
                                 key_len=lut.key_len, scale=scale, **(pooled or {}))
    return out.index_select(2, lut.inverse)


def tile_plan_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: TilePlan, *,
                        shared_key: torch.Tensor | None = None, shared_value: torch.Tensor | None = None,
                        scale: float | None = None, block: int = DEFAULT_BLOCK) -> torch.Tensor:
    """``tiled_attention(query, key, value, plan, ...)`` computed by the block-sparse kernel (same arguments and
    result; (B, H, N, D) in the tokens' natural order). ``block`` (`int`, defaults to `64`; allowed 16-128)."""
    length = query.shape[2]
    if length != plan.num_tokens or key.shape[2] != length:
        raise ValueError(f"the plan covers {plan.num_tokens} tokens; query has {length}, key {key.shape[2]}")
    num_text = 0 if shared_key is None else shared_key.shape[2]
    lut = cached_tile_lut(plan, num_text, block, query.device)
    return _run(query, key, value, lut, shared_key, shared_value, scale)


@functools.lru_cache(maxsize=64)
def curve_plan(length: int, tile: int, radius: int, offset: int, pooled: bool) -> TilePlan:
    """The plan of ``curve_tile_attention``'s tiles (contiguous runs of ``tile`` tokens starting at ``-offset``);
    pooling only when some tile lies beyond every tile's radius, as there."""
    groups = (torch.arange(length) + offset) // tile
    count = int(groups.max()) + 1
    return plan_from_groups(groups, curve_neighbours(count, radius), pooled=pooled and count > 2 * radius + 1,
                            num_tokens=length)


@functools.lru_cache(maxsize=64)
def _curve_pool_tables(length: int, tile: int, radius: int, offset: int, pool: int, block: int, device: str):
    """Sub-tile pooling of ``curve_tile_attention``: chunk ``c`` holds curve positions ``[c·pool - offset, ...)``.

    Returns the chunk sizes, the per-query-block bias (``log(size)``; ``-inf`` for chunks of the tile's exact
    neighbours and for empty chunks) and its pooled LUT (chunks in blocks of ``block``; query blocks of the padded
    layout that hold no token list nothing), all on ``device``.
    """
    count, per_tile = -(-(length + offset) // tile), tile // pool
    present = torch.zeros(count * tile)
    present[offset:offset + length] = 1
    sizes = present.view(count * per_tile, pool).sum(1)
    tile_counts = present.view(count, tile).sum(1)
    parts = -(-int(tile_counts.max()) // block)
    live = (tile_counts[:, None] > torch.arange(parts) * block).reshape(-1)
    chunk_tile = torch.arange(count * per_tile) // per_tile
    near = (torch.arange(count)[:, None] - chunk_tile[None, :]).abs() <= radius
    bias = torch.where(near | (sizes == 0)[None, :], -math.inf, sizes.clamp(min=1).log()[None, :])
    bias = bias.repeat_interleave(parts, 0).contiguous()
    chunks = bias.shape[1]
    finite = torch.nn.functional.pad(torch.isfinite(bias), (0, -(-chunks // block) * block - chunks))
    pooled_counts, pooled_indices = lut_from_mask(finite.view(bias.shape[0], -1, block).any(-1) & live[:, None])
    return tuple(t.to(device) for t in (sizes, bias, pooled_counts, pooled_indices))


def curve_plan_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, tile: int, radius: int,
                         offset: int = 0, pooled: bool = True, pool: int | None = None,
                         shared_key: torch.Tensor | None = None, shared_value: torch.Tensor | None = None,
                         scale: float | None = None, block: int = DEFAULT_BLOCK) -> torch.Tensor:
    """``curve_tile_attention`` (same arguments and result) computed by the block-sparse kernel: the exact tiles
    through :func:`curve_plan`'s LUT, the pooled keys (one per ``pool`` curve positions, ``pool`` dividing
    ``tile``; whole tiles if ``None``) averaged from the curve-ordered keys exactly as there."""
    batch, heads, length, _ = query.shape
    pool = tile if pool is None else pool
    count = -(-(length + offset) // tile)
    far = pooled and count > 2 * radius + 1
    plan = curve_plan(length, tile, radius, offset, far and pool == tile)
    num_text = 0 if shared_key is None else shared_key.shape[2]
    lut = cached_tile_lut(plan, num_text, block, query.device)
    if not far or pool == tile:
        return _run(query, key, value, lut, shared_key, shared_value, scale)
    sizes, bias, pooled_counts, pooled_indices = _curve_pool_tables(length, tile, radius, offset, pool, block,
                                                                     str(query.device))
    total = count * tile
    means = []
    for x in (key, value):  # as curve_tile_attention: padded to whole tiles, summed per chunk, over the real count
        chunks = torch.nn.functional.pad(x, (0, 0, offset, total - offset - length))
        chunks = chunks.view(batch, heads, sizes.shape[0], pool, x.shape[3]).sum(3)
        means.append(chunks / sizes.clamp(min=1)[:, None].to(x.dtype))
    extra = {"pooled_k": means[0], "pooled_v": means[1], "pooled_bias": bias,
             "pooled_lut": (pooled_counts, pooled_indices)}
    return _run(query, key, value, lut, shared_key, shared_value, scale, pooled=extra)


_warned_no_triton = False


def _kernel_path_ok(query: torch.Tensor, *tensors: torch.Tensor | None) -> bool:
    """Whether the CUDA kernel path applies: CUDA tensors, Triton present (warned once if not), no autograd."""
    global _warned_no_triton
    if not kernel_usable(query):
        if query.is_cuda and not triton_importable() and not _warned_no_triton:
            _warned_no_triton = True
            warnings.warn("dit_accel: Triton is not installed; sparse attention runs its PyTorch path on CUDA "
                          "(slower, same result). pip install triton to use the block-sparse kernel.", stacklevel=3)
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (query, *tensors)):
        return False  # the kernels are forward-only
    return True


def cuda_tiled_attention(query, key, value, plan, shared_key, shared_value, scale) -> torch.Tensor | None:
    """The kernel path of ``tiled_attention``, or ``None`` when it does not apply (then PyTorch runs)."""
    if not _kernel_path_ok(query, key, value, shared_key, shared_value):
        return None
    return tile_plan_attention(query, key, value, plan, shared_key=shared_key, shared_value=shared_value,
                               scale=scale)


def cuda_curve_tile_attention(query, key, value, *, tile, radius, offset, pooled, pool=None, shared_key,
                              shared_value, scale) -> torch.Tensor | None:
    """The kernel path of ``curve_tile_attention``, or ``None`` when it does not apply (then PyTorch runs)."""
    if not _kernel_path_ok(query, key, value, shared_key, shared_value):
        return None
    return curve_plan_attention(query, key, value, tile=tile, radius=radius, offset=offset, pooled=pooled, pool=pool,
                                shared_key=shared_key, shared_value=shared_value, scale=scale)
