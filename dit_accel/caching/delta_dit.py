"""Δ-DiT: cache the delta (output minus input) of a group of blocks, the rear group early and the front group late
(Chen et al., 2024, arXiv 2406.01125).

The front blocks shape the outline of the image and the rear blocks its details, so in early steps (before the
boundary) the rear group is cached and in late steps the front group. On cached steps the group returns its
current input plus the delta it produced when last computed; a full step every ``interval`` steps refreshes it.
The schedule depends on the step alone, so under sequence parallelism every rank skips the same groups on the same
steps and caches its own shard of the delta.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dit_accel.caching.blockrange import BlockRange
from dit_accel.caching.sublayer import computes_at
from dit_accel.core.context import CallContext
from dit_accel.core.plugin import Plugin, register_plugin
from dit_accel.recipe import PluginConfig, check_range, register_config


def delta_dit_group(step: int, num_steps: int | None, boundary: float) -> str:
    """Which group is cached at ``step``: ``"rear"`` before the boundary (a fraction of the schedule), ``"front"``
    from it on; with an unknown schedule length, always ``"rear"``."""
    if num_steps is None or step < math.ceil(boundary * num_steps):
        return "rear"
    return "front"


@register_config("delta-dit")
@dataclass(frozen=True)
class DeltaDiTConfig(PluginConfig):
    """Δ-DiT: reuse block-group deltas, rear group in early steps, front group in late steps.

    Args:
        interval (`int`, defaults to `3`): a full step every ``interval`` steps. Allowed: 1-50.
        boundary (`float`, defaults to `0.6`): the fraction of the schedule where caching moves from the rear to
            the front group (paper: step 12 of 20 on PixArt). Allowed: 0-1.
        cached_blocks (`int`, defaults to `0`): blocks in each cached group; 0 means half of the blocks (at most
            half, so the groups never overlap). Allowed: 0-256.
        first_steps (`int`, defaults to `1`) / last_steps (`int`, defaults to `1`): always computed.
    """

    kind = "schedule"
    interval: int = 3
    boundary: float = 0.6
    cached_blocks: int = 0
    first_steps: int = 1
    last_steps: int = 1

    def validate(self) -> None:
        check_range(self, "interval", 1, 50, integer=True)
        check_range(self, "boundary", 0.0, 1.0)
        check_range(self, "cached_blocks", 0, 256, integer=True)
        check_range(self, "first_steps", 0, 1000, integer=True)
        check_range(self, "last_steps", 0, 1000, integer=True)


class _GroupPolicy:
    def __init__(self, plugin: "DeltaDiTPlugin", group: str) -> None:
        self.plugin, self.group = plugin, group

    def decide(self, context: CallContext, hidden: torch.Tensor, encoder) -> torch.Tensor:
        config = self.plugin.config
        self.plugin.warn_unknown_length(context, f"boundary={config.boundary} and last_steps={config.last_steps} cannot "
                                        "apply (every cached step reuses the rear group)")
        skip = (
            self.plugin.target.in_scope(config, context)
            and delta_dit_group(context.step, context.num_steps, config.boundary) == self.group
            and not computes_at(context.step, context.num_steps, config.interval, config.first_steps,
                                  config.last_steps)
        )
        return torch.full((hidden.shape[0],), skip, dtype=torch.bool, device=hidden.device)

    def computed(self, context: CallContext, rows: torch.Tensor) -> None:
        return None


@register_plugin(DeltaDiTConfig)
class DeltaDiTPlugin(Plugin):
    kind = "schedule"
    skips_block_ranges = True  # refused where ControlNet adds residuals between blocks

    def install(self) -> None:
        if self.config.layers is not None:
            raise ValueError("delta-dit chooses its block groups itself; it does not take `layers`")
        total = len(self.target.spec.blocks(self.target.transformer))
        cached = self.config.cached_blocks or total // 2
        if not 1 <= cached <= total // 2:  # the front and rear groups must not overlap
            raise ValueError(
                f"DeltaDiTConfig.cached_blocks = {self.config.cached_blocks} does not fit "
                f"{type(self.target.transformer).__name__} with {total} blocks; allowed: 1 to {total // 2} (0: half)"
            )
        self.front = BlockRange(self.target, "dit_accel.delta_dit.front", _GroupPolicy(self, "front"), 0, cached)
        self.rear = BlockRange(self.target, "dit_accel.delta_dit.rear", _GroupPolicy(self, "rear"),
                               total - cached, total)

    def idle_reason(self, steps: int) -> str | None:
        config = self.config
        if all(computes_at(s, steps, config.interval, config.first_steps, config.last_steps) for s in range(steps)):
            return (f"in a {steps}-step generation every step is a full step (interval={config.interval}, "
                    f"first_steps={config.first_steps}, last_steps={config.last_steps}); lower first_steps and "
                    "last_steps, or run more steps")
        return super().idle_reason(steps)

    def reset(self) -> None:
        self.front.clear()
        self.rear.clear()

    def remove(self) -> None:
        self.front.remove()
        self.rear.remove()

    def cache_bytes(self) -> int:
        return self.front.nbytes() + self.rear.nbytes()
