"""Run under ``torchrun --nproc_per_node=N``: patch-parallel on a tiny Flux transformer (or the zoo:mmdit pipeline,
or the tiny DiT, PixArt and SD3 pipelines).

``python -m torch.distributed.run --nproc_per_node=2 patch_parallel_run.py OUT.json [transformer|pipeline|families]``

``transformer`` (default): every rank runs the tiny transformer over a few steps single-process first (the
reference), then under patch-parallel with a warm-up covering every step (must be exact), with DistriFusion and
with PCPP after one warm-up step (stale K/V), and the refusals that need a real world (an attention plugin beside
it, diffusers parallelism already on, a grid whose rows do not split). ``pipeline``: the zoo:mmdit pipeline (Flux
architecture, true CFG as two calls) end to end: exact, DistriFusion, PCPP, and patch-parallel with fbcache.
``families``: the tiny DiT, PixArt-Sigma and SD3 pipelines, split with dit_accel's own plans (and taylorseer's
forecast check on tiny Flux, whose single blocks join the text every rank holds to the image shard). Every rank's verdict
goes to rank 0, which writes them as JSON.
"""

from __future__ import annotations

import json
import math
import sys

import torch
import torch.distributed as dist
from diffusers import FluxTransformer2DModel

from dit_accel import accelerate_dit

torch.set_num_threads(1)
STEPS = 4
ROWS, COLS = 8, 8


def build() -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                  axes_dims_rope=[4, 4, 8]).eval()


def inputs(step: int, rows: int = ROWS, cols: int = COLS) -> dict:
    generator = torch.Generator().manual_seed(123)
    grid_rows, grid_cols = torch.meshgrid(torch.arange(float(rows)), torch.arange(float(cols)), indexing="ij")
    # a smooth latent that drifts slowly over the steps, as a denoising trajectory does
    base = torch.randn(1, 4, rows, cols, generator=generator)
    base = torch.nn.functional.avg_pool2d(base, 3, 1, 1).flatten(2).transpose(1, 2)
    return dict(hidden_states=base * (1 + 0.05 * step),
                encoder_hidden_states=torch.randn(1, 8, 32, generator=generator),
                pooled_projections=torch.randn(1, 32, generator=generator), timestep=torch.tensor([1.0 - step / STEPS]),
                img_ids=torch.stack([torch.zeros(rows * cols), grid_rows.flatten(), grid_cols.flatten()], dim=-1),
                txt_ids=torch.zeros(8, 3), return_dict=False)


def run(model, recipe: str | None, **settings) -> tuple[torch.Tensor, object]:
    handle = accelerate_dit(model, recipe, **settings) if recipe else None
    if handle is not None:
        handle.transformers[0].tracker.begin_generation(list(range(STEPS)))
    with torch.no_grad():
        out = torch.cat([model(**inputs(step))[0] for step in range(STEPS)])
    plugin = handle.transformers[0].plugins[0] if handle is not None else None
    stats = None if plugin is None else {"bytes_by_step": plugin.bytes_by_step, "bytes_per_step": plugin.bytes_per_step,
                                         "fallbacks": dict(plugin.fallbacks)}
    if handle is not None:
        handle.remove()
    return out, stats


def psnr(out: torch.Tensor, ref: torch.Tensor) -> float:
    mse = float((out - ref).pow(2).mean())
    peak = float(ref.abs().max())
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


def refusal(action) -> str:
    try:
        action()
    except (ValueError, RuntimeError) as error:
        return str(error)
    return ""


def transformer_case() -> dict:
    model = build()
    reference, _ = run(model, None)
    exact, exact_stats = run(model, "patch-parallel", warmup_steps=STEPS)
    verdict = {"exact_max_abs_diff": float((exact - reference).abs().max()), "exact_stats": exact_stats,
               # one token's keys and values: batch 1 x 2 heads x (16 + 16) channels x 4 bytes; 2 attention layers
               "bytes_per_token": 1 * 2 * (16 + 16) * 4, "layers": 2, "grid": [ROWS, COLS]}
    for name, settings in {"distrifusion": dict(warmup_steps=1),
                           "pcpp": dict(warmup_steps=1, band=1, pool=4)}.items():
        recipe = "patch-parallel-pcpp" if name == "pcpp" else "patch-parallel"
        out, stats = run(model, recipe, **settings)
        verdict[name] = {"psnr": psnr(out, reference), "stats": stats}

    # refusals that need a real world of >= 2 processes
    verdict["refused_attention_plugin"] = refusal(lambda: accelerate_dit(build(), "patch-parallel+gna"))
    odd = build()
    handle = accelerate_dit(odd, "patch-parallel")
    verdict["refused_rows"] = refusal(lambda: odd(**inputs(0, rows=5, cols=8)))
    handle.remove()
    enabled = build()
    from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig
    enabled._parallel_config = ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=2))
    verdict["refused_enabled"] = refusal(lambda: accelerate_dit(enabled, "patch-parallel"))
    clean = build()
    handle = accelerate_dit(clean, "patch-parallel")
    handle.remove()
    verdict["removed_cleanly"] = (clean._parallel_config is None and not vars(clean).get("_diffusers_hook")
                                  and "forward" not in vars(clean.proj_out))
    return verdict


