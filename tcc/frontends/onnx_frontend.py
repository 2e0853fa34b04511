"""The ONNX frontend: an .onnx file (default-domain opsets 14-20) -> the same Program the torch path makes.

`trace_onnx(path, *, task=None, seq_len=128, batch=1) -> Program`

Steps:
 1. Load and check the file (onnx.checker; a corrupt or truncated file, an opset outside 14-20, or
    ops outside the table below raise one UserError, the last listing every unsupported op type with
    its node names). Only nodes the graph outputs depend on count.
 2. Fix the inputs' symbolic dims: the first dim is the batch, the second dim of a rank-2 input (ids,
    masks) or a dim named like *seq*/*len*/*token* is the sequence; fixed dims stay (an image input
    keeps its 3 x 224 x 224). Any other symbolic dim is a UserError.
 3. One eager run of the graph with torch ops on example inputs (ids within the embedding table,
    masks all ones, images N(0, 1)). A value is *static* when it does not depend on the inputs' values
    (initializers, Constant, Shape of anything, and what is computed from those only); *parametric*
    when it is a float initializer with more than one element or computed from one. Static values
    that are not parametric - shape arithmetic, position ids, masks built from shapes - are folded to
    constants; parametric ones (a transposed weight, an interpolated position embedding) stay in
    the graph, reading the weights, as in a torch-traced model (the fold-constants pass folds them).
 4. `OnnxModule` runs the remaining nodes with torch ops: float initializers are parameters (named
    by their ONNX name as a module path when it is one, else, for a projection weight, after the
    consuming node's module scope: legacy `/enc/layer.0/q/MatMul` or the dynamo exporter's
    `pkg.torch.onnx.name_scopes`), folded tensors are buffers, and one-element constants read by an
    elementwise op are Python numbers (as `x * 0.125` is in a torch graph). It is traced like any
    nn.Module (`tcc.frontends.frontend._trace_module`: torch.export, tcc.ir.canonical, tcc.ir.structure.recover);
    the spelled-out attention chains then become SDPA nodes (tcc.ir.canonical.fuse_attention).
 5. Task: causal-lm when the inputs are input_ids [+ attention_mask], the output is [B, S, vocab]
    and the first attention is causal; feature-extraction when the inputs are input_ids
    [+ attention_mask, token_type_ids] and the output is [B, S, hidden]; else custom. Integer
    inputs that index an embedding table get its size as their range (attention_mask: [0, 2)).
    Program.source = {"kind": "onnx", "path", "sha256"}; a tokenizer next to the file is used.

Numerics are ONNX's (the reference is ONNX Runtime on the original file); fp32 outputs agree within
4e-6 relative on the models in tests/test_onnx_frontend.py. Resize supports the modes torch's
interpolate has. docs/ONNX.md lists the ops, shapes rules and limits.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import math
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError
from ..ir.program import Program
from ..progress import status

OPSETS = range(14, 21)
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


# -- the op table: ONNX op -> torch ----------------------------------------------------------------
# Each function takes (attrs, *inputs) and returns a tensor or a tuple. Inputs at the positions in
# STATIC_ARGS are sizes, axes, indices...: they must be static and are read with _ints / _num (tensors
# in the eager run, numpy arrays in the module); the others are tensors, or Python numbers for the
# elementwise ops in SCALAR_OK.

def _list(t) -> list:
    """A static argument's values: a tensor in the eager run, a numpy array in the module (tensors
    captured by torch.export would turn into data-dependent symbols)."""
    return np.asarray(t).reshape(-1).tolist()


def _ints(t) -> list[int]:
    return [int(v) for v in _list(t)]


def _num(t):
    return _list(t)[0] if isinstance(t, (torch.Tensor, np.ndarray)) else t


def _dtype(onnx_type: int) -> torch.dtype:
    import onnx
    return torch.from_numpy(np.empty(0, onnx.helper.tensor_dtype_to_np_dtype(onnx_type))).dtype


def _is_int(x) -> bool:
    return isinstance(x, int) or (isinstance(x, torch.Tensor) and not x.is_floating_point() and x.dtype != torch.bool)


def _div(a, b):
    if not isinstance(a, torch.Tensor):  # number / x
        a = torch.full_like(b, a) if _is_int(b) else a
        if not isinstance(a, torch.Tensor):
            return torch.reciprocal(b) if a == 1 else torch.reciprocal(b) * a
    return torch.div(a, b, rounding_mode="trunc") if _is_int(a) and _is_int(b) else torch.div(a, b)


def _sub(a, b):
    return torch.rsub(b, a) if not isinstance(a, torch.Tensor) else torch.sub(a, b)


def _binary(f, mirrored=None):
    """An elementwise op; `mirrored(b, a)` computes it when a is a Python number (1 < x: x > 1)."""
    return lambda at, a, b: mirrored(b, a) if mirrored and not isinstance(a, torch.Tensor) else f(a, b)


def _unary(f):
    return lambda at, x: f(x)


def _variadic(f):
    def run(at, *xs):
        out = xs[0]
        for x in xs[1:]:
            out = f(out, x)
        return out
    return run


def _reduce(f):
    def run(at, x, axes=None):
        dims = _ints(axes) if axes is not None else at.get("axes")
        if not dims:
            if at.get("noop_with_empty_axes", 0):
                return x
            dims = list(range(x.dim()))
        return f(x, dims, bool(at.get("keepdims", 1)))
    return run


def _shape(at, x):
    return torch.tensor(x.shape[at.get("start", 0):at.get("end", x.dim())], dtype=torch.int64)


def _reshape(at, x, shape):
    sizes = _ints(shape)
    if not at.get("allowzero", 0):
        sizes = [x.shape[i] if s == 0 else s for i, s in enumerate(sizes)]
    return x.reshape(sizes)


def _unsqueeze(at, x, axes):
    rank = x.dim() + len(_ints(axes))
    for a in sorted(a % rank for a in _ints(axes)):
        x = x.unsqueeze(a)
    return x


def _squeeze(at, x, axes=None):
    if axes is None:
        return x.squeeze()
    return x.squeeze(tuple(a % x.dim() for a in _ints(axes)))


def _split(at, x, split=None):
    axis, n = at.get("axis", 0), at["_n_outputs"]
    if split is not None:
        sizes = _ints(split)
    elif "split" in at:
        sizes = list(at["split"])
    else:  # equal parts, the last one smaller
        part = math.ceil(x.shape[axis] / n)
        sizes = [part] * (n - 1) + [x.shape[axis] - part * (n - 1)]
    return tuple(torch.split(x, sizes, dim=axis))


def _slice(at, x, starts, ends, axes=None, steps=None):
    starts, ends = _ints(starts), _ints(ends)
    axes = _ints(axes) if axes is not None else list(range(len(starts)))
    steps = _ints(steps) if steps is not None else [1] * len(starts)
    index = [slice(None)] * x.dim()
    for a, s, e, st in zip(axes, starts, ends, steps):
        if st <= 0:
            raise UserError(f"Slice with step {st}: only positive steps are supported")
        d = x.shape[a % x.dim()]  # ONNX ends like INT64_MAX mean "to the end"
        index[a % x.dim()] = slice(max(-d, min(s, d)), max(-d, min(e, d)), st)
    return x[tuple(index)]


def _gather(at, data, idx):
    axis = at.get("axis", 0) % data.dim()
    if not isinstance(idx, torch.Tensor):  # one static index (a Python int)
        return data.select(axis, int(idx))
    if idx.dim() == 0:
        return data.select(axis, int(idx))
    if axis == 0 and data.dim() == 2 and data.is_floating_point():
        return F.embedding(idx, data)  # an embedding lookup, as torch traces it
    flat = torch.index_select(data, axis, idx.reshape(-1))
    return flat.reshape(*data.shape[:axis], *idx.shape, *data.shape[axis + 1:])


def _gather_nd(at, data, idx):
    if at.get("batch_dims", 0):
        raise UserError("GatherND with batch_dims > 0 is not supported")
    return data[tuple(idx[..., i] for i in range(idx.shape[-1]))]


def _expand(at, x, shape):
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(_ints(shape))))


def _constant_of_shape(at, shape):
    value = at.get("value")
    v = value.reshape(-1)[0] if value is not None else torch.tensor(0.0)
    return torch.full(_ints(shape), v.item(), dtype=v.dtype)


def _range(at, start, limit, delta):
    dtype = torch.from_numpy(np.asarray(start)).dtype
    return torch.arange(_num(start), _num(limit), _num(delta), dtype=dtype)


def _where(at, c, x, y):
    return torch.where(c, x, y)


def _gemm(at, a, b, c=None):
    a = a.t() if at.get("transA", 0) else a
    b = b.t() if at.get("transB", 0) else b
    y = torch.matmul(a, b)
    if at.get("alpha", 1.0) != 1.0:
        y = y * at["alpha"]
    if c is not None:
        y = y + (c * at["beta"] if at.get("beta", 1.0) != 1.0 else c)
    return y


def _layer_norm(at, x, w, b=None):
    axis = at.get("axis", -1) % x.dim()
    return F.layer_norm(x, tuple(x.shape[axis:]), w, b, at.get("epsilon", 1e-5))


def _batch_norm(at, x, w, b, mean, var):
    return F.batch_norm(x, mean, var, w, b, False, 0.0, at.get("epsilon", 1e-5))


def _pads(at, rank: int) -> list[int]:
    pads = list(at.get("pads", [0] * 2 * rank))
    if at.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID") or pads[:rank] != pads[rank:]:
        raise UserError("convolutions with asymmetric or automatic padding are not supported")
    return pads[:rank]


def _conv(at, x, w, b=None):
    rank = w.dim() - 2
    f = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[rank]
    return f(x, w, b, tuple(at.get("strides", [1] * rank)), tuple(_pads(at, rank)),
             tuple(at.get("dilations", [1] * rank)), at.get("group", 1))


def _conv_transpose(at, x, w, b=None):
    rank = w.dim() - 2
    if "output_shape" in at:
        raise UserError("ConvTranspose with output_shape is not supported")
    f = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[rank]
    return f(x, w, b, tuple(at.get("strides", [1] * rank)), tuple(_pads(at, rank)),
             tuple(at.get("output_padding", [0] * rank)), at.get("group", 1), tuple(at.get("dilations", [1] * rank)))


_INTERP = {("linear", 3): "linear", ("linear", 4): "bilinear", ("linear", 5): "trilinear", ("cubic", 4): "bicubic"}


def _resize(at, x, roi=None, scales=None, sizes=None):
    mode, coord = at.get("mode", "nearest"), at.get("coordinate_transformation_mode", "half_pixel")
    if at.get("antialias", 0) or at.get("exclude_outside", 0) or "axes" in at:
        raise UserError("Resize with antialias, exclude_outside or axes is not supported")
    size = _ints(sizes)[2:] if sizes is not None and _list(sizes) else None
    scale = [float(s) for s in _list(scales)][2:] if size is None else None
    if mode == "nearest":
        if coord != "asymmetric" or at.get("nearest_mode", "round_prefer_floor") != "floor":
            raise UserError(f"Resize nearest with {coord} / {at.get('nearest_mode')} is not supported",
                            "only asymmetric + floor (torch's 'nearest') is")
        return F.interpolate(x, size=size, scale_factor=scale, mode="nearest")
    torch_mode = _INTERP.get((mode, x.dim()))
    if torch_mode is None or coord not in ("half_pixel", "pytorch_half_pixel", "align_corners") or \
            (mode == "cubic" and abs(at.get("cubic_coeff_a", -0.75) + 0.75) > 1e-6):
        raise UserError(f"Resize mode {mode} ({coord}) on rank {x.dim()} is not supported",
                        "torch's interpolate modes are: linear/bilinear/trilinear, bicubic with a = -0.75")
    return F.interpolate(x, size=size, scale_factor=scale, mode=torch_mode, align_corners=coord == "align_corners")


def _pad(at, x, pads, value=None, axes=None):
    p = _ints(pads)
    rank = len(p) // 2
    dims = [a % x.dim() for a in _ints(axes)] if axes is not None else list(range(x.dim()))[-rank:]
    flat = [0] * (2 * x.dim())
    for i, d in enumerate(dims):  # F.pad lists (begin, end) from the last dim backwards
        flat[2 * (x.dim() - 1 - d)], flat[2 * (x.dim() - 1 - d) + 1] = p[i], p[i + rank]
    mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}[at.get("mode", "constant")]
    return F.pad(x, flat, mode=mode, value=_num(value) if mode == "constant" and value is not None else None)


def _cumsum(at, x, axis):
    if at.get("exclusive", 0) or at.get("reverse", 0):
        raise UserError("CumSum with exclusive or reverse is not supported")
    return torch.cumsum(x, _ints(axis)[0])


def _trilu(at, x, k=None):
    k = _ints(k)[0] if k is not None else 0
    return torch.triu(x, k) if at.get("upper", 1) else torch.tril(x, k)


def _cast(x, dtype: torch.dtype):
    return x if x.dtype == dtype else x.to(dtype)


def _clip(at, x, lo=None, hi=None):
    return torch.clamp(x, _num(lo) if lo is not None else None, _num(hi) if hi is not None else None)


def _constant(at):
    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if key in at:
            v = at[key]
            return v if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=torch.float32 if "float" in key else torch.int64)
    raise UserError("Constant without a numeric value (sparse or string constants are not supported)")


OPS = {
    "Add": _binary(torch.add), "Sub": _binary(_sub), "Mul": _binary(torch.mul), "Div": _binary(_div),
    "Pow": _binary(torch.pow), "Equal": _binary(torch.eq), "Less": _binary(torch.lt, torch.gt),
    "LessOrEqual": _binary(torch.le, torch.ge), "Greater": _binary(torch.gt, torch.lt),
    "GreaterOrEqual": _binary(torch.ge, torch.le), "And": _binary(torch.logical_and),
    "Or": _binary(torch.logical_or), "Xor": _binary(torch.logical_xor), "Where": _where,
    "Max": _variadic(torch.maximum), "Min": _variadic(torch.minimum), "Sum": _variadic(torch.add),
    "Neg": _unary(torch.neg), "Abs": _unary(torch.abs), "Sqrt": _unary(torch.sqrt), "Reciprocal": _unary(torch.reciprocal),
    "Exp": _unary(torch.exp), "Log": _unary(torch.log), "Erf": _unary(torch.erf), "Tanh": _unary(torch.tanh),
    "Sigmoid": _unary(torch.sigmoid), "Relu": _unary(torch.relu), "Not": _unary(torch.logical_not),
    "IsNaN": _unary(torch.isnan), "IsInf": _unary(torch.isinf), "Floor": _unary(torch.floor), "Ceil": _unary(torch.ceil),
    "Sin": _unary(torch.sin), "Cos": _unary(torch.cos), "Sign": _unary(torch.sign), "Softplus": _unary(F.softplus),
    "Identity": _unary(lambda x: x), "Dropout": lambda at, x, *rest: x,
    "Gelu": lambda at, x: F.gelu(x, approximate=at.get("approximate", "none")),
    "LeakyRelu": lambda at, x: F.leaky_relu(x, at.get("alpha", 0.01)),
    "HardSigmoid": lambda at, x: torch.clamp(x * at.get("alpha", 0.2) + at.get("beta", 0.5), 0, 1),
    "Softmax": lambda at, x: torch.softmax(x, at.get("axis", -1)),
    "LogSoftmax": lambda at, x: torch.log_softmax(x, at.get("axis", -1)),
    "Clip": _clip, "Cast": lambda at, x: _cast(x, _dtype(at["to"])), "CastLike": lambda at, x, like: _cast(x, like.dtype),
    "Constant": _constant, "ConstantOfShape": _constant_of_shape, "Range": _range,
    "Shape": _shape, "Size": lambda at, x: torch.tensor(x.numel(), dtype=torch.int64),
    "Reshape": _reshape, "Flatten": lambda at, x: x.reshape(math.prod(x.shape[:at.get("axis", 1)]), -1),
    "Transpose": lambda at, x: x.permute(at.get("perm", list(range(x.dim()))[::-1])),
    "Unsqueeze": _unsqueeze, "Squeeze": _squeeze, "Concat": lambda at, *xs: torch.cat(xs, at["axis"]),
    "Split": _split, "Slice": _slice, "Gather": _gather, "GatherND": _gather_nd,
    "GatherElements": lambda at, x, idx: torch.gather(x, at.get("axis", 0), idx),
    "Expand": _expand, "Tile": lambda at, x, reps: x.repeat(_ints(reps)), "Trilu": _trilu, "CumSum": _cumsum,
    "Pad": _pad,
    "ReduceMean": _reduce(lambda x, d, k: x.mean(d, keepdim=k)), "ReduceSum": _reduce(lambda x, d, k: x.sum(d, keepdim=k)),
    "ReduceMax": _reduce(lambda x, d, k: x.amax(d, keepdim=k)), "ReduceMin": _reduce(lambda x, d, k: x.amin(d, keepdim=k)),
    "ArgMax": lambda at, x: torch.argmax(x, at.get("axis", 0), bool(at.get("keepdims", 1))),
    "MatMul": _binary(torch.matmul), "Gemm": _gemm,
    "LayerNormalization": _layer_norm, "BatchNormalization": _batch_norm,
    "Conv": _conv, "ConvTranspose": _conv_transpose, "Resize": _resize,
}
STATIC_ARGS = {
    "Reshape": {1}, "Unsqueeze": {1}, "Squeeze": {1}, "Split": {1}, "Slice": {1, 2, 3, 4}, "Expand": {1}, "Tile": {1},
    "ConstantOfShape": {0}, "Range": {0, 1, 2}, "Resize": {1, 2, 3}, "Pad": {1, 2, 3}, "CumSum": {1}, "Trilu": {1},
    "Clip": {1, 2}, "ReduceMean": {1}, "ReduceSum": {1}, "ReduceMax": {1}, "ReduceMin": {1},
}
SCALAR_OK = {"Add", "Sub", "Mul", "Div", "Pow", "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Where"}
_COMMUTATIVE = {"Add", "Mul", "Equal"}
_NOT_PARAMETRIC = {"Shape", "Size"}  # their value never depends on a weight's values


# -- loading and checking ----------------------------------------------------------------------------
def load(path: Path):
    """(the checked ModelProto with its weights, the external data files it reads)."""
    import onnx
    try:
        onnx.checker.check_model(str(path))
        model = onnx.load(str(path), load_external_data=False)
        external = sorted({e.value for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                           for e in t.external_data if e.key == "location"})
        onnx.load_external_data_for_model(model, str(path.parent))
    except Exception as e:  # DecodeError, ValidationError, OSError for missing external data...
        raise UserError(f"{path} is not a valid ONNX model: {type(e).__name__}: {str(e).splitlines()[0][:200]}",
                        "check that the file (and any external .data file beside it) is complete")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset not in OPSETS:
        raise UserError(f"{path} uses ONNX opset {opset}; tcc reads opsets {OPSETS[0]}-{OPSETS[-1]}",
                        "convert it first: onnx.version_converter.convert_version(model, 18)")
    return model, [path.parent / f for f in external]


def _sha256(path: Path, external: list[Path]) -> str:
    """The file's sha256, or, with external data, one over each file's name and sha256."""
    from ..store import file_sha256
    if not external:
        return file_sha256(path)
    h = hashlib.sha256()
    for f in [path, *external]:
        h.update(f.name.encode())
        h.update(file_sha256(f).encode())
    return h.hexdigest()


def _attrs(node) -> dict:
    import onnx
    out = {}
    for a in node.attribute:
        v = onnx.helper.get_attribute_value(a)
        if isinstance(v, onnx.TensorProto):
            v = torch.from_numpy(onnx.numpy_helper.to_array(v).copy())
        elif isinstance(v, bytes):
            v = v.decode()
        elif isinstance(v, list):
            v = list(v)
        out[a.name] = v
    return out


def _live_nodes(graph) -> list:
    """The nodes the graph outputs depend on, in graph order."""
    nodes = list(graph.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    need, live = [o.name for o in graph.output], set()
    while need:
        i = producer.get(need.pop())
        if i is not None and i not in live:
            live.add(i)
            need += [x for x in nodes[i].input if x]
    return [n for i, n in enumerate(nodes) if i in live]


def check_ops(nodes) -> None:
    """One UserError naming every unsupported op type and its nodes."""
    bad: dict[str, list[str]] = {}
    for i, n in enumerate(nodes):
        op = n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}"
        if op not in OPS:
            bad.setdefault(op, []).append(n.name or f"node{i}")
    if bad:
        listed = ", ".join(f"{op} ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})" for op, names in sorted(bad.items()))
        raise UserError(f"unsupported ONNX ops: {listed}",
                        "export the model without them (another opset or exporter), or use --backend onnxruntime elsewhere")


# -- inputs ------------------------------------------------------------------------------------------
def _input_shapes(graph, inputs, seq_len: int, batch: int) -> dict[str, tuple]:
    """Each input's static shape: symbolic dims become the batch or the sequence (module docstring)."""
    named: dict[str, int] = {}
    shapes = {}
    for inp in inputs:
        t = inp.type.tensor_type
        if not t.HasField("shape"):
            raise UserError(f"ONNX input '{inp.name}' has no shape", "export the model with input shapes")
        dims = list(t.shape.dim)
        shape = []
        for i, d in enumerate(dims):
            if d.HasField("dim_value") and d.dim_value > 0:
                shape.append(d.dim_value)
                continue
            p = d.dim_param
            if p and p in named:
                shape.append(named[p])
                continue
            if i == 0:
                v = batch
            elif (i == 1 and len(dims) == 2) or re.search(r"seq|len|token", p, re.I):
                v = seq_len
            else:
                raise UserError(f"ONNX input '{inp.name}' dim {i} ('{p or '?'}') is symbolic and is neither the batch "
                                "nor the sequence", "export the model with that dim fixed (e.g. the image size)")
            named[p] = v
            shape.append(v)
        shapes[inp.name] = tuple(shape)
    return shapes


