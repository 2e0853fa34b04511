"""Prints the "Analysis that scales (issue 15)" figures of docs/BENCHMARKS.md.

    python benchmarks/analysis_scale.py [--phase all|compile|choice|batching|llama1b] [--out build/analysis_scale]

compile   `tcc compile smollm2 --seq-len 512 -p 'analyze-redundancy,drop-attention(count=8)'` in a
          subprocess (TCC_CALIBRATION_TEXT=wikitext-2 valid.txt): wall time, the report's per-stage seconds and peak RSS, the analysis's own
          seconds and what it measured (the pass record).
choice    SmolLM2 traced as compile traces it (--seq-len 512, dynamic length), its 8 calibration
          windows of 512 tokens: the attentions drop-attention(count=8) picks from the analysis on
          full 512-token windows (before) and on their first 256 tokens (window=256, the default),
          and perplexity on ../shared/data/wikitext-2/test.txt (first --ppl-tokens tokens, default
          4096, windows of 512, stride 512) of each choice and of 8 attentions drawn at random from blocks 1..28
          (seeds 0, 1, 2), beside the unpruned model.
batching  the loss increases of the 30 attentions (one calibration window), one partial run per
          change (batch=1) vs 8 per vmap-batched forward (batch=8), at 512 and 256 tokens: wall and
          CPU seconds of the analysis.
llama1b   /tmp/scale/llama1b-float32 (run under `flock /tmp/tcc-bigmem.lock`): traced with a dynamic
          length, then `analyze-redundancy,drop-attention(count=8)` on 8 windows of the default
          calibration text: the analysis's seconds and its own peak RSS (tcc.memory).

Results are appended to OUT/results.jsonl (a rerun skips what is there). CPU seconds are the
process's (user + system), steadier than wall time on a shared machine.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TEST = (ROOT / ".." / "shared" / "data" / "wikitext-2" / "test.txt").resolve()
PIPELINE = "analyze-redundancy,drop-attention(count=8)"
# tcc's own calibration text holds fewer than 8 windows of 512 tokens: wikitext-2 valid.txt, as
# benchmarks/elimination.py calibrates
os.environ.setdefault("TCC_CALIBRATION_TEXT", str(TEST.with_name("valid.txt")))

from _results import Results  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

# benchmarks/kernels.py would shadow the `kernels` package transformers imports
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def compile_phase(res: Results) -> None:
    if res.get(phase="compile"):
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "art"
        cmd = ["tcc", "compile", "smollm2", "--seq-len", "512", "-p", PIPELINE, "-o", str(out)]
        t0, c0 = time.perf_counter(), os.times()
        subprocess.run(cmd, check=True)
        wall, c1 = time.perf_counter() - t0, os.times()
        report = json.loads((out / "report.json").read_text())
    record = {r["name"]: r for r in report["passes"]}
    res.add({"phase": "compile", "command": " ".join(cmd), "wall_s": round(wall, 1),
             "cpu_s": round(c1.children_user + c1.children_system - c0.children_user - c0.children_system, 1),
             "run": report.get("run"),
             "analysis": {k: record["analyze-redundancy"]["details"].get(k)
                          for k in ("seconds", "measured", "measured_for", "calibration")},
             "dropped": [d["index"] for d in record["drop-attention"]["details"]["dropped"]]})


def _smollm2():
    import tcc
    from tcc.compress.calibration import calibration_data
    program = tcc.trace("smollm2", seq_len=512, max_seq_len=1024)  # as `tcc compile --seq-len 512` traces it
    return program, calibration_data(program, None, n_samples=8)


def choice_phase(res: Results, ppl_tokens: int) -> None:
    if res.get(phase="choice", choice="random-2"):
        return
    from tcc.evaluate import perplexity
    from tcc.passes.analyze_redundancy import analyze
    from tcc.pipeline import PassContext, Pipeline

    program, feeds = _smollm2()
    n_blocks = len(program.info.blocks)
    ppl = lambda p: perplexity(p, program.tokenizer_dir, TEST, 512, ppl_tokens, 512)["value"]
    if not res.get(phase="choice", choice="none"):
        res.add({"phase": "choice", "choice": "none", "perplexity": ppl(program)})
    todo = {}
    for name, window in (("analysis-512", 0), ("analysis-256", 256)):
        t0, c0 = time.perf_counter(), time.process_time()
        report = analyze(program, feeds, heads=False, loss=False, window=window, source="8 compile windows")
        seconds = (time.perf_counter() - t0, time.process_time() - c0)
        todo[name] = (f"drop-attention(count=8)", report, seconds)
    for seed in (0, 1, 2):
        rng = np.random.default_rng(1000 * seed + 8)
        layers = sorted(rng.choice(np.arange(1, n_blocks - 1), size=8, replace=False).tolist())
        todo[f"random-{seed}"] = (f"drop-attention(layers={layers})", None, None)
    for name, (text, report, seconds) in todo.items():
        if res.get(phase="choice", choice=name):
            continue
        ctx = PassContext(report={"analyze-redundancy": report} if report else {}, check_feeds=1)
        pruned = Pipeline.parse(text).run(program.clone(), ctx)
        dropped = [d["index"] for d in ctx.records[0]["details"]["dropped"]]
        row = {"phase": "choice", "choice": name, "dropped": dropped, "perplexity": ppl(pruned)}
        if seconds:
            row.update(analysis_s=round(seconds[0], 1), analysis_cpu_s=round(seconds[1], 1))
        res.add(row)


def batching_phase(res: Results, windows: list[int]) -> None:
    from tcc.passes.analyze_redundancy import analyze
    program, feeds = _smollm2()
    for window in windows:
        for batch in (1, 8):
            if res.get(phase="batching", window=window, batch=batch):
                continue
            t0, c0 = time.perf_counter(), time.process_time()
            report = analyze(program, feeds[:1], heads=False, loss=True, loss_parts=("attention",), window=window,
                             batch=batch)
            res.add({"phase": "batching", "window": window, "batch": batch, "partial_runs": 30,
                     "wall_s": round(time.perf_counter() - t0, 1), "cpu_s": round(time.process_time() - c0, 1),
                     "loss_increase": [b["loss_increase"]["attention"] for b in report["blocks"]]})


def llama1b_phase(res: Results, path: str) -> None:
    if res.get(phase="llama1b", traced_seq_len=512):
        return
    import tcc
    from tcc import memory
    from tcc.compress.calibration import calibration_data
    from tcc.pipeline import PassContext, Pipeline
    t0 = time.perf_counter()
    program = tcc.trace(path, seq_len=512, max_seq_len=1024)  # calibration windows of 512, analysed on 256
    trace_s = time.perf_counter() - t0
    weights = program.param_bytes()
    feeds = calibration_data(program, None, n_samples=8)
    ctx = PassContext(calibration=feeds, check_feeds=1)
    with memory.recording() as steps:
        t0, c0 = time.perf_counter(), time.process_time()
        program = Pipeline.parse(PIPELINE).run(program, ctx, in_place=True)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    rec = ctx.records[0]["details"]
    res.add({"phase": "llama1b", "model": path, "traced_seq_len": 512, "trace_s": round(trace_s, 1), "pipeline_s": round(wall, 1),
             "pipeline_cpu_s": round(cpu, 1), "analysis_s": rec["seconds"], "measured": rec["measured"],
             "calibration": rec["calibration"], "analysis_peak_gb": steps["analyze-redundancy"]["peak_gb"],
             "weights_gb": round(weights / 1e9, 3),
             "dropped": [d["index"] for d in ctx.records[1]["details"]["dropped"]]})


def table(res: Results) -> None:
    for r in res.rows:
        print(json.dumps(r))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--phase", default="all", choices=("all", "compile", "choice", "batching", "llama1b", "table"))
    ap.add_argument("--out", default=str(ROOT / "build" / "analysis_scale"))
    ap.add_argument("--llama1b", default="/tmp/scale/llama1b-float32")
    ap.add_argument("--ppl-tokens", type=int, default=4096, help="test.txt tokens for the perplexities (windows of 512)")
    ap.add_argument("--batching-windows", type=int, nargs="+", default=[512, 256])
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    res = Results(Path(a.out) / "results.jsonl")
    phases = ("compile", "choice", "batching", "llama1b") if a.phase == "all" else (a.phase,)
    for phase in phases:
        if phase == "compile":
            compile_phase(res)
        elif phase == "choice":
            choice_phase(res, a.ppl_tokens)
        elif phase == "batching":
            batching_phase(res, a.batching_windows)
        elif phase == "llama1b":
            llama1b_phase(res, a.llama1b)
    table(res)


if __name__ == "__main__":
    sys.exit(main())
