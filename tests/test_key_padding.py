"""Key-padding masks over text tokens (HunyuanVideo's padded prompts, Qwen-Image's batches of prompts of different
lengths) are served exactly by the attention plugins: each sample's masked keys are left out, nothing falls back to
dense; any other mask still runs dense with a warning."""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import pipelines_for_tests as pipes
from dit_accel import IdlePluginWarning
from dit_accel import accelerate_dit
from dit_accel.attention.hilbert import HilbertConfig, HilbertPlugin
from dit_accel.attention.todo import ToDoConfig, ToDoPlugin
from dit_accel.attention.window_residual import WindowResidualConfig, WindowResidualPlugin
from dit_accel.core import attention as core_attention
from dit_accel.core.attention import KeyPaddingReader, key_padding, padding_groups
from dit_accel.core.blocks import TokenGrid, TokenLayout
from test_attention_plugins import _plugin_call, qkv

GRID = TokenGrid(1, 8, 8)
NUM_TEXT = 6


def test_key_padding_reads_boolean_and_additive_masks_per_sample():
    keep = torch.tensor([True] * 5 + [False] * 2)
    for mask in (keep.view(1, 1, 1, 7).expand(3, 1, 1, 7),
                 torch.where(keep, 0.0, float("-inf")).view(1, 1, 1, 7),
                 keep.view(1, 7).expand(7, 7)):
        assert torch.equal(key_padding(mask, 3, 7), keep.expand(3, 7))
    assert key_padding(torch.zeros(2, 1, 1, 7, dtype=torch.bool), 2, 6) is None  # another length
    differing = torch.ones(3, 1, 1, 7, dtype=torch.bool)
    differing[1, ..., -1] = False
    assert torch.equal(key_padding(differing, 3, 7), differing[:, 0, 0])  # prompts of other lengths in one batch
    groups = padding_groups(differing[:, 0, 0])
    assert sorted(rows.tolist() for rows, _ in groups) == [[0, 2], [1]]
    assert key_padding(torch.ones(2, 1, 1, 7, dtype=torch.bool), 3, 7) is None  # a batch it does not belong to
    assert key_padding(torch.full((1, 1, 1, 7), -2.0), 1, 7) is None  # a bias, not padding
    assert key_padding(torch.ones(1, 1, 1, 7, dtype=torch.long), 1, 7) is None
    assert key_padding(torch.tril(torch.ones(7, 7, dtype=torch.bool)), 1, 7) is None  # causal


def test_the_reader_reads_one_mask_object_once(monkeypatch):
    reads = []
    monkeypatch.setattr(core_attention, "key_padding", lambda *args: reads.append(args) or key_padding(*args))
    reader = KeyPaddingReader()
    mask = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    mask[..., -2:] = False
    for _ in range(3):  # every block of one forward
        assert torch.equal(reader(mask, 2, 7), mask[:, 0, 0])
    assert len(reads) == 1
    mask[..., -3] = False  # changed in place: read again
    assert torch.equal(reader(mask, 2, 7), mask[:, 0, 0])
    assert torch.equal(reader(mask.clone(), 2, 7), mask[:, 0, 0])  # another object: read again
    assert len(reads) == 3


def _joint(text_position: str, padded: int, batch: int = 2):
    q, k, v, _, _ = qkv(batch=batch, length=64 + NUM_TEXT)
    keep = torch.ones(64 + NUM_TEXT, dtype=torch.bool)
    text = slice(0, NUM_TEXT) if text_position == "first" else slice(64, 64 + NUM_TEXT)
    keep[text] = torch.arange(NUM_TEXT) < NUM_TEXT - padded
    mask = keep.view(1, 1, 1, -1).expand(batch, 1, 1, -1)
    return q, k, v, keep, mask


@pytest.mark.parametrize("text_position", ["first", "last"])
@pytest.mark.parametrize("plugin_cls,config", [
    (HilbertPlugin, HilbertConfig(tile_size=8, neighbours=0, pool_size=8)),
    (ToDoPlugin, ToDoConfig(factor=2)),
])
def test_masked_text_keys_are_left_out_exactly(text_position, plugin_cls, config):
    q, k, v, keep, mask = _joint(text_position, padded=2)
    layout = TokenLayout("joint", GRID, num_text_tokens=NUM_TEXT, text_position=text_position)
    plugin, call = _plugin_call(plugin_cls, config, layout, attn_mask=mask)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="dit_accel")  # served, not a dense fallback
        warnings.filterwarnings("ignore", category=IdlePluginWarning)  # reported, not hidden
        out = plugin._attend(q, k, v, call)
    assert not plugin.fallbacks
    # the same plugin on the sequence with the padded text tokens physically removed, no mask
    text_kept = NUM_TEXT - 2
    plain, plain_call = _plugin_call(plugin_cls, config, TokenLayout("joint", GRID, num_text_tokens=text_kept,
                                                                     text_position=text_position))
    expected = plain._attend(q[:, :, keep], k[:, :, keep], v[:, :, keep], plain_call)
    torch.testing.assert_close(out[:, :, keep], expected, atol=1e-6, rtol=1e-6)
    # the padded text queries themselves attend exactly, as the masked dense call would
    masked_dense = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out[:, :, ~keep], masked_dense[:, :, ~keep], atol=1e-6, rtol=1e-6)
    assert (out - masked_dense).abs().max() > 1e-3  # and the image queries are accelerated


