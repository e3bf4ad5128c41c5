"""Cluster-level sparse attention (SVG2, ``attention/svg2.py``) as block-sparse lookup tables: its GPU path.

The LUT kernel of :mod:`.block_sparse` works on fixed-size blocks and takes its ``key_len`` per key block, shared
by every batch and head, while clusters differ in size per (batch, head). So every (batch, head) group gets its own
region of one flat sequence (passed to the kernel as batch 1, head 1):

* queries: each group's clusters one after another, every cluster padded to a whole number of ``block_q`` rows
  (a cluster's tokens first, zeros after); all groups padded to the same number of blocks;
* keys: the same with ``block_k`` rows per block, then the group's text keys, padded to whole blocks too;
  ``key_len`` masks the padding at the end of every cluster and of the text;
* each query block (of cluster i in group g) lists the key blocks of g's key clusters that i selected, and g's text
  blocks. Blocks made of padding only list nothing.

So the kernel computes exactly what :func:`~dit_accel.attention.svg2_clusters.cluster_attention` computes, with work
proportional to the kept blocks. Padding costs some efficiency: clusters of several blocks waste little, clusters
much smaller than a block waste most of theirs (hence the smaller default key block).
"""

from __future__ import annotations

import torch

from dit_accel.attention.kmeans import cluster_counts
from dit_accel.kernels import kernel_usable
from dit_accel.kernels.block_sparse import block_sparse_attention, lut_from_mask

