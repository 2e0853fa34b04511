"""Speculation policies compared by counting calls, not timing them (issue 19): each policy runs
tcc.speculative's loop with the artifact's target and draft on N_PROMPTS windows of 128 tokens of
wikitext-2 valid.txt (TEXT=test.txt for the test split), 64 greedy tokens each (every run must equal
the target alone's), counts the target's verify / decode calls and the draft's decode calls, and
models the speed-up as tokens / (V * verifies + decodes + D * draft decodes) with V, D the per-call
costs in target decode steps (environment; default the idle SmolLM2 fp32 figures 1.54 and 0.134).
Counts do not depend on the machine's load.

    TVM_NUM_THREADS=1 python benchmarks/speculative_policies.py ARTIFACT N_PROMPTS \
        '[{}, {"confidence": 0.2, "fill": true}, {"lookup": true, "adapt": false}]'

A policy: confidence (ModelDraft's stop), fill and adapt (speculative_loop's), lookup (prompt lookup
alone). ARTIFACT: one built by benchmarks/speculative.py (it has a draft program)."""
import collections
import json
import os
import sys
import time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy as np, tcc
import speculative as B
import tcc.speculative as S
from tcc.runtime import GenerationSession
V, D = float(os.environ.get("V", 1.54)), float(os.environ.get("D", 0.134))
VALID = B.TEST.with_name(os.environ.get("TEXT", "valid.txt"))


def run(art, ps, pol, want):
    pol = dict(pol)
    adapt = pol.pop("adapt", True)
    fill = pol.pop("fill", False)
    tot = collections.Counter()
    gen = art.manifest["generation"]
    for i, p in enumerate(ps):
        s = art.session()
        if pol.get("lookup"):
            d = S.LookupDraft(); n = [0]
        else:
            ds = GenerationSession(art._impl, {**gen["draft"], "functions": gen["functions"]}, prefix="draft_")
            n = [0]; f = ds.decode
            def dec(*a, f=f, n=n):
                n[0] += 1; return f(*a)
            ds.decode = dec
            d = S.ModelDraft(ds, **pol)
        stats = {}
        out = list(S.speculative_loop(s, d, p, 64, gen["max_context"], gen["prefill_len"], stats=stats, adapt=adapt, fill=fill))
        assert out == want[i]
        tot["tokens"] += stats["decode_tokens"]; tot["verifies"] += stats["verify_calls"]
        tot["decodes"] += stats["target_calls"] - stats["verify_calls"]
        tot["draft_decodes"] += n[0]; tot["drafted"] += stats["drafted"]; tot["accepted"] += stats["accepted"]
    cost = V * tot["verifies"] + tot["decodes"] + D * tot["draft_decodes"]
    calls = tot["verifies"] + tot["decodes"]
    return {**pol, "adapt": adapt, "fill": fill, "model_speed_up": round(tot["tokens"] / cost, 3),
            "tok_per_call": round(tot["tokens"] / calls, 3), "dd_per_call": round(tot["draft_decodes"] / calls, 3),
            "acc": round(tot["accepted"] / max(tot["drafted"], 1), 3), **tot}

if __name__ == "__main__":
    art_dir, n = sys.argv[1], int(sys.argv[2])
    with tcc.load(art_dir) as art:
        ps = B.prompts(art.tokenizer(), n, 128, VALID)
        want = [art.generate(p, 64, stop_at_eos=False)["token_ids"] for p in ps]
        for pol in json.loads(sys.argv[3]):
            t = time.time()
            print(json.dumps({**run(art, ps, pol, want), "s": round(time.time() - t)}), flush=True)
