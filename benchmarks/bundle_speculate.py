"""Prompt-lookup speculation in a native bundle (issue 19, item 4): `tcc-generate --speculate lookup`
against plain greedy `tcc-generate`, same bundle, same prompts.

    python benchmarks/bundle_speculate.py ARTIFACT_DIR [ARTIFACT_DIR ...] [--prompts 6] [--prompt 128]
                                          [--new 64] [--out DIR]

Each artifact (a SmolLM2 generation artifact with verify entries: tcc compile smollm2 --target native
--seq-len 128 --max-context 512, or benchmarks/speculative.py's) is bundled into --out (make_bundle, once),
then for --prompts windows of --prompt tokens of ../shared/data/wikitext-2/test.txt (SmolLM2's
tokenizer, evenly spaced over the first 200,000 characters) tcc-generate runs --new greedy tokens
without and with --speculate lookup, one after the other, each in its own process with an empty
environment but TVM_NUM_THREADS=2. Decode tokens per second = all prompts' decode tokens / their decode
seconds (tcc-generate --timing); `same` counts the prompts whose ids are identical.
"""
from __future__ import annotations

import argparse
import re
import subprocess
from pathlib import Path

TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "test.txt"


def prompts(n: int, length: int) -> list[list[int]]:
    import tokenizers
    from tcc.frontends import models
    tok = tokenizers.Tokenizer.from_file(str(Path(models.resolve("smollm2")) / "tokenizer.json"))
    ids = tok.encode(TEST.read_text()[:200_000]).ids
    return [ids[(len(ids) - length) * i // n:][:length] for i in range(n)]


def run(bundle: Path, prompt: list[int], new: int, speculate: bool) -> tuple[str, int, float, str]:
    cmd = [str(bundle / "bin" / "tcc-generate"), "--ids", ",".join(map(str, prompt)), "--max-new-tokens", str(new),
           "--no-stop", "--timing"] + (["--speculate", "lookup"] if speculate else [])
    r = subprocess.run(cmd, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "TVM_NUM_THREADS": "2"})
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd[:1])} exited {r.returncode}: {r.stderr}")
    m = re.search(r"decode (\d+) tokens ([\d.]+) tok/s", r.stderr)
    n, rate = int(m.group(1)), float(m.group(2))
    spec = re.search(r"speculate lookup: .*", r.stderr)
    return r.stdout.strip(), n, n / rate if rate else 0.0, spec.group(0) if spec else ""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifacts", nargs="+")
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--out", default="build/bundle_speculate")
    a = p.parse_args()
    from tcc.backends.tvm.bundle import make_bundle
    windows = prompts(a.prompts, a.prompt)
    print("| artifact | plain decode tok/s | lookup decode tok/s | speed-up | same ids | model calls | verify calls | accepted / proposed |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for art in map(Path, a.artifacts):
        bundle = Path(a.out) / art.name
        if not (bundle / "tcc-bundle.json").exists():
            make_bundle(art, bundle)
        tot = {False: [0, 0.0], True: [0, 0.0]}
        same, calls, verifies, accepted, proposed = 0, 0, 0, 0, 0
        for prompt in windows:
            ids = {}
            for speculate in (False, True):
                ids[speculate], n, seconds, spec = run(bundle, prompt, a.new, speculate)
                tot[speculate][0] += n
                tot[speculate][1] += seconds
                if spec:
                    c, v, acc, prop = map(int, re.search(r"(\d+) model calls \((\d+) verify\), (\d+) of (\d+)", spec).groups())
                    calls, verifies, accepted, proposed = calls + c, verifies + v, accepted + acc, proposed + prop
            same += ids[False] == ids[True]
        plain, fast = (tot[s][0] / tot[s][1] for s in (False, True))
        print(f"| {art.name} | {plain:.1f} | {fast:.1f} | {fast / plain:.2f}x | {same} of {len(windows)} | {calls} | "
              f"{verifies} | {accepted} / {proposed} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
