"""Benchmark rows on disk and their reports: ``rows.jsonl``, ``results.md`` and ``pareto.png``.

``rows.jsonl`` holds one JSON object per line, appended (and flushed) as each row finishes, so an interrupted run
keeps what it measured. The file is strict JSON: non-finite floats -- PSNR is ``inf`` for images identical to the
dense ones -- are written as the strings ``"inf"``, ``"-inf"`` and ``"nan"`` (``Infinity`` is not JSON, and jq,
JavaScript or pandas would refuse it). :func:`load_rows` turns them back into floats; ``float("inf")`` does the
same by hand.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import warnings
from pathlib import Path
from typing import Any, Iterable

import torch

ROWS_FILE = "rows.jsonl"
RESULTS_FILE = "results.md"
PARETO_FILE = "pareto.png"

_NON_FINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}
# Fields that hold numbers: only these are decoded from "inf"/"nan" strings (a note saying "nan" stays a string).
_NUMERIC = {"psnr", "ssim", "fd", "class_consistency", "fid", "clip_score", "wall_speedup", "transformer_speedup",
            "flops_speedup", "flops_fraction", "median", "q1", "q3", "iqr"}


def encode(value: Any) -> Any:
    """``value`` with every non-finite float replaced by its string (``"inf"``, ``"-inf"``, ``"nan"``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode(v) for v in value]
    return value


