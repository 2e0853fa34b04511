"""The arm64 runtime runs a real aarch64 TVM library under qemu and matches PyTorch.

Builds a tiny Relax module (Linear + GELU, parameters kept as inputs) for aarch64 with TVM, writes it
in the artifact layout (model.so, weights.safetensors, manifest.json) and runs it through
Arm64Session. The first run on a machine downloads and builds the aarch64 runtime (see arm64.py).
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from tcc.errors import InternalError, UserError

TOOLS = ("aarch64-linux-gnu-gcc", "aarch64-linux-gnu-g++", "qemu-aarch64")
MISSING = [t for t in TOOLS if shutil.which(t) is None]
pytestmark = [
    pytest.mark.arm64,
    pytest.mark.skipif(bool(MISSING), reason=f"needs {', '.join(MISSING)} (apt-get install g++-aarch64-linux-gnu qemu-user)"),
]
TARGET = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "neoverse-n1", "mattr": ["+neon"]}
TOL = 1e-5


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 8)

    def forward(self, x):
        h = self.fc(x)
        return torch.nn.functional.gelu(h), h


def _build_artifact(model: torch.nn.Module, x: torch.Tensor, out) -> None:
    import tvm
    from safetensors.numpy import save_file
    from tvm import relax
    from tvm.relax.frontend import detach_params
    from tvm.relax.frontend.torch import from_exported_program

    ep = torch.export.export(model, (x,))
    mod, params = detach_params(from_exported_program(ep, keep_params_as_input=True))
    main = mod["main"]
    names = [v.name for v in main.params[int(main.attrs["num_input"]):]]
    relax.build(mod, target=tvm.target.Target(TARGET)).export_library(str(out / "model.so"), cc="aarch64-linux-gnu-gcc")
    save_file({n: p.numpy() for n, p in zip(names, params["main"])}, str(out / "weights.safetensors"))
    outs = model(x)
    manifest = {
        "inputs": [{"name": "x", "dtype": "float32", "shape": list(x.shape)}],
        "outputs": [{"name": n, "dtype": "float32", "shape": list(o.shape)} for n, o in zip(["y", "h"], outs)],
        "params": names,
        "target": {"name": "arm64", "tvm": TARGET},
    }
    (out / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Tiny().eval()


@pytest.fixture(scope="module")
def artifact(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("arm64-artifact")
    _build_artifact(model, torch.randn(2, 16), out)
    return out


@pytest.fixture(scope="module")
def session(artifact):
    from tcc.backends.tvm.arm64 import Arm64Session
    with Arm64Session(artifact) as s:
        yield s


def _reference(model, x: np.ndarray) -> dict[str, np.ndarray]:
    with torch.no_grad():
        y, h = model(torch.from_numpy(x))
    return {"y": y.numpy(), "h": h.numpy()}


def test_matches_pytorch(model, session):
    x = np.random.default_rng(1).standard_normal((2, 16)).astype(np.float32)
    got, want = session({"x": x}), _reference(model, x)
    assert sorted(got) == ["h", "y"]
    for name in want:
        assert got[name].shape == want[name].shape and got[name].dtype == np.float32
        assert np.abs(got[name] - want[name]).max() <= TOL, name


def test_several_requests_on_one_session(model, session):
    rng = np.random.default_rng(2)
    results = []
    for _ in range(4):
        x = rng.standard_normal((2, 16)).astype(np.float32) * 3
        got = session({"x": x})
        assert np.abs(got["y"] - _reference(model, x)["y"]).max() <= TOL
        results.append(got["y"])
    assert np.abs(results[0] - results[1]).max() > 0.1  # each request really ran on its own input


def test_wrong_input_is_a_user_error(session, model):
    with pytest.raises(UserError, match=r"shape \[3, 16\]"):
        session({"x": np.zeros((3, 16), np.float32)})
    with pytest.raises(UserError, match="inputs"):
        session({"input_ids": np.zeros((2, 16), np.float32)})
    x = np.ones((2, 16), np.float32)  # the session still serves requests afterwards
    assert np.abs(session({"x": x})["y"] - _reference(model, x)["y"]).max() <= TOL


def test_driver_errors_become_internal_errors(artifact, tmp_path):
    from tcc.backends.tvm.arm64 import Arm64Session
    bad = tmp_path / "bad"
    shutil.copytree(artifact, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["inputs"][0]["shape"] = [3, 16]  # the library was built for [2, 16]
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with Arm64Session(bad) as s:
        with pytest.raises(InternalError, match="mismatch"):
            s({"x": np.zeros((3, 16), np.float32)})
        s._proc.kill()  # a crashed driver is reported, not hung on
        with pytest.raises(InternalError, match="exited"):
            s({"x": np.zeros((3, 16), np.float32)})


KERNEL = r"""
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/function.h>
extern "C" void scipy_cblas_sgemm(int, int, int, int, int, int, float, const float*, int, const float*, int,
                                  float, float*, int);
void mm(tvm::ffi::TensorView a, tvm::ffi::TensorView b, tvm::ffi::TensorView c) {
  int m = a.shape()[0], k = a.shape()[1], n = b.shape()[1];
  scipy_cblas_sgemm(101, 111, 111, m, n, k, 1.f, static_cast<float*>(a.data_ptr()), k,
                    static_cast<float*>(b.data_ptr()), n, 0.f, static_cast<float*>(c.data_ptr()), n);
}
TVM_FFI_DLL_EXPORT_TYPED_FUNC(tcc_test_sgemm, mm);
"""


def test_library_calling_openblas(tmp_path):
    """A model.so whose external kernel calls scipy_cblas_sgemm (left undefined in the library)."""
    import subprocess

    import tvm
    from safetensors.numpy import save_file
    from tvm import relax
    from tvm.script import ir as I
    from tvm.script import relax as R

    from tcc.backends.tvm.arm64 import Arm64Session, aarch64_runtime_dir

    (tmp_path / "k.cc").write_text(KERNEL)
    subprocess.run(["aarch64-linux-gnu-g++", "-std=c++17", "-O2", "-fPIC", "-c", str(tmp_path / "k.cc"), "-o",
                    str(tmp_path / "k.o"), "-I", str(aarch64_runtime_dir() / "include")], check=True)

    @I.ir_module
    class Mod:
        @R.function
        def main(x: R.Tensor((2, 4), "float32"), w: R.Tensor((4, 3), "float32")):
            R.func_attr({"num_input": 1})
            y = R.call_dps_packed("tcc_test_sgemm", (x, w), out_ty=R.Tensor((2, 3), "float32"))
            return R.add(y, R.const(1.0, "float32"))  # one TVM-generated kernel next to the external one

    mod = Mod.with_attr("external_mods", [tvm.runtime.load_static_library(str(tmp_path / "k.o"), ["tcc_test_sgemm"])])
    relax.build(mod, target=tvm.target.Target(TARGET)).export_library(str(tmp_path / "model.so"),
                                                                       cc="aarch64-linux-gnu-g++")
    w = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    save_file({"w": w}, str(tmp_path / "weights.safetensors"))
    (tmp_path / "manifest.json").write_text(json.dumps({
        "inputs": [{"name": "x", "dtype": "float32", "shape": [2, 4]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": [2, 3]}],
        "params": ["w"], "target": {"name": "arm64"}}))
    x = np.random.default_rng(3).standard_normal((2, 4)).astype(np.float32)
    with Arm64Session(tmp_path) as s:
        y = s({"x": x})["y"]  # one tensor returned, not a tuple
    assert np.abs(y - (x @ w + 1)).max() <= TOL
