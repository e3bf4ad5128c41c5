"""Forecasters: how a cached feature is carried to a step that is not computed, as pure functions.

Every forecaster reads the values of the last full steps at their positions (timesteps or step indices, whichever the
plugin measures distance in) and returns the value at another position. Positions may be spaced unevenly; a
position on the far side of the newest full step is an extrapolation, the usual case.

- ``"taylor"``: Newton's divided differences (TaylorSeer, :mod:`taylorseer`); order 0 is reuse (FORA), order 1 linear
  extrapolation; exact for polynomials of its order on any spacing.
- ``"hermite"``: HiCache's scaled Hermite forecast (arXiv 2508.16984): ``F0 + sum_k alpha_k D_k`` with the derivative
  estimates ``D_k = k! F[x0..xk]`` and ``alpha_k = H_k(sigma x) sigma^k / k!`` (physicists' Hermite ``H_k``, ``x`` the
  distance from the newest full step). ``sigma = 1/sqrt(2)`` gives ``He_k(x) / k!`` (probabilists'); HiCache's
  default ``sigma = 0.5`` damps the slope to ``0.5 x`` at order 1.
- ``"foca"``: FoCa's predictor-corrector (arXiv 2508.16211) as cache-dit ships it, with its two defects fixed: the
  anchor slope is the difference of the last two full steps divided by their real gap (cache-dit divides by one
  step whatever the gap), and the horizon clamps the distance (cache-dit's blend beyond 3 steps is not monotone:
  +3d, then +2.25d, then +0.225d on a line of slope d). The forecast averages the anchor slope with the local slope
  of its own recursion (the last two values it produced or saw) and advances that recursion by one value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FORECASTERS = ("taylor", "hermite", "foca")
NewtonState = tuple[list[float], list[torch.Tensor]]


def update_differences(previous: tuple[list[float], list[torch.Tensor]] | None, value: torch.Tensor,
                       position: float, order: int) -> tuple[list[float], list[torch.Tensor]]:
    """Add a full computation ``value`` at ``position`` to the divided differences of the previous full steps.

    The state is ``(positions, differences)`` with ``positions = [x0, x1, ...]`` (newest first) and
    ``differences[i] = F[x0, ..., xi]``; it keeps at most ``order + 1`` points, one more per full step.
    """
    if previous is None:
        return [position], [value]
    old_positions, old_differences = previous
    differences = [value]
    for i in range(min(order, len(old_differences))):
        differences.append(torch.sub(differences[i], old_differences[i]).div_(position - old_positions[i]))
    return ([position] + old_positions)[: len(differences)], differences


def bounded_position(positions: list[float], position: float, horizon: float | None) -> float:
    """``position`` moved to at most ``horizon`` gaps of the two newest full steps past the newest one (``positions``
    newest first); unchanged with ``horizon=None`` or a single full step. A polynomial through two full steps is
    trusted over the span it was measured on: extrapolated four gaps out (magcache's first skips after the dense
    warm-up, whose full steps are adjacent) its slope error grows fourfold."""
    if horizon is None or len(positions) < 2:
        return position
    reach = horizon * abs(positions[0] - positions[1])
    distance = position - positions[0]
    return position if abs(distance) <= reach else positions[0] + math.copysign(reach, distance)


def taylor_forecast(state: tuple[list[float], list[torch.Tensor]], position: float) -> torch.Tensor:
    """The Newton polynomial of the state at ``position``: ``sum_i F[x0..xi] * prod_{j<i} (position - xj)``."""
    return _newton_sum(state, position, None)


def _newton_sum(state: tuple[list[float], list[torch.Tensor]], position: float,
                scale: torch.Tensor | None) -> torch.Tensor:
    """``F[x0] + scale * extrapolation``, one fused multiply-add per order: a forecast reads each cached tensor
    once and writes one result, with no intermediate full-size products."""
    positions, differences = state
    result, weight = differences[0], 1.0
    for i in range(1, len(differences)):
        weight *= position - positions[i - 1]
        if scale is None:
            result = torch.add(result, differences[i], alpha=weight)
        else:
            result = torch.addcmul(result, differences[i], scale * weight)
    return result


def hermite_coefficients(order: int, distance: float, sigma: float) -> list[float]:
    """``[alpha_1, ..., alpha_order]`` with ``alpha_k = H_k(sigma x) sigma^k / k!`` (physicists' Hermite).

    Closed forms: ``alpha_1 = 2 sigma^2 x``, ``alpha_2 = 2 sigma^4 x^2 - sigma^2``.
    """
    y = sigma * distance
    previous, current = 1.0, 2.0 * y  # H_0, H_1
    coefficients = []
    for k in range(1, order + 1):
        if k > 1:  # H_k = 2y H_{k-1} - 2(k-1) H_{k-2}
            previous, current = current, 2.0 * y * current - 2.0 * (k - 1) * previous
        coefficients.append(current * sigma**k / math.factorial(k))
    return coefficients


def hermite_forecast(state: NewtonState, position: float, sigma: float) -> torch.Tensor:
    """HiCache's forecast from the divided differences of :func:`update_differences`: the derivative estimates
    ``D_k = k! F[x0..xk]`` weighted by :func:`hermite_coefficients` at ``x = position - x0``."""
    positions, differences = state
    order = len(differences) - 1
    result = differences[0]
    for k, alpha in enumerate(hermite_coefficients(order, position - positions[0], sigma), start=1):
        result = torch.add(result, differences[k], alpha=alpha * math.factorial(k))
    return result


@dataclass(frozen=True)
class FoCaState:
    """What FoCa keeps per cached stream: the last two full values with their positions, and the last two values of
    its recursion (full or forecast) with theirs."""

    full: torch.Tensor
    full_position: float
    previous_full: torch.Tensor | None = None
    previous_full_position: float = 0.0
    recent: torch.Tensor | None = None  # the newest value of the recursion (full or forecast)
    recent_position: float = 0.0
    older: torch.Tensor | None = None
    older_position: float = 0.0


def foca_update(state: FoCaState | None, value: torch.Tensor, position: float) -> FoCaState:
    """A full step: ``value`` computed at ``position`` becomes the anchor; the recursion continues from it."""
    if state is None or state.full.shape != value.shape:
        return FoCaState(full=value, full_position=position, recent=value, recent_position=position)
    return FoCaState(full=value, full_position=position, previous_full=state.full,
                     previous_full_position=state.full_position, recent=value, recent_position=position,
                     older=state.recent, older_position=state.recent_position)


def foca_forecast(state: FoCaState, position: float, horizon: float) -> tuple[torch.Tensor, FoCaState]:
    """The forecast at ``position`` and the state advanced by it (call once per stream and step).

    ``F = F_full + e (s_full + s_local) / 2`` with ``e`` the distance from the anchor clamped to ``horizon`` (same
    units as positions), ``s_full`` the slope between the last two full values over their real gap and ``s_local``
    the slope between the recursion's last two values. Once the recursion has reached the horizon it holds that
    value. Without two full values it reuses ``F_full``.
    """
    if state.previous_full is None or state.full_position == state.previous_full_position:
        return state.full, state
    full_gap = state.full_position - state.previous_full_position
    slope = (state.full - state.previous_full) / full_gap
    if state.older is not None and state.recent_position != state.older_position:
        slope = 0.5 * (slope + (state.recent - state.older) / (state.recent_position - state.older_position))
    distance = position - state.full_position
    clamped = math.copysign(min(abs(distance), horizon), distance)
    if state.older is not None and clamped == state.recent_position - state.full_position:
        return state.recent, state  # at the horizon already: hold its value (a plateau, never a turn back)
    value = torch.add(state.full, slope, alpha=clamped)
    advanced = FoCaState(full=state.full, full_position=state.full_position, previous_full=state.previous_full,
                         previous_full_position=state.previous_full_position, recent=value,
                         recent_position=state.full_position + clamped, older=state.recent,
                         older_position=state.recent_position)
    return value, advanced


class Forecaster:
    """One forecaster choice over opaque, immutable states: :meth:`update` at a full step, :meth:`predict` between
    (it returns the advanced state: FoCa's recursion moves by one value per prediction, so call it once per stream
    and step)."""

    name = "taylor"

    def __init__(self, order: int, horizon: float | None = None) -> None:
        self.order = order
        # None: extrapolate as far as asked. A number: at most that many newest full-step gaps past the newest full
        # step; beyond, the forecast holds its value (see :func:`bounded_position`).
        self.horizon = horizon

    def update(self, state, value: torch.Tensor, position: float):
        return update_differences(state, value, position, self.order)

    def predict(self, state, position: float) -> tuple[torch.Tensor, object]:
        return taylor_forecast(state, bounded_position(state[0], position, self.horizon)), state

    def points(self, state) -> int:
        """Full values the state extrapolates from (1: the prediction is plain reuse)."""
        return len(state[1])

    def tensors(self, state) -> list[torch.Tensor]:
        return list(state[1])


class HermiteForecaster(Forecaster):
    name = "hermite"

    def __init__(self, order: int, sigma: float, horizon: float | None = None) -> None:
        super().__init__(order, horizon)
        self.sigma = sigma

    def predict(self, state, position: float) -> tuple[torch.Tensor, object]:
        return hermite_forecast(state, bounded_position(state[0], position, self.horizon), self.sigma), state


class FoCaForecaster(Forecaster):
    """``horizon`` is in units of the newest full-step gap (1: at most one gap past the anchor; with full steps
    every 3 steps that is FoCa's 3 steps)."""

    name = "foca"

    def __init__(self, horizon: float) -> None:
        super().__init__(1)
        self.horizon = horizon

    def update(self, state, value: torch.Tensor, position: float):
        return foca_update(state, value, position)

    def predict(self, state, position: float) -> tuple[torch.Tensor, object]:
        gap = abs(state.full_position - state.previous_full_position) if state.previous_full is not None else 0.0
        return foca_forecast(state, position, self.horizon * gap)

    def points(self, state) -> int:
        return 1 if state.previous_full is None else 2

    def tensors(self, state) -> list[torch.Tensor]:
        unique = {id(t): t for t in (state.full, state.previous_full, state.recent, state.older) if t is not None}
        return list(unique.values())


def make_forecaster(kind: str, order: int, *, sigma: float = 0.5, horizon: float = 1.0,
                    bounded: bool = False) -> Forecaster:
    """The forecaster ``kind`` (one of :data:`FORECASTERS`); ``order`` 0 always reuses, whatever the kind. FoCa
    always holds its forecast beyond ``horizon`` full-step gaps; Taylor and Hermite only when ``bounded``."""
    if kind not in FORECASTERS:
        raise ValueError(f"unknown forecaster {kind!r}; allowed: {', '.join(FORECASTERS)}")
    reach = horizon if bounded else None
    if order == 0 or kind == "taylor":
        return Forecaster(order, None if order == 0 else reach)
    return HermiteForecaster(order, sigma, reach) if kind == "hermite" else FoCaForecaster(horizon)


def config_forecaster(config, order_field: str = "forecast_order") -> Forecaster:
    """The forecaster a plugin config's ``forecaster``/``sigma``/``horizon`` fields (and ``bounded_forecast``, where
    it has one) and its order field describe."""
    return make_forecaster(config.forecaster, getattr(config, order_field), sigma=config.sigma,
                           horizon=config.horizon, bounded=getattr(config, "bounded_forecast", False))


def check_forecaster(config, order_field: str) -> None:
    """Validate a config's ``forecaster``/``sigma``/``horizon`` fields (shared by every plugin that forecasts)."""
    from dit_accel.recipe import check_choice, check_range

    check_choice(config, "forecaster", FORECASTERS)
    check_range(config, "sigma", 0.01, 4.0)
    check_range(config, "horizon", 0.1, 100.0)
    if config.forecaster == "foca" and getattr(config, order_field) > 1:
        raise ValueError(f"{type(config).__name__}.{order_field} = {getattr(config, order_field)}: the foca "
                         "forecaster is first order (it reads two full values); use 0 (reuse) or 1")


__all__ = ["FORECASTERS", "FoCaForecaster", "FoCaState", "Forecaster", "HermiteForecaster", "bounded_position",
           "check_forecaster",
           "config_forecaster", "foca_forecast", "foca_update", "hermite_coefficients", "hermite_forecast",
           "make_forecaster", "taylor_forecast", "update_differences"]
