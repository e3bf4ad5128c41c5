"""Tiny, random-init Diffusers pipelines that build fully offline.

These pipelines exist for tests, examples and CPU benchmarks of the acceleration
plugins: every one is a *real* ``diffusers`` pipeline class (``DiTPipeline``,
``PixArtSigmaPipeline``, ``StableDiffusion3Pipeline``, ``FluxPipeline``,
``WanPipeline``, ``CogVideoXPipeline``, ``LTXPipeline``, ``QwenImagePipeline``,
``HunyuanVideoPipeline``) whose components are
random-init models with very small configs, and whose tokenizers are built from
in-memory vocabularies. Nothing touches the Hugging Face Hub, so everything works
with ``HF_HUB_OFFLINE=1``.

Typical use::

    from dit_accel.pipelines import tiny

    pipe = tiny.build("flux", seed=0)
    output = pipe(**tiny.default_call_kwargs("flux", steps=4))
    image = tiny.output_of("flux", output)        # (1, 3, 32, 32) float tensor

Classifier-free guidance (CFG) conventions, checked in the diffusers 0.42.1 source:

* ``dit``: one transformer call per step on a batch of 2·B, **cond half first**
  (``class_labels`` then the null class 1000).
* ``pixart-sigma``, ``sd3``, ``cogvideox``, ``ltx``: one call per step on a batch
  of 2·B, **uncond half first** (``torch.cat([negative, positive])``).
  CogVideoX and LTX wrap the call in ``cache_context("cond_uncond")``; PixArt and
  SD3 set no cache context.
* ``flux``, ``qwen-image`` and ``hunyuan-video`` (true CFG, ``true_cfg_scale > 1``
  plus a negative prompt) and ``wan``: two calls per step on a batch of B, **cond
  call first** (under ``cache_context("cond")``), then the uncond call
  (``cache_context("uncond")``).

The module-level function :func:`list` deliberately shadows the builtin inside
this module (the builtin stays reachable as ``builtins.list``); it is therefore
left out of ``__all__`` so that ``from ... import *`` never shadows it elsewhere.
"""

from __future__ import annotations

import builtins
import string
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from dit_accel.pipelines import tiny_lm

if TYPE_CHECKING:  # pragma: no cover - typing only
    from diffusers import DiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTokenizer, T5EncoderModel, T5Tokenizer

__all__ = ["build", "default_call_kwargs", "is_batched_cfg", "output_of"]

_PIPELINE_NAMES: tuple[str, ...] = (
    "dit", "pixart-sigma", "sd3", "flux", "wan", "cogvideox", "ltx", "qwen-image", "hunyuan-video",
)

# Pipelines that run cond and uncond as one transformer call on a doubled batch.
_BATCHED_CFG_NAMES: frozenset[str] = frozenset({"dit", "pixart-sigma", "sd3", "cogvideox", "ltx"})

# Pipelines whose output lives in ``.frames`` (videos) rather than ``.images``.
_VIDEO_NAMES: frozenset[str] = frozenset({"wan", "cogvideox", "ltx", "hunyuan-video"})

# Default number of transformer blocks per pipeline (for Flux: per stack, dual and single).
_DEFAULT_NUM_LAYERS: dict[str, int] = {
    "dit": 2,
    "pixart-sigma": 2,
    "sd3": 3,
    "flux": 2,
    "wan": 2,
    "cogvideox": 2,
    "ltx": 2,
    "qwen-image": 2,
    "hunyuan-video": 1,
}

# Default CFG strength used by ``default_call_kwargs`` (for Flux this is ``true_cfg_scale``).
_DEFAULT_GUIDANCE: dict[str, float] = {
    "dit": 4.0,
    "pixart-sigma": 4.5,
    "sd3": 5.0,
    "flux": 2.0,
    "wan": 5.0,
    "cogvideox": 6.0,
    "ltx": 3.0,
    "qwen-image": 4.0,
    "hunyuan-video": 3.0,
}

_IMAGE_SIZE = 32  # pixels, height and width, for every pipeline (DiT's size is fixed by its config)
_VIDEO_FRAMES: dict[str, int] = {"wan": 5, "cogvideox": 9, "ltx": 9, "hunyuan-video": 5}
_MAX_SEQUENCE_LENGTH = 16
_PROMPT = "a photo of a cat"
_NEGATIVE_PROMPT = "blurry"


# --------------------------------------------------------------------------- public API
def list() -> builtins.list[str]:  # noqa: A001 - the public name is part of the API
    """Return the names of the supported tiny pipelines, in a stable order."""
    return builtins.list(_PIPELINE_NAMES)


