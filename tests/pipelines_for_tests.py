"""One way for the tests to build and call every pipeline family: the tiny random-init ones and the zoo."""

from __future__ import annotations

import contextlib

import torch

from dit_accel.pipelines import tiny

ZOO = ("zoo:dit", "zoo:mmdit")

# Every pipeline family the README lists (DiT, PixArt, SD3, FLUX, Wan, Qwen-Image, HunyuanVideo), the two other
# video pipelines the tiny builders cover, and the two trained zoo models (when their weights are in the package).
FAMILIES = ["dit", "pixart-sigma", "sd3", "flux", "wan", "cogvideox", "ltx", "qwen-image", "hunyuan-video",
            "zoo:dit", "zoo:mmdit"]


def zoo_weights_present(name: str) -> bool:
    from dit_accel.pipelines.zoo.pipelines import WEIGHTS

    return (WEIGHTS / name.split(":")[1] / "model.safetensors").is_file()



def build(name: str):
    if name in ZOO:
        from dit_accel.pipelines import zoo

        return zoo.load(name.split(":")[1])
    return tiny.build(name)


def call_kwargs(name: str, *, steps: int = 4, seed: int = 0, batch_size: int = 1) -> dict:
    if name in ZOO:
        return {"class_labels": [(3 + i) % 10 for i in range(batch_size)], "num_inference_steps": steps,
                "generator": torch.Generator().manual_seed(seed), "output_type": "pt"}
    return tiny.default_call_kwargs(name, steps=steps, seed=seed, batch_size=batch_size)


def output_of(name: str, output) -> torch.Tensor:
    return output.images.float() if name in ZOO else tiny.output_of(name, output)


def is_batched_cfg(name: str) -> bool:
    return name == "zoo:dit" if name in ZOO else tiny.is_batched_cfg(name)


@contextlib.contextmanager
def residual_fast_paths(handle, wrap):
    """Replace every ``ResidualOutput.apply`` of ``handle``'s blocks by ``wrap(apply)`` for the ``with`` body (the
    contracts are shared module constants: restored afterwards). ``wrap=lambda apply: lambda *a: None`` makes every
    block run with its sub-layers served one by one."""
    contracts = {id(c): c for acc in handle.transformers for _, _, _, c in acc.spec.blocks(acc.transformer)
                 if c.residual is not None}
    original = {key: c.residual.apply for key, c in contracts.items()}
    for key, contract in contracts.items():
        object.__setattr__(contract.residual, "apply", wrap(original[key]))
    try:
        yield bool(contracts)
    finally:
        for key, contract in contracts.items():
            object.__setattr__(contract.residual, "apply", original[key])
