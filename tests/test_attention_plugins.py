"""Attention plugins (todo, proxy, hilbert, window-residual): exact limits, text exactness, every family, errors."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import pipelines_for_tests as pipes
from pipelines_for_tests import FAMILIES, zoo_weights_present
from dit_accel import IdlePluginWarning
from dit_accel import accelerate_dit, load_recipe, remove_acceleration
from dit_accel.attention.base import split_text
from dit_accel.attention.curve import curve_order
from dit_accel.attention.hilbert import HilbertConfig, HilbertPlugin, hilbert_attention
from dit_accel.attention.plans import curve_tile_plan, window_plan
from dit_accel.attention.proxy import ProxyConfig
from dit_accel.attention.ranges import curve_density, curve_tile_attention
from dit_accel.attention.tiled import curve_neighbours, plan_from_groups, tiled_attention
from dit_accel.attention.todo import ToDoConfig, ToDoPlugin, downsample_tokens, downsampled_attention
from dit_accel.attention.window_residual import WindowResidualConfig, WindowResidualPlugin, is_full_step
from dit_accel.core.attention import AttentionCall, KeyPaddingReader, LayerId
from dit_accel.core.blocks import TokenGrid, TokenLayout

ATTENTION_RECIPES = ["todo", "proxy", "hilbert", "window-residual"]
# Overrides under which every plugin must reproduce dense attention on the small test grids.
EXACT_OVERRIDES = {
    "todo": {"factor": 1},
    "proxy": {"radius": 8, "start": 0.0},
    "hilbert": {"neighbours": 16, "start": 0.0},
    "window-residual": {"neighbours": 16},
}


def qkv(batch=2, heads=3, length=64, dim=16, text=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(batch, heads, length, dim, generator=g) for _ in range(3)]
    texts = [torch.randn(batch, heads, text, dim, generator=g) for _ in range(2)]
    return (*tensors, *texts)


def dense(q, k, v, kt=None, vt=None):
    if kt is not None and kt.shape[2]:
        k, v = torch.cat([k, kt], 2), torch.cat([v, vt], 2)
    return F.scaled_dot_product_attention(q, k, v)


def generate(pipe, name, **kwargs):
    with torch.no_grad():
        return pipes.output_of(name, pipe(**pipes.call_kwargs(name, **kwargs)))


# -- exact limits of the pure functions ----------------------------------------------------------------------------
def test_one_tile_is_sdpa():
    q, k, v, kt, vt = qkv(length=50, text=7)
    whole = plan_from_groups(torch.zeros(50, dtype=torch.long), curve_neighbours(1, 1), pooled=True, num_tokens=50)
    torch.testing.assert_close(tiled_attention(q, k, v, whole, shared_key=kt, shared_value=vt), dense(q, k, v, kt, vt),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(curve_tile_attention(q, k, v, tile=50, radius=0, shared_key=kt, shared_value=vt),
                               dense(q, k, v, kt, vt), atol=1e-5, rtol=1e-5)
    grid = TokenGrid(2, 5, 5)
    torch.testing.assert_close(hilbert_attention(q, k, v, grid, tile=50, text_key=kt, text_value=vt),
                               dense(q, k, v, kt, vt), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("length,tile,radius,offset,pooled,text", [
    (50, 8, 1, 0, True, 5), (50, 8, 1, 3, True, 0), (64, 16, 0, 0, True, 4), (64, 16, 2, 8, False, 4),
    (37, 5, 3, 2, True, 0), (300, 32, 1, 16, True, 9),
])
def test_strided_tiles_match_the_gather_reference(length, tile, radius, offset, pooled, text):
    q, k, v, kt, vt = qkv(length=length, text=text)
    groups = (torch.arange(length) + offset) // tile
    count = int(groups.max()) + 1
    plan = plan_from_groups(groups, curve_neighbours(count, radius), pooled=pooled, num_tokens=length)
    reference = tiled_attention(q, k, v, plan, shared_key=kt, shared_value=vt)
    fast = curve_tile_attention(q, k, v, tile=tile, radius=radius, offset=offset, pooled=pooled, shared_key=kt,
                                shared_value=vt)
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)
    assert curve_density(length, tile, radius, offset, pooled) == pytest.approx(plan.key_density())


def test_pooled_keys_carry_their_tiles_mass():
    """With every tile's keys and values equal, one pooled key + log(count) is exactly the tile's contribution."""
    q, k, v, kt, vt = qkv(length=48, text=5)
    groups = torch.arange(48) // 8
    k = k[:, :, groups * 8]  # each token takes its tile's first key/value
    v = v[:, :, groups * 8]
    plan = plan_from_groups(groups, curve_neighbours(6, 0), pooled=True, num_tokens=48)
    torch.testing.assert_close(tiled_attention(q, k, v, plan, shared_key=kt, shared_value=vt), dense(q, k, v, kt, vt),
                               atol=1e-5, rtol=1e-5)
    grid = TokenGrid(1, 6, 8)
    cells = (torch.arange(6)[:, None] // 2 * 4 + torch.arange(8)[None, :] // 2).reshape(-1)
    first = torch.stack([torch.nonzero(cells == c)[0, 0] for c in range(12)])
    k2, v2 = k[:, :, first[cells]], v[:, :, first[cells]]
    torch.testing.assert_close(downsampled_attention(q, k2, v2, grid, 2, text_key=kt, text_value=vt),
                               dense(q, k2, v2, kt, vt), atol=1e-5, rtol=1e-5)


def test_downsampling():
    q, k, v, kt, vt = qkv(length=35, text=4)
    grid = TokenGrid(1, 5, 7)
    torch.testing.assert_close(downsampled_attention(q, k, v, grid, 1, text_key=kt, text_value=vt),
                               dense(q, k, v, kt, vt), atol=1e-6, rtol=1e-6)
    pooled, counts = downsample_tokens(k, grid, 2, "avg")
    assert pooled.shape[2] == 12 and counts.tolist() == [4, 4, 4, 2] * 2 + [2, 2, 2, 1]
    torch.testing.assert_close(pooled[:, :, 0], k.reshape(2, 3, 5, 7, 16)[:, :, :2, :2].mean((2, 3)))
    torch.testing.assert_close(pooled[:, :, -1], k[:, :, -1])
    nearest, _ = downsample_tokens(k, grid, 2, "nearest")
    torch.testing.assert_close(nearest, k.reshape(2, 3, 5, 7, 16)[:, :, ::2, ::2].reshape(2, 3, 12, 16))
    video = TokenGrid(3, 4, 4)
    q, k, v, _, _ = qkv(length=48)
    pooled, counts = downsample_tokens(k, video, 2, "avg")
    assert pooled.shape[2] == 12  # frames are kept, each frame pooled 2x2
    torch.testing.assert_close(pooled[:, :, 4], k[:, :, 16:18].add(k[:, :, 20:22]).sum(2) / 4)


def test_window_plans_cover_every_token_once():
    for grid, window, offset in [(TokenGrid(1, 8, 8), (4, 4), (0, 0)), (TokenGrid(1, 7, 9), (3, 2), (1, 1)),
                                 (TokenGrid(3, 6, 6), (3, 3), (1, 2))]:
        plan = window_plan(grid, window, 1, offset, True)
        slots = plan.slots[plan.slots >= 0]
        assert sorted(slots.tolist()) == list(range(grid.num_tokens))
        assert (plan.neighbours[:, 0] == torch.arange(plan.num_tiles)).all()  # every window sees itself first
    video = window_plan(TokenGrid(3, 4, 4), (4, 4), 1, (0, 0), False)
    assert sorted(n for n in video.neighbours[1].tolist() if n >= 0) == [0, 1, 2]  # the window in frames 0, 1, 2
    q, k, v, kt, vt = qkv(length=63, text=3)
    whole = window_plan(TokenGrid(1, 7, 9), (7, 9), 0, (0, 0), True)
    torch.testing.assert_close(tiled_attention(q, k, v, whole, shared_key=kt, shared_value=vt), dense(q, k, v, kt, vt),
                               atol=1e-5, rtol=1e-5)


def test_hilbert_reordering_keeps_positions():
    """Rotary positions are applied before SDPA; permuting q/k/v by the curve and back must give exactly the
    attention of the gather-based plan in the original token order, with RoPE-rotated inputs."""
    grid = TokenGrid(1, 6, 10)
    q, k, v, kt, vt = qkv(length=60, text=4)
    angle = torch.arange(60)[:, None] * torch.linspace(0.1, 1.0, 8)[None]
    cos, sin = angle.cos().repeat_interleave(2, -1), angle.sin().repeat_interleave(2, -1)

    def rope(x):
        pairs = torch.stack([-x[..., 1::2], x[..., ::2]], -1).flatten(-2)
        return x * cos + pairs * sin

    q, k = rope(q), rope(k)
    for offset in (0, 4):
        plan = curve_tile_plan(grid, 8, 1, offset, True)
        expected = tiled_attention(q, k, v, plan, shared_key=kt, shared_value=vt)
        got = hilbert_attention(q, k, v, grid, tile=8, neighbours=1, offset=offset, text_key=kt, text_value=vt)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # the curve's tiles are compact: the first tile of 16 tokens on an 8x8 grid is a 4x4 square
    first = curve_order(1, 8, 8)[:16]
    assert set((first // 8).tolist()) == {0, 1, 2, 3} and set((first % 8).tolist()) == {0, 1, 2, 3}


def _plugin_call(plugin_cls, config, layout, **options):
    plugin = plugin_cls.__new__(plugin_cls)
    plugin.config, plugin.target = config, None
    plugin.depth = {"blocks.0.attn": 0}
    plugin._orders, plugin._tilings, plugin.fallbacks, plugin._warned = {}, {}, __import__("collections").Counter(), set()
    plugin.key_padding = KeyPaddingReader()
    layer = LayerId("blocks", 0, "attn", layout.kind)
    opts = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
    opts.update(options)
    return plugin, AttentionCall(layer=layer, layout=layout, context=None, index=0, options=opts)


@pytest.mark.parametrize("text_position", ["first", "last"])
def test_text_tokens_are_exact_on_either_side(text_position):
    grid = TokenGrid(1, 8, 8)
    q, k, v, _, _ = qkv(length=64 + 6)
    layout = TokenLayout("joint", grid, num_text_tokens=6, text_position=text_position)
    plugin, call = _plugin_call(HilbertPlugin, HilbertConfig(tile_size=8, neighbours=0, pool_size=8), layout)
    out = plugin._attend(q, k, v, call)
    reference = dense(q, k, v)
    q_img, q_txt = split_text(q, 6, text_position == "first")
    text_rows = slice(0, 6) if text_position == "first" else slice(64, 70)
    image_rows = slice(6, 70) if text_position == "first" else slice(0, 64)
    torch.testing.assert_close(out[:, :, text_rows], reference[:, :, text_rows], atol=1e-6, rtol=1e-6)
    k_img, k_txt = split_text(k, 6, text_position == "first")
    v_img, v_txt = split_text(v, 6, text_position == "first")
    expected = hilbert_attention(q_img, k_img, v_img, grid, tile=8, neighbours=0, text_key=k_txt, text_value=v_txt)
    torch.testing.assert_close(out[:, :, image_rows], expected, atol=1e-6, rtol=1e-6)
    assert (out[:, :, image_rows] - reference[:, :, image_rows]).abs().max() > 1e-3  # it is sparse


def test_unsupported_calls_run_dense_and_warn():
    grid = TokenGrid(1, 8, 8)
    q, k, v, _, _ = qkv(length=64)
    mask = torch.randn(64, 64)  # a bias, not a key-padding mask
    plugin, call = _plugin_call(HilbertPlugin, HilbertConfig(tile_size=8, neighbours=0),
                                TokenLayout("self", grid), attn_mask=mask)
    with pytest.warns(UserWarning, match="attention mask"):
        out = plugin._attend(q, k, v, call)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    assert plugin.fallbacks["the attention mask is not a key-padding mask"] == 1
    plugin, call = _plugin_call(HilbertPlugin, HilbertConfig(), TokenLayout("self", TokenGrid(1, 4, 4)))
    with pytest.warns(UserWarning, match="does not match the token grid"):
        plugin._attend(q, k, v, call)  # 64 tokens, 16-token grid: a sharded sequence


def test_full_step_schedule():
    assert [is_full_step(s, 3, 2) for s in range(8)] == [True, True, True, False, False, True, False, False]
    assert all(is_full_step(s, 1, 0) for s in range(5))


# -- every family --------------------------------------------------------------------------------------------------
def image_tokens(pipe, family) -> int:
    handle = accelerate_dit(pipe, "none")
    handle.remove()
    counter = accelerate_dit(pipe, load_recipe("none") + _counter_recipe())
    generate(pipe, family, steps=1)
    plugin = counter.transformers[0].plugins[0]
    counter.remove()
    return max(layout.grid.num_tokens for _, layout, *_ in plugin.seen)


def _counter_recipe():
    from dit_accel.recipe import Recipe
    return Recipe.from_dict({"name": "counter", "plugins": [{"type": "test-attention-counter"}]})


@pytest.mark.parametrize("recipe", ATTENTION_RECIPES)
def test_exact_settings_reproduce_dense(family, recipe):
    pipe = pipes.build(family)
    reference = generate(pipe, family, steps=3)
    overrides = dict(EXACT_OVERRIDES[recipe])
    if recipe in ("hilbert", "window-residual"):  # at most 17 tiles: 16 neighbours on each side see them all
        overrides["tile_size"] = -(-image_tokens(pipe, family) // 16)
    handle = accelerate_dit(pipe, recipe, **overrides)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="dit_accel")  # no dense fallback may hide here
        warnings.filterwarnings("ignore", category=IdlePluginWarning)  # reported, not hidden
        out = generate(pipe, family, steps=3)
    torch.testing.assert_close(out, reference, atol=2e-4, rtol=1e-4)
    handle.remove()


# Every family with hilbert; the other recipes on a DiT, an MMDiT and a video family by default (all of them: slow).
SPARSE_CASES = [(family, recipe) if recipe == "hilbert" or family in ("zoo:dit", "flux", "wan") else
                pytest.param(family, recipe, marks=pytest.mark.slow)
                for recipe in ATTENTION_RECIPES for family in FAMILIES]


@pytest.mark.parametrize("family,recipe", SPARSE_CASES)
def test_sparse_recipes_run_and_remove_cleanly(family, recipe):
    if family.startswith("zoo:") and not zoo_weights_present(family):
        pytest.skip("zoo weights not exported yet")
    pipe = pipes.build(family)
    reference = generate(pipe, family, steps=4)
    overrides = {} if recipe == "todo" else {"start": 0.0}
    if recipe == "window-residual":
        overrides = {"interval": 2, "first_steps": 1, "neighbours": 0}
    handle = accelerate_dit(pipe, recipe, **overrides)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="dit_accel")
        warnings.filterwarnings("ignore", category=IdlePluginWarning)  # reported, not hidden
        first = generate(pipe, family, steps=4)
        second = generate(pipe, family, steps=4)
    assert torch.isfinite(first).all()
    torch.testing.assert_close(second, first, atol=0, rtol=0)  # per-generation state fully reset
    stats = handle.stats
    partial = sum(s.partial for s in stats.sublayers.values())
    if partial:
        assert stats.flops_fraction < 1.0
    else:  # only a grid so small that the plan covers all of it may stay dense, and then it must be exact
        torch.testing.assert_close(first, reference, atol=2e-4, rtol=1e-4)
    handle.remove()
    assert torch.equal(generate(pipe, family, steps=4), reference)


def test_window_residual_keeps_one_residual_per_branch():
    pipe = pipes.build("zoo:mmdit")  # separate cond / uncond calls
    handle = accelerate_dit(pipe, "window-residual", interval=2, first_steps=1, tile_size=8, neighbours=0)
    plugin = next(p for p in handle.transformers[0].plugins if isinstance(p, WindowResidualPlugin))
    seen = {}
    clear = plugin.reset

    def snapshot_then_reset():  # the generation's end resets the plugin: look at its caches just before
        seen.update(plugin.residuals)
        seen["bytes"] = max(seen.get("bytes", 0), plugin.cache_bytes())
        clear()

    plugin.reset = snapshot_then_reset
    generate(pipe, "zoo:mmdit", steps=3)
    assert plugin.residuals == {}
    cache_bytes = seen.pop("bytes")
    plugin.residuals = seen
    slots = {key[2] for key in plugin.residuals}
    layers = {key[0] for key in plugin.residuals}
    assert slots == {0, 1} and len(plugin.residuals) == 2 * len(layers)
    assert cache_bytes > 0 and handle.stats.cache_bytes > 0
    for key, residual in plugin.residuals.items():
        other = plugin.residuals[(key[0], key[1], 1 - key[2])]
        assert not torch.equal(residual, other)  # the branches' residuals differ: no sharing
    handle.remove()


def test_step_window_fractions():
    pipe = pipes.build("sd3")
    handle = accelerate_dit(pipe, "hilbert", start=0.5, tile_size=4, pool_size=4)
    generate(pipe, "sd3", steps=4)
    partial = {s.partial for name, s in handle.stats.sublayers.items() if name.endswith("attn")}
    calls = handle.stats.transformer_calls
    assert partial == {calls // 2}  # steps 2 and 3 of 4, every call of those steps


def test_bad_configurations():
    with pytest.raises(ValueError, match=r"ToDoConfig\.factor = 0"):
        ToDoConfig(factor=0)
    with pytest.raises(ValueError, match="mode"):
        ToDoConfig(mode="bilinear")
    with pytest.raises(ValueError, match=r"ProxyConfig\.radius"):
        ProxyConfig(radius=-1)
    with pytest.raises(ValueError, match="start = 0.6 must be below end = 0.5"):
        HilbertConfig(start=0.6, end=0.5)
    with pytest.raises(ValueError, match=r"WindowResidualConfig\.interval"):
        WindowResidualConfig(interval=0)
    with pytest.raises(ValueError, match="must lie in 1..50"):
        curve_tile_attention(*qkv(length=50)[:3], tile=64, radius=1)
    with pytest.raises(ValueError, match="must fit"):
        window_plan(TokenGrid(1, 4, 4), (5, 2), 1, (0, 0), True)
    # A tile larger than this call's sequence (a resolution too small for the setting): dense, warned once, and
    # the summary says why the plugin did nothing.
    pipe = pipes.build("sd3")
    reference = generate(pipe, "sd3", steps=2)
    handle = accelerate_dit(pipe, "hilbert", tile_size=4096, start=0.0)
    with pytest.warns(UserWarning, match="tile_size 4096 is larger than the sequence of 256 image tokens"):
        out = generate(pipe, "sd3", steps=2)
    torch.testing.assert_close(out, reference)
    assert "larger than the sequence" in handle.transformers[0].idle["hilbert"]
    remove_acceleration(pipe)
    # A grid too small for the factor (a resolution, not a setting, is at fault): dense, with one warning.
    plugin, call = _plugin_call(ToDoPlugin, ToDoConfig(factor=8), TokenLayout("self", TokenGrid(1, 4, 4)))
    q, k, v = qkv(length=16)[:3]
    with pytest.warns(UserWarning, match="todo factor 8 exceeds the 4x4 token grid"):
        out = plugin._attend(q, k, v, call)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))
    with pytest.raises(ValueError, match="no self- or joint-attention layer"):
        accelerate_dit(pipes.build("pixart-sigma"), "hilbert", layers=["transformer_blocks.*.attn2"])
    assert math.isclose(load_recipe("hilbert").plugins[0].start, 0.2)


def test_pooled_sub_blocks():
    """Far tiles pooled in sub-blocks: pool 1 is exact attention; any pool matches the masked math."""
    q, k, v, kt, vt = qkv(length=64, text=3)
    torch.testing.assert_close(curve_tile_attention(q, k, v, tile=16, radius=0, offset=8, pool=1, shared_key=kt,
                                                    shared_value=vt), dense(q, k, v, kt, vt), atol=1e-5, rtol=1e-5)
    out = curve_tile_attention(q, k, v, tile=16, radius=0, pool=4)
    tiles = torch.arange(64) // 16
    k_pool = k.reshape(2, 3, 16, 4, 16).mean(3)
    v_pool = v.reshape(2, 3, 16, 4, 16).mean(3)
    keys, values = torch.cat([k, k_pool], 2), torch.cat([v, v_pool], 2)
    near_exact = tiles[:, None] == tiles[None, :]
    near_pooled = tiles[:, None] == (torch.arange(16) // 4)[None, :]
    bias = torch.cat([torch.where(near_exact, 0.0, -math.inf), torch.where(near_pooled, -math.inf, math.log(4))], 1)
    expected = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert curve_density(64, 16, 0, 0, True, 4) == pytest.approx((16 + 12) / 64)
    with pytest.raises(ValueError, match="must divide"):
        HilbertConfig(tile_size=16, pool_size=5)
