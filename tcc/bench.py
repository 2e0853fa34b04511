"""`bench(artifact_dir)`: batch latency of a compiled artifact against its peers, in one process, on
the same inputs.

Engines (each one that can be made; one that cannot is listed under "skipped" with the reason):
  tcc               the artifact, through `tcc.runtime.load` (TVM Relax VM; an arm64 artifact runs
                    under qemu, which says nothing about arm64 speed: noted, and timed only 3 times
                    after 1 warm-up call, since each emulated call takes seconds)
  pytorch           PyTorch eager on the *source* model re-traced with `tcc.frontends.frontend.trace` at the
                    artifact's input shapes: the uncompressed Program's aten GraphModule
  pytorch-hf        PyTorch eager on the original Hugging Face module (the same task wrapper trace uses)
  onnxruntime       ONNX Runtime fp32 on that same uncompressed Program (exported by
                    tcc.backends.onnxruntime), all graph optimisations; for an ONNX source, ORT on
                    the original file itself
  onnxruntime-int8  ORT dynamic int8 quantization of that file: ORT's own int8, the peer of a
                    quantized artifact (option `ort_int8`)
The re-trace needs the manifest's source to be a model path (an alias, HF folder, GGUF or ONNX
file); for an artifact compiled from an nn.Module only `tcc` is timed.

Timing: `warmup` untimed calls per engine, then `repeats` timed calls per engine, split into up to
4 blocks; each block runs every engine's calls back to back (as a deployment would), engines in a
rotating order with a 50 ms pause between them, so that load from other processes falls on all
engines alike while one engine's spinning worker threads (ORT, TVM, OpenMP all spin after a call)
do not steal the next engine's cores. Per engine: median, p10, p90, mean and min in milliseconds;
speedups are baseline median / engine median (> 1 = faster than onnxruntime fp32 / pytorch).
Threads: every engine uses its default pool (one thread per core).

Memory: in-process, so only approximate. `rss_delta_mb` is the growth of this process's resident
set from just before the engine was made to after its warm-up (weights, workspaces); weights that
two engines share (the traced graph holds the HF module's tensors) count for the first made.
`process_peak_rss_mb` is the whole process's peak (ru_maxrss). `max_abs_diff_vs_pytorch` compares
each engine's first output with the traced Program's on the timed input.

Sizes: every artifact file, the artifact's weight bytes (from the safetensors header), the source
Program's parameter bytes and the ONNX files' sizes.

`format_table(result) -> str` renders a result as markdown.
"""
from __future__ import annotations

import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from .artifact import read_manifest
from .errors import UserError
from .frontends.models import safetensors_header
from .progress import info, status

BASELINES = ("onnxruntime", "pytorch")
BLOCKS = 4  # timed calls are split into this many blocks per engine, in rotating engine order
PAUSE_S = 0.05
EMULATED_CALLS = 3  # an artifact run under qemu takes seconds per call


def bench(artifact_dir, repeats: int = 20, warmup: int = 3, *, ort_int8: bool = True, hf: bool = True) -> dict:
    if repeats < 1 or warmup < 0:
        raise UserError(f"repeats must be >= 1 and warmup >= 0 (got {repeats}, {warmup})")
    artifact_dir = Path(artifact_dir)
    manifest = read_manifest(artifact_dir)
    with tempfile.TemporaryDirectory(prefix="tcc-bench-") as tmp:
        return _bench(artifact_dir, manifest, repeats, warmup, ort_int8, hf, Path(tmp))


