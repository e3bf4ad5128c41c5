"""Block contracts as data: what a transformer's blocks look like to a plugin.

Every supported transformer class is described by a :class:`TransformerSpec` (registered by an adapter in
``dit_accel.pipelines.adapters``): its block lists in execution order, each block class's call and return
contract, the names of its attention and MLP sub-layers and the gates that scale them, where text tokens sit in
joint attention, and how to read the token grid (frames x height x width, in patches) from a transformer call.
Plugins read these tables instead of branching on model classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch

ReturnOrder = Literal["h", "e_h", "h_e"]
"""``h``: the block returns hidden states only; ``e_h``: ``(encoder, hidden)``; ``h_e``: ``(hidden, encoder)``."""

AttentionKind = Literal["self", "joint", "cross"]
"""``self``: image tokens only; ``joint``: image and text tokens in one sequence; ``cross``: image queries, text keys."""

TextPosition = Literal["first", "last"]


@dataclass(frozen=True)
class SubLayer:
    """One attention or MLP sub-layer of a block.

    Args:
        name: attribute name on the block (``"attn"``, ``"ff_context"``, ...). A block may lack it (``None``), as
            SD3's last block lacks ``ff_context``; such sub-layers are skipped.
        role: ``"attention"`` or ``"mlp"``.
        stream: ``"image"``, ``"text"`` or ``"joint"``: which tokens it transforms.
        kind: for attention sub-layers, the attention kind.
        gate: how the block scales the sub-layer's output, for documentation and for caching plugins that keep the
            gate fresh (e.g. ``"norm1.gate_msa"``); ``None`` if the output is not gated.
    """

    name: str
    role: Literal["attention", "mlp"]
    stream: Literal["image", "text", "joint"] = "image"
    kind: AttentionKind | None = None
    gate: str | None = None


@dataclass(frozen=True)
class MergedOutput:
    """A block whose sub-layers feed one projection before the gate (Flux and HunyuanVideo single-stream blocks:
    ``gate * proj_out(cat(attn, act(proj_mlp)))``). A cache of the projection's output makes a reused step skip
    the projection, the activation and the concatenations too, not only the sub-layers.

    Args:
        module: attribute name of the projection on the block (``"proj_out"``).
        apply: ``apply(block, arguments, merged) -> block output``: the block's output given the projection's
            output ``merged`` (the gate and residual computed fresh); ``arguments`` are the block's forward
            arguments by name.
    """

    module: str
    apply: Callable[[torch.nn.Module, dict, torch.Tensor], Any]


@dataclass(frozen=True)
class ResidualOutput:
    """A block that adds each sub-layer's (gated) output to its residual stream in turn (every dual-stream and
    residual block: DiT/PixArt, SD3, Flux, Wan, CogVideoX, LTX-Video, Qwen-Image, HunyuanVideo).
    When a cache serves every sub-layer of a call, the block's output is its input plus the served outputs under
    the gates of this call, so a reused step skips the norms and modulations that only feed the sub-layers too.

    Args:
        apply: ``apply(block, arguments, served) -> block output``, ``served`` mapping each present sub-layer's
            attribute name to its served output, ``arguments`` the block's forward arguments by name; it returns
            ``None`` for a configuration it does not cover (the block then runs as usual).
    """

    apply: Callable[[torch.nn.Module, dict, dict[str, Any]], Any]


@dataclass(frozen=True)
class BlockContract:
    """The call and return contract of one block class.

    Args:
        block_class: the class name (matched by name so adapters never import model code eagerly).
        returns: the order of the returned tensors.
        encoder_may_be_none: the block may return ``None`` for the encoder stream (SD3's ``context_pre_only``
            last block).
        hidden_arg / encoder_arg: keyword names of the two streams in the block's forward (``encoder_arg`` is
            ``None`` for single-stream blocks that do not take text).
        sublayers: the attention and MLP sub-layers, in execution order.
        merged: set where the sub-layers' outputs merge in one projection before the gate (see
            :class:`MergedOutput`).
        residual: set where the block's output follows from served sub-layer outputs (see
            :class:`ResidualOutput`).
    """

    block_class: str
    returns: ReturnOrder
    sublayers: tuple[SubLayer, ...]
    encoder_may_be_none: bool = False
    hidden_arg: str = "hidden_states"
    encoder_arg: str | None = "encoder_hidden_states"
    merged: MergedOutput | None = None
    residual: ResidualOutput | None = None

    def split_output(self, output: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return ``(hidden, encoder)`` from whatever the block returned."""
        if self.returns == "h":
            return output, None
        if self.returns == "e_h":
            return output[1], output[0]
        return output[0], output[1]

    def join_output(self, hidden: torch.Tensor, encoder: torch.Tensor | None) -> Any:
        """Inverse of :meth:`split_output`: build what the block would have returned."""
        if self.returns == "h":
            return hidden
        if self.returns == "e_h":
            return encoder, hidden
        return hidden, encoder


@dataclass(frozen=True)
class BlockList:
    """A block list attribute of the transformer and the contract its blocks follow."""

    attr: str
    contract: BlockContract


@dataclass(frozen=True)
class TokenGrid:
    """The image token grid of one transformer call, in patches: ``frames x height x width``."""

    frames: int
    height: int
    width: int

    @property
    def num_tokens(self) -> int:
        return self.frames * self.height * self.width


