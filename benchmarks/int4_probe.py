"""MiniLM int4 accuracy probe (issue 18): the accuracy phase of benchmarks/quantization.py for any pipelines.

    python benchmarks/int4_probe.py PIPELINE [PIPELINE ...]      (MODEL=minilm, SAMPLES=16 by default)

Cosine of the mean-pooled embedding vs the fp32 Program on the first 64 sentences of wikitext-2 test.txt,
seq 128, each pipeline run on the traced Program in PyTorch (the ops' reference implementations);
calibration SAMPLES windows of 128 tokens of valid.txt (tcc.compress.calibration.text_feeds, seed 0), as
benchmarks/quantization.py's MiniLM table. The fp32 embeddings are computed once. One JSON line per
pipeline: cosine mean and min, the pipeline's seconds, a heal pass's result.
"""
from __future__ import annotations

import json
import os
import sys
import time

from _suite import SEQ, TEST, with_samples  # benchmarks/ is on sys.path when run as a script


def main() -> int:
    import tcc
    from tcc.compress.calibration import text_feeds
    from tcc.evaluate import cosine, embeddings
    from tcc.pipeline import PassContext, Pipeline

    samples = int(os.environ.get("SAMPLES", "16"))
    base = Pipeline.parse("dce").run(tcc.trace(os.environ.get("MODEL", "minilm"), seq_len=SEQ))
    calibration = text_feeds(base, n_samples=samples)
    reference = embeddings(base, base.tokenizer_dir, TEST, SEQ, 64)
    for text in sys.argv[1:]:
        ctx = PassContext(calibration=calibration, check_feeds=1)
        t0 = time.perf_counter()
        program = Pipeline.parse(with_samples(text, samples)).run(base.clone(), ctx)
        seconds = time.perf_counter() - t0
        r = cosine(program, reference, base.tokenizer_dir, TEST, SEQ, 64)
        heal = [rec["details"].get("result") for rec in ctx.records if rec.get("pass") == "heal"]
        print(json.dumps({"pipeline": text, "cosine": round(r["value"], 5), "min": round(r["min"], 5),
                          "seconds": round(seconds, 1), **({"heal": heal} if heal else {})}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
