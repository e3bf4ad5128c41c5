"""Generalized neighbourhood attention (GNA, ``attention/gna.py``) as a Triton kernel: its GPU path.

The kernel reads the plan's work list directly: the runs of query tiles that share one union of windows
(:class:`~dit_accel.attention.gna.GroupedWindows`), as tables of token indices. Each program takes ``block_q``
queries of one run, walks the run's key union in chunks of ``block_k`` keys (loaded by index, no gathered copy)
and masks every (query, key) pair to the query's own window per axis, from the per-token window starts; the text
keys follow in the same online softmax. So the result is exactly :func:`~dit_accel.attention.gna.
neighbourhood_attention`'s (the masked-dense neighbourhood), not a block approximation, and the work is the same
union per run as the CPU path's. A plan without runs (``grouped is None``: every tile its own run) is read as runs
of one tile whose union is exactly its window (no mask).

The launch is the custom op ``torch.ops.dit_accel.window_attention`` (registered on import; needs only torch), so
``torch.compile`` traces it as one opaque call. Forward only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dit_accel.attention.gna import NeighbourhoodPlan
from dit_accel.kernels import kernel_usable

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
BLOCKS = (16, 32, 64, 128)
DEFAULT_BLOCK_K = 64


def default_block_q(width: int) -> int:
    """Queries per program for runs of ``width`` query slots: the run's width rounded up to a power of two, 16-64
    (fewer would leave most of a block empty when runs are small; more gains little)."""
    return min(64, max(16, 1 << max(0, width - 1).bit_length()))


def window_tables(plan: NeighbourhoodPlan) -> tuple[Tensor, Tensor, Tensor, Tensor | None, tuple, tuple]:
    """The kernel's view of ``plan``: ``(queries (R, S), valid (R, S) uint8, keys (R, U), starts (N, 3) or None,
    kernel, union)``; a plan without runs gives one run per tile, unmasked."""
    grouped = plan.grouped
    if grouped is None:
        return plan.queries, plan.valid.view(torch.uint8), plan.keys, None, (1, 1, 1), (1, 1, plan.keys.shape[1])
    return (grouped.queries, grouped.valid.view(torch.uint8), grouped.keys, grouped.offsets, grouped.kernel,
            grouped.union)


@torch.library.custom_op("dit_accel::window_attention", mutates_args=())
def window_attention_op(q: Tensor, k: Tensor, v: Tensor, queries: Tensor, valid: Tensor, keys: Tensor,
                        starts: Tensor | None, text_key: Tensor | None, text_value: Tensor | None,
                        kernel: list[int], union: list[int], scale: float | None, block_q: int,
                        block_k: int) -> Tensor:
    from dit_accel.kernels import _triton_window

    out = torch.empty(*q.shape[:3], v.shape[3], dtype=q.dtype, device=q.device)
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else scale
    text = None if text_key is None else (text_key, text_value)
    _triton_window.launch(q, k, v, out, queries, valid, keys, starts, text, tuple(kernel), tuple(union),
                          scale=scale, block_q=block_q, block_k=block_k)
    return out


@window_attention_op.register_fake
def _window_attention_fake(q, k, v, queries, valid, keys, starts, text_key, text_value, kernel, union, scale,
                           block_q, block_k):
    return q.new_empty(*q.shape[:3], v.shape[3])


def window_attention(query: Tensor, key: Tensor, value: Tensor, plan: NeighbourhoodPlan, *,
                     text_key: Tensor | None = None, text_value: Tensor | None = None, scale: float | None = None,
                     block_q: int | None = None, block_k: int | None = None) -> Tensor:
    """:func:`~dit_accel.attention.gna.neighbourhood_attention` (same arguments and result, (B, H, N, Dv)) computed
    by the Triton kernel. Runs where :func:`window_kernel_usable` says so.

    Args:
        query, key, value: (B, H, N, D), (B, H, N, D), (B, H, N, Dv); float16, bfloat16 or float32, one dtype;
            D, Dv <= 256.
        plan: :func:`~dit_accel.attention.gna.neighbourhood_plan` of the grid (on the tensors' device).
        text_key, text_value (defaults to `None`): (B, H, L, D) / (B, H, L, Dv) keys every query attends.
        scale (`float`, defaults to `None`): softmax scale, ``1/sqrt(D)`` if ``None``.
        block_q (`int`, defaults to `None`): queries per program (16, 32, 64, 128); ``None``:
            :func:`default_block_q` of the runs' width.
        block_k (`int`, defaults to `None`): keys per step of the online softmax (16, 32, 64, 128); ``None``: 64,
            or 32 for float32 with head dims above 128 (FP32 tiles that large would crowd shared memory).
    """
    queries, valid, keys, starts, kernel, union = window_tables(plan)
    block_q = default_block_q(queries.shape[1]) if block_q is None else block_q
    if block_k is None:
        wide = query.dtype == torch.float32 and max(query.shape[-1], value.shape[-1]) > 128
        block_k = 32 if wide else DEFAULT_BLOCK_K
    for name, block in (("block_q", block_q), ("block_k", block_k)):
        if block not in BLOCKS:
            raise ValueError(f"{name} = {block} is not allowed; allowed: 16, 32, 64, 128")
    if (query.ndim != 4 or key.shape != query.shape or value.shape[:3] != query.shape[:3]
            or query.shape[2] != plan.num_tokens):
        raise ValueError(f"query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)} must be "
                         f"(B, H, N, D) with N = {plan.num_tokens} (the plan's tokens) and matching shapes")
    if (text_key is None) != (text_value is None):
        raise ValueError("text_key and text_value go together")
    tensors = [t for t in (key, value, text_key, text_value) if t is not None]
    if query.dtype not in KERNEL_DTYPES or any(t.dtype != query.dtype for t in tensors):
        raise ValueError(f"query, key, value and text must share one dtype of float16, bfloat16, float32; got "
                         f"{sorted({str(t.dtype) for t in (query, *tensors)})}")
    if max(t.shape[-1] for t in (query, *tensors)) > MAX_HEAD_DIM:
        raise ValueError(f"head dims above {MAX_HEAD_DIM} are not supported by the window kernel")
    if text_key is not None and text_key.shape[2] == 0:
        text_key = text_value = None
    return torch.ops.dit_accel.window_attention(query, key, value, queries, valid, keys, starts, text_key,
                                                text_value, list(kernel), list(union), scale, block_q, block_k)


def window_kernel_usable(query: Tensor, *tensors: Tensor | None) -> bool:
    """Whether the kernel path applies: Triton can run on the tensors' device (CUDA, or the CPU interpreter), one
    kernel dtype (float16, bfloat16, float32) for all, head dims <= 256, and no gradient (forward-only kernel)."""
    if not kernel_usable(query) or query.dtype not in KERNEL_DTYPES:
        return False
    given = [t for t in tensors if t is not None]
    if any(t.dtype != query.dtype or t.device != query.device for t in given):
        return False
    if max(t.shape[-1] for t in (query, *given)) > MAX_HEAD_DIM:
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in (query, *given)))
