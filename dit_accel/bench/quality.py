"""The quality metrics of a benchmark row: fidelity against the dense output of the same seeds (PSNR, SSIM,
relative L1) and the distribution metrics -- fd and class consistency on the zoo models (offline), FID and CLIP
score through torchmetrics with injected models when the user supplies weights. A metric that cannot be computed
is skipped with the reason in the row's notes, never replaced by a number."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dit_accel.bench.metrics import paired_accuracy, psnr, ssim

REAL_SEED = 3_000_000_019  # seed of the zoo's real images for fd (as in benchmarks/caching_cpu.py)


def _frames(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) images, videos (N, F, 3, H, W) flattened to their frames."""
    return images.flatten(0, 1) if images.ndim == 5 else images


def fidelity(images: torch.Tensor, dense: torch.Tensor) -> dict[str, float]:
    a, b = _frames(images), _frames(dense)
    return {"psnr": psnr(a, b), "ssim": ssim(a, b),
            "rel_l1": float((a - b).abs().sum() / b.abs().sum().clamp(min=1e-12))}


def class_change(evaluator, images: torch.Tensor, dense: torch.Tensor, labels) -> dict[str, float]:
    """A row's ``class_consistency_change`` (± ``class_consistency_change_se``) and ``class_agreement``: the zoo
    evaluator's classes of ``images`` against those of the ``dense`` images of the same seeds
    (:func:`~dit_accel.bench.metrics.paired_accuracy`)."""
    paired = paired_accuracy(evaluator.predict(images), evaluator.predict(dense), torch.as_tensor(labels))
    return {"class_consistency_change": paired.difference, "class_consistency_change_se": paired.standard_error,
            "class_agreement": paired.agreement}


class Quality:
    """The distribution metrics of one benchmark: fd and class consistency on zoo models (offline), FID and CLIP
    score through torchmetrics when the user supplies weights; otherwise skipped, with the reason in ``notes``."""

    def __init__(self, spec: str, num_samples: int, fid_weights: Path | None = None,
                 clip_model: Path | None = None) -> None:
        self.zoo = spec.startswith("zoo:")
        self.fid_weights, self.clip_model = fid_weights, clip_model
        self.evaluator = self.real = None
        if self.zoo:
            from dit_accel.pipelines import zoo

            self.evaluator = zoo.evaluator()
            self.real = zoo.dataset(max(num_samples, 2), seed=REAL_SEED)[0][:num_samples]

    def measure(self, images: torch.Tensor, dense: torch.Tensor | None, conditioning: dict[str, Any],
                notes: list[str]) -> dict[str, Any]:
        """Distribution metrics of ``images``; ``dense`` is None for the dense row itself."""
        result: dict[str, Any] = {}
        frames = _frames(images)
        if self.zoo:
            if len(frames) >= 2:
                result["fd"] = self.evaluator.fd(frames, self.real)
            else:
                notes.append("fd skipped: it needs at least 2 samples")
            if conditioning.get("labels") is not None:
                result["class_consistency"] = self.evaluator.class_consistency(frames, conditioning["labels"])
                if dense is not None:  # the change from dense, image by image: is it more than noise?
                    result.update(class_change(self.evaluator, frames, _frames(dense), conditioning["labels"]))
            if len(frames) < 1000:
                notes.append(f"fd on {len(frames)} images: a small-sample estimate, compare within this table only")
        else:
            notes.append("fd/class consistency: zoo models only")
        if self.fid_weights is None:
            if not self.zoo:
                notes.append("FID skipped: no --fid-weights given")
        elif dense is not None:
            result["fid"] = _fid(self.fid_weights, frames, _frames(dense), notes)
        if self.clip_model is None:
            if not self.zoo:
                notes.append("CLIP score skipped: no --clip-model given")
        elif not conditioning.get("prompts"):
            notes.append("CLIP score skipped: the pipeline has no prompt (class-conditional)")
        else:
            result["clip_score"] = _clip(self.clip_model, images, conditioning["prompts"], notes)
        return result


