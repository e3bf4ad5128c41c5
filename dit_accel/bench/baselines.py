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

BASELINES = ("diffusers:fbcache", "diffusers:taylorseer", "diffusers:magcache", "cache-dit:dbcache",
             "cache-dit:dbcache+taylorseer")


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
    raise ValueError(f"unknown diffusers baseline {name!r}")


def _apply_cache_dit(name: str, pipe: Any, *, num_steps: int, setting: dict) -> AppliedBaseline:
    try:
        import cache_dit
        from cache_dit import BlockAdapter, DBCacheConfig, ForwardPattern, TaylorSeerCalibratorConfig
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
    calibrator = TaylorSeerCalibratorConfig(taylorseer_order=1) if name.endswith("+taylorseer") else None
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
