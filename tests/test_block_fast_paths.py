"""Blocks served whole: when a sub-layer cache serves every sub-layer of a block, the dual-stream and residual blocks
of every family return their input plus the served outputs under fresh gates (``ResidualOutput``) without running
their norms and modulations. The result must be bit-identical to running the block with the same served
sub-layers, and the stats the same."""

from __future__ import annotations

import pytest
import torch

import pipelines_for_tests as pipes
from dit_accel import accelerate_dit, remove_acceleration
from dit_accel.pipelines import residual_blocks

RESIDUAL_FAMILIES = ["dit", "pixart-sigma", "sd3", "flux", "wan", "cogvideox", "ltx", "qwen-image", "hunyuan-video",
                     "zoo:dit", "zoo:mmdit"]


def generate(pipe, name, steps: int = 6):
    with torch.no_grad():
        return pipes.output_of(name, pipe(**pipes.call_kwargs(name, steps=steps)))


@pytest.mark.parametrize("recipe", ["fora", "taylorseer"])
@pytest.mark.parametrize("family", RESIDUAL_FAMILIES)
def test_a_block_served_whole_equals_the_block_run_on_served_sub_layers(family, recipe):
    pipe = pipes.build(family)
    overrides = {"interval": 2, "first_steps": 2, "last_steps": 0} if recipe == "taylorseer" else {"interval": 2}
    handle = accelerate_dit(pipe, recipe, **overrides)
    applied = []

    def counting(apply):
        def wrapped(block, arguments, served):
            out = apply(block, arguments, served)
            applied.append(out is not None)
            return out
        return wrapped

    with pipes.residual_fast_paths(handle, counting) as present:
        fast = generate(pipe, family)
        fast_stats = handle.stats.totals()
    assert present and applied and all(applied), "every block served whole must take its fast path"
    with pipes.residual_fast_paths(handle, lambda apply: lambda *args: None):
        slow = generate(pipe, family)
        slow_stats = handle.stats.totals()
    assert torch.equal(fast, slow)
    assert fast_stats == slow_stats and fast_stats["reused"] + fast_stats["forecast"] > 0
    remove_acceleration(pipe)


def test_configurations_a_fast_path_does_not_cover_run_the_block():
    from diffusers.models.attention import BasicTransformerBlock

    block = BasicTransformerBlock(16, 2, 8, norm_type="layer_norm")
    assert residual_blocks.basic_block(block, {"hidden_states": torch.zeros(1, 4, 16)}, {"attn1": 0, "ff": 0}) is None
