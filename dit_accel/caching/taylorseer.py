"""TaylorSeer: from reusing to forecasting (Liu et al., ICCV 2025, arXiv 2503.06923).

On full steps each sub-layer's output (pre-gate) updates a finite-difference Taylor expansion
``[F, dF, d2F, ...]`` up to order O; on the steps in between the output is forecast as
``sum_i d^iF * k^i / i!`` where k is the distance from the last full step. Order 0 is FORA. The distance is
measured either in the transformer's timestep input (``"timestep"``, correct on non-uniform and shifted schedules)
or in step indices (``"step"``, the reference code's choice).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dit_accel.caching.fora import fora_computes
from dit_accel.caching.sublayer import SubLayerStore, flatten_output
from dit_accel.core.context import CallContext
from dit_accel.core.plugin import Plugin, register_plugin
from dit_accel.recipe import PluginConfig, check_choice, check_range, register_config

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def update_differences(previous: list[torch.Tensor] | None, value: torch.Tensor, distance: float | None,
                       order: int) -> list[torch.Tensor]:
    """The factors ``[F, dF, ..., d^mF]`` after a full computation ``value`` at ``distance`` from the previous full
    computation whose factors were ``previous``; m grows by one per full step up to ``order``."""
    factors = [value]
    if previous is not None and distance:
        for i in range(min(order, len(previous))):
            factors.append((factors[i] - previous[i]) / distance)
    return factors


def taylor_forecast(factors: list[torch.Tensor], k: float) -> torch.Tensor:
    """``sum_i factors[i] * k**i / i!``."""
    result = factors[0]
    for i in range(1, len(factors)):
        result = result + factors[i] * (k**i / math.factorial(i))
    return result


@register_config("taylorseer")
@dataclass(frozen=True)
class TaylorSeerConfig(PluginConfig):
    """TaylorSeer: forecast attention and MLP outputs (pre-gate) by a Taylor expansion between full steps.

    Args:
        interval (`int`, defaults to `4`): a full step every ``interval`` steps, forecasts in between. 3-6 typical
            (paper: 6 on FLUX, 4-5 on DiT/video). Allowed: 1-50.
        order (`int`, defaults to `2`): Taylor order O; 0 reuses (FORA), 1-2 is the usual choice, 3-4 only with
            many full steps. Allowed: 0-4.
        first_steps (`int`, defaults to `2`): warm-up steps that always compute (each adds an order). Allowed: 0-1000.
        last_steps (`int`, defaults to `1`): steps at the end that always compute. Allowed: 0-1000.
        distance (`str`, defaults to `"timestep"`): ``"timestep"`` measures k in the transformer's timestep input,
            ``"step"`` in step indices.
        factor_dtype (`str`, defaults to `"float32"`): dtype of the stored factors: ``"float32"``, ``"float16"``,
            ``"bfloat16"`` (half the memory, slightly noisier differences).
    """

    kind = "schedule"
    interval: int = 4
    order: int = 2
    first_steps: int = 2
    last_steps: int = 1
    distance: str = "timestep"
    factor_dtype: str = "float32"

    def validate(self) -> None:
        check_range(self, "interval", 1, 50, integer=True)
        check_range(self, "order", 0, 4, integer=True)
        check_range(self, "first_steps", 0, 1000, integer=True)
        check_range(self, "last_steps", 0, 1000, integer=True)
        check_choice(self, "distance", ("timestep", "step"))
        check_choice(self, "factor_dtype", tuple(_DTYPES))


@register_plugin(TaylorSeerConfig)
class TaylorSeerPlugin(Plugin):
    kind = "schedule"

    def install(self) -> None:
        self.store = SubLayerStore(self.target, "dit_accel.taylorseer")
        self.sublayers = self.store.install(self.config.layers, self)
        self._dtype = _DTYPES[self.config.factor_dtype]

    def _position(self, context: CallContext) -> float:
        return float(context.step) if self.config.distance == "step" else context.timestep

    def serve(self, context: CallContext, name: str):
        config = self.config
        if not self.target.in_scope(config, context) or fora_computes(
            context.step, context.num_steps, config.interval, config.first_steps, config.last_steps
        ):
            return None
        entry = self.store.get(name, context.slot)
        if entry is None:
            return None
        position, factors, dtypes, rebuild = entry
        k = self._position(context) - position
        leaves = [taylor_forecast(f, k).to(dtype) for f, dtype in zip(factors, dtypes)]
        return rebuild(leaves), ("reused" if all(len(f) == 1 for f in factors) else "forecast")

    def update(self, context: CallContext, name: str, output) -> None:
        position = self._position(context)
        leaves, rebuild = flatten_output(output)
        entry = self.store.get(name, context.slot)
        if entry is None or len(entry[1]) != len(leaves):
            previous, distance = [None] * len(leaves), None
        else:
            previous, distance = entry[1], position - entry[0]
        factors = [
            update_differences(old, leaf.detach().to(self._dtype), distance, self.config.order)
            for old, leaf in zip(previous, leaves)
        ]
        self.store.put(name, context.slot, (position, factors, [leaf.dtype for leaf in leaves], rebuild))

    def reset(self) -> None:
        self.store.clear()

    def remove(self) -> None:
        self.store.remove()

    def cache_bytes(self) -> int:
        return self.store.nbytes()
