"""FORA: Fast-Forward Caching (Selvaraju et al., 2024, arXiv 2407.01425).

Every ``interval`` steps each block's attention and MLP sub-layers are computed and their outputs (taken before
the gate) cached; in between, the cached outputs are reused while the block's modulation and gates are computed
fresh for the current timestep. The first and last steps can be forced to compute: the first steps shape the
image's layout and the last ones its fine detail.

The schedule depends on the step alone, so under sequence parallelism (``ulysses``/``ring``/``patch``) every rank
reuses on the same steps and caches its own shard of each output: nothing to exchange.
"""

from __future__ import annotations

from dataclasses import dataclass

from dit_accel.caching.sublayer import IntervalSubLayerPlugin, computes_at
from dit_accel.core.context import CallContext
from dit_accel.core.plugin import register_plugin
from dit_accel.recipe import PluginConfig, check_choice, check_range, register_config


fora_computes = computes_at  # FORA's schedule: see computes_at


@register_config("fora")
@dataclass(frozen=True)
class ForaConfig(PluginConfig):
    """FORA: reuse attention and MLP outputs (pre-gate) between full steps.

    Args:
        interval (`int`, defaults to `3`): compute every ``interval`` steps, reuse in between. 1 disables the
            cache; 2-4 keeps quality close to dense, quality falls off quickly beyond 4 (the paper uses 3).
            Allowed: 1-50.
        first_steps (`int`, defaults to `1`): steps at the start that always compute. Allowed: 0-1000.
        last_steps (`int`, defaults to `1`): steps at the end that always compute. Allowed: 0-1000.
        anchor (`str`, defaults to `"start"`): where the grid of full steps is anchored: ``"start"`` counts every
            ``interval`` steps from ``first_steps``; ``"end"`` counts back from the final step (when the schedule
            length is known), so the final step is a full step at no extra cost (diffusers' TaylorSeer schedule is
            ``first_steps=3, last_steps=0, anchor="end"`` at 50 steps, interval 3).
    """

    kind = "schedule"
    interval: int = 3
    first_steps: int = 1
    last_steps: int = 1
    anchor: str = "start"

    def validate(self) -> None:
        check_range(self, "interval", 1, 50, integer=True)
        check_range(self, "first_steps", 0, 1000, integer=True)
        check_range(self, "last_steps", 0, 1000, integer=True)
        check_choice(self, "anchor", ("start", "end"))


@register_plugin(ForaConfig)
class ForaPlugin(IntervalSubLayerPlugin):
    serves_blocks = True  # whole blocks served: at proj_out (MergedOutput) or residual (ResidualOutput)

    def serve(self, context: CallContext, name: str):
        if not self.cached_step(context):
            return None
        cached = self.store.get(name, context.slot)
        return None if cached is None else (cached, "reused")

    def peek(self, context: CallContext, name: str):
        """What a reused step would serve (the rows a cfg-cache call leaves out keep it)."""
        return self.store.get(name, context.slot)

    def update(self, context: CallContext, name: str, output, args: tuple = (), kwargs: dict | None = None) -> None:
        self.store.put(name, context.slot, output)
