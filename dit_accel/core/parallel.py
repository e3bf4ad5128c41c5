"""Plugins under parallel inference: which setting a transformer runs under, the collectives that make every rank
decide alike, and where a rank's tokens sit in the whole sequence.

Under diffusers' context parallelism (``enable_parallelism(ContextParallelConfig(ulysses_degree=N | ring_degree=N))``)
and under dit_accel's ``patch-parallel`` every rank runs the blocks on its own shard of the image tokens, so a
statistic a plugin computes from a block's tensors is that rank's share only. A decision taken from it would differ
between ranks, and ranks that decide differently run different collectives and hang. The rules plugins follow:

* a ratio of sums (relative L1, magnitudes, least-squares gains) is all-reduced as its numerator and denominator
  (:func:`all_reduce_sum`): every rank then holds the whole sequence's statistic. A tensor every rank holds whole
  (text tokens diffusers does not split) scales numerator and denominator alike, so the ratio stays right; a stream
  that joins text every rank holds to the rank's image shard weighs the text by ``1 / world``
  (:func:`replica_weights`), or the text would count ``world`` times;
* a choice over tokens (ToCa's top-k) is made on the scores of the whole sequence (:func:`all_gather_tokens`, put in
  sequence order with :func:`shard_positions`), identically on every rank, and each rank computes its own chosen;
* math over the whole token grid (FreqCa's DCT) gathers the grid first and keeps the rank's part of the result;
* fixed schedules need nothing: they depend on the step alone.

Layouts (:func:`shard_positions`): diffusers' ``_cp_plan`` splits the image tokens and, where the plan lists it, the
text tokens separately into equal contiguous chunks, one per rank (``EquipartitionSharder``); a block that joins the
two streams holds ``[text chunk, image chunk]`` (text first, Flux) or the reverse. ``patch-parallel`` and plans
without the text entry keep every text token on every rank. Under Ulysses an attention layer sees the rank-ordered
concatenation of the ranks' sequences (all heads' tokens gathered, a share of the heads): text and image chunks
interleave, and :func:`ulysses_attention` restores the model's order around a plugin.

Pure functions first (testable without processes), then the setting and the collectives.
"""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist


# ------------------------------------------------------------------------------------------- pure functions
@dataclass(frozen=True)
class ShardLayout:
    """Where one rank's local stream of tokens sits in the whole stream.

    ``positions`` (local length,): each local token's index in the whole stream (the model's own order);
    ``total``: the whole stream's length; ``text`` / ``image``: its text and image tokens; ``image_slice``: the
    local image tokens (always contiguous locally; they are image tokens ``[rank * n, (rank + 1) * n)`` of the
    whole, ``n = image // world``); ``replicated``: whether the local stream's text tokens are every rank's.
    """

    positions: torch.Tensor
    total: int
    text: int
    image: int
    image_slice: slice
    replicated: bool


def shard_positions(length: int, world: int, rank: int, text: int, image: int, text_first: bool,
                    text_sharded: bool) -> ShardLayout | None:
    """The :class:`ShardLayout` of rank ``rank``'s stream of ``length`` tokens, or ``None`` when ``length`` fits no
    layout of ``text`` text and ``image`` image tokens split over ``world`` ranks (uneven splits, extra tokens).

    Tried in order: an image-only shard (``length * world == image``), a joint shard (``text / world +
    image / world`` with ``text_sharded``, ``text + image / world`` without), a text-only shard (``text_sharded``),
    and a stream every rank holds whole (``text``, ``image`` or ``text + image`` tokens)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside a world of {world} processes")
    arange = torch.arange
    chunk = image // world if image % world == 0 else None
    if chunk and length == chunk:
        return ShardLayout(rank * chunk + arange(length), image, 0, image, slice(0, length), False)
    text_chunk = text // world if text_sharded and text % world == 0 else None
    local_text = text_chunk if text_sharded else text
    if chunk and local_text and length == local_text + chunk:
        text_part = (rank * local_text if text_sharded else 0) + arange(local_text)
        if text_first:
            positions = torch.cat([text_part, text + rank * chunk + arange(chunk)])
            where = slice(local_text, length)
        else:
            positions = torch.cat([rank * chunk + arange(chunk), image + text_part])
            where = slice(0, chunk)
        return ShardLayout(positions, text + image, text, image, where, not text_sharded)
    if text_chunk and length == text_chunk:
        return ShardLayout(rank * text_chunk + arange(length), text, text, 0, slice(0, 0), False)
    if length in (text, image, text + image) and length > 0:  # not split: every rank holds all of it
        only_text = length == text and length != image
        joint = length == text + image and text > 0 and image > 0
        start = text if joint and text_first else 0
        where = slice(0, 0) if only_text else slice(start, start + (image if joint else length))
        return ShardLayout(arange(length), length, text if (joint or only_text) else 0,
                           image if joint else (0 if only_text else length), where, True)
    return None


def replica_weights(layout: ShardLayout | None, world: int) -> torch.Tensor | None:
    """Per local token of ``layout``, the share of it this rank should add to a sum over the ranks: ``1 / world``
    for a token every rank holds (the text beside an image shard under ``patch-parallel``, a stream no rank splits),
    1 for the rank's own; ``None`` when every local token is the rank's own (or the layout is unknown), so a plain
    sum is already right. A ratio of two sums needs this only where the two kinds mix in one stream."""
    if layout is None or not layout.replicated:
        return None
    weights = torch.full((len(layout.positions),), 1.0 / world)
    if layout.image_slice.stop - layout.image_slice.start < layout.image:  # this rank's shard of the image
        weights[layout.image_slice] = 1.0
    return weights


def first_occurrence(positions: torch.Tensor, total: int) -> torch.Tensor | None:
    """For the rank-ordered concatenation of every rank's ``positions``: the index of the first entry holding each
    of the ``total`` positions (a replicated token is read from the lowest rank), or ``None`` if one is missing."""
    order = torch.argsort(positions, stable=True)
    ranked = positions[order]
    keep = torch.ones_like(ranked, dtype=torch.bool)
    keep[1:] = ranked[1:] != ranked[:-1]
    if int(keep.sum()) != total or (total and (int(ranked[0]) != 0 or int(ranked[-1]) != total - 1)):
        return None
    return order[keep]


def local_choice(chosen: torch.Tensor, mine: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``chosen`` (B, k) positions in a whole stream of ``total`` tokens, as local indices into this rank's
    stream whose whole-stream positions are ``mine`` (L,): ``(index (B, m), valid (B, m))`` with ``m`` the most any
    row has here, in local order; a row with fewer is padded with its first local hit (0 when it has none) and
    ``valid`` is False there."""
    picked = torch.zeros(chosen.shape[0], total, dtype=torch.bool, device=chosen.device)
    picked.scatter_(1, chosen, True)
    hits = picked[:, mine.to(chosen.device)]  # (B, L)
    counts = hits.sum(1)
    width = int(counts.max()) if counts.numel() else 0
    # A stable sort puts each row's hits first, in local order.
    order = torch.argsort((~hits).to(torch.int8), dim=1, stable=True)[:, :width]
    valid = torch.arange(width, device=chosen.device)[None, :] < counts[:, None]
    pad = torch.where(counts[:, None] > 0, order[:, :1], torch.zeros_like(order[:, :1]))
    return torch.where(valid, order, pad), valid


