"""The config of ``patch-parallel`` (:class:`PatchParallelConfig`): its fields, what each mode accepts, and the
values the plugin (:mod:`dit_accel.parallel.patch`) resolves them to.

``band``, ``pool``, ``correction`` and ``refresh_interval`` only mean something in PCPP mode. Rather than ignore
them silently under DistriFusion, :meth:`PatchParallelConfig.validate` refuses any value there other than the one
that means "off"; which is why ``band``, ``pool`` and ``correction`` default to unset (their PCPP defaults are
:data:`PCPP_DEFAULTS`) instead of to values DistriFusion would have to ignore.
"""

from __future__ import annotations

from dataclasses import dataclass

from dit_accel.parallel.correction import CORRECTIONS
from dit_accel.recipe import PluginConfig, check_bool, check_choice, check_range, register_config

# What an unset pcpp-only field of PatchParallelConfig means under mode="pcpp", and the values of those fields that
# mean "off" and are therefore accepted under mode="distrifusion" (anything else there would be silently ignored).
PCPP_DEFAULTS: dict[str, object] = {"band": 2, "pool": 4, "correction": "detail"}
PCPP_ONLY: dict[str, tuple] = {"band": (None,), "pool": (None,), "correction": (None, "none"),
                               "refresh_interval": (0,), "refresh_growth": (1.0,)}


