"""The anchors, driven through their own public APIs on the same pipeline: diffusers' built-in cache hooks
(First-Block-Cache, TaylorSeer, MagCache) and cache-dit's DBCache when it is installed.

Pipelines that set no ``cache_context`` (DiT, PixArt, SD3, our ``ZooDiTPipeline``) get one set by hand around the
call, as diffusers' hooks require -- one context for the whole call (batched CFG shares the decision) -- and their
hook state reset by hand after it, which diffusers does not do for transformers without ``CacheMixin``. Each baseline returns a remover that restores the pipeline exactly.
"""

from __future__ import annotations

import ast
import contextlib
import io
from dataclasses import dataclass
from typing import Any, Callable

import torch

BASELINES = ("diffusers:fbcache", "diffusers:taylorseer", "diffusers:magcache", "diffusers:fastercache",
             "diffusers:pab", "cache-dit:dbcache", "cache-dit:dbcache+taylorseer", "cache-dit:dbcache+foca",
             "cache-dit:dbcache+dmd", "cache-dit:dbcache+scm")


class BaselineUnavailable(RuntimeError):
    """The baseline cannot run here (not installed, or not applicable to this model); the message says why."""


@dataclass
class AppliedBaseline:
    name: str
    run: Callable[[Callable[[], Any]], Any]  # run(generate) -> generate()'s result, with any context set
    remove: Callable[[], None]


def _needs_manual_context(pipe: Any) -> bool:
    from diffusers.models.cache_utils import CacheMixin

    # Pipelines that call cache_context themselves all use CacheMixin transformers; our zoo DiT does not.
    return not isinstance(pipe.transformer, CacheMixin) or type(pipe).__name__ in ("ZooDiTPipeline",)


def _runner(pipe: Any) -> Callable[[Callable[[], Any]], Any]:
    if not _needs_manual_context(pipe):
        return lambda generate: generate()
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    def run(generate):
        _set_cache_context(pipe.transformer, CacheContext("cond"))
        try:
            return generate()
        finally:
            _set_cache_context(pipe.transformer, None)
            # Without CacheMixin, maybe_free_model_hooks() never resets the hooks' state: the next generation would
            # reuse this one's residuals (and crash if the batch size changed). A careful user resets by hand.
            HookRegistry.check_if_exists_or_initialize(pipe.transformer).reset_stateful_hooks()

    return run


def _remover(pipe: Any, hook_names: tuple[str, ...]) -> Callable[[], None]:
    from diffusers.hooks import HookRegistry

    def remove() -> None:
        registry = HookRegistry.check_if_exists_or_initialize(pipe.transformer)
        for name in hook_names:
            registry.remove_hook(name, recurse=True)
        registry.invalidate_child_registries_cache()

    return remove


def calibrate_magcache(pipe: Any, generate: Callable[[], Any], num_steps: int) -> list[float]:
    """Run MagCache's calibration mode once and return the magnitude ratios it reports."""
    from diffusers import MagCacheConfig, apply_mag_cache
    from diffusers.hooks.mag_cache import _MAG_CACHE_BLOCK_HOOK, _MAG_CACHE_LEADER_BLOCK_HOOK

    from diffusers.hooks import HookRegistry

    apply_mag_cache(pipe.transformer, MagCacheConfig(calibrate=True, num_inference_steps=num_steps))
    HookRegistry.check_if_exists_or_initialize(pipe.transformer).invalidate_child_registries_cache()
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            _runner(pipe)(generate)
    finally:
        _remover(pipe, (_MAG_CACHE_LEADER_BLOCK_HOOK, _MAG_CACHE_BLOCK_HOOK))()
    lists = [line for line in printed.getvalue().splitlines() if line.strip().startswith("[")]
    if not lists:
        raise BaselineUnavailable("MagCache calibration printed no ratios")
    return [float(v) for v in ast.literal_eval(lists[-1].strip())]


