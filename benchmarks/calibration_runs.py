"""Shared by the benchmarks that choose magcache's settings on calibration seeds: a zoo pipeline that counts its
computed steps, and generations on a seed's labels ``(seed + i) % 10``."""

from __future__ import annotations

import argparse
import json
import platform
import warnings
from pathlib import Path
from typing import Callable

import torch

from dit_accel.bench.metrics import psnr
from dit_accel.pipelines import zoo


class CountingPipeline:
    """``zoo.load(model)`` with a hook counting calls of one attention module (one per computed transformer call)."""

    def __init__(self, model: str, steps: int) -> None:
        self.pipe = zoo.load(model)
        self.steps = steps
        self.calls = 0
        self.branches = 2 if model == "mmdit" else 1  # zoo:mmdit runs CFG as two calls
        block = self.pipe.transformer.transformer_blocks[1]
        (block.attn1 if hasattr(block, "attn1") else block.attn).register_forward_hook(self._count)

    def _count(self, *_) -> None:
        self.calls += 1

    def generate(self, seed: int, count: int) -> torch.Tensor:
        return self.pipe(class_labels=[(seed + i) % 10 for i in range(count)], num_inference_steps=self.steps,
                         generator=torch.Generator().manual_seed(seed), output_type="pt").images

    def computed_steps(self, generations: int) -> float:
        """Computed steps per generation and CFG branch since the count was last reset (``calls = 0``)."""
        return self.calls / generations / self.branches


def level_choice_setup(doc: str, seeds: tuple[int, ...], images: int, steps: int, **meta) -> tuple:
    """What the level-choosing scripts share: their arguments (``--models``, default the two zoo models the levels
    are chosen on; ``-o``), the results skeleton with its meta, and the labels of every image in seed order."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=["dit", "mmdit"])
    parser.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    results = {"meta": {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, CPU",
                        "torch": torch.__version__, "seeds": list(seeds), "images_per_seed": images,
                        "steps": steps, **meta}, "dense": {}, "rows": {}}
    labels = [(seed + i) % 10 for seed in seeds for i in range(images)]
    return args, results, labels


def quality_of(images: torch.Tensor, dense: torch.Tensor, evaluator, labels: list[int]) -> dict[str, float]:
    """PSNR against dense pooled over every image (one MSE), the worst single image's, and class consistency."""
    each = [psnr(images[i:i + 1], dense[i:i + 1]) for i in range(len(images))]
    return {"psnr": psnr(images, dense), "worst_image_psnr": min(each),
            "class_consistency": evaluator.class_consistency(images, labels)}


def save_results(results: dict, out: Path, name: str, write_markdown: Callable[[dict, Path], None]) -> None:
    """``out/<name>.json`` and its table ``out/<name>.md``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(results, indent=2))
    write_markdown(results, out / f"{name}.md")
