"""Per-generation counters: what each block's sub-layers computed, reused or forecast, and the FLOPs it cost.

Nothing here hooks the model: every transformer call is assumed to compute every sub-layer (the dense run), and
schedule plugins report the exceptions (``reused``, ``forecast``, ``partial`` with the fraction of tokens
recomputed). FLOPs are estimated from shapes: the Linear layers of each sub-layer times the token rows it
transforms (where a block merges its sub-layers in one projection, Flux's single-stream ``proj_out``, each
sub-layer also owns the projection's columns that read its output), plus ``4 * B * heads * Sq * Sk * head_dim``
for the attention core.

Every other Linear and convolution of the model (patch and text embeddings, timestep embedders, the blocks'
modulation linears, the final norm and projection) is counted as work *outside the sub-layers*: measured once per
call signature on the first call that has it (forward hooks count what actually ran), then charged to every call of
that signature. A plugin that skips whole blocks (magcache, fbcache, Δ-DiT) reports them with
:meth:`StatsRecorder.record_block`, which refunds the skipped blocks' share. So a call whose sub-layers are all
reused still costs its embeddings, gates and final projection, as it does on the hardware.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from dit_accel.core.blocks import SubLayer, TransformerSpec
from dit_accel.core.context import CallContext
from dit_accel.core.generation_stats import Event, GenerationStats, SubLayerStats


def _linear_flops_per_row(module: torch.nn.Module) -> dict[str, int]:
    """2 * in * out for every Linear under ``module``, by its relative name."""
    return {
        name: 2 * child.in_features * child.out_features
        for name, child in module.named_modules()
        if isinstance(child, torch.nn.Linear)
    }


def _output_width(module: torch.nn.Module) -> int:
    """Features out of a sub-layer: its last Linear's (an MLP's ``proj_mlp``)."""
    linears = [child for child in module.modules() if isinstance(child, torch.nn.Linear)]
    return int(linears[-1].out_features) if linears else 0


_COUNTED = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def _ran_flops(module: torch.nn.Module, output: Any) -> float:
    """FLOPs a Linear or convolution just spent, read from its output's shape."""
    if not isinstance(output, torch.Tensor):
        return 0.0
    if isinstance(module, torch.nn.Linear):
        return 2.0 * module.in_features * output.numel()
    kernel = math.prod(module.kernel_size)
    return 2.0 * output.numel() * (module.in_channels // module.groups) * kernel


def _is_text_projection(name: str, kind: str | None) -> bool:
    if "add_" in name:  # add_q_proj / add_k_proj / add_v_proj / to_add_out: the text stream of joint attention
        return True
    return kind == "cross" and name.split(".")[0] in ("to_k", "to_v")


def _signature(context: CallContext) -> tuple:
    """What a call's dense FLOPs depend on."""
    return context.batch_size, context.grid, context.num_text_tokens, context.num_image_context_tokens


class StatsRecorder:
    """Collects :class:`GenerationStats` for one transformer; ``last`` is the most recent finished generation."""

    def __init__(self, transformer: torch.nn.Module, spec: TransformerSpec) -> None:
        self._transformer, self._spec = transformer, spec
        self.current: GenerationStats | None = None
        self.last: GenerationStats | None = None
        self._measuring: tuple[dict[str, float], list] | None = None
        self._call_key: tuple | None = None
        self._skipped_blocks: list[tuple[str, float]] = []
        self._whole_skip: tuple[float, int] | None = None  # (rows fraction, blocks) when the call ran no layer
        self.rebuild()

    def rebuild(self) -> None:
        """Read the model's layers again (an adapter was loaded, swapped or fused since): FLOPs per call are
        re-estimated from the next call on."""
        transformer, spec = self._transformer, self._spec
        self._layers: list[tuple[str, SubLayer, dict[str, int], int]] = []
        inside: set[int] = set()  # ids of the modules the sub-layer estimate already covers
        blocks: list[tuple[str, torch.nn.Module]] = []
        for list_attr, index, block, contract in spec.blocks(transformer):
            merge = getattr(block, contract.merged.module, None) if contract.merged is not None else None
            if merge is not None:
                inside.update(id(m) for m in merge.modules())
            blocks.append((f"{list_attr}.{index}", block))
            for sublayer in contract.sublayers:
                module = getattr(block, sublayer.name, None)
                if module is None:
                    continue
                inside.update(id(m) for m in module.modules())
                to_q = getattr(module, "to_q", None) if sublayer.role == "attention" else None
                inner_dim = int(getattr(to_q, "out_features", 0) or 0)  # heads * head_dim (LoRA wrappers too)
                linears = _linear_flops_per_row(module)
                if getattr(merge, "in_features", None):  # a Linear, or an adapter's (LoRA) wrapper of one
                    # The merging projection's share that reads this sub-layer's output counts as its work: its
                    # columns, and as much of an adapter's matmuls.
                    width = inner_dim or _output_width(module)
                    merged = sum(_linear_flops_per_row(merge).values())
                    linears[f"<{contract.merged.module}>"] = merged * width / merge.in_features
                self._layers.append((f"{list_attr}.{index}.{sublayer.name}", sublayer, linears, inner_dim))
        # Linear/conv layers outside the sub-layers, by block prefix ("" for those outside every block).
        self._outside: list[tuple[str, torch.nn.Module]] = []
        in_blocks: set[int] = set()
        for prefix, block in blocks:
            for m in block.modules():
                in_blocks.add(id(m))
                if isinstance(m, _COUNTED) and id(m) not in inside:
                    self._outside.append((prefix, m))
        self._outside += [("", m) for m in transformer.modules() if isinstance(m, _COUNTED) and id(m) not in in_blocks]
        self._outside_cache: dict[tuple, dict[str, float]] = {}  # per signature: FLOPs by block prefix ("": model)
        self._flops_cache: dict[tuple, dict[str, float]] = {}
        self._core_cache: dict[tuple, dict[str, float]] = {}
        self.sublayer_names: list[str] = [name for name, *_ in self._layers]
        self._known = frozenset(self.sublayer_names)

    def finish(self) -> None:
        """Close the running generation (if any) and keep it as ``last``."""
        if self.current is not None and self.current.transformer_calls:
            self.last = self.current
        self.current = None

    def discard(self) -> None:
        """Drop the running generation (it raised)."""
        self._stop_measuring()
        self._call_key = None
        self._skipped_blocks.clear()
        self._whole_skip = None
        self.current = None

    def on_call(self, context: CallContext) -> None:
        """Account one transformer call as dense; plugins then report what they skipped."""
        if self.current is None or self.current.generation != context.generation:
            self.finish()
            self.current = GenerationStats(generation=context.generation, names=tuple(self.sublayer_names))
        current = self.current
        current.transformer_calls += 1
        current.steps = max(current.steps, context.step + 1)
        key = _signature(context)
        if key not in current.dense_flops_by_signature:
            current.dense_flops_by_signature[key] = self._dense_flops(context)
        current.calls_by_signature[key] = current.calls_by_signature.get(key, 0) + 1
        self._call_key = key
        self._skipped_blocks.clear()
        self._whole_skip = None
        if key not in self._outside_cache and self._measuring is None:
            counts: dict[str, float] = {}

            def count(prefix: str, module: torch.nn.Module, inputs: Any, output: Any) -> None:
                counts[prefix] = counts.get(prefix, 0.0) + _ran_flops(module, output)

            handles = [m.register_forward_hook(lambda mod, i, o, p=prefix: count(p, mod, i, o))
                       for prefix, m in self._outside]
            self._measuring = (counts, handles)

    def end_call(self) -> None:
        """The transformer call returned: charge its work outside the sub-layers, less the blocks skipped whole."""
        key, self._call_key = self._call_key, None
        if key is None or self.current is None:
            return
        if self._measuring is not None:
            counts = self._stop_measuring()
            for prefix, _ in self._skipped_blocks:  # skipped while measuring: fall back to one row per sample
                counts[prefix] = sum(2.0 * m.in_features * m.out_features * key[0] for p, m in self._outside
                                     if p == prefix and isinstance(m, torch.nn.Linear))
            self._outside_cache[key] = counts
        per_block = self._outside_cache.get(key)
        if per_block is None:
            return
        outside = self.current.outside_flops_by_signature[key] = sum(per_block.values())
        if self._whole_skip is not None:
            fraction, blocks = self._whole_skip
            self._whole_skip = None
            self.current.outside_saved_flops += fraction * outside
            self.current.blocks_skipped += blocks if fraction == 1.0 else 0
        for prefix, fraction in self._skipped_blocks:
            if prefix == "*":  # rows of the whole call (record_rows_skipped)
                self.current.outside_saved_flops += fraction * outside
                continue
            self.current.outside_saved_flops += fraction * per_block.get(prefix, 0.0)
            self.current.blocks_skipped += fraction == 1.0 and prefix != ""
        self._skipped_blocks.clear()

    def _stop_measuring(self) -> dict[str, float]:
        if self._measuring is None:
            return {}
        counts, handles = self._measuring
        for handle in handles:
            handle.remove()
        self._measuring = None
        return counts

    def record_block(self, context: CallContext, block: str, fraction: float = 1.0) -> None:
        """A plugin skipped block ``block`` (``transformer_blocks.3``) whole in this call, or ``fraction`` of its
        rows: its Linear layers outside the sub-layers (modulation, embeddings) did not run for them."""
        if self.current is not None and self._call_key is not None:
            # A call that holds only some rows of the accounted call (cfg-cache) skips only its own rows' share.
            self._skipped_blocks.append((block, fraction * context.batch_size / self._call_key[0]))

    @property
    def rows_not_run(self) -> float:
        """The fraction of the running call's rows that no layer ran for (:meth:`record_rows_skipped`: cfg-cache
        rebuilt them); 1.0 when the call returned without running the transformer."""
        return sum(fraction for prefix, fraction in self._skipped_blocks if prefix == "*")

    @property
    def measuring(self) -> bool:
        """Whether the running call measures the work outside the sub-layers (its rows must all compute)."""
        return self._measuring is not None

    def record_rows_skipped(self, context: CallContext, fraction: float) -> None:
        """``fraction`` of this call's rows were not computed at all (cfg-cache rebuilt them): every sub-layer and
        the work outside the sub-layers is refunded for them; a whole call (``fraction = 1``) counts as reused."""
        if self.current is None:
            return
        for name in self.current.names:
            if fraction >= 1.0:
                self.record(context, name, "reused")
            else:
                self.record(context, name, "partial", computed_fraction=1.0 - fraction)
        if self._call_key is not None:
            self._skipped_blocks.append(("*", fraction))

    def record(self, context: CallContext, sublayer: str, event: Event, computed_fraction: float = 0.0) -> None:
        """A plugin did not compute ``sublayer`` densely in this call.

        ``reused``/``forecast`` cost nothing (``computed_fraction`` is ignored); ``partial`` recomputed that
        fraction of the work (ToCa's token subset, a cheaper attention).
        """
        if self.current is not None:
            self._charge(self._dense_flops(context), sublayer, event, computed_fraction)

    def record_skipped(self, context: CallContext, sublayers: list[str], blocks: list[str], event: Event,
                       whole_call: bool = False) -> None:
        """Blocks ``blocks`` were skipped whole in this call, their ``sublayers`` served by ``event`` (``reused`` or
        ``forecast``): :meth:`record` of each sub-layer and :meth:`record_block` of each block, with the call's FLOPs
        table looked up once. ``whole_call``: nothing ran, not even the layers outside every block (embeddings,
        final layers)."""
        if self.current is None:
            return
        if event not in ("reused", "forecast"):
            raise ValueError(f"record_skipped takes the events 'reused' or 'forecast', not {event!r}")
        flops = self._dense_flops(context)
        key = (_signature(context), tuple(sublayers), event)
        entry = self.current.pending.get(key)
        if entry is not None:
            entry[0] += 1
        else:
            unknown = [name for name in key[1] if name not in self._known]
            if unknown:
                raise KeyError(f"unknown sub-layer {unknown[0]!r}; known: {', '.join(self.current.names)}")
            self.current.pending[key] = [1, flops]
        if whole_call and self._call_key is not None and self._measuring is None:
            # Nothing ran: one entry for every block and the layers outside them (see end_call).
            self._whole_skip = (context.batch_size / self._call_key[0], len(blocks))
            return
        for block in blocks:
            self.record_block(context, block)
        if whole_call:
            self.record_block(context, "")

    def _charge(self, flops: dict[str, float], sublayer: str, event: Event, computed_fraction: float = 0.0) -> None:
        if sublayer not in self._known:
            raise KeyError(f"unknown sub-layer {sublayer!r}; known: {', '.join(self.current.names)}")
        stats = self.current.events.setdefault(sublayer, SubLayerStats())
        per_call = flops[sublayer]
        if event == "partial":
            stats.partial += 1
            stats.flops += per_call * (1.0 - computed_fraction)
        else:
            setattr(stats, event, getattr(stats, event) + 1)
            stats.flops += per_call

    def set_cache_bytes(self, nbytes: int) -> None:
        if self.current is not None:
            self.current.cache_bytes = max(self.current.cache_bytes, int(nbytes))

    def _dense_flops(self, context: CallContext) -> dict[str, float]:
        key = _signature(context)
        cached = self._flops_cache.get(key)
        if cached is not None:
            return cached
        batch = context.batch_size
        image = context.grid.num_tokens if context.grid is not None else 0
        text = context.num_text_tokens
        image_context = context.num_image_context_tokens
        rows = {"image": batch * image, "text": batch * text, "joint": batch * (image + text)}
        result, cores = {}, {}
        for name, sublayer, linears, inner_dim in self._layers:
            own_rows = rows["joint" if sublayer.kind == "joint" else sublayer.stream]
            text_rows = [_is_text_projection(linear_name, sublayer.kind) for linear_name in linears]
            if sublayer.kind == "joint" and any(text_rows):
                own_rows = rows["image"]  # dual-stream joint attention: each stream projects its own tokens
            total = 0.0
            for (linear_name, per_row), is_text in zip(linears.items(), text_rows):
                if sublayer.kind == "cross" and "add_" in linear_name:  # image-context keys/values (Wan I2V)
                    total += per_row * batch * image_context
                else:
                    total += per_row * (rows["text"] if is_text else own_rows)
            core = 0.0
            if inner_dim:
                q_len = image + text if sublayer.kind == "joint" else image
                k_len = text + image_context if sublayer.kind == "cross" else q_len
                core = 4.0 * batch * q_len * k_len * inner_dim  # QK^T and PV, summed over heads
            result[name] = total + core
            cores[name] = core / (total + core) if total + core else 0.0
        self._flops_cache[key] = result
        self._core_cache[key] = cores
        return result

    def core_fraction(self, context: CallContext, sublayer: str) -> float:
        """The share of an attention sub-layer's FLOPs spent in the attention core (QK^T, PV) at this call's
        shapes; attention plugins report savings of the core as a ``partial`` event with this."""
        self._dense_flops(context)
        return self._core_cache[_signature(context)][sublayer]
