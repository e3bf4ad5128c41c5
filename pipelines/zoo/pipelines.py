"""The two zoo pipelines, real ``DiffusionPipeline`` subclasses with the usual call.

* :class:`ZooDiTPipeline` (``zoo:dit``): DiT with class labels, DDIM, classifier-free guidance batched in one
  transformer call with the conditional half first, exactly as diffusers' ``DiTPipeline`` does.
* :class:`ZooMMDiTPipeline` (``zoo:mmdit``): a Flux-architecture transformer conditioned on per-class tokens,
  flow matching with Euler steps, guidance as two separate calls per step (conditional first, under
  ``cache_context("cond")`` / ``("uncond")``), exactly as Flux true-CFG and Wan do.

Both sample in pixel space at 32x32 (the shipped models: an 8x8 token grid of 4x4 patches; the patch is read
from the transformer's config).
"""

from __future__ import annotations

import functools
import inspect
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from diffusers import DiffusionPipeline, DiTTransformer2DModel, FluxTransformer2DModel, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from safetensors.torch import load_file

from dit_accel.pipelines.zoo import models
from dit_accel.pipelines.zoo.shapes import IMAGE_SIZE, NUM_CLASSES

WEIGHTS = Path(__file__).parent / "weights"


def _labels(class_labels: int | Sequence[int] | torch.Tensor, device) -> torch.Tensor:
    labels = torch.as_tensor(class_labels if not isinstance(class_labels, int) else [class_labels]).long().flatten()
    if labels.numel() == 0 or labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise ValueError(f"class_labels must be integers in [0, {NUM_CLASSES - 1}], got {labels.tolist()}")
    return labels.to(device)


def _output(images: torch.Tensor, output_type: str, return_dict: bool):
    images = ((images.clamp(-1, 1) + 1) / 2).float().cpu()
    if output_type == "pt":
        result = images
    elif output_type in ("np", "pil"):
        result = images.permute(0, 2, 3, 1).numpy()
        if output_type == "pil":
            from diffusers.utils import numpy_to_pil

            result = numpy_to_pil(result)
    else:
        raise ValueError(f"output_type {output_type!r} is not supported; allowed: 'pil', 'np', 'pt'")
    return ImagePipelineOutput(images=result) if return_dict else (result,)


class ZooDiTPipeline(DiffusionPipeline):
    """Class-conditional DiT sampled with DDIM; CFG batched (conditional half first, null class = 10)."""

    model_cpu_offload_seq = "transformer"

    def __init__(self, transformer: DiTTransformer2DModel, scheduler) -> None:
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | Sequence[int] | torch.Tensor,
        num_inference_steps: int = 50,
        guidance_scale: float = 2.0,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        device = self._execution_device
        labels = _labels(class_labels, device)
        batch = labels.shape[0]
        latents = randn_tensor((batch, 3, IMAGE_SIZE, IMAGE_SIZE), generator=generator, device=device,
                               dtype=self.transformer.dtype)
        latents = latents * self._set_schedule(num_inference_steps, device)
        guided = guidance_scale > 1
        labels_in = torch.cat([labels, torch.full_like(labels, NUM_CLASSES)]) if guided else labels
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = torch.cat([latents, latents]) if guided else latents
            timesteps = t.expand(model_input.shape[0]).to(device)
            timesteps = timesteps if not timesteps.is_floating_point() else timesteps.to(latents.dtype)
            prediction = self.transformer(model_input, timestep=timesteps, class_labels=labels_in).sample
            if guided:
                cond, uncond = prediction.chunk(2)
                prediction = uncond + guidance_scale * (cond - uncond)
            latents = self._step(prediction, t, latents, generator)
        self.maybe_free_model_hooks()
        return _output(latents, output_type, return_dict)

    def _set_schedule(self, num_inference_steps: int, device) -> float:
        """Set the scheduler's timesteps; returns the initial noise scale."""
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        return self.scheduler.init_noise_sigma

    def _step(self, prediction, t, latents, generator):
        if _takes_generator(type(self.scheduler)):
            return self.scheduler.step(prediction, t, latents, generator=generator).prev_sample
        return self.scheduler.step(prediction, t, latents).prev_sample


@functools.lru_cache(maxsize=None)
def _takes_generator(scheduler_class: type) -> bool:
    # Read once per scheduler class: a signature per step costs 1 % of a zoo:dit step.
    return "generator" in inspect.signature(scheduler_class.step).parameters


