"""8-bit attention (SageAttention-style): INT8 Q·Kᵀ with per-block scales, FP16/BF16 P·V, FP32 online softmax.

The math, shared exactly by the Triton kernel and :func:`int8_attention_reference`:

1. **Smooth K**: subtract the mean of K over its tokens, per (batch, head, channel), in FP32. Softmax is invariant
   to a per-query constant and ``q·(k - k̄) = q·k - q·k̄``, so this is exact, and it removes the channel-wise bias
   that would otherwise eat K's INT8 range (DiT keys have such outlier channels).
2. **Fold the softmax scale**: ``Q' = Q · scale · log2(e)`` (FP32) before quantizing, so scores come out in the
   log2 domain and the softmax uses ``exp2``.
3. **Per-block symmetric INT8**: Q in blocks of ``block_q`` tokens, K in blocks of ``block_k`` tokens, one FP32
   scale per block and (batch, head): ``δ = max|x| / 127``, ``x_int8 = trunc(x · (127 / max|x|) ± 0.5)`` (round
   half away from zero; an all-zero block gets ``δ = 0`` and zeros, never NaN). Both divisions are IEEE
   round-to-nearest (``tl.math.div_rn`` in the kernel), so kernel and reference produce identical INT8 tensors.
   Quantization is a small Triton kernel (one read of Q/K, one INT8 write) so that it adds little memory
   traffic on the GPU; the K mean is one ``torch.mean``.
4. **Scores**: ``S = (Q_int8 · K_int8ᵀ)`` with INT32 accumulation, times ``δ_Q · δ_K`` (FP32). Keys past the
   sequence end get ``-inf``.
5. **Online softmax over key blocks** in FP32 with ``exp2``: ``m' = max(m, rowmax S)``, ``P = 2^(S - m')``,
   ``l = l · 2^(m - m') + rowsum P``, ``acc = acc · 2^(m - m') + P_lp · V_lp`` where ``P_lp``/``V_lp`` are P and V
   rounded to FP16 and the block product is accumulated in FP32 and added to the FP32 accumulator. ``O = acc / l``.
   FP16 for every input dtype, as SageAttention's Triton path: P lies in [0, 1], FP16 has 3 more mantissa bits
   than BF16, and BF16 V converts exactly unless ``|V| > 65504``. ``pv_bf16=True`` keeps P·V in BF16 for values
   beyond FP16's range; the accuracy difference is negligible next to the INT8 Q·Kᵀ error (DiT-like inputs,
   D = 128, S = 1024: cosine 0.999591 vs 0.999589).

Shapes: ``layout="HND"`` is (B, H, S, D) like SDPA, ``"NHD"`` is (B, S, H, D) like diffusers' dispatch / flash-attn.
Query and key lengths may differ and need not be multiples of the blocks (tails are masked). Head dims 64 and 128
are native; any other D up to 256 is zero-padded to the next of 64, 128, 256 inside the kernel's masked loads (zero
channels change no dot product; the default scale stays ``1/sqrt(D)`` of the real D). V may have its own head dim.
Inputs are never modified. Forward only (no autograd). No attention mask, no causal mode, no GQA.
"""

from __future__ import annotations

import math

import torch

from dit_accel.kernels import ops as _ops  # noqa: F401  (registers torch.ops.dit_accel.*)

LOG2E = 1.4426950408889634
LAYOUTS = ("HND", "NHD")
MAX_HEAD_DIM = 256


def padded_head_dim(dim: int) -> int:
    """The head dim the kernel computes with: 64 for D <= 64, 128 for D <= 128, 256 for D <= 256."""
    for native in (64, 128, 256):
        if dim <= native:
            return native
    raise ValueError(f"head dim {dim} is not supported by the 8-bit attention kernel (at most {MAX_HEAD_DIM})")


