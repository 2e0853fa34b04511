"""Running tvm artifacts (the tvm backend's `session`): x86-64 libraries in-process on TVM's Relax
VM (`HostVM`), arm64 ones under qemu (arm64.Arm64Session), cuda ones not at all here (`NoGPU`).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from tcc.errors import UserError
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
        # its manifest costs no weights), read one at a time from the file: one copy of the weights in
        # memory, plus the tensor being converted
        self.param_names = list(manifest["params"])
        self.by_name = {}
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

        def call(arrays):
            for spec, t, a in zip(specs, inputs, arrays):
                t.copyfrom(np.ascontiguousarray(a, dtype=spec.dtype).reshape(spec.shape))
            out = fn()
            return (out if hasattr(out, "numpy") else out[0]).numpy()
        return call

    def new_state(self, specs: list[dict]):
        """Zeroed KV caches for a new sequence, from the manifest's cache specs."""
        import tvm
        return [tvm.runtime.tensor(np.zeros(c["shape"], dtype=c["dtype"])) for c in specs]

    def _param(self, name: str):
        import tvm
        from safetensors import safe_open
        if name not in self.by_name:  # the file is mapped for one tensor at a time: its pages leave RSS after
            with safe_open(str(self.weights_path), framework="numpy") as f:
                self.by_name[name] = tvm.runtime.tensor(f.get_tensor(name))
        return self.by_name[name]

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import tvm
        args = [tvm.runtime.tensor(a) for a in feeds.values()] + [self._param(n) for n in self.param_names]
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


