"""dit_accel with the other hooks and wrappers users install: diffusers group offloading (before or after
``accelerate_dit``), model CPU offload, LoRA adapters (stats count their layers; a hot swap drops what was
calibrated on the old weights) and a ``torch.compile`` of the whole transformer after ``accelerate_dit``."""

from __future__ import annotations

import pytest
import torch

import pipelines_for_tests as pipes
from dit_accel import accelerate_dit, remove_acceleration

RECIPE = ("fora", {"interval": 2, "first_steps": 1, "last_steps": 0})


def _run(pipe, name: str = "flux", steps: int = 5) -> torch.Tensor:
    return pipes.output_of(name, pipe(**pipes.call_kwargs(name, steps=steps)))


def _accelerated_reference(name: str = "flux") -> torch.Tensor:
    pipe = pipes.build(name)
    accelerate_dit(pipe, RECIPE[0], **RECIPE[1])
    return _run(pipe, name)


@pytest.mark.parametrize("order", ["offload-first", "accelerate-first"])
def test_group_offloading_either_order(order):
    from diffusers.hooks import apply_group_offloading

    expected = _accelerated_reference()
    pipe = pipes.build("flux")
    offload = lambda: apply_group_offloading(pipe.transformer, onload_device="cpu", offload_device="cpu",  # noqa: E731
                                             offload_type="block_level", num_blocks_per_group=1)
    if order == "offload-first":
        offload()
        handle = accelerate_dit(pipe, RECIPE[0], **RECIPE[1])
    else:
        handle = accelerate_dit(pipe, RECIPE[0], **RECIPE[1])
        offload()
    assert torch.equal(_run(pipe), expected)
    assert handle.stats.flops_fraction < 1.0
    remove_acceleration(pipe)
    assert torch.isfinite(_run(pipe)).all()


def test_model_cpu_offload_after_acceleration():
    pytest.importorskip("accelerate")
    expected = _accelerated_reference()
    pipe = pipes.build("flux")
    handle = accelerate_dit(pipe, RECIPE[0], **RECIPE[1])
    pipe.enable_model_cpu_offload(device="cpu")
    assert torch.equal(_run(pipe), expected)
    assert handle.stats.flops_fraction < 1.0


def _add_lora(transformer: torch.nn.Module, name: str, rank: int = 4, seed: int = 0) -> None:
    from peft import LoraConfig

    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "proj_out"],
                                       init_lora_weights=False), adapter_name=name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module_name, parameter in transformer.named_parameters():
            if "lora_" in module_name and f".{name}." in module_name:
                parameter.data.normal_(0, 0.05)


def test_lora_stats_count_the_adapter_layers_exactly(monkeypatch):
    pytest.importorskip("peft")
    from test_stats_flops import FlopCounter

    pipe = pipes.build("flux")
    _add_lora(pipe.transformer, "style")
    handle = accelerate_dit(pipe, "fora", interval=2, first_steps=1, last_steps=0)
    counter = FlopCounter(pipe.transformer, monkeypatch)
    try:
        _run(pipe)
    finally:
        counter.close()
    assert handle.stats.flops == pytest.approx(counter.total, rel=1e-9)
    assert handle.stats.flops_fraction < 1.0


def test_lora_hot_swap_recalibrates_magcache():
    pytest.importorskip("peft")
    pipe = pipes.build("flux")
    _add_lora(pipe.transformer, "a", seed=1)
    _add_lora(pipe.transformer, "b", seed=2)
    pipe.transformer.set_adapters(["a"])
    handle = accelerate_dit(pipe, "magcache", threshold=100.0, max_skips=2, retention=0.0)
    plugin = handle.transformers[0].plugins[0]
    _run(pipe)  # calibrates on adapter "a"
    assert plugin.curves
    pipe.transformer.set_adapters(["b"])
    with pytest.warns(UserWarning, match="calibrate"):
        _run(pipe)  # a new adapter: calibrates again instead of reusing "a"'s curve
    assert plugin.curves and handle.stats.flops_fraction == 1.0


@pytest.mark.slow
def test_torch_compile_of_the_whole_transformer_after_acceleration():
    expected = _accelerated_reference()
    pipe = pipes.build("flux")
    handle = accelerate_dit(pipe, RECIPE[0], **RECIPE[1])
    pipe.transformer = torch.compile(pipe.transformer)
    output = _run(pipe)
    assert torch.allclose(output, expected, atol=1e-4)
    assert handle.stats.flops_fraction < 1.0
