"""FreqCa: frequency-split caching of the whole block stack (after ``Tammytcl/FreqCa``).

On a full step every block runs and the residual of the whole stack (output of the last block minus input of the
first, image-token stream) is split on the token grid with an orthonormal 2-D DCT-II, per frame: the **low** band
(coefficients whose normalised radial index ``sqrt((u/H)^2 + (v/W)^2)`` is within ``cutoff`` of the largest) changes
slowly from step to step and is **reused**; the **high** band changes fast but smoothly and is **forecast**
(HiCache's Hermite forecast of order 2 by default, any :mod:`~dit_accel.caching.forecasters` kind). On a cheap step
no block runs: the last block returns ``input + low + forecast(high)``.

Where we differ from the reference, and why:

* the cached quantity is the stack's *residual*, not its output, so the embedding of the current step stays fresh;
  ``final_layer`` runs with the current conditioning either way;
* the DCT runs on the real ``frames x height x width`` grid (the reference assumes one square frame), with the
  radial index normalised per axis so non-square grids keep a round low band;
* the encoder (text) stream's residual, where a family returns one, and text tokens that share the hidden stream
  are reused whole: no family reads them after the last block, so a forecast would cost memory for nothing;
* a residual that cannot be laid on the grid (extra condition tokens, uneven shards) is never approximated: that
  call computes, and the plugin says why once;
* under sequence parallelism (``ulysses``/``ring``/``patch``) each rank holds a shard of rows; the shards are
  gathered on full steps, split on the whole grid, and each rank keeps its rows of both bands: the bands, and the
  decisions (a fixed schedule), are the single-process ones.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from dit_accel.caching.blockrange import BlockRange
from dit_accel.caching.forecasters import check_forecaster, config_forecaster
from dit_accel.core.blocks import TokenGrid
from dit_accel.core.context import CallContext
from dit_accel.core.parallel import all_gather_tokens, parallel_setting, shard_positions
from dit_accel.core.plugin import Plugin, register_plugin
from dit_accel.recipe import PluginConfig, check_choice, check_range, register_config

# ------------------------------------------------------------------------------------------- pure functions
_DCT_MATRICES: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}
_MASKS: dict[tuple[int, int, float, torch.device], torch.Tensor] = {}


def dct_matrix(n: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """The orthonormal DCT-II matrix ``C`` of size ``n`` (``C[k, i] = s_k cos(pi (2i + 1) k / 2n)``, ``s_0 =
    sqrt(1/n)``, ``s_k = sqrt(2/n)``): ``C @ x`` transforms, ``C.T @ X`` inverts. Built in float64 once per
    ``(n, dtype, device)`` and cached (a few KiB each)."""
    device = torch.device(device)
    key = (n, dtype, device)
    matrix = _DCT_MATRICES.get(key)
    if matrix is None:
        k = torch.arange(n, dtype=torch.float64).unsqueeze(1)
        i = torch.arange(n, dtype=torch.float64).unsqueeze(0)
        matrix = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
        matrix[0] /= math.sqrt(2.0)
        matrix = _DCT_MATRICES[key] = matrix.to(dtype=dtype, device=device)
    return matrix


def _as_grid(x: torch.Tensor, grid: TokenGrid) -> torch.Tensor:
    if x.ndim != 3 or x.shape[1] != grid.num_tokens:
        raise ValueError(f"expected tokens (B, {grid.num_tokens}, D) on the grid {grid}, got {tuple(x.shape)}")
    return x.reshape(x.shape[0], grid.frames, grid.height, grid.width, x.shape[2])


def dct_2d(x: torch.Tensor, grid: TokenGrid) -> torch.Tensor:
    """Orthonormal 2-D DCT-II over height and width, per frame, of tokens ``x`` (B, F*H*W, D) in frame-row-column
    order; returns coefficients of the same shape, indexed ``(frame, u, v)`` in the same order."""
    c_h = dct_matrix(grid.height, x.dtype, x.device)
    c_w = dct_matrix(grid.width, x.dtype, x.device)
    return torch.einsum("uh,bfhwd,vw->bfuvd", c_h, _as_grid(x, grid), c_w).reshape(x.shape)


def idct_2d(coefficients: torch.Tensor, grid: TokenGrid) -> torch.Tensor:
    """Inverse of :func:`dct_2d` (the transposed matrices: the transform is orthonormal)."""
    c_h = dct_matrix(grid.height, coefficients.dtype, coefficients.device)
    c_w = dct_matrix(grid.width, coefficients.dtype, coefficients.device)
    return torch.einsum("uh,bfuvd,vw->bfhwd", c_h, _as_grid(coefficients, grid), c_w).reshape(coefficients.shape)


def low_mask(height: int, width: int, cutoff: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool (H, W): the DCT coefficients of the low band, ``r(u, v) <= cutoff * max r`` with ``r = sqrt((u/H)^2 +
    (v/W)^2)`` (normalised per axis, so a non-square grid's band is round in relative frequency; on a square grid
    it is the reference's ``sqrt(u^2 + v^2) <= cutoff * max``). The DC coefficient is always low."""
    device = torch.device(device)
    key = (height, width, float(cutoff), device)
    mask = _MASKS.get(key)
    if mask is None:
        u = (torch.arange(height, dtype=torch.float64) / height).unsqueeze(1)
        v = (torch.arange(width, dtype=torch.float64) / width).unsqueeze(0)
        radius = torch.sqrt(u * u + v * v)
        mask = _MASKS[key] = (radius <= cutoff * radius.max()).to(device)
    return mask


