"""The ``ditaccel`` command line: list recipes, generate an image or video with an accelerated pipeline; the
measuring commands (``bench``, ``tune``) live in :mod:`dit_accel.cli.measure`.

    ditaccel recipes
    ditaccel generate --recipe none --model tiny:dit --steps 4 -o out.png
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, NoReturn

import torch
import typer

import dit_accel
from dit_accel.pipelines import tiny
from dit_accel.recipe import parse_value

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Training-free acceleration for Diffusers diffusion-transformer pipelines.",
)

DEFAULT_MODEL = "zoo:dit"
DEFAULT_PROMPT = "a photo of a cat"  # for non-tiny text-conditional pipelines given no --prompt
DEFAULT_CLASS_LABEL = 281  # ImageNet "tabby cat", for non-tiny class-conditional pipelines given no --class-label
TINY_STEPS = 20  # tiny pipelines have no trained default; other pipelines use their own default steps


def fail(message: str) -> NoReturn:
    """Print ``error: message`` on stderr and exit with status 2."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:300]


def start_parallel_workers(pipe, setting, where, main_process: bool) -> None:
    """Join the process group of ``--parallel`` and set the pipeline up for it; a failure (the same on every
    process) is reported once, by rank 0, and every process exits with code 2."""
    from dit_accel.cli import parallel as par

    try:
        par.init_workers(setting, where)
        par.prepare_pipeline(pipe, setting, where)
    except (ValueError, RuntimeError, AssertionError) as error:
        if not main_process:
            raise typer.Exit(2) from None
        fail(_first_line(error))


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _allowed_models() -> str:
    hub = "a hub id (HF_HUB_OFFLINE is set: only ids already in the local cache)" if _offline() else "a hub id"
    return f"allowed: zoo:<dit|mmdit|flowdit>, tiny:<{'|'.join(tiny.list())}>, a local pipeline directory, or {hub}"


