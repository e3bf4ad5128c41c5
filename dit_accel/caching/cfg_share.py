"""CFG sharing: the unconditional branch reuses the conditional branch's attention output (DiTFastAttn's
conditional redundancy elimination, Yuan et al., NeurIPS 2024).

Late in sampling the conditional and unconditional attention outputs of a layer nearly agree, so on the chosen
steps the attention core is computed for the conditional rows only and copied to their unconditional partners.
Batched CFG (DiT, PixArt, SD3): the call's cond rows compute, the uncond rows receive the copy. Separate calls (Flux
true-CFG, Wan): the cond call stores each layer's output and the uncond call of the same step returns it without
computing. Projections, norms and gates still run per branch; only the attention core is shared.

Under Ulysses context parallelism each rank attends over every token for a share of the heads, and the copy works
as on one process; ring attention (key chunks merged outside SDPA) and ``patch-parallel`` (which computes attention
itself) are refused.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from dit_accel.core.attention import AttentionCall
from dit_accel.core.context import CallContext
from dit_accel.core.parallel import attention_refusal, parallel_setting
from dit_accel.core.plugin import Plugin, register_plugin
from dit_accel.recipe import PluginConfig, check_range, register_config


def sharing_window(step: int, num_steps: int | None, start: float, end: float) -> bool:
    """Whether ``step`` lies in ``[start, end)`` as fractions of the schedule (never, if its length is unknown)."""
    if num_steps is None:
        return False
    position = step / num_steps
    return start <= position < end


@register_config("cfg-share")
@dataclass(frozen=True)
class CFGShareConfig(PluginConfig):
    """Share the conditional attention output with the unconditional branch on a window of steps.

    Args:
        start (`float`, defaults to `0.5`): where sharing starts, as a fraction of the schedule. Allowed: 0-1.
        end (`float`, defaults to `1.0`): where it stops. Allowed: 0-1, greater than ``start``.
    """

    kind = "attention"
    start: float = 0.5
    end: float = 1.0

    def validate(self) -> None:
        check_range(self, "start", 0.0, 1.0)
        check_range(self, "end", 0.0, 1.0)
        if self.end <= self.start:
            raise ValueError(f"CFGShareConfig.end = {self.end} must be greater than start = {self.start}")


@register_plugin(CFGShareConfig)
class CFGSharePlugin(Plugin):
    kind = "attention"

    def install(self) -> None:
        self._check_parallel()
        self.stored: dict[tuple[str, int], tuple[int, torch.Tensor]] = {}
        self.reset()
        self.target.route_attention(self, self._attend)

    def _check_parallel(self) -> None:
        """Refuse ring attention and patch-parallel: the attention call is not whole there (see the docstring)."""
        setting = parallel_setting(self.target.transformer)
        error = attention_refusal("cfg-share", setting) if setting is not None else None
        if error is not None:
            raise error

    def _active(self, context: CallContext | None) -> bool:
        if context is not None:
            self.warn_unknown_length(context, f"its window (start={self.config.start}, end={self.config.end}) never "
                                     "opens: nothing is shared")
        return (context is not None and self.target.in_scope(self.config, context)
                and sharing_window(context.step, context.num_steps, self.config.start, self.config.end))

    def _attend(self, query, key, value, call: AttentionCall) -> torch.Tensor:
        self._check_parallel()  # parallelism enabled after accelerate_dit is only seen here
        context = call.context
        roles = [] if context is None else [branch.role for branch in context.branches]
        self._saw_uncond = self._saw_uncond or "uncond" in roles
        if not self._active(context):
            return call.dense(query, key, value)
        if None in roles:  # never an exception mid-generation: say so once, compute dense
            if not self._unknown_roles:
                warnings.warn("dit_accel cfg-share cannot tell the conditional from the unconditional rows of this "
                              f"pipeline's calls (roles {roles}): it computes them dense; declare how the loop runs "
                              "CFG with handle.begin(cfg=...) or handle.generation(cfg=...)", UserWarning, stacklevel=2)
            self._unknown_roles = True
            return call.dense(query, key, value)
        if len(roles) > 1 and "uncond" in roles and "cond" in roles:
            return self._batched(query, key, value, call, roles)
        layer_key = (call.layer.name, call.index)
        if roles[0] == "cond" or "uncond" not in roles:
            out = call.dense(query, key, value)
            if self._saw_uncond or self._first_cond_step in (None, context.step):
                # Kept for the unconditional call of this step; after a whole step with no such call (no CFG in
                # this generation) nothing is stored any more.
                self._first_cond_step = context.step if self._first_cond_step is None else self._first_cond_step
                self.stored[layer_key] = (context.step, out)
            else:
                self.stored.clear()
            return out
        stored = self.stored.get(layer_key)
        expected = (*query.shape[:-1], value.shape[-1])
        if stored is None or stored[0] != context.step or tuple(stored[1].shape) != expected:
            return call.dense(query, key, value)
        self._record(call)
        return stored[1]

    def _batched(self, query, key, value, call: AttentionCall, roles: list[str]) -> torch.Tensor:
        cond = [i for i, role in enumerate(roles) if role == "cond"]
        uncond = [i for i, role in enumerate(roles) if role == "uncond"]
        if len(cond) != len(uncond):
            return call.dense(query, key, value)
        options = dict(call.options)
        mask = options.get("attn_mask")
        if isinstance(mask, torch.Tensor) and mask.ndim == 4 and mask.shape[0] == len(roles):
            options["attn_mask"] = mask[cond]
        index = torch.tensor(cond, device=query.device)
        shared = torch.nn.functional.scaled_dot_product_attention(
            query.index_select(0, index), key.index_select(0, index), value.index_select(0, index), **options)
        out = query.new_empty((query.shape[0], *shared.shape[1:]))
        out[cond] = shared
        out[uncond] = shared
        self._record(call, fraction_of_rows=0.5)
        return out

    def _record(self, call: AttentionCall, fraction_of_rows: float = 1.0) -> None:
        stats = self.target.stats
        core = stats.core_fraction(call.context, call.layer.name)
        stats.record(call.context, call.layer.name, "partial", computed_fraction=1.0 - core * fraction_of_rows)

    def idle_reason(self, steps: int) -> str | None:
        config = self.config
        if self._unknown_roles:
            return ("it could not tell the conditional from the unconditional rows of the calls; declare how the "
                    "loop runs CFG with handle.begin(cfg=...)")
        if not self._saw_uncond:
            return ("no call of this generation ran classifier-free guidance (guidance off, a guidance-distilled "
                    "model, or true_cfg_scale <= 1): there is no unconditional branch to share with")
        if not any(sharing_window(step, steps, config.start, config.end) for step in range(steps)):
            return f"its window start={config.start}, end={config.end} holds no step of {steps}; widen it"
        return super().idle_reason(steps)

    def reset(self) -> None:
        self.stored.clear()
        self._saw_uncond = False
        self._unknown_roles = False
        self._first_cond_step: int | None = None

    def remove(self) -> None:
        self.target.attention.unroute(self)
        self.stored.clear()

    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, t in self.stored.values())
