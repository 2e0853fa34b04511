"""Microbenchmark of tcc's dense kernels on MiniLM and SmolLM2 linear-layer shapes, beside ONNX
Runtime, with this CPU's peak.

    python benchmarks/kernels.py [--repeats 15] [--threads 2] [--shapes minilm smollm2]

Per shape (y[M, N] = x[M, K] W^T), achieved GOP/s = 2 M N K / time, time the minimum over repeats
of the mean of a batch of calls lasting >= 20 ms:
  fp32      tcc_dense_f32 (OpenBLAS sgemm on TVM's thread pool)
  a8w8      tcc_dense_a8w8_f32, dynamic per-row symmetric int8 activations (quantization included)
  w4        tcc_dense_w4_f32, int4 weights, group 32 with zero points, fp32 math
  ORT fp32  an onnx.helper MatMul + Add model
  ORT int8  the same model after onnxruntime.quantization.quantize_dynamic (QInt8 weights, dynamic
            uint8 activations: DynamicQuantizeLinear + MatMulInteger, fused by ORT)
The tcc kernels are called directly (their object linked into a shared library, as export_library
links it), ORT through run_with_iobinding. Both engines get --threads threads. Run it on an
otherwise idle machine: every engine shares the same cores.

Peak: nominal clock (BogoMIPS / 2, the TSC rate x86 Linux reports) x cores x 2 FMA units x lanes:
fp32 = 2 flops x 16 lanes (AVX-512) per FMA; int8 = 2 ops x 64 u8*s8 products per vpdpbusd (VNNI).
Turbo clocks can run above the nominal rate, so a kernel can exceed a few percent of "peak".
"""
from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPES = {  # model -> [(name, M, K, N)]
    "minilm": [("qkv", 128, 384, 1152), ("o", 128, 384, 384), ("up", 128, 384, 1536), ("down", 128, 1536, 384)],
    "smollm2": [(name, m, k, n) for m in (128, 1) for name, k, n in
                (("qkv", 576, 960), ("o", 576, 576), ("gate_up", 576, 3072), ("down", 1536, 576))],
}
GROUP = 32


def cpu_peak(cores: int) -> tuple[float, float, str]:
    """(fp32 GFLOP/s, int8 GOP/s, how) from /proc/cpuinfo."""
    info = Path("/proc/cpuinfo").read_text()
    flags = set(next(l for l in info.splitlines() if l.startswith("flags")).split(":")[1].split())
    ghz = float(next(l for l in info.splitlines() if l.lower().startswith("bogomips")).split(":")[1]) / 2000
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    fma_units = 2
    macs8 = lanes * 4 if "avx512_vnni" in flags else lanes * 2  # vpdpbusd: 4 products per 32-bit lane
    fp32 = ghz * cores * fma_units * lanes * 2
    int8 = ghz * cores * fma_units * macs8 * 2
    how = (f"{ghz:.2f} GHz nominal x {cores} cores x {fma_units} FMA units: fp32 {lanes} lanes x 2 = {fp32:.0f} GFLOP/s, "
           f"int8 {macs8} products/instr x 2 = {int8:.0f} GOP/s")
    return fp32, int8, how


def timeit(fn, repeats: int) -> float:
    fn()
    t0 = time.perf_counter()
    fn()
    number = max(1, int(0.02 / max(time.perf_counter() - t0, 1e-7)))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - t0) / number)
    return best


def tcc_library(work: Path, cflags: list[str] | None = None, source_dir: Path | None = None):
    import tvm

    from tcc.backends.kernels import build
    lib = build.build_kernels("x86_64", work, cflags, source_dir)
    so = work / "tcc_kernels.so"
    subprocess.run(["g++", "-shared", "-fPIC", "-o", str(so), str(lib.object), *lib.link_options()], check=True)
    return tvm.runtime.load_module(str(so))


def tcc_times(mod, m, k, n, repeats, rng) -> dict[str, float]:
    import tvm

    from tcc.backends.kernels import quant_layout
    T = tvm.runtime.tensor
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    qw = rng.integers(-127, 128, (n, k)).astype(np.int8)
    packed, wsum = quant_layout.pack_a8w8(qw)
    q4 = rng.integers(0, 256, (n, k // 2)).astype(np.uint8)
    s4 = (rng.random((n, k // GROUP)) * 0.01).astype(np.float32)
    z4 = rng.integers(0, 16, (n, k // GROUP)).astype(np.uint8)
    out = T(np.empty((m, n), np.float32))
    calls = {
        "fp32": (mod["tcc_dense_f32"], [T(x), T(w), T(b), out]),
        "a8w8": (mod["tcc_dense_a8w8_f32"], [T(x), T(packed), T(wsum), T(np.full(n, 0.01, np.float32)), T(b), False, out]),
        "w4": (mod["tcc_dense_w4_f32"], [T(x), *map(T, quant_layout.pack_w4(q4, s4, z4)), T(b), out]),
    }
    return {name: timeit(lambda f=f, a=a: f(*a), repeats) for name, (f, a) in calls.items()}


def ort_times(m, k, n, repeats, threads, rng, work: Path) -> dict[str, float]:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    w = numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "B")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["XW"]), helper.make_node("Add", ["XW", "B"], ["Y"])], "dense",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [m, n])], [w, b])
    fp32 = work / f"dense_{m}_{k}_{n}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), fp32)
    int8 = fp32.with_suffix(".int8.onnx")
    logging.getLogger().setLevel(logging.ERROR)  # quantize_dynamic's advice to pre-process the model
    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    x = rng.standard_normal((m, k)).astype(np.float32)
    times = {}
    for name, path in (("ORT fp32", fp32), ("ORT int8", int8)):
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        io = sess.io_binding()
        io.bind_cpu_input("X", x)
        io.bind_output("Y")
        times[name] = timeit(lambda s=sess, io=io: s.run_with_iobinding(io), repeats)
    return times


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    a = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(a.threads)  # before the TVM runtime starts its pool
    fp32_peak, int8_peak, how = cpu_peak(a.threads)
    rng = np.random.default_rng(0)
    cols = ["fp32", "a8w8", "w4", "ORT fp32", "ORT int8"]
    print(f"peak: {how}\n")
    print("| model | layer | M | K | N | " + " | ".join(f"{c} GOP/s" for c in cols) +
          " | a8w8 / fp32 | a8w8 / ORT int8 | a8w8 % int8 peak |")
    print("| --- | --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in cols) + " | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        mod = tcc_library(Path(tmp))
        for model in a.shapes:
            for layer, m, k, n in SHAPES[model]:
                t = tcc_times(mod, m, k, n, a.repeats, rng) | ort_times(m, k, n, a.repeats, a.threads, rng, Path(tmp))
                gops = {c: 2 * m * n * k / t[c] / 1e9 for c in cols}
                print(f"| {model} | {layer} | {m} | {k} | {n} | " + " | ".join(f"{gops[c]:.0f}" for c in cols) +
                      f" | {gops['a8w8'] / gops['fp32']:.2f}x | {gops['a8w8'] / gops['ORT int8']:.2f}x"
                      f" | {100 * gops['a8w8'] / int8_peak:.0f}% |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
