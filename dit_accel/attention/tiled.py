"""Tile-local attention with pooled far keys: the one primitive behind ``proxy``, ``hilbert`` and ``window-residual``.

Image tokens are grouped into tiles of a fixed capacity (a :class:`TilePlan`: which token sits in which slot of
which tile, and which tiles each tile attends to exactly). Every query tile attends, in one batched SDPA call:

* exactly to the keys of its neighbour tiles (itself included),
* optionally to one average-pooled key/value per other tile, its logit raised by ``log(tile count)`` so that the
  pooled key carries the softmax mass of the tokens it stands for (exact when a tile's keys are all equal),
* exactly to the shared keys (text tokens).

Keys are gathered per tile, never a dense N x N mask: the cost is ``N x (neighbours x tile + tiles + text)`` instead
of ``N x N``. With one tile holding every token the result is dense SDPA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class TilePlan:
    """A grouping of ``num_tokens`` image tokens into tiles.

    Attributes:
        slots: (num_tiles, capacity) int64, the token index in each tile slot, -1 for an empty slot.
        neighbours: (num_tiles, m) int64, the tiles each tile attends to exactly (itself included), -1 for none.
        pooled: whether every tile also attends to one pooled key per non-neighbour tile.
        num_tokens: the number of image tokens the plan covers.
    """

    slots: torch.Tensor
    neighbours: torch.Tensor
    pooled: bool
    num_tokens: int

    @property
    def num_tiles(self) -> int:
        return self.slots.shape[0]

    @property
    def capacity(self) -> int:
        return self.slots.shape[1]

    def to(self, device: torch.device) -> "TilePlan":
        return TilePlan(self.slots.to(device), self.neighbours.to(device), self.pooled, self.num_tokens)

    def key_density(self) -> float:
        """Mean attended keys per query (pooled keys counted once each) over the number of image tokens: the
        fraction of dense attention's work this plan does."""
        counts = (self.slots >= 0).sum(1)
        exact = torch.where(self.neighbours >= 0, counts[self.neighbours.clamp(min=0)], 0).sum(1)
        keys = exact + (self.num_tiles - (self.neighbours >= 0).sum(1) if self.pooled else 0)
        return float((keys * counts).sum()) / float(self.num_tokens) ** 2


