"""ONNX Runtime: tcc's reference and peer baseline.

`export_onnx(program, path)` writes the Program's graph as an ONNX model (torch.onnx dynamo
exporter, opset 18) whose inputs and outputs carry the Program's spec names. Weights live inside
the .onnx file (one self-contained file) unless they exceed ONNX's 2 GB protobuf limit; then they go
to `<file name>.data` next to it (ONNX external data), which must stay beside the .onnx file.

tcc's custom ops are translated with onnxscript (`TRANSLATIONS`):
  tcc::dense(x, w, b?)             MatMul(x, Transpose(w)) [+ Add b]; ORT folds the constant
                                   Transpose into the initializer at session start
  tcc::dense_w8(x, qw, scale, b?)  MatMul(x, Transpose(DequantizeLinear(qw, scale, axis=0))) [+ Add b]:
                                   the weight stays an int8 initializer in the file (0.25x bytes)
  tcc::sdpa(q, k, v, mask?, ...)   the textbook attention: MatMul(q, k^T) * scale (+ mask, + causal
                                   -inf above the diagonal) -> Softmax -> MatMul v; grouped KV heads
                                   are repeated to the query heads (Unsqueeze/Expand/Reshape)
Any other op in a namespace other than aten/prims (a plugin's custom op) raises a UserError naming
every such op; aten ops the exporter cannot translate raise a UserError with its message.

`OrtSession(path, threads=None)` loads the file into an ORT CPU session (all optimisations;
`threads` intra-op threads, None = ORT's default of one per core) and is called like a Program:
`session(feeds) -> {output name: array}`. `reference_session(program)` exports to a temporary
directory and returns the session (the directory lives as long as the session).
`quantize_dynamic_int8(src, dst)` makes ORT's own int8 peer (dynamic quantization) of an fp32 file.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnxscript import opset18 as op

from tcc.ir import ops as _ops  # noqa: F401  (registers torch.ops.tcc.*)
from tcc.errors import UserError
from tcc.ir.program import Program, TensorSpec

OPSET = 18
EXTERNAL_DATA_BYTES = 1_800_000_000  # above this the weights go to <file>.data (protobuf limit: 2 GiB)
_BUILTIN_NAMESPACES = {"aten", "prims"}


# -- translations of tcc's custom ops (onnxscript, traced when the exporter meets the op) ----------

def _dense(x, w, b=None):
    y = op.MatMul(x, op.Transpose(w, perm=[1, 0]))
    return y if b is None else op.Add(y, b)


def _dense_w8(x, qw, scale, b=None):
    w = op.DequantizeLinear(qw, scale, axis=0)  # int8 [N, K] * scale[N] per row -> float [N, K]
    y = op.MatMul(x, op.Transpose(w, perm=[1, 0]))
    return y if b is None else op.Add(y, b)


def _sdpa(q, k, v, mask=None, scale: float = 1.0, causal: bool = False):
    b, h, sq = (int(s) for s in q.shape[:3])
    hkv, sk = int(k.shape[1]), int(k.shape[2])
    if hkv != h:  # query head i reads KV head i // (h / hkv), as repeat_interleave does
        rep = h // hkv

        def repeat(t):
            dv = int(t.shape[-1])
            t = op.Expand(op.Unsqueeze(t, op.Constant(value_ints=[2])),
                          op.Constant(value_ints=[b, hkv, rep, sk, dv]))
            return op.Reshape(t, op.Constant(value_ints=[b, h, sk, dv]))

        k, v = repeat(k), repeat(v)
    s = op.Mul(op.MatMul(q, op.Transpose(k, perm=[0, 1, 3, 2])), op.Constant(value_float=float(scale)))
    if mask is not None:
        s = op.Add(s, mask)
    if causal:
        keep = np.tril(np.ones((sq, sk), dtype=bool), sk - sq)
        additive = np.where(keep, 0.0, -np.inf).astype(np.float32)
        s = op.Add(s, _const(additive))
    return op.MatMul(op.Softmax(s, axis=-1), v)


def _const(array: np.ndarray):
    return op.Constant(value=onnx.numpy_helper.from_array(array))


TRANSLATIONS = {
    torch.ops.tcc.dense.default: _dense,
    torch.ops.tcc.dense_w8.default: _dense_w8,
    torch.ops.tcc.sdpa.default: _sdpa,
}


# -- export ----------------------------------------------------------------------------------------

def unsupported_ops(program: Program) -> list[str]:
    """Custom (non-aten) ops in the graph that no translation covers, e.g. a plugin's own op."""
    bad = set()
    for n in program.gm.graph.nodes:
        if n.op != "call_function" or n.target in TRANSLATIONS:
            continue
        if isinstance(n.target, torch._ops.OpOverload) and n.target.namespace not in _BUILTIN_NAMESPACES:
            bad.add(str(n.target))
    return sorted(bad)


