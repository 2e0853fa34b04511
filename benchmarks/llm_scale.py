"""tcc against llama.cpp on the same checkpoints at the 0.5B and 1B shapes (issue 15, item 6).

    python benchmarks/llm_scale.py [--out build/llm_scale] [--shapes qwen05b,llama1b]
        [--formats fp32,w8a8,q4_0,q4_1] [--prompt 128] [--new 64] [--repeats 3] [--threads 2]
        [--context 512] [--phase all|prepare|measure|table] [--llama-cpp-src PATH] [--remeasure]

Models: the random-initialised decoders at real shapes that ../shared/tools/scale_models.py writes
(`--scale-dir`, default /tmp/scale: qwen05b-float32 = Qwen2.5-0.5B shape, llama1b-float32 =
Llama-3.2-1B shape; SmolLM2's tokenizer, saved fp32 with save_pretrained).

Each format pairs a tcc artifact with a GGUF made from the same checkpoint:

  format  tcc pipeline                                                                  llama.cpp
  fp32    (none)                                                                        F32
  w8a8    quantize(acts=int8,embeddings=true)                                           Q8_0
  q4_0    quantize(weights=int4,group=32,sym=true,acts=int8,embeddings=true,embedding_format=int4)  Q4_0
  q4_1    quantize(weights=int4,group=32,sym=false,zero=float,acts=int8,embeddings=true,
          embedding_format=int4)                                                        Q4_1
  q4_0e8  quantize(weights=int4,group=32,sym=true,acts=int8,embeddings=true)            Q4_0
  q4_1e8  quantize(weights=int4,group=32,sym=false,zero=float,acts=int8,embeddings=true) Q4_1
  q4_0w   quantize(weights=int4,group=32,sym=true,embeddings=true)                      Q4_0
  q4_1w   quantize(weights=int4,group=32,sym=false,zero=float,embeddings=true)          Q4_1

q4_0 / q4_1 are W4A8 as llama.cpp computes Q4_0 / Q4_1: int4 x int8 dot products, the activations
quantized to int8 per block of 32 (llama.cpp's Q8_0 / Q8_1); q4_0w / q4_1w (not run by default) are
tcc's weight-only int4, which converts codes to float. The tied embedding / LM head: int8 per row in
tcc's w8a8 / q4_0w / q4_1w (embeddings=true); in q4_0 / q4_1 the body's int4 grid (embedding_format=int4:
the LM head is a W4A8 GEMV on the table's codes, stored once; q4_0e8 / q4_1e8, not run by default, keep
it int8). llama.cpp's quantizer keeps token_embd at Q4_0 / Q4_1 but output.weight at Q8_0 (0.5B) or
Q6_K (1B): with the int4 LM head tcc reads fewer bytes a step than llama.cpp at the same body format.

tcc: `tcc compile DIR --target native -p PIPELINE --seq-len PROMPT --max-context CONTEXT --no-cache
--no-latency`, one subprocess per artifact (its compile wall and peak RSS are recorded).
llama.cpp: the F32 GGUF comes from llama.cpp's own converter (convert_hf_to_gguf.py of the
llama-cpp-python source archive, `pip download --no-deps --no-binary :all: llama-cpp-python`; given by
--llama-cpp-src as that .tar.gz or its extracted vendor/llama.cpp folder, default: $LLAMA_CPP_SRC, else
the newest /tmp/wheels/llama_cpp_python-*.tar.gz); Q8_0, Q4_0 and Q4_1 from it with the library's
llama_model_quantize. The converter refuses tokenizers whose pre-tokenizer hash it does not know; with
transformers 5, AutoTokenizer loads the Qwen2-shaped folder as Qwen2Tokenizer (Qwen's pre-tokenizer,
not the one in tokenizer.json), so the converter's hash check is given the folder's own
tokenizer.json (tokenizers.Tokenizer), which hashes to llama.cpp's known "smollm" entry; the check is
still the converter's own. Everything is cached under --out (gguf/, tcc/, results.jsonl); a rerun
measures only what is not in results.jsonl (--remeasure: everything again).

Measurement, per shape and format, tcc and llama.cpp each in their own processes, the same prompt ids (the
first PROMPT tokens of ../shared/data/wikitext-2/test.txt by the models' tokenizer.json): prefill of
the prompt as one chunk, then NEW greedy decode steps; best of --repeats runs after a warm-up, in each of --loads fresh processes (one load each, tcc and
llama.cpp alternating; the best load is the row: a process's memory decides its speed on some machines); batch 1,
--threads threads (TVM_NUM_THREADS; llama.cpp n_threads and n_threads_batch). tcc: Loaded.generate
(benchmarks/generation.py time_tcc); llama.cpp: benchmarks/llamacpp.py tokens_per_s (n_ctx
max(512, PROMPT + NEW + 1)). Decode's share of the read-bandwidth limit: decode tok/s x bytes a step
reads / read bandwidth (benchmarks/generation.py bandwidth(): torch.sum over 1 GiB in ordinary and in huge pages, best of 5, in 5 processes, measured
at the start of the measure phase). Bytes a step reads: tcc, its decode function's stored tensors but an
embedding table only gathered from (generation.decode_bytes); llama.cpp, every tensor of the GGUF
but token_embd when the GGUF has an output.weight (these checkpoints store lm_head.weight next to the
tied table, and the converter writes both; gguf.GGUFReader, the file's size when gguf is missing).
The KV cache is not counted for either. `same tokens`: how many of the NEW greedy tokens the two engines agree on before the first
difference (a check that both run the same model; random-init logits are nearly flat, so low-bit
formats may part early).

llama-cpp-python is not a tcc dependency: without it (or without the converter source) the llama.cpp
half is skipped with a message and only tcc is measured. Prints one markdown table and writes
results.json (and results.jsonl) under --out.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from _results import Results  # benchmarks/ is on sys.path when run as a script
import llamacpp  # noqa: E402  (llama_cpp itself is imported lazily)
import generation  # noqa: E402  (takes benchmarks/ off sys.path again: benchmarks/kernels.py shadows `kernels`)

ROOT = Path(__file__).resolve().parents[1]
TEST = ROOT.parent / "shared" / "data" / "wikitext-2" / "test.txt"
SHAPES = {"qwen05b": "Qwen2.5-0.5B shape (896 x 24, 14 heads / 2 KV)",
          "llama1b": "Llama-3.2-1B shape (2048 x 16, 32 heads / 8 KV)"}
# format: (tcc label, tcc pipeline, GGUF type, llama_ftype constant of llama_cpp)
FORMATS = {
    "fp32": ("fp32", "", "F32", "LLAMA_FTYPE_ALL_F32"),
    "w8a8": ("W8A8", "quantize(acts=int8,embeddings=true)", "Q8_0", "LLAMA_FTYPE_MOSTLY_Q8_0"),
    "q4_0": ("W4A8 g32 sym, int4 LM head",
             "quantize(weights=int4,group=32,sym=true,acts=int8,embeddings=true,embedding_format=int4)", "Q4_0",
             "LLAMA_FTYPE_MOSTLY_Q4_0"),
    "q4_1": ("W4A8 g32 asym zero=float, int4 LM head",
             "quantize(weights=int4,group=32,sym=false,zero=float,acts=int8,embeddings=true,embedding_format=int4)",
             "Q4_1", "LLAMA_FTYPE_MOSTLY_Q4_1"),
    # the same with the int8 LM head (embeddings=true alone), not run unless asked for
    "q4_0e8": ("W4A8 g32 sym, int8 LM head", "quantize(weights=int4,group=32,sym=true,acts=int8,embeddings=true)",
               "Q4_0", "LLAMA_FTYPE_MOSTLY_Q4_0"),
    "q4_1e8": ("W4A8 g32 asym zero=float, int8 LM head",
               "quantize(weights=int4,group=32,sym=false,zero=float,acts=int8,embeddings=true)", "Q4_1",
               "LLAMA_FTYPE_MOSTLY_Q4_1"),
    # weight-only int4 (codes converted to float in the kernel), not run unless asked for
    "q4_0w": ("int4 g32 sym", "quantize(weights=int4,group=32,sym=true,embeddings=true)", "Q4_0",
              "LLAMA_FTYPE_MOSTLY_Q4_0"),
    "q4_1w": ("int4 g32 asym zero=float", "quantize(weights=int4,group=32,sym=false,zero=float,embeddings=true)",
              "Q4_1", "LLAMA_FTYPE_MOSTLY_Q4_1"),
}
DEFAULT_FORMATS = "fp32,w8a8,q4_0,q4_1"
SMOLLM_PRE = "smollm"  # llama.cpp's pre-tokenizer name for SmolLM / SmolLM2's tokenizer.json


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="tcc vs llama.cpp on the 0.5B and 1B shapes (issue 15)")
    p.add_argument("--out", default="build/llm_scale", help="cache of GGUFs, artifacts and results")
    p.add_argument("--scale-dir", default="/tmp/scale", help="folder of scale_models.py's <shape>-float32 models")
    p.add_argument("--shapes", default="qwen05b,llama1b", help="comma-separated: " + ", ".join(SHAPES))
    p.add_argument("--formats", default=DEFAULT_FORMATS, help="comma-separated: " + ", ".join(FORMATS))
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens (one prefill chunk)")
    p.add_argument("--new", type=int, default=64, help="greedy decode steps")
    p.add_argument("--repeats", type=int, default=3, help="timed runs (best of), after one warm-up")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--context", type=int, default=512, help="tcc --max-context (KV-cache positions)")
    p.add_argument("--phase", default="all", choices=["all", "prepare", "measure", "table"])
    p.add_argument("--llama-cpp-src", default=os.environ.get("LLAMA_CPP_SRC"),
                   help="llama-cpp-python source archive (.tar.gz) or its vendor/llama.cpp folder")
    p.add_argument("--remeasure", action="store_true", help="measure again what results.jsonl already holds")
    p.add_argument("--loads", type=int, default=3,
                   help="fresh processes each engine's row is measured in (best of; tcc and llama.cpp alternate)")
    p.add_argument("--child", choices=["tcc", "llama.cpp"], help=argparse.SUPPRESS)  # measure_in_child's process
    a = p.parse_args(argv)
    a.shapes = _pick(p, "--shapes", a.shapes, SHAPES)
    a.formats = _pick(p, "--formats", a.formats, FORMATS)
    for name in ("prompt", "new", "repeats", "threads", "loads"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be >= 1")
    if a.context < a.prompt + a.new:
        p.error(f"--context {a.context} is less than --prompt + --new ({a.prompt + a.new})")
    return a


def _pick(p, flag: str, value: str, known: dict) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [n for n in names if n not in known]
    if bad or not names:
        p.error(f"{flag}: unknown {', '.join(bad) or '(empty)'}; choose from {', '.join(known)}")
    return names


# ---- llama.cpp side -------------------------------------------------------------------------------

def llama_cpp_or_none():
    try:
        import llama_cpp
        return llama_cpp
    except ImportError as e:
        print(f"llama.cpp skipped: llama-cpp-python is not installed ({e}); `pip install llama-cpp-python` "
              "builds it from source (not a tcc dependency)", file=sys.stderr)
        return None


def converter_dir(src: str | None, out: Path) -> Path | None:
    """The folder holding convert_hf_to_gguf.py (extracted from the source archive into out/ once)."""
    if src is None:
        found = sorted(Path("/tmp/wheels").glob("llama_cpp_python-*.tar.gz"))
        src = str(found[-1]) if found else None
    if src is None:
        print("llama.cpp skipped: no llama.cpp converter; give --llama-cpp-src (the archive of "
              "`pip download --no-deps --no-binary :all: llama-cpp-python`)", file=sys.stderr)
        return None
    path = Path(src)
    if path.is_dir():
        hits = [path] if (path / "convert_hf_to_gguf.py").exists() else sorted(path.glob("**/convert_hf_to_gguf.py"))
        if not hits:
            print(f"llama.cpp skipped: no convert_hf_to_gguf.py under {path}", file=sys.stderr)
            return None
        return hits[0] if hits[0].is_dir() else hits[0].parent
    dest = out / "llama.cpp-src" / re.sub(r"\.tar\.gz$", "", path.name)
    vendor = dest / "vendor" / "llama.cpp"
    if not (vendor / "convert_hf_to_gguf.py").exists():
        top = dest.name + "/vendor/llama.cpp/"
        keep = (top + "convert_hf_to_gguf.py", top + "conversion/", top + "gguf-py/")
        with tarfile.open(path) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(keep)]
            if not members:
                print(f"llama.cpp skipped: {path} holds no {top}convert_hf_to_gguf.py", file=sys.stderr)
                return None
            tar.extractall(dest.parent, members=members, filter="data")
    return vendor


# The converter runs in a subprocess: its vendored gguf-py first on sys.path (as the script does), and
# the pre-tokenizer hash computed on the folder's own tokenizer.json (see the module docstring).
_CONVERT = r"""
import sys, runpy
from pathlib import Path
here, model = Path(sys.argv[1]), Path(sys.argv[2])
sys.path[:0] = [str(here), str(here / "gguf-py")]
import tokenizers
from conversion import base
original = base.TextModel.get_vocab_base_pre
class FileTokenizer:
    def __init__(self, path):
        self.t = tokenizers.Tokenizer.from_file(str(path))
    def encode(self, text):
        return self.t.encode(text).ids