# ------------------------------------------------------------------------------------------------ the setting
@dataclass(frozen=True)
class ParallelSetting:
    """The parallel inference a transformer runs under, as plugins need it.

    ``kind``: ``"ulysses"``, ``"ring"``, ``"hybrid"`` (both degrees above 1) or ``"patch"`` (dit_accel's
    ``patch-parallel``); ``world``/``rank``: the sequence-parallel group's size and this process's place in it;
    ``text_sharded``: whether text tokens are split across the ranks too (diffusers' plan lists them), else every
    rank holds them all; ``even``: equal shards (diffusers' ``*_anything`` modes split unevenly)."""

    kind: str
    world: int
    rank: int
    group: object = dataclasses.field(default=None, compare=False)
    text_sharded: bool = False
    even: bool = True

    def __str__(self) -> str:
        return f"{self.kind}={self.world}"


_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[object, ParallelSetting | None]]" = \
    weakref.WeakKeyDictionary()


def _plan_splits_text(plan: dict | None) -> bool:
    for entry in (plan or {}).values():
        if isinstance(entry, dict) and "encoder_hidden_states" in entry:
            return True
    return False


def parallel_setting(transformer: torch.nn.Module) -> ParallelSetting | None:
    """The sequence-parallel setting ``transformer`` runs under, or ``None`` (no ``_parallel_config`` with a context
    parallel part, tensor parallelism alone, or no initialised ``torch.distributed``). Read once per config object."""
    config = getattr(transformer, "_parallel_config", None)
    cached = _CACHE.get(transformer)
    if cached is not None and cached[0] is config:
        return cached[1]
    setting = None
    cp = getattr(config, "context_parallel_config", None) if config is not None else None
    if cp is not None and dist.is_available() and dist.is_initialized():
        mesh = getattr(cp, "_flattened_mesh", None)
        group = mesh.get_group() if mesh is not None else None
        world = dist.get_world_size(group)
        if world > 1:
            # diffusers hands its config to every attention processor; patch-parallel sets the model's only.
            diffusers_cp = any(getattr(getattr(m, "processor", None), "_parallel_config", None) is not None
                               for m in transformer.modules())
            if not diffusers_cp:
                kind = "patch"
            elif cp.ring_degree > 1 and cp.ulysses_degree > 1:
                kind = "hybrid"
            else:
                kind = "ring" if cp.ring_degree > 1 else "ulysses"
            setting = ParallelSetting(kind, world, dist.get_rank(group), group,
                                      text_sharded=kind != "patch" and _plan_splits_text(transformer._cp_plan),
                                      even=not (cp.ulysses_anything or cp.ring_anything))
    _CACHE[transformer] = (config, setting)
    return setting


def refusal(plugin: str, setting: ParallelSetting | str, what: str, allowed: str) -> ValueError:
    """The error a plugin raises for a parallel setting it cannot serve (install time, or its first call)."""
    return ValueError(f"{plugin} cannot run under --parallel {setting}: {what}; allowed: {allowed}")