def is_batched_cfg(name: str) -> bool:
    """Tell whether pipeline ``name`` runs CFG as one transformer call on a doubled batch.

    ``True`` for dit, pixart-sigma, sd3, cogvideox and ltx (cond and uncond are
    concatenated along the batch); ``False`` for flux, qwen-image, hunyuan-video (true
    CFG) and wan, which call the transformer twice per step, cond first and uncond second.
    """
    _check_name(name)
    return name in _BATCHED_CFG_NAMES


def build(name: str, *, seed: int = 0, num_layers: int | None = None) -> DiffusionPipeline:
    """Build the tiny random-init pipeline ``name``.

    Args:
        name: one of :func:`list`.
        seed: seed of the random initialisation. The global torch RNG state is
            left untouched (the build runs inside ``torch.random.fork_rng``).
        num_layers: number of transformer blocks; ``None`` picks the pipeline's
            default (2, 3 for SD3, 1 for HunyuanVideo). For Flux and HunyuanVideo it
            sets both the number of dual (``transformer_blocks``) and single
            (``single_transformer_blocks``) blocks.

    Returns:
        The pipeline, with every ``torch.nn.Module`` component in eval mode and the
        progress bar disabled.

    Raises:
        ValueError: if ``name`` is unknown or ``num_layers`` is smaller than 1.
    """
    _check_name(name)
    layer_count = _DEFAULT_NUM_LAYERS[name] if num_layers is None else int(num_layers)
    if layer_count < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers!r}")

    builder = _BUILDERS[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = builder(layer_count)

    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def default_call_kwargs(
    name: str,
    *,
    steps: int = 4,
    seed: int = 0,
    batch_size: int = 1,
    guidance_scale: float | None = None,
) -> dict[str, Any]:
    """Keyword arguments for one small, fast generation with pipeline ``name``.

    The generation is 32x32 pixels (videos: 5 frames for Wan, 9 for CogVideoX and
    LTX), returns tensors (``output_type="pt"``) and draws its noise from a fresh
    ``torch.Generator().manual_seed(seed)``.

    Args:
        name: one of :func:`list`.
        steps: number of denoising steps.
        seed: seed of the generator that draws the initial noise.
        batch_size: number of images/videos (DiT: ``class_labels=[1] * batch_size``;
            CogVideoX: a list of ``batch_size`` prompts, because its ``__call__``
            forces ``num_videos_per_prompt=1``; the others: ``num_images_per_prompt``
            / ``num_videos_per_prompt``).
        guidance_scale: CFG strength; ``None`` picks a per-pipeline default (> 1, so
            CFG is on). For Flux, Qwen-Image and HunyuanVideo this value is passed as
            ``true_cfg_scale`` (true CFG with a negative prompt); Flux's own
            ``guidance_scale`` feeds a guidance embedding that the tiny transformer
            does not have, HunyuanVideo's keeps the pipeline default (6.0). A value
            <= 1 turns CFG off in every pipeline.

    Raises:
        ValueError: if ``name`` is unknown, or ``steps``/``batch_size`` < 1.
    """
    _check_name(name)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    scale = _DEFAULT_GUIDANCE[name] if guidance_scale is None else float(guidance_scale)

    kwargs: dict[str, Any] = {
        "num_inference_steps": steps,
        "output_type": "pt",
        "generator": torch.Generator().manual_seed(seed),
    }
    if name == "dit":
        kwargs.update(class_labels=[1] * batch_size, guidance_scale=scale)
        return kwargs

    kwargs.update(
        prompt=_PROMPT,
        negative_prompt=_NEGATIVE_PROMPT,
        height=_IMAGE_SIZE,
        width=_IMAGE_SIZE,
        max_sequence_length=_MAX_SEQUENCE_LENGTH,
    )
    if name == "cogvideox":
        # CogVideoXPipeline.__call__ overrides num_videos_per_prompt with 1, so batch via prompt lists.
        kwargs.update(
            prompt=[_PROMPT] * batch_size,
            negative_prompt=[_NEGATIVE_PROMPT] * batch_size,
            num_frames=_VIDEO_FRAMES[name],
            guidance_scale=scale,
        )
    elif name == "hunyuan-video":
        kwargs.update(num_frames=_VIDEO_FRAMES[name], num_videos_per_prompt=batch_size, true_cfg_scale=scale,
                      prompt_template=dict(tiny_lm.HUNYUAN_PROMPT_TEMPLATE))
    elif name in _VIDEO_NAMES:
        kwargs.update(num_frames=_VIDEO_FRAMES[name], num_videos_per_prompt=batch_size, guidance_scale=scale)
    else:
        kwargs["num_images_per_prompt"] = batch_size
        if name in ("flux", "qwen-image"):
            kwargs["true_cfg_scale"] = scale
        else:
            kwargs["guidance_scale"] = scale
    if name == "pixart-sigma":
        kwargs.update(use_resolution_binning=False, clean_caption=False)
    return kwargs


def output_of(name: str, pipe_output: Any) -> torch.Tensor:
    """Return the image or video tensor of a pipeline output as a float tensor.

    Images come back as ``(B, 3, H, W)`` and videos as ``(B, F, 3, H, W)`` when the
    pipeline ran with ``output_type="pt"``. Tuples (``return_dict=False``) and
    NumPy arrays are accepted too.
    """
    _check_name(name)
    if isinstance(pipe_output, tuple):
        result = pipe_output[0]
    else:
        attribute = "frames" if name in _VIDEO_NAMES else "images"
        result = getattr(pipe_output, attribute)
    if not isinstance(result, torch.Tensor):
        result = torch.as_tensor(result)
    return result.float()


# --------------------------------------------------------------------------- helpers
def _check_name(name: str) -> None:
    """Raise ``ValueError`` naming ``name`` and the allowed names if it is unknown."""
    if name not in _PIPELINE_NAMES:
        allowed = ", ".join(_PIPELINE_NAMES)
        raise ValueError(f"unknown tiny pipeline {name!r}; allowed names: {allowed}")


def _clip_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """Byte-level BPE CLIP tokenizer without merges: every byte is a token (514 tokens)."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    alphabet = sorted(ByteLevel.alphabet())
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for character in alphabet:
        vocab.setdefault(character, len(vocab))
    for character in alphabet:
        vocab.setdefault(character + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def _t5_tokenizer() -> T5Tokenizer:
    """Unigram (sentencepiece-style) T5 tokenizer with about 120 pieces, built in memory."""
    from transformers import T5Tokenizer

    pieces: builtins.list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(character, -2.0) for character in string.ascii_letters + string.digits + string.punctuation]
    pieces += [("\u2581" + character, -1.5) for character in string.ascii_lowercase]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def _clip_text_config() -> CLIPTextConfig:
    """Config of a 2-layer, 32-wide CLIP text encoder."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=1000,
        projection_dim=32,
        max_position_embeddings=77,
        hidden_act="gelu",
    )


