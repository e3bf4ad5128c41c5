"""Sub-layer caching: the hook every feature-caching plugin stands on.

Each attention and MLP sub-layer named by the block contracts gets a hook. The sub-layer's output is what the
block multiplies by its gate, so replacing it keeps the modulation and the gates fresh (FORA's and TaylorSeer's
semantics). Per call the plugin's policy either serves an output (reused or forecast) or lets the sub-layer compute
and then sees the computed output; the decision depends only on the tracker's context (step, slot), never on the
tensors. State is keyed by ``(sub-layer, slot)``: the separate cond/uncond calls of Flux true-CFG or Wan each have
their own entries, and in a batched-CFG call every row of a cached tensor comes from that same row.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Protocol

import torch
from diffusers.hooks import ModelHook

from dit_accel.core.context import CallContext
from dit_accel.core.hooks import attach, detach
from dit_accel.core.plugin import InstallTarget, Plugin, matches_layers
from dit_accel.core.rows import fill_rows, take_rows


def tensor_bytes(value: Any) -> int:
    """Bytes held by a tensor or a (nested) tuple/list of tensors."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(tensor_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    return 0


def flatten_output(value: Any) -> tuple[list[torch.Tensor], Callable[[list[torch.Tensor]], Any]]:
    """The tensors of a sub-layer output (a tensor, or a tuple such as joint attention's ``(image, text)`` with
    possible ``None``s) and a function that rebuilds an output of the same structure from new tensors."""
    if isinstance(value, torch.Tensor):
        return [value], lambda leaves: leaves[0]
    if isinstance(value, (tuple, list)):
        parts = [flatten_output(v) for v in value]
        sizes = [len(leaves) for leaves, _ in parts]

        def rebuild(leaves: list[torch.Tensor]) -> Any:
            out, start = [], 0
            for (_, rebuild_part), size in zip(parts, sizes):
                out.append(rebuild_part(leaves[start:start + size]))
                start += size
            return type(value)(out)

        return [leaf for leaves, _ in parts for leaf in leaves], rebuild
    return [], lambda leaves: value


class SubLayerPolicy(Protocol):
    """What a caching plugin decides for one sub-layer call.

    A policy whose served outputs never depend on the sub-layer's inputs (a cache or a forecast, not ToCa's
    token-wise recomputation) sets ``serves_blocks = True``: blocks whose sub-layers it serves are then served
    whole (:class:`MergedBlockHook`, :class:`ResidualBlockHook`), and ``serve`` must be free of side effects,
    since a block may ask for every sub-layer before deciding.
    """

    def serve(self, context: CallContext, name: str) -> tuple[Any, str] | None:
        """``(output, "reused" | "forecast")`` to skip the sub-layer, or ``None`` to compute it."""

    def update(self, context: CallContext, name: str, output: Any, args: tuple = (), kwargs: dict | None = None) -> None:
        """See the output the sub-layer just computed (and its inputs)."""


def rows_of(output: Any, context: CallContext) -> Any:
    """A served per-slot output cut to the rows this call holds (see :mod:`dit_accel.core.rows`)."""
    if context.rows is None:
        return output
    leaves, rebuild = flatten_output(output)
    return rebuild([take_rows(leaf, context) for leaf in leaves])


def update_policy(policy: SubLayerPolicy, context: CallContext, name: str, output: Any, args: tuple = (),
                  kwargs: dict | None = None) -> None:
    """Hand a computed output to the policy. A call holding only some rows of its slot (cfg-cache) is completed
    with what the policy would serve the other rows now (its ``peek``; followers moved by their partner's change), so
    the slot's state keeps every row; a policy without ``peek`` keeps its state as it was."""
    if context.rows is None:
        policy.update(context, name, output, args, kwargs)
        return
    peek = getattr(policy, "peek", None)
    prior = None if peek is None else peek(context, name)
    if prior is None:
        return
    prior_leaves, _ = flatten_output(prior)
    leaves, rebuild = flatten_output(output)
    if len(prior_leaves) != len(leaves):
        return
    merged = [fill_rows(p, context, leaf) for p, leaf in zip(prior_leaves, leaves)]
    if any(m is None for m in merged):
        return
    policy.update(context, name, rebuild(merged))


class SubLayerHook(ModelHook):
    """Serves or computes one sub-layer's output as its policy decides."""

    def __init__(self, name: str, policy: SubLayerPolicy, store: "SubLayerStore") -> None:
        super().__init__()
        self.name = name
        self.policy = policy
        self.store = store

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        context = self.store.target.tracker.current
        if context is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        served = self.policy.serve(context, self.name)
        if served is not None:
            output, event = served
            self.store.target.stats.record(context, self.name, event)
            return rows_of(output, context)
        partial = getattr(self.policy, "partial", None)  # token-wise partial recomputation (ToCa)
        if partial is not None and context.rows is None:
            output = partial(context, self.name, self.fn_ref.original_forward, args, kwargs)
            if output is not None:
                return output
        output = self.fn_ref.original_forward(*args, **kwargs)
        update_policy(self.policy, context, self.name, output, args, kwargs)
        return output


