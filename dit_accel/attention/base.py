"""What every attention plugin shares: which calls it may touch, text tokens kept exact, stats, dense fallback.

A plugin subclasses :class:`ImageAttentionPlugin` and implements ``image_attention``: the attention of the image
queries over the image keys (in the grid's natural token order) plus the shared text keys. The base class routes
the self- and joint-attention layers selected by the config (cross attention is never touched: its keys are text),
splits off the text tokens wherever the model puts them (first in Flux, last in SD3), lets text queries attend to
everything exactly, and puts the sequence back together.

A key-padding mask over text tokens (HunyuanVideo pads every prompt and masks the padding, Qwen-Image masks it when
a batch mixes prompt lengths) is served exactly: each sample's masked text keys are left out, one call of the
plugin per distinct prompt length. Calls it cannot handle exactly as described (any other attention mask, causal
attention, dropout, a sequence that does not match the token grid) run dense, are counted in ``fallbacks`` and
warned about once per reason, so an acceleration that is not happening never goes unnoticed.

Under Ulysses context parallelism a rank attends over every token for a share of the heads; the plugin runs on the
sequence put back in the model's order (:func:`~dit_accel.core.parallel.ulysses_attention`), as on one process.
Ring attention is refused with a ``ValueError`` at install (enable the parallelism before ``accelerate_dit``), and
``patch-parallel`` refuses attention plugins itself: neither is served dense in silence.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dit_accel.attention.rettention import RettentionState, extra_key_lse
from dit_accel.attention.tiled import tiled_attention
from dit_accel.core.attention import AttentionCall, KeyPaddingReader, LayerId, padding_groups, unsupported_options
from dit_accel.core.blocks import TokenGrid
from dit_accel.core.context import CallContext
from dit_accel.core.parallel import attention_refusal, parallel_setting, ulysses_attention
from dit_accel.core.plugin import Plugin
from dit_accel.recipe import PluginConfig, check_bool, check_range


@dataclass(frozen=True)
class ImageAttentionConfig(PluginConfig):
    """Fields every attention plugin has besides ``steps`` and ``layers``.

    Args:
        start (`float`, defaults to `0.0`) / end (`float`, defaults to `1.0`): the plugin acts on steps whose
            position ``step / num_steps`` lies in ``[start, end)``. Sparse attention is usually kept dense for the
            first 15-25 % of steps (``start=0.2``); token downsampling is often applied early only (``end=0.5``).
        rettention (`bool`, defaults to `False`): Re-ttention (``rettention.py``): every ``rettention_interval``-th
            active step computes dense attention and caches each query's kept softmax mass ``r`` and the residual
            ``R = O_dense - r * O_sparse``; the steps between output ``r * O_sparse + R``. For very sparse settings
            (a few % of the keys). Refresh steps count as dense in the stats. Plugins that do not compute a sparse
            ``image_attention`` (int8) refuse it.
        rettention_interval (`int`, defaults to `5`): a refresh every this many active steps of each layer and
            branch (the first active step always refreshes); 1 is dense attention throughout. Allowed: 1-1000;
            the paper refreshes every 5 steps.
        rettention_drift (`float`, defaults to `0.0`): added to ``r`` per sparse step since the refresh (capped at
            1); the official code hard-codes 0.04. Allowed: 0-1.
    """

    kind = "attention"
    start: float = 0.0
    end: float = 1.0
    rettention: bool = False
    rettention_interval: int = 5
    rettention_drift: float = 0.0

    def validate(self) -> None:
        check_range(self, "start", 0.0, 1.0)
        check_range(self, "end", 0.0, 1.0)
        check_bool(self, "rettention")
        check_range(self, "rettention_interval", 1, 1000, integer=True)
        check_range(self, "rettention_drift", 0.0, 1.0)
        if self.start >= self.end:
            raise ValueError(f"{type(self).__name__}: start = {self.start} must be below end = {self.end}")


def split_text(x: torch.Tensor, num_text: int, text_first: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(image, text) parts of a (B, H, S, D) sequence whose ``num_text`` text tokens come first or last."""
    if num_text == 0:
        return x, x[:, :, :0]
    if text_first:
        return x[:, :, num_text:], x[:, :, :num_text]
    return x[:, :, :-num_text], x[:, :, -num_text:]


def dense_image_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, text_key: torch.Tensor,
                          text_value: torch.Tensor, call: AttentionCall) -> torch.Tensor:
    """Exact attention of the image queries over [image; text] keys (what a plan covering everything computes)."""
    if text_key.shape[2]:
        key, value = torch.cat([key, text_key], 2), torch.cat([value, text_value], 2)
    return F.scaled_dot_product_attention(query, key, value, scale=call.options.get("scale"))


