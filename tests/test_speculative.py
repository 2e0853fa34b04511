"""Speculative decoding (tcc.speculative): the verify entry, rolling the cache back, greedy output
identical to the target alone (prompt lookup and a draft program built into the artifact), and the
speculative-sampling rule keeping the target's distribution.

One tiny random-init LLaMA (tests/test_dynamic.tiny: hidden 64, 2 layers, vocab 128), compiled once
for x86 with a context of 32 and a draft 'drop-blocks(ratio=0.5,keep_ends=false),quantize(weights=
int4,group=16)' (one block, int4). verify's rows equal decode's logits bit for bit (fp32; and on a
tiny W8A8 LLaMA, whose per-token int8 rounding would amplify any last-bit difference). The sampling test: the joint distribution of the first three
sampled tokens (temperature 1, top-k 3: 27 outcomes) over 2000 seeded runs against the target's
exact distribution (computed from its own logits), chi-square below its 1 - 1e-4 quantile; the same
statistic against the distribution with the second token drawn from the draft's q (what accepting
every draft gives it) is far above it (the test can fail).
"""
from __future__ import annotations

import json

import numpy as np
import pytest

import tcc
from tcc.errors import UserError
from tcc.generation import prefill_prompt, probabilities
from tcc.speculative import LookupDraft, draft_pays, speculative_loop

from test_dynamic import tiny

DRAFT = "drop-blocks(ratio=0.5,keep_ends=false),quantize(weights=int4,group=16)"


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    with tcc.compile(tiny("llama"), "x86", out=tmp_path_factory.mktemp("spec") / "a", latency=False,
                     max_context=32, draft=DRAFT) as a:
        yield a


def _prefilled(art, prompt):
    s = art.session()
    block = np.zeros(s.chunk, np.int64)
    block[:len(prompt)] = prompt
    return s, s.prefill(block, 0, len(prompt) - 1)


def test_verify_rows_and_rollback(art):
    gen = art.manifest["generation"]
    assert gen["verify_len"] == 8 and set(gen["functions"]) == {"prefill", "decode", "verify", "verify4",
                                                                "draft_prefill", "draft_decode"}
    assert gen["verify_lens"] == [4, 8] and gen["verify_vs_decode"] == 0.0  # both entries measured
    assert len(gen["draft"]["cache_layers"]) == 1 and gen["cache_layers"] == [0, 1]  # the draft keeps one block
    prompt = [3, 9, 27, 81, 1, 2, 4]
    s, _ = _prefilled(art, prompt)
    rows = s.verify([5, 77, 3, 8, 9], 7)
    assert rows.shape == (5, 128) and s.next_pos == 12
    ref, _ = _prefilled(art, prompt)
    want = [ref.decode(t, 7 + i) for i, t in enumerate([5, 77, 3, 8, 9])]
    assert all(np.array_equal(r, w) for r, w in zip(rows, want))
    for entry in (4, 8):  # 3 tokens: the 4-row entry by default, the same rows through the 8-row one
        s.rollback(7)
        assert all(np.array_equal(r, w) for r, w in zip(s.verify([5, 77, 3], 7, entry=entry), want))
    with pytest.raises(UserError, match="no verify entry of 4 rows for 5 tokens"):
        s.verify([5, 77, 3, 8, 9], 7, entry=4)
    # roll back to the first verified token: later calls overwrite the rejected rows
    s.rollback(8)
    got = [s.decode(40, 8), s.decode(41, 9)]
    ref, _ = _prefilled(art, prompt)
    ref.decode(5, 7)
    assert all(np.array_equal(g, ref.decode(t, 8 + i)) for i, (g, t) in enumerate(zip(got, [40, 41])))
    with pytest.raises(UserError, match="cannot roll the cache back to 11"):
        s.rollback(11)
    with pytest.raises(UserError, match="verify takes 1 to 8 tokens"):
        s.verify(list(range(9)), 10)
    with pytest.raises(UserError, match="verify at position 11"):
        s.verify([1], 11)


