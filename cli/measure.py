"""``ditaccel bench`` and ``ditaccel tune``: the measuring commands, registered on :data:`dit_accel.cli.app.app`.

    ditaccel bench --recipes none,fora,taylorseer --steps 20 --num-samples 16 -o results
    ditaccel tune --target 'psnr>=30' --steps 20 -o tuned.toml
"""

from __future__ import annotations

import contextlib
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import torch
import typer

import dit_accel
from dit_accel.bench.distributed import Ranks
from dit_accel.cli.app import (DEFAULT_MODEL, TINY_STEPS, _first_line, _library_logs, app, fail, load_model,
                               parse_overrides, start_parallel_workers)


def check_output_dir(path: Path) -> None:
    """Exit 2 unless ``path`` is (or can be made) a writable directory."""
    try:
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(20, "exists and is not a directory")
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as error:
        fail(f"-o {str(path)!r} is not a writable directory: {error.strerror or error}")


def _relaunch(processes: int, argv: list[str]) -> int:
    """Run this command again under torchrun with ``processes`` workers (``--processes`` removed); its exit code."""
    from dit_accel.cli.parallel import relaunch

    return relaunch(processes, argv)


class _LockstepRanks(Ranks):
    """A ``--parallel`` bench: every process takes part in every generation (each computes its share of it), so
    each runs the bench as a single process would, in step with the others; rank 0's results are the run's."""

    def __init__(self) -> None:
        self._state, self.index, self.count = None, 0, 1


@contextlib.contextmanager
def _lockstep(output: Path, main_process: bool) -> Iterator[Path]:
    """Run the bench harness with :class:`_LockstepRanks`; yields the output directory of this process: ``output``
    on rank 0, a throwaway copy of it elsewhere (same rows to resume from, nothing written twice)."""
    import shutil

    from dit_accel.bench import harness

    original = harness.Ranks
    harness.Ranks = _LockstepRanks
    try:
        if main_process:
            yield output
        else:
            with tempfile.TemporaryDirectory(prefix="ditaccel-parallel-") as scratch:
                copy = Path(scratch) / "out"
                shutil.copytree(output, copy) if output.is_dir() else copy.mkdir()
                yield copy
    finally:
        harness.Ranks = original


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~"))


