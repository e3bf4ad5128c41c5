"""Train the zoo: ``python -m dit_accel.pipelines.zoo.train --preset dit|mmdit|evaluator``.

Every batch is freshly drawn from the procedural dataset (seeded by the step), so the models learn the
distribution rather than a fixed set. Training is resumable: a checkpoint (model, EMA, optimizer, step) is written
to ``--workdir`` every ``--save-every`` steps and picked up again by the next run; ``--export`` writes the EMA
weights as fp16 safetensors plus their config into the package (``pipelines/zoo/weights/<preset>/``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from dit_accel.pipelines.zoo import models
from dit_accel.pipelines.zoo.evaluator import ShapeClassifier
from dit_accel.pipelines.zoo.shapes import NUM_CLASSES, dataset

WEIGHTS = Path(__file__).parent / "weights"
PRESETS = {
    "dit": dict(lr=5e-4, batch=64, warmup=300, ema=0.999),
    "mmdit": dict(lr=5e-4, batch=64, warmup=300, ema=0.999),
    "evaluator": dict(lr=2e-3, batch=128, warmup=100, ema=0.0),
    # Evaluation-only (never used to choose defaults): flow matching on a DiT, 16x16 tokens.
    "flowdit": dict(lr=6e-4, batch=32, warmup=300, ema=0.999),
}


def build(preset: str, arch: dict | None = None) -> dict[str, torch.nn.Module]:
    """The networks of ``preset``; ``arch`` overrides the transformer's architecture (``patch``, ``num_layers``,
    ``width``, ``heads``; mmdit also ``num_single_layers``), e.g. a 16x16 token grid with ``patch=2``."""
    torch.manual_seed(0)
    arch = arch or {}
    if preset == "dit":
        return {"transformer": models.dit_transformer(**arch)}
    if preset == "mmdit":
        return {"transformer": models.mmdit_transformer(**arch), "conditioner": models.ClassConditioner()}
    if preset == "flowdit":
        return {"transformer": models.flowdit_transformer(**arch)}
    if preset == "evaluator":
        return {"classifier": ShapeClassifier()}
    raise ValueError(f"unknown preset {preset!r}; allowed: {', '.join(PRESETS)}")


def batch_for(step: int, seed: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return dataset(size, seed=seed * 1_000_003 + step)


def logit_normal(n: int, generator: torch.Generator) -> torch.Tensor:
    """Noise levels in (0, 1) concentrated on the middle, where the learning signal is."""
    return torch.sigmoid(torch.randn(n, generator=generator))


class DiTObjective:
    """DDPM family: v-prediction, discrete timesteps drawn logit-normal; the transformer drops labels itself
    (10 %, to the null class) while training, which is what classifier-free guidance needs."""

    def __init__(self) -> None:
        self.scheduler = models.ddpm_train_scheduler()

    def loss(self, nets, images, labels, generator):
        x0 = images * 2 - 1
        t = (logit_normal(len(x0), generator) * 1000).long().clamp(0, 999)
        noise = torch.randn(x0.shape, generator=generator)
        noisy = self.scheduler.add_noise(x0, noise, t)
        target = self.scheduler.get_velocity(x0, noise, t)
        pred = nets["transformer"](noisy, timestep=t, class_labels=labels).sample
        return torch.nn.functional.mse_loss(pred, target)


class FlowObjective:
    """Rectified flow: x_s = (1 - s) x0 + s noise, predict noise - x0; labels dropped to the empty class 10 %."""

    def __init__(self, patch: int = models.PATCH) -> None:
        self.patch = patch
        self.img_ids = models.image_ids(patch=patch)
        self.txt_ids = None

    def loss(self, nets, images, labels, generator):
        x0 = models.pack(images * 2 - 1, self.patch)
        drop = torch.rand(len(labels), generator=generator) < 0.1
        labels = torch.where(drop, torch.full_like(labels, NUM_CLASSES), labels)
        sigma = logit_normal(len(x0), generator)
        noise = torch.randn(x0.shape, generator=generator)
        noisy = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
        tokens, pooled = nets["conditioner"](labels)
        if self.txt_ids is None:
            self.txt_ids = models.text_ids(tokens.shape[1])
        pred = nets["transformer"](hidden_states=noisy, encoder_hidden_states=tokens, pooled_projections=pooled,
                                   timestep=sigma, img_ids=self.img_ids, txt_ids=self.txt_ids).sample
        return torch.nn.functional.mse_loss(pred, noise - x0)


class FlowDiTObjective:
    """Rectified flow on a DiT (zoo:flowdit): x_s = (1 - s) x0 + s noise, predict noise - x0, the timestep input is
    1000 s (DiT's embedding scale); the transformer drops labels to the null class itself (10 %)."""

    def loss(self, nets, images, labels, generator):
        x0 = images * 2 - 1
        sigma = logit_normal(len(x0), generator)
        noise = torch.randn(x0.shape, generator=generator)
        noisy = (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * noise
        pred = nets["transformer"](noisy, timestep=sigma * 1000, class_labels=labels).sample
        return torch.nn.functional.mse_loss(pred, noise - x0)


class ClassifierObjective:
    def loss(self, nets, images, labels, generator):
        return torch.nn.functional.cross_entropy(nets["classifier"](images), labels, label_smoothing=0.05)


OBJECTIVES = {"dit": DiTObjective, "mmdit": FlowObjective, "flowdit": FlowDiTObjective, "evaluator": ClassifierObjective}


@torch.no_grad()
def classifier_accuracy(model: ShapeClassifier, n: int = 2000, seed: int = 987_654) -> float:
    model.eval()
    images, labels = dataset(n, seed=seed)
    accuracy = float((model(images).argmax(-1) == labels).float().mean())
    model.train()
    return accuracy


def learning_rate(settings: dict, step: int, total: int, anneal: int, warmup_from: int = 0) -> float:
    """Linear warm-up (from step ``warmup_from``: a run continued from shipped weights warms its fresh optimizer
    up again), constant, then (if ``anneal``) a cosine decay to 10 % over the last ``anneal`` steps: a noisy
    constant-rate optimum sharpens markedly once the rate comes down."""
    lr = settings["lr"] * min(1.0, (step - warmup_from + 1) / settings["warmup"])
    start = total - anneal
    if anneal and step >= start:
        progress = min(1.0, (step - start) / anneal)
        lr *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return lr


def precision_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The forward pass's numerics: ``fp32``, or ``bf16`` autocast (weights, optimizer and EMA stay fp32).

    On the CPU, bf16 runs the attention through SDPA's math backend: the CPU flash kernel's bf16 backward is
    several times slower than its fp32 one (profiled on the zoo:dit shapes, 2-core x86-64 with AMX), while the math
    backend's bf16 matmuls are the fast part of the step; ``benchmarks/train_step_cpu.py`` times the result."""
    if precision == "fp32":
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast(device.type, dtype=torch.bfloat16))
    if device.type == "cpu":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
    return stack


def load_shipped(preset: str, nets: dict[str, torch.nn.Module]) -> dict:
    """Load the weights shipped in the package into ``nets`` (to continue training them); returns their
    ``training.json``."""
    from safetensors.torch import load_file

    folder = WEIGHTS / preset
    info_file = folder / "training.json"
    if not info_file.is_file():
        raise SystemExit(f"--from-shipped: no shipped {preset} weights in {folder}")
    for name, net in nets.items():
        file = folder / ("model.safetensors" if name in ("transformer", "classifier") else f"{name}.safetensors")
        state = {k: v.float() for k, v in load_file(str(file)).items()}
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise SystemExit(f"--from-shipped: the shipped {preset} {name} does not match this architecture "
                             f"(pass the options it was trained with): {error}") from None
    return json.loads(info_file.read_text())


def export(preset: str, nets: dict[str, torch.nn.Module], info: dict) -> Path:
    folder = WEIGHTS / preset
    folder.mkdir(parents=True, exist_ok=True)
    for name, net in nets.items():
        state = {k: v.detach().to(torch.float16 if v.is_floating_point() else v.dtype).contiguous()
                 for k, v in net.state_dict().items()}
        file = "model.safetensors" if name in ("transformer", "classifier") else f"{name}.safetensors"
        save_file(state, str(folder / file))
        if hasattr(net, "config"):
            (folder / ("config.json" if file == "model.safetensors" else f"{name}_config.json")).write_text(
                json.dumps(dict(net.config), indent=2, default=str))
    if preset == "evaluator":
        (folder / "config.json").write_text(json.dumps({"num_classes": NUM_CLASSES, "width": 32}))
    (folder / "training.json").write_text(json.dumps(info, indent=2))
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--steps", type=int, default=20_000, help="total steps to reach (resumes count)")
    parser.add_argument("--minutes", type=float, default=math.inf, help="stop after this wall time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", type=Path, default=Path("zoo-training"))
    parser.add_argument("--save-every", type=int, default=250)
    parser.add_argument("--anneal", type=int, default=0,
                        help="cosine-decay the learning rate to 10%% over the last N steps before --steps")
    parser.add_argument("--export", action="store_true", help="write the EMA weights into the package at the end")
    parser.add_argument("--batch", type=int, default=None, help="override the preset's batch size")
    parser.add_argument("--patch", type=int, default=None, help="pixel patch side (4: 8x8 tokens, 2: 16x16)")
    parser.add_argument("--layers", type=int, default=None, help="transformer blocks (mmdit: dual-stream ones)")
    parser.add_argument("--single-layers", type=int, default=None, help="mmdit: single-stream blocks")
    parser.add_argument("--width", type=int, default=None, help="model width (heads x head dim)")
    parser.add_argument("--heads", type=int, default=None, help="attention heads")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="bf16: autocast forward (about 1.3x faster per step on an AMX CPU; the GPU default)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the transformer (helps mmdit)")
    parser.add_argument("--from-shipped", action="store_true",
                        help="start a new run from the weights shipped in the package (EMA weights as both the "
                             "model and its EMA, a fresh optimizer warmed up again), counting on from their steps")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = dict(PRESETS[args.preset])
    if args.batch:
        settings["batch"] = args.batch
    device = torch.device(args.device)
    names = {"patch": "patch", "layers": "num_layers", "single_layers": "num_single_layers", "width": "width",
             "heads": "heads"}
    arch = {field: getattr(args, option) for option, field in names.items() if getattr(args, option) is not None}
    if arch and args.preset == "evaluator":
        parser.error("--patch/--layers/--single-layers/--width/--heads apply to the dit and mmdit presets")
    if "num_single_layers" in arch and args.preset != "mmdit":
        parser.error("--single-layers applies to the mmdit preset only")

    nets = build(args.preset, arch)
    ema = {name: copy.deepcopy(net).eval().requires_grad_(False) for name, net in nets.items()}
    params = [p for net in nets.values() for p in net.parameters()]
    optimizer = torch.optim.AdamW(params, lr=settings["lr"], weight_decay=0.0, betas=(0.9, 0.99))
    workdir = args.workdir / args.preset
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint = workdir / "checkpoint.pt"
    step, elapsed, losses, warmup_from, history, commands = 0, 0.0, [], 0, [], []
    if checkpoint.is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if state.get("arch", {}) != arch:
            raise SystemExit(f"{checkpoint} holds a model with architecture overrides {state.get('arch', {})}, not "
                             f"{arch}: pass the same options, or another --workdir")
        for name in nets:
            nets[name].load_state_dict(state["nets"][name])
            ema[name].load_state_dict(state["ema"][name])
        optimizer.load_state_dict(state["optimizer"])
        step, elapsed, losses = state["step"], state["elapsed"], state["losses"]
        warmup_from, history = state.get("warmup_from", 0), state.get("history", [])
        commands = state.get("commands", [])
        print(f"resumed {args.preset} at step {step} ({elapsed / 60:.1f} min so far)", flush=True)
    elif args.from_shipped:
        shipped = load_shipped(args.preset, nets)
        for name in nets:
            ema[name].load_state_dict(nets[name].state_dict())
        step = warmup_from = shipped["steps"]
        elapsed = shipped["wall_minutes"] * 60
        history = shipped.get("history", []) + [{k: shipped.get(k) for k in
                                                 ("steps", "wall_minutes", "device", "lr_schedule", "commands")}]
        commands = list(shipped.get("commands", []))
        print(f"continuing the shipped {args.preset} weights from step {step}", flush=True)
    for net in list(nets.values()) + list(ema.values()):
        net.to(device)
    for net in nets.values():
        net.train()
    commands.append(" ".join(["python -m dit_accel.pipelines.zoo.train", *(sys.argv[1:] if argv is None else argv)]))
    forward_nets = dict(nets)
    if args.compile:
        forward_nets["transformer"] = torch.compile(nets["transformer"])
    objective = (FlowObjective(models.patch_of(nets["transformer"])) if args.preset == "mmdit"
                 else OBJECTIVES[args.preset]())
    if hasattr(objective, "img_ids"):
        objective.img_ids = objective.img_ids.to(device)

    def save() -> None:
        torch.save({"nets": {k: v.state_dict() for k, v in nets.items()},
                    "ema": {k: v.state_dict() for k, v in ema.items()},
                    "optimizer": optimizer.state_dict(), "step": step, "elapsed": elapsed, "losses": losses,
                    "arch": arch, "warmup_from": warmup_from, "history": history, "commands": commands},
                   checkpoint)

    start = time.time()
    window: list[float] = []
    window_start = time.time()
    while step < args.steps and (time.time() - start) / 60 < args.minutes:
        generator = torch.Generator().manual_seed(args.seed * 7919 + step)
        images, labels = batch_for(step, args.seed, settings["batch"])
        images, labels = images.to(device), labels.to(device)
        lr = learning_rate(settings, step, args.steps, args.anneal, warmup_from)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with precision_context(args.precision, device):
            loss = objective.loss(forward_nets, images, labels, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        decay = min(settings["ema"], (1 + step) / (10 + step))
        with torch.no_grad():
            for name, net in nets.items():
                for p_ema, p in zip(ema[name].parameters(), net.parameters()):
                    p_ema.lerp_(p, 1 - decay)
                for b_ema, b in zip(ema[name].buffers(), net.buffers()):
                    b_ema.copy_(b)
        step += 1
        window.append(loss.item())
        if step % 50 == 0:
            losses.append((step, sum(window) / len(window)))
            rate = len(window) / max(time.time() - window_start, 1e-9)  # of these steps, not since step 0
            print(f"{args.preset} step {step} loss {losses[-1][1]:.4f} lr {lr:.2e} "
                  f"({(elapsed + time.time() - start) / 60:.1f} min, {rate:.2f} steps/s)", flush=True)
            window, window_start = [], time.time()
        if step % args.save_every == 0:
            elapsed_now = elapsed + time.time() - start
            elapsed, start = elapsed_now, time.time()
            save()
    elapsed += time.time() - start
    start = time.time()
    save()
    info = {"preset": args.preset, "steps": step, "wall_minutes": round(elapsed / 60, 1), "device": str(device),
            "threads": torch.get_num_threads(), "final_loss": losses[-1][1] if losses else None,
            "batch": settings["batch"], "lr": settings["lr"], "ema": settings["ema"], "seed": args.seed,
            "arch": arch, "precision": args.precision, "history": history, "commands": commands,
            "lr_schedule": (f"continued from step {warmup_from}: " if warmup_from else "")
                           + f"warm-up {settings['warmup']}, constant"
                           + (f", cosine to 10% over steps {args.steps - args.anneal}-{args.steps}" if args.anneal else ""),
            "final_lr": learning_rate(settings, max(step - 1, 0), args.steps, args.anneal, warmup_from)}
    if args.preset == "evaluator":
        info["accuracy_fresh_2000"] = classifier_accuracy(ema["classifier"].to("cpu"))
    print(json.dumps(info), flush=True)
    if args.export:
        print(f"exported to {export(args.preset, {k: v.to('cpu') for k, v in ema.items()}, info)}", flush=True)


if __name__ == "__main__":
    main()
