"""Tiny offline versions of the pipelines users run besides text-to-image, and of the samplers they pick.

Each variant is a diffusers pipeline class built from the components of a tiny pipeline (:mod:`tiny`), so every
family's variant runs the same transformer its tests already know: Flux img2img / inpaint / Kontext / Fill / ControlNet
and Redux (prompt embeddings made from an image by ``FluxPriorReduxPipeline``, text and image tokens concatenated),
SD3 img2img / inpaint / ControlNet, PixArt with prompt lists and several images per prompt, Wan 2.2 with two experts,
Wan 2.1 image-to-video (CLIP image tokens in the cross attention, condition latents concatenated to the input).
Samplers swap the scheduler of a tiny pipeline for another one of the same prediction type (Heun, DPM-Solver 2M / 2S /
SDE, UniPC, Euler ancestral, LCM; flow matching: Heun and custom sigmas).

    pipe = variants.build("flux-img2img")
    pipe(**variants.call_kwargs("flux-img2img", steps=6))
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from diffusers import DiffusionPipeline

from dit_accel.pipelines import tiny

# variant -> (tiny base pipeline, diffusers pipeline class)
VARIANTS: dict[str, tuple[str, str]] = {
    "flux-img2img": ("flux", "FluxImg2ImgPipeline"),
    "flux-inpaint": ("flux", "FluxInpaintPipeline"),
    "flux-kontext": ("flux", "FluxKontextPipeline"),
    "flux-fill": ("flux", "FluxFillPipeline"),
    "flux-controlnet": ("flux", "FluxControlNetPipeline"),
    "flux-redux": ("flux", "FluxPipeline"),
    "sd3-img2img": ("sd3", "StableDiffusion3Img2ImgPipeline"),
    "sd3-inpaint": ("sd3", "StableDiffusion3InpaintPipeline"),
    "sd3-controlnet": ("sd3", "StableDiffusion3ControlNetPipeline"),
    "pixart-prompt-list": ("pixart-sigma", "PixArtSigmaPipeline"),
    "wan-two-experts": ("wan", "WanPipeline"),
    "wan-i2v": ("wan", "WanImageToVideoPipeline"),
}

# sampler -> (scheduler class, config overrides); the first group is for epsilon models (DiT), the second for flow
# matching models (Flux, SD3, Wan).
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm-2m": ("DPMSolverMultistepScheduler", {"solver_order": 2}),
    "dpm-2s": ("DPMSolverSinglestepScheduler", {"solver_order": 2}),
    "dpm-sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "lcm": ("LCMScheduler", {}),
}
FLOW_SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "flow-heun": ("FlowMatchHeunDiscreteScheduler", {}),
    "flow-custom-sigmas": ("FlowMatchEulerDiscreteScheduler", {}),
}


def build(name: str, *, seed: int = 0) -> DiffusionPipeline:
    """The tiny pipeline of variant ``name`` (one of :data:`VARIANTS`)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown pipeline variant {name!r}; allowed: {', '.join(VARIANTS)}")
    base_name, class_name = VARIANTS[name]
    base = tiny.build(base_name, seed=seed)
    import diffusers

    cls = getattr(diffusers, class_name)
    components = dict(base.components)
    if name == "flux-fill":
        components["transformer"] = _fill_transformer(base, seed)
    if name == "flux-controlnet":
        components["controlnet"] = _flux_controlnet(base, seed)
    if name == "sd3-inpaint":  # diffusers' SD3 inpainting accepts only 16 (or 33) latent channels
        components.update(_sd3_sixteen_channels(base, seed))
    if name == "sd3-controlnet":
        components["controlnet"] = _sd3_controlnet(base, seed)
    if name == "wan-i2v":
        components.update(_wan_i2v_components(base, seed))
    if name == "wan-two-experts":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            second = copy.deepcopy(base.transformer)
            for parameter in second.parameters():  # a different expert: perturbed weights
                parameter.data.add_(0.02 * torch.randn_like(parameter))
        components.update(transformer_2=second, boundary_ratio=0.875)  # Wan 2.2 T2V's boundary
    accepted = set(cls._get_signature_keys(cls)[0]) | set(cls._get_signature_keys(cls)[1])
    pipe = cls(**{k: v for k, v in components.items() if k in accepted})
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _fill_transformer(base: DiffusionPipeline, seed: int) -> torch.nn.Module:
    """Flux Fill's transformer reads the packed latent, the packed masked-image latent and the packed mask."""
    from diffusers import FluxTransformer2DModel

    config = {k: v for k, v in base.transformer.config.items() if not k.startswith("_")}
    latent = config["in_channels"]
    scale = base.vae_scale_factor
    config.update(in_channels=2 * latent + 4 * scale * scale, out_channels=latent)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return FluxTransformer2DModel.from_config(config).eval()


