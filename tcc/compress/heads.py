"""Attention heads: how much each one contributes, and cutting heads out of the graph.

head_importance(program, feeds) -> list[list[float]]
    Per block, per query head h: the mean over the feeds' tokens (tokens whose attention_mask is 0
    left out) of || W_o[:, cols_h] @ x[cols_h] ||_2, the L2 norm of the head's contribution to the
    output projection's output (x is what the output projection reads, cols_h the head's input
    features from ModelInfo.o_heads). Captured by running the graph once per feed under a
    torch.fx.Interpreter that looks at the output projections' inputs; works for aten.linear,
    tcc::dense and tcc::dense_w8 projections.
head_statistics(program, feeds) -> {"norm": that, "mean": per block, per head, the mean
    contribution vector W_o[:, cols_h] @ x[cols_h] (float32 [out features])}, from the same run.

prune_attention(gm, attention, keep_q, keep_kv, o_bias_delta=None) -> dict
    Removes, in place, the query heads not in `keep_q` and the KV heads not in `keep_kv` from one
    attention block (a tcc.ir.structure.Attention of `gm`), and adds `o_bias_delta` to the output
    projection's bias (when it is not all zeros; a float32 parameter `bias` is created next to the
    weight when the projection has none):
      weights  output rows of the q, k and v projections (or of a fused qkv projection, which holds
               the kept rows of all three parts), with their biases and tcc::dense_w8 scales, and
               input columns of the output projection, by ModelInfo's per-head feature ranges;
      shapes   the size arguments of view / reshape / expand / repeat / unflatten between the
               projections and the output projection (the H of view(B, S, H, D), the Hkv and G of
               repeat_kv's expand(B, Hkv, G, S, D)), and the offsets / sizes of slice, narrow and
               split on the features of a fused projection.
    Preconditions (ValueError otherwise): keep_q and keep_kv are non-empty, sorted and distinct; a
    query head h reads KV head h // G (G = heads per KV head); every kept query head's KV head is
    kept and every kept KV head keeps the same number G' of query heads, so H' = G' * Hkv'.
    Returns {"params_removed": elements, "rewritten": [node names]}.

How the shape rewrite finds what to change: for every node on the way, which of its elements
survive is found by pushing element positions ("ids") through the graph: forward through shape ops
(replayed on the ids tensor) and through element-wise ops (rotary embeddings, scaling, masking,
softmax keep each element's head), from the node to where the survivors are known: the attention
core's q, k and v inputs, whose heads sit on dim -3 (query heads, or KV heads when k and v are not
repeated), and the output projection's input. A size becomes the number of surviving indices along
its dim; sizes are taken from the survivors put in canonical position (the first G' query heads of
the first Hkv' groups), since a query-mode selection that differs between groups leaves no box
shape at repeat_kv's [B, Hkv, G, S, D] but has the same sizes; offsets come from the real
survivors. Anything that cannot be followed (a data-dependent index on the head dim, a head-sized
tensor from outside such as ALiBi slopes, the values leaving the graph as a KV cache) raises a
UserError naming the node; the caller should then discard the graph (the prune-heads pass works on
a copy).
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import torch
import torch.fx as fx

from ..errors import UserError
from ..ir.graph import BIAS_AT, new_attribute
from ..pipeline import set_val
from ..ir.structure import (IDENTITY, SHAPE, Attention, Linear, ancestors, descendants, is_size, nodes_by_name,
                        op_name, size_hint)
from ..ir.program import attribute as _attr

_SIZES = {"aten.view", "aten.reshape", "aten._unsafe_view", "aten.expand"}
# ops after which every element still belongs to the head of the input element at its position
_POINTWISE = IDENTITY | {"aten.mul", "aten.div", "aten.add", "aten.sub", "aten.neg", "aten.where", "aten.masked_fill",
                         "aten.tanh", "aten.softmax", "aten._softmax", "aten._safe_softmax"}
_REPLAY = SHAPE | {"aten.cat", "aten.stack", "aten.repeat", "aten.repeat_interleave"}


# -- importance --------------------------------------------------------------------------------------
def head_importance(program, feeds: list[dict]) -> list[list[float]]:
    """Per block, per query head: mean L2 norm of the head's contribution to the output projection."""
    return head_statistics(program, feeds)["norm"]


