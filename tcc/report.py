"""The compile report: report.json for machines, report.html and report.md for people.

Every compile writes all three into the artifact; `tcc compile --report PATH` copies report.json to
PATH, and also writes it there when the compile fails (then no artifact exists; exit status and
error say why). Everything except the "run" section is deterministic: two compiles of the same
inputs differ only in "run" (time of day, host, seconds, measured latency, cache use).

report.json, schema "tcc.report/1":
  schema, tcc_version
  model       {source: {kind, path, sha256, model_type | class}, task, inputs: [specs], outputs: [specs]}
  target      the target as the manifest has it ({name, arch, tvm, cflags, cc}); backend
  pipeline    canonical pipeline text (every option)
  passes      [{name, text, kind, param_bytes: {before, after}, flops: {before, after},
                int_flops: {before, after} (the part of flops in integer arithmetic),
                nodes: {before, after}, drift: {max_abs, rel, output, feeds}, details}] in order;
              drift is each pass's change of the outputs vs the program before it (PyTorch)
  sparsity    how each sparse weight was lowered (only when there are any)
  final       exit_status (0 ok, 1 internal error, 2 user error, 3 accuracy budget not met,
              130 interrupted); error {type, message, hint} or null;
              size {weight_bytes, source_param_bytes, ratio} (null when no artifact was built);
              accuracy {measured_with: "artifact" | "pytorch", vs_source: {output: {max_abs_err,
              max_rel_err}}, vs_program: {...} (artifact only: the backend's own error)} or null,
              with accuracy_note saying why; max_drift {limit, drift, met} when a limit was set;
              latency {measured: bool, reason: why not, or null} - the numbers are in run.latency;
              generation (causal LMs with prefill/decode, checked on this host) {max_context,
              prefill_len, kv_cache ("fp32" | "int8"), cache_bytes, agreement {rate (top-1, teacher-forced), tokens (positions
              compared), prompt_tokens (prefilled), sequence_tokens, max_abs_logit_error,
              max_rel_logit_error, reference}, draft (with --draft) {pipeline, param_bytes, auto (--draft
              auto: {candidates [{pipeline, agreement, cost, expected_speed_up, k}], positions, verify_cost})}};
              task_accuracy (tcc.evaluate.HeldOut, on the held-out text shipped with tcc) {metric:
              "perplexity" | "cosine" | "agreement", definition, text, measured_with, source,
              compressed, change, ...} or {metric: null, note};
              progress (only while running, or after a failure or interrupt) {state: "running" |
              "failed" | "interrupted", stage, step, seconds, peak_rss_gb, pid (running)}:
              exit_status is null while running, so a report left by a killed compile says so
  run         created (UTC), host, seconds {trace, passes: [[name, s]], build, total, stages: [[stage, s]]
              (the top-level steps, adding up to total with "other" last)}, memory {peak_rss_gb, steps},
              latency (interleaved) {engine, calls, median_ms, p10_ms, p90_ms, min_ms, rounds_ms {tcc,
              baseline}, baseline {engine "tcc" | "pytorch", what, calls, median_ms, ..., cache} or
              {skipped: why}, speedup {median, p25, p75, min, max, rounds}, load {start, end, cpus}}
              or null, cache {kind: outcome}
  extra sections added later by `add_section` (e.g. the accuracy-budget search's), by name

report.html is self-contained and fits a 1280-px window: title the model's name, a summary line
(`summary`: size, speed-up against the baseline, task accuracy), the facts with each metric defined,
the latency of each interleaved round, the pass table (options that differ from the defaults; the
full pipeline in a <details> block; float GFLOP and integer GOP apart), per-pass parameter, work and
drift plots as inline PNGs (matplotlib, Agg canvas; labelled axes; zero drift labelled "0", not
drawn), compile time and peak RSS per stage, and any PNG a pass or section wrote
(analyze-redundancy's heatmap when its record names one). report.md holds the same summary and
tables.

build(facts, records, final, run) -> dict       the report.json content
write(dir, report)                              report.json + report.html + report.md into `dir`
read(dir) -> dict                               an artifact's report.json
write_json(path, report)                        one file, atomically (for --report PATH)
check_path(path, force=False) -> Path           a --report PATH tcc may write (missing, or a tcc report; tcc.paths)
add_section(dir, name, data, images=())         add a section to an artifact's report, re-render
render_markdown(report) / render_html(report) -> str
summary(report) -> str                          "2.9× smaller, 1.1× faster than fp32 on this CPU (IQR ...), +0.1 % perplexity"
interleaved(runs, feeds) -> dict                the artifact timed against its baseline, interleaved (run.latency)
"""
from __future__ import annotations

