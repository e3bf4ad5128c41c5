"""The clean-sample estimate a prediction implies (pure functions, exact on constructed samples), the
parameterization read from each scheduler, and magcache's clean-space forecast on every family."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from diffusers import (DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, PNDMScheduler,
                       UniPCMultistepScheduler)

import pipelines_for_tests as pipes
from dit_accel import accelerate_dit, remove_acceleration
from dit_accel.caching.forecasters import bounded_position
from dit_accel.caching.magcache import MagCacheCalibration, MagCachePlugin
from dit_accel.caching.prediction_space import (Parameterization, flow_timestep_unit, from_clean, invertible,
                                                latent_part, parameterization_of, to_clean)
from dit_accel.core.outputs import output_sample

ALPHAS = tuple(1.0 - 0.9 * i / 999 for i in range(1000))  # a made-up decreasing alpha-bar table
T, F = True, False


def sample_at(clean, noise, kind, timestep):
    """The noisy input and the model's ideal prediction at ``timestep`` for a known clean sample and noise."""
    if kind == "flow":
        s = timestep / 1000
        return (1 - s) * clean + s * noise, noise - clean
    a = ALPHAS[timestep]
    x = math.sqrt(a) * clean + math.sqrt(1 - a) * noise
    return x, {"epsilon": noise, "v_prediction": math.sqrt(a) * noise - math.sqrt(1 - a) * clean,
               "sample": clean}[kind]


@pytest.mark.parametrize("kind", ["flow", "epsilon", "v_prediction", "sample"])
def test_the_ideal_prediction_implies_the_clean_sample(kind):
    clean, noise = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    space = Parameterization(kind, () if kind == "flow" else ALPHAS)
    for timestep in (999, 500, 37):
        x, prediction = sample_at(clean, noise, kind, timestep)
        coefficients = space.coefficients(timestep, timestep_unit=1000.0)
        torch.testing.assert_close(to_clean(x, prediction, coefficients), clean)
        if invertible(coefficients):
            torch.testing.assert_close(from_clean(x, clean, coefficients), prediction)
    assert (Parameterization("flow").coefficients(0.25, 1.0), Parameterization("flow").coefficients(250.0, 1000.0)) \
        == ((1.0, -0.25), (1.0, -0.25)), "sigma itself, or 1000 sigma"


def test_alpha_bar_interpolates_and_zero_snr_is_refused():
    space = Parameterization("epsilon", (1.0, 0.5, 0.0))
    assert space.alpha_bar(0.5) == pytest.approx(0.75) and space.alpha_bar(7) == 0.0 and space.alpha_bar(-1) == 1.0
    assert not invertible(space.coefficients(2)), "epsilon at alpha-bar 0 implies no clean sample"
    assert to_clean(torch.ones(1, 2), torch.ones(1, 2), space.coefficients(2)) is None
    v = Parameterization("v_prediction", (1.0, 0.5, 0.0))
    assert v.coefficients(2) == (0.0, -1.0), "zero-SNR v-prediction: the clean sample is -v"
    assert invertible(Parameterization("sample", (1.0, 0.5)).coefficients(0)), "the prediction is the sample"
    with pytest.raises(ValueError, match="allowed: flow, epsilon"):
        Parameterization("x0")
    with pytest.raises(ValueError, match="alphas_cumprod"):
        Parameterization("epsilon")


