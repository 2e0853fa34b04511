"""`analyze-redundancy`: how much each block, attention sub-block, MLP sub-block and head matters.

Contract: an analysis pass; the program is not changed. On calibration feeds (the pipeline's, else
`samples` windows of calibration text: `text_file=FILE`, default tcc.compress.calibration.default_text()) it
measures, for every block:

  similarity     cosine similarity between the hidden states entering and leaving the block, its
                 attention sub-block and its MLP sub-block, per token, averaged over the tokens
                 (weighted by attention_mask) and feeds - the signal of "What Matters in
                 Transformers? Not All Attention Is Needed" (He et al., 2024); 1 - similarity is
                 ShortGPT's Block Influence (Men et al., 2024). High similarity: the part barely
                 changes the residual stream, so it is redundant. The stream leaving a pre-norm
                 sub-block is x + its output; a post-norm one's is its LayerNorm's output.
  loss_increase  (loss=true) per-layer sensitivity: the calibration loss
                 (tcc.compress.calibration.CalibrationLoss: next-token cross-entropy for causal LMs, 1 - cosine
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
from pathlib import Path

import numpy as np

from tcc.compress.elimination import ANALYSIS, PARTS
from tcc.paths import check_dir, read_small_json
from tcc.pipeline import Option, Pass, PassContext, register
from tcc.ir.program import Program
from tcc.compress.redundancy import BATCH, WINDOW, analyze, calibration_feeds, measured


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
