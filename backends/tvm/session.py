"""Running tvm artifacts (the tvm backend's `session`): x86-64 libraries in-process on TVM's Relax
VM (`HostVM`), arm64 ones under qemu (arm64.Arm64Session), cuda ones not at all here (`NoGPU`).
"""
from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np

from tcc.errors import UserError
from tcc.frontends.models import SAFETENSORS_DTYPES, safetensors_index
from tcc.ir.program import TensorSpec
from .targets import check_cpu


def session(dir: Path, manifest: dict):
    """What runs the artifact in `dir` on this host (see the module docstring)."""
    target = manifest["target"]
    arch = target["arch"]
    if target.get("device") == "cuda":
        return NoGPU(target)
    if arch == os.uname().machine:
        check_cpu(target, dir)
        return HostVM(dir, manifest)
    if arch == "aarch64":
        from .arm64 import Arm64Session
        return Arm64Session(dir)
    raise UserError(f"cannot run a {arch} artifact on this {os.uname().machine} host")


class NoGPU:
    def __init__(self, target: dict):
        self.archs = ", ".join(target.get("gpu_archs") or [target["tvm"].get("arch", "?")])

    def __call__(self, feeds):
        raise UserError(f"this artifact is compiled for CUDA {self.archs}; this host has no GPU and tcc "
                        "cannot run it (it was compiled, never run)",
                        "run model.so on an NVIDIA GPU host with TVM's CUDA runtime (docs/CUDA.md), "
                        "or compile for --target x86 to run it here")


class HostVM:
    def __init__(self, dir: Path, manifest: dict):
        import tvm
        from tvm import relax

        self.lib = tvm.runtime.load_module(_unique_path(dir / "model.so", manifest))
        self.vm = relax.VirtualMachine(self.lib, tvm.cpu())
        self.weights_path = dir / "weights.safetensors"
        # the tensors become TVM tensors when a function first needs them (loading an artifact to read
        # its manifest costs no weights), each read from the file straight into its place in one
        # huge-page mapping (HostMemory): one copy of the weights in memory
        self.param_names = list(manifest["params"])
        self.by_name = {}
        self._stored = None  # (HostMemory, safetensors header, data start) once a tensor is read
        self.outputs = [TensorSpec.from_json(s) for s in manifest["outputs"]]
        self.main = self.vm["main"]

    def function(self, name: str, signature: dict, state: list):
        """Relax function `name` as fn(inputs [numpy]) -> first output (numpy). Its per-call inputs are
        tensors bound once with the state (the KV caches) and the parameters (stored tensors, shared
        with main by name), and refilled in place each call: converting several hundred arguments per
        call cost more than a small model's decode step."""
        import tvm
        specs = [TensorSpec.from_json(d) for d in signature["inputs"]][:len(signature["inputs"]) - len(state)]
        inputs = [tvm.runtime.empty(s.shape, s.dtype) for s in specs]
        # one saved name per function: a new session's binding replaces the VM's reference to the last
        # one (whose caches are then freed with its session; `fn` keeps its own closure)
        self.vm.save_function(name, f"{name}_bound", *inputs, *state, *[self._param(n) for n in signature["params"]])
        fn = self.vm[f"{name}_bound"]
        # numpy views of the inputs (token ids and positions), written in place: Tensor.copyfrom of a
        # fresh array cost 5 us per input, 16 of the ~25 us of Python around a decode call
        views = [np.from_dlpack(t) for t in inputs]

        def call(arrays):
            for view, a in zip(views, arrays):
                view[...] = np.reshape(a, view.shape)
            out = fn()
            return (out if hasattr(out, "numpy") else out[0]).numpy()
        return call

    def new_state(self, specs: list[dict]):
        """Zeroed KV caches for a new sequence, from the manifest's cache specs. Not in huge pages: the
        first touch of a fresh huge-page mapping (the kernel finds and zeroes 2 MiB pages) fell inside
        the prefill, which then ran at 400-530 tok/s where it ran at 630-790 (1B W8A8 bundle, Zen 5)."""
        import tvm
        return [tvm.runtime.tensor(np.zeros(c["shape"], dtype=c["dtype"])) for c in specs]

    def _param(self, name: str):
        if name not in self.by_name:
            if self._stored is None:
                header, start = safetensors_index(self.weights_path)
                header.pop("__metadata__", None)
                need = sum(HostMemory.footprint(SAFETENSORS_DTYPES[e["dtype"]], e["shape"]) for e in header.values())
                self._stored = HostMemory(need), header, start
            memory, header, start = self._stored
            e = header[name]
            begin, end = e["data_offsets"]

            def read(buffer):
                with open(self.weights_path, "rb") as f:
                    f.seek(start + begin)
                    if f.readinto(buffer) != end - begin:
                        raise UserError(f"{self.weights_path} is shorter than its header says ({name})",
                                        "rebuild the artifact; the file was cut short")
            self.by_name[name] = memory.tensor(SAFETENSORS_DTYPES[e["dtype"]], e["shape"], fill=read)
        return self.by_name[name]

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import tvm
        args = [tvm.runtime.tensor(a) for a in feeds.values()] + [self._param(n) for n in self.param_names]
        out = self.main(*args)
        outs = [out] if hasattr(out, "numpy") else list(out)
        return {s.name: o.numpy() for s, o in zip(self.outputs, outs)}