_SIGNATURES: dict[type, inspect.Signature] = {}


def _arguments(module: torch.nn.Module, args: tuple, kwargs: dict) -> dict:
    signature = _SIGNATURES.get(type(module))
    if signature is None:
        signature = _SIGNATURES[type(module)] = inspect.signature(module.forward)
    return signature.bind_partial(*args, **kwargs).arguments


class MergedBlockHook(ModelHook):
    """A block whose sub-layers merge in one projection (:class:`~dit_accel.core.blocks.MergedOutput`): the policy
    serves the projection's output (key ``<block>.<projection>``) and the block returns ``residual + gate *
    served`` without running its sub-layers, activation or projection; the sub-layers are counted as served."""

    def __init__(self, key: str, names: list[str], contract, policy: SubLayerPolicy, store: "SubLayerStore") -> None:
        super().__init__()
        self.key, self.names, self.contract, self.policy, self.store = key, names, contract, policy, store

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        context = self.store.target.tracker.current
        served = None if context is None else self.policy.serve(context, self.key)
        if served is None:
            return self.fn_ref.original_forward(*args, **kwargs)  # the projection's hook sees its output
        output, event = served
        for name in self.names:
            self.store.target.stats.record(context, name, event)
        return self.contract.merged.apply(module, _arguments(module, args, kwargs), rows_of(output, context))


class ResidualBlockHook(ModelHook):
    """A block whose output follows from served sub-layer outputs (:class:`~dit_accel.core.blocks.ResidualOutput`):
    when the policy serves every sub-layer of this call, the block returns ``contract.residual.apply(...)`` without
    running its norms and modulations; otherwise (or where ``apply`` does not cover the block) it runs, and the
    sub-layer hooks serve or compute each sub-layer as usual."""

    def __init__(self, names: list[tuple[str, str]], contract, policy: SubLayerPolicy, store: "SubLayerStore") -> None:
        super().__init__()
        self.names, self.contract, self.policy, self.store = names, contract, policy, store

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        context = self.store.target.tracker.current
        if context is not None:
            served = {}
            for name, attribute in self.names:
                result = self.policy.serve(context, name)
                if result is None:
                    break
                served[attribute] = result
            else:
                output = self.contract.residual.apply(module, _arguments(module, args, kwargs),
                                                      {attribute: rows_of(value, context)
                                                       for attribute, (value, _) in served.items()})
                if output is not None:
                    for name, attribute in self.names:
                        self.store.target.stats.record(context, name, served[attribute][1])
                    return output
        return self.fn_ref.original_forward(*args, **kwargs)


class MergedCaptureHook(ModelHook):
    """On the projection of a merged block: hands each computed output to the policy."""

    def __init__(self, key: str, policy: SubLayerPolicy, store: "SubLayerStore") -> None:
        super().__init__()
        self.key, self.policy, self.store = key, policy, store

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        output = self.fn_ref.original_forward(*args, **kwargs)
        context = self.store.target.tracker.current
        if context is not None:
            update_policy(self.policy, context, self.key, output, args, kwargs)
        return output


def _merged_key(block: torch.nn.Module, contract, prefix: str, layers, policy) -> str | None:
    """``<block>.<projection>`` when the block's whole output can be served at its projection by this policy."""
    merged = contract.merged
    if merged is None or not getattr(policy, "serves_blocks", False):
        return None
    norm = getattr(block, "norm", None)
    present = [s for s in contract.sublayers if getattr(block, s.name, None) is not None]
    if (len(present) != len(contract.sublayers) or getattr(block, merged.module, None) is None
            or not all(matches_layers(layers, f"{prefix}.{s.name}") for s in present)
            or not (hasattr(norm, "linear") and hasattr(norm, "silu"))):
        return None
    return f"{prefix}.{merged.module}"