def _table_rows(graph, inits: dict, name: str) -> int | None:
    """Rows of the embedding table an integer input indexes (through casts, reshapes), else None."""
    users: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    todo, seen = [name], set()
    while todo:
        v = todo.pop()
        for n in users.get(v, []):
            if n.op_type == "Gather" and n.input[1] == v and n.input[0] in inits and inits[n.input[0]].dim() == 2:
                return int(inits[n.input[0]].shape[0])
            if n.op_type in ("Cast", "Unsqueeze", "Reshape", "Flatten", "Squeeze", "Identity") and n.input[0] == v \
                    and n.output[0] not in seen:
                seen.add(n.output[0])
                todo.append(n.output[0])
    return None


def _example(name: str, dtype: torch.dtype, shape: tuple, rows: int | None, gen: torch.Generator) -> torch.Tensor:
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    if dtype == torch.bool or name == "attention_mask":
        return torch.ones(shape, dtype=dtype)
    return torch.randint(0, rows, shape, generator=gen).to(dtype) if rows else torch.zeros(shape, dtype=dtype)


# -- the module -------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Step:
    """One node the module runs: op, attrs, inputs as (kind, key) and output names."""
    op: str
    name: str
    attrs: dict
    inputs: list[tuple[str, object]]  # ("env", value name) | ("attr", module path) | ("const", value) | ("none", None)
    outputs: list[str]


