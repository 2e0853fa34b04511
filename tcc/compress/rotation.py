"""Orthogonal rotations of a pre-norm decoder's residual stream (QuaRot / SpinQuant style).

A pre-norm block reads the residual stream x only through RMSNorms and writes into it only through
the attention output and MLP down projections. With each norm's scale folded into the linears it
feeds, an RMSNorm commutes with any orthogonal Q (||x Q|| = ||x||), so the model computes the same
function on the rotated stream x Q when

    token embedding table   E   -> E Q
    linear reading a norm   W   -> W diag(s) Q          (s: the norm's scale, now 1)
    linear writing into x   W   -> Q^T W,  b -> b Q     (o_proj, down_proj)
    lm head                 W   -> W diag(s_final) Q    (a tied head gets its own table first)

exactly, up to float rounding. Q spreads an outlier channel's energy over all channels, so the
rotated weights and activations have flatter rows and quantize with less error.

Q = diag(random signs) (H_{2^k} kron R_m): H the normalised Sylvester Walsh-Hadamard matrix of the
largest power of two dividing the width D, R_m a random orthogonal matrix (QR of a Gaussian) of
the odd rest m = D / 2^k (SmolLM2's D = 576 = 64 * 9); m = 1 gives the randomised Hadamard matrix.

The online Hadamard (`fwht`) rotates the input of a down projection at run time, block by block
(`block` features each: the normalised Walsh-Hadamard transform), with the projection's weight
columns rotated the same way: x W^T = (x H)(W H)^T, H symmetric and orthogonal. The activations
between the gated product and the down projection are where a decoder's largest outliers live,
and no offline rotation reaches them (the SiLU product is not linear).
"""
from __future__ import annotations

import torch


def walsh_hadamard(n: int, dtype=torch.float64) -> torch.Tensor:
    """The normalised Sylvester Walsh-Hadamard matrix of order n (a power of two): symmetric, H H = I."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Walsh-Hadamard order {n} is not a power of two")
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n ** 0.5


def power_of_two_part(n: int) -> int:
    """The largest power of two dividing n."""
    return n & -n


def random_orthogonal(dim: int, seed: int = 0) -> torch.Tensor:
    """Q = diag(signs) (H_{2^k} kron R_m) in float64, orthogonal (Q Q^T = I), deterministic in seed."""
    gen = torch.Generator().manual_seed(seed)
    p = power_of_two_part(dim)
    m = dim // p
    q = walsh_hadamard(p)
    if m > 1:
        r, upper = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))
        r = r * torch.sign(torch.diagonal(upper))[None, :]  # Haar-distributed
        q = torch.kron(q.contiguous(), r.contiguous())
    signs = torch.randint(0, 2, (dim,), generator=gen).to(torch.float64) * 2 - 1
    return signs[:, None] * q


def fwht(x: torch.Tensor, block: int) -> torch.Tensor:
    """The normalised Walsh-Hadamard transform of each `block` consecutive features of x's last dim
    (x H_block, block-diagonal): log2(block) butterfly stages. The reference the kernels match."""
    k = x.shape[-1]
    if k % block or block & (block - 1):
        raise ValueError(f"block {block} must be a power of two dividing the width {k}")
    y = x.reshape(-1, k // block, block)
    h = 1
    while h < block:
        y = y.reshape(y.shape[0], k // block, block // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack([a + b, a - b], dim=-2)
        h *= 2
    return (y.reshape(x.shape) * block ** -0.5).to(x.dtype)


# -- the graph rewrite ------------------------------------------------------------------------------
import torch.fx as fx  # noqa: E402

from ..errors import UserError  # noqa: E402
from ..ir.graph import new_attribute, readers  # noqa: E402
from ..ir.program import attribute as _attr  # noqa: E402
from ..ir.structure import LINEAR, PASSTHROUGH, Linear, ModelInfo, nodes_by_name, op_name  # noqa: E402

FLOAT_LINEARS = ("aten.linear", "tcc.dense")
_HINT = "rotate runs on a float32 pre-norm decoder (Llama, Qwen, Mistral, SmolLM: RMSNorm blocks), before quantize"


def _readers(n: fx.Node) -> list[fx.Node]:
    """The nodes that consume n's value, looking through casts and views; assertion nodes skipped."""
    out = []
    for u in readers(n):
        out += _readers(u) if op_name(u) in PASSTHROUGH else [u]
    return out


