"""Compiling an accelerated transformer so that every decision stays outside the compiled regions.

Caching decisions depend on the step (a Python int that changes every call) and sometimes on a tensor statistic;
inside a compiled region they either recompile every step or break the graph. So instead of compiling whole
blocks, :func:`compile_regions` compiles the largest sub-modules that hold no dit_accel decision hook, and, for a
module that does hold one, only the module's own forward underneath our hooks. Decisions then run in eager Python
between compiled graphs that never change, and ``fullgraph=True`` holds. Attention layers routed to an attention
plugin stay eager (the plugin runs under a ``TorchFunctionMode`` that Dynamo does not trace reliably).
"""

from __future__ import annotations

from typing import Any

import torch

from dit_accel.core.attention import HOOK_NAME as ATTENTION_HOOK

_PREFIX = "dit_accel."


def _decision_hooks(module: torch.nn.Module) -> list[str]:
    registry = vars(module).get("_diffusers_hook")
    if registry is None:
        return []
    names = []
    for name in registry._hook_order:
        if not name.startswith(_PREFIX):
            continue
        hook = registry.hooks[name]
        if name == ATTENTION_HOOK and not hook.routes:
            continue  # an unrouted attention hook only calls through: compiles fine
        names.append(name)
    return names


def _subtree_has_decisions(module: torch.nn.Module) -> bool:
    return any(_decision_hooks(child) for child in module.modules())


class CompiledRegions:
    """What :func:`compile_regions` changed, so it can be undone exactly."""

    def __init__(self) -> None:
        self.modules: list[torch.nn.Module] = []
        self.forwards: list[tuple[Any, str, Any]] = []  # (fn_ref, attribute, original)

    def undo(self) -> None:
        for module in self.modules:
            module._compiled_call_impl = None
        for fn_ref, attribute, original in self.forwards:
            setattr(fn_ref, attribute, original)
        self.modules.clear()
        self.forwards.clear()


def _compile_own_forward(module: torch.nn.Module, done: CompiledRegions, options: dict) -> None:
    """Compile the module's real forward, underneath every hook registered on it."""
    registry = vars(module)["_diffusers_hook"]
    fn_ref = registry._fn_refs[0]  # the first registered hook wraps the real forward
    attribute = "original_forward" if fn_ref.original_forward is not None else "forward"
    original = getattr(fn_ref, attribute)
    setattr(fn_ref, attribute, torch.compile(original, **options))
    done.forwards.append((fn_ref, attribute, original))


def _compile(module: torch.nn.Module, done: CompiledRegions, options: dict) -> None:
    if ATTENTION_HOOK in _decision_hooks(module):
        return  # a routed attention layer runs its plugin under a TorchFunctionMode: left eager
    if not _subtree_has_decisions(module):
        if type(module).__module__.startswith("torch.nn."):
            return  # a lone built-in layer (LayerNorm, Linear, ...): Dynamo skips its frame; it stays eager
        module.compile(**options)
        done.modules.append(module)
        return
    children = list(module.children())
    if _decision_hooks(module) and not any(_subtree_has_decisions(child) for child in children):
        _compile_own_forward(module, done, options)
        return
    for child in children:
        _compile(child, done, options)


def compile_regions(blocks: list[torch.nn.Module], **options: Any) -> CompiledRegions:
    """Compile each block, or the parts of it that hold no decision (``options`` go to ``torch.compile``)."""
    done = CompiledRegions()
    for block in blocks:
        _compile(block, done, options)
    return done
