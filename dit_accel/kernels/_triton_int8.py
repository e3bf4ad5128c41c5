"""Triton side of :mod:`dit_accel.kernels.int8_attention`: the per-block INT8 quantization kernel and the attention
kernel. The math is documented there and mirrored op for op by the reference; this module needs Triton.

Tensors arrive as (B, H, S, D) *views* in any layout: the kernels take strides, so the (B, S, H, D) layout is read
and written in place without a transposed copy. The quantized Q/K buffers are (B, H, S_pad, Dp) contiguous int8,
zero in padded tokens and channels, so the attention kernel loads them without masks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dit_accel.kernels import interpret_mode
from dit_accel.kernels.int8_attention import padded_head_dim
from dit_accel.kernels.jit import LazyKernel


def _quantize_kernel(X, Mean, Out, Scale, length, dim, heads, num_blocks, padded_length, multiplier,
                     stride_b, stride_h, stride_s, stride_d,
                     BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, HAS_MEAN: tl.constexpr):
    block = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    rows = block * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, BLOCK_D)
    inside = (rows[:, None] < length) & (cols[None, :] < dim)
    x = tl.load(X + b * stride_b + h * stride_h + rows[:, None] * stride_s + cols[None, :] * stride_d,
                mask=inside, other=0.0).to(tl.float32)
    if HAS_MEAN:
        mean = tl.load(Mean + bh * dim + cols, mask=cols < dim, other=0.0)
        x = tl.where(inside, x - mean[None, :], 0.0)
    x = x * multiplier
    amax = tl.reduce(tl.reduce(tl.abs(x), 1, tl.standard._elementwise_max), 0, tl.standard._elementwise_max)
    scale = tl.math.div_rn(amax, 127.0)
    inverse = tl.where(amax > 0, tl.math.div_rn(127.0, tl.maximum(amax, 1e-30)), 0.0)
    y = x * inverse
    y = y + tl.where(y >= 0, 0.5, -0.5)
    tl.store(Out + (bh * padded_length + rows[:, None]) * BLOCK_D + cols[None, :], y.to(tl.int8))
    tl.store(Scale + bh * num_blocks + block, scale)


def _attention_kernel(Q8, QScale, K8, KScale, V, O, q_len, k_len, heads, dim_v, q_padded, k_padded,
                      num_q_blocks, num_k_blocks,
                      stride_vb, stride_vh, stride_vs, stride_vd, stride_ob, stride_oh, stride_os, stride_od,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                      EVEN_K: tl.constexpr, PV_BF16: tl.constexpr, UPCAST_BF16: tl.constexpr,
                      SKIP_PV: tl.constexpr = False):
    q_block = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    offs_m = q_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    q = tl.load(Q8 + (bh * q_padded + offs_m[:, None]) * BLOCK_D + offs_d[None, :])
    q_scale = tl.load(QScale + bh * num_q_blocks + q_block)
    # K is read as a (D, BLOCK_N) transposed view of its (BLOCK_N, D) rows: no copy, and Q·K is a plain dot.
    k_ptrs = K8 + (bh * k_padded + offs_n[None, :]) * BLOCK_D + offs_d[:, None]
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vs + offs_dv[None, :] * stride_vd
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_DV], 0.0, dtype=tl.float32)
    for j in range(num_k_blocks):
        k = tl.load(k_ptrs + j * BLOCK_N * BLOCK_D)
        k_scale = tl.load(KScale + bh * num_k_blocks + j)
        s = tl.dot(q, k).to(tl.float32) * (q_scale * k_scale)
        keys = j * BLOCK_N + offs_n
        if not EVEN_K:
            s = tl.where(keys[None, :] < k_len, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(s, 1, tl.standard._elementwise_max))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.reduce(p, 1, tl.standard._sum_combine)
        v = tl.load(v_ptrs + j * BLOCK_N * stride_vs, mask=(keys[:, None] < k_len) & (offs_dv[None, :] < dim_v),
                    other=0.0)
        # Two-level accumulation: the block's P·V comes out of the MMA in FP32 and is added to the FP32 buffer.
        if SKIP_PV:  # profiling only (benchmarks/profile_gpu.py): the time of everything but P·V; output wrong
            pv = acc
        elif PV_BF16:
            if UPCAST_BF16:  # Triton's CPU interpreter multiplies bf16 bit patterns as integers
                pv = tl.dot(p.to(tl.bfloat16).to(tl.float32), v.to(tl.bfloat16).to(tl.float32),
                            input_precision="ieee")
            else:
                pv = tl.dot(p.to(tl.bfloat16), v.to(tl.bfloat16), out_dtype=tl.float32)
        else:
            pv = tl.dot(p.to(tl.float16), v.to(tl.float16), out_dtype=tl.float32)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    out = acc / l_i[:, None]
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_dv[None, :] * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(offs_m[:, None] < q_len) & (offs_dv[None, :] < dim_v))


_QUANTIZE = LazyKernel(_quantize_kernel)
_ATTENTION = LazyKernel(_attention_kernel)


def quantize(x: torch.Tensor, block: int, multiplier: float, mean: torch.Tensor | None) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
    """Triton per-block INT8 quantization of a (B, H, S, D) view; same result as ``quantize_per_block``."""
    batch, heads, length, dim = x.shape
    block_d = padded_head_dim(dim)
    blocks = triton.cdiv(length, block)
    out = torch.empty(batch, heads, blocks * block, block_d, dtype=torch.int8, device=x.device)
    scales = torch.empty(batch, heads, blocks, dtype=torch.float32, device=x.device)
    mean_arg = mean.contiguous() if mean is not None else scales  # any pointer when unused
    _QUANTIZE[(blocks, batch * heads)](
        x, mean_arg, out, scales, length, dim, heads, blocks, blocks * block, multiplier,
        *x.stride(), BLOCK=block, BLOCK_D=block_d, HAS_MEAN=mean is not None, num_warps=4,
        enable_fp_fusion=False)  # no FMA: x · inverse is rounded before ± 0.5, exactly as the reference
    return out, scales


def attention(q8: torch.Tensor, q_scales: torch.Tensor, k8: torch.Tensor, k_scales: torch.Tensor, v: torch.Tensor,
              out: torch.Tensor, *, k_len: int, block_q: int, block_k: int, pv_bf16: bool,
              num_warps: int | None = None, num_stages: int = 4, skip_pv: bool = False) -> None:
    """Launch the attention kernel; ``v`` and ``out`` are (B, H, S, Dv) views (any strides), ``out`` is written.

    ``num_warps`` (default 8 up to head_dim 64, else 4) and ``num_stages`` (default 4) are launch settings that
    leave the result unchanged: the defaults were the fastest of 4/8 warps x 3/4 stages at 128 x 64 blocks on an
    H200 (benchmarks/results/profile-gpu.md: 5-8 % faster than the 4-or-8 warps, 3 stages used before).
    ``skip_pv`` leaves the P·V product out, for profiling only (the output is wrong)."""
    batch, heads, q_len, dim_v = out.shape
    block_d = q8.shape[3]
    grid = (q_scales.shape[2], batch * heads)
    _ATTENTION[grid](
        q8, q_scales, k8, k_scales, v, out, q_len, k_len, heads, dim_v, q8.shape[2], k8.shape[2],
        q_scales.shape[2], k_scales.shape[2], *v.stride(), *out.stride(),
        BLOCK_M=block_q, BLOCK_N=block_k, BLOCK_D=block_d, BLOCK_DV=padded_head_dim(dim_v),
        EVEN_K=k_len % block_k == 0, PV_BF16=pv_bf16, UPCAST_BF16=interpret_mode(), SKIP_PV=skip_pv,
        num_warps=num_warps or (8 if block_d <= 64 else 4), num_stages=num_stages, enable_fp_fusion=True)  # explicit: no Triton warning
