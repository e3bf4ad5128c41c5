"""PSA: pyramid sparse attention (after Pyramid Sparse Attention, arXiv 2512.04025), training-free.

Image tokens are put in generalized-Hilbert-curve order (``curve.py``) and cut into query and key blocks of
``block`` consecutive tokens, each a compact image region. Every key block has a K/V pyramid: level 1 is the block
itself, level ``l`` (2, 4, 8, ...) averages every ``l`` consecutive tokens. Each (query block, key block) pair gets
a level instead of keep/drop: important pairs are attended at full resolution, less important ones through coarser
summaries, the least important not at all. A pooled key's logit is raised by ``log(tokens pooled)`` so it carries
the softmax mass of the keys it stands for (exact when they are equal). Text keys are always attended exactly.

Importance is estimated by sampled attention, as in PSA, but on a fixed stride instead of random samples (so a
generation is deterministic): every ``sample``-th query and key along the curve, one softmax over the sampled
image keys (each weighted by the tokens it stands for), summed per key block, averaged per query block.
``estimator="pooled"`` is the cheaper alternative (mean query x mean key per block pair plus ``log(block size)``,
``(N / block)^2`` dot products) but blunter: a mean query's softmax is flatter than its queries' mean softmax.
Levels are assigned per query block from the key blocks sorted by importance, by cumulative importance
(``thresholds``, PSA's ``thresholdbound``: a block whose more important blocks hold less than ``thresholds[i]``
and at least ``thresholds[i - 1]`` of the mass gets ``levels[i]``; past the last bound it is dropped) or by fixed
fractions of the key blocks per level (``quotas``, PSA's ``topk``: a fixed budget of ``sum(quota / level)`` keys).

CPU path: every query block gathers the bank runs of its kept (key block, level) pairs (the bank holds all levels of
all key blocks, ``pyramid.py``) plus the text keys, and one batched SDPA with an additive bias runs them, query
blocks sorted by key count and chunked: work and memory are proportional to the kept (pooled) keys; no N x N mask
and no (query blocks x bank) table is built. On CUDA the same bank feeds the LUT
block-sparse Triton kernel (:mod:`dit_accel.kernels.pyramid_lut`).
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dit_accel.attention.base import ImageAttentionConfig, ImageAttentionPlugin
from dit_accel.attention.curve import curve_order, inverse_order
from dit_accel.attention.pyramid import (PyramidLayout, auto_block, auto_sample, kept_keys,  # noqa: F401
                                         kept_slots, key_density, key_pyramid, level_index, padded_rows,
                                         pyramid_layout)
from dit_accel.core.blocks import TokenGrid
from dit_accel.core.plugin import register_plugin
from dit_accel.recipe import check_choice, check_range, register_config

BLOCKS = (16, 32, 64, 128)
ESTIMATORS = ("sampled", "pooled")
# Gathered key rows per chunk of query blocks, and scores per chunk of the sampled estimate (bound memory).
_CHUNK_KEYS = 1 << 18
_CHUNK_SCORES = 1 << 24


# ------------------------------------------------------------------------------------------------- the math
@functools.lru_cache(maxsize=64)
def _samples(length: int, block: int, stride: int, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sampled positions (the centre of every ``stride`` tokens, clipped to the sequence), their logit bias
    ``log(tokens each stands for)`` and (blocks, samples per block) 1/0 for samples of real tokens."""
    blocks = -(-length // block)
    starts = torch.arange(blocks * block // stride) * stride
    weight = (length - starts).clamp(0, stride)  # 0: past the end
    picks = (starts + stride // 2).clamp(max=length - 1)
    live = (weight > 0).float().view(blocks, block // stride)
    return picks.to(device), weight.float().log().to(device), live.to(device)


def block_importance(query: torch.Tensor, key: torch.Tensor, block: int, *, scale: float | None = None,
                     estimator: str = "sampled", sample: int = 4) -> torch.Tensor:
    """Estimated attention mass of every (query block, key block) pair: (B, H, nQ, nK) float32, rows summing to 1.

    Tokens (B, H, N, D) are in the order to be cut into blocks. See the module docstring for both estimators;
    ``sample`` (the stride of the sampled one) is reduced to a divisor of ``block``.
    """
    batch, heads, length, dim = query.shape
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    blocks = -(-length // block)
    if estimator == "pooled":
        real = (torch.arange(blocks * block, device=query.device) < length).view(blocks, block).sum(1).float()
        means = [F.pad(x.float(), (0, 0, 0, blocks * block - length)).view(batch, heads, blocks, block, dim).sum(3)
                 / real[:, None] for x in (query, key)]
        return torch.softmax(means[0] @ means[1].transpose(-1, -2) * scale + real.log(), -1)
    if estimator != "sampled":
        raise ValueError(f"estimator {estimator!r} is not allowed; allowed: {', '.join(ESTIMATORS)}")
    stride = math.gcd(sample, block)
    per = block // stride  # samples per block
    picks, bias, live = _samples(length, block, stride, str(query.device))
    q_s = query.index_select(2, picks).float().flatten(0, 1)
    k_t = key.index_select(2, picks).float().flatten(0, 1).transpose(1, 2)
    out = query.new_empty((batch, heads, blocks, blocks), dtype=torch.float32)
    chunk = max(1, _CHUNK_SCORES // max(1, batch * heads * per * blocks * per))
    for first in range(0, blocks, chunk):
        last = min(first + chunk, blocks)
        scores = torch.baddbmm(bias, q_s[:, first * per:last * per], k_t, alpha=scale)
        probs = scores.softmax(-1)
        mass = probs.view(batch, heads, last - first, per, blocks, per).sum(5)
        part = live[first:last]
        out[:, :, first:last] = (mass * part[:, :, None]).sum(3) / part.sum(1)[:, None]
    return out


def assign_levels(importance: torch.Tensor, levels: tuple[int, ...], *, thresholds: tuple[float, ...] | None = None,
                  quotas: tuple[float, ...] | None = None) -> torch.Tensor:
    """Level of every (query block, key block) pair from its importance (..., nQ, nK): int64, a level size from
    ``levels`` or 0 (dropped). ``quotas`` (fractions of the key blocks per level, most important first) when given,
    else ``thresholds`` (cumulative importance bounds per level; a bound >= 1 keeps everything left). Tightening
    either elementwise never gives a pair a finer level."""
    if (thresholds is None) == (not quotas):
        raise ValueError("give either thresholds or quotas")
    order = torch.argsort(importance, dim=-1, descending=True, stable=True)
    count = importance.shape[-1]
    if quotas:
        bounds = torch.tensor([math.ceil(count * sum(quotas[:i + 1]) - 1e-9) for i in range(len(quotas))],
                              device=importance.device)
        rank = torch.arange(count, device=importance.device)
        index = (rank[:, None] >= bounds).sum(-1).expand(order.shape)
    else:
        ranked = importance.gather(-1, order).double()
        before = torch.cat([torch.zeros_like(ranked[..., :1]), ranked.cumsum(-1)[..., :-1]], -1)
        bounds = torch.tensor([math.inf if t >= 1 else t for t in thresholds], dtype=torch.float64,
                              device=importance.device)
        index = (before[..., None] >= bounds).sum(-1)
    table = torch.tensor([*levels, 0], dtype=torch.long, device=importance.device)
    return torch.empty_like(order).scatter_(-1, order, table[index])


def scale_bounds(thresholds: tuple[float, ...] | None, quotas: tuple[float, ...] | None, scale: float
                 ) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """``(thresholds, quotas)`` with every cumulative bound below 1 (a threshold, or a running sum of the quotas)
    multiplied by ``scale`` and capped at 1; a bound of 1 ("keep the rest") stays. ``scale < 1`` moves key blocks
    to coarser levels (faster, never finer: see :func:`assign_levels`), ``scale > 1`` to finer ones."""
    def scaled(bounds: list[float]) -> list[float]:
        return [b if b >= 1 - 1e-9 else min(1.0, b * scale) for b in bounds]

    if scale == 1.0:
        return thresholds, quotas
    if quotas:
        running = scaled(list(itertools.accumulate(quotas)))
        return thresholds, tuple(b - a for a, b in zip([0.0, *running[:-1]], running))
    return (None if thresholds is None else tuple(scaled(list(thresholds)))), quotas


def _row_chunks(counts: list[int], limit: int):
    """``(first, last)`` runs of rows (sorted by key count) whose padded gather, rows x widest count, stays within
    ``limit`` keys (at least one row each)."""
    first = 0
    for index in range(1, len(counts) + 1):
        if index == len(counts) or (index - first + 1) * counts[index] > limit:
            yield first, index
            first = index


def gathered_pyramid_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, assignment: torch.Tensor,
                               layout: PyramidLayout, *, text_key: torch.Tensor | None = None,
                               text_value: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """The PyTorch path of :func:`pyramid_attention` (same arguments, plus the CPU-unit layout).

    Each row (batch, head, query block) gathers the bank runs of its kept (key block, level) pairs plus the text
    keys, rows sorted by key count and chunked so a chunk pads little; one SDPA per chunk with each slot's
    ``log(count)`` as an additive bias."""
    batch, heads, length, dim = query.shape
    blocks, block = layout.num_blocks, layout.block
    text = 0 if text_key is None else text_key.shape[2]
    # One zero slot after each head's bank: the padding of short rows (bias -inf).
    bank_k, bank_v = key_pyramid(key, layout, extra=1), key_pyramid(value, layout, extra=1)
    slots_per_head = bank_k.shape[2]
    bank_k, bank_v = bank_k.flatten(0, 2), bank_v.flatten(0, 2)
    bias = F.pad(layout.bias.to(query.dtype), (0, 1), value=-math.inf)
    q = F.pad(query, (0, 0, 0, blocks * block - length)).reshape(-1, block, dim)  # rows: (batch, head, q block)
    index = level_index(assignment, layout.levels).reshape(-1, blocks)
    counts = layout.real_keys[torch.arange(blocks, device=index.device), index].sum(1)
    total = q.shape[0]
    ranked = torch.argsort(counts, stable=True)
    out = query.new_empty((total, block, value.shape[-1]))
    text_k = None if not text else text_key.reshape(batch * heads, text, dim)
    text_v = None if not text else text_value.reshape(batch * heads, text, -1)
    for first, last in _row_chunks((counts[ranked] + text).tolist(), _CHUNK_KEYS):
        rows = ranked[first:last]
        slots, lengths = kept_slots(index[rows], layout)
        table, valid = padded_rows(slots, lengths, slots_per_head - 1)
        owner = rows // blocks  # the (batch, head) of each row
        flat = (table + (owner * slots_per_head)[:, None]).reshape(-1)
        keys = bank_k.index_select(0, flat).view(*table.shape, dim)
        values = bank_v.index_select(0, flat).view(*table.shape, -1)
        weights = bias[table]
        if text:  # text keys join every row, always kept, bias 0
            keys = torch.cat([keys, text_k[owner]], 1)
            values = torch.cat([values, text_v[owner]], 1)
            weights = F.pad(weights, (0, text))
        mask = None if bool((weights == 0).all()) else weights[None, :, None]
        part = F.scaled_dot_product_attention(q[rows][None], keys[None], values[None], attn_mask=mask,
                                              scale=scale)[0]
        if not text:  # a query block that kept nothing gets zeros (as the kernel), not NaN
            part = part.masked_fill((lengths == 0)[:, None, None], 0.0)
        out[rows] = part
    return out.reshape(batch, heads, blocks * block, -1)[:, :, :length]


def pyramid_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, assignment: torch.Tensor, *,
                      block: int, levels: tuple[int, ...], text_key: torch.Tensor | None = None,
                      text_value: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Each query block over its key blocks at their assigned levels, plus every text key exactly.

    Args:
        query, key, value: (B, H, N, D) tokens in the order they are cut into blocks (curve order).
        assignment: (B, H, nQ, nK) int, broadcastable over B and H: the level size of each (query block, key
            block) pair, 0 to drop it (see :func:`assign_levels`).
        block: tokens per query and key block; every level must divide it.
        levels: the level sizes in use, ascending.
        text_key, text_value: (B, H, L, D) keys every query attends exactly, or ``None``.
        scale: softmax scale, ``1/sqrt(D)`` if ``None``.

    Returns (B, H, N, Dv) in the same order. Uses the Triton kernel on CUDA (blocks of 16-128).
    """
    batch, heads, length, _ = query.shape
    blocks = -(-length // block)
    assignment = assignment.expand(batch, heads, blocks, blocks)
    if block in BLOCKS:
        from dit_accel.kernels.pyramid_lut import kernel_path_ok, kernel_pyramid_attention
        if kernel_path_ok(query, key, value, text_key, text_value):
            return kernel_pyramid_attention(query, key, value, assignment, block=block, levels=levels,
                                            text_key=text_key, text_value=text_value, scale=scale)
    layout = pyramid_layout(length, block, tuple(levels), 1, str(query.device))
    return gathered_pyramid_attention(query, key, value, assignment, layout, text_key=text_key,
                                      text_value=text_value, scale=scale)


def psa_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, grid: TokenGrid, *, block: int = 0,
                  levels: tuple[int, ...] = (1, 2, 4, 8), thresholds: tuple[float, ...] | None = (0.4, 0.5, 0.6, 0.8),
                  quotas: tuple[float, ...] | None = None, estimator: str = "sampled", sample: int = 0,
                  text_key: torch.Tensor | None = None, text_value: torch.Tensor | None = None,
                  scale: float | None = None, order: tuple[torch.Tensor, torch.Tensor] | None = None,
                  bound_scale: float = 1.0) -> tuple[torch.Tensor, float]:
    """PSA of (B, H, N, D) image tokens in grid (raster, frame-major) order: curve order, importance, levels,
    pyramid attention, natural order back. ``quotas`` replaces ``thresholds`` when given; ``block=0`` picks
    :func:`auto_block` (larger blocks off the CUDA kernel's path), ``sample=0`` :func:`auto_sample`; ``order``
    may pass the precomputed ``(curve order, inverse)``; ``bound_scale`` scales the bounds (:func:`scale_bounds`).
    Returns the output and the key density."""
    if order is None:
        forward = curve_order(grid.frames, grid.height, grid.width).to(query.device)
        order = (forward, inverse_order(forward))
    forward, inverse = order
    levels = tuple(levels)
    block = block or auto_block(query.shape[2], max(levels), kernel=query.is_cuda)
    sample = sample or auto_sample(block)
    q, k, v = (x.index_select(2, forward) for x in (query, key, value))
    scale = 1.0 / math.sqrt(query.shape[3]) if scale is None else scale
    importance = block_importance(q, k, block, scale=scale, estimator=estimator, sample=sample)
    thresholds, quotas = scale_bounds(None if quotas else thresholds, quotas or None, bound_scale)
    assignment = assign_levels(importance, levels, thresholds=None if quotas else thresholds, quotas=quotas)
    out = pyramid_attention(q, k, v, assignment, block=block, levels=levels, text_key=text_key,
                            text_value=text_value, scale=scale)
    density = key_density(assignment, pyramid_layout(query.shape[2], block, levels, 1, str(query.device)))
    return out.index_select(2, inverse), density


# ------------------------------------------------------------------------------------------------ the plugin
@register_config("psa")
@dataclass(frozen=True)
class PSAConfig(ImageAttentionConfig):
    """Pyramid sparse attention over the image tokens (text keys exact).

    Args:
        block (`int`, defaults to `0`): query and key block size in tokens (along the curve); 0 picks 16-128 by
            the grid, about 16 or more blocks, and off CUDA up to 512 where that leaves about 32 blocks (512 at
            16384 tokens; :func:`~dit_accel.attention.pyramid.auto_block`). Allowed: 0, 16, 32, 64, 128; at least
            the largest level.
        levels (`tuple[int, ...]`, defaults to `(1, 2, 4, 8)`): pyramid levels, ascending powers of two 1-64
            (1 = full resolution, ``l`` = means of ``l`` tokens). 1-7 levels.
        thresholds (`tuple[float, ...]`, defaults to `(0.4, 0.5, 0.6, 0.8)`): one cumulative-importance bound per
            level (PSA's balanced setting): key blocks whose more important blocks hold less than
            ``thresholds[0]`` of the mass get level ``levels[0]``, below ``thresholds[1]`` ``levels[1]``, ...,
            the rest are dropped; a bound of 1 drops nothing. Non-decreasing, in (0, 1].
        quotas (`tuple[float, ...]`, defaults to `()`): instead of thresholds, the fraction of key blocks per level
            (most important first), the rest dropped: a fixed keys budget of ``sum(quota / level)`` of the keys.
            Empty (use thresholds) or one per level, each in [0, 1], summing to (0, 1].
        estimator (`str`, defaults to `"sampled"`): block importance from sampled attention (``"sampled"``) or
            from mean queries x mean keys (``"pooled"``, cheaper, blunter).
        sample (`int`, defaults to `0`): stride of the sampled tokens (1 = every token); 0 picks PSA's 4, or
            ``block / 64`` for blocks over 256 (64 samples a block). Allowed: 0, 1, 2, 4, 8, 16.
        bound_scale (`float`, defaults to `1.0`): the speed knob (``ditaccel tune`` searches it): every cumulative
            bound below 1 (each threshold, or each running sum of the quotas) is multiplied by it, capped at 1; a
            bound of 1 (keep every block left) stays. Below 1 moves key blocks to coarser levels (fewer keys,
            faster), above 1 to finer ones. Allowed: 0.05-2.
        start / end: fractions of the schedule to act on; ``start=0.2`` keeps the first steps dense (PSA keeps
            about the first 30 %).
    """

    block: int = 0
    levels: tuple[int, ...] = (1, 2, 4, 8)
    thresholds: tuple[float, ...] = (0.4, 0.5, 0.6, 0.8)
    quotas: tuple[float, ...] = ()
    estimator: str = "sampled"
    sample: int = 0
    bound_scale: float = 1.0

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        for field in ("levels", "thresholds", "quotas"):  # TOML gives lists
            value = getattr(self, field)
            if not isinstance(value, (tuple, list)):
                raise ValueError(f"{name}.{field} = {value!r} is not allowed; allowed: a list of numbers")
            object.__setattr__(self, field, tuple(value))
        levels = self.levels
        if (not 1 <= len(levels) <= 7 or any(isinstance(l, bool) or not isinstance(l, int) or l not in
                                             (1, 2, 4, 8, 16, 32, 64) for l in levels)
                or list(levels) != sorted(set(levels))):
            raise ValueError(f"{name}.levels = {levels!r} is not allowed; allowed: 1-7 ascending distinct powers of "
                             "two from 1, 2, 4, 8, 16, 32, 64, e.g. (1, 2, 4, 8)")
        check_choice(self, "block", (0, *BLOCKS))
        if self.block and self.block < levels[-1]:
            raise ValueError(f"{name}.block = {self.block} is smaller than the largest level {levels[-1]}; "
                             "allowed: a block of at least the largest level, or 0 (automatic)")
        if not self.quotas:
            self._check_numbers("thresholds", self.thresholds, 1e-12)
            if list(self.thresholds) != sorted(self.thresholds):
                raise ValueError(f"{name}.thresholds = {self.thresholds!r} must be non-decreasing")
        else:
            self._check_numbers("quotas", self.quotas, 0.0)
            if not 0 < sum(self.quotas) <= 1 + 1e-9:
                raise ValueError(f"{name}.quotas = {self.quotas!r} sum to {sum(self.quotas):g}; allowed: a sum in "
                                 "(0, 1]")
        check_choice(self, "estimator", ESTIMATORS)
        check_choice(self, "sample", (0, 1, 2, 4, 8, 16))
        check_range(self, "bound_scale", 0.05, 2.0)

    def _check_numbers(self, field: str, values: tuple, low: float) -> None:
        if len(values) != len(self.levels) or any(
                isinstance(t, bool) or not isinstance(t, (int, float)) or not low <= t <= 1 for t in values):
            raise ValueError(f"{type(self).__name__}.{field} = {values!r} is not allowed; allowed: one number in "
                             f"{'(0' if low else '[0'}, 1] per level ({len(self.levels)} for {self.levels})")


@register_plugin(PSAConfig)
class PSAPlugin(ImageAttentionPlugin):
    def install(self) -> None:
        super().install()
        self._orders: dict = {}  # curve orders per (grid, device): fixed tables, nothing carried between calls

    def image_attention(self, query, key, value, text_key, text_value, grid, layer, call):
        order = self._orders.get((grid, query.device))
        if order is None:
            forward = curve_order(grid.frames, grid.height, grid.width)
            order = self._orders[(grid, query.device)] = (forward.to(query.device),
                                                          inverse_order(forward).to(query.device))
        config = self.config
        return psa_attention(query, key, value, grid, block=config.block, levels=config.levels,
                             thresholds=config.thresholds, quotas=config.quotas or None, estimator=config.estimator,
                             sample=config.sample, text_key=text_key, text_value=text_value,
                             scale=call.options.get("scale"), order=order, bound_scale=config.bound_scale)