class OnnxModule(torch.nn.Module):
    """Runs an ONNX graph's non-folded nodes with torch ops (see the module docstring)."""

    def __init__(self, steps: list[_Step], input_names: list[str], outputs: list[tuple[str, object]]):
        super().__init__()
        self._steps, self._input_names, self._outputs = steps, input_names, outputs
        # forward(input_ids, attention_mask): torch.export names the graph's placeholders after it
        args = [n if n.isidentifier() else f"input_{i}" for i, n in enumerate(input_names)]
        run = lambda *xs: self.run(*xs)  # noqa: E731
        run.__signature__ = inspect.Signature([inspect.Parameter(a, inspect.Parameter.POSITIONAL_OR_KEYWORD) for a in args])
        self.forward = run

    def _read(self, kind: str, key, env: dict):
        if kind == "env":
            return env[key]
        if kind == "attr":
            obj = self
            for part in key.split("."):
                obj = getattr(obj, part)
            return obj
        return key  # "const" (a numpy array or a Python number) or "none" (None)

    def run(self, *args):
        env = dict(zip(self._input_names, args))
        for s in self._steps:
            out = OPS[s.op](s.attrs, *[self._read(k, v, env) for k, v in s.inputs])
            outs = out if isinstance(out, tuple) else (out,)
            env.update(zip(s.outputs, outs))
        vals = tuple(self._read(k, v, env) for k, v in self._outputs)
        return vals if len(vals) > 1 else vals[0]


