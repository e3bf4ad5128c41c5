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
    bounded_position,
    config_forecaster,
    make_forecaster,
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


def test_forecaster_objects_match_the_pure_functions():
    from dit_accel.caching.forecasters import make_forecaster

    f = make_forecaster("foca", 1, horizon=1.0)  # the horizon is one full-step gap: 2 positions here
    state = f.update(f.update(None, _line(0.0), 0.0), _line(2.0), 2.0)
    assert f.points(state) == 2 and len(f.tensors(state)) == 2  # the recursion shares the full values' tensors
    values = []
    for position in (3.0, 4.0, 5.0):
        value, state = f.predict(state, position)
        values.append(value.item())
    assert values == pytest.approx([_line(3.0).item(), _line(4.0).item(), _line(4.0).item()])
    h = make_forecaster("hermite", 2, sigma=0.5)
    state = h.update(h.update(h.update(None, _line(0.0), 0.0), _line(1.0), 1.0), _line(2.0), 2.0)
    assert h.predict(state, 3.0)[0].item() == pytest.approx(hermite_forecast(state, 3.0, 0.5).item())
    reuse = make_forecaster("hermite", 0)
    assert type(reuse).__name__ == "Forecaster" and reuse.update(None, _line(1.0), 1.0) == ([1.0], [_line(1.0)])
    with pytest.raises(ValueError, match="unknown forecaster 'ab2'; allowed: taylor, hermite, foca"):
        make_forecaster("ab2", 1)


# -- the forecaster choice in the plugins -----------------------------------------------------------------------------
def _generate(pipe, name: str, **kwargs):
    import pipelines_for_tests as pipes

    with torch.no_grad():
        return pipes.output_of(name, pipe(**pipes.call_kwargs(name, **kwargs)))


def _run(name: str, recipe: str, **settings):
    import pipelines_for_tests as pipes
    from dit_accel import accelerate_dit, remove_acceleration

    pipe = pipes.build(name)
    reference = _generate(pipe, name, steps=8)
    handle = accelerate_dit(pipe, recipe, **settings)
    try:
        _generate(pipe, name, steps=8)  # magcache: the first generation calibrates
        output = _generate(pipe, name, steps=8)
        events = handle.stats.totals()
    finally:
        remove_acceleration(pipe)
    assert torch.equal(_generate(pipe, name, steps=8), reference)  # removal is bit-identical
    return output, events


SCHEDULE = {"interval": 3, "first_steps": 2, "last_steps": 0, "verify": False}


def test_hermite_at_inverse_sqrt_two_order_one_is_taylorseer_in_the_plugin():
    taylor, _ = _run("flux", "taylorseer", **SCHEDULE)
    hermite, _ = _run("flux", "taylorseer", forecaster="hermite", sigma=1 / math.sqrt(2), **SCHEDULE)
    damped, _ = _run("flux", "taylorseer", forecaster="hermite", sigma=0.5, **SCHEDULE)
    torch.testing.assert_close(hermite, taylor, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(damped, taylor, rtol=1e-5, atol=1e-5)  # sigma 0.5 halves the slope


@pytest.mark.parametrize("recipe, settings", [
    ("taylorseer", SCHEDULE),
    ("magcache", {"threshold": 100.0, "max_skips": 2, "retention": 0.0, "last_steps": 1}),
    ("fbcache", {"threshold": 10.0, "warmup_steps": 2, "last_steps": 0, "forecast_order": 1, "max_consecutive": 2}),
])
@pytest.mark.parametrize("forecaster", ["hermite", "foca"])
def test_every_forecasting_plugin_takes_every_forecaster(recipe, settings, forecaster):
    """The forecaster is one choice across plugins: each one forecasts (not reuses) with it, and the result
    differs from the Taylor forecaster's on the same schedule."""
    taylor, _ = _run("dit", recipe, **settings)
    output, events = _run("dit", recipe, forecaster=forecaster, **settings)
    assert torch.isfinite(output).all() and events["forecast"] > 0
    assert not torch.equal(output, taylor)


def test_forecaster_settings_are_validated():
    from dit_accel.caching.magcache import MagCacheConfig
    from dit_accel.caching.taylorseer import TaylorSeerConfig

    with pytest.raises(ValueError, match="forecaster = 'bdf'.*allowed: 'taylor', 'hermite', 'foca'"):
        TaylorSeerConfig(forecaster="bdf")
    with pytest.raises(ValueError, match="foca forecaster is first order"):
        TaylorSeerConfig(forecaster="foca", order=2)
    with pytest.raises(ValueError, match=r"MagCacheConfig\.sigma"):
        MagCacheConfig(forecaster="hermite", sigma=0.0)
    assert TaylorSeerConfig(forecaster="foca", order=0).order == 0  # order 0 reuses whatever the forecaster


def test_bounded_position_holds_beyond_the_horizon():
    assert bounded_position([10.0, 12.0], 7.0, 1.0) == 8.0  # two units past the newest, one gap allowed
    assert bounded_position([10.0, 12.0], 9.0, 1.0) == 9.0  # within reach: unchanged
    assert bounded_position([10.0, 12.0], 4.0, 2.0) == 6.0
    assert bounded_position([10.0, 12.0], 4.0, None) == 4.0
    assert bounded_position([10.0], 4.0, 1.0) == 4.0  # one full step: nothing to bound by


def test_bounded_taylor_and_hermite_extrapolate_a_line_one_gap_then_hold():
    line = lambda x: torch.tensor([3.0 * x + 1.0])
    for forecaster in (make_forecaster("taylor", 1, horizon=1.0, bounded=True),
                       make_forecaster("hermite", 1, sigma=1 / math.sqrt(2), horizon=1.0, bounded=True)):
        state = forecaster.update(forecaster.update(None, line(20.0), 20.0), line(18.0), 18.0)
        assert torch.allclose(forecaster.predict(state, 17.0)[0], line(17.0))  # within one gap: exact
        assert torch.allclose(forecaster.predict(state, 16.0)[0], line(16.0))  # exactly one gap
        assert torch.allclose(forecaster.predict(state, 12.0)[0], line(16.0))  # beyond: held
    unbounded = make_forecaster("taylor", 1, horizon=1.0)
    state = unbounded.update(unbounded.update(None, line(20.0), 20.0), line(18.0), 18.0)
    assert torch.allclose(unbounded.predict(state, 12.0)[0], line(12.0))
    assert make_forecaster("taylor", 0, horizon=1.0, bounded=True).horizon is None  # reuse has nothing to bound


def test_magcache_bounds_its_forecast_by_default():
    from dit_accel.caching.magcache import MagCacheConfig

    assert config_forecaster(MagCacheConfig()).horizon == 1.0
    assert config_forecaster(MagCacheConfig(bounded_forecast=False)).horizon is None
    with pytest.raises(ValueError, match="bounded_forecast"):
        MagCacheConfig(bounded_forecast="yes")
