"""Accuracy-budget search: find the compression pipeline that is fastest (or smallest) on a target
while the model loses at most `max_drop` accuracy, and compile it.

    search(model_or_program, target, *, max_drop, objective="latency", budget_s=None, work_dir,
           out=None, ...) -> SearchResult

Accuracy drop (measured on the Program in PyTorch: the IR runs, no backend needed):
  causal LM     relative perplexity increase, ppl / ppl(uncompressed) - 1, on the first
                `eval_tokens` tokens of the calibration text (windows of seq_len, stride seq_len)
  encoder       1 - mean cosine of the mean-pooled embeddings vs the uncompressed program, on the
                first `eval_samples` sentences of the calibration text (so 1% = cosine 0.99)
  custom        relative output error ||y - y0|| / ||y0|| (every output, mean over feeds) on
                `eval_samples` random example inputs (programs without a tokenizer)
Passes calibrate on `calibration_samples` windows drawn from the second half of the calibration
text (default tcc/data/calibration.txt), the accuracy is scored on its beginning: never the same text.

Search (greedy, cheap first, every trial recorded; "feasible" = drop <= max_drop * (1 - margin)):
  0. the uncompressed program (the reference; never chosen);
  1. quantization alone: int8 weight-only, W8A8 SmoothQuant, int4 GPTQ (asymmetric), W4A8 (the same int4
     with int8 activations; CPU targets) (and, when asked
     for with quantization=(..., "int4-rotate"), the same int4 after `rotate`), all with int8
     embedding tables; the best feasible one by the objective is kept. A scheme that would beat it
     but misses the budget is retried, with heal_steps, healed through its quantizer first
     (`quantize(...),heal(steps=heal_steps)`: quantization-aware, the codes stay on their grid), then
     with its most sensitive layers at higher precision (quantize's per-layer sensitivity,
     keep = 1, 2, 4, 8, 16: the knee);
  2. structure on top of it, one step at a time: each step tries one more notch of every axis
     still open - drop-attention / drop-mlp (explicit layers, ranked once by analyze-redundancy:
     attention by input/output similarity, MLPs by calibration-loss increase), prune-heads ratio
     1/8 .. 1/2, block-sparse 1x16 SparseGPT 30 .. 70 % - and takes the feasible move with the
     best objective gain per unit of accuracy lost; an axis whose next notch misses the budget (or
     does not improve the objective) is closed.
  Every pipeline the search tries is what `tcc.compile` would run (cleanup `dce` first).

Cost (per trial, in trials.jsonl with its source):
  model     `estimate_cost`: the program as the TVM backend kernelizes it (tcc.backends.tvm.lower),
            per node max(work / kernel throughput, weight bytes / bandwidth); throughputs measured on
            this host (docs/BENCHMARKS.md), scaled by peak ratios for arm64 (an assumption, stated
            in docs/SEARCH.md). size = the bytes the kernelized program stores.
  measured  host targets, objective latency: the uncompressed program and the `measure` best
            candidates on the Pareto front (by the model, within the budget) are compiled, and the
            latency tcc.compile measures is kept (report.json run.latency); the choice ranks measured
            candidates first, by that latency.

Files in `work_dir` (the search is resumable: a rerun with the same directory and settings skips
every finished trial; Ctrl-C loses at most the running one):
  trials.jsonl   one JSON per finished trial ({"kind": "trial"}) or timing ({"kind": "measure"}),
                 keyed by sha256(settings, pipeline text); settings = model fingerprint, target,
                 metric, calibration, sequence shape, tcc version
  analysis-KEY.json  analyze-redundancy's report, run once
  pareto.json    the Pareto front (accuracy drop vs cost) and the chosen point
  tradeoff.png   every trial, the front, the budget and the chosen point
  search.json    `SearchResult.section`: what the report of the artifact shows
  tcc-search.json  the marker that says tcc wrote the directory: a search writes only into a missing or
                 empty directory or one with this marker (or an earlier trials.jsonl), unless `force`
                 (tcc.paths; `out` likewise holds nothing but an earlier artifact unless `force`)
Budget: `budget_s` stops new trials (and timings) once spent; the choice, the held-out check and
the compile run after it.

Choice: the feasible candidate best by the objective is re-measured on held-out text
(`held_out_text`, default tcc/data/held_out.txt; for custom programs, other random inputs): on the
compiled artifact when the target runs on this host, else on the Program. If that drop exceeds
`max_drop` (no margin) the next candidate is taken. No candidate left -> AccuracyBudgetError
(exit 3) and no artifact is written. The chosen artifact goes to `out`, and its report.json /
report.html get the section "search" (tcc.report.add_section) with the plot.

CLI: `tcc compile MODEL --max-accuracy-drop D [--objective latency|size] [--time-limit 20m]
[--search-dir DIR]` (tcc/cli.py's _search_compile calls `search`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np

from . import __version__
from .errors import AccuracyBudgetError, UserError
from .paths import check_dir, read_small_json
from .progress import info, status
from .report import write_json

MARKER = "tcc-search.json"  # in every search directory: a later search (or --force) may write there
SEARCH_FORMAT = "tcc-search/1"

OBJECTIVES = ("latency", "size")
CLEANUP = "dce"  # what tcc.compile runs before any user pipeline (compiler.DEFAULT_CLEANUP)
QUANT = {  # scheme -> quantize options (int8 embedding tables in every scheme)
    "int8": "weights=int8,embeddings=true",
    "w8a8": "acts=int8,method=smoothquant,embeddings=true",
    "int4": "weights=int4,method=gptq,sym=false,embeddings=true",
    "int4-rotate": "weights=int4,method=gptq,sym=false,embeddings=true",  # after `rotate` (ROTATED)
    "w4a8": "weights=int4,method=gptq,sym=false,acts=int8,embeddings=true",  # int4 x int8 integer kernels (CPU)
}
ROTATED = {"int4-rotate"}  # schemes whose pipeline rotates the residual stream first (pre-norm RMSNorm decoders;
#                            others record the trial as an error: rotate refuses them)
# the schemes a search tries unless told: not int4-rotate, which made SmolLM2's int4 worse (docs/BENCHMARKS.md
# "Rotations"); quantization=(..., "int4-rotate") asks for it
DEFAULT_QUANT = ("int8", "w8a8", "int4", "w4a8")
KEEP_STEPS = (1, 2, 4, 8, 16)
HEAD_RATIOS = (0.125, 0.25, 0.375, 0.5)
BLOCK_SPARSITY = (0.3, 0.4, 0.5, 0.6, 0.7)
STRUCTURE = ("drop-attention", "prune-heads", "drop-mlp", "sparsify")  # tried in this order
ORDER = ("drop-attention", "drop-mlp", "prune-heads", "sparsify", "heal", "rotate", "quantize", "heal-quantized")
# heal-quantized: heal after quantize, trained through the quantizer (passes/heal.py), with heal_steps
_clock = time.monotonic  # tests replace it


# -- what the user types --------------------------------------------------------------------------------

def parse_drop(text: str) -> float:
    """'1%' -> 0.01, '0.01' -> 0.01. A fraction without '%' must be below 1."""
    s = str(text).strip()
    pct = s.endswith("%")
    try:
        value = float(s[:-1] if pct else s)
    except ValueError:
        value = math.nan
    if pct:
        value /= 100
    if not math.isfinite(value) or value < 0 or (not pct and value >= 1):
        raise UserError(f"--max-accuracy-drop '{text}' is not an accuracy drop",
                        "give a percentage like 1% or a fraction like 0.01 (>= 0)")
    return value


def parse_duration(text: str) -> float:
    """'20m' -> 1200.0; also '90s', '1h', '1h30m', '300' (seconds)."""
    s = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        seconds = float(s)
    else:
        parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?", s)
        seconds = (sum(float(v or 0) * k for v, k in zip(parts.groups(), (3600, 60, 1)))
                   if parts and any(parts.groups()) else 0.0)
    if not seconds > 0:
        raise UserError(f"--time-limit '{text}' is not a duration", "give e.g. 20m, 90s, 1h30m or seconds")
    return seconds


# -- accuracy --------------------------------------------------------------------------------------------

class _Memo:
    """A program whose outputs are cached by input bytes (the uncompressed reference, run once)."""

    def __init__(self, program):
        self.program, self.inputs, self.cache = program, program.inputs, {}

    def __call__(self, feeds: dict) -> dict:
        key = hashlib.sha1(b"".join(np.ascontiguousarray(feeds[k]).tobytes() for k in sorted(feeds))).hexdigest()
        if key not in self.cache:
            self.cache[key] = self.program(feeds)
        return self.cache[key]


class Metric:
    """The accuracy drop of a compressed program (or artifact) against `reference`; see the module
    docstring. `drop(run, held_out=False) -> (drop, raw metric dict)`."""

    def __init__(self, reference, text, held_out_text, eval_tokens: int, eval_samples: int):
        self.reference = _Memo(reference)
        self.tokenizer_dir = reference.tokenizer_dir
        self.seq_len = reference.inputs[0].shape[-1]
        self.texts = {False: Path(text), True: Path(held_out_text)}
        self.eval_tokens, self.eval_samples = eval_tokens, eval_samples
        self.kind = ("output-error" if not self.tokenizer_dir else
                     "perplexity" if reference.task == "causal-lm" else "cosine")
        if self.kind != "output-error" and reference.inputs[0].shape[0] != 1:
            raise UserError("the accuracy search scores text with batch-1 programs", "search with --batch 1")
        self.description = {
            "perplexity": "relative perplexity increase, ppl / ppl(uncompressed) - 1",
            "cosine": "1 - mean cosine of the mean-pooled embeddings vs the uncompressed model",
            "output-error": "relative output error ||y - y0|| / ||y0||, mean over random inputs",
        }[self.kind]
        self._base: dict[bool, float] = {}

    def settings(self) -> dict:
        files = {str(k).lower(): (p.name, p.stat().st_size if p.exists() else None) for k, p in self.texts.items()}
        return {"kind": self.kind, "texts": files, "eval_tokens": self.eval_tokens, "eval_samples": self.eval_samples}

    def drop(self, run, held_out: bool = False) -> tuple[float, dict]:
        from .evaluate import cosine, perplexity
        text = self.texts[held_out]
        if self.kind == "perplexity":
            if held_out not in self._base:
                self._base[held_out] = perplexity(self.reference, self.tokenizer_dir, text, self.seq_len,
                                                  self.eval_tokens, stride=self.seq_len)["value"]
            r = perplexity(run, self.tokenizer_dir, text, self.seq_len, self.eval_tokens, stride=self.seq_len)
            return r["value"] / self._base[held_out] - 1, {**r, "reference": self._base[held_out]}
        if self.kind == "cosine":
            r = cosine(run, self.reference, self.tokenizer_dir, text, self.seq_len, self.eval_samples)
            return 1 - r["value"], r
        errors = []
        for i in range(self.eval_samples):
            feed = self.reference.program.example_inputs(seed=(2000 if held_out else 1000) + i)
            want, got = self.reference(feed), run(feed)
            ref = np.concatenate([np.ravel(want[k]).astype(np.float64) for k in want])
            new = np.concatenate([np.ravel(got[k]).astype(np.float64) for k in want])
            errors.append(float(np.linalg.norm(new - ref) / max(np.linalg.norm(ref), 1e-30)))
        return float(np.mean(errors)), {"metric": "output-error", "value": float(np.mean(errors)), "feeds": len(errors)}


# -- cost model ------------------------------------------------------------------------------------------

# Throughput of each kernel on this host (2 threads, batch 1, M = 128 tokens, idle machine), in G(FL)OP/s
# of the dense work, from docs/BENCHMARKS.md: MiniLM fp32 17.3 ms with ~70 % in tcc_dense (2.72
# GFLOP -> 225); W8A8 6.95 ms in all (-> ~900 GOP/s for tcc_dense_a8w8); weight-only int8 and int4 run
# 0.97x fp32 at seq 128 (dequantise + sgemm); BSR ~0.7x fp32 per nonzero block (sparse kernel table);
# fused attention ~8 % of MiniLM (0.15 GFLOP -> 108). Everything else is memory traffic: norms (TVM's
# default reduction schedule, 1.7 ms for MiniLM's 2.6 MB of outputs), other element-wise ops, weights
# (the GEMV roofline at M = 1: SmolLM2 qkv 2.2 MB in 48 us) and tcc_unmask (37 GB/s).
# W4A8 (int4 x int8 integer GEMM on the packed codes, benchmarks/gemv_ab.py --m 128, session 17): 0.69-0.84x
# W8A8's GOP/s at group 32 and about 1.0x at group 128 (whole-model prefill 1.00-1.02x) -> ~0.8 x 900.
HOST_GOPS = {"dense": 225.0, "dense_w8": 218.0, "dense_a8w8_packed": 900.0, "dense_w4_packed": 215.0,
             "dense_w4a8_packed": 720.0, "dense_bsr": 160.0, "sdpa": 108.0}
HOST_GBPS = {"norm": 1.5, "elementwise": 30.0, "weights": 40.0, "unmask": 37.0}
CALL_MS = 0.1  # VM overhead per call
INT8_KERNELS = ("dense_a8w8_packed", "dense_w4a8_packed")
# Peak per target relative to this host (fp32 294 GFLOP/s, int8 VNNI 1178 GOP/s, 2 cores at 2.3 GHz).
# arm64 has no hardware here: 2 cores at 2.0 GHz (Cortex-A72: 16 fp32 flop/cycle, int8 without
# dot product ~2x fp32) and 2.5 GHz (Neoverse-N1: 16 flop/cycle, sdot 64 int8 op/cycle) are assumed,
# memory at half the host's bandwidth. Only the ranking of candidates depends on it.
TARGET_SCALE = {"arm64": {"fp32": 64 / 294, "int8": 128 / 1178, "memory": 0.5},
                "arm64-dotprod": {"fp32": 80 / 294, "int8": 320 / 1178, "memory": 0.5}}
_FREE = {"view", "reshape", "_unsafe_view", "unsqueeze", "squeeze", "expand", "getitem", "slice", "select",
         "split_with_sizes", "split", "_assert_tensor_metadata", "dropout", "to", "alias", "detach", "arange",
         "new_ones", "lift_fresh_copy", "sym_size"}
_NORMS = {"layer_norm", "native_layer_norm", "rms_norm", "group_norm"}


def estimate_cost(program, target_name: str) -> dict:
    """{"latency_ms", "size_bytes", "flops"} of `program` on the target by the model above."""
    import torch
    from .pipeline.backend import get_backend
    from .pipeline import propagate_shapes
    from .ir.program import attribute

    gm = get_backend("tvm").cost_model(program)  # the program as the tvm backend runs it (its kernels)
    feeds = program.example_inputs()
    propagate_shapes(gm, [torch.from_numpy(s.check(feeds[s.name])) for s in program.inputs])
    scale = TARGET_SCALE.get(target_name, {"fp32": 1.0, "int8": 1.0, "memory": 1.0})
    attrs = {n.name: attribute(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    seconds, flops = CALL_MS / 1e3, 0
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        kind = getattr(n.target, "_opname", None) or getattr(n.target, "__name__", "").split(".")[0]
        out = n.meta.get("tensor_meta")
        out_bytes = math.prod(out.shape) * out.dtype.itemsize if hasattr(out, "shape") else 0
        weights = sum(attrs[a.name].numel() * attrs[a.name].element_size()
                      for a in n.all_input_nodes if a.name in attrs)
        if kind in HOST_GOPS:
            work = _dense_flops(n, attrs) if kind != "sdpa" else _attention_flops(n)
            flops += work
            rate = HOST_GOPS[kind] * 1e9 * scale["int8" if kind in INT8_KERNELS else "fp32"]
            seconds += max(work / rate, weights / (HOST_GBPS["weights"] * 1e9 * scale["memory"]))
        elif kind not in _FREE and out_bytes:
            bw = HOST_GBPS["unmask" if kind == "unmask" else "norm" if kind in _NORMS else "elementwise"]
            seconds += out_bytes / (bw * 1e9 * scale["memory"])
    seen, size = set(), 0
    for t in list(gm.parameters()) + list(gm.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            size += t.numel() * t.element_size()
    return {"latency_ms": seconds * 1e3, "size_bytes": int(size), "flops": int(flops)}


def _dense_flops(n, attrs) -> int:
    """2 * M * K * N of a dense kernel node, times the stored fraction of a block-sparse weight."""
    out = n.meta["tensor_meta"].shape
    k = n.args[0].meta["tensor_meta"].shape[-1]
    work = 2 * math.prod(out) * k
    if getattr(n.target, "_opname", "") == "dense_bsr":
        values = attrs[n.args[1].name]
        work = work * values.numel() / (out[-1] * k)
    return int(work)


def _attention_flops(n) -> int:
    q, k, v = (a.meta["tensor_meta"].shape for a in n.args[:3])
    rows = math.prod(q[:-1])
    return int(2 * rows * k[-2] * q[-1] + 2 * rows * k[-2] * v[-1])


# -- the search space --------------------------------------------------------------------------------------

@dataclasses.dataclass
class Axis:
    """One kind of compression: `levels[i]` is its pass text at notch i + 1 (notch 0: off)."""
    name: str
    levels: list[str]


def structure_axes(program, analysis: dict | None) -> list[Axis]:
    """drop-attention (by input/output similarity) / drop-mlp (by calibration-loss increase) with
    explicit layers, first and last block kept; prune-heads ratios; block sparsity: the axes this
    program has. The rankings are the ones docs/BENCHMARKS.md found better for each part."""
    axes = []
    if analysis is not None:
        n = len(analysis["blocks"])
        loss = {e["index"]: (e.get("loss_increase") or {}).get("mlp") for e in analysis["blocks"]}
        rankings = {"attention": analysis["ranking"]["attention"],
                    "mlp": sorted((i for i in loss if loss[i] is not None), key=lambda i: (loss[i], i))}
        for part, ranked in rankings.items():
            ranked = [i for i in ranked if i not in (0, n - 1)]
            levels = [f"drop-{part}(layers=[{','.join(str(i) for i in sorted(ranked[:k]))}])"
                      for k in range(1, len(ranked) + 1)]
            if levels:
                axes.append(Axis(f"drop-{part}", levels))
    blocks = program.info.blocks if program.info else []
    heads = [b.attention.num_heads for b in blocks if b.attention is not None]
    if heads and min(heads) >= 2:
        axes.append(Axis("prune-heads", [f"prune-heads(ratio={r})" for r in HEAD_RATIOS]))
    if blocks:
        axes.append(Axis("sparsify", [f"sparsify(pattern=block,block=1x16,sparsity={s},method=sparsegpt)"
                                      for s in BLOCK_SPARSITY]))
    return sorted(axes, key=lambda a: STRUCTURE.index(a.name))


def compose(state: dict[str, str], heal_steps: int = 0) -> str:
    """Pipeline text from {axis: pass text}, in ORDER; heal after structure when asked."""
    parts = dict(state)
    if heal_steps and any(k in parts for k in ("drop-attention", "drop-mlp", "prune-heads")):
        parts["heal"] = f"heal(steps={heal_steps})"
    return ",".join(parts[k] for k in ORDER if parts.get(k))


def pareto_front(points: list[dict], cost: str) -> list[dict]:
    """The points no other point beats on both "drop" and `cost` (lower is better), by drop."""
    ordered = sorted(points, key=lambda p: (p["drop"], p[cost]))
    front, best = [], math.inf
    for p in ordered:
        if p[cost] < best:
            front.append(p)
            best = p[cost]
    return front


# -- trials on disk ----------------------------------------------------------------------------------------

class TrialLog:
    """DIR/trials.jsonl: records appended one line at a time (flushed and fsynced), read back by key."""

    def __init__(self, path: Path):
        self.path = path
        self.records: dict[str, dict] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    self._merge(json.loads(line))
                except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                    pass  # a line cut short by a crash: that trial runs again

    def get(self, key: str) -> dict | None:
        r = self.records.get(key)
        return r if r and "pipeline" in r else None

    def append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._merge(record)

    def _merge(self, record: dict) -> None:
        """A trial and the timings of the same key make one record."""
        self.records.setdefault(record["key"], {}).update({k: v for k, v in record.items() if k != "kind"})


class _OutOfTime(Exception):
    """No new trial may start; the message says why ("time budget" or "trial limit")."""


@dataclasses.dataclass
class SearchResult:
    chosen: dict                 # the trial record compiled (pipeline, drop, costs, held_out)
    pareto: list[dict]          # the front, by drop
    trials: list[dict]          # every trial of this search, in the order they were needed
    section: dict               # what search.json holds (for the artifact's report)
    artifact: Path | None       # the compiled artifact (None when `out` was not given)
    stopped: str                # why the search stopped


# -- the search --------------------------------------------------------------------------------------------

class _Search:
    def __init__(self, program, target, metric: Metric, log: TrialLog, settings_key: str, calibration: list,
                 objective: str, limit: float, deadline: float | None, max_trials: int | None, heal_steps: int,
                 schemes: tuple[str, ...]):
        self.program, self.target, self.metric, self.log = program, target, metric, log
        self.settings_key, self.calibration = settings_key, calibration
        self.cost_name = "latency_ms" if objective == "latency" else "size_bytes"
        self.limit, self.deadline, self.max_trials, self.heal_steps = limit, deadline, max_trials, heal_steps
        self.schemes = schemes
        self.trials: list[dict] = []
        self.seen: set[str] = set()
        self.evaluated = 0  # trials run in this process (not read back from the log)

    # one trial -------------------------------------------------------------------------------------------
    def key(self, text: str) -> str:
        return hashlib.sha256(f"{self.settings_key}\n{text}".encode()).hexdigest()[:20]

    def trial(self, state: dict[str, str], stage: str) -> dict:
        text = compose(state, self.heal_steps)
        key = self.key(text)
        record = self.log.get(key)
        if record is None:
            if stage != "reference":  # the uncompressed program is always measured: it is the reference
                if self.deadline is not None and _clock() >= self.deadline:
                    raise _OutOfTime("time budget")
                if self.max_trials is not None and self.evaluated >= self.max_trials:
                    raise _OutOfTime("trial limit")
            self.log.append({"kind": "trial", **_evaluate(self, state, text, stage)})
            self.evaluated += 1
            record = self.log.get(key)
        if key not in self.seen:
            self.seen.add(key)
            self.trials.append(record)
            cost = record.get(self.cost_name)
            info(f"trial {len(self.trials)}: {text or '(uncompressed)'}: " + (
                f"error {record['error']}" if record.get("error") else
                f"drop {record['drop']:.3%}, {self.cost_name} {cost:.4g} ({record['cost_source']})"))
        return record

    def run_pipeline(self, text: str):
        from .pipeline import PassContext, Pipeline
        program = self.program.clone()
        return Pipeline.parse(f"{CLEANUP},{text}" if text else CLEANUP).run(
            program, PassContext(calibration=self.calibration))

    def feasible(self, r: dict) -> bool:
        return not r.get("error") and r["drop"] <= self.limit

    def cost(self, r: dict) -> float:
        return r[self.cost_name] if not r.get("error") else math.inf

    # the greedy walk -------------------------------------------------------------------------------------
    def walk(self, axes: list[Axis]) -> str:
        base = self.trial({}, "reference")
        try:
            state = self.quantization(base)
            self.structure(state, axes, base)
        except _OutOfTime as e:
            return str(e)
        return "search space done"

    def quantization(self, base: dict) -> dict[str, str]:
        scheme = lambda name, extra="": {**({"rotate": "rotate"} if name in ROTATED else {}),
                                         "quantize": f"quantize({QUANT[name]}{extra})"}
        tried = {name: self.trial(scheme(name), "quantize") for name in self.schemes}
        best = min((r for r in tried.values() if self.feasible(r)), key=self.cost, default=None)
        for name, r in sorted(tried.items(), key=lambda kv: self.cost(kv[1])):
            bar = self.cost(best) if best else self.cost(base)
            if self.feasible(r) or r.get("error") or self.cost(r) >= bar:
                continue
            if self.heal_steps:  # first, the same format healed through its quantizer (codes stay on the grid)
                h = self.trial({**scheme(name), "heal-quantized": f"heal(steps={self.heal_steps})"}, "quantize-heal")
                if self.feasible(h) and self.cost(h) < bar:
                    best = h
                    continue
            for keep in KEEP_STEPS:  # the knee: the fewest sensitive layers kept at higher precision
                k = self.trial(scheme(name, f",keep={keep}"), "quantize-keep")
                if k.get("error"):
                    break
                if self.feasible(k):
                    if self.cost(k) < bar:
                        best = k
                    break
        if best is None or self.cost(best) >= self.cost(base):
            return {}
        return {k: v for k, v in best["state"].items() if k in ("rotate", "quantize", "heal-quantized")}

    def structure(self, state: dict[str, str], axes: list[Axis], base: dict) -> None:
        notch = {a.name: 0 for a in axes}
        current = self.trial(state, "structure") if state else base
        open_axes = list(axes)
        while open_axes:
            moves = []
            for a in list(open_axes):
                if notch[a.name] >= len(a.levels):
                    open_axes.remove(a)
                    continue
                r = self.trial({**state, a.name: a.levels[notch[a.name]]}, "structure")
                if self.feasible(r) and self.cost(r) < self.cost(current):
                    gain = (self.cost(current) - self.cost(r)) / max(r["drop"] - current["drop"], 1e-6)
                    moves.append((gain, a, r))
                else:
                    open_axes.remove(a)  # more of it will only cost more accuracy
            if not moves:
                return
            _, axis, current = max(moves, key=lambda m: m[0])
            state[axis.name] = axis.levels[notch[axis.name]]
            notch[axis.name] += 1


def _evaluate(search: _Search, state: dict[str, str], text: str, stage: str) -> dict:
    """Run one pipeline on a copy of the program, measure its drop and modelled cost."""
    t0 = time.perf_counter()
    record = {"key": search.key(text), "settings": search.settings_key, "pipeline": text, "stage": stage,
              "state": dict(state)}
    try:
        program = search.run_pipeline(text)
        drop, raw = search.metric.drop(program)
        cost = estimate_cost(program, search.target.name)
        record.update(drop=float(drop), metric=raw, param_bytes=program.param_bytes(), cost_source="model", **cost)
    except Exception as e:  # a pass that cannot handle this model closes that branch; the log says why
        record["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    record["seconds"] = round(time.perf_counter() - t0, 2)
    return record


def _refused_schemes(backend, tgt) -> set[str]:
    """The QUANT schemes whose quantize the backend refuses for `tgt` (Backend.check_pipeline: no kernels there)."""
    from .pipeline import Pipeline
    check = getattr(backend, "check_pipeline", None)
    if check is None:
        return set()
    refused = set()
    for name, options in QUANT.items():
        try:
            check(Pipeline.parse(f"quantize({options})"), tgt)
        except UserError:
            refused.add(name)
    return refused


def search(model_or_program, target: str = "x86", *, max_drop: float, objective: str = "latency",
           budget_s: float | None = None, work_dir, out=None, calibration_text=None, calibration_samples: int = 8,
           seq_len: int = 128, batch: int = 1, task: str | None = None, margin: float = 0.1, measure: int = 3,
           eval_tokens: int = 2048, eval_samples: int = 32, held_out_text=None,
           quantization: tuple[str, ...] | None = None, structure: tuple[str, ...] = STRUCTURE,
           heal_steps: int = 0, max_trials: int | None = None, force: bool = False,
           tokenizer=None) -> SearchResult:
    """Search, choose and (with `out`) compile; see the module docstring. `work_dir` and `out` may
    hold only what tcc wrote there (a search directory, an artifact) unless `force`. `quantization` and
    `structure` narrow the search space (names from QUANT and STRUCTURE; quantization defaults to
    DEFAULT_QUANT, less the schemes the backend has no kernels for on the target); `max_trials` caps the
    trials run in this call, the reference (which always runs) included; finished ones read back
    from the log do not count."""
    from .pipeline.backend import get_backend, get_target
    from .compress.calibration import HELD_OUT_TEXT, default_text, is_token_ids
    from .ir.program import Program

    if objective not in OBJECTIVES:
        raise UserError(f"unknown objective '{objective}'", f"choose one of: {', '.join(OBJECTIVES)}")
    if not (isinstance(max_drop, (int, float)) and max_drop >= 0):
        raise UserError(f"max_drop must be a fraction >= 0, got {max_drop!r}", "e.g. 0.01 for 1%")
    if not 0 <= margin < 1:
        raise UserError(f"margin must be in [0, 1), got {margin}")
    if not (isinstance(heal_steps, int) and heal_steps >= 0):
        raise UserError(f"heal steps must be an integer >= 0, got {heal_steps!r}", "e.g. --heal-steps 50")
    tgt = get_target(target)
    unknown = sorted(set(quantization or ()) - set(QUANT)) + sorted(set(structure) - set(STRUCTURE))
    if unknown:
        raise UserError(f"unknown search axes {unknown}", f"quantization: {list(QUANT)}; structure: {list(STRUCTURE)}")
    no_kernels = _refused_schemes(get_backend("tvm"), tgt)
    if quantization is None:
        quantization = tuple(q for q in DEFAULT_QUANT if q not in no_kernels)
    elif no_kernels & set(quantization):
        raise UserError(f"quantization scheme(s) {sorted(no_kernels & set(quantization))} have no {tgt.name} kernels",
                        "leave them out for this target, or search a CPU target")
    if out is not None:
        from .artifact import WHAT, is_artifact
        check_dir(out, WHAT, is_artifact, force)
    check_dir(work_dir, "search directory (--search-dir)", is_search_dir, force)
    if out is not None:
        get_backend("tvm").check_toolchain(tgt)
    work = Path(work_dir)
    t0 = _clock()
    deadline = None if budget_s is None else t0 + budget_s
    work.mkdir(parents=True, exist_ok=True)
    write_json(work / MARKER, {"format": SEARCH_FORMAT, "tcc_version": __version__})

    if isinstance(model_or_program, Program):
        program = model_or_program
    else:
        from .frontends.frontend import trace
        program = trace(model_or_program, task=task, seq_len=seq_len, batch=batch)
    if tokenizer is not None:  # --tokenizer DIR: the model's own was not saved with it
        from .evaluate import attach_tokenizer
        attach_tokenizer(program, tokenizer)
    text = Path(calibration_text) if calibration_text else default_text()
    scored = default_text() if is_token_ids(text) else text  # token-id calibration: the metric reads text
    metric = Metric(program, scored, held_out_text or HELD_OUT_TEXT, eval_tokens, eval_samples)
    calibration = _calibration(program, text, calibration_samples)
    settings = {"model": program.fingerprint(), "target": tgt.name, "metric": metric.settings(),
                "calibration": {"text": text.name, "samples": calibration_samples, "start": 0.5},
                "inputs": [s.to_json() for s in program.inputs], "tcc": __version__}
    settings_key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    log = TrialLog(work / "trials.jsonl")
    analysis = _analysis(program, calibration, work / f"analysis-{settings_key}.json") \
        if {"drop-attention", "drop-mlp"} & set(structure) else None
    axes = [a for a in structure_axes(program, analysis) if a.name in structure]

    limit = max_drop * (1 - margin)
    s = _Search(program, tgt, metric, log, settings_key, calibration, objective, limit, deadline, max_trials,
                heal_steps, tuple(quantization))
    info(f"searching {len(axes)} structure axes and {len(quantization)} quantization schemes for the "
         f"{'fastest' if objective == 'latency' else 'smallest'} pipeline within {max_drop:.2%} accuracy drop "
         f"({metric.kind}; candidates need <= {limit:.2%}, margin {margin:.0%})")
    stopped = s.walk(axes)
    candidates = sorted((r for r in s.trials if r["stage"] != "reference" and s.feasible(r)), key=s.cost)
    if objective == "latency" and tgt.is_host and measure > 0:  # the reference and the best of the front
        front = {r["key"] for r in pareto_front([r for r in s.trials if not r.get("error")], s.cost_name)}
        _measure(s, s.trials[:1] + [r for r in candidates if r["key"] in front][:measure], program, calibration,
                 work, deadline)
    measured = sorted((r for r in candidates if r.get("measured")), key=lambda r: r["measured"]["latency_ms"])
    order = measured + [r for r in candidates if not r.get("measured")]

    chosen, artifact = _choose(s, order, program, calibration, work, out is not None, max_drop)
    section = _section(s, metric, objective, max_drop, margin, chosen, stopped, _clock() - t0, work)
    _write_results(work, section, s.trials, chosen, s.cost_name, max_drop, limit)
    if artifact is not None:
        from . import report as reports
        artifact = _install(artifact, Path(out), force)
        reports.add_section(artifact, "search", section, images=[work / "tradeoff.png"])
    shutil.rmtree(work / "artifacts", ignore_errors=True)  # the timed candidates
    if chosen is None:
        best = min((r for r in s.trials if r["stage"] != "reference" and not r.get("error")),
                   key=lambda r: r["drop"], default=None)
        seen = f"; the smallest drop seen was {best['drop']:.2%} ({best['pipeline']})" if best else ""
        raise AccuracyBudgetError(
            f"no pipeline found within {max_drop:.2%} accuracy drop after {len(s.trials)} trials ({stopped}){seen}",
            f"raise --max-accuracy-drop or --time-limit, or compile without a search; trials in {work / 'trials.jsonl'}")
    info(f"[green]chose[/green] {chosen['pipeline']}: drop {chosen['drop']:.3%} "
         f"(held-out {chosen['held_out']['drop']:.3%})")
    return SearchResult(chosen, section["pareto"], s.trials, section, artifact, stopped)


def _choose(s: _Search, order: list[dict], program, calibration: list, work: Path, compile_it: bool,
            max_drop: float) -> tuple[dict | None, Path | None]:
    """The first candidate whose held-out drop is within `max_drop`, and its artifact (compiled when
    `compile_it`); a candidate that fails loses its artifact and the next one is tried."""
    for r in order:
        artifact = _artifact(s, r, program, calibration, work) if compile_it else None
        r["held_out"] = _held_out(s, r, artifact)
        if r["held_out"]["drop"] <= max_drop:
            return r, artifact
        info(f"held-out drop {r['held_out']['drop']:.3%} of {r['pipeline']} exceeds {max_drop:.2%}: next candidate")
        if artifact is not None:
            shutil.rmtree(artifact, ignore_errors=True)
    return None, None


def _calibration(program, text: Path, n: int) -> list[dict]:
    """Calibration feeds: windows of token ids (.npy / .npz), windows from the second half of the text
    (the search scores the start), or random example inputs for a program without a tokenizer."""
    from .compress.calibration import id_feeds, is_token_ids
    if is_token_ids(text):
        return id_feeds(program, text, n_samples=n)
    if not program.tokenizer_dir:
        return [program.example_inputs(seed=i) for i in range(n)]
    from .compress.calibration import text_feeds
    return text_feeds(program, text, n_samples=n, start=0.5)


def _analysis(program, calibration: list, path: Path) -> dict | None:
    """analyze-redundancy's loss increases (run once, cached in `path`); None when the model has no
    blocks it can measure."""
    if path.exists():
        return json.loads(path.read_text())
    if not program.info or not program.info.blocks:
        return None
    from .compress.redundancy import analyze
    with status("analyze-redundancy (once, for drop-attention / drop-mlp)"):
        try:
            report = analyze(program, calibration, heads=False, loss=True, loss_parts=("mlp",), loss_samples=4,
                             source=f"{len(calibration)} calibration feeds of the search")  # what structure_axes reads
        except UserError as e:
            info(f"no drop-attention / drop-mlp axes: {e}")
            return None
    write_json(path, report)
    return report


def _measure(s: _Search, candidates: list[dict], program, calibration, work: Path, deadline) -> None:
    """Compile candidates for this host and keep the latency tcc.compile measures (report.json
    run.latency: median of a few calls after a warm-up); the timings go to the log ("measure")."""
    from . import report as reports
    for r in candidates:
        if r.get("measured"):
            continue
        if deadline is not None and _clock() >= deadline:
            return
        t0 = time.perf_counter()
        report = reports.read(_artifact(s, r, program, calibration, work))
        latency = report["run"].get("latency")
        if not latency:
            continue
        measured = {"latency_ms": latency["median_ms"], "calls": latency["calls"],
                    "weight_bytes": report["final"]["size"]["weight_bytes"],
                    "seconds": round(time.perf_counter() - t0, 1)}
        s.log.append({"kind": "measure", "key": r["key"], "measured": measured})
        info(f"measured {r['pipeline']}: {measured['latency_ms']:.2f} ms (model: {r['latency_ms']:.2f} ms)")


def _artifact(s: _Search, r: dict, program, calibration: list, work: Path) -> Path:
    """The candidate compiled by tcc.compile into work/artifacts/KEY (kept from an earlier timing)."""
    from .compiler import compile
    dir = work / "artifacts" / r["key"]
    if not (dir / "manifest.json").exists():
        compile(program, s.target.name, out=dir, pipeline=r["pipeline"], calibration=calibration,
                latency=True, evaluate=False, baseline=False).close()  # the search scores its own held-out metric
    return dir


def _held_out(s: _Search, r: dict, artifact: Path | None) -> dict:
    """The candidate's drop on held-out data: on the artifact when it runs on this host, else on the
    Program (the pipeline run again: the same feeds give the same program)."""
    if artifact is not None and s.target.is_host:
        from .runtime import load
        with load(artifact) as art:
            drop, raw = s.metric.drop(art, held_out=True)
        on = "artifact"
    else:
        drop, raw = s.metric.drop(s.run_pipeline(r["pipeline"]), held_out=True)
        on = "program"
    return {"drop": float(drop), "measured_on": on, "data": str(s.metric.texts[True]) if s.metric.kind != "output-error"
            else "random inputs (seeds 2000+)", "metric": raw}


def _install(artifact: Path, out: Path, force: bool = False) -> Path:
    """Move the chosen artifact to `out` (replacing what is there only now, as tcc.compile does)."""
    from .artifact import Staging
    with Staging(out, force) as stage:
        os.rmdir(stage.dir)
        shutil.move(str(artifact), str(stage.dir))
        return stage.commit()


def is_search_dir(work: Path) -> bool:
    """Whether `work` is a directory a search wrote: its marker file, or (from before the marker) a
    trials.jsonl whose first line is a trial record."""
    if (read_small_json(work / MARKER) or {}).get("format") == SEARCH_FORMAT:
        return True
    try:
        with open(work / "trials.jsonl") as f:
            first = json.loads(f.readline(1 << 20))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(first, dict) and first.get("kind") in ("trial", "measure") and "key" in first


def _point(r: dict) -> dict:
    keys = ("pipeline", "drop", "cost", "latency_ms", "size_bytes", "flops", "cost_source", "measured", "held_out",
            "stage", "key")
    return {k: r[k] for k in keys if k in r}


def _section(s: _Search, metric: Metric, objective: str, max_drop: float, margin: float, chosen: dict | None,
             stopped: str, seconds: float, work: Path) -> dict:
    """The search's part of the artifact report (also DIR/search.json)."""
    ok = [r for r in s.trials if not r.get("error")]
    for r in ok:  # the front is drawn on the modelled cost, which every trial has
        r["cost"] = r[s.cost_name]
    reference = next(r for r in s.trials if r["stage"] == "reference")
    return {
        "objective": objective, "cost": s.cost_name, "target": s.target.name,
        "max_drop": max_drop, "margin": margin, "limit": s.limit,
        "metric": {"kind": metric.kind, "description": metric.description, "search_data": str(metric.texts[False])
                   if metric.kind != "output-error" else "random inputs (seeds 1000+)",
                   "eval_tokens": metric.eval_tokens, "eval_samples": metric.eval_samples},
        "cost_model": "modelled: kernelized program, per-kernel throughput measured on this host "
                      "(tcc.search.HOST_GOPS)" + ("" if s.target.is_host else
                                                  f", scaled by assumed peak ratios for {s.target.name}")
                      + "; measured: compiled and timed on this host",
        "reference": _point(reference),
        "chosen": _point(chosen) if chosen else None,
        "pareto": [_point(r) for r in pareto_front(ok, "cost")],
        "trials": len(s.trials), "trials_run": s.evaluated, "failed": sum(1 for r in s.trials if r.get("error")),
        "stopped": stopped, "seconds": round(seconds, 1),
        "files": {k: str(work / k) for k in ("trials.jsonl", "pareto.json", "tradeoff.png", "search.json")},
    }