def head_statistics(program, feeds: list[dict]) -> dict:
    """{"norm": per block, per head, the mean L2 norm of the head's contribution to the output
    projection's output; "mean": per block, per head, the mean contribution vector (float32 [out])},
    over the feeds' tokens, tokens whose attention_mask is 0 left out."""
    blocks = program.info.blocks
    at = {}
    for i, b in enumerate(blocks):
        a = b.attention
        if a is None:  # attention dropped: no heads
            continue
        if a.o is None or a.o_heads is None:
            raise UserError(f"block {i} ({b.name}): the output projection's per-head inputs were not traced",
                            "head importance needs ModelInfo.o_heads")
        at[a.o.node] = i
    norms = [[0.0] * (len(b.attention.o_heads) if b.attention else 0) for b in blocks]
    sums = [[0.0] * (len(b.attention.o_heads) if b.attention else 0) for b in blocks]
    tokens = [0.0] * len(blocks)

    class Capture(fx.Interpreter):
        def run_node(self, n):
            if n.name in at:
                args, _ = self.fetch_args_kwargs_from_env(n)
                i = at[n.name]
                x, w = args[0].to(torch.float32), _effective_weight(n, args)
                weights = self.token_weights if self.token_weights.shape == x.shape[:-1] else torch.ones(x.shape[:-1])
                tokens[i] += float(weights.sum())
                for h, ranges in enumerate(blocks[i].attention.o_heads):
                    cols = _index(ranges)
                    part = x.index_select(-1, cols) @ w.index_select(1, cols).t()
                    norms[i][h] += float((part.norm(dim=-1) * weights).sum())
                    sums[i][h] = sums[i][h] + (part * weights[..., None]).reshape(-1, part.shape[-1]).sum(0)
            return super().run_node(n)

    for feed in feeds:
        args = [torch.from_numpy(s.check(feed[s.name])) for s in program.inputs]
        cap = Capture(program.gm)
        mask = feed.get("attention_mask")
        cap.token_weights = torch.from_numpy(np.asarray(mask, dtype=np.float32)) if mask is not None else torch.ones(0)
        with torch.no_grad():
            cap.run(*args)
    per = [max(t, 1e-12) for t in tokens]
    return {"norm": [[v / per[i] for v in row] for i, row in enumerate(norms)],
            "mean": [[v / per[i] for v in row] for i, row in enumerate(sums)]}


def _effective_weight(n: fx.Node, args) -> torch.Tensor:
    if op_name(n) == "tcc.dense_w8":
        return args[1].to(torch.float32) * args[2].to(torch.float32)[:, None]
    return args[1].to(torch.float32)


def _index(ranges) -> torch.Tensor:
    return torch.tensor([f for r in ranges for f in range(*r)], dtype=torch.int64)


# -- pruning -----------------------------------------------------------------------------------------
def prune_attention(gm: fx.GraphModule, a: Attention, keep_q: list[int], keep_kv: list[int],
                    o_bias_delta: torch.Tensor | None = None) -> dict:
    """Remove the heads not kept from attention `a` of `gm`, in place (see the module docstring);
    `o_bias_delta` is added to the output projection's bias (one is created when it has none)."""
    _check_keep(a, keep_q, keep_kv)
    where = _where(a)
    for p in ("q_heads", "k_heads", "v_heads", "o_heads"):
        if getattr(a, p) is None or a.o is None:
            raise UserError(f"cannot prune heads of attention '{where}': its per-head feature layout was not traced",
                            "this attention layout is not supported by prune-heads yet")
    by = nodes_by_name(gm)
    site = _Site(gm, a, by, where)
    kept = {"q": keep_q, "k": keep_kv, "v": keep_kv}
    canon_q, canon_kv = _canonical(a, len(keep_q), len(keep_kv))
    real = site.masks(keep_q, keep_kv)
    canon = site.masks(canon_q, canon_kv)

    # weights: rows of each q/k/v (or fused) projection, columns of the output projection
    rows: dict[str, set[int]] = {}
    for part in "qkv":
        lin = getattr(a, part) or a.qkv
        heads = getattr(a, f"{part}_heads")
        rows.setdefault(lin.node, set()).update(f for h in kept[part] for f in _index(heads[h]).tolist())
    cols = sorted(f for h in keep_q for f in _index(a.o_heads[h]).tolist())
    for node, feats in rows.items():
        site.expect_features(by[node], sorted(feats), real)
    site.expect_features(site.o_in, cols, real)

    rewrites = [(n, new) for n in site.ordered(site.rewritable) if (new := site.new_call(n, real, canon)) is not None]
    removed = 0
    for lin in {l.node: l for l in (a.q, a.k, a.v, a.qkv) if l is not None}.values():
        removed += _slice_linear(gm, by, lin, sorted(rows[lin.node]), dim=0, where=where)
    removed += _slice_linear(gm, by, a.o, cols, dim=1, where=where)
    if o_bias_delta is not None and bool(o_bias_delta.any()):
        _add_bias(gm, by[a.o.node], a.o, o_bias_delta)
    for n, (target, args, kwargs) in rewrites:
        n.target, n.args, n.kwargs = target, args, kwargs
    for n in site.asserts:
        n.kwargs = {k: (None if k in ("size", "stride") else v) for k, v in n.kwargs.items()}
    site.refresh_vals()
    return {"params_removed": removed, "rewritten": [n.name for n, _ in rewrites]}


