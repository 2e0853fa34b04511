"""tcc_dense_f32's small-M path (M <= 16: a speculative verify's rows, a decode step) against tcc/ir/ops.py
dense (torch), on every ISA it compiles for: x86-64 -march=native (AVX-512 here), x86-64-v3 (AVX2 +
FMA), plain x86-64 (the 4-float GCC vector), and arm64 under qemu (-march=armv8-a, NEON).

Shapes: M = 1..9 and 16 (the last small-M size), 17 (OpenBLAS sgemm); K and N odd, so every block
has a tail: K = 37 (2 zmm + 5 floats, 4 ymm + 5), N = 29; K = 601, N = 70; K = 1 (all tail). N is not
a multiple of the 2 or 4 weight rows per block. TVM_NUM_THREADS=2 splits the columns over two threads.

Tolerance: |got - ref| <= 1e-6 * (|x| @ |w|^T + |b|) per element (fp32 rounding of the summation order
only; eps = 6e-8). Exactness: each row of an M-row call equals the M = 1 call on that row bit for bit
(the path sums every output element in the same order whatever M is), which is what lets a
speculative verify reproduce the decode step's logits. The same for tcc_dense_w8 (int8 codes, per-row
scales: M = 1, 5, 6, 8, 16 read the codes directly, 17 dequantizes for sgemm) and tcc_sdpa's few-rows path (Sq <= 16):
8 causal query rows (D = 70) against each row alone over the keys it sees, within 1e-5 of torch.
"""
from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", "2")

import shutil

import numpy as np
import pytest
import torch

from tcc.ir import ops
from tcc.backends.kernels import build

tvm = pytest.importorskip("tvm")

from test_quant_kernels import (FLOAT_BUILDS, ARM_TOOLS, Case, arm64_artifact, check, run,  # noqa: E402
                                x86_float_vm)  # noqa: E402

rng = np.random.default_rng(7)
WEIGHTS = {k: (rng.standard_normal((n, k)).astype(np.float32), rng.standard_normal(n).astype(np.float32))
           for k, n in ((37, 29), (601, 70), (1, 5))}


def dense_case(m, k, bias=True):
    """x[m, k] against WEIGHTS[k] (every case of one K shares them, so their rows can be compared)."""
    x = rng.standard_normal((m, k)).astype(np.float32)
    w, b = WEIGHTS[k]
    ref = ops.dense(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b) if bias else None).numpy()
    bound = 1e-6 * (np.abs(x) @ np.abs(w).T + (np.abs(b) if bias else 0))
    return Case("tcc_dense_f32" if bias else "tcc_dense_nobias_f32", [x, w, b] if bias else [x, w], [], ref, bound)


CASES = {f"m{m}_k37": dense_case(m, 37) for m in (*range(1, 10), 16, 17)}
CASES |= {f"m{m}_k601": dense_case(m, 601) for m in (1, 8, 17)}
CASES |= {"m1_k37_nobias": dense_case(1, 37, bias=False), "m6_k37_nobias": dense_case(6, 37, bias=False),
          "m3_k1": dense_case(3, 1)}  # K = 1: shorter than a vector, all tail

QW8 = {k: (rng.integers(-127, 128, (n, k)).astype(np.int8), (rng.random(n) * 0.02 + 1e-3).astype(np.float32),
           rng.standard_normal(n).astype(np.float32)) for k, n in ((37, 29), (601, 70))}


def w8_case(m, k, bias=True):
    """tcc_dense_w8: x[m, k] against the int8 codes QW8[k] and their per-row scales (the same for every
    case of one K); small M reads the codes directly, 17 rows dequantize blocks for sgemm."""
    x = rng.standard_normal((m, k)).astype(np.float32)
    qw, scale, b = QW8[k]
    ref = ops.dense_w8(torch.from_numpy(x), torch.from_numpy(qw), torch.from_numpy(scale),
                       torch.from_numpy(b) if bias else None).numpy()
    bound = 1e-6 * ((np.abs(x) @ np.abs(qw.astype(np.float32)).T) * scale + (np.abs(b) if bias else 0))
    return Case("tcc_dense_w8_f32" if bias else "tcc_dense_w8_nobias_f32", [x, qw, scale, b] if bias else [x, qw, scale],
                [], ref, bound)