def pipeline_case(steps: int = 8) -> dict:
    from dit_accel.pipelines import zoo

    def generate(recipe: str | None, **settings) -> torch.Tensor:
        pipe = zoo.load("mmdit")
        handle = accelerate_dit(pipe, recipe, **settings) if recipe else None
        images = pipe(class_labels=[3], num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                      output_type="pt").images
        if handle is not None:
            handle.remove()
        return images

    reference = generate(None)
    exact = generate("patch-parallel", warmup_steps=steps)
    return {"exact_max_abs_diff": float((exact - reference).abs().max()),
            "distrifusion_psnr": psnr(generate("patch-parallel", warmup_steps=2), reference),
            "pcpp_psnr": psnr(generate("patch-parallel-pcpp", warmup_steps=2, band=1, pool=4), reference),
            "with_fbcache_psnr": psnr(generate("patch-parallel+fbcache", patch_parallel__warmup_steps=2), reference)}


def families_case(steps: int = 4) -> dict:
    """The families patch-parallel splits with dit_accel's own plan (diffusers has none for them): exact with a
    warm-up over every step, DistriFusion and PCPP close after one synchronous step; SD3 refuses a ControlNet's
    residuals over the whole grid."""
    from dit_accel.pipelines import tiny

    verdict = {}
    for name in ("dit", "pixart-sigma", "sd3"):
        def generate(recipe: str | None, **settings) -> torch.Tensor:
            pipe = tiny.build(name)
            handle = accelerate_dit(pipe, recipe, **settings) if recipe else None
            out = tiny.output_of(name, pipe(**tiny.default_call_kwargs(name, steps=steps)))
            patch = [p for p in handle.transformers[0].plugins if p.name == "patch-parallel"] if handle else []
            fallbacks = dict(patch[0].fallbacks) if patch else {}
            if handle is not None:
                handle.remove()
            return out, fallbacks

        reference, _ = generate(None)
        exact, fallbacks = generate("patch-parallel", warmup_steps=steps)
        verdict[name] = {"exact_max_abs_diff": float((exact - reference).abs().max()), "fallbacks": fallbacks,
                         "distrifusion_psnr": psnr(generate("patch-parallel", warmup_steps=1)[0], reference),
                         "pcpp_psnr": psnr(generate("patch-parallel-pcpp", warmup_steps=1, band=1, pool=2)[0],
                                           reference)}
        if name == "dit":  # batched CFG: caching plugins that slice or compare rows, deciding on split tokens
            # fora (interval 2, first step 1) attends at steps 0, 1 and 3: step 3 follows a step that reused the
            # attention, so patch-parallel exchanges synchronously there instead of attending to patches of step 1,
            # and after a two-step warm-up the output is one process's (0.0018 apart without that rule).
            alone, _ = generate("fora", interval=2, first_steps=1, last_steps=0)
            out, _ = generate("patch-parallel+fora", patch_parallel__warmup_steps=2, fora__interval=2,
                              fora__first_steps=1, fora__last_steps=0)
            verdict[name]["fora_after_reuse_max_abs_diff"] = float((out - alone).abs().max())
            caches = {"fbcache": dict(threshold=0.6, warmup_steps=1, last_steps=0), "cfg-cache": dict(start=0.25)}
            for cache, settings in caches.items():
                alone, _ = generate(cache, **settings)
                prefix = cache.replace("-", "_") + "__"
                out, _ = generate(f"patch-parallel+{cache}", patch_parallel__warmup_steps=steps,
                                  **{prefix + key: value for key, value in settings.items()})
                verdict[name][f"with_{cache}_max_abs_diff"] = float((out - alone).abs().max())
                verdict[name][f"with_{cache}_changed"] = float((alone - reference).abs().max())

    def flux(recipe: str | None, **settings) -> torch.Tensor:
        pipe = tiny.build("flux")
        handle = accelerate_dit(pipe, recipe, **settings) if recipe else None
        out = tiny.output_of("flux", pipe(**tiny.default_call_kwargs("flux", steps=10)))
        if handle is not None:
            handle.remove()
        return out

    # Flux's single blocks attend over [text, image shard]: taylorseer's forecast check sums over both, and the text
    # every rank holds must count once (each rank adding its copy put the output 7e-4 from one process's).
    alone = flux("taylorseer-fast")
    out = flux("patch-parallel+taylorseer-fast", patch_parallel__warmup_steps=10)
    verdict["flux_taylorseer"] = {"max_abs_diff": float((out - alone).abs().max()),
                                  "changed": float((alone - flux(None)).abs().max())}
    pipe = tiny.build("sd3")
    handle = accelerate_dit(pipe, "patch-parallel")
    latent = torch.randn(1, pipe.transformer.config.in_channels, 8, 8)
    verdict["sd3_refused_controlnet"] = refusal(lambda: pipe.transformer(
        hidden_states=latent, encoder_hidden_states=torch.randn(1, 4, pipe.transformer.config.joint_attention_dim),
        pooled_projections=torch.randn(1, pipe.transformer.config.pooled_projection_dim), timestep=torch.tensor([1.0]),
        block_controlnet_hidden_states=[torch.zeros(1, 16, pipe.transformer.inner_dim)]))
    handle.remove()
    return verdict


CASES = {"transformer": transformer_case, "pipeline": pipeline_case, "families": families_case}


def main() -> None:
    dist.init_process_group("gloo")
    verdict = CASES[sys.argv[2] if len(sys.argv) > 2 else "transformer"]()
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, verdict)
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump({"ranks": gathered}, f, default=str)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
