"""CFG sharing in both conventions: batched rows and separate cond/uncond calls."""

from __future__ import annotations

import pytest
import torch

import pipelines_for_tests as pipes
from dit_accel import accelerate_dit, remove_acceleration
from dit_accel.caching.cfg_share import CFGShareConfig, sharing_window


def test_window_and_validation():
    assert [s for s in range(8) if sharing_window(s, 8, 0.5, 1.0)] == [4, 5, 6, 7]
    assert not sharing_window(3, None, 0.0, 1.0)
    with pytest.raises(ValueError, match="end = 0.2 must be greater than start = 0.5"):
        CFGShareConfig(start=0.5, end=0.2)


def test_uncond_attention_equals_cond_in_the_window(family):
    pipe = pipes.build(family)
    dense_outputs, shared_outputs = {}, {}

    def run(recipe_kwargs, store):
        handle = accelerate_dit(pipe, "cfg-share", **recipe_kwargs)
        tracker = handle.transformers[0].tracker
        hooks = []
        for layer in handle.transformers[0].attention.layers:
            module = getattr(getattr(pipe.transformer, layer.block_list)[layer.block_index], layer.sublayer)

            def record(module, args, output, name=layer.name):
                c = tracker.current
                first = output[0] if isinstance(output, tuple) else output
                store[(name, c.step, c.slot)] = (first, [b.role for b in c.branches])

            hooks.append(module.register_forward_hook(record))
        with torch.no_grad():
            out = pipes.output_of(family, pipe(**pipes.call_kwargs(family, steps=4)))
        for hook in hooks:
            hook.remove()
        return handle, out

    reference = pipes.output_of(family, pipe(**pipes.call_kwargs(family, steps=4)))
    run({"start": 0.999, "end": 1.0}, dense_outputs)  # the window holds no step: dense
    handle, out = run({"start": 0.5, "end": 1.0}, shared_outputs)
    assert torch.isfinite(out).all()
    layers = [layer.name for layer in handle.transformers[0].attention.layers]
    for name in layers:
        for step in (0, 1):  # before the window: exactly dense
            for key in [k for k in dense_outputs if k[0] == name and k[1] == step]:
                assert torch.equal(shared_outputs[key][0], dense_outputs[key][0])
        for step in (2, 3):
            if pipes.is_batched_cfg(family):
                tensor, roles = shared_outputs[(name, step, 0)]
                cond, uncond = roles.index("cond"), roles.index("uncond")
                torch.testing.assert_close(tensor[cond], tensor[uncond])
            else:
                torch.testing.assert_close(shared_outputs[(name, step, 0)][0], shared_outputs[(name, step, 1)][0])
    stats = handle.stats
    assert stats.totals()["partial"] > 0 and stats.flops_fraction < 1
    remove_acceleration(pipe)
    assert torch.equal(pipes.output_of(family, pipe(**pipes.call_kwargs(family, steps=4))), reference)
