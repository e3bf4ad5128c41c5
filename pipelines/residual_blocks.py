"""Block outputs when every sub-layer is served from a cache (:class:`~dit_accel.core.blocks.ResidualOutput`):
DiT/PixArt, SD3, Flux (dual-stream), Wan, CogVideoX, LTX-Video, Qwen-Image and HunyuanVideo (dual-stream) blocks.

The blocks below add each sub-layer's gated output to their residual stream in turn, and a sub-layer cache serves
outputs that do not depend on the sub-layers' inputs. So when all of a block's sub-layers are served, the block's
output is its input plus the served outputs under the gates of the current timestep: the layer norms and
modulations that would only feed the sub-layers are skipped. Each function repeats its block's residual lines
exactly (same operations, same order, same dtypes), so the output is bit-identical to the block's own forward with
the same served outputs; it returns ``None`` for a configuration it does not cover, and the block then runs.
"""

from __future__ import annotations

from typing import Any

import torch


def _zero_chunks(norm: torch.nn.Module, temb: torch.Tensor, count: int = 6) -> tuple[torch.Tensor, ...]:
    """The modulation vectors of an ``AdaLayerNormZero``-style norm given its embedding (``emb=temb``)."""
    return norm.linear(norm.silu(temb)).chunk(count, dim=1)


def basic_block(block: torch.nn.Module, arguments: dict, served: dict[str, Any]) -> torch.Tensor | None:
    """``BasicTransformerBlock`` with ``ada_norm_zero`` (DiT) or ``ada_norm_single`` (PixArt) gates."""
    kwargs = arguments.get("cross_attention_kwargs") or {}
    if (block.norm_type not in ("ada_norm_zero", "ada_norm_single") or block.pos_embed is not None
            or kwargs.get("gligen") is not None or (block.attn2 is None) != ("attn2" not in served)):
        return None
    hidden = arguments["hidden_states"]
    timestep = arguments.get("timestep")
    if block.norm_type == "ada_norm_zero":
        emb = block.norm1.emb(timestep, arguments.get("class_labels"), hidden_dtype=hidden.dtype)
        _, _, gate_msa, _, _, gate_mlp = _zero_chunks(block.norm1, emb)
        attn_output = gate_msa.unsqueeze(1) * served["attn1"]
    else:
        _, _, gate_msa, _, _, gate_mlp = (block.scale_shift_table[None]
                                          + timestep.reshape(hidden.shape[0], 6, -1)).chunk(6, dim=1)
        attn_output = gate_msa * served["attn1"]
    hidden = attn_output + hidden
    if hidden.ndim == 4:
        hidden = hidden.squeeze(1)
    if block.attn2 is not None:
        hidden = served["attn2"] + hidden
    ff_output = (gate_mlp.unsqueeze(1) if block.norm_type == "ada_norm_zero" else gate_mlp) * served["ff"]
    hidden = ff_output + hidden
    if hidden.ndim == 4:
        hidden = hidden.squeeze(1)
    return hidden


def joint_block(block: torch.nn.Module, arguments: dict, served: dict[str, Any]) -> tuple | None:
    """SD3's ``JointTransformerBlock`` (SD3.5's dual attention too); returns ``(encoder, hidden)``."""
    hidden, encoder, temb = arguments["hidden_states"], arguments["encoder_hidden_states"], arguments["temb"]
    if block.use_dual_attention != ("attn2" in served) or (not block.context_pre_only) != ("ff_context" in served):
        return None
    chunks = _zero_chunks(block.norm1, temb, 9 if block.use_dual_attention else 6)
    gate_msa, gate_mlp = chunks[2], chunks[5]
    attn_output, context_attn_output = served["attn"]
    hidden = hidden + gate_msa.unsqueeze(1) * attn_output
    if block.use_dual_attention:
        hidden = hidden + chunks[8].unsqueeze(1) * served["attn2"]
    hidden = hidden + gate_mlp.unsqueeze(1) * served["ff"]
    if block.context_pre_only:
        return None, hidden
    context = _zero_chunks(block.norm1_context, temb)
    encoder = encoder + context[2].unsqueeze(1) * context_attn_output
    encoder = encoder + context[5].unsqueeze(1) * served["ff_context"]
    return encoder, hidden


def wan_block(block: torch.nn.Module, arguments: dict, served: dict[str, Any]) -> torch.Tensor:
    """``WanTransformerBlock`` (Wan 2.1 / 2.2, per-token ``temb`` of Wan 2.2 TI2V included)."""
    hidden, temb = arguments["hidden_states"], arguments["temb"]
    if temb.ndim == 4:
        chunks = [c.squeeze(2) for c in (block.scale_shift_table.unsqueeze(0) + temb.float()).chunk(6, dim=2)]
    else:
        chunks = (block.scale_shift_table + temb.float()).chunk(6, dim=1)
    gate_msa, c_gate_msa = chunks[2], chunks[5]
    hidden = (hidden.float() + served["attn1"] * gate_msa).type_as(hidden)
    hidden = hidden + served["attn2"]
    return (hidden.float() + served["ffn"].float() * c_gate_msa).type_as(hidden)


