"""Removing attention sub-blocks, MLP sub-blocks and whole blocks from a Program, exactly.

What "removed" means - the output equals the model built without that sub-layer:
  pre-norm (LLaMA, GPT-2, ...)  a sub-block adds f(norm(x)) to the residual stream x; the add
      `x + f(..)` becomes `x`. The norm in front of f feeds only f and goes with it; so does a
      sandwich norm on f's output (Gemma-2). In parallel-residual blocks (GPT-NeoX, Falcon:
      x + attn(..) + mlp(..)) only that term goes.
  post-norm (BERT)  a sub-layer is x -> LayerNorm(x + f(x)). Its LayerNorm belongs to it: the
      sub-layer's output becomes x itself, not LayerNorm(x). So the LayerNorm's weights go too,
      and the stream keeps the scale the previous LayerNorm gave it.
  a whole block  its output stream becomes its input stream.

Site             where one sub-block meets the stream: `out` is the node whose value the removal
                 replaces and `by` the node replacing it; `x` is the stream entering, and the
                 stream leaving is x + `branch` (pre-norm) or `out` itself (post-norm; blocks).
                 analyze-redundancy compares the two.
sites(program)   per block, {"attention": Site | None, "mlp": ..., "block": ...}; None for parts
                 already gone.
drop(program, ctx, part, indices)
                 rewrites the graph (out's users read `by`), removes what is dead - nodes (also
                 attention cores, which torch.fx keeps as random ops, and torch.export's dtype
                 asserts on otherwise dead values) and then parameters nothing reads - and keeps
                 ModelInfo true: `structure.recover` of the new graph when it sees the same
                 sub-blocks, else the ModelInfo from before with the dropped parts set to None
                 (recover cannot see a block without attention) and node names updated; emptied
                 blocks leave the list and blocks are renumbered.
DropPass         what drop-attention, drop-mlp and drop-blocks share: choosing by count, ratio,
                 threshold or explicit layers, from analyze-redundancy's results - the latest in the
                 pipeline that covers every block (one-shot, as in ShortGPT: passes since may have
                 changed the model; run analyze-redundancy again to re-measure), else a fresh
                 analysis on the calibration feeds or the default calibration text.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from collections import deque

import torch.fx as fx

from .errors import InternalError, UserError
from .pipeline import Option, Pass, PassContext, format_value
from .program import Program
from .structure import ADD, PASSTHROUGH, GraphIndex, ModelInfo, nodes_by_name, op_name, recover

PARTS = ("attention", "mlp", "block")
ANALYSIS = "analyze-redundancy"


# -- where sub-blocks meet the stream ---------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Site:
    block: int
    name: str
    part: str  # "attention" | "mlp" | "block"
    out: str
    by: str
    x: str
    branch: str | None = None

    @property
    def needs(self) -> tuple[str, ...]:
        """Nodes whose values give the sub-block's input and output streams."""
        return (self.x, self.branch) if self.branch else (self.x, self.out)


