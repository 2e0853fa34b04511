"""The device check of tcc's CUDA kernels (issue 21): packed here, run on a GPU machine.

tcc's hand-written CUDA kernels (backends/kernels/cuda) were compiled with nvcc and replayed on the
CPU (emulate.cc), never run on a GPU. This script is the check for the first machine that has one
(H100/H200, CUDA 13 nvcc, PyTorch, Python 3.12, no TVM, no network, <= 64 MiB of files, minutes):

    python benchmarks/cuda_device_check.py pack --out build/cuda-check      # here: assemble the files
    bash build/cuda-check/cuda_device_check.sh RESULTS_DIR                  # there: build, check, time

pack  copies what travels into one directory and checks its size (< 64 MiB): this script and its
      .sh wrapper, the kernels' sources (tcc_cuda.cuh, launch.cuh, quant_gemm.cu, sparse24_gemm.cu),
      the reference ops and layouts they are checked against (tcc/ir/ops.py, tcc/errors.py,
      backends/kernels/quant_layout.py, backends/kernels/cuda/layout.py, byte for byte), the
      apache-tvm-ffi wheel for the GPU machine's Python (its headers, libtvm_ffi.so and the Python
      package that loads the kernels' library; from $TCC_CACHE/wheels, else `pip download`), and
      pack.json (nvcc flags, file hashes, the commit).
run   on the GPU machine (`run --results DIR`): builds the kernels with nvcc into one shared library
      for the device's arch (tcc's nvcc flags, the same launchers TVM calls), loads it with tvm_ffi
      and calls the launchers on torch CUDA tensors:
      * correctness on MiniLM's and SmolLM2's linear shapes (M = 128 and 1) and on odd shapes
        (partial blocks, K not a multiple of the step), against tcc's reference ops run on the CPU
        (tcc/ir/ops.py: the definition): dense_a8w8 bit-exact (dynamic/static x sym/asym), dense_w4
        within 1e-5 of max|ref| (the CPU replay's tolerance; tensor-core and CUDA-core paths),
        dense_sp24 within 2e-3 of max|ref| of the float32 reference (the replay's), its distance
        to the float64 product of its float16 operands reported;
      * speed at M = 128 (and the int4 GEMV at M = 1) against PyTorch on the same shapes: fp16
        cuBLAS (F.linear), fp32 (no TF32), torch._int_mm (int8 x int8 -> int32, no quantization),
        semi-structured 2:4 fp16 where torch supports it. Each is a CUDA graph of calls cycling
        through enough copies of the weights (>= 256 MiB) that they come from HBM, not L2; the
        time is per call. GB/s = bytes of weights + x + out per call, TFLOP/s = 2 M N K per call;
        shares of the chip's peak (datasheet table below, and the measured device-to-device copy).
      Prints one table and writes results.json and table.md to the results directory.
cpu   (`run --cpu-replay`) the same cases on this machine with no GPU: the kernels' outputs come
      from the CPU replay (backends/kernels/cuda/emulate.py; a repository checkout only) and go
      through the same comparisons, so the run on the GPU is not the script's first run.

Targets (issue 21): every kernel correct on sm_90; the W8A8 GEMM >= 1.5x fp16 cuBLAS at M = 128 on
MiniLM's and SmolLM2's shapes; the int4 GEMV >= 70 % of the memory bandwidth. A whole compiled
artifact is not run by this check: it needs TVM's runtime (libtvm_runtime + its CUDA module) driven
from Python 3.12, which this pack does not carry yet (docs/CUDA.md).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import types
import zipfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
LIMIT_BYTES = 64 * 2**20
WHEEL = ("apache-tvm-ffi", "0.1.14.post1")  # the tvm-ffi that tcc's TVM 0.27 builds with
# file in the pack: its source in the repository
SOURCES = {
    "kernels/tcc_cuda.cuh": "backends/kernels/cuda/tcc_cuda.cuh",
    "kernels/launch.cuh": "backends/kernels/cuda/launch.cuh",
    "kernels/quant_gemm.cu": "backends/kernels/cuda/quant_gemm.cu",
    "kernels/sparse24_gemm.cu": "backends/kernels/cuda/sparse24_gemm.cu",
    "tcc_src/errors.py": "tcc/errors.py",
    "tcc_src/ops.py": "tcc/ir/ops.py",
    "tcc_src/quant_layout.py": "backends/kernels/quant_layout.py",
    "tcc_src/layout.py": "backends/kernels/cuda/layout.py",
    "cuda_device_check.py": "benchmarks/cuda_device_check.py",
}
SH = """#!/usr/bin/env bash
# tcc's CUDA device check (issue 21). Usage: bash cuda_device_check.sh RESULTS_DIR [--quick]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:?usage: cuda_device_check.sh RESULTS_DIR [--quick]}"; shift
mkdir -p "$out"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
python3 "$here/cuda_device_check.py" run --results "$out" "$@" 2>&1 | tee "$out/log.txt"
exit "${PIPESTATUS[0]}"
"""
# datasheet peaks (dense; sparse tensor-core peaks are 2x): bytes/s, fp16 FLOP/s, int8 OP/s
PEAKS = [  # (substring of the device name, HBM B/s, fp16 tensor FLOP/s, int8 tensor OP/s)
    ("H200", 4.8e12, 989e12, 1979e12),
    ("H100 NVL", 3.9e12, 835e12, 1671e12),
    ("H100 PCIe", 2.0e12, 756e12, 1513e12),
    ("H100", 3.35e12, 989e12, 1979e12),     # SXM5 (HBM3)
    ("A100-SXM4-80GB", 2.039e12, 312e12, 624e12),
    ("A100", 1.555e12, 312e12, 624e12),
]
MODELS = {  # model: [(layer, N, K, int4 group)] of its linears (q/k/v and gate/up fused, as tcc lowers them)
    "minilm": [("qkv", 1152, 384, 128), ("attn.out", 384, 384, 128), ("ffn.up", 1536, 384, 128),
               ("ffn.down", 384, 1536, 128)],
    "smollm2": [("qkv", 960, 576, 96), ("attn.o", 576, 576, 96), ("mlp.gate_up", 3072, 576, 96),
                ("mlp.down", 576, 1536, 128), ("lm_head", 49152, 576, 96)],
}
ODD = [(5, 37, 70), (70, 130, 97), (65, 64, 64), (1, 16, 8)]  # partial blocks, K not a multiple of the step


# ---------------------------------------------------------------------------------------------
# The reference ops: tcc's own files, loaded without the rest of tcc (no TVM there)
# ---------------------------------------------------------------------------------------------

def load_reference(src: Path) -> types.SimpleNamespace:
    """tcc/ir/ops.py, tcc/errors.py and the two layout modules from `src`, as modules under a `tcc`
    package that holds nothing else (ops.py registers the tcc:: torch ops)."""
    if "tcc" not in sys.modules:
        pkg = types.ModuleType("tcc")
        pkg.__path__ = []
        sys.modules["tcc"] = pkg
    mods = {}
    for name in ("errors", "ops", "quant_layout", "layout"):
        full = f"tcc.{name}"
        if full not in sys.modules:
            spec = importlib.util.spec_from_file_location(full, src / f"{name}.py")
            mod = importlib.util.module_from_spec(spec)
            sys.modules[full] = mod
            spec.loader.exec_module(mod)
        mods[name] = sys.modules[full]
    return types.SimpleNamespace(**mods)


# ---------------------------------------------------------------------------------------------
# Cases: inputs (seeded, on the CPU), the launcher's arguments, the reference, the comparison
# ---------------------------------------------------------------------------------------------

@dataclass
class Case:
    op: str        # a8w8 | w4 | sp24
    model: str     # minilm | smollm2 | odd
    layer: str
    m: int
    n: int
    k: int
    variant: str   # a8w8: sym | asym | static-sym | static-asym; w4: sym | asym with its group; sp24: -
    group: int = 0
    timed: bool = False

    @property
    def name(self) -> str:
        return f"{self.op} {self.model}.{self.layer} {self.m}x{self.n}x{self.k} {self.variant}"

    @property
    def seed(self) -> int:
        return int(hashlib.sha256(self.name.encode()).hexdigest()[:8], 16)


def cases(quick: bool = False) -> list[Case]:
    out = []
    for model, layers in MODELS.items():
        for layer, n, k, group in layers:
            if quick and layer not in ("qkv", "ffn.down", "mlp.down"):
                continue
            out.append(Case("a8w8", model, layer, 128, n, k, "sym", timed=True))
            out.append(Case("w4", model, layer, 128, n, k, f"sym g{group}", group, timed=True))
            out.append(Case("w4", model, layer, 1, n, k, f"sym g{group}", group, timed=True))
            out.append(Case("sp24", model, layer, 128, n, k, "-", timed=True))
            if layer == "qkv":  # the other variants once per model
                out += [Case("a8w8", model, layer, 128, n, k, v) for v in ("asym", "static-sym", "static-asym")]
                out += [Case("a8w8", model, layer, 1, n, k, "sym"), Case("sp24", model, layer, 1, n, k, "-")]
                out.append(Case("w4", model, layer, 128, n, k, f"asym g{group}", group))
    for m, n, k in ODD:
        out += [Case("a8w8", "odd", "-", m, n, k, v) for v in ("sym", "asym", "static-asym")]
        g = 16 if k % 16 == 0 else 2
        if k % 2 == 0:  # int4 takes even K
            out += [Case("w4", "odd", "-", m, n, k, f"{s} g{g}", g) for s in ("sym", "asym")]
        out.append(Case("sp24", "odd", "-", m, n, k, "-"))
    return out


def build_case(c: Case, ref: types.SimpleNamespace) -> dict:
    """Inputs for case `c` on the CPU: {"fn": launcher, "args": [...] (torch CPU tensors and bools,
    the output last), "ref": float32 [M, N], "emulate": callable -> float32 [M, N] (the CPU replay's
    arguments), "weights": the packed weight tensors (copied to rotate them when timing),
    "fp_weight": a float32 [N, K] weight the PyTorch baselines multiply, "q_weight": int8 [N, K]}."""
    import numpy as np
    import torch
    g = torch.Generator().manual_seed(c.seed)
    x = torch.randn(c.m, c.k, generator=g)
    b = torch.randn(c.n, generator=g)
    d = {"bytes_x": x.numel() * 4, "bytes_out": c.m * c.n * 4, "b": b}
    if c.op == "a8w8":
        qw = torch.randint(-127, 128, (c.n, c.k), generator=g, dtype=torch.int8)
        w_scale = torch.rand(c.n, generator=g) * 0.01 + 1e-3
        asym, static = "asym" in c.variant, c.variant.startswith("static")
        x_scale, x_zero = (torch.tensor([0.02]), torch.tensor([7.0])) if static else (None, None)
        packed, wsum = (torch.from_numpy(a) for a in ref.quant_layout.pack_a8w8(qw))
        fn = "tcc_cuda_dense_a8w8_static_f32" if static else "tcc_cuda_dense_a8w8_f32"
        args = [x, packed, wsum, w_scale, b] + ([x_scale, x_zero] if static else []) + [asym]
        d.update(fn=fn, args=args, weights=[packed],
                 ref=ref.ops.dense_a8w8(x, qw, w_scale, b, x_scale, x_zero, asym),
                 fp_weight=qw.float() * w_scale[:, None], q_weight=qw,
                 emulate=lambda em: em.dense_a8w8(x.numpy(), packed.numpy(), wsum.numpy(), w_scale.numpy(), b.numpy(),
                                                  None if x_scale is None else x_scale.numpy(),
                                                  None if x_zero is None else x_zero.numpy(), asym))
    elif c.op == "w4":
        codes = torch.randint(0, 16, (c.n, c.k), generator=g, dtype=torch.uint8)
        qw = ref.ops.pack_int4(codes)
        scale = torch.rand(c.n, c.k // c.group, generator=g) * 0.1 + 0.01
        zero = (torch.randint(0, 16, (c.n, c.k // c.group), generator=g, dtype=torch.uint8)
                if c.variant.startswith("asym") else None)
        packed, scale_t, zero_t = (torch.from_numpy(a) for a in ref.quant_layout.pack_w4(qw, scale, zero))
        d.update(fn="tcc_cuda_dense_w4_f32", args=[x, packed, scale_t, zero_t, b], weights=[packed, scale_t, zero_t],
                 ref=ref.ops.dense_w4(x, qw, scale, zero, c.group, b),
                 fp_weight=ref.ops.dequantize_w4(qw, scale, zero, c.group),
                 emulate=lambda em: em.dense_w4(x.numpy(), packed.numpy(), scale_t.numpy(), zero_t.numpy(), c.n,
                                                b.numpy())[0])
    elif c.op == "sp24":
        kp = -(-c.k // 4) * 4
        chunks = torch.zeros(c.n, kp)
        chunks[:, :c.k] = torch.randn(c.n, c.k, generator=g)
        chunks = chunks.reshape(c.n, kp // 4, 4)
        chunks.scatter_(-1, chunks.abs().argsort(dim=-1)[..., :2], 0.0)  # keep the 2 largest of every 4
        w = chunks.reshape(c.n, kp)[:, :c.k].contiguous()
        values, meta = ref.layout.compress_24(w.numpy())
        values, meta16 = torch.from_numpy(values), torch.from_numpy(meta.view(np.int16))
        f16 = lambda t: t.half().double()  # noqa: E731
        d.update(fn="tcc_cuda_dense_sp24_f32", args=[x, values, meta16, b], weights=[values, meta16],
                 ref=torch.nn.functional.linear(x, w, b),
                 ref_f16=(f16(x) @ f16(w).T + b.double()).float(), fp_weight=w,
                 emulate=lambda em: em.dense_sp24(x.numpy(), values.numpy(), meta, c.n, b.numpy()))
    else:
        raise ValueError(f"unknown op {c.op}")
    d["bytes_w"] = sum(t.numel() * t.element_size() for t in d["weights"])
    return d


def compare(c: Case, got, d: dict) -> dict:
    """The verdict for one case: kernel output `got` (float32 [M, N], CPU) against the reference."""
    import torch
    ref = d["ref"]
    err = (got - ref).abs()
    scale = float(ref.abs().max()) or 1.0
    row = {"case": c.name, "op": c.op, "shape": [c.m, c.n, c.k], "max_abs_err": float(err.max()),
           "max_rel_err": float(err.max()) / scale, "finite": bool(torch.isfinite(got).all())}
    if c.op == "a8w8":
        row["mismatches"] = int((got.view(torch.int32) != ref.view(torch.int32)).sum())
        row["criterion"] = "bit-exact vs tcc/ir/ops.py dense_a8w8"
        row["ok"] = row["mismatches"] == 0
    elif c.op == "w4":
        row["criterion"] = "max|err| <= 1e-5 max|ref| (tcc/ir/ops.py dense_w4)"
        row["ok"] = row["finite"] and row["max_rel_err"] <= 1e-5
    else:
        row["err_vs_f16_operands"] = float((got - d["ref_f16"]).abs().max()) / (float(got.abs().max()) or 1.0)
        row["criterion"] = "max|err| <= 2e-3 max|ref| (float32 linear); f16-operand error reported"
        row["ok"] = row["finite"] and row["max_rel_err"] <= 2e-3
    return row


# ---------------------------------------------------------------------------------------------
# pack (here)
# ---------------------------------------------------------------------------------------------

def repo_root() -> Path:
    root = HERE.parent
    if not (root / "backends" / "kernels" / "cuda" / "quant_gemm.cu").exists():
        raise SystemExit(f"pack runs from a tcc checkout (benchmarks/ beside backends/); {root} is not one")
    return root


def find_wheel(python: str, wheel: str | None) -> Path | None:
    """The apache-tvm-ffi wheel for CPython `python` ("3.12"): `wheel`, else None when `python` is this
    interpreter's (the installed tvm_ffi is copied), else $TCC_CACHE/wheels, else pip download into it."""
    if wheel:
        return Path(wheel)
    if python == f"{sys.version_info.major}.{sys.version_info.minor}":
        return None
    tag = "cp" + python.replace(".", "")
    cache = Path(os.environ.get("TCC_CACHE") or Path.home() / ".cache" / "tcc").expanduser() / "wheels"
    pattern = f"{WHEEL[0].replace('-', '_')}-{WHEEL[1]}-{tag}-{tag}-*manylinux*x86_64*.whl"
    found = sorted(cache.glob(pattern))
    if not found:
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", f"{WHEEL[0]}=={WHEEL[1]}", "--no-deps", "--only-binary=:all:",
               "--python-version", python, "--platform", "manylinux_2_28_x86_64", "-d", str(cache)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(cache.glob(pattern))
        if proc.returncode != 0 or not found:
            raise SystemExit(f"no {WHEEL[0]} {WHEEL[1]} wheel for Python {python}: pip download failed:\n"
                             f"{proc.stderr[-2000:]}\n(give one with --tvm-ffi-wheel)")
    return found[-1]