def get_vocab_base_pre(self, tokenizer):
    return original(self, FileTokenizer(Path(self.dir_model) / "tokenizer.json"))
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv = [str(here / "convert_hf_to_gguf.py"), str(model)] + sys.argv[3:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def convert_f32(conv: Path, model: Path, dest: Path) -> None:
    """F32 GGUF of `model` by llama.cpp's converter (written to a temporary name, then renamed)."""
    tmp = dest.with_name(dest.name + ".part")
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", _CONVERT, str(conv), str(model), "--outtype", "f32",
                        "--outfile", str(tmp)], capture_output=True, text=True)
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"convert_hf_to_gguf.py failed on {model}:\n{r.stderr[-3000:]}")
    pre = re.findall(r"tokenizer\.ggml\.pre[^\n]*", r.stderr)
    tmp.rename(dest)
    print(f"converted {model} -> {dest} ({dest.stat().st_size / 1e9:.2f} GB, {time.perf_counter() - t:.0f} s)"
          + (f"; {pre[-1]}" if pre else ""), flush=True)


def quantize_gguf(llama_cpp, src: Path, dest: Path, ftype: str, threads: int) -> None:
    """`dest` = llama_model_quantize(src, ftype) (temporary name, then renamed)."""
    tmp = dest.with_name(dest.name + ".part")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype)
    params.nthread = threads
    t = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama_model_quantize({src}, {ftype}) returned {rc}")
    tmp.rename(dest)
    print(f"quantized {dest.name} ({dest.stat().st_size / 1e9:.2f} GB, {time.perf_counter() - t:.0f} s)", flush=True)


