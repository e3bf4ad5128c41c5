"""PSA's pyramid bookkeeping (pure tensor math, no attention): where every pooled key of a curve-ordered sequence
sits in the flat key bank, the bank itself, and which bank slots a (query block, key block, level) assignment keeps.

Used by the CPU path in ``psa.py`` and by the Triton path in ``kernels/pyramid_lut.py``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def auto_block(num_tokens: int, max_level: int = 1, kernel: bool = True) -> int:
    """The block size for ``block=0``, at least ``max_level`` (a block must hold whole pools).

    For the CUDA kernel (``kernel=True``): about 16 or more key blocks, the largest of 16..128 at most
    ``num_tokens / 16``. For the PyTorch path the same, or larger where the sequence allows about 32 blocks of up
    to 512 tokens (as the ``hilbert`` plugin's ~32 tiles): each query block is one run of the CPU flash kernel,
    which is less efficient per score on short query runs than on long ones, and the per-block work (importance,
    level lists, gathers) falls with the number of blocks. Unchanged up to 4096 tokens; 512 at 16384.
    """
    block = 16
    while block < 128 and block * 2 <= num_tokens // 16:
        block *= 2
    if not kernel:
        while block < 512 and block * 2 <= num_tokens // 32:
            block *= 2
    return max(block, max_level)


def auto_sample(block: int) -> int:
    """The sampling stride for ``sample=0``: PSA's 4, or ``block / 64`` for larger blocks (64 sampled tokens per
    block, as many as a 256-token block has at stride 4)."""
    return max(4, block // 64)


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

    @functools.cached_property
    def level_starts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(levels,) int64 each: where each level's region of the bank starts, and its slots per key block."""
        segments = torch.tensor(self.segments, device=self.count.device)
        return torch.cumsum(segments * self.num_blocks, 0) - segments * self.num_blocks, segments


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


def key_pyramid(x: torch.Tensor, layout: PyramidLayout, extra: int = 0) -> torch.Tensor:
    """The key (or value) bank (B, H, P, D) of a (B, H, N, D) sequence: every level's means, in layout order,
    then ``extra`` zero slots."""
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
    if extra:
        parts.append(x.new_zeros(batch, heads, extra, dim))
    return torch.cat(parts, 2)


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


def kept_slots(index: torch.Tensor, layout: PyramidLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """The bank slots each row keeps, from (R, nK) level positions (``len(levels)``: dropped).

    Returns ``(slots, lengths)``: the non-empty slots of every kept (key block, level) pair, row after row (each
    pair one contiguous run of the bank), and (R,) how many belong to each row. Work and memory are proportional
    to the kept slots: no (rows x bank) table is built.
    """
    starts, segments = layout.level_starts
    rows, blocks = torch.nonzero(index < len(layout.levels), as_tuple=True)
    level = index[rows, blocks]
    length = layout.real_keys[blocks, level]
    first = starts[level] + blocks * segments[level]
    before = torch.cumsum(length, 0) - length  # where each run starts in the output
    total = int(length.sum())
    slots = torch.repeat_interleave(first - before, length, output_size=total)
    slots += torch.arange(total, device=index.device)
    lengths = torch.zeros(index.shape[0], dtype=torch.long, device=index.device).index_add_(0, rows, length)
    return slots, lengths


def padded_rows(slots: torch.Tensor, lengths: torch.Tensor, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, max length) table of each row's slots (from :func:`kept_slots`), padded with slot ``pad``, and the
    (R, max length) bool of real entries."""
    width = max(1, int(lengths.max())) if lengths.numel() else 1
    offsets = torch.cumsum(lengths, 0) - lengths
    position = torch.arange(width, device=slots.device)
    valid = position[None, :] < lengths[:, None]
    if slots.numel() == 0:
        return torch.full(valid.shape, pad, dtype=torch.long, device=slots.device), valid
    table = slots[(offsets[:, None] + position[None, :]).clamp(max=slots.numel() - 1)]
    return table.masked_fill_(~valid, pad), valid