def test_latent_part_of_learned_variance_and_conditioned_inputs():
    coefficients = (0.8, -0.6)
    x = torch.randn(2, 3, 4, 4)
    with_variance = torch.randn(2, 6, 4, 4)  # DiT/PixArt: the prediction, then a learned variance
    clean = to_clean(x, with_variance, coefficients)
    torch.testing.assert_close(clean[:, :3], 0.8 * x - 0.6 * with_variance[:, :3])
    assert torch.equal(clean[:, 3:], with_variance[:, 3:]), "the variance is carried unchanged"
    torch.testing.assert_close(from_clean(x, clean, coefficients), with_variance)
    kept = clean.clone()
    assert from_clean(x, kept, coefficients, inplace=True) is kept, "in place: the forecast's own tensor"
    assert torch.equal(kept, from_clean(x, clean, coefficients)) and not torch.equal(kept, clean)
    conditioned = torch.cat([x, torch.randn(2, 5, 4, 4)], dim=1)  # Wan image-to-video: latent, then condition
    prediction = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(to_clean(conditioned, prediction, coefficients), 0.8 * x - 0.6 * prediction)
    tokens = torch.randn(2, 16, 12)
    assert latent_part(tokens, torch.randn(2, 16, 12))[0] is tokens
    assert latent_part(tokens, torch.randn(4, 16, 12)) is None, "rows never differ"
    assert latent_part(tokens, torch.randn(2, 8, 6)) is None, "two differing dimensions"
    assert latent_part(tokens, torch.randn(2, 16)) is None
    assert from_clean(tokens, tokens, (1.0, 0.0)) is None, "a zero prediction coefficient is not invertible"
    buffer = torch.randn(2, 16, 12)
    assert to_clean(tokens, buffer, coefficients, inplace=True) is buffer


def test_flow_timestep_unit_from_the_first_call():
    assert flow_timestep_unit(1000.0, 1000) == 1000.0 and flow_timestep_unit(35.0, 1000) == 1000.0
    assert flow_timestep_unit(1.0, 1000) == 1.0 and flow_timestep_unit(0.3, 1000) == 1.0


def test_parameterization_of_schedulers():
    assert parameterization_of(FlowMatchEulerDiscreteScheduler()).kind == "flow"
    assert parameterization_of(UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction")
                               ).kind == "flow"
    ddim = parameterization_of(DDIMScheduler(prediction_type="v_prediction"))
    assert ddim.kind == "v_prediction" and len(ddim.alphas_cumprod) == 1000
    assert ddim.alpha_bar(10) == pytest.approx(float(DDIMScheduler().alphas_cumprod[10]))
    assert parameterization_of(EulerDiscreteScheduler()).kind == "epsilon"
    assert parameterization_of(PNDMScheduler(prediction_type="epsilon")).kind == "epsilon"
    assert parameterization_of(None) is None and parameterization_of(object()) is None


def the_plugin(handle) -> MagCachePlugin:
    return next(p for p in handle.transformers[0].plugins if isinstance(p, MagCachePlugin))


def test_clean_space_forecast_on_every_family(family):
    """``forecast_space = "auto"`` forecasts the clean-sample estimate where the pipeline's scheduler says what the
    model predicts: a skipped call returns the prediction that implies, at its own input, the newest computed
    estimate (one computed step) or their bounded linear forecast (two). Removal restores the model."""
    pipe = pipes.build(family)
    handle = accelerate_dit(pipe, "magcache", threshold=100.0, max_skips=2, retention=0.0, last_steps=1)
    plugin = the_plugin(handle)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MagCacheCalibration)
        first = pipes.output_of(family, pipe(**pipes.call_kwargs(family, steps=6)))
    space = handle.transformers[0].tracker.parameterization
    hidden_arg = handle.transformers[0].spec.hidden_arg
    calls = []
    decide = plugin.decide

    def recording_decide(context, hidden, encoder):
        if hidden is None:  # the call-level question, asked once per call before anything runs
            calls[-1].update(step=context.step, slot=context.slot, t=context.timestep)
        return decide(context, hidden, encoder)

    def before(module, args, kwargs):
        calls.append({"x": kwargs.get(hidden_arg, args[0] if args else None).clone()})

    def after(module, args, kwargs, output):
        calls[-1]["out"] = output_sample(output).clone()

    plugin.decide = recording_decide
    hooks = [pipe.transformer.register_forward_pre_hook(before, with_kwargs=True),
             pipe.transformer.register_forward_hook(after, with_kwargs=True)]
    second = pipes.output_of(family, pipe(**pipes.call_kwargs(family, steps=6)))
    for hook in hooks:
        hook.remove()
    del plugin.decide
    assert torch.isfinite(second).all()
    assert space is not None, "every family's scheduler says what its model predicts"
    unit = flow_timestep_unit(calls[0]["t"], 1000)
    slots = 1 if pipes.is_batched_cfg(family) else 2
    for slot in range(slots):
        mine = {c["step"]: c for c in calls if c["slot"] == slot}
        assert slot in plugin.whole_calls.clean_slots or plugin.whole_calls.served == 0

        def clean(step):
            return to_clean(mine[step]["x"], mine[step]["out"], space.coefficients(mine[step]["t"], unit))

        for step in (1, 2):
            expected = from_clean(mine[step]["x"], clean(0), space.coefficients(mine[step]["t"], unit))
            torch.testing.assert_close(mine[step]["out"], expected, rtol=1e-4, atol=1e-5)
        t0, t3, t4 = (mine[s]["t"] for s in (0, 3, 4))
        at = bounded_position([t3, t0], t4, 1.0)
        forecast = clean(3) + (clean(3) - clean(0)) / (t3 - t0) * (at - t3)
        expected = from_clean(mine[4]["x"], forecast, space.coefficients(t4, unit))
        torch.testing.assert_close(mine[4]["out"], expected, rtol=1e-3, atol=1e-4)
    remove_acceleration(pipe)
    assert torch.equal(pipes.output_of(family, pipe(**pipes.call_kwargs(family, steps=6))), first)


