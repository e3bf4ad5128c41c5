"""Scoped attention interception: replace the attention computation of chosen layers, inside the transformer only.

Diffusers computes attention in two ways: legacy processors call ``F.scaled_dot_product_attention`` directly
(DiT, PixArt, SD3, CogVideoX) and new processors go through ``dispatch_attention_fn`` (Flux, Wan, Qwen-Image,
HunyuanVideo, LTX), whose native backend calls the same function with keyword arguments. Both end in
``torch.nn.functional.scaled_dot_product_attention``, so that is where we intercept -- but never by replacing the
function for the process (that breaks text encoders and VAEs and every other thread). Instead each routed
attention module gets a hook that, for the duration of that module's forward only, enters a
``TorchFunctionMode`` (thread-local) that catches the SDPA call and hands it to the plugin's function together
with the layer's identity and the token layout.

Attention backends that do not end in SDPA (flash-attn, sage, xformers, flex) cannot be intercepted; a routed
layer that finishes its forward without an SDPA call raises an error that says so, instead of silently doing
nothing.

The plugin contract, one function::

    fn(query, key, value, call: AttentionCall) -> Tensor

with ``query`` (B, H, Sq, D), ``key``/``value`` (B, H, Sk, D) exactly as SDPA receives them ("HND" layout), and
the output (B, H, Sq, Dv). ``call.dense(query, key, value)`` computes the exact attention with the original options.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from diffusers.hooks import ModelHook
from torch.overrides import TorchFunctionMode

from dit_accel.core.blocks import AttentionKind, TokenLayout, TransformerSpec
from dit_accel.core.context import CallContext, StepTracker
from dit_accel.core.hooks import attach, detach

_SDPA = torch.nn.functional.scaled_dot_product_attention
_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}

HOOK_NAME = "dit_accel.attention"


@dataclass(frozen=True)
class LayerId:
    """The identity of one attention sub-layer: ``transformer_blocks.3.attn`` and its kind."""

    block_list: str
    block_index: int
    sublayer: str
    kind: AttentionKind

    @property
    def name(self) -> str:
        return f"{self.block_list}.{self.block_index}.{self.sublayer}"


@dataclass
class AttentionCall:
    """One intercepted attention call, as a plugin sees it.

    Attributes:
        layer: which attention sub-layer is calling.
        layout: where image and text tokens sit in the query sequence (and the token grid).
        context: the tracker's step/branch decision for the current transformer call (``None`` outside one).
        index: the SDPA call's index within this module's forward (Wan's image-to-video cross attention makes two);
            ``(index, group)`` when an attention plugin runs a call in groups of samples with one prompt length.
        options: the remaining SDPA arguments (``attn_mask``, ``dropout_p``, ``is_causal``, ``scale``,
            ``enable_gqa``), to be honoured or refused by the plugin.
    """

    layer: LayerId
    layout: TokenLayout
    context: CallContext | None
    index: int | tuple[int, int]
    options: dict = field(default_factory=dict)

    def dense(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Exact attention with the call's original options (what the model would have computed)."""
        return _SDPA(query, key, value, **self.options)


def unsupported_options(options: dict, *, key_padding: bool = False) -> str | None:
    """Why SDPA ``options`` (an :class:`AttentionCall`'s) cannot be served by an attention that does not implement
    masks, causality or dropout, or ``None`` if they can. ``key_padding=True``: the caller serves a mask that
    :func:`key_padding` reads (it checks that itself), so a mask alone is no reason."""
    if options.get("attn_mask") is not None and not key_padding:
        return "the call has an attention mask"
    if options.get("is_causal"):
        return "causal attention"
    if options.get("dropout_p", 0.0) > 0:
        return "attention dropout (training)"
    return None


def key_padding(mask: torch.Tensor, batch: int, num_keys: int) -> torch.Tensor | None:
    """Per sample, the keys an SDPA ``attn_mask`` lets every head and query see, as a (batch, num_keys) bool
    tensor, when the mask is a key-padding mask (HunyuanVideo's and Qwen-Image's (B, 1, 1, S) masks over padded
    prompt tokens); ``None`` for any other mask.

    Boolean masks (True: attend) and additive ones whose entries are 0 or -inf are read; any other bias is not
    padding. Attention over each sample's kept keys alone is then exactly the masked attention."""
    if mask.dim() == 0 or mask.shape[-1] != num_keys or (mask.dim() == 4 and mask.shape[0] not in (1, batch)):
        return None
    samples = mask.shape[0] if mask.dim() == 4 else 1
    rows = mask.reshape(samples, -1, num_keys)
    keep = rows[:, 0]
    if rows.shape[1] > 1 and not bool((rows == keep[:, None]).all()):
        return None
    if mask.dtype != torch.bool:
        if not mask.is_floating_point() or not bool(((keep == 0) | torch.isneginf(keep)).all()):
            return None
        keep = keep == 0
    return keep.expand(batch, num_keys)


class KeyPaddingReader:
    """:func:`key_padding` remembering its last answer: HunyuanVideo hands one mask object to every block of a
    forward, so the mask (a host sync on a GPU) is read once per forward, not once per attention call."""

    def __init__(self) -> None:
        self._last: tuple | None = None

    def __call__(self, mask: torch.Tensor, batch: int, num_keys: int) -> torch.Tensor | None:
        key = (mask._version, batch, num_keys)
        if self._last is not None and self._last[0] is mask and self._last[1] == key:
            return self._last[2]
        keep = key_padding(mask, batch, num_keys)
        self._last = (mask, key, keep)
        return keep


def padding_groups(keep: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The samples of a (batch, num_keys) :func:`key_padding` grouped by their kept keys: ``(rows, keep_row)``
    pairs, one per distinct prompt length in the batch (usually one)."""
    if keep.shape[0] == 1 or bool((keep == keep[:1]).all()):
        return [(torch.arange(keep.shape[0], device=keep.device), keep[0])]
    distinct, inverse = torch.unique(keep, dim=0, return_inverse=True)
    return [(torch.nonzero(inverse == g).flatten(), row) for g, row in enumerate(distinct)]


AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionCall], torch.Tensor]


class _SDPAScope(TorchFunctionMode):
    """Catches SDPA calls made while one attention module runs and routes them to a plugin function."""

    def __init__(self, hook: "AttentionLayerHook", fn: AttentionFn) -> None:
        super().__init__()
        self.hook = hook
        self.fn = fn
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not _SDPA:
            return func(*args, **kwargs)
        bound = dict(_SDPA_DEFAULTS)
        bound.update(zip(_SDPA_PARAMS, args))
        bound.update(kwargs)
        query, key, value = bound.pop("query"), bound.pop("key"), bound.pop("value")
        call = AttentionCall(
            layer=self.hook.layer,
            layout=self.hook.layout(),
            context=self.hook.tracker.current,
            index=self.calls,
            options=bound,
        )
        self.calls += 1
        return self.fn(query, key, value, call)


class AttentionLayerHook(ModelHook):
    """Installed on every attention sub-layer of the supported block lists; routes SDPA when a plugin asks."""

    def __init__(self, layer: LayerId, tracker: StepTracker) -> None:
        super().__init__()
        self.layer = layer
        self.tracker = tracker
        self.routes: list[tuple[object, AttentionFn, Callable[[CallContext | None], bool] | None, tuple | None]] = []

    def layout(self) -> TokenLayout:
        context = self.tracker.current
        spec = self.tracker.spec
        grid = context.grid if context is not None else None
        text = context.num_text_tokens if context is not None and self.layer.kind == "joint" else 0
        return TokenLayout(
            kind=self.layer.kind,
            grid=grid,
            num_text_tokens=text,
            text_position=spec.text_position if self.layer.kind == "joint" else None,
        )

    def active_route(self) -> AttentionFn | None:
        context = self.tracker.current
        for _, fn, when, _ in self.routes:
            if when is None or when(context):
                return fn
        return None

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        fn = self.active_route() if self.routes else None
        if fn is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        scope = _SDPAScope(self, fn)
        with scope:
            output = self.fn_ref.original_forward(*args, **kwargs)
        if scope.calls == 0:
            backend = getattr(getattr(module, "processor", None), "_attention_backend", None)
            raise RuntimeError(
                f"dit_accel could not intercept attention in {self.layer.name}: its processor "
                f"({type(getattr(module, 'processor', None)).__name__}, backend {backend}) did not call "
                "torch.nn.functional.scaled_dot_product_attention. Attention plugins need the native SDPA path: "
                "call transformer.set_attention_backend('native') or remove the attention plugin from the recipe."
            )
        return output


class AttentionInterceptor:
    """Owns the attention hooks of one transformer and the routing table layer -> plugin function."""

    def __init__(self, transformer: torch.nn.Module, spec: TransformerSpec, tracker: StepTracker,
                 attach_hooks: bool = True) -> None:
        # attach_hooks=False: no plugin of the recipe routes attention, so no layer pays for a hook that only calls
        # through (a diffusers hook registry per attention layer costs ~1 % of a small model's call).
        self.transformer = transformer
        self.attached = False
        self.hooks: dict[str, AttentionLayerHook] = {}
        for list_attr, index, block, contract in spec.blocks(transformer):
            for sublayer in contract.sublayers:
                if sublayer.role != "attention":
                    continue
                module = getattr(block, sublayer.name, None)
                if module is None:
                    continue
                layer = LayerId(list_attr, index, sublayer.name, sublayer.kind)
                self.hooks[layer.name] = AttentionLayerHook(layer, tracker)
        if attach_hooks:
            self.attach_hooks()

    def attach_hooks(self) -> None:
        """Hook every attention layer (done at install when a plugin of the recipe routes attention). Afterwards
        only where nothing else hooks the attention layers yet (``"none"``, attention plugins), so that routing stays
        the innermost hook."""
        if not self.attached:
            for hook in self.hooks.values():
                attach(_module_by_layer(self.transformer, hook.layer), hook, HOOK_NAME)
            self.attached = True

    @property
    def layers(self) -> list[LayerId]:
        return [hook.layer for hook in self.hooks.values()]

    def route(
        self,
        layers: list[LayerId] | None,
        fn: AttentionFn,
        *,
        owner: object,
        when: Callable[[CallContext | None], bool] | None = None,
        steps: tuple[int, int] | None = None,
    ) -> None:
        """Send the attention of ``layers`` (all if ``None``) to ``fn`` whenever ``when(context)`` holds (always if
        ``None``). Several owners may route one layer only on disjoint ``steps`` ranges; otherwise this raises."""
        if not self.attached:
            raise RuntimeError(
                f"{getattr(owner, 'name', owner)!r} routes attention, but the recipe was installed without attention "
                "hooks: its plugin class must declare `routes_attention = True` (attention and parallel plugins do)")
        targets = self.hooks.values() if layers is None else [self.hooks[layer.name] for layer in layers]
        for hook in targets:
            for other, _, _, other_steps in hook.routes:
                if other is not owner and _steps_overlap(steps, other_steps):
                    raise ValueError(
                        f"attention of {hook.layer.name} is already routed to {getattr(other, 'name', other)!r} on "
                        f"overlapping steps; {getattr(owner, 'name', owner)!r} cannot take it too"
                    )
        for hook in targets:
            hook.routes.append((owner, fn, when, steps))

    def unroute(self, owner: object) -> None:
        for hook in self.hooks.values():
            hook.routes = [route for route in hook.routes if route[0] is not owner]

    def remove(self) -> None:
        if self.attached:
            for hook in self.hooks.values():
                detach(_module_by_layer(self.transformer, hook.layer), HOOK_NAME)
        self.hooks.clear()


def _steps_overlap(a: tuple[int, int] | None, b: tuple[int, int] | None) -> bool:
    return a is None or b is None or not (a[1] <= b[0] or b[1] <= a[0])


def _module_by_layer(transformer: torch.nn.Module, layer: LayerId) -> torch.nn.Module:
    return getattr(getattr(transformer, layer.block_list)[layer.block_index], layer.sublayer)
