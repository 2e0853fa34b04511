"""Microbenchmark of tcc's sparse CPU kernels on MiniLM and SmolLM2 MLP shapes: block-sparse dense
(tcc_dense_bsr_f32) against the dense kernel (tcc_dense_f32, OpenBLAS sgemm) as the fraction of
zero blocks grows, and the expansion of a compressed tensor (tcc_unmask).

    python benchmarks/sparse_kernels.py [--threads 2] [--repeats 15]

dense_bsr: y[M, N] = x[M, K] W^T + b with W [N, K] of random normal weights, of which exactly
round(s * blocks) randomly chosen r x c blocks are zero (s = 0, 0.5, ..., 0.95), stored with
sparse_layout.to_bsr. Per cell: time in ms and effective GFLOP/s = 2 M N K / time (the dense
operation's flops, so the numbers compare with the dense column directly). Crossover: the sparsity
at which BSR becomes faster than dense, interpolated linearly between the measured sparsities
("< 0": BSR is faster even with no zero block; "> 0.95": never in the range).

unmask: a SmolLM2 MLP weight (1536 x 576) with half of its elements zero, unstructured or in 1x16
blocks, compressed with sparse_layout.compress; GB/s = bytes of the dense output written per second.

Time: the minimum over --repeats of the mean of a batch of calls lasting >= 20 ms. The kernels are
called directly (their object linked into a shared library, as export_library links it) with
--threads threads of TVM's pool. Each result is checked against numpy once. Run it on an otherwise
idle machine.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from kernels import tcc_library, timeit  # benchmarks/ is on sys.path when run as a script

SHAPES = [  # (model, N, K): the MLP's up and down projections
    ("MiniLM", 1536, 384), ("MiniLM", 384, 1536), ("SmolLM2", 1536, 576), ("SmolLM2", 576, 1536)]
ROWS = (128, 1)
BLOCKS = ((1, 16), (4, 4))
SPARSITIES = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def block_sparse(n: int, k: int, block: tuple[int, int], sparsity: float, rng) -> np.ndarray:
    r, c = block
    blocks = (n // r) * (k // c)
    keep = np.ones(blocks, bool)
    keep[rng.permutation(blocks)[:round(sparsity * blocks)]] = False
    keep = keep.reshape(n // r, k // c)
    return rng.standard_normal((n, k)).astype(np.float32) * np.repeat(np.repeat(keep, r, 0), c, 1)


def crossover(speedups: list[float]) -> str:
    """The sparsity where BSR time = dense time, linear between the measured points."""
    if speedups[0] >= 1:
        return "< 0"
    for (s0, v0), (s1, v1) in zip(zip(SPARSITIES, speedups), zip(SPARSITIES[1:], speedups[1:])):
        if v0 < 1 <= v1:
            return f"{s0 + (1 - v0) / (v1 - v0) * (s1 - s0):.2f}"
    return f"> {SPARSITIES[-1]}"


def bsr_rows(mod, repeats: int, rng) -> list[str]:
    import tvm

    from tcc.backends.kernels import sparse_layout
    T = tvm.runtime.tensor
    lines = []
    for m in ROWS:
        for model, n, k in SHAPES:
            x = rng.standard_normal((m, k)).astype(np.float32)
            b = rng.standard_normal(n).astype(np.float32)
            out = T(np.empty((m, n), np.float32))
            flops = 2 * m * n * k
            w = rng.standard_normal((n, k)).astype(np.float32)
            args = [T(x), T(w), T(b), out]
            dense = timeit(lambda: mod["tcc_dense_f32"](*args), repeats)
            for block in BLOCKS:
                cells, speedups = [], []
                for s in SPARSITIES:
                    ws = block_sparse(n, k, block, s, rng)
                    bsr = [T(x), *map(T, sparse_layout.to_bsr(ws, block)), T(b), out]
                    f = mod["tcc_dense_bsr_f32"]
                    f(*bsr)
                    ref = x.astype(np.float64) @ ws.T.astype(np.float64) + b
                    bound = 1e-5 * (np.abs(x) @ np.abs(ws).T + np.abs(b))
                    assert (np.abs(out.numpy() - ref) <= bound).all(), f"wrong result: {model} M={m} {block} s={s}"
                    t = timeit(lambda: f(*bsr), repeats)
                    cells.append(f"{t * 1e3:.3f} ({flops / t / 1e9:.0f})")
                    speedups.append(dense / t)
                lines.append(f"| {model} | {m} | {n} | {k} | {block[0]}x{block[1]} | {dense * 1e3:.3f} "
                             f"({flops / dense / 1e9:.0f}) | " + " | ".join(cells) + f" | {crossover(speedups)} |")
                print(lines[-1], flush=True)
    return lines


def unmask_rows(mod, repeats: int, rng) -> None:
    import tvm

    from tcc.backends.kernels import sparse_layout
    T = tvm.runtime.tensor
    n, k = 1536, 576
    print("\n| dtype | elements | zeros | pattern | us | GB/s (dense output) |")
    print("| --- | ---: | ---: | --- | ---: | ---: |")
    for dtype in (np.float32, np.int8):
        for pattern, run in (("unstructured", 1), ("1x16 blocks", 16)):
            keep = np.repeat(rng.random(n * k // run) >= 0.5, run)
            dense = rng.integers(1, 100, n * k).astype(dtype) * keep
            values, mask = sparse_layout.compress(dense)
            out = T(np.empty(n * k, dtype))
            args = [T(values), T(mask), out]
            mod["tcc_unmask"](*args)
            assert np.array_equal(out.numpy(), dense)
            t = timeit(lambda: mod["tcc_unmask"](*args), repeats)
            print(f"| {np.dtype(dtype).name} | {n * k} | 50% | {pattern} | {t * 1e6:.0f} | {dense.nbytes / t / 1e9:.1f} |",
                  flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(a.threads)  # before the TVM runtime starts its pool
    rng = np.random.default_rng(0)
    print(f"threads: {a.threads}; cells: ms (effective GFLOP/s = 2 M N K / time)\n")
    print("| model | M | N | K | block | dense | " + " | ".join(f"s={s}" for s in SPARSITIES) + " | crossover |")
    print("| --- | ---: | ---: | ---: | --- | ---: | " + " | ".join("---:" for _ in SPARSITIES) + " | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        mod = tcc_library(Path(tmp))
        bsr_rows(mod, a.repeats, rng)
        unmask_rows(mod, a.repeats, rng)
    return 0


if __name__ == "__main__":
    sys.exit(main())
