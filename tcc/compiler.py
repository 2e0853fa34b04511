"""`tcc.compile`: model -> Program -> passes -> backend -> artifact directory.

Everything a user can get wrong (target, pipeline text, paths) is checked before the slow work
starts, and the artifact is staged in a temporary directory, so an error leaves nothing behind.
Each compile writes report.json, report.html and report.md into the artifact (tcc.report); with
`report=PATH` report.json is copied there, and written there on failure too (exit status, error,
the passes that ran). `max_drift` is an accuracy budget: the compiled program's outputs may differ
from the source model's by at most this much (max relative error, checked in PyTorch before the
build), else AccuracyBudgetError (exit 3) and no artifact. Traced programs and built libraries come
from tcc.cache when it has them (`cache=False` turns it off).
"""
from __future__ import annotations

import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from . import __version__
from . import cache as caches
from . import memory
from . import report as reports
from .artifact import WHAT, Staging, is_artifact, write_manifest
from .errors import AccuracyBudgetError, UserError
from .paths import check_dir
from .ir.program import Program
from .progress import info, library_output, status

DEFAULT_CLEANUP = "dce"




def compile(model, target: str = "x86", *, out: str | Path, pipeline: str = "", seq_len: int = 128,
            batch: int = 1, task: str | None = None, verify: bool = True, calibration=None,
            backend: str = "tvm", calibration_text: str | None = None, calibration_samples: int = 8,
            max_drift: float | None = None, latency: bool | None = None, cache: bool = True, report: str | Path | None = None,
            max_seq_len: int | None = None, generate: bool | None = None, max_context: int | None = None,
            force: bool = False, tokenizer: str | Path | None = None, kv_cache: str = "fp32",
            dtype: str | None = None, evaluate: bool | None = None, draft: str | None = None, baseline: bool = True,
            print_after=frozenset()):
    """Compile `model` (path, alias, nn.Module with example inputs via `trace` first, or a Program)
    for `target` into the artifact directory `out`. Returns the loaded artifact (tcc.runtime.Loaded).

    backend "tvm" (default) builds a native library for the target; "onnxruntime" writes the
    program as ONNX for ONNX Runtime on this host (the reference and peer baseline). `latency`:
    when the target runs on this host, time the artifact against the baseline (_Baseline: the source
    compiled without passes, or PyTorch eager for an artifact that compresses nothing), interleaved
    (report.json run.latency). `evaluate`: the task accuracy against the source on the held-out text
    shipped with tcc (tcc.evaluate.HeldOut; report.json final.task_accuracy). `latency` and `evaluate`
    default to on, or off where the environment says TCC_NO_LATENCY=1 / TCC_NO_EVAL=1 (a build
    pipeline's or a test suite's setting, like TCC_NO_CACHE). `baseline` False times
    the artifact alone (the accuracy-budget search's candidates).
    `max_seq_len`: trace with a dynamic sequence length 1..max_seq_len (tcc.trace; x86 targets).
    `generate`: give a causal LM's artifact `prefill` and `decode` entry points over a KV cache of
    `max_context` positions (tcc.generation; default on for causal LMs on CPU targets with the tvm
    backend, the context min(model maximum, 2048)); False leaves them out. `kv_cache`: how that cache
    stores keys and values, "fp32" or "int8" (one scale per KV head and position; tcc.generation).
    `draft`: a pipeline (e.g. "drop-blocks(ratio=0.5),quantize(weights=int4)") run on the source model
    to build a draft program into the same artifact for speculative decoding (tcc.speculative).
    `print_after`: pass names (or "all") after which the graph is printed (PassContext.print_after).
    `dtype`: the float weights' storage, "fp32" or "bf16" (the `bf16` pass, appended to the pipeline);
    None keeps the checkpoint's: bf16 for a Hugging Face folder saved in bf16 (tvm backend, CPU
    targets), else fp32 (_weights_dtype). `out` and `report` may
    hold only what tcc wrote there before (an artifact, a report) unless `force` (tcc.paths)."""
    if report is not None:
        report = reports.check_path(report, force)
    facts: dict = {"backend": backend, "pipeline": pipeline}
    records: list[dict] = []
    final: dict = {}
    run: dict = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "host": platform.node(),
                 "seconds": {}}
    latency = _on_unless("TCC_NO_LATENCY") if latency is None else latency
    evaluate = _on_unless("TCC_NO_EVAL") if evaluate is None else evaluate
    progress = _Progress(facts, records, final, run, report)
    try:
        with caches.use(cache), memory.watching(progress), _sigterm_interrupts():
            path = _compile(model, target, Path(out), facts, records, final, run, pipeline=pipeline, seq_len=seq_len,
                            batch=batch, task=task, verify=verify, calibration=calibration, backend=backend,
                            calibration_text=calibration_text, calibration_samples=calibration_samples,
                            max_drift=max_drift, latency=latency, max_seq_len=max_seq_len, generate=generate,
                            max_context=max_context, force=force, tokenizer=tokenizer, kv_cache=kv_cache,
                            dtype=dtype, evaluate=evaluate, progress=progress, draft=draft,
                            baseline=baseline, print_after=frozenset(print_after))
    except BaseException as e:
        if report is not None:
            final.update(exit_status=reports.exit_status(e), error=reports.error_json(e),
                         progress=progress.ended(e))
            reports.write_json(report, reports.build(facts, records, final, run))
        raise
    if report is not None:
        reports.write_json(report, reports.read(path))
    info(f"[green]wrote[/green] {path}  ({final['size']['weight_bytes'] / 1e6:.1f} MB weights, target {facts['target']['name']}, "
         f"peak RSS {run['memory']['peak_rss_gb']:.1f} GB)")
    info(f"{reports.summary(reports.read(path))}  (report.html)")
    from .runtime import load
    return load(path, verify=False)  # just written and hashed: no second pass over its bytes


