"""The reference zoo: dataset, evaluator, trained models."""

from __future__ import annotations

import pytest
import torch

from dit_accel.pipelines import zoo
from dit_accel.pipelines.zoo.evaluator import frechet_distance
from dit_accel.pipelines.zoo.pipelines import WEIGHTS

HELD_OUT_SEED = 10**9 + 7  # training batches use seeds 0 .. 1_000_003 * steps; this one is never drawn


def test_dataset_is_deterministic_balanced_and_varied():
    images, labels = zoo.dataset(200, seed=3)
    again, labels_again = zoo.dataset(200, seed=3)
    other, _ = zoo.dataset(200, seed=4)
    assert images.shape == (200, 3, 32, 32) and images.dtype == torch.float32 and labels.dtype == torch.int64
    assert torch.equal(images, again) and torch.equal(labels, labels_again)
    assert not torch.equal(images, other)
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert torch.bincount(labels, minlength=10).tolist() == [20] * 10
    same_class = images[labels == 2]
    assert (same_class[0] - same_class[1]).abs().mean() > 0.05, "two samples of one class must differ"
    assert zoo.dataset(0)[0].shape == (0, 3, 32, 32)
    with pytest.raises(ValueError, match="n = -1"):
        zoo.dataset(-1)


def test_frechet_distance_matches_an_independent_computation():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(300, 6, generator=generator, dtype=torch.float64)
    b = torch.randn(300, 6, generator=generator, dtype=torch.float64) @ torch.randn(6, 6, generator=generator,
                                                                                      dtype=torch.float64) + 0.5
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    trace_sqrt = torch.linalg.eigvals(cov_a @ cov_b).real.clamp(min=0).sqrt().sum()  # tr sqrtm(AB)
    expected = (a.mean(0) - b.mean(0)).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * trace_sqrt
    assert frechet_distance(a, b) == pytest.approx(float(expected), rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    with pytest.raises(ValueError, match="at least 2 images"):
        frechet_distance(a[:1], b)


def test_weights_are_shipped_as_safetensors_only():
    for name in ("dit", "mmdit", "flowdit", "evaluator"):
        folder = WEIGHTS / name
        assert (folder / "model.safetensors").is_file(), f"{folder} has no model.safetensors"
        assert not [p for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    total = sum(p.stat().st_size for p in WEIGHTS.rglob("*.safetensors"))
    assert total <= 25 * 2**20, f"zoo weights take {total / 2**20:.1f} MiB (limit 25 MiB)"


@pytest.fixture(scope="module")
def evaluator():
    return zoo.evaluator()


def test_evaluator_accuracy_on_fresh_real_data(evaluator):
    images, labels = zoo.dataset(1000, seed=HELD_OUT_SEED)
    assert evaluator.class_consistency(images, labels) >= 0.98


def test_fd_is_zero_on_itself_and_grows_with_noise(evaluator):
    images, _ = zoo.dataset(300, seed=HELD_OUT_SEED + 1)
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(images.shape, generator=generator)
    assert evaluator.fd(images, images) == pytest.approx(0.0, abs=1e-6)
    distances = [evaluator.fd(images, (images + level * noise).clamp(0, 1)) for level in (0.02, 0.1, 0.3)]
    assert distances[0] < distances[1] < distances[2]
    with pytest.raises(ValueError, match="labels"):
        evaluator.class_consistency(images, [0, 1])
    with pytest.raises(ValueError, match=r"\(N, 3, 32, 32\)"):
        evaluator.fd(images[:, 0], images)


def test_weights_never_go_through_pickle(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("zoo weights must load through safetensors, not torch.load")

    monkeypatch.setattr(torch, "load", refuse)
    for name in zoo.MODELS:
        zoo.load(name)


@pytest.mark.parametrize("name", [n if n == "dit" else pytest.param(n, marks=pytest.mark.slow) for n in zoo.MODELS])
def test_models_generate_deterministically_and_on_class(name, evaluator):
    pipe = zoo.load(name)
    labels = [c for c in range(10) for _ in range(4)]

    def run(seed: int, classes: list[int], steps: int = 25) -> torch.Tensor:
        return pipe(class_labels=classes, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                    output_type="pt").images

    few = labels[::5]  # determinism on a few samples (a batch is deterministic whatever its size)
    first, again, other = run(0, few), run(0, few), run(1, few)
    assert first.shape == (8, 3, 32, 32) and torch.equal(first, again) and not torch.equal(first, other)
    # A floor well above chance (0.1), not the 0.90 goal: the CPU-trained models measure 0.62 / 0.47 at their default
    # steps (zoo.md); 25 steps keep the suite short.
    assert evaluator.class_consistency(run(0, labels), labels) >= 0.25


def test_bad_zoo_inputs():
    with pytest.raises(ValueError, match="unknown zoo model 'sd9'; allowed: dit, mmdit"):
        zoo.load("sd9")
    pipe = zoo.load("dit")
    with pytest.raises(ValueError, match=r"class_labels must be integers in \[0, 9\]"):
        pipe(class_labels=[10], num_inference_steps=2)
    with pytest.raises(ValueError, match="output_type 'latent' is not supported"):
        pipe(class_labels=[1], num_inference_steps=2, output_type="latent")


def test_the_evaluation_only_model_generates_and_is_never_tuned_on():
    """zoo:flowdit: a flow-matching DiT on a 16x16 grid, sampled by Euler steps with batched CFG; tune refuses it."""
    from dit_accel.bench.tune import tune
    from dit_accel.bench.tune_space import Target

    pipe = zoo.load("flowdit")
    assert "flowdit" in zoo.EVALUATION_ONLY and pipe.transformer.config.patch_size == 2
    images = pipe([1, 5], num_inference_steps=8, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all() and 0 <= images.min() <= images.max() <= 1
    assert (images[0] - images[1]).abs().mean() > 0.01
    with pytest.raises(ValueError, match="zoo:flowdit is the evaluation-only model: nothing is tuned on it"):
        tune(pipe, "zoo:flowdit", "dit", [], Target("psnr", ">=", 30), steps=4, num_samples=2, seed=0, batch=2,
             budget_minutes=1, output=None)
