"""The offline evaluator: a small CNN trained on the zoo dataset.

``class_consistency`` (the fraction of images classified as their conditioning label) is our offline analogue of
CLIP score; ``fd`` (the Fréchet distance between Gaussian fits of its penultimate features) is our offline
analogue of FID.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from dit_accel.pipelines.zoo.shapes import NUM_CLASSES

FEATURE_DIM = 128


class ShapeClassifier(torch.nn.Module):
    """Four conv stages to a 128-d feature (the fd features), then a linear classifier."""

    def __init__(self, num_classes: int = NUM_CLASSES, width: int = 32) -> None:
        super().__init__()

        def stage(cin: int, cout: int) -> list[torch.nn.Module]:
            return [torch.nn.Conv2d(cin, cout, 3, padding=1), torch.nn.BatchNorm2d(cout), torch.nn.GELU()]

        self.features = torch.nn.Sequential(
            *stage(3, width), *stage(width, width), torch.nn.MaxPool2d(2),            # 16x16
            *stage(width, 2 * width), *stage(2 * width, 2 * width), torch.nn.MaxPool2d(2),  # 8x8
            *stage(2 * width, FEATURE_DIM), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        )
        self.head = torch.nn.Linear(FEATURE_DIM, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images * 2 - 1))


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussian fits of two feature sets (N, F), in float64."""
    a, b = features_a.double(), features_b.double()
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(f"fd needs at least 2 images per set, got {a.shape[0]} and {b.shape[0]}")
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    # tr(sqrt(cov_a cov_b)) from the eigenvalues of sqrt(cov_a) cov_b sqrt(cov_a), which is symmetric PSD.
    values, vectors = torch.linalg.eigh(cov_a)
    sqrt_a = (vectors * values.clamp(min=0).sqrt()) @ vectors.T
    middle = sqrt_a @ cov_b @ sqrt_a
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    distance = (mean_a - mean_b).pow(2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * trace_sqrt
    return float(distance.clamp(min=0))


class Evaluator:
    """Scores images in [0, 1] of shape (N, 3, 32, 32) with the shipped classifier."""

    def __init__(self, model: ShapeClassifier, batch_size: int = 256) -> None:
        self.model = model.eval()
        self.batch_size = batch_size

    def _check(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be a float tensor (N, 3, 32, 32) in [0, 1], got {getattr(images, 'shape', type(images))}")
        return images.float().cpu()

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        images = self._check(images)
        return torch.cat([self.model.features(chunk * 2 - 1) for chunk in images.split(self.batch_size)])

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        images = self._check(images)
        return torch.cat([self.model(chunk).argmax(-1) for chunk in images.split(self.batch_size)])

    def class_consistency(self, images: torch.Tensor, labels) -> float:
        """Fraction of ``images`` classified as their conditioning ``labels``."""
        labels = torch.as_tensor(labels).long().cpu()
        if labels.shape[0] != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        return float((self.predict(images) == labels).float().mean())

    def fd(self, images_a: torch.Tensor, images_b: torch.Tensor) -> float:
        """Fréchet distance of the classifier's penultimate features (our offline FID)."""
        return frechet_distance(self.features(images_a), self.features(images_b))


WEIGHTS = Path(__file__).parent / "weights" / "evaluator"


def load_classifier(folder: Path = WEIGHTS) -> ShapeClassifier:
    file = folder / "model.safetensors"
    if not file.is_file():
        raise FileNotFoundError(
            f"the zoo evaluator weights are missing ({file}); train them with "
            "`python -m dit_accel.pipelines.zoo.train --preset evaluator`"
        )
    config = json.loads((folder / "config.json").read_text())
    model = ShapeClassifier(**config)
    model.load_state_dict({k: v.float() for k, v in load_file(str(file)).items()})
    return model


_EVALUATOR: Evaluator | None = None


def evaluator() -> Evaluator:
    """The shipped evaluator (loaded once, from safetensors)."""
    global _EVALUATOR
    if _EVALUATOR is None:
        _EVALUATOR = Evaluator(load_classifier())
    return _EVALUATOR


__all__ = ["Evaluator", "ShapeClassifier", "evaluator", "frechet_distance", "load_classifier"]
