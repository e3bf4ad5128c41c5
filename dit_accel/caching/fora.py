"""FORA: Fast-Forward Caching (Selvaraju et al., 2024, arXiv 2407.01425).

Every ``interval`` steps each block's attention and MLP sub-layers are computed and their outputs (taken before
the gate) cached; in between, the cached outputs are reused while the block's modulation and gates are computed
fresh for the current timestep. The first and last steps can be forced to compute: the first steps shape the
image's layout and the last ones its fine detail.
"""

from __future__ import annotations

from dataclasses import dataclass

from dit_accel.caching.sublayer import SubLayerStore
from dit_accel.core.context import CallContext
from dit_accel.core.plugin import Plugin, register_plugin
from dit_accel.recipe import PluginConfig, check_range, register_config


def fora_computes(step: int, num_steps: int | None, interval: int, first_steps: int, last_steps: int) -> bool:
    """Whether FORA computes (rather than reuses) at ``step``.

    Steps ``< first_steps`` and the last ``last_steps`` steps (when the schedule length is known) always compute;
    in between, a step computes every ``interval`` steps counting from ``first_steps``.
    """
    if step < first_steps or interval == 1:
        return True
    if num_steps is not None and step >= num_steps - last_steps:
        return True
    return (step - first_steps) % interval == 0


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
    """

    kind = "schedule"
    interval: int = 3
    first_steps: int = 1
    last_steps: int = 1

    def validate(self) -> None:
        check_range(self, "interval", 1, 50, integer=True)
        check_range(self, "first_steps", 0, 1000, integer=True)
        check_range(self, "last_steps", 0, 1000, integer=True)


@register_plugin(ForaConfig)
class ForaPlugin(Plugin):
    kind = "schedule"

    def install(self) -> None:
        self.store = SubLayerStore(self.target, "dit_accel.fora")
        self.sublayers = self.store.install(self.config.layers, self)

    def serve(self, context: CallContext, name: str):
        config = self.config
        if not self.target.in_scope(config, context) or fora_computes(
            context.step, context.num_steps, config.interval, config.first_steps, config.last_steps
        ):
            return None
        cached = self.store.get(name, context.slot)
        return None if cached is None else (cached, "reused")

    def update(self, context: CallContext, name: str, output, args: tuple = ()) -> None:
        self.store.put(name, context.slot, output)

    def reset(self) -> None:
        self.store.clear()

    def remove(self) -> None:
        self.store.remove()

    def cache_bytes(self) -> int:
        return self.store.nbytes()