class _View(GraphIndex):
    """Node lookup, order and data-dependence of one graph."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.data = set()  # nodes computed from the inputs (not from parameters alone)
        for n in self.nodes:
            if n.op == "placeholder" or any(a in self.data for a in n.all_input_nodes):
                self.data.add(n)

    def node(self, name: str, what: str) -> fx.Node:
        if name not in self.by_name:
            raise InternalError(f"ModelInfo names node '{name}' ({what}), which the graph does not have")
        return self.by_name[name]

    def descendants(self, n: fx.Node, until: fx.Node) -> set:
        out, todo = {n}, deque([n])
        while todo:
            for u in todo.popleft().users:
                if u not in out and self.order[u] <= self.order[until]:
                    out.add(u)
                    todo.append(u)
        return out


def sites(program: Program, lenient: bool = False) -> list[dict[str, Site | None]]:
    """Per block, its Sites; `lenient`: None for a part that cannot be removed exactly (else UserError)."""
    view = _View(program.gm)

    def one(b, part):
        try:
            return site(view, program.info, b, part)
        except UserError:
            if lenient:
                return None
            raise
    return [{part: one(b, part) for part in PARTS} for b in program.info.blocks]


def site(view: _View, info: ModelInfo, block, part: str) -> Site | None:
    """The Site of `part` in `block` (None when that part is gone); UserError when it has no
    residual connection to remove it by."""
    if part == "block":
        if block.attention is None and block.mlp is None:
            return None
        return _same_tokens(view, Site(block.index, block.name, part, out=block.output, by=block.input, x=block.input))
    sub = getattr(block, part)
    if sub is None:
        return None
    proj = sub.o if part == "attention" else sub.down
    where = f"block {block.index} ({block.name})"
    if proj is None or sub.residual_add is None:
        raise UserError(f"{where}: its {part} has no output projection feeding a residual add, so it cannot be "
                        "removed exactly", "drop whole blocks instead, or leave this block")
    res = view.node(sub.residual_add, f"{where} {part} residual add")
    branch_nodes = view.descendants(view.node(proj.node, f"{where} {part} projection"), until=res)
    add = branch = other = None
    for n in sorted(branch_nodes, key=view.order.get):  # the first add joining the branch to anything else
        if op_name(n) not in ADD or len(n.args) < 2 or not all(isinstance(a, fx.Node) for a in n.args[:2]):
            continue
        inside = [a in branch_nodes for a in n.args[:2]]
        if sum(inside) == 1:
            branch, other = n.args[:2] if inside[0] else n.args[1::-1]
            if other in view.data:
                add = n
                break
    if add is None:
        raise InternalError(f"{where}: no add joins its {part} to the residual stream at {res.name}")
    x = res.args[1] if res.args[0] in branch_nodes else res.args[0]
    if info.norm_placement == "post":
        if sub.norm is None or sub.norm.input != res.name:
            raise UserError(f"{where}: post-norm {part} without a LayerNorm after its residual add",
                            "drop whole blocks instead")
        return _same_tokens(view, Site(block.index, block.name, part, out=sub.norm.node, by=x.name, x=x.name))
    return _same_tokens(view, Site(block.index, block.name, part, out=add.name, by=other.name, x=x.name,
                                   branch=branch.name))


def _same_tokens(view: _View, s: Site) -> Site:
    """`s`, or UserError when the part's output stream is not the shape of the stream that would replace
    it (prune-tokens shortened the sequence inside it), so removing it cannot be exact."""
    shapes = [getattr(view.by_name[n].meta.get("val"), "shape", None) for n in (s.out, s.by)]
    if None not in shapes and tuple(shapes[0]) != tuple(shapes[1]):
        raise UserError(f"block {s.block} ({s.name}): its {s.part} changes the stream's shape "
                        f"({list(shapes[1])} -> {list(shapes[0])}; prune-tokens shortens the sequence there), "
                        "so it cannot be removed exactly",
                        "put analyze-redundancy and the drop-* passes before prune-tokens in the pipeline")
    return s


def stream_source(n: fx.Node) -> fx.Node:
    """Walk back through value-keeping ops (casts, views, dropout) to the producing node."""
    while op_name(n) in PASSTHROUGH and isinstance(n.args[0], fx.Node):
        n = n.args[0]
    return n


# -- rewrite ------------------------------------------------------------------------------------------

_NODE_FIELDS = ("node", "input", "output", "residual_add", "core", "scores", "softmax")


def drop(program: Program, ctx: PassContext, part: str, indices: list[int]) -> dict:
    """Remove `part` ("attention" | "mlp" | "block") from the blocks at `indices`; see the module
    docstring. Returns what happened: bytes freed, nodes and attributes removed, how ModelInfo was kept."""
    gm = program.gm
    info = copy.deepcopy(program.info)
    bytes_before = program.param_bytes()
    chosen = [info.blocks[i] for i in sorted(set(indices))]
    renamed: dict[str, str] = {}
    for block in chosen:
        view = _View(gm)
        s = site(view, info, block, part)
        if s is None:
            raise InternalError(f"block {block.index} has no {part} left to drop")
        out, by = view.node(s.out, "sub-block output"), view.node(s.by, "residual operand")
        out.replace_all_uses_with(by)
        gm.graph.erase_node(out)
        renamed[s.out] = stream_source(by).name
        if part in ("attention", "block"):
            block.attention = None
        if part in ("mlp", "block"):
            block.mlp = None
        _rename(info, renamed)
    info.blocks = [b for b in info.blocks if b.attention is not None or b.mlp is not None]
    for i, b in enumerate(info.blocks):
        b.index = i
    removed_nodes, removed_attrs = prune_dead(gm)
    _check_names(gm, info)
    kept = "recovered"
    if _signature(recover(gm)) == _signature(info):
        ctx.refresh_info(program)
    else:
        program.info, kept = info, "edited"
    return {"bytes_freed": bytes_before - program.param_bytes(), "removed_nodes": len(removed_nodes),
            "removed_attributes": removed_attrs, "model_info": kept}


def prune_dead(gm: fx.GraphModule) -> tuple[list[str], list[str]]:
    """Remove dead nodes - attention cores and asserts on otherwise dead values included - then
    unread parameters (dead_code.remove_dead). Returns (node names, attribute paths)."""
    from tcc.passes.dead_code import remove_dead

    return remove_dead(gm)


def _fields(obj):
    """Every dataclass object reachable from obj (obj included)."""
    if dataclasses.is_dataclass(obj):
        yield obj
        for f in dataclasses.fields(obj):
            yield from _fields(getattr(obj, f.name))
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _fields(x)


def _rename(info: ModelInfo, renamed: dict[str, str]) -> None:
    def resolve(name):
        while name in renamed:
            name = renamed[name]
        return name
    for obj in _fields(info):
        for key in _NODE_FIELDS:
            value = getattr(obj, key, None)
            if isinstance(value, str) and value in renamed:
                setattr(obj, key, resolve(value))


def _check_names(gm: fx.GraphModule, info: ModelInfo) -> None:
    names = set(nodes_by_name(gm))
    for obj in _fields(info):
        for key in _NODE_FIELDS:
            value = getattr(obj, key, None)
            if isinstance(value, str) and value not in names:
                raise InternalError(f"after dropping, ModelInfo's {type(obj).__name__}.{key} names '{value}', "
                                    "which is no longer in the graph")


def _signature(info: ModelInfo) -> tuple:
    """What recover must agree on before its result replaces the edited ModelInfo."""
    def w(lin):
        return lin.weight if lin is not None else None
    blocks = tuple((w(b.attention and (b.attention.q or b.attention.qkv)), w(b.mlp and b.mlp.down)) for b in info.blocks)
    return blocks, info.norm_placement, info.final_norm and info.final_norm.weight, w(info.lm_head)


def block_weights(block) -> list[str]:
    """The weights of a block's projections: its identity across passes (names can be generic)."""
    subs = [s for s in (block.attention, block.mlp) if s is not None]
    lins = [getattr(s, r, None) for s in subs for r in ("q", "k", "v", "o", "qkv", "gate", "up", "down", "gate_up")]
    return sorted(lin.weight for lin in lins if lin is not None and lin.weight)


