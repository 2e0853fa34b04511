"""Compile tcc's hand-written CPU kernels (cpu_kernels.cc, quant_kernels.cc, sparse_kernels.cc,
bf16_kernels.cc, rotate_kernels.cc) into
one object a TVM module links in.

Contract:
  build_kernels(arch, out_dir, cflags=None) -> KernelLib
    arch     "x86_64" or "aarch64"; the host's own arch compiles with g++, the other one with the
             Debian cross compiler ({arch}-linux-gnu-g++). A missing compiler is a UserError naming
             the Debian package.
    cflags   target flags, e.g. ["-march=x86-64-v3"] or ["-march=armv8.2-a+dotprod"]; default
             -march=native on an x86-64 host (x86-64-v2 when cross-compiling), -march=armv8-a for
             aarch64. They come after the fixed flags (-O3 -fPIC -std=c++17 ...).
    Each source compiles on its own and a relocatable link (`g++ -r`) joins them into one object.
    The object is cached under $TCC_CACHE/kernels (default ~/.cache/tcc/kernels), keyed by a hash of
    the kernel sources, the flags, the compiler's identity (and, for -march=native, the CPU features
    it resolves to) and the versions of the tvm-ffi and OpenBLAS headers; it is written atomically
    (temp file + rename) and copied into out_dir as tcc_kernels_{arch}.o.

  KernelLib
    .object       Path of the object in out_dir
    .functions    the exported kernel names (TVM_FFI_DLL_EXPORT_TYPED_FUNC in the sources), for
                  tvm.runtime.load_static_library(str(lib.object), list(lib.functions))
    .link_options()  the options export_library(path, options=...) needs to link the object: OpenBLAS
                  (-L, -l:libscipy_openblas.so as DT_NEEDED, rpath $ORIGIN and its directory) and
                  libstdc++. x86_64 uses the scipy-openblas32 wheel's library; aarch64 the aarch64
                  runtime directory (backends/tvm/arm64.py: aarch64_runtime_dir(), fetched on first
                  use). The kernels also call TVMBackendParallelLaunch and the tvm-ffi C API; those
                  stay undefined in the library and resolve from the TVM runtime that loads it.

CUDA (the cuda targets): the kernels in cuda/*.cu, compiled with nvcc for each GPU architecture.
  build_cuda_kernels(out_dir, archs=("sm_80", "sm_90")) -> KernelLib (arch "cuda")
    Each .cu compiles with nvcc -c (host code for x86-64, device code as SASS for every arch in
    one fatbin), a relocatable link joins them, and objcopy --strip-unneeded drops the local
    symbols that name nvcc's temporary files (so a rebuild is byte-identical). Cached like the CPU
    object, keyed by the CUDA sources, the archs and nvcc's version. link_options() adds libcudart
    (shared: the TVM CUDA runtime that loads the library needs it anyway). Kernel names are the
    TVM_FFI_DLL_EXPORT_TYPED_FUNC in the .cu files (cuda_functions()).
  find_nvcc() -> path      $CUDA_HOME/bin/nvcc, nvcc on PATH, or /usr/local/cuda/bin/nvcc;
                           a UserError saying how to install it when there is none
  nvcc_version() -> str    e.g. "13.0.88"
  cuda_lib_dir() -> Path   where libcudart is (nvcc --dryrun's library path)
  run_nvcc(args, what)     nvcc with args; a failure is a UserError quoting nvcc's first error
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from tcc.errors import InternalError, UserError

HERE = Path(__file__).resolve().parent
SOURCES = (HERE / "cpu_kernels.cc", HERE / "quant_kernels.cc", HERE / "sparse_kernels.cc", HERE / "bf16_kernels.cc",
           HERE / "rotate_kernels.cc")
ARCHES = ("x86_64", "aarch64")
CUDA_DIR = HERE / "cuda"
CUDA_SOURCES = (CUDA_DIR / "quant_gemm.cu", CUDA_DIR / "sparse24_gemm.cu")
CUDA_ARCHS = ("sm_80", "sm_90")
NVCC_FLAGS = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-DNDEBUG"]
BASE_FLAGS = ["-O3", "-fPIC", "-std=c++17", "-DNDEBUG",
              "-fopenmp-simd",        # `#pragma omp simd` reductions in the softmax, no OpenMP runtime
              "-fno-trapping-math",   # lets GCC if-convert the branch-free exp so it vectorizes
              "-frandom-seed=tcc_kernels"]
DEBIAN_PACKAGE = {"g++": "g++", "aarch64-linux-gnu-g++": "g++-aarch64-linux-gnu",
                  "x86_64-linux-gnu-g++": "g++-x86-64-linux-gnu"}


@dataclasses.dataclass(frozen=True)
class KernelLib:
    arch: str
    object: Path
    functions: tuple[str, ...]

    def link_options(self) -> list[str]:
        if self.arch == "cuda":
            lib_dir = cuda_lib_dir()
            return [f"-L{lib_dir}", f"-Wl,-rpath,{lib_dir}",
                    "-Wl,--push-state,--no-as-needed", "-lcudart", "-lstdc++", "-Wl,--pop-state"]
        lib_dir = _blas_lib_dir(self.arch)
        # export_library puts options before the objects: --no-as-needed keeps both libraries.
        return [f"-L{lib_dir}", f"-Wl,-rpath,$ORIGIN:{lib_dir}",
                "-Wl,--push-state,--no-as-needed", "-l:libscipy_openblas.so", "-lstdc++", "-Wl,--pop-state"]


def build_kernels(arch: str, out_dir: Path, cflags: list[str] | None = None, source_dir: Path | None = None) -> KernelLib:
    """The kernel object for `arch` (cached by sources, compiler and flags). `source_dir`: a folder holding
    the same files as this one (another version of them: benchmarks/gemv_ab.py times variants this way)."""
    if arch not in ARCHES:
        raise UserError(f"no CPU kernels for architecture '{arch}'", f"use one of: {', '.join(ARCHES)}")
    src = Path(source_dir) if source_dir is not None else HERE
    cxx = _compiler(arch)
    flags = BASE_FLAGS + list(cflags if cflags is not None else _default_cflags(arch))
    includes = _include_dirs()
    cached = _cache_dir() / f"tcc_kernels-{arch}-{_key(arch, cxx, flags, src)}.o"
    if not cached.exists():
        _compile(cxx, flags, includes, cached, user_flags=cflags, src=src)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    obj = out_dir / f"tcc_kernels_{arch}.o"
    _atomic_copy(cached, obj)
    return KernelLib(arch, obj, exported_functions())


def exported_functions(sources=SOURCES) -> tuple[str, ...]:
    return tuple(name for src in sources
                 for name in re.findall(r"^TVM_FFI_DLL_EXPORT_TYPED_FUNC\((\w+),", src.read_text(), re.M))


def cuda_functions() -> tuple[str, ...]:
    return exported_functions(CUDA_SOURCES)


def build_cuda_kernels(out_dir: Path, archs=CUDA_ARCHS) -> KernelLib:
    nvcc = find_nvcc()
    gencode = [f for a in archs for f in ("-gencode", f"arch=compute_{a[3:]},code={a}")]
    flags = NVCC_FLAGS + gencode + [f"-I{d}" for d in _include_dirs()[:2]]
    h = hashlib.sha256()
    for f in sorted(CUDA_DIR.glob("*.cu")) + sorted(CUDA_DIR.glob("*.cuh")):
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    import tvm_ffi
    h.update("\0".join([nvcc_version(), *flags, tvm_ffi.__version__]).encode())
    cached = _cache_dir() / f"tcc_cuda_kernels-{'-'.join(archs)}-{h.hexdigest()[:20]}.o"
    if not cached.exists():
        tmp = _temp_file(cached)
        with tempfile.TemporaryDirectory(dir=cached.parent) as work:
            objects = [str(Path(work) / f"{src.stem}.o") for src in CUDA_SOURCES]
            for src, obj in zip(CUDA_SOURCES, objects):
                run_nvcc([*flags, "-c", src.name, "-o", obj], f"the CUDA kernels ({src.name})", cwd=CUDA_DIR)
            cmd = ["g++", "-r", "-nostdlib", *objects, "-o", tmp]
            _check(subprocess.run(cmd, capture_output=True, text=True), cmd, "the CUDA kernel objects", "g++", None, tmp)
            # local symbols name nvcc's temporary files (tmpxft_<pid>_...): dropped, so a rebuild is byte-identical
            cmd = ["objcopy", "--strip-unneeded", tmp]
            _check(subprocess.run(cmd, capture_output=True, text=True), cmd, "the CUDA kernel object", "objcopy", None, tmp)
        os.replace(tmp, cached)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    obj = out_dir / "tcc_kernels_cuda.o"
    _atomic_copy(cached, obj)
    return KernelLib("cuda", obj, cuda_functions())


def find_nvcc() -> str:
    candidates = [Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc"] if os.environ.get("CUDA_HOME") else []
    candidates += [Path(p) for p in (shutil.which("nvcc"),) if p] + [Path("/usr/local/cuda/bin/nvcc")]
    for c in candidates:
        if c.exists():
            return str(c)
    raise UserError("the cuda targets need nvcc (the CUDA toolkit), which is not installed",
                    "install the CUDA toolkit (12.5 or later) and put nvcc on PATH or set CUDA_HOME")


@functools.lru_cache(maxsize=1)
def cuda_lib_dir() -> Path:
    """The directory of libcudart that nvcc links with (from `nvcc --dryrun`: nvcc may be a wrapper)."""
    out = subprocess.run([find_nvcc(), "--dryrun", "-c", "x.cu"], capture_output=True, text=True).stderr
    dirs = [d for d in re.findall(r'"-L([^"]+)"', out) if not d.rstrip("/").endswith("stubs")]
    if not dirs:
        raise UserError("cannot find the CUDA runtime library directory from nvcc --dryrun",
                        "check the CUDA toolkit installation (libcudart.so)")
    return Path(dirs[-1]).resolve()


def nvcc_version() -> str:
    out = _run([find_nvcc(), "--version"])
    m = re.search(r"V(\d+\.\d+\.\d+)", out)
    return m.group(1) if m else out.strip().splitlines()[-1]


def run_nvcc(args: list[str], what: str, cwd: Path | None = None) -> None:
    proc = subprocess.run([find_nvcc(), *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if "error" in line] or proc.stderr.splitlines()[-1:]
        raise UserError(f"nvcc {nvcc_version()} rejected {what}: {errors[0].strip() if errors else 'no message'}",
                        "use CUDA 12.5 or later (nvcc), or report it to tcc's maintainers")


# ---------------------------------------------------------------------------------------------

def _compiler(arch: str) -> str:
    cxx = "g++" if arch == platform.machine() else f"{arch}-linux-gnu-g++"
    if shutil.which(cxx) is None:
        raise UserError(f"the C++ compiler {cxx} is not installed (needed for the {arch} kernels)",
                        f"apt-get install {DEBIAN_PACKAGE[cxx]}")
    return cxx


def _default_cflags(arch: str) -> list[str]:
    if arch == "aarch64":
        return ["-march=armv8-a"]
    return ["-march=native"] if platform.machine() == "x86_64" else ["-march=x86-64-v2"]


def _include_dirs() -> list[str]:
    import scipy_openblas32
    import tvm_ffi.libinfo
    return [tvm_ffi.libinfo.find_include_path(), tvm_ffi.libinfo.find_dlpack_include_path(),
            scipy_openblas32.get_include_dir()]


def _cache_dir() -> Path:
    root = Path(os.environ.get("TCC_CACHE") or Path.home() / ".cache" / "tcc").expanduser()
    d = root / "kernels"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _key(arch: str, cxx: str, flags: list[str], src: Path = HERE) -> str:
    import scipy_openblas32
    import tvm_ffi
    h = hashlib.sha256()
    h.update(" ".join(s.name for s in SOURCES).encode() + b"\0")  # which sources the object holds
    for f in sorted(src.glob("*.cc")) + sorted(src.glob("*.h")):
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    h.update("\0".join([arch, os.path.realpath(shutil.which(cxx)), _run([cxx, "--version"]), *flags,
                        tvm_ffi.__version__, scipy_openblas32.__version__]).encode())
    if any("native" in f for f in flags):  # what "native" means on this CPU
        h.update(_run([cxx, *flags, "-Q", "--help=target"]).encode())
    return h.hexdigest()[:20]


def _run(cmd: list[str]) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def _compile(cxx: str, flags: list[str], includes: list[str], dest: Path, user_flags: list[str] | None,
             src: Path = HERE) -> None:
    tmp = _temp_file(dest)
    with tempfile.TemporaryDirectory(dir=dest.parent) as work:
        objects = [str(Path(work) / f"{s.stem}.o") for s in SOURCES]
        for s, obj in zip(SOURCES, objects):
            # Run in the source directory with a relative file name, and map the include directories
            # (named by __FILE__ in error messages), so no absolute path enters the object.
            cmd = [cxx, *flags, *(f"-I{d}" for d in includes), *(f"-ffile-prefix-map={d}=include" for d in includes),
                   "-c", s.name, "-o", obj]
            _check(subprocess.run(cmd, cwd=src, capture_output=True, text=True), cmd, s.name, cxx, user_flags, tmp)
        cmd = [cxx, "-r", "-nostdlib", *objects, "-o", tmp]
        _check(subprocess.run(cmd, capture_output=True, text=True), cmd, "the kernel objects", cxx, None, tmp)
    os.replace(tmp, dest)


def _check(proc: subprocess.CompletedProcess, cmd: list[str], what: str, cxx: str, user_flags: list[str] | None,
           tmp: str) -> None:
    if proc.returncode == 0:
        return
    os.unlink(tmp)
    errors = [line for line in proc.stderr.splitlines() if "error" in line] or proc.stderr.splitlines()[-1:]
    if user_flags:
        raise UserError(f"{cxx} rejected the kernel flags {' '.join(user_flags)}: {errors[0] if errors else ''}",
                        "check the C++ flags (cflags) of the target")
    raise InternalError(f"{cxx} could not compile {what}:\n{proc.stderr[-3000:]}\ncommand: {' '.join(cmd)}")


def _atomic_copy(src: Path, dest: Path) -> None:
    tmp = _temp_file(dest)
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


def _temp_file(dest: Path) -> str:
    """A new file beside dest, readable by all like any build output, to os.replace() onto dest."""
    fd, tmp = tempfile.mkstemp(suffix=dest.suffix, dir=dest.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)
    return tmp


def _blas_lib_dir(arch: str) -> Path:
    if arch == "aarch64":
        from tcc.backends.tvm.arm64 import aarch64_runtime_dir
        return aarch64_runtime_dir() / "lib"
    import scipy_openblas32
    return Path(scipy_openblas32.get_lib_dir())