def unpack_wheel(wheel: Path | None, dest: Path) -> None:
    """The wheel's tvm_ffi package (Python files, core extension, include/, lib/libtvm_ffi.so, dlpack
    headers) into dest/tvm_ffi (wheel None: the installed package); its sources and build files stay out
    (not lib/libtvm_ffi_testing.so: the core extension links it)."""
    skip = ("tvm_ffi/3rdparty/libbacktrace/", "tvm_ffi/src/", "tvm_ffi/cmake")
    if wheel is None:
        import tvm_ffi
        src = Path(tvm_ffi.__file__).parent
        for f in sorted(src.rglob("*")):
            rel = "tvm_ffi/" + f.relative_to(src).as_posix()
            if f.is_file() and not rel.startswith(skip) and "__pycache__" not in rel:
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, dest / rel)
        return
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            if info.filename.startswith("tvm_ffi/") and not info.filename.startswith(skip) and not info.is_dir():
                z.extract(info, dest)
    for lib in (dest / "tvm_ffi" / "lib").glob("*.so"):
        lib.chmod(0o755)


def _installed_tvm_ffi() -> str:
    import tvm_ffi
    return tvm_ffi.__version__


def pack(out: Path, python: str = "3.12", wheel: str | None = None) -> dict:
    root = repo_root()
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / "pack.json").exists():
        raise SystemExit(f"{out} exists and is not a pack of this script: give an empty or new directory")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for dest, src in SOURCES.items():
        (out / dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / src, out / dest)
    (out / "cuda_device_check.sh").write_text(SH)
    (out / "cuda_device_check.sh").chmod(0o755)
    whl = find_wheel(python, wheel)
    unpack_wheel(whl, out / "site")
    sys.path.insert(0, str(root))
    try:
        from backends.kernels.build import NVCC_FLAGS
    finally:
        sys.path.remove(str(root))
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", *SOURCES.values()], cwd=root,
                           capture_output=True, text=True).stdout.strip()
    files = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
    info = {"format": "tcc-cuda-check/1", "commit": commit, "sources_modified": bool(dirty), "python": python,
            "wheel": whl.name if whl else "installed tvm_ffi " + _installed_tvm_ffi(), "nvcc_flags": list(NVCC_FLAGS),
            "sha256": {k: hashlib.sha256((out / k).read_bytes()).hexdigest() for k in SOURCES},
            "bytes": sum(files.values()), "files": len(files)}
    if info["bytes"] >= LIMIT_BYTES:
        raise SystemExit(f"the pack is {info['bytes'] / 2**20:.1f} MiB: more than the 64 MiB that may travel")
    (out / "pack.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


# ---------------------------------------------------------------------------------------------
# run (there)
# ---------------------------------------------------------------------------------------------

def import_tvm_ffi(pack_dir: Path):
    """tvm_ffi from the pack when it was packed for this Python, else the installed one."""
    os.environ.setdefault("TVM_FFI_DISABLE_TORCH_C_DLPACK", "1")  # no JIT build of torch's DLPack addon
    info = json.loads((pack_dir / "pack.json").read_text())
    if info["python"] == f"{sys.version_info.major}.{sys.version_info.minor}":
        sys.path.insert(0, str(pack_dir / "site"))
    import tvm_ffi
    return tvm_ffi


def build_kernels(pack_dir: Path, work: Path, arch: str, tvm_ffi) -> Path:
    """nvcc: quant_gemm.cu + sparse24_gemm.cu -> one shared library for `arch` (sm_90), linked with
    libtvm_ffi (its exported launchers are what tvm_ffi.load_module finds)."""
    info = json.loads((pack_dir / "pack.json").read_text())
    li = tvm_ffi.libinfo
    lib_dir = str(Path(li.find_libtvm_ffi()).parent)
    nvcc = shutil.which("nvcc") or next((p for p in (os.environ.get("CUDA_HOME", "") + "/bin/nvcc",
                                                     "/usr/local/cuda/bin/nvcc") if Path(p).exists()), None)
    if not nvcc:
        raise SystemExit("nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)")
    work.mkdir(parents=True, exist_ok=True)
    lib = work / f"tcc_cuda_kernels_{arch}.so"
    src = pack_dir / "kernels"
    cmd = [nvcc, *info["nvcc_flags"], "-gencode", f"arch=compute_{arch[3:]},code={arch}",
           f"-I{li.find_include_path()}", f"-I{li.find_dlpack_include_path()}", "-shared",
           str(src / "quant_gemm.cu"), str(src / "sparse24_gemm.cu"), "-o", str(lib),
           f"-L{lib_dir}", "-ltvm_ffi", "-Xlinker", f"-rpath={lib_dir}"]
    t = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"nvcc failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
    print(f"built {lib.name} in {time.time() - t:.0f} s with {nvcc}", flush=True)
    return lib


def peaks(name: str) -> dict:
    for key, bw, fp16, int8 in PEAKS:
        if key in name:
            return {"matched": key, "hbm_Bps": bw, "fp16_flops": fp16, "int8_ops": int8}
    return {"matched": None, "hbm_Bps": None, "fp16_flops": None, "int8_ops": None}


class Timer:
    """Per-call GPU time of `fn(i)` (i picks the copy of the weights): a CUDA graph of `calls` calls,
    replayed; falls back to timing the calls eagerly when capture fails."""

    def __init__(self, torch, tvm_ffi, calls: int = 40, replays: int = 5):
        self.torch, self.tvm_ffi, self.calls, self.replays = torch, tvm_ffi, calls, replays

    def __call__(self, fn, copies: int) -> tuple[float, str]:
        torch = self.torch
        for i in range(min(copies, 3)):
            fn(i)
        torch.cuda.synchronize()
        calls = max(self.calls, copies)  # every copy once per replay: the weights come from HBM
        try:
            graph = torch.cuda.CUDAGraph()
            with self.tvm_ffi.use_torch_stream(torch.cuda.graph(graph)):
                for i in range(calls):
                    fn(i % copies)
            graph.replay()
            torch.cuda.synchronize()
            run, how = graph.replay, "cuda graph"
        except Exception as e:  # noqa: BLE001 - reported, then timed without a graph
            torch.cuda.synchronize()
            how = f"eager ({type(e).__name__}: {str(e)[:80]})"

            def run():
                for i in range(calls):
                    fn(i % copies)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        best = math.inf
        for _ in range(3):
            start.record()
            for _ in range(self.replays):
                run()
            end.record()
            torch.cuda.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3 / (self.replays * calls))
        return best, how


