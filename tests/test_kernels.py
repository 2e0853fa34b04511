"""tcc's CPU kernels (backends/kernels) called from a TVM Relax module, checked against tcc/ir/ops.py.

The path under test is the TVM backend's: build_kernels -> tvm.runtime.load_static_library as the
module's "external_mods" -> R.call_dps_packed (scale and causal as relax.prim_value) -> relax.build
-> export_library(options=link_options()) -> relax.VirtualMachine. Every case is one function of a
single module, built once. Tolerance: max abs error <= 1e-4 against the fp32 reference; rows the
reference makes NaN (a causal query that sees no key) must be NaN too.
"""
from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", "2")  # TVM halves the core count on x86; split the work

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tcc.ir import ops
from tcc.backends.kernels import build
from tcc.errors import UserError

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402

TOL = 1e-4
rng = np.random.default_rng(0)


def f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def i8(*shape):
    return rng.integers(-127, 128, shape).astype(np.int8)


def t(a):
    return torch.from_numpy(a)


# ---------------------------------------------------------------------------------------------
# Cases: name -> (kernel, array inputs, scalar inputs, reference output)
# ---------------------------------------------------------------------------------------------

def dense_case(lead, k, n, bias):
    x, w, b = f32(*lead, k), f32(n, k), f32(n)
    ref = ops.dense(t(x), t(w), t(b) if bias else None).numpy()
    return ("tcc_dense_f32" if bias else "tcc_dense_nobias_f32", [x, w, b] if bias else [x, w], [], ref)


def sdpa_kv_case(b, h, hkv, length, ctx, d, pos, window=0, softcap=0.0):
    """New k/v rows written at pos into caches whose earlier rows hold values (and later ones junk that
    must not be read), then causal attention over rows 0..pos+length-1 (the last `window` of them for
    each query when window > 0; soft-capped scores when softcap > 0)."""
    q, k, v = f32(b, h, length, d), f32(b, hkv, length, d), f32(b, hkv, length, d)
    kc, vc = f32(b, hkv, ctx, d), f32(b, hkv, ctx, d)
    kc[:, :, pos + length:] *= 1000  # junk past the new rows: reading it would show
    vc[:, :, pos + length:] *= 1000
    ref = ops.sdpa_kv(t(q), t(k), t(v), t(kc.copy()), t(vc.copy()), torch.tensor([pos]), 0.35, window, softcap).numpy()
    return "tcc_sdpa_kv_f32", [q, k, v, kc, vc, np.array([pos], np.int64)], [0.35, window, softcap], ref


def dense_w8_case(lead, k, n, bias):
    x, qw, scale, b = f32(*lead, k), i8(n, k), (rng.random(n) * 0.02 + 1e-3).astype(np.float32), f32(n)
    ref = ops.dense_w8(t(x), t(qw), t(scale), t(b) if bias else None).numpy()
    return ("tcc_dense_w8_f32" if bias else "tcc_dense_w8_nobias_f32",
            [x, qw, scale, b] if bias else [x, qw, scale], [], ref)


def sdpa_case(b, h, hkv, sq, sk, d, dv, mask_shape, causal, scale=None):
    q, k, v = f32(b, h, sq, d), f32(b, hkv, sk, d), f32(b, hkv, sk, dv)
    scale = d ** -0.5 if scale is None else scale
    mask = None
    if mask_shape is not None:
        mask = f32(*mask_shape)
        mask[..., 0] = np.finfo(np.float32).min  # a padded key, as the lowering writes it
    ref = ops.sdpa(t(q), t(k), t(v), None if mask is None else t(mask), scale, causal).numpy()
    if mask is None:
        return "tcc_sdpa_nomask_f32", [q, k, v], [scale, causal], ref
    return "tcc_sdpa_f32", [q, k, v, mask], [scale, causal], ref