@pytest.mark.parametrize("speculate", ["lookup", "draft", "auto"])
def test_greedy_identical_to_the_target(art, speculate):
    rng = np.random.default_rng(0)
    accepted = filled = 0
    for _ in range(3):
        base = [int(t) for t in rng.integers(0, 128, 4)]
        prompt = base * 2 + [int(t) for t in rng.integers(0, 128, 3)]
        want = art.generate(prompt, 18, stop_at_eos=False)["token_ids"]
        got = art.generate(prompt, 18, stop_at_eos=False, speculate=speculate)
        assert got["token_ids"] == want
        accepted += got["speculative"]["accepted"]
        filled += got["speculative"]["filled"]
        lookup = speculate == "lookup" or (speculate == "auto" and not draft_pays(art.manifest))
        assert got["speculative"]["draft"] == (LookupDraft().name if lookup else
                                               art.manifest["generation"]["draft"]["pipeline"])
    assert accepted > 0  # tokens came from the draft, not only from the target's own steps
    # the random-init draft is never confident (chain probability < CONFIDENCE after one token):
    # prompt lookup fills the verify rows it leaves; lookup alone fills nothing
    assert (filled > 0) == (not lookup)


W8A8 = "quantize(acts=int8,method=smoothquant,embeddings=true)"  # the w8a8 preset's pipeline


@pytest.fixture(scope="module")
def w8a8(tmp_path_factory):
    """A tiny W8A8 LLaMA (hidden 128, head dim 64, 3 layers, vocab 256): per-token int8 activations
    turn any last-bit difference between a verify row and the decode step into other int8 codes."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from tcc.frontends import frontend
    from tcc.frontends.frontend import CausalLM
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
                                  num_hidden_layers=3, intermediate_size=256, vocab_size=256)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    program = frontend.trace(CausalLM(model), example_inputs={"input_ids": torch.randint(0, 256, (1, 16))},
                             output_names=["logits"], task="causal-lm", max_seq_len=64)
    with tcc.compile(program, "x86", out=tmp_path_factory.mktemp("w8a8") / "a", pipeline=W8A8, latency=False,
                     evaluate=False, max_context=64) as a:
        yield a


def test_w8a8_verify_rows_are_the_decode_steps_bit_for_bit(w8a8):
    """Every verify row equals the decode step at its position exactly (sdpa's and dense's few-rows
    paths sum each row in one order whatever the row count; the int8 kernels are exact)."""
    rng = np.random.default_rng(1)
    for n in (9, 21, 30):
        prompt, toks = [int(t) for t in rng.integers(0, 256, n)], [int(t) for t in rng.integers(0, 256, 8)]
        s = w8a8.session()
        prefill_prompt(s.prefill, prompt, s.chunk, s.max_context)
        want = [s.decode(t, n + i) for i, t in enumerate(toks)]
        s.rollback(n)
        assert all(np.array_equal(r, w) for r, w in zip(s.verify(toks, n), want)), n
        s.rollback(n)  # the 4-row entry's rows too
        assert all(np.array_equal(r, w) for r, w in zip(s.verify(toks[:4], n), want)), n


def test_w8a8_greedy_identical_to_the_target(w8a8):
    rng = np.random.default_rng(2)
    accepted = 0
    for _ in range(4):
        base = [int(t) for t in rng.integers(0, 256, 5)]
        prompt = base * 2 + [int(t) for t in rng.integers(0, 256, 4)]
        want = w8a8.generate(prompt, 24, stop_at_eos=False)["token_ids"]
        got = w8a8.generate(prompt, 24, stop_at_eos=False, speculate="lookup")
        assert got["token_ids"] == want
        accepted += got["speculative"]["accepted"]
    assert accepted > 0


@pytest.mark.arm64
def test_arm64_lookup_greedy_identical_under_qemu(tmp_path):
    """An arm64 artifact under tcc's qemu driver: `generate(speculate="lookup")` goes through its verify
    entries and rollback and gives the target alone's greedy tokens (native bundles: tests/test_bundle.py)."""
    from conftest import missing_arm64_tools
    if missing_arm64_tools():
        pytest.skip(f"arm64 needs {', '.join(missing_arm64_tools())}")
    from test_generation import _tiny_folder
    _tiny_folder(tmp_path / "llama")
    with tcc.compile(str(tmp_path / "llama"), "arm64", out=tmp_path / "a", latency=False, seq_len=8, max_context=32) as a:
        base = [3, 77, 12, 100, 9]
        prompt = base * 2 + [101, 5]
        want = a.generate(prompt, 12, stop_at_eos=False)["token_ids"]
        got = a.generate(prompt, 12, stop_at_eos=False, speculate="lookup")
        assert got["token_ids"] == want and got["speculative"]["target_calls"] < 11
        assert got["speculative"]["drafted"] > 0


