"""Every recipe family on the pipeline variants users run (img2img, inpaint, Kontext, Fill, ControlNet, Redux prompt
embeddings, prompt lists, two experts, image-to-video), in the spirit of diffusers' tester mixins: it runs, the
output is finite, a caching recipe skips work where its settings allow, cfg-share shares wherever CFG runs (and says
it did nothing where none runs), and removal restores bit-identical outputs."""

from __future__ import annotations

import warnings

import pytest
import torch

from dit_accel import IdlePluginWarning, accelerate_dit, remove_acceleration
from dit_accel.pipelines import variants

STEPS = 6
# Settings that let each recipe act on a 6-step tiny generation (random weights never trigger adaptive skips on
# their own thresholds: fbcache's is forced).
RECIPES = {
    "fora": {"interval": 2, "first_steps": 1, "last_steps": 0},
    "taylorseer": {"interval": 2, "first_steps": 1, "last_steps": 0},
    "fbcache": {"threshold": 10.0, "warmup_steps": 1, "last_steps": 0},
    "magcache": {"threshold": 100.0, "max_skips": 2, "retention": 0.0, "last_steps": 1},
    "cfg-share": {"start": 0.0},
}
NO_CFG = {"flux-fill"}  # Fill runs no true CFG
# ControlNet adds residuals between blocks: block-range caches refuse it at accelerate_dit time.
REFUSED = {(v, r) for v in ("flux-controlnet", "sd3-controlnet") for r in ("magcache", "fbcache")}
CASES = [pytest.param(v, r, id=f"{v}-{r}") for v in variants.VARIANTS for r in RECIPES]

_PIPES: dict[str, tuple] = {}


def _pipe_and_reference(name: str):
    """One pipeline per variant for the module, and its output without acceleration."""
    if name not in _PIPES:
        pipe = variants.build(name)
        _PIPES[name] = (pipe, _generate(pipe, name))
    return _PIPES[name]


def _generate(pipe, name: str, **extra) -> torch.Tensor:
    output = pipe(**{**variants.call_kwargs(name, steps=STEPS), **extra})
    result = output.frames if hasattr(output, "frames") else output.images
    return torch.as_tensor(result).float()


@pytest.mark.parametrize("name, recipe", CASES)
def test_variant_recipe(name, recipe):
    pipe, reference = _pipe_and_reference(name)
    if (name, recipe) in REFUSED:
        with pytest.raises(ValueError, match="ControlNet residuals"):
            accelerate_dit(pipe, recipe, **RECIPES[recipe])
        assert torch.equal(_generate(pipe, name), reference)  # nothing was left installed
        return
    handle = accelerate_dit(pipe, recipe, **RECIPES[recipe])
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            output = _generate(pipe, name)
            if recipe == "magcache":  # the first generation calibrates, the second skips
                output = _generate(pipe, name)
        assert torch.isfinite(output).all()
        stats = handle.stats
        idle = [w for w in caught if issubclass(w.category, IdlePluginWarning)]
        if recipe == "cfg-share" and name in NO_CFG:
            assert stats.flops_fraction == 1.0 and "classifier-free guidance" in handle.transformers[0].idle["cfg-share"]
            assert idle and "cfg-share" in handle.summary()
        else:
            assert stats.flops_fraction < 1.0, f"{recipe} skipped nothing on {name}"
            assert not idle, [str(w.message) for w in idle]
    finally:
        remove_acceleration(pipe)
    assert torch.equal(_generate(pipe, name), reference)


@pytest.mark.parametrize("name", list(variants.VARIANTS))
def test_variant_none_is_bit_identical(name):
    pipe, reference = _pipe_and_reference(name)
    accelerate_dit(pipe, "none")
    try:
        assert torch.equal(_generate(pipe, name), reference)
    finally:
        remove_acceleration(pipe)


@pytest.mark.parametrize("name", list(variants.VARIANTS))
def test_interrupted_generation_leaves_no_state(name):
    """A generation stopped by ``callback_on_step_end`` (``pipe._interrupt``) leaves nothing behind: the next one
    equals the same generation on a freshly accelerated pipeline."""
    pipe, _ = _pipe_and_reference(name)
    accelerate_dit(pipe, "fora", **RECIPES["fora"])
    try:
        fresh = _generate(pipe, name)

        def stop(pipeline, step, timestep, callback_kwargs):
            if step == 2:
                pipeline._interrupt = True
            return callback_kwargs

        _generate(pipe, name, callback_on_step_end=stop)
        assert torch.equal(_generate(pipe, name), fresh)
    finally:
        remove_acceleration(pipe)


def test_two_experts_schedule_their_own_segment():
    """Wan 2.2 A14B-style: each expert's steps are its own segment of the schedule (boundary_ratio 0.875 over 6
    steps), so magcache calibrates and then skips on each expert separately."""
    pipe, _ = _pipe_and_reference("wan-two-experts")
    handle = accelerate_dit(pipe, "magcache", **RECIPES["magcache"])
    try:
        _generate(pipe, "wan-two-experts")
        _generate(pipe, "wan-two-experts")
        first, second = handle.transformers
        boundary = 0.875 * pipe.scheduler.config.num_train_timesteps
        high = sum(float(t) >= boundary for t in pipe.scheduler.timesteps)
        assert first.stats.last.steps == high and second.stats.last.steps == STEPS - high
        for acc in (first, second):
            assert acc.stats.last.flops_fraction < 1.0
            assert acc.plugins[0].curves.keys() == {acc.stats.last.steps}
    finally:
        remove_acceleration(pipe)


def _all_recipes() -> list[str]:
    from dit_accel import list_recipes

    return [recipe.name for recipe in list_recipes() if recipe.name != "none"]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", _all_recipes())
@pytest.mark.parametrize("name", list(variants.VARIANTS))
def test_every_shipped_recipe_acts_or_says_why(name, recipe):
    """Every shipped recipe at its own settings on every variant: it is refused at ``accelerate_dit`` time with a
    clear error, or it runs to a finite output and either skips work or reports why it did nothing (never a silent
    no-op); removal restores bit-identical outputs."""
    pipe, reference = _pipe_and_reference(name)
    try:
        handle = accelerate_dit(pipe, recipe)
    except ValueError as error:
        assert "ControlNet" in str(error) or "allowed" in str(error), str(error)
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outputs = [_generate(pipe, name), _generate(pipe, name)]  # magcache: calibrate, then skip
        assert all(torch.isfinite(output).all() for output in outputs)
        for acc in handle.transformers:
            for plugin in acc.plugins:
                assert acc.last_actions.get(plugin.name) or plugin.name in acc.idle, (
                    f"{plugin.name} of {recipe} on {name}: did nothing and said nothing")
    finally:
        remove_acceleration(pipe)
    assert torch.equal(_generate(pipe, name), reference)


@pytest.mark.parametrize("name", ["flux-img2img", "sd3-inpaint", "pixart-prompt-list"])
def test_resolution_change_leaves_no_state(name):
    """A generation at another resolution after one at 32 px equals that generation on a freshly accelerated
    pipeline: nothing cached at the old token grid leaks into the new one."""
    pipe, _ = _pipe_and_reference(name)
    accelerate_dit(pipe, "fora", **RECIPES["fora"])
    try:
        _generate(pipe, name)
        changed = _generate(pipe, name, height=48, width=48)
        accelerate_dit(pipe, "fora", **RECIPES["fora"])  # replaces the first acceleration: fresh state
        fresh = _generate(pipe, name, height=48, width=48)
    finally:
        remove_acceleration(pipe)
    assert changed.shape[-1] == 48 and torch.equal(changed, fresh)
