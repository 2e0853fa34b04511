"""backends/tvm/schedule.py: the CPU schedule rules tcc adds to TVM's pipeline."""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.s_tir import dlight as dl

from tcc.backends.tvm.schedule import Injective
from tcc.backends.tvm.targets import get_target


def _score(keys: int):
    """q_cls . k per head and key, as prune-tokens scores tokens: the CLS row of q [1, 12, keys, 32]
    times k [1, 12, keys, 32], summed over the head dim -> [1, 12, keys]; legalised and fused as the
    Relax pipeline does."""
    bb = relax.BlockBuilder()
    q = relax.Var("q", relax.TensorType((1, 12, keys, 32), "float32"))
    k = relax.Var("k", relax.TensorType((1, 12, keys, 32), "float32"))
    with bb.function("main", [q, k]):
        with bb.dataflow():
            cls = bb.emit(relax.op.strided_slice(q, axes=[2], begin=[0], end=[1]))
            s = bb.emit_output(relax.op.sum(bb.emit(relax.op.multiply(cls, k)), axis=[-1]))
        bb.emit_func_output(s)
    mod = tvm.transform.Sequential([relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                                    relax.transform.FuseOps(), relax.transform.FuseTIR()])(bb.get())
    return next(f for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc)).with_attr("global_symbol", "main")


def test_reduction_left_out_of_gemv_compiles_and_computes():
    """prune-tokens' CLS scores over 128 keys: dlight's GEMV rule would take this function and
    vectorise 128 lanes around an unrolled reduction, which LLVM did not finish compiling; tcc's
    pipeline leaves GEMV out, and the function compiles (seconds) and computes q_cls . k."""
    target = get_target("x86").tvm_target()
    mod = tvm.IRModule({"main": _score(128)})
    with target:
        assert dl.cpu.GEMV().apply(mod["main"], target, False) is not None  # what it would have done
        mod = dl.ApplyDefaultSchedule(Injective(), dl.cpu.Reduction())(mod)
    lib = tvm.compile(mod, target=target)
    rng = np.random.default_rng(0)
    q, k = (rng.standard_normal((1, 12, 128, 32)).astype("float32") for _ in range(2))
    out = tvm.runtime.tensor(np.zeros((1, 12, 128), "float32"))
    lib["main"](tvm.runtime.tensor(q), tvm.runtime.tensor(k), out)
    np.testing.assert_allclose(out.numpy(), np.einsum("bhr,bhjr->bhj", q[:, :, 0], k), rtol=1e-5, atol=1e-5)
