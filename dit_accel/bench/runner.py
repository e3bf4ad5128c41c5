"""Measuring one pipeline: generations on fixed seeds, interleaved timing, peak memory, quality metrics.

A :class:`Session` wraps a loaded pipeline. Images for quality are generated in chunks of ``batch`` samples, chunk
``k`` on seed ``seed + k``; timing runs generate chunk 0 (the same seeds, the same batch), so the quality pass of a
configuration is also its warm-up. :meth:`Session.side_by_side` then runs one dense warm-up and ``repeats`` pairs
dense / configured, interleaved (A B A B), and summarizes each side (median, IQR).
"""

from __future__ import annotations

import hashlib
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from dit_accel.bench.baselines import BaselineUnavailable, apply_baseline, calibrate_magcache
from dit_accel.bench.distributed import Ranks
from dit_accel.bench.quality import Quality, fidelity
from dit_accel.bench.timing import TransformerTimer, summarize, synchronize

CALIBRATION_SEED_OFFSET = 10_000  # MagCache calibrates on seed + this, never on the measured seeds


def _plain(run: Callable[[], Any]) -> Any:
    return run()


def timing_dict(seconds: list[float]) -> dict[str, float]:
    t = summarize(seconds)
    return {"median": t.median, "q1": t.q1, "q3": t.q3, "iqr": t.iqr, "runs": t.runs}


