"""tcc's own backends; importing this package registers them with tcc.pipeline.backend (cheaply: a backend's
module is imported the first time one of its methods is used). Third-party backends register through
the entry-point group "tcc.backends" instead.

  tvm          backends/tvm: native libraries through Apache TVM (x86-64, arm64, CUDA targets)
  onnxruntime  backends/onnxruntime: model.onnx for ONNX Runtime, tcc's reference and peer baseline
  (backends/kernels: the hand-written C++/CUDA kernels the tvm backend calls; not a backend itself)
"""
import importlib

from tcc.pipeline.backend import register_backend


class _Lazy:
    """A registered backend whose module loads on first use (onnx, onnxscript and TVM are slow to import)."""

    lazy = True
    TARGET_METHODS = ("target", "targets", "aliases")

    def __init__(self, name: str, module: str, defines_targets: bool):
        self.name, self._module, self._defines_targets = name, module, defines_targets

    def __getattr__(self, attr):
        if attr.startswith("__") or (attr in self.TARGET_METHODS and not self._defines_targets):
            raise AttributeError(attr)  # the registry asks which backends define targets without importing them
        return getattr(importlib.import_module(self._module).BACKEND, attr)


register_backend(_Lazy("tvm", "tcc.backends.tvm.backend", defines_targets=True))
register_backend(_Lazy("onnxruntime", "tcc.backends.onnxruntime", defines_targets=False))
