"""Token pruning helpers: depth schedules, the token operations (plain torch, static shapes), and
putting those operations into an aten graph whose sequence then shrinks.

Schedules
    pyramid(keep, depth, stages=4) -> per layer, the fraction of the original tokens at its input.
        PyramidDrop-like: the layers are cut into `stages` equal parts; the first part sees every
        token and each later part keeps keep**(1/(stages-1)) of the tokens before it, so the last
        part keeps `keep`. With fewer layers than stages there are fewer stages (depth 3: 1, keep**0.5,
        keep; depth 2: 1, keep). Stage j (1-based) starts at layer floor(j * depth / stages + 0.5).
    token_counts(fractions, seq_len, minimum) -> per layer, ceil(fraction * seq_len), never below
        `minimum` and never more than the layer before.

Token operations (functions of tensors; every size is a Python int known when the graph is built,
so they trace to aten ops with static shapes that torch.export and the TVM backend take: pairwise comparisons,
sums, gather, scatter, cumsum, 1-D index_put with accumulate for the merge sums, max.dim, matmul; flags are
0/1 floats, not bools, because TVM 0.27's CPU schedule fails to vectorise stores of bool buffers of
odd width: "dtype mismatch on BufferStore: buffer's dtype is T.bool ... RHS's dtype is T.int8x6"):
    received_from_scores / received_from_probs  attention received per token, [B, n], in [0, 1]
    drop_key, keep_top                          ranking key and the kept indices (ascending)
    take, take_mask                             gather per-token tensors and attention masks
    merge_round                                 one ToMe bipartite soft-matching round
    segment_sum                                 sums by slot (1-D index_put with accumulate)
    add_log_size                                proportional attention: log(size) on the key axis

Graph helpers
    inline(gm, fn, inputs, before, **static) -> output nodes: traces fn with make_fx on tensors shaped
        like the input nodes' values and copies its aten nodes into gm before `before`.
    resize(gm, old_vals, until=None): after the sequence of some nodes changed, rewrites the static
        sizes of view / reshape / expand nodes that read them (the S of view(B, S, H, D)) and refreshes
        every node's meta["val"] (what ModelInfo reads shapes from), up to the node `until`. A size
        is rewritten when it is the input's changed dim carried to the same place: same product of
        the sizes before it.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from ..errors import UserError
from ..pipeline import set_val

NEG = -1e4  # similarity of pairs that must not merge (cosine similarities are in [-1, 1])


# -- schedules ---------------------------------------------------------------------------------------

def pyramid(keep: float, depth: int, stages: int = 4) -> list[float]:
    """Per layer, the fraction of the original tokens at its input (see the module docstring)."""
    n = min(stages - 1, depth - 1)
    out = [1.0] * depth
    if n <= 0 or keep >= 1:
        return out
    for j in range(1, n + 1):
        for layer in range(math.floor(j * depth / (n + 1) + 0.5), depth):
            out[layer] = keep ** (j / n)
    return out


def token_counts(fractions: list[float], seq_len: int, minimum: int) -> list[int]:
    counts, prev = [], seq_len
    for f in fractions:
        prev = min(prev, max(math.ceil(f * seq_len - 1e-9), minimum))
        counts.append(prev)
    return counts


# -- token operations ------------------------------------------------------------------------------------

def _additive(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A bool keep-mask as 0 / most-negative float, a float mask as it is."""
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=like.dtype).masked_fill(~mask, torch.finfo(like.dtype).min)
    return mask.to(like.dtype)