def _t5_encoder(d_model: int = 32, vocab_size: int = 256) -> T5EncoderModel:
    """A 2-layer T5 encoder (4 heads of 8)."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_ff=37,
        d_kv=8,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(config)


def autoencoder_kl(latent_channels: int = 4, *, flow: bool = False) -> torch.nn.Module:
    """The tiny VAE of the pipelines here (``flow``: with the flow-matching pipelines' scaling and shift)."""
    return _autoencoder_kl(latent_channels, **(_FLOW_VAE_OVERRIDES if flow else {}))


def _autoencoder_kl(latent_channels: int = 4, **overrides: Any) -> torch.nn.Module:
    """A 2-down-block ``AutoencoderKL``: ``vae_scale_factor`` 2, so 32 px images give 16x16 latents."""
    from diffusers import AutoencoderKL

    config: dict[str, Any] = {
        "sample_size": 32,
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": (4, 4),
        "down_block_types": ("DownEncoderBlock2D",) * 2,
        "up_block_types": ("UpDecoderBlock2D",) * 2,
        "layers_per_block": 1,
        "latent_channels": latent_channels,
        "norm_num_groups": 1,
    }
    config.update(overrides)
    return AutoencoderKL(**config)


# SD3 and Flux VAEs have no quant convs and use a shift factor.
_FLOW_VAE_OVERRIDES: dict[str, Any] = {
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "shift_factor": 0.0609,
    "scaling_factor": 1.5035,
}


# --------------------------------------------------------------------------- builders
def _build_dit(num_layers: int) -> DiffusionPipeline:
    """Class-conditional DiT (learned sigma); 32 px images (sample_size 16 x vae_scale_factor 2)."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    transformer = DiTTransformer2DModel(
        sample_size=16,
        num_layers=num_layers,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=2,
        in_channels=4,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_zero",
        norm_elementwise_affine=False,
    )
    return DiTPipeline(transformer=transformer, vae=_autoencoder_kl(), scheduler=DDIMScheduler())


def _build_pixart_sigma(num_layers: int) -> DiffusionPipeline:
    """PixArt-Sigma with a tiny T5 text encoder and a DPM-Solver++ scheduler."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    transformer = PixArtTransformer2DModel(
        sample_size=8,
        num_layers=num_layers,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=3,
        caption_channels=32,
        in_channels=4,
        cross_attention_dim=24,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )
    return PixArtSigmaPipeline(
        tokenizer=_t5_tokenizer(),
        text_encoder=_t5_encoder(),
        vae=_autoencoder_kl(),
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )


