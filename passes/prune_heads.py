"""`prune-heads`: remove attention heads structurally (fewer q/k/v rows, fewer o columns, smaller shapes).

Contract: a transform pass; outputs change by what the removed heads contributed. For every block it
picks the heads to remove (below), then `tcc.compress.heads.prune_attention` slices the q, k and v
projections (or a fused qkv: GPT-2's c_attn, GPT-NeoX's interleaved query_key_value, Phi-3's
qkv_proj) and the output projection's input columns, and rewrites the head counts in the view /
reshape / expand shapes and fused-projection slices. The sliced tensors replace the old ones under
the same names (nothing is left dead), ModelInfo is recovered again and must report the new head
counts, and the pruned graph must run on example inputs. The pass works on a copy: a layout it cannot rewrite (ALiBi, MQA through an index op, a KV
cache output) raises a UserError naming the node and leaves the input program as it was.

Modes (`mode=`; the record says which each layer used):
  heads   multi-head attention (as many KV heads as query heads): q, k and v heads go together.
  groups  grouped-query attention: whole KV groups go, a KV head with its G query heads.
  query   grouped-query attention: query heads go within their groups, the same number in every
          group (so H' = G' * Hkv'); every KV head stays.
`mode=auto` (default) is heads for MHA, groups for GQA, query for MQA (one KV head).

How many (one of; none removes nothing):
  ratio=R       the fraction of each layer's heads to remove, rounded half up to whole units: R*H
                heads, R*Hkv groups, or R*G query heads per group; at least one unit is always kept.
  counts=[...]  query heads to remove, one entry per layer; in groups mode a multiple of G, in query
                mode a multiple of Hkv; fewer than the layer's heads.
  threshold=T   remove the units whose importance, relative to the model's mean head, is below T (a
                group's is its heads' mean; in query mode the count per group is the smallest
                number below T in any group); at least one unit per layer is kept.

Which: the least important units. Importance is ctx.report["analyze-redundancy"]["blocks"][i]["heads"]
(its "loss_increase" when measured, else "norm") when that report covers every block with matching
head counts, else `tcc.compress.heads.head_importance`: the mean L2 norm of each head's contribution to the
output projection's output on the calibration feeds (program.example_inputs() when there are none).

Compensation (`compensate=true`; off by default): the removed heads' mean contribution on the same
feeds is added to the output projection's bias (a bias is created when it has none), so each
layer's mean attention output on the calibration tokens is kept. Its effect depends on the model and
data, so it is opt-in. Measured: MiniLM ratio=0.25, embedding cosine vs unpruned on wikitext-2
sentences: 0.928 -> 0.942 (seq 32, 16 sentences), 0.9154 -> 0.9155 (seq 128, 64 sentences);
SmolLM2 ratio=0.34, perplexity (seq 128, 1024 tokens; 21.7 unpruned): groups 54.6 -> 59.2 (worse),
query 137 -> 60.5 (better).

Notes: mode per layer, importance source, selection, per layer the heads / KV heads before and
after and the removed indices, and parameter bytes removed.
"""
from __future__ import annotations

import math

from tcc.errors import InternalError, UserError
from tcc.compress.heads import head_statistics, prune_attention
from tcc.pipeline import Option, Pass, PassContext, check_runs, register
from tcc.ir.program import Program
from tcc.ir.structure import Attention


ANALYSIS = "analyze-redundancy"


