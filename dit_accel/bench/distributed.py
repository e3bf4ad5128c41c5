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


__all__ = ["Ranks", "launched_distributed"]
