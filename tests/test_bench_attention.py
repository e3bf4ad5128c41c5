"""The attention measuring helpers of dit_accel.bench.attention: fidelity, FLUX-block q/k/v, capture, timing."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dit_accel.api import get_handle
from dit_accel.bench.attention import (CapturedCall, attention_fidelity, capture_attention, effective_keys,
                                       flux_block_activations, side_by_side_attention)
from dit_accel.pipelines import tiny


def test_attention_fidelity_identical_and_perturbed():
    g = torch.Generator().manual_seed(0)
    exact = torch.randn(2, 3, 16, 8, generator=g)
    same = attention_fidelity(exact.clone(), exact)
    assert abs(same["cosine"] - 1) < 1e-12 and abs(same["cosine_min"] - 1) < 1e-12 and same["rel_l1"] == 0
    noisy = exact.clone()
    noisy[1, 2] += 0.5 * torch.randn(16, 8, generator=g)  # one head perturbed
    score = attention_fidelity(noisy, exact)
    assert score["cosine_min"] < score["cosine"] < 1 and 0.7 < score["cosine_min"] < 0.99
    assert 0 < score["rel_l1"] < 0.2
    assert abs(attention_fidelity(-exact, exact)["cosine"] + 1) < 1e-12
    assert abs(attention_fidelity(2 * exact, exact)["rel_l1"] - 1) < 1e-12


def test_flux_block_activations_shapes_text_first_and_dense_output():
    call = flux_block_activations(8, heads=2, head_dim=64, text_tokens=4)
    assert call.query.shape == call.key.shape == call.value.shape == (1, 2, 68, 64)
    assert call.layout.kind == "joint" and call.layout.text_position == "first"
    assert call.layout.num_text_tokens == 4 and call.grid.num_tokens == 64
    dense = F.scaled_dot_product_attention(call.query, call.key, call.value, scale=call.scale)
    torch.testing.assert_close(dense, call.output, rtol=0, atol=1e-6)
    q, k, v, k_text, v_text = call.split()
    assert q.shape == k.shape == v.shape == (1, 2, 64, 64) and k_text.shape == v_text.shape == (1, 2, 4, 64)
    # Values carry no RoPE: the smooth image field makes image values alike, the white-noise text ones not.
    def mean_cosine(x):
        x = F.normalize(x[0].flatten(0, 0), dim=-1)
        sims = x @ x.transpose(-1, -2)
        n = x.shape[1]
        return float((sims.sum((-1, -2)) - n).mean() / (n * (n - 1)))
    assert mean_cosine(v) > 0.5 > mean_cosine(v_text)
    again = flux_block_activations(8, heads=2, head_dim=64, text_tokens=4)
    assert torch.equal(again.query, call.query)
    assert 0 < effective_keys(q, call.key, call.scale) <= 1


def test_capture_attention_on_tiny_sd3_leaves_the_pipeline_unchanged():
    pipe = tiny.build("sd3", num_layers=2)

    def generate():
        return pipe(**tiny.default_call_kwargs("sd3", steps=3, seed=0, batch_size=1)).images

    before = generate()
    calls = capture_attention(pipe, generate, step=1)
    blocks = len(pipe.transformer.transformer_blocks)
    assert [c.layer for c in calls] == [f"transformer_blocks.{i}.attn" for i in range(blocks)]
    for call in calls:
        assert isinstance(call, CapturedCall) and call.step == 1
        layout = call.layout
        assert layout.kind == "joint" and layout.text_position == "last" and layout == calls[0].layout
        assert call.query.shape[2] == layout.grid.num_tokens + layout.num_text_tokens
        q, k, v, k_text, v_text = call.split()
        assert q.shape[2] == layout.grid.num_tokens and k_text.shape[2] == layout.num_text_tokens
        torch.testing.assert_close(F.scaled_dot_product_attention(call.query, call.key, call.value,
                                                                  scale=call.scale), call.output)
    assert get_handle(pipe) is None
    assert torch.equal(generate(), before)
    assert len(capture_attention(pipe, generate, step=[0, 2], layers=2)) == 4


def test_side_by_side_attention_times_every_callable():
    x = torch.randn(1, 1, 32, 8)
    timings = side_by_side_attention({"dense": lambda: F.scaled_dot_product_attention(x, x, x),
                                      "copy": lambda: x.clone()}, repeats=3)
    assert set(timings) == {"dense", "copy"} and all(t.runs == 3 and t.median > 0 for t in timings.values())
