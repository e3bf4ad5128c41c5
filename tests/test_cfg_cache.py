"""cfg-cache: the unconditional branch rebuilt from the conditional one, in both CFG conventions."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers.hooks import HookRegistry, ModelHook

import pipelines_for_tests as pipes
from dit_accel import accelerate_dit, remove_acceleration
from dit_accel.caching.cfg_cache import CFGCacheConfig
from dit_accel.caching.cfg_difference import (
    Bands,
    band_weights,
    low_band_mask,
    rebuild_uncond,
    skips_uncond,
    split_difference,
)

STEPS = 8  # window start 0.2, interval 2: step 2 refreshes, steps 3, 5, 7 rebuild the unconditional output
REBUILT = [3, 5, 7]


# ------------------------------------------------------------------------------------------------ pure functions
def test_step_rule():
    assert [s for s in range(STEPS) if skips_uncond(s, STEPS, 0.2, 1.0, 2)] == REBUILT
    assert [s for s in range(10) if skips_uncond(s, 10, 0.0, 0.5, 3)] == [1, 2, 4]
    assert not any(skips_uncond(s, None, 0.0, 1.0, 2) for s in range(10))  # unknown length: never
    assert not any(skips_uncond(s, 8, 0.999, 1.0, 2) for s in range(8))


def test_rebuild_plain_and_by_bands():
    torch.manual_seed(0)
    cond, difference = torch.randn(2, 4, 6, 10), torch.randn(2, 4, 6, 10)
    assert torch.equal(rebuild_uncond(cond, difference), cond + difference)
    mask = low_band_mask(6, 10, 0.4)
    low, high = split_difference(difference, mask)
    assert torch.allclose(rebuild_uncond(cond, Bands(low, high)), cond + difference, atol=1e-5)
    # Weighted bands: the low band alone is a smooth part of the difference, and the two add up linearly.
    only_low = Bands(low, high).combine(1.0, 0.0)
    only_high = Bands(low, high).combine(0.0, 1.0)
    assert torch.allclose(only_low + only_high, difference, atol=1e-5)
    assert torch.allclose(Bands(low, high).combine(1.1, 1.2), 1.1 * only_low + 1.2 * only_high, atol=1e-5)


def test_low_band_mask_is_a_disc_about_zero_frequency():
    mask = low_band_mask(8, 8, 0.5)
    assert mask[0, 0] and not mask[4, 4]  # DC kept, Nyquist corner not
    negative = (-torch.arange(8)) % 8
    assert torch.equal(mask, mask[negative][:, negative])  # symmetric in +-f: the band of a real signal is real
    assert low_band_mask(8, 8, 1.5).all() and low_band_mask(8, 8, 0.0).sum() == 1


def test_band_weights_follow_fastercache_windows():
    assert band_weights(0, 50, 1.1, 1.2) == (1.0, 1.0)
    assert band_weights(10, 50, 1.1, 1.2) == (1.1, 1.0)
    assert band_weights(40, 50, 1.1, 1.2) == (1.1, 1.2)
    assert band_weights(46, 50, 1.1, 1.2) == (1.0, 1.2)


def test_config_validation():
    with pytest.raises(ValueError, match="end = 0.1 must be greater than start = 0.2"):
        CFGCacheConfig(start=0.2, end=0.1)
    with pytest.raises(ValueError, match="interval"):
        CFGCacheConfig(interval=1)
    with pytest.raises(ValueError, match="weighting"):
        CFGCacheConfig(weighting="wavelet")


# --------------------------------------------------------------------------------------------- on every family
def _generate(pipe, family, **overrides):
    with torch.no_grad():
        return pipes.output_of(family, pipe(**{**pipes.call_kwargs(family, steps=STEPS), **overrides}))


def test_empty_window_is_bit_exact_and_removal_restores(family):
    pipe = pipes.build(family)
    reference = _generate(pipe, family)
    handle = accelerate_dit(pipe, "cfg-cache", start=0.999)
    with pytest.warns(UserWarning, match="holds no step"):
        assert torch.equal(_generate(pipe, family), reference)
    handle = accelerate_dit(pipe, "cfg-cache")
    rebuilt = _generate(pipe, family)
    stats = handle.stats
    assert stats.notes["cfg_cache.rebuilt"] == len(REBUILT) and torch.isfinite(rebuilt).all()
    # Three of eight steps run the conditional half only.
    expected = 1 - len(REBUILT) / (2 * STEPS)
    assert stats.flops_fraction == pytest.approx(expected, rel=1e-6)
    remove_acceleration(pipe)
    assert torch.equal(_generate(pipe, family), reference)


class _Recorder(ModelHook):
    """Outermost on the transformer: every call's inputs and outputs, and whether cfg-cache cut it."""

    def __init__(self, plugin) -> None:
        super().__init__()
        self.plugin, self.calls = plugin, []

    def new_forward(self, module, *args, **kwargs):
        before = self.plugin.rebuilt
        output = self.fn_ref.original_forward(*args, **kwargs)
        self.calls.append((args, kwargs, output, self.plugin.rebuilt > before))
        return output