CASES = {
    "dense_m1": dense_case((1,), 33, 65, True),
    "dense_m7": dense_case((7,), 33, 65, True),
    "dense_3d_nobias": dense_case((2, 3), 33, 65, False),
    "dense_tall": dense_case((70,), 33, 20, True),          # M > N: the work is split over rows
    "dense_k1": dense_case((3,), 1, 5, False),
    "w8_m1": dense_w8_case((1,), 33, 1100, True),           # GEMV over the codes (M <= 4)
    "w8_m4_gemv": dense_w8_case((2, 2), 577, 300, False),   # GEMV, K not a multiple of the vector width
    "w8_m5_blocks": dense_w8_case((5,), 33, 1100, True),    # several dequantized blocks
    "w8_m7_nobias": dense_w8_case((7,), 33, 65, False),
    "w8_3d": dense_w8_case((4, 5), 600, 500, True),         # M = 20 > 16: large blocks, still several
    "w8_tall": dense_w8_case((70,), 40, 20, False),
    "sdpa_gqa_causal_padmask": sdpa_case(2, 6, 2, 5, 9, 16, 16, (2, 1, 1, 9), True),
    "sdpa_full_mask": sdpa_case(2, 6, 3, 5, 9, 16, 8, (2, 6, 5, 9), False, scale=0.3),
    "sdpa_mask_rank2": sdpa_case(1, 4, 4, 7, 7, 8, 8, (7, 7), False),
    "sdpa_causal_70": sdpa_case(1, 3, 3, 70, 70, 8, 8, None, True),   # crosses the 64-row block
    "sdpa_gqa_decode": sdpa_case(2, 6, 2, 1, 20, 16, 16, None, True),
    "sdpa_causal_sq_gt_sk": sdpa_case(1, 2, 1, 6, 4, 8, 8, None, True),  # first rows see no key: NaN
    "sdpa_nomask": sdpa_case(1, 6, 2, 33, 17, 32, 32, None, False),
    "sdpa_kv_prefill": sdpa_kv_case(1, 6, 2, 3, 16, 8, pos=5),     # 3 new rows after 5 cached ones
    "sdpa_kv_decode_last_row": sdpa_kv_case(2, 4, 4, 1, 16, 8, pos=15),
    "sdpa_kv_chunk_67": sdpa_kv_case(1, 2, 1, 67, 80, 8, pos=9),   # crosses the 64-row query block
    "sdpa_kv_window": sdpa_kv_case(1, 4, 2, 6, 24, 8, pos=7, window=4),  # sliding window inside a chunk
    "sdpa_kv_window_decode": sdpa_kv_case(1, 4, 2, 1, 24, 8, pos=20, window=5),
    "sdpa_kv_softcap": sdpa_kv_case(1, 4, 2, 5, 16, 8, pos=3, softcap=0.5),  # scores far beyond the cap
}

# Mismatched arguments the kernels must reject: name -> (kernel, inputs, scalars, out shape, message)
BAD = {
    "bad_dense_k": ("tcc_dense_f32", [f32(2, 33), f32(65, 32), f32(65)], [], (2, 65),
                    r"tcc_dense_f32: argument 'w' has shape \[65, 32\], its dim 1 must be 33"),
    "bad_dense_dtype": ("tcc_dense_nobias_f32", [f32(2, 33), i8(65, 33)], [], (2, 65),
                        r"tcc_dense_nobias_f32: argument 'w' must be float32, got int8"),
    "bad_dense_out": ("tcc_dense_f32", [f32(2, 33), f32(65, 33), f32(65)], [], (2, 64),
                      r"tcc_dense_f32: argument 'out' has shape \[2, 64\], its dim 1 must be 65"),
    "bad_w8_scale": ("tcc_dense_w8_nobias_f32", [f32(2, 33), i8(65, 33), f32(64)], [], (2, 65),
                     r"tcc_dense_w8_nobias_f32: argument 'scale' has shape \[64\]"),
    "bad_sdpa_heads": ("tcc_sdpa_nomask_f32", [f32(1, 5, 4, 8), f32(1, 2, 4, 8), f32(1, 2, 4, 8)],
                       [0.5, False], (1, 5, 4, 8), r"multiple of the KV heads"),
    "bad_sdpa_mask": ("tcc_sdpa_f32", [f32(2, 6, 5, 8), f32(2, 2, 9, 8), f32(2, 2, 9, 8), f32(2, 3, 5, 9)],
                      [0.5, True], (2, 6, 5, 8), r"argument 'mask' has shape \[2, 3, 5, 9\], which does not broadcast"),
    "bad_sdpa_kv_full": ("tcc_sdpa_kv_f32", [f32(1, 2, 3, 8), f32(1, 1, 3, 8), f32(1, 1, 3, 8), f32(1, 1, 8, 8),
                                             f32(1, 1, 8, 8), np.array([6], np.int64)], [0.5, 0, 0.0], (1, 2, 3, 8),
                         r"positions 6\.\.8 do not fit the KV cache of 8 positions"),
    "bad_sdpa_rank": ("tcc_sdpa_nomask_f32", [f32(6, 5, 8), f32(1, 2, 9, 8), f32(1, 2, 9, 8)],
                      [0.5, False], (1, 6, 5, 8), r"argument 'q' must have rank 4, got shape \[6, 5, 8\]"),
}


# ---------------------------------------------------------------------------------------------
# One module with every case, built and exported once
# ---------------------------------------------------------------------------------------------

