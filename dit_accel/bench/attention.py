"""Measuring attention approximations: fidelity against dense attention, captured q/k/v, interleaved timing.

* :func:`attention_fidelity` compares an approximate attention output with the exact one.
* :func:`capture_attention` records the queries, keys and values every self/joint attention layer of a pipeline's
  transformer receives at chosen denoising steps (through dit_accel's own SDPA interception, recipe ``"none"``).
* :func:`flux_block_activations` produces FLUX.1-sized q/k/v at any token grid from one random-init FLUX
  double-stream block fed spatially smooth inputs. No FLUX weights can be downloaded here, so this is a stand-in:
  the shapes, the RMS query/key norm and the 2-D RoPE are FLUX's, the learned weights are not, and real FLUX
  attention is usually more local than this random block's.
* :func:`time_attention` / :func:`side_by_side_attention` time attention callables (interleaved round-robin so every
  method sees the same machine state).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from dit_accel.attention.base import split_text
from dit_accel.bench.timing import Timing, summarize, synchronize
from dit_accel.core.blocks import TokenGrid, TokenLayout

_SDPA = F.scaled_dot_product_attention


def attention_fidelity(approx: torch.Tensor, exact: torch.Tensor) -> dict[str, float]:
    """Fidelity of an attention output (B, H, N, D) against the exact one.

    Returns ``cosine``: the cosine similarity of the whole flattened (N x D) output of each (batch, head), averaged
    over them; ``cosine_min``: the lowest of those; ``rel_l1``: ``sum |approx - exact| / sum |exact|``. Computed in
    float64.
    """
    if approx.shape != exact.shape:
        raise ValueError(f"shapes differ: {tuple(approx.shape)} vs {tuple(exact.shape)}")
    a = approx.detach().double().flatten(2)
    b = exact.detach().double().flatten(2)
    cosine = F.cosine_similarity(a, b, dim=-1, eps=1e-30).clamp(-1.0, 1.0)
    rel_l1 = float((a - b).abs().sum() / b.abs().sum().clamp_min(1e-30))
    return {"cosine": float(cosine.mean()), "cosine_min": float(cosine.min()), "rel_l1": rel_l1}


def effective_keys(query: torch.Tensor, key: torch.Tensor, scale: float | None = None, queries: int = 256) -> float:
    """How diffuse attention is: ``exp(entropy)`` of the softmax rows of ``queries`` evenly spaced queries of every
    (batch, head), over the number of keys, averaged (1.0: uniform over all keys; small: a few keys dominate)."""
    rows = torch.linspace(0, query.shape[2] - 1, min(queries, query.shape[2])).long()
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    spread = []
    for head in range(query.shape[1]):  # one head at a time bounds the memory of the score rows
        logp = torch.log_softmax((query[:, head, rows].double() @ key[:, head].double().transpose(-1, -2)) * scale, -1)
        spread.append((-(logp.exp() * logp).sum(-1)).exp())
    return float(torch.stack(spread).mean() / key.shape[2])


@dataclass
class CapturedCall:
    """The inputs of one attention call as SDPA received them (B, H, S, D), with where its tokens sit.

    ``output`` is what was computed (dense attention); ``step``/``slot`` are the tracker's step and call-within-step
    (``-1`` when unknown); ``index`` the SDPA call's index within the layer's forward.
    """

    layer: str
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    layout: TokenLayout
    scale: float | None = None
    step: int = -1
    slot: int = 0
    index: int = 0
    output: torch.Tensor | None = None

    @property
    def grid(self) -> TokenGrid | None:
        return self.layout.grid

    def split(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(image query, image key, image value, text key, text value)``; the text parts have length 0 for self
        attention."""
        num_text = self.layout.num_text_tokens if self.layout.kind == "joint" else 0
        first = self.layout.text_position == "first"
        q, _ = split_text(self.query, num_text, first)
        k, k_text = split_text(self.key, num_text, first)
        v, v_text = split_text(self.value, num_text, first)
        return q, k, v, k_text, v_text


def capture_attention(pipe: Any, generate: Callable[[], Any], *, step: int | Iterable[int],
                      layers: int | None = None) -> list[CapturedCall]:
    """Run ``generate()`` (one generation with ``pipe``) and return the attention inputs of its transformer's
    self- and joint-attention layers on the calls of denoising step ``step`` (or of each step in an iterable), in
    call order: one :class:`CapturedCall` per layer and transformer call (two per layer and step under
    call-per-branch CFG). ``layers`` keeps the first ``layers`` such layers only.

    The outputs are unchanged (the captured calls compute dense attention with their original options) and the
    pipeline is left exactly as it was. It must not carry a dit_accel acceleration already.
    """
    from dit_accel.api import accelerate_dit, get_handle, remove_acceleration

    if get_handle(pipe) is not None:
        raise ValueError("capture_attention needs a pipeline without dit_accel acceleration; remove it first")
    steps = {step} if isinstance(step, int) else set(step)
    captured: list[CapturedCall] = []

    def record(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, call) -> torch.Tensor:
        out = call.dense(query, key, value)
        context = call.context
        captured.append(CapturedCall(
            layer=call.layer.name, query=query.detach().clone(), key=key.detach().clone(),
            value=value.detach().clone(), layout=call.layout, scale=call.options.get("scale"),
            step=context.step, slot=context.slot, index=call.index, output=out.detach().clone()))
        return out

    handle = accelerate_dit(pipe, "none")
    try:
        interceptor = handle.transformers[0].attention
        interceptor.attach_hooks()  # "none" hooks no attention layer by itself
        routed = [layer for layer in interceptor.layers if layer.kind in ("self", "joint")]
        if layers is not None:
            routed = routed[:layers]
        owner = object()
        interceptor.route(routed, record, owner=owner,
                          when=lambda context: context is not None and context.step in steps)
        try:
            generate()
        finally:
            interceptor.unroute(owner)
    finally:
        remove_acceleration(pipe)
    return captured


