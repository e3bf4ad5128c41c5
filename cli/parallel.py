"""``--parallel ulysses=N | ring=N | patch=N`` of ``ditaccel generate`` and ``ditaccel bench``: one generation split
over N processes on this machine (one per GPU; on the CPU, gloo processes).

The command relaunches itself under torchrun with N workers, as ``--processes`` does (:func:`relaunch_command`);
every worker loads the pipeline, runs the same seeds, and

* ``ulysses``/``ring``: splits the transformer's token sequence with diffusers' context parallelism
  (``transformer.enable_parallelism(ContextParallelConfig(...))``, before the recipe is applied);
* ``patch``: adds the ``patch-parallel`` plugin (displaced patch parallelism) to the recipe.

Rank 0 writes the image / the bench rows; the others compute their share of every generation and say nothing.
Which plugins combine with which setting: the README's "Parallelism" table (and :mod:`dit_accel.core.parallel`).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

KINDS = ("ulysses", "ring", "patch")
# Backends of diffusers' attention dispatcher that return the log-sum-exp ring attention merges its chunks by.
RING_BACKENDS = ("flash", "flash_hub", "_flash_3_hub", "_native_cudnn", "_native_flash", "sage")


@dataclass(frozen=True)
class Parallel:
    """A parsed ``--parallel`` value: the kind and the number of processes."""

    kind: str
    processes: int

    def __str__(self) -> str:
        return f"{self.kind}={self.processes}"


def parse_parallel(text: str) -> Parallel:
    """``"ulysses=2"`` -> ``Parallel("ulysses", 2)``; ValueError naming what is allowed otherwise."""
    kind, sep, value = text.strip().partition("=")
    kind = kind.strip().lower()
    allowed = "ulysses=N, ring=N or patch=N with N >= 2 processes (e.g. --parallel ulysses=2)"
    if not sep or kind not in KINDS:
        raise ValueError(f"--parallel {text!r} is not a parallel setting; allowed: {allowed}")
    try:
        processes = int(value.strip())
    except ValueError:
        raise ValueError(f"--parallel {text!r}: {value.strip()!r} is not a number of processes; allowed: "
                         f"{allowed}") from None
    if processes < 2:
        raise ValueError(f"--parallel {text!r}: {processes} process(es) split nothing; allowed: {allowed}")
    return Parallel(kind, processes)


def check_combination(parallel: Parallel | None, processes: int) -> None:
    """``--parallel`` and ``--processes N > 1`` both launch the processes: refuse the pair."""
    if parallel is not None and processes > 1:
        raise ValueError(f"--parallel {parallel} and --processes {processes} cannot be combined: --processes splits "
                         "the samples across processes (data parallel), --parallel splits each generation; pick one")


def relaunch_command(processes: int, argv: list[str], drop: tuple[str, ...] = ("--processes",)) -> list[str]:
    """The torchrun command that runs this CLI again with ``processes`` workers; options in ``drop`` (and their
    values) are left out, everything else (``--parallel`` included: the workers need it) is kept."""
    args, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in drop:
            skip = True
        elif not any(arg.startswith(option + "=") for option in drop):
            args.append(arg)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            "-m", "dit_accel.cli.app", *args]


def relaunch(processes: int, argv: list[str], drop: tuple[str, ...] = ("--processes",)) -> int:
    """Run :func:`relaunch_command`; its exit code."""
    return subprocess.run(relaunch_command(processes, argv, drop)).returncode


# ------------------------------------------------------------------------------------------- inside a worker
def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def worker_device(device: str) -> torch.device:
    """This worker's device: ``cuda:<LOCAL_RANK>`` for ``auto``/``cuda`` on a GPU machine, else what was asked."""
    if device in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu" if device == "auto" else device)


