"""TaylorSeer: the finite-difference math, its wiring on every family, and its relation to FORA."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

import pipelines_for_tests as pipes
from dit_accel import accelerate_dit, load_recipe, remove_acceleration
from dit_accel.caching.taylorseer import TaylorSeerConfig, TaylorSeerPlugin, taylor_forecast, update_differences
from dit_accel.caching.sublayer import flatten_output


def generate(pipe, name, **kwargs):
    with torch.no_grad():
        return pipes.output_of(name, pipe(**pipes.call_kwargs(name, **kwargs)))


@pytest.mark.parametrize("order", [0, 1, 2, 3, 4])
def test_forecast_is_exact_on_polynomials_of_its_order_on_uneven_grids(order):
    generator = torch.Generator().manual_seed(order)
    coefficients = torch.randn(order + 1, 3, generator=generator, dtype=torch.float64)

    def f(x: float) -> torch.Tensor:
        return sum(c * x**i for i, c in enumerate(coefficients))

    positions = [0.999, 0.94, 0.8, 0.777, 0.5, 0.321][: order + 2]  # sigma-like; also holds for steps
    state = None
    for x in positions:
        state = update_differences(state, f(x), x, order)
    assert len(state[1]) == order + 1 and len(state[0]) == order + 1
    for x in (0.3, 0.25, 0.01):
        torch.testing.assert_close(taylor_forecast(state, x), f(x), rtol=1e-6, atol=1e-6)


def test_order_grows_with_full_steps_and_order_zero_is_reuse():
    value = torch.ones(3)
    first = update_differences(None, value, 0.0, order=2)
    second = update_differences(first, 2 * value, 0.5, order=2)
    third = update_differences(second, 5 * value, 1.0, order=2)
    assert [len(s[1]) for s in (first, second, third)] == [1, 2, 3]
    torch.testing.assert_close(third[1][1], 6 * value)  # (5 - 2) / 0.5
    torch.testing.assert_close(third[1][2], 4 * value)  # (6 - 2) / (1.0 - 0.0)
    assert len(update_differences(third, value, 2.0, order=0)[1]) == 1
    torch.testing.assert_close(taylor_forecast(([0.0], [value]), 123.0), value)
    # Order 1 is the paper's linear extrapolation: F + (F - F_old) / d * k.
    linear = update_differences(update_differences(None, value, 10.0, 1), 3 * value, 8.0, 1)
    torch.testing.assert_close(taylor_forecast(linear, 7.0), 3 * value + (3 * value - value) / (8.0 - 10.0) * -1.0)


def test_flatten_rebuilds_tuples_with_none():
    a, b = torch.zeros(2), torch.ones(3)
    leaves, rebuild = flatten_output((a, (None, b)))
    assert len(leaves) == 2
    rebuilt = rebuild([leaf + 1 for leaf in leaves])
    assert rebuilt[1][0] is None and torch.equal(rebuilt[1][1], b + 1) and torch.equal(rebuilt[0], a + 1)


def test_config_validation_and_recipes():
    with pytest.raises(ValueError, match=r"TaylorSeerConfig\.order = 5 is out of range; allowed: an integer in \[0, 4\]"):
        TaylorSeerConfig(order=5)
    with pytest.raises(ValueError, match="distance = 'sigma' is not allowed; allowed: 'timestep', 'step'"):
        TaylorSeerConfig(distance="sigma")
    with pytest.raises(ValueError, match="factor_dtype = 'int8'"):
        TaylorSeerConfig(factor_dtype="int8")
    assert [load_recipe(n).plugins[0].interval for n in ("taylorseer", "taylorseer-fast", "taylorseer-max")] == [3, 5, 7]


def test_order_zero_equals_fora_and_interval_one_is_dense(family):
    pipe = pipes.build(family)
    dense = generate(pipe, family, steps=6)
    accelerate_dit(pipe, "fora", interval=2, first_steps=2)
    fora = generate(pipe, family, steps=6)
    handle = accelerate_dit(pipe, "taylorseer", interval=2, order=0, first_steps=2)
    assert torch.equal(generate(pipe, family, steps=6), fora)
    assert handle.stats.totals()["reused"] > 0
    accelerate_dit(pipe, "taylorseer", interval=1)
    assert torch.equal(generate(pipe, family, steps=6), dense)
    remove_acceleration(pipe)
    assert torch.equal(generate(pipe, family, steps=6), dense)


@pytest.mark.parametrize("distance", ["timestep", "step"])
def test_forecasts_are_the_taylor_polynomial_of_the_full_steps(family, distance):
    pipe = pipes.build(family)
    handle = accelerate_dit(pipe, "taylorseer", interval=3, order=2, first_steps=3, last_steps=0, distance=distance)
    plugin = next(p for p in handle.transformers[0].plugins if isinstance(p, TaylorSeerPlugin))
    tracker = handle.transformers[0].tracker
    seen = defaultdict(list)
    hooks = []
    for list_attr, index, block, contract in handle.transformers[0].spec.blocks(pipe.transformer):
        for sublayer in contract.sublayers:
            module = getattr(block, sublayer.name, None)
            if module is not None:
                name = f"{list_attr}.{index}.{sublayer.name}"

                def record(module, args, output, name=name):
                    c = tracker.current
                    seen[(name, c.slot)].append((c.step, float(c.step) if distance == "step" else c.timestep, output))

                hooks.append(module.register_forward_hook(record))
    generate(pipe, family, steps=7)
    for hook in hooks:
        hook.remove()
    full_steps, forecast_steps = [0, 1, 2, 3, 6], [4, 5]
    stats = handle.stats
    slots = 1 if pipes.is_batched_cfg(family) else 2
    assert all(s.forecast == 2 * slots for s in stats.sublayers.values())
    for (name, slot), calls in seen.items():
        states = None
        for step, x, output in calls:
            leaves, _ = flatten_output(output)
            if step in full_steps:
                states = [update_differences(None if states is None else states[i], leaf.float(), x, 2)
                          for i, leaf in enumerate(leaves)]
            else:
                assert step in forecast_steps
                for leaf, state in zip(leaves, states):
                    torch.testing.assert_close(leaf, taylor_forecast(state, x).to(leaf.dtype))
    assert stats.cache_bytes > 0 and plugin.store.entries == {}
