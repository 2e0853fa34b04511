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

Decomposed ops become the one op structure recovery and the backends know (ONNX exports and
hand-written models spell them out); each pattern is exact, every inner node used only inside it:

  x * 0.5 * (1 + erf(x / sqrt(2)))   (any order of the products)  ->  aten.gelu(x)
  x * sigmoid(x)                                                   ->  aten.silu(x)
  reciprocal(sqrt(v))                                              ->  aten.rsqrt(v)
  d = x - mean(x, -1); d / sqrt(mean(d^2, -1) + eps) [* w] [+ b]   ->  aten.layer_norm(x, [H], w, b, eps)
      (or d * rsqrt(..); d^2 as pow or d * d; w, b stored [H] tensors)
These move fp32 results by rounding only (the same math in another order: ~1e-7 relative).

`fuse_attention(gm)` (separate: canonicalize() leaves attention as the model wrote it; the ONNX
frontend calls it) turns eager attention into one SDPA node, which the backends send to a kernel:

  matmul(q [* a], k^T [* b]) [* c or / c] [+ mask] -> softmax(-1) [-> where(isnan(p), 0, p)]
      [-> dropout / cast] -> matmul(p, v)   (4-D q, k, v with equal heads; a, b, c numbers)
                                         ->  aten.scaled_dot_product_attention(q, k, v, mask, scale=a*b*c)
      k^T given by a transpose or permute of k is read back through it; otherwise k = k^T.transpose(-1, -2).
      The where(isnan) guard is what torch's own SDPA does for rows that mask every key; a mask
      added before the scaling, soft-capping (tanh) or ALiBi (baddbmm) leave the chain eager.
      Rounding differs from the chain's by ~1e-7 relative (fp32).
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from .graph import readers

aten = torch.ops.aten
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
_TRANSPOSES = (aten.t.default, aten.numpy_T.default, aten.transpose.int, aten.permute.default)


def canonicalize(gm: fx.GraphModule) -> fx.GraphModule:
    changed = _projections_to_linear(gm)
    changed |= _fold_bias(gm)
    changed |= _decomposed_ops(gm)
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


# -- decomposed ops -> one op ------------------------------------------------------------------------
def _num(a) -> float | None:
    return float(a) if isinstance(a, (int, float)) and not isinstance(a, bool) else None


def _only_user(n: fx.Node):
    if not isinstance(n, fx.Node):
        return None
    r = readers(n)
    return r[0] if len(r) == 1 else None


def _other(n: fx.Node, a):
    """The operand of binary n that is not a."""
    return n.args[1] if n.args[0] is a else n.args[0]


def _replace(g: fx.Graph, old: fx.Node, target, args, kwargs=None, dead=()) -> fx.Node:
    """Put target(*args) in old's place (keeping its metadata) and erase the nodes of the pattern
    that nothing reads any more."""
    with g.inserting_before(old):
        new = g.call_function(target, tuple(args), kwargs or {})
    new.meta = dict(old.meta)
    old.replace_all_uses_with(new)
    todo = [n for n in dict.fromkeys([old, *dead]) if isinstance(n, fx.Node) and n.op == "call_function"]
    todo += [u for n in todo for u in n.users if u.target is aten._assert_tensor_metadata.default]
    while todo:  # erase from the end of the pattern back
        unused = [n for n in todo if not n.users]
        if not unused:
            break
        for n in unused:
            g.erase_node(n)
        todo = [n for n in todo if n not in unused]
    return new


def _alive(n: fx.Node) -> bool:
    return not getattr(n, "_erased", False)


def _factors(n: fx.Node) -> list:
    """Operands of a tree of muls under n (inner muls read only inside the tree)."""
    out = []
    for a in n.args:
        if isinstance(a, fx.Node) and a.target is aten.mul.Tensor and _only_user(a) is n:
            out += _factors(a)
        else:
            out.append(a)
    return out