def test_explicit_spaces_and_their_refusals():
    pipe = pipes.build("flux")
    handle = accelerate_dit(pipe, "magcache", forecast_space="prediction")
    assert the_plugin(handle).whole_calls.space == "prediction"
    remove_acceleration(pipe)
    handle = accelerate_dit(pipe.transformer, "magcache", forecast_space="clean")  # a custom loop may declare it
    with pytest.raises(ValueError, match="needs to know what the model predicts"):
        with handle.generation(num_steps=4):  # but this one does not
            pipe(**pipes.call_kwargs("flux", steps=4))
    with pytest.raises(ValueError, match="prediction = 'x0' is not allowed"):
        handle.begin(4, prediction="x0")
    remove_acceleration(pipe.transformer)
    handle = accelerate_dit(pipe.transformer, "magcache")  # auto: the prediction, no scheduler to read
    assert handle.transformers[0].tracker.parameterization is None
    remove_acceleration(pipe.transformer)
    with pytest.raises(ValueError, match="applies to forecast_target = 'output' only"):
        accelerate_dit(pipe, "magcache", forecast_target="residual", forecast_space="clean")
    with pytest.raises(ValueError, match="allowed: 'auto', 'clean', 'prediction'"):
        accelerate_dit(pipe, "magcache", forecast_space="data")


def test_custom_loop_declares_the_prediction():
    """A custom flow-matching loop (timestep input 1000 sigma) declares ``prediction="flow"``: skipped calls serve
    the clean-space forecast turned back at their own input, exactly; the declaration ends with the loop."""
    transformer = pipes.build("zoo:dit").transformer if pipes.zoo_weights_present("zoo:dit") else None
    if transformer is None:
        pytest.skip("zoo weights not exported")
    handle = accelerate_dit(transformer, "magcache", threshold=100.0, max_skips=2, retention=0.0, last_steps=1,
                            ratios=[1.0] * 6)
    plugin = the_plugin(handle)
    seen = []
    decide = plugin.decide

    def recording_decide(context, hidden, encoder):
        if hidden is None:
            seen[-1]["t"] = context.timestep
        return decide(context, hidden, encoder)

    plugin.decide = recording_decide
    hooks = [transformer.register_forward_pre_hook(lambda m, a, k: seen.append({"x": a[0].clone()}), with_kwargs=True),
             transformer.register_forward_hook(lambda m, a, k, o: seen[-1].update(out=o.sample.clone()),
                                               with_kwargs=True)]
    x, labels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 2])
    sigmas = [1.0, 0.8, 0.6, 0.4, 0.2, 0.1, 0.0]
    with torch.no_grad(), handle.generation(num_steps=6, prediction="flow"):
        assert handle.transformers[0].tracker.parameterization.kind == "flow"
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            out = transformer(x, timestep=torch.full((2,), sigma * 1000), class_labels=labels).sample
            x = x + (sigma_next - sigma) * out
    for hook in hooks:
        hook.remove()
    del plugin.decide
    assert handle.transformers[0].tracker.parameterization is None, "the declaration ends with the loop"
    space = Parameterization("flow")

    def clean(step):
        return to_clean(seen[step]["x"], seen[step]["out"], space.coefficients(seen[step]["t"], 1000.0))

    for step in (1, 2):  # computed: 0, 3, 5 (reusing the clean sample is also reusing the velocity here)
        expected = from_clean(seen[step]["x"], clean(0), space.coefficients(seen[step]["t"], 1000.0))
        torch.testing.assert_close(seen[step]["out"], expected, rtol=1e-4, atol=1e-5)
    t0, t3, t4 = (seen[s]["t"] for s in (0, 3, 4))  # the linear forecast is where the two spaces part
    at = bounded_position([t3, t0], t4, 1.0)
    forecast = clean(3) + (clean(3) - clean(0)) / (t3 - t0) * (at - t3)
    expected = from_clean(seen[4]["x"], forecast, space.coefficients(t4, 1000.0))
    torch.testing.assert_close(seen[4]["out"], expected, rtol=1e-3, atol=1e-4)
    remove_acceleration(transformer)


