"""Layouts of the sparse CPU kernels (backends/kernels/sparse_kernels.cc), built once at compile time.

All functions are deterministic, take numpy arrays or torch tensors, and return contiguous numpy
arrays.

Block-sparse rows (BSR), for tcc_dense_bsr_f32 over a weight W [N, K] (N outputs, K inputs) cut into
blocks of r x c (r | N, c | K); block row q holds output channels q r .. q r + r - 1:

to_bsr(w, block) -> (values, col_idx, row_ptr)
    values   float32 [nnzb, r, c]   the blocks with any nonzero, by block row, then block column
    col_idx  int32   [nnzb]         each block's column: it covers inputs col_idx[t] c .. + c - 1
    row_ptr  int32   [N/r + 1]      block row q owns blocks row_ptr[q] .. row_ptr[q + 1] - 1
    An all-zero block is dropped (an empty block row is fine); values[t, i, j] =
    W[q r + i, col_idx[t] c + j].
from_bsr(values, col_idx, row_ptr, shape) -> w   the dense [N, K] float32 weight back
bsr_bytes(values, col_idx, row_ptr) -> int       bytes stored

Bitmask compression, for tcc_unmask, of a tensor of any shape and dtype float32, int8 or uint8:

compress(a) -> (values, mask)
    values   a.dtype [nnz]                the nonzero elements of a.ravel(), in order
    mask     uint8   [ceil(a.size / 8)]   bit i of byte j (little-endian bit order) = a.flat[8 j + i]
                                          != 0; the bits past a.size are 0
    (-0.0 counts as zero and comes back as +0.0; NaN counts as nonzero.)
decompress(values, mask, shape, dtype) -> a      the inverse (numpy; the kernel does the same)
compressed_bytes(values, mask) -> int            bytes stored
"""
from __future__ import annotations

import numpy as np

from tcc.errors import UserError

UNMASK_DTYPES = (np.float32, np.int8, np.uint8)


def to_bsr(w, block: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    w = _array(w, "w")
    if w.ndim != 2 or w.dtype != np.float32:
        raise UserError(f"to_bsr: w must be a 2-d float32 array, got {w.dtype} {list(w.shape)}")
    n, k = w.shape
    r, c = _block(block)
    if n % r or k % c:
        raise UserError(f"to_bsr: blocks of {r} x {c} do not tile W [{n}, {k}]",
                        "choose a block shape whose rows divide N and whose columns divide K")
    blocks = w.reshape(n // r, r, k // c, c).transpose(0, 2, 1, 3)  # [N/r, K/c, r, c]
    nonzero = blocks.any(axis=(2, 3))
    rows, cols = np.nonzero(nonzero)  # row-major order: by block row, then block column
    row_ptr = np.zeros(n // r + 1, np.int64)
    np.cumsum(nonzero.sum(axis=1), out=row_ptr[1:])
    _check_int32(row_ptr[-1], "blocks")
    return (np.ascontiguousarray(blocks[rows, cols], np.float32).reshape(-1, r, c),
            cols.astype(np.int32), row_ptr.astype(np.int32))


def from_bsr(values, col_idx, row_ptr, shape: tuple[int, int]) -> np.ndarray:
    values, col_idx, row_ptr = _array(values, "values"), _array(col_idx, "col_idx"), _array(row_ptr, "row_ptr")
    n, k = shape
    if values.ndim != 3:
        raise UserError(f"from_bsr: values must be [nnzb, r, c], got {list(values.shape)}")
    nnzb, r, c = values.shape
    if r < 1 or c < 1 or n % r or k % c or row_ptr.shape != (n // r + 1,) or col_idx.shape != (nnzb,) \
            or row_ptr[0] != 0 or row_ptr[-1] != nnzb or (np.diff(row_ptr) < 0).any() \
            or (nnzb and (col_idx.min() < 0 or col_idx.max() >= k // c)):
        raise UserError(f"from_bsr: values {list(values.shape)}, col_idx {list(col_idx.shape)} and row_ptr "
                        f"{list(row_ptr.shape)} are not a BSR layout of a [{n}, {k}] weight",
                        "build them with to_bsr")
    rows = np.repeat(np.arange(n // r), np.diff(row_ptr))
    blocks = np.zeros((n // r, k // c, r, c), np.float32)
    blocks[rows, col_idx] = values
    return blocks.transpose(0, 2, 1, 3).reshape(n, k)


def bsr_bytes(values, col_idx, row_ptr) -> int:
    return sum(_array(a, name).nbytes for a, name in ((values, "values"), (col_idx, "col_idx"), (row_ptr, "row_ptr")))


def compress(a) -> tuple[np.ndarray, np.ndarray]:
    a = _array(a, "a")
    _check_dtype(a.dtype, "compress")
    flat = a.ravel()
    keep = flat != 0
    return np.ascontiguousarray(flat[keep]), np.packbits(keep, bitorder="little")


def decompress(values, mask, shape, dtype) -> np.ndarray:
    values, mask = _array(values, "values"), _array(mask, "mask")
    dtype = np.dtype(dtype)
    _check_dtype(dtype, "decompress")
    numel = int(np.prod(shape, dtype=np.int64))
    if mask.dtype != np.uint8 or mask.shape != (-(-numel // 8),):
        raise UserError(f"decompress: mask must be uint8 [{-(-numel // 8)}] for {numel} elements, "
                        f"got {mask.dtype} {list(mask.shape)}")
    keep = np.unpackbits(mask, count=numel, bitorder="little").astype(bool)
    if values.dtype != dtype or values.shape != (int(keep.sum()),):
        raise UserError(f"decompress: values must be {dtype} [{int(keep.sum())}] (the set bits of the mask), "
                        f"got {values.dtype} {list(values.shape)}")
    out = np.zeros(numel, dtype)
    out[keep] = values
    return out.reshape(shape)


def compressed_bytes(values, mask) -> int:
    return _array(values, "values").nbytes + _array(mask, "mask").nbytes


# ---------------------------------------------------------------------------------------------

def _array(a, name: str) -> np.ndarray:
    a = a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a)
    if a.dtype == object:
        raise UserError(f"{name} must be a numeric array")
    return a


def _block(block) -> tuple[int, int]:
    try:
        r, c = (int(b) for b in block)
    except (TypeError, ValueError):
        raise UserError(f"a block shape is two positive integers (rows, columns), got {block!r}") from None
    if r < 1 or c < 1:
        raise UserError(f"a block shape is two positive integers (rows, columns), got {block!r}")
    return r, c


def _check_dtype(dtype, what: str) -> None:
    if dtype not in UNMASK_DTYPES:
        raise UserError(f"{what}: dtype {dtype} is not supported", "use float32, int8 or uint8")


def _check_int32(n, what: str) -> None:
    if n > np.iinfo(np.int32).max:
        raise UserError(f"to_bsr: {n} {what} do not fit the int32 indices of the kernel")