def _gelu_root(x: fx.Node, one_plus_erf: fx.Node):
    """The mul computing x * (1 + erf(..)) * 0.5 from one_plus_erf (at most two muls up)."""
    n = one_plus_erf
    for _ in range(2):
        n = _only_user(n)
        if n is None or n.target is not aten.mul.Tensor:
            return None
        fs = _factors(n)
        nodes = [f for f in fs if isinstance(f, fx.Node)]
        nums = [_num(f) for f in fs if not isinstance(f, fx.Node)]
        if len(nodes) == 2 and {id(f) for f in nodes} == {id(x), id(one_plus_erf)} and nums and None not in nums \
                and abs(math.prod(nums) - 0.5) < 1e-6:
            return n
    return None


def _gelu(g: fx.Graph, erf: fx.Node) -> bool:
    u = erf.args[0]
    if not isinstance(u, fx.Node) or _only_user(u) is not erf or len(u.args) != 2 or _num(u.args[1]) is None:
        return False
    c = _num(u.args[1])
    if not ((u.target is aten.div.Tensor and abs(c - math.sqrt(2)) < 1e-5)
            or (u.target is aten.mul.Tensor and abs(c - math.sqrt(0.5)) < 1e-6)):
        return False
    x, add = u.args[0], _only_user(erf)
    if add is None or add.target is not aten.add.Tensor or _num(_other(add, erf)) != 1.0:
        return False
    root = _gelu_root(x, add)
    if root is None:
        return False
    _replace(g, root, aten.gelu.default, (x,), dead=[u, erf, add] + [f for f in root.all_input_nodes if f is not x])
    return True


def _silu(g: fx.Graph, sig: fx.Node) -> bool:
    x, mul = sig.args[0], _only_user(sig)
    if mul is None or mul.target is not aten.mul.Tensor or len(mul.args) != 2 or _other(mul, sig) is not x:
        return False
    _replace(g, mul, aten.silu.default, (x,), dead=[sig])
    return True


def _rsqrt(g: fx.Graph, rec: fx.Node) -> bool:
    sq = rec.args[0]
    if not isinstance(sq, fx.Node) or sq.target is not aten.sqrt.default or _only_user(sq) is not rec:
        return False
    _replace(g, rec, aten.rsqrt.default, (sq.args[0],), dead=[sq])
    return True


def _last_dim_mean(n, x) -> bool:
    """n = mean(x, [-1], keepdim=True)."""
    if not isinstance(n, fx.Node) or n.target is not aten.mean.dim or n.args[0] is not x:
        return False
    dims, keep = list(n.args[1]), (n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False))
    rank = len(_shape(x) or ())
    return keep and len(dims) == 1 and dims[0] % rank == rank - 1


def _layer_norm(gm: fx.GraphModule, out: fx.Node) -> bool:
    """out = d / sqrt(var + eps) or d * rsqrt(var + eps), with d = x - mean(x); see the docstring."""
    g = gm.graph
    if out.target is aten.div.Tensor:
        d, root = out.args
        ok = isinstance(root, fx.Node) and root.target is aten.sqrt.default
    elif out.target is aten.mul.Tensor and len(out.args) == 2:
        d, root = out.args if getattr(out.args[1], "target", None) is aten.rsqrt.default else out.args[::-1]
        ok = isinstance(root, fx.Node) and root.target is aten.rsqrt.default
    else:
        return False
    if not ok or not isinstance(d, fx.Node) or d.target is not aten.sub.Tensor or _only_user(root) is not out:
        return False
    x, m = d.args
    add = root.args[0]
    if not _last_dim_mean(m, x) or _only_user(m) is not d or _only_user(add) is None \
            or add.target is not aten.add.Tensor or _num(add.args[1]) is None:
        return False
    var, eps = add.args[0], _num(add.args[1])
    sq = var.args[0] if isinstance(var, fx.Node) else None
    if not _last_dim_mean(var, sq) or _only_user(var) is not add or _only_user(sq) is not var:
        return False
    if not ((sq.target is aten.pow.Tensor_Scalar and sq.args[0] is d and _num(sq.args[1]) == 2.0)
            or (sq.target is aten.mul.Tensor and sq.args[0] is d and sq.args[1] is d)):
        return False
    if set(d.users) != {sq, out}:
        return False
    hidden = (_shape(x) or (0,))[-1]
    last, w, b, affine = out, None, None, []
    for op in (aten.mul.Tensor, aten.add.Tensor):  # the affine part: * w, then + b
        u = _only_user(last)
        if u is None or u.target is not op or len(u.args) != 2:
            break
        p = _other(u, last)
        if not _is_param(p, 1) or _shape(p) != (hidden,):
            break
        affine.append(last)
        last = u
        w, b = (p, b) if op is aten.mul.Tensor else (w, p)
    if w is None and b is not None:
        return False
    _replace(g, last, aten.layer_norm.default, (x, [hidden], w, b, eps), dead=affine + [out, root, add, var, sq, d, m])
    return True


