"""Triton side of :mod:`dit_accel.kernels.window_lut`: exact neighbourhood attention over runs of query tiles.

One program per (query block of one run, batch · head). The run's query tokens and its key union come from
tables and are loaded by index (no gathered copies). Each key chunk of the union is masked per (query, key): a key
at union position ``(pf, ph, pw)`` is allowed for a query whose window starts at ``(sf, sh, sw)`` iff
``s <= p < s + kernel`` on every axis (no mask when the plan's unions are exactly the windows). The text keys
then join the same FP32 online softmax (``exp2``), dense for every query, so image and text are merged exactly.

The conventions of :mod:`._triton_block_sparse` hold: tensors are read through strides, rows whose running
maximum is still ``-inf`` subtract 0 (never NaN), and only Triton builtins are used (see :mod:`.jit`).
"""

from __future__ import annotations

import torch
import triton.language as tl

from dit_accel.kernels import interpret_mode
from dit_accel.kernels.int8_attention import LOG2E, padded_head_dim
from dit_accel.kernels.jit import LazyKernel


def _window_kernel(
        Q, K, V, O, TK, TV, QIdx, QValid, KIdx, Starts,
        width, m_blocks, union, union_h, union_w, kernel_f, kernel_h, kernel_w, text_len, heads, dim, dim_v,
        qk_scale,
        s_qb, s_qh, s_qs, s_qd, s_kb, s_kh, s_ks, s_kd, s_vb, s_vh, s_vs, s_vd, s_ob, s_oh, s_os, s_od,
        s_tkb, s_tkh, s_tks, s_tkd, s_tvb, s_tvh, s_tvs, s_tvd,
        s_qir, s_qis, s_qvr, s_qvs, s_kir, s_kiu, s_sn, s_sa,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
        HAS_MASK: tl.constexpr, HAS_TEXT: tl.constexpr, FP32_DOT: tl.constexpr):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    run = pid // m_blocks
    slot = (pid % m_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    in_run = slot < width
    token = tl.load(QIdx + run * s_qir + slot * s_qis, mask=in_run, other=0)
    row_ok = in_run & (tl.load(QValid + run * s_qvr + slot * s_qvs, mask=in_run, other=0) != 0)
    q = tl.load(Q + b * s_qb + h * s_qh + token[:, None] * s_qs + offs_d[None, :] * s_qd,
                mask=row_ok[:, None] & (offs_d[None, :] < dim), other=0.0)
    if HAS_MASK:
        start_f = tl.load(Starts + token * s_sn, mask=row_ok, other=0)
        start_h = tl.load(Starts + token * s_sn + s_sa, mask=row_ok, other=0)
        start_w = tl.load(Starts + token * s_sn + 2 * s_sa, mask=row_ok, other=0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_DV], 0.0, dtype=tl.float32)

    for first in range(0, union, BLOCK_N):
        position = first + offs_n
        in_union = position < union
        keys = tl.load(KIdx + run * s_kir + position * s_kiu, mask=in_union, other=0)
        k = tl.load(K + b * s_kb + h * s_kh + keys[None, :] * s_ks + offs_d[:, None] * s_kd,
                    mask=in_union[None, :] & (offs_d[:, None] < dim), other=0.0)
        if FP32_DOT:
            s = tl.dot(q.to(tl.float32), k.to(tl.float32), input_precision="ieee") * qk_scale
        else:
            s = tl.dot(q, k) * qk_scale
        allowed = in_union[None, :] & row_ok[:, None]
        if HAS_MASK:
            # Union positions are frame-major (frame, row, column); each axis is checked against its own window.
            pos_f = position // (union_h * union_w)
            pos_h = (position // union_w) % union_h
            pos_w = position % union_w
            allowed = allowed & (pos_f[None, :] >= start_f[:, None]) & (pos_f[None, :] < start_f[:, None] + kernel_f)
            allowed = allowed & (pos_h[None, :] >= start_h[:, None]) & (pos_h[None, :] < start_h[:, None] + kernel_h)
            allowed = allowed & (pos_w[None, :] >= start_w[:, None]) & (pos_w[None, :] < start_w[:, None] + kernel_w)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(s, 1, tl.standard._elementwise_max))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.reduce(p, 1, tl.standard._sum_combine)
        v = tl.load(V + b * s_vb + h * s_vh + keys[:, None] * s_vs + offs_dv[None, :] * s_vd,
                    mask=in_union[:, None] & (offs_dv[None, :] < dim_v), other=0.0)
        if FP32_DOT:
            pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    if HAS_TEXT:
        for first in range(0, text_len, BLOCK_N):
            keys = first + offs_n
            valid = keys < text_len
            k = tl.load(TK + b * s_tkb + h * s_tkh + keys[None, :] * s_tks + offs_d[:, None] * s_tkd,
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
            v = tl.load(TV + b * s_tvb + h * s_tvh + keys[:, None] * s_tvs + offs_dv[None, :] * s_tvd,
                        mask=valid[:, None] & (offs_dv[None, :] < dim_v), other=0.0)
            if FP32_DOT:
                pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptrs = O + b * s_ob + h * s_oh + token[:, None] * s_os + offs_dv[None, :] * s_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < dim_v))


_KERNEL = LazyKernel(_window_kernel)


def launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, queries: torch.Tensor,
           valid: torch.Tensor, keys: torch.Tensor, starts: torch.Tensor | None, text: tuple | None,
           kernel: tuple[int, int, int], union: tuple[int, int, int], *, scale: float, block_q: int,
           block_k: int) -> None:
    """Launch over (runs · ceil(S / block_q), B · H). ``queries``/``valid`` (R, S), ``keys`` (R, U), ``starts``
    (N, 3) per-token window starts in the run's union (``None``: no mask); ``text`` ``(text_key, text_value)``."""
    batch, heads, _, dim = q.shape
    dim_v = v.shape[3]
    runs, width = queries.shape
    m_blocks = -(-width // block_q)
    tk, tv = (k, v) if text is None else text  # placeholders, never read (HAS_TEXT=False)
    st = queries if starts is None else starts  # placeholder, never read (HAS_MASK=False)
    s_sn, s_sa = (0, 0) if starts is None else starts.stride()
    qk_scale = float(torch.tensor(scale * LOG2E, dtype=torch.float32))
    block_d = padded_head_dim(dim)
    fp32_dot = q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and interpret_mode())
    grid = (runs * m_blocks, batch * heads)
    _KERNEL[grid](
        q, k, v, out, tk, tv, queries, valid, keys, st,
        width, m_blocks, keys.shape[1], union[1], union[2], kernel[0], kernel[1], kernel[2],
        0 if text is None else tk.shape[2], heads, dim, dim_v, qk_scale,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *tk.stride(), *tv.stride(),
        *queries.stride(), *valid.stride(), *keys.stride(), s_sn, s_sa,
        BLOCK_M=block_q, BLOCK_N=block_k, BLOCK_D=block_d, BLOCK_DV=padded_head_dim(dim_v),
        HAS_MASK=starts is not None, HAS_TEXT=text is not None, FP32_DOT=fp32_dot,
        num_warps=4 if block_d <= 64 else 8, num_stages=1 if fp32_dot else 2, enable_fp_fusion=True)
