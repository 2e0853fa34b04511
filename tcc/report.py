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
              max_rel_logit_error, reference}}
  run         created (UTC), host, seconds {trace, passes: [[name, s]], build, total},
              latency {engine, calls, median_ms, p10_ms, p90_ms, min_ms} or null, cache {kind: outcome}
  extra sections added later by `add_section` (e.g. the accuracy-budget search's), by name

report.html is self-contained: per-pass parameter-size and FLOPs bars and per-pass drift as inline
PNGs (matplotlib, Agg canvas), the pass table, and any PNG a pass or section wrote (analyze-redundancy's
heatmap when its record names one).

build(facts, records, final, run) -> dict       the report.json content
write(dir, report)                              report.json + report.html + report.md into `dir`
read(dir) -> dict                               an artifact's report.json
write_json(path, report)                        one file, atomically (for --report PATH)
check_path(path, force=False) -> Path           a --report PATH tcc may write (missing, or a tcc report; tcc.paths)
add_section(dir, name, data, images=())         add a section to an artifact's report, re-render
render_markdown(report) / render_html(report) -> str
measure_latency(run, feeds, calls=5, seconds=1.0) -> dict   a short timing of an artifact (warmed up)
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
    passes = [{"name": r["pass"]} | {k: r[k] for k in ("text", "kind", "param_bytes", "flops", "nodes", "drift", "details")
                                     if k in r} for r in records]
    report = {
        "schema": SCHEMA, "tcc_version": __version__,
        "model": {"source": facts.get("source") or {}, "task": facts.get("task"),
                  "inputs": facts.get("inputs", []), "outputs": facts.get("outputs", [])},
        "target": facts.get("target"), "backend": facts.get("backend"), "pipeline": facts.get("pipeline"),
        "passes": passes,
        "final": {"exit_status": 0, "error": None, "size": None, "accuracy": None, "accuracy_note": None,
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
    return {"type": type(error).__name__, "message": getattr(error, "message", str(error)),
            "hint": getattr(error, "hint", None)}


def size(weight_bytes: int, source_param_bytes: int) -> dict:
    return {"weight_bytes": weight_bytes, "source_param_bytes": source_param_bytes,
            "ratio": round(weight_bytes / source_param_bytes, 6) if source_param_bytes else None}


def measure_latency(run: Callable[[dict], dict], feeds: dict, calls: int = 5, seconds: float = 1.0) -> dict:
    """Time up to `calls` calls of `run(feeds)` (at least 2) within about `seconds`; the caller has
    made one call already (the warm-up)."""
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < calls and (len(times) < 2 or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        run(feeds)
        times.append((time.perf_counter() - t0) * 1e3)
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
    artifact `dir` and render it again. report.md is left as it is (the manifest hashes it)."""
    dir = Path(dir)
    report = read(dir)
    report[name] = data | {"images": [str(p) for p in images]} if images else data
    write_json(dir / "report.json", report)
    (dir / "report.html").write_text(render_html(report))
    return report


# -- markdown (deterministic: the manifest hashes report.md) ------------------------------------------------

def render_markdown(report: dict) -> str:
    src, final = report["model"]["source"], report["final"]
    target = report["target"] or {}
    lines = [f"# tcc artifact: {src.get('path', src.get('class', '?'))}", "",
             f"- target: `{target.get('name')}` (TVM target `{json.dumps(target.get('tvm'), sort_keys=True)}`)",
             f"- task: {report['model']['task']}; inputs: "
             + ", ".join(f"{s['name']}{s['shape']} {s['dtype']}" for s in report["model"]["inputs"]),
             f"- pipeline: `{report['pipeline']}`"]
    if final["size"]:
        s = final["size"]
        lines.append(f"- weights in the artifact: {s['weight_bytes'] / 1e6:.2f} MB"
                     + (f" (source model: {s['source_param_bytes'] / 1e6:.2f} MB)" if s.get("source_param_bytes") else ""))
    if final.get("generation"):
        g = final["generation"]
        lines.append(f"- generation: prefill (chunks of {g['prefill_len']}) and decode over a KV cache of "
                     f"{g['max_context']} positions ({_cache(g)}); {_agreement(g['agreement'])}")
    if final["exit_status"]:
        lines.append(f"- failed: exit status {final['exit_status']}: {final['error']['message'] if final['error'] else ''}")
    lines += ["", "| pass | params MB before → after | GFLOP before → after | max rel drift |", "| --- | --- | --- | --- |"]
    for p in report["passes"]:
        pb, fl = p["param_bytes"], p["flops"]
        drift = (p.get("drift") or {}).get("rel")
        lines.append(f"| `{p['text']}` | {pb['before'] / 1e6:.2f} → {pb['after'] / 1e6:.2f} | "
                     f"{fl['before'] / 1e9:.2f} → {fl['after'] / 1e9:.2f} | {'-' if drift is None else f'{drift:.2e}'} |")
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

_CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}code{background:#f4f4f4}.bad{color:#b00}img{max-width:100%}")


def render_html(report: dict) -> str:
    e = html.escape
    src, final, run = report["model"]["source"], report["final"], report.get("run", {})
    status = final["exit_status"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>tcc report</title><style>{_CSS}</style></head><body>",
             f"<h1>tcc report: {e(str(src.get('path', src.get('class', '?'))))}</h1>",
             f"<p>target <code>{e(str((report['target'] or {}).get('name')))}</code>, backend {e(str(report['backend']))}, "
             f"task {e(str(report['model']['task']))}<br>pipeline <code>{e(str(report['pipeline']))}</code></p>"]
    if status:
        err = final["error"] or {}
        parts.append(f"<p class='bad'><b>failed, exit status {status}</b>: {e(str(err.get('message', '')))}"
                     + (f"<br>hint: {e(str(err['hint']))}" if err.get("hint") else "") + "</p>")
    parts.append(_summary_table(final, run))
    if report["passes"]:
        parts += ["<h2>Passes</h2>", _pass_table(report["passes"]), _img(_pass_plot(report["passes"]), "size, FLOPs and drift per pass")]
    for name, data in report.items():
        if isinstance(data, dict) and data.get("images"):
            parts.append(f"<h2>{e(name)}</h2>")
            parts += [_img(Path(p).read_bytes(), Path(p).name) for p in data["images"] if Path(p).is_file()]
    pngs = [f for p in report["passes"] for f in [((p.get("details") or {}).get("files") or {}).get("png")] if f]
    for f in pngs:
        if Path(f).is_file():
            parts += [f"<h2>{e(Path(f).name)}</h2>", _img(Path(f).read_bytes(), Path(f).name)]
    parts.append(f"<h2>Run</h2><pre>{e(json.dumps(run, indent=1, default=str))}</pre></body></html>")
    return "\n".join(parts) + "\n"


def _summary_table(final: dict, run: dict) -> str:
    rows = []
    if final["size"]:
        s = final["size"]
        ratio = f" ({s['ratio']:.3f}× the source's {s['source_param_bytes'] / 1e6:.2f} MB)" if s.get("ratio") else ""
        rows.append(("weights", f"{s['weight_bytes'] / 1e6:.2f} MB{ratio}"))
    acc = final["accuracy"]
    if acc:
        worst = max(v["max_rel_err"] for v in acc["vs_source"].values())
        rows.append((f"max relative change vs the source ({acc['measured_with']})", f"{worst:.2e}"))
    elif final.get("accuracy_note"):
        rows.append(("accuracy", final["accuracy_note"]))
    if final.get("max_drift"):
        m = final["max_drift"]
        rows.append(("--max-drift", f"{m['drift']:.2e} vs limit {m['limit']:g}: {'met' if m['met'] else 'NOT met'}"))
    gen = final.get("generation")
    if gen:
        a = gen["agreement"]
        rows.append(("generation", f"prefill/decode, KV cache of {gen['max_context']} positions "
                     f"({_cache(gen)}); {_agreement(a)}"))
    lat = run.get("latency")
    rows.append(("latency", f"{lat['median_ms']:.2f} ms median of {lat['calls']} calls (p10 {lat['p10_ms']:.2f}, "
                 f"p90 {lat['p90_ms']:.2f})" if lat else f"not measured: {final['latency'].get('reason')}"))
    return "<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows) + "</table>"


def _cache(gen: dict) -> str:
    """"25.1 MB, int8" (an fp32 cache: its bytes only)."""
    kind = gen.get("kv_cache", "fp32")
    return f"{gen['cache_bytes'] / 1e6:.1f} MB" + ("" if kind == "fp32" else f", {kind}")


def _agreement(a: dict) -> str:
    """final.generation.agreement in words (reports before the logit error was measured lack it)."""
    err = a.get("max_rel_logit_error")
    return (f"top-1 agreement with the source model {a['rate']:.3f} over {a['tokens']} teacher-forced positions"
            + ("" if err is None else f", max logit error {err:.1e} relative"))


def _pass_table(passes: list[dict]) -> str:
    head = "<tr><th>pass</th><th>kind</th><th>params MB</th><th>GFLOP</th><th>max rel drift</th></tr>"
    rows = []
    for p in passes:
        pb, fl, drift = p["param_bytes"], p["flops"], (p.get("drift") or {}).get("rel")
        rows.append(f"<tr><td><code>{html.escape(p['text'])}</code></td><td>{p['kind']}</td>"
                    f"<td>{pb['before'] / 1e6:.2f} → {pb['after'] / 1e6:.2f}</td>"
                    f"<td>{fl['before'] / 1e9:.3f} → {fl['after'] / 1e9:.3f}</td>"
                    f"<td>{'-' if drift is None else f'{drift:.2e}'}</td></tr>")
    return "<table>" + head + "".join(rows) + "</table>"


def _pass_plot(passes: list[dict]) -> bytes:
    """Three panels: parameter MB and GFLOPs after each pass (the source first), drift per pass."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = ["source"] + [p["name"] for p in passes]
    mb = [passes[0]["param_bytes"]["before"] / 1e6] + [p["param_bytes"]["after"] / 1e6 for p in passes]
    gflop = [passes[0]["flops"]["before"] / 1e9] + [p["flops"]["after"] / 1e9 for p in passes]
    drift = [max((p.get("drift") or {}).get("rel") or 0.0, 1e-12) for p in passes]
    fig = Figure(figsize=(11, 3.2), dpi=90)
    FigureCanvasAgg(fig)
    for i, (title, xs, ys, color) in enumerate([("parameters, MB", labels, mb, "#4c72b0"),
                                                ("GFLOP per call", labels, gflop, "#55a868"),
                                                ("relative drift (vs the program before)", labels[1:], drift, "#c44e52")]):
        ax = fig.add_subplot(1, 3, i + 1)
        ax.bar(range(len(ys)), ys, color=color)
        ax.set_xticks(range(len(xs)), xs, rotation=45, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
        if i == 2:
            ax.set_yscale("log")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _img(png: bytes, alt: str) -> str:
    return f"<p><img alt='{html.escape(alt)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'></p>"
