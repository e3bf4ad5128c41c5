"""SVG2: k-means and the cluster permutation, top-p selection, the gathered attention against masked-dense
references, the Triton kernel path (interpreter), and the plugin on every pipeline family."""

from __future__ import annotations

import warnings
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

import pipelines_for_tests as pipes
from dit_accel import accelerate_dit, remove_acceleration
from dit_accel.attention import svg2
from dit_accel.attention.kmeans import (
    batched_kmeans,
    cluster_counts,
    cluster_permutation,
    cluster_sums,
    initial_centroids,
    invert_permutation,
)
from dit_accel.attention.svg2 import SVG2Config
from dit_accel.attention.svg2_clusters import (
    cluster_attention,
    cluster_density,
    cluster_mask,
    cluster_scores,
    plan_clusters,
    top_p_selection,
)
from dit_accel.core.attention import AttentionCall, KeyPaddingReader, LayerId
from dit_accel.core.blocks import TokenGrid, TokenLayout
from dit_accel.kernels import triton_importable


def qkv(batch=2, heads=3, length=90, dim=16, text=0, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, length, dim, generator=g, dtype=dtype) for _ in range(3))
    tk, tv = (torch.randn(batch, heads, text, dim, generator=g, dtype=dtype) for _ in range(2))
    return q, k, v, tk, tv


def dense(q, k, v, tk, tv, mask=None):
    """Float64 SDPA over [image; text] keys, image keys restricted by ``mask`` (B, H, N, N)."""
    if mask is not None:
        mask = torch.cat([mask, torch.ones(*mask.shape[:3], tk.shape[2], dtype=torch.bool)], -1)
    return F.scaled_dot_product_attention(q.double(), torch.cat([k, tk], 2).double(), torch.cat([v, tv], 2).double(),
                                          attn_mask=mask)


# -- k-means and the permutation -------------------------------------------------------------------------------------
def test_permutation_round_trip_is_exact_and_stable():
    labels = torch.randint(0, 5, (3, 41), generator=torch.Generator().manual_seed(0))
    x = torch.randn(3, 41, 4)
    order, inverse = cluster_permutation(labels)
    assert torch.equal(order.gather(1, inverse), torch.arange(41).expand(3, -1))
    assert torch.equal(inverse, invert_permutation(order))
    permuted = x.gather(1, order[..., None].expand(-1, -1, 4))
    assert torch.equal(permuted.gather(1, inverse[..., None].expand(-1, -1, 4)), x)
    sorted_labels = labels.gather(1, order)
    assert bool((sorted_labels[:, 1:] >= sorted_labels[:, :-1]).all())  # each cluster one contiguous run
    same = sorted_labels[:, 1:] == sorted_labels[:, :-1]
    assert bool((order[:, 1:] > order[:, :-1])[same].all())  # stable: natural order inside a cluster


def test_kmeans_is_deterministic_and_keeps_a_fixed_point():
    x = torch.randn(4, 200, 8, generator=torch.Generator().manual_seed(1))
    start = initial_centroids(x, 6)
    first, second = batched_kmeans(x, start, 5), batched_kmeans(x, start.clone(), 5)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    labels, centroids, counts = first
    assert torch.equal(counts, cluster_counts(labels, 6)) and int(counts.sum()) == 4 * 200
    for g in range(4):  # every non-empty centroid is the mean of its cluster
        for c in range(6):
            if counts[g, c]:
                torch.testing.assert_close(centroids[g, c], x[g][labels[g] == c].mean(0))
    # Centroids that are the means of their own clusters come back unchanged; an empty cluster keeps its centroid.
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [100.0, 100.0]], dtype=torch.float64)[None]
    offsets = torch.tensor([[1.0, 0.5], [-1.0, -0.5], [0.25, -1.0], [-0.25, 1.0]], dtype=torch.float64)
    truth = torch.tensor([0, 1, 2]).repeat_interleave(4)
    points = (centres[0, truth] + offsets.repeat(3, 1))[None]
    labels, centroids, counts = batched_kmeans(points, centres, 3)
    assert torch.equal(labels[0], truth) and torch.equal(centroids, centres)
    assert counts[0].tolist() == [4, 4, 4, 0]
    # The CUDA summation (one-hot products) agrees with the CPU one (scatter_add).
    torch.testing.assert_close(cluster_sums(x, first[0], 6, matmul=True), cluster_sums(x, first[0], 6, matmul=False))
    with pytest.raises(ValueError, match="num_clusters = 13"):
        initial_centroids(points, 13)
    with pytest.raises(ValueError, match="iters = 0"):
        batched_kmeans(points, centres, 0)