import base64
import html
import io
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from . import __version__
from .errors import TccError
from .paths import check_file, read_small_json

SCHEMA = "tcc.report/1"
FILES = ("report.json", "report.html", "report.md")


# -- building ---------------------------------------------------------------------------------------

def build(facts: dict, records: list[dict], final: dict, run: dict) -> dict:
    """`facts`: what the manifest says about the compile (source, task, inputs, outputs, target,
    backend, pipeline, sparsity); `records`: the pass manager's records; `final` and `run` as in the
    module docstring (missing final fields default to null)."""
    passes = [{"name": r["pass"]} | {k: r[k] for k in ("text", "kind", "param_bytes", "flops", "int_flops", "nodes", "drift",
                                                                  "details")
                                     if k in r} for r in records]
    report = {
        "schema": SCHEMA, "tcc_version": __version__,
        "model": {"source": facts.get("source") or {}, "task": facts.get("task"),
                  "inputs": facts.get("inputs", []), "outputs": facts.get("outputs", [])},
        "target": facts.get("target"), "backend": facts.get("backend"), "pipeline": facts.get("pipeline"),
        "passes": passes,
        "final": {"exit_status": 0, "error": None, "size": None, "accuracy": None, "accuracy_note": None,
                  "task_accuracy": None,
                  "latency": {"measured": False, "reason": "no artifact was built"}} | final,
        "run": run | {"seconds": {"passes": [[r["pass"], r["seconds"]] for r in records]} | run.get("seconds", {})},
    }
    if facts.get("sparsity"):
        report["sparsity"] = facts["sparsity"]
    return report


def exit_status(error: BaseException | None) -> int:
    if error is None:
        return 0
    if isinstance(error, TccError):
        return error.exit_code
    return 130 if isinstance(error, KeyboardInterrupt) else 1


def error_json(error: BaseException | None) -> dict | None:
    if error is None:
        return None
    message = getattr(error, "message", str(error))
    if isinstance(error, KeyboardInterrupt):
        message = message or "interrupted (Ctrl-C)"
    out = {"type": type(error).__name__, "message": message, "hint": getattr(error, "hint", None)}
    if getattr(error, "tcc_reproducer", None):  # a pass failed: the pipeline up to it and its input program
        out["reproducer"] = error.tcc_reproducer
    return out


def size(weight_bytes: int, source_param_bytes: int) -> dict:
    return {"weight_bytes": weight_bytes, "source_param_bytes": source_param_bytes,
            "ratio": round(weight_bytes / source_param_bytes, 6) if source_param_bytes else None}


ROUNDS, MIN_ROUNDS, ROUNDS_SECONDS = 10, 3, 15.0  # the compile's interleaved timing: bounded for big models
PAUSE_S = 0.05  # between two engines' calls: the last one's spinning worker threads go idle (as in tcc bench)


def interleaved(runs: dict[str, Callable[[dict], dict]], feeds: dict, rounds: int = ROUNDS,
                min_rounds: int = MIN_ROUNDS, seconds: float = ROUNDS_SECONDS) -> dict:
    """Time the engines `runs` ({"tcc": artifact, "baseline": ...}, or the artifact alone) on `feeds`,
    interleaved: one warm-up call each, then rounds of one call per engine, the order alternating
    (A B, B A, ...) with a short pause between calls, so load from other processes falls on both
    alike; at most `rounds`, and no new round after `seconds` once `min_rounds` ran. Returns the
    first engine's figures (calls, median_ms, p10_ms, p90_ms, min_ms), "baseline" with the second's,
    "speedup" (baseline / artifact per round: median, p25, p75, min, max, rounds) and "load" (the
    1-minute load average at the start and end, and the CPU count)."""
    names = list(runs)
    load = {"start": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()}
    for name in names:
        runs[name](feeds)
    times: dict[str, list[float]] = {name: [] for name in names}
    deadline = time.perf_counter() + seconds
    for i in range(rounds):
        if i >= min_rounds and time.perf_counter() > deadline:
            break
        for name in (names if i % 2 == 0 else names[::-1]):
            if len(names) > 1:
                time.sleep(PAUSE_S)
            t0 = time.perf_counter()
            runs[name](feeds)
            times[name].append((time.perf_counter() - t0) * 1e3)
    load["end"] = round(os.getloadavg()[0], 2)
    out = _stats(times[names[0]]) | {"engine": names[0], "load": load,
                                     "rounds_ms": {name: [round(t, 3) for t in times[name]] for name in names}}
    if len(names) > 1:
        out["baseline"] = _stats(times[names[1]])
        ratio = np.asarray(times[names[1]]) / np.asarray(times[names[0]])
        out["speedup"] = {"median": round(float(np.median(ratio)), 3), "p25": round(float(np.percentile(ratio, 25)), 3),
                          "p75": round(float(np.percentile(ratio, 75)), 3), "min": round(float(ratio.min()), 3),
                          "max": round(float(ratio.max()), 3), "rounds": len(ratio)}
    return out


