"""Speculative decoding on SmolLM2-135M (issue 19): decode tokens per second with prompt lookup and
with a draft program built into the artifact, against the target alone, in one run.

    python benchmarks/speculative.py [--out build/speculative] [--target native] [--prompts 8]
                                     [--prompt 128] [--new 64] [--draft PIPELINE]
                                     [--artifacts fp32,w8a8[,int4,w4a8]]

Artifacts: tcc.compile("smollm2", TARGET, seq_len=PROMPT, max_context=512, draft=DRAFT) with no
passes (fp32) and with the w8a8 preset's pipeline (int4: the q4 preset's, w4a8: the same with int8
activations; PIPELINES); each holds the target's prefill / decode / verify
(8 rows) / verify4 (4 rows) and the draft's prefill / decode. An artifact already in --out is reused (delete it to
rebuild). Calibration: wikitext-2 valid.txt.
Prompts: --prompts windows of PROMPT tokens of ../shared/data/wikitext-2/test.txt (SmolLM2's
tokenizer), evenly spaced. Each prompt generates NEW greedy tokens five ways on the same artifact,
interleaved: the target alone (decode), --speculate lookup, "lookup-v0" (prompt lookup before the
4-row verify entry: 7 tokens every round, 8 rows every verify), --speculate draft, and "draft-v0" (the
draft as before 9bf8ebe: k adapting, no confidence stop, no prompt-lookup fill); every run's tokens
must equal the target alone's (the script stops otherwise). Decode tokens per second = the tokens
after the first / the seconds after prefill (draft and verify calls included), summed over the
prompts. Per-call costs: median milliseconds of 20 target decode, verify (4 and 8 rows) and draft
decode calls. Batch 1; TVM's threads = the host's cores (2 here).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

ROOT = Path(__file__).resolve().parents[1]
TEST = ROOT.parent / "shared" / "data" / "wikitext-2" / "test.txt"
os.environ.setdefault("TCC_CALIBRATION_TEXT", str(TEST.with_name("valid.txt")))
PIPELINES = {"fp32": "", "w8a8": "quantize(acts=int8,method=smoothquant,embeddings=true)",
             # int4 targets (not run unless asked for): the q4 preset (weight-only, Q4_1's grid) and W4A8
             "int4": "q4",
             "w4a8": "quantize(weights=int4,group=32,sym=false,zero=float,acts=int8,embeddings=true)"}
DRAFT = "drop-blocks(ratio=0.25),quantize(weights=int4,acts=int8,embeddings=true)"
MODES = ("off", "lookup", "lookup-v0", "draft", "draft-v0")


def prompts(tokenizer, n: int, length: int, text: Path = TEST) -> list[list[int]]:
    ids = tokenizer(text.read_text()[:400_000])["input_ids"]
    starts = np.linspace(0, len(ids) - length - 1, n).astype(int)
    return [ids[s:s + length] for s in starts]


def per_call_ms(art, prompt: list[int]) -> dict:
    """Median ms of a target decode, a verify of 8 rows and a draft decode, after prefilling `prompt`."""
    from tcc.generation import prefill_prompt
    from tcc.runtime import GenerationSession
    gen = art.manifest["generation"]
    out = {}
    s = art.session()
    prefill_prompt(s.prefill, prompt, s.chunk, s.max_context)
    p = len(prompt)

    def median(fn):
        times = []
        for _ in range(20):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return round(1000 * statistics.median(times), 3)

    out["decode_ms"] = median(lambda: (s.rollback(p), s.decode(prompt[-1], p)))
    out["verify_ms"] = median(lambda: (s.rollback(p), s.verify(prompt[-s.verify_len:], p)))
    for n in getattr(s, "verify_lens", [])[:-1]:  # the shorter verify entries
        out[f"verify{n}_ms"] = median(lambda: (s.rollback(p), s.verify(prompt[-n:], p)))
    if "draft" in gen:
        d = GenerationSession(art._impl, {**gen["draft"], "functions": gen["functions"]}, prefix="draft_")
        prefill_prompt(d.prefill, prompt, d.chunk, d.max_context)
        out["draft_decode_ms"] = median(lambda: (d.rollback(p), d.decode(prompt[-1], p)))
    return out


def draft_v0(art, prompt: list[int], new: int) -> dict:
    """The draft loop before 9bf8ebe (a same-run baseline): k adapts, no confidence stop, no fill."""
    from tcc.runtime import GenerationSession
    from tcc.speculative import ModelDraft, speculative_loop, summary
    gen = art.manifest["generation"]
    draft = ModelDraft(GenerationSession(art._impl, {**gen["draft"], "functions": gen["functions"]}, prefix="draft_"))
    stats: dict = {}
    ids = list(speculative_loop(art.session(), draft, prompt, new, gen["max_context"], gen["prefill_len"], stats=stats))
    return {"token_ids": ids, "decode_seconds": stats["decode_seconds"], "speculative": summary(stats)}


def lookup_v0(art, prompt: list[int], new: int) -> dict:
    """Prompt lookup as before the short verify entry (a same-run baseline): 7 tokens every round, every
    verify through the 8-row entry."""
    from tcc.speculative import LookupDraft, speculative_loop, summary
    gen = art.manifest["generation"]
    s = art.session()
    s.verify_lens = [s.verify_len]  # the 8-row entry only
    stats: dict = {}
    ids = list(speculative_loop(s, LookupDraft(), prompt, new, gen["max_context"], gen["prefill_len"], stats=stats,
                                adapt=False))
    return {"token_ids": ids, "decode_seconds": stats["decode_seconds"], "speculative": summary(stats)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="build/speculative")
    ap.add_argument("--target", default="native")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--draft", default=DRAFT)
    ap.add_argument("--artifacts", default="fp32,w8a8")
    ap.add_argument("--count-mismatches", action="store_true", help="count the runs whose greedy tokens differ "
                    "from the target alone's (column 'differ') instead of stopping at the first")
    a = ap.parse_args()
    import tcc
    rows = []
    for name in a.artifacts.split(","):
        out = Path(a.out) / name
        if not (out / "manifest.json").is_file():
            tcc.compile("smollm2", a.target, out=out, pipeline=PIPELINES[name], seq_len=a.prompt, max_context=512,
                        draft=a.draft, latency=False).close()
        with tcc.load(out) as art:
            draft = art.manifest["generation"].get("draft", {}).get("pipeline")
            tok = art.tokenizer()
            ps = prompts(tok, a.prompts, a.prompt)
            calls = per_call_ms(art, ps[0])
            totals = {m: {"tokens": 0, "seconds": 0.0, "target_calls": 0, "drafted": 0, "accepted": 0, "differ": 0}
                      for m in MODES}
            art.generate(ps[0], 8, stop_at_eos=False)  # warm-up
            for prompt in ps:
                want = None
                for mode in MODES:
                    r = draft_v0(art, prompt, a.new) if mode == "draft-v0" else lookup_v0(art, prompt, a.new) \
                        if mode == "lookup-v0" else art.generate(prompt, a.new, stop_at_eos=False, speculate=mode)
                    if want is None:
                        want = r["token_ids"]
                    elif r["token_ids"] != want:
                        if not a.count_mismatches:
                            sys.exit(f"{name} {mode}: greedy tokens differ from the target alone's")
                        totals[mode]["differ"] += 1
                    t = totals[mode]
                    t["tokens"] += len(r["token_ids"]) - 1
                    t["seconds"] += r["decode_seconds"]
                    sp = r.get("speculative") or {"target_calls": len(r["token_ids"]) - 1, "drafted": 0, "accepted": 0}
                    for k in ("target_calls", "drafted", "accepted"):
                        t[k] += sp[k]
            base = totals["off"]["tokens"] / totals["off"]["seconds"]
            for mode, t in totals.items():
                tps = t["tokens"] / t["seconds"]
                rows.append({"artifact": name, "mode": mode, "draft": draft if mode.startswith("draft") else None,
                             "decode_tokens_per_s": round(tps, 2), "speed_up": round(tps / base, 3),
                             "acceptance_rate": round(t["accepted"] / t["drafted"], 3) if t["drafted"] else None,
                             "tokens_per_target_call": round(t["tokens"] / t["target_calls"], 3),
                             "drafted_per_call": round(t["drafted"] / t["target_calls"], 3), "differ": t["differ"],
                             **calls})
    print(f"\nSmolLM2-135M, {a.prompts} prompts of {a.prompt} tokens (wikitext-2 test), {a.new} greedy tokens each, "
          f"batch 1, {os.cpu_count()} cores, target {a.target}; draft {a.draft}; load average at the end "
          f"{os.getloadavg()[0]:.1f}")
    print("| artifact | speculate | decode tok/s | vs target alone | acceptance | tokens / target call | "
          "drafts / call | decode ms | verify(4) ms | verify(8) ms | draft decode ms | differ |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['artifact']} | {r['mode']} | {r['decode_tokens_per_s']} | {r['speed_up']}x | {r['acceptance_rate']} | "
              f"{r['tokens_per_target_call']} | {r['drafted_per_call']} | {r['decode_ms']} | {r.get('verify4_ms')} | "
              f"{r['verify_ms']} | {r.get('draft_decode_ms')} | {r['differ']} |")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
