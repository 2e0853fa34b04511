"""`quantize` on real weights, compiled for x86 (slow: 2.4 minutes with 1 thread on a busy 2-core machine).

MiniLM-L6 and SmolLM2-135M from the model cache, text from wikitext-2 valid.txt: calibration windows
from its second half (tcc.compress.calibration.text_feeds' default), measuring windows and sentences from its
first half, which calibration never sees. Bounds leave room around what was measured (torch 2.13,
CPU, 1 thread; the measured values are in each docstring). Weight bytes are the compiled artifact's
(manifest sizes.weight_bytes: the packed layouts the kernels read, as stored) over the fp32 model's
parameter bytes. SmolLM2 is compiled once (int4); its W8A8 program runs in PyTorch on the ops'
reference implementations, which the kernels match (tests/test_quant_lowering.py).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import tcc
from conftest import WIKITEXT
from tcc.compress.calibration import CalibrationLoss, text_feeds
from tcc.evaluate import cosine
from tcc.pipeline import PassContext, Pipeline

pytestmark = pytest.mark.slow
SEQ = 64


def quantized(base, text: str, calibration):
    ctx = PassContext(calibration=calibration, check_feeds=1)
    return Pipeline.parse(text).run(base.clone(), ctx), ctx.records[-1]["details"]


def test_minilm_w8a8_compiled(tmp_path):
    """W8A8 (SmoothQuant, alpha=auto, per-token dynamic activations) with int8 embedding tables,
    compiled: mean-pooled embedding cosine vs fp32 on the first 32 sentences of valid.txt, measured
    mean 0.9979, min 0.9970 (alpha=auto chose 0.5); weight bytes 0.254x fp32 (int8 codes, a float32
    scale and an int32 code sum per output channel, fp32 biases and norms)."""
    base = tcc.trace("minilm", seq_len=SEQ)
    base = Pipeline.parse("dce").run(base)
    q, details = quantized(base, "quantize(acts=int8,method=smoothquant,embeddings=true,samples=8)",
                           text_feeds(base, n_samples=8))
    assert details["alpha_search"]["chosen"] in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
    art = tcc.compile(q, "x86", out=tmp_path / "minilm-w8a8")
    try:
        r = cosine(art, base, base.tokenizer_dir, WIKITEXT / "valid.txt", SEQ, 32)
        assert r["value"] >= 0.995 and r["min"] >= 0.99, r
        assert art.manifest["sizes"]["weight_bytes"] / base.param_bytes() <= 0.27
    finally:
        art.close()


def test_smollm2_w8a8_and_int4_gptq(tmp_path):
    """SmolLM2 at seq 64, 8 calibration windows; on 8 held-out windows (fp32 perplexity 63.5): the
    perplexity ratio vs fp32 and the mean KL(fp32 || quantized) of the next-token distributions (504
    tokens make the perplexity noisy: KL ranks formats reliably). Measured: W8A8 SmoothQuant
    (alpha=auto chose 0.7), quantize's defaults (int8 table, tied head weight-only) ratio 1.034, KL 0.018
    (the table fp32: 1.006, 0.020; the head through dense_a8w8: 1.049, 0.027); int4 group 128 (K=576 falls back to 96) with int8
    embeddings: rtn ratio 1.458, KL 0.603; gptq ratio 1.365, KL 0.341; the compiled gptq artifact
    within 1e-6 of the program on both; its weight bytes 0.158x fp32 (float16 group scales; the
    program's 0.156x plus the kernels' zero points, 8 for symmetric groups)."""
    base = tcc.trace("smollm2", seq_len=SEQ)
    base = Pipeline.parse("dce").run(base)
    calibration = text_feeds(base, n_samples=8)
    held = text_feeds(base, n_samples=8, start=0.0)
    loss = CalibrationLoss(base, held)
    fp32 = [base(f)["logits"] for f in held]
    fp32_loss = loss([{"logits": l} for l in fp32])

    def measure(run) -> tuple[float, float]:
        """(perplexity ratio vs fp32, mean KL(fp32 || run))."""
        got = [run(f)["logits"] for f in held]
        kl = np.mean([(np.exp(p) * (p - q)).sum(-1).mean() for p, q in zip(map(_log_softmax, fp32), map(_log_softmax, got))])
        return float(np.exp(loss([{"logits": l} for l in got]) - fp32_loss)), float(kl)

    # quantize's defaults: the tied table int8 too (embeddings=true), the tied head reading its codes weight-only
    # (dense_w8); through dense_a8w8 it measured 1.049 / KL 0.027 here (clean-clone CI, session 11)
    w8a8, details = quantized(base, "quantize(acts=int8,method=smoothquant,samples=8)", calibration)
    ratio, kl = measure(w8a8)
    assert ratio < 1.045 and kl < 0.023, (ratio, kl)  # the head through dense_a8w8 fails the KL bound
    assert details["alpha_search"]["chosen"] in (0.5, 0.6, 0.7)
    head = [n for n in w8a8.gm.graph.nodes if n.op == "call_function" and n.target in
            (torch.ops.tcc.dense_w8.default, torch.ops.tcc.dense_a8w8.default)][-1]  # the last linear: the LM head
    table = next(n for n in w8a8.gm.graph.nodes if n.target == torch.ops.tcc.embedding_w8.default)
    assert head.target == torch.ops.tcc.dense_w8.default, head.format_node()
    assert head.args[1].target in {a.target for a in table.all_input_nodes}, (head.format_node(), table.format_node())
    del w8a8

    rtn, _ = quantized(base, "quantize(weights=int4,group=128,embeddings=true)", calibration)
    rtn_ratio, rtn_kl = measure(rtn)
    del rtn
    int4, details = quantized(base, "quantize(weights=int4,group=128,method=gptq,embeddings=true,samples=8)",
                              calibration)
    assert details["group_fallback"] == ["group 128 does not divide K=576 for 180 layers: used 96"]
    ratio, kl = measure(int4)
    assert ratio < 1.5 and kl < 0.45 and kl < 0.7 * rtn_kl, (ratio, kl, rtn_ratio, rtn_kl)
    art = tcc.compile(int4, "x86", out=tmp_path / "smollm2-int4", verify=False)
    try:
        art_ratio, art_kl = measure(art)
        assert art_ratio == pytest.approx(ratio, rel=1e-3) and art_kl == pytest.approx(kl, rel=1e-2)
        assert art.manifest["sizes"]["weight_bytes"] / base.param_bytes() <= 0.16
    finally:
        art.close()


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))
