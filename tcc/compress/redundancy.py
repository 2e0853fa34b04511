"""Redundancy analysis, the library behind `analyze-redundancy` (passes/analyze_redundancy.py, whose
docstring describes the report) and the drop-* passes and `tcc compile --max-accuracy-drop` that
read it: `analyze(program, feeds, ...)` measures how much each block, attention sub-block, MLP
sub-block and head matters (cosine similarity of the residual stream across it, calibration-loss
increase without it); `measured(report)` lists what a report holds; `capped` cuts feeds to the
analysis window; `redundancy(program, ctx)` is the pipeline's report when it covers the program,
else a fresh one. `choose` is how drop-attention, drop-mlp and drop-blocks pick what to remove (by
count, ratio, threshold or explicit layers, ranked by the report: the latest in the pipeline that
covers every block - one-shot, as in ShortGPT: passes since may have changed the model; run
analyze-redundancy again to re-measure - else a fresh analysis on the calibration feeds or the
default calibration text).
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch

from ..ir.runner import GraphRunner
from .calibration import CalibrationLoss
from .elimination import ANALYSIS, PARTS, block_weights, sites
from ..errors import UserError
from ..pipeline import Option, PassContext, format_value
from ..memory import peak_bytes, recorded, stage
from ..ir.program import Program, attribute as _attr
from ..progress import info as status_line, work

WINDOW = 256  # default analysis window (tokens), whatever --seq-len
BATCH = 8  # default partial runs per batched forward
OUTPUT_BYTES = 1 << 29  # a batch's outputs (logits) stay under 512 MiB


# -- measure ----------------------------------------------------------------------------------------

def analyze(program: Program, feeds: list[dict], *, heads: bool = True, loss: bool = True, head_loss: bool = True,
            loss_parts: tuple[str, ...] = PARTS, loss_samples: int = 0, source: str = "", window: int = WINDOW,
            batch: int = BATCH) -> dict:
    """The report described in the module docstring (without "files"); loss increases of `loss_parts`
    (and of heads with `head_loss`) are measured on the first `loss_samples` feeds (0: all), `batch`
    partial runs per batched forward; feeds longer than `window` tokens are cut to their first `window`
    when the program takes shorter sequences (0: never)."""
    t0, cpu0 = time.perf_counter(), time.process_time()
    info = program.info
    if info is None or not info.blocks:
        raise UserError("analyze-redundancy: no transformer blocks recognised in this model",
                        "run `tcc analyze MODEL --structure` to see what tcc recovers")
    if not feeds:
        raise UserError("analyze-redundancy needs at least one calibration feed")
    feeds = capped(program, feeds, window)
    runner = GraphRunner(program.gm)
    where = sites(program, lenient=True)  # a part without a residual connection gets no numbers
    heads_at = _head_inputs(program) if heads else {}
    record = {name for s in where for site in s.values() if site for name in site.needs} | set(heads_at.values())
    loss_feeds = feeds[:loss_samples or len(feeds)]
    loss = loss and bool(loss_parts or (heads_at and head_loss))
    objective = CalibrationLoss(program, loss_feeds) if loss else None
    changes = _changes(runner, where, heads_at if head_loss else {}, program, loss_parts) if loss else {}
    batch = min(batch, _batch_limit(program, feeds[0])) if _can_batch(program.gm) else 1
    groups = _groups(runner, changes, batch)
    snapshot_at = {start for start, _ in groups}

    n_blocks = len(info.blocks)
    sim = {(i, p): [0.0, 0.0] for i in range(n_blocks) for p in PARTS}  # (sum, weight)
    norms = {i: np.zeros(len(info.blocks[i].attention.o_heads)) for i in heads_at}
    base_terms, change_terms = [], {key: [] for key in changes}
    n_nodes = len(runner.nodes)
    per_feed = sum(len(keys) * (1 - start / n_nodes) for start, keys in groups)  # in forward passes
    total = len(feeds) + len(loss_feeds) * per_feed
    runs = f", {len(changes)} partial runs on each of the first {len(loss_feeds)}" if changes else ""
    with stage(ANALYSIS), work(f"analyze-redundancy: {len(feeds)} feeds of {_length(feeds[0])} tokens{runs}",
                               total) as advance:
        for f, feed in enumerate(feeds):
            args = [torch.from_numpy(spec.check(feed[spec.name])) for spec in program.inputs]
            measure_loss = objective is not None and f < len(loss_feeds)
            clean = runner.run(args, record=record, snapshot_at=snapshot_at if measure_loss else ())
            weights = _token_weights(feed, clean.values, where)
            for i, parts in enumerate(where):
                for p, s in parts.items():
                    if s is not None:
                        cos = _cosine(*_streams(s, clean.values))
                        w = _rows(weights, len(cos))
                        sim[i, p][0] += float(cos @ w)
                        sim[i, p][1] += float(w.sum())
            for i, name in heads_at.items():
                x = clean.values[name]
                norms[i] += _head_norms(program, info.blocks[i].attention, x, _rows(weights, x[..., 0].numel()))
            advance(1)
            if not measure_loss:
                continue
            base_terms.append(objective.terms(f, clean.outputs))
            for start, keys in groups:
                outputs = _run_group(runner, [changes[k][1] for k in keys], start, clean.snapshots[start])
                for j, key in enumerate(keys):
                    change_terms[key].append(objective.terms(f, [o[j] for o in outputs]))
                del outputs
                advance(len(keys) * (1 - start / n_nodes))
            del clean

    base = CalibrationLoss.combine(base_terms) if objective else None
    increase = {key: CalibrationLoss.combine(t) - base for key, t in change_terms.items()}
    blocks = []
    for i, b in enumerate(info.blocks):
        similarity = {p: (round(sim[i, p][0] / sim[i, p][1], 6) if sim[i, p][1] else None) for p in PARTS}
        entry = {"index": i, "name": b.name, "weights": block_weights(b), "similarity": similarity,
                 "loss_increase": ({p: _round(increase.get((i, p))) for p in PARTS} if loss else None), "heads": None}
        if i in heads_at:
            n = norms[i] / len(feeds)
            entry["heads"] = {"norm": [_round(v) for v in n], "share": [_round(v) for v in n / max(n.sum(), 1e-30)],
                              "loss_increase": ([_round(increase.get((i, "head", h))) for h in range(len(n))]
                                                if loss and head_loss else None)}
        blocks.append(entry)
    ranking = {p: sorted((e["index"] for e in blocks if e["similarity"][p] is not None),
                         key=lambda i: (-blocks[i]["similarity"][p], i)) for p in PARTS}
    n_batch, seq_len = next(iter(feeds[0].values())).shape[:2]
    what = (["similarity"] + [f"loss:{p}" for p in loss_parts if loss] + (["heads"] if heads_at else [])
            + (["head_loss"] if heads_at and loss and head_loss else []))
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    step = recorded(ANALYSIS)
    peak = step["peak_gb"] * 1e9 if step else peak_bytes()
    status_line(f"analyze-redundancy: {seconds:.1f} s ({cpu:.1f} s CPU), measured {', '.join(what)}; peak RSS "
                f"{peak / 1e9:.2f} GB ({peak / max(program.param_bytes(), 1):.1f}x the weights)")
    return {
        "model": program.source.get("path") or program.source.get("class") or "",
        "task": program.task,
        "method": "cosine similarity of the hidden states entering and leaving each part, per token; loss increase "
                  "when the part is removed as drop-* removes it; head norm = |x_h W_o[:, h]^T|",
        "calibration": {"source": source, "feeds": len(feeds), "loss_feeds": len(loss_feeds) if loss else 0,
                        "batch": int(n_batch), "seq_len": int(seq_len)},
        "loss": {"kind": objective.kind, "base": _round(base)} if objective else None,
        "measured": what,
        "blocks": blocks,
        "ranking": ranking,
        "seconds": round(seconds, 2),
    }


def measured(report: dict) -> list[str]:
    """What a report holds ("similarity", "loss:PART", "heads", "head_loss"); inferred for reports
    written before the "measured" key."""
    if "measured" in report:
        return list(report["measured"])
    heads = [b.get("heads") for b in report.get("blocks", []) if b.get("heads")]
    return (["similarity"] + ([f"loss:{p}" for p in PARTS] if report.get("loss") else []) + (["heads"] if heads else [])
            + (["head_loss"] if heads and all(h.get("loss_increase") is not None for h in heads) else []))


def capped(program: Program, feeds: list[dict], window: int) -> list[dict]:
    """`feeds` with their sequence inputs cut to the first `window` tokens, when the program takes
    that length (a dynamic sequence axis); else as given."""
    dims = {s.name: s for s in program.inputs if 1 in s.dynamic_dims}
    if not window or not dims or any(s.min_shape and s.min_shape[1] > window for s in dims.values()):
        return feeds
    return [{k: (v[:, :window] if k in dims else v) for k, v in feed.items()} for feed in feeds]


def _length(feed: dict) -> int:
    return int(next(iter(feed.values())).shape[1])


# -- batched partial runs ------------------------------------------------------------------------------

def _can_batch(gm) -> bool:
    """Whether torch.func.vmap runs every op of the graph (aten ops do; tcc's custom ops have no batching rule)."""
    return all(getattr(n.target, "namespace", "aten") in ("aten", "prims") for n in gm.graph.nodes
               if n.op == "call_function")


def _batch_limit(program: Program, feed: dict) -> int:
    """Partial runs per batch so that their outputs (logits for a causal LM) stay under OUTPUT_BYTES."""
    out = sum(max(1, int(np.prod(s.shape[2:] if len(s.shape) > 2 else (1,)))) for s in program.outputs) * 4
    return max(1, OUTPUT_BYTES // max(1, out * _length(feed) * next(iter(feed.values())).shape[0]))


def _groups(runner: GraphRunner, changes: dict, batch: int) -> list[tuple[int, list]]:
    """[(resume position, change keys)]: the changes in order of position, `batch` at a time; each
    group resumes at its earliest change."""
    keys = sorted(changes, key=lambda k: changes[k][0])
    return [(changes[keys[i]][0], keys[i:i + batch]) for i in range(0, len(keys), batch)]


def _run_group(runner: GraphRunner, patch_sets: list[dict], start: int, snapshot: dict) -> list[torch.Tensor]:
    """The outputs of the partial runs resuming at `start`, one per patch set, stacked on a new first
    axis: one run batched by torch.func.vmap (sample k applies patch set k), or a single run."""
    if len(patch_sets) == 1:
        return [o.unsqueeze(0) for o in runner.run(None, patches=patch_sets[0], resume=(start, snapshot)).outputs]
    at = {}
    for k, patches in enumerate(patch_sets):
        for name, (fn, needs) in patches.items():
            at.setdefault(name, []).append((k, fn, needs))

    def one(k):
        patches = {name: (lambda v, get, items=items: _select(k, v, get, items), tuple({n for *_, ns in items for n in ns}))
                   for name, items in at.items()}
        return runner.run(None, patches=patches, resume=(start, snapshot)).outputs
    # ops without a batching rule (the CPU attention kernel) run per sample; vmap would warn on each call
    torch._C._functorch._set_vmap_fallback_warning_enabled(False)
    try:
        return torch.func.vmap(one, randomness="same")(torch.arange(len(patch_sets)))
    finally:
        torch._C._functorch._set_vmap_fallback_warning_enabled(True)


def _select(k: torch.Tensor, v: torch.Tensor, get, items: list) -> torch.Tensor:
    """Sample k's value of a patched node: the patch of its own change, the node's value for the others."""
    out = v
    for j, fn, _ in items:
        out = torch.where(k == j, fn(v, get), out)
    return out


def _round(v):
    return None if v is None else round(float(v), 6)


def _head_inputs(program: Program) -> dict[int, str]:
    """{block index: node name of its output projection's input} for attentions with known heads."""
    out = {}
    nodes = {n.name: n for n in program.gm.graph.nodes}
    for b in program.info.blocks:
        a = b.attention
        if a is not None and a.o is not None and a.o_heads and a.o.weight:
            out[b.index] = nodes[a.o.node].args[0].name
    return out


def _changes(runner: GraphRunner, where: list[dict], heads_at: dict[int, str], program: Program,
             parts: tuple[str, ...] = PARTS) -> dict:
    """{key: (resume position, patches)}: each of `parts` removed as drop-* would, each head masked."""
    out = {}
    for i, at in enumerate(where):
        for p, s in at.items():
            if s is not None and p in parts:  # the part's output takes the value that replaces it
                patch = (lambda v, get, by=s.by: get(by), (s.by,))
                out[i, p] = (runner.position[s.by] + 1, {s.out: patch})
    for i, name in heads_at.items():
        for h, ranges in enumerate(program.info.blocks[i].attention.o_heads):
            cols = torch.tensor([c for r in ranges for c in range(*r)])
            out[i, "head", h] = (runner.position[name], {name: (lambda v, get, cols=cols: _zero(v, cols), ())})
    return out


def _zero(v: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    return v.index_fill(-1, cols, 0)


def _streams(s, values: dict) -> tuple[torch.Tensor, torch.Tensor]:
    x = values[s.x]
    return x, (x + values[s.branch] if s.branch else values[s.out])


def _cosine(x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Per-token cosine similarity, flattened over batch and sequence."""
    x = x.detach().to(torch.float64).reshape(-1, x.shape[-1])
    y = y.detach().to(torch.float64).reshape(-1, y.shape[-1])
    return ((x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1)).clamp_min(1e-30)).numpy()


def _token_weights(feed: dict, values: dict, where: list[dict]) -> np.ndarray:
    mask = feed.get("attention_mask")
    if mask is not None:
        return np.asarray(mask, dtype=np.float64).reshape(-1)
    s = next(site for parts in where for site in parts.values() if site is not None)
    return np.ones(values[s.x].reshape(-1, values[s.x].shape[-1]).shape[0])


def _rows(weights: np.ndarray, n: int) -> np.ndarray:
    """The token weights for a stream of `n` rows: uniform where prune-tokens left fewer tokens than the
    mask has (which tokens were merged is not known here)."""
    return weights if len(weights) == n else np.ones(n)


def _head_norms(program: Program, attention, x: torch.Tensor, weights: np.ndarray) -> np.ndarray:
    o = attention.o
    w = _attr(program.gm, o.weight).detach().to(torch.float32)
    if o.op == "tcc.dense_w8":
        w = w * _attr(program.gm, o.scale).detach().to(torch.float32)[:, None]
    x = x.detach().to(torch.float32).reshape(-1, x.shape[-1])
    wt = torch.from_numpy(weights).to(torch.float64)
    out = []
    for ranges in attention.o_heads:
        cols = torch.tensor([c for r in ranges for c in range(*r)])
        contrib = (x[:, cols] @ w[:, cols].T).to(torch.float64).norm(dim=-1)
        out.append(float((contrib * wt).sum() / wt.sum().clamp_min(1e-30)))
    return np.asarray(out)


# -- choosing what to drop: drop-attention, drop-mlp, drop-blocks (passes/drop_*.py) ------------------

def _unit(v: float) -> str | None:
    return None if 0 <= v < 1 else "must be in [0, 1)"


DROP_OPTIONS = {
    "count": Option(int, 0, "how many to drop, most redundant first (0: not by count)",
                    validator=lambda v: None if v >= 0 else "must be >= 0"),
    "ratio": Option(float, 0.0, "fraction of the blocks to drop, rounded down (0: not by ratio)", validator=_unit),
    "threshold": Option(float, 0.0, "drop every candidate whose input/output cosine similarity is >= this "
                        "(0: not by threshold)", validator=lambda v: None if -1 <= v <= 1 else "must be in [-1, 1]"),
    "layers": Option(list[int], [], "explicit block indices to drop (as `tcc analyze MODEL` numbers them)"),
    "keep_ends": Option(bool, True, "never choose the first and last block by count/ratio/threshold"),
    "by": Option(str, "similarity", "rank by input/output cosine similarity, or by calibration-loss increase",
                 choices=("similarity", "loss")),
}


def drop_reads(p, analysis: str) -> set[str]:
    """A drop pass's Pass.reads: analyze-redundancy's similarities (and its part's loss increases with
    by=loss); nothing with explicit layers."""
    if analysis != ANALYSIS or p.layers:
        return set()
    return {"similarity"} | ({f"loss:{p.part}"} if p.by == "loss" else set())


def choose(p, program: Program, ctx: PassContext) -> tuple[list[int], dict]:
    """What drop-attention / drop-mlp / drop-blocks (the Pass `p`, its `part` and options from
    DROP_OPTIONS) remove: (sorted block indices, notes for the record: selection, analysis, scores,
    ranking); UserError naming the option when the options cannot be met."""
    blocks = program.info.blocks
    n_blocks = len(blocks)
    what = "blocks" if p.part == "block" else f"{p.part} sub-blocks"
    present = [b.index for b in blocks if (b.attention if p.part == "attention" else
                                           b.mlp if p.part == "mlp" else b)]
    given = [k for k in ("count", "ratio", "threshold", "layers") if p.opts[k] != p.options[k].default]
    if not given:
        raise UserError(f"{p.name} needs one of count=N, ratio=R, threshold=T or layers=[...]",
                        f"e.g. {p.name}(count=2) drops the 2 most redundant {what}")
    if len(given) > 1:
        raise UserError(f"{p.name}: options {' and '.join(given)} both choose what to drop; give only one")
    if p.layers:
        bad = [i for i in p.layers if not 0 <= i < n_blocks]
        if bad:
            raise UserError(f"{p.name} option 'layers' has {bad}, out of range for {n_blocks} blocks",
                            f"give indices 0..{n_blocks - 1}")
        gone = [i for i in p.layers if i not in present]
        if gone:
            raise UserError(f"{p.name} option 'layers': blocks {gone} have no {p.part} left")
        return sorted(set(p.layers)), {"selection": f"layers={sorted(set(p.layers))}", "scores": {}}

    if p.count > n_blocks:
        raise UserError(f"{p.name} option 'count' is {p.count} but the model has {n_blocks} blocks",
                        f"give count <= {n_blocks}")
    candidates = [i for i in present if not (p.keep_ends and i in (0, n_blocks - 1))]
    want = p.count if "count" in given else math.floor(p.ratio * n_blocks + 1e-9) if "ratio" in given else None
    if want is not None and want > len(candidates):
        ends = " (keep_ends=true keeps blocks 0 and {})".format(n_blocks - 1) if p.keep_ends else ""
        raise UserError(f"{p.name} option '{given[0]}' asks for {want} {what}, only {len(candidates)} can be "
                        f"dropped{ends}", "ask for fewer" + (", or set keep_ends=false" if p.keep_ends else ""))
    report, how = redundancy(program, ctx, need_loss=p.by == "loss", part=p.part,
                             who=f"{p.name}({given[0]}={format_value(p.opts[given[0]])})")
    scores = _scores(report, program, p.part)
    similarity = {i: scores.get(i, {}).get("similarity") for i in candidates}
    if p.by == "loss":
        ranked = sorted(candidates, key=lambda i: (_or_inf(scores.get(i, {}).get("loss_increase")), i))
    else:
        ranked = sorted(candidates, key=lambda i: (-_or_inf(similarity[i], -1), i))
    if "threshold" in given:
        chosen = [i for i in ranked if similarity[i] is not None and similarity[i] >= p.threshold]
    else:
        chosen = ranked[:want]
    notes = {"selection": f"{given[0]}={format_value(p.opts[given[0]])}, most redundant first by {p.by}",
             "analysis": how, "scores": scores, "ranking": ranked}
    if p.keep_ends:
        notes["kept_ends"] = f"blocks 0 and {n_blocks - 1} kept (keep_ends=true)"
    return sorted(chosen), notes




def _or_inf(v, sign: int = 1) -> float:
    return v if v is not None else sign * math.inf


def _scores(report: dict, program: Program, part: str) -> dict[int, dict]:
    """{current block index: {"similarity", "loss_increase"}} for `part` from an analysis report,
    matched by the blocks' weights."""
    entries = report["blocks"]
    out = {}
    for b in program.info.blocks:
        mine = set(block_weights(b))
        entry = next((e for e in entries if mine and mine <= set(e["weights"])), None)
        if entry is not None:
            out[b.index] = {"similarity": entry["similarity"].get(part),
                            "loss_increase": (entry.get("loss_increase") or {}).get(part)}
    return out


def redundancy(program: Program, ctx: PassContext, need_loss: bool = False, who: str = ANALYSIS,
               part: str = "attention") -> tuple[dict, str]:
    """analyze-redundancy's report for this program: the pipeline's when it covers every block (and
    has `part`'s loss increases when `need_loss`), else a fresh one on the calibration feeds (the
    default calibration text when the context has none) measuring only that. Returns (report, how it
    was obtained)."""
    report = ctx.report.get(ANALYSIS)
    if report is not None and (not need_loss or f"loss:{part}" in measured(report)):
        covered = [set(e["weights"]) for e in report["blocks"]]
        if all(any(set(block_weights(b)) <= c for c in covered) for b in program.info.blocks):
            return report, f"from {ANALYSIS} earlier in this pipeline"
    if not ctx.calibration and not program.tokenizer_dir:
        raise UserError(f"{who} ranks by {ANALYSIS}, which needs calibration data: the pipeline has no calibration "
                        "feeds and the model no tokenizer to make them from text",
                        "give explicit layers=[...], the model's tokenizer (--tokenizer DIR), calibration token ids "
                        "(--calibration ids.npy), or calibration feeds (Python: PassContext(calibration=[...]))")
    feeds, source = calibration_feeds(program, ctx)
    report = analyze(program, feeds, heads=False, loss=need_loss, loss_parts=(part,), loss_samples=2, source=source)
    ctx.report[ANALYSIS] = report
    return report, f"{ANALYSIS} had not run on this program: ran it on {source}"


def calibration_feeds(program: Program, ctx: PassContext, n_samples: int = 8, text: str | None = None):
    """(feeds, description): the context's calibration feeds, else windows of calibration text."""
    from .calibration import default_text, text_feeds

    if ctx.calibration and text is None:
        return list(ctx.calibration), f"the {len(ctx.calibration)} calibration feeds of the pipeline"
    feeds = text_feeds(program, text, n_samples=n_samples)
    return feeds, f"{len(feeds)} windows of {text or default_text()}"
