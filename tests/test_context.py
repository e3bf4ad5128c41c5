"""The tracker in isolation: steps, slots, restarts and resets from the calls alone."""

from __future__ import annotations

import torch

from dit_accel.core.blocks import spec_for
from dit_accel.core.context import BranchId, StepTracker
from dit_accel.pipelines import tiny


class Recorder:
    def __init__(self):
        self.reasons = []

    def __call__(self, reason):
        self.reasons.append(reason)


def make(num_steps=None):
    transformer = tiny.build("dit").transformer
    reasons = Recorder()
    tracker = StepTracker(spec_for(transformer), on_reset=reasons)
    if num_steps:
        tracker.begin_generation(list(range(num_steps)))
    return transformer, tracker, reasons


def call(tracker, transformer, t, batch=1, size=8, dtype=torch.float32, name=None):
    kwargs = {"hidden_states": torch.zeros(batch, 4, size, size, dtype=dtype), "timestep": torch.tensor([t] * batch)}
    context = tracker.enter(transformer, (), kwargs, name)
    tracker.exit()
    return context


def test_steps_slots_and_branches():
    transformer, tracker, _ = make()
    seq = [call(tracker, transformer, t) for t in (900, 900, 600, 600, 300, 300)]
    assert [(c.step, c.slot) for c in seq] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert seq[0].branches == (BranchId(0, 0),) and seq[1].branches == (BranchId(1, 0),)
    assert seq[0].grid.num_tokens == 16  # 8x8 latent, patch 2


def test_restart_when_timesteps_turn_back():
    transformer, tracker, reasons = make()
    first = [call(tracker, transformer, t) for t in (900, 500)]
    again = call(tracker, transformer, 900)
    assert again.step == 0 and again.generation == first[0].generation + 1
    assert "change" in reasons.reasons


def test_restart_past_the_schedule_and_on_shape_dtype_batch_change():
    transformer, tracker, reasons = make(num_steps=2)
    call(tracker, transformer, 900)
    call(tracker, transformer, 500)
    assert call(tracker, transformer, 100).step == 0  # a third step cannot belong to a 2-step schedule
    for change in ({"batch": 2}, {"size": 16}, {"dtype": torch.float64}):
        generation = tracker.generation
        context = call(tracker, transformer, 50, **change)
        assert context.step == 0 and context.generation == generation + 1
    assert reasons.reasons.count("change") >= 4


def test_begin_generation_resets_and_sets_the_schedule():
    transformer, tracker, reasons = make()
    call(tracker, transformer, 900)
    tracker.begin_generation([3, 2, 1])
    context = call(tracker, transformer, 800)
    assert reasons.reasons[-1] == "start" and context.step == 0 and context.num_steps == 3


def test_cache_context_names_pick_the_slot():
    transformer, tracker, _ = make()
    a = call(tracker, transformer, 900, name="cond")
    b = call(tracker, transformer, 900, name="uncond")
    c = call(tracker, transformer, 800, name="cond")
    d = call(tracker, transformer, 800, name="uncond")
    assert [(x.step, x.slot) for x in (a, b, c, d)] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [x.branches[0].role for x in (a, b)] == ["cond", "uncond"]
