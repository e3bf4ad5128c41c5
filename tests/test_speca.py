"""SpeCa: the verification rule exactly, and drafts accepted or rejected as forced by the threshold."""

from __future__ import annotations

import pytest
import torch

import pipelines_for_tests as pipes
from dit_accel import accelerate_dit, load_recipe, remove_acceleration
from dit_accel.caching.speca import SpeCaConfig, relative_l1, verification_threshold

STEPS = 10


def test_threshold_schedule_and_error_metric():
    assert verification_threshold(0, 50, 0.4, 0.25, 0.01) == pytest.approx(0.4)
    assert verification_threshold(25, 50, 0.4, 0.25, 0.01) == pytest.approx(0.2)
    assert verification_threshold(50, 50, 0.4, 0.25, 0.15) == pytest.approx(0.15)  # the floor
    assert verification_threshold(7, None, 0.4, 0.25, 0.01) == pytest.approx(0.4)  # unknown length
    actual = torch.tensor([[1.0, -3.0], [0.0, 0.0]])
    forecast = torch.tensor([[2.0, -3.0], [0.5, -0.5]])
    torch.testing.assert_close(relative_l1(forecast, actual), torch.tensor([0.5 / 2.0, 0.5]))


def _generate(pipe, name):
    with torch.no_grad():
        return pipes.output_of(name, pipe(**pipes.call_kwargs(name, steps=STEPS)))


FORCED = {"first_steps": 1, "last_steps": 0, "min_drafts": 1, "max_drafts": 3}


@pytest.mark.parametrize("name", ["dit", "flux"])
def test_forced_acceptance_and_rejection(name):
    """threshold 100 accepts every verified draft: drafts run up to max_drafts (steps 1-3, 5-7, 9 of 10 after the
    warm-up step 0). threshold 0 rejects each verified draft, so a full step follows every second draft (steps 1-2,
    4-5, 7-8). Per CFG branch: Flux's separate calls draft twice as many calls as DiT's batched one."""
    pipe = pipes.build(name)
    reference = _generate(pipe, name)
    branches = 1 if name == "dit" else 2
    outputs = {}
    for threshold, drafted, acceptance in ((100.0, 7, 1.0), (0.0, 6, 0.0)):
        handle = accelerate_dit(pipe, "speca", threshold=threshold, floor=0.0, **FORCED)
        try:
            outputs[threshold] = _generate(pipe, name)
            notes = handle.stats.notes
            assert notes["speca.drafted"] == drafted * branches
            assert notes["speca.acceptance"] == acceptance and notes["speca.verified"] > 0
            assert handle.stats.flops_fraction < 1.0 and "speca.acceptance" in handle.summary()
        finally:
            remove_acceleration(pipe)
        assert torch.equal(_generate(pipe, name), reference)  # removal is bit-identical
    assert torch.isfinite(outputs[100.0]).all() and not torch.equal(outputs[100.0], outputs[0.0])


def test_the_probe_block_computes_on_verified_drafts():
    """On a verified draft the probe (last) block runs for real: its sub-layers are computed in more calls than the
    other blocks'."""
    pipe = pipes.build("dit")
    handle = accelerate_dit(pipe, "speca", threshold=100.0, **FORCED)
    try:
        _generate(pipe, "dit")
        by_block = handle.stats.by_block()
    finally:
        remove_acceleration(pipe)
    blocks = list(by_block)
    probe, first = by_block[blocks[-1]], by_block[blocks[0]]
    assert all(p.computed > f.computed for p, f in zip(probe.values(), first.values()))


def test_bad_settings_and_the_shipped_recipe():
    with pytest.raises(ValueError, match=r"SpeCaConfig\.max_drafts = 0"):
        SpeCaConfig(max_drafts=0)
    with pytest.raises(ValueError, match="probe = 40 is outside the model's"):
        accelerate_dit(pipes.build("dit"), "speca", probe=40)
    recipe = load_recipe("speca")
    assert recipe.plugins[0].threshold == 0.3 and recipe.plugins[0].forecaster == "taylor"
