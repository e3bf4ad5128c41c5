"""Attaching and detaching diffusers ``ModelHook``s so that removal leaves a module exactly as it was.

diffusers' ``HookRegistry`` leaves an instance-level ``forward`` behind after its last hook is removed (and an
empty registry if it created one). We remember what the module looked like before our first hook and put that
back once no hook is left, so a removed acceleration leaves no trace, while hooks other libraries registered (and
registries diffusers itself created, e.g. by ``cache_context``) are left alone.
"""

from __future__ import annotations

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.context_parallel import ContextParallelSplitHook
from diffusers.models.modeling_utils import ModelMixin

_ABSENT = object()
_SAVED = "_dit_accel_saved"


def attach(module: torch.nn.Module, hook: ModelHook, name: str) -> None:
    """Register ``hook`` under ``name`` on ``module``: outermost of the module's hooks, except that on a submodule
    of a model (a block, a projection) a sequence split of context or patch parallelism stays outermost."""
    state = vars(module)
    registry = state.get("_diffusers_hook")
    if _SAVED not in state and (registry is None or not registry.hooks):
        state[_SAVED] = (state.get("forward", _ABSENT), registry is None)
    registry = HookRegistry.check_if_exists_or_initialize(module)
    registry.register_hook(hook, name)
    if not isinstance(module, ModelMixin):
        _splits_outermost(registry)


def _splits_outermost(registry: HookRegistry) -> None:
    """Re-register ``registry``'s hooks so that its ``ContextParallelSplitHook``s wrap the others, in order.

    A parallel plan may split a block's input (Wan's and Qwen-Image's first block) rather than the model's. A
    dit_accel hook registered on that block after the split would wrap it and see the whole sequence while the
    block computes on this rank's share, as every later block does (a cache's residual would subtract a whole
    input from a sharded output). With the split outermost, the hooks on every block see what the block sees, as
    on models whose plan splits the model's own inputs. The hooks are removed outermost first and registered
    again, because diffusers' ``remove_hook`` of an inner hook drops a ``new_forward`` hook registered after it.
    """
    order = list(registry._hook_order)
    splits = [name for name in order if isinstance(registry.hooks[name], ContextParallelSplitHook)]
    if not splits or order[len(order) - len(splits):] == splits:
        return
    hooks = [(name, registry.hooks[name]) for name in order]
    for name in reversed(order):
        registry.remove_hook(name, recurse=False)
    for name, hook in [item for item in hooks if item[0] not in splits] + [item for item in hooks
                                                                          if item[0] in splits]:
        registry.register_hook(hook, name)


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
