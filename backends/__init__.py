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

    def __init__(self, name: str, module: str):
        self.name, self._module = name, module

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return getattr(importlib.import_module(self._module).BACKEND, attr)


register_backend(_Lazy("tvm", "tcc.backends.tvm.backend"))
register_backend(_Lazy("onnxruntime", "tcc.backends.onnxruntime"))