def _decomposed_ops(gm: fx.GraphModule) -> bool:
    g, changed = gm.graph, False
    for n in list(g.nodes):
        if n.op != "call_function" or not _alive(n):
            continue
        if n.target is aten.erf.default:
            changed |= _gelu(g, n)
        elif n.target is aten.sigmoid.default:
            changed |= _silu(g, n)
        elif n.target is aten.reciprocal.default:
            changed |= _rsqrt(g, n)
    for n in list(g.nodes):
        if n.op == "call_function" and _alive(n) and n.target in (aten.div.Tensor, aten.mul.Tensor):
            changed |= _layer_norm(gm, n)
    return changed


# -- eager attention -> scaled_dot_product_attention ---------------------------------------------------
_SOFTMAX = (aten.softmax.int, aten._softmax.default, aten._safe_softmax.default)
_KEEP = (aten.dropout.default, aten.clone.default, aten.alias.default, aten.contiguous.default,
         aten.to.dtype, aten._to_copy.default, aten.detach.default)


def _scaled(n: fx.Node) -> tuple[fx.Node, float]:
    """(x, s) for n = x * s or x / s with a number s (single use), else (n, 1)."""
    if n.target in (aten.mul.Tensor, aten.div.Tensor) and len(n.args) == 2 and _num(n.args[1]) is not None \
            and isinstance(n.args[0], fx.Node) and len(readers(n)) == 1:
        s = _num(n.args[1])
        if s != 0:
            return n.args[0], (s if n.target is aten.mul.Tensor else 1.0 / s)
    return n, 1.0


def _probs_to_pv(gm: fx.GraphModule, sm: fx.Node):
    """(pv = matmul(p, v), nodes on the way) from the softmax through casts, dropout and the
    where(isnan(p), 0, p) guard; None when anything else reads them."""
    n, path = sm, []
    while True:
        guard = _nan_guard(gm, n)
        if guard is not None:
            path += guard
            n = guard[-1]
            continue
        u = _only_user(n)
        if u is None:
            return None
        if u.target is aten.matmul.default and u.args[0] is n:
            return u, path
        inference = u.target is not aten.dropout.default or not u.args[1] or (len(u.args) > 2 and not u.args[2])
        if u.target in _KEEP and u.args[0] is n and inference:
            path.append(u)
            n = u
            continue
        return None


def _nan_guard(gm: fx.GraphModule, p: fx.Node):
    """[isnan, where] when p's only readers are where(isnan(p), 0, p), else None."""
    if len(readers(p)) != 2:
        return None
    nan = next((u for u in readers(p) if u.target is aten.isnan.default), None)
    w = next((u for u in readers(p) if u is not nan), None)
    if nan is None or _only_user(nan) is not w or w.target not in (aten.where.self, aten.where.ScalarSelf):
        return None
    return [nan, w] if w.args[0] is nan and w.args[2] is p and _zero(gm, w.args[1]) else None


def _zero(gm: fx.GraphModule, a) -> bool:
    """a is the number 0, or a one-element constant (a stored tensor, or made from stored ones) 0."""
    if not isinstance(a, fx.Node):
        return _num(a) == 0.0
    if a.op != "get_attr" and not all(i.op == "get_attr" for i in a.all_input_nodes):
        return False
    from .structure import _evaluate
    v = _evaluate(a, gm)
    return isinstance(v, torch.Tensor) and v.numel() == 1 and float(v) == 0.0


