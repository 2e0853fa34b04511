"""The CPU replay of tcc's CUDA kernels (emulate.cc) as numpy functions, for tests without a GPU.

emulate.cc runs each kernel's blocks, warps and lanes on the CPU with the kernels' own
tcc_cuda.cuh math and emulated tensor-core instructions; it is compiled with g++ on first use and
cached under $TCC_CACHE/kernels. Arguments are the kernels' (packed weights from quant_layout.py
and layout.py); x is float32 [M, K], results float32 [M, N].

dense_a8w8(x, qw_packed, wsum, w_scale, b=None, x_scale=None, x_zero=None, asym=False) -> y
quantize_rows(x, x_scale=None, x_zero=None, asym=False) -> (codes int32 [M, K], s [M], z [M])
dense_w4(x, qw_packed, scale_t, zero_t, n, b=None, path="auto" | "simt" | "mma") -> (y, path run)
dense_sp24(x, values, meta, n, b=None) -> y
sp24_weight(values, meta, k) -> float32 [N, K]   the weight as mma.sp decodes the kernel's fragments
to_f16(x) -> uint16 bits, from_f16(bits) -> float32   the kernels' float16 conversions
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
from pathlib import Path

import numpy as np

from tcc.errors import InternalError

HERE = Path(__file__).resolve().parent
FLAGS = ["-O2", "-std=c++17", "-fPIC", "-shared", "-ffp-contract=off", "-fno-strict-aliasing"]
_LIB: list = []


def dense_a8w8(x, qw_packed, wsum, w_scale, b=None, x_scale=None, x_zero=None, asym=False) -> np.ndarray:
    x = _f32(x)
    m, k = x.shape
    n = len(w_scale)
    out = np.zeros((m, n), np.float32)
    b, x_scale, x_zero = _opt(b), _opt(x_scale), _opt(x_zero)
    _lib().tcc_emu_dense_a8w8(_p(x), _p(qw_packed, np.int8), _p(wsum, np.int32), _p(w_scale, np.float32),
                              _p(b), _p(x_scale), _p(x_zero), int(asym), m, n, k, _p(out))
    return out


def quantize_rows(x, x_scale=None, x_zero=None, asym=False):
    x = _f32(x)
    m, k = x.shape
    codes, s, z = np.zeros((m, k), np.int32), np.zeros(m, np.float32), np.zeros(m, np.float32)
    x_scale, x_zero = _opt(x_scale), _opt(x_zero)
    _lib().tcc_emu_a8_quantize(_p(x), m, k, _p(x_scale), _p(x_zero), int(asym), _p(codes), _p(s), _p(z))
    return codes, s, z


def dense_w4(x, qw_packed, scale_t, zero_t, n: int, b=None, path: str = "auto") -> tuple[np.ndarray, str]:
    x = _f32(x)
    m, k = x.shape
    out = np.zeros((m, n), np.float32)
    scale_t, b = np.ascontiguousarray(scale_t, np.float32), _opt(b)
    ran = _lib().tcc_emu_dense_w4(_p(x), _p(qw_packed, np.uint8), _p(scale_t), _p(zero_t, np.uint8), _p(b),
                                  m, n, k, scale_t.shape[0], {"auto": 0, "simt": 1, "mma": 2}[path], _p(out))
    if ran < 0:
        raise ValueError(f"the tensor-core dense_w4 path does not take K = {k} with {scale_t.shape[0]} groups")
    return out, {1: "simt", 2: "mma"}[ran]


def dense_sp24(x, values, meta, n: int, b=None) -> np.ndarray:
    x = _f32(x)
    m, k = x.shape
    out, b = np.zeros((m, n), np.float32), _opt(b)
    if _lib().tcc_emu_dense_sp24(_p(x), _p(values, np.float16), _p(meta, np.uint16), _p(b), m, n, k, _p(out)):
        raise ValueError("invalid 2:4 metadata (equal kept positions in a chunk)")
    return out


def sp24_weight(values, meta, k: int) -> np.ndarray:
    n = values.shape[0]
    kp = values.shape[1] * 2
    w = np.zeros((n, kp), np.float32)
    if _lib().tcc_emu_sp24_weight(_p(values, np.float16), _p(meta, np.uint16), n, k, _p(w)):
        raise ValueError("invalid 2:4 metadata (equal kept positions in a chunk)")
    return w[:, :k]


def to_f16(x) -> np.ndarray:
    x = np.ascontiguousarray(x, np.float32).ravel()
    out = np.zeros(x.size, np.uint16)
    _lib().tcc_emu_to_f16(_p(x), x.size, _p(out))
    return out


def from_f16(bits) -> np.ndarray:
    bits = np.ascontiguousarray(bits, np.uint16).ravel()
    out = np.zeros(bits.size, np.float32)
    _lib().tcc_emu_from_f16(_p(bits), bits.size, _p(out))
    return out


# ---------------------------------------------------------------------------------------------

def _f32(x) -> np.ndarray:
    x = np.ascontiguousarray(x, np.float32)
    if x.ndim != 2:
        raise ValueError(f"x must be [M, K], got {list(x.shape)}")
    return x


def _p(a, dtype=None):
    """The data pointer of a C-contiguous array (of `dtype`, checked: no silent copy), or NULL for None.
    The caller keeps the array alive across the call."""
    if a is None:
        return None
    if dtype is not None and (a.dtype != dtype or not a.flags.c_contiguous):
        raise ValueError(f"expected a contiguous {np.dtype(dtype).name} array, got {a.dtype}")
    return ctypes.c_void_p(a.ctypes.data)


def _opt(a):
    return None if a is None else np.ascontiguousarray(np.asarray(a, np.float32).reshape(-1))


def _lib():
    if not _LIB:
        from tcc.backends.kernels.build import _cache_dir, _temp_file
        sources = [HERE / "emulate.cc", HERE / "tcc_cuda.cuh"]
        key = hashlib.sha256(b"".join(f.read_bytes() for f in sources) + " ".join(FLAGS).encode()).hexdigest()[:20]
        path = _cache_dir() / f"tcc_cuda_emulator-{key}.so"
        if not path.exists():
            tmp = _temp_file(path)
            proc = subprocess.run(["g++", *FLAGS, "emulate.cc", "-o", tmp], cwd=HERE, capture_output=True, text=True)
            if proc.returncode != 0:
                os.unlink(tmp)
                raise InternalError(f"g++ could not compile emulate.cc:\n{proc.stderr[-3000:]}")
            os.replace(tmp, path)
        lib = ctypes.CDLL(str(path))
        i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        lib.tcc_emu_dense_a8w8.argtypes = [ptr] * 7 + [i32, i64, i64, i64, ptr]
        lib.tcc_emu_a8_quantize.argtypes = [ptr, i64, i64, ptr, ptr, i32, ptr, ptr, ptr]
        lib.tcc_emu_dense_w4.argtypes = [ptr] * 5 + [i64, i64, i64, i64, i32, ptr]
        lib.tcc_emu_dense_sp24.argtypes = [ptr] * 4 + [i64, i64, i64, ptr]
        lib.tcc_emu_sp24_weight.argtypes = [ptr, ptr, i64, i64, ptr]
        lib.tcc_emu_to_f16.argtypes = [ptr, i64, ptr]
        lib.tcc_emu_from_f16.argtypes = [ptr, i64, ptr]
        _LIB.append(lib)
    return _LIB[0]
