"""Tiny offline builders for the pipelines whose text encoder is a decoder language model: Qwen-Image
(Qwen2.5-VL) and HunyuanVideo (Llama plus CLIP). Part of :mod:`dit_accel.pipelines.tiny`, which registers them;
kept apart because their encoders and tokenizers share nothing with the CLIP/T5 ones there.

CFG conventions (diffusers 0.42.1): both run ``true_cfg_scale > 1`` with a negative prompt as two transformer
calls per step, cond first (``cache_context("cond")``) then uncond (``cache_context("uncond")``).
HunyuanVideo's ``guidance_scale`` feeds its guidance embedding (a distilled model), not CFG.
"""

from __future__ import annotations

import string
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover - typing only
    from diffusers import DiffusionPipeline
    from transformers import LlamaTokenizer, Qwen2Tokenizer

# Qwen-Image's prompt template wraps the prompt in these chat markers.
_QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_QWEN_VOCAB_SIZE = 300  # 256 byte tokens + the special ones + the three vision ids the config requires

# HunyuanVideo's Llama prompt template, reduced to the prompt itself: with our 300-token vocabulary the real
# template (95 tokens cropped off) would only make the text encoder slower.
HUNYUAN_PROMPT_TEMPLATE = {"template": "{}", "crop_start": 0}


def _qwen_tokenizer() -> Qwen2Tokenizer:
    """Byte-level BPE Qwen2 tokenizer without merges (every byte is a token) plus Qwen's chat markers."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    vocab = {character: index for index, character in enumerate(sorted(ByteLevel.alphabet()))}
    for token in _QWEN_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": list(_QWEN_SPECIAL_TOKENS[1:])})
    return tokenizer


def _llama_tokenizer() -> LlamaTokenizer:
    """SentencePiece-style Llama tokenizer over printable ASCII (about 100 pieces), built in memory."""
    from transformers import LlamaTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for piece in ["\u2581", *string.ascii_letters, *string.digits, *string.punctuation]:
        vocab.setdefault(piece, len(vocab))
    return LlamaTokenizer(vocab=vocab, merges=[], pad_token="<pad>")


def build_qwen_image(num_layers: int) -> DiffusionPipeline:
    """Qwen-Image: MMDiT with Qwen2.5-VL text features (VAE: 4x spatial compression, 2x2 packed patches)."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=num_layers,
        attention_head_dim=16,
        num_attention_heads=3,
        joint_attention_dim=16,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    )
    vae = AutoencoderKLQwenImage(
        base_dim=24,
        z_dim=4,
        dim_mult=[1, 2, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    )
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "vocab_size": _QWEN_VOCAB_SIZE,
            "bos_token_id": 256,  # <|endoftext|>
            "eos_token_id": 258,  # <|im_end|>
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
        },
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=16,
        vocab_size=_QWEN_VOCAB_SIZE,
        bos_token_id=256,
        eos_token_id=258,
        vision_start_token_id=_QWEN_VOCAB_SIZE - 3,
        vision_end_token_id=_QWEN_VOCAB_SIZE - 2,
        vision_token_id=_QWEN_VOCAB_SIZE - 1,
    )
    return QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=Qwen2_5_VLForConditionalGeneration(config),
        tokenizer=_qwen_tokenizer(),
        transformer=transformer,
    )


def build_hunyuan_video(num_layers: int) -> DiffusionPipeline:
    """HunyuanVideo with ``num_layers`` dual- and ``num_layers`` single-stream blocks (VAE: 8x spatial, 4x temporal
    compression), a 2-layer Llama and a 2-layer CLIP text encoder."""
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    from dit_accel.pipelines.tiny import _clip_tokenizer

    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=10,
        num_layers=num_layers,
        num_single_layers=num_layers,
        num_refiner_layers=1,
        patch_size=1,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=16,
        pooled_projection_dim=8,
        rope_axes_dim=(2, 4, 4),
    )
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        act_fn="silu",
        norm_num_groups=4,
        scaling_factor=0.476986,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
        mid_block_add_attention=True,
    )
    llama = LlamaConfig(bos_token_id=1, eos_token_id=2, pad_token_id=3, hidden_size=16, intermediate_size=37,
                        num_attention_heads=4, num_hidden_layers=2, vocab_size=128, hidden_act="gelu")
    clip = CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=8, intermediate_size=37,
                          num_attention_heads=4, num_hidden_layers=2, vocab_size=1000, projection_dim=32,
                          max_position_embeddings=77, hidden_act="gelu")
    return HunyuanVideoPipeline(
        text_encoder=LlamaModel(llama),
        tokenizer=_llama_tokenizer(),
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=CLIPTextModel(clip),
        tokenizer_2=_clip_tokenizer(),
    )