def _set(gm: fx.GraphModule, target: str, value: torch.Tensor) -> None:
    """Replace the tensor at `target` by a new one (never written in place: a Program sharing the old
    tensor keeps it)."""
    old = _attr(gm, target)
    owner_path, _, name = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    value = value.to(old.dtype).contiguous()
    setattr(owner, name, torch.nn.Parameter(value, requires_grad=False) if isinstance(old, torch.nn.Parameter) else value)


def _weight(gm: fx.GraphModule, lin: Linear, where: str) -> torch.Tensor:
    if lin.op not in FLOAT_LINEARS or lin.weight is None:
        raise UserError(f"rotate: '{lin.node}' ({where}) is a {lin.op} node without a stored float weight", _HINT)
    w = _attr(gm, lin.weight)
    if w.dtype != torch.float32 or w.dim() != 2:
        raise UserError(f"rotate: the weight of '{lin.node}' ({where}) is {w.dtype} {list(w.shape)}, not float32 2-D", _HINT)
    return w.detach().to(torch.float64)


def _norm_scale(gm: fx.GraphModule, by: dict, norm, where: str) -> tuple[torch.Tensor | None, list[fx.Node]]:
    """(the norm's stored scale or None, the linears reading its output). UserError when the norm is
    not a plain RMSNorm, its scale is computed (Gemma's 1 + w) or something else reads its output."""
    if norm is None:
        raise UserError(f"rotate: {where} has no norm before its projections", _HINT)
    if norm.kind != "rms_norm" or norm.bias is not None:
        raise UserError(f"rotate: {where} is normalised by a {norm.kind}"
                        f"{' with a bias' if norm.bias is not None else ''}: only RMSNorm commutes with a rotation "
                        "(LayerNorm's mean subtraction does not)", _HINT)
    node = by[norm.node]
    scale = None
    if norm.weight is not None:
        direct = (node.args[2] if op_name(node) == "aten.rms_norm" and len(node.args) > 2
                  else next((a for a in node.args if isinstance(a, fx.Node) and a.op == "get_attr"), None))
        if not isinstance(direct, fx.Node) or direct.target != norm.weight:
            raise UserError(f"rotate: the scale of {where}'s norm ('{norm.node}') is computed from '{norm.weight}' "
                            "(e.g. 1 + w), not stored", _HINT)
        scale = _attr(gm, norm.weight).detach().to(torch.float64)
    readers = _readers(node)
    other = [u for u in readers if op_name(u) not in LINEAR or _stream(u.args[0]) is not node]
    if other or not readers:
        raise UserError(f"rotate: the output of {where}'s norm ('{norm.node}') is read by "
                        f"'{other[0].name if other else 'nothing'}', not only by projections", _HINT)
    return scale, readers


def _stream(n: fx.Node) -> fx.Node:
    while op_name(n) in PASSTHROUGH and n.all_input_nodes:
        n = n.all_input_nodes[0]
    return n


def _linear_of(n: fx.Node) -> Linear:
    from ..ir.structure import _linear
    return _linear(n)


