"""MagCache with a forecast: the calibrated magnitude-ratio rule, automatic calibration per branch, decisions per
branch and per row, the reused/forecast residual, removal, and every family."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import pipelines_for_tests as pipes
from dit_accel import accelerate_dit, load_recipe, remove_acceleration
from dit_accel.caching.magcache import (
    MagCacheCalibration,
    MagCacheConfig,
    MagCachePlugin,
    accumulate,
    resample_ratios,
    retention_steps,
    skip_schedule,
)
from dit_accel.recipe import config_from_dict

F, T = False, True
CURVE = [1.0, 1.3, 1.1, 1.02, 1.01, 0.99, 1.0, 0.97, 0.9, 0.8]


def generate(pipe, name, **kwargs):
    with torch.no_grad():
        return pipes.output_of(name, pipe(**pipes.call_kwargs(name, **kwargs)))


def the_plugin(handle) -> MagCachePlugin:
    return next(p for p in handle.transformers[0].plugins if isinstance(p, MagCachePlugin))


def capture_stack_io(handle, pipe):
    """Per (step, slot): the hidden input of the first block, the hidden output of the last, and the timestep."""
    acc = handle.transformers[0]
    blocks = acc.spec.blocks(pipe.transformer)
    first, last = blocks[0], blocks[-1]
    seen = {}

    def before(module, args, kwargs):
        c = acc.tracker.current
        hidden = kwargs.get(first[3].hidden_arg, args[0] if args else None)
        seen[(c.step, c.slot)] = {"in": hidden, "t": c.timestep}

    def after(module, args, output):
        c = acc.tracker.current
        seen[(c.step, c.slot)]["out"] = last[3].split_output(output)[0]

    hooks = [first[2].register_forward_pre_hook(before, with_kwargs=True), last[2].register_forward_hook(after)]
    return seen, hooks


def test_rule_on_a_hand_made_curve():
    assert [retention_steps(0.2, n) for n in (10, 28, 50)] == [2, 6, 10]
    # Retention: steps 0, 1. Step 2: error 0.1 >= 0.06, computes. Steps 3, 4 skip (errors 0.02, 0.0502); step 5
    # would reach 0.0701 and computes; 6, 7 skip (0, 0.03); 8 would reach 0.157 and computes; 9 is the last step.
    assert skip_schedule(CURVE, threshold=0.06, max_skips=3) == [F, F, F, T, T, F, T, T, F, F]
    # K = 1: never two skips in a row.
    assert skip_schedule(CURVE, threshold=0.06, max_skips=1) == [F, F, F, T, F, T, F, T, F, F]
    # No retention, budget 0.2: step 1 (0.3) computes, 2 skips (0.1), 3 would reach 0.222 and computes, 4-6 skip,
    # 7 is a 4th skip in a row (> K = 3) and computes, 8 skips (0.1).
    assert skip_schedule(CURVE, threshold=0.2, max_skips=3, retention=0.0) == [F, F, T, F, T, T, T, F, T, F]
    ones = [1.0] * 5
    assert skip_schedule(ones, threshold=0.06, max_skips=10, retention=0.0, last_steps=0) == [F, T, T, T, T]
    assert skip_schedule(ones, threshold=0.0, max_skips=10, retention=0.0, last_steps=0) == [F] * 5
    skip, ratio, error, count = accumulate(torch.ones(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64),
                                           torch.zeros(2, dtype=torch.long), torch.tensor([1.02, 1.1]), 0.06, 3)
    assert skip.tolist() == [True, False] and count.tolist() == [1, 1]
    torch.testing.assert_close(error, torch.tensor([0.02, 0.1], dtype=torch.float64))


def test_resampling_keeps_the_magnitude_change_of_the_schedule():
    assert resample_ratios(CURVE, 10) == CURVE
    assert resample_ratios([1.0, 2.0, 2.0], 5) == pytest.approx([1.0] + [math.sqrt(2)] * 4)
    for n in (7, 28, 50):
        resampled = resample_ratios(CURVE, n)
        assert len(resampled) == n and resampled[0] == 1.0
        assert math.prod(resampled) == pytest.approx(math.prod(CURVE))


def test_configs_and_recipes():
    for bad, match in [({"threshold": -0.1}, r"MagCacheConfig\.threshold = -0\.1 is out of range"),
                       ({"max_skips": 0}, r"MagCacheConfig\.max_skips = 0 is out of range"),
                       ({"retention": 1.5}, r"MagCacheConfig\.retention = 1\.5 is out of range"),
                       ({"forecast_order": 5}, r"MagCacheConfig\.forecast_order = 5 is out of range"),
                       ({"ratios": (1.0,)}, r"MagCacheConfig\.ratios = \(1\.0,\) is invalid.*at least 2"),
                       ({"ratios": (1.0, -0.5)}, r"ratios = .* is invalid.*finite positive"),
                       ({"ratios": (1.0, float("nan"))}, r"ratios = .* is invalid"),
                       ({"recalibrate": "yes"}, r"recalibrate = 'yes' is not allowed")]:
        with pytest.raises(ValueError, match=match):
            MagCacheConfig(**bad)
    assert config_from_dict({"type": "magcache", "ratios": [1, 1.1]}).ratios == (1.0, 1.1)
    recipes = [load_recipe(n).plugins[0] for n in ("magcache", "magcache-fast", "magcache-max")]
    assert all(isinstance(c, MagCacheConfig) and c.forecast_order == 1 and c.ratios == () for c in recipes)
    assert [(c.threshold, c.max_skips, c.last_steps) for c in recipes] == [(0.06, 3, 1), (0.1, 3, 1), (0.24, 4, 1)]
    pipe = pipes.build("dit")
    with pytest.raises(ValueError, match="does not take `layers`"):
        accelerate_dit(pipe, "magcache", layers=("transformer_blocks.1",))
    assert not hasattr(pipe.transformer, "_diffusers_hook") or not pipe.transformer._diffusers_hook.hooks


def test_calibrates_then_skips_on_every_family(family):
    """First generation: dense, records one curve per branch. Second: skips by the rule; the skipped residual is
    the cached one until two computed steps exist, then their linear forecast. Removal restores the model."""
    pipe = pipes.build(family)
    # Random weights give ratios far from 1: a huge budget forces the schedule to the cap K = 2.
    handle = accelerate_dit(pipe, "magcache", threshold=100.0, max_skips=2, retention=0.0, last_steps=1,
                            forecast_target="residual")
    plugin = the_plugin(handle)
    assert not plugin.calibrated
    with pytest.warns(MagCacheCalibration, match="no magnitude-ratio curve for 6 steps"):
        first = generate(pipe, family, steps=6)
    assert handle.stats.totals()["computed"] == handle.stats.totals()["calls"], "the calibration run is dense"
    assert plugin.calibrated and list(plugin.curves) == [6]
    slots = 1 if pipes.is_batched_cfg(family) else 2
    assert len(plugin.curves[6]) == 2, "one curve per CFG branch role"
    for curve in plugin.curves[6].values():
        assert len(curve) == 6 and curve[0] == 1.0 and all(math.isfinite(r) and r > 0 for r in curve)

    seen, hooks = capture_stack_io(handle, pipe)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MagCacheCalibration)  # no second calibration
        second = generate(pipe, family, steps=6)
    for hook in hooks:
        hook.remove()
    assert torch.isfinite(second).all() and not torch.equal(second, first)
    # Computed 0, 3, 5; skipped 1, 2 (reuse the step-0 residual) and 4 (the line through steps 0 and 3).
    stats = handle.stats
    sublayers = stats.sublayers.values()
    assert sum(s.flops for s in sublayers) == pytest.approx(0.5 * sum(s.dense_flops for s in sublayers))
    # Skipped calls still run the embeddings and final layers, not the skipped blocks' modulation.
    assert stats.blocks_skipped == 3 * slots * len(plugin.range.blocks)
    assert 0.5 < stats.flops_fraction < 0.5 + stats.outside_dense_flops / stats.dense_flops
    for name in plugin.range.sublayers:
        assert (stats.sublayers[name].reused, stats.sublayers[name].forecast) == (2 * slots, slots)
    for slot in range(slots):
        r = {s: seen[(s, slot)]["out"] - seen[(s, slot)]["in"] for s in (0, 3)}
        for s in (1, 2):
            torch.testing.assert_close(seen[(s, slot)]["out"], seen[(s, slot)]["in"] + r[0], rtol=1e-5, atol=1e-5)
        t0, t3, t4 = (seen[(s, slot)]["t"] for s in (0, 3, 4))
        # Bounded (the default): at most one gap of the two computed steps past the newest (Wan's shifted
        # schedule has wider late gaps in timestep than early ones).
        reach = min(abs(t4 - t3), abs(t3 - t0))
        expected = r[3] + (r[3] - r[0]) / (t3 - t0) * math.copysign(reach, t4 - t3)
        torch.testing.assert_close(seen[(4, slot)]["out"] - seen[(4, slot)]["in"], expected, rtol=1e-4, atol=1e-4)
    remove_acceleration(pipe)
    assert torch.equal(generate(pipe, family, steps=6), first), "removal restores the model; calibration is dense"


def test_skipped_calls_forecast_the_output_on_every_family(family):
    """The default target: a skipped call runs nothing (no block, no embedding, no final layer) and returns the
    slot's newest computed prediction until two computed steps exist, then their bounded linear forecast over the
    timesteps; the FLOPs of a skipped call are all saved. Removal restores the model."""
    pipe = pipes.build(family)
    handle = accelerate_dit(pipe, "magcache", threshold=100.0, max_skips=2, retention=0.0, last_steps=1,
                            forecast_space="prediction")  # the clean space: test_prediction_space.py
    plugin = the_plugin(handle)
    assert plugin.config.forecast_target == "output" and plugin.whole_calls is not None
    with pytest.warns(MagCacheCalibration):
        first = generate(pipe, family, steps=6)
    calls, blocks_ran = [], []
    decide = plugin.decide

    def recording_decide(context, hidden, encoder):
        if hidden is None:  # the call-level question, asked once per call before anything runs
            calls.append({"step": context.step, "slot": context.slot, "t": context.timestep,
                          "blocks": len(blocks_ran)})
        return decide(context, hidden, encoder)

    plugin.decide = recording_decide
    first_block = handle.transformers[0].spec.blocks(pipe.transformer)[0][2]

    def after(module, args, kwargs, output):
        calls[-1]["out"] = pipes.output_of(family, output).clone() if family == "x" else _prediction(output)
        calls[-1]["ran"] = len(blocks_ran) > calls[-1]["blocks"]

    hooks = [first_block.register_forward_pre_hook(lambda *_: blocks_ran.append(1)),
             pipe.transformer.register_forward_hook(after, with_kwargs=True)]
    second = generate(pipe, family, steps=6)
    for hook in hooks:
        hook.remove()
    del plugin.decide
    assert torch.isfinite(second).all() and not torch.equal(second, first)
    slots = 1 if pipes.is_batched_cfg(family) else 2
    assert len(calls) == 6 * slots
    for slot in range(slots):
        mine = {c["step"]: c for c in calls if c["slot"] == slot}
        assert [mine[s]["ran"] for s in range(6)] == [T, F, F, T, F, T], "computed 0, 3, 5"
        o0, o3 = mine[0]["out"], mine[3]["out"]
        for s in (1, 2):
            assert torch.equal(mine[s]["out"], o0), "reused until two computed steps exist"
        t0, t3, t4 = (mine[s]["t"] for s in (0, 3, 4))
        reach = min(abs(t4 - t3), abs(t3 - t0))
        expected = o3 + (o3 - o0) / (t3 - t0) * math.copysign(reach, t4 - t3)
        torch.testing.assert_close(mine[4]["out"], expected, rtol=1e-4, atol=1e-5)
    stats = handle.stats
    assert stats.flops_fraction == pytest.approx(0.5), "a skipped call runs nothing at all"
    assert stats.blocks_skipped == 3 * slots * len(plugin.range.blocks)
    for name in plugin.range.sublayers:
        assert (stats.sublayers[name].reused, stats.sublayers[name].forecast) == (2 * slots, slots)
    assert plugin.whole_calls.served == 0, "cleared with the generation"
    remove_acceleration(pipe)
    assert torch.equal(generate(pipe, family, steps=6), first), "removal restores the model; calibration is dense"


def _prediction(output):
    from dit_accel.core.outputs import output_sample

    return output_sample(output).clone()


def test_output_target_keeps_the_prediction_safe_from_the_caller():
    """A pipeline that writes into the prediction it got (in-place guidance) must not move what later calls are
    served: the cache holds copies."""
    pipe = pipes.build("flux")
    handle = accelerate_dit(pipe, "magcache", threshold=100.0, max_skips=3, retention=0.0, last_steps=0,
                            forecast_order=0, forecast_space="prediction")  # the clean space serves new tensors
    plugin = the_plugin(handle)
    plugin.curves[6] = {"cond": (1.0,) * 6, "uncond": (1.0,) * 6}
    served = []

    def scribble(module, args, output):
        sample = output[0] if isinstance(output, tuple) else output.sample
        served.append(sample.clone())
        sample.mul_(0.0)  # what an in-place guidance step could do

    hook = pipe.transformer.register_forward_hook(scribble)
    generate(pipe, "flux", steps=6)
    hook.remove()
    assert [d[3] for d in plugin.last_decisions][:3] == [T, T, T]
    for step in (1, 2, 3):  # served the step-0 prediction of its slot, untouched by the zeroing
        for slot in range(2):
            assert torch.equal(served[2 * step + slot], served[slot])
    remove_acceleration(pipe)


@pytest.mark.parametrize("family", ["dit", "flux"])
def test_output_target_wraps_cfg_cache(family):
    """Stacked with cfg-cache, whole-call skipping sits outside it: a skipped call never reaches cfg-cache; a
    computed call records the whole output cfg-cache returned: a batched call's rebuilt unconditional rows, and a
    separate unconditional call cfg-cache answered without running the transformer (its rebuilt output is the
    branch's point at that step, and the step counts as the branch's computed one: nothing computes in its place)."""
    pipe = pipes.build(family)
    handle = accelerate_dit(pipe, "magcache-cfg-max", magcache__retention=0.0, magcache__threshold=100.0,
                            magcache__max_skips=2, cfg_cache__start=0.0, magcache__forecast_space="prediction")
    plugin = the_plugin(handle)
    plugin.curves[10] = {"cond": (1.0,) * 10, "uncond": (1.0,) * 10}
    cfg = next(p for p in handle.transformers[0].plugins if p.name == "cfg-cache")
    whole = plugin.whole_calls
    events, reached, not_run = [], [], []
    outer, inner = whole.forward, cfg.forward

    def recording_outer(original, args, kwargs):
        served, calls, rebuilt = whole.served, len(reached), cfg.rebuilt
        slot = handle.transformers[0].tracker.current.slot
        output = outer(original, args, kwargs)
        if whole.served > served:
            events.append("served")
            assert len(reached) == calls, "a skipped call never reaches cfg-cache"
            return output
        events.append("rebuilt" if cfg.rebuilt > rebuilt else "computed")
        if cfg.rebuilt > rebuilt and handle.transformers[0].stats.rows_not_run >= 1.0:
            not_run.append((handle.transformers[0].tracker.current.step, slot))
        newest = whole.forecaster.tensors(whole.history[slot])[0]
        assert torch.equal(newest, _prediction(output)), "the whole output cfg-cache returned is recorded"
        return output

    def recording_inner(forward, module, args, kwargs):
        reached.append(1)
        return inner(forward, module, args, kwargs)

    whole.forward, cfg.forward = recording_outer, recording_inner
    generate(pipe, family, steps=10)
    del whole.forward, cfg.forward
    assert "served" in events and "rebuilt" in events, events
    # After a rebuilt call the slot is still served from its predictions (they hold that call's whole output).
    assert any(a == "rebuilt" and b == "served" for a, b in zip(events, events[1:])), events
    # Separate CFG only: unconditional calls answered without running, each one of magcache's computed steps.
    assert (family == "flux") == bool(not_run)
    decided = {(step, slot): skip for step, slot, _, skip in plugin.last_decisions}
    assert all(decided.get(key, False) is False for key in not_run), (not_run, sorted(decided.items()))
    remove_acceleration(pipe)


def test_decisions_per_row_and_per_branch():
    """Batched CFG (DiT): the cond row's curve allows skipping, the uncond row's does not, so the call computes
    and both rows are exact. Separate CFG calls (Flux): the cond branch skips while the uncond branch computes."""
    flat, steep = (1.0,) * 6, (1.0, 3.0, 3.0, 3.0, 3.0, 3.0)
    pipe = pipes.build("dit")
    reference = generate(pipe, "dit", steps=6)
    handle = accelerate_dit(pipe, "magcache", retention=0.0, forecast_order=0)
    plugin = the_plugin(handle)
    plugin.curves[6] = {"cond": flat, "uncond": steep}
    assert torch.equal(generate(pipe, "dit", steps=6), reference)
    assert plugin.last_decisions == [(s, 0, [True, False], False) for s in range(1, 5)]
    assert handle.stats.totals()["reused"] == 0
    plugin.curves[6] = {"cond": flat, "uncond": flat}
    assert not torch.equal(generate(pipe, "dit", steps=6), reference)
    assert [d[3] for d in plugin.last_decisions] == [True, True, True, False]  # K = 3
    remove_acceleration(pipe)

    pipe = pipes.build("flux")
    handle = accelerate_dit(pipe, "magcache", retention=0.0, max_skips=2, forecast_order=0)
    plugin = the_plugin(handle)
    plugin.curves[6] = {"cond": flat, "uncond": steep}
    generate(pipe, "flux", steps=6)
    skipped = {(step, slot) for step, slot, _, skip in plugin.last_decisions if skip}
    assert skipped == {(1, 0), (2, 0), (4, 0)}
    for name in plugin.range.sublayers:
        assert handle.stats.sublayers[name].reused == 3
    remove_acceleration(pipe)


def test_given_ratios_and_interpolated_step_counts():
    pipe = pipes.build("dit")
    # Given ratios (calibrated at 4 steps) skip from the first generation, resampled to 6 steps: no calibration.
    handle = accelerate_dit(pipe, "magcache", ratios=(1.0, 1.0, 1.0, 1.0), retention=0.0, max_skips=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MagCacheCalibration)
        generate(pipe, "dit", steps=6)
    plugin = the_plugin(handle)
    assert plugin.calibrated and not plugin.curves
    assert [d[3] for d in plugin.last_decisions] == [True, True, False, True]
    # recalibrate=False: a new step count interpolates the curves of the nearest calibrated one.
    handle = accelerate_dit(pipe, "magcache", threshold=100.0, retention=0.0, recalibrate=False)
    plugin = the_plugin(handle)
    with pytest.warns(MagCacheCalibration):
        generate(pipe, "dit", steps=6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MagCacheCalibration)
        generate(pipe, "dit", steps=4)
    assert sorted(plugin.curves) == [4, 6] and all(len(c) == 4 for c in plugin.curves[4].values())
    assert any(d[3] for d in plugin.last_decisions) and handle.stats.flops_fraction < 1
    remove_acceleration(pipe)


def test_version_one_files_keep_their_meaning(tmp_path):
    """A version-1 magcache config predates bounded_forecast and forecast_target: it loads as the unbounded
    residual forecast it meant (fields it names keep their values); a version-2 one predates forecast_space: it
    forecasts the prediction; a version-3 one predates schedule: the rule decides; current files get today's
    defaults; a future version is refused."""
    old = config_from_dict({"type": "magcache", "version": 1, "threshold": 0.5})
    assert (old.version, old.bounded_forecast, old.forecast_target, old.threshold) == (4, False, "residual", 0.5)
    assert old.schedule == "rule"
    named = config_from_dict({"type": "magcache", "version": 1, "bounded_forecast": True})
    assert (named.bounded_forecast, named.forecast_target) == (True, "residual")
    two = config_from_dict({"type": "magcache", "version": 2, "threshold": 0.5})
    assert (two.version, two.forecast_target, two.forecast_space, two.threshold) == (4, "output", "prediction", 0.5)
    three = config_from_dict({"type": "magcache", "version": 3, "threshold": 0.5})
    assert (three.version, three.schedule, three.forecast_space) == (4, "rule", "auto")
    new = config_from_dict({"type": "magcache"})
    assert (new.version, new.bounded_forecast, new.forecast_target, new.forecast_space, new.schedule) == (
        4, True, "output", "auto", "auto")
    assert config_from_dict(new.to_dict()) == new
    with pytest.raises(ValueError, match="reads version 4"):
        config_from_dict({"type": "magcache", "version": 5})
    path = tmp_path / "old.toml"
    path.write_text('format = 1\nname = "old"\n\n[[plugins]]\ntype = "magcache"\nversion = 1\nthreshold = 0.24\n')
    loaded = load_recipe(path).plugins[0]
    assert (loaded.bounded_forecast, loaded.forecast_target, loaded.threshold) == (False, "residual", 0.24)
    pipe = pipes.build("dit")
    handle = accelerate_dit(pipe, path)
    assert the_plugin(handle).whole_calls is None, "the residual path, as the file meant"
    remove_acceleration(pipe)
