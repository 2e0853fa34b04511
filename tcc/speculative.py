"""Speculative decoding: a cheap draft proposes k tokens, the target checks them in one call.

The target is a generation session (tcc.runtime.GenerationSession, or anything with its calls):
prefill(ids [chunk], pos, last) -> logits [V], decode(token, pos) -> logits [V], verify(ids [n], pos)
-> logits [n, V] (every row: row i is the distribution of the token after ids[i]; the artifact's
`verify` entry, tcc.generation.verify_program) and rollback(length). The caches are indexed by
position, so rolling back is resetting the next position: the next call writes over the rejected
rows.

One round, with t0 the last token emitted (not yet in the target's cache) at position p:
  propose  the draft proposes d1..dk (k adapts: all accepted -> k + 2, else k - 1, within
           1..verify_len - 1; prompt lookup always proposes verify_len - 1, as it costs nothing), with
           the distribution q_i each was drawn from (None: a point mass, as prompt lookup's). A model
           draft stops early once its probability of its whole proposal falls below CONFIDENCE, and
           prompt lookup fills the verify rows it leaves (fill: verify costs the same for any k);
  verify   one target call on [t0, d1..dk] at p gives p_0..p_k;
  accept   greedy: the longest prefix with d_i = argmax p_{i-1}, then argmax p_j: the tokens are
           the target's own greedy tokens. Sampling (Leviathan et al. 2023): d_i is accepted with
           probability min(1, p(d_i) / q(d_i)); the first rejected one is replaced by a draw from
           the normalised residual max(0, p - q); all accepted: one more token from p_k. Each
           emitted token is then distributed as the target alone would sample it;
  roll back both caches to p + j + 1 (t0 and the j accepted drafts).
A round with no proposal (prompt lookup found no match, or the verify chunk would run past the
context) is one plain decode step.

Drafts: LookupDraft (prompt lookup: the tokens that followed the latest earlier occurrence of the
context's last n-gram; costs nothing) and ModelDraft (a second, compressed program built into the
same artifact: `tcc compile MODEL --draft PIPELINE`, entries draft_prefill / draft_decode over its
own KV cache).
"""
from __future__ import annotations

import time
from typing import Iterator

import numpy as np

from .errors import UserError
from .generation import check_generation, prefill_prompt, probabilities, sample

SPECULATE = ("off", "lookup", "draft", "auto")
# a model draft stops proposing once its own probability of the whole proposal falls below this
# (tuned on wikitext-2 valid.txt prompts, SmolLM2 fp32 + a W4A8 draft: 0.1-0.2 best, docs/GENERATION.md)
CONFIDENCE = 0.2
# --speculate auto takes the draft program when its parameter bytes are at most this fraction of the
# target's (decode reads the weights once a step; the draft is fed every emitted token, so with ~3.2
# tokens per verify of ~1.5 decode steps it beats prompt lookup's ~1.9 tokens per verify below ~0.3)
AUTO_DRAFT_COST = 0.3
# greedy speculation where an artifact's verify rows are not its decode steps bit for bit (the compile
# measures the largest difference, manifest generation.verify_vs_decode, relative to the largest logit):
# a verify row whose top-2 logit gap is at most VERIFY_GUARD times that difference (of the row's largest
# logit) does not choose its token; a decode step does, as without speculation
VERIFY_GUARD = 8.0


def verify_difference(manifest: dict) -> float | None:
    """The compile's measured max |verify row - decode step| / max |logit| (0.0: bit-identical, which
    greedy speculation relies on); None for an artifact built before the measurement."""
    value = manifest.get("generation", {}).get("verify_vs_decode")
    return None if value is None else float(value)


def verify_warning(manifest: dict) -> str | None:
    """What `tcc generate --speculate` warns about: verify rows that differ from the decode steps
    (measured), or, not measured (an older artifact), int8 activations, which turn any last-bit
    difference into other int8 codes."""
    diff = verify_difference(manifest)
    if diff is None and "acts=int8" not in manifest.get("pipeline", ""):
        return None
    if diff == 0.0:
        return None
    what = (f"its verify rows differ from its decode steps by up to {diff:.1e} of the largest logit (measured "
            "when it was compiled)" if diff is not None else "it quantizes activations to int8 per token and was "
            "compiled before tcc checked that its verify rows equal its decode steps")
    return (f"{what}; a greedy token whose top two logits are that close is left to a decode step, but the KV cache "
            "rows differ too, so speculative tokens may differ from plain decoding's (docs/GENERATION.md): "
            "--compare checks, compiling it again with this tcc may make them equal")