def _stats(times: list[float]) -> dict:
    ms = np.asarray(times)
    return {"calls": len(times), "median_ms": round(float(np.median(ms)), 3), "p10_ms": round(float(np.percentile(ms, 10)), 3),
            "p90_ms": round(float(np.percentile(ms, 90)), 3), "min_ms": round(float(ms.min()), 3)}


# -- writing ------------------------------------------------------------------------------------------

def is_report(path: Path) -> bool:
    """Whether the file at `path` is a report tcc wrote (its "schema" is tcc's, any version)."""
    r = read_small_json(Path(path))
    return r is not None and str(r.get("schema", "")).startswith(SCHEMA.split("/")[0] + "/")


def check_path(path, force: bool = False) -> Path:
    """A --report PATH: UserError when something tcc did not write is there (unless `force`)."""
    return check_file(path, "report file (--report)", is_report, force)


def write_json(path, report: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def write(dir, report: dict) -> None:
    dir = Path(dir)
    write_json(dir / "report.json", report)
    (dir / "report.html").write_text(render_html(report))
    (dir / "report.md").write_text(render_markdown(report))


def read(dir) -> dict:
    return json.loads((Path(dir) / "report.json").read_text())


def add_section(dir, name: str, data: dict, images=()) -> dict:
    """Add section `name` (JSON-able `data`, plus PNG files shown in the HTML) to the report in
    artifact `dir` and render it again."""
    dir = Path(dir)
    report = read(dir)
    report[name] = data | {"images": [str(p) for p in images]} if images else data
    write(dir, report)
    return report


# -- what the pages say -----------------------------------------------------------------------------------

def model_name(report: dict) -> str:
    """The model's name for a title: an alias as given, a folder's or file's own name (not the absolute
    path of a cache), a module's class."""
    src = report["model"]["source"] or {}
    path = src.get("path")
    return Path(str(path)).name if path else str(src.get("class", "?"))


def summary(report: dict) -> str:
    """One line: "3.1× smaller, 2.4× faster than fp32 on this CPU (IQR 2.2–2.6×), +1.9 % perplexity"."""
    final, lat = report["final"], (report.get("run") or {}).get("latency") or {}
    if final["exit_status"]:
        return f"failed (exit status {final['exit_status']}): {(final.get('error') or {}).get('message', '')}"
    parts = []
    size_ = final.get("size") or {}
    if size_.get("ratio"):
        r = size_["ratio"]
        parts.append(f"{1 / r:.1f}× smaller" if r < 0.995 else f"{r:.2f}× larger" if r > 1.005 else "the same size")
    sp = lat.get("speedup")
    if sp:
        base = _baseline_name(lat["baseline"])
        m = sp["median"]
        parts.append((f"{m:.1f}× faster" if m >= 1 else f"{1 / m:.1f}× slower") + f" than {base} on this CPU "
                     f"(IQR {sp['p25']:.2f}–{sp['p75']:.2f}×)")
    else:
        parts.append("speed not compared: " + _latency_reason(report))
    parts.append(_accuracy_words(final.get("task_accuracy")))
    return ", ".join(parts)


def _baseline_name(baseline: dict) -> str:
    return "PyTorch eager" if baseline.get("engine") == "pytorch" else baseline.get("weights", "fp32")


def _latency_reason(report: dict) -> str:
    lat = (report.get("run") or {}).get("latency")
    if lat and (lat.get("baseline") or {}).get("skipped"):
        return lat["baseline"]["skipped"]
    return (report["final"].get("latency") or {}).get("reason") or "not measured"


def _accuracy_words(ta: dict | None) -> str:
    if not ta or not ta.get("metric"):
        return "task accuracy " + ((ta or {}).get("note") or "not measured")
    if ta["metric"] == "perplexity":
        pct = ta["change"] * 100
        return f"{pct:+.1f} % perplexity" if abs(pct) >= 0.05 else f"{pct:+.2g} % perplexity"
    if ta["metric"] == "cosine":
        return f"embedding cosine {ta['compressed']:.4f}"
    return f"top-1 agreement {ta['compressed'] * 100:.1f} %"


def _speed_words(report: dict) -> str:
    lat = (report.get("run") or {}).get("latency")
    if not lat:
        return "not measured: " + _latency_reason(report)
    text = f"{lat['median_ms']:.3g} ms median of {lat['calls']} calls"
    base, sp = lat.get("baseline") or {}, lat.get("speedup")
    if sp:
        text += (f" vs {base['median_ms']:.3g} ms for the baseline, {base['what']}; speed-up {sp['median']:.2f}× "
                 f"(median of {sp['rounds']} interleaved rounds, IQR {sp['p25']:.2f}–{sp['p75']:.2f}, "
                 f"min {sp['min']:.2f}, max {sp['max']:.2f})")
    elif base.get("skipped"):
        text += f"; baseline not timed: {base['skipped']}"
    load = lat.get("load")
    if load:
        busy = load["start"] > 0.5 * load["cpus"] or load["end"] > 0.5 * load["cpus"]
        text += (f"; machine load (1-min average) {load['start']:g} at the start, {load['end']:g} at the end, "
                 f"{load['cpus']} CPUs" + (": a busy machine, the times are noisy" if busy else ""))
    return text


def _accuracy_detail(ta: dict | None) -> str:
    if not ta or not ta.get("metric"):
        return (ta or {}).get("note") or "not measured"
    if ta["metric"] == "perplexity":
        head = f"perplexity {ta['source']:.4g} (source) → {ta['compressed']:.4g} ({ta['change'] * 100:+.2f} %)"
    elif ta["metric"] == "cosine":
        head = f"embedding cosine {ta['compressed']:.5f} (min {ta['min']:.5f})"
    else:
        head = f"top-1 agreement {ta['compressed'] * 100:.2f} %, output cosine {ta['output_cosine']:.5f}"
    return f"{head}; measured on the {ta['measured_with']}. Definition: {ta['definition']}. Text: {ta['text']}"


def _drift_detail(acc: dict) -> str:
    worst = max(acc["vs_source"].items(), key=lambda kv: kv[1]["max_rel_err"])
    return (f"{worst[1]['max_rel_err']:.2e} ({worst[0]}: the largest absolute difference from the source model's "
            f"output, {worst[1]['max_abs_err']:.2e}, divided by the largest absolute value of that output, on one "
            f"verification input; measured on the {acc['measured_with']})")


def _compile_cost(report: dict) -> str:
    run = report.get("run") or {}
    sec, mem = run.get("seconds") or {}, run.get("memory") or {}
    parts = [f"{sec['total']:.1f} s" for _ in [0] if isinstance(sec.get("total"), (int, float))]
    if mem.get("peak_rss_gb") is not None:
        parts.append(f"peak RSS {mem['peak_rss_gb']:.2f} GB")
    return ", ".join(parts) or "?"


def _facts(report: dict) -> list[tuple[str, str]]:
    """(label, text) rows both pages show, in order."""
    final, src = report["final"], report["model"]["source"] or {}
    rows = [("model", f"{src.get('path', src.get('class', '?'))} ({', '.join(str(v) for v in (src.get('kind'), src.get('model_type') or src.get('class')) if v)}), "
                      f"task {report['model']['task']}; inputs "
                      + ", ".join(f"{s['name']} {s['dtype']} {s['shape']}" for s in report["model"]["inputs"])),
            ("target", f"{(report['target'] or {}).get('name')} (backend {report['backend']})"),
            ("pipeline", short_pipeline(report["pipeline"]) + _preset_words(report["pipeline"]))]
    if final.get("size"):
        s = final["size"]
        rows.append(("weights", f"{s['weight_bytes'] / 1e6:.2f} MB" + (f" ({s['ratio']:.3f}× the source's "
                                                                      f"{s['source_param_bytes'] / 1e6:.2f} MB)" if s.get("ratio") else "")))
    if not final["exit_status"]:
        rows.append(("speed", _speed_words(report)))
        rows.append(("task accuracy", _accuracy_detail(final.get("task_accuracy"))))
    acc = final.get("accuracy")
    rows.append(("max change vs the source", _drift_detail(acc) if acc else final.get("accuracy_note") or "not measured"))
    if final.get("max_drift"):
        m = final["max_drift"]
        rows.append(("--max-drift", f"{m['drift']:.2e} vs limit {m['limit']:g}: {'met' if m['met'] else 'NOT met'}"))
    if final.get("generation"):
        g = final["generation"]
        rows.append(("generation", f"prefill (chunks of {g['prefill_len']}) and decode over a KV cache of "
                                   f"{g['max_context']} positions ({_cache(g)}); {_agreement(g['agreement'])}"))
        if g.get("draft"):
            rows.append(("speculative draft", _draft(g["draft"])))
    rows.append(("compile", _compile_cost(report)))
    prog = final.get("progress")
    if prog:
        rows.append(("stopped", f"{prog['state']} during '{prog.get('stage')}' (step '{prog.get('step')}') after "
                                f"{prog.get('seconds')} s"))
    return rows


def _preset_words(text: str | None) -> str:
    from .info import _preset
    name = _preset(text)
    return f" (preset {name})" if name else ""


def short_pipeline(text: str | None) -> str:
    """The pipeline with only the options that differ from their defaults (the canonical text when this
    tcc cannot parse it)."""
    if not text:
        return "(none)"
    from .errors import UserError
    from .pipeline import Pipeline
    try:
        return str(Pipeline.parse(text)) or text
    except UserError:
        return text


def _stages(report: dict) -> list[tuple[str, float, float | None]]:
    """(stage, seconds, peak RSS GB) rows that add up to the compile's total (an "other" row last)."""
    run = report.get("run") or {}
    peaks = {s["step"]: s.get("peak_gb") for s in (run.get("memory") or {}).get("steps", [])}
    return [(name, sec, peaks.get(name)) for name, sec in (run.get("seconds") or {}).get("stages", [])]


def _gops(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e9:.3g}"


def _pass_rows(passes: list[dict]) -> list[list[str]]:
    rows = []
    for p in passes:
        pb, fl, il = p["param_bytes"], p["flops"], p.get("int_flops") or {}
        drift = (p.get("drift") or {}).get("rel")
        fb, fa = fl["before"] - il.get("before", 0), fl["after"] - il.get("after", 0)
        rows.append([short_pipeline(p["text"]), p["kind"], f"{pb['before'] / 1e6:.2f} → {pb['after'] / 1e6:.2f}",
                     f"{fb / 1e9:.3g} → {fa / 1e9:.3g}",
                     f"{_gops(il.get('before'))} → {_gops(il.get('after'))}" if il else "-",
                     "-" if drift is None else ("0" if drift == 0 else f"{drift:.2e}") + _on_feeds(p["drift"])])
    return rows


def _on_feeds(drift: dict) -> str:
    """How many check feeds a pass's drift was measured on (fewer for big models: compiler._check_feeds)."""
    n = drift.get("feeds")
    return "" if not n else f" ({n} feed{'' if n == 1 else 's'}{', reused' if drift.get('reused') else ''})"


_PASS_HEAD = ["pass (options that differ from the defaults)", "kind", "params MB", "float GFLOP", "int GOP",
              "max rel drift"]


# -- markdown --------------------------------------------------------------------------------------------

def render_markdown(report: dict) -> str:
    lines = [f"# tcc report: {model_name(report)}", "", f"**{summary(report)}**", ""]
    lines += [f"- {k}: {v}" for k, v in _facts(report)]
    lines += ["", f"Full pipeline: `{report['pipeline']}`", ""]
    if report["passes"]:
        lines += ["| " + " | ".join(_PASS_HEAD) + " |", "| --- " * len(_PASS_HEAD) + "|"]
        lines += ["| `" + r[0] + "` | " + " | ".join(r[1:]) + " |" for r in _pass_rows(report["passes"])]
    stages = _stages(report)
    if stages:
        lines += ["", "| compile stage | seconds | peak RSS GB |", "| --- | ---: | ---: |"]
        lines += [f"| {n} | {s:.2f} | {'-' if g is None else f'{g:.2f}'} |" for n, s, g in stages]
        lines.append(f"| total | {report['run']['seconds']['total']:.2f} | {report['run']['memory']['peak_rss_gb']:.2f} |")
    if report.get("sparsity"):
        lines += ["", "## Sparse weights on this target", "",
                  "| tensor | pattern | sparsity | storage | bytes before → after | kernel |", "| --- | --- | --- | --- | --- | --- |"]
        for r in report["sparsity"]:
            sp = r.get("sparsity")
            pat = (r.get("pattern") or "-") + (f" {r['block'][0]}x{r['block'][1]}" if r.get("block") else "")
            size_ = f"{r['bytes_before']} → {r['bytes_after']}" if "bytes_before" in r else "-"
            lines.append(f"| `{r['tensor']}` | {pat} | {'-' if sp is None else f'{sp:.2f}'} | {r['storage']} | {size_} | {r['kernel']} |")
    return "\n".join(lines) + "\n"


# -- html ----------------------------------------------------------------------------------------------

_CSS = ("body{font-family:system-ui,sans-serif;max-width:1180px;margin:1.5em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0;max-width:100%}td,th{border:1px solid #ccc;padding:3px 8px;"
        "text-align:right;vertical-align:top}td:first-child,th:first-child{text-align:left}"
        "table.facts td{text-align:left}code{background:#f4f4f4;overflow-wrap:anywhere}"
        "pre{white-space:pre-wrap;overflow-wrap:anywhere}.bad{color:#b00}.summary{font-size:1.3em;font-weight:600}"
        "img{max-width:100%}h1{overflow-wrap:anywhere}")


def render_html(report: dict) -> str:
    e = html.escape
    final, run = report["final"], report.get("run", {})
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>tcc report: {e(model_name(report))}</title>"
             f"<style>{_CSS}</style></head><body>",
             f"<h1>tcc report: {e(model_name(report))}</h1>",
             f"<p class='summary{' bad' if final['exit_status'] else ''}'>{e(summary(report))}</p>"]
    if final["exit_status"] and (final.get("error") or {}).get("hint"):
        parts.append(f"<p class='bad'>hint: {e(str(final['error']['hint']))}</p>")
    parts.append("<table class='facts'>" + "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in _facts(report))
                 + "</table>")
    lat = run.get("latency") or {}
    if len(lat.get("rounds_ms") or {}) > 1:
        parts.append(_img(_latency_plot(lat), "latency per call, artifact and baseline, each round"))
    if report["passes"]:
        parts += ["<h2>Passes</h2>",
                  "<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in _PASS_HEAD) + "</tr>"
                  + "".join("<tr><td><code>" + e(r[0]) + "</code></td>" + "".join(f"<td>{e(c)}</td>" for c in r[1:])
                            + "</tr>" for r in _pass_rows(report["passes"])) + "</table>",
                  f"<details><summary>full pipeline (every option)</summary><p><code>{e(str(report['pipeline']))}</code>"
                  "</p></details>",
                  _img(_pass_plot(report["passes"]), "parameters, work and drift after each pass")]
    stages = _stages(report)
    if stages:
        total = run["seconds"]["total"]
        parts.append("<h2>Compile time and memory</h2><table><tr><th>stage</th><th>seconds</th><th>share</th>"
                     "<th>peak RSS GB</th></tr>"
                     + "".join(f"<tr><td>{e(n)}</td><td>{s:.2f}</td><td>{s / total:.0%}</td>"
                               f"<td>{'-' if g is None else f'{g:.2f}'}</td></tr>" for n, s, g in stages)
                     + f"<tr><th>total</th><th>{total:.2f}</th><th></th><th>{run['memory']['peak_rss_gb']:.2f}</th></tr></table>")
    for name, data in report.items():
        if isinstance(data, dict) and data.get("images"):
            parts.append(f"<h2>{e(name)}</h2>")
            parts += [_img(Path(p).read_bytes(), Path(p).name) for p in data["images"] if Path(p).is_file()]
    pngs = [f for p in report["passes"] for f in [((p.get("details") or {}).get("files") or {}).get("png")] if f]
    for f in pngs:
        if Path(f).is_file():
            parts += [f"<h2>{e(Path(f).name)}</h2>", _img(Path(f).read_bytes(), Path(f).name)]
    parts.append(f"<details><summary>run (as report.json has it)</summary><pre>{e(json.dumps(run, indent=1, default=str))}"
                 "</pre></details></body></html>")
    return "\n".join(parts) + "\n"


