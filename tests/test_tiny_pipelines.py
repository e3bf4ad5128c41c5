"""Tests of ``dit_accel.pipelines.tiny``: offline tiny random-init Diffusers pipelines."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from dit_accel.pipelines import tiny

NAMES = tiny.list()
STEPS = 2

# Expected output shapes for default_call_kwargs(name, batch_size=B): images (B, 3, H, W), videos (B, F, 3, H, W).
EXPECTED_SHAPES: dict[str, tuple[int, ...]] = {
    "dit": (3, 32, 32),
    "pixart-sigma": (3, 32, 32),
    "sd3": (3, 32, 32),
    "flux": (3, 32, 32),
    "wan": (5, 3, 32, 32),
    "cogvideox": (9, 3, 32, 32),
    "ltx": (9, 3, 32, 32),
    "qwen-image": (3, 32, 32),
    "hunyuan-video": (5, 3, 32, 32),
}


def _generate(name: str, pipe: Any, **overrides: Any) -> torch.Tensor:
    kwargs = tiny.default_call_kwargs(name, steps=STEPS, **overrides)
    return tiny.output_of(name, pipe(**kwargs))


def _transformer_params(pipe: Any) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in pipe.transformer.state_dict().items()}


def test_list_order() -> None:
    assert tiny.list() == ["dit", "pixart-sigma", "sd3", "flux", "wan", "cogvideox", "ltx", "qwen-image",
                           "hunyuan-video"]
    assert tiny.list() is not tiny.list()  # callers may mutate their copy


@pytest.mark.parametrize("name", NAMES)
def test_build_and_generate(name: str) -> None:
    rng_state = torch.random.get_rng_state()
    pipe = tiny.build(name, seed=0)
    assert torch.equal(torch.random.get_rng_state(), rng_state), "build() must not touch the global RNG"

    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            assert not any(module.training for module in component.modules())

    image = _generate(name, pipe)
    assert image.dtype == torch.float32
    assert tuple(image.shape) == (1, *EXPECTED_SHAPES[name])
    assert torch.isfinite(image).all()


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_is_bit_identical_and_other_seed_differs(name: str) -> None:
    first = tiny.build(name, seed=0)
    second = tiny.build(name, seed=0)
    other = tiny.build(name, seed=1)

    first_params, second_params, other_params = map(_transformer_params, (first, second, other))
    assert first_params.keys() == second_params.keys()
    assert all(torch.equal(first_params[key], second_params[key]) for key in first_params)
    assert any(not torch.equal(first_params[key], other_params[key]) for key in first_params)

    assert torch.equal(_generate(name, first), _generate(name, second))


@pytest.mark.parametrize("batch_size", [1, 2])
@pytest.mark.parametrize("name", NAMES)
def test_is_batched_cfg_matches_transformer_calls(name: str, batch_size: int) -> None:
    pipe = tiny.build(name)
    batch_sizes: list[int] = []

    def record(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        batch_sizes.append(hidden_states.shape[0])

    handle = pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        image = _generate(name, pipe, batch_size=batch_size)
    finally:
        handle.remove()

    assert image.shape[0] == batch_size
    if tiny.is_batched_cfg(name):
        assert batch_sizes == [2 * batch_size] * STEPS
    else:
        assert batch_sizes == [batch_size] * (2 * STEPS)


def test_cfg_off_gives_one_call_per_step() -> None:
    pipe = tiny.build("flux")
    calls: list[int] = []
    handle = pipe.transformer.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        _generate("flux", pipe, guidance_scale=1.0)
    finally:
        handle.remove()
    assert len(calls) == STEPS


def test_dit_cond_half_first() -> None:
    pipe = tiny.build("dit")
    labels: list[torch.Tensor] = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: labels.append(kwargs["class_labels"].clone()), with_kwargs=True
    )
    try:
        _generate("dit", pipe)
    finally:
        handle.remove()
    assert labels[0].tolist() == [1, 1000]  # class label first, then the null class


@pytest.mark.parametrize(
    ("name", "attribute", "count"),
    [
        ("dit", "transformer_blocks", 3),
        ("sd3", "transformer_blocks", 1),
        ("flux", "transformer_blocks", 1),
        ("flux", "single_transformer_blocks", 1),
        ("wan", "blocks", 3),
    ],
)
def test_num_layers(name: str, attribute: str, count: int) -> None:
    pipe = tiny.build(name, num_layers=count)
    assert len(getattr(pipe.transformer, attribute)) == count


def test_default_block_counts() -> None:
    flux = tiny.build("flux")
    assert len(flux.transformer.transformer_blocks) == 2
    assert len(flux.transformer.single_transformer_blocks) == 2
    sd3 = tiny.build("sd3")
    blocks = sd3.transformer.transformer_blocks
    assert len(blocks) >= 2
    assert blocks[-1].context_pre_only and not blocks[0].context_pre_only


@pytest.mark.parametrize("call", [tiny.build, tiny.default_call_kwargs, tiny.is_batched_cfg])
def test_unknown_name_raises(call: Any) -> None:
    with pytest.raises(ValueError) as error:
        call("no-such-pipeline")
    message = str(error.value)
    assert "no-such-pipeline" in message
    for name in NAMES:
        assert name in message


def test_invalid_num_layers_raises() -> None:
    with pytest.raises(ValueError, match="num_layers"):
        tiny.build("dit", num_layers=0)
