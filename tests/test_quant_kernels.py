"""tcc's low-precision CPU kernels (backends/kernels/quant_kernels.cc) against tcc/ir/ops.py, on every
int8 path: x86-64 built with -march=native (AVX-512 VNNI here), -march=x86-64-v3 (AVX2, no VNNI)
and plain -march=x86-64 (the portable loop); arm64 under qemu, -march=armv8.2-a+dotprod (sdot, qemu
-cpu neoverse-n1) and -march=armv8-a (plain NEON, -cpu cortex-a72).

The path under test is the TVM backend's, as in test_kernels.py: quant_layout packs the weights,
build_kernels -> load_static_library -> R.call_dps_packed (asym as relax.prim_value) -> relax.build
-> export_library(options=link_options()); x86 runs in relax.VirtualMachine, arm64 as an artifact in
Arm64Session. Each build's object must name the int8 path it was meant to compile.

Tolerances:
* dense_a8w8: bit-exact (max error 0). The kernels quantize with the reference's float32 division
  and round-half-even, the integer dot products are exact, and the epilogue is the reference's
  float64 (acc * s) * w_scale rounded to float32, plus b. Ties (x/s exactly k + 0.5) are exercised
  on purpose: a power-of-two static scale over quarter-integer inputs.
* dense_w4: |got - ref| <= 1e-6 * (|x| @ Wmax^T + |b|) per element, Wmax[n, k] = 15 * scale of
  (n, k)'s group, the largest |code - zero| (and |code|) times the scale. Only fp32 rounding differs
  from the reference: the summation order, and for M <= 32 the scale and zero point factored out of
  each group (fp32 eps = 6e-8: the bound allows ~17 ulps of the sum of magnitudes; seen here: up
  to 5% of it, so a misplaced nibble or zero point fails by orders of magnitude).
"""
from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", "2")  # TVM halves the core count on x86; split the work

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from tcc.ir import ops
from tcc.backends.kernels import build, quant_layout
from tcc.errors import UserError

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402

W4_RTOL = 1e-6
rng = np.random.default_rng(0)