def copy_bandwidth(torch) -> float:
    """Measured device-to-device copy: bytes read + written per second (1 GiB)."""
    a = torch.empty(2**28, dtype=torch.float32, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        b.copy_(a)
    end.record()
    torch.cuda.synchronize()
    return 2 * a.numel() * 4 * 10 / (start.elapsed_time(end) / 1e3)


def copies_for(nbytes: int) -> int:
    """Enough copies of a weight that a cycle through them (>= 256 MiB) does not fit in L2."""
    return max(1, min(256, -(-256 * 2**20 // max(nbytes, 1))))


def time_case(c: Case, d: dict, lib, torch, timer: Timer, peak: dict) -> list[dict]:
    """The kernel and PyTorch's paths on the case's shape: one row each."""
    F = torch.nn.functional
    dev = "cuda"
    rows = []
    flops = 2 * c.m * c.n * c.k
    x = d["args"][0].to(dev)

    def row(impl, seconds, how, wbytes, peak_flops):
        nbytes = wbytes + d["bytes_x"] + d["bytes_out"]
        r = {"case": c.name, "op": c.op, "model": c.model, "layer": c.layer, "m": c.m, "n": c.n, "k": c.k,
             "impl": impl, "us": seconds * 1e6, "timed_with": how, "TFLOPs": flops / seconds / 1e12,
             "GBps": nbytes / seconds / 1e9}
        r["peak_flops_share"] = flops / seconds / peak_flops if peak_flops else None
        r["peak_bw_share"] = nbytes / seconds / peak["hbm_Bps"] if peak["hbm_Bps"] else None
        rows.append(r)
        return r

    # tcc's kernel: copies of the packed weights, one output buffer, as tvm_ffi tensors made once (no
    # DLPack exchange inside the captured graph)
    ffi = timer.tvm_ffi.from_dlpack
    copies = copies_for(d["bytes_w"])
    wsets = [[ffi(w.to(dev)) for w in d["weights"]] for _ in range(copies)]
    rest = [ffi(a.to(dev)) if hasattr(a, "to") else a for a in d["args"]]
    out = ffi(torch.empty(c.m, c.n, device=dev))
    fn = lib[d["fn"]]
    idx = [i for i, a in enumerate(d["args"]) if any(a is w for w in d["weights"])]

    def tcc_call(i):
        args = list(rest)
        for j, w in zip(idx, wsets[i]):
            args[j] = w
        fn(*args, out)
    t, how = timer(tcc_call, copies)
    row(f"tcc {c.op}", t, how, d["bytes_w"], peak["int8_ops"] if c.op == "a8w8" else peak["fp16_flops"])

    w16 = d["fp_weight"].half()
    b16 = d["b"].half().to(dev)
    x16 = x.half()
    copies16 = copies_for(w16.numel() * 2)
    ws16 = [w16.to(dev) for _ in range(copies16)]
    t, how = timer(lambda i: F.linear(x16, ws16[i], b16), copies16)
    row("torch fp16 linear (cuBLAS)", t, how, w16.numel() * 2, peak["fp16_flops"])
    if c.m > 1:
        torch.backends.cuda.matmul.allow_tf32 = False
        ws32 = [d["fp_weight"].to(dev) for _ in range(copies_for(w16.numel() * 4))]
        b32 = b16.float()
        t, how = timer(lambda i: F.linear(x, ws32[i], b32), len(ws32))
        row("torch fp32 linear (no TF32)", t, how, w16.numel() * 4, None)
    if c.op == "a8w8" and c.m > 16 and c.k % 8 == 0 and c.n % 8 == 0:
        xq = torch.randint(-127, 128, (c.m, c.k), dtype=torch.int8, device=dev)
        wq = [d["q_weight"].T.contiguous().to(dev) for _ in range(copies_for(c.n * c.k))]
        try:
            t, how = timer(lambda i: torch._int_mm(xq, wq[i]), len(wq))
            row("torch._int_mm (int8, no quantization)", t, how, c.n * c.k, peak["int8_ops"])
        except Exception as e:  # noqa: BLE001
            rows.append({"case": c.name, "impl": "torch._int_mm", "error": f"{type(e).__name__}: {e}"[:200]})
    if c.op == "sp24" and c.m > 1:
        try:
            from torch.sparse import to_sparse_semi_structured
            sp = [to_sparse_semi_structured(w) for w in ws16[:copies_for(w16.numel())]]
            t, how = timer(lambda i: F.linear(x16, sp[i], b16), len(sp))
            row("torch semi-structured 2:4 fp16", t, how, w16.numel(), 2 * peak["fp16_flops"] if peak["fp16_flops"] else None)
        except Exception as e:  # noqa: BLE001
            rows.append({"case": c.name, "impl": "torch semi-structured 2:4", "error": f"{type(e).__name__}: {e}"[:200]})
    return rows


class FakeCuda:
    """A CPU torch tensor that tells DLPack it lives on CUDA device 0: the launchers check every
    argument (dtype, shape, device, contiguity) and reach the kernel launch, which fails on a machine
    without a GPU. Only for preflight(): never pass one where a GPU would run the kernel."""

    def __init__(self, t):
        import ctypes
        import torch

        class Device(ctypes.Structure):
            _fields_ = [("type", ctypes.c_int32), ("id", ctypes.c_int32)]

        class DType(ctypes.Structure):
            _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]

        class Managed(ctypes.Structure):
            pass
        deleter = ctypes.CFUNCTYPE(None, ctypes.POINTER(Managed))
        Managed._fields_ = [("data", ctypes.c_void_p), ("device", Device), ("ndim", ctypes.c_int32), ("dtype", DType),
                            ("shape", ctypes.POINTER(ctypes.c_int64)), ("strides", ctypes.POINTER(ctypes.c_int64)),
                            ("byte_offset", ctypes.c_uint64), ("manager_ctx", ctypes.c_void_p), ("deleter", deleter)]
        codes = {torch.float32: (2, 32), torch.float16: (2, 16), torch.int8: (0, 8), torch.int16: (0, 16),
                 torch.int32: (0, 32), torch.uint8: (1, 8)}
        self.t = t.contiguous()
        self.shape = (ctypes.c_int64 * self.t.dim())(*self.t.shape)
        self.deleter = deleter(lambda p: None)  # the tensor is owned here
        self.m = Managed(self.t.data_ptr(), Device(2, 0), self.t.dim(), DType(*codes[self.t.dtype], 1), self.shape,
                         None, 0, None, self.deleter)
        self.ctypes = ctypes

    def __dlpack_device__(self):
        return (2, 0)

    def __dlpack__(self, *args, **kwargs):
        api = self.ctypes.pythonapi
        api.PyCapsule_New.restype = self.ctypes.py_object
        api.PyCapsule_New.argtypes = [self.ctypes.c_void_p, self.ctypes.c_char_p, self.ctypes.c_void_p]
        return api.PyCapsule_New(self.ctypes.addressof(self.m), b"dltensor", None)


def preflight(lib, todo: list[Case], ref) -> list[dict]:
    """Without a GPU: every case's launcher called with its real arguments on FakeCuda tensors must
    pass its argument checks and fail only at the launch (no device)."""
    import torch
    rows = []
    for c in todo:
        d = build_case(c, ref)
        args = [FakeCuda(a) if isinstance(a, torch.Tensor) else a for a in d["args"]]
        try:
            lib[d["fn"]](*args, FakeCuda(torch.empty(c.m, c.n)))
            msg = "returned (no launch failure on a machine without a GPU?)"
        except Exception as e:  # noqa: BLE001
            msg = f"{type(e).__name__}: {e}"
        ok = msg.startswith("RuntimeError") and "kernel launch failed" in msg
        rows.append({"case": c.name, "fn": d["fn"], "ok": ok, "result": msg[:300]})
    return rows


def run(results: Path, quick: bool = False, cpu_replay: bool = False, emulate_module=None,
        build: bool = True) -> dict:
    """Build, check and time (GPU); with cpu_replay, the same cases through the CPU replay."""
    t0 = time.time()
    results = Path(results)
    results.mkdir(parents=True, exist_ok=True)
    pack_dir = HERE
    if not (pack_dir / "pack.json").exists():
        raise SystemExit(f"{pack_dir} is not a pack: run `python benchmarks/cuda_device_check.py pack --out DIR` "
                         "and run DIR/cuda_device_check.py")
    info = json.loads((pack_dir / "pack.json").read_text())
    bad = [k for k, h in info["sha256"].items() if hashlib.sha256((pack_dir / k).read_bytes()).hexdigest() != h]
    if bad:
        raise SystemExit(f"the pack's files changed since packing: {bad}")
    import torch
    ref = load_reference(pack_dir / "tcc_src")
    report = {"pack": info, "python": platform.python_version(), "torch": torch.__version__,
              "cuda": torch.version.cuda, "mode": "cpu-replay" if cpu_replay else "gpu", "correctness": [],
              "timings": []}
    todo = cases(quick)
    if cpu_replay:
        em = emulate_module
        for c in todo:
            d = build_case(c, ref)
            got = torch.from_numpy(d["emulate"](em))
            report["correctness"].append(compare(c, got, d))
        if build and not torch.cuda.is_available():  # the GPU run's build, load and argument lists
            tvm_ffi = import_tvm_ffi(pack_dir)
            with tempfile.TemporaryDirectory() as work:
                lib = tvm_ffi.load_module(str(build_kernels(pack_dir, Path(work), "sm_90", tvm_ffi)))
                report["preflight"] = preflight(lib, todo, ref)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device visible to PyTorch (use --cpu-replay on a machine without one)")
        tvm_ffi = import_tvm_ffi(pack_dir)
        props = torch.cuda.get_device_properties(0)
        arch = f"sm_{props.major}{props.minor}"
        peak = peaks(props.name)
        report.update(device=props.name, arch=arch, sms=props.multi_processor_count,
                      memory_GiB=props.total_memory / 2**30, peaks=peak, tvm_ffi=tvm_ffi.__version__)
        with tempfile.TemporaryDirectory() as work:
            lib = tvm_ffi.load_module(str(build_kernels(pack_dir, Path(work), arch, tvm_ffi)))
            report["copy_GBps"] = copy_bandwidth(torch) / 1e9
            timer = Timer(torch, tvm_ffi)
            for c in todo:
                d = build_case(c, ref)
                args = [a.cuda() if hasattr(a, "cuda") else a for a in d["args"]]
                out = torch.full((c.m, c.n), float("nan"), device="cuda")
                try:
                    lib[d["fn"]](*args, out)
                    torch.cuda.synchronize()
                    row = compare(c, out.cpu(), d)
                except Exception as e:  # noqa: BLE001 - a failing kernel is a result, the others still run
                    row = {"case": c.name, "op": c.op, "shape": [c.m, c.n, c.k], "ok": False,
                           "error": f"{type(e).__name__}: {e}"[:500]}
                report["correctness"].append(row)
                print(("ok   " if row["ok"] else "FAIL ") + c.name, flush=True)
                if c.timed and row["ok"]:
                    try:
                        report["timings"] += time_case(c, d, lib, torch, timer, peak)
                    except Exception as e:  # noqa: BLE001 - reported; the other cases still run
                        report["timings"].append({"case": c.name, "impl": "(timing)", "error": f"{type(e).__name__}: {e}"[:300]})
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
    report["targets"] = targets(report)
    report["seconds"] = time.time() - t0
    (results / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    table = render(report)
    (results / "table.md").write_text(table + "\n")
    print(table)
    return report


def targets(report: dict) -> dict:
    """Issue 21's targets from the measurements (None: not measured)."""
    out = {"all_kernels_correct": all(r["ok"] for r in report["correctness"])}
    if "preflight" in report:
        out["preflight_ok"] = all(r["ok"] for r in report["preflight"])
    t = {(r["case"], r["impl"]): r for r in report["timings"] if "us" in r}
    speedups, gemv = [], []
    for (case, impl), r in t.items():
        if impl == "tcc a8w8" and r["m"] == 128:
            base = t.get((case, "torch fp16 linear (cuBLAS)"))
            if base:
                speedups.append({"case": case, "vs_fp16_cublas": base["us"] / r["us"]})
        if impl == "tcc w4" and r["m"] == 1 and r["peak_bw_share"] is not None:
            gemv.append({"case": case, "peak_bw_share": r["peak_bw_share"]})
    out["a8w8_vs_fp16_at_M128"] = speedups or None
    out["a8w8_ge_1.5x"] = all(s["vs_fp16_cublas"] >= 1.5 for s in speedups) if speedups else None
    out["w4_gemv_bw_share"] = gemv or None
    out["w4_gemv_ge_70pct"] = all(g["peak_bw_share"] >= 0.7 for g in gemv) if gemv else None
    return out


def render(report: dict) -> str:
    lines = [f"tcc CUDA device check: {report.get('device', 'no GPU (CPU replay)')} {report.get('arch', '')}, "
             f"torch {report['torch']} (CUDA {report['cuda']}), {report['mode']}"]
    ok = sum(r["ok"] for r in report["correctness"])
    lines.append(f"correctness: {ok}/{len(report['correctness'])} cases pass")
    lines += ["", "| case | criterion | max rel err | ok |", "| --- | --- | --- | --- |"]
    for r in report["correctness"]:
        err = r.get("error") or (f"{r['max_rel_err']:.2e}" + (f", {r['mismatches']} mismatches" if "mismatches" in r else ""))
        if "err_vs_f16_operands" in r:
            err += f" (vs f16 operands: {r['err_vs_f16_operands']:.1e})"
        lines.append(f"| {r['case']} | {r.get('criterion', '')} | {err} | {'yes' if r['ok'] else '**NO**'} |")
    if "preflight" in report:
        bad = [r for r in report["preflight"] if not r["ok"]]
        lines += ["", f"preflight (launchers called with fake CUDA tensors, no GPU): "
                  f"{len(report['preflight']) - len(bad)}/{len(report['preflight'])} reach the launch"]
        lines += [f"  {r['case']}: {r['result']}" for r in bad]
    if report["timings"]:
        lines += ["", f"measured copy bandwidth: {report['copy_GBps']:.0f} GB/s; datasheet peaks ({report['peaks']['matched']}): "
                  f"{(report['peaks']['hbm_Bps'] or 0) / 1e9:.0f} GB/s, fp16 {(report['peaks']['fp16_flops'] or 0) / 1e12:.0f} "
                  f"TFLOP/s, int8 {(report['peaks']['int8_ops'] or 0) / 1e12:.0f} TOP/s (dense)", "",
                  "| op | layer | M x N x K | implementation | µs | TFLOP/s | GB/s | % peak compute | % peak HBM |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        pct = lambda v: "-" if v is None else f"{100 * v:.0f}"  # noqa: E731
        for r in report["timings"]:
            if "error" in r:
                lines.append(f"| {r['case']} | | | {r['impl']} | {r['error']} | | | | |")
                continue
            lines.append(f"| {r['op']} | {r['model']}.{r['layer']} | {r['m']}x{r['n']}x{r['k']} | {r['impl']} | "
                         f"{r['us']:.1f} | {r['TFLOPs']:.1f} | {r['GBps']:.0f} | {pct(r['peak_flops_share'])} | "
                         f"{pct(r['peak_bw_share'])} |")
    lines += ["", "targets: " + json.dumps(report["targets"])]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="cuda_device_check.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pk = sub.add_parser("pack", help="assemble the files that travel to the GPU machine (here)")
    pk.add_argument("--out", required=True, type=Path, help="a new or empty directory (or an earlier pack)")
    pk.add_argument("--python", default="3.12", help="the GPU machine's Python (the tvm-ffi wheel's; default 3.12)")
    pk.add_argument("--tvm-ffi-wheel", help=f"a {WHEEL[0]} {WHEEL[1]} wheel (default: cached or pip download)")
    rn = sub.add_parser("run", help="build the kernels, check and time them (on the GPU machine, from a pack)")
    rn.add_argument("--results", required=True, type=Path, help="directory for results.json and table.md")
    rn.add_argument("--quick", action="store_true", help="fewer layers (the qkv and down projections)")
    rn.add_argument("--no-build", action="store_true", help="with --cpu-replay: skip the nvcc build and preflight")
    rn.add_argument("--cpu-replay", action="store_true",
                    help="no GPU: the kernels' outputs from the CPU replay (needs tcc installed, with its emulator)")
    a = p.parse_args(argv)
    if a.cmd == "pack":
        info = pack(a.out, a.python, a.tvm_ffi_wheel)
        print(f"packed {info['files']} files, {info['bytes'] / 2**20:.1f} MiB (limit 64) into {a.out}; "
              f"run there: bash {a.out}/cuda_device_check.sh RESULTS_DIR")
        return 0
    em = None
    if a.cpu_replay:  # tcc itself (installed): its tcc.ir.ops is the pack's ops.py, byte for byte (pack.json)
        from tcc.backends.kernels.cuda import emulate as em
    report = run(a.results, a.quick, a.cpu_replay, em, build=not a.no_build)
    return 0 if report["targets"]["all_kernels_correct"] and report["targets"].get("preflight_ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
