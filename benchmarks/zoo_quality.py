"""Quality of the reference zoo: class consistency and fd of each model against real data, with floor and ceiling.

For each model, ``--samples`` images (balanced over the 10 classes) at the pipeline's default steps and guidance,
seeds fixed. fd is reported beside the fd between two independent real sets of the same size (the floor) and the
fd of noise images (the ceiling). Also writes a sample grid per model (one row per class) and a small guidance
sweep, and appends the measured quality to each model card.

    python benchmarks/zoo_quality.py --samples 500 -o benchmarks/results
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import time
from pathlib import Path

import torch
from PIL import Image

from dit_accel.pipelines import zoo
from dit_accel.pipelines.zoo.pipelines import WEIGHTS

REAL_SEED_A, REAL_SEED_B, NOISE_SEED = 2_000_000_011, 2_000_000_033, 2_000_000_077


def generate(pipe, labels: list[int], seed: int, batch: int = 250, **kwargs) -> torch.Tensor:
    chunks = []
    for start in range(0, len(labels), batch):
        generator = torch.Generator().manual_seed(seed + start)
        chunks.append(pipe(class_labels=labels[start:start + batch], generator=generator, output_type="pt",
                           **kwargs).images)
    return torch.cat(chunks)


def save_grid(images: torch.Tensor, path: Path, scale: int = 3) -> None:
    """``images`` ordered class-major (10 rows)."""
    rows = images.reshape(10, -1, 3, 32, 32)
    grid = torch.cat([torch.cat(list(row), dim=-1) for row in rows], dim=-2)
    array = (grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(array).resize((array.shape[1] * scale, array.shape[0] * scale), Image.NEAREST).save(path)


def defaults(pipe) -> dict:
    params = inspect.signature(pipe.__call__).parameters
    return {k: params[k].default for k in ("num_inference_steps", "guidance_scale")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--sweep-samples", type=int, default=200)
    parser.add_argument("--guidance", type=float, nargs="*", default=[1.0, 2.0, 3.0, 4.5, 6.0])
    parser.add_argument("-o", "--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--no-cards", action="store_true", help="do not append the results to the model cards")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    evaluator = zoo.evaluator()
    n = args.samples - args.samples % 10
    labels = [i % 10 for i in range(n)]

    real_a, real_labels = zoo.dataset(n, seed=REAL_SEED_A)
    real_b, _ = zoo.dataset(n, seed=REAL_SEED_B)
    noise = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(NOISE_SEED))
    reference = {
        "real_accuracy": evaluator.class_consistency(real_a, real_labels),
        "fd_floor_real_vs_real": evaluator.fd(real_a, real_b),
        "fd_ceiling_noise_vs_real": evaluator.fd(noise, real_a),
    }
    results = {"meta": {"samples": n, "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, CPU",
                        "torch": torch.__version__}, "reference": reference, "models": {}}
    for name in zoo.MODELS:
        pipe = zoo.load(name)
        setting = defaults(pipe)
        start = time.perf_counter()
        images = generate(pipe, labels, seed=0)
        seconds = time.perf_counter() - start
        row = {
            **setting,
            "class_consistency": evaluator.class_consistency(images, labels),
            "fd_to_real": evaluator.fd(images, real_a),
            "seconds_per_image": seconds / n,
        }
        sweep = {}
        m = args.sweep_samples - args.sweep_samples % 10
        for guidance in args.guidance:
            sweep_images = generate(pipe, labels[:m], seed=10_000, guidance_scale=guidance)
            sweep[str(guidance)] = {"class_consistency": evaluator.class_consistency(sweep_images, labels[:m]),
                                    "fd_to_real": evaluator.fd(sweep_images, real_a[:m])}
        row["guidance_sweep"] = sweep
        results["models"][name] = row
        order = sorted(range(n), key=lambda i: labels[i])[: 10 * (n // 10)]
        per_class = torch.stack([images[[i for i in order if labels[i] == c][:10]] for c in range(10)])
        save_grid(per_class.reshape(-1, 3, 32, 32), args.out / f"zoo-{name}.png")
        print(name, json.dumps(row), flush=True)

    (args.out / "zoo.json").write_text(json.dumps(results, indent=2))
    lines = [
        "# Reference zoo quality",
        "",
        f"`python benchmarks/zoo_quality.py --samples {n}`; {results['meta']['machine']}, torch {results['meta']['torch']}. "
        f"{n} samples per model, balanced over the 10 classes, at the pipeline's default steps and guidance; fd is "
        "the Fréchet distance of the evaluator's 128-d penultimate features against "
        f"{n} real images (offline analogue of FID), class consistency the fraction classified as their label "
        "(offline analogue of CLIP score).",
        "",
        f"Evaluator accuracy on {n} fresh real images: {reference['real_accuracy']:.3f}. "
        f"fd floor (two independent real sets of {n}): {reference['fd_floor_real_vs_real']:.3f}; "
        f"ceiling (uniform noise images vs real): {reference['fd_ceiling_noise_vs_real']:.1f}.",
        "",
        "| model | steps | guidance | class consistency | fd to real | floor | ceiling | s / image |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in results["models"].items():
        lines.append(
            f"| zoo:{name} | {row['num_inference_steps']} | {row['guidance_scale']} | {row['class_consistency']:.3f} "
            f"| {row['fd_to_real']:.3f} | {reference['fd_floor_real_vs_real']:.3f} "
            f"| {reference['fd_ceiling_noise_vs_real']:.1f} | {row['seconds_per_image']:.4f} |"
        )
    lines += ["", f"Guidance sweep ({args.sweep_samples} samples, other seeds): class consistency / fd to real.", "",
              "| model | " + " | ".join(f"g={g}" for g in args.guidance) + " |",
              "|---|" + "---|" * len(args.guidance)]
    for name, row in results["models"].items():
        cells = [f"{v['class_consistency']:.3f} / {v['fd_to_real']:.2f}" for v in row["guidance_sweep"].values()]
        lines.append(f"| zoo:{name} | " + " | ".join(cells) + " |")
    lines += ["", "Samples (one row per class):", ""] + [f"![zoo:{m}](zoo-{m}.png)" for m in results["models"]]
    (args.out / "zoo.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not args.no_cards:
        for name, row in results["models"].items():
            write_card(name, row, reference, n)


def write_card(name: str, row: dict, reference: dict, n: int) -> None:
    folder = WEIGHTS / name
    info = json.loads((folder / "training.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    card = [
        f"# zoo:{name}",
        "",
        f"- architecture: `{'DiTTransformer2DModel' if name == 'dit' else 'FluxTransformer2DModel'}` in pixel space "
        f"(32x32, 4x4 patches: an 8x8 token grid), {config.get('num_layers')} "
        f"{'blocks' if name == 'dit' else 'dual-stream + ' + str(config.get('num_single_layers')) + ' single-stream blocks'}, "
        f"width {config.get('num_attention_heads', 0) * config.get('attention_head_dim', 0)}; config in `config.json`",
        f"- training: {info['steps']} steps, batch {info['batch']}, AdamW lr {info['lr']} "
        f"({info.get('lr_schedule', 'warm-up, constant')}), EMA {info['ema']}, seed {info['seed']}, on {info['device']} "
        f"with {info['threads']} thread(s), {info.get('precision', 'fp32')}, {info['wall_minutes']} min wall in all"
        + "".join(f"; continues a run of {h['steps']} steps ({h['device']}, {h['wall_minutes']} min, "
                  f"{h['lr_schedule']})" for h in info.get("history", [])),
        f"- final training loss (mean of the last 50 steps): {info['final_loss']:.4f}",
        f"- objective: {'DDPM v-prediction (cosine, zero terminal SNR), DDIM sampling' if name == 'dit' else 'rectified flow, Euler sampling'}",
        f"- measured ({n} samples, {row['num_inference_steps']} steps, guidance {row['guidance_scale']}): "
        f"class consistency {row['class_consistency']:.3f}, fd to real {row['fd_to_real']:.3f} "
        f"(floor {reference['fd_floor_real_vs_real']:.3f}, noise ceiling {reference['fd_ceiling_noise_vs_real']:.1f})",
        "- reproduce (resumable; the runs below continue one checkpoint): "
        + "; ".join(f"`{c}`" for c in info.get("commands", [
            f"python -m dit_accel.pipelines.zoo.train --preset {name} --steps {info['steps']} --threads 1 --export"]))
        + ", then `python benchmarks/zoo_quality.py`",
        "- status: " + ("meets the 0.90 class-consistency goal" if row["class_consistency"] >= 0.9 else
                        "below the 0.90 class-consistency goal; trained on a 2-core CPU within the sessions' budget. "
                        "A larger model on a 16x16 grid, trained on a GPU, is the planned replacement."),
    ]
    (folder / "MODEL_CARD.md").write_text("\n".join(card) + "\n")


if __name__ == "__main__":
    main()
