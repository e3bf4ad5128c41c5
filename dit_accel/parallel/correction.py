"""PCPP's cached corrections and the synchronous-step schedule of ``patch-parallel``.

PCPP attends to the far rows of the other patches through pooled tiles, which on small token grids (a patch of a
few rows) is a coarse summary. On a *synchronous* step (warm-up, refresh) every rank receives the other patches
whole anyway, so it can learn, from the same keys and values, what the tiles lose, and correct the asynchronous
PCPP steps after it with no extra byte exchanged:

* ``detail`` (:func:`far_detail`, :func:`with_detail`): keep each far token less the mean of its tile; later, expand
  the received (fresh, extrapolated) tiles back to tokens as ``tile + detail``. The coarse part of the far rows
  follows the exchanges, their fine structure is that of the last synchronous step. Memory and attention cost are
  DistriFusion's (every far token is a key again).
* ``residual`` (:func:`residual_of`): keep ``R = O - O~``, the exact attention output of the rank's queries less the
  PCPP approximation from the same keys and values, per layer, call and CFG slot, and output ``O~ + R`` later (as
  Re-ttention and window-residual do for sparse attention). One attention output of memory per slot.

Both go stale as the image forms; a synchronous *refresh* (every ``refresh_interval``-th step after the warm-up,
or at gaps growing by ``refresh_growth``, :func:`is_sync_step`) re-learns them and is exact itself, at the bytes of
one full exchange (counted). On the keys and values they were learned from both corrections are exact, and when
PCPP is exact already (a band covering every row) there is nothing to add: a correction never changes an exact
result.

Chosen on zoo:mmdit, calibration seed 7 (benchmarks/results/patch-parallel-correction-calibration-seed7-cpu.md):
``detail`` beat ``residual`` on 18 of 20 settings (within 0.4 dB on the others); with ``band=0, pool=4,
refresh_interval=3`` it reached 31.4 / 30.5 dB (2 / 4 processes) at 32 / 35 % of DistriFusion's bytes per step,
where PCPP without correction stays below 20 dB even refreshed every 4 steps.
"""

from __future__ import annotations

import torch

from dit_accel.parallel.exchange import Remote
from dit_accel.parallel.patches import PatchGrid, pool_rows, share, tile_index

CORRECTIONS = ("detail", "residual", "none")


def is_sync_step(step: int, warmup_steps: int, refresh_interval: int, num_steps: int | None,
                 refresh_growth: float = 1.0) -> bool:
    """Whether ``step`` exchanges synchronously: the first ``warmup_steps`` steps (and step 0 always), and with
    ``refresh_interval = k > 0`` the refreshes after them: the first at step ``warmup + k - 1``, each next one
    ``round(k * refresh_growth ** j)`` steps after the ``j``-th (at least 1; growth 1: every ``k``-th step), never
    the last step of a ``num_steps``-step generation (nothing would use what it learns)."""
    if step < max(warmup_steps, 1):
        return True
    if refresh_interval <= 0 or (num_steps is not None and step >= num_steps - 1):
        return False
    if refresh_growth == 1.0:
        return (step - warmup_steps + 1) % refresh_interval == 0
    refresh, gap = warmup_steps + refresh_interval - 1, float(refresh_interval)
    while refresh < step:
        gap *= refresh_growth
        refresh += max(1, round(gap))
    return refresh == step


def residual_of(exact: torch.Tensor, approx: torch.Tensor) -> torch.Tensor:
    """``R = exact - approx`` (the attention outputs of the same queries from the same keys and values, exact and
    as PCPP approximates them), in their dtype."""
    if exact.shape != approx.shape:
        raise ValueError(f"residual_of: exact output {tuple(exact.shape)} and approximation {tuple(approx.shape)} "
                         "differ in shape")
    return exact - approx


