"""First-block caching and Δ-DiT: block-range skipping with residuals, per branch and per row, on every family."""

from __future__ import annotations

import pytest
import torch

import pipelines_for_tests as pipes
from dit_accel import accelerate_dit, load_recipe, remove_acceleration
from dit_accel.caching.delta_dit import DeltaDiTConfig, DeltaDiTPlugin, delta_dit_group
from dit_accel.caching.first_block import FirstBlockCacheConfig, FirstBlockCachePlugin, relative_l1_per_row, skip_rows


def generate(pipe, name, **kwargs):
    with torch.no_grad():
        return pipes.output_of(name, pipe(**pipes.call_kwargs(name, **kwargs)))


def the_plugin(handle, cls):
    return next(p for p in handle.transformers[0].plugins if isinstance(p, cls))


def capture_range_io(handle, pipe, start):
    """Per (step, slot): the input of block ``start`` and the output of the last block (hidden stream)."""
    blocks = handle.transformers[0].spec.blocks(pipe.transformer)
    tracker = handle.transformers[0].tracker
    seen, hooks = {}, []
    first_contract, last_contract = blocks[start][3], blocks[-1][3]

    def before(module, args, kwargs):
        c = tracker.current
        hidden = kwargs.get(first_contract.hidden_arg, args[0] if args else None)
        seen.setdefault((c.step, c.slot), {})["in"] = hidden

    def after(module, args, output):
        c = tracker.current
        seen[(c.step, c.slot)]["out"] = last_contract.split_output(output)[0]

    hooks.append(blocks[start][2].register_forward_pre_hook(before, with_kwargs=True))
    hooks.append(blocks[-1][2].register_forward_hook(after))
    return seen, hooks


def test_pure_functions():
    previous = torch.ones(2, 3, 4)
    current = previous.clone()
    current[1] *= 1.5
    numerator, denominator = relative_l1_per_row(current, previous)
    torch.testing.assert_close(numerator / denominator, torch.tensor([0.0, 0.5]))
    assert skip_rows(numerator, denominator, 0.1).tolist() == [True, False]
    assert skip_rows(torch.tensor([float("nan"), 0.0]), torch.tensor([1.0, 0.0]), 1.0).tolist() == [False, False]
    assert [delta_dit_group(s, 10, 0.6) for s in (0, 5, 6, 9)] == ["rear", "rear", "front", "front"]
    assert delta_dit_group(50, None, 0.6) == "rear"


def test_configs_and_recipes():
    with pytest.raises(ValueError, match=r"FirstBlockCacheConfig\.threshold = -0\.1 is out of range"):
        FirstBlockCacheConfig(threshold=-0.1)
    with pytest.raises(ValueError, match=r"DeltaDiTConfig\.boundary = 1\.5"):
        DeltaDiTConfig(boundary=1.5)
    assert [load_recipe(n).plugins[0].threshold for n in ("fbcache", "fbcache-fast", "fbcache-max")] == [0.1, 0.2, 0.35]
    assert load_recipe("delta-dit").plugins[0].interval == 2
    pipe = pipes.build("dit")  # 2 blocks
    with pytest.raises(ValueError, match="compute_blocks = 2 leaves nothing to cache.*allowed: 1 to 1"):
        accelerate_dit(pipe, "fbcache", compute_blocks=2)
    with pytest.raises(ValueError, match="cached_blocks = 2 does not fit.*allowed: 1 to 1"):
        accelerate_dit(pipe, "delta-dit", cached_blocks=2)
    with pytest.raises(ValueError, match="does not take `layers`"):
        accelerate_dit(pipe, "fbcache", layers=("transformer_blocks.1",))
    assert not hasattr(pipe.transformer, "_diffusers_hook") or not pipe.transformer._diffusers_hook.hooks


def test_fbcache_threshold_zero_is_dense(family):
    pipe = pipes.build(family)
    reference = generate(pipe, family, steps=4)
    handle = accelerate_dit(pipe, "fbcache", threshold=0.0)
    assert torch.equal(generate(pipe, family, steps=4), reference)
    assert handle.stats.totals()["reused"] == 0


