"""Plugins used only by the tests: they exercise the machinery (routing, state, reset) with checkable effects."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from dit_accel.core.attention import AttentionCall
from dit_accel.core.plugin import Plugin, register_plugin
from dit_accel.recipe import PluginConfig, check_range, register_config


@register_config("test-attention-counter")
@dataclass(frozen=True)
class CounterConfig(PluginConfig):
    """Identity attention plugin: counts calls per layer and checks the layout it is given."""

    kind = "attention"


@register_plugin(CounterConfig)
class CounterPlugin(Plugin):
    kind = "attention"

    def install(self) -> None:
        self.calls: Counter = Counter()
        self.seen: list[tuple] = []
        self.target.route_attention(self, self._attend)

    def _attend(self, query, key, value, call: AttentionCall) -> torch.Tensor:
        self.calls[call.layer.name] += 1
        self.seen.append((call.layer, call.layout, query.shape, key.shape, call.context))
        return call.dense(query, key, value)

    def remove(self) -> None:
        self.target.attention.unroute(self)


@register_config("test-attention-scale")
@dataclass(frozen=True)
class ScaleConfig(PluginConfig):
    """Changes the model's output on purpose: multiplies attention outputs by ``factor`` within ``steps``."""

    kind = "attention"
    factor: float = 0.5

    def validate(self) -> None:
        check_range(self, "factor", 0.0, 10.0)


@register_plugin(ScaleConfig)
class ScalePlugin(Plugin):
    kind = "attention"

    def install(self) -> None:
        self.target.route_attention(self, self._attend)

    def _attend(self, query, key, value, call: AttentionCall) -> torch.Tensor:
        return call.dense(query, key, value) * self.config.factor

    def remove(self) -> None:
        self.target.attention.unroute(self)


@register_config("test-attention-reuse")
@dataclass(frozen=True)
class ReuseConfig(PluginConfig):
    """A stateful attention cache: computes attention on the first step of a generation and reuses it after,
    per layer and per branch slot. Any state leaking between generations changes the output."""

    kind = "attention"


@register_plugin(ReuseConfig)
class ReusePlugin(Plugin):
    kind = "attention"

    def install(self) -> None:
        self.cache: dict = {}
        self.resets = 0
        self.target.route_attention(self, self._attend)

    def _attend(self, query, key, value, call: AttentionCall) -> torch.Tensor:
        slot_key = (call.layer.name, call.index, call.context.slot)
        cached = self.cache.get(slot_key)
        if cached is None:  # no shape check on purpose: leaked state must show up as a failure
            cached = self.cache[slot_key] = call.dense(query, key, value)
        return cached

    def reset(self) -> None:
        self.resets += 1
        self.cache.clear()

    def remove(self) -> None:
        self.target.attention.unroute(self)

    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.cache.values())


@register_config("test-schedule-probe")
@dataclass(frozen=True)
class ProbeConfig(PluginConfig):
    """Records the tracker's decision for every transformer call; reports one sub-layer as reused per call."""

    kind = "schedule"
    report_reused: bool = False


@register_plugin(ProbeConfig)
class ProbePlugin(Plugin):
    kind = "schedule"

    def install(self) -> None:
        self.contexts = []
        # A pre-hook on the first block runs inside the transformer's forward, once per transformer call.
        first_block = self.target.spec.blocks(self.target.transformer)[0][2]
        self._handle = first_block.register_forward_pre_hook(self._pre, with_kwargs=True)

    def _pre(self, module, args, kwargs):
        context = self.target.tracker.current
        self.contexts.append(context)
        if self.config.report_reused:
            self.target.stats.record(context, self.target.stats.sublayer_names[0], "reused")

    def remove(self) -> None:
        self._handle.remove()
