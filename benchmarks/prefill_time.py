"""Prefill time of a compiled causal LM, for profiling (`perf record -g -- python benchmarks/prefill_time.py ...`).

    python benchmarks/prefill_time.py ARTIFACT_DIR [--model DIR] [--prompt 128] [--calls 20]

The prompt: the first --prompt tokens of ../shared/data/wikitext-2/test.txt by the tokenizer.json of --model
(default: the artifact's own tokenizer/ folder); one prefill chunk of that many tokens at position 0
(`Session.prefill`), once to warm up, then --calls times; prints the mean milliseconds and tokens per second.
TVM's threads: TVM_NUM_THREADS (default: every core). The artifact's --seq-len must equal --prompt.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "test.txt"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact")
    p.add_argument("--model", help="folder holding the tokenizer.json (default: ARTIFACT/tokenizer)")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--calls", type=int, default=20)
    a = p.parse_args()
    import tokenizers
    import tcc
    folder = Path(a.model) if a.model else Path(a.artifact) / "tokenizer"
    ids = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json")).encode(TEST.read_text()[:40 * a.prompt]).ids
    block = np.asarray([ids[:a.prompt]], dtype=np.int64)
    with tcc.load(a.artifact) as art:
        s = art.session()
        s.prefill(block, 0, a.prompt - 1)
        t = time.perf_counter()
        for _ in range(a.calls):
            s.prefill(block, 0, a.prompt - 1)
        dt = (time.perf_counter() - t) / a.calls
    print(f"prefill {dt * 1e3:.1f} ms = {a.prompt / dt:.0f} tok/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
