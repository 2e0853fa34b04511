"""The arm64 runtime: run an aarch64 TVM artifact on this (x86) host under qemu, so arm64 outputs are
checked, not assumed.

Contract:
* `aarch64_runtime_dir() -> Path` is a cache directory ($TCC_CACHE or ~/.cache/tcc, then
  `aarch64-runtime/`) holding `lib/` (the aarch64 libtvm_runtime.so, libtvm_ffi.so and
  libscipy_openblas.so), `include/` (the tvm-ffi headers) and `tcc_driver` (driver/tcc_driver.cc
  cross-compiled against them). The first use downloads the manylinux aarch64 wheels of exactly the
  installed apache-tvm, apache-tvm-ffi and scipy-openblas32 versions with pip (~110 MB), and writes
  the directory atomically (temp dir + rename); the driver is recompiled when its source changes.
  Missing aarch64-linux-gnu-g++ or qemu-aarch64 is a UserError naming the Debian packages.
* `Arm64Session(artifact_dir)` reads the artifact (model.so, weights.safetensors, manifest.json; the
  Relax "main" takes the inputs, then the parameters in manifest["params"] order) and starts one
  persistent `qemu-aarch64` process running the driver, which loads the model and the weights once.
  `session(feeds) -> {output name: array}` checks names, shapes and dtypes against the manifest
  (UserError); failures inside the driver, and a crashed driver, raise InternalError with its message.
  One request at a time (not thread-safe). Use it as a context manager or call `close()`.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import weakref
import zipfile
from importlib import metadata
from pathlib import Path

import numpy as np

from tcc import progress
from tcc.errors import InternalError, UserError
from tcc.frontends.models import SAFETENSORS_DTYPES, safetensors_index
from tcc.store import cache_dir
from tcc.ir.program import TensorSpec

SYSROOT = "/usr/aarch64-linux-gnu"
DRIVER_SRC = Path(__file__).parent / "driver" / "tcc_driver.cc"
# wheel (pip name) -> members to extract: {path in wheel: path in the runtime dir}; a trailing "/"
# copies a whole folder. The python version only picks a wheel: the C++ libraries are the same.
WHEELS = {
    "apache-tvm": {"tvm/lib/libtvm_runtime.so": "lib/libtvm_runtime.so"},
    "apache-tvm-ffi": {"tvm_ffi/lib/libtvm_ffi.so": "lib/libtvm_ffi.so", "tvm_ffi/include/": "include/"},
    "scipy-openblas32": {"scipy_openblas32/lib/libscipy_openblas.so": "lib/libscipy_openblas.so"},
}
PLATFORM, PYTHON_VERSION = "manylinux_2_28_aarch64", "3.11"
CXXFLAGS = ["-std=c++17", "-O2"]
LIBS = ["-Wl,--no-as-needed", "-ltvm_runtime", "-ltvm_ffi", "-lscipy_openblas", "-Wl,--as-needed"]
APT_HINT = "install the Debian packages: apt-get install g++-aarch64-linux-gnu qemu-user"


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise UserError(f"the arm64 runtime needs '{name}', which is not on PATH", APT_HINT)
    return path


# -- the cached runtime -------------------------------------------------------------------------

def aarch64_runtime_dir() -> Path:
    """The aarch64 runtime libraries and the compiled driver, built on first use (see module doc)."""
    out = cache_dir() / "aarch64-runtime"
    versions = {pkg: metadata.version(pkg) for pkg in WHEELS}
    stamp = out / "versions.json"
    if not (stamp.exists() and json.loads(stamp.read_text()) == versions):
        _populate(out, versions)
    _compile_driver(out)
    return out


def _populate(out: Path, versions: dict[str, str]) -> None:
    require_tool("aarch64-linux-gnu-g++")  # before a 110 MB download, not after
    tmp = Path(tempfile.mkdtemp(prefix=".aarch64-runtime-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        wheels = tmp / "wheels"
        pins = [f"{pkg}=={v}" for pkg, v in versions.items()]
        with progress.status(f"downloading the aarch64 wheels ({', '.join(pins)}, ~110 MB)"):
            r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                                "--platform", PLATFORM, "--python-version", PYTHON_VERSION, "-d", str(wheels),
                                "--disable-pip-version-check", "--quiet", *pins], capture_output=True, text=True)
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise UserError(f"could not download the aarch64 wheels for the arm64 runtime: {last}",
                            "check that PyPI is reachable (pip download), then retry")
        with progress.status("extracting the aarch64 runtime libraries"):
            for pkg, members in WHEELS.items():
                (whl,) = wheels.glob(pkg.replace("-", "_") + "-*.whl")
                _extract(whl, members, tmp)
        shutil.rmtree(wheels)
        (tmp / "versions.json").write_text(json.dumps(versions))
        _swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _extract(whl: Path, members: dict[str, str], dest: Path) -> None:
    with zipfile.ZipFile(whl) as z:
        files = [n for n in z.namelist() if not n.endswith("/")]
        for src, dst in members.items():
            for name in files:
                if name == src or (src.endswith("/") and name.startswith(src)):
                    target = dest / (dst + name[len(src):])
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(z.read(name))
        missing = [s for s in members if not any(n.startswith(s) for n in files)]
    if missing:
        raise InternalError(f"{whl.name} has no {missing}: the wheel layout changed")


def _swap_in(new: Path, out: Path) -> None:
    """Rename `new` to `out`, replacing a stale `out`; if another process got there first, keep theirs."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}-old-{os.getpid()}")
        out.rename(old)
    try:
        new.rename(out)
    except OSError:
        if not out.exists():
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _compile_driver(rt: Path) -> None:
    source = DRIVER_SRC.read_bytes()
    key = hashlib.sha256(source + " ".join(CXXFLAGS + LIBS).encode()).hexdigest()
    stamp, exe = rt / "tcc_driver.sha256", rt / "tcc_driver"
    if exe.exists() and stamp.exists() and stamp.read_text() == key:
        return
    cxx = require_tool("aarch64-linux-gnu-g++")
    tmp = rt / f".tcc_driver-{os.getpid()}"
    with progress.status("cross-compiling the arm64 driver"):
        r = subprocess.run([cxx, *CXXFLAGS, "-I", str(rt / "include"), str(DRIVER_SRC), "-o", str(tmp),
                            "-L", str(rt / "lib"), *LIBS], capture_output=True, text=True)
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise InternalError(f"compiling {DRIVER_SRC.name} for aarch64 failed:\n{r.stderr[-4000:]}")
    os.replace(tmp, exe)
    stamp.with_suffix(".tmp").write_text(key)
    os.replace(stamp.with_suffix(".tmp"), stamp)


