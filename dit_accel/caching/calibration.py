"""Persisted magcache calibrations: a magnitude-ratio curve per branch role, keyed by model identity and step
count, stored as a small JSON file or inline in a recipe's ``ratios``.

A calibration is a mapping::

    {"format": 1, "model": "DiTTransformer2DModel/3f2a9c1b07de", "steps": 50,
     "curves": {"cond": [1.0, 1.02, ...], "uncond": [1.0, 0.99, ...]}}

It may also hold ``"schedules"``: searched computed-step schedules of magcache (``{"14": [0, 1, 2, 4, ...]}``,
keyed by how many steps compute, at ``steps`` steps), written by ``ditaccel calibrate --search-schedule`` (see
:mod:`dit_accel.caching.schedule_search`).

``model`` is :func:`model_identity` of the transformer it was measured on (the class, the config, the parameter
names and shapes, and a few weights' magnitudes: a different checkpoint of the same architecture gets another
identity, the same weights in another dtype or on another device the same one). ``ditaccel calibrate`` writes one;
``ditaccel tune`` embeds the winner's in the TOML it emits; a recipe loads one with ``ratios = "file.json"``
(relative to the recipe file) or the inline table itself.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Mapping

import torch

CALIBRATION_FORMAT = 1


def model_identity(transformer: torch.nn.Module) -> str:
    """``"<class>/<12 hex digits>"``: a digest of the config and of every tensor's name, shape and mean magnitude
    (of the weights rounded to bf16, to 3 significant digits: the same weights in fp32 or bf16, on any device, give
    the same identity). One pass over the weights, done once per plugin, when a calibration is used or exported."""
    digest = hashlib.sha256()
    config = getattr(transformer, "config", None)
    if config is not None:
        digest.update(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}, sort_keys=True,
                                 default=str).encode())
    state = transformer.state_dict()
    names = sorted(state)
    for name in names:
        digest.update(f"{name}:{tuple(state[name].shape)};".encode())
    for name in (n for n in names if state[n].is_floating_point() and state[n].numel()):
        # Rounded to bf16 first: the same weights in fp32 or bf16 give the same digits.
        magnitude = float(state[name].detach().to(torch.bfloat16).double().abs().mean())
        digest.update(f"{name}={magnitude:.3g};".encode())
    return f"{type(transformer).__name__}/{digest.hexdigest()[:12]}"


def validate_calibration(data: Any, where: str = "ratios") -> dict[str, Any]:
    """Check a calibration mapping and return it normalised (curves as tuples of floats); ``ValueError`` naming
    what is wrong otherwise."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: a calibration must be a table with 'curves' (and 'model', 'steps')")
    unknown = sorted(set(data) - {"format", "model", "steps", "curves", "schedules"})
    if unknown:
        raise ValueError(f"{where}: unknown calibration key(s) {', '.join(unknown)}; allowed: format, model, steps, "
                         "curves, schedules")
    if data.get("format", CALIBRATION_FORMAT) != CALIBRATION_FORMAT:
        raise ValueError(f"{where}: calibration format {data.get('format')!r} is not supported; this dit_accel reads "
                         f"format {CALIBRATION_FORMAT}")
    curves = data.get("curves")
    if not isinstance(curves, Mapping) or not curves:
        raise ValueError(f"{where}: 'curves' must map branch roles (cond, uncond, slot0, ...) to ratio lists")
    normalised = {}
    for role, curve in curves.items():
        ok = isinstance(curve, (list, tuple)) and len(curve) >= 2 and all(
            isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r) and r > 0 for r in curve)
        if not ok:
            raise ValueError(f"{where}: the curve of {role!r} must be at least 2 finite positive ratios")
        normalised[str(role)] = tuple(float(r) for r in curve)
    lengths = {len(c) for c in normalised.values()}
    steps = data.get("steps", next(iter(lengths)))
    if len(lengths) != 1 or steps != next(iter(lengths)):
        raise ValueError(f"{where}: every curve must have 'steps' = {steps!r} ratios (got {sorted(lengths)})")
    model = data.get("model", "")
    if not isinstance(model, str):
        raise ValueError(f"{where}: 'model' must be a string (model_identity of the transformer)")
    result = {"format": CALIBRATION_FORMAT, "model": model, "steps": int(steps), "curves": normalised}
    if data.get("schedules"):
        result["schedules"] = validate_schedules(data["schedules"], int(steps), where)
    return result


def validate_schedules(schedules: Any, steps: int, where: str) -> dict[str, tuple[int, ...]]:
    """``{"<count>": [computed steps]}`` normalised; each list strictly increasing from 0, below ``steps``, with
    ``count`` entries."""
    if not isinstance(schedules, Mapping):
        raise ValueError(f"{where}: 'schedules' must map a count of computed steps to the list of those steps")
    from dit_accel.caching.schedule_search import check_schedule

    normalised = {}
    for count, schedule in schedules.items():
        try:
            if not str(count).isdigit() or not isinstance(schedule, (list, tuple)) or len(schedule) != int(count):
                raise ValueError(f"not {count} steps")
            normalised[str(int(count))] = check_schedule(schedule, steps)
        except ValueError:
            raise ValueError(f"{where}: schedules[{count!r}] = {schedule!r} is invalid; allowed: {count} distinct "
                             f"steps in increasing order, the first 0, each below {steps}") from None
    return normalised


def load_calibration(path: str | Path) -> dict[str, Any]:
    """Read a calibration JSON file (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"magcache calibration file {str(path)!r} does not exist (write one with "
                                "`ditaccel calibrate`)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"magcache calibration file {str(path)!r} is not valid JSON: {error}") from None
    return validate_calibration(data, where=str(path))


def save_calibration(calibration: Mapping[str, Any], path: str | Path) -> Path:
    path = Path(path)
    data = validate_calibration(calibration)
    data["curves"] = {role: list(curve) for role, curve in data["curves"].items()}
    if "schedules" in data:
        data["schedules"] = {count: list(steps) for count, steps in data["schedules"].items()}
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def calibrations_of(handle: Any) -> list[dict[str, Any]]:
    """The calibrations the magcache plugins of ``handle`` hold (one per plugin and calibrated step count)."""
    from dit_accel.caching.magcache import MagCachePlugin

    found = []
    for acc in handle.transformers:
        for plugin in acc.plugins:
            if isinstance(plugin, MagCachePlugin):
                found += [plugin.calibration(steps) for steps in sorted(plugin.curves)]
    return found


def embed_calibrations(recipe: Any, handle: Any) -> Any:
    """``recipe`` with the calibrated curves of ``handle``'s magcache plugins written into their ``ratios``
    (plugins that already have ``ratios`` keep them); the recipe is unchanged where nothing was calibrated."""
    import dataclasses

    from dit_accel.caching.magcache import MagCacheConfig, MagCachePlugin

    calibrated = [plugin for acc in handle.transformers[:1]  # the first transformer's (Wan 2.2's second calibrates
                  for plugin in acc.plugins if isinstance(plugin, MagCachePlugin) and plugin.curves]  # its own)
    plugins = []
    for config in recipe.plugins:
        match = next((p for p in calibrated if p.config == config), None)
        if isinstance(config, MagCacheConfig) and not config.ratios and match is not None:
            config = dataclasses.replace(config, ratios=match.calibration(max(match.curves)))
        plugins.append(config)
    return dataclasses.replace(recipe, plugins=tuple(plugins))
