"""The compile's generation check (tcc.compiler._check_generation) measures the artifact against the
source model itself, and so catches a faulty KV-cache rewrite.

Reference: one full-sequence forward of the Program as traced (before any pass, no KV cache) over
the check ids (the check prompt, then the calibration text; seeded ids without a tokenizer). The
artifact is fed the same ids through prefill, in chunks of its prefill length (a chunk boundary is
crossed), and decode. Tiny random-init models (tests/test_dynamic.TINY): a LLaMA traced with lengths
1..32 (example length 16: prefill chunks of 16, context 32, so ids 0..19 prefilled in two chunks, 20..31
decoded) and an OPT folder (learned positions from the cumsum of the mask) compiled at seq-len 8.

- fp32: agreement 1.0 and the logits equal the source's within 1e-4 relative (measured 3.4e-7).
- a KV cache whose positions are not shifted past the first chunk (OPT's bug before 3a0bb08: its
  cumsum positions were left out of the shift; here also the LLaMA's rotary aranges): the check
  reports a logit error of more than 1e-3 relative, ten times the fp32 tolerance (measured: OPT 0.61
  with agreement 0.71; the random-init LLaMA 9.2e-3, whose argmax stays put: agreement 1.0, so
  on such a model only the logit error shows it). The old check built its
  reference from the same rewrite (tcc.generation.kv_cached of the source Program, run in PyTorch),
  which has the same fault: the test shows that reference equals the faulty artifact within 1e-4, so
  the old check reported agreement 1.0 for it.
"""
from __future__ import annotations

import numpy as np
import pytest

import tcc
from tcc import generation, report
from tcc.generation import ProgramSession, check_ids, check_split, kv_cached, source_logits, teacher_forced

from test_dynamic import tiny

CONTEXT = 32


def rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def llama():
    return tiny("llama")


def _agreement(art) -> dict:
    return report.read(art.dir)["final"]["generation"]["agreement"]


def test_fp32_artifact_agrees_with_the_source(llama, tmp_path):
    with tcc.compile(llama, "x86", out=tmp_path / "a", latency=False, max_context=CONTEXT) as art:
        a = _agreement(art)
        assert art.manifest["generation"]["prefill_len"] == 16
        seconds = art.manifest["run"]["seconds"]["generation_check"]
    # 32 ids: 20 prefilled (chunks 0..15 and 16..19), 12 decoded -> positions 15, 19, 20..31 compared
    assert a["sequence_tokens"] == CONTEXT and a["prompt_tokens"] == 20 and a["tokens"] == 14
    assert a["rate"] == 1.0 and a["max_rel_logit_error"] <= 1e-4, a
    assert set(seconds) == {"source", "artifact"}
    # the check's ids without a tokenizer: 1..12, then seeded ids within the vocabulary
    ids = check_ids(None, 128, CONTEXT)
    assert ids[:12] == list(range(1, 13)) and all(0 < t < 128 for t in ids) and ids == check_ids(None, 128, CONTEXT)


def _unshifted(monkeypatch, positions: str):
    """kv_cached without the position shift (arange + pos, cumsum + pos): every chunk and decode step
    restarts its positions at 0."""
    monkeypatch.setattr(generation, positions, lambda *a: [])


def _old_style_reference_hides_it(source, art, ids, chunk: int, prefilled: int):
    """The reference the old check used: the source Program through the same (faulty) KV-cache
    rewrite, run in PyTorch. It equals the faulty artifact, so its agreement was 1.0; the source's
    full forward does not."""
    old = teacher_forced(ProgramSession(kv_cached(source, CONTEXT)), ids, chunk, prefilled)
    got = teacher_forced(art.session(), ids, chunk, prefilled)
    assert max(rel(got[p], old[p]) for p in got) <= 1e-4
    assert all(np.argmax(got[p]) == np.argmax(old[p]) for p in got)
    want = source_logits(source, ids)
    first = min(got)  # the first chunk's positions are right; every later one is not
    assert rel(got[first], want[first]) <= 1e-4 and max(rel(got[p], want[p]) for p in got if p > first) > 1e-3


def test_check_catches_unshifted_rotary_positions(llama, tmp_path, monkeypatch):
    _unshifted(monkeypatch, "_position_aranges")
    with tcc.compile(llama, "x86", out=tmp_path / "a", latency=False, max_context=CONTEXT) as art:
        a = _agreement(art)
        ids = check_ids(None, 128, CONTEXT)
        _old_style_reference_hides_it(llama, art, ids, 16, check_split(len(ids), 16, CONTEXT))
    assert a["max_rel_logit_error"] > 1e-3, a


def test_check_catches_opt_positions_not_shifted(tmp_path, monkeypatch):
    """The OPT bug itself: learned positions from cumsum(mask) left out of the shift."""
    from test_tokenizerless import save_decoder
    save_decoder(tmp_path / "opt", "opt")
    _unshifted(monkeypatch, "_position_cumsums")
    with tcc.compile(str(tmp_path / "opt"), "x86", out=tmp_path / "a", seq_len=8, latency=False,
                     max_context=CONTEXT) as art:
        a = _agreement(art)
        source = tcc.trace(str(tmp_path / "opt"), seq_len=8, max_seq_len=CONTEXT)
        ids = check_ids(None, 128, CONTEXT)
        _old_style_reference_hides_it(source, art, ids, 8, check_split(len(ids), 8, CONTEXT))
    assert a["max_rel_logit_error"] > 1e-3 and a["rate"] < 0.9, a
