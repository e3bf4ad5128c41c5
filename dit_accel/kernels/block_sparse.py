"""Block-sparse attention driven by a per-query-block lookup table of key blocks, with optional pooled keys.

Queries are cut into blocks of ``block_q`` rows and keys into blocks of ``block_k`` rows. For every (batch, head,
query block) the lookup table (LUT) gives a count ``n`` and a list of ``n`` key-block indices; the kernel runs one
online softmax (FP32, ``exp2``) over exactly those key blocks, so its work is proportional to the blocks kept.

Optionally a second, small set of *pooled* keys/values (e.g. one average per tile) joins the same softmax, with an
additive logit bias (natural-log units, e.g. ``log(pool size)`` so a pooled key carries the mass of the keys it
stands for; ``-inf`` excludes a pooled key). Pooled keys are grouped into blocks of ``block_k`` too and listed per
query block by their own LUT (all pooled blocks when ``pooled_lut`` is ``None``). The bias is per pooled key
``(P,)`` or per (query block, pooled key) ``(num_q_blocks, P)``.

``key_len`` (optional, per key block) says how many leading keys of each block are real: the rest are masked.
That lets padded layouts (tiles padded to the block size, see :mod:`.tile_lut`) use whole blocks. Keys past the
sequence end are always masked. A query row with no key at all gets a zero output.

Shapes: ``q`` (B, H, Sq, D), ``k`` (B, H, Sk, D), ``v`` (B, H, Sk, Dv) (any strides); pooled ``(B, H, P, D/Dv)``.
LUT counts broadcast to (B, H, num_q_blocks) and indices to (B, H, num_q_blocks, width) (a plan shared by all
batches and heads is passed as (num_q_blocks,) and (num_q_blocks, width) and never copied per head). Indices of
one row must be distinct and below the number of key blocks. D, Dv <= 256 (padded to 64/128/256 in masked loads).
Precision: Q·Kᵀ and P·V take the inputs' dtype (FP32 inputs: IEEE FP32 dots), accumulate in FP32. Forward only.
"""

from __future__ import annotations

import math

import torch

from dit_accel.kernels import ops as _ops  # noqa: F401  (registers torch.ops.dit_accel.*)
from dit_accel.kernels.int8_attention import padded_head_dim


