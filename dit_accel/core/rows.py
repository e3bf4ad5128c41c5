"""Calls that hold only some rows of their slot.

A batched-CFG step whose unconditional rows are rebuilt rather than computed (``cfg-cache``) runs the transformer on
the conditional rows alone. Its context then lists only their branches, and ``CallContext.rows`` gives their row
numbers in the slot's full batch (``None``: the call holds the whole batch, in order). State that a plugin keeps per
slot holds every row of the slot; these helpers read this call's rows out of it and write them back.

``CallContext.followers`` names the rows left out that follow the call's rows, position by position (the
unconditional partner of each conditional row). When the call's rows update their state, a follower's state moves by
the same change as its partner's: the difference between the two, like the output difference cfg-cache keeps, is
assumed to drift slowly. Rows that are neither keep their state.
"""

from __future__ import annotations

import torch

from dit_accel.core.context import CallContext

_INDEX: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}


def row_index(rows: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """``rows`` as an index tensor on ``device`` (built once per rows and device)."""
    key = (rows, torch.device(device))
    index = _INDEX.get(key)
    if index is None:
        if len(_INDEX) > 256:
            _INDEX.clear()
        index = _INDEX[key] = torch.tensor(rows, dtype=torch.long, device=device)
    return index


def take_rows(value: torch.Tensor | None, context: CallContext) -> torch.Tensor | None:
    """The rows of a per-slot tensor that this call holds (the tensor itself when the call holds them all)."""
    if value is None or context.rows is None:
        return value
    return value.index_select(0, row_index(context.rows, value.device))


def put_rows(full: torch.Tensor | None, context: CallContext, part: torch.Tensor) -> torch.Tensor | None:
    """A per-slot tensor with this call's rows replaced by ``part`` (out of place); ``part`` itself when the call
    holds every row, ``None`` when there is no full tensor to write partial rows into."""
    if context.rows is None:
        return part
    if full is None or full.shape[1:] != part.shape[1:]:
        return None
    return full.index_copy(0, row_index(context.rows, full.device), part.to(full.dtype))


def fill_rows(full: torch.Tensor | None, context: CallContext, part: torch.Tensor) -> torch.Tensor | None:
    """:func:`put_rows`, and each follower row moved by its partner's change: ``full[f] + part[i] - full[rows[i]]``."""
    merged = put_rows(full, context, part)
    followers = context.followers
    if merged is None or not followers or context.rows is None:
        return merged
    index = row_index(followers, full.device)
    partners = row_index(context.rows, full.device)
    change = part.to(full.dtype) - full.index_select(0, partners)
    return merged.index_copy(0, index, full.index_select(0, index) + change)


def subset_rows(context: CallContext, kept: list[int]) -> tuple[int, ...] | None:
    """``CallContext.rows`` of a call that keeps positions ``kept`` of ``context``'s rows."""
    if context.rows is None:
        return tuple(kept) if kept != list(range(context.batch_size)) else None
    return tuple(context.rows[i] for i in kept)