def _module_path(name: str) -> bool:
    return bool(name) and all(p.isidentifier() or p.isdigit() for p in name.split("."))


def _scope(node) -> str | None:
    """The module path of the code that made an ONNX node, when the exporter recorded it."""
    for p in node.metadata_props:  # dynamo exporter: ['', 'model', ..., 'model.layers.0.q_proj', 'linear']
        if p.key == "pkg.torch.onnx.name_scopes":
            scopes = [s.strip(" '\"") for s in p.value.strip("[]").split(",")]
            return scopes[-2] if len(scopes) >= 2 and _module_path(scopes[-2]) else None
    if node.name.startswith("/") and node.name.count("/") >= 2:  # legacy: /encoder/layer.0/q/MatMul
        path = ".".join(node.name.strip("/").split("/")[:-1])
        return path if _module_path(path) else None
    return None


class _Builder:
    """Names and registers the tensors the module reads."""

    def __init__(self, module: torch.nn.Module):
        self.module, self.by_value = module, {}

    def attr(self, value: str, tensor: torch.Tensor, preferred: str, parameter: bool) -> str:
        if value in self.by_value:
            return self.by_value[value]
        path = preferred if _module_path(preferred) and self._free(preferred) else None
        if path is None:  # a flat attribute of the root
            base, i = "onnx_" + re.sub(r"\W", "_", preferred), 1
            path = base
            while hasattr(self.module, path):
                path, i = f"{base}_{i}", i + 1
        owner = self.module
        *parents, leaf = path.split(".")
        for p in parents:
            if not hasattr(owner, p):
                owner.add_module(p, torch.nn.Module())
            owner = getattr(owner, p)
        if parameter:
            owner.register_parameter(leaf, torch.nn.Parameter(tensor, requires_grad=False))
        else:
            owner.register_buffer(leaf, tensor)
        self.by_value[value] = path
        return path

    def _free(self, path: str) -> bool:
        obj = self.module
        parts = path.split(".")
        for i, p in enumerate(parts):
            if not hasattr(obj, p):
                return True
            obj = getattr(obj, p)
            if not isinstance(obj, torch.nn.Module) and i < len(parts) - 1:
                return False
        return False


