"""Which tensors ``patch-parallel`` splits along the sequence and gathers back, per transformer class, in the format
of diffusers' ``_cp_plan`` (module id -> ``ContextParallelInput`` / ``ContextParallelOutput``).

Flux, Wan, LTX-Video and Qwen-Image bring their own ``_cp_plan``; patch-parallel uses it less its text entries
(every rank keeps the whole text, :func:`image_plan`). diffusers gives DiT, PixArt and SD3 none, but their image
tokens take one simple path: the patch embedding (``pos_embed``, which also adds the positional embedding of the
whole grid) makes the row-major token sequence, the blocks keep it, and the output projection hands it to the
unpatchify. So the plan below splits ``pos_embed``'s output along the sequence and gathers the output projection's:
every block, and every conditioning path (timestep, class or caption embeddings, adaLN modulation), sees what it
sees on one process, except that its image tokens are this rank's patch.

Inputs these models take that such a plan cannot split (a ControlNet's residuals over the whole grid, PixArt's
image attention mask) are refused at call time (:data:`UNSPLIT_INPUTS`) rather than met by a shape error inside
a block.
"""

from __future__ import annotations

import torch
from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

# Image tokens (batch, sequence, channels): split pos_embed's output, gather the output projection's.
_SPLIT_EMBEDDING = {0: ContextParallelInput(split_dim=1, expected_dims=3, split_output=True)}
_GATHER = ContextParallelOutput(gather_dim=1, expected_dims=3)

OWN_PLANS: dict[str, dict] = {
    "DiTTransformer2DModel": {"pos_embed": _SPLIT_EMBEDDING, "proj_out_2": _GATHER},
    "PixArtTransformer2DModel": {"pos_embed": _SPLIT_EMBEDDING, "proj_out": _GATHER},
    "SD3Transformer2DModel": {"pos_embed": _SPLIT_EMBEDDING, "proj_out": _GATHER},
}

# Forward arguments that hold whole-grid image tensors the plan does not split: refused when given.
UNSPLIT_INPUTS: dict[str, tuple[str, ...]] = {
    "SD3Transformer2DModel": ("block_controlnet_hidden_states",),
    "PixArtTransformer2DModel": ("attention_mask",),
}

# Entries and outputs of diffusers' plans that are text, kept whole on every rank and so dropped from the plan.
_TEXT_INPUTS = frozenset({"encoder_hidden_states", "encoder_hidden_states_mask", "encoder_attention_mask", "txt_ids"})
_TEXT_OUTPUTS = {("QwenImageTransformer2DModel", "pos_embed"): 1}  # (image freqs, text freqs)


def sequence_plan(transformer: torch.nn.Module) -> dict | None:
    """The model's own ``_cp_plan``, else dit_accel's for its class (:data:`OWN_PLANS`), else ``None``."""
    plan = getattr(transformer, "_cp_plan", None)
    return plan if plan is not None else OWN_PLANS.get(type(transformer).__name__)


def image_plan(transformer: torch.nn.Module) -> dict:
    """:func:`sequence_plan` less its text entries: image tokens split along the sequence, text whole."""
    name = type(transformer).__name__
    plan = {}
    for module_id, entry in (sequence_plan(transformer) or {}).items():
        if isinstance(entry, dict):
            drop = _TEXT_OUTPUTS.get((name, module_id))
            entry = {key: value for key, value in entry.items() if key not in _TEXT_INPUTS and key != drop}
            if entry:
                plan[module_id] = entry
        else:
            plan[module_id] = entry
    return plan


def unsplit_input(transformer: torch.nn.Module, kwargs: dict) -> str | None:
    """The name of a whole-grid input in ``kwargs`` that the plan cannot split (given and not ``None``), or ``None``."""
    for name in UNSPLIT_INPUTS.get(type(transformer).__name__, ()):
        if kwargs.get(name) is not None:
            return name
    return None
