"""`analyze-redundancy`: how much each block, attention sub-block, MLP sub-block and head matters.

Contract: an analysis pass; the program is not changed. On calibration feeds (the pipeline's, else
`samples` windows of calibration text: `text_file=FILE`, default tcc.calibration.default_text()) it
measures, for every block:

  similarity     cosine similarity between the hidden states entering and leaving the block, its
                 attention sub-block and its MLP sub-block, per token, averaged over the tokens
                 (weighted by attention_mask) and feeds - the signal of "What Matters in
                 Transformers? Not All Attention Is Needed" (He et al., 2024); 1 - similarity is
                 ShortGPT's Block Influence (Men et al., 2024). High similarity: the part barely
                 changes the residual stream, so it is redundant. The stream leaving a pre-norm
                 sub-block is x + its output; a post-norm one's is its LayerNorm's output.
  loss_increase  (loss=true) per-layer sensitivity: the calibration loss
                 (tcc.calibration.CalibrationLoss: next-token cross-entropy for causal LMs, 1 - cosine
                 of mean-pooled hidden states vs the unmodified model for encoders) with that part
                 removed exactly as drop-attention / drop-mlp / drop-blocks remove it, minus the loss
                 of the unmodified program.
  heads          (heads=true) per attention head: `norm`, the mean over tokens of the L2 norm of
                 its contribution to the output projection's output (x_h @ W_o[:, h]^T; cheap);
                 `share`, norm / the sum over the layer's heads; and (loss=true, head_loss=true)
                 `loss_increase`, the calibration-loss increase when that head's input to the output
                 projection is zeroed.

Results go to ctx.report["analyze-redundancy"] (read by the drop passes), a summary to the pass
record, and, when `out=DIR` is given (missing, empty or an earlier analysis, unless ctx.force: tcc.paths;
checked before the analysis runs) or ctx.annotations["artifacts_dir"] is set, to
DIR/redundancy.json (the report, without "seconds") and DIR/redundancy.png (heatmaps: similarity and loss increase per
block and part; head importance per layer and head). Report layout:

  {"model", "task", "method", "calibration": {"source", "feeds", "loss_feeds", "batch", "seq_len"},
   "loss": {"kind", "base"} | null,
   "blocks": [{"index", "name", "weights", "similarity": {"block", "attention", "mlp"},
               "loss_increase": {...} | null, "heads": {"norm", "share", "loss_increase"} | null}],
   "ranking": {"block" | "attention" | "mlp": [block indices, most redundant (most similar) first]},
   "seconds", "files": {"json", "png"}}

Parts already dropped (or without a residual connection to drop them by) are null; "measured" lists
what the report holds ("similarity", "loss:attention" | "loss:mlp" | "loss:block", "heads",
"head_loss").

What is measured (`measure=needed`, default): only what the passes after this one in the pipeline
read (Pass.reads, PassContext.reads_of; up to the next analyze-redundancy): drop-* read the
similarities (and their part's loss increases with by=loss), prune-heads the head importances
(norms and loss increases). With no reader after it (the report is the product) or `measure=all`:
everything the options ask for. The other options can only turn measurements off.

Cost: one run per feed for similarity and head norms, on the first `window` tokens of each feed
(default 256, whatever --seq-len is; only for a program traced with a dynamic sequence length: a
static one runs its own length). Loss increases are measured on the first `loss_samples` feeds
(default 2, 0: all): one partial run per part removed and head masked, each resuming at the changed
node, `batch` of them (default 8, fewer when their logits would pass 512 MiB) in one forward batched
by torch.func.vmap (programs with tcc's custom ops, which vmap cannot batch, run them one by one).
Progress shows an estimate of the time left; the end prints the analysis's seconds (wall and CPU)
and peak RSS.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from tcc.calibration import CalibrationLoss, GraphRunner
from tcc.elimination import ANALYSIS, PARTS, block_weights, calibration_feeds, sites
from tcc.errors import UserError
from tcc.paths import check_dir, read_small_json
from tcc.pipeline import Option, Pass, PassContext, register
from tcc.program import Program, attribute as _attr
from tcc.memory import peak_bytes, recorded, stage
from tcc.progress import info as status_line, work

WINDOW = 256  # default analysis window (tokens), whatever --seq-len
BATCH = 8  # default partial runs per batched forward
OUTPUT_BYTES = 1 << 29  # a batch's outputs (logits) stay under 512 MiB


@register
class AnalyzeRedundancy(Pass):
    """Per block / attention / MLP: input-output cosine similarity and calibration-loss increase when
    removed; per head: output-norm share and loss increase when masked. Writes JSON + heatmap PNG."""

    name = ANALYSIS
    kind = "analysis"
    options = {
        "out": Option(str, "", "directory for redundancy.json and redundancy.png (default: the artifact's)"),
        "samples": Option(int, 8, "calibration windows taken from text when the pipeline has no calibration feeds",
                          validator=lambda v: None if v >= 1 else "must be >= 1"),
        "text_file": Option(str, "", "calibration text file (default: $TCC_CALIBRATION_TEXT, else tcc's own, tcc/data/calibration.txt)"),
        "heads": Option(bool, True, "measure per-head importance (output-norm share)"),
        "loss": Option(bool, True, "measure the loss increase when each block / attention / MLP is removed "
                       "(3 partial runs per block and loss feed)"),
        "head_loss": Option(bool, True, "with loss and heads: the loss increase when each head is masked "
                            "(one partial run per head and loss feed)"),
        "loss_samples": Option(int, 2, "how many of the feeds the loss increases are measured on (0: all)",
                               validator=lambda v: None if v >= 0 else "must be >= 0"),
        "measure": Option(str, "needed", "needed: only what the later passes of the pipeline read (everything "
                          "the options ask for when none reads it); all: everything the options ask for",
                          choices=("needed", "all")),
        "window": Option(int, WINDOW, "the analysis windows' length in tokens, for a program that takes any length "
                         "(one traced with a dynamic sequence); the first tokens of each feed (0: the feeds' length)",
                         validator=lambda v: None if v >= 0 else "must be >= 0"),
        "batch": Option(int, BATCH, "partial runs per batched forward (torch.func.vmap) for the loss increases",
                        validator=lambda v: None if v >= 1 else "must be >= 1"),
    }

    def check_outputs(self, force: bool = False) -> None:
        if self.out:
            check_dir(self.out, "analysis directory", is_analysis, force)

    def run(self, program: Program, ctx: PassContext) -> Program:
        self.check_outputs(ctx.force)  # before the analysis, not after it
        feeds, source = calibration_feeds(program, ctx, n_samples=self.samples, text=self.text_file or None)
        wanted = ctx.reads_of(ANALYSIS) if self.measure == "needed" else None  # None: all the options ask for
        loss_parts = tuple(p for p in PARTS if wanted is None or f"loss:{p}" in wanted)
        heads = self.heads and (wanted is None or bool(wanted & {"heads", "head_loss"}))
        head_loss = heads and self.head_loss and (wanted is None or "head_loss" in wanted)
        report = analyze(program, feeds, heads=heads, loss=self.loss and bool(loss_parts or head_loss),
                         loss_parts=loss_parts, head_loss=head_loss, loss_samples=self.loss_samples, source=source,
                         window=self.window, batch=self.batch)
        if wanted is not None:
            ctx.note(measured_for=[p.name for p in ctx.later if p.reads(ANALYSIS)])
        out = self.out or ctx.annotations.get("artifacts_dir")
        if out:
            report["files"] = write(report, out)
        ctx.report[ANALYSIS] = report
        ctx.note(**summary(report))
        return program


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



# -- report -------------------------------------------------------------------------------------------

def summary(report: dict) -> dict:
    """What goes into the pass record: per-part similarities and losses, the top of each ranking."""
    blocks = report["blocks"]
    out = {"calibration": report["calibration"], "measured": measured(report), "loss": report["loss"],
           "seconds": report["seconds"],
           "most_redundant": {p: r[:5] for p, r in report["ranking"].items()},
           "similarity": {p: [b["similarity"][p] for b in blocks] for p in PARTS}}
    if report["loss"]:
        out["loss_increase"] = {p: [b["loss_increase"][p] for b in blocks] for p in PARTS}
    if "files" in report:
        out["files"] = report["files"]
    return out


def is_analysis(directory: Path) -> bool:
    """Whether `directory` holds an analysis write() made (its redundancy.json has this report's keys)."""
    r = read_small_json(Path(directory) / "redundancy.json")
    return r is not None and {"method", "blocks", "ranking", "calibration"} <= set(r)


def write(report: dict, directory) -> dict:
    """DIR/redundancy.json and DIR/redundancy.png; returns their paths."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    files = {"json": str(d / "redundancy.json"), "png": str(d / "redundancy.png")}
    timeless = {k: v for k, v in report.items() if k != "seconds"}  # same inputs, same bytes
    Path(files["json"]).write_text(json.dumps({**timeless, "files": files}, indent=1) + "\n")
    plot(report, files["png"])
    return files


def plot(report: dict, path) -> None:
    """Heatmaps, one row per block: similarity (coloured by 1 - similarity, log scale, so the
    near-1 values stay apart), loss increase when removed and head importance (symmetric log
    scale: a few essential parts would otherwise wash out the rest)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.colors as mcolors
    import matplotlib.pyplot as plt

    blocks = report["blocks"]
    n = len(blocks)
    grid = lambda key: np.array([[np.nan if (b[key] or {}).get(p) is None else b[key][p] for p in PARTS]
                                 for b in blocks], dtype=float)
    sim = grid("similarity")
    influence = np.clip(1 - sim, 1e-4, 2)
    panels = [("similarity", "input/output cosine similarity\n(bright = redundant)", influence, sim, "magma_r",
               mcolors.LogNorm(vmin=np.nanmin(influence), vmax=np.nanmax(influence)), "1 - similarity")]
    symlog = lambda d: mcolors.SymLogNorm(linthresh=1e-2, vmin=min(np.nanmin(d), 0), vmax=max(np.nanmax(d), 1e-2))
    if report["loss"]:
        inc = grid("loss_increase")
        panels.append(("loss", f"loss increase when removed\n({report['loss']['kind'].split(' (')[0]}; bright = redundant)",
                       inc, inc, "viridis_r", symlog(inc), "loss increase"))
    head_rows = [b["heads"] for b in blocks]
    width = max((len(h["norm"]) for h in head_rows if h), default=0)
    if width:
        by_loss = bool(report["loss"]) and all(h is None or h["loss_increase"] is not None for h in head_rows)
        key = "loss_increase" if by_loss else "share"
        heads = np.full((n, width), np.nan)
        for i, h in enumerate(head_rows):
            if h:
                heads[i, :len(h[key])] = [np.nan if v is None else v for v in h[key]]
        title = "head: loss increase when masked" if by_loss else "head: share of the layer's output norm"
        panels.append(("heads", title + "\n(bright = redundant)", heads, heads, "viridis_r", symlog(heads) if by_loss else None,
                       key.replace("_", " ")))

    ratios = [3 if p[0] != "heads" else max(3.0, 0.45 * width) for p in panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(sum(ratios) * 1.15 + 1.5, 1.4 + 0.26 * n), squeeze=False,
                             gridspec_kw={"width_ratios": ratios})
    for ax, (key, title, colour, values, cmap, norm, label) in zip(axes[0], panels):
        im = ax.imshow(colour, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_yticks(range(n))
        ax.set_yticklabels([str(b["index"]) for b in blocks], fontsize=7)
        ax.set_ylabel("block")
        columns = list(range(width)) if key == "heads" else list(PARTS)
        ax.set_xticks(range(len(columns)))
        ax.set_xticklabels([str(c) for c in columns], fontsize=7 if key == "heads" else 8)
        if key == "heads":
            ax.set_xlabel("head")
        if key != "heads" and n <= 48:  # the values, in the cells
            for (r, c), v in np.ndenumerate(values):
                if not np.isnan(v):
                    red, green, blue, _ = im.cmap(im.norm(colour[r, c]))
                    ink = "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "white"
                    ax.text(c, r, f"{v:.3f}" if key == "similarity" else f"{v:.2g}", ha="center", va="center",
                            fontsize=6, color=ink)
        fig.colorbar(im, ax=ax, fraction=0.05, pad=0.03).set_label(label, fontsize=7)
    cal = report["calibration"]
    fig.suptitle(f"{Path(report['model']).name or report['model']}: {n} blocks; {cal['feeds']} feeds of "
                 f"{cal['batch']} x {cal['seq_len']} tokens" + (f" ({cal['loss_feeds']} for losses)" if report["loss"] else ""),
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