def gguf_tensor_bytes(path: Path) -> int:
    """Bytes of the GGUF tensors a decode step reads: all but token_embd when an output.weight is
    there too (then one row of token_embd is gathered; without one, token_embd is the LM head)."""
    try:
        from gguf import GGUFReader
    except ImportError:
        return path.stat().st_size
    sizes = {t.name: int(t.n_bytes) for t in GGUFReader(str(path)).tensors}
    gathered = "token_embd.weight" if "output.weight" in sizes else None
    return sum(v for k, v in sizes.items() if k != gathered)


# ---- tcc side -------------------------------------------------------------------------------------

def compile_tcc(model: Path, dest: Path, pipeline: str, a) -> dict:
    cmd = ["tcc", "compile", str(model), "--target", "native", "-o", str(dest), "--seq-len", str(a.prompt),
           "--max-context", str(a.context), "--no-cache", "--no-latency", "--no-eval"] + (["-p", pipeline] if pipeline else [])
    print("$ " + " ".join(cmd if not pipeline else cmd[:-1] + [f"'{pipeline}'"]), flush=True)
    t = time.perf_counter()
    r = subprocess.run(cmd, env={**os.environ, "TVM_NUM_THREADS": str(a.threads)})
    if r.returncode != 0:
        raise RuntimeError(f"tcc compile failed (exit {r.returncode}): {' '.join(cmd)}")
    manifest = json.loads((dest / "manifest.json").read_text())
    return {"compile_s": round(time.perf_counter() - t, 1),
            "compile_peak_rss_gb": manifest.get("run", {}).get("memory", {}).get("peak_rss_gb")}


