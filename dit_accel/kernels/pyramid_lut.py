"""PSA's pyramid levels as block-sparse lookup tables: the GPU path of ``psa.pyramid_attention``.

The whole K/V pyramid of a curve-ordered sequence (level 1 and every pooled level, see
:func:`~dit_accel.attention.psa.pyramid_layout`) becomes the kernel's *pooled* keys. Each level's pools of one key
block fill whole kernel key blocks (``unit`` keys, padded with empty slots), so a kernel key block belongs to
exactly one (key block, level) pair and the per-(batch, head, query block) pooled LUT lists the kernel blocks of
the pairs assigned that level. The bias is per pooled key, shared by all heads: ``log(tokens pooled)`` (0 at level
1) and ``-inf`` on padding slots. The text keys are the kernel's ordinary keys, listed for every query block.

This is the same math as the PyTorch path (same bank, same bias); the kernel's work is proportional to the listed
kernel blocks. The kernel key block is ``max(16, block // 4)``: at ``block=128`` the coarse levels 4 and 8 waste at
most half of a 32-key kernel block, while level 1 and 2 fill theirs exactly.
"""

from __future__ import annotations

import functools

import torch

from dit_accel.attention.psa import key_pyramid, level_index, pyramid_layout
from dit_accel.kernels import kernel_usable
from dit_accel.kernels.block_sparse import block_sparse_attention, lut_from_mask


def kernel_key_block(block: int) -> int:
    """The kernel's key block size for query blocks of ``block`` tokens (16-128)."""
    return min(block, max(16, block // 4))


@functools.lru_cache(maxsize=64)
def _tables(num_tokens: int, block: int, levels: tuple[int, ...], device: str):
    """The layout of the kernel bank, and per kernel key block: its key block, its level's position and whether
    it holds any key; plus the bias (P,) in FP32. Cached per shape and device."""
    unit = kernel_key_block(block)
    layout = pyramid_layout(num_tokens, block, levels, unit, device)
    owner = layout.owner.view(-1, unit)[:, 0]
    index = layout.index.view(-1, unit)[:, 0]
    live = (layout.count.view(-1, unit) > 0).any(1)
    return layout, owner, index, live, layout.bias.float()


def kernel_path_ok(query: torch.Tensor, *tensors: torch.Tensor | None) -> bool:
    """Whether the kernel applies: a device it runs on (CUDA, or CPU under ``TRITON_INTERPRET=1``) and no autograd
    (the kernel is forward-only)."""
    if not kernel_usable(query):
        return False
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (query, *tensors)))


def kernel_pyramid_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, assignment: torch.Tensor,
                             *, block: int, levels: tuple[int, ...], text_key: torch.Tensor | None = None,
                             text_value: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """:func:`~dit_accel.attention.psa.pyramid_attention` (same arguments and result) through the block-sparse
    Triton kernel; ``block`` must be 16, 32, 64 or 128."""
    batch, heads, length, dim = query.shape
    layout, owner, index, live, bias = _tables(length, block, tuple(levels), str(query.device))
    assigned = level_index(assignment, layout.levels)  # (B, H, nQ, nK)
    pooled_mask = (assigned[..., owner] == index) & live
    pooled_lut = lut_from_mask(pooled_mask)
    unit = kernel_key_block(block)
    blocks = -(-length // block)
    text = 0 if text_key is None else text_key.shape[2]
    if text:
        keys, values = text_key, text_value
        text_blocks = -(-text // unit)
        counts = torch.full((blocks,), text_blocks, dtype=torch.int32, device=query.device)
        indices = torch.arange(text_blocks, dtype=torch.int32, device=query.device).expand(blocks, -1)
    else:  # no ordinary keys: a placeholder never read (every count is 0)
        keys = query.new_zeros(batch, heads, 1, dim)
        values = value.new_zeros(batch, heads, 1, value.shape[3])
        counts = torch.zeros(blocks, dtype=torch.int32, device=query.device)
        indices = torch.zeros(blocks, 1, dtype=torch.int32, device=query.device)
    return block_sparse_attention(query, keys, values, counts, indices, block_q=block, block_k=unit,
                                  pooled_k=key_pyramid(key, layout), pooled_v=key_pyramid(value, layout),
                                  pooled_bias=bias, pooled_lut=pooled_lut, scale=scale)
