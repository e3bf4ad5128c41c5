"""FID and CLIP score in `ditaccel bench`, through torchmetrics with injected models (a TorchScript feature
extractor, a tiny local CLIP built here): real numbers when the weights are given, never a fake one."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchmetrics")

from dit_accel.bench.quality import Quality, _clip, _fid  # noqa: E402


class PooledFeatures(torch.nn.Module):
    """A fixed random feature extractor for any image size: (N, 3, H, W) in [0, 1] -> (N, 8)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(torch.tanh(self.conv(images.float())), 1).flatten(1)


@pytest.fixture(scope="module")
def feature_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fid") / "features.pt"
    torch.jit.script(PooledFeatures().eval()).save(str(path))
    return path


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    """A random-init CLIP in transformers' format, with a character-level BPE vocabulary."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    out = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in "abcdefghijklmnopqrstuvwxyz":
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    CLIPModel(config).eval().save_pretrained(out)
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), pad_token="<|endoftext|>")
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    processor.save_pretrained(out)
    return out


def test_fid_with_an_injected_extractor_is_zero_on_identical_sets_and_grows_with_noise(feature_file: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(24, 3, 16, 16, generator=generator)
    notes: list[str] = []
    same = _fid(feature_file, images, images.clone(), notes)
    assert same is not None and abs(same) < 1e-3, notes
    noisy = (images + 0.3 * torch.randn(images.shape, generator=generator)).clamp(0, 1)
    assert _fid(feature_file, noisy, images, notes) > 10 * max(abs(same), 1e-6)
    assert not any("skipped" in n for n in notes) and any("far too few" in n for n in notes)


def test_clip_score_with_a_local_model_directory(tiny_clip: Path) -> None:
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    notes: list[str] = []
    score = _clip(tiny_clip, images, ["a red circle", "a blue square", "stripes"], notes)
    assert score is not None and torch.isfinite(torch.tensor(score)), notes
    # The same images and prompts give the same score; other prompts another one.
    assert _clip(tiny_clip, images, ["a red circle", "a blue square", "stripes"], []) == score
    assert _clip(tiny_clip, images, ["zzz", "qqq", "xxx"], []) != score


def test_a_missing_clip_model_is_a_note(tmp_path: Path) -> None:
    notes: list[str] = []
    assert _clip(tmp_path / "nothing-here", torch.rand(1, 3, 32, 32), ["x"], notes) is None
    assert notes and notes[0].startswith("CLIP score skipped")


def test_bench_rows_carry_fid_and_clip_score(tmp_path: Path, feature_file: Path, tiny_clip: Path) -> None:
    from dit_accel.bench.harness import BenchConfig, run_bench

    rows = run_bench(BenchConfig(model="tiny:flux", recipes=["none", "fora@interval=2"], steps=4, num_samples=2,
                                 batch=2, repeats=1, out_dir=tmp_path / "out", fid_weights=feature_file,
                                 clip_model=tiny_clip), progress=False)
    dense, none, fora = rows
    assert "fid" not in dense and isinstance(dense["clip_score"], float)  # FID is against the dense run itself
    assert none["fid"] == pytest.approx(0.0, abs=1e-3) and none["clip_score"] == pytest.approx(dense["clip_score"])
    assert isinstance(fora["fid"], float) and isinstance(fora["clip_score"], float)
    assert "torchvision" not in sys.modules
    assert (tmp_path / "out" / "results.md").read_text().count("| FID |") == 1


def test_quality_measures_clip_only_with_prompts(tiny_clip: Path) -> None:
    notes: list[str] = []
    result = Quality("tiny:dit", 2, clip_model=tiny_clip).measure(torch.rand(2, 3, 32, 32), None, {"labels": [0, 1]},
                                                                   notes)
    assert "clip_score" not in result and any("no prompt" in n for n in notes)


def test_fid_weights_from_the_hub_offline_is_a_note() -> None:
    from dit_accel.bench.quality import _hub_file

    assert _hub_file("owner/repo:inception/features.pt") == ("owner/repo", "inception/features.pt")
    assert _hub_file("./local.pt") is None and _hub_file("owner/repo") is None and _hub_file("a/b/c:d") is None
    notes: list[str] = []
    images = torch.rand(4, 3, 16, 16)
    assert _fid("someone/extractors:inception.pt", images, images, notes) is None
    assert notes and notes[0].startswith("FID skipped: cannot fetch 'inception.pt'") and "offline?" in notes[0]