def _sd3_sixteen_channels(base: DiffusionPipeline, seed: int) -> dict[str, torch.nn.Module]:
    """The tiny SD3 transformer and VAE with 16 latent channels."""
    from diffusers import SD3Transformer2DModel

    config = {k: v for k, v in base.transformer.config.items() if not k.startswith("_")}
    config.update(in_channels=16, out_channels=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel.from_config(config).eval()
        vae = tiny.autoencoder_kl(latent_channels=16, flow=True).eval()
    return {"transformer": transformer, "vae": vae}


def _flux_controlnet(base: DiffusionPipeline, seed: int) -> torch.nn.Module:
    """A one-block Flux ControlNet matching the tiny Flux transformer (its residuals feed every block)."""
    from diffusers import FluxControlNetModel

    config = base.transformer.config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 2)
        return FluxControlNetModel(
            patch_size=config.patch_size, in_channels=config.in_channels, num_layers=1, num_single_layers=1,
            attention_head_dim=config.attention_head_dim, num_attention_heads=config.num_attention_heads,
            joint_attention_dim=config.joint_attention_dim, pooled_projection_dim=config.pooled_projection_dim,
            axes_dims_rope=list(config.axes_dims_rope)).eval()


def _sd3_controlnet(base: DiffusionPipeline, seed: int) -> torch.nn.Module:
    """A one-block SD3 ControlNet matching the tiny SD3 transformer (its residuals feed the blocks)."""
    from diffusers.models import SD3ControlNetModel

    config = base.transformer.config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 3)
        return SD3ControlNetModel(
            sample_size=config.sample_size, patch_size=config.patch_size, in_channels=config.in_channels,
            num_layers=1, attention_head_dim=config.attention_head_dim,
            num_attention_heads=config.num_attention_heads, joint_attention_dim=config.joint_attention_dim,
            caption_projection_dim=config.caption_projection_dim,
            pooled_projection_dim=config.pooled_projection_dim, out_channels=config.out_channels).eval()


def _wan_i2v_components(base: DiffusionPipeline, seed: int) -> dict[str, Any]:
    """Wan 2.1 I2V: a transformer reading 16 noise + 4 mask + 16 condition channels and CLIP image tokens (its
    cross attention adds image keys/values), a tiny CLIP vision encoder and its image processor."""
    from diffusers import WanTransformer3DModel
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

    config = {k: v for k, v in base.transformer.config.items() if not k.startswith("_")}
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=32)
    config.update(in_channels=36, image_dim=vision.hidden_size, added_kv_proj_dim=inner)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 4)
        transformer = WanTransformer3DModel.from_config(config).eval()
        encoder = CLIPVisionModel(vision).eval()
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return {"transformer": transformer, "image_encoder": encoder, "image_processor": processor}


def _redux_embeddings(seed: int) -> dict[str, torch.Tensor]:
    """Prompt embeddings as Flux Redux makes them: ``FluxPriorReduxPipeline`` (tiny SigLIP encoder and Redux
    projection) appends image tokens to the T5 tokens of the tiny Flux text encoders; the negative embeddings have
    the same length, as users build them for true CFG."""
    from diffusers import FluxPriorReduxPipeline
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
    from transformers import SiglipImageProcessorPil, SiglipVisionConfig, SiglipVisionModel

    base = tiny.build("flux", seed=seed)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                                image_size=32, patch_size=8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 5)
        prior = FluxPriorReduxPipeline(
            image_encoder=SiglipVisionModel(vision).eval(),
            feature_extractor=SiglipImageProcessorPil(size={"height": 32, "width": 32}),
            image_embedder=ReduxImageEncoder(redux_dim=vision.hidden_size,
                                             txt_in_features=base.transformer.config.joint_attention_dim).eval(),
            text_encoder=base.text_encoder, tokenizer=base.tokenizer,
            text_encoder_2=base.text_encoder_2, tokenizer_2=base.tokenizer_2)
    with torch.no_grad():
        cond = prior(image=_pil_image(seed), prompt="a photo of a cat", return_dict=False)
        uncond = prior(image=_pil_image(seed), prompt="", prompt_embeds_scale=0.0, return_dict=False)
    return {"prompt_embeds": cond[0], "pooled_prompt_embeds": cond[1],
            "negative_prompt_embeds": uncond[0], "negative_pooled_prompt_embeds": uncond[1]}


