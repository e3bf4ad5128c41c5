"""The plugin contract and the registry from config type to plugin class (torchao's handler-registry pattern).

A plugin is constructed with its config and an :class:`InstallTarget` (one accelerated transformer: its spec,
tracker, attention interceptor and stats), installs its hooks in :meth:`Plugin.install`, drops all per-generation
state in :meth:`Plugin.reset` (the tracker calls it at every generation start, end and error) and removes every
hook in :meth:`Plugin.remove`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, TypeVar

import torch

from dit_accel.core.attention import AttentionInterceptor, LayerId
from dit_accel.core.blocks import TransformerSpec
from dit_accel.core.context import CallContext, StepTracker
from dit_accel.core.stats import StatsRecorder

if TYPE_CHECKING:
    from dit_accel.recipe import PluginConfig


@dataclass
class InstallTarget:
    """One accelerated transformer, as plugins see it."""

    transformer: torch.nn.Module
    spec: TransformerSpec
    tracker: StepTracker
    attention: AttentionInterceptor
    stats: StatsRecorder
    plugins: list = dataclasses.field(default_factory=list)  # every plugin installed on this transformer, in order

    @property
    def parameterization(self):
        """What the transformer predicts (``caching.prediction_space.Parameterization``) in the running generation:
        the pipeline scheduler's or a custom loop's declaration, held by the shared tracker (plugins hold copies of
        this target); ``None`` where neither says."""
        return self.tracker.parameterization

    def attention_layers(self, config: "PluginConfig") -> list[LayerId]:
        """The attention layers selected by ``config.layers`` (glob patterns over ``transformer_blocks.3.attn``
        style names; a pattern may also name a whole block, ``transformer_blocks.3``, or a list)."""
        return [layer for layer in self.attention.layers if matches_layers(config.layers, layer.name)]

    def route_attention(self, plugin: "Plugin", fn) -> None:
        """Route the attention of the plugin's layers to ``fn`` on the plugin's steps (see ``PluginConfig``)."""
        config = plugin.config
        self.attention.route(
            self.attention_layers(config), fn, owner=plugin, when=lambda context: self.in_scope(config, context),
            steps=config.steps,
        )

    def in_scope(self, config: "PluginConfig", context: CallContext | None) -> bool:
        """Whether the current call lies in the config's step range."""
        if context is None:
            return False
        if config.steps is None:
            return True
        start, end = config.steps
        return start <= context.step < end


def matches_layers(patterns: tuple[str, ...] | None, name: str) -> bool:
    """Whether a sub-layer name is selected by ``patterns`` (``None`` selects everything)."""
    if patterns is None:
        return True
    parts = name.split(".")
    prefixes = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    return any(fnmatch.fnmatchcase(candidate, pattern) for pattern in patterns for candidate in prefixes)


class _CountingStats:
    """The transformer's :class:`StatsRecorder` as one plugin sees it: every ``record``/``record_block`` also
    counts as an action of that plugin (how a generation in which it did nothing is told apart)."""

    def __init__(self, recorder: StatsRecorder, plugin: "Plugin") -> None:
        self._recorder, self._plugin = recorder, plugin

    def record(self, *args, **kwargs) -> None:
        self._plugin.actions += 1
        self._recorder.record(*args, **kwargs)

    def record_block(self, *args, **kwargs) -> None:
        self._plugin.actions += 1
        self._recorder.record_block(*args, **kwargs)

    def record_skipped(self, context, sublayers: list[str], blocks: list[str], event, whole_call: bool = False) -> None:
        self._plugin.actions += len(sublayers) + len(blocks)
        self._recorder.record_skipped(context, sublayers, blocks, event, whole_call)

    def __getattr__(self, name: str):
        return getattr(self._recorder, name)


