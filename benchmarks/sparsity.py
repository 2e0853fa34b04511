"""Prints the sparsity tables of docs/BENCHMARKS.md (issue 6).

    python benchmarks/sparsity.py [--phase all|accuracy|compile|latency|table] [--out build/sparsity]
                                  [--max-tokens 4096] [--stride 128] [--samples 16] [--repeats 20]

Formats (the `sparsify` pass on every linear inside the transformer blocks; embeddings and lm_head
stay dense), each with method magnitude, wanda and sparsegpt:
  50% unstructured   sparsify(pattern=unstructured,sparsity=0.5): half of each output row's weights
  2:4                sparsify(pattern=2:4): two of every four consecutive inputs of each row
  block 1x16 50%     sparsify(pattern=block,block=1x16,sparsity=0.5): whole runs of 16 inputs
  block 1x16 75%     the same at 75 %: above the block-sparse kernel's crossover on this CPU, so
                     the artifact runs tcc_dense_bsr (below it, block weights are stored compressed
                     and run dense)
  2:4 + int8         2:4 sparsegpt, then quantize(weights=int8): sparse int8 codes, stored compressed
  sparsegpt+heal     the sparsegpt rows followed by heal(steps=50): distillation from the dense model
                     on valid.txt windows, the pruned weights held at zero
Compiled and timed: the dense model and the sparsegpt row of each pattern (the kernel depends on
the pattern, not on the method). The phases, calibration and accuracy measures are benchmarks/_suite.py's (perplexity on test.txt
for SmolLM2, embedding cosine for MiniLM; calibration from valid.txt). Weight bytes: the artifact's
(compressed storage where the backend chose it, see each artifact's manifest "sparsity").
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _results import Results  # benchmarks/ is on sys.path when run as a script
from _suite import SEQ, add_arguments, latency_cells, run_phases

METHODS = ("magnitude", "wanda", "sparsegpt")
PATTERNS = [
    ("50% unstructured", "pattern=unstructured,sparsity=0.5"),
    ("2:4", "pattern=2:4"),
    ("block 1x16 50%", "pattern=block,block=1x16,sparsity=0.5"),
    ("block 1x16 75%", "pattern=block,block=1x16,sparsity=0.75"),
]
FORMATS = [("dense", "-", "")] + [(name, m, f"sparsify({opts},method={m})") for name, opts in PATTERNS for m in METHODS] \
    + [("2:4 + int8", "sparsegpt", "sparsify(pattern=2:4,method=sparsegpt),quantize(weights=int8)")] \
    + [(name, "sparsegpt+heal", f"sparsify({opts},method=sparsegpt),heal(steps=50)") for name, opts in PATTERNS[:3]]
MODELS = {"smollm2": FORMATS, "minilm": FORMATS}
# compiled and timed: the kernel depends on the pattern, not the method, so one method per pattern
TIMED = {m: [f for f in fs if f[1] in ("-", "sparsegpt")] for m, fs in MODELS.items()}


def _details(d: dict) -> dict:
    return {"achieved": d.get("sparsity") or d.get("overall_sparsity")}


def tables(res: Results, a) -> str:
    lines = []
    for model, formats in MODELS.items():
        fp = res.get(model=model, kind="accuracy", format="dense", method="-")
        if not fp:
            continue
        if model == "smollm2":
            lines.append(f"SmolLM2-135M: perplexity on wikitext-2 test.txt, first {a.max_tokens} tokens, windows of {SEQ}, "
                         f"stride {fp['stride']}; calibration {a.samples} windows of valid.txt.")
            head = "| format | method | perplexity | vs dense |"
        else:
            lines.append(f"MiniLM-L6: cosine of mean-pooled embeddings vs dense, {fp['samples']} sentences of test.txt, "
                         f"seq {SEQ}.")
            head = "| format | method | cosine mean | cosine min |"
        lines += [head + " weights MB | × dense | kernel | tcc ms | PyTorch ms | ORT fp32 ms | ORT int8 ms | "
                  "vs ORT fp32 | vs ORT int8 |", "| --- | --- |" + " ---: |" * 4 + " --- |" + " ---: |" * 6]
        for f, m, _ in formats:
            r = res.get(model=model, kind="accuracy", format=f, method=m)
            if not r:
                continue
            C = res.get(model=model, kind="compile", format=f, method=m)
            L = res.get(model=model, kind="latency", format=f, method=m)
            if model == "smollm2":
                cells = f"{r['perplexity']:.2f} | {r['perplexity'] / fp['perplexity'] - 1:+.1%}"
            else:
                cells = f"{r['cosine']:.4f} | {r['cosine_min']:.4f}"
            size = (L or C or {}).get("sizes", {}).get("weight_bytes") or r["param_bytes"]
            base = (res.get(model=model, kind="compile", format="dense", method="-") or {}).get("sizes", {}).get(
                "weight_bytes") or fp["param_bytes"]
            kernels = sorted({s["storage"] for s in (C or {}).get("sparsity", [])}) or ["–"]
            cells += f" | {size / 1e6:.1f} | {size / base:.3f} | {'+'.join(kernels)}" + latency_cells(L)
            lines.append(f"| {f} | {m} | {cells} |")
        lines.append("\nkernel: how the x86 artifact stores and runs the sparse weights (bsr: tcc_dense_bsr skips "
                     "zero blocks; bitmask: nonzeros + 1 bit per weight, restored per call, run dense: smaller, "
                     "not faster). Weights MB: the artifact's where compiled, else the Program's parameters.\n")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    add_arguments(ap, "build/sparsity")
    a = ap.parse_args()
    res = Results(Path(a.out) / "results.jsonl")
    run_phases(res, a, MODELS, _details, TIMED)
    print(tables(res, a))
    return 0


if __name__ == "__main__":
    sys.exit(main())
