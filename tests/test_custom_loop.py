"""Custom sampling loops: a bare transformer driven by a hand-written Euler loop (no diffusers scheduler, no
pipeline), declared with ``handle.generation(...)``; every caching plugin acts, and undeclared loops warn."""

from __future__ import annotations

import warnings

import pytest
import torch

from dit_accel import accelerate_dit, remove_acceleration
from dit_accel.pipelines import tiny

STEPS = 8
# Forced settings where the tiny random weights would never trigger an adaptive skip.
CACHING = {
    "fora": {},
    "taylorseer": {},
    "toca": {},
    "delta-dit": {},
    "fbcache": {"threshold": 10.0, "warmup_steps": 1},
    "magcache": {"threshold": 10.0, "retention": 0.1},
    "speca": {"threshold": 100.0},
    "cfg-share": {},
}
WITH_LAST_STEPS = ("fora", "taylorseer", "toca", "delta-dit", "fbcache", "magcache", "speca")


def dit_transformer():
    from dit_accel.pipelines import zoo

    return zoo.load("dit").transformer


def euler_batched_cfg(transformer, seed: int = 0, guidance: float = 2.0) -> torch.Tensor:
    """The user's loop: flow-matching Euler steps, CFG batched (conditional rows first, then the null class)."""
    generator = torch.Generator().manual_seed(seed)
    size = transformer.config.sample_size
    x = torch.randn(2, transformer.config.in_channels, size, size, generator=generator)
    labels = torch.tensor([3, 7])
    null = torch.full_like(labels, transformer.config.num_embeds_ada_norm)
    sigmas = torch.linspace(1.0, 0.0, STEPS + 1)
    with torch.no_grad():
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            rows = torch.cat([x, x])
            out = transformer(rows, timestep=(sigma * 1000).expand(4), class_labels=torch.cat([labels, null])).sample
            cond, uncond = out[:, : x.shape[1]].chunk(2)
            x = x + (sigma_next - sigma) * (uncond + guidance * (cond - uncond))
    return x


def euler_separate_cfg(transformer, seed: int = 0, guidance: float = 2.0) -> torch.Tensor:
    """The same loop on a Flux transformer with CFG as two calls per step (conditional first)."""
    generator = torch.Generator().manual_seed(seed)
    config = transformer.config
    side = 4
    x = torch.randn(1, side * side, config.in_channels, generator=generator)
    text = torch.randn(1, 6, config.joint_attention_dim, generator=generator)
    pooled = torch.randn(1, config.pooled_projection_dim, generator=generator)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()
    txt_ids = torch.zeros(6, 3)
    sigmas = torch.linspace(1.0, 0.0, STEPS + 1)
    with torch.no_grad():
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            def call(encoder, pool):
                return transformer(hidden_states=x, encoder_hidden_states=encoder, pooled_projections=pool,
                                   timestep=sigma.expand(1), img_ids=img_ids, txt_ids=txt_ids).sample

            cond, uncond = call(text, pooled), call(torch.zeros_like(text), torch.zeros_like(pooled))
            x = x + (sigma_next - sigma) * (uncond + guidance * (cond - uncond))
    return x


LOOPS = {
    "zoo:dit": (dit_transformer, euler_batched_cfg, "batched-cond-first"),
    "flux": (lambda: tiny.build("flux").transformer, euler_separate_cfg, "separate-cond-first"),
}


def computed_steps(handle, transformer) -> list[int]:
    """Records the steps at which the last block's first sub-layer really ran."""
    acc = handle.transformers[0]
    _, _, block, contract = acc.spec.blocks(transformer)[-1]
    module = getattr(block, contract.sublayers[0].name)
    steps: list[int] = []
    module.register_forward_hook(lambda m, a, o: steps.append(acc.tracker.current.step) if acc.tracker.current else None)
    return steps


@pytest.mark.parametrize("loop", list(LOOPS))
@pytest.mark.parametrize("recipe", list(CACHING))
def test_every_caching_plugin_acts_in_a_declared_custom_loop(loop, recipe):
    build, run, cfg = LOOPS[loop]
    transformer = build()
    dense = run(transformer)
    handle = accelerate_dit(transformer, recipe, **CACHING[recipe])
    steps = computed_steps(handle, transformer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a declared loop has nothing to warn about...
        warnings.filterwarnings("ignore", message=".*magcache: no magnitude-ratio curve")  # ...but calibrating
        with handle.generation(num_steps=STEPS, cfg=cfg):
            run(transformer)  # magcache calibrates on this one
            steps.clear()
            out = run(transformer)
    assert torch.isfinite(out).all() and not torch.equal(out, dense)
    totals = handle.stats.totals()
    assert handle.stats.steps == STEPS
    assert totals["reused"] + totals["forecast"] + totals["partial"] > 0, handle.summary()
    if recipe in WITH_LAST_STEPS:
        assert STEPS - 1 in steps, f"{recipe} must compute the last step of a declared schedule: {steps}"
    assert handle.transformers[0].tracker.current is None
    remove_acceleration(transformer)
    assert torch.equal(run(transformer), dense)


@pytest.mark.parametrize("recipe", WITH_LAST_STEPS + ("cfg-share",))
def test_an_undeclared_custom_loop_says_what_it_cannot_do(recipe):
    transformer = dit_transformer()
    accelerate_dit(transformer, recipe, **CACHING[recipe])
    with pytest.warns(UserWarning, match=r"handle\.generation\(num_steps=N\)"):
        euler_batched_cfg(transformer)


def test_generation_declaration_validates_and_cleans_up_after_an_error():
    transformer = dit_transformer()
    handle = accelerate_dit(transformer, "fora")
    with pytest.raises(ValueError, match="num_steps = 0 is not allowed; allowed: a positive integer"):
        handle.begin(0)
    with pytest.raises(ValueError, match="cfg = 'both' is not allowed; allowed: batched-cond-first"):
        handle.begin(4, cfg="both")
    with pytest.raises(ValueError, match="num_steps = 3 but 4 timesteps"):
        handle.begin(3, timesteps=[4, 3, 2, 1])
    with pytest.raises(RuntimeError, match="boom"):
        with handle.generation(timesteps=list(range(STEPS))):
            euler_batched_cfg(transformer)
            raise RuntimeError("boom")
    tracker = handle.transformers[0].tracker
    assert tracker._declared_steps is None and tracker.current is None
    assert all(not p.store.entries for p in handle.transformers[0].plugins)
    # Two generations in one declaration: each is STEPS long and starts when the timestep jumps back up.
    with handle.generation(num_steps=STEPS):
        euler_batched_cfg(transformer)
        first = handle.stats.generation
        euler_batched_cfg(transformer, seed=1)
    assert handle.stats.generation == first + 1 and handle.stats.steps == STEPS
