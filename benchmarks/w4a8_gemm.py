"""Prefill GEMMs of tcc's W4A8 kernel (int4 weights x int8 activations) beside W8A8 and fp32 (issue 18
item 2, issue 15 item 6).

    python benchmarks/w4a8_gemm.py [--repeats 9] [--threads 2] [--shapes minilm smollm2 qwen05b] [--m 128]
    python benchmarks/w4a8_gemm.py --crossover     # W4A8 vs W8A8 at M = 1 ... 128 on SmolLM2's gate_up

Per shape (y[M, N] = x[M, K] W^T), GOP/s = 2 M N K / time (the minimum over repeats of the mean of
a batch of calls lasting >= 20 ms; benchmarks/kernels.py's timeit), the weights in cache as a
prefill's are not (a prefill's GEMM is compute-bound; decode GEMVs are benchmarks/decode_gemv.py's):
  fp32        tcc_dense_f32 (OpenBLAS sgemm)
  a8w8        tcc_dense_a8w8_f32, dynamic per-row symmetric int8 activations
  w4          tcc_dense_w4_f32 (acts="none"), group 32, uint8 zero points: dequantize + sgemm
  w4a8 g32    tcc_dense_w4a8_f32 (acts="int8"), group 32, uint8 zero points, float16 scales
  w4a8 g128   the same, group 128, symmetric (zero 8)
  w4a8 g32 fz group 32 with float32 (fractional, Q4_1-grid) zero points
The kernels run on TVM's pool with --threads threads; activation quantization is included.
--cpu-time (with --threads 1, where the kernel runs on the calling thread): the calling thread's CPU
time instead of wall time, the minimum of --repeats batches of >= 30 ms (what a shared machine
disturbs least).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPES = {  # model -> [(name, K, N)]
    "minilm": [("qkv", 384, 1152), ("o", 384, 384), ("up", 384, 1536), ("down", 1536, 384)],
    "smollm2": [("qkv", 576, 960), ("o", 576, 576), ("gate_up", 576, 3072), ("down", 1536, 576)],
    "qwen05b": [("qkv", 896, 1152), ("o", 896, 896), ("gate_up", 896, 9728), ("down", 4864, 896)],
}
KINDS = ["fp32", "a8w8", "w4", "w4a8 g32", "w4a8 g128", "w4a8 g32 fz"]


def calls(mod, kind, m, k, n, rng):
    import tvm

    from tcc.backends.kernels import quant_layout
    T = tvm.runtime.tensor
    x, b, out = T(rng.standard_normal((m, k)).astype(np.float32)), T(rng.standard_normal(n).astype(np.float32)), \
        T(np.empty((m, n), np.float32))
    if kind == "fp32":
        return mod["tcc_dense_f32"], [x, T(rng.standard_normal((n, k)).astype(np.float32)), b, out]
    if kind == "a8w8":
        packed, wsum = quant_layout.pack_a8w8(rng.integers(-127, 128, (n, k)).astype(np.int8))
        return mod["tcc_dense_a8w8_f32"], [x, T(packed), T(wsum), T(np.full(n, 0.01, np.float32)), b, False, out]
    group = 128 if "g128" in kind else 32
    q4 = rng.integers(0, 256, (n, k // 2)).astype(np.uint8)
    s4 = (rng.random((n, k // group)) * 0.01).astype(np.float32)
    z4 = None if "g128" in kind else rng.integers(0, 16, (n, k // group)).astype(np.uint8)
    if kind == "w4":
        return mod["tcc_dense_w4_f32"], [x, *map(T, quant_layout.pack_w4(q4, s4, z4)), b, out]
    if kind.endswith("fz"):
        z4 = (rng.random((n, k // group)) * 15).astype(np.float32)
    return mod["tcc_dense_w4a8_f32"], [x, *map(T, quant_layout.pack_w4a8(q4, s4.astype(np.float16), z4)), b, out]


def cpu_timeit(fn, repeats: int) -> float:
    """Seconds of the calling thread's CPU time per call: the minimum over repeats of a batch >= 30 ms."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0, n = time.thread_time(), 0
        while time.thread_time() - t0 < 0.03:
            fn()
            n += 1
        best = min(best, (time.thread_time() - t0) / n)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--m", type=int, default=128, help="rows (prefill tokens), default 128")
    ap.add_argument("--crossover", action="store_true", help="W4A8 g32 vs W8A8 over M on SmolLM2 gate_up")
    ap.add_argument("--cpu-time", action="store_true", help="thread CPU time (needs --threads 1)")
    a = ap.parse_args()
    if a.cpu_time and a.threads != 1:
        ap.error("--cpu-time needs --threads 1")
    os.environ["TVM_NUM_THREADS"] = str(a.threads)  # before the TVM runtime starts its pool
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from kernels import tcc_library, timeit as wall_timeit  # benchmarks/kernels.py
    timeit = cpu_timeit if a.cpu_time else wall_timeit
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        mod = tcc_library(Path(tmp))
        if a.crossover:
            kinds = ["a8w8", "w4", "w4a8 g32", "w4a8 g128"]
            print(f"SmolLM2 gate_up (K 576, N 3072), {a.threads} threads{', CPU time' if a.cpu_time else ''}: GOP/s")
            print("| M | " + " | ".join(kinds) + " | w4a8 g32 / a8w8 |")
            print("| ---: |" + " ---: |" * (len(kinds) + 1))
            for m in (1, 2, 4, 5, 8, 16, 32, 33, 64, 128):
                g = {kd: 2 * m * 576 * 3072 / timeit(lambda f=f, x=x: f(*x), a.repeats) / 1e9
                     for kd in kinds for f, x in [calls(mod, kd, m, 576, 3072, rng)]}
                print(f"| {m} | " + " | ".join(f"{g[kd]:.0f}" for kd in kinds) +
                      f" | {g['w4a8 g32'] / g['a8w8']:.2f}x |", flush=True)
            return 0
        print(f"M = {a.m}, {a.threads} threads{', CPU time' if a.cpu_time else ''}: GOP/s (2 M N K / time)")
        print("| model | layer | K x N | " + " | ".join(KINDS) + " | w4a8 g32 / a8w8 | w4a8 g128 / a8w8 |")
        print("| --- | --- | --- |" + " ---: |" * (len(KINDS) + 2))
        for model in a.shapes:
            for layer, k, n in SHAPES[model]:
                g = {kd: 2 * a.m * n * k / timeit(lambda f=f, x=x: f(*x), a.repeats) / 1e9
                     for kd in KINDS for f, x in [calls(mod, kd, a.m, k, n, rng)]}
                print(f"| {model} | {layer} | {k} x {n} | " + " | ".join(f"{g[kd]:.0f}" for kd in KINDS) +
                      f" | {g['w4a8 g32'] / g['a8w8']:.2f}x | {g['w4a8 g128'] / g['a8w8']:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
