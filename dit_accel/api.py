"""``accelerate_dit`` / ``remove_acceleration`` and the handle they return.

Applying a recipe to a pipeline (or a bare transformer):

1. resolves the recipe and checks every transformer has an adapter, before touching anything;
2. per transformer (``pipe.transformer`` and ``pipe.transformer_2`` where present) builds the step tracker, the
   attention interception and the stats, installs each plugin, and finally the tracker hook (outermost);
3. wraps, on the instances only, ``pipe.scheduler.set_timesteps`` (a generation starts: reset, and the schedule
   length) and ``pipe.maybe_free_model_hooks`` (a generation ended: reset) (:mod:`dit_accel.pipeline_wiring`).
   ``pipe.__call__`` cannot be wrapped per instance (Python looks special methods up on the class) and classes are
   never patched.

Anything that fails half-way is rolled back. Removal restores every module and method exactly.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any

import torch
from diffusers.hooks import ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from dit_accel.caching.prediction_space import parameterization_of
from dit_accel.core.attention import AttentionInterceptor
from dit_accel.core.blocks import spec_for
from dit_accel.core.compile import compile_regions
from dit_accel.core.context import StepTracker
from dit_accel.core.hooks import attach, detach
from dit_accel.core.plugin import InstallTarget, Plugin, matches_layers, plugin_for
from dit_accel.core.generation_stats import GenerationStats, format_summary
from dit_accel.core.stats import StatsRecorder
from dit_accel.pipeline_wiring import guidance_of, wrap_pipeline
from dit_accel.recipe import Recipe, conflict_message, load_recipe, steps_disjoint

TRACKER_HOOK = "dit_accel.tracker"
_HANDLE_ATTR = "_dit_accel_handle"


class IdlePluginWarning(UserWarning):
    """A plugin computed every call of a generation dense (too few steps, a threshold never met, no CFG to share):
    once per plugin and reason; ``handle.summary()`` repeats it."""


class _NoState(BaseState):
    def reset(self, *args, **kwargs) -> None:
        return None


class _TrackerHook(ModelHook):
    """Outermost hook on the transformer: classifies each call, and resets everything if the forward raises.

    It is stateful and holds a ``StateManager`` so that diffusers' ``cache_context(name)`` reaches it (we read the
    name to label branches) and ``maybe_free_model_hooks`` resets it at the end of a generation.
    """

    _is_stateful = True

    def __init__(self, accelerated: "_AcceleratedTransformer") -> None:
        super().__init__()
        self.accelerated = accelerated
        self.state_manager = StateManager(_NoState)

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        tracker = self.accelerated.tracker
        context = self.state_manager._context
        context = tracker.enter(module, args, kwargs, context.name if context is not None else None)
        self.accelerated.stats.on_call(context)
        try:
            output = self.fn_ref.original_forward(*args, **kwargs)
            self.accelerated.stats.end_call()
            return output
        except BaseException:
            tracker.reset(reason="error")
            raise
        finally:
            tracker.exit()

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.accelerated.tracker.reset(reason="end")
        return module


class _AcceleratedTransformer:
    """Everything installed on one transformer."""

    def __init__(self, transformer: torch.nn.Module, recipe: Recipe, pipe: Any = None) -> None:
        from dit_accel.pipelines.adapters import cfg_convention_for

        self.transformer = transformer
        self.spec = spec_for(transformer)
        self.plugins: list[Plugin] = []
        self.idle: dict[str, str] = {}  # plugin name -> why it did nothing in the last generation
        self.last_actions: dict[str, int] = {}  # plugin name -> what it did in the last generation
        self._warned_idle: set[tuple[str, str]] = set()
        self._adapters = _adapter_signature(transformer)
        self._tracker_hook: _TrackerHook | None = None
        self.attention: AttentionInterceptor | None = None
        null_class = getattr(transformer.config, "num_embeds_ada_norm", None) if self.spec.family == "dit" else None
        self.tracker = StepTracker(
            self.spec,
            on_reset=self._on_reset,
            cfg_convention=cfg_convention_for(pipe, self.spec) if pipe is not None else None,
            guidance_probe=(lambda: guidance_of(pipe)) if pipe is not None else None,
            null_class_label=null_class,
        )
        self.stats = StatsRecorder(transformer, self.spec)
        try:
            self.attention = AttentionInterceptor(
                transformer, self.spec, self.tracker,
                attach_hooks=any(plugin_for(config).may_route_attention() for config in recipe.plugins))
            self.tracker.scheduler_parameterization = parameterization_of(getattr(pipe, "scheduler", None))
            target = InstallTarget(transformer, self.spec, self.tracker, self.attention, self.stats, self.plugins)
            self._check_install_conflicts(recipe)
            for config in recipe.plugins:
                if getattr(plugin_for(config), "skips_block_ranges", False) and getattr(pipe, "controlnet", None) is not None:
                    raise ValueError(
                        f"{config.type_name} skips whole ranges of blocks and reuses their residual, but "
                        f"{type(pipe).__name__} adds ControlNet residuals between the blocks at every step (they would "
                        "be counted twice); use a sub-layer cache (fora, taylorseer, toca), which recomputes each "
                        "block's input with the current step's ControlNet residuals")
                plugin = plugin_for(config)(config, target)
                try:
                    plugin.install()
                except BaseException:
                    with contextlib.suppress(Exception):  # undo whatever it attached before failing
                        plugin.remove()
                    raise
                self.plugins.append(plugin)
            for plugin in self.plugins:
                plugin.check_companions(self.plugins)
            self._tracker_hook = _TrackerHook(self)
            attach(transformer, self._tracker_hook, TRACKER_HOOK)
        except BaseException:
            self.remove()
            raise

    def _check_install_conflicts(self, recipe: Recipe) -> None:
        """Layer patterns that differ as text may still select the same layers: check against the real model."""
        names = self.stats.sublayer_names
        for i, a in enumerate(recipe.plugins):
            for b in recipe.plugins[i + 1:]:
                if a.kind != b.kind or steps_disjoint(a, b):
                    continue
                shared = [n for n in names if matches_layers(a.layers, n) and matches_layers(b.layers, n)]
                if shared:
                    raise ValueError(conflict_message(a, b, where=f" on {shared[0]}"))

    def _on_reset(self, reason: str) -> None:
        # Adapters change between generations, and every generation starts with a reset ("start" or "change"); the
        # resets that end one need not walk the modules (~1 ms on a zoo model).
        adapters = _adapter_signature(self.transformer) if reason in ("start", "change") else self._adapters
        if adapters != self._adapters:  # a LoRA adapter was loaded, swapped, re-weighted, fused or unloaded
            self._adapters = adapters
            self.stats.rebuild()
            for plugin in self.plugins:
                plugin.model_changed()
        current = self.stats.current
        if reason == "error":
            self.stats.discard()
        else:
            if current is not None and current.transformer_calls:
                self._report_idle(current.steps)
            self.stats.finish()
        for plugin in self.plugins:
            plugin.reset()
            plugin.actions = 0

    def _report_idle(self, steps: int) -> None:
        """After a generation: which plugins did nothing, and why (warned once per plugin and reason)."""
        self.idle = {}
        self.last_actions = {plugin.name: plugin.actions for plugin in self.plugins}
        for plugin in self.plugins:
            if plugin.actions:
                continue
            reason = plugin.idle_reason(steps)
            if reason is None:
                continue
            self.idle[plugin.name] = reason
            if (plugin.name, reason) not in self._warned_idle and not plugin.idle_already_said():
                self._warned_idle.add((plugin.name, reason))
                warnings.warn(f"dit_accel {plugin.name} did nothing in this generation: {reason}", IdlePluginWarning,
                              stacklevel=2)

    def cache_bytes(self) -> int:
        return sum(plugin.cache_bytes() for plugin in self.plugins)

    def remove(self) -> None:
        if self._tracker_hook is not None:
            detach(self.transformer, TRACKER_HOOK)
            self._tracker_hook = None
        for plugin in reversed(self.plugins):
            plugin.remove()
        self.plugins.clear()
        if self.attention is not None:
            self.attention.remove()
            self.attention = None


class AccelerationHandle:
    """What :func:`accelerate_dit` returns: stats, summary, reset and removal of one acceleration."""

    def __init__(self, target: Any, recipe: Recipe) -> None:
        self.target = target
        self.recipe = recipe
        self.transformers: list[_AcceleratedTransformer] = []
        self._restores: list = []
        self._compiled: list = []

    @property
    def active(self) -> bool:
        return bool(self.transformers)

    @property
    def stats(self) -> GenerationStats | None:
        """The stats of the last finished generation of the (first) transformer, or of the running one."""
        if not self.transformers:
            return None
        recorder = self.transformers[0].stats
        return recorder.last if recorder.last is not None else recorder.current

    def stats_by_transformer(self) -> dict[str, GenerationStats | None]:
        return {
            acc.spec.family + (f"#{i}" if i else ""): (acc.stats.last or acc.stats.current)
            for i, acc in enumerate(self.transformers)
        }

    def summary(self) -> str:
        """A text table of the last generation: per block and sub-layer, computed / reused / forecast counts and
        the estimated FLOPs relative to the dense run."""
        parts = []
        for acc, (label, stats) in zip(self.transformers, self.stats_by_transformer().items()):
            text = format_summary(stats, recipe=self.recipe.name, model=label)
            text += "".join(f"\nplugin {name!r} did nothing in the last generation: {why}" for name, why in acc.idle.items())
            parts.append(text)
        return "\n\n".join(parts) if parts else f"dit_accel: recipe {self.recipe.name!r} has been removed"

    def compile(self, **options: Any) -> "AccelerationHandle":
        """``torch.compile`` the transformer blocks around the acceleration: every block, or where a plugin makes
        decisions inside a block, the parts without decisions (see ``dit_accel.core.compile``). ``options`` go to
        ``torch.compile`` (e.g. ``fullgraph=True``, ``mode="max-autotune"``). Undone by ``remove()``."""
        for acc in self.transformers:
            blocks = [block for _, _, block, _ in acc.spec.blocks(acc.transformer)]
            self._compiled.append(compile_regions(blocks, **options))
        return self

    def begin(self, num_steps: int | None = None, *, timesteps: Any = None, cfg: str | None = None,
              prediction: Any = None) -> None:
        """Declare the generations of a custom sampling loop (no diffusers scheduler): each has ``num_steps`` steps
        (or ``len(timesteps)``), so that schedules relative to the end (``last_steps``, magcache's curve, cfg-share's
        window) apply; ``cfg`` names how the loop runs classifier-free guidance, to label rows ``cond``/``uncond``:
        ``"batched-cond-first"`` (one call, conditional rows first), ``"batched-uncond-first"``,
        ``"separate-cond-first"`` (two calls per step, conditional first) or ``"none"``. DiT's null class labels
        rows by itself. ``prediction`` says what the model predicts, for plugins that forecast the clean sample
        (magcache's ``forecast_space``): ``"flow"`` (flow matching, timestep input ``sigma`` or ``1000 sigma``), a
        diffusers scheduler, or a :class:`~dit_accel.caching.prediction_space.Parameterization`; ``None`` leaves it
        unknown. Holds until :meth:`end`; several generations may run in between (each starts when the timestep
        jumps back up). Pipelines need none of this: their scheduler declares it."""
        from dit_accel.caching.prediction_space import Parameterization
        from dit_accel.pipelines.adapters import CFG_CONVENTIONS

        if timesteps is not None:
            if num_steps is not None and num_steps != len(timesteps):
                raise ValueError(f"num_steps = {num_steps} but {len(timesteps)} timesteps were given; pass one")
            num_steps = len(timesteps)
        if num_steps is not None and (isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1):
            raise ValueError(f"num_steps = {num_steps!r} is not allowed; allowed: a positive integer")
        allowed = sorted(set(CFG_CONVENTIONS.values())) + ["none"]
        if cfg is not None and cfg not in allowed:
            raise ValueError(f"cfg = {cfg!r} is not allowed; allowed: {', '.join(allowed)}")
        if prediction == "flow":
            prediction = Parameterization("flow")
        elif prediction is not None and not isinstance(prediction, Parameterization):
            described = parameterization_of(prediction)
            if described is None:
                raise ValueError(f"prediction = {prediction!r} is not allowed; allowed: 'flow', a diffusers scheduler "
                                 "whose model prediction dit_accel can tell (flow matching, or alphas_cumprod with "
                                 "prediction_type epsilon / v_prediction / sample), a Parameterization, or None")
            prediction = described
        for acc in self.transformers:
            acc.tracker.declare(num_steps, cfg, prediction)

    def end(self) -> None:
        """End what :meth:`begin` declared: the running generation ends and plugin state is dropped."""
        for acc in self.transformers:
            acc.tracker.undeclare()

    @contextlib.contextmanager
    def generation(self, num_steps: int | None = None, *, timesteps: Any = None, cfg: str | None = None,
                   prediction: Any = None):
        """``with handle.generation(num_steps=50, cfg="batched-cond-first", prediction="flow"): <your loop>``:
        :meth:`begin` on entry, :meth:`end` on exit; an exception inside drops all state as a failed generation."""
        self.begin(num_steps, timesteps=timesteps, cfg=cfg, prediction=prediction)
        try:
            yield self
        except BaseException:
            for acc in self.transformers:
                acc.tracker.undeclare(reason="error")
            raise
        else:
            self.end()

    def reset(self) -> None:
        """Drop all plugin state now (the next call starts a fresh generation)."""
        for acc in self.transformers:
            acc.tracker.reset(reason="end")

    def remove(self) -> None:
        """Remove every hook and wrapper; the model then computes exactly what it computed before."""
        for regions in self._compiled:
            regions.undo()
        self._compiled.clear()
        for restore in reversed(self._restores):
            restore()
        self._restores.clear()
        for acc in self.transformers:
            acc.remove()
            vars(acc.transformer).pop(_HANDLE_ATTR, None)
        self.transformers.clear()
        if vars(self.target).get(_HANDLE_ATTR) is self:
            del vars(self.target)[_HANDLE_ATTR]

    def __repr__(self) -> str:
        families = ", ".join(acc.spec.family for acc in self.transformers) or "removed"
        return f"AccelerationHandle(recipe={self.recipe.name!r}, transformers=[{families}])"


def _is_pipeline(obj: Any) -> bool:
    from diffusers import DiffusionPipeline

    return isinstance(obj, DiffusionPipeline)


def _transformers_of(target: Any) -> list[torch.nn.Module]:
    if _is_pipeline(target):
        found = [getattr(target, attr, None) for attr in ("transformer", "transformer_2")]
        found = [t for t in found if t is not None]
        if not found:
            raise TypeError(
                f"{type(target).__name__} has no `transformer` component; dit_accel accelerates diffusion-transformer "
                "pipelines (UNet pipelines are not supported)"
            )
        return found
    if isinstance(target, torch.nn.Module):
        return [target]
    raise TypeError(
        f"accelerate_dit expects a diffusers pipeline or transformer model, got {type(target).__name__}"
    )


def accelerate_dit(pipe_or_transformer: Any, recipe: "str | Path | Recipe" = "none", **overrides: Any) -> AccelerationHandle:
    """Accelerate a Diffusers DiT pipeline (or a bare transformer) with a recipe.

    Args:
        pipe_or_transformer: a ``DiffusionPipeline`` with a ``transformer`` (and optionally ``transformer_2``), or
            the transformer model itself (then call ``handle.reset()`` between generations if your loop does not
            use a diffusers scheduler).
        recipe: ``"none"`` (default: install the machinery, change nothing), a named recipe (``"fora"``), a
            composition (``"fora+int8"``), a path to a ``.toml`` file, or a :class:`Recipe`.
        **overrides: plugin fields to change, e.g. ``interval=4`` or ``fora__interval=4``.

    Returns:
        An :class:`AccelerationHandle` (``summary()``, ``stats``, ``reset()``, ``remove()``).

    Applying again replaces the previous acceleration; only the instance is changed, never a class or a
    process-wide function.
    """
    resolved = load_recipe(recipe, **overrides)
    transformers = _transformers_of(pipe_or_transformer)
    for transformer in transformers:
        spec_for(transformer)  # fail before touching anything
    remove_acceleration(pipe_or_transformer)
    for transformer in transformers:
        remove_acceleration(transformer)

    handle = AccelerationHandle(pipe_or_transformer, resolved)
    pipe = pipe_or_transformer if _is_pipeline(pipe_or_transformer) else None
    try:
        for transformer in transformers:
            handle.transformers.append(_AcceleratedTransformer(transformer, resolved, pipe))
            vars(transformer)[_HANDLE_ATTR] = handle
        if pipe is not None:
            wrap_pipeline(pipe, handle)
    except BaseException:
        handle.remove()
        raise
    vars(pipe_or_transformer)[_HANDLE_ATTR] = handle
    return handle


def _adapter_signature(transformer: torch.nn.Module) -> tuple:
    """Which PEFT adapters are active where, at which scales, and whether merged: what a hot swap changes."""
    found = []
    for name, module in transformer.named_modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict) and hasattr(module, "active_adapters"):
            found.append((name, tuple(module.active_adapters), tuple(sorted(scaling.items())),
                          tuple(getattr(module, "merged_adapters", ())), bool(getattr(module, "disable_adapters", False))))
    return tuple(found)


def remove_acceleration(pipe_or_transformer: Any) -> bool:
    """Remove the acceleration applied to a pipeline or transformer. Returns whether there was one."""
    handle = vars(pipe_or_transformer).get(_HANDLE_ATTR) if hasattr(pipe_or_transformer, "__dict__") else None
    if handle is None:
        return False
    handle.remove()
    return True


def get_handle(pipe_or_transformer: Any) -> AccelerationHandle | None:
    """The active handle of an accelerated pipeline or transformer, if any."""
    return vars(pipe_or_transformer).get(_HANDLE_ATTR) if hasattr(pipe_or_transformer, "__dict__") else None
