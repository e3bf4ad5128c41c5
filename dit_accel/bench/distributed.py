"""Data-parallel benchmark runs: the quality samples split across processes, gathered, metrics computed once.

Launch ``ditaccel bench`` under several processes with ``--processes N`` (it relaunches itself under torchrun),
accelerate or torchrun, one process per GPU (or several CPU processes, gloo)::

    ditaccel bench --processes 2 --recipes none,fora -o results
    accelerate launch --multi_gpu --num_processes 4 -m dit_accel.cli.app bench --recipes none,fora -o results
    torchrun --nproc_per_node 2 -m dit_accel.cli.app bench --recipes none,fora -o results   # CPU: gloo

How the work is split, so that the rows equal those of a one-process run:

* the unit is the quality chunk (``batch`` samples on seed ``seed + k``): process ``r`` of ``n`` generates the
  chunks ``k`` with ``k % n == r``, on exactly the seeds and batch composition a single process would use, and the
  chunks are gathered back in order of ``k`` on every process;
* the metrics (PSNR/SSIM against the dense run, fd, class consistency, FID, CLIP) are computed once, on the main
  process, over all samples; only the main process writes ``rows.jsonl`` and the reports;
* latency is timed on the main process alone while the others wait at a barrier: it is the latency of one pipeline,
  undisturbed by the other processes' generations (on a shared CPU they would compete for cores).

The other way to use several processes, ``--parallel``, splits each generation instead (every process takes part
in every one); :func:`parallel_setting` reads which setting a run is under, so that its rows record it.
"""

from __future__ import annotations

import os
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def launched_distributed() -> bool:
    """Whether this process was started by a multi-process launcher (torchrun, ``accelerate launch``, mpirun)."""
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        try:
            if int(os.environ.get(name, "1")) > 1:
                return True
        except ValueError:
            pass
    return False


class Ranks:
    """This process's place in a data-parallel run; a single process is rank 0 of 1 and never touches
    ``torch.distributed``."""

    def __init__(self) -> None:
        self._state: Any = None
        if launched_distributed():
            from accelerate import PartialState

            # accelerate picks gloo on CPU only when asked for the CPU explicitly.
            self._state = PartialState(cpu=not torch.cuda.is_available())
        self.index = self._state.process_index if self._state is not None else 0
        self.count = self._state.num_processes if self._state is not None else 1

    @property
    def is_main(self) -> bool:
        return self.index == 0

    @property
    def device(self) -> torch.device | None:
        """The device accelerate assigned to this process in a multi-GPU run (``cuda:<local rank>``), else None."""
        if self._state is None or self._state.device.type == "cpu":
            return None
        return self._state.device

    def owns(self, chunk: int) -> bool:
        """Whether this process generates quality chunk ``chunk``."""
        return chunk % self.count == self.index

    def gather(self, items: list[T]) -> list[T]:
        """Every process's ``items`` (picklable; tensors on the CPU), concatenated in rank order, on every
        process."""
        if self.count == 1:
            return list(items)
        from accelerate.utils import gather_object

        return gather_object(list(items))

    def broadcast(self, value: T) -> T:
        """The main process's ``value``, on every process."""
        if self.count == 1:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value], from_process=0)[0]

    def barrier(self) -> None:
        if self.count > 1:
            self._state.wait_for_everyone()

    def __repr__(self) -> str:
        return f"Ranks(index={self.index}, count={self.count})"


# ------------------------------------------------------------------------------------------ split generations
# How one generation may be split over processes (``--parallel``); a setting is {"kind": ..., "degree": N >= 2}.
PARALLEL_KINDS = ("ulysses", "ring", "ulysses+ring", "tensor", "patch")


def check_parallel(value: Any) -> dict[str, Any] | None:
    """``value`` as a parallel setting, ``{"kind": kind, "degree": N}`` or ``None`` (one process); ValueError
    saying what is allowed otherwise."""
    if value is None:
        return None
    ok = (isinstance(value, dict) and set(value) == {"kind", "degree"} and value["kind"] in PARALLEL_KINDS
          and isinstance(value["degree"], int) and not isinstance(value["degree"], bool) and value["degree"] >= 2)
    if not ok:
        raise ValueError(f"parallel = {value!r} is not a parallel setting; allowed: None (one process per "
                         f"generation) or {{'kind': K, 'degree': N}} with K one of {', '.join(PARALLEL_KINDS)} and "
                         "an integer N >= 2")
    return {"kind": value["kind"], "degree": value["degree"]}


def parallel_setting(pipe: Any, recipes: list[Any]) -> dict[str, Any] | None:
    """The setting every generation of ``pipe`` is split under, as ``ditaccel bench --parallel`` leaves it before
    the harness runs: diffusers' context (or tensor) parallelism enabled on a transformer of ``pipe``, or a
    ``patch-parallel`` plugin in one of ``recipes`` (:class:`~dit_accel.recipe.Recipe`) in an initialised
    ``torch.distributed`` world of N > 1 processes; ``None`` when each generation runs in one process."""
    for name in ("transformer", "transformer_2"):
        config = getattr(getattr(pipe, name, None), "_parallel_config", None)
        context = getattr(config, "context_parallel_config", None)
        if context is not None:
            ulysses, ring = context.ulysses_degree or 1, context.ring_degree or 1
            if ulysses > 1 or ring > 1:
                kind = "ulysses+ring" if ulysses > 1 and ring > 1 else "ring" if ring > 1 else "ulysses"
                return {"kind": kind, "degree": ulysses * ring}
        degree = getattr(getattr(config, "tensor_parallel_config", None), "tp_degree", None) or 1
        if degree > 1:
            return {"kind": "tensor", "degree": degree}
    if any(plugin.type_name == "patch-parallel" for recipe in recipes for plugin in recipe.plugins):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return {"kind": "patch", "degree": dist.get_world_size()}
    return None


__all__ = ["PARALLEL_KINDS", "Ranks", "check_parallel", "launched_distributed", "parallel_setting"]