def to_hnd(x: torch.Tensor, layout: str) -> torch.Tensor:
    """A (B, H, S, D) view of ``x`` in ``layout`` (no copy)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not allowed; allowed: 'HND' (B, H, S, D) or 'NHD' (B, S, H, D)")
    if x.ndim != 4:
        raise ValueError(f"expected a 4-D (B, H, S, D) or (B, S, H, D) tensor, got shape {tuple(x.shape)}")
    return x if layout == "HND" else x.transpose(1, 2)


def softmax_multiplier(scale: float | None, dim: int) -> float:
    """``scale · log2(e)`` rounded to FP32 (what the kernel receives), ``scale = 1/sqrt(dim)`` if ``None``."""
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    return float(torch.tensor(scale * LOG2E, dtype=torch.float32))


def pv_dtype(pv_bf16: bool) -> torch.dtype:
    """The dtype of P and V in the P·V product: FP16, or BF16 with ``pv_bf16``."""
    return torch.bfloat16 if pv_bf16 else torch.float16


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str, block_q: int, block_k: int) -> None:
    """Raise ``ValueError`` for shapes or settings the kernel does not handle (message says what is allowed)."""
    qh, kh, vh = to_hnd(q, layout), to_hnd(k, layout), to_hnd(v, layout)
    if qh.shape[:2] != kh.shape[:2] or kh.shape[:3] != vh.shape[:3] or qh.shape[3] != kh.shape[3]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match in layout "
                         f"{layout} (same batch and heads; k and v the same length; q and k the same head dim)")
    if qh.shape[2] == 0 or kh.shape[2] == 0:
        raise ValueError("8-bit attention needs at least one query and one key")
    padded_head_dim(qh.shape[3])
    padded_head_dim(vh.shape[3])
    for name, block in (("block_q", block_q), ("block_k", block_k)):
        if block not in (16, 32, 64, 128, 256):
            raise ValueError(f"{name} = {block} is not allowed; allowed: 16, 32, 64, 128, 256")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q, k, v must share one dtype among float16, bfloat16, float32; got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")


def key_mean(k_hnd: torch.Tensor) -> torch.Tensor:
    """(B, H, D) FP32 mean of the keys over their tokens: the smoothing offset (accumulated in FP32 without an FP32
    copy of K; kernel and reference share this function, so they subtract the same offset)."""
    return k_hnd.mean(2, dtype=torch.float32)


def quantize_per_block(x: torch.Tensor, block: int, *, multiplier: float = 1.0,
                       mean: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference per-block INT8 quantization of a (B, H, S, D) tensor, exactly as the Triton quantization kernel.

    Args:
        x: (B, H, S, D) in any float dtype (read as FP32).
        block: tokens per block (``block_q`` for Q, ``block_k`` for K).
        multiplier: FP32 factor applied before quantizing (``scale · log2e`` for Q, 1 for K).
        mean: (B, H, D) FP32 offset subtracted first (the K mean), or ``None``.

    Returns:
        ``(x_int8, scales)``: (B, H, ceil(S / block) · block, Dp) int8, zero in padded tokens and channels
        (Dp = :func:`padded_head_dim`), and (B, H, ceil(S / block)) FP32 scales with ``x ≈ x_int8 · scale``.
    """
    batch, heads, length, dim = x.shape
    blocks = -(-length // block)
    xf = x.float()
    if mean is not None:
        xf = xf - mean[:, :, None, :]
    xf = xf * multiplier
    xf = torch.nn.functional.pad(xf, (0, padded_head_dim(dim) - dim, 0, blocks * block - length))
    tiles = xf.view(batch, heads, blocks, block, -1)
    amax = tiles.abs().amax((3, 4))
    # Tensor-by-tensor divisions: torch turns ``scalar / t`` into ``t.reciprocal() * scalar`` (and may do the same
    # for ``t / scalar``), which rounds differently from the kernel's IEEE division.
    full = torch.full_like(amax, 127.0)
    scales = amax / full
    inverse = torch.where(amax > 0, full / amax.clamp(min=1e-30), torch.zeros_like(amax))  # clamp as the kernel
    y = tiles * inverse[..., None, None]
    y = y + torch.where(y >= 0, 0.5, -0.5)
    return torch.trunc(y).to(torch.int8).view(batch, heads, blocks * block, -1), scales


def int8_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                             layout: str = "HND", block_q: int = 128, block_k: int = 64,
                             smooth_k: bool = True, pv_bf16: bool = False) -> torch.Tensor:
    """Pure PyTorch 8-bit attention with exactly the kernel's math (see the module docstring).

    Same smoothing, same per-block scales and INT8 rounding (:func:`quantize_per_block`); the INT32 dot product is
    computed exactly in float64 (|sum| < 127² · 256 < 2²⁴, so also exact once converted to FP32); the softmax is
    the same block-by-block online softmax with ``exp2``, P rounded to the P·V dtype per key block as the kernel
    does. Only the FP32 summation order of P·V and the GPU's approximate ``exp2`` differ from the kernel.

    Args:
        q, k, v: (B, H, S, D) for ``layout="HND"``, (B, S, H, D) for ``"NHD"``; float16, bfloat16 or float32.
        scale (`float`, defaults to `None`): softmax scale, ``1/sqrt(D)`` if ``None``.
        block_q (`int`, defaults to `128`) / block_k (`int`, defaults to `64`): quantization and kernel block
            sizes in tokens. Allowed: 16, 32, 64, 128, 256.
        smooth_k (`bool`, defaults to `True`): subtract the K mean before quantizing.
        pv_bf16 (`bool`, defaults to `False`): P·V in BF16 instead of FP16 (for V beyond FP16's range).

    Returns:
        The attention output in ``layout``, dtype of ``q``.
    """
    check_inputs(q, k, v, layout, block_q, block_k)
    qh, kh, vh = to_hnd(q, layout), to_hnd(k, layout), to_hnd(v, layout)
    q_len, k_len = qh.shape[2], kh.shape[2]
    q8, q_scales = quantize_per_block(qh, block_q, multiplier=softmax_multiplier(scale, qh.shape[3]))
    k8, k_scales = quantize_per_block(kh, block_k, mean=key_mean(kh) if smooth_k else None)
    low = pv_dtype(pv_bf16)
    v_pad = torch.nn.functional.pad(vh.to(low).float(), (0, 0, 0, k8.shape[2] - k_len))
    q_rows = q8.double()
    row_scales = q_scales.repeat_interleave(block_q, -1)[..., None]  # each query row's block scale
    m = torch.full(q8.shape[:3], -math.inf, device=q.device)
    total = torch.zeros_like(m)
    acc = torch.zeros(*q8.shape[:3], vh.shape[3], device=q.device)
    for j in range(k_scales.shape[-1]):
        cols = slice(j * block_k, (j + 1) * block_k)
        dot = (q_rows @ k8[:, :, cols].double().transpose(-1, -2)).float()
        s = dot * (row_scales * k_scales[:, :, j, None, None])
        beyond = torch.arange(j * block_k, (j + 1) * block_k, device=q.device) >= k_len
        s = s.masked_fill(beyond, -math.inf)
        m_new = torch.maximum(m, s.amax(-1))
        p = torch.exp2(s - m_new[..., None])
        alpha = torch.exp2(m - m_new)
        total = total * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + p.to(low).float() @ v_pad[:, :, cols]
        m = m_new
    out = (acc / total[..., None])[:, :, :q_len].to(q.dtype)
    return out if layout == "HND" else out.transpose(1, 2)


