"""`sparsify` (passes/sparsify.py), its math and annotation (tcc/compress/sparsity.py), and quantize on sparse weights.

Models: the tiny random-init LLaMA and BERT of tests/test_quantize.py (hidden 64, 2 layers, 32 tokens),
16 random-token calibration feeds. Error of a layer: ||(W - W')X|| / ||WX|| with X its inputs in the
float program over the calibration feeds; of the model: the relative RMS error of the output. Bounds
are stated next to what was measured (torch 2.13, CPU).
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from tcc.compress import sparsity as sp
from tcc.errors import UserError
from tcc.pipeline import PassContext, Pipeline
from tcc.compress.quantization import Grid, gptq
from test_quantize import feeds, inject_outliers, linear_inputs, tiny

PATTERNS = {"unstructured": "pattern=unstructured", "2:4": "pattern=2:4", "4:8": "pattern=4:8",
            "block 1x16": "pattern=block,block=1x16", "block 4x4": "pattern=block,block=4x4"}
METHODS = ("magnitude", "wanda", "sparsegpt")


@pytest.fixture(scope="module")
def llama():
    return tiny("llama")


@pytest.fixture(scope="module")
def calibration(llama):
    return feeds(llama, 16, seed=0)


def sparsify(program, options: str, calibration=None, then: str = ""):
    """(pruned copy, the sparsify record)."""
    ctx = PassContext(calibration=calibration or [])
    out = Pipeline.parse(f"sparsify(min_size=0,{options})" + (f",{then}" if then else "")).run(program.clone(), ctx)
    return out, next(r for r in ctx.records if r["pass"] == "sparsify")


def output_error(fp, q, fs) -> float:
    name = fp.outputs[0].name
    ref = np.concatenate([fp(f)[name].ravel() for f in fs]).astype(np.float64)
    got = np.concatenate([q(f)[name].ravel() for f in fs]).astype(np.float64)
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def exact_pattern(w: torch.Tensor, pattern: sp.Pattern, sparsity: float) -> bool:
    """The pattern holds exactly: per row (unstructured), per group (n:m) or per row of blocks (block)
    at least the pass's count of zeros, and block zeros come in whole blocks."""
    n, k = w.shape
    z = w == 0
    if pattern.kind == "n:m":
        return bool((z.reshape(n, k // pattern.m, pattern.m).sum(-1) >= pattern.m - pattern.n).all())
    if pattern.kind == "block":
        r, c = pattern.block
        blocks = z.reshape(n // r, r, k // c, c)
        whole = blocks.all(dim=3).all(dim=1)
        return bool((whole.sum(dim=1) >= sp.count(sparsity, k // c)).all())
    return bool((z.sum(dim=1) >= sp.count(sparsity, k)).all())


# -- masks and SparseGPT on plain tensors --------------------------------------------------------------

def test_keep_mask_and_holds():
    torch.manual_seed(0)
    scores = torch.rand(8, 32)
    keep = sp.keep_mask(scores, sp.parse_pattern("2:4"), 0.5)
    groups, kept = scores.reshape(8, 8, 4), keep.reshape(8, 8, 4)
    assert bool((kept.sum(-1) == 2).all())
    assert torch.equal(torch.where(kept, groups, 0).sum(-1), groups.topk(2, dim=-1).values.sum(-1))  # the top 2
    keep = sp.keep_mask(scores, sp.parse_pattern("unstructured"), 0.3)
    assert bool((keep.sum(1) == 32 - 10).all())  # round(0.3 * 32) = 10 per row
    assert bool((scores[~keep].reshape(8, 10).amax(1) <= torch.where(keep, scores, 2).amin(1)).all())
    block = sp.parse_pattern("block", "2x8")
    keep = sp.keep_mask(scores, block, 0.5)
    whole = keep.reshape(4, 2, 4, 8)
    assert bool((whole.all(3).all(1) | ~whole.any(3).any(1)).all()) and bool((whole.all(3).all(1).sum(1) == 2).all())
    sums = scores.reshape(4, 2, 4, 8).sum(dim=(1, 3))
    assert bool((torch.where(whole.all(3).all(1), sums, 99).amin(1) >= torch.where(whole.all(3).all(1), -1, sums).amax(1)).all())
    # holds: the zeros the annotation promises, and no fewer
    w = torch.randn(8, 32) * keep
    ann = block.annotation(0.5, "magnitude")
    assert sp.holds(w, ann)
    r, c = map(int, torch.nonzero(~keep)[0])
    w[r, c] = 1.0  # one entry of a pruned block back
    assert not sp.holds(w, ann)
    nm = sp.parse_pattern("4:8").annotation(0.5, "wanda")
    w = torch.randn(8, 32) * sp.keep_mask(torch.rand(8, 32), sp.parse_pattern("4:8"), 0.5)
    assert sp.holds(w, nm) and not sp.holds(torch.randn(8, 32), nm) and not sp.holds(torch.zeros(8, 30), nm)
    assert sp.describe(nm) == "4:8, 50.0% zeros (wanda)"
    # global allocation: one threshold over scores divided by each layer's mean, so a layer's scale does not
    # matter (measured: b, the heavy-tailed one, 0.590; a 0.410)
    a, b = torch.rand(16, 64), torch.rand(16, 64) ** 3
    shares = sp.allocate({"a": a, "b": b}, sp.parse_pattern("unstructured"), 0.5)
    assert shares == sp.allocate({"a": 1000 * a, "b": b}, sp.parse_pattern("unstructured"), 0.5)
    assert shares["b"] > 0.55 > 0.45 > shares["a"] and (shares["a"] + shares["b"]) / 2 == pytest.approx(0.5, abs=1e-9)


@pytest.mark.parametrize("text", ["unstructured", "2:4", "block"])
def test_sparsegpt_compensates(text):
    torch.manual_seed(0)
    w = torch.randn(32, 256)
    x = torch.randn(512, 256) @ (torch.eye(256) + 0.3 * torch.randn(256, 256))  # correlated features
    x[:, 7] = 0  # a feature no token touches
    h = x.T @ x
    pattern = sp.parse_pattern(text, "4x4")
    pruned, mask = sp.sparsegpt(w, h, pattern, 0.5)
    err = lambda v: float(torch.linalg.norm((w - v) @ x.T) / torch.linalg.norm(w @ x.T))
    magnitude = w * sp.keep_mask(w.abs(), pattern, 0.5)
    wanda = w * sp.keep_mask(w.abs() * x.norm(dim=0), pattern, 0.5)
    assert torch.isfinite(pruned).all() and bool((pruned[mask] == 0).all()) and bool((pruned[:, 7] == 0).all())
    assert float(mask.float().mean()) == 0.5 and exact_pattern(pruned, pattern, 0.5)
    # measured (unstructured, 2:4, block 4x4): sparsegpt 0.215 0.266 0.441, magnitude 0.267 0.361 0.614, wanda
    # 0.265 0.361 0.609
    assert err(pruned) < 0.87 * min(err(magnitude), err(wanda)), (err(pruned), err(magnitude), err(wanda))


@pytest.mark.parametrize("kind, sym", [("int8", True), ("int4", True), ("int4", False)])
def test_gptq_keeps_masked_weights_at_zero(kind, sym):
    torch.manual_seed(0)
    x = torch.randn(256, 64) @ (torch.eye(64) + 0.5 * torch.randn(64, 64))
    w = torch.randn(16, 64)
    w = w * sp.keep_mask(w.abs(), sp.parse_pattern("2:4"), 0.5)
    zeros = w == 0
    for act_order in (True, False):
        plain = gptq(w, x.T @ x, Grid(kind, sym), 32, act_order=act_order).dequantize()
        kept = gptq(w, x.T @ x, Grid(kind, sym), 32, act_order=act_order, zeros=zeros).dequantize()
        assert int((plain[zeros] != 0).sum()) > 10  # GPTQ's updates fill pruned weights back in (measured 18 .. 79
        assert bool((kept[zeros] == 0).all())  # of 512) ... unless told which must stay exactly zero
        err = lambda v: float(torch.linalg.norm((w - v) @ x.T) / torch.linalg.norm(w @ x.T))
        # measured: int8 0.0041, int4 sym 0.072 / 0.074, asym 0.059 / 0.062 (act order / not); without zeros 0.004 .. 0.067
        assert err(kept) < {"int8": 0.006, "int4": 0.11}[kind]


# -- the pass: every pattern with every method ---------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(PATTERNS))
def test_pattern_holds_exactly(llama, calibration, name, method):
    q, record = sparsify(llama, f"{PATTERNS[name]},method={method}", calibration)
    pattern = sp.parse_pattern(*PATTERNS[name].replace("pattern=", "").replace("block=", "").split(","))
    details = record["details"]
    assert details["pattern"] == pattern.text and details["method"] == method
    assert len(details["layers"]) == 14 and details["sparsity"] == 0.5  # every shape here divides exactly
    tensors = q.named_tensors()
    for layer in details["layers"]:
        w, ann = tensors[layer["weight"]], sp.annotation(q, layer["weight"])
        assert ann == pattern.annotation(0.5, method) and layer["sparsity"] == 0.5
        assert exact_pattern(w, pattern, 0.5) and sp.holds(w, ann), layer["module"]
        assert float((w == 0).float().mean()) == 0.5  # random weights: no other zeros
        assert ("error" in layer) == (method == "sparsegpt")
    assert "lm_head.weight" not in str(sorted(q.annotations)) and "embed" not in str(sorted(q.annotations))
    assert sp.violations(q) == [] and np.isfinite(q(calibration[0])["logits"]).all()
    assert "zeros alone speed nothing up" in details["speed"]


def test_bert_2_4_and_uneven_sparsity():
    bert = tiny("bert")
    calibration = feeds(bert, 8, seed=0)
    q, record = sparsify(bert, "pattern=2:4,method=sparsegpt", calibration)
    assert len(record["details"]["layers"]) == 12 and sp.violations(q) == []
    # sparsity 0.3 of 64 or 128 input features: round(19.2) = 19 or round(38.4) = 38 per row
    q, record = sparsify(bert, "sparsity=0.3,method=wanda", calibration)
    got = {l["shape"][1]: l["sparsity"] for l in record["details"]["layers"]}
    assert got == {64: 19 / 64, 128: 38 / 128}
    assert all(exact_pattern(q.named_tensors()[l["weight"]], sp.parse_pattern("unstructured"), 0.3)
               for l in record["details"]["layers"])


def test_global_scope(llama):
    program = llama.clone()
    victim = "model.model.layers.1.mlp.up_proj.weight"
    with torch.no_grad():  # heavy-tailed weights: most of them small next to the layer's mean
        w = program.gm.get_parameter(victim)
        w.copy_(w ** 3 * 1000)
    _, record = sparsify(program, "sparsity=0.6,scope=global")
    shares = {l["weight"]: l["sparsity"] for l in record["details"]["layers"]}
    # measured: the victim 0.75, the others 0.578 .. 0.594; overall 0.5985: each row rounds its count (K = 64)
    assert shares[victim] > 0.7 and all(0.55 < s < 0.62 for t, s in shares.items() if t != victim)
    assert record["details"]["sparsity"] == pytest.approx(0.6, abs=0.5 / 64)
    with torch.no_grad():  # scaling a layer changes nothing: scores are compared relative to the layer's mean
        program.gm.get_parameter(victim).mul_(1e-3)
    _, again = sparsify(program, "sparsity=0.6,scope=global")
    assert {l["weight"]: l["sparsity"] for l in again["details"]["layers"]} == shares


# -- scoring methods against each other ----------------------------------------------------------------

def test_wanda_and_sparsegpt_beat_magnitude():
    program = inject_outliers(tiny("llama"), 20.0)  # the same function with activation outliers in 3 channels
    calibration = feeds(program, 16, seed=0)
    inputs = linear_inputs(program, calibration)
    for options in ("pattern=unstructured", "pattern=2:4"):
        layer_err, out_err = {}, {}
        for method in METHODS:
            q, _ = sparsify(program, f"{options},method={method}", calibration)
            tensors = q.named_tensors()
            errors = [float(torch.linalg.norm((w - tensors[m + ".weight"].detach()) @ x.T) / torch.linalg.norm(w @ x.T))
                      for m, (w, x) in inputs.items() if m + ".weight" in q.annotations]
            layer_err[method], out_err[method] = float(np.mean(errors)), output_error(program, q, calibration)
        # measured mean layer error / output error (unstructured; 2:4): magnitude 0.313 / 0.276; 0.394 / 0.354,
        # wanda 0.269 / 0.261; 0.360 / 0.341, sparsegpt 0.238 / 0.209; 0.311 / 0.268
        assert layer_err["wanda"] < 0.94 * layer_err["magnitude"], (options, layer_err)
        assert layer_err["sparsegpt"] < 0.85 * layer_err["magnitude"], (options, layer_err)
        assert out_err["wanda"] < out_err["magnitude"] and out_err["sparsegpt"] < 0.85 * out_err["magnitude"], out_err
    # Wanda's score |W_ij| ||X_j|| does not see the outliers: the program without them prunes the same entries
    plain = tiny("llama")
    a, _ = sparsify(plain, "method=wanda", feeds(plain, 16, seed=0))
    b, _ = sparsify(program, "method=wanda", calibration)
    ta, tb = a.named_tensors(), b.named_tensors()
    assert all(torch.equal(ta[t] == 0, tb[t] == 0) for t in a.annotations)


# -- composition with quantize -------------------------------------------------------------------------

@pytest.mark.parametrize("quantize, kind", [
    ("quantize(min_size=0)", "int8"),
    ("quantize(acts=int8,method=smoothquant,min_size=0)", "int8"),
    ("quantize(weights=int4,group=32,method=gptq,min_size=0)", "int4"),
    ("quantize(weights=int4,group=32,sym=false,method=awq,min_size=0)", "int4"),
])
def test_quantize_keeps_the_pattern(llama, calibration, quantize, kind):
    pruned, _ = sparsify(llama, "pattern=2:4,method=wanda", calibration)
    q, _ = sparsify(llama, "pattern=2:4,method=wanda", calibration, then=quantize)
    before = {t: pruned.named_tensors()[t] == 0 for t in pruned.annotations}
    tensors = q.named_tensors()
    assert len(q.annotations) == 14
    for target, was_zero in before.items():
        assert target not in tensors and target not in q.annotations  # the float weight is gone ...
        codes = f"{target}_{kind}"
        ann = sp.annotation(q, codes)  # ... and its annotation moved to the codes
        assert ann["format"] == kind and ann["pattern"] == "n:m" and (ann["n"], ann["m"]) == (2, 4)
        assert ann["scale"] == f"{target}_scale" and (ann["zero"] is not None) == ("sym=false" in quantize)
        w = sp.dense_weight(q, codes)  # what the op computes with
        assert bool((w[was_zero] == 0).all()) and sp.holds(w, ann)  # every pruned weight is exactly 0.0
        assert float((w == 0).float().mean()) < 0.6  # and the kept ones are mostly not
    assert sp.violations(q) == []


# -- bad input -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ("sparsify(sparsity=1)", r"option 'sparsity' must be in \[0, 1\)"),
    ("sparsify(sparsity=-0.1)", r"option 'sparsity' must be in \[0, 1\)"),
    ("sparsify(pattern=dense)", r"option 'pattern' must be unstructured, n:m .* got dense"),
    ("sparsify(pattern='4:2')", r"option 'pattern' n:m needs 1 <= n < m, got 4:2"),
    ("sparsify(pattern=block,block=4by4)", r"option 'block' must be ROWSxCOLUMNS .* got 4by4"),
    ("sparsify(pattern='2:4',sparsity=0.7)", r"option 'sparsity': pattern=2:4 sets the sparsity to 0.5, got sparsity=0.7"),
    ("sparsify(pattern='2:4',scope=global)", r"option 'scope': scope=global does not apply to pattern=2:4"),
    ("sparsify(method=obs)", r"option 'method' must be one of \['magnitude', 'wanda', 'sparsegpt'\]"),
])
def test_bad_options(text, message):
    with pytest.raises(UserError, match=message):
        Pipeline.parse(text)


def test_pipeline_text_says_the_sparsity_of_n_m():
    p = Pipeline.parse("sparsify(pattern=1:4,method=wanda)")
    assert str(p) == "sparsify(pattern=1:4,sparsity=0.75,method=wanda)"
    assert Pipeline.parse(p.canonical()) == p and Pipeline.parse(str(p)) == p


def test_bad_input_for_the_model(llama):
    bert = tiny("bert", intermediate_size=90)  # output.dense reads 90 features; intermediate.dense has 90 rows
    down = "model.encoder.layer.0.output.dense"
    with pytest.raises(UserError, match=re.escape(f"option 'pattern': layer {down} [64, 90]: m=4 does not divide its "
                                                  "90 input features")):
        sparsify(bert, "pattern=2:4")
    with pytest.raises(UserError, match=re.escape("option 'block': layer model.encoder.layer.0.intermediate.dense "
                                                  "[90, 64]: block 4x4 does not tile")):
        sparsify(bert, "pattern=block,block=4x4")
    q, record = sparsify(bert, "pattern=2:4,skip=[output.dense]")  # what the hint says works (the glob also
    skipped = record["details"]["skipped"]  # matches attention.output.dense)
    assert len(record["details"]["layers"]) == 8 and len(skipped) == 4 and {s["reason"] for s in skipped} == {"matches skip"}
    for method in ("wanda", "sparsegpt"):
        with pytest.raises(UserError, match=f"option 'method': method={method} needs calibration inputs"):
            sparsify(llama, f"method={method}")
    quantized = Pipeline.parse("quantize(min_size=0)").run(llama.clone())
    with pytest.raises(UserError, match=r"layer model.model.layers.0.self_attn.q_proj is already quantized "
                                        r"\(tcc.dense_w8\).*") as e:
        sparsify(quantized, "pattern=2:4")
    assert "sparsify before quantize" in e.value.hint
    with torch.no_grad():  # ensures: a broken pattern is caught
        q.named_tensors()["model.encoder.layer.0.attention.self.query.weight"].fill_(1.0)
    assert sp.violations(q) == ["model.encoder.layer.0.attention.self.query.weight: its zeros break the annotated "
                                "2:4, 50.0% zeros (magnitude)"]
