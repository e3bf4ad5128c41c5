"""PSA: pyramid layout and levels against independent float64 references, level assignment, the kernel path, and
the plugin on every family."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pipelines_for_tests as pipes
from dit_accel import accelerate_dit, remove_acceleration
from dit_accel.attention.curve import curve_order
from dit_accel.attention.psa import (
    PSAConfig,
    assign_levels,
    auto_block,
    auto_sample,
    block_importance,
    gathered_pyramid_attention,
    key_density,
    kept_keys,
    psa_attention,
    pyramid_attention,
    pyramid_layout,
    scale_bounds,
)
from dit_accel.core.blocks import TokenGrid
from dit_accel.kernels import triton_importable

LEVELS = (1, 2, 4, 8)


def tensors(*shape, count=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(count)]


def dense(q, k, v, tk=None, tv=None):
    if tk is not None:
        k, v = torch.cat([k, tk], 2), torch.cat([v, tv], 2)
    return F.scaled_dot_product_attention(q, k, v)


def random_assignment(batch, heads, blocks, levels=LEVELS, drop=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    choices = torch.tensor([*levels, 0] if drop else list(levels))
    assignment = choices[torch.randint(len(choices), (batch, heads, blocks, blocks), generator=g)]
    assignment[..., 0] = torch.where(assignment[..., 0] == 0, 1, assignment[..., 0])  # never an empty row
    return assignment


def expanded_reference(q, k, v, assignment, block, tk=None, tv=None):
    """Each query block over its key blocks, every pooled key repeated once per token it averages (no bias)."""
    batch, heads, length, _ = q.shape
    out = torch.empty_like(q)
    for b in range(batch):
        for h in range(heads):
            for qb in range(-(-length // block)):
                keys, values = [], []
                for kb in range(-(-length // block)):
                    level = int(assignment[b, h, qb, kb])
                    end = min((kb + 1) * block, length)
                    for start in range(kb * block, end, level or block):
                        if level == 0:
                            continue
                        pool = slice(start, min(start + level, end))
                        size = pool.stop - pool.start
                        keys.append(k[b, h, pool].mean(0).expand(size, -1))
                        values.append(v[b, h, pool].mean(0).expand(size, -1))
                if tk is not None:
                    keys.append(tk[b, h])
                    values.append(tv[b, h])
                rows = slice(qb * block, min((qb + 1) * block, length))
                out[b, h, rows] = F.scaled_dot_product_attention(q[b, h, rows], torch.cat(keys), torch.cat(values))
    return out


# -- exact limits and references (float64) --------------------------------------------------------------------------
@pytest.mark.parametrize("text", [0, 5])
def test_no_pooling_is_dense_sdpa(text):
    q, k, v = tensors(2, 3, 44, 8)
    tk, tv = tensors(2, 3, text, 8, count=2, seed=1) if text else (None, None)
    ones = torch.ones(3, 3, dtype=torch.long)  # (nQ, nK), broadcast over batch and heads
    out = pyramid_attention(q, k, v, ones, block=16, levels=LEVELS, text_key=tk, text_value=tv)
    torch.testing.assert_close(out, dense(q, k, v, tk, tv), atol=1e-5, rtol=0)
    grid = TokenGrid(1, 4, 11)  # the whole path in natural order, thresholds that drop and pool nothing
    for levels, thresholds in (((1,), (1.0,)), (LEVELS, (1.0, 1.0, 1.0, 1.0))):
        out, density = psa_attention(q, k, v, grid, block=16, levels=levels, thresholds=thresholds, text_key=tk,
                                     text_value=tv)
        torch.testing.assert_close(out, dense(q, k, v, tk, tv), atol=1e-5, rtol=0)
        assert density == 1.0


@pytest.mark.parametrize("length,block,text,levels", [(44, 16, 0, LEVELS), (75, 16, 6, LEVELS),
                                                      (64, 32, 3, (1, 4, 16)), (20, 32, 2, LEVELS),
                                                      (150, 64, 2, (1, 4, 16, 64))])
def test_explicit_assignment_matches_expanded_reference(length, block, text, levels):
    q, k, v = tensors(2, 2, length, 8)
    tk, tv = tensors(2, 2, text, 8, count=2, seed=1) if text else (None, None)
    blocks = -(-length // block)
    assignment = random_assignment(2, 2, blocks, levels)
    out = pyramid_attention(q, k, v, assignment, block=block, levels=levels, text_key=tk, text_value=tv)
    torch.testing.assert_close(out, expanded_reference(q, k, v, assignment, block, tk, tv), atol=1e-10, rtol=0)


def test_chunked_rows_match_the_single_chunk(monkeypatch):
    """Small chunks: query blocks sorted by key count, gathered chunk by chunk, scattered back."""
    from dit_accel.attention import psa

    q, k, v = tensors(2, 2, 75, 8)
    tk, tv = tensors(2, 2, 6, 8, count=2, seed=1)
    assignment = random_assignment(2, 2, 5)
    monkeypatch.setattr(psa, "_CHUNK_KEYS", 64)
    monkeypatch.setattr(psa, "_CHUNK_SCORES", 64)
    out = pyramid_attention(q, k, v, assignment, block=16, levels=LEVELS, text_key=tk, text_value=tv)
    torch.testing.assert_close(out, expanded_reference(q, k, v, assignment, 16, tk, tv), atol=1e-10, rtol=0)
    importance = block_importance(q, k, 16)
    monkeypatch.undo()
    torch.testing.assert_close(importance, block_importance(q, k, 16), atol=1e-6, rtol=0)


def test_equal_keys_inside_pools_give_the_dense_result():
    q = tensors(1, 2, 44, 8)[0]
    k, v = (x.repeat_interleave(8, 2)[:, :, :44] for x in tensors(1, 2, 6, 8, count=2, seed=2))
    assignment = random_assignment(1, 2, 3, drop=False, seed=3)
    assert set(assignment.unique().tolist()) == set(LEVELS)
    out = pyramid_attention(q, k, v, assignment, block=16, levels=LEVELS)
    torch.testing.assert_close(out, dense(q, k, v), atol=1e-10, rtol=0)


def test_layout_and_key_density():
    layout = pyramid_layout(20, 16, LEVELS)  # a full block and one of 4 tokens
    assert layout.count.numel() == 2 * (16 + 8 + 4 + 2)
    assert layout.real_keys.tolist() == [[16, 8, 4, 2, 0], [4, 2, 1, 1, 0]]
    bias = layout.bias
    assert bias[1].item() == 0.0 and bias[32].item() == pytest.approx(torch.log(torch.tensor(2.0)).item())
    assert torch.isinf(bias[16 + 4]) and bias[16 + 4] < 0  # a level-1 slot past the end of the sequence
    assignment = torch.tensor([[[[2, 8], [0, 1]]]])
    assert kept_keys(assignment, layout).tolist() == [[[9, 4]]]
    assert key_density(assignment, layout) == pytest.approx((16 * 9 + 4 * 4) / 400)
    assert auto_block(64, 8) == 16 and auto_block(4096, 8) == 128 and auto_block(8, 32) == 32
    # Off the kernel's path: about 32 blocks of up to 512 tokens where the sequence allows, never smaller.
    for tokens in (64, 1024, 4096, 8192, 16384, 65536):
        assert auto_block(tokens, 8, kernel=False) >= auto_block(tokens, 8)
    assert [auto_block(n, 8, kernel=False) for n in (4096, 8192, 16384, 65536)] == [128, 256, 512, 512]
    assert [auto_sample(b) for b in (16, 128, 256, 512)] == [4, 4, 4, 8]
    with pytest.raises(ValueError, match="outside"):
        kept_keys(torch.tensor([[3, 1], [1, 1]]), layout)


# -- importance and level assignment --------------------------------------------------------------------------------
def test_sampling_every_token_gives_the_true_block_mass():
    q, k, _ = tensors(1, 2, 40, 8)
    probs = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, -1)  # (1, 2, 40, 40)
    padded = F.pad(probs, (0, 8, 0, 8)).view(1, 2, 3, 16, 3, 16).sum(5)
    truth = padded.sum(3) / torch.tensor([16.0, 16.0, 8.0])[:, None]
    torch.testing.assert_close(block_importance(q, k, 16, sample=1).double(), truth, atol=1e-6, rtol=0)
    for estimator, sample in (("sampled", 4), ("pooled", 4), ("sampled", 16)):
        rows = block_importance(q, k, 16, estimator=estimator, sample=sample).sum(-1)
        torch.testing.assert_close(rows, torch.ones_like(rows))


def test_thresholds_and_quotas_assign_the_documented_levels():
    importance = torch.tensor([0.15, 0.5, 0.05, 0.2, 0.1])  # preceding mass by rank: 0, .5, .7, .85, .95
    levels = assign_levels(importance, LEVELS, thresholds=(0.4, 0.5, 0.6, 0.8))
    assert levels.tolist() == [8, 1, 0, 4, 0]
    assert assign_levels(importance, LEVELS, thresholds=(1.0,) * 4).tolist() == [1] * 5
    ranked = torch.linspace(1, 0.1, 10)  # already in importance order
    quota = assign_levels(ranked, LEVELS, quotas=(0.1, 0.2, 0.0, 0.3))
    assert quota.tolist() == [1, 2, 2, 8, 8, 8, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="either"):
        assign_levels(ranked, LEVELS)


def test_a_tighter_setting_never_keeps_more():
    g = torch.Generator().manual_seed(4)
    importance = torch.softmax(3 * torch.randn(2, 3, 6, 9, generator=g), -1)
    layout = pyramid_layout(9 * 16, 16, LEVELS)
    table = layout.real_keys

    def keys(assignment):  # kept keys per (query block, key block) pair
        index = torch.tensor([4, 0, 1, 0, 2, 0, 0, 0, 3])[assignment]
        return table[torch.arange(9).expand_as(index), index]

    for _ in range(20):
        loose = torch.sort(torch.rand(4, generator=g) * 1.2).values.clamp(1e-3, 1.0)
        tight = torch.minimum(loose, torch.sort(torch.rand(4, generator=g)).values.clamp(min=1e-3))
        a, b = (assign_levels(importance, LEVELS, thresholds=tuple(t.tolist())) for t in (loose, tight))
        assert bool((keys(b) <= keys(a)).all())
        loose_q = torch.rand(4, generator=g) / 4
        tight_q = loose_q * torch.rand(4, generator=g)
        a, b = (assign_levels(importance, LEVELS, quotas=tuple(t.tolist())) for t in (loose_q, tight_q))
        assert bool((keys(b) <= keys(a)).all())


def test_config_validation():
    assert PSAConfig(levels=[1, 4], thresholds=[0.5, 1]).levels == (1, 4)  # TOML lists become tuples
    with pytest.raises(ValueError, match="levels"):
        PSAConfig(levels=(1, 3), thresholds=(0.5, 0.9))
    with pytest.raises(ValueError, match="levels"):
        PSAConfig(levels=(4, 2), thresholds=(0.5, 0.9))
    with pytest.raises(ValueError, match="thresholds.*one number"):
        PSAConfig(thresholds=(0.4, 0.5))
    with pytest.raises(ValueError, match="non-decreasing"):
        PSAConfig(thresholds=(0.4, 0.3, 0.6, 0.8))
    with pytest.raises(ValueError, match="quotas.*sum"):
        PSAConfig(quotas=(0.5, 0.5, 0.5, 0.0))
    with pytest.raises(ValueError, match="block"):
        PSAConfig(block=16, levels=(1, 32), thresholds=(0.5, 0.9))
    with pytest.raises(ValueError, match="block"):
        PSAConfig(block=48)
    with pytest.raises(ValueError, match="estimator"):
        PSAConfig(estimator="random")
    with pytest.raises(ValueError, match="sample"):
        PSAConfig(sample=3)
    with pytest.raises(ValueError, match="start"):
        PSAConfig(start=0.5, end=0.5)


# -- the kernel path (Triton interpreter) ---------------------------------------------------------------------------
@pytest.mark.skipif(not triton_importable(), reason="Triton is not installed")
@pytest.mark.parametrize("block,text", [(32, 5), (16, 0)])
def test_kernel_path_equals_the_cpu_path(interpreter, block, text):
    q, k, v = (x.float() for x in tensors(1, 2, 72, 16))
    tk, tv = ((x.float() for x in tensors(1, 2, text, 16, count=2, seed=1)) if text else (None, None))
    assignment = random_assignment(1, 2, -(-72 // block), seed=5)
    layout = pyramid_layout(72, block, LEVELS)
    expected = gathered_pyramid_attention(q, k, v, assignment, layout, text_key=tk, text_value=tv)
    # Under the interpreter CPU tensors take the kernel path, as CUDA tensors do.
    out = pyramid_attention(q, k, v, assignment, block=block, levels=LEVELS, text_key=tk, text_value=tv)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


# -- the plugin -----------------------------------------------------------------------------------------------------
def generate(pipe, family, steps):
    with torch.no_grad():
        return pipes.output_of(family, pipe(**pipes.call_kwargs(family, steps=steps)))


def test_exact_settings_on_every_family_equal_dense(family):
    """Bounds of 1 keep every key block at full resolution: every routed call goes through the pyramid path and
    equals dense attention; removal restores the original bit for bit."""
    pipe = pipes.build(family)
    reference = generate(pipe, family, 2)
    accelerate_dit(pipe, "psa", thresholds=(1.0, 1.0, 1.0, 1.0), start=0.0)
    assert torch.allclose(generate(pipe, family, 2), reference, atol=2e-4)
    remove_acceleration(pipe)
    assert torch.equal(generate(pipe, family, 2), reference)


@pytest.mark.parametrize("family,recipe", [("zoo:dit", "psa-fast"), ("flux", "psa-max"), ("sd3", "psa")])
def test_sparse_settings_run_deterministically_and_remove_cleanly(family, recipe):
    if family.startswith("zoo:"):
        from pipelines_for_tests import zoo_weights_present
        if not zoo_weights_present(family):
            pytest.skip("zoo weights not exported yet")
    pipe = pipes.build(family)
    reference = generate(pipe, family, 2)
    handle = accelerate_dit(pipe, recipe, block=16, start=0.0)
    first = generate(pipe, family, 2)
    assert torch.isfinite(first).all() and not torch.equal(first, reference)
    assert handle.stats.flops_fraction < 1.0
    assert torch.equal(generate(pipe, family, 2), first)  # nothing carried from one generation to the next
    remove_acceleration(pipe)
    assert torch.equal(generate(pipe, family, 2), reference)


def test_curve_order_is_what_blocks_cut():
    """The plugin's blocks are runs of the curve order: a query's own 2x2 pool (level 2 of its block) averages
    curve neighbours, so with keys equal on each curve-order pool the pooled path is exact."""
    grid = TokenGrid(1, 8, 8)
    order = curve_order(1, 8, 8)
    q = tensors(1, 1, 64, 8)[0]
    pooled = tensors(1, 1, 8, 8, count=2, seed=6)
    k, v = (torch.empty_like(q).index_copy_(2, order, x.repeat_interleave(8, 2)) for x in pooled)
    out, density = psa_attention(q, k, v, grid, block=16, levels=(8,), thresholds=(1.0,))
    torch.testing.assert_close(out, dense(q, k, v), atol=1e-10, rtol=0)
    assert density == pytest.approx(1 / 8)


def test_bound_scale_tightens_cumulative_bounds_below_one():
    assert scale_bounds((0.4, 0.5, 0.6, 0.8), None, 1.0) == ((0.4, 0.5, 0.6, 0.8), None)
    thresholds, quotas = scale_bounds((0.3, 0.5, 1.0), None, 0.5)
    assert thresholds == pytest.approx((0.15, 0.25, 1.0)) and quotas is None  # "keep the rest" stays
    assert scale_bounds((0.6, 0.9), None, 2.0)[0] == pytest.approx((1.0, 1.0))
    _, quotas = scale_bounds(None, (0.05, 0.1, 0.25, 0.6), 0.5)  # running sums .05 .15 .4 1 -> .025 .075 .2 1
    assert quotas == pytest.approx((0.025, 0.05, 0.125, 0.8))
    importance = torch.softmax(3 * torch.randn(2, 6, 9, generator=torch.Generator().manual_seed(1)), -1)
    for kind, bounds in (("thresholds", (0.3, 0.5, 0.7, 1.0)), ("quotas", (0.1, 0.2, 0.3, 0.4))):
        loose = assign_levels(importance, LEVELS, **{kind: bounds})
        scaled = scale_bounds(bounds if kind == "thresholds" else None, bounds if kind == "quotas" else None, 0.6)
        tight = assign_levels(importance, LEVELS, **{kind: scaled[0] if kind == "thresholds" else scaled[1]})
        coarse = lambda a: torch.where(a == 0, 10 ** 6, a)  # noqa: E731  (dropped = coarsest)
        assert bool((coarse(tight) >= coarse(loose)).all())


def test_ultra_levels_and_bound_scale_config():
    from dit_accel.recipe import load_recipe

    config = load_recipe("psa-ultra").plugins[0]
    assert config.levels == (1, 4, 16, 64) and sum(config.quotas) == pytest.approx(1.0)
    assert PSAConfig(bound_scale=0.4).bound_scale == 0.4
    for bad in (0.0, 3.0, True):
        with pytest.raises(ValueError, match="bound_scale"):
            PSAConfig(bound_scale=bad)
    with pytest.raises(ValueError, match="levels"):
        PSAConfig(levels=(1, 128), thresholds=(0.5, 0.9))
    q, k, v = tensors(1, 2, 16 * 16, 8)
    out, density = psa_attention(q, k, v, TokenGrid(1, 16, 16), levels=config.levels, quotas=config.quotas)
    assert torch.isfinite(out).all() and 0.0 < density < 0.5
