"""Block-sparse attention: Triton kernel (CPU interpreter) vs dense SDPA, its reference, and ``tiled_attention``.

Kernel tests run Triton's interpreter (``TRITON_INTERPRET=1`` per test) on small shapes and skip without Triton;
the LUT helpers are pure PyTorch.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dit_accel.attention.plans import curve_tile_plan, window_plan
from dit_accel.attention.ranges import curve_tile_attention
from dit_accel.attention.tiled import tiled_attention
from dit_accel.core.blocks import TokenGrid
from dit_accel.kernels import triton_importable
from dit_accel.kernels.block_sparse import (block_sparse_attention, block_sparse_reference, full_lut, lut_from_mask,
                                            lut_to_mask, num_blocks)
from dit_accel.kernels.tile_lut import cuda_curve_tile_attention, cuda_tiled_attention, tile_lut, tile_plan_attention
needs_triton = pytest.mark.skipif(not triton_importable(), reason="Triton is not installed")
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def qkv(batch=1, heads=2, length=100, dim=64, dtype=torch.float32, seed=0, dim_v=None, k_len=None):
    g = torch.Generator().manual_seed(seed)
    k_len = length if k_len is None else k_len
    q = torch.randn(batch, heads, length, dim, generator=g)
    k = torch.randn(batch, heads, k_len, dim, generator=g)
    v = torch.randn(batch, heads, k_len, dim_v or dim, generator=g)
    return tuple(t.to(dtype) for t in (q, k, v))


def close(a, b, dtype):
    torch.testing.assert_close(a.float(), b.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


# -- LUT helpers (pure torch) ----------------------------------------------------------------------------------------
def test_lut_round_trip():
    mask = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(0)) < 0.4
    counts, indices = lut_from_mask(mask)
    assert torch.equal(lut_to_mask(counts, indices, 7), mask)
    assert torch.equal(counts, mask.sum(-1).int())
    counts, indices = full_lut(4, 3)
    assert bool(lut_to_mask(counts, indices, 3).all())


def test_tile_lut_covers_each_token_once():
    plan = window_plan(TokenGrid(1, 10, 10), (4, 4), 1, (2, 2), True)
    lut = tile_lut(plan, num_text=7, block=16)
    tiles = plan.num_tiles
    assert lut.gather.shape == (tiles * 16,)  # capacity 16: one block per tile
    assert torch.equal(lut.gather[lut.inverse], torch.arange(100))
    assert int(lut.key_len.sum()) == 100 + 7
    assert lut.pooled_bias.shape == (tiles, tiles)
    assert bool(torch.isinf(lut.pooled_bias).any()) and bool(torch.isfinite(lut.pooled_bias).any())


# -- kernel vs dense / reference (interpreter) ---------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("dtype,dim,block_q,block_k", [(torch.float32, 64, 32, 32), (torch.float16, 80, 32, 16),
                                                       (torch.bfloat16, 128, 16, 32)])
def test_all_blocks_is_dense_sdpa(interpreter, dtype, dim, block_q, block_k):
    q, k, v = qkv(dim=dim, dtype=dtype, k_len=90)
    originals = [t.clone() for t in (q, k, v)]
    counts, indices = full_lut(num_blocks(100, block_q), num_blocks(90, block_k))
    out = block_sparse_attention(q, k, v, counts, indices, block_q=block_q, block_k=block_k)
    close(out, F.scaled_dot_product_attention(q.float(), k.float(), v.float()), dtype)
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), originals))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_random_luts_match_the_reference(interpreter, dtype):
    q, k, v = qkv(batch=2, dim=32, dim_v=16, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(2, 2, 7, 4, generator=g) < 0.5
    mask[0, 0, 3] = False  # a query block with no key at all: zeros
    counts, indices = lut_from_mask(mask)
    out = block_sparse_attention(q, k, v, counts, indices, block_q=16, block_k=32, scale=0.3)
    reference = block_sparse_reference(q, k, v, counts, indices, block_q=16, block_k=32, scale=0.3)
    close(out, reference, dtype)
    assert bool((out[0, 0, 48:64] == 0).all())


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_pooled_keys_with_bias_and_key_lengths(interpreter, dtype):
    q, k, v = qkv(dim=64, dtype=dtype)
    g = torch.Generator().manual_seed(2)
    pooled_k, pooled_v = (torch.randn(1, 2, 40, 64, generator=g).to(dtype) for _ in range(2))
    counts, indices = lut_from_mask(torch.rand(4, 4, generator=g) < 0.5)
    key_len = torch.randint(0, 33, (4,), generator=g)
    bias = torch.randn(4, 40, generator=g)
    bias[0, :20] = -float("inf")
    pooled_lut = lut_from_mask(torch.rand(4, 2, generator=g) < 0.7)
    kwargs = dict(block_q=32, block_k=32, key_len=key_len, pooled_k=pooled_k, pooled_v=pooled_v, pooled_bias=bias,
                  pooled_lut=pooled_lut)
    close(block_sparse_attention(q, k, v, counts, indices, **kwargs),
          block_sparse_reference(q, k, v, counts, indices, **kwargs), dtype)
    shared_bias = dict(kwargs, pooled_bias=bias[1], pooled_lut=None)  # one bias row for every query block
    close(block_sparse_attention(q, k, v, counts, indices, **shared_bias),
          block_sparse_reference(q, k, v, counts, indices, **shared_bias), dtype)


# -- TilePlan through the kernel == tiled_attention ----------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("plan,text", [
    (window_plan(TokenGrid(1, 10, 10), (4, 4), 1, (2, 2), True), 7),
    (window_plan(TokenGrid(1, 10, 10), (3, 5), 0, (0, 0), False), 0),
    (curve_tile_plan(TokenGrid(1, 10, 10), 12, 1, 6, True), 5),
])
def test_tile_plans_match_tiled_attention(interpreter, plan, text):
    q, k, v = qkv(dim=32)
    kt, vt = qkv(length=text, dim=32, seed=1)[1:]
    reference = tiled_attention(q, k, v, plan, shared_key=kt, shared_value=vt)
    out = tile_plan_attention(q, k, v, plan, shared_key=kt, shared_value=vt, block=16)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("tile,radius,offset,pooled,pool", [
    (12, 1, 5, True, None), (16, 0, 0, True, 16), (30, 1, 0, True, 5), (20, 1, 10, False, None), (12, 0, 6, True, 3),
])
def test_curve_tiles_match_curve_tile_attention(interpreter, tile, radius, offset, pooled, pool):
    q, k, v = qkv(dim=32)
    kt, vt = qkv(length=5, dim=32, seed=1)[1:]
    kwargs = dict(tile=tile, radius=radius, offset=offset, pooled=pooled, pool=pool, shared_key=kt, shared_value=vt,
                  scale=None)
    reference = curve_tile_attention(q, k, v, **kwargs)
    out = cuda_curve_tile_attention(q, k, v, **kwargs)  # what curve_tile_attention runs on CUDA
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)


@needs_triton
def test_dispatch_entry_and_autograd_fallback(interpreter):
    plan = window_plan(TokenGrid(1, 8, 8), (4, 4), 0, (0, 0), True)
    q, k, v = qkv(length=64, dim=16)
    out = cuda_tiled_attention(q, k, v, plan, None, None, None)  # what tiled_attention runs on CUDA
    torch.testing.assert_close(out, tiled_attention(q, k, v, plan), atol=1e-5, rtol=1e-5)
    assert cuda_tiled_attention(q.requires_grad_(), k, v, plan, None, None, None) is None  # forward-only kernel


@needs_triton
def test_custom_op_traces_under_compile(interpreter):
    q, k, v = qkv(length=40, dim=16, dtype=torch.float16)
    counts, indices = lut_from_mask(torch.rand(3, 3, generator=torch.Generator().manual_seed(0)) < 0.6)
    pooled_k, pooled_v = q[:, :, :5].clone(), v[:, :, :5].clone()
    args = (q, k, v, counts, indices, 16, 16, None, pooled_k, pooled_v, torch.zeros(5), None, None, None)
    torch.library.opcheck(torch.ops.dit_accel.block_sparse_attention.default, args)

    def attend(q, k, v):
        return block_sparse_attention(q * 1.0, k, v, counts, indices, block_q=16, block_k=16, pooled_k=pooled_k,
                                      pooled_v=pooled_v, pooled_bias=torch.zeros(5))

    compiled = torch.compile(attend, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), attend(q, k, v), atol=0, rtol=0)


def test_bad_arguments():
    q, k, v = qkv(length=16, dim=16)
    counts, indices = full_lut(1, 1)
    with pytest.raises(ValueError, match="block_q = 48"):
        block_sparse_attention(q, k, v, counts, indices, block_q=48, block_k=16)
    with pytest.raises(ValueError, match="pooled_k and pooled_v go together"):
        block_sparse_attention(q, k, v, counts, indices, block_q=16, block_k=16, pooled_k=k)
