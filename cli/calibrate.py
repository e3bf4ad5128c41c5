"""``ditaccel calibrate``: measure magcache's magnitude-ratio curves on one model and write them to a file.

    ditaccel calibrate --model zoo:dit --steps 50 -o zoo-dit-50.json
    ditaccel generate --model zoo:dit --steps 50 --recipe magcache --set ratios=zoo-dit-50.json

The file (``dit_accel.caching.calibration``) names the model it was measured on and its step count; a recipe
loads it with ``ratios = "zoo-dit-50.json"`` and skips from its first generation.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated

import torch
import typer

import dit_accel
from dit_accel.cli.app import DEFAULT_MODEL, _library_logs, accelerate_on, app, call_kwargs, fail, load_model


@app.command(epilog="Examples:\n\n  ditaccel calibrate --model zoo:dit --steps 50 -o zoo-dit-50.json\n\n"
             "  ditaccel generate --model zoo:dit --steps 50 --recipe magcache --set ratios=zoo-dit-50.json\n\n"
             "  ditaccel calibrate --model ./my_flux_pipeline --steps 28 --prompt 'a cat' -o flux-28.json")
def calibrate(
    model: Annotated[str, typer.Option(metavar="SPEC", help="The model, as for `ditaccel generate`.")] = DEFAULT_MODEL,
    steps: Annotated[int, typer.Option(metavar="N", min=2, help="Denoising steps of the calibration (the "
                                       "generations that use it; other step counts are resampled).")] = 50,
    recipe: Annotated[str, typer.Option(metavar="NAME|TOML", help="A recipe with a magcache plugin.")] = "magcache",
    prompt: Annotated[str | None, typer.Option(metavar="TEXT", help="Prompt of text-conditional pipelines.")] = None,
    class_label: Annotated[int | None, typer.Option(metavar="N", help="Class id of class-conditional pipelines.")]
    = None,
    seed: Annotated[int, typer.Option(metavar="N", min=0, help="Seed of the calibration generation.")] = 10_000,
    guidance_scale: Annotated[float | None, typer.Option(metavar="X", help="CFG scale (default: the pipeline's).")]
    = None,
    output: Annotated[Path, typer.Option("--output", "-o", metavar="PATH",
                                         help="Calibration file to write (.json).")] = Path("magcache-calibration.json"),
    device: Annotated[str, typer.Option(metavar="DEVICE", help="'auto', 'cpu', 'cuda', ...")] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar, no library warnings.")] = False,
) -> None:
    """Run one dense generation that records magcache's magnitude-ratio curve per CFG branch, and write it."""
    from dit_accel.caching.calibration import calibrations_of, save_calibration
    from dit_accel.caching.magcache import MagCacheConfig

    if output.suffix.lower() != ".json":
        fail(f"-o {str(output)!r}: a calibration is written as JSON; use a .json path")
    try:
        resolved = dit_accel.load_recipe(recipe)
    except (ValueError, FileNotFoundError, TypeError) as error:
        fail(str(error))
    if not any(isinstance(p, MagCacheConfig) for p in resolved.plugins):
        fail(f"recipe {resolved.name!r} has no magcache plugin; allowed: a recipe with one (e.g. magcache)")
    resolved = resolved.with_overrides(ratios=[]) if len(
        [p for p in resolved.plugins if hasattr(p, "ratios")]) == 1 else resolved
    with _library_logs(quiet):
        pipe, family = load_model(model)
        kwargs = call_kwargs(model, family, pipe, prompt, class_label, steps, seed, guidance_scale, 1)
        handle = accelerate_on(pipe, device, resolved, model)
        pipe.set_progress_bar_config(disable=quiet, desc=f"{family} [calibrate]")
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.filterwarnings("ignore", message=".*magcache: no magnitude-ratio curve")
            pipe(**kwargs)
        found = calibrations_of(handle)
        dit_accel.remove_acceleration(pipe)
    if not found:
        fail(f"{model!r} produced no calibration at {steps} steps (did the pipeline run {steps} steps?)")
    path = save_calibration(found[0], output)
    roles = ", ".join(found[0]["curves"])
    typer.echo(f"wrote {path}: {found[0]['steps']}-step curves for {roles} of {found[0]['model']}; use it with "
               f"--set ratios={path} or ratios = \"{path.name}\" in a recipe next to it")
