"""Prints the presets table of docs/PIPELINES.md: each tcc.pipeline.presets preset on MiniLM-L6 and SmolLM2-135M.

    python benchmarks/presets.py [--phase accuracy|all|compile|latency|table] [--out build/presets]
                                 [--max-tokens 4096] [--stride 128] [--samples 16] [--repeats 20]
                                 [--presets q4,q4-fast] [--models minilm,smollm2]

The phases are benchmarks/_suite.py's, with the formats being the presets' pipelines (the same
measurement as benchmarks/quantization.py: SmolLM2 perplexity on the first 4096 tokens of
wikitext-2 test.txt, windows of 128; MiniLM cosine of the mean-pooled embedding vs fp32 on 64
sentences of test.txt, seq 128; calibration 16 windows of valid.txt). The default phase is accuracy
only (on the quantized Program in PyTorch); --phase all also compiles each preset for this host and
times it beside PyTorch and ONNX Runtime (run that on an idle machine).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _results import Results  # benchmarks/ is on sys.path when run as a script
from _suite import SEQ, add_arguments, latency_cells, run_phases

# ... and then off it: benchmarks/kernels.py would shadow the `kernels` package transformers imports
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from tcc.pipeline.presets import PRESETS

FORMATS = [("fp32", "-", "")] + [(name, "preset", p.pipeline) for name, p in PRESETS.items()]
MODELS = {"smollm2": FORMATS, "minilm": FORMATS}


def tables(res: Results, a) -> str:
    lines = []
    for model, formats in MODELS.items():
        acc = {f: res.get(model=model, kind="accuracy", format=f) for f, _, _ in formats}
        lat = {f: res.get(model=model, kind="latency", format=f) for f, _, _ in formats}
        fp = acc["fp32"]
        if not fp:
            continue
        metric = "perplexity | vs fp32" if model == "smollm2" else "cosine mean | cosine min"
        lines += [f"{model}: seq {SEQ}, calibration {a.samples} windows of valid.txt",
                  f"| preset | {metric} | weights MB | × fp32 | tcc ms | PyTorch ms | ORT fp32 ms | ORT int8 ms | "
                  "vs ORT fp32 | vs ORT int8 |", "| --- |" + " ---: |" * 10]
        for f, _, _ in formats:
            r, L = acc[f], lat[f]
            if not r:
                continue
            cells = (f"{r['perplexity']:.2f} | {r['perplexity'] / fp['perplexity'] - 1:+.1%}" if model == "smollm2"
                     else f"{r['cosine']:.4f} | {r['cosine_min']:.4f}")
            size = L["sizes"]["weight_bytes"] if L else r["param_bytes"]
            lines.append(f"| {f} | {cells} | {size / 1e6:.1f} | {size / fp['param_bytes']:.3f}{latency_cells(L)} |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    add_arguments(ap, "build/presets")
    ap.add_argument("--presets", default=",".join(PRESETS), help="which presets (fp32 is always measured)")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.set_defaults(phase="accuracy")
    a = ap.parse_args()
    res = Results(Path(a.out) / "results.jsonl")
    chosen = {"fp32", *a.presets.split(",")}
    run_phases(res, a, {m: [f for f in MODELS[m] if f[0] in chosen] for m in a.models.split(",")})
    print(tables(res, a))
    return 0


if __name__ == "__main__":
    sys.exit(main())
