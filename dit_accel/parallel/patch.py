"""``patch-parallel``: displaced patch parallelism (DistriFusion, Li et al. CVPR 2024) and its partially conditioned
variant (PCPP, Zhang et al. 2024) for DiTs, one process per patch under ``torch.distributed``.

The image tokens are split into one patch of whole rows per rank with diffusers' own context-parallel machinery:
the model's ``_cp_plan``, or dit_accel's plan for its class (:mod:`dit_accel.parallel.plans`), through diffusers'
``ContextParallelSplitHook`` / ``ContextParallelGatherHook`` and equipartition sharder, splits the image inputs
along the sequence and gathers the output projection's, so the pipeline sees
the whole latent once per transformer call. Text inputs are left out of the plan: every rank keeps all text tokens,
computes them itself and never exchanges them. Attention is *not* diffusers' Ulysses/Ring (the processors never get
a ``_parallel_config``): every self- and joint-attention layer is routed through dit_accel's interceptor, where a
rank attends with its local queries to

* its own fresh keys and values, the text's, and
* the other patches' keys and values of the *previous step* of the same layer and CFG slot, received by an
  asynchronous ``all_to_all_single`` posted right after this rank's keys were computed one step earlier, so the
  exchange overlaps a whole step of compute (DistriFusion's displacement).

The first ``warmup_steps`` steps (and any call with nothing to reuse, or whose layer and CFG slot did not attend on
the step before, because a cache skipped the blocks, reused the attention or answered the branch) exchange
synchronously and are exact, so a warm-up covering every step reproduces the single-process output, and under a
step-skipping cache the computed steps attend to fresh patches (with magcache-turbo, zoo:mmdit's images are the
single-process ones exactly: benchmarks/results/patch-parallel-magcache-cpu.md).
In ``pcpp`` mode a rank receives from each other patch only its rows within ``band`` rows of its own patch, plus
``pool x pool`` mean tiles of the rest with a ``log(count)`` logit bias (see :mod:`dit_accel.parallel.patches`),
which cuts the bytes exchanged; by default the tiles are expanded back to tokens with the fine structure seen on the
last synchronous step (``correction``, :mod:`dit_accel.parallel.correction`), optionally refreshed by periodic
synchronous steps (``refresh_interval``).

Launch with ``torchrun --nproc_per_node=N`` (NCCL on GPUs, gloo on CPU), initialise the process group, feed every
rank the same inputs (same seed) and run the pipeline on every rank; each rank computes one patch.

Refused with a ``ValueError``: no initialised ``torch.distributed`` or a world of one process, a transformer
without a sequence plan this module knows (diffusers' ``_cp_plan`` of Flux, Wan, LTX-Video, Qwen-Image; dit_accel's
own for DiT, PixArt and SD3), a model already under diffusers' parallelism, an input over the whole grid that the
plan does not split (an SD3 ControlNet's residuals, PixArt's image attention mask), an attention plugin (or
cfg-share / toca) in the same recipe, and at call time a grid whose rows do not split into equal patches, or an
attention mask other than key padding over text. Video grids are split over their rows stacked frame after frame
(so patches are runs of frames when the frames divide evenly); PCPP's bands and tiles follow those stacked rows.
Caching plugins may be stacked: every rank decides alike, because the transformer's ``_parallel_config`` is set
while this is installed and the adaptive ones reduce their statistics over the ranks
(:mod:`dit_accel.core.parallel`; see the README's Parallelism table for which combine).
"""

from __future__ import annotations

import warnings
from collections import Counter

import torch
import torch.distributed as dist
from diffusers.hooks import ModelHook
from diffusers.hooks.context_parallel import ContextParallelGatherHook, ContextParallelSplitHook
from diffusers.models._modeling_parallel import (ContextParallelConfig, ContextParallelInput, ContextParallelOutput,
                                                 ParallelConfig)