# -- the session --------------------------------------------------------------------------------

def _spec_line(kind: str, name: str, dtype: str, offset: int, nbytes: int, shape) -> str:
    return " ".join(map(str, [kind, name, dtype, offset, nbytes, len(shape), *shape]))


def _param_lines(weights: Path, names: list[str]) -> list[str]:
    """Spec lines pointing into the safetensors file (8-byte header size, JSON header, then data)."""
    header, start = safetensors_index(weights)
    lines = []
    for name in names:
        if name not in header:
            raise UserError(f"parameter '{name}' listed in manifest.json is missing from {weights}",
                            "rebuild the artifact; its files do not belong together")
        e = header[name]
        if e["dtype"] not in SAFETENSORS_DTYPES:
            raise UserError(f"parameter '{name}' has dtype {e['dtype']}, which the arm64 runtime cannot load")
        begin, end = e["data_offsets"]
        lines.append(_spec_line("param", name, SAFETENSORS_DTYPES[e["dtype"]], start + begin, end - begin, e["shape"]))
    return lines


def _function_specs(manifest: dict) -> dict:
    """{function: ([per-call input specs], [output specs])} of the generation entry points."""
    gen = manifest.get("generation")
    if not gen:
        return {}
    n_state = len(gen["caches"])
    out = {}
    for name, f in gen["functions"].items():
        inputs = [TensorSpec.from_json(d) for d in f["inputs"]]
        out[name] = (inputs[:len(inputs) - n_state], [TensorSpec.from_json(d) for d in f["outputs"]])
    return out


def _generation_lines(weights: Path, manifest: dict, functions: dict) -> list[str]:
    """Spec lines of the generation entry points: the stored tensors main does not take, the KV
    caches (driver state), each function's parameters, inputs and outputs (names FN/NAME)."""
    gen = manifest.get("generation")
    if not gen:
        return []
    main = set(manifest["params"])
    extra = sorted({n for f in gen["functions"].values() for n in f["params"]} - main)
    lines = [line.replace("param ", "tensor ", 1) for line in _param_lines(weights, extra)]
    lines += [_spec_line("state", c["name"], c["dtype"], 0, _nbytes(TensorSpec.from_json(c)), c["shape"])
              for c in gen["caches"]]
    for name, f in gen["functions"].items():
        lines += [f"use {name}/{n} x 0 0 0" for n in f["params"]]
        inputs, outputs = functions[name]
        lines += [_spec_line("input", f"{name}/{s.name}", s.dtype, o, _nbytes(s), s.shape)
                  for s, o in zip(inputs, _layout(inputs))]
        lines += [_spec_line("output", f"{name}/{s.name}", s.dtype, o, _nbytes(s), s.shape)
                  for s, o in zip(outputs, _layout(outputs))]
    return lines


def _nbytes(spec: TensorSpec) -> int:
    return int(np.prod(spec.shape, dtype=np.int64)) * np.dtype(spec.dtype).itemsize


def _layout(specs: list[TensorSpec]) -> list[int]:
    """Offsets of tensors packed one after another in a request file."""
    offsets, at = [], 0
    for s in specs:
        offsets.append(at)
        at += _nbytes(s)
    return offsets


def _shutdown(proc: subprocess.Popen, workdir: str) -> None:
    if proc.poll() is None:
        try:
            proc.stdin.close()
            proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
    proc.stdout.close()
    shutil.rmtree(workdir, ignore_errors=True)


