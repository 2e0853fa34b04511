"""tcc's sparse CPU kernels (backends/kernels/sparse_kernels.cc) and their layouts (sparse_layout.py),
against numpy: x86-64 built with -march=native (AVX-512 here), -march=x86-64-v3 (AVX2) and plain
-march=x86-64 (SSE2, the portable unmask loop); arm64 under qemu with -march=armv8-a (NEON).

The path under test is the TVM backend's, as in test_kernels.py: sparse_layout builds the inputs,
build_kernels -> load_static_library -> R.call_dps_packed -> relax.build -> export_library; x86
runs in relax.VirtualMachine (TVM_NUM_THREADS=2, so the work is split), arm64 as an artifact in
Arm64Session.

Tolerances:
* dense_bsr: |got - ref| <= 1e-5 * (|x| @ |W|^T + |b|) per element, ref = x @ W^T + b in float64 on
  the dense W that the BSR layout holds. Only fp32 rounding differs (the kernel sums block by block,
  in an order unlike a GEMM's); the bound is ~170 ulps of the sum of magnitudes, far above what fp32
  summation over K <= 1024 reaches on these inputs and far below the error of a misplaced block,
  a dropped block or a wrong bias (each of the order of the sum itself).
* unmask: bit-exact (the output's bytes equal the dense tensor's).
"""
from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", "2")  # TVM halves the core count on x86; split the work

import dataclasses
import json
import shutil

import numpy as np
import pytest

from tcc.backends.kernels import build, sparse_layout
from tcc.errors import UserError

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402

BSR_RTOL = 1e-5
rng = np.random.default_rng(0)


