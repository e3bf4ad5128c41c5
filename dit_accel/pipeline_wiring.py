"""How an accelerated pipeline tells its transformers' step trackers what a call cannot: where a generation starts
(``scheduler.set_timesteps`` / ``set_begin_index``) and ends (``maybe_free_model_hooks``), what the scheduler's
model predicts, which timesteps each expert of a two-expert pipeline denoises, and whether classifier-free guidance
runs (what the pipeline passed to ``encode_prompt``). Methods are wrapped on the instances only, each with a
function that restores it exactly."""

from __future__ import annotations

import functools
import inspect
from typing import TYPE_CHECKING, Any, Callable

import torch

from dit_accel.caching.prediction_space import parameterization_of

if TYPE_CHECKING:
    from dit_accel.api import AccelerationHandle

CFG_FLAG = "_dit_accel_cfg"  # set on the pipeline instance: what its current call passed to encode_prompt


def wrap_method(owner: Any, name: str, after: Callable[..., None]) -> Callable[[], None]:
    """Wrap ``owner.name`` on the instance so that ``after(owner, result, *args, **kwargs)`` runs after it.
    Returns a function that restores the exact previous state."""
    had_instance_attr = name in vars(owner)
    previous = vars(owner).get(name)
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        after(owner, result, *args, **kwargs)
        return result

    vars(owner)[name] = wrapper

    def restore() -> None:
        if vars(owner).get(name) is not wrapper:
            return  # someone wrapped it after us; leave their wrapper in place
        if had_instance_attr:
            vars(owner)[name] = previous
        else:
            del vars(owner)[name]

    return restore


def guidance_of(pipe: Any) -> bool | None:
    """Whether the pipeline's current call runs classifier-free guidance, if it can be told: what it last passed
    to ``encode_prompt`` (PixArt, SD3, CogVideoX, LTX, ...), else its ``do_classifier_free_guidance`` property."""
    flag = vars(pipe).get(CFG_FLAG)
    if flag is not None:
        return flag
    try:
        value = getattr(pipe, "do_classifier_free_guidance", None)
    except (AttributeError, TypeError):  # properties that read call-time attributes before the first call
        return None
    return value if isinstance(value, bool) else None


def expert_segment(pipe: Any, transformer: torch.nn.Module, timesteps: Any) -> Any:
    """The timesteps ``transformer`` denoises: all of them, or for a two-expert pipeline (Wan 2.2 A14B:
    ``transformer_2`` and ``boundary_ratio``) its own segment (the first expert takes ``t >= boundary_ratio *
    num_train_timesteps``, the second the rest), so that every plugin's schedule (warm-up, last steps, magcache's
    curve) is relative to the expert's own steps."""
    boundary_ratio = getattr(getattr(pipe, "config", None), "boundary_ratio", None)
    second = getattr(pipe, "transformer_2", None)
    if timesteps is None or boundary_ratio is None or second is None or getattr(pipe, "transformer", None) is None:
        return timesteps
    boundary = boundary_ratio * pipe.scheduler.config.num_train_timesteps
    values = [float(t) for t in timesteps]
    if transformer is second:
        return [t for t in values if t < boundary] or None
    return [t for t in values if t >= boundary] or None


def wrap_pipeline(pipe: Any, handle: "AccelerationHandle") -> None:
    scheduler = getattr(pipe, "scheduler", None)

    encode_prompt = getattr(pipe, "encode_prompt", None)
    if encode_prompt is not None and "do_classifier_free_guidance" in inspect.signature(encode_prompt).parameters:
        signature = inspect.signature(encode_prompt)

        def on_encode_prompt(owner, result, *args, **kwargs) -> None:
            bound = signature.bind_partial(*args, **kwargs)
            bound.apply_defaults()
            vars(owner)[CFG_FLAG] = bool(bound.arguments.get("do_classifier_free_guidance"))

        handle._restores.append(wrap_method(pipe, "encode_prompt", on_encode_prompt))
        handle._restores.append(lambda: vars(pipe).pop(CFG_FLAG, None))

    def on_set_timesteps(owner, result, *args, **kwargs) -> None:
        parameterization = parameterization_of(owner)
        for acc in handle.transformers:
            acc.tracker.scheduler_parameterization = parameterization
            acc.tracker.begin_generation(expert_segment(pipe, acc.transformer, getattr(owner, "timesteps", None)))

    def on_set_begin_index(owner, result, begin_index: int = 0, *args, **kwargs) -> None:
        # img2img pipelines start part-way into the schedule.
        timesteps = getattr(owner, "timesteps", None)
        if timesteps is not None:
            for acc in handle.transformers:
                acc.tracker.begin_generation(expert_segment(pipe, acc.transformer, timesteps[int(begin_index):]))

    def on_end(owner, result, *args, **kwargs) -> None:
        for acc in handle.transformers:
            acc.tracker.reset(reason="end")

    if scheduler is not None and hasattr(scheduler, "set_timesteps"):
        handle._restores.append(wrap_method(scheduler, "set_timesteps", on_set_timesteps))
        if hasattr(scheduler, "set_begin_index"):
            handle._restores.append(wrap_method(scheduler, "set_begin_index", on_set_begin_index))
    if hasattr(pipe, "maybe_free_model_hooks"):
        handle._restores.append(wrap_method(pipe, "maybe_free_model_hooks", on_end))
