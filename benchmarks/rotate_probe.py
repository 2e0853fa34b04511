"""A quick probe of what `rotate` does to SmolLM2's int4 (docs/BENCHMARKS.md "Rotations"): the mean KL of
the next-token distributions to fp32 on 3 windows of 128 tokens of wikitext-2 test.txt (text_feeds seed 1),
and the relative L2 error of the logits; calibration 2 windows of valid.txt; seq 128.

    python benchmarks/rotate_probe.py PIPELINE [PIPELINE ...]
    QMODE=eye QTEXT='rotate(online=false),quantize(weights=int4,group=128,skip=[lm_head])' python benchmarks/rotate_probe.py

QMODE=eye replaces the rotation by the identity (norms folded, heads rotated, the stream not rotated);
QMODE=haar by a Haar-random orthogonal matrix; QTEXT holds the pipelines (;-separated) run that way.
"""
import os, sys, json, time
sys.path[:] = [q for q in sys.path if "benchmarks" not in q]
os.environ.setdefault("TCC_CALIBRATION_TEXT", "/work/shared/data/wikitext-2/valid.txt")
import numpy as np, torch
import tcc
from tcc.compress.calibration import text_feeds
from tcc.pipeline import PassContext, Pipeline
base = tcc.trace("smollm2", seq_len=128)
cal = text_feeds(base, n_samples=2)
test = text_feeds(base, "/work/shared/data/wikitext-2/test.txt", n_samples=3, seed=1)
ref = [base(f)["logits"].astype(np.float64) for f in test]
def kl(a, b):
    la = a - np.log(np.exp(a - a.max(-1, keepdims=True)).sum(-1, keepdims=True)) - a.max(-1, keepdims=True)
    lb = b - np.log(np.exp(b - b.max(-1, keepdims=True)).sum(-1, keepdims=True)) - b.max(-1, keepdims=True)
    return float((np.exp(la) * (la - lb)).sum(-1).mean())
for text in sys.argv[1:]:
    t = time.time()
    p = Pipeline.parse(text).run(base.clone(), PassContext(calibration=cal, check_feeds=1)) if text else base
    got = [p(f)["logits"].astype(np.float64) for f in test]
    print(json.dumps({"p": text, "kl": np.mean([kl(r, g) for r, g in zip(ref, got)]),
                      "rel": np.mean([np.linalg.norm(g - r) / np.linalg.norm(r) for r, g in zip(ref, got)]),
                      "s": round(time.time() - t)}), flush=True)
import tcc.compress.rotation as R
mode = os.environ.get("QMODE")
if mode:
    import torch
    orig = R.random_orthogonal
    if mode == "eye":
        R.random_orthogonal = lambda d, seed=0: torch.eye(d, dtype=torch.float64)
    elif mode == "haar":
        def haar(d, seed=0):
            g = torch.Generator().manual_seed(seed)
            q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
            return q * torch.sign(torch.diagonal(r))[None, :]
        R.random_orthogonal = haar
    for text in os.environ["QTEXT"].split(";"):
        p = Pipeline.parse(text).run(base.clone(), PassContext(calibration=cal, check_feeds=1))
        got = [p(f)["logits"].astype(np.float64) for f in test]
        print(json.dumps({"mode": mode, "p": text, "kl": np.mean([kl(r, g) for r, g in zip(ref, got)])}), flush=True)
