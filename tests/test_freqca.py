"""FreqCa: the per-frame 2-D DCT and its band split as pure functions (against an explicit cosine sum), the schedule,
the config, and the plugin on image, joint-attention and video families: cheap steps skip every block and add
``low + forecast(high)``; cutoff 1 is plain reuse; removal and crashes leave nothing behind."""

from __future__ import annotations

import dataclasses
import functools
import math

import pytest
import torch

import pipelines_for_tests as pipes
from dit_accel import accelerate_dit, load_recipe, remove_acceleration
from dit_accel.caching.freqca import (
    FreqCaConfig,
    FreqCaPlugin,
    dct_2d,
    dct_matrix,
    full_step,
    idct_2d,
    image_slice,
    low_mask,
    split_bands,
)
from dit_accel.core.blocks import TokenGrid
from dit_accel.recipe import config_from_dict

PLUGIN_FAMILIES = ["dit", "flux", "wan"]  # batched CFG; joint attention with separate CFG calls; video


@functools.lru_cache(maxsize=None)
def _shared(family: str):
    return pipes.build(family), {}


@pytest.fixture
def shared():
    """A tiny pipeline per family, built once for the module (building dominates the run time): the test gets it
    dense and leaves it dense, also when it fails; ``dense(steps)`` is its output before acceleration."""
    used = []

    def get(family: str):
        pipe, outputs = _shared(family)
        used.append(pipe)
        return pipe, lambda steps: outputs.setdefault(steps, generate(pipe, family, steps=steps))

    yield get
    for pipe in used:
        remove_acceleration(pipe)


def generate(pipe, name, **kwargs):
    with torch.no_grad():
        return pipes.output_of(name, pipe(**pipes.call_kwargs(name, **kwargs)))


def the_plugin(handle) -> FreqCaPlugin:
    return next(p for p in handle.transformers[0].plugins if isinstance(p, FreqCaPlugin))


