"""The step and CFG-branch tracker: it owns the denoising timeline of one transformer.

Pipelines do not tell the transformer which step or which CFG branch a call belongs to (DiT, PixArt and SD3 set no
``cache_context`` at all), so the tracker works it out from the calls themselves:

* a new timestep value means a new step; the same timestep again *on the same latent* means the next *slot* of the
  same step (the unconditional call of Flux true-CFG, Wan, Qwen-Image, HunyuanVideo), while the same timestep on a
  new latent is the next model evaluation (second-order samplers such as Heun evaluate each timestep twice); so a
  "step" is one model evaluation, and ``num_steps`` is the length of the scheduler's ``timesteps`` (Heun: 2N - 1);
* each sample row of a call is its own branch, so the two halves of a batched-CFG call (DiT, PixArt, SD3) never
  share state: a branch is ``(slot, row)``;
* a new generation starts when the pipeline calls ``scheduler.set_timesteps`` (the pipeline wrapper reports it),
  when the timesteps stop moving in the direction they moved so far, when more steps arrive than the schedule
  has, and when the latent's shape, batch, dtype or device changes. Every start, every end and every exception
  resets all plugin state, so a crashed generation never poisons the next one.

When the pipeline does set diffusers' ``cache_context``, its name is used to pick the slot and label the branch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from dit_accel.core.blocks import TokenGrid, TransformerSpec


@dataclass(frozen=True)
class BranchId:
    """One CFG branch: ``slot`` is the call within the step, ``row`` the sample row within that call.

    ``role`` is ``"cond"``, ``"uncond"`` or ``None`` when the pipeline's convention is unknown; it is a label for
    plugins that need it (CFG sharing) and takes no part in equality.
    """

    slot: int
    row: int
    role: str | None = None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BranchId) and (self.slot, self.row) == (other.slot, other.row)

    def __hash__(self) -> int:
        return hash((self.slot, self.row))


@dataclass(frozen=True)
class CallContext:
    """What the tracker decided about one transformer call."""

    generation: int
    step: int
    slot: int
    num_steps: int | None
    timestep: float
    batch_size: int
    grid: TokenGrid | None
    num_text_tokens: int
    branches: tuple[BranchId, ...]
    context_name: str | None = None
    num_image_context_tokens: int = 0
    rows: tuple[int, ...] | None = None  # the slot rows this call holds, when it holds only some (see core/rows.py)
    followers: tuple[int, ...] | None = None  # slot rows left out that follow ``rows`` position by position

    @property
    def is_first_step(self) -> bool:
        return self.step == 0

    @property
    def is_last_step(self) -> bool:
        return self.num_steps is not None and self.step == self.num_steps - 1


def _shape_key(kwargs: dict) -> tuple:
    """What a grid reader may depend on besides the latent: tensor shapes and small plain values of the call
    (Flux's ``img_ids``, Qwen's ``img_shapes``, LTX's ``num_frames``/``height``/``width``). Tensor values are not
    compared, so the grid is read once per shape signature."""
    key = []
    for name, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            key.append((name, tuple(value.shape)))
        elif isinstance(value, (int, float, str, tuple, list)) and len(repr(value)) < 256:
            key.append((name, repr(value)))
    return tuple(key)


def _timestep_value(timestep: Any) -> float:
    if isinstance(timestep, torch.Tensor):
        # Wan 2.2 TI2V passes a per-token timestep where conditioning tokens are 0: the step is the largest value.
        return float(timestep.detach().amax()) if timestep.numel() else float("nan")
    return float(timestep)


class StepTracker:
    """Decides step, slot and branches for each call of one transformer, and resets plugin state.

    Args:
        spec: the transformer's contract (how to read the timestep, the latent and the grid).
        on_reset: called with the reason (``"start"``, ``"end"``, ``"change"``, ``"error"``) whenever plugin state
            must be dropped.
        cfg_convention: the pipeline's CFG convention (``dit_accel.pipelines.adapters.CFG_CONVENTIONS``) if
            known; used only to label branches.
        guidance_probe: returns whether the pipeline currently runs CFG (``None`` if unknown); used only to
            label rows of batched calls.
        null_class_label: the class label that marks unconditional rows (DiT's null class), if any.
    """

    def __init__(
        self,
        spec: TransformerSpec,
        on_reset: Callable[[str], None],
        cfg_convention: str | None = None,
        guidance_probe: Callable[[], bool | None] | None = None,
        null_class_label: int | None = None,
    ) -> None:
        self.spec = spec
        self._on_reset = on_reset
        self.cfg_convention = cfg_convention
        self._guidance_probe = guidance_probe
        self._null_class_label = null_class_label
        self.generation = 0
        self.current: CallContext | None = None
        self._declared_steps: int | None = None
        self._declared_cfg: str | None = None
        # What the model predicts (caching.prediction_space.Parameterization): the pipeline's scheduler's, set by the
        # pipeline wrapper at every set_timesteps, or what a custom loop declared; None where neither says.
        self.scheduler_parameterization = None
        self._declared_parameterization = None
        self._clear()

    # ------------------------------------------------------------------------------------------ lifecycle
    def _clear(self) -> None:
        self._step = -1
        self._slot = 0
        self._last_timestep: float | None = None
        self._direction = 0.0
        self._signature: tuple | None = None
        self._num_steps: int | None = self._declared_steps
        self._slot_names: dict[str, int] = {}
        self._grid_cache: dict[tuple, TokenGrid | None] = {}
        self._started = False
        self._last_hidden: torch.Tensor | None = None  # the previous call's latent: a CFG branch shares it
        self._names_this_step: set[str] = set()

    def reset(self, reason: str = "end") -> None:
        """Drop the timeline and all plugin state (the next call starts a new generation)."""
        self._clear()
        self.current = None
        self._on_reset(reason)

    def begin_generation(self, timesteps: Any = None) -> None:
        """Start a new generation; ``timesteps`` (the scheduler's schedule) fixes the number of steps."""
        self.reset(reason="start")
        if timesteps is not None:
            try:
                self._num_steps = len(timesteps)
            except TypeError:
                self._num_steps = None

    @property
    def parameterization(self):
        """What the model predicts in the running generation (declared by a custom loop, else the scheduler's)."""
        return self._declared_parameterization or self.scheduler_parameterization

    def declare(self, num_steps: int | None, cfg: str | None, parameterization=None) -> None:
        """A generation declared by the caller (a custom loop): every generation until :meth:`undeclare` has
        ``num_steps`` steps, its rows follow the CFG convention ``cfg`` (``"none"``: no CFG, every row is
        conditional) and its model predicts as ``parameterization`` says. Starts a new generation."""
        self._declared_steps, self._declared_cfg = num_steps, cfg
        self._declared_parameterization = parameterization
        self.reset(reason="start")

    def undeclare(self, reason: str = "end") -> None:
        self._declared_steps = self._declared_cfg = self._declared_parameterization = None
        self.reset(reason=reason)

    # -------------------------------------------------------------------------------------------- per call
    def enter(self, module: torch.nn.Module, args: tuple, kwargs: dict, context_name: str | None) -> CallContext:
        """Classify one transformer call. Called by the tracker hook before the forward runs."""
        spec = self.spec
        hidden = kwargs.get(spec.hidden_arg, args[0] if args else None)
        if not isinstance(hidden, torch.Tensor):
            raise TypeError(
                f"dit_accel could not find the latent input {spec.hidden_arg!r} of {type(module).__name__}.forward"
            )
        timestep = kwargs.get(spec.timestep_arg)
        if timestep is None:
            raise TypeError(
                f"dit_accel needs the {spec.timestep_arg!r} keyword in calls to {type(module).__name__} to track "
                "steps; diffusers pipelines always pass it"
            )
        value = _timestep_value(timestep)
        signature = (tuple(hidden.shape), hidden.dtype, hidden.device)

        if self._started and signature != self._signature:
            self.reset(reason="change")  # shape, batch, dtype or device changed: a different generation
        # The same timestep again is another CFG branch of the step only if the latent is the same too: second-order
        # samplers (Heun, KDPM2) evaluate the model twice at one timestep on two different latents, and a named
        # branch seen twice in one step starts the next evaluation.
        same_step = (self._started and value == self._last_timestep and self._same_latent(hidden)
                     and not (context_name is not None and context_name in self._names_this_step))
        if not self._started:
            self._start(signature)
            self._slot = self._slot_for(context_name, default=0)
        elif same_step and context_name is not None and context_name in self._slot_names:
            self._slot = self._slot_names[context_name]
        elif same_step:
            self._slot += 1
            if context_name is not None:
                self._slot_names.setdefault(context_name, self._slot)
        elif value == self._last_timestep:  # a new model evaluation at the same timestep
            if self._num_steps is not None and self._step + 1 >= self._num_steps:
                num_steps = self._num_steps
                self.reset(reason="change")
                self._num_steps = num_steps
                self._start(signature)
            else:
                self._step += 1
            self._names_this_step = set()
            self._slot = self._slot_for(context_name, default=0)
        else:
            direction = value - self._last_timestep
            reversed_direction = self._direction != 0.0 and (direction > 0) != (self._direction > 0)
            past_schedule = self._num_steps is not None and self._step + 1 >= self._num_steps
            if reversed_direction or past_schedule:
                num_steps = self._declared_steps if reversed_direction else self._num_steps
                self.reset(reason="change")
                self._num_steps = num_steps
                self._start(signature)
            else:
                self._direction = direction
                self._step += 1
            self._names_this_step = set()
            self._slot = self._slot_for(context_name, default=0)
        self._last_timestep = value
        self._last_hidden = hidden
        if context_name is not None:
            self._names_this_step.add(context_name)

        grid_key = (signature, _shape_key(kwargs))
        if grid_key not in self._grid_cache:
            self._grid_cache[grid_key] = spec.read_grid(module, args, kwargs)
        grid = self._grid_cache[grid_key]

        batch = int(hidden.shape[0])
        branches = tuple(BranchId(self._slot, row, role)
                         for row, role in enumerate(self._roles(self._slot, batch, context_name, kwargs)))
        self.current = CallContext(
            generation=self.generation,
            step=self._step,
            slot=self._slot,
            num_steps=self._num_steps,
            timestep=value,
            batch_size=batch,
            grid=grid,
            num_text_tokens=spec.read_text_length(module, args, kwargs),
            branches=branches,
            context_name=context_name,
            num_image_context_tokens=(spec.read_image_context_length(module, args, kwargs)
                                      if spec.read_image_context_length is not None else 0),
        )
        return self.current

    def _start(self, signature: tuple) -> None:
        self._started, self._signature, self._step = True, signature, 0
        self._names_this_step = set()
        self.generation += 1

    def _same_latent(self, hidden: torch.Tensor) -> bool:
        last = self._last_hidden
        if last is None or last.shape != hidden.shape:
            return False
        if last is hidden or (last.data_ptr() == hidden.data_ptr() and last.stride() == hidden.stride()):
            return True
        return bool(torch.equal(last, hidden))

    def exit(self) -> None:
        self.current = None

    def _slot_for(self, context_name: str | None, default: int) -> int:
        if context_name is None:
            return default
        return self._slot_names.setdefault(context_name, len(self._slot_names) if self._slot_names else default)

    # ------------------------------------------------------------------------------------------------ roles
    def _roles(self, slot: int, batch: int, context_name: str | None, kwargs: dict) -> list[str | None]:
        """The CFG role of every row of the call (``None`` where the pipeline's convention is unknown)."""
        if context_name in ("cond", "uncond"):
            return [context_name] * batch
        if self._declared_cfg == "none":
            return ["cond"] * batch
        convention = self._declared_cfg or self.cfg_convention
        if convention == "separate-cond-first":
            return ["cond" if slot == 0 else "uncond" if slot == 1 else None] * batch
        if convention is None or not convention.startswith("batched"):
            return [None] * batch
        class_labels = kwargs.get("class_labels")
        if self._null_class_label is not None and isinstance(class_labels, torch.Tensor) and class_labels.numel() == batch:
            # DiT: the unconditional rows carry the null class label.
            return ["uncond" if label == self._null_class_label else "cond" for label in class_labels.flatten().tolist()]
        if batch % 2 and slot in (0, 1):
            # An odd batch cannot hold both halves: the pipeline calls the branches separately (or runs no CFG).
            return ["cond" if slot == 0 else "uncond"] * batch
        guided = True if self._declared_cfg else self._guidance_probe() if self._guidance_probe is not None else None
        if not guided or batch % 2:
            return ["cond" if guided is False else None] * batch
        cond_first = convention == "batched-cond-first"
        return ["cond" if (row < batch // 2) == cond_first else "uncond" for row in range(batch)]
