"""analyze-redundancy and tcc.compress.calibration (text feeds, calibration loss, GraphRunner).

Tiny random-init LLaMA (GQA) and BERT traced by tcc.frontends.frontend.trace, feeds of random tokens. The
analysis numbers are checked against the same quantities computed from the Hugging Face model with
forward hooks; loss increases against the program actually rewritten by drop-attention.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_elimination import build, layers_of
from transformers import AutoConfig, AutoModel

from tcc.frontends import frontend, models
from conftest import WIKITEXT
from tcc.compress.calibration import CalibrationLoss, calibration_loss, default_text, text_feeds
from tcc.ir.runner import GraphRunner
from tcc.errors import UserError
from tcc.frontends.frontend import FeatureExtraction
from tcc.pipeline import PassContext, Pipeline

KEYS = {"model", "task", "method", "calibration", "loss", "measured", "blocks", "ranking", "seconds", "files"}
BLOCK_KEYS = {"index", "name", "weights", "similarity", "loss_increase", "heads"}


@pytest.fixture(scope="module")
def llama():
    return build("llama")


def feeds_for(prog, n=2):
    return [prog.example_inputs(seed) for seed in range(1, n + 1)]


def analysis(prog, feeds, text="analyze-redundancy(loss_samples=0)", ctx=None):
    ctx = ctx or PassContext(calibration=feeds)
    Pipeline.parse(text).run(prog, ctx)
    return ctx.report["analyze-redundancy"], ctx


def cos(x, y):
    x, y = x.double().reshape(-1, x.shape[-1]), y.double().reshape(-1, y.shape[-1])
    return ((x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))).numpy()


def hooked_llama_streams(model, feeds):
    """Per layer, the mean over tokens and feeds of cos(x, x+a), cos(x+a, x+a+m), cos(x, x+a+m)."""
    layers = layers_of(model)
    seen = {}
    hooks = []
    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_pre_hook(
            lambda m, a, k, i=i: seen.__setitem__((i, "x"), (a or (k["hidden_states"],))[0]), with_kwargs=True))
        hooks.append(layer.self_attn.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__((i, "a"), o[0])))
        hooks.append(layer.mlp.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__((i, "m"), o)))
    sims = np.zeros((len(layers), 3))
    with torch.no_grad():
        for f in feeds:
            model(input_ids=torch.from_numpy(f["input_ids"]), attention_mask=torch.ones(f["input_ids"].shape, dtype=torch.long))
            for i in range(len(layers)):
                x, a, m = seen[i, "x"], seen[i, "a"], seen[i, "m"]
                sims[i] += [cos(x, x + a).mean(), cos(x + a, x + a + m).mean(), cos(x, x + a + m).mean()]
    for h in hooks:
        h.remove()
    return sims / len(feeds)


def test_report_json_png_and_record(llama, tmp_path):
    prog, _ = llama
    prog = prog.clone()
    before = prog.fingerprint()
    report, ctx = analysis(prog, feeds_for(prog), f"analyze-redundancy(out={tmp_path})")
    assert prog.fingerprint() == before  # an analysis changes nothing
    assert set(report) == KEYS and len(report["blocks"]) == 4
    assert all(set(b) == BLOCK_KEYS for b in report["blocks"])
    assert report["loss"]["kind"].startswith("next-token cross-entropy") and report["loss"]["base"] > 0
    assert report["calibration"] == {"source": "the 2 calibration feeds of the pipeline", "feeds": 2, "loss_feeds": 2,
                                     "batch": 1, "seq_len": 8}
    assert report["measured"] == ["similarity", "loss:attention", "loss:mlp", "loss:block", "heads", "head_loss"]
    b = report["blocks"][2]
    assert set(b["similarity"]) == set(b["loss_increase"]) == {"block", "attention", "mlp"}
    assert len(b["heads"]["norm"]) == len(b["heads"]["loss_increase"]) == 4
    assert abs(sum(b["heads"]["share"]) - 1) < 1e-5
    for part, ranked in report["ranking"].items():
        sims = [report["blocks"][i]["similarity"][part] for i in ranked]
        assert sorted(ranked) == [0, 1, 2, 3] and sims == sorted(sims, reverse=True)

    on_disk = json.loads((tmp_path / "redundancy.json").read_text())
    assert on_disk == json.loads(json.dumps({k: v for k, v in report.items() if k != "seconds"}))
    png = (tmp_path / "redundancy.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    details = ctx.records[0]["details"]
    assert details["files"] == {"json": str(tmp_path / "redundancy.json"), "png": str(tmp_path / "redundancy.png")}
    assert details["similarity"]["attention"] == [b["similarity"]["attention"] for b in report["blocks"]]
    assert details["most_redundant"]["block"] == report["ranking"]["block"]


def test_writes_to_the_artifacts_dir_annotation(llama, tmp_path):
    prog, _ = llama
    ctx = PassContext(calibration=feeds_for(prog, 1), annotations={"artifacts_dir": str(tmp_path / "art")})
    analysis(prog.clone(), None, "analyze-redundancy(heads=false,loss=false)", ctx)
    assert (tmp_path / "art" / "redundancy.json").is_file() and (tmp_path / "art" / "redundancy.png").is_file()
    assert ctx.report["analyze-redundancy"]["loss"] is None


def test_similarities_match_hooked_model(llama):
    prog, model = llama
    feeds = feeds_for(prog, 3)
    report, _ = analysis(prog.clone(), feeds, "analyze-redundancy(loss=false)")
    expected = hooked_llama_streams(model, feeds)
    got = np.array([[b["similarity"][p] for p in ("attention", "mlp", "block")] for b in report["blocks"]])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert got.std() > 1e-3  # the layers differ: not a constant


def test_loss_increases_match_rewritten_and_hooked_models(llama):
    prog, model = llama
    feeds = feeds_for(prog, 2)
    report, _ = analysis(prog.clone(), feeds)
    base = calibration_loss(prog, feeds)
    assert abs(report["loss"]["base"] - base) < 1e-5
    for part, text in (("attention", "drop-attention(layers=[1])"), ("mlp", "drop-mlp(layers=[2])"),
                       ("block", "drop-blocks(layers=[3])")):
        i = int(text[-3])
        dropped = Pipeline.parse(text).run(prog.clone(), PassContext(calibration=feeds))
        assert abs(report["blocks"][i]["loss_increase"][part] - (calibration_loss(dropped, feeds) - base)) < 1e-5

    # head 3 of block 2 masked in the Hugging Face model: its o_proj reads zeros in that head's 16 features
    o_proj = layers_of(model)[2].self_attn.o_proj

    def mask(module, args):
        x = args[0].clone()
        x[..., 48:64] = 0
        return (x,)
    hook = o_proj.register_forward_pre_hook(mask)
    nll = []
    with torch.no_grad():
        for f in feeds:
            ids = torch.from_numpy(f["input_ids"])
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            nll.append(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").item())
    hook.remove()
    masked = sum(nll) / (len(feeds) * 7)
    assert abs(report["blocks"][2]["heads"]["loss_increase"][3] - (masked - base)) < 1e-4


def test_batched_partial_runs_equal_single_runs(llama):
    """8 partial runs per vmap-batched forward (changes at different nodes in one batch) give the loss
    increases of one run per change."""
    prog, _ = llama
    feeds = feeds_for(prog, 1)
    single, _ = analysis(prog.clone(), feeds, "analyze-redundancy(batch=1)")
    batched, _ = analysis(prog.clone(), feeds, "analyze-redundancy(batch=8)")
    for a, b in zip(single["blocks"], batched["blocks"]):
        for p in ("attention", "mlp", "block"):
            assert abs(a["loss_increase"][p] - b["loss_increase"][p]) < 1e-5
        np.testing.assert_allclose(a["heads"]["loss_increase"], b["heads"]["loss_increase"], atol=1e-5)
    assert abs(batched["blocks"][1]["loss_increase"]["attention"]) > 1e-4  # the changes change something


@pytest.mark.parametrize("later, measured", [
    ("", ["similarity", "loss:attention", "loss:mlp", "loss:block", "heads", "head_loss"]),  # the report is the product
    (",drop-attention(count=1)", ["similarity"]),
    (",drop-mlp(count=1,by=loss)", ["similarity", "loss:mlp"]),
    (",prune-heads(ratio=0.25)", ["similarity", "heads", "head_loss"]),
    (",drop-attention(layers=[1])", ["similarity", "loss:attention", "loss:mlp", "loss:block", "heads", "head_loss"]),
    (",analyze-redundancy,drop-attention(count=1,by=loss)", ["similarity", "loss:attention", "loss:mlp", "loss:block",
                                                             "heads", "head_loss"]),  # the second analysis serves it
])
def test_measures_what_later_passes_read(llama, later, measured):
    prog, _ = llama
    feeds = feeds_for(prog, 1)
    ctx = PassContext(calibration=feeds)
    Pipeline.parse("analyze-redundancy(loss_samples=0)" + later).run(prog.clone(), ctx)
    first = ctx.records[0]["details"]
    assert first["measured"] == measured
    full, _ = analysis(prog.clone(), feeds, "analyze-redundancy(measure=all)")
    if measured == ["similarity", "loss:mlp"]:  # what was measured is what the full analysis measures
        assert first["loss_increase"]["mlp"] == [b["loss_increase"]["mlp"] for b in full["blocks"]]
        assert first["loss_increase"]["attention"] == [None] * 4
        assert ctx.records[1]["details"]["analysis"] == "from analyze-redundancy earlier in this pipeline"
    assert first["similarity"] == {p: [b["similarity"][p] for b in full["blocks"]] for p in ("attention", "mlp", "block")}


def test_window_caps_a_dynamic_programs_feeds():
    """A program traced with a dynamic sequence: 16-token feeds are analysed on their first 8 tokens
    (window=8), exactly as 8-token feeds are; a static program keeps its length."""
    from test_elimination import ARCHS, TINY
    from transformers import AutoModelForCausalLM
    from tcc.frontends.frontend import CausalLM
    from tcc.passes.analyze_redundancy import analyze
    model_type, _, overrides, impl = ARCHS["llama"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**TINY, **overrides}),
                                             attn_implementation=impl).eval()
    ids = torch.randint(0, 100, (1, 16), generator=torch.Generator().manual_seed(0))
    prog = frontend.trace(CausalLM(model), example_inputs={"input_ids": ids}, output_names=["logits"],
                          task="causal-lm", max_seq_len=32)
    feeds = [{"input_ids": np.random.default_rng(s).integers(0, 100, (1, 16))} for s in (1, 2)]
    capped, _ = analysis(prog.clone(), feeds, "analyze-redundancy(window=8,heads=false)")
    short = analyze(prog, [{"input_ids": f["input_ids"][:, :8]} for f in feeds], heads=False, window=0)
    assert capped["calibration"]["seq_len"] == 8 and short["calibration"]["seq_len"] == 8
    assert [b["similarity"] for b in capped["blocks"]] == [b["similarity"] for b in short["blocks"]]
    assert [b["loss_increase"] for b in capped["blocks"]] == [b["loss_increase"] for b in short["blocks"]]
    full, _ = analysis(prog.clone(), feeds, "analyze-redundancy(window=0,heads=false,loss=false)")
    assert full["calibration"]["seq_len"] == 16


def test_head_norms_match_hooked_model(llama):
    prog, model = llama
    feeds = feeds_for(prog, 1)
    report, _ = analysis(prog.clone(), feeds, "analyze-redundancy(loss=false)")
    o_proj = layers_of(model)[1].self_attn.o_proj
    seen = {}
    hook = o_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    with torch.no_grad():
        ids = torch.from_numpy(feeds[0]["input_ids"])
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    hook.remove()
    w = o_proj.weight
    expected = [(seen["x"][0, :, 16 * h:16 * h + 16] @ w[:, 16 * h:16 * h + 16].T).norm(dim=-1).mean().item() for h in range(4)]
    np.testing.assert_allclose(report["blocks"][1]["heads"]["norm"], expected, rtol=1e-4)


def test_bert_post_norm_block_similarity_and_cosine_loss():
    prog, model = build("bert")
    feeds = feeds_for(prog, 2)
    report, _ = analysis(prog.clone(), feeds, "analyze-redundancy(head_loss=false)")
    assert report["loss"]["kind"].startswith("1 - cosine") and abs(report["loss"]["base"]) < 1e-9
    seen = {}
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, (a[0], o)))
             for i, layer in enumerate(layers_of(model))]
    sims = np.zeros(4)
    with torch.no_grad():
        for f in feeds:
            model(input_ids=torch.from_numpy(f["input_ids"]), attention_mask=torch.from_numpy(f["attention_mask"]))
            sims += [cos(*seen[i]).mean() for i in range(4)]
    for h in hooks:
        h.remove()
    np.testing.assert_allclose([b["similarity"]["block"] for b in report["blocks"]], sims / 2, atol=1e-5)
    assert all(b["loss_increase"]["attention"] > 0 and b["heads"]["loss_increase"] is None for b in report["blocks"])


# -- tcc.compress.calibration ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm_shaped():
    """A tiny random BERT with MiniLM's vocabulary and tokenizer, sequences of 16."""
    config = AutoConfig.for_model("bert", hidden_size=32, num_attention_heads=2, num_hidden_layers=3,
                                  intermediate_size=64, vocab_size=30522)
    torch.manual_seed(0)
    model = AutoModel.from_config(config).eval()
    ids = torch.zeros(1, 16, dtype=torch.long)
    prog = frontend.trace(FeatureExtraction(model), example_inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                          output_names=["last_hidden_state"], task="feature-extraction")
    prog.tokenizer_dir = str(models.resolve("minilm"))
    return prog


