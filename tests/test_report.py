"""report.json / report.html / report.md (tcc/report.py) as `tcc.compile` writes them.

A random-init BERT (conftest `tiny_bert_dir`, hidden 64, 2 layers) at seq_len 8, quantized to int8
weights, compiles in seconds; the caches are off so each compile really builds.
"""
from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

import tcc
from tcc import report as reports
from tcc.frontends.models import file_sha256

PIPELINE = "quantize-weights(bits=8)"


def compile_tiny(tiny_bert_dir, out: Path, **kwargs):
    kwargs = {"latency": True, "evaluate": True, **kwargs}  # on, as outside the suite (conftest turns them off)
    tcc.compile(str(tiny_bert_dir), "x86", out=out, seq_len=8, pipeline=PIPELINE, cache=False, **kwargs).close()
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def two_compiles(tiny_bert_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("report")
    return [(compile_tiny(tiny_bert_dir, d / name, report=d / f"{name}.json"), d / name, d / f"{name}.json")
            for name in ("a", "b")]


def test_report_json_holds_the_schema_and_the_measurements(two_compiles):
    r, art, _ = two_compiles[0]
    m = json.loads((art / "manifest.json").read_text())
    assert r["schema"] == "tcc.report/1" and r["tcc_version"] == tcc.__version__
    assert r["model"]["source"] == m["source"] and r["model"]["inputs"] == m["inputs"]
    assert r["target"] == m["target"] and r["backend"] == "tvm" and r["pipeline"] == m["pipeline"]
    assert [p["name"] for p in r["passes"]] == ["dce", "quantize-weights"]
    q = r["passes"][1]
    assert q["param_bytes"]["after"] < 0.4 * q["param_bytes"]["before"]  # int8 weights, fp32 embeddings
    assert q["flops"]["before"] == q["flops"]["after"] > 0
    assert 0 < q["drift"]["rel"] < 0.01  # int8 weights: measured 2.8e-4
    final = r["final"]
    assert final["exit_status"] == 0 and final["error"] is None
    assert final["size"] == {"weight_bytes": m["sizes"]["weight_bytes"], "source_param_bytes": m["sizes"]["source_param_bytes"],
                             "ratio": round(m["sizes"]["weight_bytes"] / m["sizes"]["source_param_bytes"], 6)}
    assert final["accuracy"]["measured_with"] == "artifact"
    assert final["accuracy"]["vs_source"] == m["run"]["drift_vs_source"]
    assert final["accuracy"]["vs_program"]["last_hidden_state"]["max_rel_err"] < 1e-5
    assert final["latency"] == {"measured": True, "reason": None}
    lat = r["run"]["latency"]
    assert lat["calls"] >= 2 and 0 < lat["min_ms"] <= lat["median_ms"] <= lat["p90_ms"]
    assert [name for name, _ in r["run"]["seconds"]["passes"]] == ["dce", "quantize-weights"]


def test_two_compiles_differ_only_in_run(two_compiles):
    (a, *_), (b, *_) = two_compiles
    assert set(a) == set(b)
    assert {k for k in a if a[k] != b[k]} <= {"run"}
    assert a["run"]["created"] and a["run"]["host"]


def test_report_path_gets_a_copy_and_the_manifest_hashes_only_stable_files(two_compiles):
    r, art, copy = two_compiles[0]
    assert json.loads(copy.read_text()) == r
    m = json.loads((art / "manifest.json").read_text())
    assert set(m["files"]) == {"model.so", "weights.safetensors"}  # the reports hold timings
    assert m["files"]["model.so"] == file_sha256(art / "model.so")
    assert (art / "report.md").read_text() == reports.render_markdown(r)


def test_html_is_self_contained_with_the_pass_plots(two_compiles):
    r, art, _ = two_compiles[0]
    page = (art / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2  # latency rounds; size / work / drift panels
    assert "src='http" not in page and "<script" not in page
    assert "<code>dce,quantize-weights(bits=8," in page and f"{r['run']['latency']['median_ms']:.3g} ms" in page
    png = base64.b64decode(page.split("data:image/png;base64,")[2].split("'")[0])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_html_includes_the_heatmap_a_pass_wrote(tiny_bert_dir, tmp_path):
    import numpy as np
    plots = tmp_path / "analysis"
    ids = tmp_path / "ids.npy"  # the random BERT has no tokenizer: calibration as token ids
    np.save(ids, np.random.default_rng(0).integers(0, 100, (1, 128)))
    tcc.compile(str(tiny_bert_dir), "x86", out=tmp_path / "art", seq_len=8, verify=False, latency=False, cache=False,
                pipeline=f"analyze-redundancy(out={plots})", calibration_text=str(ids)).close()
    page = (tmp_path / "art" / "report.html").read_text()
    assert base64.b64encode((plots / "redundancy.png").read_bytes()).decode() in page
    r = json.loads((tmp_path / "art" / "report.json").read_text())
    assert r["final"]["latency"] == {"measured": False, "reason": "turned off (--no-latency)"}
    assert r["final"]["accuracy"] is None and "--no-verify" in r["final"]["accuracy_note"]
    assert "latency" not in r["run"]


def test_budget_miss_writes_the_report_but_no_artifact(tiny_bert_dir, tmp_path):
    with pytest.raises(tcc.AccuracyBudgetError, match="more than --max-drift 1e-09"):
        tcc.compile(str(tiny_bert_dir), "x86", out=tmp_path / "art", seq_len=8, pipeline=PIPELINE, cache=False,
                    max_drift=1e-9, report=tmp_path / "failed.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["failed.json"]
    r = json.loads((tmp_path / "failed.json").read_text())
    assert r["final"]["exit_status"] == 3 and r["final"]["error"]["type"] == "AccuracyBudgetError"
    assert r["final"]["max_drift"]["limit"] == 1e-9 and not r["final"]["max_drift"]["met"]
    assert r["final"]["max_drift"]["drift"] == max(v["max_rel_err"] for v in r["final"]["accuracy"]["vs_source"].values())
    assert [p["name"] for p in r["passes"]] == ["dce", "quantize-weights"] and r["final"]["size"] is None


def test_add_section_shows_in_json_and_html(two_compiles, tmp_path):
    _, art, _ = two_compiles[1]
    image = tmp_path / "plot.png"
    image.write_bytes(reports._pass_plot(reports.read(art)["passes"]))
    reports.add_section(art, "search", {"chosen": "dce"}, images=[image])
    r = reports.read(art)
    assert r["search"] == {"chosen": "dce", "images": [str(image)]}
    assert base64.b64encode(image.read_bytes()).decode() in (art / "report.html").read_text()