def _cut(value, rows, batch):
    """Every tensor whose first dimension is the batch, cut to ``rows`` (the test's own, generic cut)."""
    if isinstance(value, torch.Tensor):
        return value[rows] if value.ndim and value.shape[0] == batch else value
    if isinstance(value, (list, tuple)):
        return type(value)(_cut(v, rows, batch) for v in value)
    if isinstance(value, dict):
        return {k: _cut(v, rows, batch) for k, v in value.items()}
    return value


@pytest.mark.parametrize("family", ["dit", "pixart-sigma", "sd3", "cogvideox", "ltx", "zoo:dit"])
def test_batched_call_runs_the_conditional_rows_as_alone(family):
    pipe = pipes.build(family)
    handle = accelerate_dit(pipe, "cfg-cache")
    acc = handle.transformers[0]
    recorder = _Recorder(acc.plugins[0])
    HookRegistry.check_if_exists_or_initialize(pipe.transformer).register_hook(recorder, "test.recorder")
    try:
        _generate(pipe, family)
    finally:
        HookRegistry.check_if_exists_or_initialize(pipe.transformer).remove_hook("test.recorder", recurse=False)
    convention = acc.tracker.cfg_convention
    cut_calls = [c for c in recorder.calls if c[3]]
    assert len(cut_calls) == len(REBUILT)
    remove_acceleration(pipe)
    signature = __import__("inspect").signature(pipe.transformer.forward)
    for args, kwargs, output, _ in cut_calls:
        arguments = signature.bind_partial(*args, **kwargs).arguments
        sample = output[0] if isinstance(output, tuple) else output.sample
        batch = sample.shape[0]
        if family.endswith("dit"):  # null class label marks the unconditional rows
            labels = arguments["class_labels"]
            cond = [i for i in range(batch) if int(labels[i]) != pipe.transformer.config.num_embeds_ada_norm]
        else:
            half = batch // 2
            cond = list(range(half, batch)) if convention == "batched-uncond-first" else list(range(half))
        alone = {k: _cut(v, cond, batch) if k != "image_rotary_emb" else v for k, v in arguments.items()}
        with torch.no_grad():
            reference = pipe.transformer(**alone)
        reference = reference[0] if isinstance(reference, tuple) else reference.sample
        assert torch.equal(sample[cond], reference)


@pytest.mark.parametrize("family", ["flux", "pixart-sigma"])
def test_exact_when_the_difference_is_unchanged(family):
    """Negative prompt = prompt: the unconditional branch equals the conditional one at every step, so the rebuilt
    output (cond + a zero difference) is what the computed one would be."""
    pipe = pipes.build(family)
    prompt = pipes.call_kwargs(family)["prompt"]
    reference = _generate(pipe, family, negative_prompt=prompt)
    handle = accelerate_dit(pipe, "cfg-cache")
    out = _generate(pipe, family, negative_prompt=prompt)
    assert handle.stats.notes["cfg_cache.rebuilt"] == len(REBUILT)
    if pipes.is_batched_cfg(family):  # the conditional rows ran as a batch of their own
        assert torch.allclose(out, reference, atol=1e-5)
    else:
        assert torch.equal(out, reference)


@pytest.mark.parametrize("recipe", ["magcache-max", "taylorseer"] + [pytest.param(r, marks=pytest.mark.slow)
                                                       for r in ("fbcache", "fora", "speca", "toca", "delta-dit")])
