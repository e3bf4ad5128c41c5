"""What one generation did: per sub-layer counts and FLOPs (:class:`GenerationStats`, filled by
:class:`dit_accel.core.stats.StatsRecorder`), and the table ``handle.summary()`` prints."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Event = Literal["reused", "forecast", "partial"]


@dataclass
class SubLayerStats:
    """Counts for one sub-layer over one generation."""

    calls: int = 0
    reused: int = 0
    forecast: int = 0
    partial: int = 0
    dense_flops: float = 0.0
    flops: float = 0.0

    @property
    def computed(self) -> int:
        return self.calls - self.reused - self.forecast


@dataclass
class GenerationStats:
    """What one generation did, per sub-layer (``transformer_blocks.3.attn``).

    Transformer calls are counted per shape signature (O(1) per call); the per-sub-layer table is built when read.
    """

    generation: int = 0
    steps: int = 0
    transformer_calls: int = 0
    cache_bytes: int = 0
    names: tuple[str, ...] = ()
    calls_by_signature: dict[tuple, int] = field(default_factory=dict)
    dense_flops_by_signature: dict[tuple, dict[str, float]] = field(default_factory=dict)
    events: dict[str, SubLayerStats] = field(default_factory=dict)
    outside_flops_by_signature: dict[tuple, float] = field(default_factory=dict)
    outside_saved_flops: float = 0.0
    blocks_skipped: int = 0
    notes: dict[str, float] = field(default_factory=dict)  # plugin figures (speca.acceptance, ...)
    # Skipped runs of blocks not yet charged to ``events``: (signature, sub-layers, event) -> [count, FLOPs table].
    # A skipped call charges one counter here instead of every sub-layer it skipped (12-60 of them): folded in when
    # the table is read.
    pending: dict[tuple, list] = field(default_factory=dict)

    def fold(self) -> dict[str, SubLayerStats]:
        """``events`` with the pending skipped runs charged: per sub-layer, what was not computed densely."""
        for (_, names, event), (count, flops) in self.pending.items():
            for name in names:
                stats = self.events.setdefault(name, SubLayerStats())
                setattr(stats, event, getattr(stats, event) + count)
                stats.flops += count * flops[name]
        self.pending.clear()
        return self.events

    def served(self) -> int:
        """Sub-layer runs served from a cache (reused or forecast) so far."""
        return sum(e.reused + e.forecast for e in self.fold().values())

    @property
    def sublayers(self) -> dict[str, SubLayerStats]:
        self.fold()
        table = {}
        for name in self.names:
            dense = sum(count * self.dense_flops_by_signature[key][name] for key, count in self.calls_by_signature.items())
            event = self.events.get(name, SubLayerStats())
            table[name] = SubLayerStats(
                calls=self.transformer_calls,
                reused=event.reused,
                forecast=event.forecast,
                partial=event.partial,
                dense_flops=dense,
                flops=dense - event.flops,  # events accumulate the FLOPs *not* spent
            )
        return table

    @property
    def outside_dense_flops(self) -> float:
        """FLOPs of the Linear/conv layers outside the sub-layers (embeddings, modulation, final layers) in a dense
        run of these calls."""
        return sum(count * self.outside_flops_by_signature.get(key, 0.0)
                   for key, count in self.calls_by_signature.items())

    @property
    def outside_flops(self) -> float:
        """What those layers really cost: the dense figure less the blocks that plugins skipped whole."""
        return self.outside_dense_flops - self.outside_saved_flops

    @property
    def dense_flops(self) -> float:
        return sum(s.dense_flops for s in self.sublayers.values()) + self.outside_dense_flops

    @property
    def flops(self) -> float:
        return sum(s.flops for s in self.sublayers.values()) + self.outside_flops

    @property
    def flops_fraction(self) -> float:
        """Estimated FLOPs spent relative to the dense run (1.0 = nothing saved)."""
        dense = self.dense_flops
        return self.flops / dense if dense else 1.0

    def totals(self) -> dict[str, int]:
        keys = ("calls", "computed", "reused", "forecast", "partial")
        sublayers = self.sublayers.values()
        return {k: sum(getattr(s, k) for s in sublayers) for k in keys}

    def by_block(self) -> dict[str, dict[str, SubLayerStats]]:
        blocks: dict[str, dict[str, SubLayerStats]] = {}
        for name, stats in self.sublayers.items():
            block, _, sublayer = name.rpartition(".")
            blocks.setdefault(block, {})[sublayer] = stats
        return blocks


def format_summary(stats: GenerationStats | None, *, recipe: str, model: str) -> str:
    """The table ``handle.summary()`` prints."""
    if stats is None:
        return f"dit_accel [{model}] recipe {recipe!r}: no generation has run yet"
    fraction = stats.flops_fraction
    speedup = 1.0 / fraction if fraction > 0 else float("inf")
    totals = stats.totals()
    lines = [
        f"dit_accel [{model}] recipe {recipe!r}, generation {stats.generation}: {stats.steps} steps, "
        f"{stats.transformer_calls} transformer calls",
        f"estimated FLOPs: {fraction:.1%} of dense ({speedup:.2f}x), cache memory {stats.cache_bytes / 2**20:.1f} MiB; "
        f"sub-layer calls computed {totals['computed']}, reused {totals['reused']}, forecast {totals['forecast']}, "
        f"partial {totals['partial']}",
        f"outside the sub-layers (embeddings, modulation, final layers): {stats.outside_dense_flops / dense:.1%} of "
        f"dense FLOPs, {stats.blocks_skipped} block calls skipped whole" if (dense := stats.dense_flops) else "",
        ", ".join(f"{key} {value:.3g}" for key, value in stats.notes.items()),
        "",
    ]
    header = f"{'block':<30} {'sub-layer':<12} {'computed':>8} {'reused':>7} {'forecast':>8} {'partial':>7} {'FLOPs':>7}"
    lines += [header, "-" * len(header)]
    for block, sublayers in stats.by_block().items():
        for index, (name, s) in enumerate(sublayers.items()):
            share = s.flops / s.dense_flops if s.dense_flops else 1.0
            label = block if index == 0 else ""
            lines.append(
                f"{label:<30} {name:<12} {s.computed:>8} {s.reused:>7} {s.forecast:>8} {s.partial:>7} {share:>7.1%}"
            )
    return "\n".join(lines)
