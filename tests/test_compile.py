"""The machinery must not stand in the way of torch.compile: with recipe 'none' every block compiles fullgraph."""

from __future__ import annotations

import pytest
import torch

from dit_accel import accelerate_dit
from dit_accel.pipelines import tiny


@pytest.mark.parametrize("name", ["dit", "flux"])
def test_blocks_compile_fullgraph_under_the_none_recipe(name):
    pipe = tiny.build(name)
    with torch.no_grad():
        reference = tiny.output_of(name, pipe(**tiny.default_call_kwargs(name, steps=2)))
    handle = accelerate_dit(pipe, "none")
    torch._dynamo.reset()
    for _, _, block, _ in handle.transformers[0].spec.blocks(pipe.transformer):
        block.compile(fullgraph=True, backend="eager")
    with torch.no_grad():
        out = tiny.output_of(name, pipe(**tiny.default_call_kwargs(name, steps=2)))
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    assert handle.stats.transformer_calls == 2 * (1 if tiny.is_batched_cfg(name) else 2)