def _cache(gen: dict) -> str:
    """"25.1 MB, int8" (an fp32 cache: its bytes only)."""
    kind = gen.get("kv_cache", "fp32")
    return f"{gen['cache_bytes'] / 1e6:.1f} MB" + ("" if kind == "fp32" else f", {kind}")


def _draft(d: dict) -> str:
    """final.generation.draft in words: the pipeline, its size, and each --draft auto candidate."""
    text = f"{d['pipeline']} ({d['param_bytes'] / 1e6:.1f} MB of parameters)"
    if d.get("auto"):
        text += "; chosen by --draft auto from " + "; ".join(
            f"{c['pipeline']}: agreement {c['agreement']:.3f}, cost {c['cost']:.3f}, expected {c['expected_speed_up']}x "
            f"at k {c['k']}" for c in d["auto"]["candidates"])
    return text + " (tcc generate --speculate draft --compare measures the speed-up)"


def _agreement(a: dict) -> str:
    """final.generation.agreement in words (reports before the logit error was measured lack it)."""
    err = a.get("max_rel_logit_error")
    return (f"top-1 agreement with the source model {a['rate']:.3f} over {a['tokens']} teacher-forced positions"
            + ("" if err is None else f", max logit error {err:.1e} relative"))


def _pass_plot(passes: list[dict]) -> bytes:
    """Three panels: parameter MB and work (float GFLOP and integer GOP apart) after each pass (the
    source first), and each pass's drift on a log axis (a pass that changed nothing is labelled 0,
    not drawn as a tiny bar; one not measured, n/a)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = ["source"] + [p["name"] for p in passes]
    ints = [passes[0].get("int_flops", {}).get("before", 0)] + [p.get("int_flops", {}).get("after", 0) for p in passes]
    total = [passes[0]["flops"]["before"]] + [p["flops"]["after"] for p in passes]
    mb = [passes[0]["param_bytes"]["before"] / 1e6] + [p["param_bytes"]["after"] / 1e6 for p in passes]
    drift = [(p.get("drift") or {}).get("rel") for p in passes]
    fig = Figure(figsize=(12, 3.6), dpi=90)
    FigureCanvasAgg(fig)
    x = np.arange(len(labels))
    ax = fig.add_subplot(1, 3, 1)
    ax.bar(x, mb, color="#4c72b0")
    ax.set(title="parameters", ylabel="MB")
    ax = fig.add_subplot(1, 3, 2)
    ax.bar(x - 0.2, [(t - i) / 1e9 for t, i in zip(total, ints)], 0.4, color="#55a868", label="float GFLOP")
    ax.bar(x + 0.2, [i / 1e9 for i in ints], 0.4, color="#dd8452", label="integer GOP")
    ax.set(title="work per call", ylabel="billions of operations")
    ax.legend(fontsize=7)
    for ax_ in fig.axes:
        ax_.set_xticks(x, labels, rotation=45, ha="right", fontsize=7)
        ax_.set_xlabel("after pass", fontsize=8)
    ax = fig.add_subplot(1, 3, 3)
    shown = [d for d in drift if d]
    ax.bar(range(len(drift)), [d if d else 0 for d in drift], color="#c44e52")
    if shown:
        ax.set_yscale("log")
        ax.set_ylim(min(shown) / 3, max(shown) * 3)
    else:
        ax.set_yticks([])
    bottom = ax.get_ylim()[0]
    for i, d in enumerate(drift):
        if not d:
            ax.text(i, bottom, "0" if d == 0 else "n/a", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(drift)), labels[1:], rotation=45, ha="right", fontsize=7)
    ax.set(title="output drift of each pass", ylabel="max relative change")
    ax.set_xlabel("pass (vs the program before it)", fontsize=8)
    fig.tight_layout()
    return _png(fig)


def _latency_plot(lat: dict) -> bytes:
    """Milliseconds per call of the artifact and the baseline in each interleaved round."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(7, 2.8), dpi=90)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    names = {"tcc": "artifact", "baseline": f"baseline ({_baseline_name(lat['baseline'])})"}
    for name, ms in lat["rounds_ms"].items():
        ax.plot(range(1, len(ms) + 1), ms, "o-", label=names.get(name, name))
    ax.set(title="latency, interleaved rounds", xlabel="round", ylabel="ms per call")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _img(png: bytes, alt: str) -> str:
    return f"<p><img alt='{html.escape(alt)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'></p>"