def _bench(artifact_dir: Path, manifest: dict, repeats: int, warmup: int, ort_int8: bool, hf: bool, tmp: Path) -> dict:
    specs = manifest["inputs"]
    source = manifest.get("source") or {}
    tokens = [s for s in specs if np.issubdtype(np.dtype(s["dtype"]), np.integer) and len(s["shape"]) >= 2]
    batch = int(specs[0]["shape"][0])
    seq_len = int(tokens[0]["shape"][1]) if tokens else 128  # only used to re-trace token models
    task = manifest.get("task")
    engines, skipped, memory, notes = {}, {}, {}, []
    sizes = {"artifact_files": {f.name: f.stat().st_size for f in sorted(artifact_dir.iterdir()) if f.is_file()}}
    sizes["artifact_bytes"] = sum(sizes["artifact_files"].values())
    sizes["weight_bytes"] = _safetensors_bytes(artifact_dir / "weights.safetensors")
    onnx_source = source.get("kind") == "onnx"
    retrace = source.get("kind") in ("huggingface", "onnx") and bool(source.get("path"))
    if onnx_source:
        hf = False
        skipped["pytorch-hf"] = "the source is an ONNX file: its PyTorch engine is the imported Program (pytorch)"
    program = None
    feeds = None if retrace else _example_feeds(specs)

    def add(name, make, required=False, warm=warmup):
        """Make engine `name`, warm it up on `feeds` and note its memory; skip it if it fails."""
        rss0 = _rss()
        try:
            with status(f"preparing {name}"):
                run = make()
                for _ in range(warm):
                    run(feeds)
        except Exception as e:
            if required:
                raise
            skipped[name] = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            return None
        engines[name], memory[name] = run, (_rss() - rss0) / 2**20
        return run

    def make_pytorch():
        nonlocal program, feeds
        from .frontends.frontend import trace
        program = trace(source["path"], task=task, seq_len=seq_len, batch=batch)
        feeds = program.example_inputs()
        sizes["source_param_bytes"] = program.param_bytes()
        return program

    peers = ("pytorch-hf",) * hf + ("onnxruntime",) + ("onnxruntime-int8",) * ort_int8
    if retrace:
        add("pytorch", make_pytorch)
        if program is None:
            feeds = _example_feeds(specs)
            skipped.update({name: "needs the re-traced source Program (see pytorch)" for name in peers})
    else:
        why = f"the artifact's source is {source.get('kind', 'unknown')!r}, not a model path to re-trace"
        skipped.update({name: why for name in ("pytorch",) + peers})

    from .runtime import load
    arch = manifest.get("target", {}).get("arch")
    calls = {}  # engine -> fewer timed calls than `repeats`
    if arch != platform.machine():
        calls["tcc"] = min(repeats, EMULATED_CALLS)
        notes.append(f"tcc runs the {arch} artifact under qemu on this {platform.machine()} host: its latency is "
                     f"emulation, not the target's speed ({calls['tcc']} timed calls); its memory is in the qemu "
                     "process, not in RSS Δ")
    art = add("tcc", lambda: load(artifact_dir), required=True, warm=min(warmup, 1) if calls else warmup)

    if program is not None:
        from .pipeline.backend import get_backend
        from .frontends.models import resolve
        ort = get_backend("onnxruntime")  # the peer: ONNX Runtime on the same Program (tcc.pipeline.backend's registry)
        # an ONNX source: the peer runs the user's own file, else an export of the source Program
        fp32, int8 = resolve(source["path"]) if onnx_source else tmp / "model.onnx", tmp / "model.int8.onnx"

        def make_ort():
            if not onnx_source:
                ort.export(program, fp32)
            sizes["onnx_fp32_bytes"] = _file_bytes(fp32)
            return ort.file_session(fp32)

        def make_int8():
            ort.quantize_dynamic_int8(fp32, int8)
            sizes["onnx_int8_bytes"] = _file_bytes(int8)
            return ort.file_session(int8)

        if hf:
            add("pytorch-hf", lambda: _hf_runner(source["path"], task))
        if add("onnxruntime", make_ort) is not None and ort_int8:
            add("onnxruntime-int8", make_int8)

    names = list(engines)
    times = {name: [] for name in names}
    blocks = np.array_split(np.arange(repeats), min(BLOCKS, repeats))
    info(f"timing {', '.join(names)}: {repeats} calls each in {len(blocks)} blocks, batch {batch}, seq_len {seq_len}")
    for b, block in enumerate(blocks):
        for name in names[b % len(names):] + names[:b % len(names)]:
            time.sleep(PAUSE_S)  # let the previous engine's spinning worker threads go idle
            for _ in block:
                if len(times[name]) >= calls.get(name, repeats):
                    break
                t0 = time.perf_counter()
                engines[name](feeds)
                times[name].append(time.perf_counter() - t0)

    want = next(iter(program(feeds).values())).astype(np.float64) if program is not None else None
    result = {}
    for name in names:
        ms = np.asarray(times[name]) * 1e3
        e = {"median_ms": float(np.median(ms)), "p10_ms": float(np.percentile(ms, 10)),
             "p90_ms": float(np.percentile(ms, 90)), "mean_ms": float(ms.mean()), "min_ms": float(ms.min()),
             "rss_delta_mb": round(memory[name], 1)}
        if want is not None:
            got = np.asarray(next(iter(engines[name](feeds).values())), np.float64)
            e["max_abs_diff_vs_pytorch"] = float(np.max(np.abs(got - want)))
        result[name] = e
    for base in BASELINES:
        if base in result:
            for e in result.values():
                e[f"speedup_vs_{base}"] = result[base]["median_ms"] / e["median_ms"]
    art.close()
    return {
        "artifact": str(artifact_dir), "model": source.get("path") or source.get("class"), "task": task,
        "target": manifest.get("target", {}).get("name"), "pipeline": manifest.get("pipeline"),
        "batch": batch, "seq_len": seq_len, "inputs": specs, "repeats": repeats, "warmup": warmup,
        "host": {"machine": platform.machine(), "cpu": _cpu_name(), "cores": os.cpu_count()},
        "engines": result, "skipped": skipped, "notes": notes,
        "process_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "sizes": sizes,
    }


