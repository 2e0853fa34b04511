"""Native decode (a bundle's bin/tcc-generate, C API) against the Python path (tcc.load(...).generate)
on the same artifact, prompt and greedy tokens.

    python benchmarks/bundle_decode.py ARTIFACT [--tokens 64] [--rounds 3] [--prompt-len 32] [--threads N]

Exports ARTIFACT's bundle into a temporary directory, then alternates the two runtimes `rounds`
times (interleaved, so load on a shared machine hits both alike; each in its own process: `tcc
generate --json` and `bin/tcc-generate --timing`) on one prompt of seeded ids;
prints each run's decode and prefill tokens per second, the medians, their ratio, and whether the
generated ids are identical (they must be: both are greedy over the same library). The bundle's
runtime libraries' size is printed too. --threads sets TVM_NUM_THREADS for both (default: every core,
what each uses by itself); one thread is the steadier comparison on a loaded machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--threads", type=int)
    a = p.parse_args()

    from tcc.artifact import read_manifest
    from tcc.backends.tvm.bundle import make_bundle
    manifest = read_manifest(Path(a.artifact))
    vocab = manifest["generation"]["functions"]["decode"]["outputs"][0]["shape"][-1]
    prompt = [int(t) for t in np.random.default_rng(0).integers(1, vocab, a.prompt_len)]
    ids_arg = ",".join(map(str, prompt))
    env = {**os.environ, **({"TVM_NUM_THREADS": str(a.threads)} if a.threads else {})}
    with tempfile.TemporaryDirectory() as tmp:
        info = make_bundle(a.artifact, Path(tmp) / "bundle")
        tool = Path(info["bundle"]) / "bin" / "tcc-generate"
        rows = {"python": [], "native": []}
        ids = {}
        for _ in range(a.rounds):
            # each runtime in its own process: neither one's thread pool is alive while the other runs
            out = subprocess.run([sys.executable, "-m", "tcc.cli", "generate", a.artifact, "--prompt-ids", ids_arg,
                                  "--max-new-tokens", str(a.tokens), "--json"],
                                 capture_output=True, text=True, check=True, env=env)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows["python"].append((r["prefill_tokens_per_s"], r["decode_tokens_per_s"]))
            ids["python"] = r["token_ids"]
            out = subprocess.run([str(tool), "--ids", ids_arg, "--max-new-tokens", str(a.tokens),
                                  "--timing"], capture_output=True, text=True, check=True, env=env)
            ids["native"] = [int(t) for t in out.stdout.strip().split(",")]
            words = out.stderr.split()
            rows["native"].append((float(words[3]), float(words[8])))
    print(f"artifact {a.artifact}: prompt {a.prompt_len} ids, {a.tokens} greedy tokens, {a.rounds} interleaved rounds, "
          f"TVM_NUM_THREADS={a.threads or 'unset (every core)'}")
    print(f"bundle {info['bytes'] / 1e6:.1f} MB, runtime libraries {info['runtime_bytes'] / 1e6:.1f} MB")
    med = {}
    for name, r in rows.items():
        med[name] = (statistics.median(x for x, _ in r), statistics.median(y for _, y in r))
        print(f"{name:7s} prefill tok/s {[x for x, _ in r]} median {med[name][0]:.1f}; decode tok/s "
              f"{[y for _, y in r]} median {med[name][1]:.1f}")
    print(f"native / python: decode {med['native'][1] / med['python'][1]:.2f}x, prefill "
          f"{med['native'][0] / med['python'][0]:.2f}x; identical ids: {ids['native'] == ids['python']}")
    print(json.dumps({"median": med, "identical": ids["native"] == ids["python"]}))


if __name__ == "__main__":
    main()
