"""The kernels as ``torch.library`` custom ops, so ``torch.compile`` traces through them as single opaque calls.

* ``torch.ops.dit_accel.int8_attention(q, k, v, scale, layout, block_q, block_k, smooth_k,
  pv_bf16)``
* ``torch.ops.dit_accel.block_sparse_attention(q, k, v, lut_counts, lut_indices, block_q, block_k, key_len,
  pooled_k, pooled_v, pooled_bias, pooled_counts, pooled_indices, scale)``

Each has a fake (meta) implementation giving the output's shape and dtype without running anything. Registering
needs only torch; the implementations import the Triton code when first called. Forward only: no autograd
formula is registered (these are inference kernels; the callers fall back to PyTorch when gradients are needed).
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.library.custom_op("dit_accel::int8_attention", mutates_args=())
def int8_attention_op(q: Tensor, k: Tensor, v: Tensor, scale: float | None, layout: str, block_q: int,
                      block_k: int, smooth_k: bool, pv_bf16: bool) -> Tensor:
    from dit_accel.kernels.int8_attention import int8_attention_triton

    return int8_attention_triton(q, k, v, scale, layout, block_q, block_k, smooth_k, pv_bf16)


@int8_attention_op.register_fake
def _int8_attention_fake(q, k, v, scale, layout, block_q, block_k, smooth_k, pv_bf16):
    return q.new_empty(*q.shape[:3], v.shape[3])


@torch.library.custom_op("dit_accel::block_sparse_attention", mutates_args=())
def block_sparse_attention_op(q: Tensor, k: Tensor, v: Tensor, lut_counts: Tensor, lut_indices: Tensor, block_q: int,
                              block_k: int, key_len: Tensor | None, pooled_k: Tensor | None, pooled_v: Tensor | None,
                              pooled_bias: Tensor | None, pooled_counts: Tensor | None,
                              pooled_indices: Tensor | None, scale: float | None) -> Tensor:
    from dit_accel.kernels.block_sparse import block_sparse_triton

    return block_sparse_triton(q, k, v, lut_counts, lut_indices, block_q, block_k, key_len, pooled_k, pooled_v,
                               pooled_bias, pooled_counts, pooled_indices, scale)


@block_sparse_attention_op.register_fake
def _block_sparse_fake(q, k, v, lut_counts, lut_indices, block_q, block_k, key_len, pooled_k, pooled_v, pooled_bias,
                       pooled_counts, pooled_indices, scale):
    return q.new_empty(*q.shape[:3], v.shape[3])