class HostMemory:
    """Host tensors carved from one private anonymous mapping, 64-byte aligned (what TVM-generated
    kernels assume), with transparent huge pages asked for (madvise MADV_HUGEPAGE; the mapping starts
    on a 2 MiB boundary). A decode step streams every weight once: with 4 KiB pages each page costs a
    TLB walk and the hardware prefetcher stops at every page boundary. On the 2-core Zen 5 EPYC (THP
    "madvise", as Debian and most distributions ship it) a 1 GiB read ran 8-25 % faster from huge
    pages, and the 1B W8A8 decode 5-11 % faster with its weights there (docs/BENCHMARKS.md, session
    16). Pages never written stay unmapped, so a lazily loaded artifact costs only what it read. The
    tensors are zero-copy views (DLPack) that keep the mapping alive."""

    HUGE = 2 << 20
    ALIGN = 64

    def __init__(self, nbytes: int):
        self._map = mmap.mmap(-1, max(nbytes, 1) + self.HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):  # Linux
            self._map.madvise(mmap.MADV_HUGEPAGE)
        self._bytes = np.frombuffer(self._map, dtype=np.uint8)
        self._next = -self._bytes.ctypes.data % self.HUGE

    @classmethod
    def footprint(cls, dtype, shape) -> int:
        """Bytes a tensor takes in the mapping, its alignment padding included."""
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        return -(-n // cls.ALIGN) * cls.ALIGN

    def tensor(self, dtype, shape, fill=None):
        """A TVM tensor of `dtype` and `shape` in the mapping: zero, or written by fill(its bytes, a
        writable uint8 array), which must write all of them."""
        import tvm
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if self._next + n > len(self._bytes):
            raise RuntimeError("HostMemory: more tensors than the mapping was sized for")
        view = self._bytes[self._next:self._next + n]
        self._next += self.footprint(dtype, shape)
        if fill is not None and n:
            fill(view)
        if n == 0:  # DLPack cannot export a zero-byte view of the mapping
            return tvm.runtime.tensor(np.zeros(shape, dtype=dtype))
        return tvm.runtime.from_dlpack(view.view(dtype).reshape(shape))


_LINKS: list[str] = []  # a per-process directory of hard links (or copies) of loaded libraries


def _unique_path(lib: Path, manifest: dict) -> str:
    """A path naming this library by its content: the dynamic loader returns an already loaded
    library for a path it has seen, so an artifact rebuilt in place and loaded again in the same
    process would otherwise run the old code."""
    import atexit
    import shutil
    import tempfile

    sha = (manifest.get("files") or {}).get("model.so")
    if not sha:
        return str(lib)
    if not _LINKS:
        _LINKS.append(tempfile.mkdtemp(prefix="tcc-libs-"))
        atexit.register(shutil.rmtree, _LINKS[0], True)
    link = Path(_LINKS[0]) / f"{sha[:32]}.so"
    if not link.exists():
        try:  # a hard link (TVM resolves symbolic links to the original path)
            os.link(lib, link)
        except OSError:  # another file system
            shutil.copyfile(lib, link)
    return str(link)