def _write_results(work: Path, section: dict, trials: list[dict], chosen: dict | None, cost: str,
                   max_drop: float, limit: float) -> None:
    write_json(work / "pareto.json", {"objective": section["objective"], "cost": cost, "max_drop": max_drop,
                                      "points": section["pareto"], "chosen": section["chosen"]})
    write_json(work / "search.json", section)
    plot(trials, chosen, work / "tradeoff.png", section, max_drop, limit)


def plot(trials: list[dict], chosen: dict | None, path: Path, section: dict, max_drop: float, limit: float) -> None:
    """Accuracy drop vs cost: every trial, the Pareto front, the budget (and its margin), the choice."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in trials if not r.get("error")]
    ms = section["cost"] == "latency_ms"
    scale = 1.0 if ms else 1e-6
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    ax.scatter([100 * r["drop"] for r in ok], [scale * r["cost"] for r in ok], s=18, color="0.6",
               label="trials (model)")
    front = section["pareto"]
    ax.step([100 * p["drop"] for p in front], [scale * p["cost"] for p in front], where="post", color="tab:blue",
            marker="o", ms=4, label="Pareto front (model)")
    timed = [r for r in ok if ms and r.get("measured")]
    for r in timed:
        ax.plot([100 * r["drop"]] * 2, [r["cost"], r["measured"]["latency_ms"]], color="tab:orange", lw=0.8)
    if timed:
        ax.scatter([100 * r["drop"] for r in timed], [r["measured"]["latency_ms"] for r in timed], facecolors="none",
                   edgecolors="tab:orange", label="compiled and timed")
    ref = section["reference"]
    ax.scatter([100 * ref["drop"]], [scale * ref["cost"]], marker="s", color="black", zorder=3, label="uncompressed")
    if chosen is not None:
        ax.scatter([100 * chosen["drop"]], [scale * chosen["cost"]], marker="*", s=220, color="tab:red", zorder=4,
                   label="chosen")
    ax.axvline(100 * max_drop, color="tab:red", lw=1, label=f"budget {max_drop:.2%}")
    ax.axvline(100 * limit, color="tab:red", lw=1, ls="--", label=f"with margin {limit:.2%}")
    ax.set_xscale("symlog", linthresh=max(100 * max_drop, 0.01))
    ax.set_xlim(left=min([0.0] + [100 * r["drop"] for r in ok]) - 0.05 * max(100 * max_drop, 0.01))
    ax.set_xlabel(f"accuracy drop, % ({section['metric']['kind']})")
    ax.set_ylabel(f"latency, ms ({section['target']})" if ms else "weight bytes, MB")
    ax.set_title(f"tcc search: {len(ok)} trials, objective {section['objective']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# -- the CLI branch of `tcc compile` ----------------------------------------------------------------------