def test_fbcache_forced_skips_add_the_cached_residual(family):
    pipe = pipes.build(family)
    reference = generate(pipe, family, steps=6)
    handle = accelerate_dit(pipe, "fbcache", threshold=10.0, warmup_steps=1, last_steps=1, max_consecutive=2)
    seen, hooks = capture_range_io(handle, pipe, start=1)
    out = generate(pipe, family, steps=6)
    for hook in hooks:
        hook.remove()
    assert torch.isfinite(out).all() and not torch.equal(out, reference)
    computed_steps, skipped_steps = {0, 3, 5}, {1, 2, 4}  # warm-up 1, cap 2, last step computed
    slots = 1 if pipes.is_batched_cfg(family) else 2
    stats = the_plugin(handle, FirstBlockCachePlugin).range.sublayers
    for name in stats:
        assert handle.stats.sublayers[name].reused == len(skipped_steps) * slots
    for slot in range(slots):
        last_residual = None
        for step in range(6):
            io = seen[(step, slot)]
            if step in computed_steps:
                last_residual = io["out"] - io["in"]
            else:
                torch.testing.assert_close(io["out"], io["in"] + last_residual, rtol=1e-5, atol=1e-5)
    remove_acceleration(pipe)
    assert torch.equal(generate(pipe, family, steps=6), reference)