def apply_baseline(name: str, pipe: Any, *, num_steps: int, setting: dict, calibration: Callable[[], Any]) -> AppliedBaseline:
    """Apply one anchor with ``setting`` (its own config fields) to ``pipe``; raises BaselineUnavailable."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; allowed: {', '.join(BASELINES)}")
    transformer = pipe.transformer
    if name.startswith("diffusers:"):
        applied = _apply_diffusers(name, pipe, num_steps=num_steps, setting=setting, calibration=calibration)
        from diffusers.hooks import HookRegistry

        # What CacheMixin.enable_cache does after applying: cache_context() must see the new block hooks.
        HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()
        return applied
    return _apply_cache_dit(name, pipe, num_steps=num_steps, setting=setting)


def _apply_diffusers(name: str, pipe: Any, *, num_steps: int, setting: dict, calibration) -> AppliedBaseline:
    transformer = pipe.transformer
    if name == "diffusers:fbcache":
        from diffusers import FirstBlockCacheConfig, apply_first_block_cache
        from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK

        apply_first_block_cache(transformer, FirstBlockCacheConfig(**setting))
        return AppliedBaseline(name, _runner(pipe), _remover(pipe, (_FBC_LEADER_BLOCK_HOOK, _FBC_BLOCK_HOOK)))
    if name == "diffusers:taylorseer":
        from diffusers import TaylorSeerCacheConfig, apply_taylorseer_cache
        from diffusers.hooks.taylorseer_cache import _TAYLORSEER_CACHE_HOOK

        apply_taylorseer_cache(transformer, TaylorSeerCacheConfig(taylor_factors_dtype=torch.float32, **setting))
        return AppliedBaseline(name, _runner(pipe), _remover(pipe, (_TAYLORSEER_CACHE_HOOK,)))
    if name == "diffusers:magcache":
        from diffusers import MagCacheConfig, apply_mag_cache
        from diffusers.hooks.mag_cache import _MAG_CACHE_BLOCK_HOOK, _MAG_CACHE_LEADER_BLOCK_HOOK

        setting = dict(setting)
        ratios = setting.pop("mag_ratios", None) or calibrate_magcache(pipe, calibration, num_steps)
        apply_mag_cache(transformer, MagCacheConfig(mag_ratios=ratios, num_inference_steps=num_steps, **setting))
        return AppliedBaseline(name, _runner(pipe), _remover(pipe, (_MAG_CACHE_LEADER_BLOCK_HOOK, _MAG_CACHE_BLOCK_HOOK)))
    if name in ("diffusers:fastercache", "diffusers:pab"):
        return _apply_attention_broadcast(name, pipe, setting)
    raise ValueError(f"unknown diffusers baseline {name!r}")


# The layout of each family's transformer output, as FasterCache names it (None: tokens, which it cannot split).
_OUTPUT_LAYOUTS = {"dit": "BCHW", "pixart": "BCHW", "sd3": "BCHW", "wan": "BCFHW", "hunyuan-video": "BCFHW",
                   "cogvideox": "BFCHW"}


# Families whose transformer takes the timestep divided by 1000 (the hooks' ranges are on the 0-1000 scale).
_TIMESTEP_SCALES = {"flux": 1000.0, "qwen-image": 1000.0}


class _TimestepProbe:
    """The timestep of the transformer's current call, for hooks that ask for it through a callback (FasterCache,
    PAB); our zoo pipelines and custom loops set no ``pipe.current_timestep``, so it is read from the call."""

    def __init__(self, transformer: torch.nn.Module, scale: float = 1.0) -> None:
        self.value, self.scale = 1000.0, scale
        self.handle = transformer.register_forward_pre_hook(self._read, with_kwargs=True)

    def _read(self, module, args, kwargs) -> None:
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if isinstance(timestep, torch.Tensor):
            self.value = self.scale * float(timestep.flatten()[0])
        elif timestep is not None:
            self.value = self.scale * float(timestep)

    def __call__(self) -> float:
        return self.value


def _apply_attention_broadcast(name: str, pipe: Any, setting: dict) -> AppliedBaseline:
    """diffusers' FasterCache (attention reuse plus, on batched CFG, the unconditional half rebuilt from the cond
    half and a cached frequency-weighted difference) or Pyramid Attention Broadcast (attention reuse)."""
    from diffusers import (FasterCacheConfig, PyramidAttentionBroadcastConfig, apply_faster_cache,
                           apply_pyramid_attention_broadcast)
    from diffusers.hooks.faster_cache import _FASTER_CACHE_BLOCK_HOOK, _FASTER_CACHE_DENOISER_HOOK
    from diffusers.hooks.pyramid_attention_broadcast import _PYRAMID_ATTENTION_BROADCAST_HOOK

    from dit_accel.core.blocks import spec_for
    from dit_accel.pipelines.adapters import cfg_convention_for

    transformer = pipe.transformer
    spec = spec_for(transformer)
    probe = _TimestepProbe(transformer, _TIMESTEP_SCALES.get(spec.family, 1.0))
    if name == "diffusers:pab":
        apply_pyramid_attention_broadcast(
            transformer, PyramidAttentionBroadcastConfig(current_timestep_callback=probe, **setting))
        hooks = (_PYRAMID_ATTENTION_BROADCAST_HOOK,)
    else:
        setting = dict(setting)
        convention = cfg_convention_for(pipe, spec)
        layout = _OUTPUT_LAYOUTS.get(spec.family)
        if convention is None or not convention.startswith("batched") or layout is None:
            # FasterCache halves a batched CFG call of image/video outputs; elsewhere only its attention reuse
            # applies (separate CFG calls, token outputs).
            setting.setdefault("is_guidance_distilled", True)
        identifiers = ["hidden_states", "encoder_hidden_states", "timestep", "attention_mask",
                       "encoder_attention_mask", "class_labels", "added_cond_kwargs", "pooled_projections"]
        apply_faster_cache(transformer, FasterCacheConfig(
            current_timestep_callback=probe, tensor_format=setting.pop("tensor_format", layout or "BCHW"),
            _unconditional_conditional_input_kwargs_identifiers=identifiers, **setting))
        hooks = (_FASTER_CACHE_DENOISER_HOOK, _FASTER_CACHE_BLOCK_HOOK)
    remove_hooks = _remover(pipe, hooks)

    def remove() -> None:
        remove_hooks()
        probe.handle.remove()

    return AppliedBaseline(name, _runner(pipe), remove)


def _cache_dit_calibrator(cache_dit: Any, kind: str) -> Any:
    """cache-dit's calibrator config for ``cache-dit:dbcache+<kind>`` (``None`` for plain DBCache or a mask)."""
    if kind == "taylorseer":
        return cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=1)
    if kind in ("foca", "dmd"):
        config_class = getattr(cache_dit, "FoCaCalibratorConfig" if kind == "foca" else "DMDCalibratorConfig", None)
        if config_class is None:
            raise BaselineUnavailable(f"this cache-dit ({getattr(cache_dit, '__version__', '?')}) has no {kind} "
                                      "calibrator (cache-dit 1.5.x does)")
        return config_class()
    return None