class NearTieTarget:
    """A target whose verify rows differ from its decode steps by up to 2e-6 of the largest logit, as a
    verify path with another float summation order could: where the decode step's top two logits are
    1e-6 apart (every third position), the verify row lifts the second above the first. Logits: seeded
    by the context (vocab 8)."""
    verify_len, chunk, max_context = 8, 4, 64

    def __init__(self):
        self.ids = {}

    def logits(self, pos):
        ctx = tuple(self.ids[i] for i in range(pos + 1))
        x = np.random.default_rng(abs(hash(ctx)) % 2**32).standard_normal(8).astype(np.float32) + 4
        if pos % 3 == 0:
            a, b = np.argsort(x)[-2:][::-1]
            x[b] = x[a] - np.float32(1e-6) * np.abs(x).max()
        return x

    def decode(self, token, pos):
        self.ids[pos] = token
        return self.logits(pos)

    def prefill(self, ids, pos, last):
        for i, t in enumerate(ids[:last + 1]):
            self.ids[pos + i] = int(t)
        return self.logits(pos + last)

    def verify(self, ids, pos):
        rows = np.stack([self.decode(int(t), pos + i) for i, t in enumerate(ids)])
        for i, r in enumerate(rows):
            if (pos + i) % 3 == 0:
                a, b = np.argsort(r)[-2:][::-1]
                r[b] += np.float32(2e-6) * np.abs(r).max()
        return rows

    def rollback(self, length):
        self.ids = {p: t for p, t in self.ids.items() if p < length}


class OracleDraft:
    """Proposes the target's own greedy continuation (decode steps on a copy of its context)."""

    def start(self, prompt):
        pass

    def propose(self, context, k, rng, sampling):
        t = NearTieTarget()
        t.ids = dict(enumerate(context))
        out = []
        for _ in range(k):
            out.append(int(np.argmax(t.logits(len(t.ids) - 1))))
            t.ids[len(t.ids)] = out[-1]
        return out, None

    def rollback(self, length):
        pass


def test_guard_leaves_near_ties_to_a_decode_step():
    """With guard = VERIFY_GUARD x the verify/decode difference (2e-6 here), greedy speculation gives
    the decode loop's tokens although verify's argmax differs at near-ties; without it, it does not."""
    from tcc.generation import decode_loop
    from tcc.speculative import VERIFY_GUARD
    prompt = [1, 2, 3, 4, 5]
    t = NearTieTarget()
    want = list(decode_loop(t.prefill, t.decode, prompt, 30, 64, 4))
    stats: dict = {}
    got = list(speculative_loop(NearTieTarget(), OracleDraft(), prompt, 30, 64, 4, guard=VERIFY_GUARD * 2e-6,
                                stats=stats, adapt=False))
    assert got == want and stats["guarded"] > 0 and stats["accepted"] > 0
    unguarded = list(speculative_loop(NearTieTarget(), OracleDraft(), prompt, 30, 64, 4, adapt=False))
    assert unguarded != want


def test_auto_takes_a_cheap_draft_only():
    sizes = {"program_param_bytes": 1000}
    assert draft_pays({"generation": {"draft": {"param_bytes": 300}}, "sizes": sizes})  # AUTO_DRAFT_COST 0.3
    assert not draft_pays({"generation": {"draft": {"param_bytes": 301}}, "sizes": sizes})
    assert not draft_pays({"generation": {}, "sizes": sizes})


class FixedSession:
    """A draft session whose decode returns logits giving its argmax (token 2) the probabilities
    `probs` in turn (vocab 4: logits [0, 0, z, 0] with e^z / (e^z + 3) = p)."""
    chunk, max_context = 4, 64

    def __init__(self, probs):
        self.probs, self.calls = list(probs), 0

    def decode(self, token, pos):
        p = self.probs[self.calls]
        self.calls += 1
        return np.array([0.0, 0.0, np.log(3 * p / (1 - p)), 0.0], dtype=np.float32)

    prefill = decode

    def rollback(self, length):
        pass


@pytest.mark.parametrize("confidence,want", [(0.0, 4), (0.5, 2), (0.42, 3), (0.95, 1)])
def test_model_draft_stops_below_the_confidence(confidence, want):
    from tcc.speculative import ModelDraft
    session = FixedSession([0.9, 0.5, 0.9, 0.9, 0.9])  # chain 0.9, 0.45, 0.405, 0.3645
    d = ModelDraft(session, confidence=confidence)
    d.have = 5
    tokens, qs = d.propose([1] * 6, 4, None, (0.0, 0, 1.0))
    assert tokens == [2] * want and qs is None and session.calls == want  # each token but the first costs a decode


class RandomDraft:
    """Proposes (up to `most`) tokens drawn from a fixed distribution q unlike the target's (so
    drafts get both accepted and rejected, and the residual max(0, p - q) is not p)."""

    def __init__(self, q, most=None):
        self.q, self.most = q, most

    def start(self, prompt):
        pass

    def propose(self, context, k, rng, sampling):
        k = min(k, self.most or k)
        return [int(rng.choice(self.q.size, p=self.q)) for _ in range(k)], [self.q] * k

    def rollback(self, length):
        pass