def rotate_residual(gm: fx.GraphModule, info: ModelInfo, seed: int = 0, online_block: int = 0,
                    residual: bool = True) -> dict:
    """Rotate the residual stream of the pre-norm decoder `gm` (ModelInfo `info`) in place of its
    tensors (new tensors, see _set), folding every norm's scale into the linears it feeds (residual=
    False: not the stream, only what follows); rotate each value/output head pair (_rotate_heads); with
    online_block > 0, also rotate each down projection's input at run time (block Walsh-Hadamard).
    Returns notes: {hidden, seed, q, norms, linears, embeddings, lm_head_untied_bytes, heads_rotated, online}."""
    if not info.blocks:
        raise UserError("rotate: no transformer blocks found in this graph", _HINT)
    if info.norm_placement != "pre":
        raise UserError(f"rotate: this model's norms are '{info.norm_placement}' (post-norm: the residual stream "
                        "itself passes through LayerNorms, so no rotation of it is free)",
                        "for post-norm encoders (BERT, MiniLM) use quantize(...,method=smoothquant) or "
                        "method=awq, which smooth what applies to them")
    by = nodes_by_name(gm)
    if not residual:
        with torch.no_grad():
            heads = _rotate_heads(gm, by, info)
            online = _online_hadamard(gm, by, info, online_block) if online_block else []
        gm.recompile()
        return {"residual": False, "heads_rotated": heads, "online": online, "lm_head_untied_bytes": 0}
    d = info.hidden_size
    q = random_orthogonal(d, seed)
    readers_in: dict[str, tuple[torch.Tensor | None, str]] = {}  # linear node -> (norm scale, where)
    norms = []
    for b in info.blocks:
        for part, label in ((b.attention, "attention"), (b.mlp, "MLP")):
            if part is None:
                continue
            where = f"block {b.index} ({b.name}) {label}"
            scale, readers = _norm_scale(gm, by, part.norm, where)
            norms.append(part.norm)
            readers_in.update({r.name: (scale, where) for r in readers})
    if info.final_norm is None or info.lm_head is None:
        raise UserError("rotate: no final norm and lm head found (the rotated stream must end in a projection)", _HINT)
    scale, readers = _norm_scale(gm, by, info.final_norm, "the final norm")
    if [r.name for r in readers] != [info.lm_head.node]:
        raise UserError(f"rotate: the final norm's output is read by {[r.name for r in readers]}, not only the lm head "
                        "(the program outputs the hidden states)", _HINT)
    norms.append(info.final_norm)
    writers = {}
    for b in info.blocks:
        if b.attention is not None:
            writers[b.attention.o.node] = f"block {b.index} attention output"
        if b.mlp is not None:
            writers[b.mlp.down.node] = f"block {b.index} MLP down"
    stream_embeddings = [e for e in info.embeddings if e.dim == d]
    if not any(e.kind == "token" for e in stream_embeddings):
        raise UserError("rotate: no token embedding writes the residual stream", _HINT)

    # every stored tensor the rotation rewrites must be read by its one node (the lm head may share the
    # token table: it gets its own)
    gets = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            gets.setdefault(n.target, []).extend(u for u in n.users if not op_name(u).startswith("aten._assert"))
    head = by[info.lm_head.node]
    untied = 0
    token_targets = {e.weight for e in stream_embeddings}
    if info.lm_head.weight in token_targets or info.lm_head_tied:
        table = _attr(gm, info.lm_head.weight)
        g = new_attribute(gm, "rotate_lm_head_weight", table.detach().clone(), head, parameter=True)
        name = g.target
        head.replace_input_with(head.args[1], g)
        untied = table.numel() * table.element_size()
        by = nodes_by_name(gm)
        gets[name] = [head]
    lin_nodes = list(readers_in) + [info.lm_head.node] + list(writers)
    for name in lin_nodes:
        t = _linear_of(by[name]).weight
        if t is None or len(gets.get(t, [])) != 1:
            raise UserError(f"rotate: the weight of '{name}' is {'computed' if t is None else 'shared with another node'}",
                            _HINT)
    with torch.no_grad():
        for e in stream_embeddings:
            if e.weight is None:
                raise UserError(f"rotate: embedding '{e.node}' has no stored table", _HINT)
            _set(gm, e.weight, _attr(gm, e.weight).detach().to(torch.float64) @ q)
        head_lin = _linear_of(head)
        for name, (scale, where) in list(readers_in.items()) + [(info.lm_head.node, (scale, "lm head"))]:
            lin = head_lin if name == info.lm_head.node else _linear_of(by[name])
            w = _weight(gm, lin, where)
            if scale is not None:
                w = w * scale[None, :]
            _set(gm, lin.weight, w @ q)
        for name, where in writers.items():
            lin = _linear_of(by[name])
            _set(gm, lin.weight, q.T @ _weight(gm, lin, where))
            if lin.bias is not None:
                _set(gm, lin.bias, _attr(gm, lin.bias).detach().to(torch.float64) @ q)
        for norm in norms:
            if norm.weight is not None:
                _set(gm, norm.weight, torch.ones_like(_attr(gm, norm.weight)))
        heads = _rotate_heads(gm, by, info)
        online = _online_hadamard(gm, by, info, online_block) if online_block else []
    gm.recompile()
    return {"hidden": d, "seed": seed, "q": f"signs * (H_{power_of_two_part(d)} kron R_{d // power_of_two_part(d)})"
            if d != power_of_two_part(d) else f"signs * H_{d}",
            "norms_folded": len(norms), "linears_rotated": len(lin_nodes),
            "embeddings": [e.weight for e in stream_embeddings], "lm_head_untied_bytes": untied,
            "heads_rotated": heads, "online": online}