def export_onnx(program: Program, path: str | os.PathLike) -> None:
    """Write `program` as an ONNX model (opset 18) to `path`; see the module docstring."""
    bad = unsupported_ops(program)
    if bad:
        raise UserError(f"the ONNX Runtime backend cannot translate these ops: {', '.join(bad)}",
                        "add a translation to tcc.backends.onnxruntime.TRANSLATIONS or leave out the pass that makes them")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    feeds = program.example_inputs()
    args = tuple(torch.from_numpy(feeds[s.name]) for s in program.inputs)
    external = program.param_bytes() > EXTERNAL_DATA_BYTES
    try:
        with torch.no_grad(), _quiet_exporter():
            onnx_program = torch.onnx.export(
                program.gm, args, dynamo=True, opset_version=OPSET,
                input_names=[s.name for s in program.inputs], output_names=[s.name for s in program.outputs],
                custom_translation_table=TRANSLATIONS, optimize=True, verbose=False)
            onnx_program.save(str(path), external_data=external)
    except UserError:
        raise
    except Exception as e:
        first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise UserError(f"ONNX export failed: {type(e).__name__}: {first[:300]}",
                        "the graph holds an op torch.onnx cannot translate; run with --debug for the full trace")


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporter's step prints, warnings and optimizer logs (tcc prints its own progress)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# -- running ---------------------------------------------------------------------------------------

class OrtSession:
    """An ONNX file on ORT's CPU provider, called with numpy inputs by name."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        import onnxruntime as ort
        path = Path(path)
        if not path.exists():
            raise UserError(f"ONNX file {path} not found")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = int(threads)
        self.path = path
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.inputs = [_spec(i) for i in self.session.get_inputs()]
        self.outputs = [_spec(o) for o in self.session.get_outputs()]
        self._keep = None  # a TemporaryDirectory to keep alive (reference_session)

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [s.name for s in self.inputs if s.name not in feeds]
        if missing:
            raise UserError(f"missing inputs {missing}; the ONNX model takes {[s.name for s in self.inputs]}")
        arrays = {s.name: s.check(feeds[s.name]) for s in self.inputs}
        out = self.session.run([s.name for s in self.outputs], arrays)
        return {s.name: o for s, o in zip(self.outputs, out)}


_ORT_DTYPES = {"tensor(float)": "float32", "tensor(double)": "float64", "tensor(int64)": "int64",
               "tensor(int32)": "int32", "tensor(float16)": "float16", "tensor(bool)": "bool", "tensor(int8)": "int8"}


def _spec(node) -> TensorSpec:
    shape = tuple(s if isinstance(s, int) else -1 for s in node.shape)
    return TensorSpec(node.name, _ORT_DTYPES.get(node.type, node.type), shape)


def quantize_dynamic_int8(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """ORT's own int8 baseline: dynamic quantization (int8 weights per channel, activations
    quantized per call) of the fp32 ONNX file `src` into `dst`; the peer tcc's int8 is measured
    against."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # it logs a "consider pre-processing" warning on the root logger
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True)
    finally:
        root.setLevel(level)


def reference_session(program: Program, threads: int | None = None) -> OrtSession:
    """Export `program` to a temporary directory and open it in ORT (the directory lives with it)."""
    tmp = tempfile.TemporaryDirectory(prefix="tcc-onnx-")
    path = Path(tmp.name) / "model.onnx"
    export_onnx(program, path)
    session = OrtSession(path, threads=threads)
    session._keep = tmp
    return session


# -- the backend (tcc.pipeline.backend.Backend) -------------------------------------------------------------

class OnnxRuntimeBackend:
    """`--backend onnxruntime`: model.onnx (export_onnx) for ONNX Runtime on this host."""

    name = "onnxruntime"

    def check_toolchain(self, target) -> None:
        if not target.is_host:
            raise UserError(f"--backend onnxruntime runs on this host only, not on target '{target.name}'",
                            "use --target x86")

    def build(self, program: Program, target, dir, functions: dict | None = None) -> dict:
        from tcc.artifact import weight_bytes
        from tcc.progress import status
        with status("exporting to ONNX"):
            export_onnx(program, Path(dir) / "model.onnx")
        params = [(n, t.detach().numpy()) for n, t in program.named_tensors().items()]
        return {"params": [], "weight_bytes": weight_bytes(params), "sparsity": []}

    def cacheable(self, target) -> bool:
        return False

    def identity(self) -> list:
        import onnxruntime
        return [onnx.__version__, onnxruntime.__version__]

    def session(self, dir, manifest: dict) -> OrtSession:
        return OrtSession(Path(dir) / "model.onnx")

    def cost_model(self, program: Program):
        return program.gm  # ORT fuses on its own: the graph as exported

    # the peers tcc bench times next to an artifact (tcc.bench)
    file_session = staticmethod(OrtSession)  # (path to an .onnx file, threads=None)
    export = staticmethod(export_onnx)
    reference_session = staticmethod(reference_session)
    quantize_dynamic_int8 = staticmethod(quantize_dynamic_int8)


BACKEND = OnnxRuntimeBackend()