def received_from_scores(q, k, mask, valid, scale: float, cls: bool):
    """Attention received by each key, from q [B, H, n, d] and k [B, Hk, n, d] (Hk divides H) as
    softmax(q k^T * scale + mask), mean over heads: the first query's row when `cls`, else the
    mean over the valid query rows. Returns [B, n]."""
    B, H, n, d = q.shape
    if k.shape[1] != H:
        k = k[:, :, None].expand(B, k.shape[1], H // k.shape[1], n, d).reshape(B, H, n, d)
    if cls:
        s = (q[:, :, :1, :] * k).sum(-1)[:, :, None, :] * scale  # [B, H, 1, n]
    else:
        s = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, H, n, n]
    if mask is not None:
        m = mask if mask.dim() == 4 else mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
        if cls and m.shape[-2] != 1:
            m = m[:, :, :1, :]
        s = s + _additive(m, s)
    return received_from_probs(torch.softmax(s, -1), valid, cls)


def received_from_probs(p, valid, cls: bool):
    """Attention received per key from probabilities p [B, H, Q, n] (or [B*H, Q, n])."""
    B, n = valid.shape
    p = p.reshape(B, -1, p.shape[-2], n)
    if cls:
        return p[:, :, 0, :].mean(1)
    w = valid[:, :, None]
    return (p.mean(1) * w).sum(1) / w.sum(1).clamp_min(1.0)


def drop_key(importance, protected, valid):
    """Ranking key: protected tokens in (2, 3], real tokens their importance in [0, 1], padding in
    [-2, -1); protected and padding tokens tie-break toward earlier positions."""
    n = importance.shape[1]
    order = torch.arange(n, dtype=importance.dtype) / n
    real = valid * (1 - protected)  # 0/1 floats, not bools (see merge_round)
    return protected * (3.0 - order) + real * importance + (1 - protected) * (1 - valid) * (-1.0 - order)


def descending_rank(key):
    """Each key's place per row in descending order, ties to the earlier position: [B, n] int64, by
    comparing every pair (n x n per row) rather than topk/sort, which TVM lowers to a packed function
    (tvm.contrib.sort) that the aarch64 TVM runtime does not have."""
    n = key.shape[1]
    pos = torch.arange(n)
    earlier = (pos[None, :] < pos[:, None]).to(key.dtype)  # [i, j]: j comes before i
    a, b = key[:, None, :], key[:, :, None]  # a[., i, j] = key_j, b[., i, j] = key_i
    return ((a > b).to(key.dtype) + (a == b).to(key.dtype) * earlier).sum(-1).to(torch.int64)


def keep_top(key, k: int):
    """Indices of the k largest keys per row, ascending (the tokens keep their order): the p-th kept
    token is at the number of positions whose running count of kept tokens is at most p."""
    kept = torch.cumsum((descending_rank(key) < k).to(torch.int64), 1)
    return (kept[:, None, :] <= torch.arange(k)[None, :, None]).to(torch.int64).sum(-1)


def take(x, idx):
    """x [B or 1, n, ...] at idx [B, k] along dim 1 -> [B, k, ...]."""
    B, k = idx.shape
    if x.shape[0] != B:
        x = x.expand(B, *x.shape[1:])
    index = idx.reshape(B, k, *([1] * (x.dim() - 2))).expand(B, k, *x.shape[2:])
    return torch.gather(x, 1, index)


def take_mask(mask, idx, n: int):
    """An attention mask [Bm, Hm, Q, n] (Q = 1 or n) at tokens idx [B, k]: the key axis, and the
    query axis when it has n rows."""
    B, k = idx.shape
    m = mask.expand(B, *mask.shape[1:]) if mask.shape[0] != B else mask
    Hm, Q = m.shape[1], m.shape[2]
    if m.shape[3] == n:
        m = torch.gather(m, 3, idx[:, None, None, :].expand(B, Hm, Q, k))
    if Q == n:
        m = torch.gather(m, 2, idx[:, None, :, None].expand(B, Hm, k, m.shape[3]))
    return m


def keys_metric(k, B: int):
    """ToMe's similarity metric: the keys [B, Hk, n, d] (or [B*Hk, n, d]) averaged over heads."""
    return k.reshape(B, -1, k.shape[-2], k.shape[-1]).mean(1)


