"""The diffusers anchors FasterCache and Pyramid Attention Broadcast in the harness: they run on the zoo models
(batched CFG and separate calls), change the output, and their removal restores the dense pipeline exactly."""

from __future__ import annotations

import pytest
import torch

from dit_accel.bench.baselines import apply_baseline
from dit_accel.bench.harness import BenchConfig, plan
from dit_accel.pipelines import zoo

STEPS = 12


def _generate(pipe):
    return pipe(class_labels=[1, 2], num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                output_type="pt").images


@pytest.mark.parametrize("model", ["dit", "mmdit"])
@pytest.mark.parametrize("name", ["diffusers:fastercache", pytest.param("diffusers:pab", marks=pytest.mark.slow)])
def test_attention_broadcast_anchors_run_and_remove_cleanly(model, name):
    pipe = zoo.load(model)
    dense = _generate(pipe)
    applied = apply_baseline(name, pipe, num_steps=STEPS, setting={"spatial_attention_block_skip_range": 2},
                             calibration=lambda: _generate(pipe))
    try:
        output = applied.run(lambda: _generate(pipe))
    finally:
        applied.remove()
    assert torch.isfinite(output).all() and not torch.equal(output, dense)
    assert torch.equal(_generate(pipe), dense)


def test_anchor_settings_are_checked_by_the_harness():
    config = BenchConfig(model="zoo:dit", recipes=[], baselines=["diffusers:pab@spatial_attention_block_skip_range=3"])
    entries = plan(config, STEPS)
    assert entries[-1].setting["spatial_attention_block_skip_range"] == 3
    with pytest.raises(ValueError, match="has no setting bogus"):
        plan(BenchConfig(model="zoo:dit", recipes=[], baselines=["diffusers:fastercache@bogus=1"]), STEPS)


@pytest.mark.parametrize("name", ["cache-dit:dbcache+foca", "cache-dit:dbcache+dmd", "cache-dit:dbcache+scm"])
def test_cache_dit_calibrators_and_step_mask_anchors(name):
    pytest.importorskip("cache_dit")
    from dit_accel.bench.harness import DEFAULT_BASELINE_SETTINGS

    pipe = zoo.load("mmdit")
    dense = _generate(pipe)
    applied = apply_baseline(name, pipe, num_steps=STEPS, setting=dict(DEFAULT_BASELINE_SETTINGS[name]),
                             calibration=lambda: _generate(pipe))
    try:
        output = applied.run(lambda: _generate(pipe))
    finally:
        applied.remove()
    assert torch.isfinite(output).all() and not torch.equal(output, dense)
    assert torch.equal(_generate(pipe), dense)
    with pytest.raises(Exception, match="does not run on DiTTransformer2DModel"):
        apply_baseline(name, zoo.load("dit"), num_steps=STEPS, setting={}, calibration=lambda: None)
