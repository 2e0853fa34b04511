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
Choosing what to drop (by count, ratio, threshold or explicit layers, from analyze-redundancy's
results) is tcc.compress.redundancy.choose; the passes are passes/drop_attention.py, drop_mlp.py, drop_blocks.py.
"""
from __future__ import annotations

import copy
import dataclasses
from collections import deque

import torch.fx as fx

from ..errors import InternalError, UserError
from ..ir.graph import remove_dead
from ..pipeline import PassContext
from ..ir.program import Program
from ..ir.structure import ADD, GraphIndex, ModelInfo, nodes_by_name, op_name, recover, stream_source

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


# -- rewrite ------------------------------------------------------------------------------------------

_NODE_FIELDS = ("node", "input", "output", "residual_add", "core", "scores", "softmax")


def require_blocks(program: Program, who: str) -> None:
    """UserError when ModelInfo has no transformer blocks (nothing a drop pass could remove)."""
    if not program.info or not program.info.blocks:
        raise UserError(f"{who}: no transformer blocks recognised in this model",
                        "run `tcc analyze MODEL --structure` to see what tcc recovers")


def drop_chosen(program: Program, ctx: PassContext, part: str, chosen: list[int], notes: dict) -> bool:
    """What a drop pass does with its choice (tcc.compress.redundancy.choose): drop() them and note the dropped
    blocks with their scores, the choice's notes and drop()'s result; returns whether any went."""
    names = [program.info.blocks[i].name for i in chosen]
    result = drop(program, ctx, part, chosen) if chosen else {"bytes_freed": 0}
    ctx.note(dropped=[{"index": i, "name": n, **notes["scores"].get(i, {})} for i, n in zip(chosen, names)],
             **{k: v for k, v in notes.items() if k != "scores"}, **result)
    return bool(chosen)


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
    unread parameters (tcc.ir.graph.remove_dead). Returns (node names, attribute paths)."""
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
