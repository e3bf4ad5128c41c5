"""Re-ttention (Chen et al., NeurIPS'25, arXiv 2505.22918): statistical reshape of very sparse attention.

A sparse softmax renormalises over the kept keys ``S_i`` of each query and so overweights them. Dense attention is
``O = r_i * O_sparse + (1 - r_i) * O_out`` with ``r_i = sum_{j in S_i} e^{s_ij} / sum_j e^{s_ij}`` the kept mass.
On a *refresh* step the wrapper computes dense attention (the step's exact output), the kept mass ``r`` and the
residual ``R = O_dense - r * O_sparse``, and caches both per layer, call and CFG branch; on the sparse steps in
between it outputs ``r * O_sparse + R``. With a dense pattern ``r = 1`` and ``R = 0``: exact.

The wrapper works for any :class:`~dit_accel.attention.base.ImageAttentionPlugin` without knowing its pattern: the
plugin's softmax normaliser (its log-sum-exp) is read off a second call with a few extra *shared* keys appended to
the text keys (every plugin attends to text keys exactly) and statistics values in place of the values: a channel
of ones on every real key and a one-hot channel per extra key, so the output holds ``Z_sparse / Z'`` and
``e^{c_m} / Z'``, whose ratio is ``Z_sparse / e^{c_m}`` with a logit ``c_m`` we compute ourselves. Every tensor
keeps its shape (kernels that need equal head dims, and plugins that keep per-call state of the queries and keys,
as svg2's warm-started clusters, see what they always see). The extra keys are tangents of the dense log-sum-exp
(the mean key and the key the mean query expects), so their logits never exceed it and stay within the float range
of the sparse one in all but extreme rows; a row whose normaliser cannot be read (an underflow) keeps ``r = 1``,
i.e. plain residual caching. A plugin whose kernel returns its log-sum-exp may override ``image_attention_lse``.

Refresh steps do dense work and report the call as dense (no stats event), so ``flops_fraction`` stays honest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

# Score elements (batch x heads x queries x keys) per chunk of the dense log-sum-exp: no N x N matrix at once.
_CHUNK_ELEMENTS = 1 << 24
# Extra shared keys of the generic log-sum-exp read-out (one value channel each).
EXTRA_KEYS = 2

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, float]]


# ------------------------------------------------------------------------------------------------- the math
def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where the statistics are computed: float64 stays, everything else goes to float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def attention_scale(query: torch.Tensor, scale: float | None) -> float:
    """SDPA's scale: ``1 / sqrt(head dim)`` unless given."""
    return 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)