DEFAULT_BLOCK_Q = 64
DEFAULT_BLOCK_K = 32
MAX_HEAD_DIM = 256
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _padded_slots(labels: torch.Tensor, counts: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per token, its row in the padded layout of its group, the first block of every cluster, and the number of
    blocks every group's region has (the largest group's)."""
    blocks = -(-counts // block)  # (G, C)
    block_start = torch.cumsum(blocks, 1) - blocks
    token_start = torch.cumsum(counts, 1) - counts
    order = torch.argsort(labels, dim=1, stable=True)
    position = torch.empty_like(order).scatter_(1, order, torch.arange(labels.shape[1], device=labels.device)
                                                .expand_as(order))
    rank = position - token_start.gather(1, labels)
    row = block_start.gather(1, labels) * block + rank
    return row, block_start, int(blocks.sum(1).max())


def cluster_lut(q_labels: torch.Tensor, k_labels: torch.Tensor, selection: torch.Tensor, num_text: int,
                block_q: int = DEFAULT_BLOCK_Q, block_k: int = DEFAULT_BLOCK_K) -> dict:
    """The flat padded layout and the LUT of a cluster selection (see the module docstring).

    Args:
        q_labels, k_labels: (G, N) cluster labels; selection: (G, Cq, Ck) bool; num_text: text keys per group.

    Returns a dict: ``q_rows`` / ``k_rows`` (G, N) flat row of every token, ``q_len`` / ``k_len`` flat lengths,
    ``text_rows`` (G, L) flat rows of the text keys, ``key_len``, ``counts``, ``indices`` (the kernel's LUT).
    """
    groups = q_labels.shape[0]
    num_q, num_k = selection.shape[1], selection.shape[2]
    device = q_labels.device
    q_counts, k_counts = cluster_counts(q_labels, num_q), cluster_counts(k_labels, num_k)
    q_row, q_block_start, q_region = _padded_slots(q_labels, q_counts, block_q)
    k_row, k_block_start, image_blocks = _padded_slots(k_labels, k_counts, block_k)
    text_blocks = -(-num_text // block_k)
    k_region = image_blocks + text_blocks
    group = torch.arange(groups, device=device)

    # Key blocks: owner cluster (num_k for unused blocks) and real length.
    k_blocks = -(-k_counts // block_k)
    owner = torch.repeat_interleave(torch.arange(groups * num_k, device=device), k_blocks.reshape(-1))
    part = torch.arange(owner.numel(), device=device) - (torch.cumsum(k_blocks.reshape(-1), 0)
                                                           - k_blocks.reshape(-1))[owner]
    local = k_block_start.reshape(-1)[owner] + part
    owner_group = owner // num_k
    block_owner = torch.full((groups, image_blocks), num_k, dtype=torch.long, device=device)
    block_owner[owner_group, local] = owner % num_k
    key_len = torch.zeros(groups, k_region, dtype=torch.int32, device=device)
    key_len[owner_group, local] = (k_counts.reshape(-1)[owner] - part * block_k).clamp(max=block_k).to(torch.int32)
    text_len = (num_text - torch.arange(text_blocks, device=device) * block_k).clamp(0, block_k)
    key_len[:, image_blocks:] = text_len.to(torch.int32)

    # Which key blocks each query cluster reads, as a LUT in group-local block numbers, then made global.
    chosen = torch.cat([selection, selection.new_zeros(groups, num_q, 1)], 2)
    mask = chosen.gather(2, block_owner[:, None, :].expand(-1, num_q, -1))
    mask = torch.cat([mask, mask.new_ones(groups, num_q, text_blocks)], 2)
    counts, indices = lut_from_mask(mask)
    indices = indices + (group * k_region).to(torch.int32)[:, None, None]

    q_blocks = -(-q_counts // block_q)
    owner = torch.repeat_interleave(torch.arange(groups * num_q, device=device), q_blocks.reshape(-1))
    part = torch.arange(owner.numel(), device=device) - (torch.cumsum(q_blocks.reshape(-1), 0)
                                                           - q_blocks.reshape(-1))[owner]
    flat_block = (owner // num_q) * q_region + q_block_start.reshape(-1)[owner] + part
    lut_counts = torch.zeros(groups * q_region, dtype=torch.int32, device=device)
    lut_indices = torch.zeros(groups * q_region, indices.shape[-1], dtype=torch.int32, device=device)
    lut_counts[flat_block] = counts.reshape(-1)[owner]
    lut_indices[flat_block] = indices.reshape(-1, indices.shape[-1])[owner]

    text_rows = ((group * k_region + image_blocks) * block_k)[:, None] + torch.arange(num_text, device=device)
    return {
        "q_rows": q_row + (group * q_region * block_q)[:, None], "q_len": groups * q_region * block_q,
        "k_rows": k_row + (group * k_region * block_k)[:, None], "k_len": groups * k_region * block_k,
        "text_rows": text_rows, "key_len": key_len.reshape(-1), "counts": lut_counts, "indices": lut_indices,
    }


def cluster_block_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, q_labels: torch.Tensor,
                            k_labels: torch.Tensor, selection: torch.Tensor, *, text_key: torch.Tensor | None = None,
                            text_value: torch.Tensor | None = None, scale: float | None = None,
                            block_q: int = DEFAULT_BLOCK_Q, block_k: int = DEFAULT_BLOCK_K) -> torch.Tensor:
    """``cluster_attention`` (same arguments and result, (B, H, N, Dv) in natural token order) computed by the
    block-sparse Triton kernel. Runs where :func:`cluster_kernel_usable` says so."""
    batch, heads, length, dim = query.shape
    dim_v = value.shape[-1]
    groups = batch * heads
    num_text = 0 if text_key is None else text_key.shape[2]
    lut = cluster_lut(q_labels.reshape(groups, length), k_labels.reshape(groups, length),
                      selection.reshape(groups, *selection.shape[-2:]), num_text, block_q, block_k)
    q_rows, k_rows = lut["q_rows"].reshape(-1), lut["k_rows"].reshape(-1)
    q = query.new_zeros(lut["q_len"], dim).index_copy_(0, q_rows, query.reshape(-1, dim))
    k = key.new_zeros(lut["k_len"], dim).index_copy_(0, k_rows, key.reshape(-1, dim))
    v = value.new_zeros(lut["k_len"], dim_v).index_copy_(0, k_rows, value.reshape(-1, dim_v))
    if num_text:
        text_rows = lut["text_rows"].reshape(-1)
        k.index_copy_(0, text_rows, text_key.reshape(-1, dim).to(k.dtype))
        v.index_copy_(0, text_rows, text_value.reshape(-1, dim_v).to(v.dtype))
    out = block_sparse_attention(q[None, None], k[None, None], v[None, None], lut["counts"], lut["indices"],
                                 block_q=block_q, block_k=block_k, key_len=lut["key_len"], scale=scale)
    return out[0, 0].index_select(0, q_rows).view(batch, heads, length, dim_v)


def cluster_kernel_usable(query: torch.Tensor, *tensors: torch.Tensor | None) -> bool:
    """Whether the kernel path applies: Triton can run on the tensors' device (CUDA, or the CPU interpreter), the
    dtype and head dims fit the kernel, and no gradient is needed (the kernel is forward-only)."""
    if not kernel_usable(query) or query.shape[-1] > MAX_HEAD_DIM or query.dtype not in KERNEL_DTYPES:
        return False
    if any(t is not None and t.shape[-1] > MAX_HEAD_DIM for t in tensors):
        return False
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (query, *tensors)))
