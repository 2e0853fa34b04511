"""Bundles: an artifact plus the native runtime it needs, to run where there is no Python.

Contract:
* `make_bundle(artifact_dir, out, force=False) -> dict` writes the directory `out`:
    lib/model.so             the artifact's library (rpath $ORIGIN: finds OpenBLAS beside it)
    lib/libtcc.so            the C API (native/tcc.h, native/tcc_api.cc)
    lib/libtvm_runtime.so, lib/libtvm_ffi.so, lib/libscipy_openblas.so   the runtime for the target's arch:
                             x86-64 from the installed apache-tvm / apache-tvm-ffi / scipy-openblas32
                             wheels, aarch64 from aarch64_runtime_dir() (arm64.py)
    lib/pkgconfig/tcc.pc     `pkg-config --cflags --libs tcc` (PKG_CONFIG_PATH=DIR/lib/pkgconfig)
    include/tcc.h            the C API
    bin/tcc-run              inputs from .npy files, outputs to .npy files
    bin/tcc-generate         (causal LMs with prefill/decode) token ids in, token ids out; --speculate
                             lookup: greedy prompt-lookup speculation through the verify entries
    weights.safetensors, manifest.json, tokenizer/ (where the artifact has one: the application tokenizes)
    tcc-bundle.spec          what libtcc reads: sha256 of model.so and the weights (checked at tcc_open),
                             the tensors' offsets in the weights and the functions' signatures
    tcc-bundle.json          format "tcc-bundle/1", arch, the runtime libraries' bytes, sha256 of every file
    README.md                how to run and link it
  Everything runs from wherever the directory is copied (rpaths are $ORIGIN-relative). `out` may be
  missing, empty or a bundle tcc wrote (unless `force`); it is written beside itself and renamed into
  place (tcc.artifact.Staging). Returns {"bundle", "arch", "bytes", "runtime_bytes", "files"}.
* `native_tools(arch) -> Path`: libtcc.so, tcc-run and tcc-generate compiled for `arch` (g++ for x86_64,
  aarch64-linux-gnu-g++ for aarch64) against that arch's TVM FFI headers, cached under
  $TCC_CACHE/bundle-tools/ by a hash of the sources, flags and runtime versions.
CUDA bundles wait for a GPU runtime in tcc (docs/DEPLOY.md); an onnxruntime artifact has no bundle.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path

from tcc.artifact import Staging, read_manifest, sha256, verify_files
from tcc.errors import InternalError, UserError
from tcc.paths import read_small_json

from .arm64 import _function_specs, _generation_lines, _layout, _nbytes, _param_lines, _spec_line

NATIVE = Path(__file__).parent / "native"
SOURCES = ("tcc.h", "tcc_tool.h", "tcc_api.cc", "tcc_run.cc", "tcc_generate.cc")
FORMAT = "tcc-bundle/1"
WHAT = "bundle directory (--bundle)"
CXXFLAGS = ["-std=c++17", "-O2"]
RUNTIME_LIBS = ("libtvm_runtime.so", "libtvm_ffi.so", "libscipy_openblas.so")
GENERATION_FUNCTIONS = ("prefill", "decode")  # and the verify entries, where the artifact has them (_bundled)


def is_bundle(dir: Path) -> bool:
    m = read_small_json(Path(dir) / "tcc-bundle.json")
    return m is not None and str(m.get("format", "")).startswith(FORMAT.split("/")[0] + "/")


# -- the runtime pieces ---------------------------------------------------------------------------

def _runtime(arch: str) -> tuple[str, Path, dict[str, Path]]:
    """(C++ compiler, tvm-ffi include dir, {library name: path}) for `arch`."""
    if arch == "aarch64":
        from .arm64 import aarch64_runtime_dir, require_tool
        rt = aarch64_runtime_dir()
        return require_tool("aarch64-linux-gnu-g++"), rt / "include", {n: rt / "lib" / n for n in RUNTIME_LIBS}
    if arch != platform.machine():
        raise UserError(f"tcc cannot bundle a {arch} artifact on this {platform.machine()} host",
                        "bundle x86_64 artifacts here, or arm64 ones (cross-compiled)")
    import scipy_openblas32
    import tvm
    import tvm_ffi
    tvm_lib, ffi_dir = Path(tvm.__file__).parent / "lib", Path(tvm_ffi.__file__).parent
    libs = {"libtvm_runtime.so": tvm_lib / "libtvm_runtime.so", "libtvm_ffi.so": ffi_dir / "lib" / "libtvm_ffi.so",
            "libscipy_openblas.so": Path(scipy_openblas32.get_lib_dir()) / "libscipy_openblas.so"}
    cxx = shutil.which("g++")
    if cxx is None:
        raise UserError("a bundle needs the C++ compiler g++, which is not installed", "apt-get install g++")
    return cxx, ffi_dir / "include", libs


def native_tools(arch: str) -> Path:
    """The compiled C API and tools for `arch` (see the module doc)."""
    from tcc import progress
    from tcc.store import cache_dir
    cxx, include, libs = _runtime(arch)
    versions = [metadata.version(p) for p in ("apache-tvm", "apache-tvm-ffi", "scipy-openblas32")]
    key = hashlib.sha256(b"".join((NATIVE / s).read_bytes() for s in SOURCES)
                         + json.dumps([arch, cxx, CXXFLAGS, versions]).encode()).hexdigest()[:24]
    out = cache_dir() / "bundle-tools" / f"{arch}-{key}"
    if (out / "bin" / "tcc-generate").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        (tmp / "lib").mkdir()
        (tmp / "bin").mkdir()
        for name in ("libtvm_runtime.so", "libtvm_ffi.so"):  # to link against (not kept)
            os.symlink(libs[name], tmp / name)
        steps = [(["-fPIC", "-shared", str(NATIVE / "tcc_api.cc"), "-o", str(tmp / "lib" / "libtcc.so"), f"-L{tmp}",
                   "-Wl,--no-as-needed", "-ltvm_runtime", "-ltvm_ffi", "-Wl,--as-needed", "-Wl,-rpath,$ORIGIN"], "libtcc.so")]
        steps += [([str(NATIVE / f"{src}.cc"), "-o", str(tmp / "bin" / tool), f"-L{tmp / 'lib'}", f"-L{tmp}", "-ltcc",
                    "-Wl,-rpath,$ORIGIN/../lib", "-Wl,-rpath-link," + str(tmp)], tool)
                  for src, tool in (("tcc_run", "tcc-run"), ("tcc_generate", "tcc-generate"))]
        for args, what in steps:
            with progress.status(f"compiling {what} for {arch}"):
                r = subprocess.run([cxx, *CXXFLAGS, f"-I{include}", f"-I{NATIVE}", *args], capture_output=True, text=True)
            if r.returncode != 0:
                raise InternalError(f"compiling {what} for {arch} failed:\n{r.stderr[-4000:]}")
        for name in ("libtvm_runtime.so", "libtvm_ffi.so"):
            (tmp / name).unlink()
        try:
            tmp.rename(out)
        except OSError:  # another process got there first: keep theirs
            if not (out / "bin" / "tcc-generate").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# -- the bundle -----------------------------------------------------------------------------------

def spec_lines(art: Path, manifest: dict) -> list[str]:
    """tcc-bundle.spec (native/tcc_api.cc's header says what each line means)."""
    files = manifest.get("files", {})
    lines = [f"sha256 {where} {files[name]}" for name, where in (("model.so", "lib/model.so"),
                                                                 ("weights.safetensors", "weights.safetensors"))]
    if manifest.get("target", {}).get("arch") == "x86_64":  # checked against /proc/cpuinfo at tcc_open
        lines += [f"cpu {f}" for f in manifest["target"].get("cpu_features", [])]
    weights = art / "weights.safetensors"
    inputs, outputs = manifest["inputs"], manifest["outputs"]
    lines += [f"range {d['name']} {d['range'][0]} {d['range'][1]}" for d in inputs if d.get("range")]
    lines += _param_lines(weights, list(manifest["params"]))
    from tcc.ir.program import TensorSpec
    for kind, specs in (("input", inputs), ("output", outputs)):
        specs = [TensorSpec.from_json(d) for d in specs]
        lines += [_spec_line(kind, s.name, s.dtype, o, _nbytes(s), s.shape) for s, o in zip(specs, _layout(specs))]
    gen = manifest.get("generation")
    if gen:
        gen = {**gen, "functions": {n: f for n, f in gen["functions"].items() if _bundled(n)}}
        m = {**manifest, "generation": gen}
        functions = _function_specs(m)
        lines.append(f"vocab {functions['decode'][1][0].shape[-1]}")
        lines.append(f"context {gen['max_context']} {gen['prefill_len']}")
        lines += [f"eos {t}" for t in gen.get("eos_token_ids") or []]
        lines += _generation_lines(weights, m, functions)
    return lines


def _bundled(function: str) -> bool:
    """The generation entry points a bundle carries: prefill, decode, and speculative decoding's verify
    entries (`verify`, `verify4`: tcc_verify); not a draft program's (the C API has no draft yet)."""
    return function in GENERATION_FUNCTIONS or re.fullmatch(r"verify\d*", function) is not None


def make_bundle(artifact_dir, out, force: bool = False) -> dict:
    """Write the bundle of the artifact at `artifact_dir` to `out` (see the module doc)."""
    from tcc.version import __version__
    art = Path(artifact_dir)
    manifest = read_manifest(art)
    target = manifest.get("target", {})
    if manifest.get("backend") == "onnxruntime":
        raise UserError(f"{art} is an ONNX Runtime artifact: a bundle holds a TVM library",
                        "compile with the default backend (tvm) to bundle it")
    if target.get("device") == "cuda":
        raise UserError(f"{art} is a CUDA artifact: CUDA bundles wait for tcc's GPU runtime (docs/DEPLOY.md)",
                        "bundle an x86 or arm64 artifact")
    arch = target.get("arch")
    if arch not in ("x86_64", "aarch64"):
        raise UserError(f"{art} was compiled for {arch!r}; bundles are made for x86_64 and aarch64")
    verify_files(art, manifest)
    tools = native_tools(arch)
    _, _, libs = _runtime(arch)
    model_so = (art / "model.so").read_bytes()
    needed = [n for n in RUNTIME_LIBS if n != "libscipy_openblas.so" or n.encode() in model_so]
    with Staging(out, force, what=WHAT, tcc_wrote=is_bundle) as st:
        d = st.dir
        for sub in ("lib/pkgconfig", "include", "bin"):
            (d / sub).mkdir(parents=True)
        shutil.copyfile(art / "model.so", d / "lib" / "model.so")
        for n in needed:
            shutil.copyfile(libs[n], d / "lib" / n)
        shutil.copy(tools / "lib" / "libtcc.so", d / "lib" / "libtcc.so")
        shutil.copyfile(NATIVE / "tcc.h", d / "include" / "tcc.h")
        tools_out = ["tcc-run"] + (["tcc-generate"] if manifest.get("generation") else [])
        for tool in tools_out:
            shutil.copy(tools / "bin" / tool, d / "bin" / tool)
        shutil.copyfile(art / "weights.safetensors", d / "weights.safetensors")
        shutil.copyfile(art / "manifest.json", d / "manifest.json")
        if (art / "tokenizer").is_dir():
            shutil.copytree(art / "tokenizer", d / "tokenizer")
        (d / "tcc-bundle.spec").write_text("\n".join(spec_lines(art, manifest)) + "\n")
        (d / "lib" / "pkgconfig" / "tcc.pc").write_text(PC.format(version=__version__, model=manifest.get("source", {}).get("name", art.name) if isinstance(manifest.get("source"), dict) else art.name))
        (d / "README.md").write_text(README.format(arch=arch, target=target.get("name"), tools=", ".join(f"bin/{t}" for t in tools_out)))
        runtime = {n: (d / "lib" / n).stat().st_size for n in [*needed, "libtcc.so"]}
        files = {f.relative_to(d).as_posix(): sha256(f) for f in sorted(d.rglob("*")) if f.is_file()}
        info = {"format": FORMAT, "arch": arch, "target": target.get("name"), "tcc": __version__,
                "runtime_bytes": sum(runtime.values()), "runtime_libraries": runtime, "files": files}
        (d / "tcc-bundle.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        total = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
        path = st.commit()
    return {"bundle": str(path), "arch": arch, "bytes": total, "runtime_bytes": info["runtime_bytes"],
            "files": sorted(files)}


PC = """prefix=${{pcfiledir}}/../..
libdir=${{prefix}}/lib
includedir=${{prefix}}/include

Name: tcc
Description: tcc bundle runtime: the C API (tcc.h) of {model}
Version: {version}
Libs: -L${{libdir}} -Wl,-rpath,${{libdir}} -ltcc
Cflags: -I${{includedir}}
"""

README = """# tcc bundle ({target}, {arch})

A compiled model and the native runtime it needs: no Python. Copy this directory anywhere;
the binaries and libraries find each other through $ORIGIN-relative rpaths. Needs only the C and
C++ runtime libraries of the system (libc, libstdc++, libgcc_s, libm).

Tools: {tools}
  bin/tcc-run --describe                      the inputs and outputs
  bin/tcc-run NAME=FILE.npy ... -o OUTDIR     run once; writes OUTDIR/<output>.npy
  bin/tcc-generate --ids 1,2,3 --max-new-tokens 32 [--temperature T --top-k K --top-p P --seed S]
                                              causal LMs: prints the new token ids (the application
                                              tokenizes; tokenizer/ holds the model's tokenizer files)

Link your own program against the C API (include/tcc.h):
  export PKG_CONFIG_PATH=$PWD/lib/pkgconfig
  cc app.c $(pkg-config --cflags --libs tcc) -o app
  ./app            # tcc_open("path/to/this/directory", &model)

tcc_open checks lib/model.so and weights.safetensors against their sha256 in manifest.json.
Errors are tcc_status codes with tcc_last_error() messages, never an abort.
"""
