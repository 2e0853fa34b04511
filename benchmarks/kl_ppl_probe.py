"""SmolLM2 int4 scored two ways on the same windows (issue 18, docs/BENCHMARKS.md "AWQ vs rtn"): mean KL of
the next-token distributions to the fp32 Program, and perplexity on the text's tokens.

    python benchmarks/kl_ppl_probe.py PIPELINE [PIPELINE ...]      (CAL=16 calibration windows by default)

The Program traced at seq 128; windows: the first 4,096 tokens of wikitext-2 test.txt in 32 windows of 128
(benchmarks/quantization.py's perplexity protocol); calibration CAL windows of 128 tokens of valid.txt
(text_feeds, seed 0). Per pipeline one JSON line: kl (mean over positions and windows), ppl and the fp32
ppl on the same windows, the KL at position 0, at positions 1-3 and over the rest.
"""
import json
import os
import sys
from pathlib import Path

# benchmarks/kernels.py would shadow the `kernels` package transformers may import
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
DATA = (Path(__file__).resolve().parent.parent / ".." / "shared" / "data" / "wikitext-2").resolve()
os.environ.setdefault("TCC_CALIBRATION_TEXT", str(DATA / "valid.txt"))
SEQ, TOKENS = 128, 4096


def log_softmax(a):
    import torch
    return torch.log_softmax(torch.from_numpy(a), dim=-1).numpy()


def main() -> int:
    import numpy as np

    import tcc
    from tcc.compress.calibration import text_feeds
    from tcc.frontends.models import load_tokenizer
    from tcc.pipeline import PassContext, Pipeline

    base = tcc.trace("smollm2", seq_len=SEQ)
    calibration = text_feeds(base, n_samples=int(os.environ.get("CAL", "16")))
    ids = load_tokenizer(base.tokenizer_dir)((DATA / "test.txt").read_text())["input_ids"][:TOKENS]
    windows = [np.asarray(ids[i:i + SEQ])[None] for i in range(0, TOKENS - SEQ + 1, SEQ)]

    def feed(w):
        return {s.name: w.astype(s.dtype) if s.name == "input_ids" else np.ones(s.shape, dtype=s.dtype)
                for s in base.inputs}

    ref = [log_softmax(base(feed(w))["logits"][0].astype(np.float64)) for w in windows]
    rows = np.arange(SEQ - 1)
    ref_nll = np.mean([-r[rows, w[0, 1:]].mean() for w, r in zip(windows, ref)])
    for text in sys.argv[1:]:
        program = Pipeline.parse(text).run(base.clone(), PassContext(calibration=calibration, check_feeds=1))
        kl, nll = np.zeros(SEQ), []
        for w, r in zip(windows, ref):
            g = log_softmax(program(feed(w))["logits"][0].astype(np.float64))
            kl += (np.exp(r) * (r - g)).sum(-1) / len(windows)
            nll.append(-g[rows, w[0, 1:]].mean())
        print(json.dumps({"pipeline": text, "kl": round(float(kl.mean()), 4), "ppl": round(float(np.exp(np.mean(nll))), 2),
                          "ppl_fp32": round(float(np.exp(ref_nll)), 2), "kl_pos0": round(float(kl[0]), 4),
                          "kl_pos1_3": round(float(kl[1:4].mean()), 4), "kl_rest": round(float(kl[4:].mean()), 4)}),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