def test_fbcache_decides_per_row():
    """In a batched-CFG call one row may skip while the other computes: the computing row is exact."""
    pipe = pipes.build("dit")

    def run(handle):
        outputs = {}
        last_block = handle.transformers[0].spec.blocks(pipe.transformer)[-1][2]
        tracker = handle.transformers[0].tracker
        hook = last_block.register_forward_hook(lambda m, a, out: outputs.setdefault(tracker.current.step, out))
        generate(pipe, "dit", steps=4)
        hook.remove()
        return outputs

    dense = run(accelerate_dit(pipe, "fbcache", threshold=0.0))
    handle = accelerate_dit(pipe, "fbcache", threshold=0.0)
    plugin = the_plugin(handle, FirstBlockCachePlugin)
    original = plugin.decide

    def mixed(context, hidden, encoder):
        skip = original(context, hidden, encoder)
        return torch.tensor([True, False]) if context.step == 2 else skip

    plugin.decide = mixed
    mixed_run = run(handle)
    assert torch.equal(mixed_run[1], dense[1])
    # The row that computed ran alone (a batch of one: float rounding may differ from the batch of two).
    torch.testing.assert_close(mixed_run[2][1], dense[2][1], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(mixed_run[2][0], dense[2][0], atol=1e-3), "the row that skipped used the cached residual"
    totals = handle.stats.totals()
    assert totals["reused"] == 0 and totals["partial"] > 0, "a partly computed call is counted as partial"
    assert 0.5 < handle.stats.flops_fraction < 1.0


def test_fbcache_computes_only_the_rows_that_do_not_skip(family):
    """Mixed decisions on every family (two samples per call, four rows under batched CFG): the cached blocks run on
    the computing rows alone, their outputs equal a dense run's, and the FLOPs count only those rows."""
    pipe = pipes.build(family)
    dense_handle = accelerate_dit(pipe, "fbcache", threshold=0.0)
    blocks = dense_handle.transformers[0].spec.blocks(pipe.transformer)
    seen_batches, outputs = [], {}

    def run(handle):
        tracker = handle.transformers[0].tracker
        def first_tensor(args, kwargs):
            return next(v for v in [*args, *kwargs.values()] if isinstance(v, torch.Tensor))

        attention = getattr(blocks[1][2], blocks[1][3].sublayers[0].name)  # inside the range: sees what it computes
        hooks = [attention.register_forward_pre_hook(
                     lambda m, a, k: seen_batches.append((tracker.current.step, int(first_tensor(a, k).shape[0]))),
                     with_kwargs=True),
                 blocks[-1][2].register_forward_hook(
                     lambda m, a, out: outputs.update({len(outputs): blocks[-1][3].split_output(out)[0]}))]
        out = generate(pipe, family, steps=4, batch_size=2)
        for hook in hooks:
            hook.remove()
        return out

    run(dense_handle)
    dense_outputs, dense_batches = dict(outputs), list(seen_batches)
    outputs.clear(), seen_batches.clear()
    handle = accelerate_dit(pipe, "fbcache", threshold=0.0, warmup_steps=0, last_steps=0)
    plugin = the_plugin(handle, FirstBlockCachePlugin)
    original = plugin.decide

    def mixed(context, hidden, encoder):
        skip = original(context, hidden, encoder)
        if context.step == 2:  # every other row skips
            return torch.arange(hidden.shape[0], device=hidden.device) % 2 == 0
        return skip

    plugin.decide = mixed
    out = run(handle)
    assert torch.isfinite(out).all()
    full = max(batch for _, batch in dense_batches)
    at_step_2 = [batch for step, batch in seen_batches if step == 2]
    assert at_step_2 and all(batch == full // 2 for batch in at_step_2), (at_step_2, full)
    for key, value in outputs.items():
        if dense_batches[key][0] == 2:
            torch.testing.assert_close(value[1::2], dense_outputs[key][1::2], rtol=1e-4, atol=1e-4)
    assert handle.stats.totals()["partial"] > 0 and handle.stats.flops_fraction < 1.0
    assert handle.transformers[0].tracker.current is None


def test_delta_dit_interval_one_is_dense_and_groups_follow_the_boundary(family):
    pipe = pipes.build(family)
    reference = generate(pipe, family, steps=6)
    accelerate_dit(pipe, "delta-dit", interval=1)
    assert torch.equal(generate(pipe, family, steps=6), reference)
    handle = accelerate_dit(pipe, "delta-dit", interval=2, boundary=0.5, first_steps=1, last_steps=1)
    out = generate(pipe, family, steps=6)
    assert torch.isfinite(out).all() and not torch.equal(out, reference)
    plugin = the_plugin(handle, DeltaDiTPlugin)
    slots = 1 if pipes.is_batched_cfg(family) else 2
    # Full steps 0, 1, 3, 5. Step 2 (< boundary 3) reuses the rear group, step 4 the front group.
    for name in plugin.rear.sublayers:
        assert handle.stats.sublayers[name].reused == slots
    for name in plugin.front.sublayers:
        assert handle.stats.sublayers[name].reused == slots
    remove_acceleration(pipe)
    assert torch.equal(generate(pipe, family, steps=6), reference)


def test_fbcache_forecast_extrapolates_the_residual_linearly(family):
    pipe = pipes.build(family)
    handle = accelerate_dit(pipe, "fbcache", threshold=10.0, warmup_steps=2, last_steps=0, max_consecutive=1,
                            forecast_order=1)
    seen, hooks = capture_range_io(handle, pipe, start=1)
    tracker = handle.transformers[0].tracker
    timesteps = {}
    first_block = handle.transformers[0].spec.blocks(pipe.transformer)[0][2]

    def note_timestep(module, args):
        timesteps.setdefault(tracker.current.step, tracker.current.timestep)

    hook = first_block.register_forward_pre_hook(note_timestep)
    generate(pipe, family, steps=6)
    for h in hooks + [hook]:
        h.remove()
    # Computed: 0, 1 (warm-up), 3, 5 (a cap of 1 skip in a row); skipped: 2, 4.
    for slot in range(1 if pipes.is_batched_cfg(family) else 2):
        residual = {s: seen[(s, slot)]["out"] - seen[(s, slot)]["in"] for s in (0, 1, 3)}
        for skipped, (a, b) in {2: (0, 1), 4: (1, 3)}.items():
            ta, tb, t = timesteps[a], timesteps[b], timesteps[skipped]
            expected = residual[b] + (residual[b] - residual[a]) / (tb - ta) * (t - tb)
            io = seen[(skipped, slot)]
            torch.testing.assert_close(io["out"] - io["in"], expected, rtol=1e-4, atol=1e-4)


def test_cfg_partners_pair_the_kth_cond_row_with_the_kth_uncond_row():
    from dit_accel.caching.first_block import cfg_partners

    assert cfg_partners(("cond", "cond", "uncond", "uncond")) == [2, 3, 0, 1]
    assert cfg_partners(("uncond", "cond")) == [1, 0]
    assert cfg_partners(("cond", "cond")) is None and cfg_partners((None, None)) is None
    assert cfg_partners(("cond", "uncond", None)) is None


@pytest.mark.parametrize("unchanged, skips", [([0], False), ([0, 2], True)])
def test_fbcache_skips_a_samples_cond_and_uncond_rows_together(monkeypatch, unchanged, skips):
    """DiT, two samples under batched CFG (rows: cond 0, cond 1, uncond 0, uncond 1). A cond row whose uncond
    partner changed does not skip alone; the pair skips when both are unchanged."""
    import dit_accel.caching.first_block as first_block

    real = first_block.relative_l1_per_row

    def only_some_rows_unchanged(current, previous):
        numerator, denominator = real(current, previous)
        numerator = numerator.clone() + denominator  # every row changed by 100 %...
        numerator[unchanged] = 0.0  # ...but these
        return numerator, denominator

    monkeypatch.setattr(first_block, "relative_l1_per_row", only_some_rows_unchanged)
    pipe = pipes.build("dit")
    handle = accelerate_dit(pipe, "fbcache", threshold=0.05, warmup_steps=0, last_steps=0)
    generate(pipe, "dit", steps=4, batch_size=2)
    assert (handle.stats.totals()["partial"] > 0) == skips
