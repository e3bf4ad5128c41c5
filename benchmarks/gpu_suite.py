"""Everything a GPU lease measures, in one run that writes every result into one folder.

1. ``benchmarks/kernels_gpu.py``: INT8 and block-sparse attention against SDPA (flash) and SageAttention where
   installed, 4096-32768 tokens, head_dim 64/128, bf16, accuracy against FP32 in the same run;
2. ``benchmarks/models_gpu.py``: FLUX.1-dev- and Wan-2.1-14B-sized transformers, dense against the computed and
   skipped steps of every caching recipe and against every attention recipe, with each cache's memory;
3. ``benchmarks/profile_gpu.py``: where the time goes: int8 attention in stages and launch settings, one call of
   each recipe on both models with its host time and top kernels.

Each part runs in its own process with its own time limit (a CUDA fault in one cannot lose the other's results);
``suite.json`` records what ran, its exit status and seconds, and the environment.

    python benchmarks/gpu_suite.py -o "$OUT"                                   # a GPU: at most 8 minutes
    TRITON_INTERPRET=1 python benchmarks/gpu_suite.py --smoke -o /tmp/suite    # CPU: tiny shapes, every code path
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parts(smoke: bool, minutes: float) -> list[tuple[str, list[str], float]]:
    """(name, argv, time limit in seconds); every part also stops at the suite's deadline (``minutes``)."""
    if smoke:
        return [("kernels", ["--device", "cpu", "--seqs", "128", "--dims", "64", "--width", "128"], 300),
                ("models", ["--device", "cpu", "--steps", "8", "--models", "flux,wan"], 600),
                ("profile", ["--device", "cpu", "--models", "flux"], 600)]
    return [("kernels", [], min(90, minutes * 60 * 0.2)),
            ("models", ["--steps", "8", "--models", "flux,wan"], minutes * 60 * 0.5),
            ("profile", [], minutes * 60 * 0.35)]


def environment() -> dict:
    info = {"python": platform.python_version(), "machine": platform.machine()}
    for package in ("torch", "triton", "diffusers", "sageattention"):
        try:
            from importlib.metadata import version

            info[package] = version(package)
        except Exception:
            info[package] = None
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        info["nvidia-smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.SubprocessError) as error:
        info["nvidia-smi"] = f"unavailable: {error}"
    return info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-o", "--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, under TRITON_INTERPRET=1")
    parser.add_argument("--minutes", type=float, default=8, help="the whole suite's time limit")
    args = parser.parse_args()
    if args.smoke and os.environ.get("TRITON_INTERPRET") != "1":
        print("--smoke runs the Triton kernels in the interpreter: set TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    deadline = time.time() + args.minutes * 60
    record = {"environment": environment(), "parts": []}
    for name, argv, limit in parts(args.smoke, args.minutes):
        left = deadline - time.time() if not args.smoke else limit
        limit = min(limit, left)
        if limit < 20:
            record["parts"].append({"part": name, "skipped": "no time left"})
            continue
        if name in ("models", "profile") and not args.smoke:
            argv = argv + ["--budget", str(max(10.0, limit - 60))]  # the last model must still be built and run
        command = [sys.executable, str(HERE / f"{name}_gpu.py"), "-o", str(args.out)] + argv
        start = time.time()
        with open(args.out / f"{name}-gpu.log", "w") as log:
            try:
                rc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=limit).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        record["parts"].append({"part": name, "command": " ".join(command[1:]), "rc": rc,
                                "seconds": round(time.time() - start, 1)})
        print(f"{name}: rc {rc} in {time.time() - start:.0f} s", flush=True)
        (args.out / "suite.json").write_text(json.dumps(record, indent=1))
    return 0 if all(p.get("rc") == 0 for p in record["parts"]) else 1


if __name__ == "__main__":
    sys.exit(main())