def draft_pays(manifest: dict) -> bool:
    """--speculate auto: does the artifact's draft program cost little enough (AUTO_DRAFT_COST)?"""
    draft = manifest.get("generation", {}).get("draft")
    target = manifest.get("sizes", {}).get("program_param_bytes")
    return bool(draft and target and draft["param_bytes"] <= AUTO_DRAFT_COST * target)


class LookupDraft:
    """Prompt lookup: find the context's last n tokens (n = ngram down to 1) earlier in the context
    (the latest occurrence) and propose the tokens that followed it. Deterministic (q = None).
    `weak` > 0: a match shorter than ngram tokens proposes at most `weak` (it is accepted less often,
    and a shorter verify entry costs less: short_proposal); `matched` is the last match's n (0: none)."""

    def __init__(self, ngram: int = 3, weak: int = 0):
        self.ngram, self.weak, self.matched = ngram, weak, 0
        self.name = f"prompt lookup ({ngram}-gram)"

    def start(self, prompt: list[int]) -> None:
        pass

    def propose(self, context: list[int], k: int, rng, sampling: tuple) -> tuple[list[int], None]:
        n_ctx = len(context)
        for n in range(min(self.ngram, n_ctx - 1), 0, -1):
            tail = context[n_ctx - n:]
            for start in range(n_ctx - n - 1, -1, -1):
                if context[start:start + n] == tail:
                    follow = context[start + n:start + n + (k if n >= self.ngram or not self.weak else min(k, self.weak))]
                    if follow:
                        self.matched = n
                        return follow, None
        self.matched = 0
        return [], None

    def rollback(self, length: int) -> None:
        pass


class ModelDraft:
    """A draft program's session (prefill/decode over its own cache). Proposes by decoding: greedy,
    or sampling from its own distribution q with the target's temperature / top-k / top-p. It stops
    early once the chain's probability under the draft (the product of each proposed token's
    probability: its chance, as the draft sees it, that the target accepts them all) falls below
    `confidence`."""

    def __init__(self, session, confidence: float = 0.0):
        self.session = session
        self.have = 0  # context positions in the draft's cache
        self.name = (getattr(session, "gen", None) or {}).get("pipeline")  # the --draft pipeline
        self.confidence = confidence

    def start(self, prompt: list[int]) -> None:
        # the prompt but its last token, which propose() feeds (its logits give the first draft)
        if len(prompt) > 1:
            prefill_prompt(self.session.prefill, prompt[:-1], self.session.chunk, self.session.max_context)
        self.have = len(prompt) - 1

    def propose(self, context: list[int], k: int, rng, sampling: tuple) -> tuple[list[int], list | None]:
        s, temperature = self.session, sampling[0]
        if len(context) + k > s.max_context:
            k = s.max_context - len(context)
        tokens, qs = [], []
        logits = None
        for pos in range(self.have, len(context)):  # t0 (and the last round's unfed accepted draft)
            logits = self._feed(context[pos], pos)
        self.have = len(context)
        chain = 1.0  # the draft's probability of all its tokens so far
        for i in range(k):
            if i:
                if chain < self.confidence:
                    break
                logits = s.decode(tokens[-1], self.have)
                self.have += 1
            if temperature > 0:
                q = probabilities(logits, *sampling)
                tokens.append(int(rng.choice(q.size, p=q)))
                qs.append(q)
                chain *= q[tokens[-1]]
            else:
                tokens.append(int(np.argmax(logits)))
                if self.confidence:  # softmax(logits)[token] = 1 / sum(exp(logits - logits[token]))
                    chain /= float(np.exp(logits - logits[tokens[-1]]).sum())
        return tokens, (qs if temperature > 0 else None)

    def _feed(self, token: int, pos: int) -> np.ndarray:
        if pos:
            return self.session.decode(token, pos)
        ids = np.zeros(self.session.chunk, dtype=np.int64)  # a one-token prompt: decode needs a prefill first
        ids[0] = token
        return self.session.prefill(ids, 0, 0)

    def rollback(self, length: int) -> None:
        self.have = min(self.have, length)
        self.session.rollback(self.have)


