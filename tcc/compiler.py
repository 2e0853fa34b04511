"""`tcc.compile`: model -> Program -> passes -> backend -> artifact directory.

Everything a user can get wrong (target, pipeline text, paths) is checked before the slow work
starts, and the artifact is staged in a temporary directory, so an error leaves nothing behind.
"""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np

from . import __version__
from .artifact import Staging, save_weights, weight_bytes, write_manifest
from .errors import UserError
from .program import Program
from .progress import info, status

DEFAULT_CLEANUP = "dce"


BACKENDS = ("tvm", "onnxruntime")


def compile(model, target: str = "x86", *, out: str | Path, pipeline: str = "", seq_len: int = 128,
            batch: int = 1, task: str | None = None, verify: bool = True, calibration=None,
            backend: str = "tvm", calibration_text: str | None = None, calibration_samples: int = 8):
    """Compile `model` (path, alias, nn.Module with example inputs via `trace` first, or a Program)
    for `target` into the artifact directory `out`. Returns the loaded artifact (tcc.runtime.Loaded).

    backend "tvm" (default) builds a native library for the target; "onnxruntime" writes the
    program as ONNX for ONNX Runtime on this host (the reference and peer baseline)."""
    from tcc.backends.tvm.targets import get_target
    from .pipeline import Pipeline, PassContext

    if backend not in BACKENDS:
        raise UserError(f"unknown backend '{backend}'", f"choose one of: {', '.join(BACKENDS)}")
    tgt = get_target(target)
    if backend == "onnxruntime" and not tgt.is_host:
        raise UserError(f"--backend onnxruntime runs on this host only, not on target '{tgt.name}'", "use --target x86")
    if backend == "tvm":
        from tcc.backends.tvm.build import check_toolchain
        check_toolchain(tgt)
    user = Pipeline.parse(pipeline) if pipeline else Pipeline([])
    pipe = Pipeline(list(Pipeline.parse(DEFAULT_CLEANUP)) + list(user))
    with Staging(Path(out)) as stage:  # checks the output path now, before the slow work
        t_start = time.perf_counter()
        if isinstance(model, Program):
            program = model.clone()
        else:
            from .frontend import trace
            program = trace(model, task=task, seq_len=seq_len, batch=batch)
        t_trace = time.perf_counter() - t_start
        source_param_bytes = program.param_bytes()
        reference = program.clone() if verify else None

        if calibration is None:
            calibration = [program.example_inputs()]
            if program.tokenizer_dir and any(p.kind != "cleanup" for p in user):
                from .calibration import text_feeds
                calibration = text_feeds(program, calibration_text, n_samples=calibration_samples)
        ctx = PassContext(calibration=calibration, verbose=True)
        program = pipe.run(program, ctx)
        t0 = time.perf_counter()
        sparsity: list[dict] = []  # how each sparse weight was lowered
        if backend == "tvm":
            from tcc.backends.tvm.build import build_library
            params = build_library(program, tgt, stage.dir / "model.so", sparsity)
            save_weights(stage.dir / "weights.safetensors", params)
        else:
            from tcc.backends.onnxruntime import export_onnx
            with status("exporting to ONNX"):
                export_onnx(program, stage.dir / "model.onnx")
            params = [(n, t.detach().numpy()) for n, t in program.named_tensors().items()]
        t_build = time.perf_counter() - t0
        manifest = {
            "tcc_version": __version__,
            "source": program.source,
            "task": program.task,
            "pipeline": pipe.canonical(),
            "passes": [_stable_record(r) for r in ctx.records],
            "target": tgt.to_json(),
            "backend": backend,
            "inputs": [s.to_json() for s in program.inputs],
            "outputs": [s.to_json() for s in program.outputs],
            "params": [n for n, _ in params] if backend == "tvm" else [],
            "tokenizer": program.tokenizer_dir,
            "sizes": {"weight_bytes": weight_bytes(params), "program_param_bytes": program.param_bytes(),
                      "source_param_bytes": source_param_bytes},
        }
        if sparsity or _annotated_sparse(program):
            manifest["sparsity"] = sparsity or [{"tensor": t, "storage": "dense", "kernel": f"dense ({backend} backend "
                                                 "stores and runs sparse weights dense)"} for t in _annotated_sparse(program)]
        (stage.dir / "report.md").write_text(_report(manifest, ctx.records))
        run = {"host": platform.node(), "seconds": {"trace": round(t_trace, 2), "build": round(t_build, 2),
               "passes": [[r["pass"], r["seconds"]] for r in ctx.records]}}
        if verify:
            run["verify"], run["drift_vs_source"] = _verify(stage.dir, manifest, run, program, reference)
        write_manifest(stage.dir, manifest, run)
        path = stage.commit()
    info(f"[green]wrote[/green] {path}  ({weight_bytes(params) / 1e6:.1f} MB weights, target {tgt.name})")
    from .runtime import load
    return load(path)