def decode(value: Any, key: str | None = None) -> Any:
    """The inverse of :func:`encode` for the numeric fields of a row."""
    if isinstance(value, dict):
        return {k: decode(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [decode(v, key) for v in value]
    if isinstance(value, str) and key in _NUMERIC and value in _NON_FINITE:
        return _NON_FINITE[value]
    return value


def dumps(row: dict) -> str:
    return json.dumps(encode(row), allow_nan=False, sort_keys=False)


def append_row(path: Path, row: dict) -> None:
    """Append one row to ``rows.jsonl`` and push it to disk (an interrupted run keeps it)."""
    with open(path, "a", encoding="utf-8") as file:
        file.write(dumps(row) + "\n")
        file.flush()
        os.fsync(file.fileno())


def write_rows(path: Path, rows: Iterable[dict]) -> None:
    """Rewrite ``rows.jsonl`` atomically with ``rows``."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(dumps(row) + "\n" for row in rows), encoding="utf-8")
    os.replace(tmp, path)


def load_rows(path: Path) -> list[dict]:
    """The rows of a ``rows.jsonl`` (non-finite numbers restored); a torn last line is skipped with a warning."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            warnings.warn(f"{path}:{number}: not a JSON row (an interrupted write?); ignored", stacklevel=2)
            continue
        if isinstance(row, dict):
            rows.append(decode(row))
    return rows


# ------------------------------------------------------------------------------------------------ environment
def git_commit() -> str | None:
    folder = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(folder), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("+dirty" if dirty else "")) if commit else None


def environment(pipe: Any, device: torch.device) -> dict[str, Any]:
    import diffusers

    import dit_accel

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    return {"device": f"{device.type}: {name}", "machine": platform.machine(), "threads": torch.get_num_threads(),
            "dtype": str(getattr(pipe.transformer, "dtype", "")).replace("torch.", ""), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "dit_accel": dit_accel.__version__, "git": git_commit()}


def parallel_of(row: dict) -> dict[str, Any] | None:
    """The parallel setting a row was measured under (``{"kind": "patch", "degree": 2}``), from its env; ``None``
    for one process per generation, which rows written before the setting was recorded all are."""
    env = row.get("env")
    setting = env.get("parallel") if isinstance(env, dict) else None
    return setting if isinstance(setting, dict) else None


def parallel_label(setting: dict[str, Any] | None) -> str | None:
    """``"patch=2"`` (as ``--parallel`` writes it) for a setting, ``None`` for one process."""
    return None if setting is None else f"{setting.get('kind')}={setting.get('degree')}"


def _env_line(env: dict[str, Any]) -> dict[str, Any]:
    """An env as results.md lists it: the parallel setting as ``patch=2``, left out for one process (so rows from
    before it was recorded list alike)."""
    env = dict(env)
    setting = env.pop("parallel", None)
    if isinstance(setting, dict):
        env["parallel"] = parallel_label(setting)
    return env


# ---------------------------------------------------------------------------------------------------- markdown
def format_number(value: Any, spec: str = ".2f") -> str:
    """A table cell: ``–`` for a missing value, ``∞``/``-∞``, ``nan``, else ``format(value, spec)``; numbers stored
    as strings (``"inf"`` in strict JSON rows) are read back first."""
    if value is None:
        return "–"
    if isinstance(value, str):
        value = float(value)
    if isinstance(value, float) and math.isinf(value):
        return "∞" if value > 0 else "-∞"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return format(value, spec)


def _latency(timing: dict | None) -> str:
    if not timing:
        return "–"
    return f"{timing['median']:.3g} ± {timing['iqr']:.2g}"


def _mib(nbytes: int | None) -> str:
    return "–" if nbytes is None else f"{nbytes / 2**20:.1f}"


def markdown(rows: list[dict], title: str = "dit_accel benchmark", command: str | None = None) -> str:
    """A results table per model (and per steps/samples setting) with the environment of the rows."""
    lines = [f"# {title}", ""]
    if command:
        lines += [f"`{command}`", ""]
    envs = {json.dumps(_env_line(r.get("env") or {}), sort_keys=True) for r in rows}
    for env in sorted(envs):
        data = json.loads(env)
        if data:
            lines.append("- " + ", ".join(f"{k}: {v}" for k, v in data.items()))
    lines += [
        "",
        "Speedups are medians of the ratios of timed pairs, each configured run interleaved with a dense run (A B A "
        "B) in one process after warm-up; latency is the median ± IQR in seconds of one timed batch. FLOPs × is "
        "dit_accel's estimate (anchors report none). PSNR/SSIM against the dense output of the same seeds (∞: "
        "identical). Peak memory: see each group's scope. Notes say which metrics were skipped and why.",
    ]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:  # a parallel setting gets its own table: its speedups are against its own dense runs
        groups.setdefault((row.get("model"), row.get("steps"), row.get("num_samples"), row.get("seed"),
                           row.get("batch"), parallel_label(parallel_of(row))), []).append(row)
    for (model, steps, samples, seed, batch, parallel), group in groups.items():
        scopes = sorted({r["peak_memory_scope"] for r in group if r.get("peak_memory_scope")})
        split = f", each generation split over processes: --parallel {parallel}" if parallel else ""
        lines += ["", f"## {model}: {steps} steps, {samples} samples (seed {seed}, batch {batch}){split}", ""]
        if scopes:
            lines += [f"Peak memory: {'; '.join(scopes)}.", ""]
        lines += ["| configuration | kind | wall × | transformer × | FLOPs × | latency s | dense latency s | "
                  "peak MiB | cache MiB | PSNR dB | SSIM | fd | class cons. (Δ ± se vs dense) | FID | CLIP | notes |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in group:
            notes = "; ".join(r.get("notes") or []).replace("|", "/")
            if r.get("unavailable"):
                lines.append(f"| {r['config']} | {r.get('kind', '')} | unavailable: "
                             f"{str(r['unavailable']).replace('|', '/')} |||||||||||||{notes} |")
                continue
            lines.append(
                f"| {r['config']} | {r.get('kind', '')} | {format_number(r.get('wall_speedup'), '.2f')} | "
                f"{format_number(r.get('transformer_speedup'), '.2f')} | {format_number(r.get('flops_speedup'), '.2f')} | "
                f"{_latency(r.get('latency_s'))} | {_latency(r.get('dense_latency_s'))} | "
                f"{_mib(r.get('peak_memory_bytes'))} | {_mib(r.get('cache_bytes'))} | {format_number(r.get('psnr'), '.2f')} | "
                f"{format_number(r.get('ssim'), '.3f')} | {format_number(r.get('fd'), '.3f')} | {class_consistency_cell(r)}"
                f" | {format_number(r.get('fid'), '.2f')} | {format_number(r.get('clip_score'), '.2f')} | {notes} |")
    lines += ["", f"![speedup vs PSNR]({PARETO_FILE})", ""]
    return "\n".join(lines)


def class_consistency_cell(row: dict) -> str:
    """Class consistency, with its paired change from dense (± one standard error) where the row has one."""
    cell = format_number(row.get("class_consistency"), ".3f")
    if row.get("class_consistency_change") is not None:
        cell += f" ({row['class_consistency_change']:+.3f} ± {row['class_consistency_change_se']:.3f})"
    return cell


# ------------------------------------------------------------------------------------------------------- plot
def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both speedup (x) and quality (y), sorted by speedup."""
    front: list[tuple[float, float]] = []
    best_y = -math.inf
    for x, y in sorted(points, key=lambda p: (-p[0], -p[1])):
        if y > best_y:
            front.append((x, y))
            best_y = y
    return sorted(front)


def plot(rows: list[dict], path: Path) -> str | None:
    """Speedup vs PSNR per model: dit_accel recipes (blue circles), baselines (red squares), dense (black),
    the Pareto front over all of them (dashed). Identical outputs (PSNR ∞) sit on a line at the top. Returns why
    no plot was written, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no pareto.png"
    measured = [r for r in rows if not r.get("unavailable") and isinstance(r.get("psnr"), (int, float))
                and isinstance(r.get("wall_speedup"), (int, float))]
    models = list(dict.fromkeys(r.get("model") for r in rows)) or ["(no rows)"]
    figure, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.8), squeeze=False)
    for axis, model in zip(axes[0], models):
        group = [r for r in measured if r.get("model") == model]
        finite = [r["psnr"] for r in group if math.isfinite(r["psnr"])]
        top = (max(finite) + 5) if finite else 60.0
        points = []
        for r in group:
            y = r["psnr"] if math.isfinite(r["psnr"]) else top
            x = r["wall_speedup"]
            style = {"dense": ("D", "black"), "baseline": ("s", "tab:red")}.get(r.get("kind"), ("o", "tab:blue"))
            axis.scatter(x, y, marker=style[0], color=style[1], zorder=3)
            parallel = parallel_label(parallel_of(r))
            label = str(r["config"]).replace("diffusers:", "d:") + (f" [{parallel}]" if parallel else "")
            axis.annotate(label, (x, y), fontsize=6,
                          xytext=(3, 3), textcoords="offset points")
            points.append((x, y))
        if finite:
            axis.axhline(top, color="gray", lw=0.5, ls=":")
            axis.annotate("PSNR ∞ (identical to dense)", xy=(0.01, top), xycoords=("axes fraction", "data"),
                          xytext=(0, -9), textcoords="offset points", fontsize=6, color="gray")
        front = pareto_front(points)
        if len(front) > 1:
            axis.plot([p[0] for p in front], [p[1] for p in front], ls="--", color="gray", zorder=2,
                      label="Pareto front")
        axis.scatter([], [], marker="o", color="tab:blue", label="dit_accel")
        axis.scatter([], [], marker="s", color="tab:red", label="baselines")
        axis.legend(fontsize=7, loc="lower left")
        axis.set_title(str(model))
        axis.set_xlabel("end-to-end wall speedup vs dense (×)")
        axis.set_ylabel("PSNR vs dense (dB)")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return None


def write_reports(rows: list[dict], out_dir: Path, command: str | None = None) -> list[str]:
    """Write ``results.md`` and ``pareto.png`` into ``out_dir``; returns messages about what was skipped."""
    out_dir = Path(out_dir)
    (out_dir / RESULTS_FILE).write_text(markdown(rows, command=command), encoding="utf-8")
    skipped = plot(rows, out_dir / PARETO_FILE)
    return [skipped] if skipped else []
