"""Block contracts: every registered family's tables match what its blocks really do."""

from __future__ import annotations

import pytest
import torch

from dit_accel import accelerate_dit
from dit_accel.core.blocks import (
    TokenGrid,
    UnsupportedTransformerError,
    registered_transformers,
    spec_for,
)
import pipelines_for_tests as pipes
from dit_accel.pipelines import tiny


def run_and_capture_blocks(pipe, name):
    """Run one generation step and capture (contract, block input hidden, block output) for every block."""
    spec = spec_for(pipe.transformer)
    captured = []
    handles = []
    for list_attr, index, block, contract in spec.blocks(pipe.transformer):
        def hook(module, args, kwargs, output, contract=contract, label=f"{list_attr}.{index}"):
            hidden_in = kwargs.get(contract.hidden_arg, args[0] if args else None)
            captured.append((label, contract, hidden_in, output))
        handles.append(block.register_forward_hook(hook, with_kwargs=True))
    with torch.no_grad():
        pipe(**pipes.call_kwargs(name, steps=1))
    for handle in handles:
        handle.remove()
    return spec, captured


def test_contracts_match_the_blocks(family):
    pipe = pipes.build(family)
    spec, captured = run_and_capture_blocks(pipe, family)
    assert captured, "every block list must be found"
    for label, contract, hidden_in, output in captured:
        hidden, encoder = contract.split_output(output)
        assert isinstance(hidden, torch.Tensor) and hidden.shape == hidden_in.shape, label
        if contract.returns != "h" and encoder is None:
            assert contract.encoder_may_be_none, f"{label} returned encoder=None but its contract does not allow it"
        rebuilt = contract.join_output(hidden, encoder)
        assert type(rebuilt) is type(output) or contract.returns != "h"
    for list_attr, index, block, contract in spec.blocks(pipe.transformer):
        assert type(block).__name__ == contract.block_class
        present = [s for s in contract.sublayers if getattr(block, s.name, None) is not None]
        assert any(s.role == "attention" for s in present) and any(s.role == "mlp" for s in present)


def test_sd3_last_block_returns_no_encoder():
    pipe = tiny.build("sd3")
    _, captured = run_and_capture_blocks(pipe, "sd3")
    *_, (label, contract, _, output) = captured
    assert contract.split_output(output)[1] is None and contract.encoder_may_be_none


@pytest.mark.parametrize(
    "name, expected",
    [("dit", TokenGrid(1, 8, 8)), ("flux", TokenGrid(1, 8, 8)), ("wan", TokenGrid(2, 2, 2)), ("sd3", TokenGrid(1, 16, 16))],
)
def test_token_grid_is_read_from_the_call(name, expected):
    from dit_accel import Recipe
    from plugins_for_tests import ProbeConfig

    pipe = tiny.build(name)
    handle = accelerate_dit(pipe, Recipe((ProbeConfig(),)))
    with torch.no_grad():
        pipe(**tiny.default_call_kwargs(name, steps=1))
    contexts = handle.transformers[0].plugins[0].contexts
    assert {c.grid for c in contexts} == {expected}


def test_unsupported_transformer_gets_a_clear_error():
    class MyTransformer(torch.nn.Module):
        pass

    with pytest.raises(UnsupportedTransformerError) as error:
        accelerate_dit(MyTransformer())
    message = str(error.value)
    assert "no adapter for MyTransformer" in message
    for cls in ("DiTTransformer2DModel", "PixArtTransformer2DModel", "SD3Transformer2DModel",
                "FluxTransformer2DModel", "WanTransformer3DModel"):
        assert cls in message
    assert "register_transformer" in message


def test_bad_targets_get_clear_errors():
    with pytest.raises(TypeError, match="expects a diffusers pipeline or transformer model, got str"):
        accelerate_dit("flux")
    pipe = tiny.build("dit")
    pipe.transformer = None
    with pytest.raises(TypeError, match="has no `transformer` component"):
        accelerate_dit(pipe)


def test_registry_lists_all_families():
    families = {spec.family for spec in registered_transformers().values()}
    assert {"dit", "pixart", "sd3", "flux", "wan", "hunyuan-video", "cogvideox", "ltx", "qwen-image"} <= families


def _qwen():
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                        attention_head_dim=16, num_attention_heads=4, joint_attention_dim=16,
                                        guidance_embeds=False, axes_dims_rope=(8, 4, 4)).eval()
    inputs = dict(hidden_states=torch.randn(1, 16, 16), encoder_hidden_states=torch.randn(1, 8, 16),
                  encoder_hidden_states_mask=torch.ones(1, 8, dtype=torch.long), timestep=torch.tensor([1.0]),
                  img_shapes=[(1, 4, 4)], return_dict=False)
    return model, inputs, TokenGrid(1, 4, 4), 8


def _hunyuan():
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10,
                                           num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=1,
                                           patch_size_t=1, guidance_embeds=True, text_embed_dim=16,
                                           pooled_projection_dim=8, rope_axes_dim=(2, 4, 4),
                                           image_condition_type=None).eval()
    inputs = dict(hidden_states=torch.randn(1, 4, 2, 4, 4), timestep=torch.tensor([1.0]),
                  encoder_hidden_states=torch.randn(1, 6, 16), encoder_attention_mask=torch.ones(1, 6),
                  pooled_projections=torch.randn(1, 8), guidance=torch.tensor([1000.0]), return_dict=False)
    return model, inputs, TokenGrid(2, 4, 4), 6


@pytest.mark.parametrize("build", [_qwen, _hunyuan], ids=["qwen-image", "hunyuan-video"])
def test_transformer_level_families(build):
    """Qwen-Image and HunyuanVideo at transformer level: identity interception is exact and sees the layout."""
    from dit_accel import Recipe, remove_acceleration
    from plugins_for_tests import CounterConfig

    model, inputs, grid, text = build()
    with torch.no_grad():
        reference = model(**inputs)[0]
        handle = accelerate_dit(model, Recipe((CounterConfig(),)))
        out = model(**inputs)[0]
    assert torch.equal(out, reference)
    counter = handle.transformers[0].plugins[0]
    layers = handle.transformers[0].attention.layers
    assert set(counter.calls) == {layer.name for layer in layers} and all(v == 1 for v in counter.calls.values())
    for layer, layout, q_shape, _, context in counter.seen:
        assert layout.grid == grid and layout.kind == "joint"
        assert layout.num_text_tokens == text and layout.matches(q_shape[2])
    remove_acceleration(model)
    with torch.no_grad():
        assert torch.equal(model(**inputs)[0], reference)