def far_detail(parts: list[torch.Tensor], grid: PatchGrid, rank: int, band: int, pool: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """What PCPP's tiles lose of the far rows, from a full exchange: ``(index, detail)`` with ``detail`` the far
    tokens of every other patch (in :class:`Remote` tile order: sources in rank order) less the mean of their tile,
    and ``index`` the tile of each (into the concatenated tiles of all sources). ``parts[src]``: ``src``'s whole
    patch, token-first."""
    indices, details, offset = [], [], 0
    for src, part in enumerate(parts):
        item = share(grid, src, rank, band, pool)
        if src == rank or not item.tiles:
            continue
        rows = item.far[1] - item.far[0]
        far = part[item.far[0] * grid.width:item.far[1] * grid.width]
        tiles, _ = pool_rows(far, rows, grid.width, pool)
        index = tile_index(rows, grid.width, pool)[0].to(far.device)
        indices.append(index + offset)
        details.append(far - tiles[index])
        offset += item.tiles
    if not details:
        return torch.zeros(0, dtype=torch.long), parts[rank][:0]
    return torch.cat(indices), torch.cat(details)


def with_detail(remote: Remote, index: torch.Tensor, detail: torch.Tensor) -> Remote:
    """``remote`` with its tiles expanded back to tokens, ``tile + detail`` (no logit bias: one key per token), or
    ``remote`` as it is when ``index``/``detail`` do not fit its tiles. With the keys and values the detail was
    taken from, this is the exact far rows."""
    tiles = remote.tiles
    if (not detail.shape[0] or detail.shape[1:] != tiles.shape[1:] or detail.dtype != tiles.dtype
            or detail.device != tiles.device or int(index.max()) + 1 != tiles.shape[0]):
        return remote
    expanded = tiles[index] + detail
    return Remote(remote.before, remote.after, expanded, remote.bias.new_zeros(expanded.shape[0]), remote.grid,
                  remote.signature)


class Corrections:
    """Per-slot residuals of one generation. A residual is used only in the generation that learned it and only for
    an output of its shape, dtype and device, so a crashed or interrupted generation never corrects the next one
    (the plugin also drops them in ``reset``)."""

    def __init__(self) -> None:
        self.residuals: dict[tuple, torch.Tensor] = {}
        self.details: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.generation: object = None
        self.applied = 0  # asynchronous calls of this generation that added a residual

    def _enter(self, generation: object) -> None:
        if generation != self.generation:
            self.clear()
            self.generation = generation

    def learn(self, slot: tuple, generation: object, exact: torch.Tensor, approx: torch.Tensor) -> None:
        """Keep ``exact - approx`` for ``slot`` (replacing what it had)."""
        self._enter(generation)
        self.residuals[slot] = residual_of(exact, approx)

    def apply(self, slot: tuple, generation: object, out: torch.Tensor) -> torch.Tensor:
        """``out + R`` with ``slot``'s residual, or ``out`` as it is when there is none that fits."""
        self._enter(generation)
        residual = self.residuals.get(slot)
        if residual is None or residual.shape != out.shape or residual.dtype != out.dtype or (
                residual.device != out.device):
            return out
        self.applied += 1
        return out + residual

    def learn_detail(self, slot: tuple, generation: object, detail: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Keep ``(index, detail)`` of :func:`far_detail` for ``slot``."""
        self._enter(generation)
        self.details[slot] = detail

    def apply_detail(self, slot: tuple, generation: object, remote: Remote) -> Remote:
        """``remote`` with ``slot``'s far detail added back (:func:`with_detail`), or as it is."""
        self._enter(generation)
        detail = self.details.get(slot)
        if detail is None:
            return remote
        out = with_detail(remote, *detail)
        self.applied += out is not remote
        return out

    def clear(self) -> None:
        self.residuals, self.details, self.generation, self.applied = {}, {}, None, 0

    def nbytes(self) -> int:
        tensors = [*self.residuals.values(), *(t for pair in self.details.values() for t in pair)]
        return sum(t.numel() * t.element_size() for t in tensors)
