"""Program + Target -> a TVM library (model.so) and its parameters.

The library's Relax function `main(*inputs, *params)` returns the outputs; dense ops are calls
into the hand-written kernels (backends/kernels), linked into the same library. Cross-compiled
libraries (arm64) link with the Debian cross compiler. cuda targets build in backends/tvm/cuda.py
(which also writes the device code beside the library and describes it in `device_code`).
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from tcc.errors import UserError, deferred_interrupts
from tcc.ir.program import Program
from tcc.progress import status

from .cuda import build_library as build_cuda
from .lower import to_relax
from .schedule import pipeline as cpu_pipeline
from .targets import Target


def check_toolchain(target: Target) -> str:
    """The C compiler that links libraries for `target`; UserError naming the package if missing."""
    cc = target.cc.replace("g++", "gcc")
    if target.device == "cuda":
        from tcc.backends.kernels.build import find_nvcc
        find_nvcc()
    for tool in (cc, target.cc):
        if shutil.which(tool) is None:
            pkg = tool.replace("aarch64-linux-gnu-", "") + "-aarch64-linux-gnu" if "aarch64" in tool else tool
            raise UserError(f"the {target.name} target needs the compiler '{tool}', which is not installed",
                            f"apt-get install {pkg}")
    return cc


def build_library(program: Program, target: Target, lib_path: Path, report: list | None = None,
                  device_code: dict | None = None, functions: dict[str, Program] | None = None):
    """Compile `program` for `target` into `lib_path` as the function `main`, and each of `functions`
    (name -> static Program, e.g. generation's prefill and decode) as a further Relax function of the
    same library. Returns ([(param name, array)] to store, {function: [param names in call order]}):
    a tensor the functions share (byte-identical) is stored once. How each sparse weight was lowered
    (kernel, storage) is appended to `report`; a cuda target's device code (cuda.build_library) is
    described in `device_code`. Ctrl-C is honoured when the build returns (deferred_interrupts: inside
    TVM's import and build the FFI would swallow it)."""
    with deferred_interrupts():
        return _build_library(program, target, lib_path, report, device_code, functions)


def _build_library(program: Program, target: Target, lib_path: Path, report: list | None,
                   device_code: dict | None, functions: dict[str, Program] | None):
    import tvm
    from tvm import relax

    from tcc.backends.kernels.build import build_kernels

    cc = check_toolchain(target)
    if (target.device == "cuda" or target.arch != "x86_64") and any(s.dynamic_dims for s in program.inputs):
        raise UserError(f"a dynamic sequence length (--max-seq-len) is supported on the x86 target only, not {target.name}",
                        "compile for this target without --max-seq-len (a static --seq-len)")
    if target.device == "cuda":
        if functions:
            raise UserError(f"generation entry points are built for CPU targets only, not {target.name}",
                            "compile with --no-generate for a cuda target")
        with status("importing into TVM Relax"):
            mod, params = to_relax(program, report, device="cuda")
        build_cuda(mod, target, lib_path, device_code)
        return params, {"main": [n for n, _ in params]}
    with status("importing into TVM Relax"):
        memo: dict = {}  # the functions share their fused and packed weights (lower.derived)
        mod, params = to_relax(program, report, memo=memo)
        named = {"main": params}
        for name, prog in (functions or {}).items():
            extra, named[name] = to_relax(prog, memo=memo)
            mod[name] = extra["main"].with_attr("global_symbol", name)
        params, signatures = share_params(named)
    work = Path(tempfile.mkdtemp(prefix="tcc-build-"))
    try:
        with status(f"building kernels for {target.arch}"):
            kernels = build_kernels(target.arch, work, list(target.cflags))
        mod = mod.with_attr("external_mods", [tvm.runtime.load_static_library(str(kernels.object), list(kernels.functions))])
        tvm_target = target.tvm_target()
        with status(f"compiling with TVM for {target.name} ({tvm_target})"):
            pipeline = cpu_pipeline(tvm_target)
            ex = relax.build(mod, tvm_target, relax_pipeline=pipeline)
        (work / "ws").mkdir()
        with status(f"linking {lib_path.name}"):
            ex.export_library(str(lib_path), cc=cc, options=kernels.link_options(), workspace_dir=str(work / "ws"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return params, signatures


def share_params(named: dict[str, list]) -> tuple[list, dict[str, list[str]]]:
    """{function: [(name, array)]} -> ([(name, array)] with each distinct tensor once, {function:
    [stored names]}). Tensors are the same when dtype, shape and bytes are; a name taken by another
    tensor gets the function's name as a prefix."""
    import hashlib
    stored, by_key, by_memory, signatures = [], {}, {}, {}
    for fn, params in named.items():
        names = []
        for name, a in params:
            at = (a.__array_interface__["data"][0], a.shape, a.dtype.str, a.strides)  # the same memory: no hashing
            if at not in by_memory:
                by_memory[at] = (a.dtype.str, a.shape, hashlib.sha256(memoryview(a).cast("B")).digest())
            key = by_memory[at]
            if key not in by_key:
                taken = {n for n, _ in stored}
                by_key[key] = name if name not in taken else f"{fn}.{name}"
                stored.append((by_key[key], a))
            names.append(by_key[key])
        signatures[fn] = names
    return stored, signatures
