"""Run under ``torchrun --nproc_per_node=2``: fbcache on a tiny Flux transformer with Ulysses context parallelism.

Every rank records its skip decisions per step; rank 0 compares them across ranks and with the decisions of a
single-process run of the same model and writes the verdict as JSON to the path given as argv[1].
"""

import json
import sys

import torch
import torch.distributed as dist
from diffusers import ContextParallelConfig, FluxTransformer2DModel
from torch.distributed.device_mesh import init_device_mesh

from dit_accel import accelerate_dit

torch.set_num_threads(1)
STEPS = 8


def build():
    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                  axes_dims_rope=[4, 4, 8]).eval()


def inputs(step):
    generator = torch.Generator().manual_seed(123)
    rows, cols = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    return dict(hidden_states=torch.randn(1, 64, 4, generator=generator) * (1 + 0.05 * step),
                encoder_hidden_states=torch.randn(1, 8, 32, generator=generator),
                pooled_projections=torch.randn(1, 32, generator=generator),
                timestep=torch.tensor([1.0 - step / STEPS]),
                img_ids=torch.stack([torch.zeros(64), rows.flatten(), cols.flatten()], dim=-1),
                txt_ids=torch.zeros(8, 3), return_dict=False)


def run(model, threshold):
    handle = accelerate_dit(model, "fbcache", threshold=threshold, warmup_steps=1, last_steps=0, max_consecutive=0)
    handle.transformers[0].tracker.begin_generation(list(range(STEPS)))
    plugin = handle.transformers[0].plugins[0]
    decisions, outputs, changes = [], [], []
    for step in range(STEPS):
        before = handle.stats.totals()["reused"] if handle.stats else 0
        with torch.no_grad():
            outputs.append(model(**inputs(step))[0])
        decisions.append(int(handle.stats.totals()["reused"] > before))
        changes += [change for _, _, change in plugin.changes[len(changes):]]
    handle.remove()
    return decisions, torch.cat(outputs), changes


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    threshold = float(sys.argv[2])
    single_decisions, single_out, single_changes = run(build(), threshold)  # every rank, no parallelism
    torch.accelerator.device_count = lambda: 1  # diffusers computes rank % device_count, 0 on CPU
    model = build()
    mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("ring", "ulysses"))
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world, mesh=mesh))
    decisions, out, changes = run(model, threshold)
    gathered, gathered_changes = [None] * world, [None] * world
    dist.all_gather_object(gathered, decisions)
    dist.all_gather_object(gathered_changes, changes)
    if rank == 0:
        verdict = {"single": single_decisions, "ranks": gathered, "single_changes": single_changes,
                   "rank_changes": gathered_changes,
                   "max_abs_diff_to_single": float((out - single_out).abs().max())}
        with open(sys.argv[1], "w") as f:
            json.dump(verdict, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
