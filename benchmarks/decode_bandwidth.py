"""Decode of compiled artifacts against this machine's read-bandwidth limit (issue 15, item 5).

    python benchmarks/decode_bandwidth.py ARTIFACT_DIR [ARTIFACT_DIR ...] [--prompt 128] [--new 64]
                                          [--repeats 3] [--rounds 1] [--processes 1]

Per artifact (all measured in one process, after one read-bandwidth probe): decode tokens per second,
best of --repeats runs of `Loaded.generate` (prompt: the first --prompt tokens of wikitext-2
test.txt by SmolLM2's tokenizer, then --new greedy tokens; benchmarks/generation.py time_tcc), the
bytes one decode step reads (benchmarks/generation.py decode_bytes: the decode function's stored
tensors but an embedding table only gathered from; the KV cache not counted), and decode vs the
read-bandwidth limit = tok/s x bytes a step / bandwidth (generation.bandwidth: torch.sum of 1 GiB in ordinary and in huge pages, 2
threads, best of 5 processes). --rounds R measures the artifacts R times in turn (round robin: on a shared
machine the load then falls on all of them alike) and keeps each one's best. --processes P does all of that
in P fresh processes, one after another, and keeps each artifact's best, as the probe keeps the best of its
processes: on the 2-core Zen 5 EPYC a process streams memory either fast or slow for all of its life (a
probe over an artifact's own weights read 57 GB/s in one process and 84-88 in three others, and the
decode followed it: 203 against 265-273 tok/s, session 20), so a single process compares a decode that
may have drawn the slow memory with a probe that kept the fast. The table then gives the range of the
processes' decode rates beside the best.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

from generation import METHOD, bandwidth, decode_bytes, prompt_ids, time_tcc  # benchmarks/generation.py

import tcc


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifacts", nargs="+")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # one process's results (--processes)
    a = p.parse_args()
    if a.json:
        print(json.dumps(measure(a)))
        return 0
    bw = bandwidth()
    if a.processes <= 1:
        best, spread = measure(a), {}
    else:
        runs = []
        for _ in range(a.processes):
            cmd = [sys.executable, __file__, *a.artifacts, "--prompt", str(a.prompt), "--new", str(a.new),
                   "--repeats", str(a.repeats), "--rounds", str(a.rounds), "--json"]
            runs.append(json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1]))
        best = {path: max((r[path] for r in runs), key=lambda r: r["decode_tokens_per_s"]) for path in a.artifacts}
        spread = {path: [r[path]["decode_tokens_per_s"] for r in runs] for path in a.artifacts}
    print(f"read bandwidth {bw / 1e9:.1f} GB/s ({METHOD})")
    range_col = f" decode tok/s in each of {a.processes} processes |" if spread else ""
    print(f"| artifact | prefill tok/s | decode tok/s | MB a step reads | decode vs read-bandwidth limit |{range_col}")
    print("| --- | ---: | ---: | ---: | ---: |" + (" ---: |" if spread else ""))
    for path, r in best.items():
        share = r["decode_tokens_per_s"] * r["bytes"] / bw
        each = f" {', '.join(f'{x:.1f}' for x in spread[path])} |" if spread else ""
        print(f"| {path} | {r['prefill_tokens_per_s']:.0f} | {r['decode_tokens_per_s']:.1f} | {r['bytes'] / 1e6:.1f} "
              f"| {100 * share:.0f} % |{each}")
    return 0


def measure(a) -> dict[str, dict]:
    """Each artifact's best prefill and decode over a.rounds rounds in this process, with its step's bytes."""
    ids = prompt_ids(a.prompt)
    best: dict[str, dict] = {}
    for _ in range(a.rounds):
        for path in a.artifacts:
            with tcc.load(path) as art:
                r = time_tcc(art, ids, a.new, a.repeats)
                r["bytes"] = decode_bytes(art)
                r["pipeline"] = art.manifest.get("pipeline") or art.manifest.get("run", {}).get("pipeline", "")
            old = best.get(path)
            if old is None or r["decode_tokens_per_s"] > old["decode_tokens_per_s"]:
                best[path] = r
    return best


if __name__ == "__main__":
    sys.exit(main())