class PeakMemory:
    """Peak memory of the runs between :meth:`reset` and :meth:`read`.

    CUDA: ``torch.cuda.max_memory_allocated`` (reset with ``reset_peak_memory_stats``). CPU: the process's peak
    RSS -- the whole process (weights, Python, every library), not the pipeline alone. On Linux the high-water mark
    is reset through ``/proc/self/clear_refs`` and read from ``VmHWM``; elsewhere ``resource.getrusage``'s
    ``ru_maxrss`` is the peak since the process started, which only grows from row to row."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            self.scope = "torch.cuda.max_memory_allocated per configuration"
        elif self._reset_hwm():
            self.scope = "CPU: process peak RSS (VmHWM, reset before each configuration; whole process)"
        else:
            self.scope = "CPU: process peak RSS since start (getrusage ru_maxrss; whole process, only grows)"

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as file:
                file.write("5")
            return True
        except OSError:
            return False

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._reset_hwm()

    def read(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        if "VmHWM" in self.scope:
            try:
                for line in Path("/proc/self/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
            except (OSError, ValueError, IndexError):
                pass
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss if sys.platform == "darwin" else rss * 1024)


def needs_calibration(handle: Any) -> bool:
    """Whether a plugin of ``handle`` calibrates on its next generation (magcache before its first run): that run
    is dense and must not be the one measured."""
    return any(getattr(plugin, "calibrated", True) is False
               for accelerated in handle.transformers for plugin in accelerated.plugins)


def calibrate_if_needed(handle: Any, session: "Session") -> None:
    """Give self-calibrating plugins one untimed generation on seeds that are never measured."""
    if needs_calibration(handle):
        count, seed, offset = session.chunks()[0]
        session.generate(session.kwargs(count, seed + CALIBRATION_SEED_OFFSET, offset))



class RecipeToggle:
    """Switch a recipe on and off a session's pipeline, as side-by-side timing needs: ``enable`` applies it (and
    gives a self-calibrating plugin its untimed calibration run), ``disable`` removes it; ``handles[-1]`` is the
    live handle."""

    def __init__(self, session: "Session", recipe: Any) -> None:
        self.session, self.recipe = session, recipe
        self.handles: list[Any] = []

    def enable(self) -> None:
        from dit_accel import accelerate_dit

        self.handles.append(accelerate_dit(self.session.pipe, self.recipe))
        calibrate_if_needed(self.handles[-1], self.session)

    def disable(self) -> None:
        from dit_accel import remove_acceleration

        self.handles.pop()
        remove_acceleration(self.session.pipe)

class Session:
    """One loaded pipeline and how to call it on the benchmark's seeds."""

    def __init__(self, pipe: Any, spec: str, family: str, *, steps: int, num_samples: int, seed: int, batch: int,
                 guidance_scale: float | None, device: torch.device, ranks: Ranks | None = None) -> None:
        from dit_accel.cli.app import call_kwargs, output_tensor

        self.pipe, self.spec, self.family = pipe, spec, family
        self.steps, self.batch, self.guidance_scale, self.device = steps, batch, guidance_scale, device
        self.num_samples, self.seed = num_samples, seed
        self.ranks = ranks or Ranks()
        self.dense_warm = False  # whether the dense pipeline has just run (its quality pass is a warm-up)
        self._call_kwargs, self._output_tensor = call_kwargs, output_tensor
        transformers = [getattr(pipe, a, None) for a in ("transformer", "transformer_2")]
        self.timers = [TransformerTimer(t) for t in transformers if t is not None]
        self.memory = PeakMemory(device)
        pipe.set_progress_bar_config(disable=True)

    def close(self) -> None:
        for timer in self.timers:
            timer.remove()

    # ------------------------------------------------------------------------------------------ generation
    def kwargs(self, count: int, seed: int, offset: int = 0) -> dict[str, Any]:
        kwargs = self._call_kwargs(self.spec, self.family, self.pipe, None, None, self.steps, seed,
                                   self.guidance_scale, count)
        if self.spec.startswith("zoo:") and "class_labels" in kwargs:  # balanced classes over all chunks
            from dit_accel.pipelines.zoo import NUM_CLASSES

            kwargs["class_labels"] = [(offset + i) % NUM_CLASSES for i in range(count)]
        return kwargs

    def chunks(self) -> list[tuple[int, int, int]]:
        """``(count, seed, offset)`` of each quality chunk: chunk k holds ``batch`` samples on seed ``seed + k``."""
        return [(min(self.batch, self.num_samples - start), self.seed + k, start)
                for k, start in enumerate(range(0, self.num_samples, self.batch))]

    def generate(self, kwargs: dict[str, Any]) -> torch.Tensor:
        with torch.inference_mode():
            out = self.pipe(**kwargs)
        return self._output_tensor(self.spec, self.family, out).float().cpu()

    def quality_pass(self, run: Callable = _plain, after_chunk: Callable[[], Any] | None = None
                     ) -> tuple[torch.Tensor, dict[str, Any], list[Any]]:
        """All quality samples (concatenated in chunk order), the conditioning used (labels, prompts), and what
        ``after_chunk`` returned after each chunk, in chunk order (None without it). In a data-parallel run this
        process generates only its own chunks (:class:`~dit_accel.bench.distributed.Ranks`) and the others' are
        gathered, so every process returns the whole set."""
        mine = []
        for index, (count, chunk_seed, offset) in enumerate(self.chunks()):
            if not self.ranks.owns(index):
                continue
            kwargs = self.kwargs(count, chunk_seed, offset)
            images = run(lambda kwargs=kwargs: self.generate(kwargs))
            extra = after_chunk() if after_chunk is not None else None
            labels = list(kwargs["class_labels"]) if kwargs.get("class_labels") is not None else []
            prompt = kwargs.get("prompt")
            prompts = [] if prompt is None else list(prompt) if isinstance(prompt, (list, tuple)) else \
                [prompt] * len(images)
            mine.append((index, images, labels, prompts, extra))
        records = sorted(self.ranks.gather(mine), key=lambda record: record[0])
        labels = [label for record in records for label in record[2]]
        prompts = [prompt for record in records for prompt in record[3]]
        return (torch.cat([record[1] for record in records]), {"labels": labels or None, "prompts": prompts or None},
                [record[4] for record in records])

    # ---------------------------------------------------------------------------------------------- timing
    def timed(self, run: Callable = _plain) -> tuple[float, float]:
        """One timed generation of chunk 0: (end-to-end seconds, transformer seconds)."""
        count, seed, offset = self.chunks()[0]
        kwargs = self.kwargs(count, seed, offset)
        for timer in self.timers:
            timer.total = 0.0
        synchronize(self.device)
        start = time.perf_counter()
        run(lambda: self.generate(kwargs))
        synchronize(self.device)
        return time.perf_counter() - start, sum(timer.total for timer in self.timers)

    def dense_timing(self, repeats: int) -> dict[str, Any]:
        """``repeats`` timed dense runs (the dense quality pass was the warm-up)."""
        walls, inner = [], []
        self.memory.reset()
        for _ in range(repeats):
            wall, transformer = self.timed()
            walls.append(wall)
            inner.append(transformer)
        return {"latency_s": timing_dict(walls), "transformer_s": timing_dict(inner)}

    def side_by_side(self, repeats: int, enable: Callable[[], None], disable: Callable[[], None],
                     run: Callable = _plain) -> dict[str, Any]:
        """One dense warm-up, then ``repeats`` x (dense, configured), interleaved; the configuration is enabled
        around each of its runs only. Speedups are medians of the pairs' ratios. Peak memory is read over the
        configured runs."""
        self.timed()  # dense warm-up (the configured warm-up was its quality pass)
        dense, config, peak = ([], []), ([], []), 0
        for _ in range(repeats):
            wall, transformer = self.timed()
            dense[0].append(wall)
            dense[1].append(transformer)
            enable()
            try:
                self.memory.reset()
                wall, transformer = self.timed(run)
                peak = max(peak, self.memory.read())
            finally:
                disable()
            config[0].append(wall)
            config[1].append(transformer)
        result = {"latency_s": timing_dict(config[0]), "transformer_s": timing_dict(config[1]),
                  "dense_latency_s": timing_dict(dense[0]), "dense_transformer_s": timing_dict(dense[1]),
                  "peak_memory_bytes": peak}
        # The median of each pair's ratio, not the ratio of the two medians: a pair's dense and configured runs are
        # adjacent in time, so a machine that slows down over the runs moves both (measured here: dense runs drifting
        # 3.4 -> 4.9 s within one benchmark made the ratio of medians disagree with the absolute latencies).
        result["wall_speedup"] = pair_speedup(dense[0], config[0])
        result["transformer_speedup"] = pair_speedup(dense[1], config[1])
        return result


