"""Prints the foundation tables of docs/BENCHMARKS.md: fp32 tcc on x86 vs PyTorch eager and ONNX
Runtime, measured in the same run, plus compile times and the compiled-vs-PyTorch error.

    python benchmarks/foundation.py [--models minilm smollm2] [--seq-len 128] [--repeats 20] [--out build/bench]

Run it on an otherwise idle machine: every engine shares the same 2 cores.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["minilm", "smollm2"])
    ap.add_argument("--targets", nargs="+", default=["native"])
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default="build/bench")
    a = ap.parse_args()
    rows = []
    for model in a.models:
        for target in a.targets:
            out = Path(a.out) / f"{model}-{target}"
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "tcc.cli", "-q", "compile", model, "--target", target,
                                "--seq-len", str(a.seq_len), "-o", str(out), "--json"], capture_output=True, text=True)
            if r.returncode != 0:
                print(r.stderr, file=sys.stderr)
                return r.returncode
            wall = time.perf_counter() - t0
            info = json.loads(r.stdout.strip().splitlines()[-1])
            rows.append((model, target, wall, info))
            if target in ("native", "x86"):  # runs here: bench it
                b = subprocess.run([sys.executable, "-m", "tcc.cli", "-q", "bench", str(out), "--repeats", str(a.repeats)],
                                   capture_output=True, text=True)
                print(b.stdout if b.returncode == 0 else b.stderr)
    print("| model | target | compile wall s (trace / build) | weights MB | max abs err vs PyTorch | max rel err |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for model, target, wall, info in rows:
        s = info["seconds"]
        (name, v), = info["verify"].items()
        print(f"| {model} | {target} | {wall:.0f} ({s['trace']:.0f} / {s['build']:.0f}) | {info['weight_bytes'] / 1e6:.1f} | "
              f"{v['max_abs_err']:.1e} | {v['max_rel_err']:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