def f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def block_sparse(n, k, block, sparsity, empty_rows=()):
    """A dense [n, k] float32 weight whose r x c blocks are zero with probability `sparsity`, and
    the block rows `empty_rows` entirely zero."""
    r, c = block
    keep = rng.random((n // r, k // c)) >= sparsity
    keep[list(empty_rows)] = False
    return f32(n, k) * np.repeat(np.repeat(keep, r, 0), c, 1)


@dataclasses.dataclass
class Case:
    kernel: str
    arrays: list[np.ndarray]
    ref: np.ndarray                  # dense_bsr: float64
    bound: np.ndarray | None = None  # None: bit-exact

    @property
    def out_dtype(self) -> str:
        return "float32" if self.bound is not None else str(self.ref.dtype)


def bsr_case(lead, n, k, block, sparsity, bias=True, empty_rows=()):
    x, w, b = f32(*lead, k), block_sparse(n, k, block, sparsity, empty_rows), f32(n)
    ref = x.astype(np.float64) @ w.T.astype(np.float64) + (b if bias else 0)
    bound = BSR_RTOL * (np.abs(x) @ np.abs(w).T + (np.abs(b) if bias else 0))
    arrays = [x, *sparse_layout.to_bsr(w, block)] + ([b] if bias else [])
    return Case("tcc_dense_bsr_f32" if bias else "tcc_dense_bsr_nobias_f32", arrays, ref, bound)


def sparse_tensor(shape, dtype, density, run=1):
    """Nonzeros with probability `density`, in runs of `run` elements (run > 1: block structure)."""
    numel = int(np.prod(shape))
    keep = np.repeat(rng.random(-(-numel // run)) < density, run)[:numel]
    if dtype == np.float32:
        a = f32(numel)
    else:
        info = np.iinfo(dtype)
        a = rng.integers(info.min, info.max + 1, numel).astype(dtype)
    a[a == 0] = 1
    return np.where(keep, a, 0).astype(dtype).reshape(shape)  # (+0.0, as unmask writes it)


def unmask_case(shape, dtype, density, run=1, pad_bits=False):
    a = sparse_tensor(shape, dtype, density, run)
    values, mask = sparse_layout.compress(a)
    if pad_bits and a.size % 8:  # bits past numel: the kernel must ignore them
        mask[-1] |= np.uint8(0xFF << (a.size % 8) & 0xFF)
    return Case("tcc_unmask", [values, mask], a)


# name -> Case, run on every x86 build
CASES = {
    # block shapes with compiled kernels (decode M < 16, transposed M >= 16), N/K off multiples of 16
    "bsr_1x16_m1": bsr_case((1,), 37, 48, (1, 16), 0.5),
    "bsr_1x16_m7": bsr_case((7,), 40, 96, (1, 16), 0.6, empty_rows=(3, 4)),
    "bsr_1x16_m16": bsr_case((16,), 37, 48, (1, 16), 0.5),
    "bsr_1x16_m128": bsr_case((2, 64), 100, 384, (1, 16), 0.7),         # several chunks of xt
    "bsr_4x4_m1": bsr_case((1,), 36, 44, (4, 4), 0.5),
    "bsr_4x4_m3_nobias": bsr_case((3,), 36, 44, (4, 4), 0.5, bias=False),
    "bsr_4x4_m37": bsr_case((37,), 36, 44, (4, 4), 0.5, empty_rows=(0, 8)),  # odd M: a partial vector
    "bsr_16x1_m1": bsr_case((1,), 48, 37, (16, 1), 0.5),
    "bsr_16x1_m5": bsr_case((5,), 48, 37, (16, 1), 0.3),
    "bsr_16x1_m40": bsr_case((40,), 48, 37, (16, 1), 0.5),
    "bsr_2x8_m2": bsr_case((2,), 18, 24, (2, 8), 0.5),
    "bsr_2x8_m33_nobias": bsr_case((33,), 18, 24, (2, 8), 0.5, bias=False),
    # generic shapes (c read at run time, the generic decode loop)
    "bsr_3x5_m1": bsr_case((1,), 21, 35, (3, 5), 0.4),
    "bsr_3x5_m20": bsr_case((20,), 21, 35, (3, 5), 0.4, empty_rows=(6,)),
    "bsr_8x4_m17": bsr_case((17,), 24, 40, (8, 4), 0.5),
    "bsr_32x1_m19": bsr_case((19,), 64, 9, (32, 1), 0.5),
    "bsr_1x32_m2": bsr_case((2,), 5, 64, (1, 32), 0.3),
    # the other compiled shapes: decode (M = 3) and transposed (M = 20), 6 x 7 blocks
    **{f"bsr_{r}x{c}_m{m}": bsr_case((m,), 6 * r, 7 * c, (r, c), 0.4)
       for r, c in ((1, 8), (1, 4), (2, 2), (2, 4), (4, 1), (8, 1), (8, 8)) for m in (3, 20)},
    # fully dense, fully empty, several panels of output channels, several slices of x
    "bsr_dense_m1": bsr_case((1,), 64, 64, (4, 4), 0.0),
    "bsr_dense_m24": bsr_case((24,), 64, 64, (1, 16), 0.0),
    "bsr_empty_m3": bsr_case((3,), 32, 32, (4, 4), 1.0),
    "bsr_empty_m20_nobias": bsr_case((20,), 32, 32, (1, 16), 1.0, bias=False),
    "bsr_panels": bsr_case((20,), 1040, 64, (1, 16), 0.8),
    "bsr_slices": bsr_case((300,), 24, 1024, (4, 4), 0.9),
    # unmask, each dtype: numel off multiples of 8 and 64, block-structured, all zero, all kept
    "unmask_f32_13": unmask_case((13,), np.float32, 0.5, pad_bits=True),
    "unmask_f32_2d": unmask_case((37, 40), np.float32, 0.3),
    "unmask_f32_blocks": unmask_case((70001,), np.float32, 0.5, run=16),  # 3 chunks, split over threads
    "unmask_f32_none": unmask_case((100,), np.float32, 0.0),
    "unmask_f32_all": unmask_case((1000,), np.float32, 1.0),
    "unmask_i8_13": unmask_case((13,), np.int8, 0.5, pad_bits=True),
    "unmask_i8_1000": unmask_case((10, 100), np.int8, 0.5),
    "unmask_i8_large": unmask_case((70001,), np.int8, 0.2),
    "unmask_u8_1": unmask_case((1,), np.uint8, 1.0),
    "unmask_u8_3d": unmask_case((3, 7, 65), np.uint8, 0.7, pad_bits=True),
    "unmask_u8_blocks": unmask_case((4096,), np.uint8, 0.5, run=64),
}

# Mismatched arguments the kernels must reject: name -> (kernel, arrays, out shape, out dtype, message)
_v, _ci, _rp = sparse_layout.to_bsr(block_sparse(32, 48, (4, 16), 0.5), (4, 16))
_bad_rp = _rp.copy()
_bad_rp[3] = _bad_rp[4] + 1
_bad_ci = _ci.copy()
_bad_ci[0] = 3
_uv, _um = sparse_layout.compress(sparse_tensor((20,), np.float32, 0.5))
BAD = {
    "bad_bsr_tiling": ("tcc_dense_bsr_nobias_f32", [f32(2, 48), _v, _ci, _rp], (2, 30), "float32",
                       r"argument 'values' has shape \[\d+, 4, 16\]: its blocks of 4 x 16 must tile W \[N, K\] = \[30, 48\]"),
    "bad_bsr_row_ptr_len": ("tcc_dense_bsr_nobias_f32", [f32(2, 48), _v, _ci, _rp[:-1]], (2, 32), "float32",
                            r"argument 'row_ptr' has shape \[8\], its dim 0 must be 9"),
    "bad_bsr_row_ptr": ("tcc_dense_bsr_f32", [f32(2, 48), _v, _ci, _bad_rp, f32(32)], (2, 32), "float32",
                        r"argument 'row_ptr' must rise from 0 to nnzb"),
    "bad_bsr_col_idx": ("tcc_dense_bsr_f32", [f32(2, 48), _v, _bad_ci, _rp, f32(32)], (2, 32), "float32",
                        r"argument 'col_idx' holds 3, outside the K / c = 3 block columns"),
    "bad_bsr_col_dtype": ("tcc_dense_bsr_nobias_f32", [f32(2, 48), _v, _ci.astype(np.int64), _rp], (2, 32),
                          "float32", r"argument 'col_idx' must be int32, got int64"),
    "bad_unmask_count": ("tcc_unmask", [_uv[:-1], _um], (20,), "float32",
                         r"argument 'values' has \d+ elements, but the mask has \d+ set bits below numel = 20"),
    "bad_unmask_mask_len": ("tcc_unmask", [_uv, _um], (30,), "float32",
                            r"argument 'mask' has shape \[3\], its dim 0 must be 4 \(ceil\(numel / 8\)"),
    "bad_unmask_dtype": ("tcc_unmask", [_uv, _um], (20,), "int8", r"argument 'values' must be int8, got float32"),
    "bad_unmask_out": ("tcc_unmask", [_uv, _um], (20,), "float16", r"argument 'out' must be float32, int8 or uint8"),
}


def check(name, case, got):
    assert got.shape == case.ref.shape and got.dtype == case.out_dtype, name
    if case.bound is None:
        assert got.tobytes() == case.ref.tobytes(), f"{name}: {np.sum(got != case.ref)} elements differ"
    else:
        excess = np.abs(got - case.ref) - case.bound
        assert excess.max(initial=0.0) <= 0, f"{name}: error exceeds the bound by {excess.max():.3e}"


# ---------------------------------------------------------------------------------------------
# x86-64: one module with every case per build
# ---------------------------------------------------------------------------------------------

def add_function(bb, name, kernel, arrays, out_shape, out_dtype):
    params = [relax.Var(f"a{i}", relax.TensorType(a.shape, str(a.dtype))) for i, a in enumerate(arrays)]
    with bb.function(name, params):
        y = bb.emit(relax.call_dps_packed(kernel, params, relax.TensorType(out_shape, out_dtype)))
        bb.emit_func_output(y)


def x86_vm(lib, out_dir):
    bb = relax.BlockBuilder()
    for name, c in CASES.items():
        add_function(bb, name, c.kernel, c.arrays, c.ref.shape, c.out_dtype)
    for name, (kernel, arrays, out_shape, out_dtype, _) in BAD.items():
        add_function(bb, name, kernel, arrays, out_shape, out_dtype)
    mod = bb.get().with_attr("external_mods", [tvm.runtime.load_static_library(str(lib.object), list(lib.functions))])
    target = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    so = out_dir / "sparse_kernels_test.so"
    relax.build(mod, target).export_library(str(so), options=lib.link_options())
    return relax.VirtualMachine(tvm.runtime.load_module(str(so)), tvm.cpu())


def run(vm, name, arrays):
    return vm[name](*[tvm.runtime.tensor(a) for a in arrays]).numpy()


def _host_has(flag: str) -> bool:
    try:
        return flag in open("/proc/cpuinfo").read().split()
    except OSError:
        return False


X86_BUILDS = {"native": None, "x86-64-v3": "avx2", "x86-64": None}  # -march -> a CPU flag it needs


@pytest.fixture(scope="module", params=list(X86_BUILDS))
def x86_vm_for(request, tmp_path_factory):
    march = request.param
    if X86_BUILDS[march] and not _host_has(X86_BUILDS[march]):
        pytest.skip(f"the host has no {X86_BUILDS[march]}")
    out = tmp_path_factory.mktemp(f"sparse-{march}")
    return x86_vm(build.build_kernels("x86_64", out, [f"-march={march}"]), out)


@pytest.mark.parametrize("name", list(CASES))
def test_x86_kernel_matches_reference(x86_vm_for, name):
    case = CASES[name]
    check(name, case, run(x86_vm_for, name, case.arrays))


@pytest.mark.parametrize("name", list(BAD))
def test_kernel_rejects_bad_arguments(x86_vm_for, name):
    _, arrays, _, _, message = BAD[name]
    with pytest.raises((TypeError, ValueError), match=message):
        run(x86_vm_for, name, arrays)


def test_sparse_kernels_are_exported():
    assert {"tcc_dense_bsr_f32", "tcc_dense_bsr_nobias_f32", "tcc_unmask"} <= set(build.exported_functions())


# ---------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------

def test_to_bsr_layout_and_round_trip():
    w = np.zeros((8, 12), np.float32)
    w[0:2, 4:8] = 1.0     # block (0, 1)
    w[4, 11] = 2.0        # block (2, 2)
    w[5, 0] = 3.0         # block (2, 0); block row 1 (rows 2, 3) is empty
    values, col_idx, row_ptr = sparse_layout.to_bsr(w, (2, 4))
    assert values.shape == (3, 2, 4) and values.dtype == np.float32 and values.flags.c_contiguous
    assert col_idx.tolist() == [1, 0, 2] and col_idx.dtype == np.int32
    assert row_ptr.tolist() == [0, 1, 1, 3, 3] and row_ptr.dtype == np.int32
    assert values[2, 0, 3] == 2.0 and values[1, 1, 0] == 3.0 and (values[0] == 1.0).all()
    assert np.array_equal(sparse_layout.from_bsr(values, col_idx, row_ptr, (8, 12)), w)
    assert sparse_layout.bsr_bytes(values, col_idx, row_ptr) == 3 * 8 * 4 + 3 * 4 + 5 * 4


def test_to_bsr_random_round_trip_and_edges():
    for block in ((1, 16), (4, 4), (16, 1), (2, 8), (3, 5)):
        w = block_sparse(48, 80, block, 0.6)
        assert np.array_equal(sparse_layout.from_bsr(*sparse_layout.to_bsr(w, block), w.shape), w)
    values, col_idx, row_ptr = sparse_layout.to_bsr(np.zeros((4, 4), np.float32), (2, 2))
    assert values.shape == (0, 2, 2) and col_idx.shape == (0,) and row_ptr.tolist() == [0, 0, 0]
    with pytest.raises(UserError, match=r"blocks of 3 x 4 do not tile W \[8, 12\]"):
        sparse_layout.to_bsr(np.ones((8, 12), np.float32), (3, 4))
    with pytest.raises(UserError, match="2-d float32"):
        sparse_layout.to_bsr(np.ones((8, 12)), (2, 2))
    with pytest.raises(UserError, match="not a BSR layout"):
        sparse_layout.from_bsr(values, col_idx, row_ptr, (6, 4))  # row_ptr is for 2 block rows, not 3


def test_compress_bit_order_and_round_trip():
    a = np.array([0, 5, 0, 0, 0, 0, 0, 7, 9], np.int8)
    values, mask = sparse_layout.compress(a)
    assert values.tolist() == [5, 7, 9] and mask.tolist() == [0b10000010, 0b00000001]
    assert np.array_equal(sparse_layout.decompress(values, mask, a.shape, np.int8), a)
    f = np.array([[0.0, -0.0, np.nan], [1.5, 0.0, -2.0]], np.float32)
    values, mask = sparse_layout.compress(f)
    back = sparse_layout.decompress(values, mask, f.shape, np.float32)
    assert np.isnan(back[0, 2]) and back[1, 0] == 1.5 and back[1, 2] == -2.0 and not back[0, :2].any()
    assert sparse_layout.compressed_bytes(values, mask) == 3 * 4 + 1
    with pytest.raises(UserError, match="use float32, int8 or uint8"):
        sparse_layout.compress(np.ones(3, np.float64))
    with pytest.raises(UserError, match=r"values must be int8 \[3\]"):
        sparse_layout.decompress(np.ones(2, np.int8), np.array([0b111], np.uint8), (3,), np.int8)


# ---------------------------------------------------------------------------------------------
# arm64 under qemu: one artifact whose main runs a few small cases and returns all outputs
# ---------------------------------------------------------------------------------------------

ARM_TOOLS = ("aarch64-linux-gnu-gcc", "aarch64-linux-gnu-g++", "qemu-aarch64")
ARM_CASES = {
    "bsr_1x16_m1": bsr_case((1,), 37, 48, (1, 16), 0.5),
    "bsr_4x4_m5": bsr_case((5,), 36, 44, (4, 4), 0.5, empty_rows=(2,)),
    "bsr_16x1_m20": bsr_case((20,), 48, 37, (16, 1), 0.5),
    "bsr_1x16_m37_nobias": bsr_case((37,), 40, 64, (1, 16), 0.6, bias=False),
    "bsr_2x8_m18": bsr_case((18,), 18, 24, (2, 8), 0.5),
    "bsr_3x5_m3": bsr_case((3,), 21, 35, (3, 5), 0.4),
    "unmask_f32": unmask_case((1003,), np.float32, 0.5, pad_bits=True),
    "unmask_i8": unmask_case((203,), np.int8, 0.4),
    "unmask_u8": unmask_case((7, 9), np.uint8, 0.6, run=4),
}


def arm64_artifact(lib, out, cases=None):
    """model.so + weights.safetensors + manifest.json: main(first array per case..., the rest...) -> outputs
    (`cases`: {name: case with kernel, arrays, ref, out_dtype}, default ARM_CASES; test_bf16.py's too)."""
    cases = ARM_CASES if cases is None else cases
    from safetensors.numpy import save_file
    inputs, params, calls = [], [], []
    for name, c in cases.items():
        first, *rest = c.arrays
        inputs.append(relax.Var(f"in_{name}", relax.TensorType(first.shape, str(first.dtype))))
        ps = [relax.Var(f"{name}_{i}", relax.TensorType(a.shape, str(a.dtype))) for i, a in enumerate(rest)]
        params += list(zip(ps, rest))
        calls.append((c, [inputs[-1], *ps]))
    bb = relax.BlockBuilder()
    with bb.function("main", inputs + [p for p, _ in params], attrs={"num_input": len(inputs)}):
        outs = [bb.emit(relax.call_dps_packed(c.kernel, args, relax.TensorType(c.ref.shape, c.out_dtype)))
                for c, args in calls]
        bb.emit_func_output(relax.Tuple(outs))
    mod = bb.get().with_attr("external_mods", [tvm.runtime.load_static_library(str(lib.object), list(lib.functions))])
    target = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72", "mattr": ["+neon"]})
    cxx = "aarch64-linux-gnu-g++"  # main has no TVM-generated kernel: the compiler names the triple
    fcompile = tvm.support.cc.cross_compiler(cxx, options=lib.link_options(),
                                             get_target_triple=tvm.support.cc.get_target_by_dump_machine(cxx))
    relax.build(mod, target).export_library(str(out / "model.so"), fcompile=fcompile)
    save_file({p.name: a for p, a in params}, str(out / "weights.safetensors"))
    spec = lambda n, a: {"name": n, "dtype": str(a.dtype), "shape": list(a.shape)}  # noqa: E731
    (out / "manifest.json").write_text(json.dumps({
        "inputs": [spec(f"in_{n}", c.arrays[0]) for n, c in cases.items()],
        "outputs": [spec(n, c.ref.astype(c.out_dtype)) for n, c in cases.items()],
        "params": [p.name for p, _ in params],
        "target": {"name": "arm64", "qemu_cpu": "cortex-a72"}}))


@pytest.mark.arm64
@pytest.mark.skipif(any(shutil.which(x) is None for x in ARM_TOOLS),
                    reason="needs aarch64-linux-gnu-g++ and qemu-aarch64 (apt-get install g++-aarch64-linux-gnu qemu-user)")
def test_arm64_kernels_match_reference(tmp_path):
    from tcc.backends.tvm.arm64 import Arm64Session
    lib = build.build_kernels("aarch64", tmp_path / "kernels", ["-march=armv8-a"])
    arm64_artifact(lib, tmp_path)
    with Arm64Session(tmp_path) as session:
        got = session({f"in_{n}": c.arrays[0] for n, c in ARM_CASES.items()})
    for name, case in ARM_CASES.items():
        check(name, case, got[name])
