"""Lowering pieces the CPU and cuda lowerings share (backends/tvm/lower.py, backends/tvm/cuda.py):
reading stored tensors, the manifest's sparsity rows, finding and replacing annotated linears, and
the Relax-import converters of tcc's dense-family ops.

attr(gm, node) / stored(gm, a)        a get_attr node's tensor / whether an argument is stored (or None)
note(report, tensor, ann, t, ...)     one row of the manifest's "sparsity"
annotated_linears(gm, anns, accept)   aten.linear nodes whose stored float32 weight is annotated
replace_linear(gm, n, op, x, arrays, b, k)
                                      a linear node -> op(x, *arrays, b, k), the arrays as parameters
arg(importer, a) / out_sinfo(node, importer)
                                      a node's Relax value / the Relax type of a tcc op's output
dense_converter(kernel, n_inputs) / a8w8_converter(kernel) / convert_embedding_w8
                                      converters (from_exported_program's custom_convert_map)
"""
from __future__ import annotations

import functools
import operator

import numpy as np
import torch

from tcc.errors import UserError
from tcc.ir.graph import linear_bias

aten = torch.ops.aten


def attr(gm, node):
    return gm.get_parameter(node.target) if node.target in dict(gm.named_parameters()) else gm.get_buffer(node.target)

def stored(gm, a):
    return a is None or (isinstance(a, torch.fx.Node) and a.op == "get_attr")

def note(report, tensor, ann, t, storage, kernel, before, after, **extra):
    """One row of the manifest's "sparsity": the annotation's pattern, the zeros actually stored in `t`
    (both storages are lossless, so a stale annotation costs speed or bytes, never correctness)."""
    if report is not None:
        report.append({"tensor": tensor, "pattern": ann.get("pattern"), "block": ann.get("block"),
                       "sparsity": ann.get("sparsity") if t is None else round(float((t == 0).float().mean()), 4), "storage": storage, "kernel": kernel,
                       "bytes_before": int(before), "bytes_after": int(after), **extra})


def annotated_linears(gm: torch.fx.GraphModule, anns: dict, accept):
    """(index, node, x, weight node, bias, annotation, weight) for each aten.linear whose stored float32
    weight has an annotation that `accept(annotation, weight)` takes."""
    for i, n in enumerate(list(gm.graph.nodes)):
        if n.op != "call_function" or n.target != aten.linear.default:
            continue
        x, w, b = n.args[0], n.args[1], linear_bias(n)
        ann = anns.get(getattr(w, "target", None))
        if not (w is not None and stored(gm, w) and ann):
            continue
        weight = attr(gm, w).detach()
        if weight.dtype == torch.float32 and weight.dim() == 2 and accept(ann, weight):
            yield i, n, x, w, b, ann, weight


def replace_linear(gm: torch.fx.GraphModule, n, op, x, arrays: list[tuple[str, np.ndarray]], b, k: int) -> None:
    """Linear node `n` -> op(x, *arrays, b, k), the arrays registered as parameters under their names."""
    g = gm.graph
    for name, a in arrays:
        gm.register_parameter(name, torch.nn.Parameter(torch.from_numpy(a), requires_grad=False))
    with g.inserting_before(n):
        new = g.call_function(op, (x, *[g.get_attr(name) for name, _ in arrays], b, int(k)))
    new.meta = dict(n.meta)
    n.replace_all_uses_with(new)
    g.erase_node(n)

def _size_vars(importer) -> dict:
    """The importer's TIR size variables by name: TVM names them after the torch symbols (s70...)
    when it creates the Relax types of the graph inputs."""
    from tvm import relax, tirx
    table = {}
    for node, expr in importer.env.items():
        ty = getattr(expr, "ty", None)
        if getattr(node, "op", None) == "placeholder" and isinstance(ty, relax.TensorType) and ty.shape is not None:
            table.update({d.name: d for d in ty.shape if isinstance(d, tirx.Var)})
    return table