@dataclass(frozen=True)
class TokenLayout:
    """Where the image and text tokens sit in one attention call's query sequence.

    ``grid`` is ``None`` when the grid could not be read (then plugins that need it must fall back to dense
    attention). For ``joint`` attention the text tokens are at ``text_position``; for ``self`` and ``cross``
    attention the query holds image tokens only (cross attention's keys are text).
    """

    kind: AttentionKind
    grid: TokenGrid | None
    num_text_tokens: int = 0
    text_position: TextPosition | None = None

    @property
    def num_image_tokens(self) -> int | None:
        return None if self.grid is None else self.grid.num_tokens

    def image_slice(self) -> slice:
        """The slice of the query sequence holding image tokens."""
        if self.kind != "joint" or self.num_text_tokens == 0:
            return slice(0, None)
        if self.text_position == "first":
            return slice(self.num_text_tokens, None)
        return slice(0, -self.num_text_tokens)

    def matches(self, query_length: int) -> bool:
        """Whether an attention call of this query length has the layout described (context parallelism, for
        example, splits the sequence and then it does not)."""
        if self.grid is None:
            return False
        expected = self.grid.num_tokens + (self.num_text_tokens if self.kind == "joint" else 0)
        return expected == query_length


GridReader = Callable[[torch.nn.Module, tuple, dict], TokenGrid | None]
TextLengthReader = Callable[[torch.nn.Module, tuple, dict], int]


@dataclass(frozen=True)
class TransformerSpec:
    """Everything dit_accel needs to know about one transformer class, as data.

    Args:
        family: short name used in messages and tables (``"flux"``).
        transformer_class: the class name.
        block_lists: block list attributes in execution order.
        read_grid: reads the token grid from a transformer call ``(module, args, kwargs)``.
        read_text_length: reads the number of text tokens of a call: in the sequence of joint attention, or the
            keys of cross attention (0 where the model takes no text).
        text_position: where joint attention puts text tokens (``"first"`` for Flux, ``"last"`` for SD3).
        timestep_arg: the keyword holding the timestep (the tracker reads it).
        hidden_arg: the keyword holding the latent input (its shape/dtype/device identify a generation).
        notes: one line for the supported-pipelines table.
        cfg_convention: how this family's diffusers pipelines run classifier-free guidance, whatever the variant
            (img2img, inpaint, ControlNet, Kontext, ...): ``"batched-uncond-first"``, ``"batched-cond-first"`` or
            ``"separate-cond-first"``; labels branches of pipelines the table of known classes does not name.
        read_image_context_length: reads the number of image tokens the cross attention attends besides the text
            (Wan 2.1 image-to-video's CLIP tokens, projected by ``add_k_proj``/``add_v_proj``); 0 when ``None``.
        row_args: the forward arguments that hold one entry per sample row (cut, with the tensors nested in them
            whose first dimension is the batch, when a call runs on some rows only: cfg-cache's conditional rows);
            ``None`` when unknown (such a call is then never cut).

    Attention modules outside the listed block lists (text refiners, for example) are never hooked.
    """

    family: str
    transformer_class: str
    block_lists: tuple[BlockList, ...]
    read_grid: GridReader
    read_text_length: TextLengthReader
    text_position: TextPosition | None = None
    timestep_arg: str = "timestep"
    hidden_arg: str = "hidden_states"
    notes: str = ""
    cfg_convention: str | None = None
    read_image_context_length: TextLengthReader | None = None
    row_args: tuple[str, ...] | None = None

    def blocks(self, transformer: torch.nn.Module) -> list[tuple[str, int, torch.nn.Module, BlockContract]]:
        """All blocks in execution order as ``(list_attr, index, block, contract)``."""
        found = []
        for block_list in self.block_lists:
            modules = getattr(transformer, block_list.attr, None)
            if modules is None:
                continue
            for index, block in enumerate(modules):
                found.append((block_list.attr, index, block, block_list.contract))
        return found


class UnsupportedTransformerError(TypeError):
    """Raised for a transformer class that no adapter describes."""


_SPECS: dict[str, TransformerSpec] = {}


def register_transformer(spec: TransformerSpec, *, replace: bool = False) -> TransformerSpec:
    """Register the contract of a transformer class (the adapter mechanism; users may add their own).

    Raises ``ValueError`` if the class is already registered and ``replace`` is false.
    """
    if spec.transformer_class in _SPECS and not replace:
        raise ValueError(
            f"an adapter for {spec.transformer_class!r} is already registered; pass replace=True to override it"
        )
    _SPECS[spec.transformer_class] = spec
    return spec


def registered_transformers() -> dict[str, TransformerSpec]:
    """The registered specs by transformer class name."""
    _load_builtin_adapters()
    return dict(_SPECS)


def spec_for(transformer: torch.nn.Module) -> TransformerSpec:
    """The spec of a transformer instance, looked up by its class (or a base class) name."""
    _load_builtin_adapters()
    for cls in type(transformer).__mro__:
        spec = _SPECS.get(cls.__name__)
        if spec is not None:
            return spec
    supported = ", ".join(f"{s.transformer_class} ({s.family})" for s in _SPECS.values())
    raise UnsupportedTransformerError(
        f"dit_accel has no adapter for {type(transformer).__name__}. Supported transformers: {supported}. "
        "To support another model, describe its blocks with dit_accel.core.blocks.TransformerSpec and call "
        "dit_accel.core.blocks.register_transformer(spec) (see dit_accel/pipelines/adapters.py for examples)."
    )


def _load_builtin_adapters() -> None:
    # Imported lazily: the adapters module registers the built-in specs on import.
    from dit_accel.pipelines import adapters  # noqa: F401
