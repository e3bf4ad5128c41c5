"""Adapters: the block contracts of the supported diffusers transformers, registered as data.

Each entry says which block lists a transformer runs, what each block returns, which sub-modules are its attention
and MLP sub-layers (and which gate scales them), where joint attention puts the text tokens, and how the token
grid is read from a call. Classes are referenced by name so importing this module never imports model code.

CFG conventions of the pipelines (how the unconditional branch is computed) are listed here too, in
:data:`CFG_CONVENTIONS`; the tracker only uses them to label branches ``cond``/``uncond``, never to find them.
"""

from __future__ import annotations

from typing import Literal

import torch

from dit_accel.core.blocks import (
    BlockContract,
    BlockList,
    MergedOutput,
    ResidualOutput,
    SubLayer,
    TokenGrid,
    TransformerSpec,
    register_transformer,
)

from dit_accel.pipelines import residual_blocks

CFGConvention = Literal["batched-cond-first", "batched-uncond-first", "separate-cond-first"]

CFG_CONVENTIONS: dict[str, CFGConvention] = {
    # One transformer call holds both halves of the batch.
    "DiTPipeline": "batched-cond-first",
    "ZooDiTPipeline": "batched-cond-first",
    "ZooFlowDiTPipeline": "batched-cond-first",
    "PixArtAlphaPipeline": "batched-uncond-first",
    "PixArtSigmaPipeline": "batched-uncond-first",
    "StableDiffusion3Pipeline": "batched-uncond-first",
    "CogVideoXPipeline": "batched-uncond-first",
    "LTXPipeline": "batched-uncond-first",
    # Two transformer calls per step, the conditional one first.
    "FluxPipeline": "separate-cond-first",
    "ZooMMDiTPipeline": "separate-cond-first",
    "WanPipeline": "separate-cond-first",
    "WanImageToVideoPipeline": "separate-cond-first",
    "QwenImagePipeline": "separate-cond-first",
    "HunyuanVideoPipeline": "separate-cond-first",
}


# ------------------------------------------------------------------------------------------- argument readers
def _arg(args: tuple, kwargs: dict, name: str, position: int):
    if name in kwargs:
        return kwargs[name]
    return args[position] if len(args) > position else None


def _patch(transformer: torch.nn.Module) -> tuple[int, int, int]:
    """(temporal, height, width) patch size from the model config."""
    config = transformer.config
    patch = config.patch_size
    if isinstance(patch, (tuple, list)):
        return tuple(int(p) for p in patch)
    temporal = getattr(config, "patch_size_t", None) or 1
    return int(temporal), int(patch), int(patch)