# -- selection -------------------------------------------------------------------------------------------------------
def test_scores_carry_the_log_cluster_mass():
    cq, ck = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
    counts = torch.tensor([[1, 2, 3, 0, 4], [5, 5, 5, 5, 5]])
    scores = cluster_scores(cq, ck, counts, 0.5)
    torch.testing.assert_close(scores[1], cq[1] @ ck[1].T * 0.5 + torch.tensor(5.0).log())
    assert bool(torch.isneginf(scores[0, :, 3]).all()) and bool(torch.isfinite(scores[0, :, :3]).all())


def test_top_p_keeps_the_crossing_cluster_and_the_minimum():
    scores = torch.tensor([0.1, 0.5, 0.4]).log()[None]  # masses 0.1, 0.5, 0.4 (sorted: 1, 2, 0)
    assert top_p_selection(scores, 0.3).tolist() == [[False, True, False]]
    assert top_p_selection(scores, 0.49).tolist() == [[False, True, False]]
    assert top_p_selection(scores, 0.55).tolist() == [[False, True, True]]  # cluster 2 crosses 0.55: kept
    assert top_p_selection(scores, 0.95).tolist() == [[True, True, True]]
    assert top_p_selection(scores, 0.0).tolist() == [[False, True, False]]  # at least one
    assert top_p_selection(scores, 0.3, min_kc_ratio=0.9).tolist() == [[True, True, True]]
    assert top_p_selection(scores, 0.3, min_kc_ratio=0.5).tolist() == [[False, True, True]]
    assert bool(top_p_selection(scores, 1.0).all())


def test_smaller_top_p_keeps_a_subset():
    scores = torch.randn(2, 3, 7, 11, generator=torch.Generator().manual_seed(2)) * 3
    previous = None
    for p in (0.0, 0.2, 0.5, 0.8, 0.95, 0.999, 1.0):
        selection = top_p_selection(scores, p, min_kc_ratio=0.1)
        if previous is not None:
            assert bool((previous <= selection).all())
        previous = selection


# -- the attention ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", [0, 5])
@pytest.mark.parametrize("piece", [4, 16])
def test_sparse_attention_equals_masked_dense_reference(text, piece):
    q, k, v, tk, tv = qkv(text=text)
    plan = plan_clusters(q, k, num_q_clusters=7, num_k_clusters=9, top_p=0.7, min_kc_ratio=0.1, iters=4)
    mask = cluster_mask(plan.q_labels, plan.k_labels, plan.selection)
    assert 0.0 < plan.key_density() < 1.0
    assert plan.key_density() == pytest.approx(float(mask.double().mean()))
    out = cluster_attention(q, k, v, plan.q_labels, plan.k_labels, plan.selection, text_key=tk, text_value=tv,
                            piece=piece)
    torch.testing.assert_close(out, dense(q, k, v, tk, tv, mask), atol=1e-12, rtol=0)


@pytest.mark.parametrize("text", [0, 6])
@pytest.mark.parametrize("clusters,top_p", [((6, 8), 1.0), ((4, 1), 0.5)])
def test_everything_selected_is_dense_attention(text, clusters, top_p):
    q, k, v, tk, tv = qkv(text=text, dtype=torch.float32, seed=3)
    plan = plan_clusters(q, k, num_q_clusters=clusters[0], num_k_clusters=clusters[1], top_p=top_p,
                         min_kc_ratio=0.0, iters=3)
    assert bool(plan.selection.all()) and cluster_density(plan.q_labels, plan.k_labels, plan.selection) == 1.0
    out = cluster_attention(q, k, v, plan.q_labels, plan.k_labels, plan.selection, text_key=tk, text_value=tv)
    torch.testing.assert_close(out.double(), dense(q, k, v, tk, tv), atol=1e-5, rtol=0)


