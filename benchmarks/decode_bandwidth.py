"""Decode of compiled artifacts against this machine's read-bandwidth limit (issue 15, item 5).

    python benchmarks/decode_bandwidth.py ARTIFACT_DIR [ARTIFACT_DIR ...] [--prompt 128] [--new 64]
                                          [--repeats 3] [--rounds 1]

Per artifact (all measured in one process, after one read-bandwidth probe): decode tokens per second,
best of --repeats runs of `Loaded.generate` (prompt: the first --prompt tokens of wikitext-2
test.txt by SmolLM2's tokenizer, then --new greedy tokens; benchmarks/generation.py time_tcc), the
bytes one decode step reads (benchmarks/generation.py decode_bytes: the decode function's stored
tensors but an embedding table only gathered from; the KV cache not counted), and decode vs the
read-bandwidth limit = tok/s x bytes a step / bandwidth (generation.bandwidth: torch.sum of 1 GiB in ordinary and in huge pages, 2
threads, best of 5 processes). --rounds R measures the artifacts R times in turn (round robin: on a shared
machine the load then falls on all of them alike) and keeps each one's best.
"""
from __future__ import annotations

import argparse
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
    a = p.parse_args()
    bw = bandwidth()
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
    print(f"read bandwidth {bw / 1e9:.1f} GB/s ({METHOD})")
    print("| artifact | prefill tok/s | decode tok/s | MB a step reads | decode vs read-bandwidth limit |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for path, r in best.items():
        share = r["decode_tokens_per_s"] * r["bytes"] / bw
        print(f"| {path} | {r['prefill_tokens_per_s']:.0f} | {r['decode_tokens_per_s']:.1f} | {r['bytes'] / 1e6:.1f} "
              f"| {100 * share:.0f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