def flux_double_block(block: torch.nn.Module, arguments: dict, served: dict[str, Any]) -> tuple:
    """Flux's dual-stream ``FluxTransformerBlock`` (an IP-adapter's third attention output too); returns
    ``(encoder, hidden)``."""
    hidden, encoder, temb = arguments["hidden_states"], arguments["encoder_hidden_states"], arguments["temb"]
    chunks, context = _zero_chunks(block.norm1, temb), _zero_chunks(block.norm1_context, temb)
    attention = served["attn"]
    hidden = hidden + chunks[2].unsqueeze(1) * attention[0]
    hidden = hidden + chunks[5].unsqueeze(1) * served["ff"]
    if len(attention) == 3:
        hidden = hidden + attention[2]
    encoder = encoder + context[2].unsqueeze(1) * attention[1]
    encoder = encoder + context[5].unsqueeze(1) * served["ff_context"]
    if encoder.dtype == torch.float16:
        encoder = encoder.clip(-65504, 65504)
    return encoder, hidden


def cogvideox_block(block: torch.nn.Module, arguments: dict, served: dict[str, Any]) -> tuple:
    """``CogVideoXBlock``; returns ``(hidden, encoder)`` (text first in its joint MLP)."""
    hidden, encoder, temb = arguments["hidden_states"], arguments["encoder_hidden_states"], arguments["temb"]
    text = encoder.size(1)
    first, second = _zero_chunks(block.norm1, temb), _zero_chunks(block.norm2, temb)
    attn_hidden, attn_encoder = served["attn1"]
    hidden = hidden + first[2][:, None, :] * attn_hidden
    encoder = encoder + first[5][:, None, :] * attn_encoder
    ff_output = served["ff"]
    hidden = hidden + second[2][:, None, :] * ff_output[:, text:]
    encoder = encoder + second[5][:, None, :] * ff_output[:, :text]
    return hidden, encoder


def ltx_block(block: torch.nn.Module, arguments: dict, served: dict[str, Any]) -> torch.Tensor:
    """``LTXVideoTransformerBlock`` (per-token ``temb``)."""
    hidden, temb = arguments["hidden_states"], arguments["temb"]
    count = block.scale_shift_table.shape[0]
    ada = block.scale_shift_table[None, None].to(temb.device) + temb.reshape(hidden.size(0), temb.size(1), count, -1)
    _, _, gate_msa, _, _, gate_mlp = ada.unbind(dim=2)
    hidden = hidden + served["attn1"] * gate_msa
    hidden = hidden + served["attn2"]
    return hidden + served["ff"] * gate_mlp


def qwen_image_block(block: torch.nn.Module, arguments: dict, served: dict[str, Any]) -> tuple | None:
    """``QwenImageTransformerBlock`` without a ``modulate_index`` (Qwen-Image-Edit's per-token modulation runs the
    block); returns ``(encoder, hidden)``."""
    if arguments.get("modulate_index") is not None:
        return None
    hidden, encoder, temb = arguments["hidden_states"], arguments["encoder_hidden_states"], arguments["temb"]
    image = block.img_mod(temb)
    if getattr(block, "zero_cond_t", False):
        temb = torch.chunk(temb, 2, dim=0)[0]
    text = block.txt_mod(temb)
    (image1, image2), (text1, text2) = image.chunk(2, dim=-1), text.chunk(2, dim=-1)
    image_attention, text_attention = served["attn"]
    hidden = hidden + image1.chunk(3, dim=-1)[2].unsqueeze(1) * image_attention
    encoder = encoder + text1.chunk(3, dim=-1)[2].unsqueeze(1) * text_attention
    hidden = hidden + image2.chunk(3, dim=-1)[2].unsqueeze(1) * served["img_mlp"]
    encoder = encoder + text2.chunk(3, dim=-1)[2].unsqueeze(1) * served["txt_mlp"]
    if encoder.dtype == torch.float16:
        encoder = encoder.clip(-65504, 65504)
    if hidden.dtype == torch.float16:
        hidden = hidden.clip(-65504, 65504)
    return encoder, hidden


def hunyuan_double_block(block: torch.nn.Module, arguments: dict, served: dict[str, Any]) -> tuple:
    """HunyuanVideo's dual-stream ``HunyuanVideoTransformerBlock``; returns ``(hidden, encoder)``."""
    hidden, encoder, temb = arguments["hidden_states"], arguments["encoder_hidden_states"], arguments["temb"]
    chunks, context = _zero_chunks(block.norm1, temb), _zero_chunks(block.norm1_context, temb)
    attn_output, context_attn_output = served["attn"]
    hidden = hidden + attn_output * chunks[2].unsqueeze(1)
    encoder = encoder + context_attn_output * context[2].unsqueeze(1)
    hidden = hidden + chunks[5].unsqueeze(1) * served["ff"]
    encoder = encoder + context[5].unsqueeze(1) * served["ff_context"]
    return hidden, encoder
