"""What ``ditaccel tune`` searches and for what: each plugin's speed knob and its coarse grid, the quality target
(``psnr>=30``), a candidate setting with what it measured, and the result of a search. The search itself is
:mod:`dit_accel.bench.tune`."""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass, field
from typing import Any

# plugin type -> (field, coarse grid from conservative to aggressive)
KNOBS: dict[str, tuple[str, list[Any]]] = {
    "fora": ("interval", [2, 3, 4, 5, 6, 8]),
    "taylorseer": ("interval", [2, 3, 4, 5, 6, 8]),
    "toca": ("interval", [2, 3, 4, 6]),
    "delta-dit": ("interval", [2, 3, 4, 5, 7]),
    "fbcache": ("threshold", [0.05, 0.1, 0.2, 0.3, 0.5]),
    "magcache": ("threshold", [0.03, 0.06, 0.1, 0.16, 0.24, 0.35, 0.5]),
    "todo": ("factor", [2, 3, 4]),
    "cfg-share": ("start", [0.8, 0.6, 0.4, 0.2, 0.0]),
    "speca": ("threshold", [0.05, 0.1, 0.2, 0.3, 0.5, 1.0]),  # higher accepts more drafts
    "cfg-cache": ("interval", [2, 3, 4, 5, 8]),  # stacked (magcache+cfg-cache) the two grids combine
    "clusca": ("interval", [3, 4, 5, 6]),
    "freqca": ("interval", [3, 4, 6, 8]),
    "gna": ("coverage", [0.6, 0.5, 0.35, 0.25]),  # window side / grid side: a quarter of it keeps 1/16 of the keys
    "svg2": ("top_p", [0.95, 0.9, 0.8, 0.6]),  # softmax mass of the key clusters each query cluster keeps
    "psa": ("bound_scale", [1.0, 0.8, 0.6, 0.4]),  # scales every cumulative bound < 1: coarser levels, fewer keys
}
# plugin type -> (field, values): searched as an outer loop around the speed knob (each value gets its own search)
SECONDARY_KNOBS: dict[str, tuple[str, list[Any]]] = {
    "taylorseer": ("order", [1, 2]),
    "magcache": ("forecast_order", [1, 0]),
}
DEFAULT_RECIPES = ["fora", "taylorseer", "fbcache", "magcache"]
METRICS = {"psnr": "higher", "ssim": "higher", "class_consistency": "higher", "fd": "lower", "rel_l1": "lower",
           "class_consistency_change": "higher"}  # paired against dense on the same seeds: >= -0.02, say
ZOO_ONLY_METRICS = ("fd", "class_consistency", "class_consistency_change")
_OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}


@dataclass(frozen=True)
class Target:
    metric: str
    op: str
    value: float

    def met(self, metrics: dict[str, Any]) -> bool:
        value = metrics.get(self.metric)
        return value is not None and _OPS[self.op](value, self.value)

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"


def parse_target(text: str) -> Target:
    """``"psnr>=30"``, ``"fd<=12.5"``, ``"ssim>0.9"`` -> a :class:`Target`; ValueError otherwise."""
    match = re.fullmatch(r"\s*([a-z_0-9]+)\s*(>=|<=|>|<)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*", text)
    if not match or match.group(1) not in METRICS:
        raise ValueError(f"--target {text!r}: expected METRIC>=VALUE or METRIC<=VALUE with METRIC one of "
                         f"{', '.join(METRICS)} (e.g. psnr>=30, fd<=10)")
    metric, op, value = match.group(1), match.group(2), float(match.group(3))
    if (METRICS[metric] == "higher") != (op in (">=", ">")):
        raise ValueError(f"--target {text!r}: {metric} is better when {METRICS[metric]}; write "
                         f"{metric}{'>=' if METRICS[metric] == 'higher' else '<='}{value:g}")
    return Target(metric, op, value)


@dataclass
class Candidate:
    recipe: Any
    settings: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    flops_fraction: float = 1.0
    seconds: float = 0.0

    def describe(self) -> str:
        return self.recipe.name + "(" + ", ".join(f"{k}={v}" for k, v in self.settings.items()) + ")"


@dataclass
class TuneResult:
    target: Target
    best: Candidate | None
    candidates: list[Candidate]
    holdout: dict[str, Any] | None = None
    budget_exhausted: bool = False
    recipe: Any = None

    def to_dict(self) -> dict[str, Any]:
        """Everything measured, JSON-ready (infinite PSNR as the string ``"inf"``): the target, each candidate's
        settings, FLOPs fraction, calibration seconds and metrics, the winner and its held-out check."""
        def clean(value: Any) -> Any:
            if isinstance(value, float) and math.isinf(value):
                return "inf" if value > 0 else "-inf"
            if isinstance(value, dict):
                return {k: clean(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return [clean(v) for v in value]
            return value

        def candidate(c: Candidate) -> dict[str, Any]:
            return {"recipe": c.recipe.name, "settings": c.settings, "flops_fraction": c.flops_fraction,
                    "seconds": c.seconds, "metrics": c.metrics, "meets": self.target.met(c.metrics)}

        return clean({"target": str(self.target), "budget_exhausted": self.budget_exhausted,
                      "candidates": [candidate(c) for c in self.candidates],
                      "best": candidate(self.best) if self.best else None,
                      "recipe": self.recipe.to_dict() if self.recipe is not None else None,
                      "holdout": self.holdout})


def knobs_of(recipe: Any) -> list[tuple[str, list[Any]]]:
    """``(override key, coarse grid)`` for each tunable plugin of ``recipe``."""
    found = []
    for plugin in recipe.plugins:
        if plugin.type_name in KNOBS:
            name, grid = KNOBS[plugin.type_name]
            key = name if sum(name in p.field_names() for p in recipe.plugins) == 1 else \
                f"{plugin.type_name.replace('-', '_')}__{name}"
            found.append((key, grid))
    return found


def _between(low: Any, high: Any) -> list[Any]:
    """Values strictly between two neighbouring grid values (integers: all of them; floats: two bisections)."""
    if isinstance(low, int) and isinstance(high, int):
        step = 1 if high > low else -1
        return list(range(low + step, high, step))
    middle = round((low + high) / 2, 4)
    return [round((low + middle) / 2, 4), middle, round((middle + high) / 2, 4)]