def _build_sd3(num_layers: int) -> DiffusionPipeline:
    """SD3 (MMDiT); its last block is ``context_pre_only`` and returns ``encoder_hidden_states=None``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=1,
        in_channels=4,
        num_layers=num_layers,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_autoencoder_kl(**_FLOW_VAE_OVERRIDES),
        text_encoder=CLIPTextModelWithProjection(_clip_text_config()),
        tokenizer=_clip_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(_clip_text_config()),
        tokenizer_2=_clip_tokenizer(),
        text_encoder_3=_t5_encoder(),
        tokenizer_3=_t5_tokenizer(),
    )


def _build_flux(num_layers: int) -> DiffusionPipeline:
    """Flux.1 with ``num_layers`` dual-stream and ``num_layers`` single-stream blocks, no guidance embedding."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,  # Flux packs 2x2 latent patches: 4 x latent_channels (1)
        num_layers=num_layers,
        num_single_layers=num_layers,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    )
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_autoencoder_kl(latent_channels=1, **_FLOW_VAE_OVERRIDES),
        text_encoder=CLIPTextModel(_clip_text_config()),
        tokenizer=_clip_tokenizer(),
        text_encoder_2=_t5_encoder(),
        tokenizer_2=_t5_tokenizer(),
        transformer=transformer,
    )


def _build_wan(num_layers: int) -> DiffusionPipeline:
    """Wan 2.1 text-to-video (VAE: 8x spatial, 4x temporal compression)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    vae = AutoencoderKLWan(
        base_dim=3,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=256,
        ffn_dim=32,
        num_layers=num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    return WanPipeline(
        tokenizer=_t5_tokenizer(),
        text_encoder=_t5_encoder(),
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
    )


def _build_cogvideox(num_layers: int) -> DiffusionPipeline:
    """CogVideoX (VAE: 8x spatial, 4x temporal compression; text length 16)."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXPipeline, CogVideoXTransformer3DModel, DDIMScheduler

    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=4,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        time_embed_dim=2,
        text_embed_dim=32,
        num_layers=num_layers,
        sample_width=2,
        sample_height=2,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=_MAX_SEQUENCE_LENGTH,
    )
    vae = AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    )
    return CogVideoXPipeline(
        tokenizer=_t5_tokenizer(),
        text_encoder=_t5_encoder(),
        vae=vae,
        transformer=transformer,
        scheduler=DDIMScheduler(),
    )


def _build_ltx(num_layers: int) -> DiffusionPipeline:
    """LTX-Video (VAE: 4x spatial, 4x temporal compression, whole-clip encode/decode)."""
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXPipeline,
        LTXVideoTransformer3DModel,
    )

    transformer = LTXVideoTransformer3DModel(
        in_channels=8,
        out_channels=8,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=4,
        attention_head_dim=8,
        cross_attention_dim=32,
        num_layers=num_layers,
        caption_channels=32,
    )
    vae = AutoencoderKLLTXVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=8,
        block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False, False, False, False, False),
        upsample_residual=(False, False, False, False),
        upsample_factor=(1, 1, 1, 1),
        timestep_conditioning=False,
        patch_size=1,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
    )
    vae.use_framewise_encoding = False
    vae.use_framewise_decoding = False
    return LTXPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=_t5_encoder(),
        tokenizer=_t5_tokenizer(),
        transformer=transformer,
    )


_BUILDERS: dict[str, Callable[[int], DiffusionPipeline]] = {
    "dit": _build_dit,
    "pixart-sigma": _build_pixart_sigma,
    "sd3": _build_sd3,
    "flux": _build_flux,
    "wan": _build_wan,
    "cogvideox": _build_cogvideox,
    "ltx": _build_ltx,
    "qwen-image": tiny_lm.build_qwen_image,
    "hunyuan-video": tiny_lm.build_hunyuan_video,
}