@register
class PruneHeads(Pass):
    """Remove the least important attention heads (whole KV groups or query heads for GQA), slicing
    q/k/v/o and rewriting head-count shapes."""

    name = "prune-heads"
    kind = "transform"
    options = {
        "ratio": Option(float, 0.0, "fraction of each layer's heads to remove, in [0, 1)",
                        validator=lambda v: None if 0 <= v < 1 else "must be in [0, 1)"),
        "counts": Option(list[int], [], "query heads to remove per layer, one entry per layer, e.g. [2,0,1]",
                         validator=lambda v: None if all(c >= 0 for c in v) else "entries must be >= 0"),
        "threshold": Option(float, 0.0, "remove heads whose importance / the model's mean head importance is below this",
                            validator=lambda v: None if v >= 0 else "must be >= 0"),
        "mode": Option(str, "auto", "heads (MHA), groups (whole KV groups) or query (query heads within groups)",
                       choices=("auto", "heads", "groups", "query")),
        "compensate": Option(bool, False, "add the removed heads' mean output on the calibration feeds to the "
                                          "output projection's bias"),
    }

    def requires(self, program: Program) -> None:
        given = [k for k in ("ratio", "counts", "threshold") if self.opts[k] != self.options[k].default]
        if len(given) > 1:
            raise UserError(f"pass 'prune-heads' takes one of ratio, counts, threshold; got {', '.join(given)}",
                            "give only one way of choosing how many heads to remove")
        if not getattr(program.info, "blocks", None):
            raise UserError("prune-heads found no attention blocks in this program", "run `tcc analyze MODEL --structure` to see its structure")
        n = len([b for b in program.info.blocks if b.attention is not None])
        if self.counts and len(self.counts) != n:
            raise UserError(f"pass 'prune-heads' option 'counts' has {len(self.counts)} entries, the model has {n} layers",
                            "give one count per layer, e.g. counts=[" + ",".join(["1"] + ["0"] * (n - 1)) + "]")

    def reads(self, analysis: str) -> set[str]:
        """analyze-redundancy's head importance (norms and, measured when asked, loss increases) when it
        removes heads."""
        chosen = any(self.opts[k] != self.options[k].default for k in ("ratio", "counts", "threshold"))
        return {"heads", "head_loss"} if analysis == ANALYSIS and chosen else set()

    def run(self, program: Program, ctx: PassContext) -> bool:
        blocks = [b for b in program.info.blocks if b.attention is not None]  # dropped attention has no heads
        modes = [_mode(b.attention, self.mode, b.index) for b in blocks]
        selection = {k: self.opts[k] for k in ("ratio", "counts", "threshold") if self.opts[k] != self.options[k].default}
        ctx.note(mode=sorted(set(modes)), selection=selection or "nothing (no option given)")
        if not selection:
            ctx.note(bytes_removed=0)
            return False

        # which heads: the least important units of each layer
        feeds = list(ctx.calibration) or [program.example_inputs()]
        what = f"{len(feeds)} calibration feeds" if ctx.calibration else "example inputs (no calibration feeds)"
        scores, source = _report_scores(program, ctx)
        stats = head_statistics(program, feeds) if scores is None or self.compensate else None
        if scores is None:
            scores, source = stats["norm"], f"output-projection contribution norms on {what}"
        mean = sum(abs(v) for row in scores for v in row) / sum(map(len, scores)) or 1.0
        plan = [_choose(b.attention, m, self._units_to_remove(b.attention, m, b.index, [v / mean for v in scores[b.index]]),
                        scores[b.index]) for b, m in zip(blocks, modes)]
        ctx.note(importance=source, layers=[
            {"layer": b.index, "block": b.name, "mode": m, "heads": [b.attention.num_heads, len(kq)],
             "kv_heads": [b.attention.num_kv_heads, len(kkv)],
             "removed": [h for h in range(b.attention.num_heads) if h not in kq],
             "removed_kv": [h for h in range(b.attention.num_kv_heads) if h not in kkv]}
            for b, m, (kq, kkv) in zip(blocks, modes, plan)])
        changed = [i for i, (kq, _) in enumerate(plan) if len(kq) < blocks[i].attention.num_heads]
        if not changed:
            ctx.note(bytes_removed=0)
            return False

        # rewrite in place (Pipeline.run works on its own copy, so a layout we cannot handle leaves
        # the caller's program as it was)
        bytes_before = program.param_bytes()
        for i in changed:
            removed = [h for h in range(blocks[i].attention.num_heads) if h not in plan[i][0]]
            at = blocks[i].index  # position in ModelInfo.blocks (blocks without attention are skipped here)
            delta = sum(stats["mean"][at][h] for h in removed) if self.compensate else None
            prune_attention(program.gm, program.info.blocks[at].attention, *plan[i], o_bias_delta=delta)
        program.gm.graph.lint()
        program.gm.recompile()
        check_runs(program, "prune-heads", "this attention layout is not supported by prune-heads yet")
        self._want = [(len(kq), len(kkv)) for kq, kkv in plan]  # verified by ensures, on the recovered ModelInfo
        ctx.note(bytes_removed=bytes_before - program.param_bytes(),
                 compensated=f"removed heads' mean output on {what} added to the output projections' biases"
                 if self.compensate else False)
        return True  # the manager recovers ModelInfo

    def ensures(self, program: Program) -> None:
        want, self._want = getattr(self, "_want", None), None
        if want is None:
            return
        got = [(b.attention.num_heads, b.attention.num_kv_heads) for b in program.info.blocks if b.attention is not None]
        if got != want:
            raise InternalError(f"prune-heads: ModelInfo reports (heads, kv heads) {got} after pruning, expected {want}")

    # -- how many -------------------------------------------------------------------------------
    def _units_to_remove(self, a: Attention, mode: str, layer: int, rel: list[float] | None) -> int:
        """Units (heads, groups, or query heads per group) to remove from this layer."""
        h, hkv = a.num_heads, a.num_kv_heads
        g = h // hkv
        size = {"heads": h, "groups": hkv, "query": g}[mode]
        if self.counts:
            c = self.counts[layer]
            per = {"heads": 1, "groups": g, "query": hkv}[mode]
            if c % per or c >= h:
                why = (f"{c} is not a multiple of {per} ({'query heads per group' if mode == 'groups' else 'KV groups'})"
                       if c % per else f"{c} would remove every one of its {h} heads")
                raise UserError(f"pass 'prune-heads' option 'counts': layer {layer} ({mode} mode): {why}",
                                f"counts are query heads to remove per layer; in {mode} mode use multiples of {per}, "
                                f"fewer than {h}")
            return c // per
        if self.threshold:
            if mode == "query":
                return min(min(sum(s < self.threshold for s in rel[k * g:(k + 1) * g]) for k in range(hkv)), g - 1)
            unit_scores = rel if mode == "heads" else [sum(rel[k * g:(k + 1) * g]) / g for k in range(hkv)]
            return min(sum(s < self.threshold for s in unit_scores), size - 1)
        return min(math.floor(self.ratio * size + 0.5), size - 1)