def num_blocks(length: int, block: int) -> int:
    return -(-length // block)


def _int32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.int32 else t.to(torch.int32)


def full_lut(num_q_blocks: int, num_k_blocks: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
    """The LUT of dense attention: every query block lists every key block."""
    counts = torch.full((num_q_blocks,), num_k_blocks, dtype=torch.int32, device=device)
    indices = torch.arange(num_k_blocks, dtype=torch.int32, device=device).expand(num_q_blocks, -1)
    return counts, indices


def lut_from_mask(block_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(counts, indices)`` from a boolean (..., num_q_blocks, num_k_blocks) block mask (indices ascending)."""
    counts = block_mask.sum(-1).to(torch.int32)
    order = torch.argsort((~block_mask).to(torch.int8), dim=-1, stable=True)
    width = max(int(counts.max()) if counts.numel() else 0, 1)
    return counts, order[..., :width].to(torch.int32).contiguous()


def lut_to_mask(counts: torch.Tensor, indices: torch.Tensor, num_k_blocks: int) -> torch.Tensor:
    """The boolean (..., num_q_blocks, num_k_blocks) block mask a LUT describes."""
    listed = torch.arange(indices.shape[-1], device=indices.device) < counts[..., None].to(indices.device)
    mask = torch.zeros(*indices.shape[:-1], num_k_blocks + 1, dtype=torch.bool, device=indices.device)
    mask.scatter_(-1, torch.where(listed, indices.long(), num_k_blocks), True)
    return mask[..., :num_k_blocks]


def _row_mask(counts, indices, key_len, batch, heads, q_len, k_len, block_q, block_k):
    """(B, H, Sq, Sk) boolean: which keys each query attends to, expanded from blocks."""
    n_k = num_blocks(k_len, block_k)
    blocks = lut_to_mask(counts.expand(batch, heads, -1), indices.expand(batch, heads, -1, -1), n_k)
    mask = blocks.repeat_interleave(block_q, 2)[:, :, :q_len].repeat_interleave(block_k, 3)[..., :k_len]
    offset = torch.arange(k_len, device=mask.device) % block_k
    if key_len is not None:
        mask = mask & (offset < key_len.to(mask.device).repeat_interleave(block_k)[:k_len])
    return mask


def block_sparse_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lut_counts: torch.Tensor,
                           lut_indices: torch.Tensor, *, block_q: int, block_k: int,
                           key_len: torch.Tensor | None = None, pooled_k: torch.Tensor | None = None,
                           pooled_v: torch.Tensor | None = None, pooled_bias: torch.Tensor | None = None,
                           pooled_lut: tuple[torch.Tensor, torch.Tensor] | None = None,
                           scale: float | None = None) -> torch.Tensor:
    """The same attention as :func:`block_sparse_attention` as dense masked math in FP32 (for tests; O(Sq · Sk))."""
    batch, heads, q_len, dim = q.shape
    k_len = k.shape[2]
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    allowed = _row_mask(lut_counts, lut_indices, key_len, batch, heads, q_len, k_len, block_q, block_k)
    scores = scores.masked_fill(~allowed, -math.inf)
    values = v.float()
    if pooled_k is not None:
        pooled_len = pooled_k.shape[2]
        n_q, n_p = num_blocks(q_len, block_q), num_blocks(pooled_len, block_k)
        extra = (q.float() @ pooled_k.float().transpose(-1, -2)) * scale
        bias = torch.zeros(pooled_len, device=q.device) if pooled_bias is None else pooled_bias.float()
        extra = extra + bias.expand(n_q, pooled_len).repeat_interleave(block_q, 0)[:q_len]
        counts, indices = pooled_lut if pooled_lut is not None else full_lut(n_q, n_p, q.device)
        extra = extra.masked_fill(~_row_mask(counts, indices, None, batch, heads, q_len, pooled_len, block_q,
                                             block_k), -math.inf)
        scores = torch.cat([scores, extra], -1)
        values = torch.cat([values, pooled_v.float()], 2)
    top = scores.amax(-1, keepdim=True)
    weights = torch.exp(scores - torch.where(torch.isfinite(top), top, 0.0))
    total = weights.sum(-1, keepdim=True)
    out = (weights @ values) / torch.where(total > 0, total, 1.0)  # a query with no key at all gets zeros
    return out.to(q.dtype)


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lut_counts: torch.Tensor,
                           lut_indices: torch.Tensor, *, block_q: int, block_k: int,
                           key_len: torch.Tensor | None = None, pooled_k: torch.Tensor | None = None,
                           pooled_v: torch.Tensor | None = None, pooled_bias: torch.Tensor | None = None,
                           pooled_lut: tuple[torch.Tensor, torch.Tensor] | None = None,
                           scale: float | None = None) -> torch.Tensor:
    """Block-sparse attention with the Triton kernel (see the module docstring for the arguments).

    Args:
        q, k, v: (B, H, Sq, D), (B, H, Sk, D), (B, H, Sk, Dv); float16, bfloat16 or float32, one dtype.
        lut_counts: int, broadcastable to (B, H, ceil(Sq / block_q)): key blocks listed per query block.
        lut_indices: int, broadcastable to (B, H, ceil(Sq / block_q), width): the key-block indices.
        block_q (`int`) / block_k (`int`): block sizes in tokens, the units of the LUT. Allowed: 16, 32, 64, 128
            (64 and 128 are the efficient ones on a GPU; smaller blocks are for tests and fine-grained masks).
        key_len: optional int (ceil(Sk / block_k),): real keys at the start of each key block.
        pooled_k, pooled_v: optional (B, H, P, D) / (B, H, P, Dv) extra keys; pooled_bias: optional FP32 (P,) or
            (ceil(Sq / block_q), P) additive logit bias; pooled_lut: optional ``(counts, indices)`` over blocks of
            ``block_k`` pooled keys (all of them when ``None``).
        scale (`float`, defaults to `None`): softmax scale, ``1/sqrt(D)`` if ``None``.

    Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``, through the custom op
    ``torch.ops.dit_accel.block_sparse_attention``.
    """
    for name, block in (("block_q", block_q), ("block_k", block_k)):
        if block not in (16, 32, 64, 128):
            raise ValueError(f"{name} = {block} is not allowed; allowed: 16, 32, 64, 128")
    if q.ndim != 4 or k.shape[:2] != q.shape[:2] or k.shape[:3] != v.shape[:3] or k.shape[3] != q.shape[3]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must be (B, H, S, D) with "
                         "matching batch, heads, key length and head dim")
    if (pooled_k is None) != (pooled_v is None):
        raise ValueError("pooled_k and pooled_v go together")
    padded_head_dim(q.shape[3])
    padded_head_dim(v.shape[3])
    counts, indices = (pooled_lut if pooled_lut is not None else (None, None))
    return torch.ops.dit_accel.block_sparse_attention(q, k, v, lut_counts, lut_indices, block_q, block_k, key_len,
                                                      pooled_k, pooled_v, pooled_bias, counts, indices, scale)


def block_sparse_triton(q, k, v, lut_counts, lut_indices, block_q, block_k, key_len, pooled_k, pooled_v,
                        pooled_bias, pooled_counts, pooled_indices, scale) -> torch.Tensor:
    """The custom op's implementation: broadcast the LUTs (views, no copies per head) and launch the kernel."""
    from dit_accel.kernels import _triton_block_sparse

    batch, heads, q_len, dim = q.shape
    n_q = num_blocks(q_len, block_q)
    counts = _int32(lut_counts).expand(batch, heads, n_q)
    indices = _int32(lut_indices).expand(batch, heads, n_q, lut_indices.shape[-1])
    pooled = None
    if pooled_k is not None:
        n_p = num_blocks(pooled_k.shape[2], block_k)
        if pooled_counts is None:
            pooled_counts, pooled_indices = full_lut(n_q, n_p, q.device)
        bias = (torch.zeros(pooled_k.shape[2], device=q.device) if pooled_bias is None
                else pooled_bias.to(torch.float32).contiguous())  # the kernel reads bias rows as contiguous
        pooled = (pooled_k, pooled_v, bias, _int32(pooled_counts).expand(batch, heads, n_q),
                  _int32(pooled_indices).expand(batch, heads, n_q, pooled_indices.shape[-1]))
    out = torch.empty(batch, heads, q_len, v.shape[3], dtype=q.dtype, device=q.device)
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    key_len = None if key_len is None else _int32(key_len).contiguous()
    _triton_block_sparse.launch(q, k, v, out, counts, indices, key_len, pooled,
                                scale=scale, block_q=block_q, block_k=block_k)
    return out
