"""TaylorSeer: from reusing to forecasting (Liu et al., ICCV 2025, arXiv 2503.06923).

On full steps each sub-layer's output (pre-gate) updates the divided differences of the last O+1 full steps; on
the steps in between the output is forecast by the polynomial through them. We use Newton's form,
``F[x0] + F[x0,x1](x-x0) + F[x0,x1,x2](x-x0)(x-x1) + ...``, rather than the paper's Taylor form
``sum_i d^iF * k^i / i!`` with backward-difference derivatives: the two agree at order 0 (FORA: reuse) and order 1
(linear extrapolation); at higher orders Newton's form is exact for polynomials of the order on any spacing, while
the Taylor form with backward differences is only first-order accurate. Positions are measured either in the
transformer's timestep input (``"timestep"``, right on non-uniform and shifted schedules) or in step indices
(``"step"``, the reference code's choice).

Verified forecasts (``verify=True``, the default). A forecast that extrapolates a trend the features do not
follow is worse than reuse: on zoo:dit the early features change direction from step to step, and plain order 1
lost to order 0 or beat it depending on where the full steps fell. So every full step first checks the forecast the
previous state would have made for it: the least-squares share ``g`` of the extrapolated change that the computed
output bore out, per sample row. The forecast beat reuse there iff ``g > 0.5``; the next forecasts scale their
change by the trust ``t = min(1, 2 g)`` (clipped at 0), relaxed toward 1 for positions closer than the check's
(``1 - (1 - t) * k / span``: a trend bent by curvature overshoots in proportion to the distance). ``t = 1`` is plain
TaylorSeer; ``t = 0`` is reuse. Chosen on the zoo models' calibration seeds (an uncommitted sweep) over the plain
share ``g``, which damped zoo:mmdit's smooth forecasts, and over a 0/1 switch at ``g = 0.5``.

Under sequence parallelism the two dot products behind ``g`` are summed over the ranks
(:mod:`dit_accel.core.parallel`), so every rank trusts a forecast alike; the schedule itself is fixed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from dit_accel.caching.forecasters import (
    _newton_sum,
    check_forecaster,
    config_forecaster,
    taylor_forecast,
    update_differences,
)
from dit_accel.caching.sublayer import IntervalSubLayerPlugin, flatten_output
from dit_accel.core.context import CallContext
from dit_accel.core.parallel import all_reduce_sum, parallel_setting, replica_weights, shard_positions
from dit_accel.core.plugin import register_plugin
from dit_accel.recipe import PluginConfig, check_bool, check_choice, check_range, register_config

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def extrapolation(state: tuple[list[float], list[torch.Tensor]], position: float) -> torch.Tensor:
    """The forecast's change from the newest full step: ``taylor_forecast(state, position) - F[x0]`` (zeros for a
    state of one point)."""
    positions, differences = state
    if len(differences) == 1:
        return torch.zeros_like(differences[0])
    weight = position - positions[0]
    result = differences[1] * weight
    for i in range(2, len(differences)):
        weight *= position - positions[i - 1]
        result = result + differences[i] * weight
    return result


def forecast_gain(state: tuple[list[float], list[torch.Tensor]], value: torch.Tensor, position: float,
                  reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  weights: torch.Tensor | None = None) -> torch.Tensor:
    """How far to trust the state's forecast change, from how much of it at ``position`` the computed ``value``
    bore out.

    Per sample row (dim 0): ``g = <value - F[x0], e> / <e, e>`` is the least-squares share of the extrapolation
    ``e`` (:func:`extrapolation`) that came true; the forecast beat reuse iff ``g > 0.5``, so the trust is
    ``min(1, 2 g)`` clipped at 0: full where forecasting helped, fading to reuse where it did not; 0 where ``e`` is
    zero. Shape ``(B, 1, ...)`` float32, broadcastable against ``value``; computed on the device (no host sync).
    ``reduce`` (the two dot products stacked, ``(2, B)``, to summed ones): under sequence parallelism it sums them
    over the ranks, so that every rank trusts the forecast alike; ``weights`` (``(L,)``, per token along dim 1 of
    ``value``; :func:`~dit_accel.core.parallel.replica_weights`) weigh each token's terms, so that tokens every rank
    holds count once in the sum.
    """
    positions, differences = state
    rows = value.shape[0] if value.dim() > 1 else 1
    shape = (rows,) + (1,) * (value.dim() - 1) if value.dim() > 1 else (1,)
    if weights is not None:
        weights = weights.to(value.device, torch.float32).view((1, -1) + (1,) * (value.dim() - 2))
    if len(differences) == 2:
        # Order 1, the common case: e = F[x0,x1] w, so both products are dot products of cached tensors with
        # ``value``; vecdot reads each tensor once and allocates nothing full-size (3x faster on CPU).
        slope = differences[1].float()
        weighted = (slope if weights is None else slope * weights).reshape(rows, -1)
        slope = slope.reshape(rows, -1)
        weight = position - positions[0]
        along = torch.linalg.vecdot(value.float().reshape(rows, -1), weighted)
        along = (along - torch.linalg.vecdot(differences[0].float().reshape(rows, -1), weighted)) * weight
        energy = torch.linalg.vecdot(slope, weighted) * (weight * weight)
    else:
        change = extrapolation(state, position).float()
        weighted = (change if weights is None else change * weights).reshape(rows, -1)
        change = change.reshape(rows, -1)
        actual = (value.float() - differences[0].float()).reshape(rows, -1)
        energy = (change * weighted).sum(1)
        along = (actual * weighted).sum(1)
    if reduce is not None:
        along, energy = reduce(torch.stack([along, energy]))
    gain = along / energy.clamp_min(torch.finfo(torch.float32).tiny)
    energy, gain = energy.view(shape), gain.view(shape)
    return torch.where(energy > 0, (2 * gain).clamp(0.0, 1.0), torch.zeros_like(gain))


def verified_forecast(state: tuple[list[float], list[torch.Tensor]], gain: torch.Tensor | None,
                      position: float) -> torch.Tensor:
    """The forecast at ``position`` with its change scaled by ``gain`` (:func:`forecast_gain` of the last check),
    relaxed toward 1 in proportion to how much closer ``position`` is than the check's span; ``None``: unscaled."""
    positions, differences = state
    if gain is None or len(differences) < 2:
        return taylor_forecast(state, position)
    span = abs(positions[0] - positions[1])
    fraction = min(abs(position - positions[0]) / span, 1.0) if span else 1.0
    scale = (1.0 - (1.0 - gain) * fraction).to(differences[0].dtype)
    return _newton_sum(state, position, scale)


