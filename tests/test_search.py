"""The accuracy-budget search (tcc/search.py): option parsing, the Pareto front, the cost model,
resuming, the time budget, exit 3 through the CLI, and one real search on MiniLM (slow).

The fast tests search a random-init BERT (hidden 64, 4 layers, 8 tokens, no tokenizer, so the
accuracy drop is the relative output error on random inputs) over a narrowed space with no
compiling (out=None, measure=0): about a second per trial.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import WIKITEXT
from test_cli import assert_error, assert_user_error, tcc_cli

import tcc.search as search_mod
from tcc.errors import AccuracyBudgetError, UserError
from tcc.search import estimate_cost, pareto_front, parse_drop, parse_duration, search

SPACE = dict(quantization=("int8", "w8a8"), structure=("drop-attention", "drop-mlp"), measure=0, eval_samples=4,
             calibration_samples=4)


@pytest.fixture(scope="module")
def tiny():
    from transformers import BertConfig, BertModel
    from tcc.frontends import frontend
    torch.manual_seed(0)
    config = BertConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=4, intermediate_size=128,
                        vocab_size=100, max_position_embeddings=64)
    ids = torch.zeros(1, 8, dtype=torch.long)
    return frontend.trace(frontend.FeatureExtraction(BertModel(config).eval()),
                          example_inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                          output_names=["last_hidden_state"], task="feature-extraction")


# -- what the user types -----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, value", [("1%", 0.01), ("0.01", 0.01), ("2.5%", 0.025), ("0", 0.0), (" 3% ", 0.03)])
def test_parse_drop_accepts_percent_and_fraction(text, value):
    assert parse_drop(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["abc", "-1%", "-0.01", "1", "5", "nan", "", "%", "inf%"])
def test_parse_drop_rejects(text):
    with pytest.raises(UserError, match="not an accuracy drop"):
        parse_drop(text)


@pytest.mark.parametrize("text, seconds", [("20m", 1200), ("90s", 90), ("1h30m", 5400), ("300", 300), ("1.5h", 5400)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["abc", "0", "-5m", "m", "10x", ""])
def test_parse_duration_rejects(text):
    with pytest.raises(UserError, match="not a duration"):
        parse_duration(text)


# -- the Pareto front and the cost model ----------------------------------------------------------------------

def test_pareto_front_keeps_only_undominated_points():
    pts = [{"id": i, "drop": d, "cost": c} for i, (d, c) in
           enumerate([(0.0, 10.0), (0.01, 6.0), (0.02, 7.0), (0.02, 5.0), (0.05, 5.0), (0.03, 2.0), (-0.001, 11.0)])]
    front = pareto_front(pts, "cost")
    # (0.02, 7) is beaten by (0.01, 6); (0.05, 5) by (0.02, 5); the rest trade drop for cost
    assert [p["id"] for p in front] == [6, 0, 1, 3, 5]
    assert all(a["drop"] <= b["drop"] and a["cost"] > b["cost"] for a, b in zip(front, front[1:]))


def test_cost_model_ranks_w8a8_faster_and_int8_smaller(tiny):
    from tcc.pipeline import PassContext, Pipeline
    feeds = [tiny.example_inputs(seed=i) for i in range(4)]

    def cost(text, target="x86"):
        p = Pipeline.parse(text).run(tiny.clone(), PassContext(calibration=feeds)) if text else tiny
        return estimate_cost(p, target)

    fp32, w8a8, int8 = cost("dce"), cost("quantize(acts=int8)"), cost("quantize(weights=int8,embeddings=false)")
    # size: what the kernelized program stores: its parameters (q/k/v fused into one tensor, the dead
    # pooler gone); quantizing the block linears (4 layers, q/k/v/o 64x64, up/down 64x128) saves 3 of 4 bytes
    # (embeddings=false: the tables stay fp32 here)
    pruned = Pipeline.parse("dce").run(tiny.clone(), PassContext(calibration=feeds))
    assert fp32["size_bytes"] == pruned.param_bytes() < tiny.param_bytes()
    linear_fp32 = 4 * 4 * (4 * 64 * 64 + 2 * 64 * 128)
    assert fp32["size_bytes"] - int8["size_bytes"] == pytest.approx(0.75 * linear_fp32, rel=0.05)
    assert w8a8["latency_ms"] < int8["latency_ms"] <= fp32["latency_ms"] * 1.01
    assert fp32["flops"] == w8a8["flops"] > 0
    # an arm64 core is modelled slower than this host's
    assert cost("", "arm64")["latency_ms"] > fp32["latency_ms"]


# -- the search -----------------------------------------------------------------------------------------------

def test_search_writes_trials_front_and_plot(tiny, tmp_path):
    r = search(tiny, "x86", max_drop=0.05, work_dir=tmp_path, **SPACE)
    lines = [json.loads(line) for line in (tmp_path / "trials.jsonl").read_text().splitlines()]
    assert len(lines) == len(r.trials) == r.section["trials_run"]
    assert all(t["cost_source"] == "model" for t in lines)
    assert r.trials[0]["pipeline"] == "" and r.trials[0]["drop"] == 0
    # the choice: feasible (margin 10 %), fastest by the model among the feasible
    limit = 0.05 * 0.9
    feasible = [t for t in r.trials[1:] if not t.get("error") and t["drop"] <= limit]
    assert r.chosen["drop"] <= limit and r.chosen["held_out"]["drop"] <= 0.05
    assert r.chosen["latency_ms"] == min(t["latency_ms"] for t in feasible)
    assert r.chosen["held_out"]["measured_on"] == "program"
    front = json.loads((tmp_path / "pareto.json").read_text())
    assert front["chosen"]["pipeline"] == r.chosen["pipeline"]
    assert [p["pipeline"] for p in front["points"]] == [p["pipeline"] for p in pareto_front(
        [t for t in r.trials if not t.get("error")], "latency_ms")]
    assert (tmp_path / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "search.json").read_text())["chosen"]["pipeline"] == r.chosen["pipeline"]


def test_resume_skips_finished_trials_and_gives_the_same_result(tiny, tmp_path, monkeypatch):
    full = search(tiny, "x86", max_drop=0.05, work_dir=tmp_path / "full", **SPACE)
    real, calls = search_mod._evaluate, []

    def interrupted(*args):
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C during the 4th trial
        calls.append(args[2])
        return real(*args)

    monkeypatch.setattr(search_mod, "_evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        search(tiny, "x86", max_drop=0.05, work_dir=tmp_path / "resumed", **SPACE)
    log = tmp_path / "resumed" / "trials.jsonl"
    assert len(log.read_text().splitlines()) == 3
    with open(log, "a") as f:
        f.write('{"key": "cut sho')  # a crash in the middle of writing a line

    calls.clear()
    monkeypatch.setattr(search_mod, "_evaluate", lambda *a: calls.append(a[2]) or real(*a))
    again = search(tiny, "x86", max_drop=0.05, work_dir=tmp_path / "resumed", **SPACE)
    assert len(calls) == full.section["trials_run"] - 3
    assert not set(calls) & {t["pipeline"] for t in again.trials[:3]}
    assert again.chosen["pipeline"] == full.chosen["pipeline"]
    assert again.chosen["drop"] == pytest.approx(full.chosen["drop"], rel=1e-6)
    assert [t["pipeline"] for t in again.trials] == [t["pipeline"] for t in full.trials]


def test_time_budget_stops_new_trials(tiny, tmp_path, monkeypatch):
    ticks = iter(range(10**6))
    monkeypatch.setattr(search_mod, "_clock", lambda: float(next(ticks)))  # one second per look at the clock
    r = search(tiny, "x86", max_drop=0.5, budget_s=3.5, work_dir=tmp_path, **SPACE)
    assert r.stopped == "time budget"
    # the uncompressed reference always runs; the clock reads 1, 2, 3 before the next trials, 4 >= 3.5 after
    assert r.section["trials_run"] == 4
    assert r.chosen["pipeline"] != ""

    ticks = iter(range(10**6))
    with pytest.raises(AccuracyBudgetError, match="time budget"):
        search(tiny, "x86", max_drop=0.5, budget_s=0.5, work_dir=tmp_path / "short", **SPACE)


def test_objective_size_picks_the_smallest_and_max_trials_stops(tiny, tmp_path):
    space = {**SPACE, "quantization": ("int8", "int4"), "structure": ()}
    r = search(tiny, "x86", max_drop=0.5, objective="size", work_dir=tmp_path, **space)
    feasible = [t for t in r.trials[1:] if not t.get("error") and t["drop"] <= 0.45]
    assert len(feasible) == 2  # both schemes fit a 50 % budget on this random model
    assert "weights=int4" in r.chosen["pipeline"]
    assert r.chosen["size_bytes"] == min(t["size_bytes"] for t in feasible) < r.trials[0]["size_bytes"]

    limited = search(tiny, "x86", max_drop=0.5, objective="size", work_dir=tmp_path / "limited", max_trials=2, **space)
    assert limited.stopped == "trial limit" and limited.section["trials_run"] == 2  # the reference and int8
    assert "weights=int8" in limited.chosen["pipeline"]


def test_no_candidate_within_budget_raises_and_writes_no_artifact(tiny, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(AccuracyBudgetError, match="no pipeline found within 0.00%") as e:
        search(tiny, "x86", max_drop=1e-9, work_dir=tmp_path / "s", out=out, **SPACE)
    assert e.value.exit_code == 3
    assert not out.exists()
    section = json.loads((tmp_path / "s" / "search.json").read_text())
    assert section["chosen"] is None and section["trials"] >= 3


def test_w4a8_scheme_on_cpu_targets_only(tiny, tmp_path):
    """W4A8 is a default scheme on CPU targets (int4 GPTQ codes with int8 activations: the int4 trial's bytes,
    W8A8's kind of kernel); a cuda target, which has no W4A8 kernel, refuses it by name."""
    assert "w4a8" in search_mod.DEFAULT_QUANT
    space = {**SPACE, "quantization": ("int4", "w4a8"), "structure": ()}
    r = search(tiny, "x86", max_drop=0.5, objective="latency", work_dir=tmp_path, **space)
    trials = {t["pipeline"]: t for t in r.trials[1:] if not t.get("error")}
    w4a8 = next(t for p, t in trials.items() if "acts=int8" in p)
    int4 = next(t for p, t in trials.items() if "acts=int8" not in p)
    assert w4a8["size_bytes"] == int4["size_bytes"] and w4a8["latency_ms"] < int4["latency_ms"]
    with pytest.raises(UserError, match=r"\['w4a8'\] have no sm80 kernels"):
        search(tiny, "cuda", max_drop=0.5, work_dir=tmp_path / "cuda", **space)


def test_heal_steps_retry_a_quantization_healed_through_its_quantizer(tiny, tmp_path):
    """With heal_steps, a scheme that would win but misses the budget is tried again as quantize(...),heal(...):
    the heal pass trains through the quantizer and keeps the format (same bytes)."""
    space = {**SPACE, "quantization": ("int4",), "structure": ()}
    with pytest.raises(AccuracyBudgetError):
        search(tiny, "x86", max_drop=1e-9, objective="size", work_dir=tmp_path, heal_steps=2, max_trials=3, **space)
    trials = [json.loads(line) for line in (tmp_path / "trials.jsonl").read_text().splitlines()]
    plain = next(t for t in trials if t.get("stage") == "quantize")
    healed = next(t for t in trials if t.get("stage") == "quantize-heal")
    assert healed["pipeline"] == plain["pipeline"] + ",heal(steps=2)" and not healed.get("error")
    assert healed["size_bytes"] == plain["size_bytes"]  # heal keeps the format (here it kept the codes too)
    with pytest.raises(UserError, match="heal steps"):
        search(tiny, "x86", max_drop=0.5, work_dir=tmp_path / "bad", heal_steps=-1, **space)


# -- through the CLI ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("drop", ["abc", "-1%", "150"])
def test_cli_rejects_bad_max_accuracy_drop(drop, tmp_path, tiny_bert_dir):
    r = tcc_cli("compile", tiny_bert_dir, f"--max-accuracy-drop={drop}", "-o", tmp_path / "o")
    assert_user_error(r, "not an accuracy drop")
    assert "hint: give a percentage like 1%" in r.stderr


def test_cli_search_flags_need_max_accuracy_drop(tmp_path, tiny_bert_dir):
    assert_user_error(tcc_cli("compile", tiny_bert_dir, "--objective", "size", "-o", tmp_path / "o"), "--time-limit")


def test_cli_budget_not_met_exits_3(tmp_path, tiny_bert_dir):
    out, work = tmp_path / "out", tmp_path / "search"
    r = tcc_cli("compile", tiny_bert_dir, "--max-accuracy-drop", "0.0000001", "--seq-len", "8",
                "--search-dir", work, "-o", out, "--report", tmp_path / "report.json")
    assert_error(r, 3, "no pipeline found within 0.00%")
    assert not out.exists()
    assert (work / "trials.jsonl").exists() and (work / "tradeoff.png").exists()
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["final"]["exit_status"] == 3 and report["search"]["chosen"] is None


# -- a real search --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_minilm_search_meets_the_budget_on_held_out_text(tmp_path):
    import tcc
    from tcc.evaluate import cosine
    from tcc.report import read

    r = search("minilm", "x86", max_drop=0.01, seq_len=16, work_dir=tmp_path / "s", out=tmp_path / "art",
               quantization=("int8", "w8a8"), structure=("drop-attention",), measure=1, eval_samples=16,
               held_out_text=WIKITEXT / "test.txt")
    assert r.chosen["drop"] <= 0.009  # the 10 % margin
    assert r.chosen["held_out"]["measured_on"] == "artifact"
    # held-out, measured again here: the artifact's embeddings vs the uncompressed model on test.txt
    source = tcc.trace("minilm", seq_len=16)
    with tcc.load(r.artifact) as art:
        held = cosine(art, source, source.tokenizer_dir, WIKITEXT / "test.txt", 16, 16)
    assert 1 - held["value"] <= 0.01
    assert 1 - held["value"] == pytest.approx(r.chosen["held_out"]["drop"], abs=1e-4)
    assert "quantize" in r.chosen["pipeline"]  # int8 and W8A8 cost MiniLM < 0.3 %: something compresses
    assert r.trials[0]["measured"]["latency_ms"] > 0  # the uncompressed program is timed too
    assert read(r.artifact)["search"]["chosen"]["pipeline"] == r.chosen["pipeline"]
    assert not math.isnan(r.chosen["latency_ms"]) and r.chosen.get("measured") is not None
    assert not (tmp_path / "s" / "artifacts").exists()
    assert np.isfinite([p["drop"] for p in r.pareto]).all()


def test_cost_model_knows_w4a8(tiny):
    """W4A8 (tcc_dense_w4a8's integer GEMM, HOST_GOPS from benchmarks/gemv_ab.py --m 128) is modelled faster
    than weight-only int4 (dequantize + sgemm) and, on this 8-token model where the weight bytes bound the
    dense kernels, no slower than W8A8, whose bytes it halves."""
    from tcc.pipeline import PassContext, Pipeline
    feeds = [tiny.example_inputs(seed=i) for i in range(4)]

    def cost(text):
        return estimate_cost(Pipeline.parse(text).run(tiny.clone(), PassContext(calibration=feeds)), "x86")

    w8a8, w4a8 = cost("quantize(acts=int8)"), cost("quantize(weights=int4,group=32,acts=int8)")
    w4 = cost("quantize(weights=int4,group=32)")
    assert w4a8["latency_ms"] <= w8a8["latency_ms"] and w4a8["latency_ms"] < w4["latency_ms"]
    assert w4a8["size_bytes"] < w8a8["size_bytes"] and w4a8["flops"] == w8a8["flops"]