def int8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                   layout: str = "HND", block_q: int = 128, block_k: int = 64, smooth_k: bool = True,
                   pv_bf16: bool = False) -> torch.Tensor:
    """8-bit attention with the Triton kernel (arguments as :func:`int8_attention_reference`).

    Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``. Goes through the custom op
    ``torch.ops.dit_accel.int8_attention`` so that ``torch.compile`` traces it as one opaque call.
    """
    check_inputs(q, k, v, layout, block_q, block_k)
    return torch.ops.dit_accel.int8_attention(q, k, v, scale, layout, block_q, block_k, smooth_k, pv_bf16)


def int8_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, layout: str,
                          block_q: int, block_k: int, smooth_k: bool, pv_bf16: bool) -> torch.Tensor:
    """The custom op's implementation: quantize (Triton), then the attention kernel (Triton)."""
    from dit_accel.kernels import _triton_int8

    qh, kh, vh = to_hnd(q, layout), to_hnd(k, layout), to_hnd(v, layout)
    multiplier = softmax_multiplier(scale, qh.shape[3])
    q8, q_scales = _triton_int8.quantize(qh, block_q, multiplier, None)
    k8, k_scales = _triton_int8.quantize(kh, block_k, 1.0, key_mean(kh) if smooth_k else None)
    out = torch.empty(*q.shape[:3], v.shape[3], dtype=q.dtype, device=q.device)
    _triton_int8.attention(q8, q_scales, k8, k_scales, vh, to_hnd(out, layout), k_len=kh.shape[2],
                           block_q=block_q, block_k=block_k, pv_bf16=pv_bf16)
    return out