def plan_from_groups(groups: torch.Tensor, neighbours: torch.Tensor, *, pooled: bool, num_tokens: int) -> TilePlan:
    """A plan from ``groups`` (num_tokens,) = the tile index of every token (tokens keep their relative order
    inside a tile) and the neighbour table."""
    num_tiles = int(groups.max()) + 1
    counts = torch.bincount(groups, minlength=num_tiles)
    if bool((counts == 0).any()):
        raise ValueError("every tile must hold at least one token")
    capacity = int(counts.max())
    order = torch.argsort(groups, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(num_tokens) - starts[groups[order]]
    slots = torch.full((num_tiles, capacity), -1, dtype=torch.long)
    slots[groups[order], position] = order
    return TilePlan(slots, neighbours.long(), pooled, num_tokens)


def curve_neighbours(num_tiles: int, radius: int, extra: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Tiles within ``radius`` of each tile along the curve (itself first), plus optional extra columns."""
    index = torch.arange(num_tiles)
    columns = [index]
    for distance in range(1, radius + 1):
        columns += [torch.where(index - distance >= 0, index - distance, -1),
                    torch.where(index + distance < num_tiles, index + distance, -1)]
    columns += extra or []
    return torch.stack(columns, 1)


def _gather_tiles(x: torch.Tensor, flat_slots: torch.Tensor, num_tiles: int) -> torch.Tensor:
    batch, heads, _, dim = x.shape
    return x.index_select(2, flat_slots).view(batch, heads, num_tiles, -1, dim)


def tiled_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    plan: TilePlan,
    *,
    shared_key: torch.Tensor | None = None,
    shared_value: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of image queries over tiles; the contract of SDPA restricted by ``plan``.

    Args:
        query, key, value: (B, H, N, D) image tokens in their natural order (``value`` may have another last dim).
        plan: the tiling of the N tokens (see :class:`TilePlan`).
        shared_key, shared_value: (B, H, L, D) keys every query attends to exactly (text tokens), or ``None``.
        scale: the softmax scale, ``1/sqrt(D)`` if ``None``.

    Returns:
        (B, H, N, Dv), in the tokens' natural order.
    """
    batch, heads, length, _ = query.shape
    if length != plan.num_tokens or key.shape[2] != length:
        raise ValueError(f"the plan covers {plan.num_tokens} tokens; query has {length}, key {key.shape[2]}")
    if query.is_cuda:  # the Triton block-sparse kernel: same math, no per-tile key copies (None: not available)
        from dit_accel.kernels.tile_lut import cuda_tiled_attention
        out = cuda_tiled_attention(query, key, value, plan, shared_key, shared_value, scale)
        if out is not None:
            return out
    tiles, capacity = plan.num_tiles, plan.capacity
    valid = plan.slots >= 0
    flat = plan.slots.clamp(min=0).reshape(-1)
    q_tiles = _gather_tiles(query, flat, tiles)
    k_tiles = _gather_tiles(key, flat, tiles)
    v_tiles = _gather_tiles(value, flat, tiles)

    neighbours = plan.neighbours
    has_neighbour = neighbours >= 0
    safe = neighbours.clamp(min=0)
    width = neighbours.shape[1] * capacity
    keys = [k_tiles[:, :, safe].reshape(batch, heads, tiles, width, -1)]
    values = [v_tiles[:, :, safe].reshape(batch, heads, tiles, width, -1)]
    key_valid = (valid[safe] & has_neighbour[..., None]).reshape(tiles, width)
    bias = [torch.zeros(tiles, width, dtype=query.dtype, device=query.device).masked_fill(~key_valid, -math.inf)]
    needs_bias = not bool(key_valid.all())

    if plan.pooled and tiles > 1:
        counts = valid.sum(1).to(query.dtype)
        weights = (valid.to(query.dtype) / counts[:, None])[None, None, :, :, None]
        keys.append((k_tiles * weights).sum(3)[:, :, None].expand(batch, heads, tiles, tiles, -1))
        values.append((v_tiles * weights).sum(3)[:, :, None].expand(batch, heads, tiles, tiles, -1))
        near = torch.zeros(tiles, tiles, dtype=torch.bool, device=query.device)
        near[torch.arange(tiles, device=query.device)[:, None].expand_as(safe)[has_neighbour], safe[has_neighbour]] = True
        bias.append(torch.where(near, -math.inf, counts.log()[None, :].expand(tiles, tiles)).to(query.dtype))
        needs_bias = True
    if shared_key is not None and shared_key.shape[2] > 0:
        keys.append(shared_key[:, :, None].expand(-1, -1, tiles, -1, -1))
        values.append(shared_value[:, :, None].expand(-1, -1, tiles, -1, -1))
        bias.append(torch.zeros(tiles, shared_key.shape[2], dtype=query.dtype, device=query.device))

    all_keys = torch.cat(keys, 3) if len(keys) > 1 else keys[0]
    all_values = torch.cat(values, 3) if len(values) > 1 else values[0]
    mask = None
    if needs_bias:
        mask = torch.cat(bias, 1)[None, :, None, :].expand(heads, -1, -1, -1).reshape(1, heads * tiles, 1, -1)
    out = F.scaled_dot_product_attention(
        q_tiles.reshape(batch, heads * tiles, capacity, -1),
        all_keys.reshape(batch, heads * tiles, all_keys.shape[3], -1),
        all_values.reshape(batch, heads * tiles, all_values.shape[3], -1),
        attn_mask=mask, scale=scale,
    ).view(batch, heads, tiles * capacity, -1)
    if bool(valid.all()):
        inverse = torch.empty_like(flat)
        inverse[flat] = torch.arange(flat.numel(), device=flat.device)
    else:
        inverse = torch.empty(length, dtype=torch.long, device=flat.device)
        inverse[plan.slots[valid]] = torch.arange(flat.numel(), device=flat.device).view(tiles, capacity)[valid]
    return out.index_select(2, inverse)
