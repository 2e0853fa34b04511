"""tcc.cache: traced programs, calibration statistics and built libraries, by content hash.

Each test gets its own cache directory ($TCC_CACHE), with the compiled kernel objects of the real
cache linked in (they are keyed by their own hash and would take a minute to rebuild). What a hit
must give back is exactly what a fresh build gives; a corrupt entry must be a miss, never an error;
nothing in the cache is unpickled.
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import tcc
from tcc import cache
from tcc.compress.quantization import InputStats, collect


@pytest.fixture
def cache_root(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    root.mkdir()
    real = Path(os.environ.get("TCC_CACHE", Path.home() / ".cache" / "tcc"))
    (real / "kernels").mkdir(parents=True, exist_ok=True)
    (root / "kernels").symlink_to(real / "kernels")
    monkeypatch.setenv("TCC_CACHE", str(root))
    monkeypatch.delenv("TCC_NO_CACHE", raising=False)
    monkeypatch.setitem(cache._state, "enabled", True)
    return root


def outcomes(since: int, kind: str) -> list[str]:
    return [e["outcome"] for e in cache.events()[since:] if e["kind"] == kind]


def entries(root: Path, kind: str) -> list[Path]:
    d = root / kind
    return sorted(p for p in d.iterdir() if not p.name.startswith(".")) if d.exists() else []


def same_program(a, b) -> None:
    assert a.fingerprint() == b.fingerprint()
    assert json.dumps(a.info.to_json(), sort_keys=True, default=str) == json.dumps(b.info.to_json(), sort_keys=True, default=str)
    assert (a.inputs, a.outputs, a.task, a.source, a.tokenizer_dir) == (b.inputs, b.outputs, b.task, b.source, b.tokenizer_dir)
    assert a.param_bytes() == b.param_bytes()
    feed = a.example_inputs(seed=3)
    for name, value in a(feed).items():
        assert np.array_equal(value, b(feed)[name]), name


# -- traced programs ------------------------------------------------------------------------------------

def test_second_trace_is_a_hit_and_the_same_program(cache_root, tiny_bert_dir):
    n = len(cache.events())
    fresh = tcc.trace(str(tiny_bert_dir), seq_len=8)
    cached = tcc.trace(str(tiny_bert_dir), seq_len=8)
    assert outcomes(n, "programs") == ["miss", "stored", "hit"]
    same_program(fresh, cached)
    assert all(isinstance(p, torch.nn.Parameter) for p in dict(cached.gm.named_parameters()).values())
    assert len(dict(cached.gm.named_parameters())) == len(dict(fresh.gm.named_parameters())) > 0
    tcc.trace(str(tiny_bert_dir), seq_len=16)  # another shape is another entry
    assert len(entries(cache_root, "programs")) == 2


def test_entries_hold_no_pickles_and_load_without_unpickling(cache_root, tiny_bert_dir, monkeypatch):
    fresh = tcc.trace(str(tiny_bert_dir), seq_len=8)
    (entry,) = entries(cache_root, "programs")
    assert sorted(p.name for p in entry.iterdir()) == ["export.json", "meta.json", "tensors.safetensors"]

    def refuse(*args, **kwargs):
        raise AssertionError("the cache unpickled something")
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    n = len(cache.events())
    same_program(fresh, tcc.trace(str(tiny_bert_dir), seq_len=8))
    assert outcomes(n, "programs") == ["hit"]


@pytest.mark.parametrize("damage", ["flip a tensor byte", "truncate the graph", "garbage meta"])
def test_a_corrupt_entry_is_rebuilt_not_an_error(cache_root, tiny_bert_dir, damage):
    fresh = tcc.trace(str(tiny_bert_dir), seq_len=8)
    (entry,) = entries(cache_root, "programs")
    if damage == "flip a tensor byte":
        data = bytearray((entry / "tensors.safetensors").read_bytes())
        data[-3] ^= 0xFF
        (entry / "tensors.safetensors").write_bytes(bytes(data))
    elif damage == "truncate the graph":
        graph = entry / "export.json"
        graph.write_bytes(graph.read_bytes()[:1000])
    else:
        (entry / "meta.json").write_text("{not json")
    n = len(cache.events())
    same_program(fresh, tcc.trace(str(tiny_bert_dir), seq_len=8))
    assert outcomes(n, "programs") == ["miss", "stored"]
    assert len(entries(cache_root, "programs")) == 1


def test_tied_weights_stay_tied(cache_root, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "tied", safe_serialization=True)
    fresh = tcc.trace(str(tmp_path / "tied"), seq_len=8)
    cached = tcc.trace(str(tmp_path / "tied"), seq_len=8)
    same_program(fresh, cached)
    ptrs = lambda p: {t.data_ptr() for t in p.named_tensors().values()}
    assert len(ptrs(cached)) == len(ptrs(fresh))  # the lm_head still reads the embedding table


def test_turned_off_nothing_is_read_or_written(cache_root, tiny_bert_dir, monkeypatch):
    with cache.use(False):
        tcc.trace(str(tiny_bert_dir), seq_len=8)
    monkeypatch.setenv("TCC_NO_CACHE", "1")
    r = subprocess.run([sys.executable, "-c", f"import tcc; tcc.trace({str(tiny_bert_dir)!r}, seq_len=8)"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert entries(cache_root, "programs") == []


def test_least_recently_used_entries_go_past_the_size_limit(cache_root, tiny_bert_dir, monkeypatch):
    tcc.trace(str(tiny_bert_dir), seq_len=8)
    (first,) = entries(cache_root, "programs")
    size = sum(f.stat().st_size for f in first.iterdir())
    os.utime(first / "meta.json", (1, 1))  # used long ago
    monkeypatch.setenv("TCC_CACHE_MAX_GB", str(1.5 * size / 1e9))  # room for one entry
    tcc.trace(str(tiny_bert_dir), seq_len=16)
    (kept,) = entries(cache_root, "programs")
    assert kept != first


# -- calibration statistics -----------------------------------------------------------------------------

def test_statistics_round_trip(cache_root, tiny_bert_dir):
    program = tcc.trace(str(tiny_bert_dir), seq_len=8)
    linears = [n for n in program.gm.graph.nodes if n.target == torch.ops.aten.linear.default][:3]
    spec = lambda: {n.args[0].name: InputStats(64, hessian=True, percentile=99.0, signed=True, feeds=2) for n in linears}
    feeds = [program.example_inputs(seed=s) for s in range(2)]
    stats = spec()
    assert not cache.load_stats(program, feeds, stats)
    collect(program, feeds, stats)
    cache.save_stats(program, feeds, stats)
    again = spec()
    assert cache.load_stats(program, feeds, again)
    for name, st in stats.items():
        for field in ("abs_sum", "abs_max", "sq_sum", "H", "top", "bottom"):
            assert torch.equal(getattr(st, field), getattr(again[name], field)), field
        assert (st.tokens, st.topk) == (again[name].tokens, again[name].topk) and st.tokens == 16
    assert not cache.load_stats(program, [program.example_inputs(seed=5)] * 2, spec())  # other feeds
    assert not cache.load_stats(program, feeds, {n: InputStats(64) for n in stats})   # other statistics


# -- built libraries ------------------------------------------------------------------------------------

def test_second_compile_takes_the_library_from_the_cache(cache_root, tiny_bert_dir, tmp_path):
    arts = [tmp_path / "first", tmp_path / "second"]
    for out in arts:
        tcc.compile(str(tiny_bert_dir), "x86", out=out, seq_len=8, pipeline="quantize-weights(bits=8)",
                    latency=False).close()
    first, second = (json.loads((d / "manifest.json").read_text()) for d in arts)
    assert {k: v for k, v in first.items() if k != "run"} == {k: v for k, v in second.items() if k != "run"}
    cached = json.loads((arts[1] / "report.json").read_text())["run"]["cache"]
    assert cached == {"programs": "hit", "libs": "hit"}
    assert second["run"]["verify"]["last_hidden_state"]["max_abs_err"] <= 1e-4  # the cached library runs
    assert len(entries(cache_root, "libs")) == 1


def test_no_cache_compile_writes_no_entries(cache_root, tiny_bert_dir, tmp_path):
    tcc.compile(str(tiny_bert_dir), "x86", out=tmp_path / "a", seq_len=8, verify=False, latency=False, cache=False).close()
    assert entries(cache_root, "programs") == entries(cache_root, "libs") == []