def _mode(a: Attention, mode: str, layer: int) -> str:
    h, hkv = a.num_heads, a.num_kv_heads
    if h == hkv:
        if mode == "query":
            raise UserError(f"pass 'prune-heads' option 'mode': layer {layer} has one query head per KV head, "
                            "there are no query heads to remove within a group",
                            "use mode=heads (or auto) for multi-head attention")
        return "heads"
    if mode == "heads":
        raise UserError(f"pass 'prune-heads' option 'mode': layer {layer} has grouped KV heads ({h} query heads "
                        f"over {hkv}); mode=heads is for multi-head attention", "use mode=groups or mode=query")
    if mode == "auto":
        return "query" if hkv == 1 else "groups"
    return mode


def _choose(a: Attention, mode: str, n: int, scores: list[float] | None) -> tuple[list[int], list[int]]:
    """(kept query heads, kept KV heads) after removing the n least important units."""
    h, hkv = a.num_heads, a.num_kv_heads
    g = h // hkv
    if n == 0:
        return list(range(h)), list(range(hkv))
    rank = lambda items, score: sorted(items, key=lambda i: (score(i), i))[:n]  # least important first
    if mode == "heads":
        gone = set(rank(range(h), lambda i: scores[i]))
        kept = [i for i in range(h) if i not in gone]
        return kept, kept
    if mode == "groups":
        gone = set(rank(range(hkv), lambda k: sum(scores[k * g:(k + 1) * g])))
        kv = [k for k in range(hkv) if k not in gone]
        return [k * g + j for k in kv for j in range(g)], kv
    gone = {q for k in range(hkv) for q in rank(range(k * g, (k + 1) * g), lambda i: scores[i])}
    return [i for i in range(h) if i not in gone], list(range(hkv))


def _report_scores(program: Program, ctx: PassContext) -> tuple[list[list[float]] | None, str | None]:
    """Per layer, per query head importance (higher = keep) from an analysis report covering every
    block, and its description; (None, None) without one."""
    report = ctx.report.get(ANALYSIS)
    entries = report.get("blocks") if isinstance(report, dict) else None
    if isinstance(entries, list):
        # by position in ModelInfo.blocks; a block whose attention was dropped has no heads
        rows = [_report_row(b, entries) if b.attention is not None else () for b in program.info.blocks]
        if all(r is not None for r in rows):
            key = "loss_increase" if all(r[0] == "loss_increase" for r in rows if r) else "norm"
            return [(r[1] if r[0] == key else r[2]) if r else [] for r in rows], f"{ANALYSIS} report ({key})"
    return None, None


def _report_row(block, entries: list) -> tuple | None:
    """(key, values, norms) of the report entry for this block (matched by its attention weights)."""
    a = block.attention
    mine = {l.weight for l in (a.q, a.k, a.v, a.qkv, a.o) if l is not None and l.weight}
    for e in entries:
        heads = e.get("heads") if isinstance(e, dict) else None
        if not heads or not mine or not mine <= set(e.get("weights") or []):
            continue
        norm, loss = heads.get("norm"), heads.get("loss_increase")
        ok = lambda v: isinstance(v, list) and len(v) == a.num_heads and all(isinstance(x, (int, float)) for x in v)
        if ok(loss) and ok(norm):
            return "loss_increase", loss, norm
        if ok(norm):
            return "norm", norm, norm
    return None