class Arm64Session:
    """One qemu-aarch64 process serving an arm64 artifact; call it with numpy feeds by input name."""

    def __init__(self, artifact_dir: str | os.PathLike):
        art = Path(artifact_dir)
        for f in ("model.so", "weights.safetensors", "manifest.json"):
            if not (art / f).is_file():
                raise UserError(f"{art} is not a tcc artifact: {f} is missing", "give the folder `tcc compile --target arm64` wrote")
        manifest = json.loads((art / "manifest.json").read_text())
        if manifest.get("target", {}).get("name", "").split("-")[0] != "arm64":
            raise UserError(f"{art} was built for target {manifest.get('target', {}).get('name')!r}, not arm64")
        self.inputs = [TensorSpec.from_json(d) for d in manifest["inputs"]]
        self.outputs = [TensorSpec.from_json(d) for d in manifest["outputs"]]
        qemu = require_tool("qemu-aarch64")
        rt = aarch64_runtime_dir()

        self._workdir = tempfile.mkdtemp(prefix="tcc-arm64-")
        spec = _param_lines(art / "weights.safetensors", list(manifest["params"]))
        spec += [_spec_line("input", s.name, s.dtype, o, _nbytes(s), s.shape)
                 for s, o in zip(self.inputs, _layout(self.inputs))]
        spec += [_spec_line("output", s.name, s.dtype, o, _nbytes(s), s.shape)
                 for s, o in zip(self.outputs, _layout(self.outputs))]
        self._functions = _function_specs(manifest)
        spec += _generation_lines(art / "weights.safetensors", manifest, self._functions)
        Path(self._workdir, "spec.txt").write_text("\n".join(spec) + "\n")
        self._stderr = Path(self._workdir, "stderr.log")
        with open(self._stderr, "wb") as err:
            self._proc = subprocess.Popen(
                [qemu, "-cpu", manifest["target"].get("qemu_cpu", "cortex-a72"), "-L", SYSROOT, "-E", f"LD_LIBRARY_PATH={rt / 'lib'}", str(rt / "tcc_driver"),
                 str((art / "model.so").resolve()), "spec.txt", str((art / "weights.safetensors").resolve())],
                cwd=self._workdir, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
        self._finalizer = weakref.finalize(self, _shutdown, self._proc, self._workdir)
        try:
            self._expect("ready", f"loading {art}")
        except BaseException:
            self.close()
            raise

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [s.name for s in self.inputs]
        if sorted(feeds) != sorted(names):
            raise UserError(f"the artifact takes inputs {names}, got {sorted(feeds)}")
        if not self._finalizer.alive:
            raise UserError("this Arm64Session is closed", "open a new one")
        with open(Path(self._workdir, "in.bin"), "wb") as f:
            for s in self.inputs:
                f.write(s.check(feeds[s.name]).tobytes())
        self._send("run in.bin out.bin")
        self._expect("ok", "running the model")
        raw = Path(self._workdir, "out.bin").read_bytes()
        return {s.name: np.frombuffer(raw, s.dtype, int(np.prod(s.shape, dtype=np.int64)), o).reshape(s.shape).copy()
                for s, o in zip(self.outputs, _layout(self.outputs))}

    # -- generation: the driver keeps the KV caches (its "state") between calls ----------------------
    def function(self, name: str, signature: dict, state: list):
        """`name` as fn(inputs [numpy]) -> first output (numpy); the state (KV caches) is the driver's."""
        inputs, outputs = self._functions[name]

        def call(arrays):
            with open(Path(self._workdir, "in.bin"), "wb") as f:
                for spec, a in zip(inputs, arrays):
                    f.write(spec.check(a).tobytes())
            self._send(f"call {name} in.bin out.bin")
            self._expect("ok", f"running {name}")
            raw = Path(self._workdir, "out.bin").read_bytes()
            o = outputs[0]
            return np.frombuffer(raw, o.dtype, int(np.prod(o.shape, dtype=np.int64))).reshape(o.shape).copy()
        return call

    def new_state(self, specs: list[dict]):
        """A new sequence: the driver zeroes the caches it holds."""
        self._send("reset")
        self._expect("ok", "resetting the KV cache")
        return []

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> "Arm64Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- talking to the driver ----------------------------------------------------------------------
    def _send(self, line: str) -> None:
        try:
            self._proc.stdin.write(line + "\n")
            self._proc.stdin.flush()
        except BrokenPipeError:
            self._crashed("sending a request")

    def _expect(self, word: str, doing: str) -> None:
        reply = self._proc.stdout.readline()
        if not reply:
            self._crashed(doing)
        reply = reply.rstrip("\n")
        if reply != word:
            msg = reply[len("error "):] if reply.startswith("error ") else f"unexpected reply {reply!r}"
            raise InternalError(f"arm64 driver error while {doing}: {msg}")

    def _crashed(self, doing: str):
        rc = self._proc.wait()
        tail = " | ".join(self._stderr.read_text(errors="replace").strip().splitlines()[-5:])
        self.close()
        raise InternalError(f"arm64 driver (qemu-aarch64) exited with code {rc} while {doing}: {tail or 'no output'}")