class SubLayerStore:
    """The per-branch state of one caching plugin (any value per ``(sub-layer, slot)``) and its hooks."""

    def __init__(self, target: InstallTarget, hook_name: str) -> None:
        self.target = target
        self.hook_name = hook_name
        self.entries: dict[tuple[str, int], Any] = {}
        self._bytes = 0
        self._modules: list[torch.nn.Module] = []

    def install(self, layers: tuple[str, ...] | None, policy: SubLayerPolicy) -> list[str]:
        """Hook every sub-layer selected by ``layers`` (glob patterns; ``None``: all). Returns their names."""
        names = []
        for list_attr, index, block, contract in self.target.spec.blocks(self.target.transformer):
            prefix = f"{list_attr}.{index}"
            key = _merged_key(block, contract, prefix, layers, policy)
            if key is not None:
                block_names = [f"{prefix}.{s.name}" for s in contract.sublayers]
                attach(block, MergedBlockHook(key, block_names, contract, policy, self), self.hook_name)
                projection = getattr(block, contract.merged.module)
                attach(projection, MergedCaptureHook(key, policy, self), self.hook_name)
                self._modules += [block, projection]
                names += block_names
                continue
            hooked = []
            for sublayer in contract.sublayers:
                module = getattr(block, sublayer.name, None)
                name = f"{list_attr}.{index}.{sublayer.name}"
                if module is None or not matches_layers(layers, name):
                    continue
                attach(module, SubLayerHook(name, policy, self), self.hook_name)
                self._modules.append(module)
                hooked.append((name, sublayer.name))
            present = [s for s in contract.sublayers if getattr(block, s.name, None) is not None]
            if (contract.residual is not None and getattr(policy, "serves_blocks", False) and hooked
                    and len(hooked) == len(present)):
                attach(block, ResidualBlockHook(hooked, contract, policy, self), self.hook_name)
                self._modules.append(block)
            names += [name for name, _ in hooked]
        return names

    def get(self, name: str, slot: int) -> Any:
        return self.entries.get((name, slot))

    def put(self, name: str, slot: int, output: Any) -> None:
        previous = self.entries.get((name, slot))
        self._bytes += tensor_bytes(output) - tensor_bytes(previous)
        self.entries[(name, slot)] = output
        self.target.stats.set_cache_bytes(self._bytes)

    def nbytes(self) -> int:
        return self._bytes

    def clear(self) -> None:
        self.entries.clear()
        self._bytes = 0

    def remove(self) -> None:
        for module in self._modules:
            detach(module, self.hook_name)
        self._modules.clear()
        self.clear()


def computes_at(step: int, num_steps: int | None, interval: int, first_steps: int, last_steps: int,
                anchor: str = "start") -> bool:
    """Whether an interval schedule computes (rather than reuses or forecasts) at ``step``.

    Steps ``< first_steps`` and the last ``last_steps`` steps (when the schedule length is known) always compute;
    in between, a step computes every ``interval`` steps counting from ``first_steps`` (``anchor="start"``) or
    counting back from the final step (``anchor="end"``, when the length is known), so that the final step is a
    full step without spending an extra one on it (diffusers' TaylorSeer lands there by its offset).
    """
    if step < first_steps or interval == 1:
        return True
    if num_steps is not None and step >= num_steps - last_steps:
        return True
    if anchor == "end" and num_steps is not None:
        return (num_steps - 1 - step) % interval == 0
    return (step - first_steps) % interval == 0


class IntervalSubLayerPlugin(Plugin):
    """Base of the sub-layer caching plugins with an interval schedule (FORA, TaylorSeer, ToCa): their configs
    have ``interval``, ``first_steps`` and ``last_steps``; subclasses implement ``serve`` and ``update``."""

    kind = "schedule"

    def install(self) -> None:
        self.store = SubLayerStore(self.target, f"dit_accel.{self.name}")
        self.sublayers = self.store.install(self.config.layers, self)

    def cached_step(self, context: CallContext) -> bool:
        """Whether this call reuses or forecasts (in scope, and not a full step of the schedule)."""
        config = self.config
        anchor = getattr(config, "anchor", "start")
        if config.last_steps or anchor == "end":
            self.warn_unknown_length(context, "the final step cannot be kept a full step (last_steps="
                                              f"{config.last_steps}, anchor={anchor!r})")
        return self.target.in_scope(config, context) and not computes_at(
            context.step, context.num_steps, config.interval, config.first_steps, config.last_steps, anchor)

    def computes_step(self, step: int, num_steps: int) -> bool | None:
        config = self.config
        lo, hi = config.steps if config.steps is not None else (0, num_steps)
        return not lo <= step < hi or computes_at(step, num_steps, config.interval, config.first_steps,
                                                   config.last_steps, getattr(config, "anchor", "start"))

    def idle_reason(self, steps: int) -> str | None:
        config = self.config
        lo, hi = config.steps if config.steps is not None else (0, steps)
        if not any(not computes_at(s, steps, config.interval, config.first_steps, config.last_steps,
                                   getattr(config, "anchor", "start"))
                   for s in range(max(lo, 0), min(hi, steps))):
            return (f"in a {steps}-step generation every step is a full step (interval={config.interval}, "
                    f"first_steps={config.first_steps}, last_steps={config.last_steps}"
                    + (f", steps={config.steps}" if config.steps is not None else "")
                    + "); lower first_steps (e.g. first_steps=1) and last_steps, or run more steps")
        return super().idle_reason(steps)

    def reset(self) -> None:
        self.store.clear()

    def remove(self) -> None:
        self.store.remove()

    def cache_bytes(self) -> int:
        return self.store.nbytes()