@register_config("taylorseer")
@dataclass(frozen=True)
class TaylorSeerConfig(PluginConfig):
    """TaylorSeer: forecast attention and MLP outputs (pre-gate) by a Taylor expansion between full steps.

    Args:
        interval (`int`, defaults to `4`): a full step every ``interval`` steps, forecasts in between. 3-6 typical
            (paper: 6 on FLUX, 4-5 on DiT/video). Allowed: 1-50.
        order (`int`, defaults to `1`): polynomial order O; 0 reuses (FORA), 1 is the reference code's choice for
            FLUX/Wan/HunyuanVideo and measured best on the zoo; 2-4 only with many, closely spaced full steps.
            Allowed: 0-4.
        first_steps (`int`, defaults to `4`): warm-up steps that always compute (each adds an order); the first
            steps' features change least predictably. Allowed: 0-1000.
        last_steps (`int`, defaults to `1`): steps at the end that always compute. Allowed: 0-1000.
        anchor (`str`, defaults to `"start"`): where the grid of full steps is anchored: ``"start"`` counts every
            ``interval`` steps from ``first_steps``; ``"end"`` counts back from the final step (when the schedule
            length is known), so the final step is a full step at no extra cost (diffusers' TaylorSeer schedule is
            ``first_steps=3, last_steps=0, anchor="end"`` at 50 steps, interval 3).
        distance (`str`, defaults to `"timestep"`): ``"timestep"`` measures positions in the transformer's timestep
            input, ``"step"`` in step indices. On a shifted (non-uniform) flow-matching schedule at order 1,
            timesteps measured +1.6 / +0.7 / +0.0 dB PSNR at intervals 3 / 5 / 7 (zoo:mmdit, shift 3; see
            benchmarks/results/caching-cpu.md).
        factor_dtype (`str`, defaults to `"float32"`): dtype of the stored factors: ``"float32"``, ``"float16"``,
            ``"bfloat16"`` (half the memory, slightly noisier differences).
        verify (`bool`, defaults to `True`): scale each forecast by how well the previous one matched the output
            computed at the latest full step (see the module docstring). The `taylorseer` recipe on zoo:dit went from
            29.8 to 41.5 dB PSNR in ``ditaccel bench`` (benchmarks/results/bench-zoo-dit); ``False`` is plain
            TaylorSeer, identical to diffusers' TaylorSeer at orders 0 and 1 on the same schedule and cache points.
            Applies to the ``"taylor"`` forecaster.
        forecaster (`str`, defaults to `"taylor"`): ``"taylor"`` (Newton polynomial of ``order``), ``"hermite"``
            (HiCache's scaled Hermite forecast over the same differences), ``"foca"`` (FoCa's predictor-corrector,
            order 1); see :mod:`dit_accel.caching.forecasters`.
        sigma (`float`, defaults to `0.5`): the Hermite forecaster's scale (HiCache's default). Allowed: 0.01-4.
        horizon (`float`, defaults to `1.0`): the FoCa forecaster's horizon, in full-step gaps. Allowed: 0.1-100.
    """

    kind = "schedule"
    interval: int = 4
    order: int = 1
    first_steps: int = 4
    last_steps: int = 1
    anchor: str = "start"
    distance: str = "timestep"
    factor_dtype: str = "float32"
    verify: bool = True
    forecaster: str = "taylor"
    sigma: float = 0.5
    horizon: float = 1.0

    def validate(self) -> None:
        check_range(self, "interval", 1, 50, integer=True)
        check_range(self, "order", 0, 4, integer=True)
        check_range(self, "first_steps", 0, 1000, integer=True)
        check_range(self, "last_steps", 0, 1000, integer=True)
        check_choice(self, "anchor", ("start", "end"))
        check_choice(self, "distance", ("timestep", "step"))
        check_choice(self, "factor_dtype", tuple(_DTYPES))
        check_bool(self, "verify")
        check_forecaster(self, "order")