@pytest.mark.skipif(not triton_importable(), reason="Triton is not installed")
def test_kernel_path_equals_cpu_path(interpreter):
    from dit_accel.kernels.cluster_lut import cluster_block_attention, cluster_kernel_usable

    q, k, v, tk, tv = qkv(batch=1, heads=2, length=70, text=5, dtype=torch.float32, seed=4)
    plan = plan_clusters(q, k, num_q_clusters=3, num_k_clusters=6, top_p=0.6, min_kc_ratio=0.1, iters=3)
    assert cluster_kernel_usable(q, k, v) and 0.0 < plan.key_density() < 1.0
    expected = cluster_attention(q, k, v, plan.q_labels, plan.k_labels, plan.selection, text_key=tk, text_value=tv)
    out = cluster_block_attention(q, k, v, plan.q_labels, plan.k_labels, plan.selection, text_key=tk, text_value=tv,
                                  block_q=16, block_k=16)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


# -- config and plugin -----------------------------------------------------------------------------------------------
def test_config_validation_and_cluster_sizing():
    with pytest.raises(ValueError, match=r"top_p = 1\.5 is out of range"):
        SVG2Config(top_p=1.5)
    with pytest.raises(ValueError, match="min_kc_ratio"):
        SVG2Config(min_kc_ratio=-0.1)
    with pytest.raises(ValueError, match="kmeans_iters_step = 0"):
        SVG2Config(kmeans_iters_step=0)
    with pytest.raises(ValueError, match="num_k_clusters"):
        SVG2Config(num_k_clusters=2.5)
    with pytest.raises(ValueError, match="recluster_interval"):
        SVG2Config(recluster_interval=0)
    for name in ("min_q_clusters", "min_k_clusters"):
        with pytest.raises(ValueError, match=rf"{name} = 0 is out of range"):
            SVG2Config(**{name: 0})
        with pytest.raises(ValueError, match=name):
            SVG2Config(**{name: 70000})
        with pytest.raises(ValueError, match=name):
            SVG2Config(**{name: 2.5})
    assert SVG2Config().cluster_numbers(4096) == (32, 128)
    assert SVG2Config().cluster_numbers(100) == (16, 32)  # the floors
    assert SVG2Config(min_q_clusters=1, min_k_clusters=1).cluster_numbers(100) == (1, 4)  # floors off
    assert SVG2Config(num_q_clusters=500, num_k_clusters=7).cluster_numbers(300) == (300, 7)


def test_cluster_floor_on_small_grids():
    config = SVG2Config()
    assert config.cluster_numbers(64) == (16, 32) and config.dense_reason(64) is None  # the zoo's 8x8 grid
    assert config.cluster_numbers(300) == (16, 32) and config.cluster_numbers(1024) == (16, 32)
    assert SVG2Config(min_q_clusters=64, min_k_clusters=48).cluster_numbers(64) == (32, 32)  # >= 2 tokens a cluster
    assert SVG2Config(num_q_clusters=3, num_k_clusters=5).cluster_numbers(64) == (3, 5)  # set counts: no floor
    assert SVG2Config(num_q_clusters=3, num_k_clusters=5).dense_reason(3) is None
    reason = config.dense_reason(63)
    assert "at least 64 image tokens" in reason and "8x8" in reason and "min_k_clusters=32" in reason
    assert "at least 32 image tokens" in SVG2Config(min_k_clusters=16).dense_reason(31)
    assert SVG2Config(min_k_clusters=16).dense_reason(32) is None
    # Without a key floor the first call with two key clusters is k_cluster_tokens + 1 tokens long.
    assert "at least 33 image tokens" in SVG2Config(min_k_clusters=1).dense_reason(32)
    assert SVG2Config(min_k_clusters=1).dense_reason(33) is None
    assert "num_k_clusters=1" in SVG2Config(num_k_clusters=1).dense_reason(4096)
    assert "two key clusters" in SVG2Config(num_k_clusters=4).dense_reason(1)


