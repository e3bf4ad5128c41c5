"""Tester-mixin style: every family goes through the same lifecycle checks (cf. diffusers' CacheTesterMixin)."""

from __future__ import annotations

import pytest
import torch
from diffusers.hooks import HookRegistry

from dit_accel import Recipe, accelerate_dit, get_handle, remove_acceleration
from dit_accel.api import TRACKER_HOOK
from dit_accel.core.attention import HOOK_NAME
from dit_accel.core.blocks import spec_for
import pipelines_for_tests as pipes
from dit_accel.pipelines import tiny
from plugins_for_tests import CounterConfig, ProbeConfig, ReuseConfig, ScaleConfig


def generate(pipe, name: str, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return pipes.output_of(name, pipe(**pipes.call_kwargs(name, **kwargs)))


def plugin(handle, cls):
    return next(p for p in handle.transformers[0].plugins if isinstance(p.config, cls))


def module_state(module: torch.nn.Module) -> dict:
    return {name: set(vars(m)) for name, m in module.named_modules()}


class TestLifecycle:
    def test_none_recipe_is_bit_identical(self, family):
        pipe = pipes.build(family)
        reference = generate(pipe, family)
        handle = accelerate_dit(pipe, "none")
        assert handle.transformers[0].attention.layers, "the interception must be installed even for 'none'"
        assert torch.equal(generate(pipe, family), reference)
        assert handle.stats.flops_fraction == 1.0
        assert handle.stats.totals()["reused"] == 0

    def test_removal_restores_bit_identical_outputs(self, family):
        pipe = pipes.build(family)
        reference = generate(pipe, family)
        state_before = module_state(pipe.transformer)
        accelerate_dit(pipe, Recipe((ScaleConfig(factor=0.5),)))
        changed = generate(pipe, family)
        assert not torch.equal(changed, reference), "the test plugin must change the output"
        assert remove_acceleration(pipe) is True
        assert torch.equal(generate(pipe, family), reference)
        assert module_state(pipe.transformer) == state_before
        assert get_handle(pipe) is None and remove_acceleration(pipe) is False

    def test_applying_twice_replaces_the_first(self, family):
        pipe = pipes.build(family)
        first = accelerate_dit(pipe, Recipe((ScaleConfig(factor=0.5),)))
        second = accelerate_dit(pipe, "none")
        assert not first.active and second.active and get_handle(pipe) is second
        registry = HookRegistry.check_if_exists_or_initialize(pipe.transformer)
        assert registry._hook_order.count(TRACKER_HOOK) == 1
        for module in pipe.transformer.modules():
            hooks = getattr(module, "_diffusers_hook", None)
            if hooks is not None:
                assert hooks._hook_order.count(HOOK_NAME) <= 1
        reference = pipes.build(family)
        assert torch.equal(generate(pipe, family), generate(reference, family))
        third = accelerate_dit(pipe, "none")
        assert torch.equal(generate(pipe, family), generate(reference, family))
        third.remove()

    def test_generations_share_no_state(self, family):
        """A stateful cache must start from scratch for each generation, whatever the steps and batch."""
        recipe = Recipe((ReuseConfig(),))
        pipe = pipes.build(family)
        accelerate_dit(pipe, recipe)
        generate(pipe, family, steps=4, batch_size=1)
        second = generate(pipe, family, steps=3, batch_size=2, seed=1)
        third = generate(pipe, family, steps=4, batch_size=1, seed=2)

        for steps, batch, seed, got in ((3, 2, 1, second), (4, 1, 2, third)):
            fresh = pipes.build(family)
            accelerate_dit(fresh, recipe)
            assert torch.equal(got, generate(fresh, family, steps=steps, batch_size=batch, seed=seed))

    def test_exception_in_the_pipeline_loop_is_followed_by_a_clean_generation(self, family):
        recipe = Recipe((ReuseConfig(),))
        pipe = pipes.build(family)
        accelerate_dit(pipe, recipe)
        original_step = pipe.scheduler.step
        calls = {"n": 0}

        def failing_step(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("boom")
            return original_step(*args, **kwargs)

        vars(pipe.scheduler)["step"] = failing_step
        with pytest.raises(RuntimeError, match="boom"):
            generate(pipe, family, steps=4)
        del vars(pipe.scheduler)["step"]
        after = generate(pipe, family, steps=3, seed=5)

        fresh = pipes.build(family)
        accelerate_dit(fresh, recipe)
        assert torch.equal(after, generate(fresh, family, steps=3, seed=5))

    def test_exception_inside_the_transformer_resets_state(self, family):
        recipe = Recipe((ReuseConfig(),))
        pipe = pipes.build(family)
        handle = accelerate_dit(pipe, recipe)
        reuse = plugin(handle, ReuseConfig)
        block = handle.transformers[0].spec.blocks(pipe.transformer)[-1][2]
        calls = {"n": 0}

        def fail_on_third_call(module, args, kwargs):
            calls["n"] += 1
            if calls["n"] == 3:
                raise ValueError("block failed")

        hook = block.register_forward_pre_hook(fail_on_third_call, with_kwargs=True)
        with pytest.raises(ValueError, match="block failed"):
            generate(pipe, family, steps=4)
        hook.remove()
        assert reuse.cache == {}, "the error must drop the cached state"
        assert handle.transformers[0].tracker.current is None
        after = generate(pipe, family, steps=2, seed=3)
        fresh = pipes.build(family)
        accelerate_dit(fresh, recipe)
        assert torch.equal(after, generate(fresh, family, steps=2, seed=3))


class TestTracking:
    def test_steps_and_cfg_branches(self, family):
        pipe = pipes.build(family)
        handle = accelerate_dit(pipe, Recipe((ProbeConfig(),)))
        generate(pipe, family, steps=3, batch_size=1)
        contexts = plugin(handle, ProbeConfig).contexts
        if pipes.is_batched_cfg(family):
            assert [c.step for c in contexts] == [0, 1, 2]
            assert all(c.slot == 0 and c.batch_size == 2 for c in contexts)
            for c in contexts:
                cond_row, uncond_row = c.branches
                assert cond_row != uncond_row, "the two halves of a batched CFG call are different branches"
        else:
            assert [(c.step, c.slot) for c in contexts] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
            assert all(c.batch_size == 1 for c in contexts)
            assert contexts[0].branches[0] != contexts[1].branches[0]
            assert [c.branches[0].role for c in contexts[:2]] == ["cond", "uncond"]
        assert all(c.num_steps == 3 for c in contexts)
        assert contexts[-1].is_last_step and contexts[0].is_first_step
        assert len({c.generation for c in contexts}) == 1

    def test_roles_of_batched_rows(self, family):
        if not pipes.is_batched_cfg(family):
            pytest.skip("separate-call pipelines are covered by test_steps_and_cfg_branches")
        pipe = pipes.build(family)
        handle = accelerate_dit(pipe, Recipe((ProbeConfig(),)))
        generate(pipe, family, steps=2)
        roles = [b.role for b in plugin(handle, ProbeConfig).contexts[0].branches]
        assert roles == (["cond", "uncond"] if family in ("dit", "zoo:dit") else ["uncond", "cond"])

    def test_roles_without_guidance(self):
        for name in ("dit", "pixart-sigma", "flux"):
            pipe = pipes.build(name)
            handle = accelerate_dit(pipe, Recipe((ProbeConfig(),)))
            kwargs = tiny.default_call_kwargs(name, steps=2, guidance_scale=1.0)
            with torch.no_grad():
                pipe(**kwargs)
            contexts = plugin(handle, ProbeConfig).contexts
            assert len(contexts) == 2 and all(b.role == "cond" for c in contexts for b in c.branches), name

    def test_stats_count_every_sublayer_call(self, family):
        pipe = pipes.build(family)
        handle = accelerate_dit(pipe, Recipe((ProbeConfig(report_reused=True),)))
        generate(pipe, family, steps=3)
        stats = handle.stats
        calls = 3 * (1 if pipes.is_batched_cfg(family) else 2)
        assert stats.transformer_calls == calls and stats.steps == 3
        first = handle.transformers[0].stats.sublayer_names[0]
        assert stats.sublayers[first].reused == calls and stats.sublayers[first].computed == 0
        assert all(s.calls == calls for s in stats.sublayers.values())
        assert 0.0 < stats.flops_fraction < 1.0
        table = handle.summary()
        assert first.rpartition(".")[0] in table and "reused" in table


class TestAttentionInterception:
    def test_identity_plugin_sees_every_attention_call(self, family):
        pipe = pipes.build(family)
        reference = generate(pipe, family, steps=2)
        handle = accelerate_dit(pipe, Recipe((CounterConfig(),)))
        out = generate(pipe, family, steps=2)
        assert torch.equal(out, reference)
        counter = plugin(handle, CounterConfig)
        layers = handle.transformers[0].attention.layers
        calls_per_layer = 2 * (1 if pipes.is_batched_cfg(family) else 2)
        assert set(counter.calls) == {layer.name for layer in layers}
        assert all(counter.calls[layer.name] == calls_per_layer for layer in layers), counter.calls
        for layer, layout, q_shape, k_shape, context in counter.seen:
            assert layout.kind == layer.kind and context is not None
            assert layout.grid is not None and layout.grid.num_tokens > 0
            if layer.kind in ("self", "joint"):
                assert layout.matches(q_shape[2]), (layer.name, layout, q_shape)
            if layer.kind == "cross":
                assert q_shape[2] == layout.grid.num_tokens

    def test_interception_is_scoped_to_the_transformer(self, family):
        """SDPA calls of the text encoder and VAE are never routed, and the global function is untouched."""
        sdpa = torch.nn.functional.scaled_dot_product_attention
        pipe = pipes.build(family)
        handle = accelerate_dit(pipe, Recipe((CounterConfig(),)))
        generate(pipe, family, steps=1)
        assert torch.nn.functional.scaled_dot_product_attention is sdpa
        q = torch.randn(1, 2, 4, 8)
        counter = plugin(handle, CounterConfig)
        before = sum(counter.calls.values())
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
        assert sum(counter.calls.values()) == before

    def test_non_sdpa_backend_is_refused_loudly(self):
        pipe = pipes.build("flux")
        handle = accelerate_dit(pipe, Recipe((CounterConfig(),)))
        for module in pipe.transformer.modules():
            processor = getattr(module, "processor", None)
            if processor is not None and hasattr(processor, "_attention_backend"):
                processor._attention_backend = "_native_math_fake"
        layer = handle.transformers[0].attention.layers[0]
        attention_module = getattr(getattr(pipe.transformer, layer.block_list)[layer.block_index], layer.sublayer)

        def no_sdpa_forward(*args, **kwargs):
            return kwargs.get("hidden_states", args[0] if args else None)

        registry = attention_module._diffusers_hook
        registry.hooks[HOOK_NAME].fn_ref.original_forward = no_sdpa_forward
        with pytest.raises(RuntimeError, match="could not intercept attention"):
            generate(pipe, "flux", steps=1)


def _attention_hooked(pipe) -> list[bool]:
    modules = [getattr(block, sub.name) for _, _, block, contract in spec_for(pipe.transformer).blocks(pipe.transformer)
               for sub in contract.sublayers if sub.role == "attention" and getattr(block, sub.name, None) is not None]
    return [HOOK_NAME in getattr(vars(m).get("_diffusers_hook"), "hooks", {}) for m in modules]


def test_attention_layers_are_hooked_only_when_a_plugin_routes_attention():
    """A recipe without attention routing leaves every attention layer unhooked (a hook that only calls through
    costs time on every call); one with it hooks them all; removal unhooks."""
    pipe = pipes.build("flux")
    handle = accelerate_dit(pipe, "magcache")
    assert handle.transformers[0].attention.layers and not any(_attention_hooked(pipe))
    remove_acceleration(pipe)
    accelerate_dit(pipe, Recipe((CounterConfig(),)))
    assert all(_attention_hooked(pipe))
    remove_acceleration(pipe)
    assert not any(_attention_hooked(pipe))


def test_a_plugin_routing_attention_undeclared_is_refused_and_rolled_back(monkeypatch):
    from plugins_for_tests import CounterPlugin

    monkeypatch.setattr(CounterPlugin, "kind", "schedule")  # neither declared nor an attention/parallel kind
    pipe = pipes.build("dit")
    reference = generate(pipe, "dit", steps=2)
    with pytest.raises(RuntimeError, match="routes_attention = True"):
        accelerate_dit(pipe, Recipe((CounterConfig(),)))
    assert get_handle(pipe) is None and not any(_attention_hooked(pipe))
    assert torch.equal(generate(pipe, "dit", steps=2), reference)


def test_plugins_on_disjoint_steps_share_a_layer():
    """Two attention plugins on one layer, each on its own step range: each acts only on its steps."""
    pipe = pipes.build("dit")
    reference = generate(pipe, "dit", steps=4)
    handle = accelerate_dit(pipe, Recipe((ScaleConfig(factor=1.0, steps=(0, 2)), CounterConfig(steps=(2, 4)))))
    assert torch.equal(generate(pipe, "dit", steps=4), reference)  # factor 1.0 and an identity plugin
    counter = plugin(handle, CounterConfig)
    assert {context.step for *_, context in counter.seen} == {2, 3}


def test_scheduler_set_timesteps_starts_a_generation():
    pipe = pipes.build("dit")
    handle = accelerate_dit(pipe, Recipe((ReuseConfig(),)))
    reuse = plugin(handle, ReuseConfig)
    before = reuse.resets
    pipe.scheduler.set_timesteps(7)
    assert reuse.resets == before + 1
    assert handle.transformers[0].tracker._num_steps == 7
