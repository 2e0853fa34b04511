"""2:4 sparse weights for the CUDA kernel tcc_cuda_dense_sp24 (sparse24_gemm.cu), built once at
compile time; the layout mma.sp reads (tcc_cuda.cuh documents the fragments).

compress_24(w) -> (values, meta)
    w       float32 [N, K] (numpy or torch) with at most 2 nonzeros in every chunk of 4 input
            features k = 4c .. 4c + 3 (tcc/compress/sparsity.py's 2:4 pattern, or sparser)
    values  float16 [N, Kp / 2]    Kp = K rounded up to 32; chunk c's two kept weights at columns
            2c, 2c + 1, in increasing k; chunks past K are zero
    meta    uint16  [N, Kp / 16]   word w describes chunks 4w .. 4w + 3: chunk 4w + i in bits
            4i .. 4i + 3 as i0 | i1 << 2, its kept positions i0 < i1; chunks past K keep 0 and 1
    Kept positions: the chunk's nonzeros, then its lowest zero positions (the instruction always
    takes two distinct ones). A chunk with 3 or 4 nonzeros, or a weight that overflows float16, is
    a UserError.
decompress_24(values, meta, k) -> float32 [N, K]     the weight the kernel multiplies with
is_24(w) -> bool                                     every chunk of 4 has at most 2 nonzeros
"""
from __future__ import annotations

import numpy as np

from tcc.errors import UserError

STEP = 32  # k per mma.sp step: K pads to a multiple of it


def is_24(w) -> bool:
    w = _weight(w)
    return bool(((_chunks(w) != 0).sum(-1) <= 2).all())


def compress_24(w) -> tuple[np.ndarray, np.ndarray]:
    w = _weight(w)
    chunks = _chunks(w)
    nonzero = chunks != 0
    dense = int((nonzero.sum(-1) > 2).sum())
    if dense:
        raise UserError(f"compress_24: {dense} chunks of 4 input features hold more than 2 nonzeros",
                        "sparsify the weight with pattern=2:4 first")
    keep = np.sort(np.argsort(~nonzero, axis=-1, kind="stable")[..., :2], axis=-1)  # [N, Kp/4, 2]
    values = np.take_along_axis(chunks, keep, axis=-1).astype(np.float16)
    if not np.isfinite(values).all() and np.isfinite(chunks).all():
        raise UserError("compress_24: a weight overflows float16 (|w| > 65504)",
                        "leave this layer dense (sparsify skip=...)")
    nibbles = (keep[..., 0] | (keep[..., 1] << 2)).astype(np.uint16)  # [N, Kp/4]
    words = nibbles.reshape(w.shape[0], -1, 4) << (4 * np.arange(4, dtype=np.uint16))
    meta = np.bitwise_or.reduce(words, axis=-1).astype(np.uint16)
    return np.ascontiguousarray(values.reshape(w.shape[0], -1)), np.ascontiguousarray(meta)


def decompress_24(values, meta, k: int) -> np.ndarray:
    values, meta = np.asarray(values), np.asarray(meta)
    n = values.shape[0]
    kp = -(-k // STEP) * STEP
    if values.dtype != np.float16 or meta.dtype != np.uint16 or values.shape != (n, kp // 2) \
            or meta.shape != (n, kp // 16):
        raise UserError(f"decompress_24: values {values.dtype} {list(values.shape)} and meta {meta.dtype} "
                        f"{list(meta.shape)} are not a 2:4 layout of K = {k}", "build them with compress_24")
    nibbles = (meta[..., None] >> (4 * np.arange(4, dtype=np.uint16))) & 15  # [N, Kp/16, 4]
    nibbles = nibbles.reshape(n, kp // 4).astype(np.int64)
    keep = np.stack([nibbles & 3, nibbles >> 2], axis=-1)
    chunks = np.zeros((n, kp // 4, 4), np.float32)
    np.put_along_axis(chunks, keep, values.reshape(n, kp // 4, 2).astype(np.float32), axis=-1)
    return chunks.reshape(n, kp)[:, :k]


def _weight(w) -> np.ndarray:
    w = w.detach().cpu().numpy() if hasattr(w, "detach") else np.asarray(w)
    if w.ndim != 2 or w.dtype != np.float32:
        raise UserError(f"a 2:4 weight must be a 2-d float32 array, got {w.dtype} {list(w.shape)}")
    return w


def _chunks(w: np.ndarray) -> np.ndarray:
    n, k = w.shape
    kp = -(-k // STEP) * STEP
    padded = np.zeros((n, kp), np.float32)
    padded[:, :k] = w
    return padded.reshape(n, kp // 4, 4)