def accept(rows: np.ndarray, drafts: list[int], qs: list | None, rng, sampling: tuple,
           guard: float = 0.0) -> tuple[int, int | None]:
    """(how many drafts are accepted, the token after them) from the target's logits rows
    [len(drafts) + 1, V] (module doc: greedy, or the speculative-sampling rule). Greedy with `guard`
    > 0: a row whose top-2 gap is at most guard * its largest |logit| stops the acceptance there and
    gives None for the token after (a decode step chooses it)."""
    temperature = sampling[0]
    if temperature <= 0:
        def close(row):
            if guard <= 0 or row.size < 2:
                return False
            top2 = np.partition(row, -2)[-2:]
            return float(top2[1] - top2[0]) <= guard * float(np.abs(row).max())
        j = 0
        while j < len(drafts) and not close(rows[j]) and int(np.argmax(rows[j])) == drafts[j]:
            j += 1
        return j, None if close(rows[j]) else int(np.argmax(rows[j]))
    for j, d in enumerate(drafts):
        p = probabilities(rows[j], *sampling)
        q = None if qs is None else qs[j]  # None: a point mass on d (prompt lookup's tokens)
        qd = 1.0 if q is None else q[d]
        if rng.random() * qd < p[d]:  # accepted with probability min(1, p(d) / q(d))
            continue
        residual = np.maximum(p - (_point(d, p.size) if q is None else q), 0.0)
        total = residual.sum()
        residual = residual / total if total > 0 else p
        return j, int(rng.choice(residual.size, p=residual))
    return len(drafts), sample(rows[len(drafts)], rng, *sampling)


def _point(d: int, size: int) -> np.ndarray:
    q = np.zeros(size)
    q[d] = 1.0
    return q


def speculative_loop(target, draft, prompt: list[int], max_new_tokens: int, max_context: int, chunk: int, *,
                     temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                     stop: set[int] | None = None, stats: dict | None = None, k: int | None = None,
                     adapt: bool = True, fill: bool = False, guard: float = 0.0) -> Iterator[int]:
    """Yield up to `max_new_tokens` new token ids, as tcc.generation.decode_loop does (the same
    tokens when greedy; the same distribution when sampling), checking the draft's proposals with
    target.verify. `stats` gets decode_loop's fields plus target_calls (verify and decode steps),
    drafted, accepted and draft_seconds (inside decode_seconds). `k`: the first proposal length
    (default verify_len - 1; it adapts unless `adapt` is False). `fill`: the rows of the verify call
    that the draft leaves empty (it runs verify_len rows whatever the proposal's length) get prompt
    lookup's tokens, which cost nothing (point masses when sampling). `guard` (greedy): accept's; where
    a verify row is too close to call, the token after the accepted drafts comes from a decode step."""
    check_generation(prompt, max_context, temperature, top_k, top_p)
    k_max = max(0, getattr(target, "verify_len", 0) - 1)
    k = min(k or k_max, k_max)
    short = short_proposal(target)
    sampling = (temperature, top_k, top_p)
    rng = np.random.default_rng(seed)
    lookup = LookupDraft() if fill else None
    stats = stats if stats is not None else {}
    t0 = time.perf_counter()
    logits = prefill_prompt(target.prefill, prompt, chunk, max_context)
    draft.start(prompt)
    stats.update(prefill_seconds=time.perf_counter() - t0, prefill_tokens=len(prompt), decode_seconds=0.0,
                 decode_tokens=0, target_calls=0, drafted=0, filled=0, accepted=0, draft_seconds=0.0, verify_calls=0, guarded=0,
                 k_max=k_max, draft=getattr(draft, "name", None))
    budget = min(max_new_tokens, max_context - len(prompt))
    context = list(prompt)
    token = sample(logits, rng, *sampling)
    while True:
        context.append(token)
        yield token
        new = len(context) - len(prompt)
        if (stop and token in stop) or new >= budget:
            return
        t1 = time.perf_counter()
        p = len(context) - 1  # t0 = context[-1] goes in at position p
        width = min(k_max, budget - new - 1) if p + k_max + 1 <= max_context else 0  # proposals verify can take
        room = min(k, width)
        drafts, qs = draft.propose(context, room, rng, sampling) if room > 0 else ([], None)
        drafts, qs = drafts[:room], (qs[:room] if qs is not None else None)
        proposed = len(drafts)  # the draft's own (k adapts to them), then prompt lookup's
        if fill and len(drafts) < width:
            more = lookup.propose(context + drafts, width - len(drafts), rng, sampling)[0]
            if short and len(drafts) <= short and lookup.matched < lookup.ngram:  # a weak match: the short entry
                more = more[:short - len(drafts)]
            drafts, qs = drafts + more, (qs + [None] * len(more) if qs is not None else None)
            stats["filled"] += len(more)
        t2 = time.perf_counter()
        stats["draft_seconds"] += t2 - t1
        stats["target_calls"] += 1
        if not drafts:
            emitted = [sample(target.decode(token, p), rng, *sampling)]
        else:
            rows = target.verify([token] + drafts, p)
            j, nxt = accept(rows, drafts, qs, rng, sampling, guard)
            stats["drafted"] += len(drafts)
            stats["accepted"] += j
            stats["verify_calls"] += 1
            if adapt:
                k = min(k + 2, k_max) if j >= proposed else max(1, k - 1)
            if nxt is None:  # too close to call from the verify row: the decode step of its token decides
                target.rollback(p + j)
                nxt = sample(target.decode(([token] + drafts)[j], p + j), rng, *sampling)
                stats["guarded"] += 1
                stats["target_calls"] += 1
            target.rollback(p + j + 1)
            draft.rollback(p + j + 1)
            emitted = drafts[:j] + [nxt]
        stats["decode_seconds"] += time.perf_counter() - t1
        stats["decode_tokens"] += len(emitted)
        for token in emitted[:-1]:
            context.append(token)
            yield token
            if stop and token in stop:
                return
        token = emitted[-1]