def pair_speedup(dense: list[float], configured: list[float]) -> float | None:
    """Median over interleaved pairs of ``dense / configured`` (``None`` if a configured run took no time)."""
    if not dense or any(c <= 0 for c in configured):
        return None
    ratios = sorted(d / c for d, c in zip(dense, configured))
    middle = len(ratios) // 2
    return ratios[middle] if len(ratios) % 2 else (ratios[middle - 1] + ratios[middle]) / 2


NOISY_IQR = 0.2  # an IQR above this fraction of the median: the machine was busy during the timed runs


def noisy_timing_notes(timing: dict[str, Any]) -> list[str]:
    """A note for each side (configured, dense) whose timed runs spread by more than :data:`NOISY_IQR` of their
    median, since a speedup from such runs says more about the machine's load than about the configuration."""
    notes = []
    for key, side in (("latency_s", "configured"), ("dense_latency_s", "dense")):
        t = timing.get(key)
        if t and t["median"] > 0 and t["iqr"] > NOISY_IQR * t["median"]:
            notes.append(f"noisy timing: the {side} runs' IQR is {t['iqr'] / t['median']:.0%} of their median "
                         "(the machine was busy?); rerun this row, or use more --repeats")
    return notes


# ----------------------------------------------------------------------------------------------- one row
@dataclass
class Entry:
    """One row to measure."""

    label: str
    kind: str  # "dense", "dit_accel" or "baseline"
    name: str
    recipe: Any = None
    setting: dict[str, Any] | None = None
    key: str = ""
    default_setting: bool = True  # a baseline at its documented default setting


def dense_reference(session: Session, key: str, out_dir: Path, resume: bool) -> tuple[torch.Tensor, dict]:
    """The dense samples (reused from ``out_dir/dense/`` when resuming, so a crash does not cost them twice; the
    main process reads and writes the file and hands it to the others)."""
    path = out_dir / "dense" / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.pt"
    saved = torch.load(path, weights_only=True) if resume and session.ranks.is_main and path.is_file() else None
    saved = session.ranks.broadcast(saved)
    if saved is not None:
        return saved["images"], saved["conditioning"]
    images, conditioning, _ = session.quality_pass()
    session.dense_warm = True
    if session.ranks.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"images": images, "conditioning": conditioning}, path)
    return images, conditioning


