"""bf16 weights (issue 15, item 4): a bf16 checkpoint compiled kept in bf16 (the default) and to fp32
(--dtype fp32), compile cost and decode speed measured in one run.

    flock /tmp/tcc-bigmem.lock python benchmarks/bf16.py [--model /tmp/scale/qwen05b-bfloat16]
        [--out build/bf16] [--prompt 128] [--new 64] [--repeats 3] [--context 512] [--threads 2]
        [--dtypes bf16,fp32] [--reuse DTYPE=DIR]

Model: a random-initialised decoder saved in bf16 by ../shared/tools/scale_models.py (`qwen05b
--dtype bfloat16 --out /tmp/scale`: Qwen2.5-0.5B shape, SmolLM2's tokenizer).
Per dtype: `tcc compile MODEL --target native --dtype D --seq-len PROMPT --max-context CONTEXT --no-cache
--no-latency` in a subprocess (compile seconds and peak RSS as its report.json's run records them;
`--reuse fp32=DIR` times an artifact compiled before instead, e.g. benchmarks/llm_scale.py's of the
same shape's fp32 checkpoint, with that compile's own figures), then in this
process prefill of PROMPT random token ids (seed 0) as one chunk and NEW greedy decode steps, best of
--repeats after a warm-up (benchmarks/generation.py time_tcc), TVM_NUM_THREADS = --threads. Decode's
share of the read-bandwidth limit: decode tok/s x the bytes a decode step reads
(benchmarks/generation.py decode_bytes: the stored tensors, an embedding table only gathered from
not counted, the KV cache not counted) / read bandwidth (generation.bandwidth(), measured first).
Prints one markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import generation  # noqa: E402  (benchmarks/generation.py: bandwidth, decode_bytes, time_tcc)

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def compile_artifact(model: Path, dest: Path, dtype: str, a) -> None:
    cmd = ["tcc", "compile", str(model), "--target", "native", "--dtype", dtype, "-o", str(dest), "--seq-len",
           str(a.prompt), "--max-context", str(a.context), "--no-cache", "--no-latency", "--force"]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "TVM_NUM_THREADS": str(a.threads)})


def compile_stats(art: Path) -> dict:
    """What the artifact's compile recorded: total seconds and peak RSS (report.json run), weight bytes."""
    m, r = (json.loads((art / f).read_text()) for f in ("manifest.json", "report.json"))
    return {"compile_s": r["run"]["seconds"]["total"], "peak_rss_gb": r["run"]["memory"]["peak_rss_gb"],
            "weight_bytes": m["sizes"]["weight_bytes"], "pipeline": m["pipeline"], "target": m["target"]["name"],
            "source": m["source"].get("path", "")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=Path("/tmp/scale/qwen05b-bfloat16"))
    p.add_argument("--out", type=Path, default=Path("build/bf16"))
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtypes", default="bf16,fp32")
    p.add_argument("--reuse", action="append", default=[], metavar="DTYPE=DIR",
                   help="time this existing artifact for DTYPE instead of compiling one (same shape, prompt length "
                        "and context; e.g. benchmarks/llm_scale.py's fp32 artifact of the fp32 checkpoint); its "
                        "compile figures are the ones it recorded")
    a = p.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(a.threads)
    import tcc
    bw = generation.bandwidth()
    vocab = json.loads((a.model / "config.json").read_text())["vocab_size"]
    ids = np.random.default_rng(0).integers(0, vocab, a.prompt).tolist()
    rows = []
    reuse = dict(r.split("=", 1) for r in a.reuse)
    for dtype in a.dtypes.split(","):
        path = Path(reuse[dtype]) if dtype in reuse else a.out / dtype
        if dtype not in reuse:
            compile_artifact(a.model, path, dtype, a)
        r = compile_stats(path)
        art = tcc.load(path)
        r.update(generation.time_tcc(art, ids, a.new, a.repeats), step_bytes=generation.decode_bytes(art))
        art.close()
        r["share"] = r["decode_tokens_per_s"] * r["step_bytes"] / bw
        rows.append((dtype, r))
        print(json.dumps({"dtype": dtype, **{k: v for k, v in r.items() if k != "token_ids"}}), flush=True)
    print(f"\n{a.model.name}, {a.prompt}-token prompt of random ids, {a.new} greedy tokens, {a.threads} threads, "
          f"best of {a.repeats}; read bandwidth {bw / 1e9:.1f} GB/s\n")
    print("| weights | checkpoint | pipeline | compile | peak RSS | weight MB | prefill tok/s | decode tok/s "
          "| MB a step reads | decode vs read-bandwidth limit |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for dtype, r in rows:
        print(f"| {dtype} | {Path(r['source']).name} | `{r['pipeline']}` | {r['compile_s']:.0f} s | {r['peak_rss_gb']:.1f} GB | "
              f"{r['weight_bytes'] / 1e6:.0f} | {r['prefill_tokens_per_s']:.0f} | {r['decode_tokens_per_s']:.1f} | "
              f"{r['step_bytes'] / 1e6:.0f} | {100 * r['share']:.0f} % |")
    if len(rows) == 2:
        (d0, r0), (d1, r1) = rows
        agree = next((i for i, (x, y) in enumerate(zip(r0["token_ids"], r1["token_ids"])) if x != y), len(r0["token_ids"]))
        print(f"\ndecode {d0} / {d1}: {r0['decode_tokens_per_s'] / r1['decode_tokens_per_s']:.2f}x; "
              f"greedy tokens equal before the first difference: {agree} of {a.new}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
