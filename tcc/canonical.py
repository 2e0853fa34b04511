"""Canonical form of a traced graph: every projection by a stored weight is one `aten.linear` node.

`canonicalize(gm) -> gm` rewrites, in place, the other ways a projection shows up after
`torch.export`, so that structure recovery and every pass see one kind of node:

  aten.addmm(b, x.view(-1, K), W[K, N]) [.view(*x.shape[:-1], N)]   ->  aten.linear(x, W.T, b)
  aten.mm / aten.matmul(x, W[K, N])                                  ->  aten.linear(x, W.T)
  aten.mm / aten.matmul(x, W[N, K].t())                              ->  aten.linear(x, W)
  aten.linear(x, W) + b[N]                                           ->  aten.linear(x, W, b)

W and b must be `get_attr` parameters: GPT-2's Conv1D (addmm), Falcon's `x @ W.T + b`,
hand-written `x @ W`. A [K, N] weight is stored transposed and contiguous under its own name when
only the rewritten projections read it (the usual case), under `<name>_t` otherwise. A flattening
view before an addmm and the matching un-flattening view after it go away, so the linear runs on
the input's own rank like every other model's projections. Nodes keep their metadata (module paths,
fake-tensor values).

Numerics: the same products and sums; only the GEMM's operand layout (and, when a bias is folded,
the point where it is added) changes, which can move the last bits of fp32 results (GPT-2 tiny:
max |diff| 1.5e-7 on logits of magnitude ~1; tests/test_structure.py).
"""
from __future__ import annotations

import torch
import torch.fx as fx

aten = torch.ops.aten
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
_TRANSPOSES = (aten.t.default, aten.numpy_T.default, aten.transpose.int, aten.permute.default)


def canonicalize(gm: fx.GraphModule) -> fx.GraphModule:
    changed = _projections_to_linear(gm)
    changed |= _fold_bias(gm)
    if changed:
        gm.graph.lint()
        gm.recompile()
    return gm


# -- matmul-like projections -> linear -------------------------------------------------------------
def _projections_to_linear(gm: fx.GraphModule) -> bool:
    sites = [m for m in (_match(n) for n in list(gm.graph.nodes)) if m is not None]
    weights: dict[fx.Node, fx.Node] = {}  # W as the graph reads it -> get_attr of the [N, K] weight
    for w in dict.fromkeys(s[2] for s in sites):
        if _rank(w) == 2 and w.op == "get_attr":  # stored [K, N]: transpose the parameter
            only_here = all(u in {s[0] for s in sites if s[2] is w} for u in w.users)
            weights[w] = _transpose_weight(gm, w, in_place=only_here)
        else:  # W[N, K].t() in the graph: linear reads W itself
            weights[w] = w.args[0]
    for node, x, w, bias in sites:
        _rewrite(gm.graph, node, x, weights[w], bias)
    for w, wt in weights.items():
        if w.op == "get_attr" and w is not wt and not w.users:
            gm.graph.erase_node(w)
    return bool(sites)


def _is_param(n, rank: int) -> bool:
    return isinstance(n, fx.Node) and n.op == "get_attr" and _rank(n) == rank


def _is_transposed_param(n) -> bool:
    """W.t(), W.T, W.transpose(0, 1) or W.permute(1, 0) of a 2-D parameter."""
    if not isinstance(n, fx.Node) or n.target not in _TRANSPOSES or not _is_param(n.args[0], 2):
        return False
    if n.target is aten.transpose.int:
        return sorted(d % 2 for d in n.args[1:3]) == [0, 1]
    if n.target is aten.permute.default:
        return [d % 2 for d in n.args[1]] == [1, 0]
    return True


def _match(n: fx.Node):
    """(node, x, W as read, bias) when n projects x by a stored 2-D weight; else None."""
    if n.op != "call_function":
        return None
    if n.target is aten.addmm.default and len(n.args) == 3 and not n.kwargs:
        bias, x, w = n.args
        if (_is_param(w, 2) or _is_transposed_param(w)) and _is_param(bias, 1):
            return n, x, w, bias
    if n.target in (aten.mm.default, aten.matmul.default) and len(n.args) == 2:
        x, w = n.args
        if (_is_param(w, 2) or _is_transposed_param(w)) and isinstance(x, fx.Node) and x.op != "get_attr":
            return n, x, w, None
    return None


def _rank(n: fx.Node) -> int:
    v = n.meta.get("val")
    return v.dim() if isinstance(v, torch.Tensor) else -1


def _transpose_weight(gm: fx.GraphModule, w: fx.Node, in_place: bool) -> fx.Node:
    owner_path, _, attr = w.target.rpartition(".")
    owner = gm.get_submodule(owner_path)
    old = getattr(owner, attr)
    new = torch.nn.Parameter(old.detach().t().contiguous(), requires_grad=old.requires_grad)
    if in_place:
        setattr(owner, attr, new)
        w.meta["val"] = _fake_like(w.meta.get("val"), new)
        return w
    owner.register_parameter(f"{attr}_t", new)
    with gm.graph.inserting_after(w):
        wt = gm.graph.get_attr(f"{owner_path}.{attr}_t" if owner_path else f"{attr}_t")
    wt.meta = {**w.meta, "val": _fake_like(w.meta.get("val"), new)}
    return wt


def _fake_like(old_val, real: torch.Tensor):
    mode = getattr(old_val, "fake_mode", None)
    return mode.from_tensor(real) if mode is not None else torch.empty_like(real, device="meta")


def _rewrite(g: fx.Graph, node: fx.Node, x: fx.Node, w: fx.Node, bias):
    replaced, src = node, x
    # addmm(b, x0.view(-1, K), W).view(*x0.shape[:-1], N) -> linear(x0, W.T, b)
    users = list(node.users)
    if x.target in _VIEWS and len(users) == 1 and users[0].target in _VIEWS and users[0].args[0] is node:
        x0, out = x.args[0], users[0]
        if _shape(x0) and _shape(out) and _shape(x0)[:-1] == _shape(out)[:-1]:
            replaced, src = out, x0
    with g.inserting_before(replaced):
        lin = g.call_function(aten.linear.default, (src, w) + ((bias,) if bias is not None else ()))
    lin.meta = dict(node.meta)
    lin.meta["val"] = replaced.meta.get("val")
    replaced.replace_all_uses_with(lin)
    for dead in dict.fromkeys((replaced, node, x, node.args[-1])):  # and a transpose of W
        if isinstance(dead, fx.Node) and dead.op == "call_function" and not dead.users:
            g.erase_node(dead)


def _shape(n) -> tuple | None:
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


# -- linear(x, W) + b -> linear(x, W, b) -----------------------------------------------------------
def _fold_bias(gm: fx.GraphModule) -> bool:
    changed = False
    for lin in list(gm.graph.nodes):
        if lin.target is not aten.linear.default or len(lin.args) != 2 or len(lin.users) != 1:
            continue
        add = next(iter(lin.users))
        if add.target is not aten.add.Tensor or len(add.args) != 2 or add.kwargs:
            continue
        bias = add.args[1] if add.args[0] is lin else add.args[0]
        if not _is_param(bias, 1) or _shape(bias)[0] != _shape(lin)[-1]:
            continue
        lin.args = (*lin.args, bias)
        lin.meta["val"] = add.meta.get("val")
        add.replace_all_uses_with(lin)
        gm.graph.erase_node(add)
        changed = True
    return changed
