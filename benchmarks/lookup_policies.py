"""Prompt-lookup proposal lengths compared by counting, not timing (issue 19): the target's greedy
tokens once per prompt (N_PROMPTS windows of 128 tokens of wikitext-2 TEXT, 64 greedy tokens each),
then each policy's rounds replayed offline (tcc.speculative.LookupDraft on the same contexts: the
tokens a round accepts are the prefix of its proposal that the greedy continuation repeats), a verify
costed by the shortest entry that holds its rows, a round with nothing proposed as one decode step.
Prints tokens per target call and the modelled speed-up, tokens / cost in decode steps, for a few
per-entry costs (V4, V8: a 4- and an 8-row verify in decode steps). Counts do not depend on the load.

    TVM_NUM_THREADS=1 python benchmarks/lookup_policies.py ARTIFACT [N_PROMPTS] [valid|test]

Policies: "k=7" (7 every round: prompt lookup before the 4-row entry), "k=3", "k=5", and "by match"
(7 on a 3-gram match, else 3: what `--speculate lookup` does, LookupDraft(weak=3))."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tcc  # noqa: E402
from speculative import TEST, prompts  # noqa: E402
from tcc.speculative import LookupDraft  # noqa: E402

POLICIES = {"k=7": (7, 0), "k=5": (5, 0), "k=3": (3, 0), "by match": (7, 3)}  # (k, weak)
COSTS = {"8 rows only (V8 1.55)": {8: 1.55}, "4 + 8 rows, V4 1.1": {4: 1.1, 8: 1.55},
         "4 + 8 rows, V4 1.2": {4: 1.2, 8: 1.55}, "4 + 8 rows, V4 1.3": {4: 1.3, 8: 1.55}}


def count(runs, k, weak, costs):
    tokens = cost = calls = 0
    for prompt, out in runs:
        t = 1  # the first token comes from the prefill
        while t < len(out):
            ctx, width = prompt + out[:t], min(k, len(out) - t - 1)
            props = LookupDraft(weak=weak).propose(ctx, width, None, ())[0] if width > 0 else []
            j = 0
            while j < len(props) and props[j] == out[t + j]:
                j += 1
            calls += 1
            cost += costs[min(e for e in costs if e >= 1 + len(props))] if props else 1.0
            t += j + 1
            tokens += j + 1
    return tokens / calls, tokens / cost


def main() -> int:
    art_dir = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 12
    text = TEST.with_name(f"{sys.argv[3] if len(sys.argv) > 3 else 'valid'}.txt")
    with tcc.load(art_dir) as art:
        runs = [(p, art.generate(p, 64, stop_at_eos=False)["token_ids"]) for p in prompts(art.tokenizer(), n, 128, text)]
    print(f"{n} prompts of {text.name}: tokens / target call, modelled speed-up")
    print("| policy | tokens / call | " + " | ".join(COSTS) + " |")
    print("| --- | ---: |" + " ---: |" * len(COSTS))
    for name, (k, weak) in POLICIES.items():
        cells = [count(runs, k, weak, c) for c in COSTS.values()]
        print(f"| {name} | {cells[0][0]:.3f} | " + " | ".join(f"{c[1]:.3f}x" for c in cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
