"""GNA's Triton kernel path (kernels/window_lut.py), run on CPU in Triton's interpreter: equal to gna's CPU path
and to the masked-dense reference on every kind of plan (runs with masks, exact unions, one run per tile)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dit_accel.attention.gna import neighbourhood_attention, neighbourhood_mask, neighbourhood_plan
from dit_accel.core.blocks import TokenGrid
from dit_accel.kernels import triton_importable

pytestmark = pytest.mark.skipif(not triton_importable(), reason="Triton is not installed")

TEXT = 5


def tensors(n: int, *, batch: int = 1, heads: int = 2, dim: int = 16, dim_v: int = 16, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(batch, heads, n, dim, generator=generator) for _ in range(2))
    v = torch.randn(batch, heads, n, dim_v, generator=generator)
    tk = torch.randn(batch, heads, TEXT, dim, generator=generator)
    tv = torch.randn(batch, heads, TEXT, dim_v, generator=generator)
    return q, k, v, tk, tv


def masked_dense(q, k, v, tk, tv, grid, kernel, stride, dilation):
    """The neighbourhood as one masked SDPA over image (+ text) keys, in float64."""
    n = grid.num_tokens
    mask = neighbourhood_mask(grid, kernel, stride, dilation)
    if tk is not None:
        mask = torch.cat([mask, torch.ones(n, tk.shape[2], dtype=torch.bool)], 1)
        k, v = torch.cat([k, tk], 2), torch.cat([v, tv], 2)
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask).float()


# (grid, kernel, stride, dilation, merge, what the plan must exercise)
CASES = {
    "square-2d": (TokenGrid(1, 8, 8), (1, 3, 3), (1, 1, 1), (1, 1, 1), None, "masked"),
    "odd-rectangle": (TokenGrid(1, 7, 11), (1, 3, 5), (1, 1, 1), (1, 1, 1), None, "masked"),
    "video-3d": (TokenGrid(3, 4, 5), (2, 3, 3), (1, 2, 2), (1, 1, 1), (2, 2, 2), "masked"),
    "strided": (TokenGrid(1, 6, 9), (1, 4, 5), (1, 2, 3), (1, 1, 1), None, "masked"),
    "strided-tiles": (TokenGrid(1, 7, 9), (1, 4, 5), (1, 2, 2), (1, 1, 1), (1, 1, 1), "tiles"),  # partial tiles
    "dilated": (TokenGrid(1, 8, 8), (1, 3, 3), (1, 1, 1), (1, 2, 2), (1, 3, 3), "masked"),
    "merged-runs": (TokenGrid(1, 9, 10), (1, 5, 4), (1, 1, 2), (1, 1, 1), (1, 3, 2), "masked"),
    "exact-unions": (TokenGrid(1, 8, 8), (1, 3, 3), (1, 1, 1), (1, 2, 2), (1, 2, 2), "exact"),
    "blocked-one-run-per-tile": (TokenGrid(1, 8, 8), (1, 4, 4), (1, 4, 4), (1, 1, 1), None, "tiles"),
}


def plan_kind(plan) -> str:
    if plan.grouped is None:
        return "tiles"
    return "exact" if plan.grouped.offsets is None else "masked"


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_equals_cpu_path_and_masked_dense(interpreter, case):
    from dit_accel.kernels.window_lut import window_attention, window_kernel_usable

    grid, kernel, stride, dilation, merge, kind = CASES[case]
    plan = neighbourhood_plan(grid, kernel, stride, dilation, merge=merge)
    assert plan_kind(plan) == kind
    q, k, v, tk, tv = tensors(grid.num_tokens, heads=1, seed=len(case))  # one head: the interpreter is slow
    assert window_kernel_usable(q, k, v, tk, tv)
    for text in (False, True):
        tk_, tv_ = (tk, tv) if text else (None, None)
        out = window_attention(q, k, v, plan, text_key=tk_, text_value=tv_)
        expected = neighbourhood_attention(q, k, v, plan, text_key=tk_, text_value=tv_)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        reference = masked_dense(q, k, v, tk_, tv_, grid, kernel, stride, dilation)
        torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)


def test_strided_views_batches_value_dim_and_blocks(interpreter):
    """(B, N, H, D) inputs seen as (B, H, N, D) views (as diffusers hands them), two batches, Dv != D, a scale,
    and query blocks smaller than a run (several programs per run)."""
    from dit_accel.kernels.window_lut import window_attention

    grid, kernel, stride, dilation = TokenGrid(1, 6, 7), (1, 3, 3), (1, 1, 1), (1, 1, 1)
    plan = neighbourhood_plan(grid, kernel, stride, dilation, merge=(1, 5, 5))
    assert plan.grouped.queries.shape[1] > 16
    q, k, v, tk, tv = (x.transpose(1, 2).contiguous().transpose(1, 2)
                       for x in tensors(grid.num_tokens, batch=2, dim=24, dim_v=8, seed=3))
    assert not q.is_contiguous()
    out = window_attention(q, k, v, plan, text_key=tk, text_value=tv, scale=0.3, block_q=16, block_k=32)
    # The CPU path's flash SDPA needs Dv == D, so the reference here is the masked-dense one.
    expected = masked_dense(q * 0.3 * 24 ** 0.5, k, v, tk, tv, grid, kernel, stride, dilation)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_bfloat16_kernel_is_close_to_cpu_path(interpreter):
    from dit_accel.kernels.window_lut import window_attention

    grid = TokenGrid(1, 6, 6)
    plan = neighbourhood_plan(grid, (1, 3, 3), (1, 1, 1), (1, 1, 1))
    q, k, v, tk, tv = (x.bfloat16() for x in tensors(grid.num_tokens, seed=7))
    out = window_attention(q, k, v, plan, text_key=tk, text_value=tv)
    assert out.dtype == torch.bfloat16
    expected = neighbourhood_attention(*(x.float() for x in (q, k, v)), plan, text_key=tk.float(),
                                       text_value=tv.float())
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


def test_kernel_guard_and_bad_input(interpreter, monkeypatch):
    from dit_accel.kernels.window_lut import default_block_q, window_attention, window_kernel_usable

    grid = TokenGrid(1, 4, 4)
    plan = neighbourhood_plan(grid, (1, 3, 3), (1, 1, 1), (1, 1, 1))
    q, k, v, tk, tv = tensors(grid.num_tokens)
    assert window_kernel_usable(q, k, v, tk, tv)
    assert not window_kernel_usable(q.double(), k.double(), v.double())  # not a kernel dtype
    assert not window_kernel_usable(q, k, v.half())  # mixed dtypes
    assert not window_kernel_usable(q, torch.randn(1, 2, 16, 300))  # head dim too large
    assert not window_kernel_usable(q.requires_grad_(), k, v)  # forward-only kernel
    with torch.no_grad():
        assert window_kernel_usable(q, k, v)
    q = q.detach()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not window_kernel_usable(q, k, v)  # CPU tensors without the interpreter
    assert [default_block_q(w) for w in (1, 9, 16, 17, 40, 200)] == [16, 16, 16, 32, 64, 64]
    with pytest.raises(ValueError, match="block_k = 48 is not allowed"):
        window_attention(q, k, v, plan, block_k=48)
    with pytest.raises(ValueError, match="share one dtype"):
        window_attention(q, k, v.half(), plan)
    with pytest.raises(ValueError, match="plan's tokens"):
        window_attention(q[:, :, :9], k[:, :, :9], v[:, :, :9], plan)
    with pytest.raises(ValueError, match="go together"):
        window_attention(q, k, v, plan, text_key=tk)


@pytest.mark.slow  # ~5 s: opcheck runs the interpreted kernel several times
def test_custom_op_passes_opcheck(interpreter):
    """The op's schema, fake (meta) implementation and dispatch agree, so ``torch.compile`` can trace it."""
    from dit_accel.kernels.window_lut import window_attention_op, window_tables

    grid = TokenGrid(1, 5, 5)
    plan = neighbourhood_plan(grid, (1, 3, 3), (1, 1, 1), (1, 1, 1), merge=(1, 2, 2))
    queries, valid, keys, starts, kernel, union = window_tables(plan)
    q, k, v, tk, tv = tensors(grid.num_tokens, heads=1)
    torch.library.opcheck(window_attention_op, (q, k, v, queries, valid, keys, starts, tk, tv, list(kernel),
                                                list(union), None, 16, 16))