# -------------------------------------------------------------------------------------------- the collectives
def all_reduce_sum(tensor: torch.Tensor, setting: ParallelSetting | None) -> torch.Tensor:
    """``tensor`` summed over the setting's ranks, in place (returned; unchanged without a setting). Every rank
    must call it with the same shape at the same point."""
    if setting is not None:
        dist.all_reduce(tensor, group=setting.group)
    return tensor


def all_gather_tokens(tensor: torch.Tensor, setting: ParallelSetting, dim: int = 1) -> torch.Tensor:
    """Every rank's ``tensor`` (equal shapes) concatenated along ``dim`` in rank order, on every rank."""
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(setting.world)]
    dist.all_gather(parts, tensor, group=setting.group)
    return torch.cat(parts, dim=dim)


def whole_stream(local: torch.Tensor, setting: ParallelSetting, text: int, image: int, text_first: bool,
                 ) -> tuple[torch.Tensor, ShardLayout] | None:
    """``local`` (B, L, ...) gathered into the whole stream in the model's order (dim 1), with this rank's layout;
    ``None`` (before any collective, alike on every rank) when the stream fits no layout."""
    layouts = [shard_positions(local.shape[1], setting.world, r, text, image, text_first, setting.text_sharded)
               for r in range(setting.world)]
    if layouts[0] is None or not setting.even:
        return None
    index = first_occurrence(torch.cat([layout.positions for layout in layouts]), layouts[0].total)
    if index is None:
        return None
    gathered = all_gather_tokens(local, setting)
    return gathered.index_select(1, index.to(gathered.device)), layouts[setting.rank]


# ------------------------------------------------------------------------------------------------- attention
def attention_refusal(plugin: str, setting: ParallelSetting) -> ValueError | None:
    """Why a plugin that replaces attention cannot be installed under ``setting``; ``None`` for Ulysses, which it
    can, and for patch-parallel, which refuses its companions itself (naming all of them, in either order)."""
    if (setting.kind == "ulysses" and setting.even) or setting.kind == "patch":
        return None
    what = {"ring": "ring attention splits each attention call into key chunks merged by their log-sum-exp outside "
                    "torch's SDPA, so the plugin never sees a whole call",
            "hybrid": "ring attention splits each attention call into key chunks merged outside torch's SDPA"
            }.get(setting.kind, "uneven (ulysses_anything / ring_anything) shards have no fixed token layout")
    return refusal(plugin, setting, what, "ulysses=N with even shards, or no parallelism")


AttendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, object], torch.Tensor]


def ulysses_attention(plugin: str, setting: ParallelSetting, attend: AttendFn, query: torch.Tensor,
                      key: torch.Tensor, value: torch.Tensor, call) -> torch.Tensor:
    """Run ``attend`` on a Ulysses attention call in the model's token order.

    Ulysses gives each rank every token of a share of the heads, as the rank-ordered concatenation of the ranks'
    sequences; with text and image chunks split separately they interleave (``[t0, i0, t1, i1]``). The sequence
    (queries, keys, values and a mask's key axis) is put in the model's order, ``attend`` runs as on one process
    for these heads, and the output goes back to the Ulysses order. Image-only sequences are already in order."""
    error = attention_refusal(plugin, setting)
    if setting.kind == "patch":  # not reached: patch-parallel refuses attention plugins when installed
        error = refusal(plugin, setting, "patch-parallel computes every attention layer itself", "caching plugins")
    if error is not None:
        raise error
    layout = call.layout
    text = layout.num_text_tokens if layout.kind == "joint" else 0
    length = query.shape[2]
    if text == 0 or layout.grid is None or key.shape[2] != length:
        return attend(query, key, value, call)
    local = length // setting.world
    layouts = [shard_positions(local, setting.world, r, text, layout.grid.num_tokens,
                               layout.text_position == "first", setting.text_sharded) for r in range(setting.world)]
    if length % setting.world or layouts[0] is None or layouts[0].replicated or layouts[0].total != length:
        raise refusal(plugin, setting, f"{call.layer.name}'s {length} tokens are not {text} text and "
                      f"{layout.grid.num_tokens} image tokens split evenly over {setting.world} ranks",
                      "models whose text and image tokens both split evenly (Flux, Qwen-Image, LTX, Wan)")
    positions = torch.cat([item.positions for item in layouts]).to(query.device)
    order = torch.argsort(positions)  # model order <- Ulysses order
    options = dict(call.options)
    mask = options.get("attn_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() > 0 and mask.shape[-1] == length:
        options["attn_mask"] = mask.index_select(-1, order)
    inner = dataclasses.replace(call, options=options)
    out = attend(query.index_select(2, order), key.index_select(2, order), value.index_select(2, order), inner)
    return out.index_select(2, positions)


__all__ = ["ParallelSetting", "ShardLayout", "all_gather_tokens", "all_reduce_sum", "attention_refusal",
           "first_occurrence", "local_choice", "parallel_setting", "refusal", "replica_weights", "shard_positions",
           "ulysses_attention", "whole_stream"]
