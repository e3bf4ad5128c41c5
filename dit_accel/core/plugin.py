"""The plugin contract and the registry from config type to plugin class (torchao's handler-registry pattern).

A plugin is constructed with its config and an :class:`InstallTarget` (one accelerated transformer: its spec,
tracker, attention interceptor and stats), installs its hooks in :meth:`Plugin.install`, drops all per-generation
state in :meth:`Plugin.reset` (the tracker calls it at every generation start, end and error) and removes every
hook in :meth:`Plugin.remove`.
"""

from __future__ import annotations

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


class Plugin:
    """Base class of all plugins. Subclasses set ``kind`` and override the three lifecycle methods."""

    kind: str = "schedule"

    def __init__(self, config: "PluginConfig", target: InstallTarget) -> None:
        self.config = config
        self.target = target

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
