"""rotate's online Hadamard on the CPU (issue 18 item 1): the fast Walsh-Hadamard kernel
(backends/kernels/rotate_kernels.cc, tcc_fwht_f32) against tcc/compress/rotation.py fwht (bit-exact:
the same butterflies in the same order, then one float32 multiply) and against the Program's matmul by
H_block (float32 rounding), on x86-64 -march=native (AVX-512 here), x86-64-v3 (AVX2), x86-64 (SSE2)
and arm64 NEON under qemu; and the TVM lowering: a rotated decoder's matmuls by H become the kernel
and the artifact computes what its Program does."""
from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", "2")

import shutil

import numpy as np
import pytest
import torch

from tcc.backends.kernels import build
from tcc.compress.rotation import fwht, walsh_hadamard

tvm = pytest.importorskip("tvm")

from test_quant_kernels import (FLOAT_BUILDS, ARM_TOOLS, Case, arm64_artifact, check, run,  # noqa: E402
                                x86_float_vm)  # noqa: E402

rng = np.random.default_rng(7)


def fwht_case(shape, block, scale=1.0):
    x = (rng.standard_normal(shape) * scale).astype(np.float32)
    return Case("tcc_fwht_f32", [x], [block], fwht(torch.from_numpy(x), block).numpy())


# (shape, block): blocks shorter than a vector (scalar), one vector, several, the whole row; rows
# as the lowering passes them ([..., K / block, block]) and as a flat [..., K]
CASES = {
    "b2": fwht_case((5, 6), 2),
    "b8_short": fwht_case((3, 40), 8),
    "b16": fwht_case((4, 48), 16),
    "b32_rows": fwht_case((2, 3, 96), 32),
    "b128_view": fwht_case((1, 7, 12, 128), 128),      # a down projection's input, K = 1536, 7 tokens
    "b64_smollm2_shaped": fwht_case((9, 192), 64, scale=30.0),
    "b256_whole_row": fwht_case((3, 256), 256),
    "b128_threads": fwht_case((40, 512), 128),            # > 16384 elements: TVM's thread pool splits the blocks
}
BAD = {
    "bad_block": ("tcc_fwht_f32", [np.ones((2, 12), np.float32)], [3], (2, 12), r"block 3 must be a power of two dividing K = 12"),
    "bad_divide": ("tcc_fwht_f32", [np.ones((2, 24), np.float32)], [16], (2, 24), r"block 16 must be a power of two dividing K = 24"),
}
@pytest.fixture(scope="module", params=list(FLOAT_BUILDS))
def vm(request, tmp_path_factory):
    return x86_float_vm(request.param, tmp_path_factory, CASES, BAD, "fwht")


@pytest.mark.parametrize("name", list(CASES))
def test_x86_fwht_is_the_reference_and_the_matmul(vm, name):
    case = CASES[name]
    got = run(vm, name, case.arrays)
    check(name, case, got)  # bit-exact with rotation.fwht
    x, block = case.arrays[0], case.scalars[0]
    h = walsh_hadamard(block, torch.float32).numpy()
    want = (x.reshape(-1, block) @ h).reshape(x.shape)  # the Program's matmul
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(x).max() * np.sqrt(block))


@pytest.mark.parametrize("name", list(BAD))
def test_fwht_rejects_bad_blocks(vm, name):
    _, arrays, _, _, message = BAD[name]
    with pytest.raises(ValueError, match=message):
        run(vm, name, arrays)


@pytest.mark.arm64
@pytest.mark.skipif(any(shutil.which(x) is None for x in ARM_TOOLS), reason="needs aarch64-linux-gnu-g++ and qemu-aarch64")
def test_arm64_fwht_is_the_reference(tmp_path):
    from tcc.backends.tvm.arm64 import Arm64Session
    lib = build.build_kernels("aarch64", tmp_path / "kernels", ["-march=armv8-a"])
    cases = {n: CASES[n] for n in ("b2", "b8_short", "b32_rows", "b128_view")}
    arm64_artifact(lib, tmp_path, "cortex-a72", "cortex-a72", cases)
    with Arm64Session(tmp_path) as session:
        got = session({f"x_{n}": c.arrays[0] for n, c in cases.items()})
    for name, case in cases.items():
        check(name, case, got[name])


def test_rotated_decoder_lowers_the_online_hadamard_to_the_kernel(tmp_path):
    """rotate's matmuls by H_128 become tcc_tvm::fwht in kernelize (none is left), and the x86 artifact
    matches its Program (tcc.compile checks it too)."""
    import tcc
    from tcc.backends.tvm.lower import kernelize
    from test_quantize import feeds, tiny
    from test_rotate import rotated
    program = tiny("llama")
    out, notes = rotated(program)
    assert {o["block"] for o in notes["online"]} == {128}
    gm = kernelize(out.gm)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.tcc_tvm.fwht.default) == len(notes["online"]) == 2
    assert torch.ops.aten.matmul.default not in targets
    art = tcc.compile(out, "x86", out=tmp_path / "art", latency=False)
    f = feeds(program, 1, seed=5)[0]
    want = out(f)["logits"]
    np.testing.assert_allclose(art(f)["logits"], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