def dense_lse(query: torch.Tensor, keys: torch.Tensor, scale: float,
              chunk_elements: int = _CHUNK_ELEMENTS) -> torch.Tensor:
    """``logsumexp_j(scale * q_i . k_j)`` of (B, H, N, D) queries over (B, H, S, D) keys, (B, H, N), in
    :func:`work_dtype`; computed over query chunks so that no (N, S) score matrix is held at once."""
    work = work_dtype(query.dtype)
    batch, heads, length, _ = query.shape
    keys_t = keys.to(work).transpose(-1, -2)
    chunk = max(1, chunk_elements // max(1, batch * heads * keys.shape[2]))
    out = torch.empty(batch, heads, length, dtype=work, device=query.device)
    for first in range(0, length, chunk):
        rows = slice(first, min(first + chunk, length))
        out[:, :, rows] = torch.logsumexp(torch.matmul(query[:, :, rows].to(work), keys_t) * scale, dim=-1)
    return out


def tangent_keys(query: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, H, EXTRA_KEYS, D) keys whose logits ``scale * q . k`` lie below the dense log-sum-exp of every query.

    The log-sum-exp is convex in ``q``: its tangent at ``q0`` (slope ``scale * E_{p(q0)}[k]``) lies below it, and
    a key's logit is that tangent less a constant (the entropy of ``p(q0)``). Tangent points: ``q = 0`` (the mean
    key) and the mean query (the key it expects), so the logits follow the queries' own log-sum-exp.
    """
    work = work_dtype(query.dtype)
    keys_w = keys.to(work)
    mean_query = query.to(work).mean(2, keepdim=True)
    weights = torch.softmax(torch.matmul(mean_query, keys_w.transpose(-1, -2)) * scale, dim=-1)
    return torch.cat([keys_w.mean(2, keepdim=True), torch.matmul(weights, keys_w)], 2)


def extra_key_lse(attend: Attend, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  text_key: torch.Tensor, text_value: torch.Tensor, scale: float | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Output, log-sum-exp and key density of any attention that attends to its shared (text) keys exactly.

    ``attend(query, key, value, text_key, text_value) -> (out, density)`` is called twice with the same queries and
    keys: with :data:`EXTRA_KEYS` extra text keys (:func:`tangent_keys`) and *statistics* values of the same head
    dim in place of the values (channel 0 is one on every real key, channel ``1 + m`` one on extra key ``m``, the
    rest zero; they come out as ``Z_sparse / Z'`` and ``e^{c_m} / Z'``), then as it is. Returns the output
    (B, H, N, Dv) as ``attend`` gave it, the natural log of the softmax normaliser ``log sum_{j kept} e^{s_ij}``
    (B, H, N) in :func:`work_dtype` (``nan`` in rows where the read-out underflowed or the statistics do not sum to
    1, ``-inf`` where the kept mass vanished against the extra keys) and the density of the real call.
    """
    scale = attention_scale(query, scale)
    work = work_dtype(query.dtype)
    batch, heads, length, _ = query.shape
    dim_v = value.shape[-1]
    count = min(EXTRA_KEYS, dim_v - 1)
    if count < 1:  # no room for a statistics channel: the normaliser stays unknown
        out, density = attend(query, key, value, text_key, text_value)
        return out, torch.full((batch, heads, length), float("nan"), dtype=work, device=query.device), density
    keys = torch.cat([key, text_key], 2) if text_key.shape[2] else key
    extra = tangent_keys(query, keys, scale)[:, :, :count].to(key.dtype)
    logits = torch.matmul(query.to(work), extra.to(work).transpose(-1, -2)) * scale  # what attend computes for them
    ones = value.new_zeros(batch, heads, length, dim_v)
    ones[..., 0] = 1
    text_ones = value.new_zeros(batch, heads, text_key.shape[2] + count, dim_v)
    text_ones[:, :, :text_key.shape[2], 0] = 1
    text_ones[:, :, text_key.shape[2]:, 1:1 + count] = torch.eye(count, dtype=value.dtype, device=value.device)
    stats, _ = attend(query, key, ones, torch.cat([text_key, extra], 2), text_ones)
    # The real call last: a plugin that caches something of its output per call keeps the real one.
    out, density = attend(query, key, value, text_key, text_value)
    info = torch.finfo(stats.dtype)
    stats = stats.to(work)
    kept = stats[..., 0]  # Z_sparse / Z'
    # Each row reads its normaliser off its largest (best-conditioned) anchor e^{c_m} / Z'.
    anchor, best = stats[..., 1:1 + count].max(-1)
    logit = logits.gather(-1, best[..., None])[..., 0]
    lse = logit + torch.log(kept) - torch.log(anchor)
    # Below ``tiny`` the output's dtype has lost the anchor's precision; channels that do not sum to 1 are no
    # softmax over the keys given (an attention that adds a cached residual of its own, as window-residual's).
    total = stats[..., :1 + count].sum(-1)
    readable = (anchor >= info.tiny) & ((total - 1).abs() <= max(1e-3, 16 * info.eps))
    return out, torch.where(readable, lse, torch.full_like(lse, float("nan"))), density


def dense_attention_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, text_key: torch.Tensor,
                        text_value: torch.Tensor, scale: float | None = None, exact: bool | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention of the image queries over [image; text] keys (SDPA, as the model computes it) and its
    log-sum-exp (B, H, N). ``exact`` (the default except for half-precision CUDA tensors): :func:`dense_lse` in
    float32. Otherwise the log-sum-exp is read off a second SDPA call (:func:`extra_key_lse`): on tensor cores a
    float32 ``q k^T`` would cost several dense attentions, the fused kernel one."""
    keys = torch.cat([key, text_key], 2) if text_key.shape[2] else key
    values = torch.cat([value, text_value], 2) if text_key.shape[2] else value
    if exact is None:
        exact = not (query.is_cuda and query.dtype in (torch.float16, torch.bfloat16))
    if exact:
        dense = F.scaled_dot_product_attention(query, keys, values, scale=scale)
        return dense, dense_lse(query, keys, attention_scale(query, scale))

    def attend(q, k, v, tk, tv):
        both_k, both_v = (torch.cat([k, tk], 2), torch.cat([v, tv], 2)) if tk.shape[2] else (k, v)
        return F.scaled_dot_product_attention(q, both_k, both_v, scale=scale), 1.0

    dense, lse, _ = extra_key_lse(attend, query, key, value, text_key, text_value, scale)
    return dense, lse


def kept_mass_and_residual(dense: torch.Tensor, sparse: torch.Tensor, lse_dense: torch.Tensor,
                           lse_sparse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r, R)``: the kept mass ``r = e^{lse_sparse - lse_dense}`` (B, H, N, 1; 1 where ``lse_sparse`` is
    ``nan``) and the residual ``R = dense - r * sparse``, in the dtype of ``lse_dense``."""
    work = lse_dense.dtype
    ratio = torch.exp(lse_sparse.to(work) - lse_dense).nan_to_num(nan=1.0)[..., None]
    return ratio, dense.to(work) - ratio * sparse.to(work)