class ZooFlowDiTPipeline(ZooDiTPipeline):
    """zoo:flowdit, evaluation-only: a class-conditional DiT trained with flow matching, sampled with flow-matching
    Euler steps (timestep input 1000 sigma); CFG batched, conditional rows first, null class 10."""

    def _set_schedule(self, num_inference_steps: int, device) -> float:
        sigmas = np.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps)
        self.scheduler.set_timesteps(sigmas=sigmas, device=device)
        return 1.0


class ZooMMDiTPipeline(DiffusionPipeline):
    """Class-conditional Flux-architecture model sampled with flow-matching Euler steps; CFG as two calls."""

    model_cpu_offload_seq = "conditioner->transformer"

    def __init__(self, transformer: FluxTransformer2DModel, conditioner: models.ClassConditioner, scheduler) -> None:
        super().__init__()
        self.register_modules(transformer=transformer, conditioner=conditioner, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | Sequence[int] | torch.Tensor,
        num_inference_steps: int = 28,
        guidance_scale: float = 2.0,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        device = self._execution_device
        labels = _labels(class_labels, device)
        batch = labels.shape[0]
        tokens, pooled = self.conditioner(labels)
        null_tokens, null_pooled = self.conditioner(torch.full_like(labels, NUM_CLASSES))
        patch = models.patch_of(self.transformer)
        img_ids = models.image_ids(device, patch)
        txt_ids = models.text_ids(tokens.shape[1], device)
        latents = randn_tensor((batch, (IMAGE_SIZE // patch) ** 2, 3 * patch**2), generator=generator,
                               device=device, dtype=self.transformer.dtype)
        sigmas = np.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps)
        self.scheduler.set_timesteps(sigmas=sigmas, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            timestep = (t / 1000).expand(batch).to(latents.dtype)
            with self.transformer.cache_context("cond"):
                prediction = self.transformer(hidden_states=latents, encoder_hidden_states=tokens,
                                              pooled_projections=pooled, timestep=timestep, img_ids=img_ids,
                                              txt_ids=txt_ids).sample
            if guidance_scale > 1:
                with self.transformer.cache_context("uncond"):
                    unconditional = self.transformer(hidden_states=latents, encoder_hidden_states=null_tokens,
                                                      pooled_projections=null_pooled, timestep=timestep,
                                                      img_ids=img_ids, txt_ids=txt_ids).sample
                prediction = unconditional + guidance_scale * (prediction - unconditional)
            latents = self.scheduler.step(prediction, t, latents).prev_sample
        self.maybe_free_model_hooks()
        return _output(models.unpack(latents, patch), output_type, return_dict)


def _load_weights(module: torch.nn.Module, file: Path) -> torch.nn.Module:
    state = {k: v.float() for k, v in load_file(str(file)).items()}
    module.load_state_dict(state, strict=True)
    return module.eval()


def _folder(name: str) -> Path:
    folder = WEIGHTS / name
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"the zoo:{name} weights are not in this installation ({folder}); train and export them with "
            f"`python -m dit_accel.pipelines.zoo.train --preset {name} --export`"
        )
    return folder


def load(name: str, *, device: str | torch.device = "cpu") -> DiffusionPipeline:
    """Load ``zoo:dit``, ``zoo:mmdit`` or the evaluation-only ``zoo:flowdit`` from the safetensors shipped in the
    package (no network)."""
    if name not in ("dit", "mmdit", "flowdit"):
        raise ValueError(f"unknown zoo model {name!r}; allowed: dit, mmdit, flowdit")
    folder = _folder(name)
    config = json.loads((folder / "config.json").read_text())
    if name == "dit":
        transformer = _load_weights(DiTTransformer2DModel.from_config(config), folder / "model.safetensors")
        pipe = ZooDiTPipeline(transformer=transformer, scheduler=models.ddim_scheduler())
    elif name == "flowdit":
        transformer = _load_weights(DiTTransformer2DModel.from_config(config), folder / "model.safetensors")
        pipe = ZooFlowDiTPipeline(transformer=transformer, scheduler=models.flow_scheduler())
    else:
        transformer = _load_weights(FluxTransformer2DModel.from_config(config), folder / "model.safetensors")
        conditioner_config = json.loads((folder / "conditioner_config.json").read_text())
        conditioner = _load_weights(models.ClassConditioner.from_config(conditioner_config),
                                    folder / "conditioner.safetensors")
        pipe = ZooMMDiTPipeline(transformer=transformer, conditioner=conditioner, scheduler=models.flow_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
