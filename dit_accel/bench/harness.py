"""The benchmark harness behind ``ditaccel bench``: recipes and baselines side by side on one pipeline.

    from dit_accel.bench.harness import BenchConfig, run_bench
    rows = run_bench(BenchConfig(model="zoo:dit", recipes=["none", "fora", "fora@interval=4"],
                                 baselines=["diffusers:fbcache@threshold=0.2"], steps=20, num_samples=16,
                                 repeats=3, out_dir=Path("results")))

What a run does (see ``docs/evaluation.md``):

1. the dense pipeline generates ``num_samples`` images on seeds derived from ``seed`` (chunks of ``batch`` samples,
   chunk k on seed ``seed + k``), and is timed (its quality pass is the warm-up) -- the ``dense`` row;
2. every recipe and baseline generates the same samples on the same seeds (its warm-up), then is timed
   side by side with the dense pipeline: one dense warm-up, ``repeats`` x (dense, configured), interleaved;
3. each row gets end-to-end and transformer-only latency (median, IQR), wall and FLOPs speedup, peak memory,
   the caches' memory, PSNR/SSIM/relative L1 against the dense output, and the distribution metrics (zoo: fd to
   real data and class consistency; other models: FID/CLIP only with user-supplied weights, else a note);
4. rows are appended to ``out_dir/rows.jsonl`` as they finish; ``resume=True`` keeps the rows already there
   (same key: model, configuration, steps, samples, seed, batch, and the parallel setting) and measures only the
   rest. At the end ``results.md`` and ``pareto.png`` are written from every row in the file.

Under ``--parallel`` (each generation split over processes) every row records the setting in its ``env``
(``"parallel": {"kind": "patch", "degree": 2}``; ``None`` for one process) and in its key, so a resumed run never
takes a single-process row for a split one or the other way round. A single-process row's key is what it was
before the setting was recorded (rows.jsonl files from then still resume, and rows without the field are single
process).

Recipes and baselines are written ``name`` or ``name@field=value,field=value`` (values: numbers, true/false,
strings, lists in brackets). The baselines' defaults are :data:`DEFAULT_BASELINE_SETTINGS`; given fields replace
those of the default.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from dit_accel.bench import report
from dit_accel.bench.baselines import BASELINES
from dit_accel.bench.distributed import Ranks, check_parallel, parallel_setting
from dit_accel.bench.quality import Quality
from dit_accel.bench.runner import Entry, Session, dense_reference, measure, timing_dict
from dit_accel.recipe import parse_value

# diffusers' TaylorSeer matches names with re.fullmatch; its default pattern misses DiT/PixArt's attn1/attn2/ff and
# Wan's ffn, and would silently hook nothing: name the attention and MLP sub-layers of every family.
TAYLORSEER_IDENTIFIERS = [r"(single_)?transformer_blocks\.\d+\.(attn|attn1|attn2|ff|ff_context|proj_mlp)",
                          r"blocks\.\d+\.(attn1|attn2|ffn)"]
DEFAULT_BASELINE_SETTINGS: dict[str, dict[str, Any]] = {
    "diffusers:fbcache": {"threshold": 0.1},
    "diffusers:taylorseer": {"cache_interval": 3, "max_order": 1, "disable_cache_before_step": 3,
                             "cache_identifiers": TAYLORSEER_IDENTIFIERS},
    "diffusers:magcache": {"threshold": 0.06, "max_skip_steps": 3, "retention_ratio": 0.2},
    "diffusers:fastercache": {"spatial_attention_block_skip_range": 2},
    "diffusers:pab": {"spatial_attention_block_skip_range": 2},
    "cache-dit:dbcache": {"residual_diff_threshold": 0.08, "max_warmup_steps": 2},
    "cache-dit:dbcache+taylorseer": {"residual_diff_threshold": 0.16, "max_warmup_steps": 2},
    "cache-dit:dbcache+foca": {"residual_diff_threshold": 0.16, "max_warmup_steps": 2},
    "cache-dit:dbcache+dmd": {"residual_diff_threshold": 0.16, "max_warmup_steps": 2},
    "cache-dit:dbcache+scm": {"max_warmup_steps": 2, "mask_policy": "medium", "steps_computation_policy": "static"},
}


@dataclass
class BenchConfig:
    """One benchmark: a model, the configurations to compare with its dense run, and how to measure them."""

    model: str = "zoo:dit"
    recipes: list[str] = field(default_factory=lambda: ["none"])
    baselines: list[str] = field(default_factory=list)
    steps: int | None = None  # None: the pipeline's default (20 for tiny models)
    num_samples: int = 8
    seed: int = 0
    repeats: int = 3
    batch: int = 2  # samples per generation: the timing batch, and the chunk size of the quality pass
    out_dir: Path = Path("bench-results")
    resume: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)  # --set: applied to every recipe that has the field
    guidance_scale: float | None = None
    device: str = "auto"
    fid_weights: Path | None = None
    clip_model: Path | None = None
    command: str | None = None  # the command line, quoted in results.md
    # How each generation is split over processes: {"kind": "patch", "degree": 2}, None for one process, or "auto":
    # read from the pipeline and the recipes when the run starts (distributed.parallel_setting).
    parallel: dict[str, Any] | None | str = "auto"


# ---------------------------------------------------------------------------------------------------- parsing
def _split(text: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` outside brackets."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "(": 1, "]": -1, ")": -1}.get(char, 0)
        if char == sep and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return parts + [current]


_SETTING = re.compile(r"\s*[A-Za-z_]\w*\s*=")


def split_items(texts: str | list[str]) -> list[str]:
    """``"none,fora@interval=4,first_steps=2,diffusers:fbcache"`` -> ``["none", "fora@interval=4,first_steps=2",
    "diffusers:fbcache"]``: a piece ``field=value`` continues the settings of the item before it."""
    items: list[str] = []
    for text in [texts] if isinstance(texts, str) else texts:
        for piece in _split(text):
            piece = piece.strip()
            if not piece:
                continue
            if _SETTING.match(piece) and items and "@" in items[-1]:
                items[-1] += "," + piece
            else:
                items.append(piece)
    return items


def parse_item(item: str) -> tuple[str, dict[str, Any]]:
    """``"fora@interval=4,first_steps=2"`` -> ``("fora", {"interval": 4, "first_steps": 2})``."""
    name, sep, rest = item.partition("@")
    settings: dict[str, Any] = {}
    for piece in _split(rest) if sep else []:
        key, eq, value = piece.partition("=")
        if not eq or not key.strip().isidentifier():
            raise ValueError(f"{item!r}: settings are written name@field=value,field=value; cannot read {piece!r}")
        settings[key.strip()] = parse_value(value)
    return name.strip(), settings


def _label(name: str, settings: dict[str, Any]) -> str:
    if not settings:
        return name
    return name + "@" + ",".join(f"{k}={json.dumps(v) if isinstance(v, (list, str)) else v}"
                                 for k, v in settings.items())


def _digest(data: Any) -> str:
    return hashlib.sha1(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:10]


# --------------------------------------------------------------------------------------------------- planning
def _baseline_fields(name: str) -> list[str] | None:
    """The settings a baseline accepts (those the harness sets itself excluded); None when unknown here."""
    if name.startswith("diffusers:"):
        import diffusers

        cls = {"fbcache": diffusers.FirstBlockCacheConfig, "taylorseer": diffusers.TaylorSeerCacheConfig,
               "magcache": diffusers.MagCacheConfig, "fastercache": diffusers.FasterCacheConfig,
               "pab": diffusers.PyramidAttentionBroadcastConfig}[name.split(":")[1]]
        excluded = {"taylor_factors_dtype", "num_inference_steps", "calibrate", "current_timestep_callback",
                    "_unconditional_conditional_input_kwargs_identifiers"}
    else:
        try:
            from cache_dit import DBCacheConfig as cls
        except ImportError:
            return None
        excluded = {"Fn_compute_blocks", "Bn_compute_blocks", "num_inference_steps"}
    names = ([f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls)
             else list(inspect.signature(cls).parameters))
    extra = ["mask_policy"] if name == "cache-dit:dbcache+scm" else []  # the steps mask's policy (baselines.py)
    return [n for n in names if n not in excluded] + extra


def _apply_overrides(recipe: Any, overrides: dict[str, Any], used: set[str]) -> Any:
    """Apply each ``--set`` field to the recipe if one of its plugins has it; ``used`` collects the applied keys."""
    applicable = {}
    for key, value in overrides.items():
        type_name, _, name = key.rpartition("__")
        if any(name in p.field_names() and (not type_name or p.type_name == type_name.replace("_", "-"))
               for p in recipe.plugins):
            applicable[key] = value
            used.add(key)
    return recipe.with_overrides(**applicable) if applicable else recipe


def plan(config: BenchConfig, steps: int) -> list[Entry]:
    """The rows of ``config`` (dense first), validated; raises ValueError naming the bad recipe, baseline,
    setting or override."""
    from dit_accel import load_recipe

    base = {"model": config.model, "steps": steps, "samples": config.num_samples, "seed": config.seed,
            "batch": config.batch, "guidance": config.guidance_scale}
    parallel = check_parallel(None if config.parallel == "auto" else config.parallel)
    entries = [Entry("dense", "dense", "dense")]
    used: set[str] = set()
    for item in split_items(config.recipes):
        name, settings = parse_item(item)
        try:
            recipe = load_recipe(name, **settings)
            recipe = _apply_overrides(recipe, config.overrides, used)
            if config.model.startswith("zoo:"):  # as `ditaccel generate` does: magcache uses the shipped curves
                from dit_accel.pipelines.zoo.calibrations import with_shipped_calibration

                recipe = with_shipped_calibration(recipe, config.model.partition(":")[2])[0]
        except FileNotFoundError as error:
            raise ValueError(str(error)) from None
        entries.append(Entry(_label(name, settings), "dit_accel", name, recipe=recipe))
    if config.overrides and not set(config.overrides) <= used:
        unused = sorted(set(config.overrides) - used)
        raise ValueError(f"--set {', '.join(unused)}: no plugin of the recipes ({', '.join(config.recipes)}) has "
                         "that field")
    for item in split_items(config.baselines):
        name, settings = parse_item(item)
        if name not in BASELINES:
            raise ValueError(f"unknown baseline {name!r}; allowed: {', '.join(BASELINES)} "
                             "(settings as name@field=value,...)")
        allowed = _baseline_fields(name)
        unknown = sorted(set(settings) - set(allowed)) if allowed is not None else []
        if unknown:
            raise ValueError(f"baseline {name!r} has no setting {', '.join(unknown)}; allowed: {', '.join(allowed)}")
        setting = {**DEFAULT_BASELINE_SETTINGS[name], **settings}
        entries.append(Entry(_label(name, settings), "baseline", name, setting=setting, default_setting=not settings))
    labels = [e.label for e in entries]
    for entry in entries:
        if labels.count(entry.label) > 1:
            raise ValueError(f"configuration {entry.label!r} is listed twice")
        entry.key = row_key(config, entry, steps, base, parallel)
    return entries


def row_key(config: BenchConfig, entry: Entry, steps: int, base: dict[str, Any],
            parallel: dict[str, Any] | None) -> str:
    """The resume key of ``entry``'s row: readable fields and a digest of everything the row depends on. The
    parallel setting joins both only when there is one, so single-process keys stay what they always were."""
    content = entry.recipe.to_dict() if entry.recipe is not None else entry.setting
    split = f"|parallel={parallel['kind']}={parallel['degree']}" if parallel is not None else ""
    digested = [base, content] if parallel is None else [{**base, "parallel": parallel}, content]
    return (f"{config.model}|{entry.label}|steps={steps}|samples={config.num_samples}|seed={config.seed}|"
            f"batch={config.batch}{split}|{_digest(digested)}")


def resolve_steps(config: BenchConfig, pipe: Any) -> int:
    if config.steps is not None:
        return config.steps
    if config.model.startswith("tiny:"):
        from dit_accel.cli.app import TINY_STEPS

        return TINY_STEPS
    default = inspect.signature(pipe.__call__).parameters.get("num_inference_steps")
    return default.default if default is not None and isinstance(default.default, int) else 50


# ---------------------------------------------------------------------------------------------------- running
def run_bench(config: BenchConfig, progress: bool = True, *, pipe: Any = None, family: str | None = None,
              on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """Measure every configuration of ``config`` against the dense pipeline; returns this run's rows (kept and
    new, dense first). ``pipe``/``family``: an already-loaded pipeline for ``config.model`` (else it is loaded
    with the CLI's ``load_model``). Raises ValueError on a bad configuration, before generating anything.

    Under a multi-process launcher (torchrun, ``accelerate launch``) the samples are split across the processes
    and gathered (:mod:`dit_accel.bench.distributed`); the main process measures, writes and returns the rows,
    the others return an empty list."""
    from tqdm.auto import tqdm

    from dit_accel.cli.app import load_model

    if config.num_samples < 1 or config.repeats < 1 or config.batch < 1:
        raise ValueError("num_samples, repeats and batch must be at least 1")
    ranks = Ranks()
    out_dir = Path(config.out_dir)
    if ranks.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    if pipe is None:
        pipe, family = load_model(config.model)
    steps = resolve_steps(config, pipe)
    entries = plan(config, steps)
    if config.parallel == "auto":  # read from the pipeline as the launcher left it, then keyed by it
        recipes = [entry.recipe for entry in entries if entry.recipe is not None]
        config = dataclasses.replace(config, parallel=parallel_setting(pipe, recipes))
        entries = plan(config, steps)
    if config.device == "auto":
        device = ranks.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(config.device)
    pipe.to(device)

    rows_path = out_dir / report.ROWS_FILE
    done: dict[str, dict] = {}
    if ranks.is_main:
        previous = report.load_rows(rows_path) if config.resume else []
        kept = [r for r in previous if not r.get("unavailable")]  # unavailable rows are tried again
        done = {r.get("key"): r for r in kept}
        report.write_rows(rows_path, kept)
    done_keys = ranks.broadcast(sorted(k for k in done if k is not None))
    todo = [e for e in entries if e.key not in done_keys]
    results: dict[str, dict] = {e.key: done[e.key] for e in entries if e.key in done}

    bar = tqdm(total=len(entries), initial=len(entries) - len(todo), desc=f"bench {config.model}", unit="row",
               file=sys.stderr, disable=not progress or not ranks.is_main)
    if todo:
        session = Session(pipe, config.model, family or "", steps=steps, num_samples=config.num_samples,
                          seed=config.seed, batch=config.batch, guidance_scale=config.guidance_scale, device=device,
                          ranks=ranks)
        try:
            quality = (Quality(config.model, config.num_samples, config.fid_weights, config.clip_model)
                       if ranks.is_main else None)
            env = {**report.environment(pipe, device), "processes": ranks.count, "parallel": config.parallel}
            bar.set_postfix_str("dense")
            dense, conditioning = dense_reference(session, entries[0].key, out_dir, config.resume)
            for entry in todo:
                bar.set_postfix_str(entry.label)
                common = {"key": entry.key, "model": config.model, "config": entry.label, "kind": entry.kind,
                          "steps": steps, "num_samples": config.num_samples, "seed": config.seed,
                          "seeds": [s for _, s, _ in session.chunks()], "batch": config.batch,
                          "repeats": config.repeats, "output_shape": list(dense.shape[1:])}
                row = measure(entry, session, quality, dense, conditioning, config, steps)
                if not ranks.is_main:
                    continue
                row = {**common, **row, "env": env, "timestamp": time.time()}
                report.append_row(rows_path, row)
                results[entry.key] = row
                if on_row is not None:
                    on_row(row)
                bar.update(1)
        finally:
            session.close()
            bar.close()
    else:
        bar.close()
    if not ranks.is_main:
        return []
    all_rows = report.load_rows(rows_path)
    report.write_reports(all_rows, out_dir, command=config.command)
    return [results[e.key] for e in entries]


__all__ = ["BenchConfig", "DEFAULT_BASELINE_SETTINGS", "Entry", "parse_item", "plan", "row_key", "run_bench",
           "split_items", "timing_dict"]