def _tir_size(e, table: dict):
    """A sympy size expression of torch.export (s70, s70 + 1, 2*s70, s70 // 2...) as a TIR expression
    over the importer's own variables (a fresh tirx.Var of the same name would be another variable)."""
    import sympy
    from tvm import tirx
    if isinstance(e, sympy.Integer):
        return tirx.IntImm("int64", int(e))
    if isinstance(e, sympy.Symbol):
        if str(e) not in table:
            raise UserError(f"the symbolic size {e} is not a dimension of any graph input",
                            "compile without --max-seq-len")
        return table[str(e)]
    parts = [_tir_size(a, table) for a in e.args]
    if isinstance(e, sympy.Add):
        return functools.reduce(operator.add, parts)
    if isinstance(e, sympy.Mul):
        return functools.reduce(operator.mul, parts)
    if type(e).__name__ == "FloorDiv":
        return tirx.floordiv(*parts)
    if type(e).__name__ in ("Mod", "PythonMod"):
        return tirx.floormod(*parts)
    raise UserError(f"the symbolic size {e} ({type(e).__name__}) cannot be lowered to TVM", "compile without --max-seq-len")


def out_sinfo(node, importer=None):
    """The Relax type of a tcc op's output; symbolic sizes (a dynamic-length graph) become TIR
    expressions over the importer's size variables."""
    from tvm import relax
    val = node.meta["val"]
    if importer is not None and any(isinstance(s, torch.SymInt) for s in val.shape):
        table = _size_vars(importer)
        shape = [_tir_size(s.node.expr, table) if isinstance(s, torch.SymInt) else int(s) for s in val.shape]
    else:
        shape = [int(s) for s in val.shape]
    return relax.TensorType(shape, str(val.dtype).replace("torch.", ""))


def arg(importer, a):
    return importer.env[a]


def dense_converter(kernel: str, n_inputs: int):
    """tcc dense-family op -> call of `kernel` (`{kernel}_f32` with a bias, `{kernel}_nobias_f32` without);
    the op's first `n_inputs` arguments are tensors, an optional bias follows."""
    def convert(node, importer):
        from tvm import relax
        args = list(node.args) + [None]
        bias = args[n_inputs]
        tensors = [arg(importer, a) for a in args[:n_inputs]]
        name = f"{kernel}_nobias_f32" if bias is None else f"{kernel}_f32"
        if bias is not None:
            tensors.append(arg(importer, bias))
        return importer.block_builder.emit(relax.call_dps_packed(name, relax.Tuple(tensors), out_sinfo(node, importer)))
    return convert

def a8w8_converter(kernel: str):
    """tcc_tvm::dense_a8w8_packed -> `kernel`{_static}{_nobias}_f32 (quant_kernels.cc's argument lists)."""
    def convert(node, importer):
        return _convert_a8w8(node, importer, kernel)
    return convert


def _convert_a8w8(node, importer, name: str):
    import tvm
    from tvm import relax
    x, qw_p, wsum, w_scale, b, x_scale, x_zero, asym = node.args
    args = [arg(importer, t) for t in (x, qw_p, wsum, w_scale)]
    if x_scale is not None:
        name += "_static"
    if b is not None:
        args.append(arg(importer, b))
    else:
        name += "_nobias"
    if x_scale is not None:
        zero = arg(importer, x_zero) if x_zero is not None else relax.const(np.zeros(1, np.float32))
        args += [arg(importer, x_scale), zero]
    args.append(relax.prim_value(tvm.tirx.IntImm("bool", bool(asym))))
    return importer.block_builder.emit(relax.call_dps_packed(name + "_f32", relax.Tuple(args), out_sinfo(node, importer)))


def convert_embedding_w8(node, importer):
    """Rows of the int8 table, dequantised: plain Relax ops TVM fuses into one gather kernel."""
    from tvm import relax
    ids, qw, scale = (arg(importer, t) for t in node.args)
    bb = importer.block_builder
    rows = bb.emit(relax.op.astype(relax.op.take(qw, ids, axis=0), "float32"))
    scales = bb.emit(relax.op.expand_dims(relax.op.take(scale, ids, axis=0), -1))
    return bb.emit(relax.op.multiply(rows, scales))