def f32(*shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def t(a):
    return None if a is None else torch.from_numpy(a)


@dataclasses.dataclass
class Case:
    kernel: str
    arrays: list[np.ndarray]
    scalars: list
    ref: np.ndarray
    bound: np.ndarray | None = None  # None: bit-exact


def a8w8_case(lead, k, n, bias=True, asym=False, static=None, x=None):
    """static: None (dynamic per-row scale) or (x_scale, x_zero)."""
    x = f32(*lead, k) if x is None else x
    qw = rng.integers(-128, 128, (n, k)).astype(np.int8)  # the full int8 range, -128 too
    w_scale = (rng.random(n) * 0.02 + 1e-3).astype(np.float32)
    b = f32(n)
    xs, xz = (None, None) if static is None else (np.array([static[0]], np.float32), np.array([static[1]], np.float32))
    ref = ops.dense_a8w8(t(x), t(qw), t(w_scale), t(b) if bias else None, t(xs), t(xz), asym).numpy()
    packed, wsum = quant_layout.pack_a8w8(qw)
    name = "tcc_dense_a8w8" + ("_static" if static else "") + ("" if bias else "_nobias") + "_f32"
    arrays = [x, packed, wsum, w_scale] + ([b] if bias else []) + ([xs, xz] if static else [])
    return Case(name, arrays, [asym], ref)


def w4_case(lead, k, n, group, bias=True, zero=True):
    x = f32(*lead, k)
    qw = rng.integers(0, 256, (n, k // 2)).astype(np.uint8)
    scale = (rng.random((n, k // group)) * 0.02 + 1e-3).astype(np.float32)
    z = rng.integers(0, 16, (n, k // group)).astype(np.uint8) if zero else None
    if zero == "float":  # fractional zero points (quantize zero=float), also outside 0..15
        z = (rng.random((n, k // group)) * 20 - 2).astype(np.float32)
    b = f32(n)
    ref = ops.dense_w4(t(x), t(qw), t(scale), t(z), group, t(b) if bias else None).numpy()
    wmax = 15 * np.repeat(scale, group, axis=1)  # |code - zero| and |code| are at most 15
    bound = W4_RTOL * (np.abs(x) @ wmax.T + (np.abs(b) if bias else 0))
    arrays = [x, *quant_layout.pack_w4(qw, scale, z)] + ([b] if bias else [])
    return Case("tcc_dense_w4_f32" if bias else "tcc_dense_w4_nobias_f32", arrays, [], ref, bound)


def w4a8_case(lead, k, n, group, bias=True, zero=True, half=True, x=None):
    """tcc::dense_w4 with acts="int8" on pack_w4a8's layout; half: float16 scales (the quantize
    pass's), else float32. Same bound as dense_w4: the activation codes are bit-exact with the
    reference's (its float32 division and round-half-even), only the fp32 sums differ."""
    x = f32(*lead, k) if x is None else x
    qw = rng.integers(0, 256, (n, k // 2)).astype(np.uint8)
    scale = (rng.random((n, k // group)) * 0.02 + 1e-3).astype(np.float16 if half else np.float32)
    z = rng.integers(0, 16, (n, k // group)).astype(np.uint8) if zero else None
    if zero == "float":
        z = (rng.random((n, k // group)) * 20 - 2).astype(np.float32)
    b = f32(n)
    ref = ops.dense_w4(t(x), t(qw), t(scale), t(z), group, t(b) if bias else None, "int8").numpy()
    wmax = 15 * np.repeat(scale.astype(np.float32), group, axis=1)
    bound = W4_RTOL * (np.abs(x).reshape(-1, k) @ wmax.T + (np.abs(b) if bias else 0)).reshape(ref.shape)
    arrays = [x, *quant_layout.pack_w4a8(qw, scale, z)] + ([b] if bias else [])
    return Case("tcc_dense_w4a8_f32" if bias else "tcc_dense_w4a8_nobias_f32", arrays, [], ref, bound)


def special_rows(k):
    """Rows that exercise the edges of the dynamic quantization: all zero (s = 1), all positive
    (asym: z = 0), all negative (asym: z = 255), one large outlier, and ordinary rows."""
    x = f32(6, k)
    x[0] = 0
    x[1] = np.abs(x[1]) + 0.1
    x[2] = -np.abs(x[2]) - 0.1
    x[3, k // 2] = 1e3
    return x


def ties(m, k):
    """Quarter integers: with x_scale 0.5, x / s is often exactly k + 0.5 (round half to even)."""
    return (rng.integers(-300, 300, (m, k)) / 4).astype(np.float32)


# name -> Case, run on x86 (every build)
CASES = {
    "a8w8_m1": a8w8_case((1,), 384, 1152),
    "a8w8_m7_asym": a8w8_case((7,), 200, 65, asym=True),
    "a8w8_m128_k_odd": a8w8_case((2, 64), 333, 37),           # K not a multiple of 4, N odd
    "a8w8_nobias": a8w8_case((5,), 64, 48, bias=False),
    "a8w8_nobias_asym": a8w8_case((9,), 72, 100, bias=False, asym=True),
    "a8w8_tall": a8w8_case((70,), 40, 20),                    # M > N: the rows are split
    "a8w8_special_sym": a8w8_case((), 96, 33, x=special_rows(96)),
    "a8w8_special_asym": a8w8_case((), 96, 33, asym=True, x=special_rows(96)),
    "a8w8_static_sym_clip": a8w8_case((7,), 64, 37, static=(0.01, 3.0)),    # most codes clip; zero ignored
    "a8w8_static_asym": a8w8_case((128,), 100, 50, asym=True, static=(0.02, 100.0)),
    "a8w8_static_ties": a8w8_case((), 64, 17, static=(0.5, 0.0), x=ties(5, 64)),
    "a8w8_static_ties_asym": a8w8_case((), 64, 17, asym=True, static=(0.5, 77.0), x=ties(5, 64)),
    "a8w8_static_nobias": a8w8_case((3,), 32, 16, bias=False, asym=True, static=(0.05, 128.0)),
    "w4_m1": w4_case((1,), 576, 960, 32),
    "w4_m7_sym": w4_case((7,), 200, 65, 8, zero=False),       # direct loop, a partial block of 4 rows
    "w4_m128": w4_case((2, 64), 384, 37, 128),                # sgemm path
    "w4_nobias": w4_case((3,), 96, 48, 96, bias=False),
    "w4_m20_nobias": w4_case((20,), 1024, 300, 64, bias=False),  # direct loop, 5 blocks of 4 rows
    "w4_m40": w4_case((40,), 1024, 300, 64),                 # sgemm path, several dequantized blocks
    "w4_tall": w4_case((70,), 40, 20, 2),                     # M > N, group 2
    "w4_m1_float_zero": w4_case((1,), 576, 70, 32, zero="float"),   # direct loop, fractional zeros
    "w4_m64_float_zero": w4_case((64,), 96, 40, 32, zero="float"),  # sgemm path, fractional zeros
    # W4A8 (acts="int8"): groups 32/64/128, odd N, K not a multiple of 64, M = 1..4 and > 32
    "w4a8_m1_g32_asym": w4a8_case((1,), 576, 960, 32),
    "w4a8_m1_g128_sym": w4a8_case((1,), 384, 37, 128, zero=False),
    "w4a8_m2_g64_float_zero": w4a8_case((2,), 320, 65, 64, zero="float"),
    "w4a8_m3_g32_f32_scale": w4a8_case((3,), 96, 33, 32, half=False, bias=False),
    "w4a8_m4_g12": w4a8_case((4,), 36, 17, 12),             # group not a multiple of 8: padded octets
    "w4a8_m7_g2": w4a8_case((7,), 10, 20, 2, zero="float"),  # a partial block of 4 rows, group 2
    "w4a8_special": w4a8_case((), 96, 33, 32, x=special_rows(96)),  # all-zero blocks (s = 1), outliers
    "w4a8_m5_g32_asym": w4a8_case((5,), 96, 37, 32),
    # the GEMM (M > 32): odd N, sym (zero 8) and asym, integer and fractional zero points, M > N
    "w4a8_m33_g12": w4a8_case((33,), 36, 17, 12),            # padded octets: code 0 past the group
    "w4a8_m33_g128_sym": w4a8_case((33,), 384, 65, 128, zero=False),
    "w4a8_m128_g32_float_zero": w4a8_case((128,), 160, 53, 32, zero="float"),
    "w4a8_m128_g128_sym_f32_scale": w4a8_case((2, 64), 256, 101, 128, zero=False, half=False, bias=False),
    "w4a8_m40_g64": w4a8_case((40,), 448, 70, 64),
    "w4a8_m70_g32_float_zero": w4a8_case((2, 35), 96, 20, 32, zero="float", bias=False),  # M > N: rows split
}

# Mismatched arguments the kernels must reject: name -> (kernel, arrays, scalars, out shape, message)
_qw = rng.integers(-127, 128, (37, 40)).astype(np.int8)
_packed, _wsum = quant_layout.pack_a8w8(_qw)
_w4 = quant_layout.pack_w4(rng.integers(0, 256, (37, 20)).astype(np.uint8), np.ones((37, 4), np.float32))
_one = np.ones(1, np.float32)
BAD = {
    "bad_a8w8_unpacked": ("tcc_dense_a8w8_nobias_f32", [f32(2, 40), _qw.reshape(37, 10, 1, 4), _wsum, f32(37)],
                          [False], (2, 37), r"argument 'qw' has shape \[37, 10, 1, 4\], its dim 0 must be 3 "
                                            r"\(ceil\(N / 16\), N = 37 \(pack the weights with .*pack_a8w8\)"),
    "bad_a8w8_k": ("tcc_dense_a8w8_f32", [f32(2, 44), _packed, _wsum, f32(37), f32(37)], [False], (2, 37),
                   r"tcc_dense_a8w8_f32: argument 'qw' has shape \[3, 10, 16, 4\], its dim 1 must be 11"),
    "bad_a8w8_wsum": ("tcc_dense_a8w8_f32", [f32(2, 40), _packed, _wsum.astype(np.int64), f32(37), f32(37)], [False],
                      (2, 37), r"argument 'wsum' must be int32, got int64"),
    "bad_a8w8_scale": ("tcc_dense_a8w8_static_nobias_f32", [f32(2, 40), _packed, _wsum, f32(37), 0 * _one, _one],
                       [False], (2, 37), r"x_scale must be a positive finite number, got 0"),
    "bad_a8w8_zero": ("tcc_dense_a8w8_static_nobias_f32", [f32(2, 40), _packed, _wsum, f32(37), _one, _one / 2],
                      [True], (2, 37), r"x_zero must be an integer in \[0, 255\] for asymmetric activations, got 0.5"),
    "bad_w4_groups": ("tcc_dense_w4_nobias_f32", [f32(2, 40), _w4[0], np.ones((3, 48), np.float32), _w4[2]], [],
                      (2, 37), r"its 3 groups must divide K = 40 into groups of even size"),
    "bad_w4_k_odd": ("tcc_dense_w4_nobias_f32", [f32(2, 41), *_w4], [], (2, 37), r"K = 41 .* must be even"),
    "bad_w4_n": ("tcc_dense_w4_nobias_f32", [f32(2, 40), *_w4], [], (2, 50),
                 r"argument 'qw' has shape \[3, 20, 16\], its dim 0 must be 4 \(ceil\(N / 16\), N = 50"),
}


def int8_path(lib) -> str:
    data = lib.object.read_bytes()
    at = data.index(b"tcc_int8_path=") + len("tcc_int8_path=")
    return data[at:data.index(b";", at)].decode()


def check(name, case, got):
    assert got.shape == case.ref.shape, name
    if case.bound is None:
        assert np.array_equal(got, case.ref), f"{name}: max abs error {np.abs(got - case.ref).max():.3e}, want 0"
    else:
        excess = np.abs(got - case.ref) - case.bound
        assert excess.max() <= 0, f"{name}: error exceeds the bound by {excess.max():.3e}"


# ---------------------------------------------------------------------------------------------
# x86-64: one module with every case per build
# ---------------------------------------------------------------------------------------------

from test_kernels import add_function  # noqa: E402  (one Relax function per case, as for the fp32 kernels)


def x86_vm(lib, out_dir, cases=None, bad=None):
    """A VirtualMachine with one function per case (default CASES) and per bad call (default BAD)."""
    bb = relax.BlockBuilder()
    for name, c in (CASES if cases is None else cases).items():
        add_function(bb, name, c.kernel, c.arrays, c.scalars, c.ref.shape)
    for name, (kernel, arrays, scalars, out_shape, _) in (BAD if bad is None else bad).items():
        add_function(bb, name, kernel, arrays, scalars, out_shape)
    mod = bb.get().with_attr("external_mods", [tvm.runtime.load_static_library(str(lib.object), list(lib.functions))])
    target = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    so = out_dir / "quant_kernels_test.so"
    relax.build(mod, target).export_library(str(so), options=lib.link_options())
    return relax.VirtualMachine(tvm.runtime.load_module(str(so)), tvm.cpu())


def run(vm, name, arrays):
    return vm[name](*[tvm.runtime.tensor(a) for a in arrays]).numpy()


X86_BUILDS = {  # -march -> the int8 path it must compile
    "native": "avx512vnni",
    "x86-64-v3": "avx2",
    "x86-64": "scalar",
}


# -march -> the CPU flag the host needs to run it (test_dense_small_m, test_rotate_kernel)
FLOAT_BUILDS = {"native": "avx512f", "x86-64-v3": "avx2", "x86-64": None}


def x86_float_vm(march: str, tmp_path_factory, cases: dict, bad: dict, prefix: str):
    """The kernels built with -march=`march` (skipped when the host lacks FLOAT_BUILDS[march]), in a VM
    over `cases` / `bad`."""
    flag = FLOAT_BUILDS[march]
    if flag and not _host_has(flag):
        pytest.skip(f"the host has no {flag}")
    out = tmp_path_factory.mktemp(f"{prefix}-{march}")
    return x86_vm(build.build_kernels("x86_64", out, [f"-march={march}"]), out, cases, bad)


def _host_has(flag: str) -> bool:
    try:
        return flag in open("/proc/cpuinfo").read().split()
    except OSError:
        return False


@pytest.fixture(scope="module", params=list(X86_BUILDS))
def x86(request, tmp_path_factory):
    march = request.param
    if march == "native" and not _host_has("avx512_vnni"):
        pytest.skip("the host has no AVX-512 VNNI")
    if march == "x86-64-v3" and not _host_has("avx2"):
        pytest.skip("the host has no AVX2")
    out = tmp_path_factory.mktemp(f"quant-{march}")
    lib = build.build_kernels("x86_64", out, [f"-march={march}"])
    return march, lib, x86_vm(lib, out)


def test_build_compiles_the_intended_int8_path(x86):
    march, lib, _ = x86
    assert int8_path(lib) == X86_BUILDS[march]


@pytest.mark.parametrize("name", list(CASES))
def test_x86_kernel_matches_reference(x86, name):
    _, _, vm = x86
    case = CASES[name]
    check(name, case, run(vm, name, case.arrays))


@pytest.mark.parametrize("name", list(BAD))
def test_kernel_rejects_bad_arguments(x86, name):
    _, _, vm = x86
    _, arrays, _, _, message = BAD[name]
    with pytest.raises((TypeError, ValueError), match=message):
        run(vm, name, arrays)


def test_quant_kernels_are_exported():
    assert {"tcc_dense_a8w8_f32", "tcc_dense_a8w8_nobias_f32", "tcc_dense_a8w8_static_f32",
            "tcc_dense_a8w8_static_nobias_f32", "tcc_dense_w4_f32", "tcc_dense_w4_nobias_f32",
            "tcc_dense_w4a8_f32", "tcc_dense_w4a8_nobias_f32"} <= set(build.exported_functions())


# ---------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------

def test_pack_a8w8_layout():
    qw = rng.integers(-128, 128, (37, 10)).astype(np.int8)
    packed, wsum = quant_layout.pack_a8w8(torch.from_numpy(qw))  # torch tensors are accepted too
    assert packed.shape == (3, 3, 16, 4) and packed.dtype == np.int8 and packed.flags.c_contiguous
    assert packed[2, 1, 3, 2] == qw[35, 6] and packed[0, 2, 5, 1] == qw[5, 9]
    assert not packed[2, :, 5:].any() and not packed[:, 2, :, 2:].any()  # padding past N and K
    assert np.array_equal(wsum, qw.astype(np.int64).sum(1)) and wsum.dtype == np.int32


def test_pack_w4_layout():
    qw = rng.integers(0, 256, (20, 6)).astype(np.uint8)
    scale = rng.random((20, 3)).astype(np.float32)
    packed, scale_t, zero_t = quant_layout.pack_w4(qw, scale)
    assert packed.shape == (2, 6, 16) and packed[1, 4, 3] == qw[19, 4] and not packed[1, :, 4:].any()
    assert scale_t.shape == (3, 32) and scale_t[2, 19] == scale[19, 2] and not scale_t[:, 20:].any()
    assert zero_t.shape == (3, 32) and (zero_t == 8).all()  # symmetric: zero code 8
    z = rng.integers(0, 16, (20, 3)).astype(np.uint8)
    assert quant_layout.pack_w4(qw, scale, z)[2][1, 7] == z[7, 1]
    zf = rng.random((20, 3)).astype(np.float32) * 15
    zero_t = quant_layout.pack_w4(qw, scale, torch.from_numpy(zf))[2]  # fractional zero points stay float32
    assert zero_t.dtype == np.float32 and zero_t[1, 7] == zf[7, 1] and (zero_t[:, 20:] == 8).all()
    with pytest.raises(UserError, match="even group"):
        quant_layout.pack_w4(qw, rng.random((20, 4)).astype(np.float32))  # K = 12 in 4 groups of 3


# ---------------------------------------------------------------------------------------------
# arm64 under qemu: one artifact whose main runs a few small cases and returns all outputs
# ---------------------------------------------------------------------------------------------

ARM_TOOLS = ("aarch64-linux-gnu-gcc", "aarch64-linux-gnu-g++", "qemu-aarch64")
ARM_BUILDS = {  # -march -> (qemu cpu, TVM mcpu, int8 path)
    "armv8.2-a+dotprod": ("neoverse-n1", "neoverse-n1", "neon-dotprod"),
    "armv8-a": ("cortex-a72", "cortex-a72", "neon"),
}
ARM_CASES = {
    "a8w8": a8w8_case((7,), 40, 37),
    "a8w8_asym_m1": a8w8_case((1,), 70, 20, bias=False, asym=True),
    "a8w8_special_asym": a8w8_case((), 48, 17, asym=True, x=special_rows(48)),
    "a8w8_static_ties": a8w8_case((), 32, 17, asym=True, static=(0.5, 77.0), x=ties(3, 32)),
    "w4_m3": w4_case((3,), 64, 37, 16),
    "w4_m40_sym": w4_case((40,), 48, 33, 8, bias=False, zero=False),  # sgemm path
    "w4_m2_float_zero": w4_case((2,), 64, 20, 32, zero="float"),
    "w4a8_m1": w4a8_case((1,), 96, 37, 32),
    "w4a8_m3_float_zero": w4a8_case((3,), 72, 20, 12, zero="float", half=False),
    "w4a8_m36_sym": w4a8_case((36,), 64, 33, 64, zero=False, bias=False),  # the GEMM
    "w4a8_m33_g32_asym": w4a8_case((33,), 64, 37, 32),
    "w4a8_m34_g12_float_zero": w4a8_case((34,), 36, 20, 12, zero="float"),
}


def arm64_artifact(lib, out, mcpu, qemu_cpu, cases=None):
    """model.so + weights.safetensors + manifest.json: main(x per case..., packed weights...) -> outputs
    (cases: name -> Case, default ARM_CASES)."""
    cases = ARM_CASES if cases is None else cases
    from safetensors.numpy import save_file
    inputs, params, calls = [], [], []
    for name, c in cases.items():
        x, *rest = c.arrays
        inputs.append(relax.Var(f"x_{name}", relax.TensorType(x.shape, "float32")))
        ps = [relax.Var(f"{name}_{i}", relax.TensorType(a.shape, str(a.dtype))) for i, a in enumerate(rest)]
        params += list(zip(ps, rest))
        calls.append((c, [inputs[-1], *ps]))
    bb = relax.BlockBuilder()
    with bb.function("main", inputs + [p for p, _ in params], attrs={"num_input": len(inputs)}):
        outs = [bb.emit(relax.call_dps_packed(c.kernel, args + [relax.prim_value(s) for s in c.scalars],
                                              relax.TensorType(c.ref.shape, "float32"))) for c, args in calls]
        bb.emit_func_output(relax.Tuple(outs))
    mod = bb.get().with_attr("external_mods", [tvm.runtime.load_static_library(str(lib.object), list(lib.functions))])
    target = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": mcpu, "mattr": ["+neon"]})
    # main has no TVM-generated kernel, so no LLVM module names the target triple: the compiler does
    cxx = "aarch64-linux-gnu-g++"
    fcompile = tvm.support.cc.cross_compiler(cxx, options=lib.link_options(),
                                             get_target_triple=tvm.support.cc.get_target_by_dump_machine(cxx))
    relax.build(mod, target).export_library(str(out / "model.so"), fcompile=fcompile)
    save_file({p.name: a for p, a in params}, str(out / "weights.safetensors"))
    spec = lambda n, a: {"name": n, "dtype": str(a.dtype), "shape": list(a.shape)}  # noqa: E731
    (out / "manifest.json").write_text(json.dumps({
        "inputs": [spec(f"x_{n}", c.arrays[0]) for n, c in cases.items()],
        "outputs": [spec(n, c.ref) for n, c in cases.items()],
        "params": [p.name for p, _ in params],
        "target": {"name": "arm64", "qemu_cpu": qemu_cpu}}))


@pytest.mark.arm64
@pytest.mark.skipif(any(shutil.which(x) is None for x in ARM_TOOLS),
                    reason="needs aarch64-linux-gnu-g++ and qemu-aarch64 (apt-get install g++-aarch64-linux-gnu qemu-user)")
@pytest.mark.parametrize("march", list(ARM_BUILDS))
def test_arm64_kernels_match_reference(march, tmp_path):
    from tcc.backends.tvm.arm64 import Arm64Session
    qemu_cpu, mcpu, path = ARM_BUILDS[march]
    lib = build.build_kernels("aarch64", tmp_path / "kernels", [f"-march={march}"])
    assert int8_path(lib) == path
    arm64_artifact(lib, tmp_path, mcpu, qemu_cpu)
    with Arm64Session(tmp_path) as session:
        got = session({f"x_{n}": c.arrays[0] for n, c in ARM_CASES.items()})
    for name, case in ARM_CASES.items():
        check(name, case, got[name])
