"""Decode GEMVs (M = 1) or prefill GEMMs (--m 128) of kernel variants timed interleaved in one process
(issue 15, sessions 16-17).

    python benchmarks/gemv_ab.py VARIANT [VARIANT ...] [--shapes llama1b qwen05b] [--rounds 12]
        [--small-pages] [--m 1] [--group 32]

VARIANT is NAME=KIND[:SOURCE][:FLAGS]: KIND one of a8w8, w4a8, w4a8 fz, w4a8 sym, fp32, bf16 (the kernels of
benchmarks/decode_gemv.py, plus tcc_dense_bf16_f32); SOURCE another version of one of
backends/kernels/*.cc, under the same file name, built in its place for this variant (e.g. `git show
HEAD~1:backends/kernels/bf16_kernels.cc > /tmp/old/bf16_kernels.cc`); FLAGS extra compiler flags
(after -march=native; spaces allowed). Example:

    python benchmarks/gemv_ab.py ref=a8w8 old=bf16:/tmp/old/bf16_kernels.cc new=bf16 fma=bf16::-mno-avx512bf16

Per layer shape, every variant gets its own weights (enough copies to exceed 192 MiB, so each
call reads its weights from memory, as a decode step does), placed as tcc.load places an artifact's
(backends/tvm/session.py HostMemory: one mapping with transparent huge pages asked for;
--small-pages: ordinary TVM tensors). Then --rounds rounds, each timing one pass over all copies of
every variant in turn: on a machine whose memory speed drifts, the variants see the same drift.
Prints GB/s of weight bytes read (best / median of the rounds); with --m M > 1 (a prefill's GEMM,
compute-bound) GOP/s = 2 M N K / time instead. The variants' ratios are the result, the absolute
figures move with the machine. TVM_NUM_THREADS: 2 unless set.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TVM_NUM_THREADS", "2")
import decode_gemv  # noqa: E402  benchmarks/decode_gemv.py (imports benchmarks/kernels.py, generation.py)
from kernels import tcc_library  # noqa: E402

KERNELS_DIR = Path(__file__).resolve().parents[1] / "backends" / "kernels"
SHAPES = {  # (name, K, N) of one decoder layer and the LM head's share
    "llama1b": [("qkv", 2048, 3072), ("o", 2048, 2048), ("gate_up", 2048, 16384), ("down", 8192, 2048)],
    "qwen05b": [("qkv", 896, 1152), ("gate_up", 896, 9728), ("down", 4864, 896)],
}
KERNELS = dict(decode_gemv.KERNELS, bf16="tcc_dense_bf16_f32")


def weights(kind: str, k: int, n: int, rng) -> list[np.ndarray]:
    if kind == "bf16":  # bf16 bit patterns as int16, as an artifact stores them
        w = rng.standard_normal((n, k)).astype(np.float32)
        return [(w.view(np.uint32) >> 16).astype(np.uint16).view(np.int16), rng.standard_normal(n).astype(np.float32)]
    return decode_gemv.weights(kind, k, n, rng)


def tensor(a: np.ndarray, small_pages: bool):
    import tvm
    if small_pages or a.nbytes < (1 << 20):
        return tvm.runtime.tensor(a)
    from tcc.backends.tvm.session import HostMemory

    def fill(buffer):
        buffer[:] = a.reshape(-1).view(np.uint8)
    return HostMemory(a.nbytes).tensor(a.dtype, a.shape, fill=fill)


def build(name: str, source: str, flags: list[str], work: Path):
    """The kernel library with `source` (a file) in place of its namesake in backends/kernels: built from a
    copy of that folder in `work` (the repository's sources are never written)."""
    if not source:
        return tcc_library(work, ["-march=native", *flags])
    if not (KERNELS_DIR / Path(source).name).exists():
        sys.exit(f"gemv_ab: {name}: {source} is not named like a file of backends/kernels (e.g. .../bf16_kernels.cc)")
    tree = work / "src"
    tree.mkdir()
    for f in [*KERNELS_DIR.glob("*.cc"), *KERNELS_DIR.glob("*.h")]:
        shutil.copy2(f, tree / f.name)
    shutil.copy2(source, tree / Path(source).name)
    return tcc_library(work, ["-march=native", *flags], tree)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("variants", nargs="+", help="NAME=KIND[:SOURCE][:FLAGS]")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--small-pages", action="store_true", help="weights in ordinary TVM tensors, not huge pages")
    p.add_argument("--m", type=int, default=1, help="rows of x (1: a decode GEMV; 128: a prefill GEMM)")
    p.add_argument("--group", type=int, default=decode_gemv.GROUP, help="int4 group (default 32)")
    a = p.parse_args()
    decode_gemv.GROUP = a.group
    variants = {}
    for v in a.variants:
        name, _, spec = v.partition("=")
        kind, _, rest = spec.partition(":")
        source, _, flags = rest.partition(":")
        if kind not in KERNELS or not name:
            p.error(f"{v}: want NAME=KIND[:SOURCE][:FLAGS] with KIND one of {', '.join(KERNELS)}")
        variants[name] = (kind, source, flags.split())
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as work:
        mods = {}
        for name, (kind, source, flags) in variants.items():
            (Path(work) / name).mkdir()
            mods[name] = build(name, source, flags, Path(work) / name)
        print(f"TVM_NUM_THREADS={os.environ['TVM_NUM_THREADS']}, weights in "
              f"{'ordinary pages' if a.small_pages else 'huge pages (HostMemory)'}; M = {a.m}, "
              f"{'GB/s' if a.m == 1 else 'GOP/s'} best / median of {a.rounds} rounds")
        print("| shape | layer | K x N | " + " | ".join(variants) + " |")
        print("| --- | --- | --- |" + " ---: |" * len(variants))
        for shape in a.shapes:
            for layer, k, n in SHAPES[shape]:
                x = tensor(rng.standard_normal((a.m, k)).astype(np.float32), True)
                out = tensor(np.empty((a.m, n), np.float32), True)
                runs = {}
                for name, (kind, _, _) in variants.items():
                    first = weights(kind, k, n, rng)
                    nbytes = sum(w.nbytes for w in first)
                    copies = max(2, int(192 * 2**20 / nbytes) + 1)
                    sets = [[tensor(w, a.small_pages) for w in (first if i == 0 else weights(kind, k, n, rng))]
                            for i in range(copies)]
                    extra = [False] if kind == "a8w8" else []
                    runs[name] = (mods[name][KERNELS[kind]], extra, nbytes * copies, sets)
                for f, extra, _, sets in runs.values():  # warm-up
                    for s in sets:
                        f(x, *s, *extra, out)
                speeds = {name: [] for name in runs}
                for _ in range(a.rounds):
                    for name, (f, extra, total, sets) in runs.items():
                        t0 = time.perf_counter()
                        for s in sets:
                            f(x, *s, *extra, out)
                        work = total if a.m == 1 else 2 * a.m * n * k * len(sets)
                        speeds[name].append(work / (time.perf_counter() - t0) / 1e9)
                print(f"| {shape} | {layer} | {k} x {n} | "
                      + " | ".join(f"{max(v):.1f} / {statistics.median(v):.1f}" for v in speeds.values()) + " |",
                      flush=True)
                del runs
    return 0


if __name__ == "__main__":
    sys.exit(main())