@register_config("patch-parallel")
@dataclass(frozen=True)
class PatchParallelConfig(PluginConfig):
    """Displaced patch parallelism over ``torch.distributed`` ranks (one patch of token rows per rank).

    Args:
        mode (`str`, defaults to `"distrifusion"`): ``"distrifusion"`` exchanges every row of every patch (one step
            stale); ``"pcpp"`` only ``band`` rows next to the receiving patch plus ``pool`` tiles of the rest.
        warmup_steps (`int`, defaults to `2`): the first steps exchange synchronously and are exact (the first
            step always is: nothing to reuse yet). A value >= the number of steps makes the whole generation exact,
            with no overlap (a correctness check). DistriFusion used 4 of 50. Allowed: 0-10000.
        band (`int`, defaults to unset): pcpp only: rows of the other patches on each side of this rank's patch
            that are exchanged exact; unset means 2. Allowed: 0-4096 with ``mode="pcpp"``, unset with
            ``distrifusion`` (which exchanges every row).
        pool (`int`, defaults to unset): pcpp only: side in tokens of the tiles that summarise the rest of the
            other patches (mean key and value, ``log(count)`` logit bias); 0 drops the rest; unset means 4. Allowed:
            0-256 with ``mode="pcpp"``, unset with ``distrifusion``.
        extrapolate (`bool`, defaults to `True`): forecast the other patches' keys and values at this step from
            the last two exchanged ones (linear in the step index) instead of using the last one as it is: no extra
            bytes, twice the memory for the remote patches. On zoo:mmdit (2 processes, 20 steps, calibration
            seed 7, benchmarks/results/patch-parallel-calibration-seed7-cpu.md) DistriFusion went from 30.8 to
            43.9 dB PSNR against the single-process run; PCPP's error there is its pooled summary, not staleness
            (20.1 -> 20.2 dB). Both modes.
        correction (`str`, defaults to unset): pcpp only: what a rank learns on its synchronous steps to correct
            the pooled tiles on the others, at no extra bytes: ``"detail"`` (the far tokens less their tile mean,
            added back to later tiles; needs ``pool >= 1``), ``"residual"`` (exact minus PCPP output, added to
            later outputs) or ``"none"``; see :mod:`dit_accel.parallel.correction`. Unset means ``"detail"``, or
            ``"none"`` when ``pool = 0`` (no tiles to correct). Allowed: "detail", "residual", "none" with
            ``mode="pcpp"``; unset or "none" with ``distrifusion`` (nothing is pooled, so nothing to correct).
        refresh_interval (`int`, defaults to `0`): pcpp only: every ``refresh_interval``-th step after the warm-up
            is synchronous again (a full exchange, exact, and the correction re-measured; the step before it posts
            nothing, and its bytes count in the plugin's ``bytes_per_step``); 0 never refreshes.
            Allowed: 0-10000 with ``mode="pcpp"``; 0 with ``distrifusion``.
        refresh_growth (`float`, defaults to `1.0`): pcpp only: each gap between refreshes is this many times the
            one before (the first is ``refresh_interval``; gaps rounded, at least 1 step): above 1, the refreshes
            gather in the early steps, where the image's layout and hence the corrections change fastest.
            Allowed: 1-4 with ``mode="pcpp"`` and ``refresh_interval >= 1``; 1 otherwise.

    A field that only applies to ``pcpp`` is refused with ``distrifusion`` rather than ignored: the resolved values
    the plugin uses are :attr:`exchange_band`, :attr:`exchange_pool`, :attr:`active_correction` and
    :attr:`active_refresh_interval`.

    ``steps`` and ``layers`` must stay unset: every rank needs the other patches at every attention layer.
    """

    kind = "parallel"
    mode: str = "distrifusion"
    warmup_steps: int = 2
    band: int | None = None
    pool: int | None = None
    extrapolate: bool = True
    correction: str | None = None
    refresh_interval: int = 0
    refresh_growth: float = 1.0

    def validate(self) -> None:
        check_choice(self, "mode", ("distrifusion", "pcpp"))
        check_bool(self, "extrapolate")
        check_range(self, "warmup_steps", 0, 10000, integer=True)
        check_range(self, "refresh_interval", 0, 10000, integer=True)
        check_range(self, "refresh_growth", 1.0, 4.0)
        if self.correction is not None:
            check_choice(self, "correction", CORRECTIONS)
        for name, high in (("band", 4096), ("pool", 256)):
            if getattr(self, name) is not None:
                check_range(self, name, 0, high, integer=True)
        if self.steps is not None or self.layers is not None:
            raise ValueError("PatchParallelConfig: steps and layers must be unset; patch-parallel splits every "
                             "attention layer at every step (a layer left out would attend within its patch only)")
        if self.mode == "distrifusion":
            ignored = [f"{name} = {getattr(self, name)!r}" for name, off in PCPP_ONLY.items()
                       if getattr(self, name) not in off]
            if ignored:
                which, them = ("these fields only apply", "them") if len(ignored) > 1 else (
                    "this field only applies", "it")
                raise ValueError(
                    f"PatchParallelConfig: {', '.join(ignored)}: {which} to mode='pcpp'; mode='distrifusion' "
                    f"exchanges every row of every patch and would ignore {them}. Allowed with 'distrifusion': band, "
                    "pool and correction unset (correction = 'none' is accepted), refresh_interval = 0 and "
                    "refresh_growth = 1; or set mode = 'pcpp'")
            return
        if self.refresh_growth != 1.0 and self.refresh_interval == 0:
            raise ValueError(f"PatchParallelConfig: refresh_growth = {self.refresh_growth} spaces the refreshes, and "
                             "refresh_interval = 0 makes none; set refresh_interval >= 1 or leave refresh_growth at 1")
        if self.exchange_band == 0 and self.exchange_pool == 0:
            raise ValueError("PatchParallelConfig: mode='pcpp' with band = 0 and pool = 0 exchanges nothing (patches "
                             "would never see each other); set band >= 1 or pool >= 1")
        if self.correction == "detail" and self.exchange_pool == 0:
            raise ValueError("PatchParallelConfig: correction = 'detail' corrects the pooled tiles, and pool = 0 "
                             "makes none (the far rows are dropped); allowed with pool = 0: correction = 'residual' "
                             "or 'none' (or unset); or set pool >= 1")

    # The values the plugin uses: the pcpp-only fields resolved to their pcpp defaults, or to "off" in distrifusion.
    @property
    def exchange_band(self) -> int | None:
        """Rows next to a patch exchanged exact (``None``: every row, DistriFusion)."""
        if self.mode != "pcpp":
            return None
        return PCPP_DEFAULTS["band"] if self.band is None else self.band

    @property
    def exchange_pool(self) -> int:
        """Side of the tiles summarising the far rows (0: none)."""
        if self.mode != "pcpp":
            return 0
        return PCPP_DEFAULTS["pool"] if self.pool is None else self.pool

    @property
    def active_correction(self) -> str:
        """The correction applied: one of :data:`~dit_accel.parallel.correction.CORRECTIONS`."""
        if self.mode != "pcpp":
            return "none"
        if self.correction is not None:
            return self.correction
        return PCPP_DEFAULTS["correction"] if self.exchange_pool > 0 else "none"

    @property
    def active_refresh_interval(self) -> int:
        """Steps between synchronous refreshes after the warm-up (0: never)."""
        return self.refresh_interval if self.mode == "pcpp" else 0
