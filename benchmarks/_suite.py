"""The phases the compression benchmarks share (quantization.py, sparsity.py): each model's formats,
given as (format, method, pipeline text), are measured for accuracy on the Program in PyTorch,
compiled for x86, then timed beside PyTorch and ONNX Runtime. Results go to a Results store (a rerun
skips what is there).

accuracy  SmolLM2-135M: perplexity on wikitext-2 test.txt (first --max-tokens tokens, windows of 128,
          stride --stride); MiniLM-L6: cosine of the mean-pooled embedding vs the fp32 model on the
          first 64 sentences of test.txt, seq 128. Calibration: --samples windows of 128 tokens of
          valid.txt (tcc.compress.calibration.text_feeds, seed 0), the same for every format.
compile   tcc.compile(model, "native", seq_len=128, same calibration) into OUT/<model>-<format>-<method>
latency   (an idle machine) tcc.bench.bench(artifact): the artifact, PyTorch eager, ONNX Runtime fp32
          and ORT quantize_dynamic int8 of the unpruned fp32 model, in one process, batch 1,
          --repeats calls after 3 warm-up calls; the artifact's stored weight bytes.
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Callable

from _results import Results

ROOT = Path(__file__).resolve().parent.parent
TEST = (ROOT / ".." / "shared" / "data" / "wikitext-2" / "test.txt").resolve()
# the figures in docs/BENCHMARKS.md calibrate on wikitext-2 valid.txt, not tcc's shipped default text
os.environ.setdefault("TCC_CALIBRATION_TEXT", str(TEST.with_name("valid.txt")))
SEQ = 128
Formats = dict[str, list[tuple[str, str, str]]]  # model -> [(format, method, pipeline text)]


def with_samples(text: str, samples: int) -> str:
    """The pipeline with the calibration sample count on each pass that calibrates by samples."""
    return re.sub(r"((?:quantize|sparsify)\([^)]*)\)", rf"\1,samples={samples})", text)


def accuracy(res: Results, a, models: Formats, details: Callable[[dict], dict] = lambda d: {}) -> None:
    """`details(last pass record details) -> extra row fields`."""
    import tcc
    from tcc.compress.calibration import text_feeds
    from tcc.evaluate import cosine, perplexity
    from tcc.pipeline import PassContext, Pipeline

    for model, formats in models.items():
        todo = [f for f in formats if not res.get(model=model, kind="accuracy", format=f[0], method=f[1])]
        if not todo:
            continue
        base = tcc.trace(model, seq_len=SEQ)
        base = Pipeline.parse("dce").run(base)
        calibration = text_feeds(base, n_samples=a.samples)
        for fmt, method, text in todo:
            program, extra, seconds = base, {}, 0.0
            if text:
                ctx = PassContext(calibration=calibration, check_feeds=1)
                t0 = time.perf_counter()
                program = Pipeline.parse(with_samples(text, a.samples)).run(base.clone(), ctx)
                seconds = time.perf_counter() - t0
                extra = details(ctx.records[-1]["details"])
            row = {"model": model, "kind": "accuracy", "format": fmt, "method": method, "pipeline": text,
                   "param_bytes": program.param_bytes(), "fp32_param_bytes": base.param_bytes(),
                   "pass_seconds": round(seconds, 1), **extra}
            if model == "smollm2":
                r = perplexity(program, base.tokenizer_dir, TEST, SEQ, a.max_tokens, a.stride)
                row.update(perplexity=r["value"], tokens=r["tokens"], windows=r["windows"], stride=r["stride"])
            else:
                r = cosine(program, base, base.tokenizer_dir, TEST, SEQ, 64)
                row.update(cosine=r["value"], cosine_min=r["min"], samples=r["samples"])
            res.add(row)
            del program


def artifact(a, model: str, fmt: str, method: str) -> Path:
    return Path(a.out) / re.sub(r"[^A-Za-z0-9]+", "-", f"{model}-{fmt}-{method}").strip("-")


def compile_all(res: Results, a, models: Formats) -> None:
    """Every format compiled for x86 at seq 128 (kept on disk; the latency phase times them)."""
    import json

    import tcc

    for model, formats in models.items():
        for fmt, method, text in formats:
            out = artifact(a, model, fmt, method)
            if (out / "manifest.json").exists() and res.get(model=model, kind="compile", format=fmt, method=method):
                continue
            t0 = time.perf_counter()
            tcc.compile(model, "native", out=out, pipeline=with_samples(text, a.samples), seq_len=SEQ,
                        calibration_samples=a.samples).close()
            manifest = json.loads((out / "manifest.json").read_text())
            res.add({"model": model, "kind": "compile", "format": fmt, "method": method, "pipeline": text,
                     "compile_s": round(time.perf_counter() - t0, 1), "sizes": manifest["sizes"],
                     "sparsity": manifest.get("sparsity", [])})


def latency(res: Results, a, models: Formats) -> None:
    """Times each compiled artifact beside PyTorch and ONNX Runtime (run on an idle machine)."""
    from tcc.bench import bench

    for model, formats in models.items():
        for fmt, method, text in formats:
            out = artifact(a, model, fmt, method)
            if res.get(model=model, kind="latency", format=fmt, method=method) or not (out / "manifest.json").exists():
                continue
            r = bench(out, repeats=a.repeats, warmup=3, hf=False)
            res.add({"model": model, "kind": "latency", "format": fmt, "method": method, "pipeline": text,
                     "engines": r["engines"], "skipped": r["skipped"], "sizes": r["sizes"], "host": r["host"]})


def add_arguments(ap, out: str) -> None:
    ap.add_argument("--phase", default="all", choices=("all", "accuracy", "compile", "latency", "table"))
    ap.add_argument("--out", default=out)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--stride", type=int, default=128, help="perplexity window stride (128: windows do not overlap)")
    ap.add_argument("--samples", type=int, default=16, help="calibration windows")
    ap.add_argument("--repeats", type=int, default=20)


def run_phases(res: Results, a, models: Formats, details: Callable[[dict], dict] = lambda d: {},
               timed: Formats | None = None) -> None:
    """accuracy for `models`; compile and latency for `timed` (default: the same)."""
    if a.phase in ("all", "accuracy"):
        accuracy(res, a, models, details)
    if a.phase in ("all", "compile"):
        compile_all(res, a, timed or models)
    if a.phase in ("all", "latency"):
        latency(res, a, timed or models)


def latency_cells(L: dict | None) -> str:
    """tcc / PyTorch / ORT fp32 / ORT int8 median ms and the ratios vs ORT, as table cells."""
    if not L:
        return " | – | – | – | – | – | –"
    e = L["engines"]
    ms = lambda k: e[k]["median_ms"] if k in e else float("nan")
    t, o, o8 = ms("tcc"), ms("onnxruntime"), ms("onnxruntime-int8")
    return f" | {t:.1f} | {ms('pytorch'):.1f} | {o:.1f} | {o8:.1f} | {o / t:.2f}× | {o8 / t:.2f}×"
