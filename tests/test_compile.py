"""torch.compile with the acceleration: decisions stay eager, compiled regions fullgraph, outputs unchanged."""

from __future__ import annotations

import pytest
import torch

import pipelines_for_tests as pipes
from dit_accel import accelerate_dit


def generate(pipe, name, steps=4):
    with torch.no_grad():
        return pipes.output_of(name, pipe(**pipes.call_kwargs(name, steps=steps)))


@pytest.mark.parametrize("name", ["dit", pytest.param("flux", marks=pytest.mark.slow)])
def test_blocks_compile_fullgraph_under_the_none_recipe(name):
    pipe = pipes.build(name)
    reference = generate(pipe, name, steps=2)
    handle = accelerate_dit(pipe, "none")
    torch._dynamo.reset()
    for _, _, block, _ in handle.transformers[0].spec.blocks(pipe.transformer):
        block.compile(fullgraph=True, backend="eager")
    torch.testing.assert_close(generate(pipe, name, steps=2), reference, rtol=1e-5, atol=1e-5)
    assert handle.stats.transformer_calls == 2 * (1 if pipes.is_batched_cfg(name) else 2)


@pytest.mark.parametrize("name,recipe", [(name, recipe) if name == "dit" or recipe == "fora" else
                                         pytest.param(name, recipe, marks=pytest.mark.slow)
                                         for name in ("dit", "flux")
                                         for recipe in ("fora", "taylorseer", "fbcache", "delta-dit", "fora+cfg-share")])
def test_handle_compile_keeps_decisions_outside(name, recipe):
    pipe = pipes.build(name)
    overrides = {"threshold": 10.0} if recipe == "fbcache" else {}
    handle = accelerate_dit(pipe, recipe, **overrides)
    eager = generate(pipe, name, steps=6)
    eager_stats = handle.stats.totals()
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    # Block instances each get their own graph (diffusers' hooks give every module its own `forward`), so the
    # limit is generous; what matters is that nothing recompiles from step to step or from one generation to the
    # next: the second generation compiles no new graph.
    with torch._dynamo.config.patch(recompile_limit=64, fail_on_recompile_limit_hit=True):
        handle.compile(fullgraph=True, backend="eager")
        compiled = generate(pipe, name, steps=6)
        graphs = counters["stats"]["unique_graphs"]
        again = generate(pipe, name, steps=6)
        assert counters["stats"]["unique_graphs"] == graphs
    regions = sum(len(r.modules) + len(r.forwards) for r in handle._compiled)
    assert 0 < graphs <= 2 * regions, (graphs, regions)  # a decision inside a graph would specialise on each step
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert torch.equal(compiled, again)
    assert handle.stats.totals() == eager_stats, "the same decisions were taken"
    handle.remove()
    assert all(m._compiled_call_impl is None for m in pipe.transformer.modules())
