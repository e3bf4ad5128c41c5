"""Run under ``torchrun --nproc_per_node=2`` (gloo, CPU): every plugin on a tiny Flux transformer under sequence
parallelism. Writes a JSON verdict (rank 0) to argv[1]; argv[2:] picks sections (default: all):

* ``ulysses`` / ``ring`` / ``patch``: every caching plugin (``patch``: those patch-parallel combines with) over a
  few steps of true CFG (two calls per step); each rank records per step what the stats saw (computed, reused,
  forecast, partial, blocks skipped, FLOPs, plugin notes), and the output; the same runs on one process give the
  reference. ``ring`` needs an attention op that returns the log-sum-exp, which diffusers' native backend lacks on
  CPU: a float64 one is put in for this script only.
* ``attention``: every attention plugin but int8 (no CPU kernel) under Ulysses, against its one-process output.
* ``refusals``: combinations that must raise ``ValueError``, with the text their error must hold.
* ``first_block_split``: the tiny Wan pipeline, whose plan splits its first block's input: fbcache, fora and
  magcache under Ulysses and under patch-parallel, against one process.
"""

from __future__ import annotations

import json
import sys
import warnings

import torch
import torch.distributed as dist
from diffusers import ContextParallelConfig, FluxTransformer2DModel
from diffusers.models import attention_dispatch
from torch.distributed.device_mesh import init_device_mesh

from dit_accel import accelerate_dit
from dit_accel.recipe import Recipe, config_types

torch.set_num_threads(1)
warnings.simplefilter("ignore")
STEPS, HEIGHT, WIDTH, TEXT = 8, 16, 16, 8

CACHING = {
    "fora": dict(interval=2, first_steps=1, last_steps=1),
    "taylorseer": dict(interval=2, first_steps=2, order=1),
    "fbcache": dict(threshold=0.3, warmup_steps=1, last_steps=0, max_consecutive=0),
    "delta-dit": dict(interval=2, first_steps=1),
    "cfg-share": dict(start=0.5),
    "cfg-cache": dict(start=0.25, interval=2, weighting="frequency"),
    "toca": dict(interval=2, mlp_ratio=0.25, first_steps=1),
    "magcache": dict(threshold=0.5, retention=0.2),
    "speca": dict(threshold=0.3, first_steps=2, min_drafts=0),
    "clusca": dict(interval=2, clusters=4, first_steps=2),
    "freqca": dict(interval=2, first_steps=2, cutoff=0.3),
}
GENERATIONS = {"magcache": 2}  # the first calibrates (dense), the second decides from the all-reduced curve
ATTENTION = {
    "hilbert": dict(tile_size=16, neighbours=0),
    "proxy": dict(),
    "gna": dict(kernel=5),
    "svg2": dict(q_cluster_tokens=32, k_cluster_tokens=16, top_p=0.5),
    "psa": dict(block=16),
    "todo": dict(),
    "window-residual": dict(tile_size=16, neighbours=0, interval=2, first_steps=1),
}


def build() -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                  axes_dims_rope=[4, 4, 8]).eval()


def inputs(step: int, branch: int) -> dict:
    generator = torch.Generator().manual_seed(123)
    rows, cols = torch.meshgrid(torch.arange(float(HEIGHT)), torch.arange(float(WIDTH)), indexing="ij")
    hidden = torch.randn(1, HEIGHT * WIDTH, 4, generator=generator) * (1 + 0.05 * step)
    text = torch.randn(2, TEXT, 32, generator=generator)[branch:branch + 1]  # cond, then uncond
    return dict(hidden_states=hidden, encoder_hidden_states=text, pooled_projections=torch.randn(1, 32, generator=generator),
                timestep=torch.tensor([1.0 - step / STEPS]),
                img_ids=torch.stack([torch.zeros(HEIGHT * WIDTH), rows.flatten(), cols.flatten()], dim=-1),
                txt_ids=torch.zeros(TEXT, 3), return_dict=False)


def recipe(*items: tuple[str, dict]) -> Recipe:
    types = config_types()
    return Recipe(plugins=tuple(types[name](**settings) for name, settings in items))


def run(model, items: tuple, generations: int = 1) -> tuple[list, torch.Tensor]:
    """Per step of the last generation, what the stats saw; and the outputs of every call, concatenated."""
    handle = accelerate_dit(model, recipe(*items))
    try:
        for _ in range(generations):
            steps, outputs = [], []
            with handle.generation(num_steps=STEPS, cfg="separate-cond-first"):
                for step in range(STEPS):
                    for branch in (0, 1):
                        with torch.no_grad():
                            outputs.append(model(**inputs(step, branch))[0])
                    current = handle.transformers[0].stats.current
                    steps.append([current.totals(), current.blocks_skipped, round(current.flops_fraction, 6),
                                  {k: round(v, 6) for k, v in sorted(current.notes.items())}])
        return steps, torch.cat(outputs)
    finally:
        handle.remove()


def lse_forward_op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
    """Attention with its log-sum-exp (what ring attention merges chunks by), in float64; (B, S, H, D) layout."""
    q, k, v = (x.permute(0, 2, 1, 3).double() for x in (query, key, value))
    scores = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    lse = scores.logsumexp(-1)
    out = ((scores - lse[..., None]).exp() @ v).permute(0, 2, 1, 3).to(query.dtype)
    lse = lse.permute(0, 2, 1).float()
    return (out, lse) if return_lse else out


