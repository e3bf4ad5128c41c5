"""``ditaccel calibrate``: measure magcache's magnitude-ratio curves on one model and write them to a file.

    ditaccel calibrate --model zoo:dit --steps 50 -o zoo-dit-50.json
    ditaccel generate --model zoo:dit --steps 50 --recipe magcache --set ratios=zoo-dit-50.json

The file (``dit_accel.caching.calibration``) names the model it was measured on and its step count; a recipe
loads it with ``ratios = "zoo-dit-50.json"`` and skips from its first generation.

``--search-schedule`` then searches where the recipe's budget of computed steps goes on a few calibration
generations (seeds after ``--seed``; :mod:`dit_accel.bench.schedule_calibration`) and adds the schedule found to the
file (an existing file of the same model and step count keeps its curves and other schedules); magcache's
``schedule = "auto"`` uses it. For a text-conditional pipeline, ``--prompts-file`` gives the search many prompts
(one per line, taken in turn by its calibration images) instead of one: a schedule searched on a single prompt can
fit that prompt.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Callable

import torch
import typer

import dit_accel
from dit_accel.cli.app import DEFAULT_MODEL, _library_logs, accelerate_on, app, call_kwargs, fail, load_model


@app.command(epilog="Examples:\n\n  ditaccel calibrate --model zoo:dit --steps 50 -o zoo-dit-50.json\n\n"
             "  ditaccel generate --model zoo:dit --steps 50 --recipe magcache --set ratios=zoo-dit-50.json\n\n"
             "  ditaccel calibrate --model ./my_flux_pipeline --steps 28 --prompt 'a cat' -o flux-28.json\n\n"
             "  ditaccel calibrate --model zoo:dit --recipe magcache-ultra --search-schedule -o zoo-dit-50.json\n\n"
             "  ditaccel calibrate --model ./my_flux_pipeline --steps 28 --recipe magcache-ultra "
             "--prompts-file prompts.txt --search-schedule -o flux-28.json")
def calibrate(
    model: Annotated[str, typer.Option(metavar="SPEC", help="The model, as for `ditaccel generate`.")] = DEFAULT_MODEL,
    steps: Annotated[int, typer.Option(metavar="N", min=2, help="Denoising steps of the calibration (the "
                                       "generations that use it; other step counts are resampled).")] = 50,
    recipe: Annotated[str, typer.Option(metavar="NAME|TOML", help="A recipe with a magcache plugin.")] = "magcache",
    prompt: Annotated[str | None, typer.Option(metavar="TEXT", help="Prompt of text-conditional pipelines.")] = None,
    prompts_file: Annotated[Path | None, typer.Option(metavar="PATH", help="Prompts of text-conditional pipelines, "
                                                      "one per line (blank lines and lines starting with # "
                                                      "skipped): the curve's generation uses the first, the "
                                                      "schedule search's images take them in turn.")] = None,
    class_label: Annotated[int | None, typer.Option(metavar="N", help="Class id of class-conditional pipelines.")]
    = None,
    seed: Annotated[int, typer.Option(metavar="N", min=0, help="Seed of the calibration generation.")] = 10_000,
    guidance_scale: Annotated[float | None, typer.Option(metavar="X", help="CFG scale (default: the pipeline's).")]
    = None,
    output: Annotated[Path, typer.Option("--output", "-o", metavar="PATH",
                                         help="Calibration file to write (.json).")] = Path("magcache-calibration.json"),
    search: Annotated[bool, typer.Option("--search-schedule", help="Also search where the recipe's computed "
                                         "steps go (a few hundred calibration generations at the recipe's speed) "
                                         "and add the schedule to the file.")] = False,
    search_generations: Annotated[int, typer.Option(metavar="N", min=1, help="Calibration generations scoring "
                                                    "each schedule (seeds --seed + 1 ...).")] = 3,
    holdout_generations: Annotated[int, typer.Option(metavar="N", min=0, help="Further calibration generations "
                                                     "(the next seeds) judging the schedule found: it is kept only "
                                                     "if it beats the rule's there by 0.5 dB.")] = 3,
    search_images: Annotated[int, typer.Option(metavar="N", min=1, help="Images per calibration generation.")]
    = 10,
    device: Annotated[str, typer.Option(metavar="DEVICE", help="'auto', 'cpu', 'cuda', ...")] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar, no library warnings.")] = False,
) -> None:
    """Run one dense generation that records magcache's magnitude-ratio curve per CFG branch, and write it
    (with --search-schedule, also the computed-step schedule searched for the recipe's budget)."""
    from dit_accel.caching.calibration import calibrations_of, save_calibration
    from dit_accel.caching.magcache import MagCacheConfig

    if output.suffix.lower() != ".json":
        fail(f"-o {str(output)!r}: a calibration is written as JSON; use a .json path")
    prompts = read_prompts(prompts_file, prompt) if prompts_file is not None else None
    if prompts is not None:
        prompt = prompts[0]
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
        existing = _existing_calibration(output, pipe, steps) if search else None
        kwargs = call_kwargs(model, family, pipe, prompt, class_label, steps, seed, guidance_scale, 1)

        def search_from(calibration: dict) -> None:
            kwargs_of = _search_kwargs(model, family, pipe, prompts or prompt, class_label, steps, seed,
                                       guidance_scale, search_images)
            plan = _SearchPlan(steps, seed, search_generations, holdout_generations, search_images,
                               len(prompts or ()))
            _search(pipe, resolved, calibration, kwargs_of, plan, output, quiet)

        handle = accelerate_on(pipe, device, resolved, model)
        if existing is not None:  # applied only to place the pipeline and check that the recipe fits the model
            dit_accel.remove_acceleration(pipe)
            search_from(existing)
            return
        pipe.set_progress_bar_config(disable=quiet, desc=f"{family} [calibrate]")
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.filterwarnings("ignore", message=".*magcache: no magnitude-ratio curve")
            pipe(**kwargs)
        found = calibrations_of(handle)
        dit_accel.remove_acceleration(pipe)
    if not found:
        fail(f"{model!r} produced no calibration at {steps} steps (did the pipeline run {steps} steps?)")
    if search:
        with _library_logs(quiet):
            search_from(found[0])
        return
    path = save_calibration(found[0], output)
    roles = ", ".join(found[0]["curves"])
    typer.echo(f"wrote {path}: {found[0]['steps']}-step curves for {roles} of {found[0]['model']}; use it with "
               f"--set ratios={path} or ratios = \"{path.name}\" in a recipe next to it")


def read_prompts(path: Path, prompt: str | None) -> list[str]:
    """The prompts of ``--prompts-file``: its lines, stripped, without blank ones and ``#`` comments."""
    if prompt is not None:
        fail("--prompt and --prompts-file both given; use one (a file of one line is one prompt)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        fail(f"--prompts-file {str(path)!r}: cannot read it ({error.strerror or error})")
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        fail(f"--prompts-file {str(path)!r} holds no prompt; allowed: a text file of one prompt per line")
    return prompts


def _existing_calibration(output: Path, pipe, steps: int) -> dict | None:
    """The calibration in ``output`` when it is one of this model at ``steps`` steps (its curves are reused)."""
    from dit_accel.caching.calibration import load_calibration, model_identity

    if not output.is_file():
        return None
    try:
        existing = load_calibration(output)
    except ValueError as error:
        fail(f"-o {str(output)!r} exists and is not a calibration ({error}); choose another path")
    if existing["model"] != model_identity(pipe.transformer) or existing["steps"] != steps:
        fail(f"-o {str(output)!r} holds a calibration of {existing['model']} at {existing['steps']} steps, not of "
             f"this model at {steps}: write the search to another path")
    return existing


@dataclass(frozen=True)
class _SearchPlan:
    steps: int
    seed: int  # generation k uses seed + 1 + k
    generations: int  # scoring each schedule
    holdout: int  # judging the schedule found
    images: int  # per generation
    prompts: int  # of --prompts-file (0: none)


def _search_kwargs(model, family, pipe, prompt: str | list[str] | None, class_label, steps, seed, guidance_scale,
                   images: int) -> Callable[[int], dict]:
    """The pipeline's keyword arguments of calibration generation ``index`` (seed ``seed + 1 + index``): with a
    list of prompts, one prompt per image, in turn across the generations (search, then held out)."""
    if not isinstance(prompt, list):
        return lambda index: call_kwargs(model, family, pipe, prompt, class_label, steps, seed + 1 + index,
                                         guidance_scale, images)
    prompts = prompt

    def kwargs_of(index: int) -> dict:
        kwargs = call_kwargs(model, family, pipe, prompts[0], class_label, steps, seed + 1 + index, guidance_scale,
                             1)
        kwargs["prompt"] = [prompts[(index * images + k) % len(prompts)] for k in range(images)]
        negative = kwargs.get("negative_prompt")
        if negative is not None:  # one per prompt, as the pipelines require of a prompt list
            kwargs["negative_prompt"] = [negative if isinstance(negative, str) else negative[0]] * images
        return kwargs

    return kwargs_of


def _search(pipe, recipe, calibration, kwargs_of: Callable[[int], dict], plan: _SearchPlan, output: Path,
            quiet: bool) -> None:
    from dit_accel.bench.schedule_calibration import rule_schedule, search_magcache_schedule
    from dit_accel.caching.calibration import save_calibration

    generations, holdout, images, steps, seed = plan.generations, plan.holdout, plan.images, plan.steps, plan.seed

    def call(index: int):
        return lambda: kwargs_of(index)

    start = rule_schedule(recipe, calibration)
    typer.echo(f"searching where {recipe.name}'s {len(start)} computed steps of {steps} go, from the rule's "
               f"{list(start)}, on {generations} x {images} calibration images (seeds {seed + 1}-{seed + generations}"
               + (f", {plan.prompts} prompts in turn" if plan.prompts else "")
               + (f"; held out: {holdout} x {images}, seeds {seed + generations + 1}-{seed + generations + holdout})"
                  if holdout else ")"))
    pipe.set_progress_bar_config(disable=True)
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.filterwarnings("ignore", module="dit_accel")
        table, done = search_magcache_schedule(
            pipe, recipe, calibration, [call(i) for i in range(generations)],
            holdout=[call(generations + i) for i in range(holdout)],
            progress=None if quiet else lambda s, v: typer.echo(f"  {v:6.2f} dB  {list(s)}"))
    found = done.search
    path = save_calibration(table, output)
    summary = (f"{len(found.schedule)} computed steps at {list(found.schedule)}: {found.score:.2f} dB against dense "
               f"on the search images (the rule's: {found.start_score:.2f} dB; {len(found.evaluations)} schedules "
               "scored)")
    if done.holdout_rule is not None:
        summary += (f"; held out: {done.holdout_found:.2f} dB against the rule's {done.holdout_rule:.2f}: "
                    + ("kept" if done.kept else "not kept (under 0.5 dB better), the rule keeps the budget"))
    typer.echo(f"wrote {path}: {summary}" + (f"; magcache's schedule = \"auto\" uses it with ratios = "
                                             f"\"{path.name}\"" if done.kept else ""))
