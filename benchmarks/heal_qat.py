"""Quantization-aware healing on SmolLM2-135M (issue 18 item 3): int4 g128 symmetric, then `heal` through
the quantizer; perplexity with benchmarks/rotate.py's protocol.

    python benchmarks/heal_qat.py [--method gptq] [--heal 'heal(steps=40,samples=40,eval_samples=4)']
                                  [--samples 32] [--acts none|int8] [--out build/heal_qat]

Heal's forward and backward at seq 512 take ~60 s a step on a shared 2-core machine, so the pipeline
runs on the Program traced at seq 128: quantize (calibration --samples windows of 128 tokens of
valid.txt, tcc.compress.calibration.text_feeds seed 0: 32 x 128 = the 4,096 tokens of rotate.py's
8 x 512), then heal (its own valid.txt windows of 128, held-out check; the teacher is the fp32 Program).
Weights do not depend on the sequence length: the quantized (and the healed) codes, scales and float
parameters are copied into the same format traced at seq 512 and scored there: wikitext-2 test.txt,
the first 8,192 tokens in windows of 512, stride 512 (rotate.py's protocol; fp32 29.60). Both rows, before and after heal, are scored
the same way. SmolLM2's weights lie on a Q4_1 g32 grid (a dequantised 4-bit GGUF): its int4 figures are
optimistic for a model trained in float. Results are appended to OUT/results.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

ROOT = Path(__file__).resolve().parent.parent
TEST = (ROOT / ".." / "shared" / "data" / "wikitext-2" / "test.txt").resolve()
os.environ.setdefault("TCC_CALIBRATION_TEXT", str(TEST.with_name("valid.txt")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="gptq", choices=("rtn", "gptq", "awq"))
    ap.add_argument("--heal", default="heal(steps=40,samples=40,eval_samples=4)")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--acts", default="none", choices=("none", "int8"), help="int8: W4A8")
    ap.add_argument("--out", default=str(ROOT / "build" / "heal_qat"))
    a = ap.parse_args()
    import torch
    import tcc
    from tcc.compress.calibration import text_feeds
    from tcc.evaluate import perplexity
    from tcc.pipeline import PassContext, Pipeline

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    acts = ",acts=int8" if a.acts == "int8" else ""
    quantize = f"quantize(weights=int4,group=128{acts}{'' if a.method == 'rtn' else ',method=' + a.method})"
    short = tcc.trace("smollm2", seq_len=128)
    calibration = text_feeds(short, n_samples=a.samples)
    t0 = time.perf_counter()
    program = Pipeline.parse(quantize).run(short.clone(), PassContext(calibration=calibration, check_feeds=1))
    quantize_s = time.perf_counter() - t0
    long = tcc.trace("smollm2", seq_len=512)
    scored = Pipeline.parse(f"quantize(weights=int4,group=128{acts})").run(  # the format at seq 512; values copied in
        long.clone(), PassContext(calibration=text_feeds(long, n_samples=1)))

    def score(src, name: str, **extra) -> None:
        values = dict(src.gm.named_parameters()) | dict(src.gm.named_buffers())
        with torch.no_grad():
            for k, v in list(scored.gm.named_parameters()) + list(scored.gm.named_buffers()):
                v.copy_(values[k])
        ppl = perplexity(scored, long.tokenizer_dir, TEST, 512, 8192, stride=512)
        row = {"row": name, "perplexity": ppl["value"], "tokens": ppl["tokens"], **extra}
        with (out / "results.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    score(program, quantize, pass_seconds=round(quantize_s, 1))
    ctx = PassContext(calibration=calibration, original=short)
    t0 = time.perf_counter()
    healed = Pipeline.parse(a.heal).run(program, ctx)
    d = ctx.records[-1]["details"]
    score(healed, f"{quantize},{a.heal}", heal_seconds=round(time.perf_counter() - t0, 1),
          heal={k: d.get(k) for k in ("result", "steps", "stopped_by", "seconds", "codes_changed",
                                      "held_out_before", "held_out_after", "train_loss_first_last")})


if __name__ == "__main__":
    main()