class Plugin:
    """Base class of all plugins. Subclasses set ``kind`` and override the three lifecycle methods.

    ``actions`` counts what the plugin did differently from the dense run in the running generation (stats events
    it reported, or :meth:`acted` calls of plugins that save no FLOPs, like 8-bit attention); after a generation in
    which it stayed 0 the handle asks :meth:`idle_reason` why, says so in ``handle.summary()`` and warns once.
    """

    kind: str = "schedule"
    actions: int = 0
    # Whether install() may route attention (``target.route_attention``): attention and parallel plugins by default.
    # The transformer's attention layers are hooked only when some plugin of the recipe does.
    routes_attention: bool | None = None

    @classmethod
    def may_route_attention(cls) -> bool:
        return cls.routes_attention if cls.routes_attention is not None else cls.kind in ("attention", "parallel")

    def __init__(self, config: "PluginConfig", target: InstallTarget) -> None:
        self.config = config
        self.target = dataclasses.replace(target, stats=_CountingStats(target.stats, self))

    def acted(self) -> None:
        """Count one action that reports no stats event (a kernel that ran instead of the dense one)."""
        self.actions += 1

    def idle_reason(self, steps: int) -> str | None:
        """Why a ``steps``-step generation ran every call dense under this plugin, naming the setting that would let
        it act; ``None`` when the plugin already said so itself (a calibration run). Subclasses refine it."""
        scope = f" (steps={self.config.steps})" if getattr(self.config, "steps", None) is not None else ""
        return (f"it found nothing to skip in a {steps}-step generation{scope}; check that its settings fit this "
                "schedule and resolution")

    @property
    def name(self) -> str:
        return type(self.config).type_name

    def warn_unknown_length(self, context: CallContext, consequence: str) -> None:
        """Once per plugin, when this generation's schedule length is unknown (a custom loop with no diffusers
        scheduler): a warning that says what the plugin cannot do without it (``consequence``) and how to declare
        the loop."""
        if context.num_steps is not None or getattr(self, "_warned_unknown_length", False):
            return
        self._warned_unknown_length = True
        warnings.warn(
            f"dit_accel {self.name}: the number of steps of this generation is unknown (no scheduler's "
            f"set_timesteps was seen: a custom loop?), so {consequence}; declare "
            "the loop with `with handle.generation(num_steps=N):` (or handle.begin(num_steps=N))",
            UserWarning, stacklevel=4)

    # Whether the plugin's per-slot state follows a call that holds some rows of its slot (CallContext.rows).
    supports_partial_rows: bool = True

    def check_companions(self, plugins: list["Plugin"]) -> None:
        """Raise ``ValueError`` if this plugin cannot run with the others installed on the same transformer."""

    def computes_step(self, step: int, num_steps: int) -> bool | None:
        """Whether the transformer computes (rather than reuses or forecasts) at ``step``, for a ``schedule``
        plugin whose schedule is fixed in advance; ``None`` when it is decided on the fly. Plugins of other kinds
        skip no step and are not asked. A plugin that removes part of a step's work (cfg-cache) places itself on the
        computing steps."""
        return None

    def needs_whole_calls(self) -> bool:
        """Whether this generation's calls must hold every row of their slot (a calibration run); a plugin that
        would run some rows only (cfg-cache) computes them all while any plugin says so."""
        return False

    def idle_already_said(self) -> bool:
        """Whether the plugin already warned why it ran dense (its reason then goes to the summary only)."""
        return False

    def model_changed(self) -> None:
        """The model's weights changed between generations (a LoRA adapter loaded, swapped or fused): drop anything
        kept across generations that depends on them."""

    def install(self) -> None:
        """Register hooks / attention routes on ``self.target``."""

    def reset(self) -> None:
        """Drop all per-generation state (caches, counters, decisions)."""

    def remove(self) -> None:
        """Remove every hook and route this plugin installed."""

    def cache_bytes(self) -> int:
        """Bytes currently held in caches (reported in the stats)."""
        return 0


_PLUGINS: dict[type, type[Plugin]] = {}

P = TypeVar("P", bound=type[Plugin])


def register_plugin(config_cls: type) -> Callable[[P], P]:
    """Class decorator: ``@register_plugin(ForaConfig) class ForaPlugin(Plugin): ...``."""

    def decorator(plugin_cls: P) -> P:
        existing = _PLUGINS.get(config_cls)
        if existing is not None and existing is not plugin_cls:
            raise ValueError(f"{config_cls.__name__} is already handled by {existing.__name__}")
        _PLUGINS[config_cls] = plugin_cls
        return plugin_cls

    return decorator


def plugin_for(config: "PluginConfig") -> type[Plugin]:
    plugin_cls = _PLUGINS.get(type(config))
    if plugin_cls is None:
        raise ValueError(f"no plugin is registered for {type(config).__name__}; use @register_plugin")
    return plugin_cls