def _uint8(images: torch.Tensor) -> torch.Tensor:
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def _hub_file(text: str) -> tuple[str, str] | None:
    """``"owner/repo:path/file.pt"`` -> ``("owner/repo", "path/file.pt")``; None for anything else."""
    repo, sep, filename = text.partition(":")
    parts = repo.split("/")
    if not sep or not filename or len(parts) != 2 or not all(parts) or repo.startswith((".", "~")):
        return None
    return repo, filename


def _fid(weights: Path | str, images: torch.Tensor, reference: torch.Tensor, notes: list[str]) -> float | None:
    """FID of ``images`` against the dense outputs of the same seeds (no real reference set here), through
    torchmetrics with an injected feature extractor: ``weights`` is a TorchScript module mapping float images
    (N, 3, H, W) in [0, 1] to features (N, D) -- e.g. a scripted Inception -- as a local file or as
    ``owner/repo:file.pt`` on the hub (fetched when online). (torchmetrics' own Inception goes
    through torch-fidelity, which needs torchvision: never used here.)"""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError as error:
        notes.append(f"FID skipped: torchmetrics is not importable ({error}); pip install 'dit_accel[metrics]'")
        return None
    local = Path(weights)
    if not local.exists() and _hub_file(str(weights)) is not None:
        repo, filename = _hub_file(str(weights))
        try:
            from huggingface_hub import hf_hub_download

            local = Path(hf_hub_download(repo, filename))
        except Exception as error:  # noqa: BLE001 - offline, unknown repo or file: a note, never a number
            notes.append(f"FID skipped: cannot fetch {filename!r} from the hub repo {repo!r} "
                         f"({type(error).__name__}; offline?)")
            return None
    try:
        feature = torch.jit.load(str(local), map_location="cpu").eval()
    except (RuntimeError, ValueError, OSError) as error:
        notes.append(f"FID skipped: {str(weights)!r} is not a TorchScript feature extractor "
                     f"({type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''})")
        return None
    try:
        metric = FrechetInceptionDistance(feature=feature, normalize=True)
        metric.update(reference, real=True)
        metric.update(images, real=False)
        value = float(metric.compute())
    except Exception as error:  # noqa: BLE001 - a metric failure is reported, never faked
        notes.append(f"FID skipped: {type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}")
        return None
    notes.append(f"FID against the dense outputs of the same seeds, {len(images)} images"
                 + (" (far too few for a meaningful FID)" if len(images) < 1000 else ""))
    return value


class _CLIPFeatures(torch.nn.Module):
    """A CLIP model whose ``get_image_features``/``get_text_features`` return the embedding tensors: transformers 5
    returns output objects (the embeddings in ``pooler_output``), which torchmetrics' CLIP score cannot read."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(output: Any) -> torch.Tensor:
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    def get_image_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(*args, **kwargs))


def _clip(model: Path, images: torch.Tensor, prompts: list[str], notes: list[str]) -> float | None:
    """CLIP score (torchmetrics, 0-100 scale) of ``images`` against their prompts, with the CLIP model and processor
    loaded by transformers from ``model``: a local directory, or a hub id when online."""
    try:
        from torchmetrics.multimodal.clip_score import CLIPScore
    except ImportError as error:
        notes.append(f"CLIP score skipped: torchmetrics (with transformers) is not importable ({error})")
        return None
    def load() -> tuple[Any, Any]:
        # Injected: torchmetrics only takes a fixed list of hub names as strings, never a local directory.
        from transformers import CLIPModel, CLIPProcessor

        return (_CLIPFeatures(CLIPModel.from_pretrained(str(model)).eval()),
                CLIPProcessor.from_pretrained(str(model)))

    try:
        metric = CLIPScore(model_name_or_path=load)
        if images.ndim == 5:  # videos: every frame against its prompt
            prompts = [p for p in prompts for _ in range(images.shape[1])]
        metric.update(_uint8(_frames(images)), prompts[: len(_frames(images))])
        return float(metric.compute())
    except Exception as error:  # noqa: BLE001
        notes.append(f"CLIP score skipped: {type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}")
        return None
