"""The forecasters of :mod:`dit_accel.caching.forecasters`, exact on their defining cases."""

from __future__ import annotations

import math

import pytest
import torch

from dit_accel.caching.forecasters import (
    foca_forecast,
    foca_update,
    hermite_coefficients,
    hermite_forecast,
    taylor_forecast,
    update_differences,
)


def _state(values: dict[float, float], order: int):
    state = None
    for position, value in values.items():  # oldest first, as full steps arrive
        state = update_differences(state, torch.tensor([value], dtype=torch.float64), position, order)
    return state


@pytest.mark.parametrize("sigma", [0.5, 0.6, 1 / math.sqrt(2), 1.0])
@pytest.mark.parametrize("x", [-3.0, -1.0, 0.5, 2.0])
def test_hermite_coefficients_closed_forms(sigma, x):
    first, second, third = hermite_coefficients(3, x, sigma)
    assert first == pytest.approx(2 * sigma**2 * x)
    assert second == pytest.approx(2 * sigma**4 * x**2 - sigma**2)
    y = sigma * x  # H_3(y) = 8y^3 - 12y
    assert third == pytest.approx((8 * y**3 - 12 * y) * sigma**3 / 6)


def test_hermite_at_inverse_sqrt_two_is_probabilists_hermite():
    x = 1.7
    alphas = hermite_coefficients(3, x, 1 / math.sqrt(2))
    assert alphas == pytest.approx([x, (x * x - 1) / 2, (x**3 - 3 * x) / 6])


def test_hermite_forecast_uses_derivative_estimates():
    """On f(x) = 3 + 2x + x^2 sampled at 0, 1, 2 (newest 2): D1 = F[2,1] = 5, D2 = 2 F[2,1,0] = 2; the forecast at
    x = 2 + d is f(2) + alpha_1 D1 + alpha_2 D2."""
    f = {0.0: 3.0, 1.0: 6.0, 2.0: 11.0}
    state = _state(f, order=2)
    sigma, d = 0.5, 1.5
    alpha_1, alpha_2 = hermite_coefficients(2, d, sigma)
    expected = 11.0 + alpha_1 * 5.0 + alpha_2 * 2.0
    assert hermite_forecast(state, 2.0 + d, sigma).item() == pytest.approx(expected)
    # At order 1 with sigma = 1/sqrt(2) it is linear extrapolation, like Taylor/Newton.
    linear = _state({1.0: 6.0, 2.0: 11.0}, order=1)
    assert hermite_forecast(linear, 3.5, 1 / math.sqrt(2)).item() == pytest.approx(taylor_forecast(linear, 3.5).item())
    assert hermite_forecast(_state({2.0: 11.0}, order=2), 5.0, 0.5).item() == 11.0  # one point: reuse


def _line(position: float) -> torch.Tensor:
    return torch.tensor([1.0 + 2.0 * position], dtype=torch.float64)


def test_foca_is_exact_on_a_line_at_any_full_step_gap():
    """Full steps at 0 and 3 (a gap of 3): the anchor slope is divided by the real gap, so the forecasts at 4, 5 and
    6 lie on the line; cache-dit's undivided slope would be 3x too steep."""
    state = foca_update(foca_update(None, _line(0.0), 0.0), _line(3.0), 3.0)
    for position in (4.0, 5.0, 6.0):
        value, state = foca_forecast(state, position, horizon=10.0)
        assert value.item() == pytest.approx(_line(position).item())


def test_foca_horizon_is_monotone():
    """Beyond the horizon the forecast stays at the horizon's value instead of falling back toward the anchor."""
    state = foca_update(foca_update(None, _line(0.0), 0.0), _line(1.0), 1.0)
    values = []
    for position in (2.0, 3.0, 4.0, 5.0, 6.0):
        value, state = foca_forecast(state, position, horizon=3.0)
        values.append(value.item())
    assert values == sorted(values) and values[-1] == pytest.approx(values[-2])
    assert values[2] == pytest.approx(_line(4.0).item())  # within the horizon: exact


def test_foca_averages_the_anchor_and_local_slopes():
    """Full values 0 at 0 and 2 at 1 (slope 2): the first forecast, at 2, is 4. A full step at 3 that reads 3 gives
    the anchor slope (3 - 2) / 2 = 0.5 and the local slope (3 - 4) / 1 = -1 (from the recursion's forecast at 2):
    the forecast at 4 is 3 + 1 * (0.5 - 1) / 2 = 2.75."""
    state = foca_update(foca_update(None, torch.tensor([0.0]), 0.0), torch.tensor([2.0]), 1.0)
    value, state = foca_forecast(state, 2.0, horizon=3.0)
    assert value.item() == pytest.approx(4.0)
    state = foca_update(state, torch.tensor([3.0]), 3.0)
    value, state = foca_forecast(state, 4.0, horizon=3.0)
    assert value.item() == pytest.approx(2.75)


def test_foca_reuses_with_one_full_value_and_restarts_on_a_new_shape():
    state = foca_update(None, torch.ones(2), 0.0)
    value, _ = foca_forecast(state, 5.0, horizon=3.0)
    assert torch.equal(value, torch.ones(2))
    restarted = foca_update(foca_update(state, torch.ones(2), 1.0), torch.zeros(3), 2.0)
    assert restarted.previous_full is None and restarted.full.shape == (3,)
