"""magcache calibrations shipped with the zoo models (``weights/<name>/magcache-<steps>.json``, written by
``ditaccel calibrate --model zoo:<name> --steps 50``), so that ``ditaccel generate --model zoo:<name> --recipe
magcache`` skips from its only generation instead of spending it dense on a calibration.

The library itself never reaches for them (``accelerate_dit`` calibrates or takes ``ratios`` as given, and the
benchmarks calibrate on their own seed); the CLI applies them to magcache plugins that have no ``ratios``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from dit_accel.pipelines.zoo.pipelines import WEIGHTS
from dit_accel.recipe import Recipe


def shipped_calibration(name: str, steps: int = 50) -> Path | None:
    """The calibration file shipped for zoo model ``name`` at ``steps`` steps, if there is one."""
    path = WEIGHTS / name / f"magcache-{steps}.json"
    return path if path.is_file() else None


def with_shipped_calibration(recipe: Recipe, name: str) -> tuple[Recipe, Path | None]:
    """``recipe`` with the shipped calibration of zoo model ``name`` as the ``ratios`` of every magcache plugin that
    has none (another step count resamples it, with magcache's warning); the file used, or ``None`` if nothing
    changed."""
    from dit_accel.caching.magcache import MagCacheConfig

    path = shipped_calibration(name)
    if path is None or not any(isinstance(p, MagCacheConfig) and not p.ratios for p in recipe.plugins):
        return recipe, None
    plugins = tuple(dataclasses.replace(p, ratios=str(path)) if isinstance(p, MagCacheConfig) and not p.ratios else p
                    for p in recipe.plugins)
    return dataclasses.replace(recipe, plugins=plugins), path