def _where(a: Attention) -> str:
    """The attention's module path (common prefix of its projections'), else its core node's name."""
    paths = [l.module.split(".") for l in (a.q or a.qkv, a.o) if l is not None and l.module]
    common = [p[0] for p in itertools.takewhile(lambda p: p[0] == p[1], zip(*paths))] if len(paths) == 2 else []
    return ".".join(common) or a.core


def _check_keep(a: Attention, keep_q: list[int], keep_kv: list[int]) -> None:
    h, hkv = a.num_heads, a.num_kv_heads
    for name, keep, count in (("keep_q", keep_q, h), ("keep_kv", keep_kv, hkv)):
        if not keep or list(keep) != sorted(set(keep)) or keep[0] < 0 or keep[-1] >= count:
            raise ValueError(f"{name} must be sorted distinct head indices in [0, {count}), got {keep}")
    if h % hkv:
        raise ValueError(f"{h} query heads do not split into {hkv} KV-head groups")
    g = h // hkv
    per = {kv: sum(q // g == kv for q in keep_q) for kv in keep_kv}
    if any(q // g not in per for q in keep_q) or len(set(per.values())) != 1:
        raise ValueError(f"every kept KV head must keep the same number of query heads, and every kept query head "
                         f"its KV head; got query heads {keep_q} over KV heads {keep_kv} (G={g})")


def _canonical(a: Attention, n_q: int, n_kv: int) -> tuple[list[int], list[int]]:
    """The same counts as a selection, heads in first positions: G' first heads of the first Hkv' groups."""
    g = a.num_heads // a.num_kv_heads
    per = n_q // n_kv
    return [kv * g + j for kv in range(n_kv) for j in range(per)], list(range(n_kv))


class _Site:
    """The nodes of one attention block that carry its heads, and which of their elements survive."""

    def __init__(self, gm: fx.GraphModule, a: Attention, by: dict, where: str):
        self.gm, self.a, self.where = gm, a, where
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}
        core = by[a.core]
        self.core, self.o_node = core, by[a.o.node]
        self.o_in = self.o_node.args[0]
        if a.kind == "eager":
            self.scores = by[a.scores]
            sinks = {"q": self.scores.args[-2], "k": self.scores.args[-1], "v": core.args[1]}
        else:
            self.scores = None
            sinks = {"q": core.args[0], "k": core.args[1], "v": core.args[2]}
        projs = {p: by[(getattr(a, p) or a.qkv).node] for p in "qkv"}
        self.sinks = list(sinks.values())
        self.pre = set().union(*(descendants(projs[p]) & ancestors(sinks[p]) for p in "qkv"))
        self.post = descendants(core) & ancestors(self.o_in)
        self.chain = (descendants(self.scores) & ancestors(core)) - {core} if self.scores is not None else set()
        self.touched = set().union(*(descendants(p) for p in projs.values())) & ancestors(self.o_node)
        self.asserts = [u for n in self.touched for u in n.users
                        if op_name(u) == "aten._assert_tensor_metadata" and (u.kwargs.get("size") or u.kwargs.get("stride"))]
        self.rewritable = (self.pre | self.post | self.chain) - set(projs.values())
        leaks = set().union(*(descendants(p) for p in projs.values())) - self.touched - descendants(self.o_node)
        leaks = [n for n in leaks if n.users or n.op == "output"]
        leaks = [n for n in leaks if op_name(n) != "aten._assert_tensor_metadata"]
        if leaks:
            n = self.ordered(leaks)[0]
            raise UserError(f"cannot prune heads of attention '{where}': node '{n.name}' ({op_name(n)}) uses the "
                            f"q/k/v values outside the attention (a KV cache output?)",
                            "trace the model without cache outputs (use_cache=False)")

    def ordered(self, nodes) -> list[fx.Node]:
        return sorted(nodes, key=self.order.get)

    # -- which elements survive -------------------------------------------------------------------
    def masks(self, keep_q: list[int], keep_kv: list[int]) -> dict[fx.Node, torch.Tensor]:
        """{node: bool tensor of its (old) shape, True where the element survives}."""
        out = {}
        sink_keep = {s: self._head_mask(s, keep_q, keep_kv) for s in self.sinks}
        for n in self.ordered(self.pre):
            shape = _shape(n)
            if shape is None:
                continue
            env = _push(n, _ids(shape), self.ordered(self.pre), self.order)
            reached = [s for s in self.sinks if isinstance(env.get(s), torch.Tensor)]
            if not reached:
                continue
            kept = torch.zeros(math.prod(shape), dtype=torch.bool)
            for s in reached:
                hit = env[s][sink_keep[s]]
                kept[hit[hit >= 0].to(torch.int64)] = True
            out[n] = kept.reshape(shape)
        for source, region in ((self.core, self.post), (self.scores, self.chain)):
            if source is None:
                continue
            keep = self._head_mask(source, keep_q, keep_kv, queries_only=True).reshape(-1)
            env = _push(source, _ids(_shape(source)), self.ordered(region), self.order)
            for n, ids in env.items():
                if isinstance(ids, torch.Tensor):
                    out[n] = (ids >= 0) & keep[ids.clamp(min=0).to(torch.int64)]
        return out

    def _head_mask(self, s: fx.Node, keep_q, keep_kv, queries_only: bool = False) -> torch.Tensor:
        shape = _shape(s)
        a = self.a
        if shape is None or len(shape) < 3:
            raise UserError(f"cannot prune heads of attention '{self.where}': node '{s.name}' has no [.., heads, S, D] "
                            "shape", "this attention layout is not supported by prune-heads yet")
        heads = shape[-3]
        if heads == a.num_heads:
            keep = keep_q
        elif heads == a.num_kv_heads and not queries_only:
            keep = keep_kv
        else:
            raise UserError(f"cannot prune heads of attention '{self.where}': node '{s.name}' holds {heads} heads on dim "
                            f"-3, expected {a.num_heads} (or {a.num_kv_heads} KV heads)",
                            "this attention layout (batch folded into heads?) is not supported by prune-heads yet")
        m = torch.zeros(heads, dtype=torch.bool)
        m[keep] = True
        return m[:, None, None].expand(shape).contiguous()

    def expect_features(self, n: fx.Node, feats: list[int], masks: dict) -> None:
        """The graph agrees with ModelInfo: the last-dim features of n that survive are `feats`."""
        m = masks.get(n)
        got = m.reshape(-1, m.shape[-1]).any(0).nonzero().flatten().tolist() if m is not None else None
        if got != feats:
            raise UserError(f"cannot prune heads of attention '{self.where}': the surviving features of node '{n.name}' "
                            f"cannot be followed through the graph to the attention core"
                            + (" (fused-qkv pruning is not supported yet for this layer)" if self.a.qkv else ""),
                            "this attention layout is not supported by prune-heads yet")

    # -- new arguments ------------------------------------------------------------------------------
    def new_call(self, n: fx.Node, real: dict, canon: dict):
        """(target, args, kwargs) for n after pruning, or None when n needs no change."""
        op = op_name(n)
        x = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
        if op in _SIZES or op in ("aten.repeat", "aten.repeat_interleave", "aten.unflatten"):
            args = self._new_sizes(n, op, x, canon)
        elif op in ("aten.slice", "aten.narrow", "aten.split", "aten.split_with_sizes", "aten.chunk", "aten.select",
                    "aten.index_select"):
            if x not in real:
                self._cannot(n, "the surviving elements of its input cannot be followed")
            dim = _dim_arg(n) % real[x].dim()
            keep = self._along(real[x], dim)
            if bool(keep.all()):
                return None
            if op in ("aten.split", "aten.split_with_sizes"):
                size = len(keep)
                sizes = (list(n.args[1]) if op == "aten.split_with_sizes" else
                         [min(n.args[1], size - i) for i in range(0, size, n.args[1])])
                bounds = np.cumsum([0] + sizes).tolist()
                new = [int(keep[bounds[i]:bounds[i + 1]].sum()) for i in range(len(sizes))]
                return torch.ops.aten.split_with_sizes.default, (x, new, dim), {}
            args = self._new_offsets(n, op, keep)
        elif op == "aten.index" and x in real and not bool(real[x].all()):
            self._cannot(n, "it picks elements of a pruned dim by index")
        else:
            return None
        return None if args == tuple(n.args) else (n.target, args, dict(n.kwargs))

    def _new_sizes(self, n: fx.Node, op: str, x, canon: dict) -> tuple:
        if n not in canon:
            self._cannot(n, "its surviving elements cannot be followed")
        args, out = list(n.args), self._sizes(n, canon[n])
        if op in _SIZES:  # a symbolic size stays, on a dim that pruning leaves alone
            if any(isinstance(s, fx.Node) and out[i] != size_hint(s.meta["val"]) for i, s in enumerate(n.args[1])):
                self._cannot(n, "a pruned dim has a symbolic size")
            args[1] = [s if isinstance(s, fx.Node) or s == -1 else out[i] for i, s in enumerate(n.args[1])]
        elif op == "aten.unflatten":
            d = n.args[1] % len(_shape(x))
            args[2] = out[d:d + len(n.args[2])]
        else:  # repeat / repeat_interleave: the factor is new output size / new input size
            before = self._sizes(x, canon[x]) if x in canon else list(_shape(x))
            if op == "aten.repeat":
                before = [1] * (len(out) - len(before)) + before
                args[1] = [o // b for o, b in zip(out, before)]
            else:
                d = (n.args[2] if len(n.args) > 2 else n.kwargs["dim"]) % len(out)
                args[1] = out[d] // before[d]
        return tuple(args)

    def _new_offsets(self, n: fx.Node, op: str, keep: torch.Tensor) -> tuple:
        size, args = len(keep), list(n.args)
        at = lambda i: _kept_before(keep, i + size if i < 0 else min(i, size))
        if op == "aten.slice":
            full = args + [None] * (5 - len(args))
            start, end, step = full[2], full[3], full[4] if full[4] is not None else 1
            if step != 1:
                self._cannot(n, "it slices a pruned dim with a step")
            full[2] = at(start or 0)
            full[3] = end if end is None or end >= size else at(end)
            return tuple(full[:max(len(args), 4)])
        if op == "aten.narrow":
            start = args[2] + size if args[2] < 0 else args[2]
            args[2], args[3] = at(start), int(keep[start:start + args[3]].sum())
            return tuple(args)
        if op == "aten.chunk":  # the same count in every chunk keeps the call valid
            if len({int(p.sum()) for p in keep.chunk(n.args[1])}) != 1:
                self._cannot(n, "its chunks lose different numbers of features")
            return tuple(args)
        self._cannot(n, "it picks elements of a pruned dim by index")

    def _sizes(self, n: fx.Node, m: torch.Tensor) -> list[int]:
        per = [int(self._along(m, d).sum()) for d in range(m.dim())]
        if math.prod(per) != int(m.sum()):
            self._cannot(n, "its surviving elements do not form a box")
        return per

    @staticmethod
    def _along(m: torch.Tensor, d: int) -> torch.Tensor:
        """Which indices along dim d keep any element."""
        return m.movedim(d, 0).reshape(m.shape[d], -1).any(1)

    def _cannot(self, n: fx.Node, why: str):
        fused = " (fused-qkv pruning is not supported yet for this layer)" if self.a.qkv else ""
        raise UserError(f"cannot prune heads of attention '{self.where}': node '{n.name}' ({op_name(n)}) cannot be "
                        f"rewritten, {why}{fused}", "this attention layout is not supported by prune-heads yet")

    # -- metadata ------------------------------------------------------------------------------------
    def refresh_vals(self) -> None:
        """New fake-tensor values (what ModelInfo reads shapes from) for every node whose shape changed."""
        nodes = self.ordered(self.touched | {self.o_node} | set(self.asserts))
        for n in nodes:
            for a in n.all_input_nodes:
                if a.op == "get_attr":
                    set_val(self.gm, a, _attr(self.gm, a.target))
                    a.meta.pop("tensor_meta", None)
        for n in nodes:
            try:
                set_val(self.gm, n)
            except Exception as e:
                self._cannot(n, f"it fails on the pruned shapes ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                                "a head-sized tensor from outside the attention, such as ALiBi slopes?")
            n.meta.pop("tensor_meta", None)


def _shape(n) -> tuple | None:
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return tuple(size_hint(s) for s in v.shape) if isinstance(v, torch.Tensor) else None


def _ids(shape) -> torch.Tensor:
    return torch.arange(math.prod(shape), dtype=torch.float64).reshape(shape)


def _push(start: fx.Node, ids: torch.Tensor, region: list[fx.Node], order: dict) -> dict:
    """Element ids of start pushed forward through the region (in graph order); -1 marks elements
    that do not come from start."""
    env = {start: ids}
    for u in region:
        if order[u] <= order[start] or not any(a in env for a in u.all_input_nodes):
            continue
        value = _replay(u, env)
        if value is not None:
            env[u] = value
    return env


def _replay(u: fx.Node, env: dict):
    op = op_name(u)
    if op in IDENTITY:
        return env.get(u.args[0]) if isinstance(u.args[0], fx.Node) else None
    out = _shape(u)
    if op in _POINTWISE:
        src = next(a for a in u.all_input_nodes if a in env)
        try:
            return torch.broadcast_to(env[src], out) if out is not None else None
        except RuntimeError:
            return None
    if op not in _REPLAY:
        return None

    def value(a):
        if a in env:
            return env[a]
        if is_size(a):  # a symbolic size replays with its example value
            return size_hint(a.meta["val"])
        shape = _shape(a)
        return torch.full(shape, -1.0, dtype=torch.float64) if shape is not None else a

    args = fx.node.map_arg(u.args, value)
    kwargs = fx.node.map_arg(u.kwargs, value)
    try:
        return u.target(*args, **kwargs)
    except Exception:
        if op in ("aten.view", "aten._unsafe_view"):
            return torch.reshape(*args)
        return None


def _dim_arg(n: fx.Node) -> int:
    op = op_name(n)
    pos = {"aten.split": 2, "aten.split_with_sizes": 2, "aten.chunk": 2}.get(op, 1)
    return n.args[pos] if len(n.args) > pos else n.kwargs.get("dim", 0)


def _kept_before(keep: torch.Tensor, i: int) -> int:
    return int(keep[:max(0, i)].sum())



def _slice_linear(gm: fx.GraphModule, by: dict, lin: Linear, keep: list[int], dim: int, where: str) -> int:
    """Keep `keep` of the projection's output features (dim 0: weight rows, bias, dense_w8 scales) or
    input features (dim 1: weight columns); returns how many elements were removed."""
    node = by[lin.node]
    at = 3 if lin.op == "tcc.dense_w8" else 2
    bias = node.args[at] if len(node.args) > at else None
    if lin.weight is None or (dim == 0 and isinstance(bias, fx.Node) and bias.op != "get_attr"):
        raise UserError(f"cannot prune heads of attention '{where}': the weight or bias of '{lin.node}' is computed, "
                        "not stored", "this attention layout is not supported by prune-heads yet")
    targets = [t for t in ([lin.weight] + ([lin.bias, lin.scale] if dim == 0 else [])) if t is not None]
    for target in targets:
        readers = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == target]
        if any(u is not node for r in readers for u in r.users):
            raise UserError(f"cannot prune heads of attention '{where}': '{target}' is also read outside its projection",
                            "untie the weight before pruning heads")
    idx, removed = torch.tensor(keep, dtype=torch.int64), 0
    for target in targets:
        old = _attr(gm, target)
        new = old.detach().index_select(dim if old.dim() > 1 else 0, idx).contiguous()
        removed += old.numel() - new.numel()
        owner_path, _, name = target.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        setattr(owner, name, torch.nn.Parameter(new, requires_grad=old.requires_grad)
                if isinstance(old, torch.nn.Parameter) else new)
    return removed


def _add_bias(gm: fx.GraphModule, node: fx.Node, lin: Linear, delta: torch.Tensor) -> None:
    """bias += delta for projection `node`; a projection without a bias gets one next to its weight."""
    if lin.bias is not None:
        b = _attr(gm, lin.bias)
        with torch.no_grad():
            b += delta.to(b.dtype)
        return
    at = BIAS_AT[lin.op]
    if len(node.args) > at or node.kwargs:
        raise UserError(f"cannot add a bias to '{lin.node}': its bias argument is computed")
    owner_path, _, _ = (lin.weight or "").rpartition(".")
    b = new_attribute(gm, "bias", delta.detach().to(torch.float32).clone(), node, owner=owner_path, parameter=True)
    node.args = tuple(node.args) + (None,) * (at - len(node.args)) + (b,)