def corrected_output(sparse: torch.Tensor, ratio: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``r * O_sparse + R`` in the dtype of ``sparse``."""
    work = ratio.dtype
    return torch.addcmul(residual.to(work), ratio, sparse.to(work)).to(sparse.dtype)


def drifted(ratio: torch.Tensor, drift: float, steps: int) -> torch.Tensor:
    """The official code's drift: ``r + drift`` per sparse step since the refresh, at most 1 (a kept mass already
    above 1 is left as it is)."""
    if not drift:
        return ratio
    return torch.where(ratio >= 1, ratio, (ratio + drift * steps).clamp(max=1.0))


# ------------------------------------------------------------------------------------------------ the state
@dataclass
class _Slot:
    step: int
    count: int = 0  # active steps seen in this slot, the first one is 0
    refreshed: int = 0  # ``count`` at the last refresh
    ratio: torch.Tensor | None = None
    residual: torch.Tensor | None = None


class RettentionState:
    """The per-layer state of the wrapper: kept mass and residual per (layer, call index, slot, rows).

    Args:
        interval: refresh every ``interval``-th active step of a slot (the first always refreshes; so does a step
            whose shapes, device or dtype differ from the cached ones).
        drift: added to ``r`` per sparse step since the refresh (see :func:`drifted`).
    """

    def __init__(self, interval: int, drift: float = 0.0) -> None:
        self.interval, self.drift = interval, drift
        self.slots: dict[tuple, _Slot] = {}
        self.generation: int | None = None
        self.refreshes = self.sparse_calls = 0  # calls of this generation on refresh / on sparse steps

    def clear(self) -> None:
        self.slots.clear()
        self.generation = None
        self.refreshes = self.sparse_calls = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for slot in self.slots.values()
                   for t in (slot.ratio, slot.residual) if t is not None)

    def _slot(self, layer, call) -> _Slot:
        context = call.context
        if context.generation != self.generation:  # a new generation even if reset() was not called
            self.clear()
            self.generation = context.generation
        key = (layer.name, call.index, context.slot, context.rows)
        slot = self.slots.get(key)
        if slot is None:
            slot = self.slots[key] = _Slot(step=context.step)
        elif slot.step != context.step:
            slot.step, slot.count = context.step, slot.count + 1
        return slot

    def attend(self, plugin, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, text_key: torch.Tensor,
               text_value: torch.Tensor, grid, layer, call) -> tuple[torch.Tensor, float]:
        """``plugin.image_attention`` with Re-ttention: dense on refresh steps (density 1), ``r * O + R`` else."""
        if call.context is None:
            return plugin.image_attention(query, key, value, text_key, text_value, grid, layer, call)
        slot = self._slot(layer, call)
        cached = slot.residual
        due = (cached is None or cached.shape != (*query.shape[:3], value.shape[-1]) or cached.device != query.device
               or cached.dtype != value.dtype or slot.count - slot.refreshed >= self.interval)
        if not due:
            self.sparse_calls += 1
            out, density = plugin.image_attention(query, key, value, text_key, text_value, grid, layer, call)
            if density >= 1.0:  # the plugin kept every key of this call: already exact
                return out, density
            ratio = drifted(slot.ratio, self.drift, slot.count - slot.refreshed)
            return corrected_output(out, ratio, cached), density
        dense, lse_dense = dense_attention_lse(query, key, value, text_key, text_value, call.options.get("scale"))
        sparse, lse_sparse, _ = plugin.image_attention_lse(query, key, value, text_key, text_value, grid, layer, call)
        ratio, residual = kept_mass_and_residual(dense, sparse, lse_dense, lse_sparse)
        slot.ratio, slot.residual, slot.refreshed = ratio, residual.to(value.dtype), slot.count
        self.refreshes += 1
        plugin.target.stats.set_cache_bytes(self.nbytes())
        return dense, 1.0
