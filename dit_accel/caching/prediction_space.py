"""What a transformer predicts, and the clean-sample estimate each prediction implies, as pure functions.

A diffusion or flow transformer predicts noise (``epsilon``), velocity (``v_prediction``, flow matching's ``v =
noise - x0``) or the clean sample itself. Whatever it predicts, the prediction at the input ``x`` and timestep ``t``
implies an estimate of the clean sample that is affine in both::

    x0_hat = c_input(t) * x + c_prediction(t) * prediction

    flow matching (x = (1 - s) x0 + s noise):     c_input = 1,           c_prediction = -s
    epsilon (x = sqrt(a) x0 + sqrt(1 - a) noise): c_input = 1 / sqrt(a), c_prediction = -sqrt(1 - a) / sqrt(a)
    v_prediction:                                 c_input = sqrt(a),     c_prediction = -sqrt(1 - a)
    sample:                                       c_input = 0,           c_prediction = 1

(``a`` = ``alphas_cumprod[t]``, ``s`` = sigma). A skipped step may forecast ``x0_hat`` instead of the prediction and
turn the forecast back into a prediction **at the skipped step's own input** ``x``: the returned prediction then
reflects where the sampler actually is, not only where it was at the computed steps. With a forecast that reuses
``x0_hat`` this is DDIM's jump from the last computed step; with the linear forecast it is close to a second-order
data-prediction multistep solver (DPM-Solver++(2M)) over the skipped span, where a forecast of the prediction itself
is an Adams-Bashforth step. The model input is what the relation holds on: samplers that scale it (the
Euler-discrete family's ``x / sqrt(sigma^2 + 1)``) hand the transformer the variance-preserving ``x``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

KINDS = ("flow", "epsilon", "v_prediction", "sample")


@dataclass(frozen=True, eq=False)
class Parameterization:
    """What the transformer predicts (``kind``) and the schedule that relates it to the clean sample.

    ``alphas_cumprod`` (``epsilon``/``v_prediction``/``sample``) is indexed by the transformer's timestep input,
    interpolated linearly between integer timesteps; flow matching reads sigma from the timestep input, which
    models take either as ``1000 sigma`` (SD3, Wan) or as ``sigma`` (Flux, whose embedding multiplies by 1000):
    ``timestep_unit`` is that factor (see :func:`flow_timestep_unit`).
    """

    kind: str
    alphas_cumprod: Sequence[float] | torch.Tensor = ()  # a tensor as the scheduler holds it, or any sequence
    num_train_timesteps: int = 1000

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown prediction kind {self.kind!r}; allowed: {', '.join(KINDS)}")
        if self.kind != "flow" and len(self.alphas_cumprod) == 0:
            raise ValueError(f"a {self.kind} parameterization needs the schedule's alphas_cumprod")

    def alpha_bar(self, timestep: float) -> float:
        """``alphas_cumprod`` at a (possibly fractional) timestep, clamped to the schedule."""
        table = self.alphas_cumprod
        position = min(max(float(timestep), 0.0), len(table) - 1.0)
        low = int(position)
        high = min(low + 1, len(table) - 1)
        a, b = float(table[low]), float(table[high])
        return a + (b - a) * (position - low)

    def coefficients(self, timestep: float, timestep_unit: float = 1.0) -> tuple[float, float]:
        """``(c_input, c_prediction)`` with ``x0_hat = c_input x + c_prediction prediction`` at ``timestep``."""
        if self.kind == "flow":
            return 1.0, -float(timestep) / timestep_unit
        if self.kind == "sample":
            return 0.0, 1.0
        a = self.alpha_bar(timestep)
        if self.kind == "v_prediction":
            return math.sqrt(a), -math.sqrt(max(1.0 - a, 0.0))
        if a <= 0.0:  # a zero-SNR step: an epsilon prediction implies no clean sample there
            return math.inf, -math.inf
        return 1.0 / math.sqrt(a), -math.sqrt(max(1.0 - a, 0.0)) / math.sqrt(a)


def invertible(coefficients: tuple[float, float], tolerance: float = 1e-6) -> bool:
    """Whether a prediction can be recovered from ``x0_hat`` at these coefficients (``c_prediction != 0``)."""
    c_input, c_prediction = coefficients
    return math.isfinite(c_input) and math.isfinite(c_prediction) and abs(c_prediction) > tolerance


def flow_timestep_unit(first_timestep: float, num_train_timesteps: int) -> float:
    """The factor between a flow model's timestep input and sigma, read from the first call of a generation: a
    generation starts at sigma near 1 (text-to-image) or part-way (image-to-image, strength down to ~0.01), so a
    first timestep above 1 means the ``1000 sigma`` convention and one at most 1 means sigma itself."""
    return float(num_train_timesteps) if first_timestep > 1.0 else 1.0


def latent_part(x: torch.Tensor, prediction: torch.Tensor) -> tuple[torch.Tensor, int, int] | None:
    """``(x_part, dim, length)``: the entries of ``x`` that ``prediction[..., :length along dim]`` predicts for.

    Equal shapes: everything. Otherwise the tensors may differ in one dimension: a model input with conditioning
    concatenated after the latent (Wan/CogVideoX image-to-video channels; ``x`` longer) or an output with a learned
    variance after the prediction (DiT, PixArt: twice the channels; ``prediction`` longer); the leading ``length``
    entries along it are the latent's. ``None`` when the shapes relate in no such way.
    """
    if x.shape == prediction.shape:
        return x, 0, prediction.shape[0]
    if x.dim() != prediction.dim():
        return None
    differing = [d for d in range(x.dim()) if x.shape[d] != prediction.shape[d]]
    if len(differing) != 1 or differing[0] == 0:
        return None
    dim = differing[0]
    length = min(x.shape[dim], prediction.shape[dim])
    return x.narrow(dim, 0, length), dim, length


def to_clean(x: torch.Tensor, prediction: torch.Tensor, coefficients: tuple[float, float], *,
             inplace: bool = False) -> torch.Tensor | None:
    """The clean-sample estimate implied by ``prediction`` at input ``x`` (a new tensor, or ``prediction`` itself
    with ``inplace``; entries beyond the latent, a learned variance, are kept unchanged). ``None`` where
    :func:`latent_part` finds no latent or a coefficient is not finite (epsilon at a zero-SNR step)."""
    part = latent_part(x, prediction)
    if part is None or not all(math.isfinite(c) for c in coefficients):
        return None
    x_part, dim, length = part
    c_input, c_prediction = coefficients
    result = prediction if inplace else prediction.clone()
    view = result.narrow(dim, 0, length)
    view.mul_(c_prediction)
    if c_input != 0.0:
        view.add_(x_part.to(view.dtype), alpha=c_input)
    return result


def from_clean(x: torch.Tensor, clean: torch.Tensor, coefficients: tuple[float, float], *,
               inplace: bool = False) -> torch.Tensor | None:
    """The prediction at input ``x`` that implies the clean-sample estimate ``clean`` (inverse of
    :func:`to_clean`; a new tensor, or ``clean`` itself with ``inplace``). ``None`` where no latent is found or the
    coefficients are not invertible."""
    part = latent_part(x, clean)
    if part is None or not invertible(coefficients):
        return None
    x_part, dim, length = part
    c_input, c_prediction = coefficients
    result = clean if inplace else clean.clone()
    view = result.narrow(dim, 0, length)
    if c_input != 0.0:
        view.sub_(x_part.to(view.dtype), alpha=c_input)
    view.div_(c_prediction)
    return result


def parameterization_of(scheduler) -> Parameterization | None:
    """What a diffusers scheduler's model predicts, or ``None`` when it cannot tell: flow matching (the
    ``FlowMatch*`` schedulers, and multistep schedulers in flow mode), or ``alphas_cumprod`` with
    ``prediction_type`` ``epsilon``, ``v_prediction`` or ``sample``."""
    if scheduler is None:
        return None
    config = getattr(scheduler, "config", None)
    get = (lambda key: config.get(key) if hasattr(config, "get") else getattr(config, key, None))
    steps = int(get("num_train_timesteps") or 1000) if config is not None else 1000
    prediction_type = get("prediction_type") if config is not None else None
    flow_mode = config is not None and (get("use_flow_sigmas") or prediction_type == "flow_prediction")
    if type(scheduler).__name__.startswith("FlowMatch") or flow_mode:
        return Parameterization("flow", num_train_timesteps=steps)
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if isinstance(alphas, torch.Tensor) and alphas.numel() > 1 and prediction_type in KINDS[1:]:
        # Read at every set_timesteps: one tolist() (tens of microseconds), not a float() per entry (milliseconds).
        return Parameterization(prediction_type, tuple(alphas.detach().to("cpu", torch.float64).tolist()), steps)
    return None