def measure(entry: Entry, session: Session, quality: Quality | None, dense: torch.Tensor, conditioning: dict,
            config: Any, steps: int) -> dict[str, Any] | None:
    """One row. In a data-parallel run every process generates its share of the samples, the main process alone
    times and scores them (``quality`` is None elsewhere) and the others return None."""
    notes: list[str] = []
    ranks = session.ranks
    if entry.kind == "dense":
        if ranks.is_main:
            if not session.dense_warm:  # the reference came from disk: warm up
                session.timed()
            timing = session.dense_timing(config.repeats)
        ranks.barrier()
        if not ranks.is_main:
            return None
        row = {"latency_s": timing["latency_s"], "transformer_s": timing["transformer_s"],
               "dense_latency_s": timing["latency_s"], "wall_speedup": 1.0, "transformer_speedup": 1.0,
               "flops_fraction": 1.0, "flops_speedup": 1.0, "peak_memory_bytes": session.memory.read(),
               "peak_memory_scope": session.memory.scope, "cache_bytes": 0, "psnr": float("inf"), "ssim": 1.0,
               "rel_l1": 0.0}
        notes.append("the reference: quality metrics of the others are against these images")
        notes.extend(noisy_timing_notes({"latency_s": timing["latency_s"]}))
        row.update(quality.measure(dense, None, conditioning, notes))
        return {**row, "notes": notes}

    pipe = session.pipe
    fractions: list[float] = []
    cache: list[int] = []
    if entry.kind == "dit_accel":
        toggle = RecipeToggle(session, entry.recipe)
        enable, disable, handles = toggle.enable, toggle.disable, toggle.handles

        def after_chunk() -> tuple[float, int] | None:
            stats = handles[-1].stats
            return None if stats is None else (stats.flops_fraction, stats.cache_bytes)

        run = None
        row: dict[str, Any] = {"recipe": entry.recipe.to_dict()}
        try:
            enable()
        except (ValueError, TypeError) as error:
            return {**row, "unavailable": f"cannot apply: {error}", "notes": notes}
    else:
        setting = dict(entry.setting)
        row = {"baseline": entry.name, "setting": {k: v for k, v in setting.items() if k != "mag_ratios"}}
        applied: list = []

        def calibration() -> Any:
            count, seed, offset = session.chunks()[0]
            return session.generate(session.kwargs(count, seed + CALIBRATION_SEED_OFFSET, offset))

        def enable() -> None:
            applied.append(apply_baseline(entry.name, pipe, num_steps=steps, setting=setting, calibration=calibration))

        def disable() -> None:
            applied.pop().remove()

        def run(generate: Callable[[], Any]) -> Any:
            return applied[-1].run(generate)

        after_chunk = None
        try:
            if entry.name == "diffusers:magcache" and "mag_ratios" not in setting:
                setting["mag_ratios"] = calibrate_magcache(pipe, calibration, steps)
                notes.append("MagCache calibrated on its own seed (seed + 10000)")
            enable()
        except BaselineUnavailable as error:
            return {**row, "unavailable": str(error), "notes": notes}
        except Exception as error:  # noqa: BLE001 - third-party code that does not fit this model
            return {**row, "unavailable": f"failed to apply: {type(error).__name__}: {error}"[:300], "notes": notes}
        if not entry.default_setting:
            notes.append("non-default setting")

    kwargs = {"run": run} if run is not None else {}
    session.memory.reset()
    try:  # the quality pass is also the configured warm-up
        images, _, chunk_stats = session.quality_pass(after_chunk=after_chunk, **kwargs)
        quality_peak = session.memory.read()
    finally:
        disable()
    if ranks.is_main:
        timing = session.side_by_side(config.repeats, enable, disable, **kwargs)
    ranks.barrier()
    if not ranks.is_main:
        return None
    notes.extend(noisy_timing_notes(timing))
    for stats in chunk_stats:
        if stats is not None:
            fractions.append(stats[0])
            cache.append(stats[1])
    row.update(timing)
    row["peak_memory_bytes"] = max(row["peak_memory_bytes"], quality_peak)
    row["peak_memory_scope"] = session.memory.scope
    if fractions:  # dit_accel's own estimate, averaged over the quality chunks; anchors report none
        fraction = sum(fractions) / len(fractions)
        row.update(flops_fraction=fraction, flops_speedup=1.0 / fraction if fraction > 0 else None,
                   cache_bytes=max(cache))
    else:
        row.update(flops_fraction=None, flops_speedup=None, cache_bytes=None)
    row.update(fidelity(images, dense))
    row.update(quality.measure(images, dense, conditioning, notes))
    return {**row, "notes": notes}
