"""The pass manager's bookkeeping (issue 15, item 3): Pipeline.run's seconds with and without the
changes of b533992, in the same process on the same traced Program (ratios are what to read on a
shared machine).

    python benchmarks/compile_time.py [MODEL] [--seq-len 512] [-p 'dce,quantize(acts=int8,embeddings=true)']

"before" runs the program after every pass (no reuse when a pass left the computation unchanged)
and sums dense_a8w8's integer products as float64 matrix products; "after" is tcc as it is. Both
print the passes' own seconds, the rest of Pipeline.run (observations, drift), the per-pass drift
(they must agree) and the process's peak RSS so far. The same calibration feeds as `tcc compile`
(compiler._calibration: 8 windows of the calibration text; the first 4 are the check feeds).
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

# benchmarks/ off sys.path: benchmarks/kernels.py would shadow the `kernels` package transformers imports
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from tcc.ir import ops; from tcc import pipeline
from tcc.compiler import DEFAULT_CLEANUP, _calibration
from tcc.frontends.frontend import trace
from tcc.pipeline import PassContext, Pipeline


def _float64_dot(q, z, qw, asym):
    return (q - z).to(torch.float64) @ qw.to(torch.float64).T


def _always_observe(program, feeds, after_pass, before=None):
    key, refs = pipeline._computation_key(program)
    return {**pipeline._observe(program, feeds, after_pass), "key": None, "refs": refs}


def run(program, text: str, calibration, old: bool) -> dict:
    saved = pipeline._observe_once, ops._int_dot
    if old:
        pipeline._observe_once, ops._int_dot = _always_observe, _float64_dot
    try:
        ctx = PassContext(calibration=calibration)
        t0 = time.perf_counter()
        Pipeline.parse(text).run(program, ctx)
        total = time.perf_counter() - t0
    finally:
        pipeline._observe_once, ops._int_dot = saved
    passes = sum(r["seconds"] for r in ctx.records)
    return {"total": total, "passes": passes, "bookkeeping": total - passes,
            "drift": [(r["pass"], r["drift"]["rel"], r["drift"].get("reused", False)) for r in ctx.records],
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="smollm2")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("-p", "--pipeline", default="quantize(acts=int8,embeddings=true)",
                    help=f"the user's passes; {DEFAULT_CLEANUP!r} runs first, as in tcc compile")
    a = ap.parse_args()
    program = trace(a.model, seq_len=a.seq_len)
    user = Pipeline.parse(a.pipeline)
    calibration = _calibration(program, user, None, 8)
    text = f"{DEFAULT_CLEANUP},{a.pipeline}"
    print(f"{a.model} seq {a.seq_len}, pipeline {text}, {len(calibration)} calibration feeds")
    for old in (True, False):
        r = run(program, text, calibration, old)
        print(f"{'before' if old else 'after '}: Pipeline.run {r['total']:.1f} s = passes {r['passes']:.1f} s + "
              f"bookkeeping {r['bookkeeping']:.1f} s; drift {r['drift']}; peak RSS so far {r['peak_rss_gb']:.2f} GB")


if __name__ == "__main__":
    main()