def reference_dct(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Orthonormal 2-D DCT-II of one (H, W) array by the cosine double sum, in float64."""
    out = torch.zeros(height, width, dtype=torch.float64)
    for u in range(height):
        for v in range(width):
            total = 0.0
            for h in range(height):
                for w in range(width):
                    total += float(x[h, w]) * math.cos(math.pi * (2 * h + 1) * u / (2 * height)) * math.cos(
                        math.pi * (2 * w + 1) * v / (2 * width))
            scale_u = math.sqrt((1 if u == 0 else 2) / height)
            scale_v = math.sqrt((1 if v == 0 else 2) / width)
            out[u, v] = scale_u * scale_v * total
    return out


# ------------------------------------------------------------------------------------------- pure functions
def test_dct_matches_the_cosine_sum_and_inverts():
    grid = TokenGrid(1, 3, 5)
    x = torch.randn(2, 15, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    coefficients = dct_2d(x, grid)
    for b in range(2):
        for d in range(4):
            expected = reference_dct(x[b, :, d].view(3, 5), 3, 5)
            torch.testing.assert_close(coefficients[b, :, d].view(3, 5), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(idct_2d(coefficients, grid), x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.square().sum(), coefficients.square().sum())  # orthonormal: energy kept
    c = dct_matrix(7, torch.float64)
    torch.testing.assert_close(c @ c.T, torch.eye(7, dtype=torch.float64))
    assert dct_matrix(7, torch.float64) is c, "built once per (size, dtype, device)"
    single = x.float()
    torch.testing.assert_close(idct_2d(dct_2d(single, grid), grid), single, rtol=1e-5, atol=1e-5)


def test_low_mask_is_normalised_per_axis():
    assert low_mask(4, 6, 1.0).all()
    zero = low_mask(4, 6, 0.0)
    assert zero[0, 0] and zero.sum() == 1, "cutoff 0 keeps the DC coefficient only"
    # r = sqrt((u/H)^2 + (v/W)^2) against 0.3 * max r: on a 4x8 grid the band reaches u = 1 and v = 2 alike.
    mask = low_mask(4, 8, 0.3)
    u = torch.arange(4, dtype=torch.float64).unsqueeze(1) / 4
    v = torch.arange(8, dtype=torch.float64).unsqueeze(0) / 8
    radius = (u * u + v * v).sqrt()
    assert torch.equal(mask, radius <= 0.3 * radius.max())
    assert mask[1, 0] and mask[0, 2] and not mask[2, 0] and not mask[0, 3]
    square = low_mask(5, 5, 0.3)  # on a square grid: the reference's sqrt(u^2 + v^2) <= cutoff * max
    uu, vv = torch.meshgrid(torch.arange(5.0), torch.arange(5.0), indexing="ij")
    r = (uu**2 + vv**2).sqrt()
    assert torch.equal(square, r <= 0.3 * r.max())


def test_bands_sum_to_the_input_and_separate_frequencies():
    grid = TokenGrid(1, 6, 4)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3, 24, 5, generator=generator)
    low, high = split_bands(x, grid, 0.3)
    torch.testing.assert_close(low + high, x, rtol=0, atol=1e-6)
    assert low.dtype == high.dtype == x.dtype
    # A signal built from low-band coefficients only lands entirely in the low band; the rest entirely in high.
    mask = low_mask(6, 4, 0.3).view(1, 24, 1)
    coefficients = torch.randn(3, 24, 5, dtype=torch.float64, generator=generator)
    smooth = idct_2d(coefficients * mask, grid)
    rough = idct_2d(coefficients * ~mask, grid)
    low, high = split_bands(smooth, grid, 0.3)
    torch.testing.assert_close(low, smooth, rtol=0, atol=1e-12)
    assert high.abs().max() < 1e-12
    low, high = split_bands(rough, grid, 0.3)
    assert low.abs().max() < 1e-12
    # Cutoff 1: everything is low and high is exactly zero (plain reuse downstream).
    low, high = split_bands(x, grid, 1.0)
    assert torch.equal(low, x) and not high.any()
    # Half precision is split in float32 and returned in its own dtype; rows never mix.
    low, high = split_bands(x.bfloat16(), grid, 0.3)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(split_bands(x[1:2], grid, 0.3)[0], split_bands(x, grid, 0.3)[0][1:2])


def test_video_grids_are_split_per_frame():
    grid = TokenGrid(3, 4, 6)
    x = torch.randn(2, grid.num_tokens, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    low, high = split_bands(x, grid, 0.25)
    for f in range(3):
        frame = slice(f * 24, (f + 1) * 24)
        expected_low, expected_high = split_bands(x[:, frame], TokenGrid(1, 4, 6), 0.25)
        torch.testing.assert_close(low[:, frame], expected_low)
        torch.testing.assert_close(high[:, frame], expected_high)
    # Frames that are flat but differ from each other: nothing spatial to call high (no mixing over time).
    flat = torch.arange(3, dtype=torch.float64).repeat_interleave(24).view(1, -1, 1).expand(2, -1, 3)
    low, high = split_bands(flat, grid, 0.0)
    assert high.abs().max() < 1e-12
    with pytest.raises(ValueError, match="on the grid"):
        split_bands(x[:, :-1], grid, 0.25)


def test_image_slice_and_schedule():
    grid = TokenGrid(1, 4, 4)
    assert image_slice(16, grid, 7, "first") == slice(0, 16)
    assert image_slice(23, grid, 7, "first") == slice(7, 23)  # a single-stream block with text in front
    assert image_slice(23, grid, 7, "last") == slice(0, 16)
    for bad in [(20, grid, 7, "first"), (23, grid, 7, None), (8, grid, 0, None), (16, None, 0, None)]:
        assert image_slice(*bad) is None, bad  # condition tokens, unknown position, a shard, no grid
    full = [s for s in range(20) if full_step(s, 20, interval=6, first_steps=3, last_steps=1)]
    assert full == [0, 1, 2, 8, 14, 19], "the reference's 0, 1, 2, 8, 14, ... plus the last step"
    assert [s for s in range(6) if full_step(s, None, 3, 0, 1)] == [2, 5]
    assert all(full_step(s, 10, 1, 0, 0) for s in range(10)), "interval 1 is dense"


def test_configs_and_recipe(shared):
    for bad, match in [({"interval": 0}, r"FreqCaConfig\.interval = 0 is out of range"),
                       ({"cutoff": 1.5}, r"FreqCaConfig\.cutoff = 1\.5 is out of range"),
                       ({"order": 5}, r"FreqCaConfig\.order = 5 is out of range"),
                       ({"forecaster": "spline"}, r"FreqCaConfig\.forecaster = 'spline' is not allowed"),
                       ({"forecaster": "foca"}, r"order = 2: the foca forecaster is first order"),
                       ({"distance": "time"}, r"FreqCaConfig\.distance = 'time' is not allowed")]:
        with pytest.raises(ValueError, match=match):
            FreqCaConfig(**bad)
    config = load_recipe("freqca").plugins[0]
    assert config == FreqCaConfig() == config_from_dict({"type": "freqca"})
    assert (config.interval, config.first_steps, config.cutoff, config.order, config.forecaster, config.sigma) == (
        6, 3, 0.1, 2, "hermite", 0.71)
    pipe, _ = shared("dit")
    with pytest.raises(ValueError, match="does not take `layers`"):
        accelerate_dit(pipe, "freqca", layers=("transformer_blocks.1",))


# ------------------------------------------------------------------------------------------------- plugin
def capture_stack_io(handle, pipe):
    """Per (step, slot): the first block's hidden input, the last block's hidden output, the call's grid."""
    acc = handle.transformers[0]
    blocks = acc.spec.blocks(pipe.transformer)
    first, last = blocks[0], blocks[-1]
    seen = {}

    def before(module, args, kwargs):
        c = acc.tracker.current
        seen[(c.step, c.slot)] = {"in": kwargs.get(first[3].hidden_arg, args[0] if args else None), "grid": c.grid}

    def after(module, args, output):
        c = acc.tracker.current
        seen[(c.step, c.slot)]["out"] = last[3].split_output(output)[0]

    return seen, [first[2].register_forward_pre_hook(before, with_kwargs=True), last[2].register_forward_hook(after)]


@pytest.mark.parametrize("family", PLUGIN_FAMILIES)
def test_cheap_steps_add_low_plus_forecast_high(family, shared):
    """6 steps, interval 3, one warm-up step: full at 0, 3 and 5 (the last); steps 1, 2 reuse the step-0 residual
    (one point: nothing to forecast), step 4 adds low(3) + the line through high(0) and high(3)."""
    pipe, dense_output = shared(family)
    dense = dense_output(6)
    handle = accelerate_dit(pipe, "freqca", interval=3, first_steps=1, last_steps=1, cutoff=0.3,
                            forecaster="taylor", order=1)
    plugin = the_plugin(handle)
    seen, hooks = capture_stack_io(handle, pipe)
    accelerated = generate(pipe, family, steps=6)
    for hook in hooks:
        hook.remove()
    assert torch.isfinite(accelerated).all() and not torch.equal(accelerated, dense)
    slots = 1 if pipes.is_batched_cfg(family) else 2
    stats = handle.stats
    assert stats.blocks_skipped == 3 * slots * len(plugin.range.blocks), "a cheap step skips every block"
    for name in plugin.range.sublayers:
        assert (stats.sublayers[name].reused, stats.sublayers[name].forecast) == (2 * slots, slots)
    assert stats.flops_fraction < 0.5 + stats.outside_dense_flops / stats.dense_flops
    for slot in range(slots):
        grid = seen[(0, slot)]["grid"]
        assert grid is not None and seen[(0, slot)]["in"].shape[1] == grid.num_tokens
        bands = {s: split_bands(seen[(s, slot)]["out"] - seen[(s, slot)]["in"], grid, 0.3) for s in (0, 3)}
        for s in (1, 2):
            expected = seen[(s, slot)]["in"] + (bands[0][0] + bands[0][1])
            torch.testing.assert_close(seen[(s, slot)]["out"], expected, rtol=1e-5, atol=1e-5)
        high = bands[3][1] + (bands[3][1] - bands[0][1]) / 3 * 1
        torch.testing.assert_close(seen[(4, slot)]["out"], seen[(4, slot)]["in"] + bands[3][0] + high,
                                   rtol=1e-4, atol=1e-4)
    assert plugin.cache_bytes() == 0, "the generation's end drops the cache"
    remove_acceleration(pipe)
    assert torch.equal(generate(pipe, family, steps=6), dense), "removal restores the model"


def test_the_forecast_history_starts_at_first_steps_minus_two(shared):
    """first_steps 3: full at 0, 1, 2 and 5 (the last); as in the reference, step 0 is left out of the history, so
    at step 3 an order-2 forecast has only steps 1 and 2: their line."""
    pipe, _ = shared("dit")
    handle = accelerate_dit(pipe, "freqca", interval=3, first_steps=3, cutoff=0.3, forecaster="taylor", order=2)
    seen, hooks = capture_stack_io(handle, pipe)
    generate(pipe, "dit", steps=6)
    for hook in hooks:
        hook.remove()
    grid = seen[(0, 0)]["grid"]
    bands = {s: split_bands(seen[(s, 0)]["out"] - seen[(s, 0)]["in"], grid, 0.3) for s in (1, 2)}
    expected = bands[2][0] + bands[2][1] + (bands[2][1] - bands[1][1])
    torch.testing.assert_close(seen[(3, 0)]["out"], seen[(3, 0)]["in"] + expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", PLUGIN_FAMILIES)
def test_cutoff_one_reuses_the_whole_residual(family, shared):
    pipe, _ = shared(family)
    handle = accelerate_dit(pipe, "freqca", interval=3, first_steps=1, cutoff=1.0)  # Hermite order 2 on zeros
    seen, hooks = capture_stack_io(handle, pipe)
    generate(pipe, family, steps=6)
    for hook in hooks:
        hook.remove()
    slots = 1 if pipes.is_batched_cfg(family) else 2
    for slot in range(slots):
        for cheap, full in ((1, 0), (2, 0), (4, 3)):
            residual = seen[(full, slot)]["out"] - seen[(full, slot)]["in"]
            assert torch.equal(seen[(cheap, slot)]["out"], seen[(cheap, slot)]["in"] + residual)
    remove_acceleration(pipe)


def test_a_crash_leaves_no_stale_state(shared):
    pipe, _ = shared("flux")
    handle = accelerate_dit(pipe, "freqca", interval=2, first_steps=1)
    plugin = the_plugin(handle)
    block = handle.transformers[0].spec.blocks(pipe.transformer)[-1][2]
    calls = {"n": 0}

    def fail_late(module, args, kwargs):
        calls["n"] += 1
        if calls["n"] == 7:  # step 3's first call, after full and cheap steps have filled the cache
            calls["cached"] = plugin.cache_bytes()
            raise RuntimeError("boom")

    hook = block.register_forward_pre_hook(fail_late, with_kwargs=True)
    with pytest.raises(RuntimeError, match="boom"):
        generate(pipe, "flux", steps=6)
    hook.remove()
    assert calls["cached"] > 0
    assert plugin.range.residuals == {} and plugin.range.bands == {} and plugin.cache_bytes() == 0
    after = generate(pipe, "flux", steps=5, seed=3)
    remove_acceleration(pipe)
    accelerate_dit(pipe, "freqca", interval=2, first_steps=1)  # a new plugin: nothing carried over
    assert torch.equal(after, generate(pipe, "flux", steps=5, seed=3))


def test_a_residual_off_the_grid_computes_and_says_why(monkeypatch, shared):
    pipe, dense_output = shared("dit")
    dense = dense_output(6)
    handle = accelerate_dit(pipe, "freqca", interval=3, first_steps=1)
    tracker = handle.transformers[0].tracker
    wrong = dataclasses.replace(tracker.spec, read_grid=lambda *args: TokenGrid(1, 3, 3))  # 9 != the tokens
    monkeypatch.setattr(tracker, "spec", wrong)
    with pytest.warns(UserWarning, match="freqca: the hidden stream's 64 tokens cannot be laid on the image"):
        out = generate(pipe, "dit", steps=6)
    assert torch.equal(out, dense) and handle.stats.totals()["computed"] == handle.stats.totals()["calls"]
    plugin = the_plugin(handle)
    assert "cannot be laid on the image token grid (1x3x3" in plugin.idle_reason(6) and plugin.idle_already_said()
    remove_acceleration(pipe)