def fuse_attention(gm: fx.GraphModule) -> bool:
    """In place: every eager attention chain (see the module docstring) -> one
    aten.scaled_dot_product_attention node. Returns whether anything changed. Not part of
    canonicalize(): torch-traced graphs keep the attention their model chose (structure recovery
    reads eager chains too); the ONNX frontend applies it, since ONNX has no SDPA op before opset 23."""
    g, changed = gm.graph, False
    for sm in list(g.nodes):
        if sm.target not in _SOFTMAX or sm.args[1] % max(len(_shape(sm) or ()), 1) != len(_shape(sm) or ()) - 1:
            continue
        m = _match_attention(gm, sm)
        if m is None:
            continue
        q, kt, v, mask, scale, pv, dead = m
        with g.inserting_before(pv):
            k = _untranspose(g, kt)
        args = (q, k, v) if mask is None else (q, k, v, mask)
        _replace(g, pv, aten.scaled_dot_product_attention.default, args, {"scale": scale}, dead=dead)
        changed = True
    if changed:
        g.lint()
        gm.recompile()
    return changed


def _match_attention(gm: fx.GraphModule, sm: fx.Node):
    """(q, k^T, v, mask, scale, pv, pattern nodes) for an eager chain ending at softmax sm."""
    found = _probs_to_pv(gm, sm)
    if found is None:
        return None
    pv, after = found
    n, scale, mask, before = sm.args[0], 1.0, None, []
    while isinstance(n, fx.Node) and n.target is not aten.matmul.default:
        if len(readers(n)) != 1:
            return None
        x, s = _scaled(n)
        if x is not n:
            before.append(n)
            scale, n = scale * s, x
            continue
        # (scores * s + mask): walking back the mask comes first; one added before a scaling would be scaled too
        if n.target is aten.add.Tensor and mask is None and scale == 1.0 and len(n.args) == 2:
            a, b = n.args
            scores_side = a if _reaches_matmul(a) else b
            mask = _other(n, scores_side)
            if not isinstance(mask, fx.Node) or _reaches_matmul(mask):
                return None
            before.append(n)
            n = scores_side
            continue
        return None
    scores = n
    if not isinstance(scores, fx.Node) or len(readers(scores)) != 1:
        return None
    q, sq = _scaled(scores.args[0])
    kt, sk = _scaled(scores.args[1])
    v = pv.args[1]
    shapes = [_shape(t) for t in (q, kt, v)]
    if any(s is None or len(s) != 4 for s in shapes) or not (shapes[0][1] == shapes[1][1] == shapes[2][1]):
        return None
    if mask is not None and _shape(mask) is not None and len(_shape(mask)) > 4:
        return None
    dead = [scores, *before, sm, *after, scores.args[0], scores.args[1], kt]
    return q, kt, v, mask, scale * sq * sk, pv, dead


def _reaches_matmul(n) -> bool:
    """n is the scores (or scaled scores): a matmul, maybe through number scalings."""
    while isinstance(n, fx.Node):
        if n.target is aten.matmul.default:
            return True
        x, _ = _scaled(n)
        if x is n:
            return False
        n = x
    return False


def _untranspose(g: fx.Graph, kt: fx.Node) -> fx.Node:
    """k from k^T: through the transpose or permute that made it, else a new transpose."""
    rank = 4
    if kt.target is aten.transpose.int and sorted(d % rank for d in kt.args[1:3]) == [2, 3] and len(readers(kt)) == 1:
        return kt.args[0]
    if kt.target is aten.permute.default and len(readers(kt)) == 1:
        perm = [d % rank for d in kt.args[1]]
        perm[2], perm[3] = perm[3], perm[2]
        if perm == list(range(rank)):
            return kt.args[0]
        k = g.call_function(aten.permute.default, (kt.args[0], perm))
    else:
        k = g.call_function(aten.transpose.int, (kt, -1, -2))
    val = kt.meta.get("val")
    if isinstance(val, torch.Tensor):
        k.meta["val"] = val.transpose(-1, -2)
    return k
