"""Fidelity metrics against the dense output of the same seed: PSNR and SSIM on images in [0, 1], and the paired
comparison of a classifier's accuracy on two generations of the same seeds.

PSNR is taken over the whole batch's mean squared error; identical batches have infinite PSNR (reported as
``inf``, never as a large made-up number). SSIM is averaged over images. SSIM follows Wang et al. (2004): an 11x11 Gaussian window with sigma 1.5, K1 = 0.01,
K2 = 0.03, on each channel, averaged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def _check(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"expected two image batches (N, C, H, W) of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return a.double(), b.double()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of the whole batch (images in [0, 1]): ``10 log10(1 / MSE)``; ``inf`` when identical."""
    a, b = _check(a, b)
    mse = float((a - b).pow(2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11) -> float:
    """Mean SSIM over the batch (images in [0, 1], valid-region convolution as in the reference code)."""
    a, b = _check(a, b)
    channels = a.shape[1]
    size = min(window, a.shape[-1], a.shape[-2])
    kernel = _gaussian_window(size).expand(channels, 1, size, size).to(a)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(x, kernel, groups=channels)

    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    index = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(index.mean())


@dataclass(frozen=True)
class PairedAccuracy:
    """A classifier's accuracy on accelerated images against its accuracy on the dense images of the same seeds.

    ``difference`` is ``accuracy - reference_accuracy``; ``standard_error`` is the paired difference's,
    ``std(d) / sqrt(n)`` with ``d_i = [predicted_i == label_i] - [reference_i == label_i]`` (Bessel-corrected; 0 for
    one image); ``agreement`` is the fraction of images whose two predictions are the same class."""

    accuracy: float
    reference_accuracy: float
    difference: float
    standard_error: float
    agreement: float


def paired_accuracy(predicted: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor) -> PairedAccuracy:
    """Compare ``predicted`` classes (of accelerated images) with ``reference`` classes (of the dense images of the
    same seeds), both against ``labels``; three 1-D integer tensors of one length."""
    predicted, reference, labels = (torch.as_tensor(t).long().flatten().cpu() for t in (predicted, reference, labels))
    if not (predicted.shape == reference.shape == labels.shape) or predicted.numel() == 0:
        raise ValueError(f"expected three non-empty class vectors of one length, got {predicted.numel()}, "
                         f"{reference.numel()} and {labels.numel()}")
    right, reference_right = (predicted == labels).double(), (reference == labels).double()
    d = right - reference_right
    n = d.numel()
    error = float(d.std() / math.sqrt(n)) if n > 1 else 0.0
    return PairedAccuracy(accuracy=float(right.mean()), reference_accuracy=float(reference_right.mean()),
                          difference=float(d.mean()), standard_error=error,
                          agreement=float((predicted == reference).double().mean()))
