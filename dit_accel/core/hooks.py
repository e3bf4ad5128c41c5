"""Attaching and detaching diffusers ``ModelHook``s so that removal leaves a module exactly as it was.

diffusers' ``HookRegistry`` leaves an instance-level ``forward`` behind after its last hook is removed (and an
empty registry if it created one). We remember what the module looked like before our first hook and put that
back once no hook is left, so a removed acceleration leaves no trace, while hooks other libraries registered (and
registries diffusers itself created, e.g. by ``cache_context``) are left alone.
"""

from __future__ import annotations

import torch
from diffusers.hooks import HookRegistry, ModelHook

_ABSENT = object()
_SAVED = "_dit_accel_saved"


def attach(module: torch.nn.Module, hook: ModelHook, name: str) -> None:
    """Register ``hook`` under ``name`` on ``module`` (outermost of the module's hooks)."""
    state = vars(module)
    registry = state.get("_diffusers_hook")
    if _SAVED not in state and (registry is None or not registry.hooks):
        state[_SAVED] = (state.get("forward", _ABSENT), registry is None)
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)


def detach(module: torch.nn.Module, name: str) -> None:
    """Remove the hook ``name``; once no hook is left, restore the module as it was before our first hook."""
    state = vars(module)
    registry = state.get("_diffusers_hook")
    if registry is None:
        return
    registry.remove_hook(name, recurse=False)
    if registry.hooks or _SAVED not in state:
        return
    forward, created_registry = state.pop(_SAVED)
    if forward is _ABSENT:
        state.pop("forward", None)
    else:
        state["forward"] = forward
    if created_registry:
        del state["_diffusers_hook"]
