"""The zoo's training script: resumable runs, architecture overrides (a 16x16 token grid for GPU-trained models)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dit_accel.pipelines.zoo import models, train

TINY = ["--batch", "4", "--patch", "2", "--layers", "1", "--width", "64", "--heads", "1"]


@pytest.mark.parametrize("preset", ["dit", "mmdit"])
def test_a_16x16_grid_model_trains_resumes_and_refuses_another_architecture(preset: str, tmp_path: Path) -> None:
    extra = ["--single-layers", "1"] if preset == "mmdit" else []
    train.main(["--preset", preset, "--steps", "2", "--workdir", str(tmp_path), "--save-every", "1", *TINY, *extra])
    state = torch.load(tmp_path / preset / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2 and state["arch"]["patch"] == 2
    net = train.build(preset, state["arch"])["transformer"]
    net.load_state_dict(state["ema"]["transformer"])
    assert models.patch_of(net) == 2
    train.main(["--preset", preset, "--steps", "3", "--workdir", str(tmp_path), *TINY, *extra])  # resumes
    assert torch.load(tmp_path / preset / "checkpoint.pt", weights_only=True)["step"] == 3
    with pytest.raises(SystemExit, match="architecture"):
        train.main(["--preset", preset, "--steps", "4", "--workdir", str(tmp_path), "--batch", "4"])


def test_pipelines_sample_at_any_patch() -> None:
    from dit_accel.pipelines.zoo.pipelines import ZooMMDiTPipeline

    images = torch.rand(2, 3, 32, 32)
    for patch in (1, 2, 4, 8):
        assert models.pack(images, patch).shape == (2, (32 // patch) ** 2, 3 * patch * patch)
        assert torch.equal(models.unpack(models.pack(images, patch), patch), images)
    transformer = models.mmdit_transformer(num_layers=1, num_single_layers=1, width=64, heads=1, patch=2).eval()
    pipe = ZooMMDiTPipeline(transformer=transformer, conditioner=models.ClassConditioner().eval(),
                            scheduler=models.flow_scheduler())
    pipe.set_progress_bar_config(disable=True)
    out = pipe(class_labels=[1, 2], num_inference_steps=2, output_type="pt",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()


def test_architecture_options_are_checked() -> None:
    with pytest.raises(SystemExit):
        train.main(["--preset", "evaluator", "--patch", "2", "--steps", "0"])
    with pytest.raises(SystemExit):
        train.main(["--preset", "dit", "--single-layers", "2", "--steps", "0"])


@pytest.mark.parametrize("preset", ["dit", "mmdit"])
def test_a_run_continues_the_shipped_weights_in_bf16(preset: str, tmp_path: Path) -> None:
    """--from-shipped starts from the packaged weights and counts on from their steps; the optimizer warms up
    again; the run's command lines are kept for the model card; bf16 autocast trains (fp32 weights)."""
    from safetensors.torch import load_file

    from dit_accel.pipelines.zoo.train import WEIGHTS

    shipped = __import__("json").loads((WEIGHTS / preset / "training.json").read_text())
    args = ["--preset", preset, "--from-shipped", "--steps", str(shipped["steps"] + 1), "--batch", "2",
            "--precision", "bf16", "--workdir", str(tmp_path)]
    train.main(args)
    state = torch.load(tmp_path / preset / "checkpoint.pt", weights_only=True)
    assert state["step"] == shipped["steps"] + 1 and state["warmup_from"] == shipped["steps"]
    assert state["commands"][:len(shipped["commands"])] == shipped["commands"]
    assert state["commands"][-1] == "python -m dit_accel.pipelines.zoo.train " + " ".join(args)
    assert state["history"][-1]["steps"] == shipped["steps"]
    weights = {k: v.float() for k, v in load_file(str(WEIGHTS / preset / "model.safetensors")).items()}
    trained = state["nets"]["transformer"]
    assert all(v.dtype == torch.float32 for v in trained.values())
    moved = max(float((trained[k] - weights[k]).abs().max()) for k in weights)
    assert 0 < moved < 1e-2  # one step at the first warm-up rate (lr / 300): a small move from the shipped weights
    assert train.learning_rate({"lr": 1.0, "warmup": 300}, shipped["steps"], 10**6, 0, shipped["steps"]) == 1 / 300


def test_from_shipped_refuses_another_architecture(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="does not match this architecture"):
        train.main(["--preset", "dit", "--from-shipped", "--steps", "1", "--width", "64", "--heads", "1",
                    "--workdir", str(tmp_path)])
