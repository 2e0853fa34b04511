"""Prints the quantization tables of docs/BENCHMARKS.md (issue 5).

    python benchmarks/quantization.py [--phase all|accuracy|compile|latency|table] [--out build/quantization]
                                      [--max-tokens 4096] [--stride 128] [--samples 16] [--repeats 20]

Formats (every quantized one with embeddings=true: the int8 embedding table, which a tied lm_head
such as SmolLM2's reads too; without it that table, a fifth of SmolLM2, stays fp32):
  fp32          the traced model
  int8          quantize(weights=int8): int8 weights per row, fp32 activations (rtn)
  W8A8 sq       quantize(acts=int8,method=smoothquant): int8 weights and per-token dynamic int8
                activations after SmoothQuant, alpha=auto (the alpha chosen is shown)
  W8A8 rtn      the same without smoothing
  int4 g128     quantize(weights=int4,group=128) with method rtn, gptq, awq; symmetric, float16
                scales; a K that 128 does not divide (SmolLM2's 576) uses the largest even divisor
                below it (96), as the pass notes; "asym": sym=false (a zero point per group: in the
                artifact no bigger, since the kernels store zero points for symmetric groups too)
  composed      structure passes then W8A8 SmoothQuant (COMPOSED below): SmolLM2 drops 4 attention
                sub-blocks, prunes a third of the query heads in every KV group and heals 20 steps;
                MiniLM drops 1 attention sub-block, prunes 25 % of the heads and heals 20 steps
Calibration: --samples windows of 128 tokens from the second half of wikitext-2 valid.txt
($TCC_CALIBRATION_TEXT, set by _suite.py unless given; tcc.compress.calibration.text_feeds, seed 0).

accuracy  SmolLM2-135M perplexity on ../shared/data/wikitext-2/test.txt: the first --max-tokens
          (4096) tokens, windows of 128, stride --stride (128: windows do not overlap), measured
          on the quantized Program in PyTorch (the ops' reference implementations, which the
          compiled kernels match within 1e-5: tests/test_quant_lowering.py). MiniLM-L6 (K = 384
          and 1536: group 128 divides both): cosine of the mean-pooled embedding vs the fp32 model
          on the first 64 sentences of test.txt, seq 128. Weight bytes: the quantized Program's
          parameters (codes, scales, zero points, and what stays fp32: norms, biases).
compile   every format compiled for x86 at seq 128 (tcc.compile, same calibration) into OUT
latency   (run it on an idle machine) each compiled artifact timed by tcc.bench.bench(artifact):
          the artifact beside PyTorch eager and ONNX Runtime fp32 and ORT quantize_dynamic int8 of the unquantized model, in
          one process, batch 1, --repeats calls after 3 warm-up calls; weight bytes of the
          artifact (packed kernels' layouts, as stored).

Results are appended to OUT/results.jsonl as they come (a rerun skips what is there); the tables
are printed as markdown.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _results import Results  # benchmarks/ is on sys.path when run as a script
from _suite import SEQ, add_arguments, latency_cells, run_phases

# (name, method shown, pipeline); the same for both models
FORMATS = [
    ("fp32", "-", ""),
    ("int8", "rtn", "quantize(weights=int8,embeddings=true)"),
    ("W8A8", "smoothquant", "quantize(acts=int8,method=smoothquant,embeddings=true)"),
    ("W8A8", "rtn", "quantize(acts=int8,embeddings=true)"),
    ("int4 g128", "rtn", "quantize(weights=int4,group=128,embeddings=true)"),
    ("int4 g128", "gptq", "quantize(weights=int4,group=128,method=gptq,embeddings=true)"),
    ("int4 g128", "awq", "quantize(weights=int4,group=128,method=awq,embeddings=true)"),
    ("int4 g128 asym", "rtn", "quantize(weights=int4,group=128,sym=false,embeddings=true)"),
    ("int4 g128 asym", "gptq", "quantize(weights=int4,group=128,sym=false,method=gptq,embeddings=true)"),
]
# the structure passes composed with quantization: one row with size, latency and accuracy together
COMPOSED = {
    "smollm2": ("drop-attention(count=4),prune-heads(mode=query,ratio=0.34),heal(steps=20),"
                "quantize(acts=int8,method=smoothquant,embeddings=true)"),
    "minilm": "drop-attention(count=1),prune-heads(ratio=0.25),heal(steps=20),quantize(acts=int8,method=smoothquant,embeddings=true)",
}
MODELS = {m: fs + [("composed", "smoothquant", COMPOSED[m])]
          for m, fs in {"smollm2": FORMATS, "minilm": [f for f in FORMATS if f[1] != "awq"]}.items()}


def _details(d: dict) -> dict:
    """The quantize pass's choices worth a table note."""
    return {"group_fallback": d.get("group_fallback") or [], "alpha": (d.get("alpha_search") or {}).get("chosen"),
            "alpha_losses": (d.get("alpha_search") or {}).get("losses")}


