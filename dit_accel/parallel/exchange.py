"""The exchanges of ``patch-parallel``: what one rank posts to the others for one attention call, and the other
patches' keys and values as it unpacks them (:class:`Remote`). Geometry and payloads come from
:mod:`dit_accel.parallel.patches`; this module only moves them through ``torch.distributed``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from dit_accel.parallel.patches import PatchGrid, payload, share, tile_bias, tile_index


@dataclass
class Remote:
    """The other patches as one rank uses them: exact tokens above and below its patch, tiles with their bias
    (token-first tensors ``(n, batch, heads, dim_k + dim_v)``)."""

    before: torch.Tensor
    after: torch.Tensor
    tiles: torch.Tensor
    bias: torch.Tensor
    grid: PatchGrid | None = None  # the call it was made for, and (batch, heads, dim) and dtype of its tokens
    signature: tuple | None = None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.before, self.after, self.tiles))


class Exchange:
    """One posted exchange of one attention call (sync or async); :meth:`remote` waits and unpacks it.

    ``tokens``: this rank's patch, token-first; ``full``: send every row (else ``band`` rows exact and the rest as
    ``pool`` tiles, :func:`~dit_accel.parallel.patches.share`). ``sent`` counts the bytes this rank handed over.
    """

    def __init__(self, tokens: torch.Tensor, grid: PatchGrid, full: bool, *, rank: int, band: int | None, pool: int,
                 group) -> None:
        cut = None if full else band
        self.grid, self.full, self.rank, self.pool = grid, full, rank, pool
        self.signature = (tokens.shape[1:], tokens.dtype)
        sends = [payload(tokens, grid, share(grid, rank, dst, cut, pool), pool)[0] for dst in range(grid.world)]
        self.received = [share(grid, src, rank, cut, pool) for src in range(grid.world)]
        data = torch.cat(sends)
        self.out = tokens.new_empty((sum(item.tokens for item in self.received), *tokens.shape[1:]))
        self.work = dist.all_to_all_single(self.out, data, [item.tokens for item in self.received],
                                           [part.shape[0] for part in sends], group=group, async_op=True)
        self.sent = data.numel() * data.element_size()
        self._data = data  # alive until the exchange completes

    def wait(self) -> None:
        if self.work is not None:
            self.work.wait()
            self.work, self._data = None, None

    def parts(self) -> list[torch.Tensor]:
        self.wait()
        return list(self.out.split([item.tokens for item in self.received]))

    def remote(self, band: int | None, pool: int) -> Remote:
        """The other patches, cut to ``band``/``pool`` (``band=None``: all rows) from whatever was exchanged."""
        grid, me = self.grid, self.rank
        exact, tiles, bias = [], [], []
        for src, part in enumerate(self.parts()):
            if src == me:
                exact.append(part)
                continue
            item = share(grid, src, me, band, pool)
            if self.full and band is not None:  # a full patch arrived: cut it as its sender would have
                part, counts = payload(part, grid, item, pool)
            else:
                counts = tile_index(item.far[1] - item.far[0], grid.width, pool)[1] if item.tiles else torch.zeros(0)
            exact.append(part[:item.exact_tokens])
            tiles.append(part[item.exact_tokens:])
            bias.append(tile_bias(counts))
        empty = self.out[:0]
        return Remote(torch.cat(exact[:me]) if me else empty,
                      torch.cat(exact[me + 1:]) if me + 1 < len(exact) else empty,
                      torch.cat(tiles), torch.cat(bias), self.grid, self.signature)


def extrapolated(remote: Remote, before: Remote) -> Remote:
    """``remote`` moved along its change since ``before`` (the same patches one step earlier): ``x + (x - x_prev)``
    for the exact rows and the tiles, or ``remote`` as it is when the two differ in layout."""
    pairs = ((remote.before, before.before), (remote.after, before.after), (remote.tiles, before.tiles))
    if any(a.shape != b.shape for a, b in pairs) or not torch.equal(remote.bias, before.bias):
        return remote
    return Remote(*(torch.lerp(b, a, 2.0) for a, b in pairs), remote.bias, remote.grid, remote.signature)
