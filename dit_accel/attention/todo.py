"""ToDo: token downsampling of keys and values (Smith et al., arXiv 2402.13573), for DiT image tokens.

Every query keeps attending, but the image keys and values are downsampled by ``factor`` over each frame's token
grid (after RoPE, since we see the keys as SDPA does), so attention costs ``1/factor^2`` of dense on the image part.
Average pooling is the default: on captured activations it is far more accurate than the paper's nearest sampling
at equal cost. A pooled key stands for up to ``factor^2`` tokens; its logit is raised by ``log(count)`` so that it
carries their softmax mass against the exact text keys (exact when the pooled keys are equal). Text keys are
always exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dit_accel.attention.base import ImageAttentionConfig, ImageAttentionPlugin, dense_image_attention
from dit_accel.core.blocks import TokenGrid
from dit_accel.core.plugin import register_plugin
from dit_accel.recipe import check_bool, check_choice, check_range, register_config


def _sum_adjacent(x: torch.Tensor, dim: int, factor: int) -> torch.Tensor:
    """Sum groups of ``factor`` adjacent entries along ``dim`` (its size a multiple of ``factor``). Slice-adds of
    contiguous blocks: several times faster on CPU than a strided multi-dimensional reduction."""
    shape = x.shape
    grouped = x.reshape(*shape[:dim], shape[dim] // factor, factor, *shape[dim + 1:])
    total = grouped.select(dim + 1, 0)
    for i in range(1, factor):
        total = total + grouped.select(dim + 1, i)
    return total


def downsample_tokens(x: torch.Tensor, grid: TokenGrid, factor: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Downsample (B, H, N, D) grid tokens by ``factor`` over height and width of every frame.

    Returns the pooled tokens (B, H, M, D) and how many tokens each stands for (M,). Edge cells of a grid that
    ``factor`` does not divide hold fewer tokens (``avg`` averages what is there; ``nearest`` takes each cell's
    first token).
    """
    batch, heads, _, dim = x.shape
    rows, cols = -(-grid.height // factor), -(-grid.width // factor)
    frames = x.reshape(batch, heads, grid.frames, grid.height, grid.width, dim)
    pad_h, pad_w = rows * factor - grid.height, cols * factor - grid.width
    ones = torch.ones(grid.height, grid.width, dtype=x.dtype, device=x.device)
    counts = _sum_adjacent(_sum_adjacent(F.pad(ones, (0, pad_w, 0, pad_h)), 1, factor), 0, factor).reshape(-1)
    if mode == "nearest":
        picked = frames[:, :, :, ::factor, ::factor]
        return picked.reshape(batch, heads, -1, dim), counts.repeat(grid.frames)
    if pad_h or pad_w:
        frames = F.pad(frames, (0, 0, 0, pad_w, 0, pad_h))
    cells = _sum_adjacent(_sum_adjacent(frames, 4, factor), 3, factor)
    pooled = cells * (1.0 / counts).reshape(rows, cols)[:, :, None] if (pad_h or pad_w) else cells / factor**2
    return pooled.reshape(batch, heads, -1, dim), counts.repeat(grid.frames)


def downsampled_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, grid: TokenGrid, factor: int,
                          *, mode: str = "avg", mass_correction: bool = True, text_key: torch.Tensor | None = None,
                          text_value: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Image queries (B, H, N, D) against image keys/values downsampled by ``factor`` plus exact text keys."""
    has_text = text_key is not None and text_key.shape[2] > 0
    if factor == 1:
        keys, values, bias = key, value, None
    else:
        keys, counts = downsample_tokens(key, grid, factor, mode)
        values, _ = downsample_tokens(value, grid, factor, mode)
        uneven = grid.height % factor or grid.width % factor
        # A bias equal on every key cancels in the softmax: needed only next to text keys or for uneven cells.
        bias = counts.log() if mass_correction and (has_text or uneven) else None
    if has_text:
        keys, values = torch.cat([keys, text_key], 2), torch.cat([values, text_value], 2)
        if bias is not None:
            bias = torch.cat([bias, bias.new_zeros(text_key.shape[2])])
    if bias is not None:
        bias = bias.view(1, 1, 1, -1)
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=bias, scale=scale)


@register_config("todo")
@dataclass(frozen=True)
class ToDoConfig(ImageAttentionConfig):
    """Key/value token downsampling.

    Args:
        factor (`int`, defaults to `2`): downsampling factor over height and width (keys cost ``1/factor^2``).
            1 is exact attention. Allowed: 1-8; recommended 2 (4 in early steps only).
        mode (`str`, defaults to `"avg"`): ``"avg"`` pooling or the paper's ``"nearest"`` sampling.
        mass_correction (`bool`, defaults to `True`): add ``log(count)`` to pooled logits (matters when text keys
            are attended next to the image keys).
        start / end: fractions of the schedule to act on (ToDo's paper applies it throughout; ``end=0.5`` keeps
            the detail-forming late steps exact).
    """

    factor: int = 2
    mode: str = "avg"
    mass_correction: bool = True

    def validate(self) -> None:
        super().validate()
        check_range(self, "factor", 1, 8, integer=True)
        check_choice(self, "mode", ("avg", "nearest"))
        check_bool(self, "mass_correction")


@register_plugin(ToDoConfig)
class ToDoPlugin(ImageAttentionPlugin):
    def image_attention(self, query, key, value, text_key, text_value, grid, layer, call):
        factor = self.config.factor
        if factor > grid.height or factor > grid.width:  # a resolution too small for the recipe: never a crash
            self._fallback(f"todo factor {factor} exceeds the {grid.height}x{grid.width} token grid; a factor of at "
                           f"most {min(grid.height, grid.width)} would act", call)
            return dense_image_attention(query, key, value, text_key, text_value, call), 1.0
        out = downsampled_attention(query, key, value, grid, factor, mode=self.config.mode,
                                    mass_correction=self.config.mass_correction, text_key=text_key,
                                    text_value=text_value, scale=call.options.get("scale"))
        kept = grid.frames * math.ceil(grid.height / factor) * math.ceil(grid.width / factor)
        return out, kept / grid.num_tokens