def _apply_cache_dit(name: str, pipe: Any, *, num_steps: int, setting: dict) -> AppliedBaseline:
    try:
        import cache_dit
        from cache_dit import BlockAdapter, DBCacheConfig, ForwardPattern
    except ImportError:
        raise BaselineUnavailable("cache-dit is not installed (pip install cache-dit)") from None
    transformer = pipe.transformer
    family = type(transformer).__name__
    if family == "FluxTransformer2DModel":
        lists = [transformer.transformer_blocks, transformer.single_transformer_blocks]
        adapter = BlockAdapter(pipe=pipe, transformer=transformer, blocks=lists,
                               forward_pattern=[ForwardPattern.Pattern_1, ForwardPattern.Pattern_1],
                               has_separate_cfg=type(pipe).__name__ in ("ZooMMDiTPipeline", "FluxPipeline"))
    else:
        # DiTTransformer2DModel reads transformer_blocks[0].norm1 in its forward, which cache-dit's block wrapper
        # hides (AttributeError); the other families are not wired up here.
        raise BaselineUnavailable(f"cache-dit's DBCache does not run on {family} here")
    calibrator = _cache_dit_calibrator(cache_dit, name.partition("+")[2])
    setting = dict(setting)
    if name.endswith("+scm"):
        # cache-dit's steps-computation mask: which steps compute (1) is fixed ahead ("medium" policy by default),
        # the residual-difference threshold decides the rest.
        policy = setting.pop("mask_policy", "medium")
        setting["steps_computation_mask"] = cache_dit.steps_mask(total_steps=num_steps, mask_policy=policy)
    config = DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0, num_inference_steps=num_steps, **setting)
    with contextlib.redirect_stdout(io.StringIO()):
        cache_dit.enable_cache(adapter, cache_config=config, calibrator_config=calibrator)

    order = list(transformer._modules)

    def remove() -> None:
        cache_dit.disable_cache(pipe)
        # disable_cache re-registers the block lists, moving them to the end of ``_modules``; diffusers' hooks and
        # our specs find "the first block" by child order, so put the children back where they were.
        if list(transformer._modules) != order and set(transformer._modules) == set(order):
            transformer._modules = {child: transformer._modules[child] for child in order}

    return AppliedBaseline(name, lambda generate: generate(), remove)