def parallel_model(kind: str, world: int) -> FluxTransformer2DModel:
    model = build()
    if kind == "patch":
        return model
    shape = (world, 1) if kind == "ring" else (1, world)
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=("ring", "ulysses"))
    degree = {"ring_degree": world} if kind == "ring" else {"ulysses_degree": world}
    model.enable_parallelism(config=ContextParallelConfig(mesh=mesh, **degree))
    return model


def compare(single: tuple, parallel: tuple, world: int) -> dict:
    steps, out = parallel
    gathered = [None] * world
    dist.all_gather_object(gathered, steps)
    # FLOPs stay out of the comparison with one process: the work outside the sub-layers is measured by what ran,
    # which on a rank is its shard's share.
    decisions = [[s[0], s[1], s[3]] for s in steps]
    return {"ranks_agree": all(g == gathered[0] for g in gathered),
            "same_as_single": decisions == [[s[0], s[1], s[3]] for s in single[0]],
            "acted": any(s[0]["reused"] + s[0]["forecast"] + s[0]["partial"] + s[1] for s in single[0])
            or any(s[3] for s in single[0]),
            "max_abs_diff": float((out - single[1]).abs().max()), "steps": steps, "single_steps": single[0]}


def caching_section(kind: str, world: int) -> dict:
    names = [n for n in CACHING if not (kind in ("ring", "patch") and n == "cfg-share")]  # refused there
    model = parallel_model(kind, world)
    exact_patch = ("patch-parallel", {"warmup_steps": STEPS})  # synchronous every step: exact
    results = {}
    for name in names:
        items = ((name, CACHING[name]),) + ((exact_patch,) if kind == "patch" else ())
        generations = GENERATIONS.get(name, 1)
        single = run(build(), ((name, CACHING[name]),), generations)
        results[name] = compare(single, run(model, items, generations), world)
    return results


def attention_section(world: int) -> dict:
    model = parallel_model("ulysses", world)
    results = {}
    for name, settings in ATTENTION.items():
        single = run(build(), ((name, settings),))
        results[name] = compare(single, run(model, ((name, settings),)), world)
    return results


def refusal(make_model, items: tuple) -> str:
    try:
        handle = accelerate_dit(make_model(), recipe(*items))
    except ValueError as error:
        return str(error)
    handle.remove()
    return ""


def refusals_section(world: int) -> dict:
    ring = lambda: parallel_model("ring", world)  # noqa: E731 - installs only: no forward runs
    ulysses = lambda: parallel_model("ulysses", world)  # noqa: E731
    patch = ("patch-parallel", {})
    return {
        "hilbert@ring": refusal(ring, (("hilbert", {}),)),
        "int8@ring": refusal(ring, (("int8", {}),)),
        "cfg-share@ring": refusal(ring, (("cfg-share", {}),)),
        "toca-attention@ulysses": refusal(ulysses, (("toca", {"attention_ratio": 0.5}),)),
        "gna@patch": refusal(build, (patch, ("gna", {}))),
        "cfg-share@patch": refusal(build, (patch, ("cfg-share", {}))),
    }


def first_block_split_section(world: int) -> dict:
    """Wan's plan splits its first block's input (not the model's): the caches' block hooks must see the block's
    share of the sequence under Ulysses and under patch-parallel registered before them, as on one process."""
    from dit_accel.pipelines import tiny
    from dit_accel.recipe import load_recipe

    caches = {"fbcache": dict(threshold=0.5, warmup_steps=1, last_steps=0), "fora": dict(interval=2),
              "magcache": dict(threshold=0.5, retention=0.2)}

    def generate(name: str, kind: str | None) -> torch.Tensor:
        pipe = tiny.build("wan")
        if kind == "ulysses":
            mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("ring", "ulysses"))
            pipe.transformer.enable_parallelism(config=ContextParallelConfig(mesh=mesh, ulysses_degree=world))
        cache = load_recipe(name, **caches[name])
        handle = accelerate_dit(pipe, load_recipe("patch-parallel", warmup_steps=100) + cache if kind == "patch"
                                else cache)
        for _ in range(GENERATIONS.get(name, 1)):
            out = tiny.output_of("wan", pipe(**tiny.default_call_kwargs("wan", steps=6)))
        acted = any(t.stats.last.totals()["computed"] < t.stats.last.totals()["calls"]
                    for t in handle.transformers)
        handle.remove()
        return out, acted

    results = {}
    for name in caches:
        single, acted = generate(name, None)
        for kind in ("ulysses", "patch"):
            out, _ = generate(name, kind)
            results[f"{name}@{kind}"] = {"max_abs_diff": float((out - single).abs().max()), "acted": acted}
    return results


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.accelerator.device_count = lambda: 1  # diffusers computes rank % device_count, 0 on CPU
    sections = sys.argv[2:] or ["ulysses", "ring", "patch", "attention", "refusals", "first_block_split"]
    verdict = {}
    for section in sections:
        if section == "attention":
            verdict[section] = attention_section(world)
        elif section == "first_block_split":
            verdict[section] = first_block_split_section(world)
        elif section == "refusals":
            verdict[section] = refusals_section(world)
        else:
            original = attention_dispatch._native_attention_forward_op
            if section == "ring":
                attention_dispatch._native_attention_forward_op = lse_forward_op
            try:
                verdict[section] = caching_section(section, world)
            finally:
                attention_dispatch._native_attention_forward_op = original
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(verdict, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
