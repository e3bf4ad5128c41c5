"""8-bit attention (SageAttention-style, Zhang et al., arXiv 2410.02367) on the transformer's self/joint attention.

Every routed attention call -- the whole joint sequence, text tokens included, since attention stays dense -- runs
the Triton kernel of :mod:`dit_accel.kernels.int8_attention`: K smoothed by its token mean, Q and K quantized to
INT8 per block, Q·Kᵀ in INT8, P·V in FP16 (or BF16), FP32 online softmax. Only layers inside the transformer are
routed (dit_accel's interception is scoped to them), never the text encoder or the VAE, whose short sequences and
odd head dims gain nothing and whose outputs feed everything after.

Without CUDA + Triton (a CPU machine, or Triton not installed) the plugin warns once and runs PyTorch SDPA: the
recipe then changes nothing. On CPU under ``TRITON_INTERPRET=1`` the kernel runs in Triton's interpreter (slow;
for tests). Calls the kernel does not cover (attention mask, causal, dropout, grouped heads, head dim > 256, a
backward pass) run dense and are counted in ``fallbacks``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from dit_accel.attention.base import ImageAttentionConfig, ImageAttentionPlugin
from dit_accel.core.attention import AttentionCall, padding_groups, unsupported_options
from dit_accel.core.plugin import register_plugin
from dit_accel.kernels import kernel_usable
from dit_accel.kernels.int8_attention import MAX_HEAD_DIM, int8_attention
from dit_accel.recipe import check_bool, check_choice, register_config

NO_KERNEL = "int8 attention needs CUDA + Triton; running PyTorch SDPA instead"


@register_config("int8")
@dataclass(frozen=True)
class Int8Config(ImageAttentionConfig):
    """8-bit attention.

    Args:
        block_q (`int`, defaults to `128`): query tokens per quantization block and kernel tile. Allowed: 16, 32,
            64, 128, 256 (64 or 128 on a GPU; smaller blocks quantize more finely but run slower).
        block_k (`int`, defaults to `64`): key tokens per quantization block and kernel tile. Allowed: 16, 32, 64,
            128, 256 (64 or 128 on a GPU).
        smooth_k (`bool`, defaults to `True`): subtract the keys' token mean before quantizing (exact, and it keeps
            channel-bias outliers out of the INT8 range; turning it off is only for measurements).
        pv_bf16 (`bool`, defaults to `False`): P·V in BF16 instead of FP16, for models whose values exceed FP16's
            range (|V| > 65504); the accuracy is the same in practice.
        start / end: fractions of the schedule to act on (the whole schedule by default).
    """

    block_q: int = 128
    block_k: int = 64
    smooth_k: bool = True
    pv_bf16: bool = False

    def validate(self) -> None:
        super().validate()
        check_choice(self, "block_q", (16, 32, 64, 128, 256))
        check_choice(self, "block_k", (16, 32, 64, 128, 256))
        check_bool(self, "smooth_k", "pv_bf16")


def int8_unsupported(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, options: dict,
                     keep: torch.Tensor | None = None) -> str | None:
    """Why the 8-bit kernel cannot take this SDPA call, or ``None`` if it can. A mask is served when ``keep``, its
    :func:`~dit_accel.core.attention.key_padding`, was read: each sample's masked keys are left out."""
    reason = unsupported_options(options, key_padding=True)
    if reason is not None:
        return reason
    if options.get("attn_mask") is not None and keep is None:
        return "the attention mask is not a key-padding mask"
    if key.shape[1] != query.shape[1]:
        return "keys have other heads than queries (grouped-query attention)"
    if max(query.shape[-1], value.shape[-1]) > MAX_HEAD_DIM:
        return f"head dim above {MAX_HEAD_DIM}"
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {query.dtype}"
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        return "gradients are needed (the kernel is forward-only)"
    return None


@register_plugin(Int8Config)
class Int8Plugin(ImageAttentionPlugin):
    """Dense attention through the 8-bit kernel; the base class only routes the layers and keeps the fallbacks."""

    def _attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                call: AttentionCall) -> torch.Tensor:
        mask = call.options.get("attn_mask")
        keep = self.key_padding(mask, query.shape[0], key.shape[2]) if mask is not None else None
        reason = int8_unsupported(query, key, value, call.options, keep)
        if reason is None and not kernel_usable(query):
            reason = NO_KERNEL
        if reason is not None:
            self._fallback(reason, call)
            return call.dense(query, key, value)
        config = self.config
        self.acted()
        settings = dict(scale=call.options.get("scale"), block_q=config.block_q, block_k=config.block_k,
                        smooth_k=config.smooth_k, pv_bf16=config.pv_bf16)
        if keep is None:
            return int8_attention(query, key, value, **settings)
        groups = padding_groups(keep)
        if len(groups) == 1:
            kept = groups[0][1]
            return int8_attention(query, key[:, :, kept], value[:, :, kept], **settings)
        out = query.new_empty((*query.shape[:-1], value.shape[-1]))
        for rows, kept in groups:
            out[rows] = int8_attention(query[rows], key[rows][:, :, kept], value[rows][:, :, kept], **settings)
        return out

    def _fallback(self, reason: str, call: AttentionCall) -> None:
        self.fallbacks[reason] += 1
        if reason not in self._warned:
            self._warned.add(reason)
            message = (f"dit_accel int8: {NO_KERNEL}" if reason == NO_KERNEL
                       else f"dit_accel int8: {call.layer.name} runs dense attention: {reason}")
            warnings.warn(message, stacklevel=3)
