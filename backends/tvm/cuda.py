"""The cuda targets: Program -> a TVM library for NVIDIA GPUs, with device code compiled ahead of
time by nvcc. Built and compiled here, never run here (no GPU on this host); see docs/CUDA.md.

build_library(mod, target, lib_path, device_code=None)   (build.py lowers the Program first)
  1. Lowering (lower.to_relax(device="cuda"), with the pieces below): float32 dense, weight-only int8 dense and attention
     become Relax ops (matmul, softmax, ...) that TVM schedules for the GPU; W8A8 and int4 dense call
     tcc's CUDA kernels (backends/kernels/cuda) on the CPU kernels' packed layouts; a float32 linear
     whose weight is annotated 2:4 (and holds it) calls the sparse tensor-core kernel on
     layout.compress_24's form (float16 values + 2-bit indices). Other sparse weights run dense.
  2. pipeline(target): TVM's CUDA pipeline (relax.backend.cuda): legalize, fuse, dlight GPU
     schedules (Matmul, GEMV, Reduction, GeneralReduction, Fallback), lower; then relax.build.
  3. The library (host code + the generated CUDA source, which TVM's CUDA runtime compiles when a
     GPU host loads it) links the kernels' object (nvcc: device code for every target.gpu_archs)
     and libcudart, into lib_path.
  4. Beside it: the generated source as model.cu, compiled by nvcc for every arch into
     model.<arch>.cubin (nvcc rejecting it is a UserError), and the kernels' sources.
  `device_code` receives what the manifest records: {arch: {"tvm_kernels": cubin file,
  "tcc_kernels": "model.so"}, "sources": {...}, "compiled_with": "nvcc X.Y.Z", "run": False, "note"}.

Lowering pieces lower.py calls for device "cuda" (this module imports only backends/tvm/converters.py,
the pieces both share, never lower.py):
  sparse_24(gm, annotations, report) -> {weight targets lowered}   2:4 linears -> tcc_tvm::dense_sp24
  note_dense(gm, sparse, report)     the sparse tensors left: stored and run dense
  CONVERT_MAP                        custom_convert_map for from_exported_program
cuda_source(module) -> str                  the CUDA C source in a built module
cubin_archs(data: bytes) -> ["sm_80", ...]  the architectures of the CUDA ELF images in a file
"""
from __future__ import annotations

import re
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import torch

from tcc.errors import InternalError
from tcc.progress import status

from .converters import a8w8_converter, annotated_linears, arg, attr, convert_embedding_w8, dense_converter, note, \
    replace_linear
from .targets import Target

aten = torch.ops.aten
KERNEL_SOURCES = ("tcc_cuda.cuh", "launch.cuh", "quant_gemm.cu", "sparse24_gemm.cu")
NOTE = ("compiled, not run on a GPU here: model.so carries the generated CUDA source, which TVM's CUDA "
        "runtime compiles (NVRTC) when a GPU host loads it; the model.<arch>.cubin files are the same "
        "source compiled ahead of time by nvcc; tcc's kernels are linked into model.so as SASS")


def build_library(mod, target: Target, lib_path: Path, device_code: dict | None = None) -> None:
    """`mod`: the Program as lowered for "cuda" (lower.to_relax(device="cuda"), which calls this
    module's lowering pieces: so this module does not import lower)."""
    import tvm
    from tvm import relax

    from tcc.backends.kernels.build import CUDA_DIR, build_cuda_kernels, nvcc_version

    out = Path(lib_path).parent
    work = Path(tempfile.mkdtemp(prefix="tcc-build-"))
    try:
        with status(f"compiling tcc's CUDA kernels for {', '.join(target.gpu_archs)} (nvcc)"):
            kernels = build_cuda_kernels(work, target.gpu_archs)
        mod = mod.with_attr("external_mods", [tvm.runtime.load_static_library(str(kernels.object), list(kernels.functions))])
        tvm_target = target.tvm_target()
        with status(f"compiling with TVM for {target.name} ({tvm_target.arch})"):
            ex = relax.build(mod, tvm_target, relax_pipeline=pipeline(tvm_target))
        (work / "ws").mkdir()
        with status(f"linking {lib_path.name}"):
            ex.export_library(str(lib_path), cc="g++", options=kernels.link_options(), workspace_dir=str(work / "ws"))
        linked = cubin_archs(Path(lib_path).read_bytes())
        if linked != sorted(target.gpu_archs):
            raise InternalError(f"{lib_path.name} holds tcc kernel images for {linked}, expected {list(target.gpu_archs)}")
        (out / "model.cu").write_text(cuda_source(ex.mod))
        cubins = {}
        for arch in target.gpu_archs:
            with status(f"compiling model.cu for {arch} (nvcc)"):
                cubins[arch] = compile_source(out / "model.cu", arch, out / f"model.{arch}.cubin")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for name in KERNEL_SOURCES:
        shutil.copyfile(CUDA_DIR / name, out / name)
    if device_code is not None:
        device_code.clear()
        device_code.update({arch: {"tvm_kernels": cubins[arch], "tcc_kernels": Path(lib_path).name}
                            for arch in target.gpu_archs})
        device_code.update(sources={"tvm": "model.cu", "tcc": list(KERNEL_SOURCES)},
                           compiled_with=f"nvcc {nvcc_version()}", run=False, note=NOTE)


