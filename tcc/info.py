"""`tcc info ARTIFACT`: what an artifact is, what was done to the model, what the compile measured.

Read from the artifact's manifest.json and report.json (and the safetensors header for the weight
formats); nothing is loaded or run. `describe(dir)` returns the JSON that `tcc info --json` prints:

  artifact   absolute path; format, tcc_version, created (UTC), host
  model      source {kind, path, model_type | class, sha256}, task, inputs, outputs (specs)
  target     name, description (as `tcc targets` gives it), arch, device; backend
  formats    weights: {dtype: bytes} of weights.safetensors; for causal LMs built with generation:
             kv_cache ("fp32" | "int8"), max_context (positions), cache_bytes, functions (prefill, decode)
  pipeline   canonical text (every option), preset (the tcc.pipeline.presets name it equals, or null),
             passes [{name, text (non-default options), seconds, param_bytes {before, after}, drift_rel}]
  sizes      weight_bytes, source_param_bytes, ratio
  measured   accuracy (report final.accuracy), generation (final.generation), max_drift,
             latency (report run.latency or null, with the reason when not measured: the artifact's
             times, the baseline's and the speed-up), task_accuracy (report final.task_accuracy),
             summary (the report's summary line),
             compile {seconds (trace, build, passes), peak_rss_gb}
             and the names of any extra report sections (e.g. search)
`format_text(info)` renders it for people.
"""
from __future__ import annotations

import json
from pathlib import Path

from .artifact import read_manifest
from .paths import read_small_json


def describe(dir) -> dict:
    dir = Path(dir)
    m = read_manifest(dir)
    report = read_small_json(dir / "report.json") or {}
    run, final = m.get("run") or {}, report.get("final") or {}
    gen = m.get("generation")
    target = m.get("target") or {}
    return {
        "artifact": {"path": str(dir.resolve()), "format": m.get("format"), "tcc_version": m.get("tcc_version"),
                     "created": run.get("created"), "host": run.get("host")},
        "model": {"source": m.get("source") or {}, "task": m.get("task"), "inputs": m.get("inputs", []),
                  "outputs": m.get("outputs", [])},
        "target": {"name": target.get("name"), "description": _target_line(target.get("name")),
                   "arch": target.get("arch"), "device": target.get("device", "cpu"), "backend": m.get("backend")},
        "formats": {"weights": _weight_dtypes(dir / "weights.safetensors"),
                    **({"kv_cache": gen.get("kv_cache", "fp32"), "max_context": gen.get("max_context"),
                        "cache_bytes": gen.get("cache_bytes"), "functions": sorted(gen.get("functions") or [])}
                       if gen else {})},
        "pipeline": {"canonical": m.get("pipeline"), "preset": _preset(m.get("pipeline")),
                     "passes": [_pass(r, run) for r in m.get("passes", [])]},
        "sizes": {**(sizes := m.get("sizes") or {}), "ratio": round(sizes["weight_bytes"] / sizes["source_param_bytes"], 6)
                  if sizes.get("weight_bytes") and sizes.get("source_param_bytes") else None},
        "measured": {"accuracy": final.get("accuracy"), "accuracy_note": final.get("accuracy_note"),
                     "generation": final.get("generation"), "max_drift": final.get("max_drift"),
                     "latency": (report.get("run") or {}).get("latency"),
                     "latency_reason": (final.get("latency") or {}).get("reason"),
                     "task_accuracy": final.get("task_accuracy"),
                     "summary": _summary(report),
                     "compile": {"seconds": run.get("seconds"), "peak_rss_gb": (run.get("memory") or {}).get("peak_rss_gb")},
                     "report_sections": sorted(set(report) - _REPORT_KEYS)},
    }


_REPORT_KEYS = {"schema", "tcc_version", "model", "target", "backend", "pipeline", "passes", "final", "run", "sparsity"}


def _summary(report: dict) -> str | None:
    """The report's summary line (size, speed-up against the baseline, task accuracy), or None for an
    artifact without a report that says them."""
    from .report import summary
    try:
        return summary(report) if report.get("final") else None
    except (KeyError, TypeError, ValueError):  # a report from an older tcc
        return None


def _target_line(name: str | None) -> str | None:
    from .pipeline.backend import targets
    return dict(targets()).get(name)


def _weight_dtypes(path: Path) -> dict:
    from .frontends.models import SAFETENSORS_DTYPES, safetensors_header
    if not path.is_file():
        return {}
    out: dict[str, int] = {}
    for key, t in safetensors_header(path).items():
        if key != "__metadata__":
            dtype = SAFETENSORS_DTYPES.get(t["dtype"], t["dtype"].lower())
            out[dtype] = out.get(dtype, 0) + t["data_offsets"][1] - t["data_offsets"][0]
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _short(text: str) -> str:
    """A pass's canonical text with only its non-default options (the canonical text if this tcc
    cannot parse it: a plugin that is not installed, an option renamed since)."""
    from .errors import UserError
    from .pipeline import Pipeline
    try:
        return str(Pipeline.parse(text))
    except UserError:
        return text