def split_bands(x: torch.Tensor, grid: TokenGrid, cutoff: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(low, high)`` of tokens ``x`` (B, F*H*W, D) on ``grid``: ``low`` keeps the DCT coefficients of
    :func:`low_mask`, ``high = x - low`` (so ``low + high == x`` up to one rounding). Computed in float32 at least
    (as the reference does) and returned in ``x``'s dtype. ``cutoff`` 0-1; at 1 ``low`` is ``x`` itself and
    ``high`` exactly zero."""
    mask = low_mask(grid.height, grid.width, cutoff, x.device)
    if bool(mask.all()):
        return x, torch.zeros_like(x)
    work = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    coefficients = dct_2d(work, grid)
    keep = mask.to(work.dtype).view(1, 1, grid.height, grid.width, 1)
    coefficients = (_as_grid(coefficients, grid) * keep).reshape(x.shape)
    low = idct_2d(coefficients, grid)
    return low.to(x.dtype), (work - low).to(x.dtype)


def image_slice(num_tokens: int, grid: TokenGrid | None, num_text_tokens: int,
                text_position: str | None) -> slice | None:
    """Where the grid's tokens sit in a hidden stream of ``num_tokens`` tokens: all of them, or all but the text
    tokens a joint single-stream block keeps in front of (``"first"``) or behind (``"last"``) them; ``None`` when
    the stream cannot be laid on the grid (unknown grid, a shard, extra condition tokens)."""
    if grid is None or grid.num_tokens == 0:
        return None
    if num_tokens == grid.num_tokens:
        return slice(0, num_tokens)
    if num_text_tokens and num_tokens == grid.num_tokens + num_text_tokens:
        if text_position == "first":
            return slice(num_text_tokens, num_tokens)
        if text_position == "last":
            return slice(0, grid.num_tokens)
    return None


def full_step(step: int, num_steps: int | None, interval: int, first_steps: int, last_steps: int) -> bool:
    """FreqCa's schedule: full for ``step < first_steps``, then once every ``interval`` steps counting from the
    last warm-up step (interval 6, first_steps 3: 0, 1, 2, 8, 14, ...), and on the final ``last_steps`` steps."""
    if step < first_steps or interval <= 1:
        return True
    if num_steps is not None and step >= num_steps - last_steps:
        return True
    return (step - first_steps + 1) % interval == 0


# ------------------------------------------------------------------------------------------------- config
@register_config("freqca")
@dataclass(frozen=True)
class FreqCaConfig(PluginConfig):
    """FreqCa: skip the whole block stack between full steps; reuse the residual's low spatial frequencies and
    forecast its high ones.

    Args:
        interval (`int`, defaults to `6`): one full step every ``interval`` steps after the warm-up (the paper: 6,
            9 for its aggressive setting); 1 disables the cache. Recommended 3-9. Allowed: 1-50.
        first_steps (`int`, defaults to `3`): warm-up steps that always compute (the reference's
            ``first_enhance``); the forecast's history starts at step ``first_steps - 2``, as the reference's.
            Allowed: 0-1000.
        last_steps (`int`, defaults to `1`): final steps that always compute (the reference has none; fine
            detail forms there). Allowed: 0-1000.
        cutoff (`float`, defaults to `0.1`): the low band's radius as a fraction of the largest normalised DCT
            radius (the reference's hard-coded 0.1); 1 puts everything in the low band (plain reuse of the
            residual). Recommended 0.05-0.3. Allowed: 0-1.
        order (`int`, defaults to `2`): the high band's forecast order (0 reuses it too). Allowed: 0-4.
        forecaster (`str`, defaults to `"hermite"`): the high band's forecast (see
            :mod:`dit_accel.caching.forecasters`): ``"hermite"`` (the reference), ``"taylor"`` (Newton
            polynomial), ``"foca"`` (order 0-1 only).
        sigma (`float`, defaults to `0.71`): the Hermite scale (the reference's 0.71, about probabilists'
            Hermite). Allowed: 0.01-4.
        horizon (`float`, defaults to `1.0`): the FoCa forecaster's horizon in full-step gaps. Allowed: 0.1-100.
        distance (`str`, defaults to `"step"`): positions of the forecast in step indices (``"step"``, the
            reference: its Hermite ``sigma`` is tuned for distances of a few steps) or in the transformer's
            timestep input (``"timestep"``, for non-uniform schedules with ``"taylor"``).
    """

    kind = "schedule"
    interval: int = 6
    first_steps: int = 3
    last_steps: int = 1
    cutoff: float = 0.1
    order: int = 2
    forecaster: str = "hermite"
    sigma: float = 0.71
    horizon: float = 1.0
    distance: str = "step"

    def validate(self) -> None:
        check_range(self, "interval", 1, 50, integer=True)
        check_range(self, "first_steps", 0, 1000, integer=True)
        check_range(self, "last_steps", 0, 1000, integer=True)
        check_range(self, "cutoff", 0.0, 1.0)
        check_range(self, "order", 0, 4, integer=True)
        check_choice(self, "distance", ("step", "timestep"))
        check_forecaster(self, "order")


# ------------------------------------------------------------------------------------------------- plugin
class _BandRange(BlockRange):
    """A :class:`BlockRange` whose skipped residual is ``low + forecast(high)`` on the image tokens.

    The base keeps the whole residual per slot (order 0: no history of its own); this adds, per slot, the low band
    of the image tokens and the forecaster state of the high band. Decisions are per call (a schedule), so the
    base's mixed-row path, which would restart histories, never runs."""

    def __init__(self, plugin: "FreqCaPlugin", blocks: int) -> None:
        super().__init__(plugin.target, "dit_accel.freqca", plugin, 0, blocks, forecast_order=0)
        self.plugin = plugin
        self.high_forecaster = config_forecaster(plugin.config, "order")
        self.bands: dict[int, tuple[slice, torch.Tensor, object]] = {}  # slot -> (image slice, low, high state)

    def end(self, context: CallContext, output, contract):
        output = super().end(context, output, contract)
        plugin = self.plugin
        residual = self.residuals[context.slot][0]
        where = plugin.image_part(residual.shape[1], context)
        if where is None:  # decide() let this call compute for that reason; nothing to split
            self.bands.pop(context.slot, None)
            return output
        low, high = plugin.bands(residual[:, where], context)
        previous = self.bands.get(context.slot)
        # The reference's derivative ladder starts at step first_enhance - 2: the noisiest steps' differences would
        # mislead the forecast for the whole schedule.
        warm_up = context.step <= plugin.config.first_steps - 2
        state = None if previous is None or previous[0] != where or warm_up else previous[2]
        self.bands[context.slot] = (where, low, self.high_forecaster.update(state, high, plugin.position(context)))
        self.target.stats.set_cache_bytes(self.nbytes())
        return output

    def residual_for(self, context: CallContext):
        residual, encoder = self.residuals[context.slot]
        band = self.bands.get(context.slot)
        if band is None:
            return residual, encoder
        where, low, state = band
        high, advanced = self.high_forecaster.predict(state, self.plugin.position(context))
        self.bands[context.slot] = (where, low, advanced)  # FoCa's recursion moves by one value per step
        image = low + high.to(low.dtype)
        if where.start == 0 and where.stop == residual.shape[1]:
            return image, encoder
        # Text tokens sharing the hidden stream are reused whole; the image tokens take the bands.
        return torch.cat([residual[:, :where.start], image, residual[:, where.stop:]], dim=1), encoder

    def record_skip(self, context: CallContext) -> None:
        band = self.bands.get(context.slot)
        forecast = band is not None and self.plugin.config.order > 0 and self.high_forecaster.points(band[2]) > 1
        event = "forecast" if forecast else "reused"
        for name in self.sublayers:
            self.target.stats.record(context, name, event)
        for block in self.blocks:
            self.target.stats.record_block(context, block)

    def nbytes(self) -> int:
        tensors = []
        for _, low, state in getattr(self, "bands", {}).values():
            tensors += [low] + self.high_forecaster.tensors(state)
        # At cutoff 1 the low band is a view of the cached residual: count each storage once.
        unique = {(t.untyped_storage().data_ptr(), t.numel()): t for t in tensors}
        shared = {r.untyped_storage().data_ptr() for pair in self.residuals.values() for r in pair if r is not None}
        return super().nbytes() + sum(t.numel() * t.element_size() for (ptr, _), t in unique.items()
                                      if ptr not in shared)

    def clear(self) -> None:
        super().clear()
        if hasattr(self, "bands"):
            self.bands.clear()


