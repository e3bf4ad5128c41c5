"""Samplers besides Euler: second-order (Heun: two model evaluations per timestep on two latents), multistep and
singlestep DPM-Solver, SDE, UniPC, Euler ancestral, LCM, and flow matching with Heun or custom sigmas. The tracker
counts one step per model evaluation (``num_steps`` = the length of the scheduler's ``timesteps``), never takes a
repeated timestep for a CFG branch, and every caching plugin acts."""

from __future__ import annotations

import pytest
import torch

import pipelines_for_tests as pipes
from dit_accel import accelerate_dit, get_handle, remove_acceleration
from dit_accel.pipelines import variants

STEPS = 6
RECIPES = {
    "fora": {"interval": 2, "first_steps": 1, "last_steps": 0},
    "magcache": {"threshold": 100.0, "max_skips": 2, "retention": 0.0, "last_steps": 1},
    "cfg-share": {"start": 0.0},
}


def _record_calls(pipe):
    """(step, slot, roles, num_steps) of every transformer call, as the tracker classified it."""
    acc = get_handle(pipe).transformers[0]
    seen = []
    original = acc.stats.on_call

    def on_call(context):
        seen.append((context.step, context.slot, tuple(b.role for b in context.branches), context.num_steps))
        original(context)

    acc.stats.on_call = on_call
    return seen


def _run(pipe, name: str, **extra) -> torch.Tensor:
    torch.manual_seed(0)  # DiTPipeline passes no generator to scheduler.step: SDE / ancestral noise is global
    return pipes.output_of(name, pipe(**pipes.call_kwargs(name, steps=STEPS), **extra))


@pytest.mark.parametrize("sampler", list(variants.SAMPLERS))
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_dit_samplers(sampler, recipe):
    pipe = variants.with_sampler(pipes.build("dit"), sampler)
    reference = _run(pipe, "dit")
    handle = accelerate_dit(pipe, recipe, **RECIPES[recipe])
    try:
        calls = _record_calls(pipe)
        _run(pipe, "dit")
        if recipe == "magcache":
            calls.clear()
            _run(pipe, "dit")
        evaluations = len(pipe.scheduler.timesteps)
        # One batched call per model evaluation: every call is slot 0 of its own step, rows cond then uncond.
        assert [c[0] for c in calls] == list(range(evaluations))
        assert all(c[1] == 0 and c[2] == ("cond", "uncond") and c[3] == evaluations for c in calls)
        assert handle.stats.flops_fraction < 1.0, f"{recipe} did nothing with {sampler}"
    finally:
        remove_acceleration(pipe)
    assert torch.equal(_run(pipe, "dit"), reference)


# Flux's pipeline always passes sigmas, which flow-matching Heun does not take: Heun runs on Wan (also two calls
# per step, cond then uncond).
FLOW_CASES = [("wan", "flow-heun"), ("flux", "flow-custom-sigmas")]


@pytest.mark.parametrize("family, sampler", FLOW_CASES, ids=[s for _, s in FLOW_CASES])
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_flow_samplers_with_separate_cfg_calls(family, sampler, recipe):
    """Two calls per evaluation (cond then uncond) under flow-matching Heun (each timestep evaluated twice on
    different latents) and custom sigmas."""
    pipe = variants.with_sampler(pipes.build(family), sampler)
    extra = {"sigmas": variants.custom_sigmas(STEPS)} if sampler == "flow-custom-sigmas" else {}
    reference = _run(pipe, family, **extra)
    handle = accelerate_dit(pipe, recipe, **RECIPES[recipe])
    try:
        calls = _record_calls(pipe)
        _run(pipe, family, **extra)
        if recipe == "magcache":
            calls.clear()
            _run(pipe, family, **extra)
        evaluations = len(pipe.scheduler.timesteps)
        assert [(c[0], c[1], c[2]) for c in calls] == [
            (step, slot, (role,)) for step in range(evaluations) for slot, role in enumerate(("cond", "uncond"))]
        assert handle.stats.flops_fraction < 1.0, f"{recipe} did nothing with {sampler}"
    finally:
        remove_acceleration(pipe)
    assert torch.equal(_run(pipe, family, **extra), reference)


def test_heun_repeated_timestep_is_a_new_step_not_a_branch():
    """Heun's timesteps repeat (t0, t1, t1, t2, t2, ...): with batched CFG there is never a second slot."""
    pipe = variants.with_sampler(pipes.build("dit"), "heun")
    accelerate_dit(pipe, "none")
    calls = _record_calls(pipe)
    _run(pipe, "dit")
    timesteps = pipe.scheduler.timesteps
    assert len(set(timesteps.tolist())) < len(timesteps)  # the schedule does repeat timesteps
    assert {c[1] for c in calls} == {0} and len(calls) == len(timesteps)
