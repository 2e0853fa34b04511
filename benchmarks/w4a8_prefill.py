"""W4A8 against W8A8 at seq 128, whole models (issue 18 item 2): SmolLM2-135M's prefill of a
128-token prompt and MiniLM's forward pass at 128 tokens, artifacts compiled here, timed in one run.

    python benchmarks/w4a8_prefill.py [--out build/w4a8_prefill] [--repeats 7] [--models smollm2 minilm]

Formats (tcc.compile(MODEL, "native", seq_len=128, ...), no --latency):
  W8A8       quantize(acts=int8,embeddings=true)
  W4A8 g32   quantize(weights=int4,group=32,sym=true,acts=int8,embeddings=true)     (llama.cpp's Q4_0 grid)
  W4A8 g128  quantize(weights=int4,group=128,sym=true,acts=int8,embeddings=true)
SmolLM2: Loaded.session().prefill of 128 random ids (max_context 256); MiniLM: the artifact's forward
on its example inputs padded to 128. Per format: wall seconds (best of --repeats after a warm-up) and
the process CPU seconds of that call (all threads: less disturbed than wall by other jobs on the
cores), TVM_NUM_THREADS=2. The formats alternate call by call, so a shared machine disturbs them alike.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TVM_NUM_THREADS", "2")
# benchmarks/kernels.py would shadow the `kernels` package transformers imports
sys.path[:] = [q for q in sys.path if Path(q or ".").resolve() != Path(__file__).resolve().parent]
FORMATS = {
    "W8A8": "quantize(acts=int8,embeddings=true)",
    "W4A8 g32": "quantize(weights=int4,group=32,sym=true,acts=int8,embeddings=true)",
    "W4A8 g128": "quantize(weights=int4,group=128,sym=true,acts=int8,embeddings=true)",
}
SEQ = 128


def artifact(model: str, fmt: str, out: Path):
    import tcc
    d = out / f"{model}-{fmt.replace(' ', '-').lower()}"
    if (d / "manifest.json").exists():
        return tcc.load(d)
    kw = {"max_context": 256} if model == "smollm2" else {}
    return tcc.compile(model, "native", out=d, seq_len=SEQ, pipeline=FORMATS[fmt], latency=False, **kw)


def runner(model: str, art):
    if model == "smollm2":
        session = art.session()
        ids = np.random.default_rng(0).integers(0, 49152, SEQ)
        return lambda: session.prefill(ids, 0, SEQ - 1)
    feeds = {s["name"]: np.ones(s["shape"], s["dtype"]) for s in art.manifest["inputs"]}
    return lambda: art(feeds)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="build/w4a8_prefill")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--models", nargs="+", default=["smollm2", "minilm"], choices=["smollm2", "minilm"])
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"TVM_NUM_THREADS={os.environ['TVM_NUM_THREADS']}, seq {SEQ}")
    print("| model | format | wall ms (best) | CPU ms (best) | wall vs W8A8 | CPU vs W8A8 |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for model in a.models:
        runs = {fmt: runner(model, artifact(model, fmt, out)) for fmt in FORMATS}
        wall = {f: float("inf") for f in FORMATS}
        cpu = dict(wall)
        for f in FORMATS:
            runs[f]()  # warm-up
        for _ in range(a.repeats):
            for f, run in runs.items():
                t0, c0 = time.perf_counter(), time.process_time()
                run()
                wall[f] = min(wall[f], time.perf_counter() - t0)
                cpu[f] = min(cpu[f], time.process_time() - c0)
        for f in FORMATS:
            print(f"| {model} | {f} | {wall[f] * 1e3:.1f} | {cpu[f] * 1e3:.1f} | {wall['W8A8'] / wall[f]:.2f}x |"
                  f" {cpu['W8A8'] / cpu[f]:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