def prompt_ids(model: Path, n: int) -> list[int]:
    """The first n ids of test.txt by the folder's tokenizer.json (SmolLM2's: llama.cpp's tokenizer too)."""
    import tokenizers
    tok = tokenizers.Tokenizer.from_file(str(model / "tokenizer.json"))
    ids = tok.encode(TEST.read_text()[:40 * n]).ids
    if len(ids) < n:
        raise RuntimeError(f"{TEST} gives only {len(ids)} tokens")
    return ids[:n]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def measure_one(a, engine: str, shape: str, fmt: str) -> dict:
    """One load of one engine's row, in this process: prefill + decode timings, best of --repeats."""
    model = Path(a.scale_dir) / f"{shape}-float32"
    ids = prompt_ids(model, a.prompt)
    label, pipeline, gtype, _ = FORMATS[fmt]
    if engine == "tcc":
        import tcc
        folder = Path(a.out) / "tcc" / f"{shape}-{fmt}"
        with tcc.load(folder) as art:
            r = generation.time_tcc(art, ids, a.new, a.repeats)
            return {"name": f"tcc {label}", "pipeline": pipeline,
                    "prefill_tokens_per_s": r["prefill_tokens_per_s"], "decode_tokens_per_s": r["decode_tokens_per_s"],
                    "decode_bytes": generation.decode_bytes(art),
                    "artifact_bytes": sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()),
                    "weight_bytes": art.manifest["sizes"]["weight_bytes"], "token_ids": r["token_ids"],
                    "commit": _commit()}
    gguf = Path(a.out) / "gguf" / f"{shape}-{gtype}.gguf"
    r = llamacpp.tokens_per_s(gguf, ids, a.new, threads=a.threads, repeats=a.repeats)
    return {"name": f"llama.cpp {gtype}", "prefill_tokens_per_s": r["prefill_tokens_per_s"],
            "decode_tokens_per_s": r["decode_tokens_per_s"], "decode_bytes": gguf_tensor_bytes(gguf),
            "artifact_bytes": gguf.stat().st_size, "llama_cpp_version": r["llama_cpp_version"], "token_ids": r["token_ids"]}