class ImageAttentionPlugin(Plugin):
    """Base of the attention plugins (see the module docstring)."""

    kind = "attention"
    _rettention: RettentionState | None = None  # set by install() when the config asks for rettention

    def install(self) -> None:
        layers = [layer for layer in self.target.attention_layers(self.config) if layer.kind in ("self", "joint")]
        if not layers:
            raise ValueError(
                f"{self.name}: no self- or joint-attention layer of {type(self.target.transformer).__name__} matches "
                f"layers={self.config.layers!r}; cross attention (text keys) is never sparsified"
            )
        self.depth = {layer.name: index for index, layer in enumerate(layers)}
        self.fallbacks: Counter = Counter()
        self._warned: set[str] = set()
        self.key_padding = KeyPaddingReader()
        if self.config.rettention:
            if type(self).image_attention is ImageAttentionPlugin.image_attention:
                raise ValueError(f"{self.name}: rettention=True is not allowed: {self.name} computes no sparse "
                                 "image attention to correct (allowed: false)")
            self._rettention = RettentionState(self.config.rettention_interval, self.config.rettention_drift)
        setting = parallel_setting(self.target.transformer)
        error = attention_refusal(self.name, setting) if setting is not None else None
        if error is not None:
            raise error
        self.target.attention.route(layers, self._routed, owner=self, when=self._active, steps=self.config.steps)

    def _routed(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                call: AttentionCall) -> torch.Tensor:
        setting = parallel_setting(self.target.transformer)
        if setting is None:
            return self._attend(query, key, value, call)
        return ulysses_attention(self.name, setting, self._attend, query, key, value, call)

    def remove(self) -> None:
        self.target.attention.unroute(self)

    def reset(self) -> None:
        if self._rettention is not None:
            self._rettention.clear()

    def cache_bytes(self) -> int:
        return self._rettention.nbytes() if self._rettention is not None else 0

    def idle_reason(self, steps: int) -> str | None:
        config = self.config
        state = self._rettention
        if state is not None and state.refreshes and not state.sparse_calls and not self.fallbacks:
            return (f"with rettention_interval={config.rettention_interval} every active step of this {steps}-step "
                    "generation was a dense refresh; a smaller interval or more steps leaves sparse steps")
        if (config.start > 0 or config.end < 1) and not any(
                config.start <= step / steps < config.end for step in range(steps)):
            return f"its window start={config.start}, end={config.end} holds no step of {steps}; widen it"
        if self.fallbacks:
            return "its layers fell back to dense attention: " + "; ".join(sorted(self.fallbacks))
        return ("every query kept every key at this resolution (the token grid is no larger than its tiles or "
                "window); it saves work at larger resolutions or with smaller tiles")

    def idle_already_said(self) -> bool:
        return bool(self.fallbacks)  # each fallback reason was warned when it first happened

    def _active(self, context: CallContext | None) -> bool:
        if not self.target.in_scope(self.config, context):
            return False
        if context.num_steps and (self.config.start > 0 or self.config.end < 1):
            return self.config.start <= context.step / context.num_steps < self.config.end
        return True

    # -- the part a subclass writes --------------------------------------------------------------------------
    def image_attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        text_key: torch.Tensor, text_value: torch.Tensor, grid: TokenGrid, layer: LayerId,
                        call: AttentionCall) -> tuple[torch.Tensor, float]:
        """Image queries (B, H, N, D) against image keys in grid order and the text keys (B, H, L, D, maybe L=0);
        returns the output (B, H, N, Dv) and the fraction of the N image keys each query effectively computed
        against (1.0 for dense)."""
        raise NotImplementedError

    def image_attention_lse(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            text_key: torch.Tensor, text_value: torch.Tensor, grid: TokenGrid, layer: LayerId,
                            call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``image_attention`` plus the natural log of its softmax normaliser per query (B, H, N), for
        ``rettention``. The default reads it off one call with extra text keys (:func:`.rettention.extra_key_lse`);
        a plugin whose kernel returns it may override this."""
        return extra_key_lse(lambda q, k, v, tk, tv: self.image_attention(q, k, v, tk, tv, grid, layer, call),
                             query, key, value, text_key, text_value, call.options.get("scale"))

    def _image_attention(self, query, key, value, text_key, text_value, grid, layer, call):
        if self._rettention is None:
            return self.image_attention(query, key, value, text_key, text_value, grid, layer, call)
        return self._rettention.attend(self, query, key, value, text_key, text_value, grid, layer, call)

    # -- the shared part --------------------------------------------------------------------------------------
    def _unsupported(self, query: torch.Tensor, key: torch.Tensor, call: AttentionCall) -> str | None:
        reason = unsupported_options(call.options, key_padding=True)
        if reason is not None:
            return reason
        if key.shape[2] != query.shape[2] or key.shape[1] != query.shape[1]:
            return "keys differ from queries in length or heads"
        if call.layout.grid is None:
            return "the token grid of this model could not be read"
        if not call.layout.matches(query.shape[2]):
            return "the sequence does not match the token grid"
        return None

    def _fallback(self, reason: str, call: AttentionCall) -> None:
        self.fallbacks[reason] += 1
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(f"dit_accel {self.name}: {call.layer.name} runs dense attention: {reason}", stacklevel=2)

    def _attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                call: AttentionCall) -> torch.Tensor:
        reason = self._unsupported(query, key, call)
        if reason is not None:
            self._fallback(reason, call)
            return call.dense(query, key, value)
        layout = call.layout
        num_text = layout.num_text_tokens if layout.kind == "joint" else 0
        text_first = layout.text_position == "first"
        q_img, q_txt = split_text(query, num_text, text_first)
        k_img, k_txt = split_text(key, num_text, text_first)
        v_img, v_txt = split_text(value, num_text, text_first)
        mask = call.options.get("attn_mask")
        if mask is None:
            out, density = self._image_attention(q_img, k_img, v_img, k_txt, v_txt, layout.grid, call.layer, call)
            kept_text = num_text
        else:
            keep = self.key_padding(mask, query.shape[0], key.shape[2])
            if keep is None:
                self._fallback("the attention mask is not a key-padding mask", call)
                return call.dense(query, key, value)
            keep_img, keep_txt = split_text(keep[:, None, :, None], num_text, text_first)
            if not bool(keep_img.all()):
                self._fallback("the attention mask hides image tokens", call)
                return call.dense(query, key, value)
            out, density, kept_text = self._padded_image_attention(q_img, k_img, v_img, k_txt, v_txt,
                                                                   keep_txt[:, 0, :, 0], call)
        if num_text:
            out_txt = F.scaled_dot_product_attention(q_txt, key, value, attn_mask=mask, scale=call.options.get("scale"))
            out = torch.cat([out_txt, out] if text_first else [out, out_txt], 2)
        self._record(call, density, q_img.shape[2], kept_text)
        return out

    def _padded_image_attention(self, query, key, value, text_key, text_value, keep_text: torch.Tensor,
                                call: AttentionCall) -> tuple[torch.Tensor, float, float]:
        """``image_attention`` with each sample's padded text keys left out: one call per distinct prompt length
        in the batch (each its own ``call.index``, so per-call caches never mix groups). Returns the output, the
        batch's mean key density and mean number of kept text keys."""
        groups = padding_groups(keep_text)
        if len(groups) == 1:
            kept = groups[0][1]
            out, density = self._image_attention(query, key, value, text_key[:, :, kept], text_value[:, :, kept],
                                                 call.layout.grid, call.layer, call)
            return out, density, int(kept.sum())
        out, density, kept_text = None, 0.0, 0.0
        for number, (rows, kept) in enumerate(groups):
            part = dataclasses.replace(call, index=(call.index, number))
            part_out, part_density = self._image_attention(
                query[rows], key[rows], value[rows], text_key[rows][:, :, kept], text_value[rows][:, :, kept],
                call.layout.grid, call.layer, part)
            if out is None:
                out = part_out.new_empty((query.shape[0], *part_out.shape[1:]))
            out[rows] = part_out
            share = len(rows) / query.shape[0]
            density += part_density * share
            kept_text += int(kept.sum()) * share
        return out, density, kept_text

    def _record(self, call: AttentionCall, density: float, num_image: int, num_text: int) -> None:
        if call.context is None or density >= 1.0:
            return
        total = num_image + num_text
        computed = num_image * (density * num_image + num_text) + num_text * total
        core_computed = computed / float(total * total)
        stats = self.target.stats
        name = call.layer.name
        core = stats.core_fraction(call.context, name)
        stats.record(call.context, name, "partial", computed_fraction=1.0 - core * (1.0 - core_computed))


class TiledAttentionPlugin(ImageAttentionPlugin):
    """An attention plugin whose image attention is :func:`tiled_attention` over a per-layer plan."""

    def install(self) -> None:
        super().install()
        self._plans: dict = {}

    def plan(self, grid: TokenGrid, layer: LayerId, device: torch.device):
        """``(TilePlan, key density)`` of ``layer`` at ``grid``; subclasses implement ``build_plan``. Odd layers
        (in the plugin's own layer order) get the shifted plan when the config has ``shift=True``."""
        shifted = self.is_shifted(layer)
        key = (grid, shifted, device)
        entry = self._plans.get(key)
        if entry is None:
            plan = self.build_plan(grid, shifted)
            entry = self._plans[key] = (plan.to(device), plan.key_density())
        return entry

    def is_shifted(self, layer: LayerId) -> bool:
        return bool(getattr(self.config, "shift", False)) and self.depth[layer.name] % 2 == 1

    def build_plan(self, grid: TokenGrid, shifted: bool):
        raise NotImplementedError

    def image_attention(self, query, key, value, text_key, text_value, grid, layer, call):
        plan, density = self.plan(grid, layer, query.device)
        if density >= 1.0 and not plan.pooled:  # every key is exact already: plain SDPA is cheaper
            return dense_image_attention(query, key, value, text_key, text_value, call), 1.0
        out = tiled_attention(query, key, value, plan, shared_key=text_key, shared_value=text_value,
                              scale=call.options.get("scale"))
        return out, density