def add_function(bb, name, kernel, arrays, scalars, out_shape):
    params = [relax.Var(f"a{i}", relax.TensorType(a.shape, str(a.dtype))) for i, a in enumerate(arrays)]
    with bb.function(name, params):
        args = params + [relax.prim_value(s) for s in scalars]
        y = bb.emit(relax.call_dps_packed(kernel, args, relax.TensorType(out_shape, "float32")))
        bb.emit_func_output(y)


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    return build.build_kernels("x86_64", tmp_path_factory.mktemp("kernels"))


@pytest.fixture(scope="module")
def vm(kernels, tmp_path_factory):
    bb = relax.BlockBuilder()
    for name, (kernel, arrays, scalars, ref) in CASES.items():
        add_function(bb, name, kernel, arrays, scalars, ref.shape)
    for name, (kernel, arrays, scalars, out_shape, _) in BAD.items():
        add_function(bb, name, kernel, arrays, scalars, out_shape)
    lib = tvm.runtime.load_static_library(str(kernels.object), list(kernels.functions))
    mod = bb.get().with_attr("external_mods", [lib])
    target = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    so = tmp_path_factory.mktemp("module") / "kernels_test.so"
    relax.build(mod, target).export_library(str(so), options=kernels.link_options())
    return relax.VirtualMachine(tvm.runtime.load_module(str(so)), tvm.cpu())


def run(vm, name, arrays):
    return vm[name](*[tvm.runtime.tensor(a) for a in arrays]).numpy()


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference(vm, name):
    _, arrays, _, ref = CASES[name]
    got = run(vm, name, arrays)
    assert got.shape == ref.shape
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(got), nan)
    err = np.abs(got[~nan] - ref[~nan]).max(initial=0.0)
    assert err <= TOL, f"{name}: max abs error {err:.2e}"


def test_causal_rows_without_keys_are_nan(vm):
    _, arrays, _, ref = CASES["sdpa_causal_sq_gt_sk"]
    got = run(vm, "sdpa_causal_sq_gt_sk", arrays)
    assert np.isnan(got[:, :, :2]).all() and np.isfinite(got[:, :, 2:]).all()  # Sq - Sk = 2 rows see nothing


@pytest.mark.parametrize("name", list(BAD))
def test_kernel_rejects_mismatched_arguments(vm, name):
    _, arrays, _, _, message = BAD[name]
    with pytest.raises((TypeError, ValueError), match=message):
        run(vm, name, arrays)


# ---------------------------------------------------------------------------------------------
# build_kernels
# ---------------------------------------------------------------------------------------------

def test_exported_functions_are_the_kernels():
    assert set(build.exported_functions()) == {
        "tcc_dense_f32", "tcc_dense_nobias_f32", "tcc_dense_w8_f32", "tcc_dense_w8_nobias_f32",
        "tcc_sdpa_f32", "tcc_sdpa_nomask_f32", "tcc_sdpa_kv_f32", "tcc_sdpa_kv_i8_f32",
        "tcc_dense_a8w8_f32", "tcc_dense_a8w8_nobias_f32", "tcc_dense_a8w8_static_f32",
        "tcc_dense_a8w8_static_nobias_f32", "tcc_dense_w4_f32", "tcc_dense_w4_nobias_f32",
        "tcc_dense_w4a8_f32", "tcc_dense_w4a8_nobias_f32",
        "tcc_dense_bsr_f32", "tcc_dense_bsr_nobias_f32", "tcc_unmask",
        "tcc_dense_bf16_f32", "tcc_dense_bf16_nobias_f32", "tcc_embedding_bf16_f32",
        "tcc_fwht_f32", "tcc_embedding_w4_f32"}


def test_build_is_cached(kernels, tmp_path, monkeypatch):
    def no_compile(*args, **kwargs):
        raise AssertionError("the cached object should have been reused")
    monkeypatch.setattr(build, "_compile", no_compile)
    again = build.build_kernels("x86_64", tmp_path)
    assert again.object.read_bytes() == kernels.object.read_bytes()
    assert again.object.stat().st_mode & 0o777 == 0o644


def test_aarch64_object_compiles(tmp_path):
    if shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.skip("aarch64-linux-gnu-g++ is not installed")
    lib = build.build_kernels("aarch64", tmp_path, ["-march=armv8.2-a+dotprod"])
    head = lib.object.read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 183  # EM_AARCH64
    assert lib.functions == build.exported_functions()


def test_missing_compiler_names_the_debian_package(tmp_path, monkeypatch):
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    with pytest.raises(UserError) as e:
        build.build_kernels("aarch64", tmp_path)
    assert "aarch64-linux-gnu-g++" in e.value.message and "g++-aarch64-linux-gnu" in e.value.hint


def test_unknown_arch_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="riscv64"):
        build.build_kernels("riscv64", tmp_path)