def pipeline(target):
    """TVM's CUDA pipeline: dispatch (sort, sampling), LegalizeOps, FuseOps/FuseTIR, dlight's GPU rules
    (Matmul, GEMV, Reduction, GeneralReduction, Fallback), dataflow lowering, memory planning."""
    from tvm.relax.backend.cuda.pipeline import get_default_pipeline
    return get_default_pipeline(target)


def cuda_source(module) -> str:
    """The CUDA C source of the (first) CUDA module imported by a built module."""
    stack = [module]
    while stack:
        m = stack.pop()
        if m.kind == "cuda":
            return m.inspect_source("cuda")
        stack.extend(m.imports)
    raise InternalError("the built module has no CUDA code")


def compile_source(source: Path, arch: str, dest: Path) -> str:
    """nvcc --cubin for `arch`; returns dest's file name. UserError when nvcc rejects the source."""
    from tcc.backends.kernels.build import run_nvcc
    run_nvcc(["--cubin", "-O3", f"-arch={arch}", "-w", source.name, "-o", dest.name],
             f"the CUDA code TVM generated for {arch}", cwd=source.parent)
    if cubin_archs(dest.read_bytes()) != [arch]:
        raise InternalError(f"nvcc wrote {dest.name} for {cubin_archs(dest.read_bytes())}, not {arch}")
    return dest.name


def cubin_archs(data: bytes) -> list[str]:
    """The SM architectures of the CUDA ELF images (e_machine 190) anywhere in `data`: a cubin, or an
    object/library with embedded fatbins (uncompressed, as nvcc writes them)."""
    archs = set()
    for m in re.finditer(rb"\x7fELF\x02\x01\x01", data):
        o = m.start()
        if len(data) < o + 52 or struct.unpack_from("<H", data, o + 18)[0] != 190:
            continue
        flags, abi = struct.unpack_from("<I", data, o + 48)[0], data[o + 8]
        archs.add(f"sm_{(flags >> 8) & 0xff if abi >= 8 else flags & 0xff}")
    return sorted(archs)