# -- building it: examples, the eager run, the assembly ---------------------------------------------
def build_module(model, seq_len: int, batch: int) -> tuple[OnnxModule, dict[str, torch.Tensor], list[str], dict]:
    """(module, example inputs by name, output names, {input name: (lo, hi) range}) for an ONNX model."""
    import onnx
    graph = model.graph
    nodes = _live_nodes(graph)
    check_ops(nodes)
    inits = {i.name: torch.from_numpy(onnx.numpy_helper.to_array(i).copy()) for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    examples, ranges = _examples(graph, inputs, inits, seq_len, batch)
    values = {**inits, **examples}
    attrs = [{**_attrs(n), "_n_outputs": len(n.output)} for n in nodes]
    static, parametric = _eager_run(nodes, attrs, values, set(inits))
    module = _Assembly(nodes, values, static, parametric, set(examples)).module(attrs, list(examples), graph.output)
    return module, examples, [o.name for o in graph.output], ranges


def _examples(graph, inputs, inits: dict, seq_len: int, batch: int):
    """Example inputs by name and the valid ranges of integer ones."""
    shapes = _input_shapes(graph, inputs, seq_len, batch)
    gen = torch.Generator().manual_seed(0)
    examples, ranges = {}, {}
    for inp in inputs:
        dtype = _dtype(inp.type.tensor_type.elem_type)
        rows = _table_rows(graph, inits, inp.name) if not dtype.is_floating_point else None
        examples[inp.name] = _example(inp.name, dtype, shapes[inp.name], rows, gen)
        if inp.name == "attention_mask" and not dtype.is_floating_point:
            ranges[inp.name] = (0, 2)
        elif rows:
            ranges[inp.name] = (0, rows)
    return examples, ranges


def _eager_run(nodes, attrs: list[dict], values: dict, stored: set[str]) -> tuple[set, set]:
    """Run every node on `values` (filled in place); returns the (static, parametric) value names."""
    static = set(stored)
    parametric = {x for x in stored if values[x].is_floating_point() and values[x].numel() > 1}
    with torch.no_grad():
        for i, (n, at) in enumerate(zip(nodes, attrs)):
            where = f"ONNX node '{n.name or i}' ({n.op_type})"
            for pos in STATIC_ARGS.get(n.op_type, ()):
                if pos < len(n.input) and n.input[pos] and n.input[pos] not in static:
                    raise UserError(f"{where}: its input '{n.input[pos]}' depends on the model inputs' values "
                                    "(a data-dependent shape)", "tcc compiles static shapes only")
            try:
                out = OPS[n.op_type](at, *[values[x] if x else None for x in n.input])
            except UserError as e:
                raise UserError(f"{where}: {e.message}", e.hint)
            except Exception as e:
                raise UserError(f"{where} failed on the example inputs: {type(e).__name__}: {str(e)[:200]}",
                                "check the input shapes (--seq-len, --batch) fit the model")
            outs = out if isinstance(out, tuple) else (out,)
            shape_only = n.op_type in _NOT_PARAMETRIC
            is_static = shape_only or all(x in static for x in n.input if x)
            is_param = not shape_only and (any(x in parametric for x in n.input if x) or (
                n.op_type == "Constant" and outs[0].is_floating_point() and outs[0].numel() > 1))
            for name, v in zip(n.output, outs):
                if name:
                    values[name] = v
                    if is_static:
                        static.add(name)
                    if is_param:
                        parametric.add(name)
    return static, parametric


class _Assembly:
    """Puts the module together: the nodes with an output that is not folded become steps; what they
    read is a computed value, a registered tensor, or a constant (module docstring, step 4)."""

    def __init__(self, nodes, values: dict, static: set, parametric: set, inputs: set):
        self.nodes, self.values, self.parametric = nodes, values, parametric
        self.folded = static - parametric
        self.computed = set(inputs)  # graph inputs and the steps' outputs so far
        self.consumers: dict[str, list] = {}
        for n in nodes:
            for pos, x in enumerate(n.input):
                self.consumers.setdefault(x, []).append((n, pos))

    def module(self, attrs: list[dict], input_names: list[str], graph_outputs) -> OnnxModule:
        module = OnnxModule([], input_names, [])
        self.reg = _Builder(module)
        for n, at in zip(self.nodes, attrs):
            if n.op_type == "Constant" or all(o in self.folded for o in n.output if o):
                continue
            reads = [self.read(n, pos, x) for pos, x in enumerate(n.input)]
            if n.op_type in _COMMUTATIVE and reads[0][0] == "const":
                reads = reads[::-1]  # the number second: x * 0.5
            module._steps.append(_Step(n.op_type, n.name, at, reads, list(n.output)))
            self.computed |= {o for o in n.output if o}
        module._outputs = [("env", o.name) if o.name in self.computed else self.stored(o.name) for o in graph_outputs]
        return module.eval()

    def read(self, n, pos: int, x: str) -> tuple[str, object]:
        if not x:
            return ("none", None)
        if x in self.computed:
            return ("env", x)
        v = self.values[x]  # an initializer, a Constant, or a folded value
        if pos in STATIC_ARGS.get(n.op_type, ()):
            return ("const", v.numpy())
        if x in self.folded and v.numel() == 1 and self._number_ok(n, pos, v):
            return ("const", v.item())
        if n.op_type == "Gather" and pos == 1 and x in self.folded and v.dim() == 0:
            return ("const", int(v))
        return self.stored(x)

    def stored(self, x: str) -> tuple[str, str]:
        return ("attr", self.reg.attr(x, self.values[x], self._name(x), parameter=x in self.parametric))

    def _number_ok(self, n, pos: int, v) -> bool:
        """A one-element constant as a Python number: an operand of an elementwise op (not Where's
        condition) whose other operands have at least its rank."""
        if n.op_type not in SCALAR_OK or v.dtype == torch.bool or (pos == 0 and n.op_type == "Where"):
            return False
        others = [self.values[y] for i, y in enumerate(n.input)
                  if y and i != pos and not (n.op_type == "Where" and i == 0)]
        return bool(others) and all(o.dim() >= v.dim() for o in others)

    def _name(self, value: str) -> str:
        """A module path for a stored tensor (module docstring, step 4)."""
        uses = self.consumers.get(value, [])
        if "." not in value and len(uses) == 1 and uses[0][0].op_type in ("MatMul", "Gemm") and uses[0][1] == 1:
            scope = _scope(uses[0][0])
            if scope:
                return scope + ".weight"
        return value if _module_path(value) else "onnx." + value


# -- trace -------------------------------------------------------------------------------------------
def trace_onnx(path: Path, *, task: str | None = None, seq_len: int = 128, batch: int = 1,
               source_name: str | None = None) -> Program:
    """An ONNX file -> Program (see the module docstring). `source_name` is what Program.source
    records as the path (an alias, say)."""
    from . import models
    from ..ir.canonical import fuse_attention
    from .frontend import _trace_module
    from ..ir.structure import recover

    if task not in (None, "custom", *models.TASKS):
        raise UserError(f"unknown task '{task}'", f"choose one of: {', '.join(models.TASKS)}, custom")
    with status(f"loading {path.name}"):
        model, external = load(path)
        module, examples, out_names, ranges = build_module(model, seq_len, batch)
        del model
    source = {"kind": "onnx", "path": source_name or str(path), "sha256": _sha256(path, external)}
    prog = _trace_module(module, examples, out_names, task="custom", source=source)
    if fuse_attention(prog.gm):  # ONNX spells attention out (no SDPA op before opset 23)
        prog.info = recover(prog.gm)
    prog.inputs = [dataclasses.replace(s, range=ranges.get(s.name)) for s in prog.inputs]
    prog.task = task or _infer_task(prog)
    if any((path.parent / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        prog.tokenizer_dir = str(path.parent)
    return prog


def _infer_task(prog: Program) -> str:
    from ..ir.structure import attention_visibility
    info, names = prog.info, [s.name for s in prog.inputs]
    out = prog.outputs[0].shape
    if not info.blocks or "input_ids" not in names or len(out) != 3:
        return "custom"
    ids = next(s for s in prog.inputs if s.name == "input_ids").shape
    if tuple(out[:2]) != tuple(ids):
        return "custom"
    if set(names) <= {"input_ids", "attention_mask"} and out[-1] == info.vocab_size and attention_visibility(prog) == "causal":
        return "causal-lm"
    if set(names) <= set(TOKEN_INPUTS) and out[-1] == info.hidden_size:
        return "feature-extraction"
    return "custom"