@app.command(
    epilog="Examples:\n\n"
    "  ditaccel bench --recipes none,fora,taylorseer --steps 20 --num-samples 16 -o results\n\n"
    "  ditaccel bench --model zoo:mmdit --recipes fora,fora@interval=4 --baselines diffusers:fbcache,"
    "diffusers:taylorseer@cache_interval=5,max_order=2 -o results --resume\n\n"
    "  ditaccel bench --recipes taylorseer,toca --set interval=4 --repeats 5 --batch 4 -o results\n\n"
    "  ditaccel bench --model ./saved_pipeline --recipes fora --steps 28 --fid-weights inception_scripted.pt "
    "--clip-model ./clip-vit-b-16 -o results\n\n"
    "  accelerate launch --multi_gpu --num_processes 4 -m dit_accel.cli.app bench --recipes none,fora -o results\n\n"
    "  ditaccel bench --processes 2 --recipes none,fora -o results   (the same through torchrun; CPU: gloo)\n\n"
    "  ditaccel bench --model tiny:flux --parallel ulysses=2 --recipes none,fbcache -o results   (each generation "
    "split over 2 processes; patch=N composes patch-parallel into every recipe; no --baselines)\n\n"
    "Under torchrun or accelerate launch the samples are split across the processes (chunk k on process "
    "k mod n, same seeds), gathered, and scored once; the main process times and writes the rows.\n\n"
    "Configurations are written NAME or NAME@field=value,field=value (values: numbers, true/false, strings, "
    "lists in brackets); --set applies to every recipe that has the field. Baselines and their default settings: "
    "diffusers:fbcache (threshold=0.1), diffusers:taylorseer (cache_interval=3, max_order=1, "
    "disable_cache_before_step=3, attention and MLP sub-layers), diffusers:magcache (threshold=0.06, "
    "calibrated on its own seed), cache-dit:dbcache (residual_diff_threshold=0.08, max_warmup_steps=2), "
    "cache-dit:dbcache+taylorseer (residual_diff_threshold=0.16); fields given replace the defaults. A baseline "
    "that does not run on the model becomes an 'unavailable' row. Writes DIR/rows.jsonl (one JSON row per "
    "configuration, strict JSON: an infinite PSNR is the string \"inf\"), DIR/results.md and DIR/pareto.png."
)
def bench(
    model: Annotated[str, typer.Option(
        metavar="SPEC", help="zoo:<dit|mmdit|flowdit>, tiny:<name>, a local pipeline directory, or a hub id.")] = DEFAULT_MODEL,
    recipes: Annotated[list[str] | None, typer.Option(
        "--recipes", metavar="R1,R2,...", help="Recipes to measure: names, 'a+b', .toml files, NAME@field=value "
        "(comma-separated, repeatable; default: none).")] = None,
    baselines: Annotated[list[str] | None, typer.Option(
        "--baselines", metavar="B1,B2,...", help="Anchors to measure side by side: "
        "diffusers:<fbcache|taylorseer|magcache|fastercache|pab>, cache-dit:<dbcache|dbcache+taylorseer|"
        "dbcache+foca|dbcache+dmd|dbcache+scm>, with optional @field=value settings.")] = None,
    steps: Annotated[int | None, typer.Option(metavar="N", min=1, help="Denoising steps (default: the "
                                              f"pipeline's; {TINY_STEPS} for tiny models).")] = None,
    num_samples: Annotated[int, typer.Option(metavar="N", min=1, help="Samples per configuration for the quality "
                                             "metrics (same seeds for all).")] = 8,
    seed: Annotated[int, typer.Option(metavar="N", min=0, help="Base seed: chunk k of the samples uses seed+k.")] = 0,
    repeats: Annotated[int, typer.Option(metavar="N", min=1, help="Timed runs per configuration, each "
                                         "interleaved with a dense run (after one warm-up).")] = 3,
    batch: Annotated[int, typer.Option(metavar="N", min=1, help="Samples per generation: the timing batch "
                                       "and the chunk size of the quality pass.")] = 2,
    output: Annotated[Path, typer.Option(
        "--output", "-o", metavar="DIR", help="Output directory.")] = Path("bench-results"),
    resume: Annotated[bool, typer.Option(
        "--resume", help="Keep the rows already in DIR/rows.jsonl and measure only the missing ones.")] = False,
    overrides: Annotated[list[str] | None, typer.Option(
        "--set", metavar="KEY=VALUE", help="Override a recipe field, e.g. interval=4 or fora__interval=4 "
        "(repeatable).")] = None,
    guidance_scale: Annotated[float | None, typer.Option(
        metavar="X", help="Classifier-free guidance scale (default: the pipeline's).")] = None,
    fid_weights: Annotated[Path | None, typer.Option(
        metavar="PATH", help="FID feature extractor: a TorchScript module mapping images (N, 3, H, W) in [0, 1] to "
        "features (N, D), e.g. a scripted Inception; a local file or owner/repo:file.pt on the hub; needs "
        "torchmetrics. FID is against the dense outputs.")] = None,
    clip_model: Annotated[Path | None, typer.Option(
        metavar="PATH", help="A CLIP model for CLIP score: a local directory (transformers format) or a hub id "
        "when online; needs torchmetrics.")] = None,
    device: Annotated[str, typer.Option(
        metavar="DEVICE", help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")] = "auto",
    processes: Annotated[int, typer.Option(
        metavar="N", min=1, help="Data-parallel over N processes on this machine (one per GPU, or CPU processes "
        "with gloo): relaunches itself under torchrun. Rows equal a one-process run's.")] = 1,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar, no library warnings.")] = False,
    parallel: Annotated[str | None, typer.Option(
        "--parallel", metavar="KIND=N", help="Split each generation over N processes: ulysses=N, ring=N (diffusers' "
        "context parallelism) or patch=N (patch-parallel composed into every recipe); relaunches itself under "
        "torchrun; not with --processes or --baselines.")] = None,
) -> None:
    """Measure recipes and baselines side by side against the dense pipeline: latency, speedups, memory, quality."""
    import shlex
    import sys

    from dit_accel.bench.distributed import launched_distributed
    from dit_accel.bench.harness import BenchConfig, plan, run_bench, split_items
    from dit_accel.cli import parallel as par

    setting = None
    if parallel is not None:
        try:
            setting = par.parse_parallel(parallel)
            par.check_combination(setting, processes)
            if baselines:
                raise ValueError(f"--parallel {setting} cannot measure --baselines: their hooks decide from each "
                                 "process's own share of the tokens, so the processes could take different steps "
                                 "and wait on each other for ever; measure baselines without --parallel")
            if setting.kind == "patch":
                recipes = par.patch_items(split_items(recipes or ["none"]), setting)
        except ValueError as error:
            fail(str(error))

    config = BenchConfig(
        model=model, recipes=recipes or ["none"], baselines=baselines or [], steps=steps, num_samples=num_samples,
        seed=seed, repeats=repeats, batch=batch, out_dir=output, resume=resume,
        overrides=parse_overrides(overrides or []), guidance_scale=guidance_scale, device=device,
        fid_weights=fid_weights, clip_model=clip_model,
        parallel="auto" if setting is None else {"kind": setting.kind, "degree": setting.processes},
        command="ditaccel " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["bench"] else None,
    )
    try:
        plan(config, steps or 0)  # names, settings and overrides are checked before any model is loaded
    except (ValueError, TypeError) as error:
        fail(str(error))
    if processes > 1 and not launched_distributed():
        check_output_dir(output)
        raise typer.Exit(_relaunch(processes, sys.argv[1:]))
    if setting is not None and not launched_distributed():
        check_output_dir(output)
        raise typer.Exit(par.relaunch(setting.processes, sys.argv[1:]))
    if setting is not None:
        _parallel_bench(config, setting, quiet)
        return
    if fid_weights is not None and not fid_weights.exists() and ":" not in str(fid_weights):
        fail(f"--fid-weights {str(fid_weights)!r} does not exist (a local TorchScript file, or owner/repo:file.pt "
             "on the hub)")
    if clip_model is not None and not clip_model.exists() and not _looks_like_hub_id(str(clip_model)):
        fail(f"--clip-model {str(clip_model)!r} is neither a local directory nor a hub id (owner/name)")
    check_output_dir(output)
    with _library_logs(quiet):
        pipe, family = load_model(model)
        try:
            pipe.to(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
        except (RuntimeError, ValueError, AssertionError) as error:
            fail(f"--device {device!r}: {_first_line(error)}")
        try:
            rows = run_bench(config, progress=not quiet, pipe=pipe, family=family)
        except ValueError as error:
            fail(_first_line(error))
    if not rows:  # a data-parallel helper process: the main process reports
        return
    _print_rows(rows, output)


def _parallel_bench(config, setting, quiet: bool) -> None:
    """``bench --parallel`` inside one of its processes: split the transformer, run the harness in lockstep with
    the other processes (see :class:`_LockstepRanks`), report on rank 0."""
    from dit_accel.bench.harness import run_bench
    from dit_accel.cli import parallel as par

    main_process = par.rank() == 0
    if main_process:
        check_output_dir(config.out_dir)
    else:
        warnings.simplefilter("ignore")  # said once, by rank 0
    where = par.worker_device(config.device)
    with _library_logs(quiet or not main_process):
        pipe, family = load_model(config.model)
        start_parallel_workers(pipe, setting, where, main_process)
        with _lockstep(config.out_dir, main_process) as out_dir:
            config.out_dir, config.device = out_dir, str(where)
            try:
                rows = run_bench(config, progress=not quiet and main_process, pipe=pipe, family=family)
            except ValueError as error:
                fail(_first_line(error))
    if main_process:
        _print_rows(rows, config.out_dir)
    par.finish_workers()


def _print_rows(rows: list[dict], output: Path) -> None:
    for row in rows:
        if row.get("unavailable"):
            typer.echo(f"{row['config']}: unavailable ({row['unavailable']})")
            continue
        flops = f", FLOPs {row['flops_speedup']:.2f}x" if row.get("flops_speedup") else ""
        typer.echo(f"{row['config']}: wall {row['wall_speedup']:.2f}x{flops}, PSNR {row['psnr']:.2f} dB"
                   + (f", fd {row['fd']:.3f}" if row.get("fd") is not None else ""))
    typer.echo(f"wrote {output / 'rows.jsonl'}, {output / 'results.md'}, {output / 'pareto.png'}")


@app.command(
    epilog="Examples:\n\n"
    "  ditaccel tune --target 'psnr>=30' --steps 20 -o tuned.toml\n\n"
    "  ditaccel tune --model zoo:mmdit --target 'fd<=12' --recipes fora,taylorseer,toca --budget-minutes 30 "
    "-o tuned.toml\n\n"
    "  ditaccel generate --model zoo:mmdit --recipe tuned.toml --steps 20\n\n"
    "Targets: psnr, ssim or rel_l1 against the dense output of the same seeds; fd, class_consistency or "
    "class_consistency_change (its change from dense, image by image: class_consistency_change>=-0.02) on zoo "
    "models. The knob searched per plugin: interval (fora, taylorseer, toca, delta-dit), threshold (fbcache, "
    "magcache), factor (todo), start (cfg-share), for each taylorseer order (1, 2) and magcache forecast_order "
    "(1, 0) unless set with NAME@field=value; then, for fora/taylorseer/toca/todo, a per-layer plan (the first "
    "failing value on the blocks that tolerate it, chosen greedily from the least sensitive; --uniform-only skips "
    "it). The winner (lowest measured wall time, ties within 5 % broken by estimated FLOPs, among those meeting "
    "the target) is measured again on "
    "held-out seeds -- quality, FLOPs, and wall speedup timed against interleaved dense runs -- and both results "
    "are printed."
)
def tune(
    target: Annotated[str, typer.Option(metavar="METRIC>=X", help="Quality to keep, e.g. 'psnr>=30', 'fd<=10'.")],
    model: Annotated[str, typer.Option(
        metavar="SPEC", help="zoo:<dit|mmdit|flowdit>, tiny:<name>, a local pipeline directory, or a hub id.")] = DEFAULT_MODEL,
    recipes: Annotated[list[str] | None, typer.Option(
        "--recipes", metavar="R1,R2,...", help="Recipes to tune (default: fora,taylorseer,fbcache); "
        "NAME@field=value fixes other fields, e.g. fora@first_steps=2.")] = None,
    steps: Annotated[int | None, typer.Option(metavar="N", min=1, help="Denoising steps the recipe is tuned for "
                                              f"(default: the pipeline's; {TINY_STEPS} for tiny models).")] = None,
    num_samples: Annotated[int, typer.Option(metavar="N", min=1, help="Calibration samples per candidate.")] = 8,
    seed: Annotated[int, typer.Option(metavar="N", min=0, help="Calibration seed (chunk k uses seed+k).")] = 0,
    holdout_seed: Annotated[int | None, typer.Option(
        metavar="N", min=0, help="Seed of the held-out check (default: seed+1000).")] = None,
    batch: Annotated[int, typer.Option(metavar="N", min=1, help="Samples per generation.")] = 4,
    budget_minutes: Annotated[float, typer.Option(metavar="MIN", min=0.0, help="Stop trying new candidates after "
                                                  "this long.")] = 10.0,
    output: Annotated[Path, typer.Option(
        "--output", "-o", metavar="PATH", help="The tuned recipe to write (.toml).")] = Path("tuned.toml"),
    guidance_scale: Annotated[float | None, typer.Option(
        metavar="X", help="Classifier-free guidance scale (default: the pipeline's).")] = None,
    device: Annotated[str, typer.Option(
        metavar="DEVICE", help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")] = "auto",
    report: Annotated[Path | None, typer.Option(
        metavar="PATH", help="Also write every candidate, the winner and its held-out check as JSON.")] = None,
    repeats: Annotated[int, typer.Option(metavar="N", min=1, help="Timed runs of the winner on the held-out "
                                         "seeds, each interleaved with a dense run.")] = 3,
    per_layer: Annotated[bool, typer.Option(
        "--per-layer/--uniform-only", help="After the uniform search, also try per-layer plans (DiTFastAttn-style "
        "greedy: the first failing value on the blocks that tolerate it).")] = True,
    search_schedule: Annotated[bool, typer.Option(
        "--search-schedule", help="When the winner has one magcache plugin, also search where its computed steps go "
        "(as `ditaccel calibrate --search-schedule`, on the calibration seeds, judged on the seeds after them) and "
        "embed the schedule in the recipe if it is kept.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar, no library warnings.")] = False,
) -> None:
    """Search the recipes' speed knobs for the fastest setting that meets a quality target; write it as TOML."""
    from dit_accel.bench import tune as tuning
    from dit_accel.bench.tune_space import DEFAULT_RECIPES, parse_target
    from dit_accel.bench.harness import BenchConfig, parse_item, resolve_steps, split_items

    try:
        goal = parse_target(target)
        items = [parse_item(item) for item in split_items(recipes or DEFAULT_RECIPES)]
        resolved = [dit_accel.load_recipe(name, **settings) for name, settings in items]
        fixed = [frozenset(settings) for _, settings in items]
    except (ValueError, FileNotFoundError, TypeError) as error:
        fail(str(error))
    if output.suffix.lower() != ".toml":
        fail(f"-o {str(output)!r}: the tuned recipe is written as TOML; use a .toml path")
    check_output_dir(output.parent)
    if report is not None:
        check_output_dir(report.parent)
    with _library_logs(quiet):
        pipe, family = load_model(model)
        try:
            where = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
            pipe.to(where)
        except (RuntimeError, ValueError, AssertionError) as error:
            fail(f"--device {device!r}: {_first_line(error)}")
        n_steps = resolve_steps(BenchConfig(model=model, steps=steps), pipe)
        try:
            result = tuning.tune(pipe, model, family, resolved, goal, steps=n_steps, num_samples=num_samples,
                                 seed=seed, batch=batch, budget_minutes=budget_minutes, output=output,
                                 guidance_scale=guidance_scale, device=where, holdout_seed=holdout_seed,
                                 log=typer.echo, per_layer=per_layer, fixed=fixed, repeats=repeats,
                                 progress=not quiet, search_schedule=search_schedule)
        except ValueError as error:
            fail(str(error))
    if report is not None:
        import json
        import shlex
        import sys

        from dit_accel.bench.report import environment

        data = {"command": "ditaccel " + " ".join(shlex.quote(a) for a in sys.argv[1:]), "model": model,
                "steps": n_steps, "num_samples": num_samples, "seed": seed, "batch": batch,
                "env": environment(pipe, where), **result.to_dict()}
        report.write_text(json.dumps(data, indent=2, default=str))
    if result.best is None:
        typer.echo(f"error: no configuration of {', '.join(r.name for r in resolved)} meets {goal} "
                   f"({len(result.candidates)} tried); nothing written", err=True)
        raise typer.Exit(1)
    best, metric = result.best, goal.metric
    typer.echo(f"best: {best.describe()}, FLOPs {best.flops_fraction:.3f} of dense "
               f"({1 / best.flops_fraction:.2f}x); wrote {output}")
    typer.echo(f"calibration seeds: {metric} {best.metrics[metric]:.4g} ({'meets' if goal.met(best.metrics) else 'misses'}"
               f" {goal})")
    held = result.holdout
    typer.echo(f"held-out seeds {held['seeds']}: {metric} {held[metric]:.4g} "
               f"({'meets' if goal.met(held) else 'misses'} {goal}), FLOPs {held['flops_fraction']:.3f} of dense, "
               f"measured wall speedup {held['wall_speedup']:.2f}x (transformer "
               f"{held['transformer_speedup'] or float('nan'):.2f}x; medians of {held['timed_runs']} runs "
               "interleaved with dense ones)")
    for note in held["timing_notes"]:
        typer.echo(f"note: {note}")