# ---------------------------------------------------------------------------------------------
# Lowering: 2:4 sparse linears, and the Relax form of the ops TVM schedules itself
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("tcc_tvm::dense_sp24", mutates_args=())
def dense_sp24(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, b: torch.Tensor | None,
               k: int) -> torch.Tensor:
    """y = x @ W.T + b with W [N, k] in layout.compress_24's form (meta's uint16 words held as int16)."""
    n, kp = values.shape[0], values.shape[1] * 2
    words = meta.to(torch.int32) & 0xFFFF
    nibbles = ((words[..., None] >> (4 * torch.arange(4))) & 15).reshape(n, kp // 4)
    keep = torch.stack([nibbles & 3, nibbles >> 2], dim=-1).long()
    chunks = torch.zeros(n, kp // 4, 4, dtype=torch.float32).scatter_(-1, keep, values.float().reshape(n, kp // 4, 2))
    return torch.nn.functional.linear(x, chunks.reshape(n, kp)[:, :k].to(x.dtype), b)


@dense_sp24.register_fake
def _(x, values, meta, b, k):
    return x.new_empty((*x.shape[:-1], values.shape[0]))


def _is_24(ann: dict) -> bool:
    return ann.get("pattern") == "n:m" and ann.get("n") == 2 and ann.get("m") == 4


def sparse_24(gm: torch.fx.GraphModule, anns: dict, report: list | None) -> set:
    """In place: aten.linear with a stored float32 weight annotated 2:4 whose zeros hold the pattern
    -> tcc_tvm::dense_sp24 on its compressed arrays (registered as parameters). Returns the targets."""
    from tcc.backends.kernels.cuda.layout import compress_24, is_24

    done = set()
    for i, n, x, w, b, ann, weight in annotated_linears(gm, anns, lambda a, t: _is_24(a) and is_24(t)):
        values, meta = compress_24(weight)
        replace_linear(gm, n, torch.ops.tcc_tvm.dense_sp24.default, x,
                       [(f"_tcc_sp24_{i}_values", values), (f"_tcc_sp24_{i}_meta", meta.view(np.int16))],
                       b, weight.shape[1])
        done.add(w.target)
        note(report, w.target, ann, weight, "2:4 (float16 values + 2-bit indices)",
             "tcc_cuda_dense_sp24 (mma.sp sparse tensor cores, weights and activations in float16)",
             weight.numel() * 4, values.nbytes + meta.nbytes)
    return done


def note_dense(gm: torch.fx.GraphModule, sparse: dict, report: list | None) -> None:
    """The stored tensors in `sparse` still in the graph: stored and multiplied dense on the GPU."""
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.target in sparse:
            t = attr(gm, n).detach()
            nbytes = t.numel() * t.element_size()
            note(report, n.target, sparse[n.target], t, "dense",
                 "dense (cuda: only float32 weights holding 2:4 take the sparse kernel)", nbytes, nbytes)


def _convert_dense(node, importer):
    from tvm import relax
    x, w, *rest = (list(node.args) + [None])[:3]
    b = rest[0]
    args = [arg(importer, x), arg(importer, w)] + ([arg(importer, b)] if b is not None else [])
    return importer.block_builder.emit(relax.op.linear(*args))


def _convert_dense_w8(node, importer):
    """x @ (qw * scale[:, None]).T + b as Relax ops (the dequantization fuses into the matmul's prologue)."""
    from tvm import relax
    x, qw, scale, b = (list(node.args) + [None])[:4]
    bb = importer.block_builder
    w = bb.emit(relax.op.multiply(relax.op.astype(arg(importer, qw), "float32"),
                                  relax.op.expand_dims(arg(importer, scale), -1)))
    return bb.emit(relax.op.linear(arg(importer, x), w, None if b is None else arg(importer, b)))


def _convert_sdpa(node, importer):
    """softmax(q k^T * scale + mask [+ causal]) v as Relax ops, KV heads repeated for grouped queries."""
    from tvm import relax
    q, k, v, mask, scale, causal = node.args
    bb = importer.block_builder
    h, hkv = int(q.meta["val"].shape[1]), int(k.meta["val"].shape[1])
    sq, sk = int(q.meta["val"].shape[2]), int(k.meta["val"].shape[2])
    qe, ke, ve = (arg(importer, t) for t in (q, k, v))
    if hkv != h:
        ke, ve = (bb.emit(relax.op.repeat(t, h // hkv, axis=1)) for t in (ke, ve))
    s = bb.emit(relax.op.matmul(qe, relax.op.permute_dims(ke, [0, 1, 3, 2])))
    s = bb.emit(relax.op.multiply(s, relax.const(float(scale), "float32")))
    if mask is not None:
        s = bb.emit(relax.op.add(s, arg(importer, mask)))
    if causal:
        keep = np.tril(np.ones((sq, sk), bool), sk - sq)
        s = bb.emit(relax.op.add(s, relax.const(np.where(keep, 0.0, -np.inf).astype(np.float32))))
    p = bb.emit(relax.op.nn.softmax(s, axis=-1))
    return bb.emit(relax.op.matmul(p, ve))


CONVERT_MAP = {
    "dense.default": _convert_dense,
    "dense_w8.default": _convert_dense_w8,
    "sdpa.default": _convert_sdpa,
    "dense_a8w8_packed.default": a8w8_converter("tcc_cuda_dense_a8w8"),
    "dense_w4_packed.default": dense_converter("tcc_cuda_dense_w4", 4),  # (x, qw_p, scale_t, zero_t, b?, n)
    "dense_sp24.default": dense_converter("tcc_cuda_dense_sp24", 3),     # (x, values, meta, b?, k)
    "embedding_w8.default": convert_embedding_w8,
}
