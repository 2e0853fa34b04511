"""Prints the `rotate` table of docs/BENCHMARKS.md (issue 18): SmolLM2-135M int4 with and without the
rotation, perplexity vs fp32.

    python benchmarks/rotate.py [--only NAME,...] [--samples 8] [--max-tokens 8192] [--out build/rotate]

Protocol (issue 18, docs/BENCHMARKS.md): the Program traced at seq 512, every pipeline run in PyTorch
(the ops' reference implementations, which the compiled kernels match); perplexity on wikitext-2
test.txt, the first --max-tokens (8192) tokens in windows of 512, stride 512; calibration --samples
windows of 512 tokens of valid.txt (tcc.compress.calibration.text_feeds, seed 0), the same for every row.
int4 is symmetric, group 128 (SmolLM2's K=576 falls back to 96, as the pass notes). Rows with rotate
keep the lm head in fp32 (skip=[lm_head]) like the rows without it, whose tied head stays fp32
(quantize's default leaves a table the embedding also reads in float), so only the rotation differs;
the untied head costs vocab x hidden x 4 = 113 MB of fp32 on top (the record's lm_head_untied_bytes).
Results are appended to OUT/results.jsonl as they come (a rerun skips what is there).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# benchmarks/kernels.py would shadow the `kernels` package transformers may import
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

ROOT = Path(__file__).resolve().parent.parent
TEST = (ROOT / ".." / "shared" / "data" / "wikitext-2" / "test.txt").resolve()
os.environ.setdefault("TCC_CALIBRATION_TEXT", str(TEST.with_name("valid.txt")))
SEQ = 512
Q4 = "quantize(weights=int4,group=128{})"
ROWS = [
    ("fp32", ""),
    ("int4 rtn", Q4.format("")),
    ("rotate + int4 rtn", "rotate," + Q4.format(",skip=[lm_head]")),
    ("int4 gptq", Q4.format(",method=gptq")),
    ("rotate + int4 gptq", "rotate," + Q4.format(",method=gptq,skip=[lm_head]")),
    ("int4 awq", Q4.format(",method=awq")),
    ("W4A8 rtn", Q4.format(",acts=int8")),
    ("rotate + W4A8 rtn", "rotate," + Q4.format(",acts=int8,skip=[lm_head]")),
    ("W4A8 gptq", Q4.format(",acts=int8,method=gptq")),
    ("rotate + W4A8 gptq", "rotate," + Q4.format(",acts=int8,method=gptq,skip=[lm_head]")),
    ("rotate(residual=false) + int4 rtn", "rotate(residual=false)," + Q4.format("")),
    ("rotate(residual=false) + int4 gptq", "rotate(residual=false)," + Q4.format(",method=gptq")),
    ("rotate(residual=false) + W4A8 gptq", "rotate(residual=false)," + Q4.format(",acts=int8,method=gptq")),
    ("rotate(online=false) + int4 gptq", "rotate(online=false)," + Q4.format(",method=gptq,skip=[lm_head]")),
    ("rotate + int4 gptq, int4 head", "rotate," + Q4.format(",method=gptq")),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated row names to run (default: all)")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--out", default=str(ROOT / "build" / "rotate"))
    a = ap.parse_args()
    import tcc
    from tcc.compress.calibration import text_feeds
    from tcc.evaluate import perplexity
    from tcc.pipeline import PassContext, Pipeline

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "results.jsonl"
    done = {json.loads(l)["row"]: json.loads(l) for l in store.read_text().splitlines()} if store.exists() else {}
    only = [s.strip() for s in a.only.split(",") if s.strip()]
    base = tcc.trace("smollm2", seq_len=SEQ)
    calibration = text_feeds(base, n_samples=a.samples)
    for name, text in ROWS:
        if (only and name not in only) or name in done:
            continue
        program, t0, notes = base, time.perf_counter(), {}
        if text:
            ctx = PassContext(calibration=calibration, check_feeds=1)
            program = Pipeline.parse(text).run(base.clone(), ctx)
            notes = {r["pass"] if "pass" in r else str(i): {k: v for k, v in r.get("details", {}).items()
                                                             if k in ("drift", "lm_head_untied_bytes", "q")}
                     for i, r in enumerate(ctx.records)}
        seconds = time.perf_counter() - t0
        ppl = perplexity(program, base.tokenizer_dir, TEST, SEQ, a.max_tokens, stride=SEQ)
        row = {"row": name, "pipeline": text, "perplexity": ppl["value"], "tokens": ppl["tokens"],
               "param_bytes": program.param_bytes(), "pass_seconds": round(seconds, 1), "notes": notes}
        done[name] = row
        with store.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    fp = done.get("fp32", {}).get("perplexity")
    print("| pipeline | perplexity | vs fp32 | params MB |\n| --- | ---: | ---: | ---: |")
    for name, text in ROWS:
        r = done.get(name)
        if r:
            vs = f"{100 * (r['perplexity'] / fp - 1):+.1f} %" if fp else "-"
            print(f"| {name}: `{text or 'none'}` | {r['perplexity']:.2f} | {vs} | {r['param_bytes'] / 1e6:.1f} |")


if __name__ == "__main__":
    main()