def format_table(result: dict) -> str:
    """A bench result as markdown: latency table, sizes, skipped engines and notes."""
    r = result
    lines = [f"## {r['model']} ({r['task']}) on {r['target']}, batch {r['batch']}, seq_len {r['seq_len']}", "",
             f"pipeline `{r.get('pipeline') or '-'}`; {r['repeats']} timed calls per engine after {r['warmup']} warm-up calls; "
             f"host {r['host']['cpu']} ({r['host']['cores']} cores)", "",
             "| engine | median ms | p10–p90 ms | speedup vs ORT fp32 | speedup vs PyTorch | RSS Δ MB | max abs diff vs PyTorch |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, e in r["engines"].items():
        lines.append(f"| {name} | {e['median_ms']:.2f} | {e['p10_ms']:.2f}–{e['p90_ms']:.2f} | "
                     f"{_x(e.get('speedup_vs_onnxruntime'))} | {_x(e.get('speedup_vs_pytorch'))} | "
                     f"{e['rss_delta_mb']:.0f} | {_g(e.get('max_abs_diff_vs_pytorch'))} |")
    s = r["sizes"]
    lines += ["", f"process peak RSS {r['process_peak_rss_mb']:.0f} MB (RSS Δ is per engine, approximate: in-process)", "",
              "| size | MB |", "| --- | ---: |"]
    for key in ("weight_bytes", "artifact_bytes", "source_param_bytes", "onnx_fp32_bytes", "onnx_int8_bytes"):
        if s.get(key) is not None:
            lines.append(f"| {key.replace('_bytes', '').replace('_', ' ')} | {s[key] / 1e6:.2f} |")
    bullets = [f"- skipped {name}: {why}" for name, why in r["skipped"].items()] + [f"- note: {n}" for n in r["notes"]]
    lines += [""] + bullets if bullets else []
    return "\n".join(lines) + "\n"


# -- helpers ----------------------------------------------------------------------------------------

def _hf_runner(path: str, task: str | None):
    """The original HF module in the task wrapper tcc.frontends.frontend traces, called on numpy feeds."""
    import torch
    from .frontends import frontend, models
    hf, task, _ = models.load_hf(models.resolve(path), task)
    wrapper, names, _ = frontend.task_module(hf, task)

    def run(feeds):
        with torch.no_grad():
            out = wrapper(*(torch.from_numpy(feeds[n]) for n in names))
        return {"output": (out[0] if isinstance(out, tuple) else out).numpy()}
    return run


def _example_feeds(specs: list[dict]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for s in specs:
        shape, dtype = tuple(s["shape"]), np.dtype(s["dtype"])
        if s["name"] == "attention_mask":
            feeds[s["name"]] = np.ones(shape, dtype)
        elif np.issubdtype(dtype, np.integer):
            feeds[s["name"]] = rng.integers(0, 1000, size=shape).astype(dtype)
        else:
            feeds[s["name"]] = rng.standard_normal(shape).astype(dtype)
    return feeds


def _safetensors_bytes(path: Path) -> int | None:
    """Sum of the tensors' byte sizes, from the safetensors header (no tensor is read)."""
    if not path.exists():
        return None
    header = safetensors_header(path)
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")


def _file_bytes(onnx_path: Path) -> int:
    """An ONNX file with its external data, if any."""
    return sum(p.stat().st_size for p in onnx_path.parent.glob(onnx_path.name + "*"))


def _rss() -> int:
    import psutil
    return psutil.Process().memory_info().rss


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _g(v) -> str:
    return "-" if v is None else f"{v:.2g}"