@pytest.mark.parametrize("new,fill", [(3, False), (4, False), (4, True)])
def test_sampling_keeps_the_target_distribution(art, new, fill):
    """new 3: one draft per round (room for t2 and t3): acceptance, residual, the bonus token from the
    verify row and a decode step; new 4: two drafts in the first round (the second is checked only
    after the first is accepted); fill: one draft from q, then prompt lookup's token (a point mass)
    in the verify row left."""
    from scipy.stats import chi2
    sampling = dict(temperature=1.0, top_k=3)
    prompt = [3, 9, 27, 81, 1, 2, 4]
    # the target's exact joint distribution of its first three sampled tokens
    s, logits = _prefilled(art, prompt)
    p1 = probabilities(logits, 1.0, 3)
    exact = {}
    q_wrong = {}  # t2 ~ q, as accepting every draft would give it
    top = [int(t) for t in np.flatnonzero(p1)]
    q = np.full(128, 0.2 / 125)
    second = {}
    for t1 in top:
        s.rollback(7)
        second[t1] = probabilities(s.decode(t1, 7), 1.0, 3)
    # q: half its mass on one of the target's likely second tokens, the rest spread elsewhere
    q[int(np.argmax(second[top[0]]))] += 0.5
    q[[int(t) for t in range(128) if q[t] < 0.1][:3]] += 0.1
    q /= q.sum()
    for t1 in top:
        for t2 in range(128):
            if second[t1][t2] == 0 and q[t2] == 0:
                continue
            s.rollback(7)
            s.decode(t1, 7)
            p3 = probabilities(s.decode(t2, 8), 1.0, 3)
            for t3 in np.flatnonzero(p3):
                exact[(t1, t2, int(t3))] = p1[t1] * second[t1][t2] * p3[t3]
                q_wrong[(t1, t2, int(t3))] = p1[t1] * q[t2] * p3[t3]
    draft = RandomDraft(q, most=1 if fill else None)
    n = 2000
    counts: dict = {}
    filled = 0
    for seed in range(n):
        stats: dict = {}
        out = tuple(speculative_loop(s, draft, prompt, new, 32, s.chunk, seed=seed, stats=stats, fill=fill,
                                     **sampling))[:3]
        counts[out] = counts.get(out, 0) + 1
        filled += stats["filled"]
    assert (filled > 0) == fill
    assert set(counts) <= {k for k, v in exact.items() if v > 0}  # only tokens the target can give

    def chi_square(probs):
        big = [k for k, v in probs.items() if v * n >= 5]
        cells = [(counts.get(k, 0), probs[k] * n) for k in big]
        rest = (n - sum(c for c, _ in cells), n - sum(e for _, e in cells))
        cells.append(rest)
        return sum((c - e) ** 2 / e for c, e in cells if e > 0), len(cells) - 1

    stat, dof = chi_square(exact)
    bound = chi2.ppf(1 - 1e-4, dof)
    assert stat < bound, (stat, bound)
    wrong, _ = chi_square({k: v for k, v in q_wrong.items()})
    assert wrong > 5 * bound  # the test tells a loop that accepts every draft from the rule


def test_lookup_draft_proposes_what_followed():
    d = LookupDraft(ngram=3)
    assert d.propose([1, 2, 3, 9, 9, 1, 2, 3], 3, None, ()) == ([9, 9, 1], None)
    assert d.propose([5, 1, 7, 2, 1], 2, None, ()) == ([7, 2], None)  # the 1-gram [1]: its latest earlier match
    assert d.propose([1, 2, 3], 4, None, ()) == ([], None)
    # weak: a match shorter than the n-gram proposes at most that many (the short verify entry's)
    d = LookupDraft(ngram=3, weak=2)
    assert d.propose([1, 2, 3, 9, 8, 7, 6, 1, 2, 3], 5, None, ()) == ([9, 8, 7, 6, 1], None) and d.matched == 3
    assert d.propose([5, 1, 7, 2, 4, 8, 1], 5, None, ()) == ([7, 2], None) and d.matched == 1


