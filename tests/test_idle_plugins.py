"""No silent no-ops: a plugin that computed every call of a generation says so once (``IdlePluginWarning``, naming
the setting that would let it act) and ``handle.summary()`` repeats why; a plugin that acted, or that already said
why it runs dense (magcache's calibration run), is not reported."""

from __future__ import annotations

import warnings

import pytest

import pipelines_for_tests as pipes
from dit_accel import IdlePluginWarning, accelerate_dit, get_handle, remove_acceleration


def _generate(pipe, name: str, steps: int, **extra) -> list[str]:
    """Run one generation; the messages of the IdlePluginWarnings it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe(**{**pipes.call_kwargs(name, steps=steps), **extra})
    return [str(w.message) for w in caught if issubclass(w.category, IdlePluginWarning)]


def test_taylorseer_on_four_steps_names_first_steps():
    pipe = pipes.build("flux")
    handle = accelerate_dit(pipe, "taylorseer")  # first_steps=3 and the final step (anchor="end"): all 4 are full
    try:
        messages = _generate(pipe, "flux", steps=4)
        assert len(messages) == 1 and "first_steps=3" in messages[0] and "taylorseer" in messages[0]
        assert "did nothing" in handle.summary() and "first_steps" in handle.summary()
        assert _generate(pipe, "flux", steps=4) == []  # once per reason
        assert _generate(pipe, "flux", steps=12) == []  # acts: nothing to report
        assert handle.transformers[0].idle == {} and "did nothing" not in handle.summary()
    finally:
        remove_acceleration(pipe)


def test_cfg_share_without_cfg_says_there_is_no_unconditional_branch():
    pipe = pipes.build("flux")
    handle = accelerate_dit(pipe, "cfg-share", start=0.0)
    try:
        messages = _generate(pipe, "flux", steps=4, true_cfg_scale=1.0)  # one call per step
        assert len(messages) == 1 and "classifier-free guidance" in messages[0]
        assert handle.stats.flops_fraction == 1.0
        assert all(not plugin.stored for plugin in handle.transformers[0].plugins)
    finally:
        remove_acceleration(pipe)


def test_fbcache_threshold_never_met_reports_the_smallest_change():
    pipe = pipes.build("dit")
    handle = accelerate_dit(pipe, "fbcache", threshold=1e-6)
    try:
        messages = _generate(pipe, "dit", steps=6)
        assert len(messages) == 1 and "threshold=1e-06" in messages[0] and "smallest seen" in messages[0]
    finally:
        remove_acceleration(pipe)


def test_magcache_calibration_run_is_not_reported_twice():
    """The calibration run already warns (MagCacheCalibration); then a budget never reached is reported, one that
    is reached is not."""
    pipe = pipes.build("dit")
    handle = accelerate_dit(pipe, "magcache", threshold=1e-4)
    try:
        assert _generate(pipe, "dit", steps=8) == []
        messages = _generate(pipe, "dit", steps=8)
        assert len(messages) == 1 and "threshold=0.0001" in messages[0]
        accelerate_dit(pipe, "magcache", threshold=100.0, max_skips=2, retention=0.0)
        _generate(pipe, "dit", steps=8)
        assert _generate(pipe, "dit", steps=8) == [] and get_handle(pipe).stats.flops_fraction < 1
    finally:
        remove_acceleration(pipe)


@pytest.mark.parametrize("recipe, settings, expected", [
    ("fora", {"first_steps": 3, "last_steps": 1, "interval": 2}, "first_steps=3"),
    ("toca", {"first_steps": 4}, "first_steps=4"),
    ("speca", {"first_steps": 3, "last_steps": 1}, "first_steps=3"),
])
def test_interval_schedules_name_their_warm_up(recipe, settings, expected):
    pipe = pipes.build("dit")
    accelerate_dit(pipe, recipe, **settings)
    try:
        messages = _generate(pipe, "dit", steps=4)
        assert len(messages) == 1 and expected in messages[0]
    finally:
        remove_acceleration(pipe)