def _annotated_sparse(program: Program) -> list[str]:
    return sorted(t for t, a in program.annotations.items() if "sparsity" in a)


def _verify(dir: Path, manifest: dict, run: dict, program: Program, source: Program):
    """Run the staged artifact on example inputs. Returns (its error vs the compiled Program in
    PyTorch: the backend's fidelity, and vs the source model: what the passes changed)."""
    from .runtime import Loaded
    write_manifest(dir, manifest, run)  # the loader reads the manifest
    feeds = source.example_inputs(seed=1)
    with status(f"checking the compiled output against PyTorch ({manifest['target']['name']})"):
        with Loaded(dir, verify=False) as art:
            got = art(feeds)
    return _errors(got, program(feeds)), _errors(got, source(feeds))


def _errors(got: dict, want: dict) -> dict:
    out = {}
    for name, ref in want.items():
        err = float(np.max(np.abs(got[name].astype(np.float64) - ref)))
        out[name] = {"max_abs_err": err, "max_rel_err": err / max(float(np.max(np.abs(ref))), 1e-30)}
    return out


def _stable_record(r: dict) -> dict:
    """A pass record without its timing (timings live in manifest['run'])."""
    return {k: v for k, v in r.items() if k not in ("seconds",)}


def _report(manifest: dict, records: list[dict]) -> str:
    src = manifest["source"]
    sizes = manifest["sizes"]
    lines = [f"# tcc artifact: {src.get('path', src.get('class', '?'))}", "",
             f"- target: `{manifest['target']['name']}` (TVM target `{json.dumps(manifest['target']['tvm'], sort_keys=True)}`)",
             f"- task: {manifest['task']}; inputs: " + ", ".join(f"{s['name']}{s['shape']} {s['dtype']}" for s in manifest["inputs"]),
             f"- pipeline: `{manifest['pipeline']}`",
             f"- weights in the artifact: {sizes['weight_bytes'] / 1e6:.2f} MB"
             + (f" (source model: {sizes['source_param_bytes'] / 1e6:.2f} MB)" if sizes.get("source_param_bytes") else ""),
             "", "| pass | params MB before → after | GFLOP before → after | max rel drift |", "| --- | --- | --- | --- |"]
    for r in records:
        pb, fl = r["param_bytes"], r["flops"]
        drift = (r.get("drift") or {}).get("rel")
        lines.append(f"| `{r['text']}` | {pb['before'] / 1e6:.2f} → {pb['after'] / 1e6:.2f} | "
                     f"{fl['before'] / 1e9:.2f} → {fl['after'] / 1e9:.2f} | {'-' if drift is None else f'{drift:.2e}'} |")
    if manifest.get("sparsity"):
        lines += ["", "## Sparse weights on this target", "",
                  "| tensor | pattern | sparsity | storage | bytes before → after | kernel |", "| --- | --- | --- | --- | --- | --- |"]
        for r in manifest["sparsity"]:
            sp = r.get("sparsity")
            pat = (r.get("pattern") or "-") + (f" {r['block'][0]}x{r['block'][1]}" if r.get("block") else "")
            size = f"{r['bytes_before']} → {r['bytes_after']}" if "bytes_before" in r else "-"
            lines.append(f"| `{r['tensor']}` | {pat} | {'-' if sp is None else f'{sp:.2f}'} | {r['storage']} | {size} | {r['kernel']} |")
    return "\n".join(lines) + "\n"
