"""The zoo's dataset: procedurally drawn, class-conditional 32x32 RGB images, deterministic from a seed.

Ten classes of shapes, each drawn from a signed distance function with anti-aliased edges, at a random size,
position and rotation, in a random saturated colour over a dark background with a gradient and a smooth noise
texture, plus pixel noise. The shapes are chosen to stay distinguishable under any rotation, so the label is
always recoverable from the image while the distribution within a class is wide.
"""

from __future__ import annotations

import math

import torch

IMAGE_SIZE = 32
CLASS_NAMES = (
    "disc", "ring", "square", "triangle", "cross", "star", "crescent", "stripes", "checker", "two-discs",
)
NUM_CLASSES = len(CLASS_NAMES)


def _box(px: torch.Tensor, py: torch.Tensor, half_w: float, half_h: float) -> torch.Tensor:
    qx, qy = px.abs() - half_w, py.abs() - half_h
    outside = torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2)
    return outside + torch.minimum(torch.maximum(qx, qy), torch.zeros_like(qx))


def shape_distance(label: int, px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
    """Signed distance (negative inside) of class ``label``'s shape in its unit frame (shape radius ~1)."""
    radius = torch.sqrt(px**2 + py**2)
    if label == 0:  # disc
        return radius - 0.95
    if label == 1:  # ring
        return (radius - 0.72).abs() - 0.24
    if label == 2:  # square
        return _box(px, py, 0.78, 0.78)
    if label == 3:  # equilateral triangle
        angles = [math.pi / 2 + k * 2 * math.pi / 3 for k in range(3)]
        return torch.stack([px * math.cos(a) + py * math.sin(a) for a in angles]).amax(0) - 0.5
    if label == 4:  # plus-shaped cross
        return torch.minimum(_box(px, py, 0.95, 0.28), _box(px, py, 0.28, 0.95))
    if label == 5:  # five-pointed star (radial profile)
        angle = torch.atan2(py, px)
        return radius - (0.62 + 0.36 * torch.cos(5 * angle))
    if label == 6:  # crescent: a disc minus a shifted disc
        return torch.maximum(radius - 0.95, -(torch.sqrt((px - 0.42) ** 2 + py**2) - 0.75))
    if label == 7:  # a disc filled with parallel stripes
        return torch.maximum(radius - 0.95, -torch.sin(px * math.pi * 2.2) * 0.3)
    if label == 8:  # a square checkerboard
        return torch.maximum(_box(px, py, 0.85, 0.85), -torch.sin(px * math.pi * 1.8) * torch.sin(py * math.pi * 1.8) * 0.5)
    if label == 9:  # two small discs side by side
        left = torch.sqrt((px + 0.5) ** 2 + py**2) - 0.42
        right = torch.sqrt((px - 0.5) ** 2 + py**2) - 0.42
        return torch.minimum(left, right)
    raise ValueError(f"label {label} out of range; allowed: 0..{NUM_CLASSES - 1}")


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    k = (torch.tensor([5.0, 3.0, 1.0]) + h[:, None] * 6) % 6
    return v[:, None] - v[:, None] * s[:, None] * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def render(labels: torch.Tensor, generator: torch.Generator, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Draw one image per label with random appearance from ``generator``; returns (n, 3, size, size) in [0, 1]."""
    n = labels.shape[0]

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, *shape, generator=generator)

    scale = uniform(0.38, 0.72)  # shape radius as a fraction of the half-width
    centre = (uniform(-1, 1, 2) * (1 - scale[:, None]) * 0.9)
    angle = uniform(0, 2 * math.pi)
    foreground = _hsv_to_rgb(uniform(0, 1), uniform(0.55, 1.0), uniform(0.7, 1.0))
    background = _hsv_to_rgb(uniform(0, 1), uniform(0.2, 0.8), uniform(0.05, 0.32))
    gradient_direction = uniform(0, 2 * math.pi)
    gradient_strength = uniform(0.0, 0.15)
    texture_strength = uniform(0.0, 0.12)
    texture = torch.rand(n, 1, 4, 4, generator=generator)
    pixel_noise = uniform(0.0, 0.04)
    noise = torch.randn(n, 3, size, size, generator=generator)

    axis = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    dx, dy = x[None] - centre[:, 0, None, None], y[None] - centre[:, 1, None, None]
    cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    px = (cos * dx + sin * dy) / scale[:, None, None]
    py = (-sin * dx + cos * dy) / scale[:, None, None]

    distance = torch.empty(n, size, size)
    for label in range(NUM_CLASSES):
        rows = labels == label
        if rows.any():
            distance[rows] = shape_distance(label, px[rows], py[rows])
    pixel = (2.0 / size) / scale[:, None, None]  # one pixel in shape units
    alpha = (0.5 - distance / pixel).clamp(0, 1)[:, None]

    ramp = (x[None] * torch.cos(gradient_direction)[:, None, None] + y[None] * torch.sin(gradient_direction)[:, None, None])
    smooth = torch.nn.functional.interpolate(texture, size=(size, size), mode="bicubic", align_corners=False)
    shade = 1 + gradient_strength[:, None, None, None] * ramp[:, None] + texture_strength[:, None, None, None] * (smooth - 0.5) * 2
    image = background[:, :, None, None] * shade * (1 - alpha) + foreground[:, :, None, None] * alpha
    image = image + pixel_noise[:, None, None, None] * noise
    return image.clamp(0, 1)


def dataset(n: int, seed: int = 0, size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images with balanced labels (cycling 0..9 in a seeded random order), deterministic from ``seed``.

    Returns ``(images, labels)``: float32 (n, 3, size, size) in [0, 1] and int64 (n,).
    """
    if n < 0:
        raise ValueError(f"n = {n} must be >= 0")
    generator = torch.Generator().manual_seed(int(seed))
    labels = torch.arange(n) % NUM_CLASSES
    labels = labels[torch.randperm(n, generator=generator)]
    images = torch.empty(n, 3, size, size)
    for start in range(0, n, 4096):  # chunked to bound memory for large n
        images[start:start + 4096] = render(labels[start:start + 4096], generator, size)
    return images, labels