from dit_accel.attention.base import split_text
from dit_accel.core.attention import AttentionCall, key_padding, unsupported_options
from dit_accel.core.hooks import attach, detach
from dit_accel.core.plugin import Plugin, register_plugin
from dit_accel.parallel.config import PatchParallelConfig
from dit_accel.parallel.correction import Corrections, far_detail, is_sync_step
from dit_accel.parallel.exchange import Exchange as _Exchange, Remote as _Remote, extrapolated
from dit_accel.parallel.patches import PatchGrid, attend_patches
from dit_accel.parallel.plans import image_plan, sequence_plan, unsplit_input

HOOK_PREFIX = "dit_accel.patch-parallel"

# Transformers whose sequence plan (diffusers' `_cp_plan`, or dit_accel's, :mod:`dit_accel.parallel.plans`) splits
# the image tokens into row-major chunks.
SUPPORTED_FAMILIES: dict[str, str] = {"FluxTransformer2DModel": "flux", "WanTransformer3DModel": "wan",
                                      "LTXVideoTransformer3DModel": "ltx", "QwenImageTransformer2DModel": "qwen-image",
                                      "DiTTransformer2DModel": "dit", "PixArtTransformer2DModel": "pixart-sigma",
                                      "SD3Transformer2DModel": "sd3"}

__all__ = ["PatchParallelConfig", "PatchParallelPlugin", "environment_problem", "image_plan"]  # the config: config.py


def environment_problem(transformer: torch.nn.Module, world: int | None) -> str | None:
    """Why patch parallelism cannot be installed on ``transformer`` in a world of ``world`` processes (``None``: no
    initialised ``torch.distributed``), or ``None``."""
    if world is None:
        return ("patch-parallel runs one process per patch and is allowed only under torch.distributed, which is not "
                "initialised: launch with `torchrun --nproc_per_node=N script.py` and call "
                "torch.distributed.init_process_group() ('nccl' on GPUs, 'gloo' on CPU) before accelerate_dit")
    if world < 2:
        return ("patch-parallel needs at least 2 processes, but the world size is 1; allowed: "
                "`torchrun --nproc_per_node=N` with N >= 2")
    name = type(transformer).__name__
    supported = ", ".join(f"{family} ({cls})" for cls, family in SUPPORTED_FAMILIES.items())
    plan = sequence_plan(transformer)
    if name not in SUPPORTED_FAMILIES or plan is None:
        return (f"patch-parallel shards the tokens with the model's diffusers `_cp_plan` (or dit_accel's plan for "
                f"its class), and {name} {'has none' if plan is None else 'is not a family it knows'}; "
                f"supported: {supported}")
    processors = (getattr(module, "processor", None) for module in transformer.modules())
    if getattr(transformer, "_parallel_config", None) is not None or any(
            getattr(processor, "_parallel_config", None) is not None for processor in processors):
        return (f"diffusers parallelism is already enabled on this {name} (enable_parallelism or "
                "from_pretrained(parallel_config=...)); patch-parallel shards the model itself: load it without")
    return None


def _modules(root: torch.nn.Module, module_id: str) -> list[torch.nn.Module]:
    """Submodules named by a ``_cp_plan`` key (``""``, ``"proj_out"``, ``"transformer_blocks.*"``)."""
    found = [root]
    for atom in module_id.split(".") if module_id else []:
        found = [child for module in found for child in (list(module) if atom == "*" else [getattr(module, atom)])]
    return found


class _SplitHook(ContextParallelSplitHook):
    """diffusers' split hook, passing through outputs it has nothing to split: its type check refuses the
    ``Transformer2DModelOutput`` of a model called with ``return_dict=True`` even when it splits no output."""

    def post_forward(self, module, output):
        if not any(isinstance(cpm, ContextParallelInput) and cpm.split_output for cpm in self.metadata.values()):
            return output
        return super().post_forward(module, output)