@pytest.mark.parametrize("family", ["zoo:dit", "flux"])
def test_clean_space_stacks_with_cfg_cache(family):
    """Stacked with cfg-cache (batched rows cut to the conditional ones on zoo:dit, a separate unconditional call
    answered without the transformer on Flux), the clean space makes the same decisions as the prediction space
    and serves finite predictions; only what a skipped call returns differs."""
    if family.startswith("zoo:") and not pipes.zoo_weights_present(family):
        pytest.skip("zoo weights not exported")
    pipe = pipes.build(family)
    runs = {}
    for space in ("prediction", "clean"):
        handle = accelerate_dit(pipe, "magcache-cfg-max", magcache__retention=0.0, magcache__threshold=100.0,
                                magcache__max_skips=2, cfg_cache__start=0.0, magcache__forecast_space=space)
        plugin = the_plugin(handle)
        plugin.curves[8] = {"cond": (1.0,) * 8, "uncond": (1.0,) * 8}
        out = pipes.output_of(family, pipe(**pipes.call_kwargs(family, steps=8)))
        runs[space] = (out, [d[:2] + (d[3],) for d in plugin.last_decisions])
        remove_acceleration(pipe)
    (prediction, decisions), (clean, clean_decisions) = runs["prediction"], runs["clean"]
    assert torch.isfinite(clean).all() and decisions == clean_decisions
    assert any(skipped for *_, skipped in decisions) and not torch.equal(prediction, clean)


@pytest.mark.parametrize("forecaster", ["taylor", "hermite", "foca"])
def test_a_served_forecast_leaves_the_forecasters_state_untouched(forecaster):
    """A skipped call's prediction is made from the forecast clean-sample estimate in place only when no state holds
    that tensor: FoCa's forecast is also the newest value of its recursion, which the next skipped call reads."""
    pipe = pipes.build("flux")
    handle = accelerate_dit(pipe, "magcache", threshold=100.0, max_skips=2, retention=0.0, last_steps=1,
                            forecaster=forecaster)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MagCacheCalibration)
        pipe(**pipes.call_kwargs("flux", steps=6))
    whole = the_plugin(handle).whole_calls
    forecaster_of = whole.forecaster
    predict, pending, checked = forecaster_of.predict, [], []

    def recording_predict(state, position):
        value, advanced = predict(state, position)
        pending.append((advanced, [t.clone() for t in forecaster_of.tensors(advanced)]))
        return value, advanced

    def after(module, args, output):
        while pending:
            advanced, copies = pending.pop()
            for kept, copy in zip(forecaster_of.tensors(advanced), copies):
                assert torch.equal(kept, copy), "the served prediction was written into the forecaster's state"
            checked.append((forecaster_of.points(advanced), bool(whole.clean_slots)))

    forecaster_of.predict = recording_predict
    hook = pipe.transformer.register_forward_hook(after)
    pipe(**pipes.call_kwargs("flux", steps=6))
    hook.remove()
    del forecaster_of.predict
    assert (2, True) in checked, "served calls forecast from two computed steps in clean space"
    remove_acceleration(pipe)
