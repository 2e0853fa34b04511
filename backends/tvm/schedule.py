"""CPU schedules for the TIR that TVM generates around tcc's kernels.

Plain `relax.build` leaves legalised TIR as naive, single-threaded scalar loops; dlight's CPU rules
cover reductions (softmax, layer/RMS norm) and GEMV only. `Injective` covers the rest of what a
transformer graph has between its dense ops (activations, residual adds, rotary embeddings,
reshapes/transposes, masks): inline what can be inlined, fuse the spatial loops of each remaining
block, vectorise the innermost chunk and parallelise the outer loop across cores. Loops over a
dynamic length (a symbolic extent) are parallel over the length and vectorised over the static
loops inside it.

`pipeline(target)` is TVM's CPU pipeline with three additions: `relax.index_put` with accumulate is
legalized by `_accumulate_serially` (TVM's topi.index_put adds the updates in a parallel loop, so
two threads adding to one element lose an addition: prune-tokens' merged ViT was 0.79 off PyTorch in
one CI run and exact in the next); `FastMathTransform` (erf/exp/tanh as
vectorisable polynomials instead of scalar libm calls: GELU was 1/3 of MiniLM's time before it) and
`ApplyDefaultSchedule(Injective, RowReduction, Reduction)`: `RowReduction` computes a norm's or
softmax's row reduction once per row (dlight's CPU rule recomputed it per output element). dlight's CPU GEMV rule is left out: on this target
it vectorises 128 lanes around an unrolled reduction whatever the extent, and for prune-tokens' CLS
scores over 128 keys (q_cls . k) LLVM's code generation did not finish in 10 minutes; tcc's dense
ops run in backends/kernels, so no MiniLM or SmolLM2 function used it.
"""
from __future__ import annotations

import tvm
from tvm import relax, s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import try_inline
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.target import Target
from tvm.target.codegen import llvm_get_vector_width

# Elements below which threading costs more than it saves: a decode step's SwiGLU over 4,864 features took
# 3.6 us on TVM's two threads and 1.5 us on one (0.5B shape, Zen 5, session 20; it was 4,096).
MIN_PARALLEL = 16384