class _GridGuard(ModelHook):
    """Outside diffusers' split hooks: checks that this call's grid splits into whole-row patches, before the
    sharder asserts on it, and that it passes no whole-grid input the plan cannot split."""

    def __init__(self, plugin: "PatchParallelPlugin") -> None:
        super().__init__()
        self.plugin = plugin

    def pre_forward(self, module, *args, **kwargs):
        unsplit = unsplit_input(module, kwargs)
        if unsplit is not None:
            raise ValueError(f"patch-parallel splits {type(module).__name__}'s image tokens into patches, but this "
                             f"call passes {unsplit}, a tensor over the whole grid that it does not split; call it "
                             f"without {unsplit} (or without patch-parallel)")
        self.plugin.begin_call()
        return args, kwargs


@register_plugin(PatchParallelConfig)
class PatchParallelPlugin(Plugin):
    """See the module docstring. ``bytes_by_step`` (step -> bytes this rank sent) and :attr:`bytes_per_step`
    count the exchange of the last generation; ``fallbacks`` counts calls that ran dense within the patch."""

    kind = "parallel"

    def install(self) -> None:
        transformer = self.target.transformer
        initialised = dist.is_available() and dist.is_initialized()
        problem = environment_problem(transformer, dist.get_world_size() if initialised else None)
        if problem is not None:
            raise ValueError(problem)
        self._refuse_companions(self.target.plugins)
        self._layers = [layer for layer in self.target.attention.layers if layer.kind in ("self", "joint")]
        if not self._layers:
            raise ValueError(f"patch-parallel: {type(transformer).__name__} has no self- or joint-attention layer")
        self._routed = False
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self._hooked: list[tuple[torch.nn.Module, str]] = []
        self._state: dict[tuple, _Remote | _Exchange] = {}
        self._made: dict[tuple, int | None] = {}  # the step each slot's state was computed at
        self._history: dict[tuple, tuple[int, _Remote]] = {}  # extrapolate: the previous remote of each slot
        self.corrections = Corrections()
        self.fallbacks: Counter = Counter()
        self.bytes_by_step: dict[int, int] = {}
        self._generation, self._grid = None, None
        device = next(transformer.parameters()).device
        mesh = dist.device_mesh.init_device_mesh(device.type, (1, self.world), mesh_dim_names=("ring", "ulysses"))
        cp = ContextParallelConfig(ulysses_degree=self.world, mesh=mesh)  # the sharder reads only its mesh
        cp.setup(self.rank, self.world, device, mesh)
        self.group = dist.new_group(list(range(self.world)))  # exchanges never queue behind the output gather
        for module_id, entry in image_plan(transformer).items():
            for module in _modules(transformer, module_id):
                outputs = [entry] if isinstance(entry, ContextParallelOutput) else entry
                hook = _SplitHook(entry, cp) if isinstance(entry, dict) else ContextParallelGatherHook(
                    list(outputs), cp)
                name = f"{HOOK_PREFIX}.{module_id}"
                attach(module, hook, name)
                self._hooked.append((module, name))
        attach(transformer, _GridGuard(self), f"{HOOK_PREFIX}.guard")
        self._hooked.append((transformer, f"{HOOK_PREFIX}.guard"))
        transformer._parallel_config = ParallelConfig(context_parallel_config=cp)  # caches all-reduce their stats
        self._owns_config = True

    def _route(self) -> None:
        # Routed once every plugin is installed (check_companions), so that an attention plugin anywhere in the
        # recipe meets the refusal below rather than the interceptor's overlap error; begin_call makes sure.
        if not self._routed:
            self.target.attention.route(self._layers, self._attend, owner=self)
            self._routed = True

    def remove(self) -> None:
        self.target.attention.unroute(self)
        self._routed = False
        self.reset()
        for module, name in reversed(getattr(self, "_hooked", [])):
            detach(module, name)
        self._hooked = []
        if getattr(self, "_owns_config", False):
            self.target.transformer._parallel_config = None
            self._owns_config = False

    def reset(self) -> None:
        for entry in getattr(self, "_state", {}).values():
            if isinstance(entry, _Exchange):
                entry.wait()  # every rank posted it: drain, so no exchange outlives its generation
        self._state, self._made, self._history = {}, {}, {}
        if hasattr(self, "corrections"):
            self.corrections.clear()

    def check_companions(self, plugins: list[Plugin]) -> None:
        self._refuse_companions([p for p in plugins if p is not self])
        self._route()

    def _refuse_companions(self, plugins: list[Plugin]) -> None:
        routed = {owner for hook in self.target.attention.hooks.values() for owner, *_ in hook.routes}
        refused = [p.name for p in plugins if p is not self and (p.kind == "attention" or p in routed)]
        if refused:
            raise ValueError(
                f"patch-parallel computes the attention of every layer itself (local queries over all patches' keys), "
                f"so it cannot run with {', '.join(refused)}, which also replace attention; attention plugins (gna, "
                "psa, svg2, hilbert, proxy, todo, window-residual, int8), cfg-share and toca are refused. Caching "
                "plugins may combine when every rank decides alike (fixed schedules; fbcache and magcache all-reduce)")

    def idle_reason(self, steps: int) -> str | None:
        return "no self- or joint-attention call reached it (is the attention backend the native SDPA?)"

    def cache_bytes(self) -> int:
        return (sum(entry.nbytes() for entry in self._state.values() if isinstance(entry, _Remote))
                + sum(remote.nbytes() for _, remote in self._history.values()) + self.corrections.nbytes())

    @property
    def bytes_per_step(self) -> float:
        """Mean bytes this rank sent per step after warm-up, over the steps from the first after warm-up to the last
        that posted an exchange (the last step of a generation sends nothing). Warm-up steps send every row
        synchronously, in both modes; with ``refresh_interval`` the refresh steps' full exchanges count here, and
        so do the steps before them, which send nothing."""
        first = max(1, self.config.warmup_steps)
        posted = [step for step, sent in self.bytes_by_step.items() if step >= first and sent]
        if not posted:
            return 0.0
        steady = range(first, max(posted) + 1)
        return sum(self.bytes_by_step.get(step, 0) for step in steady) / len(steady)

    # -------------------------------------------------------------------------------------------- per call
    def begin_call(self) -> None:
        self._route()
        context = self.target.tracker.current
        grid = context.grid if context is not None else None
        if grid is None:
            raise ValueError(f"patch-parallel could not read the token grid of this {self.target.spec.family} call; "
                             "it needs it to split the rows")
        self._grid = PatchGrid(grid.frames * grid.height, grid.width, self.world)
        if context.generation != self._generation:
            self._generation, self.bytes_by_step = context.generation, {}

    def _attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                call: AttentionCall) -> torch.Tensor:
        self.acted()
        reason = unsupported_options(call.options, key_padding=True)
        if reason is not None:
            raise ValueError(f"patch-parallel serves inference attention only; {call.layer.name} has {reason}")
        layout, context, grid = call.layout, call.context, self._grid
        text = layout.num_text_tokens if layout.kind == "joint" else 0
        if grid is None or key.shape[2] - text != grid.tokens_per_patch or key.shape[1] != value.shape[1]:
            return self._fallback("the keys are not this rank's patch (and the text)", call, query, key, value)
        text_first = layout.text_position == "first"
        k_img, k_txt = split_text(key, text, text_first)
        v_img, v_txt = split_text(value, text, text_first)
        tokens = torch.cat([k_img, v_img], -1).permute(2, 0, 1, 3)  # (n, B, H, Dk + Dv): rows along dim 0
        slot = (call.layer.name, context.slot if context is not None else None, call.index)
        previous = self._state.pop(slot, None)
        made = self._made.pop(slot, None)
        step = context.step if context is not None else None
        steps = context.num_steps if context is not None else None
        last = context is None or (steps is not None and step >= steps - 1)
        config = self.config
        band, pool, interval = config.exchange_band, config.exchange_pool, config.active_refresh_interval
        growth = config.refresh_growth
        correct = config.active_correction if context is not None else "none"
        attend = lambda remote: self._attention(query, tokens, remote, k_txt, v_txt, text_first,  # noqa: E731
                                                k_img.shape[-1], call)
        # The other patches' state is one step old, as DistriFusion assumes, or this step exchanges synchronously:
        # a step after steps that ran no attention here (a cache skipped the blocks or reused the attention, or
        # cfg-cache answered this branch) would otherwise attend to patches several steps old.
        stale = (previous is not None and step is not None and made == step - 1
                 and not is_sync_step(step, config.warmup_steps, interval, steps, growth)
                 and previous.grid == grid and previous.signature == (tokens.shape[1:], tokens.dtype))
        if stale:
            remote = previous.remote(band, pool) if isinstance(previous, _Exchange) else previous
            if config.extrapolate:
                remote = self._extrapolated(slot, remote, step - 1)
            if not last and not is_sync_step(step + 1, config.warmup_steps, interval, steps, growth):
                self._state[slot] = self._post(self._exchange(tokens, grid, full=band is None), step)
                self._made[slot] = step
            if correct == "detail":
                remote = self.corrections.apply_detail(slot, context.generation, remote)
            out = attend(remote)
            return self.corrections.apply(slot, context.generation, out) if correct == "residual" else out
        if isinstance(previous, _Exchange):
            previous.wait()
        exchange = self._post(self._exchange(tokens, grid, full=True), step)
        remote = exchange.remote(None, 0)
        out = attend(remote)
        if not last:
            self._state[slot] = exchange.remote(band, pool) if band is not None else remote
            self._made[slot] = step
            if config.extrapolate and step is not None:
                self._history[slot] = (step, self._state[slot])  # this step's keys: the first trend's origin
            if correct == "residual":  # the same keys and values, as PCPP would have seen them
                self.corrections.learn(slot, context.generation, out, attend(self._state[slot]))
            elif correct == "detail":
                self.corrections.learn_detail(slot, context.generation,
                                              far_detail(exchange.parts(), grid, self.rank, band, pool))
        return out

    def _exchange(self, tokens: torch.Tensor, grid: PatchGrid, full: bool) -> _Exchange:
        return _Exchange(tokens, grid, full, rank=self.rank, band=self.config.exchange_band,
                         pool=self.config.exchange_pool,
                         group=self.group)

    def _extrapolated(self, slot: tuple, remote: _Remote, made: int) -> _Remote:
        """``remote`` (the other patches' keys and values computed at step ``made``, used one step later) moved
        along their change since the step before: ``x + (x - x_prev)`` when both are from consecutive steps with the
        same layout, else ``remote`` as is."""
        older = self._history.get(slot)
        self._history[slot] = (made, remote)
        if older is None or older[0] != made - 1:
            return remote
        return extrapolated(remote, older[1])

    def _post(self, exchange: _Exchange, step: int | None) -> _Exchange:
        if step is not None:
            self.bytes_by_step[step] = self.bytes_by_step.get(step, 0) + exchange.sent
        return exchange

    def _attention(self, query, tokens, remote: _Remote, k_txt, v_txt, text_first: bool, dim_k: int,
                   call: AttentionCall) -> torch.Tensor:
        options, text, keep_text = call.options, k_txt.shape[2], None
        if options.get("attn_mask") is not None:
            keep = key_padding(options["attn_mask"], query.shape[0], text + tokens.shape[0])
            keep_img, keep_text = split_text(keep[:, None, :, None], text, text_first) if keep is not None else (0, 0)
            if keep is None or not bool(keep_img.all()):
                raise ValueError(f"patch-parallel: {call.layer.name} has an attention mask that is not a padding mask "
                                 "over text tokens; it cannot be split across patches")
            keep_text = keep_text[:, 0, :, 0]
        return attend_patches(query, tokens, remote.before, remote.after, remote.tiles, remote.bias, k_txt, v_txt,
                              text_first=text_first, dim_k=dim_k, keep_text=keep_text, scale=options.get("scale"),
                              enable_gqa=bool(options.get("enable_gqa")))

    def _fallback(self, reason: str, call: AttentionCall, query, key, value) -> torch.Tensor:
        self.fallbacks[reason] += 1
        if self.fallbacks[reason] == 1:
            warnings.warn(f"dit_accel patch-parallel: {call.layer.name} attends within this rank's tokens only: "
                          f"{reason}", stacklevel=2)
        return call.dense(query, key, value)
