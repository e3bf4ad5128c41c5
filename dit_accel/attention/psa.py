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

CPU path: every query block gathers its assigned keys from a flat key bank (all levels of all key blocks, then the
text) and one batched SDPA with an additive bias runs them, query blocks sorted by key count and chunked: work is
proportional to the kept (pooled) keys, and no N x N mask is ever built. On CUDA the same bank feeds the LUT
block-sparse Triton kernel (:mod:`dit_accel.kernels.pyramid_lut`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dit_accel.attention.base import ImageAttentionConfig, ImageAttentionPlugin
from dit_accel.attention.curve import curve_order, inverse_order
from dit_accel.core.blocks import TokenGrid
from dit_accel.core.plugin import register_plugin
from dit_accel.recipe import check_choice, register_config

BLOCKS = (16, 32, 64, 128)
ESTIMATORS = ("sampled", "pooled")
# Gathered key rows per chunk of query blocks, and scores per chunk of the sampled estimate (bound memory).
_CHUNK_KEYS = 1 << 18
_CHUNK_SCORES = 1 << 24
_CHUNK_SLOTS = 1 << 22  # (query blocks x bank slots) selection table per chunk


# ------------------------------------------------------------------------------------------------- the math
def auto_block(num_tokens: int, max_level: int = 1) -> int:
    """About 16 or more key blocks: the largest of 16..128 at most ``num_tokens / 16``, and at least
    ``max_level`` (a block must hold whole pools)."""
    block = 16
    while block < 128 and block * 2 <= num_tokens // 16:
        block *= 2
    return max(block, max_level)


@dataclass(frozen=True)
class PyramidLayout:
    """Where every pyramid key of a sequence sits in the flat key bank.

    The bank holds, level after level, ``segments[i]`` slots per key block (``block // levels[i]`` pools, padded
    up to a multiple of the layout's unit). Attributes (all (P,) tensors over bank slots): ``count`` the tokens a
    slot stands for (0: padding, or a pool past the sequence end), ``owner`` its key block, ``index`` the position
    of its level in ``levels``.
    """

    block: int
    levels: tuple[int, ...]
    num_tokens: int
    segments: tuple[int, ...]
    count: torch.Tensor
    owner: torch.Tensor
    index: torch.Tensor

    @property
    def num_blocks(self) -> int:
        return -(-self.num_tokens // self.block)

    @functools.cached_property
    def bias(self) -> torch.Tensor:
        """``log(count)`` per slot: 0 for exact keys, ``log(l)`` for full pools, ``-inf`` for padding."""
        return self.count.double().log()

    @functools.cached_property
    def real_keys(self) -> torch.Tensor:
        """(key blocks, levels + 1) int64: the non-empty slots of each key block at each level (last column: a
        dropped block, 0)."""
        table = torch.zeros(self.num_blocks * (len(self.levels) + 1), dtype=torch.long, device=self.count.device)
        table.index_add_(0, self.owner * (len(self.levels) + 1) + self.index, (self.count > 0).long())
        return table.view(self.num_blocks, -1)


@functools.lru_cache(maxsize=64)
def pyramid_layout(num_tokens: int, block: int, levels: tuple[int, ...], unit: int = 1,
                   device: str = "cpu") -> PyramidLayout:
    """The bank layout of ``num_tokens`` tokens in key blocks of ``block``; each level's pools of a block padded to
    a multiple of ``unit`` slots (1 for the CPU path, the kernel's key block on the GPU). Cached."""
    if any(block % level for level in levels):
        raise ValueError(f"every level {levels} must divide the block size {block}")
    blocks = -(-num_tokens // block)
    real = (torch.arange(blocks * block) < num_tokens).long()
    counts, owners, indices, segments = [], [], [], []
    for i, level in enumerate(levels):
        pools = block // level
        segment = -(-pools // unit) * unit
        count = F.pad(real.view(blocks, pools, level).sum(2), (0, segment - pools))
        counts.append(count.reshape(-1))
        owners.append(torch.arange(blocks).repeat_interleave(segment))
        indices.append(torch.full((blocks * segment,), i, dtype=torch.long))
        segments.append(segment)
    return PyramidLayout(block, tuple(levels), num_tokens, tuple(segments), torch.cat(counts).to(device),
                         torch.cat(owners).to(device), torch.cat(indices).to(device))


def key_pyramid(x: torch.Tensor, layout: PyramidLayout) -> torch.Tensor:
    """The key (or value) bank (B, H, P, D) of a (B, H, N, D) sequence: every level's means, in layout order."""
    batch, heads, length, dim = x.shape
    blocks, block = layout.num_blocks, layout.block
    padded = F.pad(x, (0, 0, 0, blocks * block - length))
    accumulate = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    parts, start = [], 0
    for level, segment in zip(layout.levels, layout.segments):
        pools = block // level
        if level == 1:
            pooled = padded.view(batch, heads, blocks, pools, dim)
        else:
            count = layout.count[start:start + blocks * segment].view(blocks, segment)[:, :pools]
            pooled = padded.view(batch, heads, blocks, pools, level, dim).sum(4, dtype=accumulate)
            pooled = (pooled / count.clamp(min=1).to(accumulate)[:, :, None]).to(x.dtype)
        parts.append(F.pad(pooled, (0, 0, 0, segment - pools)).reshape(batch, heads, blocks * segment, dim))
        start += blocks * segment
    return torch.cat(parts, 2)


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
    q_s, k_s = query.index_select(2, picks).float(), key.index_select(2, picks).float()
    out = query.new_empty((batch, heads, blocks, blocks), dtype=torch.float32)
    chunk = max(1, _CHUNK_SCORES // max(1, batch * heads * per * blocks * per))
    for first in range(0, blocks, chunk):
        last = min(first + chunk, blocks)
        probs = torch.softmax(q_s[:, :, first * per:last * per] @ k_s.transpose(-1, -2) * scale + bias, -1)
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


@functools.lru_cache(maxsize=16)
def _level_table(levels: tuple[int, ...], device: str) -> torch.Tensor:
    table = torch.full((max(levels) + 1,), -1, dtype=torch.long)
    table[list(levels)] = torch.arange(len(levels))
    table[0] = len(levels)
    return table.to(device)


def level_index(assignment: torch.Tensor, levels: tuple[int, ...]) -> torch.Tensor:
    """Position of every assigned level in ``levels`` (``len(levels)`` for a dropped pair); ValueError on a level
    that is not in ``levels``."""
    top = max(levels)
    index = _level_table(tuple(levels), str(assignment.device))[assignment.long().clamp(0, top)]
    if bool(((index < 0) | (assignment < 0) | (assignment > top)).any()):
        raise ValueError(f"assignment holds levels outside {levels} and 0 (dropped)")
    return index


def kept_keys(assignment: torch.Tensor, layout: PyramidLayout) -> torch.Tensor:
    """(..., nQ) int64: the image keys each query block attends (a pooled key counted once)."""
    index = level_index(assignment, layout.levels)
    table = layout.real_keys
    blocks = torch.arange(layout.num_blocks, device=index.device).expand_as(index)
    return table[blocks, index].sum(-1)


def key_density(assignment: torch.Tensor, layout: PyramidLayout) -> float:
    """Mean attended image keys per query over the number of image tokens (pooled keys counted once)."""
    length, block = layout.num_tokens, layout.block
    queries = (length - torch.arange(layout.num_blocks, device=assignment.device) * block).clamp(0, block)
    keys = kept_keys(assignment, layout).double() * queries
    return float(keys.sum()) / (keys[..., 0].numel() * float(length) ** 2)


def gathered_pyramid_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, assignment: torch.Tensor,
                               layout: PyramidLayout, *, text_key: torch.Tensor | None = None,
                               text_value: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """The PyTorch path of :func:`pyramid_attention` (same arguments, plus the CPU-unit layout)."""
    batch, heads, length, dim = query.shape
    blocks, block = layout.num_blocks, layout.block
    text = 0 if text_key is None else text_key.shape[2]
    bank_k, bank_v = key_pyramid(key, layout), key_pyramid(value, layout)
    if text:  # text keys join every row's bank, always kept, bias 0
        bank_k, bank_v = torch.cat([bank_k, text_key], 2), torch.cat([bank_v, text_value], 2)
    bank_k, bank_v = bank_k.flatten(0, 1), bank_v.flatten(0, 1)
    bias = F.pad(layout.bias.to(query.dtype), (0, text))
    q = F.pad(query, (0, 0, 0, blocks * block - length)).reshape(-1, block, dim)  # rows: (batch, head, q block)
    index = level_index(assignment, layout.levels).reshape(-1, blocks)
    counts = layout.real_keys[torch.arange(blocks, device=index.device), index].sum(1) + text
    live = layout.count > 0
    total = q.shape[0]
    chunk = max(1, min(_CHUNK_KEYS // (int(counts.max()) + 1), _CHUNK_SLOTS // bias.numel()))
    # Rows with similar key counts share a chunk (little padding); one chunk keeps the natural row order.
    ranked = None if chunk >= total else torch.argsort(counts, stable=True)
    out = None if ranked is None else query.new_empty((total, block, value.shape[-1]))
    for first in range(0, total, chunk):
        rows = slice(None) if ranked is None else ranked[first:first + chunk]
        kept = (index[rows][:, layout.owner] == layout.index) & live
        weights = torch.where(F.pad(kept, (0, text), value=True), bias, -math.inf)
        # Kept slots first (finite bias), the rest -inf; key order does not change a softmax.
        weights, slots = torch.sort(weights, dim=1, descending=True, stable=True)
        width = max(1, int(counts[rows].max()))
        weights, slots = weights[:, :width], slots[:, :width]
        owner = torch.arange(total, device=q.device)[rows] // blocks  # the (batch, head) of each row
        flat = (slots + (owner * bank_k.shape[1])[:, None]).reshape(-1)
        keys = bank_k.flatten(0, 1).index_select(0, flat).view(*slots.shape, dim)
        values = bank_v.flatten(0, 1).index_select(0, flat).view(*slots.shape, -1)
        part = F.scaled_dot_product_attention(q[rows][None], keys[None], values[None],
                                              attn_mask=weights[None, :, None], scale=scale)[0]
        if not text:  # a query block that kept nothing gets zeros (as the kernel), not NaN
            part = part.masked_fill((counts[rows] == 0)[:, None, None], 0.0)
        if ranked is None:
            out = part
        else:
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
                  quotas: tuple[float, ...] | None = None, estimator: str = "sampled", sample: int = 4,
                  text_key: torch.Tensor | None = None, text_value: torch.Tensor | None = None,
                  scale: float | None = None, order: tuple[torch.Tensor, torch.Tensor] | None = None,
                  ) -> tuple[torch.Tensor, float]:
    """PSA of (B, H, N, D) image tokens in grid (raster, frame-major) order: curve order, importance, levels,
    pyramid attention, natural order back. ``quotas`` replaces ``thresholds`` when given; ``block=0`` picks
    :func:`auto_block`; ``order`` may pass the precomputed ``(curve order, inverse)``. Returns the output and the
    key density."""
    if order is None:
        forward = curve_order(grid.frames, grid.height, grid.width).to(query.device)
        order = (forward, inverse_order(forward))
    forward, inverse = order
    levels = tuple(levels)
    block = block or auto_block(query.shape[2], max(levels))
    q, k, v = (x.index_select(2, forward) for x in (query, key, value))
    scale = 1.0 / math.sqrt(query.shape[3]) if scale is None else scale
    importance = block_importance(q, k, block, scale=scale, estimator=estimator, sample=sample)
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
            the grid, about 16 or more blocks. Allowed: 0, 16, 32, 64, 128; at least the largest level.
        levels (`tuple[int, ...]`, defaults to `(1, 2, 4, 8)`): pyramid levels, ascending powers of two 1-32
            (1 = full resolution, ``l`` = means of ``l`` tokens). 1-6 levels.
        thresholds (`tuple[float, ...]`, defaults to `(0.4, 0.5, 0.6, 0.8)`): one cumulative-importance bound per
            level (PSA's balanced setting): key blocks whose more important blocks hold less than
            ``thresholds[0]`` of the mass get level ``levels[0]``, below ``thresholds[1]`` ``levels[1]``, ...,
            the rest are dropped; a bound of 1 drops nothing. Non-decreasing, in (0, 1].
        quotas (`tuple[float, ...]`, defaults to `()`): instead of thresholds, the fraction of key blocks per level
            (most important first), the rest dropped: a fixed keys budget of ``sum(quota / level)`` of the keys.
            Empty (use thresholds) or one per level, each in [0, 1], summing to (0, 1].
        estimator (`str`, defaults to `"sampled"`): block importance from sampled attention (``"sampled"``) or
            from mean queries x mean keys (``"pooled"``, cheaper, blunter).
        sample (`int`, defaults to `4`): stride of the sampled tokens (1 = every token). Allowed: 1, 2, 4, 8, 16.
        start / end: fractions of the schedule to act on; ``start=0.2`` keeps the first steps dense (PSA keeps
            about the first 30 %).
    """

    block: int = 0
    levels: tuple[int, ...] = (1, 2, 4, 8)
    thresholds: tuple[float, ...] = (0.4, 0.5, 0.6, 0.8)
    quotas: tuple[float, ...] = ()
    estimator: str = "sampled"
    sample: int = 4

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        for field in ("levels", "thresholds", "quotas"):  # TOML gives lists
            value = getattr(self, field)
            if not isinstance(value, (tuple, list)):
                raise ValueError(f"{name}.{field} = {value!r} is not allowed; allowed: a list of numbers")
            object.__setattr__(self, field, tuple(value))
        levels = self.levels
        if (not 1 <= len(levels) <= 6 or any(isinstance(l, bool) or not isinstance(l, int) or l not in
                                             (1, 2, 4, 8, 16, 32) for l in levels)
                or list(levels) != sorted(set(levels))):
            raise ValueError(f"{name}.levels = {levels!r} is not allowed; allowed: 1-6 ascending distinct powers of "
                             "two from 1, 2, 4, 8, 16, 32, e.g. (1, 2, 4, 8)")
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
        check_choice(self, "sample", (1, 2, 4, 8, 16))

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
                             scale=call.options.get("scale"), order=order)
