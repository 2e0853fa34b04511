"""Weight layouts of the low-precision CPU kernels (backends/kernels/quant_kernels.cc).

The lowering packs each quantized weight once, at compile time, and stores the packed arrays in the
artifact; the kernels never repack. Both functions are deterministic, take numpy arrays or torch
tensors, and return contiguous numpy arrays. Columns (output channels) are grouped in tiles of 16;
a partial last tile is padded with zero weights, which the kernels never write out.

pack_a8w8(qw) -> (qw_packed, wsum)                       for tcc::dense_a8w8, qw int8 [N, K]
    qw_packed  int8  [ceil(N/16), ceil(K/4), 16, 4]     qw_packed[t, q, c, i] = qw[16 t + c, 4 q + i],
               0 past N or K: per tile, per quad of k, 16 columns x 4 consecutive k (one AVX-512
               VNNI operand, four NEON sdot operands); ~1 byte per weight.
    wsum       int32 [N]                                 wsum[n] = sum_k qw[n, k], which the kernels
               use to move the activation zero point (and their code offset) out of the dot product.

pack_w4(qw, scale, zero=None) -> (qw_packed, scale_t, zero_t)   for tcc::dense_w4, with the op's
    arguments: qw uint8 [N, K/2] (two codes per byte, k = 2j low nibble, k = 2j + 1 high nibble),
    scale float32 [N, G], zero uint8 [N, G] codes 0..15, float32 [N, G] fractional zero points, or
    None (= 8, symmetric); group = K / G.
    qw_packed  uint8   [ceil(N/16), K/2, 16]             qw_packed[t, j, c] = qw[16 t + c, j]
               (the same bytes, 16 columns side by side; 0 past N); 0.5 byte per weight.
    scale_t    float32 [G, 16 ceil(N/16)]                scale_t[g, n] = scale[n, g], 0 past N
    zero_t     uint8   [G, 16 ceil(N/16)]                zero_t[g, n] = zero[n, g] (8 if None), 8 past N;
               float32 when the zero points are

pack_w4a8(qw, scale, zero=None) -> (qw_packed, scale_t, zero_t)   for tcc::dense_w4 with acts="int8"
    (the same arguments as pack_w4; O = ceil(group / 8) octets of k per group, k past the group's
    end padded with code 0, which meets an activation code 0)
    qw_packed  uint8   [ceil(N/16), G, O, 16, 4]         qw_packed[t, g, o, c, i] = code(16 t + c, k)
               | code(16 t + c, k + 4) << 4 with k = g group + 8 o + i: per tile, per octet of k, 64
               bytes whose low nibbles are 16 columns x 4 consecutive k (one AVX-512 VNNI operand,
               four NEON sdot operands) and whose high nibbles the next 4 k; 0.5 byte per weight.
    scale_t    [ceil(N/16), G, 16]  scale_t[t, g, c] = scale[16 t + c, g] in scale's dtype (float16
               as the quantize pass stores it, or float32); 0 past N
    zero_t     [ceil(N/16), G, 16]  zero_t[t, g, c] = zero[16 t + c, g] (8 if None), uint8 or float32
    Tile-major, so that one tile's codes, scales and zero points are each one contiguous stream.
"""
from __future__ import annotations

import numpy as np

from tcc.errors import UserError

TILE = 16  # output columns per tile


def pack_a8w8(qw) -> tuple[np.ndarray, np.ndarray]:
    qw = _array(qw, np.int8, "qw", 2)
    n, k = qw.shape
    tiles, quads = -(-n // TILE), -(-k // 4)
    padded = np.zeros((tiles * TILE, quads * 4), np.int8)
    padded[:n, :k] = qw
    packed = padded.reshape(tiles, TILE, quads, 4).transpose(0, 2, 1, 3)
    wsum = qw.astype(np.int32).sum(axis=1, dtype=np.int32)
    return np.ascontiguousarray(packed), wsum


def pack_w4(qw, scale, zero=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    qw = _array(qw, np.uint8, "qw", 2)
    scale = _array(scale, np.float32, "scale", 2)
    n, half_k = qw.shape
    if scale.shape[0] != n or scale.shape[1] == 0 or (2 * half_k) % scale.shape[1] or (2 * half_k // scale.shape[1]) % 2:
        raise UserError(f"pack_w4: scale has shape {list(scale.shape)}, which does not fit qw {list(qw.shape)} "
                        f"(K = {2 * half_k}): it must be [N, K / group] with an even group",
                        "pass the scale of tcc::dense_w4 as the op takes it")
    groups = scale.shape[1]
    if zero is None:
        zero = np.full((n, groups), 8, np.uint8)
    else:
        zero = _array(zero, np.float32 if _dtype(zero) == np.float32 else np.uint8, "zero", 2)
    if zero.shape != scale.shape:
        raise UserError(f"pack_w4: zero has shape {list(zero.shape)}, scale {list(scale.shape)}: they must match")
    tiles = -(-n // TILE)
    packed = np.zeros((tiles * TILE, half_k), np.uint8)
    packed[:n] = qw
    scale_t = np.zeros((groups, tiles * TILE), np.float32)
    scale_t[:, :n] = scale.T
    zero_t = np.full((groups, tiles * TILE), 8, zero.dtype)
    zero_t[:, :n] = zero.T
    return np.ascontiguousarray(packed.reshape(tiles, TILE, half_k).transpose(0, 2, 1)), scale_t, zero_t


def pack_w4a8(qw, scale, zero=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scale_dtype = np.float16 if _dtype(scale) == np.float16 else np.float32
    scale = _array(scale, scale_dtype, "scale", 2)
    qw = _array(qw, np.uint8, "qw", 2)
    _, scale_t, zero_t = pack_w4(qw, scale.astype(np.float32), zero)  # checks the shapes
    n, half_k = qw.shape
    groups, tiles = scale_t.shape[0], -(-n // TILE)
    group = 2 * half_k // groups
    octets = -(-group // 8)
    codes = np.zeros((tiles * TILE, groups, octets * 8), np.uint8)
    codes[:n, :, :group] = np.stack([qw & 15, qw >> 4], axis=-1).reshape(n, groups, group)
    codes = codes.reshape(tiles, TILE, groups, octets, 2, 4)
    packed = (codes[..., 0, :] | (codes[..., 1, :] << 4)).transpose(0, 2, 3, 1, 4)
    tile_major = lambda a: np.ascontiguousarray(a.reshape(groups, tiles, TILE).transpose(1, 0, 2))  # noqa: E731
    return np.ascontiguousarray(packed), tile_major(scale_t).astype(scale_dtype), tile_major(zero_t)


def _dtype(a) -> np.dtype:
    return np.dtype(str(a.dtype).replace("torch.", ""))


def _array(a, dtype, name: str, ndim: int) -> np.ndarray:
    a = a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a)
    if a.dtype != dtype or a.ndim != ndim:
        raise UserError(f"{name} must be a {ndim}-d {np.dtype(dtype).name} array, got {a.dtype} {list(a.shape)}")
    return a