def init_workers(parallel: Parallel, device: torch.device) -> None:
    """Join the process group of this torchrun launch (NCCL on GPUs, gloo on the CPU); ValueError when the launch
    has another number of processes than ``--parallel`` asks for."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != parallel.processes:
        raise ValueError(f"--parallel {parallel} needs {parallel.processes} processes but this launch has "
                         f"{world}; run the command without a launcher (it starts the processes itself), or launch "
                         f"{parallel.processes}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


@contextlib.contextmanager
def _one_device_per_cpu_process(device: torch.device) -> Iterator[None]:
    """diffusers picks a process's device as ``rank % torch.accelerator.device_count()``, which divides by zero on
    a machine without an accelerator: count the CPU as one device while parallelism is enabled."""
    accelerator = getattr(torch, "accelerator", None)
    if device.type != "cpu" or accelerator is None or accelerator.device_count() > 0:
        yield
        return
    original = accelerator.device_count
    accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        accelerator.device_count = original


def _backend(transformer: torch.nn.Module) -> str:
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    for module in transformer.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_attention_backend"):
            backend = processor._attention_backend
            return str(getattr(backend, "value", backend) or _AttentionBackendRegistry.get_active_backend()[0].value)
    return "native"


def enable_context_parallel(transformer: torch.nn.Module, parallel: Parallel, device: torch.device) -> None:
    """diffusers' Ulysses or ring context parallelism over every process of the launch, on ``transformer``; a
    ValueError naming the problem for a model without ``_cp_plan`` or, for ring, an attention backend that returns
    no log-sum-exp (diffusers' native SDPA path, the only one on the CPU)."""
    import torch.distributed as dist
    from diffusers import ContextParallelConfig

    name = type(transformer).__name__
    if getattr(transformer, "_cp_plan", None) is None:
        from dit_accel.parallel.plans import OWN_PLANS

        patch = (f"use --parallel patch={parallel.processes} (patch-parallel splits {name} with dit_accel's own plan), "
                 if name in OWN_PLANS else "")
        raise ValueError(f"--parallel {parallel}: {name} has no diffusers context-parallel plan (_cp_plan), so its "
                         "sequence cannot be split; models with one: Flux, Wan, LTX-Video, Qwen-Image (and Flux2, "
                         f"ChronoEdit, ...); {patch}run it without --parallel (or with --processes N for data "
                         "parallelism)")
    if parallel.kind == "ring":
        backend = _backend(transformer)
        if backend not in RING_BACKENDS:
            dtype = next(transformer.parameters()).dtype
            if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
                raise ValueError(
                    f"--parallel {parallel}: ring attention merges key chunks by their log-sum-exp, which the "
                    f"'{backend}' attention backend does not return (it needs CUDA and fp16/bf16 weights; here: "
                    f"{device.type}, {str(dtype).replace('torch.', '')}); use --parallel ulysses={parallel.processes}")
            transformer.set_attention_backend("_native_cudnn")
    world = dist.get_world_size()
    shape = (world, 1) if parallel.kind == "ring" else (1, world)
    mesh = dist.device_mesh.init_device_mesh(device.type, shape, mesh_dim_names=("ring", "ulysses"))
    degree = {"ring_degree": world} if parallel.kind == "ring" else {"ulysses_degree": world}
    with _one_device_per_cpu_process(device):
        transformer.enable_parallelism(config=ContextParallelConfig(mesh=mesh, **degree))


def prepare_pipeline(pipe: Any, parallel: Parallel, device: torch.device) -> None:
    """Move ``pipe`` to this worker's device and split its transformer(s) (``ulysses``/``ring``; ``patch`` is a
    plugin of the recipe, see :func:`with_patch`)."""
    pipe.to(device)
    if parallel.kind == "patch":
        return
    transformers = [t for t in (getattr(pipe, "transformer", None), getattr(pipe, "transformer_2", None))
                    if t is not None]
    if not transformers:
        raise ValueError(f"--parallel {parallel}: {type(pipe).__name__} has no transformer to split")
    for transformer in transformers:
        enable_context_parallel(transformer, parallel, device)


def with_patch(recipe: Any, parallel: Parallel) -> Any:
    """``recipe`` plus the ``patch-parallel`` plugin (``--parallel patch=N``)."""
    from dit_accel.recipe import load_recipe

    if any(p.type_name == "patch-parallel" for p in recipe.plugins):
        raise ValueError(f"--parallel {parallel}: recipe {recipe.name!r} already holds patch-parallel; drop one")
    return recipe + load_recipe("patch-parallel")


def patch_items(items: list[str], parallel: Parallel) -> list[str]:
    """``ditaccel bench`` recipe items with ``+patch-parallel`` composed in (``fora@interval=4`` ->
    ``fora+patch-parallel@interval=4``); recipe files are refused (list the plugin in the file instead)."""
    out = []
    for item in items:
        name, sep, settings = item.partition("@")
        if name.strip().endswith(".toml"):
            raise ValueError(f"--parallel {parallel} composes patch-parallel into each recipe, which a recipe file "
                             f"{name.strip()!r} cannot take from the command line; add [[plugins]] type = "
                             "\"patch-parallel\" to the file and run it without --parallel patch")
        if "patch-parallel" in name.split("+"):
            raise ValueError(f"--parallel {parallel}: recipe {name.strip()!r} already holds patch-parallel; drop one")
        out.append(f"{name.strip()}+patch-parallel{sep}{settings}")
    return out


def finish_workers() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


__all__ = ["KINDS", "Parallel", "check_combination", "enable_context_parallel", "finish_workers", "init_workers",
           "parse_parallel", "patch_items", "prepare_pipeline", "rank", "relaunch", "relaunch_command",
           "with_patch", "worker_device"]
