"""ToCa: token selection, exact partial MLP refresh, relation to FORA, every family."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

import pipelines_for_tests as pipes
from dit_accel import accelerate_dit, load_recipe, remove_acceleration
from dit_accel.caching.toca import ToCaConfig, ToCaPlugin, spread_top_k, token_scores
from dit_accel.core.blocks import TokenGrid


def generate(pipe, name, **kwargs):
    with torch.no_grad():
        return pipes.output_of(name, pipe(**pipes.call_kwargs(name, **kwargs)))


def test_scores_and_spread_selection():
    cached = torch.ones(1, 3, 2)
    current = cached.clone()
    current[0, 1] *= 2
    torch.testing.assert_close(token_scores(current, cached, torch.tensor([[0, 0, 4]]), 0.5),
                               torch.tensor([[0.0, 1.0, 2.0]]))
    scores = torch.arange(16.0).reshape(1, 16)  # a 4x4 grid: the best token of each 2x2 cell is its bottom-right
    chosen = spread_top_k(scores, 4, TokenGrid(1, 4, 4), offset=0, spread=2)
    assert sorted(chosen[0].tolist()) == [5, 7, 13, 15]
    assert sorted(spread_top_k(scores, 4, None, 0, 2)[0].tolist()) == [12, 13, 14, 15]
    with_text = torch.cat([torch.full((1, 3), 100.0), scores], dim=1)  # 3 text tokens first
    chosen = spread_top_k(with_text, 6, TokenGrid(1, 4, 4), offset=3, spread=2)
    assert {5 + 3, 7 + 3, 13 + 3, 15 + 3} <= set(chosen[0].tolist())
    with pytest.raises(ValueError, match=r"ToCaConfig\.mlp_ratio = 1\.5"):
        ToCaConfig(mlp_ratio=1.5)
    assert load_recipe("toca").plugins[0].mlp_ratio == 0.3


def test_ratio_zero_is_fora(family):
    pipe = pipes.build(family)
    accelerate_dit(pipe, "fora", interval=3)
    fora = generate(pipe, family, steps=6)
    accelerate_dit(pipe, "toca", interval=3, mlp_ratio=0.0)
    assert torch.equal(generate(pipe, family, steps=6), fora)


def test_partial_refresh_is_exact_on_the_chosen_tokens(family):
    pipe = pipes.build(family)
    reference = generate(pipe, family, steps=6)
    handle = accelerate_dit(pipe, "toca", interval=3, mlp_ratio=0.25)
    plugin = next(p for p in handle.transformers[0].plugins if isinstance(p, ToCaPlugin))
    tracker = handle.transformers[0].tracker
    seen = defaultdict(list)
    hooks = []
    for name in plugin.sublayers:
        if plugin.roles[name].role != "mlp":
            continue
        list_attr, index, sublayer = name.split(".")
        module = getattr(getattr(pipe.transformer, list_attr)[int(index)], sublayer)

        def record(module, args, output, name=name):
            c = tracker.current
            seen[(name, c.slot)].append((c.step, args[0], output, type(module).forward(module, args[0])))

        hooks.append(module.register_forward_hook(record))
    out = generate(pipe, family, steps=6)
    for hook in hooks:
        hook.remove()
    assert torch.isfinite(out).all() and not torch.equal(out, reference)
    cached_steps = {2, 3}  # computed: 0 (first), 1 and 4 (interval 3 from step 1), 5 (last)
    checked = 0
    for (name, slot), calls in seen.items():
        previous = None
        for step, inputs, output, dense in calls:
            if step in cached_steps:
                fresh = torch.isclose(output, dense, atol=1e-5, rtol=1e-4).all(-1)
                kept = (output == previous).all(-1)
                assert bool((fresh | kept).all()), f"{name} step {step}: a token is neither fresh nor kept"
                expected = max(1, round(0.25 * inputs.shape[1]))
                assert int(fresh.sum(-1).min()) >= expected
                checked += 1
            previous = output
    assert checked > 0
    assert handle.stats.totals()["partial"] > 0 and handle.stats.flops_fraction < 1
    remove_acceleration(pipe)
    assert torch.equal(generate(pipe, family, steps=6), reference)


def test_full_ratios_recompute_everything(family):
    """With every token refreshed in MLPs and every query in attention, cached steps compute what dense does."""
    pipe = pipes.build(family)
    reference = generate(pipe, family, steps=6)
    handle = accelerate_dit(pipe, "toca", interval=3, mlp_ratio=1.0, attention_ratio=1.0, spread=1)
    out = generate(pipe, family, steps=6)
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)
    assert handle.stats.totals()["partial"] > 0


def test_partial_attention_changes_output_and_conflicts_are_refused():
    pipe = pipes.build("flux")
    reference = generate(pipe, "flux", steps=6)
    accelerate_dit(pipe, "toca", interval=3, attention_ratio=0.0)
    reused = generate(pipe, "flux", steps=6)
    accelerate_dit(pipe, "toca", interval=3, attention_ratio=0.5)
    partial = generate(pipe, "flux", steps=6)
    assert not torch.equal(partial, reused) and not torch.equal(partial, reference)
    with pytest.raises(ValueError, match="already routed to 'toca'.*'cfg-share' cannot take it"):
        accelerate_dit(pipe, "toca+cfg-share", attention_ratio=0.5)
    remove_acceleration(pipe)
    assert torch.equal(generate(pipe, "flux", steps=6), reference)
