"""Running artifacts: `tcc.load(dir)` -> a callable taking numpy inputs by name.

x86-64 artifacts on an x86-64 host run in-process on TVM's Relax VM; arm64 artifacts run under
qemu-aarch64 with the aarch64 TVM runtime (backends/tvm/arm64.py), so their output is checked here.
cuda artifacts load (manifest, inputs, outputs) but calling one is a UserError: tcc has no GPU
runtime and this host no GPU (docs/CUDA.md says how to run one on a GPU host).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .artifact import read_manifest, verify_files
from .errors import UserError
from .program import TensorSpec


class Loaded:
    """A loaded artifact. `loaded(feeds) -> {output name: array}`."""

    def __init__(self, dir: Path, verify: bool = True):
        self.dir = Path(dir)
        self.manifest = read_manifest(self.dir)
        if verify:
            verify_files(self.dir, self.manifest)
        self.inputs = [TensorSpec.from_json(s) for s in self.manifest["inputs"]]
        self.outputs = [TensorSpec.from_json(s) for s in self.manifest["outputs"]]
        self.target = self.manifest["target"]
        self.task = self.manifest.get("task")
        arch = self.target["arch"]
        if self.target.get("device") == "cuda":
            self._impl = _NoGPU(self.target)
        elif self.manifest.get("backend") == "onnxruntime":
            from tcc.backends.onnxruntime import OrtSession
            self._impl = OrtSession(self.dir / "model.onnx")
        elif arch == os.uname().machine:
            self._impl = _HostVM(self.dir, self.manifest)
        elif arch == "aarch64":
            from tcc.backends.tvm.arm64 import Arm64Session
            self._impl = Arm64Session(self.dir)
        else:
            raise UserError(f"cannot run a {arch} artifact on this {os.uname().machine} host")

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        unknown = sorted(set(feeds) - {s.name for s in self.inputs})
        missing = [s.name for s in self.inputs if s.name not in feeds]
        if unknown or missing:
            raise UserError(f"inputs do not match the artifact: missing {missing}, unknown {unknown}",
                            f"the artifact takes {[s.to_json() for s in self.inputs]}")
        return self._impl({s.name: s.check(feeds[s.name]) for s in self.inputs})

    def close(self):
        if hasattr(self._impl, "close"):
            self._impl.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _NoGPU:
    def __init__(self, target: dict):
        self.archs = ", ".join(target.get("gpu_archs") or [target["tvm"].get("arch", "?")])

    def __call__(self, feeds):
        raise UserError(f"this artifact is compiled for CUDA {self.archs}; this host has no GPU and tcc "
                        "cannot run it (it was compiled, never run)",
                        "run model.so on an NVIDIA GPU host with TVM's CUDA runtime (docs/CUDA.md), "
                        "or compile for --target x86 to run it here")


class _HostVM:
    def __init__(self, dir: Path, manifest: dict):
        import tvm
        from safetensors.numpy import load_file
        from tvm import relax

        self.lib = tvm.runtime.load_module(_unique_path(dir / "model.so", manifest))
        self.vm = relax.VirtualMachine(self.lib, tvm.cpu())
        weights = load_file(str(dir / "weights.safetensors"))
        self.params = [tvm.runtime.tensor(weights[n]) for n in manifest["params"]]
        self.outputs = [TensorSpec.from_json(s) for s in manifest["outputs"]]
        self.main = self.vm["main"]

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import tvm
        args = [tvm.runtime.tensor(a) for a in feeds.values()] + self.params
        out = self.main(*args)
        outs = [out] if hasattr(out, "numpy") else list(out)
        return {s.name: o.numpy() for s, o in zip(self.outputs, outs)}


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


def load(dir, verify: bool = True) -> Loaded:
    return Loaded(Path(dir), verify=verify)