def _run_steps(plugin_cls, config, layout, q, k, v, **options):
    """The plugin's output on the third step (window-residual: a cheap step that adds the residual cached on a
    full one, so a residual mixed up between groups of samples shows)."""
    plugin, call = _plugin_call(plugin_cls, config, layout, **options)
    plugin.residuals = {}
    plugin.target = SimpleNamespace(stats=SimpleNamespace(set_cache_bytes=lambda nbytes: None, record=lambda *a, **k: None,
                                                          core_fraction=lambda context, name: 1.0))
    out = None
    for step in (0, 1, 2):
        step_call = dataclasses.replace(call, context=SimpleNamespace(step=step, slot=0))
        out = plugin._attend(q * (1 + 0.5 * step), k, v, step_call)  # queries that change from step to step
    return plugin, out


@pytest.mark.parametrize("plugin_cls,config", [
    (HilbertPlugin, HilbertConfig(tile_size=8, neighbours=0, pool_size=8)),
    (WindowResidualPlugin, WindowResidualConfig(tile_size=8, neighbours=0, interval=2, first_steps=1)),
])
def test_prompts_of_different_lengths_in_one_batch_are_served_per_length(plugin_cls, config):
    q, k, v, keep, mask = _joint("first", padded=0, batch=3)
    mask = mask.clone()
    mask[1, ..., NUM_TEXT - 3:NUM_TEXT] = False  # sample 1 has the shorter prompt
    layout = TokenLayout("joint", GRID, num_text_tokens=NUM_TEXT, text_position="first")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="dit_accel")
        warnings.filterwarnings("ignore", category=IdlePluginWarning)  # reported, not hidden
        plugin, out = _run_steps(plugin_cls, config, layout, q, k, v, attn_mask=mask)
    assert not plugin.fallbacks
    for sample in range(3):
        kept, rows = mask[sample, 0, 0], slice(sample, sample + 1)
        alone_layout = TokenLayout("joint", GRID, num_text_tokens=int(kept[:NUM_TEXT].sum()), text_position="first")
        _, expected = _run_steps(plugin_cls, config, alone_layout, q[rows][:, :, kept], k[rows][:, :, kept],
                                 v[rows][:, :, kept])
        torch.testing.assert_close(out[rows][:, :, kept], expected, atol=1e-6, rtol=1e-6)
    masked_dense = F.scaled_dot_product_attention(q * 2, k, v, attn_mask=mask)
    assert (out - masked_dense).abs().max() > 1e-3  # the image queries are accelerated


def test_a_mask_over_image_tokens_or_a_bias_runs_dense():
    q, k, v, keep, mask = _joint("last", padded=2)
    layout = TokenLayout("joint", GRID, num_text_tokens=NUM_TEXT, text_position="last")
    hides_image = mask.clone()
    hides_image[..., 3] = False
    plugin, call = _plugin_call(HilbertPlugin, HilbertConfig(tile_size=8, neighbours=0), layout, attn_mask=hides_image)
    with pytest.warns(UserWarning, match="hides image tokens"):
        out = plugin._attend(q, k, v, call)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=hides_image))
    bias = torch.randn(2, 1, 64 + NUM_TEXT, 64 + NUM_TEXT)
    plugin, call = _plugin_call(HilbertPlugin, HilbertConfig(tile_size=8, neighbours=0), layout, attn_mask=bias)
    with pytest.warns(UserWarning, match="not a key-padding mask"):
        plugin._attend(q, k, v, call)


def _padded_prompt_kwargs(name: str) -> dict:
    kwargs = pipes.call_kwargs(name, steps=3)
    kwargs.update(prompt="a cat", negative_prompt="b")  # both far shorter than max_sequence_length: padded
    return kwargs