@register_plugin(TaylorSeerConfig)
class TaylorSeerPlugin(IntervalSubLayerPlugin):
    serves_blocks = True  # whole blocks served: at proj_out (MergedOutput) or residual (ResidualOutput)

    def install(self) -> None:
        super().install()
        self._dtype = _DTYPES[self.config.factor_dtype]
        self._forecaster = config_forecaster(self.config, "order")
        self._newton = self.config.forecaster == "taylor" or self.config.order == 0
        self._weights: dict[tuple, torch.Tensor | None] = {}  # replica weights by stream layout (_replica_weights)

    def _position(self, context: CallContext) -> float:
        return float(context.step) if self.config.distance == "step" else context.timestep

    def serve(self, context: CallContext, name: str):
        if not self.cached_step(context):
            return None
        entry = self.store.get(name, context.slot)
        if entry is None:
            return None
        states, gains, dtypes, rebuild = entry
        position = self._position(context)
        event = "reused" if all(self._forecaster.points(state) == 1 for state in states) else "forecast"
        if self._newton:
            leaves = [verified_forecast(state, gain, position).to(dtype)
                      for state, gain, dtype in zip(states, gains, dtypes)]
            return rebuild(leaves), event
        predictions = [self._forecaster.predict(state, position) for state in states]
        self.store.put(name, context.slot, ([p[1] for p in predictions], gains, dtypes, rebuild))  # FoCa recursion
        return rebuild([p[0].to(dtype) for p, dtype in zip(predictions, dtypes)]), event

    def _replica_weights(self, value: torch.Tensor, context: CallContext, setting) -> torch.Tensor | None:
        """Under sequence parallelism, the weights that count a token every rank holds once in the gain's sums
        (made once per stream length, grid and device: a check runs on every sub-layer of every full step)."""
        if setting is None or context.grid is None or value.dim() < 3:
            return None
        key = (value.shape[1], context.num_text_tokens, context.grid.num_tokens, setting, value.device)
        if key not in self._weights:
            layout = shard_positions(value.shape[1], setting.world, setting.rank, context.num_text_tokens,
                                     context.grid.num_tokens, self.target.spec.text_position != "last",
                                     setting.text_sharded)
            weights = replica_weights(layout, setting.world)
            self._weights[key] = None if weights is None else weights.to(value.device)
        return self._weights[key]

    def peek(self, context: CallContext, name: str):
        """The forecast for this call whatever the schedule says, without advancing FoCa's recursion (the rows a
        cfg-cache call leaves out take it, which keeps their polynomial's trend)."""
        entry = self.store.get(name, context.slot)
        if entry is None:
            return None
        states, gains, dtypes, rebuild = entry
        position = self._position(context)
        if self._newton:
            return rebuild([verified_forecast(state, gain, position).to(dtype)
                            for state, gain, dtype in zip(states, gains, dtypes)])
        return rebuild([self._forecaster.predict(state, position)[0].to(dtype) for state, dtype in zip(states, dtypes)])

    def update(self, context: CallContext, name: str, output, args: tuple = (), kwargs: dict | None = None) -> None:
        position = self._position(context)
        leaves, rebuild = flatten_output(output)
        entry = self.store.get(name, context.slot)
        previous = entry[0] if entry is not None and len(entry[0]) == len(leaves) else [None] * len(leaves)
        if context.rows is not None:
            # Some rows were filled in (a cfg-cache call): restart the polynomial there, as BlockRange does.
            previous = [None] * len(leaves)
        values = [leaf.detach().to(self._dtype) for leaf in leaves]
        setting = parallel_setting(self.target.transformer)
        reduce = None if setting is None else (lambda both: all_reduce_sum(both, setting))
        gains = [
            forecast_gain(old, value, position, reduce, self._replica_weights(value, context, setting))
            if self._newton and self.config.verify and old is not None and len(old[1]) > 1
            and old[1][0].shape == value.shape else None
            for old, value in zip(previous, values)
        ]
        states = [self._forecaster.update(old, value, position) for old, value in zip(previous, values)]
        self.store.put(name, context.slot, (states, gains, [leaf.dtype for leaf in leaves], rebuild))
