"""Block-range caching: skip a contiguous run of blocks and add the residual they produced when last computed.

The blocks of all block lists are numbered in execution order (Flux: dual-stream then single-stream). A range
``[start, end)`` gets one hook per block. At the first block the policy decides, per sample row, whether the range
is skipped. If every row skips (and a residual is cached) the blocks pass their inputs through and the last one
returns ``input + residual`` per stream (hidden, and encoder where the block returns one; SD3's last block returns
``None`` for the encoder and so does the skipped range). When only some rows skip, the range computes *only the
other rows*: every tensor argument of the range's blocks with the call's batch as its first dimension is cut to
those rows (and the tracker's context to their branches while the range runs), so a call costs what it computes;
the skipping rows get ``input + cached residual``. A decision is always per row (never a batch mean), and the
residual is updated only for the rows that computed. State is per slot, so separate cond/uncond calls never share
a residual.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from diffusers.hooks import ModelHook

from dit_accel.caching.sublayer import tensor_bytes
from dit_accel.caching.forecasters import Forecaster
from dit_accel.core.blocks import BlockContract
from dit_accel.core.context import CallContext
from dit_accel.core.hooks import attach, detach
from dit_accel.core.plugin import InstallTarget
from dit_accel.core.rows import fill_rows, subset_rows, take_rows

_PARAMETERS: dict[type, tuple[str, ...]] = {}


def _argument(names: tuple[str, ...], name: str, args: tuple, kwargs: dict) -> Any:
    if name in kwargs:
        return kwargs[name]
    index = names.index(name) if name in names else len(args)
    return args[index] if index < len(args) else None


def block_streams(block: torch.nn.Module, contract: BlockContract, args: tuple, kwargs: dict):
    """``(hidden, encoder)`` passed to a block (``encoder`` is ``None`` for blocks that do not return it)."""
    names = _PARAMETERS.get(type(block))
    if names is None:  # read once per class: binding a signature on every call costs ~2 % of a skipped call
        names = _PARAMETERS[type(block)] = tuple(inspect.signature(block.forward).parameters)
    hidden = _argument(names, contract.hidden_arg, args, kwargs)
    if hidden is None:
        raise TypeError(f"{type(block).__name__} was called without {contract.hidden_arg!r}")
    encoder = (_argument(names, contract.encoder_arg, args, kwargs)
               if contract.returns != "h" and contract.encoder_arg else None)
    return hidden, encoder


class RangePolicy(Protocol):
    def decide(self, context: CallContext, hidden: torch.Tensor, encoder: torch.Tensor | None) -> torch.Tensor | bool:
        """Per-row bool tensor (B,): which rows skip the range at this call; or one ``bool`` for every row."""

    def computed(self, context: CallContext, rows: torch.Tensor) -> None:
        """The range computed for ``rows`` (bool (B,)) at this call."""


@dataclass
class _Call:
    skip_rows: torch.Tensor
    hidden: torch.Tensor
    encoder: torch.Tensor | None
    passthrough: bool
    rows: torch.Tensor | None = None  # indices of the rows the range computes when only some rows skip
    context: CallContext | None = None  # the whole call's context, restored when the range ends


# Rotary embeddings: (tokens, dim) tables shared by the batch (Flux, CogVideoX, HunyuanVideo), or per sample with a
# leading batch dimension (LTX's (B, tokens, dim)); a 2-D one is never cut, even if its token count equals the batch.
_POSITIONAL_ARGS = ("image_rotary_emb", "rotary_emb", "freqs_cis", "rotary_pos_emb")


def select_rows(value: Any, rows: torch.Tensor, batch: int, min_ndim: int = 1) -> Any:
    """``value`` with every tensor of at least ``min_ndim`` dimensions whose first dimension is ``batch`` cut to
    ``rows`` (through tuples, lists and dicts); anything else unchanged."""
    if isinstance(value, torch.Tensor):
        return value.index_select(0, rows) if value.ndim >= min_ndim and value.shape[0] == batch else value
    if isinstance(value, (tuple, list)):
        return type(value)(select_rows(v, rows, batch, min_ndim) for v in value)
    if isinstance(value, dict):
        return {k: select_rows(v, rows, batch, 3 if k in _POSITIONAL_ARGS else min_ndim) for k, v in value.items()}
    return value


def _add(value: torch.Tensor | None, residual: torch.Tensor | None) -> torch.Tensor | None:
    return None if value is None or residual is None else value + residual


def _scatter(full: torch.Tensor | None, rows: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """``full`` with ``rows`` replaced by ``part`` (out of place); ``part`` alone if there is no ``full``."""
    return part if full is None else full.index_copy(0, rows, part.to(full.dtype))


class _RangeHook(ModelHook):
    def __init__(self, owner: "BlockRange", contract: BlockContract, first: bool, last: bool) -> None:
        super().__init__()
        self.owner, self.contract, self.first, self.last = owner, contract, first, last

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        owner = self.owner
        context = owner.target.tracker.current
        if context is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        if self.first:
            owner.begin(context, *block_streams(module, self.contract, args, kwargs))
        call = owner.call
        if call.passthrough:
            hidden, encoder = block_streams(module, self.contract, args, kwargs)
            if not self.last:  # contiguous, so the next block sees the same strides as after a computed block
                return self.contract.join_output(hidden.contiguous(), None if encoder is None else encoder.contiguous())
            residual = owner.residual_for(context)
            owner.record_skip(context)
            return self.contract.join_output(_add(hidden, residual[0]), _add(encoder, residual[1]))
        if call.rows is not None:
            batch = call.hidden.shape[0]
            args = select_rows(args, call.rows, batch)
            kwargs = select_rows(kwargs, call.rows, batch)
        output = self.fn_ref.original_forward(*args, **kwargs)
        if self.last:
            output = owner.end(context, output, self.contract)
        return output


class BlockRange:
    """One skippable range of blocks of one transformer."""

    def __init__(self, target: InstallTarget, hook_name: str, policy: RangePolicy, start: int, end: int,
                 forecast_order: int = 0, forecaster: Forecaster | None = None) -> None:
        blocks = target.spec.blocks(target.transformer)
        if not 0 <= start < end <= len(blocks):
            raise ValueError(f"block range [{start}, {end}) is outside the model's {len(blocks)} blocks")
        self.target, self.hook_name, self.policy = target, hook_name, policy
        self.first_index, self.stop_index = start, end
        self.residuals: dict[int, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
        # With forecast_order > 0 the skipped residual is forecast over the timesteps of the last computed steps
        # (Newton polynomial as in TaylorSeer, or the forecaster given) instead of reused.
        self.forecast_order = forecast_order
        self.forecaster = forecaster if forecaster is not None else Forecaster(forecast_order)
        self.history: dict[int, tuple[Any, Any]] = {}
        self._stores: dict[int, int] = {}  # computed calls per slot this generation (cache size reported)
        self.call: _Call | None = None
        self._modules = []
        self.sublayers = []
        self.blocks: list[str] = []
        for position, (list_attr, index, block, contract) in enumerate(blocks):
            if start <= position < end:
                attach(block, _RangeHook(self, contract, position == start, position == end - 1), hook_name)
                self._modules.append(block)
                self.blocks.append(f"{list_attr}.{index}")
                self.sublayers += [f"{list_attr}.{index}.{s.name}" for s in contract.sublayers
                                   if getattr(block, s.name, None) is not None]

    def begin(self, context: CallContext, hidden: torch.Tensor, encoder: torch.Tensor | None) -> None:
        decision = self.policy.decide(context, hidden, encoder)
        cached = context.slot in self.residuals
        if isinstance(decision, bool):  # one decision for the whole call: no per-row tensors to build
            skip_rows = torch.full((hidden.shape[0],), decision and cached, dtype=torch.bool, device=hidden.device)
            self.call = _Call(skip_rows, hidden, encoder, passthrough=decision and cached)
            return
        skip_rows = decision & cached
        skipping = int(skip_rows.sum()) if cached else 0
        self.call = _Call(skip_rows, hidden, encoder, passthrough=skipping == skip_rows.numel())
        if 0 < skipping < skip_rows.numel():
            self.call.rows = (~skip_rows).nonzero().flatten()
            self.call.context = context
            kept = self.call.rows.tolist()
            self.target.tracker.current = dataclasses.replace(
                context, batch_size=len(kept), branches=tuple(context.branches[i] for i in kept),
                rows=subset_rows(context, kept), followers=None)

    def end(self, context: CallContext, output, contract: BlockContract):
        call = self.call
        hidden, encoder = contract.split_output(output)
        mixed = call.rows is not None
        if mixed:
            context = call.context
            self.target.tracker.current = context
            rows = call.rows
            old = tuple(take_rows(r, context) for r in self.residuals[context.slot])
            served = self.residual_for(context)
            new = (_scatter(old[0], rows, hidden - call.hidden.index_select(0, rows)),
                   None if encoder is None or call.encoder is None or old[1] is None
                   else _scatter(old[1], rows, encoder - call.encoder.index_select(0, rows)))
            hidden = _scatter(_add(call.hidden, served[0]), rows, hidden)
            encoder = None if encoder is None else _scatter(_add(call.encoder, served[1]), rows, encoder)
            computed = rows.numel() / call.skip_rows.numel()
            for name in self.sublayers:
                self.target.stats.record(context, name, "partial", computed_fraction=computed)
            for block in self.blocks:
                self.target.stats.record_block(context, block, fraction=1.0 - computed)
        else:
            new = (hidden - call.hidden, None if encoder is None or call.encoder is None else encoder - call.encoder)
        if context.rows is not None:
            self._store_rows(context, new, mixed)
        else:
            self._store(context, new, mixed)
        self.policy.computed(context, ~call.skip_rows)
        stored = self._stores.get(context.slot, 0)
        if stored <= self.forecast_order + 1:  # the cache stops growing once the forecast has all its points
            self._stores[context.slot] = stored + 1
            self.target.stats.set_cache_bytes(self.nbytes())
        return contract.join_output(hidden, encoder)

    def _store(self, context: CallContext, new: tuple, mixed: bool) -> None:
        self.residuals[context.slot] = new
        if self.forecast_order:
            # Rows that skipped keep an older residual: a polynomial through mixed rows would be wrong, restart it.
            previous = None if mixed else self.history.get(context.slot)
            self.history[context.slot] = tuple(
                None if r is None else self.forecaster.update(None if previous is None else previous[i], r,
                                                              context.timestep)
                for i, r in enumerate(new)
            )

    def _store_rows(self, context: CallContext, new: tuple, mixed: bool) -> None:
        """A call holding only some rows of its slot (cfg-cache's conditional rows): their residuals go into the
        slot's; the other rows take what the cache would have served them at this timestep (the forecast), followers
        moved by their partner's change (:func:`~dit_accel.core.rows.fill_rows`)."""
        old = self.residuals.get(context.slot)
        if old is None:
            return  # nothing of the slot's other rows to keep: the next whole-batch call computes
        history = self.history.get(context.slot) if self.forecast_order and not mixed else None
        if history is not None:
            # Predicted, not advanced: FoCa's recursion moves once per step, in residual_for.
            filled = [None if state is None else self.forecaster.predict(state, context.timestep)[0]
                      for state in history]
        else:
            filled = list(old)
        merged = tuple(None if f is None or r is None else fill_rows(f, context, r) for f, r in zip(filled, new))
        if any(m is None and r is not None for m, r in zip(merged, new)):
            return
        # The polynomial restarts at the merged point: a point whose follower rows were filled in, one step from the
        # next computed point, would make their slope of the filled-in error (measured on zoo:dit: 27.6 dB without
        # the restart, 32.7 dB with it).
        self._store(context, merged, mixed=True)

    def residual_for(self, context: CallContext) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The residual a skipped call adds: the cached one, or its forecast at this call's timestep."""
        history = self.history.get(context.slot) if self.forecast_order else None
        if history is None:
            return tuple(take_rows(r, context) for r in self.residuals[context.slot])
        predictions = [None if state is None else self.forecaster.predict(state, context.timestep)
                       for state in history]
        self.history[context.slot] = tuple(None if p is None else p[1] for p in predictions)  # FoCa's recursion
        return tuple(None if p is None else take_rows(p[0], context) for p in predictions)

    def record_skip(self, context: CallContext) -> None:
        """A skipped call counts as ``forecast`` once the forecast has two points to extrapolate, else ``reused``."""
        history = self.history.get(context.slot) if self.forecast_order else None
        state = None if history is None else next((s for s in history if s is not None), None)
        event = "forecast" if state is not None and self.forecaster.points(state) > 1 else "reused"
        self.target.stats.record_skipped(context, self.sublayers, self.blocks, event)

    def nbytes(self) -> int:
        return tensor_bytes(list(self.residuals.values())) + tensor_bytes(
            [self.forecaster.tensors(state) for pair in self.history.values() for state in pair if state is not None])

    def clear(self) -> None:
        self.residuals.clear()
        self.history.clear()
        self._stores.clear()
        self.call = None

    def remove(self) -> None:
        for module in self._modules:
            detach(module, self.hook_name)
        self._modules.clear()
        self.clear()
