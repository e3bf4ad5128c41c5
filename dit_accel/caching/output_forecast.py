"""Skipping a whole transformer call: its output forecast from the outputs of the slot's computed calls.

A schedule plugin (magcache) knows before a call runs whether every row of it skips. Skipping only the block stack
still runs the patch and timestep embeddings and the final norm and projection around the forecast residual: on
the zoo models that is 9-12 % of a bare call (``call-cost-cpu.md``), paid on every skipped step. Here a skipped
call runs nothing: its prediction is forecast over the transformer's timestep input from the predictions of the
slot's computed calls (the plugin's forecaster; order 0 reuses the newest), and the call returns a new output of
the same structure (a tensor, a tuple, or a diffusers output).

The hook wraps the other plugins' transformer-level hooks (:meth:`OutputForecast.attach`): stacked with
cfg-cache, a skipped call never reaches it, and a computed call records the whole output cfg-cache returns, its
rebuilt unconditional rows included. A separate unconditional call that cfg-cache answers without running the
transformer is recorded the same way: its rebuilt output (the fresh conditional prediction plus the cached
difference) is the branch's point at that step. Not recording it would leave the branch forecasting past a step it
was to compute, from its older calls; computing the branch's next call instead would spend the call cfg-cache saved
(in caching-cpu.json before this rule, zoo:mmdit's magcache-cfg-ultra computed 3.70x fewer calls than dense,
magcache-ultra 3.57x).

The call computes as usual (and the block-range machinery asks the same question again, getting the same answer)
where this cannot apply: a call holding only some rows of its slot, a call measuring the work outside the blocks,
sequence parallelism enabled after the hook was attached (its split would sit outside the hook), or no computed
prediction of the slot yet. Under sequence or patch parallelism set up first, the hook wraps the split and the
gather: every rank sees the whole latent and output, decides from all-reduced statistics and skips alike, and a
skipped step runs no collective on any rank.

``space = "clean"`` forecasts the clean-sample estimate each computed prediction implies and turns the forecast back
into a prediction at the skipped call's own input (:mod:`dit_accel.caching.prediction_space`); it needs the
pipeline scheduler's parameterization (``InstallTarget.parameterization``) and falls back to the prediction itself
for a slot whose computed call it cannot convert. A skipped call it cannot convert back computes.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from diffusers.hooks import ModelHook

from dit_accel.caching.forecasters import Forecaster
from dit_accel.caching.prediction_space import flow_timestep_unit, from_clean, invertible, latent_part, to_clean
from dit_accel.caching.sublayer import tensor_bytes
from dit_accel.core.context import CallContext
from dit_accel.core.hooks import attach, detach
from dit_accel.core.outputs import output_sample, with_sample
from dit_accel.core.parallel import parallel_setting
from dit_accel.core.plugin import InstallTarget


class CallPolicy(Protocol):
    def decide(self, context: CallContext, hidden: torch.Tensor | None, encoder: torch.Tensor | None) -> bool:
        """Whether every row of this call skips (``hidden`` is ``None`` at the call level: the batch is the
        context's)."""


class _CallHook(ModelHook):
    def __init__(self, owner: "OutputForecast") -> None:
        super().__init__()
        self.owner = owner

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        return self.owner.forward(self.fn_ref.original_forward, args, kwargs)


class OutputForecast:
    """Whole-call skipping for one transformer: ``history`` holds, per slot, the forecaster's state over the
    predictions of the computed calls; ``templates`` the newest computed output (its structure is reused)."""

    def __init__(self, target: InstallTarget, hook_name: str, policy: CallPolicy, forecaster: Forecaster,
                 sublayers: list[str], blocks: list[str], space: str = "prediction") -> None:
        if space not in ("prediction", "clean"):
            raise ValueError(f"OutputForecast space = {space!r}; allowed: 'prediction', 'clean'")
        self.target, self.hook_name, self.policy, self.forecaster = target, hook_name, policy, forecaster
        self.sublayers, self.blocks, self.space = sublayers, blocks, space
        self.history: dict[int, Any] = {}
        self.templates: dict[int, Any] = {}
        self.clean_slots: set[int] = set()  # slots whose history holds clean-sample estimates
        self._timestep_unit: float | None = None  # flow models: timestep input per sigma, read once per generation
        self.served = 0  # calls returned without running the transformer (this generation)
        self._attached = False
        self._wraps_split = False  # attached outside a sequence split (see attach)

    def attach(self) -> None:
        """Attach the hook outside every transformer-level hook the plugins installed so far (cfg-cache's): a
        skipped call then skips them too, and a computed call records the whole output they return (cfg-cache's
        rebuilt unconditional rows included), not the part the transformer computed. Called once every plugin is
        installed (:meth:`Plugin.check_companions`): diffusers' registry cannot move a hook once others wrap it."""
        if not self._attached:
            # diffusers' context parallelism (enabled before accelerate_dit) and patch-parallel (installed before
            # this) registered their split and gather hooks already, so this hook wraps them: it sees the whole
            # latent and the gathered output, the same on every rank.
            self._wraps_split = parallel_setting(self.target.transformer) is not None
            attach(self.target.transformer, _CallHook(self), self.hook_name)
            self._attached = True

    def _applies(self, context: CallContext | None) -> bool:
        """Whether the call holds whole slots (its output is the slot's whole prediction): on one process, or under
        sequence / patch parallelism set up before this hook was attached (the ranks decide from all-reduced
        statistics, so they skip alike and forecast the same gathered outputs). Parallelism enabled after
        ``accelerate_dit`` splits the inputs outside this hook: those calls compute."""
        if context is None or context.rows is not None:
            return False
        return self._wraps_split or parallel_setting(self.target.transformer) is None

    def _coefficients(self, context: CallContext) -> tuple[float, float] | None:
        """``(c_input, c_prediction)`` of the clean-sample estimate at this call, ``None`` in prediction space."""
        parameterization = self.target.parameterization
        if self.space != "clean" or parameterization is None:
            return None
        if self._timestep_unit is None:
            self._timestep_unit = flow_timestep_unit(context.timestep, parameterization.num_train_timesteps)
        return parameterization.coefficients(context.timestep, self._timestep_unit)

    def forward(self, forward, args: tuple, kwargs: dict):
        context = self.target.tracker.current
        if not self._applies(context):
            if context is not None:
                self.history.pop(context.slot, None)  # a partial call: the slot's predictions no longer line up
            return forward(*args, **kwargs)
        slot = context.slot
        skip = self.policy.decide(context, None, None)
        state = self.history.get(slot)
        template = self.templates.get(slot)
        coefficients = self._coefficients(context)
        latent = kwargs.get(self.target.spec.hidden_arg, args[0] if args else None)
        clean = slot in self.clean_slots
        if clean and state is not None and not (
                coefficients is not None and invertible(coefficients) and isinstance(latent, torch.Tensor)
                and latent_part(latent, output_sample(template)) is not None):
            state = None  # a clean-space forecast this call cannot turn back into a prediction: compute
        if (skip and state is not None and output_sample(template).shape[0] == context.batch_size
                and not self.target.stats.measuring):  # a measuring call runs every layer once
            prediction, advanced = self.forecaster.predict(state, context.timestep)
            self.history[slot] = advanced
            # The caller may write into its prediction; the cache must not move. A reused value is the cache's own,
            # and FoCa's forecast is also the newest value of its recursion (the advanced state holds it).
            fresh = not any(prediction is kept
                            for kept in (*self.forecaster.tensors(state), *self.forecaster.tensors(advanced)))
            if clean:
                prediction = from_clean(latent, prediction, coefficients, inplace=fresh)
            elif not fresh:
                prediction = prediction.clone()
            event = "forecast" if self.forecaster.points(state) > 1 else "reused"
            self.target.stats.record_skipped(context, self.sublayers, self.blocks, event, whole_call=True)
            self.served += 1
            return with_sample(template, prediction)
        output = forward(*args, **kwargs)
        if not skip:
            sample = output_sample(output)
            if state is not None and self.forecaster.tensors(state)[0].shape != sample.shape:
                state = None
            # A copy: pipelines may update the prediction in place (guidance), and the forecast reads it later.
            kept = sample.detach().clone()
            point = None
            if coefficients is not None and isinstance(latent, torch.Tensor):
                point = to_clean(latent, kept, coefficients, inplace=True)
            if (point is not None) != clean:
                state = None  # the slot changes space: its earlier points do not line up
                self.clean_slots.symmetric_difference_update({slot})
            self.history[slot] = self.forecaster.update(state, kept if point is None else point, context.timestep)
            self.templates[slot] = with_sample(output, kept)  # the structure, without holding a second tensor
        return output

    def nbytes(self) -> int:
        return tensor_bytes([self.forecaster.tensors(state) for state in self.history.values()])

    def clear(self) -> None:
        self.history.clear()
        self.templates.clear()
        self.clean_slots.clear()
        self._timestep_unit = None
        self.served = 0

    def remove(self) -> None:
        if self._attached:
            detach(self.target.transformer, self.hook_name)
            self._attached = False
        self.clear()
