"""Key-padding masks over text tokens (HunyuanVideo's padded prompts) are served exactly by the attention plugins:
the masked keys are left out, nothing falls back to dense; any other mask still runs dense with a warning."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
import torch.nn.functional as F

import pipelines_for_tests as pipes
from dit_accel import accelerate_dit
from dit_accel.attention.hilbert import HilbertConfig, HilbertPlugin
from dit_accel.attention.todo import ToDoConfig, ToDoPlugin
from dit_accel.core.attention import shared_key_padding
from dit_accel.core.blocks import TokenGrid, TokenLayout
from test_attention_plugins import _plugin_call, qkv

GRID = TokenGrid(1, 8, 8)
NUM_TEXT = 6


def test_shared_key_padding_reads_boolean_and_additive_masks():
    keep = torch.tensor([True] * 5 + [False] * 2)
    for mask in (keep.view(1, 1, 1, 7).expand(3, 1, 1, 7),
                 torch.where(keep, 0.0, float("-inf")).view(1, 1, 1, 7),
                 keep.view(1, 7).expand(7, 7)):
        assert torch.equal(shared_key_padding(mask, 7), keep)
    assert shared_key_padding(torch.zeros(2, 1, 1, 7, dtype=torch.bool), 6) is None  # another length
    differing = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    differing[1, ..., -1] = False
    assert shared_key_padding(differing, 7) is None  # prompts of other lengths in one batch
    assert shared_key_padding(torch.full((1, 1, 1, 7), -2.0), 7) is None  # a bias, not padding
    assert shared_key_padding(torch.ones(1, 1, 1, 7, dtype=torch.long), 7) is None
    assert shared_key_padding(torch.tril(torch.ones(7, 7, dtype=torch.bool)), 7) is None  # causal


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


def test_a_mask_over_image_tokens_or_differing_prompts_runs_dense():
    q, k, v, keep, mask = _joint("last", padded=2)
    layout = TokenLayout("joint", GRID, num_text_tokens=NUM_TEXT, text_position="last")
    hides_image = mask.clone()
    hides_image[..., 3] = False
    plugin, call = _plugin_call(HilbertPlugin, HilbertConfig(tile_size=8, neighbours=0), layout, attn_mask=hides_image)
    with pytest.warns(UserWarning, match="hides image tokens"):
        out = plugin._attend(q, k, v, call)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=hides_image))
    differing = mask.clone()
    differing[1, ..., -3] = False
    plugin, call = _plugin_call(HilbertPlugin, HilbertConfig(tile_size=8, neighbours=0), layout, attn_mask=differing)
    with pytest.warns(UserWarning, match="not a key-padding mask shared by the batch"):
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
        with torch.no_grad():
            exact = pipes.output_of("hunyuan-video", pipe(**_padded_prompt_kwargs("hunyuan-video")))
    torch.testing.assert_close(exact, reference, atol=2e-4, rtol=1e-4)
    handle.remove()
    handle = accelerate_dit(pipe, "todo")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="dit_accel")
        with torch.no_grad():
            pipe(**_padded_prompt_kwargs("hunyuan-video"))
    plugin = handle.transformers[0].plugins[0]
    assert not plugin.fallbacks
    assert any(s.partial for s in handle.stats.sublayers.values())
    handle.remove()
