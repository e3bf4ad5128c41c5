"""Timing: medians and spreads of repeated runs, and the transformer-only share of a pipeline call."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
import torch


@dataclass(frozen=True)
class Timing:
    median: float
    q1: float
    q3: float
    runs: int

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1


def summarize(seconds: list[float]) -> Timing:
    if not seconds:
        raise ValueError("no timings to summarize")
    if len(seconds) == 1:
        return Timing(seconds[0], seconds[0], seconds[0], 1)
    q1, median, q3 = statistics.quantiles(seconds, n=4, method="inclusive")
    return Timing(median, q1, q3, len(seconds))


def synchronize(device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TransformerTimer:
    """Wall time spent in a module's forward, measured by outer torch hooks (outside any hook of ours)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.total = 0.0
        self._start = 0.0
        self._device = next(module.parameters()).device
        self._handles = [module.register_forward_pre_hook(self._pre), module.register_forward_hook(self._post)]

    def _pre(self, *args) -> None:
        synchronize(self._device)
        self._start = time.perf_counter()

    def _post(self, *args) -> None:
        synchronize(self._device)
        self.total += time.perf_counter() - self._start

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