def _compile(model, target: str, out: Path, facts: dict, records: list, final: dict, run: dict, *, pipeline: str,
             seq_len: int, batch: int, task: str | None, verify: bool, calibration, backend: str,
             calibration_text: str | None, calibration_samples: int, max_drift: float | None, latency: bool,
             max_seq_len: int | None = None, generate: bool | None = None, max_context: int | None = None,
             force: bool = False, tokenizer: str | Path | None = None, kv_cache: str = "fp32",
             dtype: str | None = None, evaluate: bool = True, progress: "_Progress | None" = None,
             draft: str | None = None, baseline: bool = True, print_after: frozenset = frozenset()) -> Path:
    """compile()'s work; fills `facts` (what the manifest says), `records`, `final` and `run` (the
    report's sections) as it goes, so a failure can still be reported."""
    check_dir(out, WHAT, is_artifact, force)  # first of all (Staging checks it again)
    if isinstance(model, (str, os.PathLike)):
        from .frontends.models import check_exists
        check_exists(model)  # a mistyped path stops here, before the toolchain's imports (seconds)
    from .pipeline.backend import get_backend, get_target
    from .pipeline import Pipeline, PassContext

    builder = get_backend(backend)  # UserError naming the registered backends
    tgt = get_target(target)
    facts["target"] = tgt.to_json()
    builder.check_toolchain(tgt)
    user_dynamic = max_seq_len is not None or (isinstance(model, Program) and any(s.dynamic_dims for s in model.inputs))
    if user_dynamic and (backend != "tvm" or tgt.arch != "x86_64" or tgt.device == "cuda"):
        raise UserError(f"a dynamic sequence length (--max-seq-len) is supported by the tvm backend on x86 targets only, "
                        f"not {backend} / {tgt.name}", "compile with a static --seq-len for this target")
    if max_drift is not None and not max_drift >= 0:
        raise UserError(f"--max-drift must be a number >= 0, got {max_drift}", "e.g. --max-drift 0.05 (5 % relative)")
    gen_context = _kv_cache_context(kv_cache, model, task, tgt, backend, generate, max_context, seq_len, max_seq_len)
    from .speculative import add_draft, build_draft, draft_pipeline
    draft_pipe = draft_pipeline(draft, gen_context, tgt)  # speculative decoding's draft program (--draft)
    if tokenizer is not None:
        from .evaluate import load_tokenizer
        load_tokenizer(tokenizer)  # a bad --tokenizer stops here, before the slow work
    user = Pipeline.parse(pipeline) if pipeline else Pipeline([])
    facts["dtype"] = _weights_dtype(model, dtype, tgt, backend, user)
    cast = Pipeline.parse("bf16") if facts["dtype"] == "bf16" and not any(p.name == "bf16" for p in user) else []
    cleanup = list(Pipeline.parse(DEFAULT_CLEANUP))
    cleanup = [] if list(user)[:len(cleanup)] == cleanup else cleanup  # `-p dce` is not dce,dce
    pipe = Pipeline(cleanup + list(user) + list(cast))
    facts["pipeline"] = pipe.canonical()
    seen_events = len(caches.events())
    user.check_outputs(force)  # a pass's own output paths (analyze-redundancy out=), before the slow work
    if hasattr(builder, "check_pipeline"):
        builder.check_pipeline(pipe, tgt)  # a format the target has no kernel for, before the passes run
    _stale_staging(Path(out))
    # Staging checks the output path now, before the slow work; the libraries' own output goes to build.log
    with Staging(out, force) as stage, library_output(stage.dir / "build.log"), memory.recording() as steps:
        t_start = time.perf_counter()
        if progress is not None:
            progress.paths.append(stage.dir / "report.json")  # replaced by the report when the compile ends
        with memory.stage("load and trace"):
            if isinstance(model, Program):
                program = model.clone()
            else:
                from .frontends.frontend import trace
                traced_max = max(max_seq_len or 0, gen_context or 0) or None  # generation traces a dynamic length
                program = trace(model, task=task, seq_len=seq_len, batch=batch, max_seq_len=traced_max,
                                weights=_traced_weights(model, facts["dtype"], pipe))
        if tokenizer is not None:
            from .evaluate import attach_tokenizer
            attach_tokenizer(program, tokenizer)
        t_trace = time.perf_counter() - t_start
        facts.update(source=program.source, task=program.task, inputs=[s.to_json() for s in program.inputs],
                     outputs=[s.to_json() for s in program.outputs])
        run["seconds"]["trace"] = round(t_trace, 2)
        source_param_bytes = program.param_bytes()
        # the source model's outputs, before any pass: no copy of its weights is kept for the verification
        reference = (_Reference(program, _check_ids(program, gen_context, None if tgt.is_host else 16)
                                if gen_context and verify and tgt.runs_here and backend == "tvm" else None)
                     if verify or max_drift is not None else None)

        held_out = None
        if evaluate:
            from .evaluate import HeldOut
            with status("task accuracy on the held-out text: the source model"):
                held_out = HeldOut(program)
        if calibration is None:
            with memory.stage("calibration data"):
                calibration = _calibration(program, user, calibration_text, calibration_samples)
        ctx = PassContext(calibration=calibration, verbose=True, records=records, force=force,
                          check_feeds=_check_feeds(program, PassContext.check_feeds), print_after=print_after)
        with memory.stage("passes"):
            drafted = None if draft_pipe is None else build_draft(  # from the source, before its passes
                program, draft_pipe, gen_context, kv_cache, lambda d: _calibration(program, d, calibration_text, calibration_samples))
            program = pipe.run(program, ctx, in_place=True)  # this Program is already compile's own copy
        if max_drift is not None:
            _check_drift(program, reference, max_drift, final)
        final["task_accuracy"] = {"metric": None, "note": "turned off (--no-eval)"} if held_out is None else None
        if held_out is not None and not tgt.is_host:  # the artifact does not run natively here: the Program does
            with status("task accuracy on the held-out text: the compressed program (PyTorch)"):
                final["task_accuracy"] = held_out.compare(program, "pytorch")
        compare_with = baseline
        baseline = _Baseline(model, pipe, facts, tgt, backend, dict(task=task, seq_len=seq_len, batch=batch,
                             max_seq_len=max(max_seq_len or 0, gen_context or 0) or None),
                             at_length=program.inputs[0].shape[1] if gen_context and not user_dynamic else None,
                             feeds=reference.feeds if reference is not None else None, off=not compare_with)
        functions, generation = {}, None
        if gen_context:
            from .generation import add_verify, at_length, kv_cached
            with status(f"adding a KV cache of {gen_context} positions (prefill, decode)"):
                gen = kv_cached(program, gen_context, kv_cache)
            length = program.inputs[0].shape[1]  # the example length
            chunk = min(length, gen_context)
            functions = {"prefill": at_length(gen.program, chunk), "decode": at_length(gen.program, 1)}
            generation = gen.manifest(chunk)
            add_verify(gen, functions, generation)  # speculative decoding's entry (tcc.speculative)
            add_draft(drafted, functions, generation, chunk)
            if not user_dynamic:  # main at the example length, as without generation
                program = at_length(program, length)
        t0 = time.perf_counter()
        with memory.stage("build"):
            library = _build(program, tgt, backend, stage.dir, functions, generation)
        functions = gen = drafted = None  # the KV-cache programs: built; the verification below runs `program`
        t_build = time.perf_counter() - t0
        manifest = {
            "tcc_version": __version__,
            "source": program.source,
            "task": program.task,
            "pipeline": pipe.canonical(),
            "passes": [_stable_record(r) for r in records],
            "target": tgt.to_json(),
            "backend": backend,
            "inputs": [s.to_json() for s in program.inputs],
            "outputs": [s.to_json() for s in program.outputs],
            "params": library["params"],
            "tokenizer": program.tokenizer_dir,
            **({"generation": {**generation, "functions": library["functions"]}} if generation else {}),
            "sizes": {"weight_bytes": library["weight_bytes"], "program_param_bytes": program.param_bytes(),
                      "source_param_bytes": source_param_bytes},
        }
        tokenizer = None
        if generation:
            stored, tokenizer = _store_tokenizer(program, stage.dir)
            manifest["generation"].update(stored)
        sparsity = library["sparsity"]
        if sparsity or _annotated_sparse(program):
            manifest["sparsity"] = sparsity or [{"tensor": t, "storage": "dense", "kernel": f"dense ({backend} backend "
                                                 "stores and runs sparse weights dense)"} for t in _annotated_sparse(program)]
            facts["sparsity"] = manifest["sparsity"]
        final["size"] = reports.size(library["weight_bytes"], source_param_bytes)
        if library.get("device_code"):
            manifest["device_code"] = library["device_code"]
        run_m = {"host": platform.node(), "seconds": {"trace": round(t_trace, 2), "build": round(t_build, 2),
                 "passes": [[r["pass"], r["seconds"]] for r in records]}}
        run["seconds"]["build"] = round(t_build, 2)
        time_it = latency and tgt.is_host
        final["latency"] = {"measured": time_it, "reason": None if time_it else (
            "turned off (--no-latency)" if not latency else
            f"the {tgt.name} target does not run natively on this host (emulated time says nothing about it)")}
        if not tgt.runs_here:
            run_m["verify"] = f"not run: {tgt.why_not_run}"
            final["accuracy_note"] = (f"the artifact was not run: compiled for {tgt.name} ({tgt.device}), "
                                      f"{tgt.why_not_run}; accuracy is the compressed Program's in PyTorch")
            if verify and reference is not None and not final.get("accuracy"):  # what the passes changed
                final["accuracy"] = {"measured_with": "pytorch",
                                     "vs_source": _errors(program(reference.feeds), reference.outputs)}
        elif verify or time_it or (held_out is not None and tgt.is_host):
            feeds = reference.feeds if reference is not None else program.example_inputs(seed=1)
            baseline.feeds = feeds
            with memory.stage("running the compressed program (PyTorch) for the verification"):
                want = program(feeds) if verify else None
            program = None  # its weights leave memory before the artifact's are loaded (one copy at a time)
            errors, drift, _, checked = _run_artifact(
                stage.dir, manifest, run_m, feeds, want, reference if verify else None, False,
                generation if verify and reference is not None and reference.gen_ids else None,
                held_out if tgt.is_host else None, final)
            if verify:
                run_m["verify"], run_m["drift_vs_source"] = errors, drift
                final["accuracy"] = {"measured_with": "artifact", "vs_source": drift, "vs_program": errors}
            if checked:
                final["generation"] = checked
                if "verify_vs_decode" in checked:  # read by tcc.speculative (verify_difference)
                    manifest["generation"]["verify_vs_decode"] = checked["verify_vs_decode"]
        if not final.get("accuracy"):
            final.setdefault("accuracy_note", "not measured: verification was skipped (--no-verify)")
        run["cache"] = {e["kind"]: e["outcome"] for e in caches.events()[seen_events:]}
        program = reference = held_out = None
        if time_it:
            write_manifest(stage.dir, manifest, run_m)  # the loader reads the manifest
            run["latency"] = baseline.time_against(stage.dir)
        run["seconds"]["total"] = round(time.perf_counter() - t_start, 2)
        run["seconds"]["stages"] = memory.top_level(steps, run["seconds"]["total"])
        run["memory"] = run_m["memory"] = {"peak_rss_gb": round(memory.peak_bytes() / memory.GB, 3), "steps": [{"step": k, **v} for k, v in steps.items() if v]}  # in order
        reports.write(stage.dir, reports.build(facts, records, final, run))
        write_manifest(stage.dir, manifest, run_m)
        return stage.commit()