def segment_sum(v, slot, m: int):
    """Sums of v [B, n, C] (or [B, n]) over the tokens of each slot: [B, m, C] (or [B, m])."""
    B, n = slot.shape
    flat_v = v.reshape(B, n, -1)
    C = flat_v.shape[2]
    base = (torch.arange(B)[:, None] * m + slot)[:, :, None] * C + torch.arange(C)
    out = torch.zeros(B * m * C, dtype=v.dtype).index_put((base.reshape(-1),), flat_v.reshape(-1), accumulate=True)
    return out.reshape(B, m, C) if v.dim() == 3 else out.reshape(B, m)


def merge_round(x, metric, size, protected, valid, r: int):
    """One round of ToMe's bipartite soft matching on n tokens: A = even positions, B = odd; every
    A token finds its most cosine-similar B token (by `metric`), and the r A tokens with the most
    similar partners merge into them, by size-weighted average. Protected tokens never merge (in
    either role); padding merges only with padding. Returns (x, metric, size) of the n - r tokens
    in order, rep [B, n - r] (the position each kept token had) and slot [B, n] (the new position
    of every token)."""
    B, n, _ = x.shape
    na, nb = (n + 1) // 2, n // 2
    inv = torch.reciprocal(torch.sqrt((metric * metric).sum(-1) + 1e-12))
    sim = torch.matmul(metric[:, 0::2], metric[:, 1::2].transpose(1, 2)) * (inv[:, 0::2, None] * inv[:, None, 1::2])
    # 0/1 floats, not bools: TVM's CPU schedules fail to vectorise stores of odd-width bool buffers
    va, vb, pa, pb = valid[:, 0::2], valid[:, 1::2], protected[:, 0::2], protected[:, 1::2]
    col = torch.arange(nb, dtype=sim.dtype) / nb  # distinct values: max() picks the same pair everywhere
    both_valid = va[:, :, None] * vb[:, None, :]
    both_pad = (1 - va)[:, :, None] * (1 - vb)[:, None, :]
    sim = both_valid * sim + both_pad * (3.0 - col) + (1 - both_valid - both_pad) * (NEG - col)
    prot = torch.clamp(pa[:, :, None] + pb[:, None, :], max=1.0)
    sim = (1 - prot) * sim + prot * (2 * NEG - col)
    best, dst = sim.max(-1)
    row = torch.arange(na, dtype=sim.dtype) / na
    key = best - row * (1 - va * (1 - pa))  # ties among padding / protected rows: earlier first
    merged = (descending_rank(key) < r).to(torch.int64)  # the r A tokens with the largest keys
    even = (2 * torch.arange(na)).expand(B, na)
    kept = torch.ones(B, n, dtype=torch.int64).scatter(1, even, 1 - merged)
    target = torch.arange(n).expand(B, n).scatter(1, even, even + merged * (2 * dst + 1 - even))
    rank = torch.cumsum(kept, 1) - 1
    slot = torch.gather(rank, 1, target)
    m = n - r
    new_size = segment_sum(size, slot, m)
    new_x = segment_sum(x * size[:, :, None], slot, m) / new_size[:, :, None]
    new_metric = segment_sum(metric * size[:, :, None], slot, m) / new_size[:, :, None]
    rep = torch.zeros(B, m + 1, dtype=torch.int64).scatter(1, kept * rank + (1 - kept) * m, torch.arange(n).expand(B, n))
    return new_x, new_metric, new_size, rep[:, :m], slot


def add_log_size(mask, size):
    """Proportional attention: mask (bool, float or None) + log(size) on the key axis, [B, 1, 1, n]."""
    logs = torch.log(size)[:, None, None, :]
    return logs if mask is None else _additive(mask, logs) + logs


# -- graph helpers ---------------------------------------------------------------------------------

def _example(n: fx.Node) -> torch.Tensor:
    v = n.meta.get("val")
    if not isinstance(v, torch.Tensor):
        raise UserError(f"node '{n.name}' has no tensor value to trace token pruning against",
                        "the program's graph lost its shape metadata; trace the model again")
    return torch.zeros(tuple(int(s) for s in v.shape), dtype=v.dtype)