def load_model(spec: str) -> tuple[Any, str]:
    """Resolve ``--model``: ``tiny:<name>`` (offline random-init pipelines), else a local pipeline directory or a
    hub id loaded with ``DiffusionPipeline.from_pretrained``. Returns ``(pipe, family_name)``; bad specs exit 2."""
    prefix, sep, name = spec.partition(":")
    if sep and prefix == "tiny":
        if name not in tiny.list():
            fail(f"unknown tiny model {name!r} in --model {spec!r}; {_allowed_models()}")
        return tiny.build(name), name
    if sep and prefix == "zoo":
        from dit_accel.pipelines import zoo

        if name not in zoo.MODELS:
            fail(f"unknown zoo model {name!r} in --model {spec!r}; {_allowed_models()}")
        try:
            return zoo.load(name), name
        except FileNotFoundError as error:
            fail(str(error))
    from diffusers import DiffusionPipeline
    from huggingface_hub import errors as hub_errors

    path = Path(spec).expanduser()
    looks_local = path.exists() or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", spec) or spec.startswith((".", "~"))
    if looks_local and not path.is_dir():
        fail(f"--model {spec!r}: no such pipeline directory; {_allowed_models()}")
    if looks_local and not (path / "model_index.json").is_file():
        fail(f"--model {spec!r}: no model_index.json there (not a saved Diffusers pipeline); {_allowed_models()}")
    try:
        pipe = DiffusionPipeline.from_pretrained(str(path) if looks_local else spec, local_files_only=_offline())
    except (OSError, ValueError, ImportError, hub_errors.HfHubHTTPError, hub_errors.EntryNotFoundError) as error:
        reason = _first_line(error)
        if not looks_local and any(s in str(error) for s in ("local_files_only", "cached locally", "cached snapshot")):
            reason = "not in the local Hugging Face cache, and " + (
                "HF_HUB_OFFLINE is set (nothing is downloaded)" if _offline() else "the Hub could not be reached")
        fail(f"cannot load --model {spec!r}: {reason}; {_allowed_models()}")
    return pipe, type(pipe).__name__


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["interval=4", "steps=2,8", "enabled=true"]`` -> ``{"interval": 4, "steps": [2, 8], "enabled": True}``."""

    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            fail(f"--set expects KEY=VALUE with KEY a field name (e.g. interval=4 or fora__interval=4), got {item!r}")
        value = value.strip().strip("[]()")
        overrides[key.strip()] = ([parse_value(v) for v in value.split(",") if v.strip()] if "," in value
                                  else parse_value(value))
    return overrides


def call_kwargs(spec: str, family: str, pipe: Any, prompt: str | None, class_label: int | None, steps: int | None,
                seed: int, guidance_scale: float | None, num_images: int = 1) -> dict[str, Any]:
    """Keyword arguments for ``pipe(...)``: tiny defaults for ``tiny:`` models, else built from the signature."""
    params = inspect.signature(pipe.__call__).parameters
    if prompt is not None and "prompt" not in params:
        fail(f"--prompt given but {type(pipe).__name__} is not text-conditional; use --class-label N instead")
    if class_label is not None and "class_labels" not in params:
        fail(f"--class-label given but {type(pipe).__name__} is not class-conditional; use --prompt TEXT instead")
    num_classes = getattr(getattr(getattr(pipe, "transformer", None), "config", None), "num_embeds_ada_norm", None)
    if spec.startswith("zoo:"):
        from dit_accel.pipelines.zoo import NUM_CLASSES as num_classes
    if class_label is not None and not 0 <= class_label < (num_classes or 2**31):
        fail(f"--class-label {class_label} is out of range; allowed: 0 to {(num_classes or 2**31) - 1}")
    if spec.startswith("tiny:"):
        kwargs = tiny.default_call_kwargs(family, steps=steps or TINY_STEPS, seed=seed, guidance_scale=guidance_scale,
                                          batch_size=num_images)
        if prompt is not None:
            kwargs["prompt"] = [prompt] * len(kwargs["prompt"]) if isinstance(kwargs["prompt"], list) else prompt
        if class_label is not None:
            kwargs["class_labels"] = [class_label] * num_images
        return kwargs
    kwargs = {"generator": torch.Generator().manual_seed(seed), "output_type": "pt"}
    if steps is not None:
        kwargs["num_inference_steps"] = steps
    if "prompt" in params:
        kwargs["prompt"] = DEFAULT_PROMPT if prompt is None else prompt
        if "num_images_per_prompt" in params:
            kwargs["num_images_per_prompt"] = num_images
    if "class_labels" in params:
        if class_label is not None:
            kwargs["class_labels"] = [class_label] * num_images
        elif spec.startswith("zoo:"):  # one image per class, cycling: a grid shows the whole model
            kwargs["class_labels"] = [i % num_classes for i in range(num_images)]
        else:
            kwargs["class_labels"] = [DEFAULT_CLASS_LABEL] * num_images
    if guidance_scale is not None and "guidance_scale" in params:
        kwargs["guidance_scale"] = guidance_scale
    if "use_resolution_binning" in params:  # native resolution is used; binning rejects non-standard sample sizes
        kwargs["use_resolution_binning"] = False
    return kwargs


def output_tensor(spec: str, family: str, out: Any) -> torch.Tensor:
    """The generated images ``(B, 3, H, W)`` or videos ``(B, F, 3, H, W)`` as a float tensor in [0, 1]."""
    if spec.startswith("tiny:"):
        return tiny.output_of(family, out)
    result = out[0] if isinstance(out, tuple) else getattr(out, "frames", None)
    result = getattr(out, "images", None) if result is None else result
    result = torch.as_tensor(result).float()
    if result.ndim in (4, 5) and result.shape[-1] in (1, 3, 4) and result.shape[-3] not in (1, 3, 4):
        result = result.movedim(-1, -3)  # channels-last numpy output
    return result


def _to_pil(chw: torch.Tensor) -> Any:
    from PIL import Image

    array = (chw.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def save_output(tensor: torch.Tensor, path: Path) -> None:
    """Images: one PNG (a batch as a grid, 10 per row). Videos: an animated GIF for ``.gif`` paths (a batch side by side),
    else one image with the frames side by side (one row per video)."""
    if tensor.ndim == 4:
        columns = min(len(tensor), 10)
        pad = (-len(tensor)) % columns
        tiles = torch.cat([tensor, torch.zeros(pad, *tensor.shape[1:])]) if pad else tensor
        rows = [torch.cat(list(tiles[i:i + columns]), dim=-1) for i in range(0, len(tiles), columns)]
        _to_pil(torch.cat(rows, dim=-2)).save(path)
    elif tensor.ndim == 5 and path.suffix.lower() == ".gif":
        frames = [_to_pil(torch.cat(list(tensor[:, f]), dim=-1)) for f in range(tensor.shape[1])]
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=125, loop=0)
    elif tensor.ndim == 5:
        _to_pil(torch.cat([torch.cat(list(video), dim=-1) for video in tensor], dim=-2)).save(path)
    else:
        raise ValueError(f"unexpected output shape {tuple(tensor.shape)}")


def accelerate_on(pipe: Any, device: str, recipe: Any, model: str) -> Any:
    """Move ``pipe`` to ``device`` (``auto``: cuda if available) and apply ``recipe``; a clean exit 2 on failure."""
    try:
        pipe.to(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    except (RuntimeError, ValueError, AssertionError) as error:
        fail(f"--device {device!r}: {_first_line(error)}")
    try:
        return dit_accel.accelerate_dit(pipe, recipe)
    except (ValueError, TypeError) as error:
        fail(f"cannot apply recipe {recipe.name!r} to {model!r}: {_first_line(error)}")


def check_output_path(path: Path) -> None:
    """Exit 2 unless ``path`` has an image extension PIL can write and its directory is (made) writable."""
    from PIL import Image

    Image.init()
    if path.suffix.lower() not in Image.registered_extensions():
        fail(f"-o {str(path)!r}: unknown image extension {path.suffix!r}; use .png, .gif, .jpg, .webp, ...")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir() or (path.exists() and not os.access(path, os.W_OK)):
            raise PermissionError("not a writable file")
        tempfile.TemporaryFile(dir=path.parent).close()
    except OSError as error:
        fail(f"-o {str(path)!r} is not writable: {error.strerror or error}")


@contextlib.contextmanager
def _library_logs(quiet: bool) -> Iterator[None]:
    """With ``quiet``, silence diffusers/transformers warnings for the duration, then restore their levels."""
    if not quiet:
        yield
        return
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    levels = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(levels[0])
        transformers_logging.set_verbosity(levels[1])


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"ditaccel {dit_accel.__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[bool, typer.Option(
        "--version", help="Print the version and exit.", is_eager=True, callback=_print_version)] = False,
) -> None:
    """Training-free acceleration for Diffusers diffusion-transformer pipelines."""


@app.command(epilog="Examples:\n\n  ditaccel recipes\n\n  ditaccel recipes --json")
def recipes(json_output: Annotated[bool, typer.Option("--json", help="Print the recipes as JSON.")] = False) -> None:
    """List the named recipes: name, plugins (joined with '+') and description."""
    try:
        rows = [(r.name, [p.type_name for p in r.plugins], r.description.splitlines()[0] if r.description else "")
                for r in dit_accel.list_recipes()]
    except (ValueError, OSError) as error:
        fail(f"cannot read the named recipes: {_first_line(error)}")
    if json_output:
        typer.echo(json.dumps([{"name": n, "plugins": p, "description": d} for n, p, d in rows], indent=2))
        return
    table = [("NAME", "PLUGINS", "DESCRIPTION")] + [(n, "+".join(p) or "-", d) for n, p, d in rows]
    widths = [max(len(row[i]) for row in table) for i in range(2)]
    for name, plugins, description in table:
        typer.echo(f"{name:<{widths[0]}}  {plugins:<{widths[1]}}  {description}".rstrip())


@app.command(
    epilog="Examples:\n\n"
    "  ditaccel generate --recipe none -o out.png\n\n"
    "  ditaccel generate --model zoo:mmdit --class-label 3 --num-images 8 -o threes.png\n\n"
    "  ditaccel generate --recipe my_recipe.toml --model tiny:flux --prompt 'a red fox' --steps 8\n\n"
    "  ditaccel generate --recipe my_recipe.toml --set interval=4 --model tiny:wan -o clip.gif\n\n"
    "  ditaccel generate --recipe none --model ./saved_pipeline --class-label 207 --no-summary\n\n"
    "  ditaccel generate --recipe fbcache --model tiny:flux --parallel ulysses=2   (two processes, one image)\n\n"
    "--parallel splits every generation over N processes on this machine (one per GPU; CPU: gloo) and relaunches "
    "itself under torchrun: ulysses=N and ring=N with diffusers' context parallelism (models with a _cp_plan: "
    "Flux, Wan, LTX-Video, Qwen-Image; ring needs a CUDA attention backend that returns the log-sum-exp), patch=N "
    "with the patch-parallel plugin (those models and DiT, PixArt, SD3). Process 0 writes the image. Which plugins "
    "combine: the README's Parallelism table."
)
def generate(
    recipe: Annotated[str, typer.Option(
        metavar="NAME|TOML", help="Named recipe ('none', 'a+b' composes) or a .toml recipe file.")] = "none",
    model: Annotated[str, typer.Option(
        metavar="SPEC", help="zoo:<dit|mmdit|flowdit> (trained, offline), tiny:<name> (random-init), a local "
        "pipeline directory, or a hub id.")] = DEFAULT_MODEL,
    prompt: Annotated[str | None, typer.Option(metavar="TEXT", help="Prompt of text-conditional pipelines "
                                               f"(default: tiny's, else '{DEFAULT_PROMPT}').")] = None,
    class_label: Annotated[int | None, typer.Option(metavar="N", help="Class id of class-conditional pipelines, "
                                                    f"e.g. DiT (default: 1 for tiny, else {DEFAULT_CLASS_LABEL}).")]
    = None,
    steps: Annotated[int | None, typer.Option(metavar="N", min=1, help="Number of denoising steps "
                                              f"(default: the pipeline's; {TINY_STEPS} for tiny models).")] = None,
    num_images: Annotated[int, typer.Option(metavar="N", min=1, max=100,
                                            help="Images to generate, saved as one grid.")] = 1,
    seed: Annotated[int, typer.Option(metavar="N", min=0, help="Seed of the initial noise.")] = 0,
    guidance_scale: Annotated[float | None, typer.Option(
        metavar="X", help="Classifier-free guidance scale (default: the pipeline's).")] = None,
    output: Annotated[Path, typer.Option(
        "--output", "-o", metavar="PATH", help="Image to write (.png; .gif animates a video).")] = Path("ditaccel.png"),
    summary: Annotated[bool, typer.Option(help="Print the per-layer acceleration summary.")] = True,
    overrides: Annotated[list[str] | None, typer.Option(
        "--set", metavar="KEY=VALUE", help="Override a recipe field, e.g. interval=4 (repeatable).")] = None,
    device: Annotated[str, typer.Option(
        metavar="DEVICE", help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar, no library warnings.")] = False,
    parallel: Annotated[str | None, typer.Option(
        "--parallel", metavar="KIND=N", help="Split each generation over N processes: ulysses=N, ring=N (diffusers' "
        "context parallelism) or patch=N (the patch-parallel plugin); relaunches itself under torchrun.")] = None,
) -> None:
    """Generate an image (or video) with an accelerated pipeline, save it, and print the timing and summary."""
    import sys

    from dit_accel.bench.distributed import launched_distributed
    from dit_accel.cli import parallel as par

    started = time.perf_counter()
    try:
        resolved = dit_accel.load_recipe(recipe, **parse_overrides(overrides or []))
        setting = par.parse_parallel(parallel) if parallel is not None else None
        if setting is not None and setting.kind == "patch":
            resolved = par.with_patch(resolved, setting)
    except (ValueError, FileNotFoundError, TypeError) as error:
        fail(str(error))
    check_output_path(output)
    if setting is not None and not launched_distributed():
        raise typer.Exit(par.relaunch(setting.processes, sys.argv[1:]))
    main_process = setting is None or par.rank() == 0
    if not main_process:  # the other processes compute their share and say nothing
        quiet = True
        warnings.simplefilter("ignore")
    with _library_logs(quiet):
        pipe, family = load_model(model)
        kwargs = call_kwargs(model, family, pipe, prompt, class_label, steps, seed, guidance_scale, num_images)
        if model.startswith("zoo:"):  # magcache skips from this one generation with the model's shipped curves
            from dit_accel.pipelines.zoo.calibrations import with_shipped_calibration

            resolved, shipped = with_shipped_calibration(resolved, model.partition(":")[2])
            if shipped is not None and not quiet:
                typer.echo(f"magcache: using the calibration shipped with {model} ({shipped.name})")
        if setting is not None:
            where = par.worker_device(device)
            start_parallel_workers(pipe, setting, where, main_process)
            device = str(where)
        handle = accelerate_on(pipe, device, resolved, model)
        pipe.set_progress_bar_config(disable=quiet, desc=f"{family} [{resolved.name}]")
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                out = pipe(**kwargs)
        except ValueError as error:  # diffusers' check_inputs rejects bad arguments with ValueError
            fail(f"{type(pipe).__name__} rejected the arguments: {_first_line(error)}")
        seconds = time.perf_counter() - start
        if not main_process:
            par.finish_workers()
            return
        tensor = output_tensor(model, family, out)
        try:
            save_output(tensor, output)
        except (OSError, ValueError) as error:
            fail(f"cannot write {str(output)!r}: {_first_line(error)}")
        stats = handle.stats
        flops = f", estimated FLOPs {stats.flops_fraction:.1%} of dense" if stats is not None else ""
        what = f"{tensor.shape[0]} x {tensor.shape[1]} frames" if tensor.ndim == 5 else f"{tensor.shape[0]} image(s)"
        typer.echo(f"saved {output} ({what}, {tensor.shape[-1]}x{tensor.shape[-2]} px); generated in {seconds:.2f} s "
                   f"(total {time.perf_counter() - started:.2f} s) with recipe {resolved.name!r}{flops}")
        if summary:
            typer.echo(handle.summary())
        if setting is not None:
            typer.echo(f"(--parallel {setting}: {setting.processes} processes computed each step together)")
            par.finish_workers()


from dit_accel.cli import measure as _measure  # noqa: E402,F401 - registers `bench` and `tune` on `app`
from dit_accel.cli import calibrate as _calibrate  # noqa: E402,F401 - registers `calibrate`


def main() -> None:
    """Console-script entry point (``ditaccel``)."""
    app()


if __name__ == "__main__":
    # `python -m dit_accel.cli.app` runs this file as __main__, a second copy of the module; `bench` and `tune` are
    # registered on the package module's `app`, so run that one.
    from dit_accel.cli.app import main as package_main

    package_main()