@register_plugin(FreqCaConfig)
class FreqCaPlugin(Plugin):
    """State: per CFG slot (separate calls never share) the stack's residual, its low band and the high band's
    forecaster state; batched CFG rows are separate samples throughout (the DCT and forecasts are per row).
    ``unmapped`` holds why the last call that could not be laid on the token grid computed."""

    supports_partial_rows = False  # per-slot bands of whole batches (cfg-cache refuses batched families)

    kind = "schedule"
    skips_block_ranges = True  # refused where ControlNet adds residuals between blocks

    def install(self) -> None:
        if self.config.layers is not None:
            raise ValueError("freqca caches the residual of the whole block stack; it does not take `layers`")
        blocks = self.target.spec.blocks(self.target.transformer)
        if not blocks:
            raise ValueError(f"freqca found no blocks in {type(self.target.transformer).__name__}")
        self.unmapped: str | None = None
        self._warned = False
        self.range = _BandRange(self, len(blocks))

    def position(self, context: CallContext) -> float:
        return float(context.step) if self.config.distance == "step" else context.timestep

    def image_part(self, length: int, context: CallContext) -> slice | None:
        """Where this rank's image tokens sit in a hidden stream of ``length`` tokens (:func:`image_slice`; under
        sequence parallelism the rank's shard of them, see :mod:`dit_accel.core.parallel`)."""
        setting = parallel_setting(self.target.transformer)
        text_position = self.target.spec.text_position
        if setting is None:
            return image_slice(length, context.grid, context.num_text_tokens, text_position)
        if context.grid is None or not setting.even:
            return None
        layout = shard_positions(length, setting.world, setting.rank, context.num_text_tokens,
                                 context.grid.num_tokens, text_position != "last", setting.text_sharded)
        if layout is None or layout.image != context.grid.num_tokens:
            return None
        return layout.image_slice

    def bands(self, image: torch.Tensor, context: CallContext) -> tuple[torch.Tensor, torch.Tensor]:
        """``(low, high)`` of this rank's image tokens. The DCT needs the whole grid: under sequence parallelism the
        shards are gathered (once per full step), split, and this rank keeps its rows, exactly the single-process
        bands."""
        setting = parallel_setting(self.target.transformer)
        if setting is None or image.shape[1] == context.grid.num_tokens:
            return split_bands(image, context.grid, self.config.cutoff)
        whole = all_gather_tokens(image, setting)
        low, high = split_bands(whole, context.grid, self.config.cutoff)
        mine = slice(setting.rank * image.shape[1], (setting.rank + 1) * image.shape[1])
        return low[:, mine].contiguous(), high[:, mine].contiguous()

    # ----------------------------------------------------------------------------------- RangePolicy
    def decide(self, context: CallContext, hidden: torch.Tensor, encoder) -> torch.Tensor:
        config = self.config
        batch = hidden.shape[0]
        if config.last_steps:
            self.warn_unknown_length(context, f"last_steps={config.last_steps} cannot keep the final steps computed")
        cheap = (not full_step(context.step, context.num_steps, config.interval, config.first_steps,
                               config.last_steps) and self.target.in_scope(config, context))
        if cheap and self.image_part(hidden.shape[1], context) is None:
            self._say_unmapped(context, hidden)
            cheap = False
        # A slot computed on a grid it could not split has no bands: it computes again rather than reuse blindly.
        cheap = cheap and context.slot in self.range.bands
        return torch.full((batch,), cheap, dtype=torch.bool, device=hidden.device)

    def computed(self, context: CallContext, rows: torch.Tensor) -> None:
        """Nothing to learn from a computed call: the schedule is fixed and the bands live in the range."""

    def _say_unmapped(self, context: CallContext, hidden: torch.Tensor) -> None:
        grid = context.grid
        self.unmapped = (
            f"the hidden stream's {hidden.shape[1]} tokens cannot be laid on the image token grid "
            f"({'unknown' if grid is None else f'{grid.frames}x{grid.height}x{grid.width}'}, "
            f"{context.num_text_tokens} text tokens): extra condition tokens or uneven sequence-parallel shards; "
            "those calls compute densely")
        if not self._warned:
            self._warned = True
            warnings.warn(f"dit_accel freqca: {self.unmapped}", UserWarning, stacklevel=5)

    # ------------------------------------------------------------------------------------------ lifecycle
    def idle_reason(self, steps: int) -> str | None:
        if self.unmapped is not None:
            return self.unmapped
        config = self.config
        return (f"no step of a {steps}-step generation was cheap (interval={config.interval}, first_steps="
                f"{config.first_steps}, last_steps={config.last_steps}); raise interval above 1 or lower first_steps "
                "and last_steps")

    def idle_already_said(self) -> bool:
        return self._warned

    def reset(self) -> None:
        self.range.clear()

    def remove(self) -> None:
        self.range.remove()

    def cache_bytes(self) -> int:
        return self.range.nbytes()


__all__ = ["FreqCaConfig", "FreqCaPlugin", "dct_2d", "dct_matrix", "full_step", "idct_2d", "image_slice",
           "low_mask", "split_bands"]
