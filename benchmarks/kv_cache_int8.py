"""Prints the "KV cache int8 (issue 15)" table of docs/BENCHMARKS.md: SmolLM2-135M with an fp32 and an
int8 KV cache (`--kv-cache int8`: int8 codes, one float32 scale per KV head and position), the same
weights otherwise: cache bytes, decode tokens per second at 2,048 tokens of context, and perplexity
through the KV cache, measured in one run.

    python benchmarks/kv_cache_int8.py [--out build/kv_cache_int8] [--weights fp32,W8A8] [--decode 64]
                                       [--repeats 3] [--ppl-tokens 4096] [--ppl-weights fp32]
                                       [--phase all|compile|measure|table]

Artifacts: tcc.compile("smollm2", "native", seq_len=128, max_context=2048, kv_cache=...) for each
weight format (fp32: no passes; W8A8: quantize(acts=int8,method=smoothquant,embeddings=true),
calibrated on wikitext-2 valid.txt) and each cache (fp32, int8).
Decode: the first 2048 - DECODE tokens of wikitext-2 test.txt are prefilled (chunks of 128), then
DECODE greedy decode steps run at positions 2048 - DECODE .. 2047 (the context nearly full); tokens
per second = DECODE / their seconds. Best of --repeats, the two caches of one weight format
alternated within each repeat (the machine may be shared: compare the ratio, measured side by side).
Perplexity: test.txt's first --ppl-tokens tokens, windows of 2048, stride 1024, every scored token
predicted by one decode step over the cache (tcc.evaluate.perplexity_cached: `tcc eval --kv-cache`).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from _results import Results  # benchmarks/ is on sys.path when run as a script

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

ROOT = Path(__file__).resolve().parents[1]
TEST = ROOT.parent / "shared" / "data" / "wikitext-2" / "test.txt"
os.environ.setdefault("TCC_CALIBRATION_TEXT", str(TEST.with_name("valid.txt")))
WEIGHTS = {"fp32": "", "W8A8": "quantize(acts=int8,method=smoothquant,embeddings=true)"}
CONTEXT, CHUNK = 2048, 128


def artifact(out: Path, weights: str, cache: str) -> Path:
    return out / f"smollm2-{weights}-{cache}"


def compile_all(out: Path, weights: list[str]) -> None:
    import tcc
    for w in weights:
        for cache in ("fp32", "int8"):
            path = artifact(out, w, cache)
            if (path / "manifest.json").exists():
                continue
            tcc.compile("smollm2", "native", out=path, pipeline=WEIGHTS[w], seq_len=CHUNK, max_context=CONTEXT,
                        kv_cache=cache, latency=False).close()


def decode_rate(art, ids: list[int], steps: int) -> float:
    """Prefill ids, then `steps` greedy decode steps; tokens per second of the decode."""
    from tcc.generation import prefill_prompt
    s = art.session()
    logits = prefill_prompt(s.prefill, ids, s.chunk, s.max_context)
    pos = len(ids)
    t0 = time.perf_counter()
    for _ in range(steps):
        logits = s.decode(int(np.argmax(logits)), pos)
        pos += 1
    return steps / (time.perf_counter() - t0)


def cpu_name() -> str:
    return next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))


def measure(out: Path, weights: list[str], a) -> None:
    import tcc
    from tcc.evaluate import load_tokenizer, perplexity_cached, tokenize_prefix
    res = Results(out / "results.jsonl")
    tok = load_tokenizer(artifact(out, weights[0], "fp32") / "tokenizer")
    prompt = [int(t) for t in tokenize_prefix(tok, TEST, CONTEXT - a.decode)]
    for w in weights:
        arts = {c: tcc.load(artifact(out, w, c)) for c in ("fp32", "int8")}
        if not res.get(kind="decode", weights=w):
            decode_rate(arts["int8"], prompt[:CHUNK], 4)  # warm-up
            decode_rate(arts["fp32"], prompt[:CHUNK], 4)
            best = {"fp32": 0.0, "int8": 0.0}
            for _ in range(a.repeats):
                for c in ("fp32", "int8"):
                    best[c] = max(best[c], decode_rate(arts[c], prompt, a.decode))
            gen = {c: arts[c].manifest["generation"] for c in arts}
            res.add({"kind": "decode", "weights": w, "context": CONTEXT, "decode_tokens": a.decode,
                     "tok_s_fp32": round(best["fp32"], 1), "tok_s_int8": round(best["int8"], 1),
                     "speedup": round(best["int8"] / best["fp32"], 3),
                     "cache_bytes_fp32": gen["fp32"]["cache_bytes"], "cache_bytes_int8": gen["int8"]["cache_bytes"],
                     "weight_bytes": arts["fp32"].manifest["sizes"]["weight_bytes"], "cpu": cpu_name(),
                     "threads": os.environ.get("TVM_NUM_THREADS", "TVM default")})
        if w in a.ppl_weights and not res.get(kind="perplexity", weights=w):
            ids = tokenize_prefix(tok, TEST, a.ppl_tokens)
            row = {"kind": "perplexity", "weights": w, "tokens": a.ppl_tokens, "window": CONTEXT}
            for c in ("fp32", "int8"):
                t0 = time.perf_counter()
                r = perplexity_cached(arts[c].session, ids, CONTEXT, CHUNK)
                row.update({f"ppl_{c}": round(r["value"], 4), f"seconds_{c}": round(time.perf_counter() - t0, 1),
                            "scored": r["tokens"]})
            row["ratio"] = round(row["ppl_int8"] / row["ppl_fp32"], 5)
            res.add(row)
        for art in arts.values():
            art.close()


def table(out: Path) -> None:
    res = Results(out / "results.jsonl")
    print("| weights | cache | cache MB at 2,048 | decode tok/s at 2,048 | perplexity (through the cache) |")
    print("| --- | --- | ---: | ---: | ---: |")
    for d in (r for r in res.rows if r["kind"] == "decode"):
        p = res.get(kind="perplexity", weights=d["weights"]) or {}
        for c in ("fp32", "int8"):
            ppl = f"{p[f'ppl_{c}']:.3f}" if p else "–"
            print(f"| {d['weights']} | {c} | {d[f'cache_bytes_{c}'] / 1e6:.1f} | {d[f'tok_s_{c}']} | {ppl} |")
    for d in (r for r in res.rows if r["kind"] == "decode"):
        print(f"{d['weights']}: int8 / fp32 cache decode {d['speedup']}x, bytes "
              f"{d['cache_bytes_int8'] / d['cache_bytes_fp32']:.4f}x; CPU {d['cpu']}, threads {d['threads']}")
    for p in (r for r in res.rows if r["kind"] == "perplexity"):
        print(f"{p['weights']}: perplexity int8 / fp32 cache {p['ratio']} over {p['scored']} scored tokens "
              f"({p['seconds_fp32']} s / {p['seconds_int8']} s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "kv_cache_int8")
    ap.add_argument("--weights", default="fp32,W8A8")
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ppl-tokens", type=int, default=4096)
    ap.add_argument("--ppl-weights", default="fp32")
    ap.add_argument("--phase", choices=("all", "compile", "measure", "table"), default="all")
    a = ap.parse_args()
    a.ppl_weights = a.ppl_weights.split(",")
    weights = a.weights.split(",")
    if a.phase in ("all", "compile"):
        compile_all(a.out, weights)
    if a.phase in ("all", "measure"):
        measure(a.out, weights, a)
    if a.phase in ("all", "table"):
        table(a.out)


if __name__ == "__main__":
    main()