def test_hunyuan_video_padding_is_masked_and_served():
    """HunyuanVideo masks its prompt padding in every joint attention; a sparse plugin must act there, not fall
    back, and stay exact at settings that cover every key."""
    pipe = pipes.build("hunyuan-video")
    masks = []
    block = pipe.transformer.transformer_blocks[0]
    signature = inspect.signature(block.forward)
    hook = block.register_forward_pre_hook(
        lambda module, args, kwargs: masks.append(signature.bind(*args, **kwargs).arguments.get("attention_mask")),
        with_kwargs=True)
    with torch.no_grad():
        reference = pipes.output_of("hunyuan-video", pipe(**_padded_prompt_kwargs("hunyuan-video")))
    hook.remove()
    assert masks and masks[0] is not None and not bool(masks[0].all())  # the case under test: padding is masked
    handle = accelerate_dit(pipe, "hilbert", neighbours=16, start=0.0, tile_size=4)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="dit_accel")
        warnings.filterwarnings("ignore", category=IdlePluginWarning)  # reported, not hidden
        with torch.no_grad():
            exact = pipes.output_of("hunyuan-video", pipe(**_padded_prompt_kwargs("hunyuan-video")))
    torch.testing.assert_close(exact, reference, atol=2e-4, rtol=1e-4)
    handle.remove()
    handle = accelerate_dit(pipe, "todo")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="dit_accel")
        warnings.filterwarnings("ignore", category=IdlePluginWarning)  # reported, not hidden
        with torch.no_grad():
            pipe(**_padded_prompt_kwargs("hunyuan-video"))
    plugin = handle.transformers[0].plugins[0]
    assert not plugin.fallbacks
    assert any(s.partial for s in handle.stats.sublayers.values())
    handle.remove()


def test_qwen_image_batch_of_prompts_of_different_lengths_is_served():
    """Qwen-Image masks text padding only when a batch mixes prompt lengths; the attention plugins then run once per
    length, exact at settings that cover every key, and never fall back."""
    pipe = pipes.build("qwen-image")
    kwargs = dict(pipes.call_kwargs("qwen-image", steps=2), prompt=["a cat", "a much longer prompt about a dog"],
                  negative_prompt=["b", "a longer negative prompt"], num_images_per_prompt=1,
                  max_sequence_length=512)  # the whole templated prompt: its padding is kept, not cut off

    def run():
        with torch.no_grad():
            return pipes.output_of("qwen-image", pipe(**dict(kwargs, generator=torch.Generator().manual_seed(0))))

    masks = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kw: masks.append(kw.get("encoder_hidden_states_mask")), with_kwargs=True)
    reference = run()
    hook.remove()
    assert masks[0] is not None and not bool(masks[0].all())  # the case under test: padding is masked
    for recipe, overrides in (("hilbert", dict(neighbours=16, start=0.0, tile_size=1)), ("todo", {})):
        handle = accelerate_dit(pipe, recipe, **overrides)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="dit_accel")
            warnings.filterwarnings("ignore", category=IdlePluginWarning)  # reported, not hidden
            out = run()
        assert not handle.transformers[0].plugins[0].fallbacks
        if recipe == "hilbert":
            torch.testing.assert_close(out, reference, atol=2e-4, rtol=1e-4)
        else:
            assert any(s.partial for s in handle.stats.sublayers.values())
        handle.remove()


@pytest.mark.skipif(__import__("importlib").util.find_spec("triton") is None, reason="triton not installed")
def test_int8_serves_padding_per_prompt_length(interpreter):
    from dit_accel.attention.int8 import Int8Config, Int8Plugin
    from dit_accel.kernels.int8_attention import int8_attention

    q, k, v, keep, mask = _joint("last", padded=0, batch=3)
    mask = mask.clone()
    mask[1, ..., -3:] = False
    layout = TokenLayout("joint", GRID, num_text_tokens=NUM_TEXT, text_position="last")
    plugin, call = _plugin_call(Int8Plugin, Int8Config(), layout, attn_mask=mask)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="dit_accel")
        warnings.filterwarnings("ignore", category=IdlePluginWarning)  # reported, not hidden
        out = plugin._attend(q, k, v, call)
    assert not plugin.fallbacks
    for sample in range(3):
        kept, rows = mask[sample, 0, 0], slice(sample, sample + 1)
        expected = int8_attention(q[rows], k[rows][:, :, kept], v[rows][:, :, kept])
        torch.testing.assert_close(out[rows], expected, atol=1e-6, rtol=1e-6)
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert F.cosine_similarity(out.flatten(), dense.flatten(), dim=0) > 0.999