def short_proposal(target) -> int:
    """How many drafts the target's shortest verify entry holds (its rows less t0), 0 with one entry:
    what prompt lookup proposes on a match shorter than its n-gram (SmolLM2 fp32, wikitext-2 valid.txt
    counts: 7 on a 3-gram match, else 3, gives 1.12x the tokens per decode-step cost of 7 always)."""
    lens = getattr(target, "verify_lens", None) or []
    return lens[0] - 1 if len(lens) > 1 else 0


def summary(stats: dict) -> dict:
    """What speculation did: the draft (its pipeline, or prompt lookup), acceptance rate (accepted /
    drafted), tokens per target call in the decode phase, k (the mean proposal length of the verify
    calls; it adapts within 1..k_max), drafted (prompt lookup's fill included) and accepted counts,
    filled (the proposals prompt lookup added after a model draft's), the seconds the draft took."""
    calls, drafted = stats.get("target_calls", 0), stats.get("drafted", 0)
    verifies = stats.get("verify_calls", 0)
    return {"draft": stats.get("draft"), "acceptance_rate": round(stats["accepted"] / drafted, 4) if drafted else None,
            "k_mean": round(drafted / verifies, 3) if verifies else None, "k_max": stats.get("k_max"),
            "tokens_per_target_call": round(stats["decode_tokens"] / calls, 3) if calls else None,
            "target_calls": calls, "drafted": drafted, "filled": stats.get("filled", 0), "accepted": stats.get("accepted", 0),
            "guarded": stats.get("guarded", 0),
            "draft_seconds": round(stats.get("draft_seconds", 0.0), 4)}


# -- the draft program built into the artifact (tcc compile --draft PIPELINE) -------------------------

def draft_pipeline(text: str | None, gen_context: int | None, target):
    """The --draft pipeline, parsed before the slow work (None without --draft); a UserError where the
    artifact gets no generation entry points to speculate with, or for a target other than x86 (the
    arm64 driver keeps one set of KV caches)."""
    if not text:
        return None
    if not gen_context:
        raise UserError("--draft builds a draft program for speculative decoding, which needs generation "
                        "(prefill/decode): a causal LM compiled for a CPU target", "leave --draft out")
    if target.arch != "x86_64":
        raise UserError(f"--draft is built for x86 targets, not {target.name}",
                        "leave --draft out: tcc generate --speculate lookup needs no draft program")
    if text.strip() == "auto":
        return "auto"
    from .pipeline import Pipeline
    return Pipeline.parse(text)


# --draft auto: the candidates, and the verify call's cost in decode steps that the choice assumes
# (8 rows through the small-M dense kernels: ~1.3x a bandwidth-bound decode step, docs/GENERATION.md)
AUTO_DRAFTS = ("drop-blocks(ratio=0.25),quantize(weights=int4,acts=int8,embeddings=true)",
               "drop-blocks(ratio=0.5),quantize(weights=int4,acts=int8,embeddings=true)",
               "quantize(weights=int4,acts=int8,embeddings=true)")
AUTO_VERIFY_COST = 1.3


def expected_speed_up(agreement: float, cost: float, k_max: int = 7, verify: float = AUTO_VERIFY_COST) -> tuple:
    """(speed-up, k): greedy tokens per target call, (1 - a^(k+1)) / (1 - a) when each draft token
    matches the target's with probability a, over the time of k draft decodes (`cost` each, in
    target decode steps) and one verify; the best k in 1..k_max."""
    def tokens(k):
        return k + 1.0 if agreement >= 1.0 else (1.0 - agreement ** (k + 1)) / (1.0 - agreement)
    return max((tokens(k) / (k * cost + verify), k) for k in range(1, k_max + 1))


