"""The prediction tensor inside a transformer's output, and the same output with another prediction: what plugins
that return an output without running the transformer (cfg-cache, magcache's skipped calls) build on."""

from __future__ import annotations

from typing import Any

import torch


def output_sample(output: Any) -> torch.Tensor:
    """The prediction tensor of a transformer output (a tensor, a tuple, or a diffusers output's first field)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    return next(iter(output.values()))


def with_sample(output: Any, sample: torch.Tensor) -> Any:
    """A new ``output`` of the same structure with its prediction replaced by ``sample``."""
    if isinstance(output, torch.Tensor):
        return sample
    if isinstance(output, (tuple, list)):
        return type(output)((sample, *output[1:]))
    first = next(iter(output.keys()))
    return type(output)(**{**output, first: sample})
