"""FORA on every family: the schedule, exact reuse semantics, per-branch caches, reset, removal."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

import pipelines_for_tests as pipes
from dit_accel import accelerate_dit, load_recipe, remove_acceleration
from dit_accel.caching.fora import ForaConfig, ForaPlugin, fora_computes


def generate(pipe, name, **kwargs):
    with torch.no_grad():
        return pipes.output_of(name, pipe(**pipes.call_kwargs(name, **kwargs)))


def test_schedule():
    computed = [s for s in range(10) if fora_computes(s, 10, interval=3, first_steps=1, last_steps=1)]
    assert computed == [0, 1, 4, 7, 9]
    assert all(fora_computes(s, 10, 1, 0, 0) for s in range(10))
    assert [s for s in range(6) if fora_computes(s, None, 2, 0, 3)] == [0, 2, 4]  # unknown length: no tail rule
    assert [s for s in range(8) if fora_computes(s, 8, 4, 2, 2)] == [0, 1, 2, 6, 7]


def test_config_validation_and_recipes():
    with pytest.raises(ValueError, match=r"ForaConfig\.interval = 0 is out of range; allowed: an integer in \[1, 50\]"):
        ForaConfig(interval=0)
    with pytest.raises(ValueError, match="first_steps = 2.5"):
        ForaConfig(first_steps=2.5)
    assert load_recipe("fora").plugins == (ForaConfig(interval=3),)
    assert load_recipe("fora-max").plugins[0].interval == 6
    assert load_recipe("fora", interval=5).plugins[0].interval == 5
    with pytest.raises(ValueError, match="'fora' and 'fora' conflict"):
        load_recipe("fora+fora-fast")


def fora_plugin(handle) -> ForaPlugin:
    return next(p for p in handle.transformers[0].plugins if isinstance(p, ForaPlugin))


def test_interval_one_is_dense(family):
    pipe = pipes.build(family)
    reference = generate(pipe, family, steps=3)
    handle = accelerate_dit(pipe, "fora", interval=1)
    assert torch.equal(generate(pipe, family, steps=3), reference)
    assert handle.stats.totals()["reused"] == 0


def test_reuse_schedule_semantics_and_removal(family):
    pipe = pipes.build(family)
    reference = generate(pipe, family, steps=6)
    handle = accelerate_dit(pipe, "fora", interval=2)
    plugin = fora_plugin(handle)
    tracker = handle.transformers[0].tracker

    outputs = defaultdict(list)  # (sub-layer, slot) -> [(step, output)]
    hooks, merged = [], set()
    for list_attr, index, block, contract in handle.transformers[0].spec.blocks(pipe.transformer):
        for sublayer in contract.sublayers:
            module = getattr(block, sublayer.name, None)
            if module is None:
                continue
            name = f"{list_attr}.{index}.{sublayer.name}"
            if contract.merged is not None or contract.residual is not None:
                merged.add(name)  # served at the block (its projection, or its residual): the sub-layer does not run

            def record(module, args, output, name=name):
                context = tracker.current
                outputs[(name, context.slot)].append((context.step, output))

            hooks.append(module.register_forward_hook(record))
    out = generate(pipe, family, steps=6)
    for hook in hooks:
        hook.remove()

    assert torch.isfinite(out).all() and not torch.equal(out, reference)
    slots = 1 if pipes.is_batched_cfg(family) else 2
    stats = handle.stats
    assert all(s.reused == 2 * slots and s.computed == 4 * slots for s in stats.sublayers.values())
    assert set(plugin.sublayers) == set(stats.sublayers)
    reused_steps = {2, 4}
    for (name, slot), seen in outputs.items():
        if name in merged:
            assert [step for step, _ in seen] == [0, 1, 3, 5]
            continue
        assert [step for step, _ in seen] == list(range(6))
        for step, output in seen:
            previous = seen[step - 1][1] if step else None
            if step in reused_steps:
                assert output is previous, f"{name} slot {slot} step {step} must reuse step {step - 1}"
            elif previous is not None:
                assert output is not previous
    if slots == 2:  # cond and uncond calls keep their own caches
        for name in plugin.sublayers:
            if name not in merged:
                first = outputs[(name, 0)][0][1]
                second = outputs[(name, 1)][0][1]
                assert first is not second
    assert plugin.store.entries == {}, "the cache is dropped at the end of the generation"
    assert stats.cache_bytes > 0 and 0 < stats.flops_fraction < 1

    remove_acceleration(pipe)
    assert torch.equal(generate(pipe, family, steps=6), reference)


def test_layers_and_steps_scope():
    pipe = pipes.build("flux")
    handle = accelerate_dit(pipe, "fora", interval=2, layers=("single_transformer_blocks.*",), steps=(0, 4))
    generate(pipe, "flux", steps=6)
    stats = handle.stats.sublayers
    assert all(s.reused == 0 for n, s in stats.items() if n.startswith("transformer_blocks"))
    assert all(s.reused == 2 for n, s in stats.items() if n.startswith("single_transformer_blocks"))  # step 2 only


@pytest.mark.parametrize("interval", [2, 3, 5])
def test_flops_fraction_is_one_over_interval_plus_warm_up(interval):
    steps = 30
    pipe = pipes.build("flux")
    handle = accelerate_dit(pipe, "fora", interval=interval, first_steps=2, last_steps=1)
    generate(pipe, "flux", steps=steps)
    computed = sum(fora_computes(s, steps, interval, 2, 1) for s in range(steps))
    stats = handle.stats
    # The sub-layers cost computed/steps of dense; embeddings, gates and final layers run in every call.
    sublayers = stats.dense_flops - stats.outside_dense_flops
    assert stats.outside_flops == stats.outside_dense_flops > 0
    assert stats.flops == pytest.approx(sublayers * computed / steps + stats.outside_dense_flops)
    assert abs(computed / steps - 1 / interval) < 3 / steps + 1e-9  # 1/N plus warm-up and tail


@pytest.mark.parametrize("family", ["flux", "hunyuan-video"])
def test_single_stream_blocks_are_served_at_their_projection(family):
    """A reused single-stream block skips its sub-layers, activation and proj_out: rebuilt from the cached proj_out
    output with a fresh gate it equals what the block computes, and its proj_out is counted in the FLOPs."""
    pipe = pipes.build(family)
    handle = accelerate_dit(pipe, "none")
    acc = handle.transformers[0]
    singles = [(block, contract) for _, _, block, contract in acc.spec.blocks(pipe.transformer) if contract.merged]
    assert singles
    block, contract = singles[0]
    seen = {}
    hooks = [block.register_forward_hook(lambda m, a, k, out: seen.update(args=a, kwargs=k, out=out), with_kwargs=True),
             getattr(block, contract.merged.module).register_forward_hook(lambda m, a, out: seen.update(merged=out))]
    generate(pipe, family, steps=1)
    for hook in hooks:
        hook.remove()
    from dit_accel.caching.sublayer import _arguments

    rebuilt = contract.merged.apply(block, _arguments(block, seen["args"], seen["kwargs"]), seen["merged"])
    for mine, theirs in zip(rebuilt, seen["out"]):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    projection = getattr(block, contract.merged.module)
    stats = handle.stats
    name = next(n for n in stats.sublayers if n.startswith("single_transformer_blocks.0."))
    assert any(k == f"<{contract.merged.module}>" for _, _, linears, _ in acc.stats._layers for k in linears)
    total_columns = sum(linears[f"<{contract.merged.module}>"] for n, _, linears, _ in acc.stats._layers
                        if n.startswith("single_transformer_blocks.0."))
    assert total_columns == 2 * projection.in_features * projection.out_features, name
    handle = accelerate_dit(pipe, "fora", interval=2, first_steps=1, last_steps=0)
    calls = []
    hook = getattr(block, contract.merged.module).register_forward_hook(lambda m, a, out: calls.append(1))
    generate(pipe, family, steps=3)
    hook.remove()
    slots = 1 if pipes.is_batched_cfg(family) else 2
    assert len(calls) == 2 * slots  # steps 0 and 1 compute, step 2 is served without running proj_out
    assert handle.stats.sublayers[name].reused == slots
