"""Recipes (tcc/recipe.py, `tcc compile --recipe`): the example recipes parse and validate, mistakes
name the key, relative paths follow the recipe file, flags given explicitly win, and the encoder
example compiles MiniLM for real (at seq_len 16)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tcc import recipe
from tcc.cli import build_parser, cmd_compile
from tcc.errors import UserError
from tcc.pipeline import Pipeline

from test_cli import tcc_cli

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "recipes"


def write(tmp_path: Path, text: str, name: str = "r.toml") -> Path:
    (tmp_path / name).write_text(text)
    return tmp_path / name


def test_encoder_example():
    r = recipe.load(EXAMPLES / "encoder.toml")
    assert r.model == "minilm"
    want = str(Pipeline.parse("quantize(weights=int8,acts=int8,method=smoothquant,alpha=0.6)"))
    assert r.settings == {"--target": "x86", "--task": "feature-extraction", "--seq-len": "128", "--batch": "1",
                          "--max-drift": "0.1", "--calibration-samples": "8", "--pipeline": want}


def test_causal_lm_example():
    r = recipe.load(EXAMPLES / "causal_lm.toml")
    assert r.model == "smollm2" and r.settings["--task"] == "causal-lm" and r.settings["--calibration-samples"] == "16"
    assert r.settings["--max-context"] == "1024"
    (q,) = Pipeline.parse(r.settings["--pipeline"])
    assert (q.name, q.weights, q.acts, q.method, q.alpha, q.embeddings) == ("quantize", "int8", "int8", "smoothquant", "0.6", True)


def test_pipeline_tables_and_text_mean_the_same(tmp_path):
    tables = recipe.load(write(tmp_path, '[[pipeline]]\npass = "fold-constants"\n[[pipeline]]\npass = "quantize-weights"\n'
                                         'bits = 8\nskip = ["lm_head"]\n'))
    text = recipe.load(write(tmp_path, 'pipeline = "fold-constants,quantize-weights(skip=[lm_head])"\n', "t.toml"))
    assert tables.settings["--pipeline"] == text.settings["--pipeline"] == "fold-constants,quantize-weights(skip=[lm_head])"


@pytest.mark.parametrize("text,words", [
    ('seq_lenn = 64\n', ["unknown key 'seq_lenn'", "seq_len"]),
    ('[calibration]\nsample = 8\n', ["unknown key 'calibration.sample'", "samples"]),
    ('seq_len = "64"\n', ["'seq_len' must be a positive integer", "'64'"]),
    ('batch = 0\n', ["'batch' must be a positive integer", "0"]),
    ('max_drift = true\n', ["'max_drift' must be a number"]),
    ('pipeline = "quantize-weights(bitz=8)"\n', ["'pipeline'", "no option 'bitz'"]),
    ('[[pipeline]]\npass = "frobnicate"\n', ["'pipeline'", "unknown pass 'frobnicate'"]),
    ('[[pipeline]]\nbits = 8\n', ["'pipeline'", "pass = \"NAME\""]),
    ('target = "x86\n', ["not valid TOML", "line 1"]),
], ids=["key", "table-key", "type", "range", "bool", "pass-option", "pass", "no-pass-name", "toml"])
def test_mistakes_name_the_key(tmp_path, text, words):
    with pytest.raises(UserError) as e:
        recipe.load(write(tmp_path, text))
    message = f"{e.value.message} {e.value.hint or ''}"
    for w in ["r.toml", *words]:
        assert w in message, f"{w!r} not in {message!r}"


def test_missing_recipe_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        recipe.load(tmp_path / "absent.toml")


def test_relative_paths_follow_the_recipe_file(tmp_path):
    (tmp_path / "sub").mkdir()
    r = recipe.load(write(tmp_path / "sub", 'model = "../models/bert"\noutput = "out/bert"\n[calibration]\ntext = "c.txt"\n'))
    assert r.model == str(tmp_path / "models" / "bert")
    assert r.settings["--output"] == str(tmp_path / "sub" / "out" / "bert")
    assert r.settings["--calibration"] == str(tmp_path / "sub" / "c.txt")
    assert recipe.load(write(tmp_path, 'model = "smollm2"\n')).model == "smollm2"  # an alias stays one


def test_budget_table_becomes_the_search_flags(tmp_path, monkeypatch):
    """[budget] reaches the accuracy-budget search as its flags would (the search itself is not run)."""
    path = write(tmp_path, 'model = "minilm"\n[budget]\nmax_accuracy_drop = "1%"\nobjective = "size"\ntime = 600\n')
    seen = {}
    import tcc.cli
    monkeypatch.setattr(tcc.cli, "_search_compile", lambda a: seen.update(vars(a)) or 0)
    argv = ["compile", "--recipe", str(path), "--objective", "latency"]
    a = build_parser().parse_args(argv)
    a.argv = argv
    assert cmd_compile(a) == 0
    assert (seen["model"], seen["max_accuracy_drop"], seen["objective"], seen["budget"]) == ("minilm", "1%", "latency", "600")


def test_flags_given_explicitly_win(tmp_path, tiny_bert_dir):
    path = write(tmp_path, f'model = "{tiny_bert_dir}"\nseq_len = 16\noutput = "art"\npipeline = "fold-constants"\n')
    r = tcc_cli("compile", "--recipe", path, "--seq-len", 8, "--no-latency", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["artifact"] == str(tmp_path / "art") and summary["pipeline"].startswith("dce,fold-constants")
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["inputs"][0]["shape"] == [1, 8]


def test_recipe_without_a_model(tmp_path):
    r = tcc_cli("compile", "--recipe", write(tmp_path, 'seq_len = 8\n'))
    assert r.returncode == 2 and "no model given" in r.stderr


@pytest.mark.slow
def test_encoder_example_compiles_minilm(tmp_path):
    r = tcc_cli("compile", "--recipe", EXAMPLES / "encoder.toml", "--seq-len", 16, "-o", tmp_path / "minilm",
                "--report", tmp_path / "report.json", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["model"]["source"]["path"] == "minilm" and report["model"]["inputs"][0]["shape"] == [1, 16]
    assert [p["name"] for p in report["passes"]] == ["dce", "quantize"]
    assert "method=smoothquant" in report["passes"][1]["text"] and report["passes"][1]["details"]["smoothing"]
    assert report["final"]["max_drift"]["met"] and report["final"]["max_drift"]["limit"] == 0.1
    worst = max(v["max_rel_err"] for v in report["final"]["accuracy"]["vs_source"].values())
    assert worst < 0.1  # measured 0.029 (W8A8 SmoothQuant, seq_len 16)