def _wan_prompt_embeddings(seed: int) -> dict[str, torch.Tensor]:
    """The tiny Wan text encoder's embeddings at 512 tokens: Wan 2.1 I2V's cross attention splits image from text
    tokens assuming 512 text tokens (and diffusers' I2V prompt cleaning needs ``ftfy``, which T2V does not)."""
    base = tiny.build("wan", seed=seed)
    with torch.no_grad():
        cond, uncond = base.encode_prompt("a photo of a cat", negative_prompt="blurry", max_sequence_length=512,
                                          do_classifier_free_guidance=True, device=torch.device("cpu"))
    return {"prompt_embeds": cond, "negative_prompt_embeds": uncond}


def _pil_image(seed: int):
    from PIL import Image

    generator = torch.Generator().manual_seed(seed + 7)
    pixels = (torch.rand(32, 32, 3, generator=generator) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


def call_kwargs(name: str, *, steps: int = 4, seed: int = 0) -> dict[str, Any]:
    """Keyword arguments for one small generation with variant ``name`` (CFG on wherever the variant has it)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown pipeline variant {name!r}; allowed: {', '.join(VARIANTS)}")
    base_name, _ = VARIANTS[name]
    kwargs = tiny.default_call_kwargs(base_name, steps=steps, seed=seed)
    generator = torch.Generator().manual_seed(seed + 7)
    image = torch.rand(1, 3, 32, 32, generator=generator)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1.0
    if name in ("flux-img2img", "sd3-img2img"):
        kwargs.update(image=image, strength=0.75)
    elif name in ("flux-inpaint", "sd3-inpaint"):
        kwargs.update(image=image, mask_image=mask, strength=0.9)
    elif name == "flux-controlnet":
        kwargs.update(control_image=image, controlnet_conditioning_scale=0.8)
    elif name == "flux-kontext":
        kwargs.update(image=image, _auto_resize=False, max_area=32 * 32)
    elif name == "flux-fill":
        kwargs.update(image=image, mask_image=mask)
        kwargs.pop("negative_prompt"), kwargs.pop("true_cfg_scale")  # Fill runs no true CFG
    elif name == "sd3-controlnet":
        kwargs.update(control_image=image, controlnet_conditioning_scale=0.8)
    elif name == "flux-redux":
        for key in ("prompt", "negative_prompt", "max_sequence_length"):
            kwargs.pop(key)
        kwargs.update(_redux_embeddings(seed))
    elif name == "wan-i2v":
        for key in ("prompt", "negative_prompt", "max_sequence_length"):
            kwargs.pop(key)
        kwargs.update(image=_pil_image(seed), **_wan_prompt_embeddings(seed))
    elif name == "pixart-prompt-list":
        kwargs.update(prompt=["a photo of a cat", "a red car"], negative_prompt=["blurry", "dark"],
                      num_images_per_prompt=2)
    if name in ("flux-kontext", "flux-fill"):
        kwargs.pop("num_images_per_prompt", None)
    return kwargs


def with_sampler(pipe: DiffusionPipeline, sampler: str) -> DiffusionPipeline:
    """``pipe`` with its scheduler replaced by ``sampler`` (one of :data:`SAMPLERS` or :data:`FLOW_SAMPLERS`)."""
    import diffusers

    table = {**SAMPLERS, **FLOW_SAMPLERS}
    if sampler not in table:
        raise ValueError(f"unknown sampler {sampler!r}; allowed: {', '.join(table)}")
    class_name, overrides = table[sampler]
    pipe.scheduler = getattr(diffusers, class_name).from_config(pipe.scheduler.config, **overrides)
    return pipe


def custom_sigmas(steps: int) -> list[float]:
    """A non-uniform flow-matching sigma schedule (denser near the end), as users pass with ``sigmas=``."""
    return [float(1.0 - (i / steps) ** 0.7) * 0.999 + 0.001 for i in range(steps)]