@pytest.mark.parametrize("family", ["zoo:dit", "zoo:mmdit"])
def test_composes_with_step_skipping_plugins(family, recipe):
    pipe = pipes.build(family)
    reference = pipes.output_of(family, pipe(**pipes.call_kwargs(family, steps=12)))
    handle = accelerate_dit(pipe, recipe)
    pipe(**pipes.call_kwargs(family, steps=12))  # magcache calibrates here
    pipe(**pipes.call_kwargs(family, steps=12))
    alone = handle.stats.flops_fraction
    handle = accelerate_dit(pipe, f"{recipe}+cfg-cache")
    pipe(**pipes.call_kwargs(family, steps=12))  # magcache calibrates here: cfg-cache computes every row
    out = pipes.output_of(family, pipe(**pipes.call_kwargs(family, steps=12)))
    assert torch.isfinite(out).all()
    assert handle.stats.notes["cfg_cache.rebuilt"] > 0
    assert handle.stats.flops_fraction < alone
    psnr = 10 * math.log10(1.0 / max(float(((out - reference) ** 2).mean()), 1e-20))
    assert psnr > 15
    remove_acceleration(pipe)
    assert torch.equal(pipes.output_of(family, pipe(**pipes.call_kwargs(family, steps=12))), reference)


def test_custom_loop_without_roles_computes_everything():
    pipe = pipes.build("pixart-sigma")
    handle = accelerate_dit(pipe.transformer, "cfg-cache")
    transformer = pipe.transformer
    torch.manual_seed(0)
    hidden = torch.randn(2, transformer.config.in_channels, 4, 4)
    text = torch.randn(2, 3, transformer.config.caption_channels)
    with pytest.warns(UserWarning, match="cannot tell the conditional"):
        with handle.generation(num_steps=6):
            for step in range(6):
                t = torch.full((2,), 900 - 100 * step)
                transformer(hidden, encoder_hidden_states=text, timestep=t,
                            added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    assert "cfg_cache.rebuilt" not in handle.stats.notes
    # Declared batched CFG (uncond rows first): the rows are known and the window applies.
    with handle.generation(num_steps=6, cfg="batched-uncond-first"):
        for step in range(6):
            t = torch.full((2,), 900 - 100 * step)
            out = transformer(hidden, encoder_hidden_states=text, timestep=t,
                              added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
            assert out.shape[0] == 2
    assert handle.stats.notes["cfg_cache.rebuilt"] == len([s for s in range(6) if skips_uncond(s, 6, 0.2, 1.0, 2)])


@pytest.mark.parametrize("family", ["zoo:dit", "flux"])
def test_frequency_weighting_at_unit_weights_equals_plain(family):
    pipe = pipes.build(family)
    accelerate_dit(pipe, "cfg-cache")
    plain = _generate(pipe, family)
    accelerate_dit(pipe, "cfg-cache", weighting="frequency", low_alpha=1.0, high_alpha=1.0)
    assert torch.allclose(_generate(pipe, family), plain, atol=1e-4)
    accelerate_dit(pipe, "cfg-cache", weighting="frequency")
    assert torch.isfinite(_generate(pipe, family)).all()
    remove_acceleration(pipe)


def test_stacked_on_a_fixed_schedule_cuts_the_computing_steps():
    """taylorseer computes at 3, 6, 9, ... and the last step: cfg-cache counts those of its window (from step 4:
    6, 9, 12, 15, 18, 19) and cuts every other one."""
    from dit_accel.caching.cfg_difference import skipped_steps
    from dit_accel.caching.sublayer import computes_at

    computes = [computes_at(s, 20, 3, 3, 1) for s in range(20)]
    assert sorted(skipped_steps(20, 0.2, 1.0, 2, computes)) == [9, 15, 19]
    assert skipped_steps(20, 0.2, 1.0, 2) == {s for s in range(20) if skips_uncond(s, 20, 0.2, 1.0, 2)}
    pipe = pipes.build("zoo:dit")
    handle = accelerate_dit(pipe, "taylorseer+cfg-cache", first_steps=3, cfg_cache__interval=2)
    pipe(**pipes.call_kwargs("zoo:dit", steps=20))
    assert handle.stats.notes["cfg_cache.rebuilt"] == 3
    remove_acceleration(pipe)
    # a plugin that skips no step (attention, patch-parallel) leaves the schedule as taylorseer fixes it
    handle = accelerate_dit(pipe, "taylorseer+cfg-cache+hilbert", first_steps=3, cfg_cache__interval=2)
    pipe(**pipes.call_kwargs("zoo:dit", steps=20))
    assert handle.stats.notes["cfg_cache.rebuilt"] == 3
    remove_acceleration(pipe)
