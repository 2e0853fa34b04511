"""The report as proof (issue 16): the artifact timed against its baseline in the same run, task
accuracy against the source on the held-out text shipped with tcc, compile stages that add up, a
compile killed or interrupted leaving a report, and a page that fits a 1280-px screen (checked in a
headless Chromium when one is installed: .ci/setup installs chromium-headless-shell).

Tiny random-init models at sequence length 8-16: a Llama with MiniLM's tokenizer (perplexity), a
BERT with MiniLM's WordPiece tokenizer (conftest; embedding cosine, W8A8: integer work), the BERT without a
tokenizer (top-1 agreement on random inputs).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import tcc
from tcc import report as reports
from tcc.compress.calibration import DEFAULT_TEXT, HELD_OUT_TEXT
from tcc.evaluate import HELD_OUT_TOKENS, HELD_OUT_WINDOWS, perplexity

CHROMIUM = next((shutil.which(b) for b in ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")
                 if shutil.which(b)), None)


def read(art: Path) -> dict:
    return json.loads((art / "report.json").read_text())


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, minilm_dir) -> Path:
    """A random-init 2-layer Llama (hidden 32) with MiniLM's WordPiece tokenizer (any tokenizer gives
    a perplexity; this one loads in a fraction of a second)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    out = tmp_path_factory.mktemp("models") / "tiny-llama"
    LlamaForCausalLM(config).eval().save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def llama_w8(tiny_llama, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("proof") / "llama-w8"
    tcc.compile(str(tiny_llama), "x86", out=out, seq_len=16, pipeline="quantize(weights=int8,min_size=256)",
                generate=False, cache=False, latency=True, evaluate=True).close()
    return out


@pytest.fixture(scope="module")
def bert_w8a8(tiny_bert_with_its_tokenizer, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("proof") / "bert-w8a8"
    tcc.compile(str(tiny_bert_with_its_tokenizer), "x86", out=out, seq_len=16, cache=False,
                pipeline="quantize(acts=int8,min_size=256)", calibration_text=str(DEFAULT_TEXT), latency=True,
                evaluate=True).close()
    return out


def test_speedup_is_the_baseline_timed_interleaved_with_the_artifact(llama_w8):
    lat = read(llama_w8)["run"]["latency"]
    base, sp, rounds = lat["baseline"], lat["speedup"], lat["rounds_ms"]
    assert base["engine"] == "tcc" and "without passes (fp32 weights)" in base["what"]
    assert base["cache"] == {}  # cache=False: built here, not stored
    assert len(rounds["tcc"]) == len(rounds["baseline"]) == lat["calls"] == base["calls"] == sp["rounds"]
    assert reports.MIN_ROUNDS <= sp["rounds"] <= reports.ROUNDS
    ratio = np.asarray(rounds["baseline"]) / np.asarray(rounds["tcc"])
    assert sp["median"] == pytest.approx(np.median(ratio), abs=2e-3)
    assert sp["min"] <= sp["p25"] <= sp["median"] <= sp["p75"] <= sp["max"]
    assert lat["median_ms"] == pytest.approx(np.median(rounds["tcc"]), abs=2e-3)
    assert base["median_ms"] == pytest.approx(np.median(rounds["baseline"]), abs=2e-3)
    assert lat["load"]["cpus"] == os.cpu_count() and lat["load"]["start"] >= 0 and lat["load"]["end"] >= 0


def test_perplexity_on_the_held_out_text_against_the_source(llama_w8, tiny_llama):
    """The report's perplexities are evaluate.perplexity of the source model and of the artifact on
    the same windows of tcc/data/held_out.txt (not the calibration text)."""
    r = read(llama_w8)
    ta = r["final"]["task_accuracy"]
    assert ta["metric"] == "perplexity" and ta["measured_with"] == "artifact" and "held_out.txt" in ta["text"]
    tokens = max(16, min(HELD_OUT_TOKENS, HELD_OUT_WINDOWS * 16))
    with tcc.load(llama_w8) as art:
        got = perplexity(art, tiny_llama, HELD_OUT_TEXT, 16, tokens, stride=16)
    want = perplexity(tcc.trace(str(tiny_llama), seq_len=16), tiny_llama, HELD_OUT_TEXT, 16, tokens, stride=16)
    assert (ta["tokens"], ta["windows"]) == (got["tokens"], got["windows"]) == (HELD_OUT_WINDOWS * 15, HELD_OUT_WINDOWS)
    assert ta["compressed"] == pytest.approx(got["value"], rel=1e-9)
    assert ta["source"] == pytest.approx(want["value"], rel=1e-5)
    assert ta["change"] == pytest.approx(got["value"] / want["value"] - 1, abs=1e-6)
    assert 0 < abs(ta["change"]) < 0.01  # int8 weights of a random model: measured about 1e-4
    pct = ta["change"] * 100
    assert (f"{pct:+.1f} % perplexity" if abs(pct) >= 0.05 else f"{pct:+.2g} % perplexity") in reports.summary(r)
    assert "non-overlapping windows of 16 tokens" in ta["definition"]


def test_stages_add_up_to_the_wall_time_and_peak_rss_is_reported(llama_w8):
    r = read(llama_w8)
    sec = r["run"]["seconds"]
    names = [n for n, _ in sec["stages"]]
    assert names[0] == "load and trace" and names[-1] == "other"
    assert {"passes", "build"} <= set(names) and any(n.startswith("baseline") for n in names)
    assert sum(s for _, s in sec["stages"]) == pytest.approx(sec["total"], abs=0.02 * len(names))
    assert all(s >= 0 for _, s in sec["stages"])
    assert r["run"]["memory"]["peak_rss_gb"] >= max(s["peak_gb"] for s in r["run"]["memory"]["steps"]) > 0
    md = (llama_w8 / "report.md").read_text()
    assert f"| total | {sec['total']:.2f} | {r['run']['memory']['peak_rss_gb']:.2f} |" in md


def test_w8a8_counts_integer_work_apart_and_reports_embedding_cosine(bert_w8a8):
    r = read(bert_w8a8)
    q = r["passes"][-1]
    assert q["name"] == "quantize" and q["int_flops"]["before"] == 0
    assert 0 < q["int_flops"]["after"] <= q["flops"]["after"] == q["flops"]["before"]
    float_after = q["flops"]["after"] - q["int_flops"]["after"]
    assert float_after < q["flops"]["before"]  # the int8 products left the float column
    ta = r["final"]["task_accuracy"]
    assert ta["metric"] == "cosine" and ta["samples"] > 1 and 0.98 < ta["min"] <= ta["compressed"] < 1
    assert f"embedding cosine {ta['compressed']:.4f}" in reports.summary(r)
    page = (bert_w8a8 / "report.html").read_text()
    assert "<th>int GOP</th>" in page and f"{q['int_flops']['after'] / 1e9:.3g}" in page
    assert "<code>quantize(acts=int8,min_size=256)</code>" in page  # options that differ from the defaults
    assert "<details><summary>full pipeline" in page and "act_scheme=dynamic" in page.split("<details>")[1]


def test_uncompressed_artifact_is_compared_with_pytorch_and_dce_is_not_doubled(tiny_bert_dir, tmp_path):
    tcc.compile(str(tiny_bert_dir), "x86", out=tmp_path / "a", seq_len=8, pipeline="dce", cache=False, latency=True,
                evaluate=True).close()
    r = read(tmp_path / "a")
    assert r["pipeline"] == "dce" and [p["name"] for p in r["passes"]] == ["dce"]
    lat = r["run"]["latency"]
    assert lat["baseline"]["engine"] == "pytorch" and lat["speedup"]["rounds"] >= reports.MIN_ROUNDS
    ta = r["final"]["task_accuracy"]  # no tokenizer: top-1 agreement on random inputs
    assert ta["metric"] == "agreement" and ta["inputs"] == "random" and ta["compressed"] == 1.0
    assert ta["output_cosine"] == pytest.approx(1, abs=1e-6)
    assert "<title>tcc report: tiny-bert</title>" in (tmp_path / "a" / "report.html").read_text()
    assert str(tiny_bert_dir) not in (tmp_path / "a" / "report.html").read_text().split("<table")[0]
    assert "than PyTorch eager on this CPU" in reports.summary(r)


def test_no_latency_and_no_eval_skip_them(tiny_bert_dir, tmp_path):
    from tcc.cli import main
    assert main(["compile", str(tiny_bert_dir), "-o", str(tmp_path / "a"), "--seq-len", "8", "--no-latency",
                 "--no-eval", "--no-cache"]) == 0
    r = read(tmp_path / "a")
    assert r["final"]["task_accuracy"] == {"metric": None, "note": "turned off (--no-eval)"}
    assert "latency" not in r["run"] and r["final"]["latency"]["reason"] == "turned off (--no-latency)"
    assert not any(n.startswith(("baseline", "task accuracy")) for n, _ in r["run"]["seconds"]["stages"])
    assert "speed not compared: turned off (--no-latency)" in reports.summary(r)


# -- a compile that is killed or interrupted ---------------------------------------------------------

def _start(tiny_bert_dir, out: Path, report: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("TCC_NO_LATENCY", "TCC_NO_EVAL")}  # as a user runs it
    env["PYTHONUNBUFFERED"] = "1"
    return subprocess.Popen([sys.executable, "-m", "tcc.cli", "compile", str(tiny_bert_dir), "-o", str(out),
                             "--seq-len", "8", "--no-cache", "--report", str(report)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for_stage(proc, report: Path, stage: str, timeout: float = 120) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            r = json.loads(report.read_text())
        except (OSError, ValueError):
            r = {}
        if ((r.get("final") or {}).get("progress") or {}).get("stage") == stage:
            return r
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"the compile never reported stage {stage!r} (exit {proc.poll()})")


def test_a_killed_compile_leaves_a_report_saying_where(tiny_bert_dir, tmp_path, capsys):
    out, report = tmp_path / "art", tmp_path / "r.json"
    proc = _start(tiny_bert_dir, out, report)
    _wait_for_stage(proc, report, "build")
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    r = json.loads(report.read_text())
    assert r["final"]["exit_status"] is None and r["final"]["progress"]["state"] == "running"
    assert r["final"]["progress"]["stage"] == "build" and r["final"]["progress"]["pid"] == proc.pid
    assert [p["name"] for p in r["passes"]] == ["dce"]  # what had run
    assert not out.exists()  # no half-written artifact
    staged = list(tmp_path.glob(".art.tmp-*"))
    assert len(staged) == 1 and read(staged[0])["final"]["progress"]["stage"] == "build"
    # the next compile into the same directory says where the last one died and removes its files
    tcc.compile(str(tiny_bert_dir), "x86", out=out, seq_len=8, verify=False, latency=False, evaluate=False).close()
    said = " ".join(capsys.readouterr().err.split())
    assert re.search(rf"earlier compile into {re.escape(str(out))} \(pid {proc.pid}.*died during 'build'", said), said
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "r.json"]


def test_sigterm_interrupts_with_a_report_and_no_artifact(tiny_bert_dir, tmp_path):
    out, report = tmp_path / "art", tmp_path / "r.json"
    proc = _start(tiny_bert_dir, out, report)
    _wait_for_stage(proc, report, "build")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    r = json.loads(report.read_text())
    assert r["final"]["exit_status"] == 130 and r["final"]["error"]["type"] == "Terminated"
    assert r["final"]["progress"]["state"] == "interrupted" and r["final"]["progress"]["stage"] == "build"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # neither the artifact nor its staging


# -- the page in a browser -------------------------------------------------------------------------------

@pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium (apt-get install chromium-headless-shell; "
                                             ".ci/setup installs it)")
def test_page_fits_a_1280_px_screen_in_a_headless_browser(bert_w8a8, tmp_path):
    """Chromium at a 1280-px viewport: nothing wider than the window (document.scrollWidth, written
    into the page's title by a script added to a copy), and a screenshot of that size."""
    page = (bert_w8a8 / "report.html").read_text()
    probe = ("<script>window.onload=()=>{document.title='W'+document.documentElement.scrollWidth+'H'"
             "+document.documentElement.scrollHeight}</script></head>")
    copy = tmp_path / "page.html"
    copy.write_text(page.replace("</head>", probe, 1))
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,900",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(flags + ["--dump-dom", copy.as_uri()], capture_output=True, text=True, timeout=120).stdout
    width, height = map(int, re.search(r"<title>W(\d+)H(\d+)</title>", dom).groups())
    assert width <= 1280, f"the page is {width} px wide at a 1280-px window"
    assert height > 900  # the whole report rendered (summary, tables, plots)
    shot = tmp_path / "shot.png"
    subprocess.run(flags + [f"--screenshot={shot}", (bert_w8a8 / "report.html").as_uri()], capture_output=True,
                   timeout=120, check=True)
    from PIL import Image
    with Image.open(shot) as im:
        assert im.size == (1280, 900)
        assert len(np.unique(np.asarray(im.convert("L")))) > 16  # something was drawn