def measure_in_child(a, engine: str, shape: str, fmt: str) -> dict:
    """measure_one in a fresh Python process (its JSON on the last line of stdout). Each load is its own
    process because a process's memory decides its speed here: on the 2-core Zen 5 EPYC of session 15 a
    process streamed either ~50 or ~75 GB/s for all its life (generation.bandwidth), and the same 1B W8A8
    artifact decoded at 38 and at 56 tok/s in two runs; the best of --loads loads is the engine's figure."""
    cmd = [sys.executable, __file__, "--child", engine, "--out", a.out, "--scale-dir", a.scale_dir,
           "--shapes", shape, "--formats", fmt, "--prompt", str(a.prompt), "--new", str(a.new),
           "--repeats", str(a.repeats), "--threads", str(a.threads), "--context", str(a.context)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"measuring {engine} {shape} {fmt} failed:\n{proc.stderr[-3000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  {engine} {shape} {fmt}: prefill {r['prefill_tokens_per_s']:.1f} tok/s, "
          f"decode {r['decode_tokens_per_s']:.1f} tok/s", flush=True)
    return r


# ---- the run --------------------------------------------------------------------------------------

def main(argv=None) -> int:
    a = parse_args(argv)
    out = Path(a.out)
    os.environ["TVM_NUM_THREADS"] = str(a.threads)
    if a.child:
        print(json.dumps(measure_one(a, a.child, a.shapes[0], a.formats[0])))
        return 0
    models = {s: Path(a.scale_dir) / f"{s}-float32" for s in a.shapes}
    missing = [str(m) for m in models.values() if not (m / "config.json").exists()]
    if missing:
        print(f"no model at {', '.join(missing)}: make them with "
              f"`python ../shared/tools/scale_models.py {' '.join(a.shapes)} --out {a.scale_dir}`", file=sys.stderr)
        return 2
    res = Results(out / "results.jsonl")
    if a.remeasure and a.phase in ("all", "measure"):
        res.rows = [r for r in res.rows if r.get("kind") in ("compile",)]
        res.path.write_text("".join(json.dumps(r) + "\n" for r in res.rows))
    llama_cpp = llama_cpp_or_none() if a.phase != "table" else None
    conv = converter_dir(a.llama_cpp_src, out) if llama_cpp is not None and a.phase in ("all", "prepare") else None
    ggufs = {(s, f): out / "gguf" / f"{s}-{FORMATS[f][2]}.gguf" for s in a.shapes for f in a.formats}
    arts = {(s, f): out / "tcc" / f"{s}-{f}" for s in a.shapes for f in a.formats}

    if a.phase in ("all", "prepare"):
        (out / "gguf").mkdir(parents=True, exist_ok=True)
        for s in a.shapes:
            if llama_cpp is not None and conv is not None:
                f32 = out / "gguf" / f"{s}-F32.gguf"
                if not f32.exists() and not all(ggufs[s, f].exists() for f in a.formats):
                    convert_f32(conv, models[s], f32)
                for f in a.formats:
                    if not ggufs[s, f].exists():
                        quantize_gguf(llama_cpp, f32, ggufs[s, f], FORMATS[f][3], a.threads)
            for f in a.formats:
                if not (arts[s, f] / "manifest.json").exists():
                    info = compile_tcc(models[s], arts[s, f], FORMATS[f][1], a)
                    res.add({"kind": "compile", "shape": s, "format": f, **info})

    if a.phase in ("all", "measure"):
        if os.environ.get("OPENBLAS_CORETYPE"):
            print(f"note: OPENBLAS_CORETYPE={os.environ['OPENBLAS_CORETYPE']} picks OpenBLAS's kernels for tcc's fp32 "
                  "sgemm; unset it (and OPENBLAS_L2_SIZE) in this command to measure what this CPU runs", file=sys.stderr)
        if not res.get(kind="bandwidth"):
            res.add({"kind": "bandwidth", "bytes_per_s": generation.bandwidth(),
                     "method": generation.METHOD,
                     "openblas_core": generation.blas_core()})
        for s in a.shapes:
            for f in a.formats:
                engines = [e for e in ("tcc", "llama.cpp") if not res.get(kind=e, shape=s, format=f)
                           and (arts[s, f] / "manifest.json" if e == "tcc" else ggufs[s, f]).exists()
                           and (e == "tcc" or llama_cpp is not None)]
                runs: dict[str, list[dict]] = {e: [] for e in engines}
                for _ in range(a.loads):  # tcc and llama.cpp alternate, each load in a fresh process
                    for e in engines:
                        runs[e].append(measure_in_child(a, e, s, f))
                for e, rs in runs.items():  # the best decode's row, with the best prefill of any load
                    best = max(rs, key=lambda r: r["decode_tokens_per_s"])
                    res.add({"kind": e, "shape": s, "format": f, "loads": a.loads, **best,
                             "prefill_tokens_per_s": max(r["prefill_tokens_per_s"] for r in rs)})

    print(table(res, a))
    summary = {"args": {k: v for k, v in vars(a).items() if k != "remeasure"}, "cpu": _cpu(),
               "rows": [{k: v for k, v in r.items() if k != "token_ids"} for r in res.rows]}
    (out / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {out / 'results.json'}")
    return 0


def table(res: Results, a) -> str:
    bw = res.get(kind="bandwidth")
    loads = {r.get("loads", 1) for r in res.rows if r.get("kind") in ("tcc", "llama.cpp")}
    head = (f"prompt {a.prompt} tokens, {a.new} greedy tokens, batch 1, {a.threads} threads, best of {a.repeats} runs"
            f" in each of {'/'.join(map(str, sorted(loads))) or 0} loads (fresh processes); "
            + (f"read bandwidth {bw['bytes_per_s'] / 1e9:.1f} GB/s" if bw else "no bandwidth measured")
            + (f"; OpenBLAS kernels {bw['openblas_core']} (tcc's fp32 sgemm)" if bw and "openblas_core" in bw else ""))
    lines = [head, "",
             "| shape | tcc / llama.cpp format | prefill tok/s | decode tok/s | prefill ratio | decode ratio "
             "| decode vs read-bandwidth limit | MB a step reads | artifact / GGUF MB | same tokens |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s in a.shapes:
        for f in a.formats:
            t, g = res.get(kind="tcc", shape=s, format=f), res.get(kind="llama.cpp", shape=s, format=f)
            if not t and not g:
                continue
            both = lambda key, fmt: " / ".join(fmt(r[key]) if r else "-" for r in (t, g))
            ratio = lambda key: f"{t[key] / g[key]:.2f}x" if t and g else "-"
            share = lambda r: f"{r['decode_tokens_per_s'] * r['decode_bytes'] / bw['bytes_per_s']:.0%}" if r and bw else "-"
            same = f"{common_prefix(t['token_ids'], g['token_ids'])} / {a.new}" if t and g else "-"
            lines.append(f"| {s} | {FORMATS[f][0]} / {FORMATS[f][2]} | {both('prefill_tokens_per_s', lambda v: f'{v:.0f}')} "
                         f"| {both('decode_tokens_per_s', lambda v: f'{v:.1f}')} | {ratio('prefill_tokens_per_s')} "
                         f"| {ratio('decode_tokens_per_s')} | {share(t)} / {share(g)} "
                         f"| {both('decode_bytes', lambda v: f'{v / 1e6:.0f}')} "
                         f"| {both('artifact_bytes', lambda v: f'{v / 1e6:.0f}')} | {same} |")
    versions = {r["llama_cpp_version"] for r in res.rows if r.get("llama_cpp_version")}
    commits = {r["commit"] for r in res.rows if r.get("commit")}
    lines += ["", f"llama-cpp-python {', '.join(sorted(versions)) or '-'}; tcc commit {', '.join(sorted(commits)) or '-'}"]
    return "\n".join(lines)


def _commit() -> str:
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except OSError:
        return "?"


def _cpu() -> str:
    try:
        return next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        return "?"


if __name__ == "__main__":
    sys.exit(main())
