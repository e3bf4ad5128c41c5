"""Sub-layer caching: the hook every feature-caching plugin stands on.

Each attention and MLP sub-layer named by the block contracts gets a hook. The sub-layer's output is what the
block multiplies by its gate, so reusing it keeps the modulation and the gates fresh (FORA's semantics). Per call
the plugin answers one question for the current step -- compute or reuse -- and the decision is taken once per
transformer call (by the plugin, from the tracker's context), never inside the tensor math. Caches are keyed by
``(sub-layer, slot)``: the separate cond/uncond calls of Flux true-CFG or Wan each have their own entries, and in a
batched-CFG call every row of the cached tensor comes from that same row.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from diffusers.hooks import ModelHook

from dit_accel.core.context import CallContext
from dit_accel.core.hooks import attach, detach
from dit_accel.core.plugin import InstallTarget, matches_layers


def tensor_bytes(value: Any) -> int:
    """Bytes held by a tensor or a (nested) tuple/list of tensors."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(tensor_bytes(v) for v in value)
    return 0


class SubLayerHook(ModelHook):
    """Computes or reuses one sub-layer's output as its owner decides."""

    def __init__(self, name: str, decide: Callable[[CallContext, str], bool], store: "SubLayerStore") -> None:
        super().__init__()
        self.name = name
        self.decide = decide  # (context, sub-layer name) -> reuse?
        self.store = store

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        context = self.store.target.tracker.current
        if context is not None and self.decide(context, self.name):
            cached = self.store.get(self.name, context.slot)
            if cached is not None:
                self.store.target.stats.record(context, self.name, "reused")
                return cached
        output = self.fn_ref.original_forward(*args, **kwargs)
        if context is not None:
            self.store.put(self.name, context.slot, output)
        return output


class SubLayerStore:
    """The per-branch cache of sub-layer outputs of one plugin, and the hooks that fill and read it."""

    def __init__(self, target: InstallTarget, hook_name: str) -> None:
        self.target = target
        self.hook_name = hook_name
        self.entries: dict[tuple[str, int], Any] = {}
        self._bytes = 0
        self._modules: list[torch.nn.Module] = []

    def install(self, layers: tuple[str, ...] | None, decide: Callable[[CallContext, str], bool]) -> list[str]:
        """Hook every sub-layer selected by ``layers`` (glob patterns; ``None``: all). Returns their names."""
        names = []
        for list_attr, index, block, contract in self.target.spec.blocks(self.target.transformer):
            for sublayer in contract.sublayers:
                module = getattr(block, sublayer.name, None)
                name = f"{list_attr}.{index}.{sublayer.name}"
                if module is None or not matches_layers(layers, name):
                    continue
                attach(module, SubLayerHook(name, decide, self), self.hook_name)
                self._modules.append(module)
                names.append(name)
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