CHECK_FLOP = 4e11  # the pass manager checks each pass on as many feeds as fit this many FLOPs (at least one)


def _check_feeds(program: Program, most: int) -> int:
    """How many calibration feeds the pass manager runs the Program on to check each pass (its
    record's drift.feeds): up to `most`, fewer for big models, whose forward passes together stay
    within about CHECK_FLOP (estimate_flops; a Llama-3.2-1B shape at 128 tokens is 2.8e11 FLOPs a
    feed: one feed; issue 15: the checks cost a few forward passes, not minutes)."""
    from .errors import InternalError
    from .pipeline import estimate_flops
    try:
        per_feed = estimate_flops(program.gm)
    except InternalError:  # a node without shapes
        return most
    return int(max(1, min(most, CHECK_FLOP // max(per_feed, 1))))


def _on_unless(variable: str) -> bool:
    """A measurement that is on unless the environment turns it off (`variable`=1)."""
    import os
    return os.environ.get(variable, "") in ("", "0")


def _calibration(program: Program, user, path, samples: int) -> list[dict]:
    """The pipeline's calibration feeds: token ids (.npy / .npz) or windows of text when a pass other
    than cleanup runs; none for a Hugging Face model without a tokenizer (a pass that needs data says
    how to give it); else the program's example inputs."""
    from .compress.calibration import calibration_data
    if not any(p.kind != "cleanup" for p in user):
        return [program.example_inputs()]
    if path is not None or program.tokenizer_dir:  # text without a tokenizer: an error saying what to give
        return calibration_data(program, path, n_samples=samples)
    return [] if (program.source or {}).get("kind") == "huggingface" else [program.example_inputs()]


def _build(program: Program, tgt, backend: str, dir: Path, functions: dict | None = None,
           generation: dict | None = None) -> dict:
    """The backend's files in `dir`; returns {"params": [names in call order], "weight_bytes",
    "sparsity": [how each sparse weight was lowered], "functions": {name: {"inputs", "params"}} of
    the further entry points}. TVM libraries come from tcc.cache when it has one."""
    from .pipeline.backend import get_backend
    builder = get_backend(backend)
    # (cuda libraries are not cached: the cache keeps model.so and weights, not their device code files)
    # the further entry points' graphs as well (what kv_cached made of the program, even when patched)
    graphs = {name: str(prog.gm.graph) for name, prog in (functions or {}).items()}
    cacheable = caches.enabled() and builder.cacheable(tgt)
    key = caches.library_key(program, tgt, [generation, graphs], builder.identity()) if cacheable else None
    library = caches.load_library(key, dir) if key else None
    if library is not None:
        info(f"library for {tgt.name} from the cache ({caches.cache_dir('libs')})")
        return library
    library = builder.build(program, tgt, dir, functions)
    if key:
        caches.save_library(key, dir, library)
    return library


def _check_drift(program: Program, source: "_Reference", limit: float, final: dict) -> None:
    """The accuracy budget: AccuracyBudgetError when an output moved more than `limit` (max relative
    error vs the source model, PyTorch, on the inputs verification uses)."""
    with status("checking the compressed program against the source model"):
        errors = _errors(program(source.feeds), source.outputs)
    name, worst = max(((n, e["max_rel_err"]) for n, e in errors.items()), key=lambda t: t[1])
    final["max_drift"] = {"limit": limit, "drift": worst, "met": worst <= limit}
    final["accuracy"] = {"measured_with": "pytorch", "vs_source": errors}
    if worst > limit:
        raise AccuracyBudgetError(f"output '{name}' differs from the source model's by {worst:.2e} (max relative error), "
                                  f"more than --max-drift {limit:g}; no artifact written",
                                  "use fewer or milder passes, or raise --max-drift")


def _annotated_sparse(program: Program) -> list[str]:
    return sorted(t for t, a in program.annotations.items() if "sparsity" in a)


class _Reference:
    """What the verification compares the artifact with, computed from the source Program before any
    pass runs, so that no copy of the source weights lives beside the compressed Program or the
    loaded artifact (issue 15): its outputs on the verification feeds (example_inputs(seed=1)) and,
    with `gen_ids`, its logits over the generation check's ids (generation.source_logits)."""

    def __init__(self, program: Program, gen_ids: list[int] | None = None):
        from .generation import source_logits
        with status("running the source model for the verification"):
            self.feeds = program.example_inputs(seed=1)
            self.outputs = program(self.feeds)
            t0 = time.perf_counter()
            self.gen_ids = gen_ids
            self.gen_logits = None if gen_ids is None else source_logits(program, gen_ids)
            self.gen_seconds = round(time.perf_counter() - t0, 2)


def _check_ids(program: Program, context: int, tokens: int | None) -> list[int]:
    """The generation check's ids (generation.check_ids) for a compile with a KV cache of `context`."""
    from .generation import CHECK_TOKENS, check_ids
    return check_ids(_tokenizer(program, quiet=True), program.outputs[0].shape[-1], min(tokens or CHECK_TOKENS, context))


def _run_artifact(dir: Path, manifest: dict, run: dict, feeds: dict, want: dict | None, source: _Reference | None,
                  time_it: bool, generation: dict | None = None, held_out=None, final: dict | None = None):
    """Load the staged artifact once and run it on `feeds`. Returns (its error vs `want`, the compiled
    Program's outputs in PyTorch: the backend's fidelity; its error vs the source model: what the
    passes changed; a short latency measurement; with `generation`, the generation check
    (_check_generation) or None); the errors are None without `want`, the latency without `time_it`."""
    import gc
    from .runtime import Loaded
    write_manifest(dir, manifest, run)  # the loader reads the manifest
    gc.collect()  # a dropped Program's graph module is a reference cycle: free its weights before loading these
    with Loaded(dir, verify=False) as art:
        with status(f"running the compiled artifact ({manifest['target']['name']})"):
            got = art(feeds)
            latency = reports.interleaved({"tcc": art}, feeds) if time_it else None
        checked = _check_generation(art, run, source, generation) if generation else None
        if held_out is not None:
            with status("task accuracy on the held-out text: the artifact"):
                final["task_accuracy"] = held_out.compare(art, "artifact")
    if want is None:
        return None, None, latency, checked
    return _errors(got, want), _errors(got, source.outputs), latency, checked


def _errors(got: dict, want: dict) -> dict:
    out = {}
    for name, ref in want.items():
        err = float(np.max(np.abs(got[name].astype(np.float64) - ref)))
        out[name] = {"max_abs_err": err, "max_rel_err": err / max(float(np.max(np.abs(ref))), 1e-30)}
    return out


def _stable_record(r: dict) -> dict:
    """A pass record without its timing (timings live in manifest['run'])."""
    return {k: v for k, v in r.items() if k not in ("seconds",)}


WEIGHT_DTYPES = ("fp32", "bf16")


def _weights_dtype(model, dtype: str | None, tgt, backend: str, user) -> str:
    """The float weights' storage: `dtype` when given, else the checkpoint's (models.checkpoint_dtype)
    where bf16 can run (the tvm backend's CPU kernels), else fp32 (fp16 checkpoints too: bf16 would
    round their mantissas)."""
    runs_bf16 = backend == "tvm" and tgt.device != "cuda"
    explicit_bf16 = any(p.name == "bf16" for p in user)
    if dtype is None:
        from .frontends.models import checkpoint_dtype
        stored = checkpoint_dtype(model) if isinstance(model, (str, Path)) else None
        return "bf16" if explicit_bf16 or (stored == "bf16" and runs_bf16) else "fp32"
    if dtype not in WEIGHT_DTYPES:
        raise UserError(f"unknown --dtype '{dtype}'", f"choose one of: {', '.join(WEIGHT_DTYPES)}")
    if dtype == "fp32" and explicit_bf16:
        raise UserError("--dtype fp32 contradicts the pipeline's bf16 pass", "leave out one of the two")
    if dtype == "bf16" and not runs_bf16:
        raise UserError(f"bf16 weights run on tcc's CPU kernels (the tvm backend), not on {backend} / {tgt.name}",
                        "use --dtype fp32 for this target")
    return dtype


def _traced_weights(model, dtype: str, pipe) -> str:
    """How the frontend loads the weights (tcc.frontends.frontend.trace's `weights`): "bf16", a checkpoint saved
    in bf16 keeps its own tensors and no stage holds them in float32 (issue 15), where the weights
    end bf16 or quantized (`dtype` bf16) and every pass takes such a Program (Pass.reads_bf16_weights);
    else "fp32" (every weight loaded as float32)."""
    from .frontends.models import checkpoint_dtype
    if dtype != "bf16" or not isinstance(model, (str, Path)) or not all(p.reads_bf16_weights for p in pipe):
        return "fp32"
    return "bf16" if checkpoint_dtype(model) == "bf16" else "fp32"


def _generation_context(model, task, tgt, backend: str, generate: bool | None, max_context: int | None,
                        seq_len: int, max_seq_len: int | None) -> int | None:
    """The KV-cache size when the artifact gets generation entry points, else None. Checked before any
    slow work: an explicit generate=True that cannot be honoured is a UserError."""
    from .frontends import models, registry as frontends
    from .generation import default_max_context

    def off(reason: str):
        if generate:
            raise UserError(f"generation (prefill/decode) cannot be built: {reason}", "compile with --no-generate")
        return None

    if generate is False:
        if max_context is not None:
            raise UserError("--max-context sizes the KV cache of generation, which --no-generate turns off")
        return None
    if backend != "tvm":
        return off(f"the {backend} backend runs single forward passes only")
    if tgt.device == "cuda":
        return off(f"generation is built for CPU targets, not {tgt.name}")
    if isinstance(model, Program):
        if model.task != "causal-lm":
            return off(f"the program's task is {model.task}, not causal-lm")
        ids = next((sp for sp in model.inputs if sp.name == "input_ids"), None)
        if ids is None or 1 not in ids.dynamic_dims:
            return off("the program was traced with a static length (trace it with max_seq_len=N)")
        limit = ids.max_shape[1]
    elif (config := frontends.config(model)) is None:  # the frontend registered for the model's kind
        return off(f"generation is built for Hugging Face causal LMs (folders, .gguf files, aliases), not "
                   f"{frontends.what(model)}")
    else:
        if (task or models.infer_task(config)) != "causal-lm":
            return off("the model is not a causal LM")
        limit = getattr(config, "max_position_embeddings", None)
    context = max_context if max_context is not None else default_max_context(limit)
    if context < 2 or (limit and context > limit):
        raise UserError(f"--max-context {context} must be between 2 and the model's {limit} positions",
                        "choose a smaller --max-context")
    if seq_len > context and not isinstance(model, Program):  # a Program's prefill chunk is min(its length, context)
        raise UserError(f"--seq-len {seq_len} is longer than the --max-context {context}", "lower --seq-len")
    return context


def _kv_cache_context(kv_cache: str, model, task, tgt, backend: str, generate: bool | None, *args) -> int | None:
    """_generation_context, where a cache format other than fp32 asks for generation: a model or
    target that cannot have it (or --no-generate) is a UserError naming --kv-cache."""
    from .generation import check_kv_cache
    check_kv_cache(kv_cache)
    if kv_cache == "fp32":
        return _generation_context(model, task, tgt, backend, generate, *args)
    hint = "--kv-cache applies to causal LMs compiled with generation (prefill/decode); leave it out"
    if generate is False:
        raise UserError(f"--kv-cache {kv_cache} sets the KV cache of generation, which --no-generate turns off", hint)
    try:
        return _generation_context(model, task, tgt, backend, True, *args)
    except UserError as e:
        if not e.message.startswith("generation (prefill/decode) cannot be built: "):
            raise
        raise UserError(f"--kv-cache {kv_cache} needs a KV cache, which this compile cannot have: "
                        f"{e.message.split(': ', 1)[1]}", hint)


def _store_tokenizer(program: Program, dir: Path):
    """The tokenizer saved into the artifact (tokenizer/), so `tcc generate` needs nothing else; its
    end-of-sequence ids stop generation. Returns (manifest fields, the tokenizer or None)."""
    none = {"tokenizer": None, "eos_token_ids": []}
    tok = _tokenizer(program)
    if tok is None:
        return none, None
    tok.save_pretrained(str(dir / "tokenizer"))
    eos = tok.eos_token_id
    return {"tokenizer": "tokenizer", "eos_token_ids": [] if eos is None else [int(eos)]}, tok


def _tokenizer(program: Program, quiet: bool = False):
    """The program's tokenizer, or None for a model folder without tokenizer files (generation then
    takes token ids; said unless `quiet`)."""
    if not program.tokenizer_dir:
        return None
    from .evaluate import load_tokenizer
    try:
        return load_tokenizer(program.tokenizer_dir)
    except UserError:
        if not quiet:
            info(f"no tokenizer in {program.tokenizer_dir}: the artifact generates from token ids only")
        return None


def _check_generation(art, run: dict, source: _Reference, generation: dict) -> dict:
    """The artifact's prefill/decode against the source model itself: the Program as traced, before
    any pass and without a KV cache (so a fault of the cache rewrite cannot hide in the reference),
    runs once over the check ids (tcc.generation.check_ids: the check prompt, then the calibration
    text; computed before the passes: _Reference) and its argmax at each position is the reference;
    the loaded artifact `art` is fed the same ids,
    teacher-forced, through prefill (in chunks of its length, past a chunk boundary where the ids
    allow) and decode. Reports top-1 agreement at every position the artifact returns logits for
    (each chunk's last one and each decode step; 1.0 for an uncompressed model up to float ties)
    and the largest logit difference; run.seconds.generation_check says what each side cost."""
    from .generation import check_split, compare_logits, teacher_forced, verify_vs_decode
    context, chunk = generation["max_context"], generation["prefill_len"]
    ids = source.gen_ids
    prefilled = check_split(len(ids), chunk, context)
    with status(f"checking generation: {len(ids)} teacher-forced tokens vs the source model"):
        t1 = time.perf_counter()
        got = teacher_forced(art.session(), ids, chunk, prefilled)
        verify = verify_vs_decode(art.session(), ids, chunk, prefilled, got)  # speculation's premise
    run["seconds"]["generation_check"] = {"source": source.gen_seconds, "artifact": round(time.perf_counter() - t1, 2)}
    agreement = {**compare_logits(source.gen_logits, got), "prompt_tokens": prefilled, "sequence_tokens": len(ids),
                 "reference": "the source model's argmax at each position of one full forward (PyTorch), "
                              "teacher-forced through prefill and decode"}
    run["generation_agreement"] = agreement["rate"]
    return {"max_context": context, "prefill_len": chunk, "kv_cache": generation["kv_cache"],
            "cache_bytes": generation["cache_bytes"], **({"verify_vs_decode": verify} if verify is not None else {}),
            "agreement": agreement, **({"draft": _draft_summary(generation["draft"])} if generation.get("draft") else {})}


def _draft_summary(draft: dict) -> dict:
    """The report's view of the --draft program: pipeline, parameter bytes, and what --draft auto measured."""
    return {k: draft[k] for k in ("pipeline", "param_bytes", "auto") if k in draft}


BASELINE_MAX_BYTES = 2e9  # a bigger source model's speed-up baseline is not built (a second trace, build, write)


class _Baseline:
    """What the report's speed-up is measured against, timed in the same run as the artifact and
    interleaved with it (report.interleaved): the source model compiled for the same target and
    backend with no pass but the default cleanup, fp32 weights (`tcc compile MODEL` without a
    pipeline; its library comes from tcc.cache when it has it), or, for an artifact that compresses
    nothing (cleanup and analysis passes only, fp32 weights), PyTorch eager on the source Program.
    Made after the artifact was checked and its Program dropped (one model in memory at a time while
    building); the two are loaded side by side only for the timing."""

    def __init__(self, model, pipe, facts: dict, tgt, backend: str, trace_args: dict, at_length: int | None,
                 feeds: dict | None, off: bool = False):
        self.model, self.tgt, self.backend, self.trace_args, self.at_length = model, tgt, backend, trace_args, at_length
        self.feeds, self.off = feeds, off
        self.eager = facts.get("dtype", "fp32") == "fp32" and all(p.kind in ("cleanup", "analysis") for p in pipe)
        # `tcc compile MODEL` keeps a bf16 checkpoint bf16 (_weights_dtype): so does its baseline, traced
        # with the checkpoint's own bf16 tensors (never a float32 copy of them, issue 15)
        self.weights = _traced_weights(model, _weights_dtype(model, None, tgt, backend, []), [])

    def _source(self) -> Program:
        if isinstance(self.model, Program):
            program = self.model.clone()
        else:
            from .frontends.frontend import trace
            program = trace(self.model, **self.trace_args, weights=self.weights)
        if self.at_length:
            from .generation import at_length
            program = at_length(program, self.at_length)
        from .pipeline import PassContext, Pipeline
        return Pipeline.parse(DEFAULT_CLEANUP).run(program, PassContext(check_numerics=False), in_place=True)

    def time_against(self, artifact_dir: Path) -> dict:
        """run.latency: the artifact's timing, the baseline's, the speed-up and the machine's load."""
        import gc
        import shutil
        import tempfile
        from .artifact import read_manifest
        from .bench import _example_feeds
        from .runtime import Loaded
        what = ("PyTorch eager on the source model (this artifact compresses nothing)" if self.eager else
                f"the source model compiled for {self.tgt.name} without passes ({self.weights} weights)")
        seen = len(caches.events())
        source_bytes = read_manifest(artifact_dir)["sizes"]["source_param_bytes"]
        need = 1.5 * source_bytes  # its weights beside the artifact's
        skipped = (f"{need / 1e9:.1f} GB of free memory needed for {what}, {_available_bytes() / 1e9:.1f} GB free; "
                   "`tcc bench` compares later") if _available_bytes() < need else None
        if skipped is None and source_bytes > BASELINE_MAX_BYTES:
            skipped = (f"not built: the source model's {source_bytes / 1e9:.1f} GB of weights would cost about a second "
                       f"compile (more than {BASELINE_MAX_BYTES / 1e9:g} GB: issue 15); compile it without passes "
                       "and time both with `tcc bench`")
        if self.off:
            skipped = "not asked for (compile(baseline=False): the accuracy-budget search times its candidates alone)"
        tmp = base = None
        try:
            if skipped is None:
                try:
                    with status(f"baseline for the speed-up: {what}"):
                        source = self._source()
                        if self.eager:
                            base = source
                        else:
                            tmp = Path(tempfile.mkdtemp(prefix="tcc-baseline-"))
                            library = _build(source, self.tgt, self.backend, tmp)
                            write_manifest(tmp, {"tcc_version": __version__, "source": source.source, "task": source.task,
                                                 "pipeline": DEFAULT_CLEANUP, "passes": [], "target": self.tgt.to_json(),
                                                 "backend": self.backend, "inputs": [s.to_json() for s in source.inputs],
                                                 "outputs": [s.to_json() for s in source.outputs],
                                                 "params": library["params"],
                                                 "sizes": {"weight_bytes": library["weight_bytes"]}}, {})
                            source = None
                            gc.collect()
                            base = Loaded(tmp, verify=False)
                except Exception as e:  # the artifact is fine: its report says why there is no comparison
                    skipped = f"the baseline could not be made: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            with Loaded(artifact_dir, verify=False) as art:
                feeds = self.feeds if self.feeds is not None else _example_feeds(art.manifest["inputs"])
                with status(f"timing the artifact{'' if base is None else ' against the baseline, interleaved'} "
                            f"(at most {reports.ROUNDS} rounds, about {reports.ROUNDS_SECONDS:g} s)"):
                    timing = reports.interleaved({"tcc": art} | ({} if base is None else {"baseline": base}), feeds)
        finally:
            if base is not None and not self.eager:
                base.close()
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        if skipped is not None:
            return timing | {"baseline": {"skipped": skipped}}
        timing["baseline"] |= {"engine": "pytorch" if self.eager else "tcc", "weights": self.weights, "what": what,
                               "cache": {e["kind"]: e["outcome"] for e in caches.events()[seen:]}}
        return timing


def _available_bytes() -> int:
    import psutil
    return psutil.virtual_memory().available


class _Progress:
    """Where a compile is: whenever a step begins (tcc.memory.watching; at most once a second within
    one top-level stage) a report with final.exit_status null and final.progress {state "running",
    stage (top level), step (innermost), seconds, peak_rss_gb (so far), pid} is written to the
    --report path and into the staging directory, so that a compile killed by SIGKILL (the
    out-of-memory killer) leaves a report saying where it died (the next compile into the same
    directory says so too: _stale_staging). `ended(error)` is final.progress of a compile that failed
    or was interrupted."""

    def __init__(self, facts: dict, records: list, final: dict, run: dict, report_path):
        self.facts, self.records, self.final, self.run = facts, records, final, run
        self.paths = [Path(report_path)] if report_path is not None else []
        self.t0, self.last, self.where = time.perf_counter(), 0.0, {}

    def __call__(self, open_steps: list[str]) -> None:
        import os
        now = time.perf_counter()
        if open_steps[0] == self.where.get("stage") and now - self.last < 1.0:
            return
        self.last = now
        self.where = {"stage": open_steps[0], "step": open_steps[-1], "seconds": round(now - self.t0, 1),
                      "peak_rss_gb": round(memory.peak_bytes() / memory.GB, 2), "pid": os.getpid()}
        snapshot = reports.build(self.facts, self.records, self.final | {
            "exit_status": None, "progress": {"state": "running", **self.where}}, self.run)
        for path in self.paths:
            try:
                reports.write_json(path, snapshot)
            except OSError:
                pass  # a progress file is a help, never a reason to fail

    def ended(self, error: BaseException) -> dict:
        state = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
        return {"state": state, **{k: v for k, v in self.where.items() if k != "pid"},
                "seconds": round(time.perf_counter() - self.t0, 1)}


class Terminated(KeyboardInterrupt):
    """SIGTERM during a compile (exit status 130, as an interrupt: the staged artifact is removed and
    --report says "interrupted")."""


def _sigterm_interrupts():
    """Within the block (main thread only), SIGTERM raises Terminated instead of ending the process
    where it stands."""
    import contextlib
    import signal
    import threading

    @contextlib.contextmanager
    def block():
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            raise Terminated("terminated (SIGTERM)")
        old = signal.signal(signal.SIGTERM, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, old)
    return block()


def _stale_staging(out: Path) -> None:
    """Staging directories of earlier compiles into `out` whose process is gone (killed by SIGKILL: the
    out-of-memory killer, kill -9): say where each died (its progress report) and remove it (tcc wrote it)."""
    import os
    import shutil
    from .paths import read_small_json
    from .progress import console
    out = Path(os.path.abspath(out))
    if not out.parent.is_dir():
        return
    for d in sorted(out.parent.glob(f".{out.name}.tmp-*")):
        r = read_small_json(d / "report.json") or {}
        where = (r.get("final") or {}).get("progress") or {}
        pid = where.get("pid")
        if where.get("state") != "running" or not isinstance(pid, int) or (r.get("run") or {}).get("host") != platform.node():
            continue
        try:
            os.kill(pid, 0)
            continue  # still running: another compile into the same directory
        except ProcessLookupError:
            pass
        except OSError:
            continue
        console.print(f"tcc: note: an earlier compile into {out} (pid {pid}, started {r['run'].get('created')}) died during "
             f"'{where.get('stage')}' (step '{where.get('step')}') after {where.get('seconds')} s, at "
             f"{where.get('peak_rss_gb')} GB peak RSS so far, without reporting: killed (SIGKILL: the out-of-memory "
             "killer, or kill -9); its partial files are removed", markup=False, highlight=False)
        shutil.rmtree(d, ignore_errors=True)
