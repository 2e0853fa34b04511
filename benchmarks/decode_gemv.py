"""Decode GEMVs (M = 1) of tcc's dense kernels against this machine's read bandwidth (issue 15).

    python benchmarks/decode_gemv.py [--repeats 7] [--shapes smollm2 qwen05b] [--copies auto] [--rows 1 8]

Per shape (y[1, N] = x[1, K] W^T) and kernel, GB/s = the bytes of the kernel's stored weight
tensors (codes, scales, zero points, bias) / the time of one call, as a fraction of the read
bandwidth (benchmarks/generation.py's probe: torch.sum of 1 GiB, 2 threads). Each timing cycles
through enough copies of the weights to exceed the L3 cache (--copies auto: >= 96 MiB in all),
so every call reads its weights from memory, as a decode step does; best of --repeats.
  fp32     tcc_dense_f32 (OpenBLAS sgemv on TVM's pool)
  a8w8     tcc_dense_a8w8_f32, dynamic per-row symmetric int8 activations
  w4       tcc_dense_w4_f32 (acts="none"), group 32 (--group), uint8 zero points, fp32 scales (as the artifact
           reads them after its float16 -> float32 cast, which is not timed here)
  w4a8     tcc_dense_w4a8_f32 (acts="int8"), group 32, uint8 zero points, float16 scales
  w4a8 fz  the same with float32 (fractional, Q4_1-grid) zero points
  w4a8 sym the same, symmetric: one zero point, 8 (the Q4_0 grid)
The tcc kernels run on TVM's thread pool with TVM_NUM_THREADS (2 here unless set).

--rows M...: each kernel at x[M, K] too (a speculative verify runs M = k + 1 rows); the cell gives the
time and, for M > 1, its ratio to the same kernel's M = 1 time (one row per shape and M). The kernel
"fp32 sgemm" is tcc_dense_f32 built with -DTCC_DENSE_SMALL_ROWS=0 (OpenBLAS sgemv at M = 1, sgemm
above, as before the small-M path), to see where OpenBLAS wins.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TVM_NUM_THREADS", "2")
from kernels import tcc_library  # noqa: E402  benchmarks/kernels.py
from generation import bandwidth  # noqa: E402  benchmarks/generation.py (takes benchmarks/ off sys.path)

SHAPES = {  # model -> [(name, K, N)]
    "smollm2": [("qkv", 576, 960), ("o", 576, 576), ("gate_up", 576, 3072), ("down", 1536, 576),
                ("lm_head", 576, 49152)],
    "qwen05b": [("qkv", 896, 1152), ("o", 896, 896), ("gate_up", 896, 9728), ("down", 4864, 896),
                ("lm_head", 896, 151936)],
}
GROUP = 32
CPU_TIME = False


def weights(kind: str, k: int, n: int, rng) -> list[np.ndarray]:
    from tcc.backends.kernels import quant_layout
    b = rng.standard_normal(n).astype(np.float32)
    if kind == "fp32":
        return [rng.standard_normal((n, k)).astype(np.float32), b]
    if kind == "a8w8":
        packed, wsum = quant_layout.pack_a8w8(rng.integers(-127, 128, (n, k)).astype(np.int8))
        return [packed, wsum, np.full(n, 0.01, np.float32), b]
    q4 = rng.integers(0, 256, (n, k // 2)).astype(np.uint8)
    s4 = (rng.random((n, k // GROUP)) * 0.01).astype(np.float32)
    z4 = None if kind == "w4a8 sym" else rng.integers(0, 16, (n, k // GROUP)).astype(np.uint8)
    if kind == "w4":
        return [*quant_layout.pack_w4(q4, s4, z4), b]
    if kind == "w4a8 fz":
        z4 = (rng.random((n, k // GROUP)) * 15).astype(np.float32)
    return [*quant_layout.pack_w4a8(q4, s4.astype(np.float16), z4), b]


KERNELS = {"fp32": "tcc_dense_f32", "a8w8": "tcc_dense_a8w8_f32", "w4": "tcc_dense_w4_f32",
           "w4a8": "tcc_dense_w4a8_f32", "w4a8 fz": "tcc_dense_w4a8_f32",
           "w4a8 sym": "tcc_dense_w4a8_f32", "fp32 sgemm": "tcc_dense_f32"}


def time_kernel(mod, kind, k, n, repeats, copies, rng, m=1) -> tuple[float, int]:
    import tvm
    T = tvm.runtime.tensor
    kind = kind.replace(" sgemm", "")
    ws = [weights(kind, k, n, rng) for _ in range(1)]
    nbytes = sum(a.nbytes for a in ws[0])
    count = copies if copies else max(2, int(96 * 2**20 / nbytes) + 1)
    ws = [[T(a) for a in ws[0]]] + [[T(a) for a in weights(kind, k, n, rng)] for _ in range(count - 1)]
    x, out = T(rng.standard_normal((m, k)).astype(np.float32)), T(np.empty((m, n), np.float32))
    f = mod[KERNELS[kind]]
    extra = [False] if kind == "a8w8" else []
    calls = [(lambda a=a: f(x, *a, *extra, out)) for a in ws]
    for c in calls:
        c()
    clock = time.thread_time if CPU_TIME else time.perf_counter
    best = float("inf")
    for _ in range(repeats):
        t0 = clock()
        for c in calls:
            c()
        best = min(best, (clock() - t0) / len(calls))
    return best, nbytes


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--kernels", nargs="+", default=[k for k in KERNELS if k != "fp32 sgemm"], choices=list(KERNELS))
    p.add_argument("--copies", type=int, default=0, help="weight copies cycled through (0: enough for 96 MiB)")
    p.add_argument("--group", type=int, default=32, help="int4 group (default 32)")
    p.add_argument("--rows", type=int, nargs="+", default=[1], help="rows M of x (default 1)")
    p.add_argument("--cpu-time", action="store_true",
                   help="the calling thread's CPU time (needs TVM_NUM_THREADS=1: the kernel then runs on it), "
                        "for a shared machine")
    args = p.parse_args()
    if args.cpu_time and os.environ["TVM_NUM_THREADS"] != "1":
        p.error("--cpu-time needs TVM_NUM_THREADS=1")
    globals()["CPU_TIME"] = args.cpu_time
    globals()["GROUP"] = args.group
    bw = bandwidth()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as work:
        mod = tcc_library(Path(work))
        mods = {k: mod for k in args.kernels}
        if "fp32 sgemm" in args.kernels:
            (Path(work) / "sgemm").mkdir()
            mods["fp32 sgemm"] = tcc_library(Path(work) / "sgemm", ["-march=native", "-DTCC_DENSE_SMALL_ROWS=0"])
        print(f"read bandwidth {bw / 1e9:.1f} GB/s, TVM_NUM_THREADS={os.environ['TVM_NUM_THREADS']}")
        print("| model | layer | M | K x N | " + " | ".join(f"{k} us (GB/s, % of bw)" for k in args.kernels) + " |")
        print("| --- | --- | ---: | --- |" + " ---: |" * len(args.kernels))
        for model in args.shapes:
            for name, k, n in SHAPES[model]:
                one = {}
                for m in sorted(set(args.rows) | {1}) if len(args.rows) > 1 else args.rows:
                    cells = []
                    for kind in args.kernels:
                        t, nbytes = time_kernel(mods[kind], kind, k, n, args.repeats, args.copies, rng, m)
                        one.setdefault(kind, t)
                        ratio = f", {t / one[kind]:.2f}x M=1" if m > 1 else ""
                        cells.append(f"{t * 1e6:.0f} ({nbytes / t / 1e9:.1f}, {100 * nbytes / t / bw:.0f} %{ratio})")
                    if m in args.rows:
                        print(f"| {model} | {name} | {m} | {k} x {n} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