def inline(gm: fx.GraphModule, fn, inputs: list, before: fx.Node, **static) -> list[fx.Node]:
    """Trace fn(*inputs, **static) to aten ops (make_fx) and copy them into gm before `before`;
    `inputs` are nodes or None. Returns the nodes of fn's outputs (a tuple or one tensor)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    tensors = [n for n in inputs if n is not None]

    def traced(*ts):
        it = iter(ts)
        out = fn(*[next(it) if n is not None else None for n in inputs], **static)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    with torch.no_grad():
        sub = make_fx(traced)(*[_example(n) for n in tensors])
    env, outs = {}, None
    it = iter(tensors)
    with gm.graph.inserting_before(before):
        for n in sub.graph.nodes:
            if n.op == "placeholder":
                env[n] = next(it)
            elif n.op == "call_function":
                env[n] = gm.graph.call_function(n.target, *fx.node.map_arg((n.args, n.kwargs), env.__getitem__))
                set_val(gm, env[n])
            elif n.op == "output":
                outs = [env[o] for o in n.args[0]]
            else:
                raise AssertionError(f"token operation {fn.__name__} traced to a {n.op} node")
    return outs


_SIZED = {"aten.view", "aten.reshape", "aten._unsafe_view", "aten.expand"}


def _shape(v) -> tuple | None:
    return tuple(int(s) for s in v.shape) if isinstance(v, torch.Tensor) else None


def resize(gm: fx.GraphModule, old_vals: dict, until: fx.Node | None = None) -> list[str]:
    """Rewrite static sizes after a sequence change (see the module docstring) and refresh every
    node's meta["val"], up to `until` when given (the nodes after it are left as they are: the
    caller restores the full sequence before them). Returns the names of the nodes whose sizes were
    rewritten."""
    from ..ir.structure import op_name

    rewritten = []
    for n in gm.graph.nodes:
        if until is not None and n.prev is until:
            break
        if n.op != "call_function":
            continue
        x = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
        if op_name(n) in _SIZED and x is not None and x in old_vals:
            before, now, out = _shape(old_vals[x]), _shape(x.meta.get("val")), _shape(old_vals.get(n))
            if before is not None and now is not None and out is not None and before != now:
                sizes = _new_sizes(n, list(n.args[1]), before, now, out, op_name(n) == "aten.expand")
                if sizes != list(n.args[1]):
                    n.args = (x, sizes, *n.args[2:])
                    rewritten.append(n.name)
        try:
            set_val(gm, n)
        except Exception as e:
            raise UserError(f"token pruning cannot shrink the sequence at node '{n.name}' ({op_name(n)}): "
                            f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}",
                            "this model has a sequence-length dependent op prune-tokens does not handle yet") from e
        n.meta.pop("tensor_meta", None)
    return rewritten


def _new_sizes(n: fx.Node, sizes: list, before: tuple, now: tuple, out: tuple, expand: bool) -> list:
    if any(isinstance(s, fx.Node) for s in sizes):
        raise UserError(f"node '{n.name}' has symbolic sizes", "trace the model with static shapes")
    for d in (d for d in range(len(before)) if before[d] != now[d]):
        if expand:
            e = d + len(sizes) - len(before)
            found = 0 <= e < len(sizes) and out[e] == before[d]
        else:
            prefix = math.prod(before[:d])
            e = next((e for e in range(len(out)) if math.prod(out[:e]) == prefix and out[e] == before[d]), None)
            found = e is not None
        if not found:
            raise UserError(f"token pruning cannot rewrite the sizes {sizes} of node '{n.name}': its input's "
                            f"sequence dim {d} ({before[d]} -> {now[d]}) does not map to one of its dims",
                            "this reshape mixes the sequence with other dims; prune-tokens does not handle it yet")
        if sizes[e] != -1:
            sizes[e] = now[d]
    return sizes