# -- the drop passes --------------------------------------------------------------------------------

def _unit(v: float) -> str | None:
    return None if 0 <= v < 1 else "must be in [0, 1)"


class DropPass(Pass):
    """Base of drop-attention, drop-mlp and drop-blocks (not registered itself)."""

    kind = "transform"
    part = ""  # "attention" | "mlp" | "block"
    options = {
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

    def reads(self, analysis: str) -> set[str]:
        """analyze-redundancy's similarities (and this part's loss increases with by=loss); nothing
        with explicit layers."""
        if analysis != ANALYSIS or self.layers:
            return set()
        return {"similarity"} | ({f"loss:{self.part}"} if self.by == "loss" else set())

    def run(self, program: Program, ctx: PassContext) -> Program:
        if not program.info or not program.info.blocks:
            raise UserError(f"{self.name}: no transformer blocks recognised in this model",
                            "run `tcc analyze MODEL --structure` to see what tcc recovers")
        chosen, notes = self.choose(program, ctx)
        names = [program.info.blocks[i].name for i in chosen]
        result = drop(program, ctx, self.part, chosen) if chosen else {"bytes_freed": 0}
        ctx.note(dropped=[{"index": i, "name": n, **notes["scores"].get(i, {})} for i, n in zip(chosen, names)],
                 **{k: v for k, v in notes.items() if k != "scores"}, **result)
        return program

    # -- choosing ---------------------------------------------------------------------------------
    def choose(self, program: Program, ctx: PassContext) -> tuple[list[int], dict]:
        blocks = program.info.blocks
        n_blocks = len(blocks)
        what = "blocks" if self.part == "block" else f"{self.part} sub-blocks"
        present = [b.index for b in blocks if (b.attention if self.part == "attention" else
                                               b.mlp if self.part == "mlp" else b)]
        given = [k for k in ("count", "ratio", "threshold", "layers") if self.opts[k] != self.options[k].default]
        if not given:
            raise UserError(f"{self.name} needs one of count=N, ratio=R, threshold=T or layers=[...]",
                            f"e.g. {self.name}(count=2) drops the 2 most redundant {what}")
        if len(given) > 1:
            raise UserError(f"{self.name}: options {' and '.join(given)} both choose what to drop; give only one")
        if self.layers:
            bad = [i for i in self.layers if not 0 <= i < n_blocks]
            if bad:
                raise UserError(f"{self.name} option 'layers' has {bad}, out of range for {n_blocks} blocks",
                                f"give indices 0..{n_blocks - 1}")
            gone = [i for i in self.layers if i not in present]
            if gone:
                raise UserError(f"{self.name} option 'layers': blocks {gone} have no {self.part} left")
            return sorted(set(self.layers)), {"selection": f"layers={sorted(set(self.layers))}", "scores": {}}

        if self.count > n_blocks:
            raise UserError(f"{self.name} option 'count' is {self.count} but the model has {n_blocks} blocks",
                            f"give count <= {n_blocks}")
        candidates = [i for i in present if not (self.keep_ends and i in (0, n_blocks - 1))]
        want = self.count if "count" in given else math.floor(self.ratio * n_blocks + 1e-9) if "ratio" in given else None
        if want is not None and want > len(candidates):
            ends = " (keep_ends=true keeps blocks 0 and {})".format(n_blocks - 1) if self.keep_ends else ""
            raise UserError(f"{self.name} option '{given[0]}' asks for {want} {what}, only {len(candidates)} can be "
                            f"dropped{ends}", "ask for fewer" + (", or set keep_ends=false" if self.keep_ends else ""))
        report, how = redundancy(program, ctx, need_loss=self.by == "loss", part=self.part,
                                 who=f"{self.name}({given[0]}={format_value(self.opts[given[0]])})")
        scores = _scores(report, program, self.part)
        similarity = {i: scores.get(i, {}).get("similarity") for i in candidates}
        if self.by == "loss":
            ranked = sorted(candidates, key=lambda i: (_or_inf(scores.get(i, {}).get("loss_increase")), i))
        else:
            ranked = sorted(candidates, key=lambda i: (-_or_inf(similarity[i], -1), i))
        if "threshold" in given:
            chosen = [i for i in ranked if similarity[i] is not None and similarity[i] >= self.threshold]
        else:
            chosen = ranked[:want]
        notes = {"selection": f"{given[0]}={format_value(self.opts[given[0]])}, most redundant first by {self.by}",
                 "analysis": how, "scores": scores, "ranking": ranked}
        if self.keep_ends:
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
    from tcc.passes.analyze_redundancy import analyze, measured

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