class _StopAfterAttention(Exception):
    """Raised right after the block's attention: nothing after it is needed."""


class _RecordSDPA(TorchFunctionMode):
    """Computes and records the first SDPA call, then stops the forward (nothing after attention is needed)."""

    def __init__(self) -> None:
        super().__init__()
        self.call: dict | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not _SDPA:
            return func(*args, **kwargs)
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
        bound = dict(zip(names, args), **kwargs)
        output = func(*args, **kwargs)
        self.call = {**bound, "output": output}
        raise _StopAfterAttention


def _rope_axes(head_dim: int) -> list[int]:
    """FLUX's split of the rotary dims over (index, row, column): [16, 56, 56] for 128, [8, 28, 28] for 64."""
    first = max(2, (head_dim // 8) // 2 * 2)
    rest = (head_dim - first) // 2
    if rest % 2:
        rest, first = rest - 1, first + 2
    return [first, rest, rest]


def flux_block_activations(grid_side: int, *, heads: int = 24, head_dim: int = 128, text_tokens: int = 512,
                           seed: int = 0, drift: float = 0.0) -> CapturedCall:
    """The joint-attention q/k/v (text first, after RMS norm and RoPE) of one random-init FLUX.1 double-stream block
    (``dim = heads * head_dim``; 24 x 128 is FLUX.1's) on a ``grid_side x grid_side`` token grid.

    Image inputs are a smooth random field (low-resolution noise at 1/8 of the side, bicubic-upsampled, plus 0.3 x
    white noise), so neighbouring tokens are alike as in a real latent; text inputs and the time embedding are
    white noise. Random weights on smooth inputs are a stand-in for FLUX's weights, which cannot be downloaded
    here. The block stops right after its attention (the feed-forward parts are not even built). float32, no grad;
    the result's ``output`` is the dense attention the block computed. ``drift`` moves the image inputs by that
    fraction of their standard deviation in a fixed random direction (same weights, text and time embedding): the
    next denoising step's inputs, for methods that reuse statistics of an earlier step.
    """
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed, FluxTransformerBlock

    dim = heads * head_dim
    num_tokens = grid_side * grid_side
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        with torch.device("meta"):
            block = FluxTransformerBlock(dim=dim, num_attention_heads=heads, attention_head_dim=head_dim)
        block.ff = block.ff_context = torch.nn.Identity()  # never reached: the forward stops after attention
        block.to_empty(device="cpu")
        for module in block.modules():
            if module is not block and hasattr(module, "reset_parameters"):
                module.reset_parameters()
        block.eval()

        low = max(1, grid_side // 8)
        field = F.interpolate(torch.randn(1, dim, low, low), size=(grid_side, grid_side), mode="bicubic",
                              align_corners=False)
        field = field + 0.3 * torch.randn_like(field)
        hidden = field.flatten(2).transpose(1, 2).contiguous()  # (1, N, dim), raster order
        if drift:
            direction = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(seed + 1))
            hidden = hidden + drift * hidden.std() * direction
        text = torch.randn(1, text_tokens, dim)
        temb = torch.randn(1, dim)
        img_ids = torch.zeros(grid_side, grid_side, 3)
        img_ids[..., 1] += torch.arange(grid_side)[:, None]
        img_ids[..., 2] += torch.arange(grid_side)[None, :]
        ids = torch.cat([torch.zeros(text_tokens, 3), img_ids.reshape(num_tokens, 3)])
        rotary = FluxPosEmbed(theta=10000, axes_dim=_rope_axes(head_dim))(ids)

        recorder = _RecordSDPA()
        try:
            with recorder:
                block(hidden_states=hidden, encoder_hidden_states=text, temb=temb, image_rotary_emb=rotary)
        except _StopAfterAttention:
            pass
    if recorder.call is None:
        raise RuntimeError("the FLUX block did not call scaled_dot_product_attention (non-native attention backend?)")
    call = recorder.call
    layout = TokenLayout(kind="joint", grid=TokenGrid(1, grid_side, grid_side), num_text_tokens=text_tokens,
                         text_position="first")
    return CapturedCall(layer="flux.transformer_blocks.0.attn", query=call["query"], key=call["key"],
                        value=call["value"], layout=layout, scale=call.get("scale"), output=call["output"])


def _sync(result: Any) -> None:
    if isinstance(result, torch.Tensor):
        synchronize(result.device)


def time_attention(fn: Callable[[], Any], repeats: int) -> Timing:
    """One warm-up call, then the wall time of ``repeats`` calls (synchronised on GPU results)."""
    _sync(fn())
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        _sync(fn())
        seconds.append(time.perf_counter() - start)
    return summarize(seconds)


def side_by_side_attention(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, Timing]:
    """Time every callable ``repeats`` times, round-robin (one warm-up round first), so a dense baseline and the
    methods see the same machine state; returns each one's :class:`Timing` (``.median`` in seconds)."""
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(repeats + 1):
        for name, fn in fns.items():
            start = time.perf_counter()
            _sync(fn())
            if round_:
                seconds[name].append(time.perf_counter() - start)
    return {name: summarize(values) for name, values in seconds.items()}