def test_text_feeds_windows(minilm_shaped, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("alpha " * 400 + "\n" + "omega " * 400 + "\n")
    feeds = text_feeds(minilm_shaped, text, n_samples=3, seed=0)
    assert len(feeds) == 3
    for f in feeds:
        assert set(f) == {"input_ids", "attention_mask"} and f["input_ids"].shape == (1, 16)
        assert f["input_ids"].dtype == np.int64 and (f["attention_mask"] == 1).all()
        assert f["input_ids"][0, 0] == 101 and f["input_ids"][0, -1] == 102  # [CLS] ... [SEP]
    tokenizer_alpha, omega = 6541, 14827  # MiniLM's ids of "alpha" and "omega"
    body = np.concatenate([f["input_ids"][0, 1:-1] for f in feeds])
    assert set(body.tolist()) == {tokenizer_alpha}  # 3 of the first 12 windows: all in the first half
    second_half = text_feeds(minilm_shaped, text, n_samples=3, start=0.5)
    assert {int(t) for f in second_half for t in f["input_ids"][0, 1:-1]} == {omega}
    valid = WIKITEXT / "valid.txt"  # the tests' $TCC_CALIBRATION_TEXT (conftest): its second half by default
    again = text_feeds(minilm_shaped, valid, n_samples=2, seed=1, start=0.5)
    other = text_feeds(minilm_shaped, valid, n_samples=2, seed=2, start=0.5)
    assert np.array_equal(again[0]["input_ids"], text_feeds(minilm_shaped, None, n_samples=2, seed=1)[0]["input_ids"])
    assert not np.array_equal(again[0]["input_ids"], other[0]["input_ids"])


def test_text_feeds_overlap_a_short_text(minilm_shaped, tmp_path, capsys):
    """A text with room for one window but not n_samples distinct ones gives windows spread evenly
    over it (the first starts at token 0, the last ends at the text's end), with a warning."""
    text = tmp_path / "short.txt"
    text.write_text(" ".join(f"word{i}" for i in range(10)) + "\n")
    feeds = text_feeds(minilm_shaped, text, n_samples=4)
    rows = np.stack([f["input_ids"][0] for f in feeds])
    assert rows.shape == (4, minilm_shaped.inputs[0].shape[1])
    assert len({r.tobytes() for r in rows}) == 4                      # distinct windows
    body = rows[:, 1:-1]                                               # [CLS] ... [SEP] stripped
    n = body.shape[1]
    shifts = [k for k in range(1, n) if np.array_equal(body[0, k:], body[1, :n - k])]
    assert shifts, "the second window should start inside the first"   # consecutive windows overlap
    assert "the windows overlap" in capsys.readouterr().err


def test_text_feeds_errors(minilm_shaped, tmp_path, monkeypatch):
    short = tmp_path / "short.txt"
    short.write_text("just a few words here\n")
    with pytest.raises(UserError, match=r"has 5 tokens, fewer than 2 x 1 windows of 14"):
        text_feeds(minilm_shaped, short, n_samples=2)
    with pytest.raises(UserError, match="not found") as e:
        text_feeds(minilm_shaped, tmp_path / "missing.txt")
    assert "TCC_CALIBRATION_TEXT" in e.value.hint
    with pytest.raises(UserError, match="seq_len=32"):
        text_feeds(minilm_shaped, short, seq_len=32)
    monkeypatch.setenv("TCC_CALIBRATION_TEXT", str(short))
    assert default_text() == short
    with pytest.raises(UserError, match=r"short.txt \(from 50% of the file on\) has \d tokens"):
        text_feeds(minilm_shaped, n_samples=1)


def test_analysis_from_text_file(minilm_shaped, tmp_path):
    """No calibration feeds in the context: the pass reads `samples` windows of text."""
    report, ctx = analysis(minilm_shaped.clone(), None, f"analyze-redundancy(samples=3,text_file={WIKITEXT / 'valid.txt'},loss=false)",
                           ctx=PassContext())
    assert report["calibration"]["feeds"] == 3 and str(WIKITEXT / "valid.txt") in report["calibration"]["source"]
    assert all(-1 <= b["similarity"]["attention"] <= 1 for b in report["blocks"])


def test_calibration_loss_and_runner(llama):
    prog, _ = llama
    feeds = feeds_for(prog, 2)
    logits = [torch.from_numpy(prog(f)["logits"]) for f in feeds]
    ce = [torch.nn.functional.cross_entropy(l[0, :-1], torch.from_numpy(f["input_ids"])[0, 1:], reduction="sum")
          for l, f in zip(logits, feeds)]
    assert abs(calibration_loss(prog, feeds) - float(sum(ce)) / 14) < 1e-5

    runner = GraphRunner(prog.gm)
    args = [torch.from_numpy(feeds[0]["input_ids"])]
    mid = len(runner.nodes) // 2
    clean = runner.run(args, snapshot_at=[mid])
    assert torch.equal(clean.outputs[0], prog.gm(*args))
    resumed = runner.run(None, resume=(mid, clean.snapshots[mid]))
    assert torch.equal(resumed.outputs[0], clean.outputs[0])
    loss = CalibrationLoss(prog, feeds)
    assert abs(loss([clean.outputs, prog(feeds[1])]) - calibration_loss(prog, feeds)) < 1e-6
