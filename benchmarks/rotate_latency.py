"""What rotate's online Hadamard costs at run time (issue 18 item 1): the transform before each MLP down
projection, as the fast Walsh-Hadamard kernel (tcc_fwht_f32, what the CPU lowering calls now) and as
the matmul by H_block the Program holds (what the lowering ran before: TVM's legalised matmul under
tcc's CPU schedules), beside the down projection it feeds (W4A8 g128 and W8A8).

    python benchmarks/rotate_latency.py [--repeats 9] [--threads 2] [--rows 1 128]
    python benchmarks/rotate_latency.py --whole build/rotate_latency   # SmolLM2, whole model

--whole DIR: SmolLM2-135M compiled (tcc.compile "native", max_context 256, no latency) with
rotate(online=true) and rotate(online=false) before W4A8 g128
(quantize(weights=int4,group=128,sym=true,acts=int8,embeddings=true)), artifacts under DIR (reused
when there); per artifact the best of --repeats of a 128-token prefill and of a decode step (wall and
process CPU ms), the two alternating call by call: the difference is what the online transform costs.

Per model shape (the down projection's K, N; block = min(128, the largest power of two dividing K),
rotate's default) and rows M: microseconds per call, the minimum over repeats of the mean of a batch
of calls lasting >= 20 ms (benchmarks/kernels.py's timeit), and the transform as a fraction of the
W4A8 down projection:
  fwht        tcc_fwht_f32(x[M, K], block)
  matmul      x.view(M, K / block, block) @ H_block built with relax.build and backends/tvm/schedule.py's
              pipeline, as an artifact's graph had it
  down w4a8   tcc_dense_w4a8_f32, group 128, symmetric, float16 scales
  down a8w8   tcc_dense_a8w8_f32, dynamic per-row int8 activations
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

SHAPES = {  # model -> the down projection's (K, N)
    "smollm2": (1536, 576),
    "qwen05b": (4864, 896),
    "llama1b": (8192, 2048),
}


def matmul_module(m: int, k: int, block: int, work: Path):
    """x[M, K] -> (x.view(M, K/block, block) @ H).view(M, K), built as the TVM backend builds a model."""
    import tvm
    from tvm import relax

    from tcc.backends.tvm.schedule import pipeline
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((m, k), "float32"))
    h = relax.Var("h", relax.TensorType((block, block), "float32"))
    with bb.function("main", [x, h]):
        with bb.dataflow():
            v = bb.emit(relax.op.reshape(x, (m, k // block, block)))
            y = bb.emit(relax.op.matmul(v, h))
            out = bb.emit_output(relax.op.reshape(y, (m, k)))
        bb.emit_func_output(out)
    target = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(),
                                "num-cores": int(os.environ["TVM_NUM_THREADS"])})
    ex = relax.build(bb.get(), target, relax_pipeline=pipeline(target))
    so = work / f"matmul_{m}_{k}_{block}.so"
    ex.export_library(str(so))
    return relax.VirtualMachine(tvm.runtime.load_module(str(so)), tvm.cpu())


WHOLE = {"online": "rotate(online=true)", "no online": "rotate(online=false)"}
W4A8 = "quantize(weights=int4,group=128,sym=true,acts=int8,embeddings=true)"


def whole_model(out: Path, repeats: int) -> None:
    import time
    # benchmarks/kernels.py would shadow the `kernels` package transformers imports
    sys.path[:] = [q for q in sys.path if Path(q or ".").resolve() != Path(__file__).resolve().parent]
    import tcc
    arts = {}
    for name, rot in WHOLE.items():
        d = out / f"smollm2-{name.replace(' ', '-')}"
        arts[name] = tcc.load(d) if (d / "manifest.json").exists() else tcc.compile(
            "smollm2", "native", out=d, seq_len=128, max_context=256, pipeline=f"{rot},{W4A8}", latency=False)
    ids = np.random.default_rng(0).integers(0, 49152, 128)
    sessions = {name: a.session() for name, a in arts.items()}
    best = {(n, what): [float("inf")] * 2 for n in arts for what in ("prefill", "decode")}
    for i in range(repeats + 1):
        for n, s in sessions.items():
            for what, call in (("prefill", lambda: s.prefill(ids, 0, 127)), ("decode", lambda: s.decode(5, 128))):
                t0, c0 = time.perf_counter(), time.process_time()
                call()
                if i:
                    b = best[n, what]
                    b[0], b[1] = min(b[0], time.perf_counter() - t0), min(b[1], time.process_time() - c0)
    print(f"SmolLM2-135M, {W4A8}, TVM_NUM_THREADS={os.environ['TVM_NUM_THREADS']}: best of {repeats}, ms (wall / CPU)")
    print("| rotate | prefill 128 wall | prefill CPU | decode wall | decode CPU |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for n in arts:
        p, d = best[n, "prefill"], best[n, "decode"]
        print(f"| {WHOLE[n]} | {p[0] * 1e3:.1f} | {p[1] * 1e3:.1f} | {d[0] * 1e3:.2f} | {d[1] * 1e3:.2f} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 128])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--whole", metavar="DIR", help="whole-model SmolLM2 prefill/decode with and without the online transform")
    a = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(a.threads)
    if a.whole:
        whole_model(Path(a.whole), a.repeats)
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import tvm
    import torch

    from kernels import tcc_library, timeit  # benchmarks/kernels.py
    from tcc.backends.kernels import quant_layout
    from tcc.compress.rotation import fwht, power_of_two_part, walsh_hadamard
    T = tvm.runtime.tensor
    rng = np.random.default_rng(0)
    print(f"{a.threads} threads: microseconds per call (fwht / down w4a8: the online transform's share)")
    print("| model | K x N | block | M | fwht | matmul (before) | down w4a8 g128 | down a8w8 | fwht / down w4a8 | matmul / fwht |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        mod = tcc_library(Path(tmp))
        for model in a.shapes:
            k, n = SHAPES[model]
            block = min(128, power_of_two_part(k))
            h = walsh_hadamard(block, torch.float32).numpy()
            q4 = rng.integers(0, 256, (n, k // 2)).astype(np.uint8)
            s4 = (rng.random((n, k // 128)) * 0.01).astype(np.float16)
            packed, wsum = quant_layout.pack_a8w8(rng.integers(-127, 128, (n, k)).astype(np.int8))
            b = T(rng.standard_normal(n).astype(np.float32))
            for m in a.rows:
                xn = rng.standard_normal((m, k)).astype(np.float32)
                x, y, out = T(xn), T(np.empty((m, k), np.float32)), T(np.empty((m, n), np.float32))
                f = mod["tcc_fwht_f32"]
                f(x, block, y)
                assert np.array_equal(y.numpy(), fwht(torch.from_numpy(xn), block).numpy())
                vm = matmul_module(m, k, block, Path(tmp))
                hh = T(h)
                got = vm["main"](x, hh).numpy()
                assert np.allclose(got, y.numpy(), atol=1e-4)
                w4 = [T(t) for t in quant_layout.pack_w4a8(q4, s4, None)]
                t = {
                    "fwht": timeit(lambda: f(x, block, y), a.repeats),
                    "matmul": timeit(lambda: vm["main"](x, hh), a.repeats),
                    "w4a8": timeit(lambda: mod["tcc_dense_w4a8_f32"](x, *w4, b, out), a.repeats),
                    "a8w8": timeit(lambda: mod["tcc_dense_a8w8_f32"](x, T(packed), T(wsum),
                                                                   T(np.full(n, 0.01, np.float32)), b, False, out),
                                   a.repeats),
                }
                us = {key: v * 1e6 for key, v in t.items()}
                print(f"| {model} | {k} x {n} | {block} | {m} | {us['fwht']:.1f} | {us['matmul']:.1f} | {us['w4a8']:.1f} | "
                      f"{us['a8w8']:.1f} | {t['fwht'] / t['w4a8']:.1%} | {t['matmul'] / t['fwht']:.0f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