def _rotate_heads(gm: fx.GraphModule, by: dict, info: ModelInfo) -> int:
    """Per attention head, offline: the value projection's rows of each KV head -> H_d W (bias H_d b) and
    the output projection's columns of each query head -> W H_d (H_d the head dim's Walsh-Hadamard
    matrix): attention mixes positions, never features, so p (v H) (W_o H)^T = p v W_o^T exactly. The
    output projection then quantizes without the value heads' outlier features. Blocks whose head
    layout was not traced, or whose head dim is no power of two, are left as they are. Returns how many
    attention blocks were rotated."""
    done = 0
    for b in info.blocks:
        a = b.attention
        if a is None or a.o is None or not a.v_heads or not a.o_heads or a.head_dim & (a.head_dim - 1):
            continue
        v = a.v or a.qkv
        rows = lambda ranges: torch.tensor([i for r in ranges for i in range(*r)])
        v_idx, o_idx = [rows(r) for r in a.v_heads], [rows(r) for r in a.o_heads]
        if any(len(i) != a.head_dim for i in v_idx + o_idx):
            continue
        h = walsh_hadamard(a.head_dim)
        wv = _weight(gm, v, f"block {b.index} value projection")
        wo = _weight(gm, a.o, f"block {b.index} attention output")
        bv = _attr(gm, v.bias).detach().to(torch.float64) if v.bias is not None else None
        for i in v_idx:
            wv[i] = h @ wv[i]
            if bv is not None:
                bv[i] = h @ bv[i]
        for i in o_idx:
            wo[:, i] = wo[:, i] @ h
        _set(gm, v.weight, wv)
        _set(gm, a.o.weight, wo)
        if bv is not None:
            _set(gm, v.bias, bv)
        done += 1
    return done


def _online_hadamard(gm: fx.GraphModule, by: dict, info: ModelInfo, block: int) -> list[dict]:
    """Insert x -> fwht(x, block) (a view, a matmul by the block's Walsh-Hadamard matrix, a view) before
    every down projection and rotate its weight columns alike."""
    from ..pipeline import set_val
    aten = torch.ops.aten
    notes, mats = [], {}
    for b in info.blocks:
        if b.mlp is None:
            continue
        lin = b.mlp.down
        node = by[lin.node]
        x = node.args[0]
        k = lin.in_features
        blk = min(block, power_of_two_part(k))
        if blk < 2:
            continue
        w = _weight(gm, lin, f"block {b.index} MLP down")
        _set(gm, lin.weight, fwht(w, blk))  # W H (H symmetric)
        if blk not in mats:
            mats[blk] = name = f"rotate_hadamard_{blk}"
            if not hasattr(gm, name):
                gm.register_buffer(name, walsh_hadamard(blk, torch.float32))
        shape = x.meta["val"].shape if "val" in x.meta else None
        if shape is None:
            raise UserError(f"rotate: '{x.name}' has no shape to rotate it online", _HINT)
        with gm.graph.inserting_before(node):
            lead = [d if isinstance(d, int) else gm.graph.call_function(aten.sym_size.int, (x, i))
                    for i, d in enumerate(shape[:-1])]
            for s in lead:
                if isinstance(s, fx.Node):
                    set_val(gm, s)
            h = gm.graph.get_attr(mats[blk])
            set_val(gm, h, _attr(gm, mats[blk]))
            v = gm.graph.call_function(aten.view.default, (x, [*lead, k // blk, blk]))
            set_val(gm, v)
            m = gm.graph.call_function(aten.matmul.default, (v, h))
            set_val(gm, m)
            y = gm.graph.call_function(aten.view.default, (m, [*lead, k]))
            set_val(gm, y)
        node.replace_input_with(x, y)
        notes.append({"linear": lin.module or lin.node, "in_features": k, "block": blk})
    return notes