def _run_pipeline(program, pipe, calibration) -> tuple:
    """(draft, pass records): `pipe` run on a copy of `program` that shares its weights (a full copy
    when a pass may write into them), calibrated on calibration(pipe)."""
    from .pipeline import PassContext
    share = not any(p.may_write_weights for p in pipe)
    records: list = []
    ctx = PassContext(calibration=calibration(pipe), verbose=True, records=records,
                      shared=frozenset(id(t) for t in program.named_tensors().values()) if share else frozenset())
    return pipe.run(program.clone(share_weights=share), ctx, in_place=True), records


def _greedy(program, feeds) -> np.ndarray:
    """The argmax token at every position of every feed (teacher-forced on the feed's ids)."""
    name = program.outputs[0].name
    return np.concatenate([program(f)[name].argmax(-1).ravel() for f in feeds])


def _choose_draft(program, calibration, k_max: int) -> tuple:
    """--draft auto: each AUTO_DRAFTS pipeline built on a copy of `program`; agreement = the fraction
    of positions of the calibration feeds (up to 4) where its greedy token equals the target's
    (teacher-forced: the acceptance rate of greedy speculation on that text); cost = its parameter
    bytes / the target's (decode is bandwidth-bound). Returns (pipeline, draft program, records,
    what was measured); the pipeline with the best expected_speed_up wins."""
    from .pipeline import Pipeline
    from .progress import status
    feeds = None
    want = None
    best, measured = None, []
    for text in AUTO_DRAFTS:
        pipe = Pipeline(list(Pipeline.parse("dce")) + list(Pipeline.parse(text)))
        if feeds is None:
            feeds = list(calibration(pipe))[:4]
            with status("--draft auto: the target's greedy tokens on the calibration text"):
                want = _greedy(program, feeds)
        with status(f"--draft auto: building {pipe.canonical()}"):
            draft, records = _run_pipeline(program, pipe, calibration)
            agreement = float((_greedy(draft, feeds) == want).mean())
        cost = draft.param_bytes() / max(program.param_bytes(), 1)
        gain, k = expected_speed_up(agreement, cost, k_max)
        measured.append({"pipeline": pipe.canonical(), "agreement": round(agreement, 4), "cost": round(cost, 4),
                         "expected_speed_up": round(gain, 3), "k": k})
        if best is None or gain > best[0]:
            best = (gain, pipe, draft, records)
    _, pipe, draft, records = best
    return pipe, draft, records, {"candidates": measured, "positions": int(want.size),
                                  "verify_cost": AUTO_VERIFY_COST}


def build_draft(program, pipe, context: int, kv_cache: str, calibration) -> tuple:
    """The draft: `pipe` run on a copy of the (source) `program` that shares its weights (a full copy
    when a pass may write into them), given a KV cache of `context` positions. `calibration(pipe)`:
    the feeds its passes calibrate on. Returns (Generation, manifest fields: pipeline, passes,
    param_bytes, fingerprint; with pipe "auto", auto: what _choose_draft measured)."""
    from .generation import VERIFY_LEN, kv_cached
    from .pipeline import Pipeline
    from .progress import status
    auto = None
    if pipe == "auto":
        pipe, draft, records, auto = _choose_draft(program, calibration, VERIFY_LEN - 1)
    else:
        pipe = Pipeline(list(Pipeline.parse("dce")) + list(pipe))
        with status(f"building the draft program: {pipe.canonical()}"):
            draft, records = _run_pipeline(program, pipe, calibration)
    with status(f"adding a KV cache of {context} positions to the draft program"):
        gen = kv_cached(draft, context, kv_cache)
    fields = {"pipeline": pipe.canonical(), "param_bytes": draft.param_bytes(), "fingerprint": draft.fingerprint(),
              "passes": [{"pass": r["text"], "seconds": r["seconds"], "param_bytes": r["param_bytes"]} for r in records]}
    return gen, fields if auto is None else {**fields, "auto": auto}


def add_draft(draft: tuple | None, functions: dict, manifest: dict, chunk: int) -> None:
    """The draft's prefill and decode as the artifact's draft_prefill / draft_decode entries (its own
    caches; weights the functions share byte for byte are stored once), described in the
    generation manifest's "draft"."""
    if draft is None:
        return
    from .generation import at_length
    gen, fields = draft
    functions["draft_prefill"] = at_length(gen.program, chunk)
    functions["draft_decode"] = at_length(gen.program, 1)
    manifest["draft"] = {**gen.manifest(chunk), **fields}