def test_cli_speculate_and_errors(art, tmp_path, capsys, monkeypatch):
    from tcc.cli import main
    assert main(["generate", str(art.dir), "--prompt-ids", "1,2,3,4,1,2,3", "--max-new-tokens", "10",
                 "--speculate", "lookup", "--compare", "--json"]) == 0
    out = capsys.readouterr()
    assert "warning" not in out.err  # the compile measured verify rows equal to the decode steps
    assert art.manifest["generation"]["verify_vs_decode"] == 0.0
    sp = json.loads(out.out)["speculative"]
    assert sp["same_tokens"] is True and sp["mode"] == "lookup" and sp["tokens_per_target_call"] >= 1
    assert {"acceptance_rate", "speed_up", "plain_decode_tokens_per_s"} <= set(sp)
    assert sp["draft"] == "prompt lookup (3-gram)" and sp["k_max"] == 7
    assert sp["k_mean"] is None or 1 <= sp["k_mean"] <= 7
    with pytest.raises(UserError, match="not a speculation mode"):
        art.generate([1, 2], 4, speculate="medusa")
    load = tcc.load  # manifests as older or other artifacts have them: a warning

    def patched(gen_extra, pipeline):
        def patched_load(path):
            loaded = load(path)
            gen = {k: v for k, v in loaded.manifest["generation"].items() if k != "verify_vs_decode"}
            loaded.manifest = {**loaded.manifest, "pipeline": pipeline, "generation": {**gen, **gen_extra}}
            return loaded
        return patched_load
    for extra, pipeline, warns in (({}, "dce,quantize(acts=int8)", "compiled before tcc checked"),  # not measured
                                   ({"verify_vs_decode": 3e-7}, "dce", "differ from its decode steps by up to 3.0e-07"),
                                   ({}, "dce", None), ({"verify_vs_decode": 0.0}, "dce,quantize(acts=int8)", None)):
        monkeypatch.setattr(tcc, "load", patched(extra, pipeline))
        assert main(["generate", str(art.dir), "--prompt-ids", "1,2,3", "--max-new-tokens", "2", "--speculate", "lookup"]) == 0
        err = capsys.readouterr().err
        assert (warns in err and "tcc: warning: this artifact's greedy speculation may not be exact" in err) if warns \
            else "warning" not in err
    with pytest.raises(UserError, match="--draft builds a draft program"):
        tcc.compile(tiny("llama"), "x86", out=tmp_path / "b", generate=False, draft=DRAFT)
    assert not (tmp_path / "b").exists()


def test_expected_speed_up_of_a_draft():
    from tcc.speculative import expected_speed_up
    assert expected_speed_up(0.0, 0.1) == pytest.approx((1 / 1.4, 1))        # nothing accepted: k = 1
    assert expected_speed_up(1.0, 0.0) == pytest.approx((8 / 1.3, 7))        # free and always right: k = 7
    gain, k = expected_speed_up(0.6, 0.25)  # tokens (1 - 0.6^(k+1)) / 0.4 over k * 0.25 + 1.3
    assert k == 2 and gain == pytest.approx((1 - 0.6 ** 3) / 0.4 / (0.5 + 1.3))  # k = 3: 2.18 / 2.05


def test_draft_auto_picks_the_best_measured_candidate(tmp_path, monkeypatch):
    import tcc.speculative as spec
    monkeypatch.setattr(spec, "AUTO_DRAFTS", (DRAFT, "quantize(weights=int8)"))
    with tcc.compile(tiny("llama"), "x86", out=tmp_path / "a", latency=False, max_context=32, draft="auto") as a:
        draft = a.manifest["generation"]["draft"]
        auto = draft["auto"]
        assert len(auto["candidates"]) == 2 and "drop-blocks" in auto["candidates"][0]["pipeline"]
        assert "int8" in auto["candidates"][1]["pipeline"] and auto["positions"] > 0
        for c in auto["candidates"]:
            assert 0.0 <= c["agreement"] <= 1.0 and 0.0 < c["cost"] < 1.0
            assert (c["expected_speed_up"], c["k"]) == pytest.approx(spec.expected_speed_up(c["agreement"], c["cost"]), abs=1e-3)
        best = max(auto["candidates"], key=lambda c: c["expected_speed_up"])
        assert draft["pipeline"] == best["pipeline"]
        report = json.loads((a.dir / "report.json").read_text())["final"]["generation"]["draft"]
        assert report == {"pipeline": draft["pipeline"], "param_bytes": draft["param_bytes"], "auto": auto}
        assert f"speculative draft: {draft['pipeline']}" in (a.dir / "report.md").read_text()
        prompt = [1, 2, 3, 4, 5]
        assert a.generate(prompt, 12, stop_at_eos=False, speculate="draft")["token_ids"] == \
            a.generate(prompt, 12, stop_at_eos=False)["token_ids"]
