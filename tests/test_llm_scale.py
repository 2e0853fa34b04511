"""benchmarks/llm_scale.py (tcc vs llama.cpp at 0.5B / 1B, issue 15) without llama.cpp or a model:
its argument checks, its message for missing models, and the decode-bytes count it shares with
benchmarks/generation.py (safetensors header only; one of two equal vocab tables counts)."""
from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPT = BENCH / "llm_scale.py"


def _run(*args, tmp_path):
    return subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "out"), *args],
                          capture_output=True, text=True, timeout=120)


def test_bad_arguments_exit_2_with_the_choices(tmp_path):
    r = _run("--formats", "fp32,q5_k", tmp_path=tmp_path)
    assert r.returncode == 2 and "unknown q5_k" in r.stderr and "fp32, w8a8, q4_0, q4_1, q4_0e8, q4_1e8, q4_0w, q4_1w" in r.stderr
    r = _run("--shapes", "llama3b", tmp_path=tmp_path)
    assert r.returncode == 2 and "unknown llama3b" in r.stderr
    r = _run("--context", "100", tmp_path=tmp_path)
    assert r.returncode == 2 and "--context 100 is less than --prompt + --new (192)" in r.stderr
    assert not (tmp_path / "out").exists()


def test_missing_models_name_the_tool_that_makes_them(tmp_path):
    r = _run("--scale-dir", str(tmp_path / "none"), "--shapes", "qwen05b", "--phase", "prepare", tmp_path=tmp_path)
    assert r.returncode == 2
    assert f"no model at {tmp_path / 'none' / 'qwen05b-float32'}" in r.stderr and "scale_models.py qwen05b" in r.stderr
    assert not (tmp_path / "out").exists()


def _decode_bytes(monkeypatch):
    monkeypatch.setenv("TCC_CALIBRATION_TEXT", "unused")  # generation.py sets it by default on import
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("generation").decode_bytes


def test_decode_bytes_counts_one_of_two_equal_tables(tmp_path, monkeypatch):
    from safetensors.numpy import save_file
    decode_bytes = _decode_bytes(monkeypatch)
    vocab, hidden = 64, 8
    cases = {  # name -> (tensors, expected bytes a decode step reads)
        # fp32 checkpoint storing lm_head.weight next to its tied embedding: the LM head is read whole
        "two_tables": ({"embed": np.zeros((vocab, hidden), np.float32), "lm_head": np.zeros((vocab, hidden), np.float32),
                        "w": np.zeros((hidden, hidden), np.float32)}, (vocab * hidden + hidden * hidden) * 4),
        # W8A8: an int8 table gathered from, its LM head a packed copy of another shape: the copy counts
        "packed_copy": ({"embed_int8": np.zeros((vocab, hidden), np.int8),
                         "lm_head_packed": np.zeros((vocab // 4, hidden * 4), np.int8),
                         "scale": np.zeros((vocab,), np.float32)}, vocab * hidden + vocab * 4),
        # one table, read by the LM head itself
        "one_table": ({"embed": np.zeros((vocab, hidden), np.float32), "b": np.zeros((hidden,), np.float32)},
                      (vocab * hidden + hidden) * 4),
    }
    for name, (tensors, expected) in cases.items():
        d = tmp_path / name
        d.mkdir()
        save_file(tensors, str(d / "weights.safetensors"))
        manifest = {"generation": {"functions": {"decode": {"params": list(tensors)}}},
                    "outputs": [{"shape": [1, 1, vocab]}]}
        assert decode_bytes(SimpleNamespace(dir=d, manifest=manifest)) == expected, name