def read_grid_image(transformer, args, kwargs) -> TokenGrid | None:
    """``hidden_states`` of shape (B, C, H, W) patchified by ``config.patch_size`` (DiT, PixArt, SD3)."""
    hidden = _arg(args, kwargs, "hidden_states", 0)
    if hidden is None or hidden.ndim != 4:
        return None
    _, patch_h, patch_w = _patch(transformer)
    return TokenGrid(1, hidden.shape[-2] // patch_h, hidden.shape[-1] // patch_w)


def read_grid_video_cfhw(transformer, args, kwargs) -> TokenGrid | None:
    """``hidden_states`` of shape (B, C, F, H, W) (Wan, HunyuanVideo)."""
    hidden = _arg(args, kwargs, "hidden_states", 0)
    if hidden is None or hidden.ndim != 5:
        return None
    patch_t, patch_h, patch_w = _patch(transformer)
    return TokenGrid(hidden.shape[2] // patch_t, hidden.shape[3] // patch_h, hidden.shape[4] // patch_w)


def read_grid_video_fchw(transformer, args, kwargs) -> TokenGrid | None:
    """``hidden_states`` of shape (B, F, C, H, W) (CogVideoX)."""
    hidden = _arg(args, kwargs, "hidden_states", 0)
    if hidden is None or hidden.ndim != 5:
        return None
    patch_t, patch_h, patch_w = _patch(transformer)
    return TokenGrid(hidden.shape[1] // patch_t, hidden.shape[3] // patch_h, hidden.shape[4] // patch_w)


def read_grid_ltx(transformer, args, kwargs) -> TokenGrid | None:
    """Packed tokens; the latent size comes as ``num_frames``/``height``/``width`` keywords (LTX)."""
    frames, height, width = (kwargs.get(k) for k in ("num_frames", "height", "width"))
    if None in (frames, height, width):
        return None
    patch_t, patch_h, patch_w = _patch(transformer)
    return TokenGrid(int(frames) // patch_t, int(height) // patch_h, int(width) // patch_w)


def read_grid_from_ids(transformer, args, kwargs) -> TokenGrid | None:
    """Packed tokens with (frame, row, column) ids per token (Flux ``img_ids``)."""
    ids = kwargs.get("img_ids")
    hidden = _arg(args, kwargs, "hidden_states", 0)
    if ids is None or hidden is None:
        return None
    if ids.ndim == 3:  # deprecated batched ids
        ids = ids[0]
    frames, height, width = (int(v) + 1 for v in ids.amax(dim=0).tolist())
    grid = TokenGrid(frames, height, width)
    return grid if grid.num_tokens == hidden.shape[1] else None


def read_grid_qwen(transformer, args, kwargs) -> TokenGrid | None:
    """``img_shapes``: per sample, a list of (frames, height, width) in patches (Qwen-Image)."""
    shapes = kwargs.get("img_shapes")
    if not shapes:
        return None
    first = shapes[0]
    if isinstance(first, list):
        if len(first) != 1:
            return None
        first = first[0]
    return TokenGrid(*(int(v) for v in first))


def read_text_length(transformer, args, kwargs) -> int:
    encoder = kwargs.get("encoder_hidden_states")
    return 0 if encoder is None else int(encoder.shape[1])


def read_image_context_length(transformer, args, kwargs) -> int:
    """Wan 2.1 I2V/FLF2V: CLIP image tokens, prepended to the text as keys of the cross attention."""
    image = kwargs.get("encoder_hidden_states_image")
    return 0 if image is None else int(image.shape[1])


def no_text(transformer, args, kwargs) -> int:
    return 0


# ----------------------------------------------------------------------------------------------- sub-layers
def _attn(name: str, kind: str, gate: str | None = None, stream: str = "image") -> SubLayer:
    return SubLayer(name=name, role="attention", kind=kind, gate=gate, stream=stream if kind != "joint" else "joint")


def _mlp(name: str, gate: str | None = None, stream: str = "image") -> SubLayer:
    return SubLayer(name=name, role="mlp", gate=gate, stream=stream)


BASIC_BLOCK = BlockContract(  # DiT (ada_norm_zero gates) and PixArt (adaLN-single scale_shift_table gates)
    block_class="BasicTransformerBlock",
    returns="h",
    sublayers=(
        _attn("attn1", "self", gate="gate_msa"),
        _attn("attn2", "cross"),
        _mlp("ff", gate="gate_mlp"),
    ),
    residual=ResidualOutput(residual_blocks.basic_block),
)

SD3_BLOCK = BlockContract(
    block_class="JointTransformerBlock",
    returns="e_h",
    encoder_may_be_none=True,  # the last block is context_pre_only and returns (None, hidden)
    sublayers=(
        _attn("attn", "joint", gate="norm1.gate_msa / norm1_context.c_gate_msa"),
        _attn("attn2", "self", gate="norm1.gate_msa2"),  # SD3.5 dual attention only
        _mlp("ff", gate="norm1.gate_mlp"),
        _mlp("ff_context", gate="norm1_context.c_gate_mlp", stream="text"),
    ),
    residual=ResidualOutput(residual_blocks.joint_block),
)

FLUX_DOUBLE_BLOCK = BlockContract(
    block_class="FluxTransformerBlock",
    returns="e_h",
    sublayers=(
        _attn("attn", "joint", gate="norm1.gate_msa / norm1_context.c_gate_msa"),
        _mlp("ff", gate="norm1.gate_mlp"),
        _mlp("ff_context", gate="norm1_context.c_gate_mlp", stream="text"),
    ),
    residual=ResidualOutput(residual_blocks.flux_double_block),
)

def _single_stream_from_merged(text_first: bool):
    """A single-stream block's output from its cached ``proj_out`` output: ``residual + gate * merged``, with the
    gate of its ``AdaLayerNormZeroSingle`` computed fresh from ``temb`` (what the block computes, less the norm of
    the tokens, both sub-layers, the activation and the projection)."""

    def apply(block: torch.nn.Module, arguments: dict, merged: torch.Tensor):
        hidden, encoder, temb = arguments["hidden_states"], arguments["encoder_hidden_states"], arguments["temb"]
        gate = block.norm.linear(block.norm.silu(temb)).chunk(3, dim=1)[2]
        joint = torch.cat([encoder, hidden] if text_first else [hidden, encoder], dim=1)
        out = joint + gate.unsqueeze(1) * merged
        if out.dtype == torch.float16:
            out = out.clip(-65504, 65504)
        text = encoder.shape[1]
        return (out[:, :text], out[:, text:]) if text_first else (out[:, :-text], out[:, -text:])

    return apply


FLUX_SINGLE_BLOCK = BlockContract(
    block_class="FluxSingleTransformerBlock",
    returns="e_h",
    sublayers=(
        _attn("attn", "joint", gate="norm.gate (after proj_out)"),
        _mlp("proj_mlp", gate="norm.gate (after proj_out)", stream="joint"),
    ),
    merged=MergedOutput("proj_out", _single_stream_from_merged(text_first=True)),
)

WAN_BLOCK = BlockContract(
    block_class="WanTransformerBlock",
    returns="h",
    encoder_arg="encoder_hidden_states",
    sublayers=(
        _attn("attn1", "self", gate="scale_shift_table gate_msa"),
        _attn("attn2", "cross"),
        _mlp("ffn", gate="scale_shift_table c_gate_msa"),
    ),
    residual=ResidualOutput(residual_blocks.wan_block),
)

HUNYUAN_DOUBLE_BLOCK = BlockContract(
    block_class="HunyuanVideoTransformerBlock",
    returns="h_e",
    sublayers=(
        _attn("attn", "joint", gate="norm1.gate_msa / norm1_context.c_gate_msa"),
        _mlp("ff", gate="norm1.gate_mlp"),
        _mlp("ff_context", gate="norm1_context.c_gate_mlp", stream="text"),
    ),
    residual=ResidualOutput(residual_blocks.hunyuan_double_block),
)

HUNYUAN_SINGLE_BLOCK = BlockContract(
    block_class="HunyuanVideoSingleTransformerBlock",
    returns="h_e",
    sublayers=(
        _attn("attn", "joint", gate="norm.gate (after proj_out)"),
        _mlp("proj_mlp", gate="norm.gate (after proj_out)", stream="joint"),
    ),
    merged=MergedOutput("proj_out", _single_stream_from_merged(text_first=False)),
)

COGVIDEOX_BLOCK = BlockContract(
    block_class="CogVideoXBlock",
    returns="h_e",
    sublayers=(
        _attn("attn1", "joint", gate="norm1 gate / enc_gate"),
        _mlp("ff", gate="norm2 gate / enc_gate", stream="joint"),
    ),
    residual=ResidualOutput(residual_blocks.cogvideox_block),
)

LTX_BLOCK = BlockContract(
    block_class="LTXVideoTransformerBlock",
    returns="h",
    sublayers=(
        _attn("attn1", "self", gate="scale_shift_table gate_msa"),
        _attn("attn2", "cross"),
        _mlp("ff", gate="scale_shift_table gate_mlp"),
    ),
    residual=ResidualOutput(residual_blocks.ltx_block),
)

QWEN_BLOCK = BlockContract(
    block_class="QwenImageTransformerBlock",
    returns="e_h",
    sublayers=(
        _attn("attn", "joint", gate="img_mod / txt_mod gate1"),
        _mlp("img_mlp", gate="img_mod gate2"),
        _mlp("txt_mlp", gate="txt_mod gate2", stream="text"),
    ),
    residual=ResidualOutput(residual_blocks.qwen_image_block),
)


# Every diffusers pipeline of a family runs CFG the same way (the variants copy the base pipeline's loop).
FAMILY_CFG_CONVENTIONS: dict[str, CFGConvention] = {
    "dit": "batched-cond-first",
    "pixart": "batched-uncond-first",
    "sd3": "batched-uncond-first",
    "cogvideox": "batched-uncond-first",
    "ltx": "batched-uncond-first",
    "flux": "separate-cond-first",
    "wan": "separate-cond-first",
    "qwen-image": "separate-cond-first",
    "hunyuan-video": "separate-cond-first",
}


def cfg_convention_for(pipe, spec: TransformerSpec) -> CFGConvention | None:
    """The CFG convention of ``pipe`` driving a transformer of ``spec``: its class (or a base class) in
    :data:`CFG_CONVENTIONS`, else its transformer family's (``spec.cfg_convention``)."""
    for cls in type(pipe).__mro__:
        if cls.__name__ in CFG_CONVENTIONS:
            return CFG_CONVENTIONS[cls.__name__]
    return spec.cfg_convention


# The forward arguments with one entry per sample row, by family (what a call on some rows cuts).
ROW_ARGS: dict[str, tuple[str, ...]] = {
    "dit": ("hidden_states", "timestep", "class_labels"),
    "pixart": ("hidden_states", "encoder_hidden_states", "timestep", "added_cond_kwargs", "attention_mask",
               "encoder_attention_mask"),
    "sd3": ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep",
            "block_controlnet_hidden_states"),
    "flux": ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance",
             "controlnet_block_samples", "controlnet_single_block_samples"),
    "wan": ("hidden_states", "encoder_hidden_states", "timestep", "encoder_hidden_states_image"),
    "hunyuan-video": ("hidden_states", "encoder_hidden_states", "encoder_attention_mask", "pooled_projections",
                      "timestep", "guidance"),
    "cogvideox": ("hidden_states", "encoder_hidden_states", "timestep", "timestep_cond", "ofs"),
    "ltx": ("hidden_states", "encoder_hidden_states", "timestep", "encoder_attention_mask", "video_coords"),
    "qwen-image": ("hidden_states", "encoder_hidden_states", "encoder_hidden_states_mask", "timestep", "guidance"),
}


def _register(family, cls, lists, read_grid, read_text=read_text_length, text_position=None, notes="",
              read_image_context=None):
    register_transformer(
        TransformerSpec(
            family=family,
            transformer_class=cls,
            block_lists=tuple(BlockList(attr, contract) for attr, contract in lists),
            read_grid=read_grid,
            read_text_length=read_text,
            text_position=text_position,
            notes=notes,
            cfg_convention=FAMILY_CFG_CONVENTIONS[family],
            read_image_context_length=read_image_context,
            row_args=ROW_ARGS[family],
        )
    )


_register("dit", "DiTTransformer2DModel", [("transformer_blocks", BASIC_BLOCK)], read_grid_image, no_text,
          notes="class-conditional; CFG batched, cond half first")
_register("pixart", "PixArtTransformer2DModel", [("transformer_blocks", BASIC_BLOCK)], read_grid_image,
          notes="PixArt-alpha and -sigma; text through cross attention; CFG batched")
_register("sd3", "SD3Transformer2DModel", [("transformer_blocks", SD3_BLOCK)], read_grid_image,
          text_position="last", notes="SD3 and SD3.5 (MMDiT); image tokens first in joint attention")
_register("flux", "FluxTransformer2DModel",
          [("transformer_blocks", FLUX_DOUBLE_BLOCK), ("single_transformer_blocks", FLUX_SINGLE_BLOCK)],
          read_grid_from_ids, text_position="first", notes="FLUX.1; text tokens first; true CFG as separate calls")
_register("wan", "WanTransformer3DModel", [("blocks", WAN_BLOCK)], read_grid_video_cfhw,
          notes="Wan 2.1/2.2 (T2V, I2V); text (and I2V image tokens) through cross attention; CFG as separate calls",
          read_image_context=read_image_context_length)
_register("hunyuan-video", "HunyuanVideoTransformer3DModel",
          [("transformer_blocks", HUNYUAN_DOUBLE_BLOCK), ("single_transformer_blocks", HUNYUAN_SINGLE_BLOCK)],
          read_grid_video_cfhw, text_position="last", notes="image tokens first in joint attention")
_register("cogvideox", "CogVideoXTransformer3DModel", [("transformer_blocks", COGVIDEOX_BLOCK)],
          read_grid_video_fchw, text_position="first", notes="text tokens first in joint attention")
_register("ltx", "LTXVideoTransformer3DModel", [("transformer_blocks", LTX_BLOCK)], read_grid_ltx,
          notes="text through cross attention")
_register("qwen-image", "QwenImageTransformer2DModel", [("transformer_blocks", QWEN_BLOCK)], read_grid_qwen,
          text_position="first", notes="text tokens first in joint attention")