def _preset(pipeline: str | None) -> str | None:
    from .errors import UserError
    from .pipeline.presets import matching
    try:
        return matching(pipeline) if pipeline else None
    except UserError:
        return None


def _pass(record: dict, run: dict) -> dict:
    seconds = dict((n, s) for n, s in (run.get("seconds") or {}).get("passes", []))  # last of a repeated pass
    return {"name": record.get("pass"), "text": _short(record.get("text", record.get("pass", ""))),
            "seconds": seconds.get(record.get("pass")), "param_bytes": record.get("param_bytes"),
            "drift_rel": (record.get("drift") or {}).get("rel")}


def _mb(n) -> str:
    return f"{n / 1e6:.2f} MB" if isinstance(n, (int, float)) else "?"


def _spec(s: dict) -> str:
    return f"{s.get('name')} {s.get('dtype')} {s.get('shape')}"


def format_text(info: dict) -> str:
    from .report import _agreement
    a, mo, t, f, p, sz, me = (info[k] for k in ("artifact", "model", "target", "formats", "pipeline", "sizes", "measured"))
    src = mo["source"]
    kind = ", ".join(str(v) for v in (src.get("kind"), src.get("model_type") or src.get("class")) if v)
    lines = [("artifact", f"{a['path']}  ({a['format']}, tcc {a['tcc_version']}, created {a['created']} on {a['host']})"),
             ("model", f"{src.get('path', '?')} ({kind}), task {mo['task']}"),
             ("inputs", ", ".join(_spec(s) for s in mo["inputs"])),
             ("outputs", ", ".join(_spec(s) for s in mo["outputs"])),
             ("target", f"{t['name']}: {t['description'] or t['arch']}; backend {t['backend']}")]
    ratio = f" ({sz['ratio']:.3f}x the source's {_mb(sz.get('source_param_bytes'))})" if sz.get("ratio") else ""
    dtypes = ", ".join(f"{d} {_mb(n)}" for d, n in f["weights"].items())
    lines.append(("weights", f"{_mb(sz.get('weight_bytes'))}{ratio}" + (f": {dtypes}" if dtypes else "")))
    if "functions" in f:
        lines.append(("generation", f"functions {', '.join(f['functions'])}; KV cache {f['kv_cache']}, "
                                    f"{f['max_context']} positions, {_mb(f['cache_bytes'])}"))
    shown = ",".join(x["text"] for x in p["passes"]) or "(none)"
    lines.append(("pipeline", shown + (f"  (preset {p['preset']})" if p["preset"] else "")))
    for x in p["passes"]:
        pb, drift, sec = x.get("param_bytes") or {}, x.get("drift_rel"), x.get("seconds")
        lines.append(("", f"  {x['name']}: {'?' if sec is None else f'{sec:.2f}'} s, params "
                          f"{_mb(pb.get('before'))} -> {_mb(pb.get('after'))}, output drift "
                          f"{'?' if drift is None else f'{drift:.1e}'} (max relative, vs the program before it)"))
    acc = me["accuracy"]
    for name, v in ((acc or {}).get("vs_source") or {}).items():
        lines.append(("accuracy", f"{name}: max abs change vs the source model {v['max_abs_err']:.2e} "
                                  f"(relative to its max |value|: {v['max_rel_err']:.2e}; {acc.get('measured_with')})"))
    if not acc and me.get("accuracy_note"):
        lines.append(("accuracy", me["accuracy_note"]))
    if me.get("max_drift"):
        md = me["max_drift"]
        lines.append(("max drift", f"{md['drift']:.2e} vs limit {md['limit']:g}: {'met' if md['met'] else 'NOT met'}"))
    if me.get("generation") and me["generation"].get("agreement"):
        lines.append(("generation", _agreement(me["generation"]["agreement"])))
    lat = me["latency"]
    lines.append(("latency", f"{lat['median_ms']:.3f} ms median of {lat['calls']} calls (p10 {lat['p10_ms']:.3f}, "
                             f"p90 {lat['p90_ms']:.3f}; `tcc bench` for a comparison)" if lat else
                  f"not measured: {me.get('latency_reason') or 'no report'}"))
    if me.get("summary"):
        lines.append(("summary", me["summary"]))
    sec, rss = me["compile"]["seconds"] or {}, me["compile"]["peak_rss_gb"]
    parts = [f"{k} {sec[k]} s" for k in ("trace", "build", "total") if isinstance(sec.get(k), (int, float))]
    lines.append(("compile", ", ".join(parts + ([f"peak RSS {rss} GB"] if rss is not None else [])) or "?"))
    if me["report_sections"]:
        lines.append(("report", "also: " + ", ".join(me["report_sections"]) + " (report.json)"))
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in lines)


def to_json(info: dict) -> str:
    return json.dumps(info, indent=2, default=str)
