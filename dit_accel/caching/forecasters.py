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

from dit_accel.caching.taylorseer import taylor_forecast, update_differences

FORECASTERS = ("taylor", "hermite", "foca")
NewtonState = tuple[list[float], list[torch.Tensor]]


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


__all__ = ["FORECASTERS", "FoCaState", "foca_forecast", "foca_update", "hermite_coefficients", "hermite_forecast",
           "taylor_forecast", "update_differences"]
