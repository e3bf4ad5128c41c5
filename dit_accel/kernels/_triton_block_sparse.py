"""Triton side of :mod:`dit_accel.kernels.block_sparse`: one program per (query block, batch · head) walks its LUT
row (count + key-block indices), then its pooled-key LUT row, in one FP32 online softmax (``exp2``). Needs Triton.

All tensors are read through strides (the LUTs are usually stride-0 broadcasts of one plan over batch and heads).
Rows whose running maximum is still ``-inf`` (nothing seen yet, or fully masked blocks) subtract 0 instead, so a
fully masked block contributes exactly nothing and never produces NaN.
"""

from __future__ import annotations

import torch
import triton.language as tl

from dit_accel.kernels import interpret_mode
from dit_accel.kernels.int8_attention import LOG2E, padded_head_dim
from dit_accel.kernels.jit import LazyKernel


def _block_sparse_kernel(
        Q, K, V, O, Counts, Indices, KeyLen, PK, PV, PBias, PCounts, PIndices,
        q_len, k_len, pooled_len, heads, dim, dim_v, qk_scale,
        s_qb, s_qh, s_qs, s_qd, s_kb, s_kh, s_ks, s_kd, s_vb, s_vh, s_vs, s_vd, s_ob, s_oh, s_os, s_od,
        s_cb, s_ch, s_cm, s_ib, s_ih, s_im, s_it,
        s_pkb, s_pkh, s_pks, s_pkd, s_pvb, s_pvh, s_pvs, s_pvd, s_bm,
        s_pcb, s_pch, s_pcm, s_pib, s_pih, s_pim, s_pit,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        HAS_KEY_LEN: tl.constexpr, HAS_POOLED: tl.constexpr, FP32_DOT: tl.constexpr):
    q_block = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    offs_m = q_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qs + offs_d[None, :] * s_qd,
                mask=(offs_m[:, None] < q_len) & (offs_d[None, :] < dim), other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_DV], 0.0, dtype=tl.float32)

    count = tl.load(Counts + b * s_cb + h * s_ch + q_block * s_cm)
    index_row = Indices + b * s_ib + h * s_ih + q_block * s_im
    for t in range(count):
        j = tl.load(index_row + t * s_it)
        keys = j * BLOCK_N + offs_n
        valid = keys < k_len
        if HAS_KEY_LEN:
            valid = valid & (offs_n < tl.load(KeyLen + j))
        k = tl.load(K + b * s_kb + h * s_kh + keys[None, :] * s_ks + offs_d[:, None] * s_kd,
                    mask=valid[None, :] & (offs_d[:, None] < dim), other=0.0)
        if FP32_DOT:
            s = tl.dot(q.to(tl.float32), k.to(tl.float32), input_precision="ieee") * qk_scale
        else:
            s = tl.dot(q, k) * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(s, 1, tl.standard._elementwise_max))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.reduce(p, 1, tl.standard._sum_combine)
        v = tl.load(V + b * s_vb + h * s_vh + keys[:, None] * s_vs + offs_dv[None, :] * s_vd,
                    mask=valid[:, None] & (offs_dv[None, :] < dim_v), other=0.0)
        if FP32_DOT:
            pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    if HAS_POOLED:
        count = tl.load(PCounts + b * s_pcb + h * s_pch + q_block * s_pcm)
        index_row = PIndices + b * s_pib + h * s_pih + q_block * s_pim
        for t in range(count):
            j = tl.load(index_row + t * s_pit)
            keys = j * BLOCK_N + offs_n
            valid = keys < pooled_len
            k = tl.load(PK + b * s_pkb + h * s_pkh + keys[None, :] * s_pks + offs_d[:, None] * s_pkd,
                        mask=valid[None, :] & (offs_d[:, None] < dim), other=0.0)
            bias = tl.load(PBias + q_block * s_bm + keys, mask=valid, other=float("-inf"))
            if FP32_DOT:
                s = tl.dot(q.to(tl.float32), k.to(tl.float32), input_precision="ieee") * qk_scale
            else:
                s = tl.dot(q, k) * qk_scale
            s = s + bias[None, :] * 1.4426950408889634  # natural-log bias into the log2 domain
            m_new = tl.maximum(m_i, tl.reduce(s, 1, tl.standard._elementwise_max))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_use[:, None])
            alpha = tl.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.reduce(p, 1, tl.standard._sum_combine)
            v = tl.load(PV + b * s_pvb + h * s_pvh + keys[:, None] * s_pvs + offs_dv[None, :] * s_pvd,
                        mask=valid[:, None] & (offs_dv[None, :] < dim_v), other=0.0)
            if FP32_DOT:
                pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # no key at all: zeros
    o_ptrs = O + b * s_ob + h * s_oh + offs_m[:, None] * s_os + offs_dv[None, :] * s_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(offs_m[:, None] < q_len) & (offs_dv[None, :] < dim_v))


_KERNEL = LazyKernel(_block_sparse_kernel)


def launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, counts: torch.Tensor,
           indices: torch.Tensor, key_len: torch.Tensor | None, pooled: tuple | None, *, scale: float, block_q: int,
           block_k: int) -> None:
    """Launch over (ceil(Sq / block_q), B · H); ``counts``/``indices`` already broadcast to (B, H, Mq[, W])."""
    batch, heads, q_len, dim = q.shape
    dim_v = v.shape[3]
    if pooled is None:
        pk, pv, bias, pc, pi = q, v, counts, counts, indices  # placeholders, never read (HAS_POOLED=False)
        pooled_len, s_bm = 0, 0
    else:
        pk, pv, bias, pc, pi = pooled
        pooled_len = pk.shape[2]
        s_bm = bias.stride(0) if bias.ndim == 2 else 0
    qk_scale = float(torch.tensor(scale * LOG2E, dtype=torch.float32))
    block_d = padded_head_dim(dim)
    # FP32 inputs get IEEE FP32 dots; BF16 under the CPU interpreter too (it multiplies bf16 bit patterns as
    # integers), after rounding P to BF16 as the GPU path does.
    fp32_dot = q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and interpret_mode())
    grid = (triton_cdiv(q_len, block_q), batch * heads)
    _KERNEL[grid](
        q, k, v, out, counts, indices, key_len if key_len is not None else counts, pk, pv, bias, pc, pi,
        q_len, k.shape[2], pooled_len, heads, dim, dim_v, qk_scale,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *counts.stride(), *indices.stride(),
        *pk.stride(), *pv.stride(), s_bm, *pc.stride(), *pi.stride(),
        BLOCK_M=block_q, BLOCK_N=block_k, BLOCK_D=block_d, BLOCK_DV=padded_head_dim(dim_v),
        HAS_KEY_LEN=key_len is not None, HAS_POOLED=pooled is not None, FP32_DOT=fp32_dot,
        # FP32 tiles are large: one stage keeps them within shared memory. Fusion explicit: no Triton warning.
        num_warps=4 if block_d <= 64 else 8, num_stages=1 if fp32_dot else 2, enable_fp_fusion=True)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