class Injective(CPUScheduleRule):
    """Fused spatial loops -> [parallel outer, serial middle, vectorised inner]."""

    def apply(self, func: tirx.PrimFunc, target: Target, _: bool):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        blocks = normalize_prim_func(sch)
        if blocks is None or any(not b.is_injective() for b in blocks):
            return None
        blocks = try_inline(sch, blocks)
        lanes = max(llvm_get_vector_width(target) // 32, 4)
        for b in blocks:
            loops = sch.get_loops(b.block_rv)
            if not loops:
                continue
            static = [isinstance(sch.get(l).extent, tirx.IntImm) for l in loops]
            if any(s and int(sch.get(l).extent) == 0 for s, l in zip(static, loops)):
                continue  # an empty tensor (Phi-3's rotary pass-through part at full rotary): no work
            if all(static):
                self._static(sch, sch.fuse(*loops), lanes)
            else:
                self._symbolic(sch, loops, static, lanes)
        return sch

    @staticmethod
    def _static(sch, fused, lanes: int) -> None:
        n = int(sch.get(fused).extent)
        if n % lanes == 0 and n >= lanes:
            outer, inner = sch.split(fused, factors=[None, lanes])
            sch.vectorize(inner)
        else:
            outer = fused
        if n >= MIN_PARALLEL:
            sch.parallel(outer)

    @staticmethod
    def _symbolic(sch, loops, static: list[bool], lanes: int) -> None:
        """Loops over a dynamic length: the loops inside the last symbolic one (static extents,
        e.g. the hidden size) are fused and vectorised, the loops down to it are fused and run in
        parallel (a length of 1 runs on one thread)."""
        last = max(i for i, s in enumerate(static) if not s)
        outer = sch.fuse(*loops[:last + 1]) if last else loops[0]
        if last + 1 < len(loops):
            inner = sch.fuse(*loops[last + 1:]) if len(loops) - last > 2 else loops[last + 1]
            n = int(sch.get(inner).extent)
            if n % lanes == 0 and n >= lanes:
                rest, vec = sch.split(inner, factors=[None, lanes])
                sch.vectorize(vec)
        sch.parallel(outer)


class RowReduction(CPUScheduleRule):
    """Norms and softmaxes: reductions over the last axis of each row, then an elementwise epilogue
    over the row (RMS norm: sum x^2 -> rsqrt -> x * r * w). dlight's CPU Reduction rule puts every
    block under the output's fused spatial loop, so each output element recomputed its whole row's
    reduction (O(H^2) per row: 67 us per RMS norm of SmolLM2's 576 features, 4 of 9 ms of an int4
    decode step). Here the row loops are fused and run in parallel, each row's reductions and scalar
    steps are computed once under that loop (compute_at), and the epilogue's loop over the row is
    vectorised."""

    def apply(self, func: tirx.PrimFunc, target: Target, _: bool):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        blocks = normalize_prim_func(sch)
        if blocks is None or len(blocks) < 2 or not blocks[-1].is_injective():
            return None
        reductions = [b for b in blocks if not b.is_injective()]
        if not reductions or any(b.dom_kind().count("R") != 1 or not b.dom_kind().endswith("R") for b in reductions):
            return None
        out_loops = sch.get_loops(blocks[-1].block_rv)
        if not out_loops:
            return None
        rows = _product([sch.get(l).extent for l in out_loops[:-1]])  # unit loops are normalised away
        width = sch.get(out_loops[-1]).extent
        for b in reductions:  # each keeps the output's rows and reduces one row's width
            spatial = _product([i.dom for i in b.iters if i.kind == "S"])
            red = [i.dom for i in b.iters if i.kind == "R"][0]
            if not (spatial == rows and _product([red]) == _product([width])):
                return None
        blocks = try_inline(sch, blocks)
        out = blocks[-1]
        loops = sch.get_loops(out.block_rv)
        row = None
        if len(loops) >= 2:  # else one row: the reductions already run once, before the epilogue
            row = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
            for b in reversed(blocks[:-1]):
                sch.compute_at(b.block_rv, row, preserve_unit_loops=True)
        lanes = max(llvm_get_vector_width(target) // 32, 4)
        inner = sch.get_loops(out.block_rv)[-1]
        n = sch.get(inner).extent
        if isinstance(n, tirx.IntImm) and int(n) % lanes == 0 and int(n) >= lanes:
            _, vec = sch.split(inner, factors=[None, lanes])
            sch.vectorize(vec)
        if row is None:
            return sch
        extent = sch.get(row).extent
        if not isinstance(extent, tirx.IntImm) or int(extent) > 1:
            sch.parallel(row)
        return sch


def _product(extents) -> tuple[int, tuple[str, ...]]:
    """An extent product as (static factor, sorted symbolic factors), comparable with =="""
    static, symbolic = 1, []
    for e in extents:
        if isinstance(e, (int, tirx.IntImm)):
            static *= int(e)
        else:
            symbolic.append(str(e))
    return static, tuple(sorted(symbolic))


@relax.expr_functor.mutator
class _FastActivations(relax.PyExprMutator):
    """gelu / gelu_tanh / silu / sigmoid -> TE compositions of topi's fast_erf / fast_tanh /
    fast_exp, which vectorise (libm's erff/expf are scalar calls inside a vector loop)."""

    def visit_call_(self, call):
        from tvm import topi
        name = getattr(call.op, "name", "")
        x = call.args[0] if call.args else None
        if name == "relax.nn.gelu":     # x * (erf(x / sqrt 2) / 2 + 1/2)
            f = lambda t: topi.multiply(t, topi.add(topi.multiply(topi.fast_erf(topi.multiply(t, 0.7071067811865476)), 0.5), 0.5))
        elif name == "relax.nn.gelu_tanh":  # x/2 * (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
            f = lambda t: topi.multiply(topi.multiply(t, 0.5), topi.add(topi.fast_tanh(topi.multiply(
                topi.add(t, topi.multiply(topi.multiply(topi.multiply(t, t), t), 0.044715)), 0.7978845608028654)), 1.0))
        elif name == "relax.nn.silu":      # x / (1 + exp(-x))
            f = lambda t: topi.divide(t, topi.add(topi.fast_exp(topi.negative(t)), 1.0))
        elif name == "relax.sigmoid":
            f = lambda t: topi.divide(1.0, topi.add(topi.fast_exp(topi.negative(t)), 1.0))
        else:
            return super().visit_call_(call)
        if getattr(x.ty, "dtype", None) != "float32":
            return super().visit_call_(call)
        return self.builder_.call_te(f, x, primfunc_name_hint=name.split(".")[-1])


@tvm.transform.module_pass(opt_level=0, name="tcc.FastActivations")
class FastActivations:
    def transform_module(self, mod, ctx):
        m = _FastActivations(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                m.builder_.update_func(gv, m.visit_expr(func))
        return m.builder_.get()


def _accumulate_serially(data, indices, values):
    """data[indices] += values (PyTorch's index_put with accumulate, one index tensor per axis of
    `data`, broadcast together, negative ones counted from the end) as a scatter-add over the
    flattened data: topi.scatter_elements loops over the updates serially on a 1-D tensor, so
    repeated indices add up in one order on every call."""
    from tvm import te, topi
    shape, bshape = list(data.shape), _broadcast([i.shape for i in indices])

    def at(t, ix):  # t's element at broadcast index ix (right-aligned; size-1 axes read 0)
        off = len(ix) - len(t.shape)
        return t[tuple(0 if _is_one(d) else ix[off + a] for a, d in enumerate(t.shape))]

    def flat(*ix):
        f = tirx.const(0, "int64")
        for axis, idx in enumerate(indices):
            i = at(idx, ix).astype("int64")
            f = f * shape[axis] + tirx.if_then_else(i < 0, i + shape[axis], i)
        return f

    where = te.compute(bshape, flat, name="flat_index")
    vals = te.compute(bshape, lambda *ix: at(values, ix), name="broadcast_values")
    total, updates = 1, 1
    for d in shape:
        total = total * d
    for d in bshape:
        updates = updates * d
    out = topi.scatter_elements(topi.reshape(data, [total]), topi.reshape(where, [updates]),
                                topi.reshape(vals, [updates]), 0, "add")
    return topi.reshape(out, shape)


def _is_one(d) -> bool:
    return isinstance(d, (int, tirx.IntImm)) and int(d) == 1


def _broadcast(shapes) -> list:
    """NumPy's broadcast of static or symbolic shapes (a symbolic axis wins over 1)."""
    out = [1] * max(len(s) for s in shapes)
    for s in shapes:
        for a, d in enumerate(s, len(out) - len(s)):
            if not _is_one(d):
                out[a] = d
    return out


def _index_put(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """LegalizeOps' rule for relax.index_put: TVM's own without accumulate (the last of repeated
    indices wins in no set order there, as in PyTorch), `_accumulate_serially` with it."""
    from tvm import topi
    data, indices, values = call.args
    fields = list(indices.fields) if isinstance(indices, relax.Tuple) else \
        [bb.emit(relax.TupleGetItem(indices, i)) for i in range(len(indices.ty.fields))]
    if not call.attrs.accumulate or len(fields) != data.ty.ndim:
        return bb.call_te(topi.index_put, data, fields, values, accumulate=bool(call.attrs.accumulate))
    return bb.call_te(lambda d, v, *ix: _accumulate_serially(d, list(ix), v), data, values, *fields,
                      primfunc_name_hint="index_put_add")


def pipeline(target: Target) -> tvm.transform.Pass:
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    @tvm.transform.module_pass(opt_level=0, name="tcc.cpu_pipeline")
    def _pipeline(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        with target:
            seq = tvm.transform.Sequential(
                cpu.library_dispatch_passes(target)
                + [FastActivations(), relax.transform.FastMathTransform(),
                   relax.transform.LegalizeOps({"relax.index_put": _index_put})]
                + cpu.legalize_passes(target)
                + [dl.ApplyDefaultSchedule(Injective(), RowReduction(), dl.cpu.Reduction())]
                + cpu.dataflow_lower_passes(target)
                + cpu.finalize_passes(target)
            )
            return seq(mod)

    return _pipeline
