"""`smooth` (passes/smooth.py, tcc/compress/smoothing.py): SmoothQuant / AWQ scales folded into the program.

Alone it must leave the fp32 function unchanged (up to float rounding) while really moving the
weights; before `quantize` it must give what `quantize(method=awq|smoothquant)` gives, which runs the
same smoothing step inside quantize; bad options are one UserError naming the option.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from tcc.errors import UserError
from tcc.frontends.frontend import CausalLM, FeatureExtraction, trace
from tcc.pipeline import Pipeline
from tcc.testing import assert_no_ops, run_pass

SEQ, VOCAB = 16, 128
TINY = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128, vocab_size=VOCAB)
QUANTIZED_OPS = ["tcc.dense_w8", "tcc.dense_w4", "tcc.dense_a8w8"]


def tiny(arch: str):
    """(traced program, the PyTorch model, its inputs -> output tensor) for a random-init llama (GQA: 2 KV
    heads, so v -> o folds share a scale between query heads) or BERT encoder."""
    torch.manual_seed(0)
    ids = torch.zeros(1, SEQ, dtype=torch.long)
    if arch == "llama":
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", num_key_value_heads=2, **TINY),
                                                 attn_implementation="sdpa").eval()
        program = trace(CausalLM(model), example_inputs={"input_ids": ids}, output_names=["logits"], task="causal-lm")
        return program, lambda f: model(input_ids=torch.from_numpy(f["input_ids"])).logits
    model = AutoModel.from_config(AutoConfig.for_model("bert", **TINY), attn_implementation="sdpa").eval()
    program = trace(FeatureExtraction(model), example_inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                    output_names=["last_hidden_state"], task="feature-extraction")
    return program, lambda f: model(input_ids=torch.from_numpy(f["input_ids"]),
                                    attention_mask=torch.from_numpy(f["attention_mask"])).last_hidden_state


def feeds(program, n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{s.name: (rng.integers(0, VOCAB, (1, SEQ)) if s.name == "input_ids" else np.ones((1, SEQ))).astype(s.dtype)
             for s in program.inputs} for _ in range(n)]


@pytest.fixture(scope="module", params=["llama", "bert"])
def model(request):
    return request.param, *tiny(request.param)


@pytest.mark.parametrize("method", ["awq", "smoothquant"])
def test_smooth_alone_is_the_same_function_in_fp32(model, method):
    arch, program, torch_model = model
    out, record = run_pass(f"smooth(method={method},min_size=0)", program, feeds(program, 8, seed=1))
    notes = record["details"]["smoothing"]
    folded = [s["fold"] for s in notes if not s["fold"].startswith("none")]
    # what folds where: llama's norms take q/k/v, gate/up and lm_head, v's rows take o (GQA), up's rows
    # take down (AWQ keeps s = 1 where its search finds nothing better: 1 of 9 groups here); BERT is
    # post-norm (its norm output is also the residual), so only value -> output.dense folds exactly,
    # and AWQ puts an explicit x * (1/s) before the rest
    if arch == "llama":
        assert all(f.startswith(("norm weight", "rows of")) for f in folded)
        assert all(s["fold"] == "none: the search kept s = 1" for s in notes if s["fold"].startswith("none"))
        assert len(folded) >= (9 if method == "smoothquant" else 6)
    else:
        assert sum(f.startswith("rows of") for f in folded) == 2
        assert any(f.startswith("explicit mul") for f in folded) == (method == "awq")
    assert_no_ops(out, QUANTIZED_OPS)  # still float: any quantizer may follow
    before, after = program.named_tensors(), out.named_tensors()
    moved = max(float((after[k].detach() - v.detach()).abs().max() / v.detach().abs().max()) for k, v in before.items()
                if k in after and v.is_floating_point() and v.dim() == 2 and v.shape[0] != VOCAB)
    assert moved > 0.05  # the weights really were rescaled
    # the same function: vs the unsmoothed program and vs PyTorch, on a feed smoothing never saw;
    # relative to the output's largest magnitude: fp32 rounding of W * s and x / s
    held = feeds(program, 1, seed=99)[0]
    name = program.outputs[0].name
    got, want = out(held)[name], program(held)[name]
    with torch.no_grad():
        ref = torch_model(held).numpy()
    scale = float(np.abs(ref).max())
    assert float(np.abs(got - want).max()) / scale < 1e-5
    assert float(np.abs(got - ref).max()) / scale < 1e-5


@pytest.mark.parametrize("old, new, exact", [
    ("quantize(weights=int8,acts=int8,method=smoothquant,min_size=0)",
     "smooth(method=smoothquant,min_size=0),quantize(weights=int8,acts=int8,min_size=0)", True),
    ("quantize(weights=int8,acts=int8,act_scheme=static,method=smoothquant,alpha=0.5,embeddings=true,min_size=0)",
     "smooth(method=smoothquant,alpha=0.5,embeddings=true,min_size=0),"
     "quantize(weights=int8,acts=int8,act_scheme=static,embeddings=true,min_size=0)", True),
    ("quantize(weights=int8,method=awq,min_size=0)", "smooth(method=awq,weights=int8,min_size=0),quantize(min_size=0)", True),
    # the clipping's Hessian blocks: quantize(method=awq) scales the unsmoothed inputs' by 1 / (s s^T), clip=awq
    # measures the smoothed inputs: equal up to rounding, which can flip a clipping bound (identical here)
    ("quantize(weights=int4,group=32,sym=false,method=awq,min_size=0)",
     "smooth(method=awq,group=32,sym=false,min_size=0),quantize(weights=int4,group=32,sym=false,clip=awq,min_size=0)",
     False),
])
def test_smooth_then_quantize_is_the_old_quantize_method(old, new, exact):
    program, _ = tiny("llama")
    calibration = feeds(program, 8, seed=1)
    a, record = run_pass(old, program, calibration)
    b, _ = run_pass(new, program, calibration)
    assert record["details"]["smoothing"]  # the old method did smooth
    held = feeds(program, 2, seed=99)
    ta, tb = a.named_tensors(), b.named_tensors()
    assert sorted(ta) == sorted(tb)
    for f in held:
        ya, yb = a(f)["logits"], b(f)["logits"]
        if exact:
            np.testing.assert_array_equal(ya, yb)
        else:
            assert float(np.abs(ya - yb).max()) <= 1e-3 * float(np.abs(ya).max())
    if exact:
        for k in ta:
            assert torch.equal(ta[k], tb[k]), k


@pytest.mark.parametrize("text, option", [
    ("smooth(method=smoothquant,weights=int4)", "weights"),
    ("smooth(method=awq,alpha=0.5)", "alpha"),
    ("smooth(method=smoothquant,alpha=2)", "alpha"),
    ("smooth(method=gptq)", "method"),
    ("smooth(method=awq,group=33)", "group"),
    ("smooth(method=awq,zero=float)", "zero"),
    ("quantize(weights=int8,clip=awq)", "clip"),
    ("quantize(weights=int4,method=gptq,clip=awq)", "clip"),
])
def test_bad_options_are_one_user_error(text, option):
    with pytest.raises(UserError) as e:
        Pipeline.parse(text)
    assert f"option '{option}'" in str(e.value)


@pytest.mark.parametrize("n_feeds", [4, 1])
def test_the_alpha_search_scores_each_alpha_by_the_quantized_program_itself(monkeypatch, n_feeds):
    """SmoothQuant's alpha search (smoothing.search_alpha) runs every quantized linear as the program's own
    tcc::dense_a8w8 on x / s (codes from quantization.quantize_per_channel(w, s): rtn's, bit for bit; the float linear does not run
    beside it): each alpha's recorded calibration loss is the loss of the program quantized with that alpha
    fixed, up to the 6 digits the record keeps (measured: equal for all six alphas); embeddings=false
    (the search leaves embedding tables in float). On several feeds each linear's codes are made once an
    alpha; on one (a big model's search) they are made as the linear runs and dropped after it: never
    more than one linear's codes alive (issue 15: an int8 copy of every weight was the 1B compile's peak)."""
    import weakref
    from tcc.compress import smoothing
    from tcc.compress.calibration import CalibrationLoss
    from tcc.compress.quantization import Grid, quantize_per_channel, rtn
    w, s = torch.randn(48, 64), torch.rand(64) + 0.5
    for scaled in (s, None):
        codes, scale = quantize_per_channel(w, scaled)
        ref = rtn(w * s[None, :] if scaled is not None else w, Grid("int8"), 64)
        assert torch.equal(codes, ref.codes) and torch.equal(scale, ref.scale)
    made, most_alive = [], [0]

    def counted(w, s=None):
        q = quantize_per_channel(w, s)
        made.append(weakref.ref(q[0]))
        most_alive[0] = max(most_alive[0], sum(r() is not None for r in made))
        return q
    monkeypatch.setattr(smoothing, "quantize_per_channel", counted)
    program, _ = tiny("llama")
    calibration = feeds(program, n_feeds, seed=3)
    _, record = run_pass("quantize(acts=int8,min_size=0,method=smoothquant,embeddings=false)", program, calibration)
    search = record["details"]["alpha_search"]
    assert search["feeds"] == n_feeds and [r["alpha"] for r in search["losses"]] == list(smoothing.ALPHA_GRID)
    linears = 7 * 2 + 1  # q, k, v, o, gate, up, down in 2 layers, the LM head
    assert len(made) == linears * len(smoothing.ALPHA_GRID)
    assert most_alive[0] == (1 if n_feeds == 1 else linears)
    monkeypatch.undo()
    loss = CalibrationLoss(program, calibration)
    for r in search["losses"][::2]:
        q, _ = run_pass(f"quantize(acts=int8,min_size=0,method=smoothquant,alpha={r['alpha']},embeddings=false)",
                        program, calibration)
        assert loss([q(f) for f in calibration]) == pytest.approx(r["loss"], abs=2e-6 * r["loss"]), r