CASES |= {f"w8_m{m}_k37": w8_case(m, 37) for m in (1, 5, 8, 16, 17)}
CASES |= {f"w8_m{m}_k601": w8_case(m, 601) for m in (1, 8)} | {"w8_m1_k37_nobias": w8_case(1, 37, False),
                                                              "w8_m6_k37_nobias": w8_case(6, 37, False)}


def sdpa_case(q, k, v):
    """Causal attention of q's rows over the keys (query i sees keys <= i + Sk - Sq), scale 0.3."""
    ref = ops.sdpa(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v), None, 0.3, True).numpy()
    return Case("tcc_sdpa_nomask_f32", [q, k, v], [0.3, True], ref, np.full(ref.shape, 1e-5, np.float32))


# sdpa's few-rows path (Sq <= 16: a decode step, a verify): 8 query rows over 29 keys, 14 query heads on
# 2 KV heads (each thread's 7 heads run together: p v in blocks of 6 and 1 rows, or 3 on 16-register ISAs),
# D = 70 (4 zmm + 6, 8 ymm + 6); each row alone over the keys it sees (22 + i)
SDPA_Q, SDPA_K, SDPA_V = (rng.standard_normal(s).astype(np.float32) for s in ((1, 14, 8, 70), (1, 2, 29, 70), (1, 2, 29, 70)))
CASES |= {"sdpa_q8": sdpa_case(SDPA_Q, SDPA_K, SDPA_V)}
CASES |= {f"sdpa_q1_row{i}": sdpa_case(SDPA_Q[:, :, i:i + 1], SDPA_K[:, :, :22 + i], SDPA_V[:, :, :22 + i]) for i in range(8)}
@pytest.fixture(scope="module", params=list(FLOAT_BUILDS))
def x86(request, tmp_path_factory):
    return x86_float_vm(request.param, tmp_path_factory, CASES, {}, "dense")


@pytest.mark.parametrize("name", list(CASES))
def test_small_m_dense_matches_torch(x86, name):
    check(name, CASES[name], run(x86, name, CASES[name].arrays))


@pytest.mark.parametrize("name,single", [("m8_k37", "m1_k37"), ("m9_k37", "m1_k37"), ("m8_k601", "m1_k601"),
                                         ("m6_k37_nobias", "m1_k37_nobias"), ("w8_m8_k37", "w8_m1_k37"),
                                         ("w8_m16_k37", "w8_m1_k37"), ("w8_m8_k601", "w8_m1_k601"),
                                         ("w8_m6_k37_nobias", "w8_m1_k37_nobias")])
def test_rows_are_bit_identical_to_one_row_calls(x86, name, single):
    x, *rest = CASES[name].arrays
    one_by_one = np.concatenate([run(x86, single, [x[i:i + 1], *rest]) for i in range(len(x))])
    assert np.array_equal(run(x86, name, CASES[name].arrays), one_by_one)


def test_attention_rows_are_bit_identical_to_one_row_calls(x86):
    """A verify's row i (8 query rows at once) is the decode step at its position (one query row over
    the keys up to it) bit for bit."""
    rows = run(x86, "sdpa_q8", CASES["sdpa_q8"].arrays)
    for i in range(8):
        assert np.array_equal(rows[:, :, i:i + 1], run(x86, f"sdpa_q1_row{i}", CASES[f"sdpa_q1_row{i}"].arrays)), i


ARM_CASES = {n: CASES[n] for n in ("m1_k37", "m2_k37", "m5_k37", "m8_k37", "m16_k37", "m8_k601", "m6_k37_nobias",
                                   "m3_k1", "w8_m5_k37", "w8_m8_k601")}


@pytest.mark.arm64
@pytest.mark.skipif(any(shutil.which(x) is None for x in ARM_TOOLS),
                    reason="needs aarch64-linux-gnu-g++ and qemu-aarch64 (apt-get install g++-aarch64-linux-gnu qemu-user)")
def test_arm64_small_m_dense_matches_torch(tmp_path):
    from tcc.backends.tvm.arm64 import Arm64Session
    lib = build.build_kernels("aarch64", tmp_path / "kernels", ["-march=armv8-a"])
    arm64_artifact(lib, tmp_path, "cortex-a72", "cortex-a72", ARM_CASES)
    with Arm64Session(tmp_path) as session:
        got = session({f"x_{n}": c.arrays[0] for n, c in ARM_CASES.items()})
    for name, case in ARM_CASES.items():
        check(name, case, got[name])