# -- tables -----------------------------------------------------------------------------------------------

def tables(res: Results, a) -> str:
    lines = []
    for model, formats in MODELS.items():
        acc = {(f, m): res.get(model=model, kind="accuracy", format=f, method=m) for f, m, _ in formats}
        lat = {(f, m): res.get(model=model, kind="latency", format=f, method=m) for f, m, _ in formats}
        fp = acc[("fp32", "-")]
        if not fp:
            continue
        if model == "smollm2":
            lines.append(f"SmolLM2-135M: perplexity on wikitext-2 test.txt, first {a.max_tokens} tokens, windows of "
                         f"{SEQ}, stride {fp['stride']} ({fp['windows']} windows); calibration {a.samples} windows of "
                         f"valid.txt; embeddings=true for every quantized format.")
            head = "| format | method | perplexity | vs fp32 |"
        else:
            lines.append(f"MiniLM-L6: cosine of mean-pooled embeddings vs fp32, {fp['samples']} sentences of "
                         f"test.txt, seq {SEQ}; embeddings=true for every quantized format.")
            head = "| format | method | cosine mean | cosine min |"
        lines += [head + " weights MB | × fp32 | tcc ms | PyTorch ms | ORT fp32 ms | ORT int8 ms | vs ORT fp32 | "
                  "vs ORT int8 |", "| --- | --- |" + " ---: |" * 10]
        for f, m, _ in formats:
            r, L = acc[(f, m)], lat[(f, m)]
            if not r:
                continue
            name = f + (f" (α={r['alpha']})" if r.get("alpha") is not None else "")
            if model == "smollm2":
                cells = f"{r['perplexity']:.2f} | {r['perplexity'] / fp['perplexity'] - 1:+.1%}"
            else:
                cells = f"{r['cosine']:.4f} | {r['cosine_min']:.4f}"
            size = L["sizes"]["weight_bytes"] if L else r["param_bytes"]
            cells += f" | {size / 1e6:.1f} | {size / fp['param_bytes']:.3f}" + latency_cells(L)
            lines.append(f"| {name} | {m} | {cells} |")
        fallback = sorted({g for r in acc.values() if r for g in r["group_fallback"]})
        if fallback:
            lines.append(f"\nint4: {'; '.join(fallback)} (the largest even divisor of K below 128).")
        sq = acc.get(("W8A8", "smoothquant"))
        if sq and sq.get("alpha_losses"):
            if "kl" in sq["alpha_losses"][0]:
                per = ", ".join(f"{x['alpha']}: {x['kl']:.4f} ({x['loss']:.4f})" for x in sq["alpha_losses"])
                what = "mean KL to fp32 of the next-token distributions (the choice; cross-entropy on the text)"
            else:
                per = ", ".join(f"{x['alpha']}: {x['loss']:.4f}" for x in sq["alpha_losses"])
                what = "1 - cosine to fp32"
            lines.append(f"\nSmoothQuant alpha=auto on 8 calibration windows, {what} per alpha: {per}.")
        lines.append("\nWeights MB: the artifact's stored weights where the latency phase ran, else the quantized "
                     "Program's parameters. Latency: median of the bench calls, batch 1, seq 128."
                     if any(lat.values()) else "\nWeights MB: the quantized Program's parameters.")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    add_arguments(ap, "build/quantization")
    a = ap.parse_args()
    res = Results(Path(a.out) / "results.jsonl")
    run_phases(res, a, MODELS, _details)
    print(tables(res, a))
    return 0


if __name__ == "__main__":
    sys.exit(main())