def test_floor_not_binding_keeps_the_previous_sizing():
    def previous(config, tokens):  # the sizing before the floors existed
        def size(fixed, per):
            return max(1, min(tokens, fixed or -(-tokens // per)))
        return (size(config.num_q_clusters, config.q_cluster_tokens),
                size(config.num_k_clusters, config.k_cluster_tokens))

    for config in (SVG2Config(), SVG2Config(q_cluster_tokens=64, k_cluster_tokens=8, min_q_clusters=3),
                   SVG2Config(num_q_clusters=5, k_cluster_tokens=16), SVG2Config(min_q_clusters=1, min_k_clusters=1)):
        for tokens in list(range(1, 600)) + [1023, 1024, 1921, 2048, 4096, 4097, 16384, 65536]:
            now, before = config.cluster_numbers(tokens), previous(config, tokens)
            q_free = config.num_q_clusters or before[0] >= config.min_q_clusters
            k_free = config.num_k_clusters or before[1] >= config.min_k_clusters
            assert now[0] >= before[0] and now[1] >= before[1]  # a floor only ever adds clusters
            if q_free:
                assert now[0] == before[0], (config, tokens)
            if k_free:
                assert now[1] == before[1], (config, tokens)
            if config.min_q_clusters == config.min_k_clusters == 1:
                assert now == before  # floors of 1 are the previous sizing everywhere


def _plugin_call(config, grid, text=0):
    """An SVG2 plugin outside a pipeline and one of its calls (no context: no state is kept)."""
    plugin = svg2.SVG2Plugin.__new__(svg2.SVG2Plugin)
    plugin.config, plugin.target, plugin.states = config, None, {}
    plugin.fallbacks, plugin._warned = Counter(), set()
    plugin.key_padding = KeyPaddingReader()
    layout = TokenLayout("joint" if text else "self", grid, num_text_tokens=text, text_position="last")
    options = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
    return plugin, AttentionCall(layer=LayerId("blocks", 0, "attn", layout.kind), layout=layout, context=None,
                                 index=0, options=options)


def _spy_plans(monkeypatch):
    plans = []
    plan = svg2.plan_clusters

    def spy(*args, **kwargs):
        plans.append((kwargs, plan(*args, **kwargs)))
        return plans[-1][1]

    monkeypatch.setattr(svg2, "plan_clusters", spy)
    return plans


def test_too_small_call_falls_back_counted_and_warned_once(monkeypatch):
    plans = _spy_plans(monkeypatch)
    plugin, call = _plugin_call(SVG2Config(), TokenGrid(1, 6, 6), text=4)
    q, k, v, _, _ = qkv(batch=1, heads=2, length=40, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"needs at least 64 image tokens .*8x8.*this call has 36 \(6x6\)"):
        out = plugin._attend(q, k, v, call)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per reason
        plugin._attend(q, k, v, call)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-12, rtol=0)
    assert sum(plugin.fallbacks.values()) == 2 and not plans  # counted, and no clustering was done
    assert "needs at least 64 image tokens" in plugin.idle_reason(4)
    # A lower floor clusters the same call: 16 query (the floor) and 16 key clusters (capped at 36 // 2 = 18).
    plugin, call = _plugin_call(SVG2Config(min_k_clusters=16, top_p=0.5, min_kc_ratio=0.0), TokenGrid(1, 6, 6), 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plugin._attend(q, k, v, call)
    assert not plugin.fallbacks and [(p["num_q_clusters"], p["num_k_clusters"]) for p, _ in plans] == [(16, 16)]
    # One key cluster set by hand: dense, never in silence.
    plugin, call = _plugin_call(SVG2Config(num_k_clusters=1), TokenGrid(1, 6, 6), 4)
    with pytest.warns(UserWarning, match="num_k_clusters=1 puts every key in one cluster"):
        plugin._attend(q, k, v, call)
    assert sum(plugin.fallbacks.values()) == 1


def test_dense_selection_runs_dense_on_the_cpu(monkeypatch):
    """Above ``cpu_dense_above`` of the keys the CPU path runs dense attention (exact), counted and warned once;
    below, the same call takes the sparse path."""
    plans = _spy_plans(monkeypatch)
    q, k, v, _, _ = qkv(batch=1, heads=2, length=69, dtype=torch.float64, seed=5)
    plugin, call = _plugin_call(SVG2Config(cpu_dense_above=1.0), TokenGrid(1, 8, 8), text=5)
    sparse = plugin._attend(q, k, v, call)
    density = plans[-1][1].key_density()
    assert 0.0 < density < 1.0 and not plugin.fallbacks
    plugin, call = _plugin_call(SVG2Config(cpu_dense_above=density - 0.01), TokenGrid(1, 8, 8), text=5)
    with pytest.warns(UserWarning, match="keeps more than cpu_dense_above"):
        out = plugin._attend(q, k, v, call)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once
        plugin._attend(q, k, v, call)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-12, rtol=0)
    assert sum(plugin.fallbacks.values()) == 2 and not torch.allclose(out, sparse)
    plugin, call = _plugin_call(SVG2Config(cpu_dense_above=density + 0.01), TokenGrid(1, 8, 8), text=5)
    torch.testing.assert_close(plugin._attend(q, k, v, call), sparse, atol=0, rtol=0)
    assert not plugin.fallbacks
    with pytest.raises(ValueError, match="cpu_dense_above"):
        SVG2Config(cpu_dense_above=1.5)


def test_dense_fallback_is_held_without_clustering(monkeypatch):
    """After a CPU fallback a layer stays dense for cpu_dense_hold steps without k-means, then clusters again; the
    generation equals dense attention exactly (every selection here is above the threshold)."""
    if not pipes.zoo_weights_present("zoo:dit"):
        pytest.skip("zoo weights not exported")
    plans = _spy_plans(monkeypatch)
    pipe = pipes.build("zoo:dit")
    reference = pipes.output_of("zoo:dit", pipe(**pipes.call_kwargs("zoo:dit", steps=7)))
    counts = {}
    for hold in (1, 3):
        plans.clear()
        handle = accelerate_dit(pipe, "svg2", start=0.0, cpu_dense_above=0.0, cpu_dense_hold=hold)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = pipes.output_of("zoo:dit", pipe(**pipes.call_kwargs("zoo:dit", steps=7)))
        torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)
        plugin = handle.transformers[0].plugins[0]
        assert sum(plugin.fallbacks.values()) == 7 * len(pipe.transformer.transformer_blocks)
        counts[hold] = len(plans)
        remove_acceleration(pipe)
    layers = len(pipe.transformer.transformer_blocks)
    assert counts == {1: 7 * layers, 3: 3 * layers}, "clustered at steps 0, 3 and 6 only"


def test_64_tokens_are_clustered_with_the_floor(monkeypatch):
    """The zoo's 8x8 grid: 16 query and 32 key clusters (not 1 and 2), sparse, exact within the selection."""
    plans = _spy_plans(monkeypatch)
    plugin, call = _plugin_call(SVG2Config(cpu_dense_above=1.0), TokenGrid(1, 8, 8), text=5)
    q, k, v, _, _ = qkv(batch=2, heads=2, length=69, dtype=torch.float64, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = plugin._attend(q, k, v, call)
    (kwargs, plan), = plans
    assert (kwargs["num_q_clusters"], kwargs["num_k_clusters"]) == (16, 32) and not plugin.fallbacks
    assert 0.0 < plan.key_density() < 1.0
    q_img, k_img, v_img = q[:, :, :64], k[:, :, :64], v[:, :, :64]
    mask = cluster_mask(plan.q_labels, plan.k_labels, plan.selection)
    expected = dense(q_img, k_img, v_img, k[:, :, 64:], v[:, :, 64:], mask)
    torch.testing.assert_close(out[:, :, :64], expected, atol=1e-12, rtol=0)


def test_larger_grid_plans_are_bit_identical_to_the_previous_sizing(monkeypatch):
    """At 2048 tokens neither floor binds: the plan and output equal those of floors of 1 (the previous sizing)."""
    plans = _spy_plans(monkeypatch)
    q, k, v, _, _ = qkv(batch=1, heads=2, length=2048 + 3, dim=8, dtype=torch.float32, seed=6)
    outs = []
    for config in (SVG2Config(kmeans_iters_init=3, cpu_dense_above=1.0),
                   SVG2Config(kmeans_iters_init=3, min_q_clusters=1, min_k_clusters=1, cpu_dense_above=1.0)):
        plugin, call = _plugin_call(config, TokenGrid(1, 32, 64), text=3)
        outs.append(plugin._attend(q, k, v, call))
    (first, floored), (second, previous) = plans
    assert (first["num_q_clusters"], first["num_k_clusters"]) == (16, 64) == (second["num_q_clusters"],
                                                                             second["num_k_clusters"])
    assert all(torch.equal(a, b) for a, b in zip(floored.tensors(), previous.tensors()))
    assert torch.equal(outs[0], outs[1]) and floored.key_density() < 1.0


def test_every_cluster_kept_on_every_family_equals_dense(family, monkeypatch):
    """min_kc_ratio=1 keeps every key cluster: clustering and the gathered path run, the output equals dense."""
    planned = []
    plan = svg2.plan_clusters
    monkeypatch.setattr(svg2, "plan_clusters", lambda *a, **k: planned.append(1) or plan(*a, **k))
    pipe = pipes.build(family)
    reference = pipes.output_of(family, pipe(**pipes.call_kwargs(family, steps=1)))
    accelerate_dit(pipe, "svg2", num_q_clusters=3, num_k_clusters=5, min_kc_ratio=1.0, kmeans_iters_init=2,
                   start=0.0, cpu_dense_above=1.0)  # through the gathered path, not the dense fallback
    out = pipes.output_of(family, pipe(**pipes.call_kwargs(family, steps=1)))
    torch.testing.assert_close(out, reference, atol=2e-4, rtol=0)
    assert planned  # the clusters were computed, not skipped
    remove_acceleration(pipe)
    assert torch.equal(pipes.output_of(family, pipe(**pipes.call_kwargs(family, steps=1))), reference)


@pytest.mark.parametrize("family", ["zoo:dit", "flux", "wan"])
def test_sparse_clusters_run_deterministically(family, monkeypatch):
    calls = []
    plan = svg2.plan_clusters

    def spy(*args, **kwargs):
        calls.append((kwargs["iters"], kwargs["q_centroids"] is not None))
        return plan(*args, **kwargs)

    monkeypatch.setattr(svg2, "plan_clusters", spy)
    pipe = pipes.build(family)
    reference = pipes.output_of(family, pipe(**pipes.call_kwargs(family, steps=3)))
    handle = accelerate_dit(pipe, "svg2", num_q_clusters=4, num_k_clusters=8, top_p=0.5, min_kc_ratio=0.0,
                            kmeans_iters_init=5, kmeans_iters_step=1, start=0.0, cpu_dense_above=1.0)
    first = pipes.output_of(family, pipe(**pipes.call_kwargs(family, steps=3)))
    assert torch.isfinite(first).all() and not torch.equal(first, reference)
    assert handle.stats.flops_fraction < 1.0
    cold = [call for call in calls if call == (5, False)]
    assert cold and len(calls) == 3 * len(cold) and calls.count((1, True)) == 2 * len(cold)  # warm after step 0
    second = pipes.output_of(family, pipe(**pipes.call_kwargs(family, steps=3)))
    assert torch.equal(first, second)  # state is reset between generations
    remove_acceleration(pipe)
    assert torch.equal(pipes.output_of(family, pipe(**pipes.call_kwargs(family, steps=3))), reference)
