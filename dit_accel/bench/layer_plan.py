"""Per-layer plans for ``ditaccel tune``, in the greedy style of DiTFastAttn.

A uniform setting treats every block alike, but blocks differ in how much an approximation costs them. After the
uniform search has found the most aggressive setting ``base`` that meets the target and the next one, ``fast``,
that does not, the per-layer stage looks for the largest set of blocks that can run at ``fast`` while the others
stay at ``base`` (or, when no uniform setting met the target, stay exact):

1. sensitivity: each block alone at ``fast`` (every other block at ``base``) is measured; a block that misses the
   target even alone is never chosen;
2. greedy: blocks are added from the least to the most sensitive, each kept only if the whole set still meets
   the target (DiTFastAttn's layer-by-layer greedy choice, with the end-to-end target as the criterion).

The plan is two instances of the same plugin on disjoint blocks -- ``layers`` patterns such as
``transformer_blocks.3`` (a block name selects all of its sub-layers) -- which is an ordinary recipe.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

# Plugins whose work is per sub-layer, so that a block-wise plan means something. (Block-range and step-level
# decisions -- fbcache, magcache, delta-dit, cfg-share -- have no per-block knob.)
PER_LAYER_TYPES = ("fora", "taylorseer", "toca", "todo")


def transformer_blocks(pipe: Any) -> list[str]:
    """The block names of the pipeline's (first) transformer, in execution order: ``transformer_blocks.0``, ...,
    ``single_transformer_blocks.3``."""
    from dit_accel.core.blocks import spec_for

    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        return []
    return [f"{name}.{index}" for name, index, _, _ in spec_for(transformer).blocks(transformer)]


def split_recipe(recipe: Any, plugin_index: int, field: str, base: Any, fast: Any, chosen: list[str],
                 blocks: list[str], name: str | None = None) -> Any:
    """``recipe`` with its plugin ``plugin_index`` at ``field = fast`` on the ``chosen`` blocks and at
    ``field = base`` on the others (left out there when ``base`` is None)."""
    from dit_accel.recipe import Recipe

    plugin = recipe.plugins[plugin_index]
    rest = [b for b in blocks if b not in chosen]
    parts = []
    if chosen:
        parts.append(dataclasses.replace(plugin, **{field: fast}, layers=tuple(chosen) if rest else None))
    if rest and base is not None:
        parts.append(dataclasses.replace(plugin, **{field: base}, layers=tuple(rest) if chosen else None))
    if not parts:
        raise ValueError("a per-layer plan needs at least one block with the plugin")
    plugins = list(recipe.plugins[:plugin_index]) + parts + list(recipe.plugins[plugin_index + 1:])
    return Recipe(plugins=tuple(plugins), name=name or recipe.name, description=recipe.description)


def greedy_layer_plan(blocks: list[str], single: Callable[[str], float | None],
                      accepts: Callable[[list[str]], bool | None]) -> list[str]:
    """The greedy plan: ``single(block)`` is the target-metric badness of ``block`` alone at the fast setting
    (lower is better; None when it misses the target alone, or when the budget ran out), ``accepts(chosen)``
    whether a set meets the target (None: budget out, stop). Returns the chosen blocks in execution order."""
    scores = {}
    for block in blocks:
        score = single(block)
        if score is not None:
            scores[block] = score
    order = sorted(scores, key=lambda b: (scores[b], blocks.index(b)))
    chosen: list[str] = []
    for block in order:
        trial = chosen + [block]
        if len(trial) == 1:  # measured already by single(): it met the target alone
            chosen = trial
            continue
        verdict = accepts(sorted(trial, key=blocks.index))
        if verdict is None:
            break
        if verdict:
            chosen = trial
    return sorted(chosen, key=blocks.index)


__all__ = ["PER_LAYER_TYPES", "greedy_layer_plan", "split_recipe", "transformer_blocks"]
