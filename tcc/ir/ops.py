"""tcc's custom operators, as `torch.library` custom ops.

Each op's reference implementation here *defines its numerics*: the Program stays runnable in
PyTorch, and every backend kernel is tested against these functions. Backends map them to real
kernels (the TVM backend: `backends/tvm/lower.py` -> `R.call_dps_packed` into `backends/kernels`).

Ops:
  tcc::dense(x, w, b?)                y = x @ w.T + b              x [..., K], w [N, K], b [N]
  tcc::dense_w8(x, qw, scale, b?)     y = x @ (qw * scale[:,None]).T + b
                                      qw int8 [N, K] (symmetric, per output channel), scale f32 [N]
  tcc::dense_a8w8(x, qw, w_scale, b?, x_scale?, x_zero?, asym)
                                      W8A8: activations quantized to 8 bits, integer dot products.
                                      Rows of x (x viewed as [M, K]) quantize with a scale s (and
                                      zero point z): x_scale None -> dynamic, per row (per token):
                                        symmetric  s = max|x_m| / 127, z = 0,  q = clamp(round(x/s), -127, 127)
                                        asym       s = (max(x_m, 0) - min(x_m, 0)) / 255,
                                                   z = round(-min(x_m, 0) / s), q = clamp(round(x/s) + z, 0, 255)
                                      (s = 1 for an all-zero row); x_scale f32 [1] (and x_zero f32 [1]
                                      when asym) -> static per-tensor, the same formulas with the
                                      given s, z. round is half-to-even, x/s a float32 division.
                                      y[m, n] = s_m * w_scale[n] * sum_k (q[m,k] - z_m) * qw[n,k] + b[n]
                                      (the integer sum exact in int32).
  tcc::dense_w4(x, qw, scale, zero?, group, b?)
                                      int4 weight-only: qw uint8 [N, K/2], two 4-bit codes per byte,
                                      k = 2j in the low nibble and k = 2j+1 in the high nibble;
                                      scale f32 or f16 [N, K/group] (the quantize pass stores f16; the
                                      value is used as float32); zero uint8 [N, K/group] codes 0..15,
                                      or f32/f16 fractional zeros (quantize's zero=float, llama.cpp's
                                      Q4_1 grid), None = 8 (symmetric). w[n,k] = (code - zero[n, k // group]) *
                                      scale[n, k // group]; y = x @ w.T + b. K % group == 0, group even.
  tcc::dense_w4(..., acts="int8")     W4A8 (llama.cpp's Q8_0 activations for Q4_0/Q4_1): each block of
                                      `group` consecutive k of each row of x quantizes symmetrically to
                                      int8 as dense_a8w8's dynamic rows do (quantize_blocks: s = max|x| /
                                      127, or 1 for an all-zero block; q = clamp(round(x / s), -127, 127),
                                      float32 division, round half to even), and y = (q * s) @ w.T + b,
                                      i.e. y[m,n] = sum_g s[m,g] scale[n,g] sum_k q[m,k] (code - zero) + b.
                                      acts="none" (the default): x as it is, fp32.
  tcc::embedding_w8(ids, qw, scale)   rows of an int8 table: out = qw[ids] * scale[ids, None]
                                      qw int8 [V, D] per-row symmetric, scale f32 [V]
  tcc::embedding_w4(ids, qw, scale, zero?, group)
                                      rows of an int4 table stored as dense_w4's weight (qw uint8 [V, D/2],
                                      scale f16/f32 [V, D/group], zero as dense_w4's or None = 8):
                                      out = dequantize_w4(qw[ids], scale[ids], zero[ids], group), each
                                      value (code - zero) * scale in float32 (quantize's embeddings=true,
                                      embedding_format=int4: a tied LM head reads the same codes by dense_w4)
  tcc::dense_bf16(x, w, b?)           bf16 weights: y = x @ float32(w).T + b; w bfloat16 [N, K] (each
                                      value widened exactly to float32), x, b and y float32, the sum
                                      in float32. Activations are not rounded: the kernels' error vs
                                      this op is fp32 summation order (and, with AVX-512 BF16, x split
                                      into two bf16 halves: relative error <= 2^-16 per product).
  tcc::embedding_bf16(ids, w)         rows of a bf16 table widened to float32: out = float32(w[ids])
  tcc::sdpa(q, k, v, mask?, scale, causal)
                                      softmax(q k^T * scale + mask [+ causal -inf]) v, per head;
                                      q [B, H, Sq, D], k/v [B, Hkv, Sk, D], H % Hkv == 0 (grouped
                                      KV heads: query head h reads KV head h // (H / Hkv)); mask is
                                      additive float, broadcastable to [B, H, Sq, Sk]
  tcc::sdpa_kv(q, k, v, k_cache, v_cache, pos, scale)
                                      causal attention over a KV cache (generation): writes k and v
                                      ([B, Hkv, L, D], the new positions' keys/values, before any
                                      repeat for grouped heads) into k_cache/v_cache [B, Hkv, C, D] at
                                      rows pos..pos+L-1 (pos int64 [1]; pos + L <= C), then query i of q
                                      [B, H, L, D] (absolute position pos + i) attends to cache rows
                                      0..pos+i: tcc::sdpa(q, k_cache[:, :, :pos+L], ..., causal=True).
                                      Mutates the caches (declared), returns [B, H, L, Dv].
  tcc::sdpa_kv(..., scale, window, softcap)
                                      window > 0 (sliding-window layers): query position t sees only
                                      rows t-window+1..t; softcap > 0 (Gemma-2): the scaled scores s
                                      become softcap * tanh(s / softcap) before the mask and softmax.
  tcc::sdpa_kv_int8(q, k, v, k_codes, k_scales, v_codes, v_scales, pos, scale, window, softcap)
                                      sdpa_kv over an int8 cache (generation's kv_cache="int8"): the
                                      new rows of k and v are quantized per head and per position
                                      (quantize_kv: one symmetric scale per row of D values, as
                                      dense_a8w8's dynamic rows) into codes int8 [B, Hkv, C, D] and
                                      scales f32 [B, Hkv, C]; attention then reads every row as
                                      codes * scale (the new ones too). Mutates the four caches.
"""
from __future__ import annotations

import functools

import torch

LIB = "tcc"


@torch.library.custom_op("tcc::dense", mutates_args=())
def dense(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    return torch.nn.functional.linear(x, w, b)


@dense.register_fake
def _(x, w, b=None):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


@torch.library.custom_op("tcc::dense_w8", mutates_args=())
def dense_w8(x: torch.Tensor, qw: torch.Tensor, scale: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    w = qw.to(torch.float32) * scale.to(torch.float32)[:, None]
    return torch.nn.functional.linear(x, w.to(x.dtype), b)


@dense_w8.register_fake
def _(x, qw, scale, b=None):
    return x.new_empty((*x.shape[:-1], qw.shape[0]))


def quantize_rows(x: torch.Tensor, x_scale: torch.Tensor | None, x_zero: torch.Tensor | None,
                  asym: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dense_a8w8's activation quantization of x [M, K] (fp32): (codes as float32 [M, K] holding
    exact integers, s [M, 1], z [M, 1]); see the module docstring."""
    x = x.to(torch.float32)
    if x_scale is None:
        if asym:
            lo = x.amin(dim=1, keepdim=True).clamp_max(0)
            hi = x.amax(dim=1, keepdim=True).clamp_min(0)
            s = (hi - lo) / 255.0
        else:
            s = x.abs().amax(dim=1, keepdim=True) / 127.0
        s = torch.where(s > 0, s, torch.ones_like(s))
        z = torch.round(-lo / s) if asym else torch.zeros_like(s)
    else:
        s = x_scale.to(torch.float32).reshape(1, 1).expand(x.shape[0], 1)
        z = (x_zero.to(torch.float32).reshape(1, 1).expand(x.shape[0], 1) if asym and x_zero is not None
             else torch.zeros_like(s))
    q = torch.round(x / s) + z
    q = q.clamp(0, 255) if asym else q.clamp(-127, 127)
    return q, s, z


@torch.library.custom_op("tcc::dense_a8w8", mutates_args=())
def dense_a8w8(x: torch.Tensor, qw: torch.Tensor, w_scale: torch.Tensor, b: torch.Tensor | None = None,
               x_scale: torch.Tensor | None = None, x_zero: torch.Tensor | None = None,
               asym: bool = False) -> torch.Tensor:
    lead, k = x.shape[:-1], x.shape[-1]
    q, s, z = quantize_rows(x.reshape(-1, k), x_scale, x_zero, asym)
    acc = _int_dot(q, z, qw, asym)
    y = (acc * s.to(torch.float64) * w_scale.to(torch.float64)[None, :]).to(torch.float32)
    if b is not None:
        y = y + b.to(torch.float32)
    return y.reshape(*lead, qw.shape[0]).to(x.dtype)


@functools.lru_cache(maxsize=None)
def _fast_int_mm() -> bool:
    """Whether torch._int_mm has int8 dot-product instructions under it (x86 VNNI). Without them,
    oneDNN's int8 x int8 GEMM falls to its reference loops: on a 2-core AVX2 EPYC, [128, 2048] x
    [2048, 2048] took 1343 ms against 25 ms in float32 (and 102 ms in float64)."""
    try:
        flags = next((l for l in open("/proc/cpuinfo") if l.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


EXACT_F32_BLOCK = 256  # |code - zero| <= 255, |w| <= 127: a block's sums stay under 2^24, exact in float32


def _int_dot(q: torch.Tensor, z: torch.Tensor, qw: torch.Tensor, asym: bool) -> torch.Tensor:
    """(q - z) @ qw.T as float64, exact: q holds integer codes (-127..127, or 0..255 with asym and
    zero points z [M, 1]), qw int8 [N, K]. int8 x int8 -> int32 products (torch._int_mm, on CPUs with
    VNNI) where no sum can overflow int32, (q - 128) @ qw.T + (128 - z) * row sums of qw for asym
    codes; else float32 GEMMs over blocks of EXACT_F32_BLOCK columns (every partial sum an integer
    below 2^24, so exact) summed in float64; fractional zero points take a float64 matmul (exact too:
    |sum| < 2^53). All give the same integers."""
    k = q.shape[1]
    integral = torch.equal(z, z.round())
    if integral and q.shape[0] > 0 and not _fast_int_mm():
        a, w = (q - z).to(torch.float32), qw.to(torch.float32)
        acc = torch.zeros(q.shape[0], qw.shape[0], dtype=torch.float64)
        for k0 in range(0, k, EXACT_F32_BLOCK):
            acc += (a[:, k0:k0 + EXACT_F32_BLOCK] @ w[:, k0:k0 + EXACT_F32_BLOCK].T).to(torch.float64)
        return acc
    if k * 128 * 127 < 2 ** 31 and q.shape[0] > 0 and hasattr(torch, "_int_mm") and integral:
        if asym:
            acc = torch._int_mm((q - 128).to(torch.int8), qw.T).to(torch.float64)
            return acc + (128 - z).to(torch.float64) * qw.sum(1, dtype=torch.int64).to(torch.float64)[None, :]
        return torch._int_mm(q.to(torch.int8), qw.T).to(torch.float64)
    return (q - z).to(torch.float64) @ qw.to(torch.float64).T


@dense_a8w8.register_fake
def _(x, qw, w_scale, b=None, x_scale=None, x_zero=None, asym=False):
    return x.new_empty((*x.shape[:-1], qw.shape[0]))


def unpack_int4(qw: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 [N, K/2] -> codes uint8 [N, K] (low nibble first)."""
    lo, hi = qw & 0x0F, qw >> 4
    return torch.stack([lo, hi], dim=-1).reshape(qw.shape[0], k)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """codes 0..15 [N, K] (K even) -> uint8 [N, K/2] (low nibble first)."""
    c = codes.to(torch.uint8).reshape(codes.shape[0], -1, 2)
    return c[..., 0] | (c[..., 1] << 4)


def dequantize_w4(qw: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group: int) -> torch.Tensor:
    n, k = qw.shape[0], qw.shape[1] * 2
    # (code - zero) * scale, each step in place on the one float32 copy: the same values as separate
    # temporaries (dense_w4 runs this on every call: the pass manager's checks run int4 Programs)
    w = unpack_int4(qw, k).to(torch.float32).view(n, k // group, group)
    w.sub_(8.0 if zero is None else zero.to(torch.float32)[..., None]).mul_(scale.to(torch.float32)[..., None])
    return w.view(n, k)


def quantize_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """dense_w4's acts="int8": x [..., K] with every `block` consecutive k of a row quantized to
    int8 symmetrically (quantize_rows' dynamic symmetric rows), returned dequantized, q * s, float32."""
    k = x.shape[-1]
    q, s, _ = quantize_rows(x.reshape(-1, block), None, None, False)
    return (q * s).reshape(*x.shape[:-1], k)


W4_ACTS = ("none", "int8")


@torch.library.custom_op("tcc::dense_w4", mutates_args=())
def dense_w4(x: torch.Tensor, qw: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group: int,
             b: torch.Tensor | None = None, acts: str = "none") -> torch.Tensor:
    if acts not in W4_ACTS:
        raise ValueError(f"tcc::dense_w4: acts must be one of {W4_ACTS}, got {acts!r}")
    if acts == "int8":
        x = quantize_blocks(x.to(torch.float32), group).to(x.dtype)
    return torch.nn.functional.linear(x, dequantize_w4(qw, scale, zero, group).to(x.dtype), b)


@dense_w4.register_fake
def _(x, qw, scale, zero, group, b=None, acts="none"):
    return x.new_empty((*x.shape[:-1], qw.shape[0]))


@torch.library.custom_op("tcc::embedding_w8", mutates_args=())
def embedding_w8(ids: torch.Tensor, qw: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return qw[ids].to(torch.float32) * scale[ids][..., None]


@embedding_w8.register_fake
def _(ids, qw, scale):
    return scale.new_empty((*ids.shape, qw.shape[1]))


@torch.library.custom_op("tcc::embedding_w4", mutates_args=())
def embedding_w4(ids: torch.Tensor, qw: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                 group: int) -> torch.Tensor:
    rows = ids.reshape(-1)
    w = dequantize_w4(qw[rows], scale[rows], None if zero is None else zero[rows], group)
    return w.reshape(*ids.shape, qw.shape[1] * 2)


@embedding_w4.register_fake
def _(ids, qw, scale, zero, group):
    return scale.new_empty((*ids.shape, qw.shape[1] * 2), dtype=torch.float32)


WIDEN_BYTES = 1 << 26  # dense_bf16 widens at most this many bytes of weight rows at a time


def row_blocks(n: int, k: int, budget: int, itemsize: int, multiple: int = 1) -> list[slice]:
    """Slices of the n rows of an [n, k] tensor, each at most `budget` bytes at `itemsize` bytes a value
    and a multiple of `multiple` rows (at least `multiple` rows a slice): for work on a big weight a
    block of rows at a time (dense_bf16 here, tcc.compress.quantization's rtn)."""
    step = max(multiple, budget // (itemsize * max(k, 1)) // multiple * multiple)
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


@torch.library.custom_op("tcc::dense_bf16", mutates_args=())
def dense_bf16(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T + b with w stored bf16, widened to x's dtype a block of output rows at a time: a 49,152 x
    3,072 LM head would otherwise put a 0.6 GB float32 copy beside the checkpoint (issue 15). Blocks of a
    multiple of 64 rows: the products then equal the whole weight's bit for bit (measured for M = 1..128;
    blocks of 7 rows were not; tests/test_bf16_checkpoint.py)."""
    blocks = row_blocks(*w.shape, WIDEN_BYTES, x.element_size(), multiple=64)
    if len(blocks) == 1:
        return torch.nn.functional.linear(x, w.to(x.dtype), b)
    out = x.new_empty((*x.shape[:-1], w.shape[0]))
    for rows in blocks:
        out[..., rows] = torch.nn.functional.linear(x, w[rows].to(x.dtype), None if b is None else b[rows])
    return out


@dense_bf16.register_fake
def _(x, w, b=None):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


@torch.library.custom_op("tcc::embedding_bf16", mutates_args=())
def embedding_bf16(ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return w[ids].to(torch.float32)


@embedding_bf16.register_fake
def _(ids, w):
    return w.new_empty((*ids.shape, w.shape[1]), dtype=torch.float32)


@torch.library.custom_op("tcc::sdpa", mutates_args=())
def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float, causal: bool) -> torch.Tensor:
    h, hkv = q.shape[1], k.shape[1]
    if hkv != h:
        k = k.repeat_interleave(h // hkv, dim=1)
        v = v.repeat_interleave(h // hkv, dim=1)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        s = s + mask
    if causal:
        sq, sk = s.shape[-2], s.shape[-1]
        keep = torch.ones(sq, sk, dtype=torch.bool, device=s.device).tril(sk - sq)
        s = s.masked_fill(~keep, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), v)


@sdpa.register_fake
def _(q, k, v, mask, scale, causal):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@torch.library.custom_op("tcc::sdpa_kv", mutates_args=("k_cache", "v_cache"))
def sdpa_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
            pos: torch.Tensor, scale: float, window: int = 0, softcap: float = 0.0) -> torch.Tensor:
    p, length = int(pos.reshape(-1)[0]), k.shape[2]
    if not 0 <= p <= k_cache.shape[2] - length:
        raise ValueError(f"tcc::sdpa_kv: positions {p}..{p + length - 1} do not fit a cache of {k_cache.shape[2]}")
    k_cache[:, :, p:p + length] = k
    v_cache[:, :, p:p + length] = v
    k, v = k_cache[:, :, :p + length], v_cache[:, :, :p + length]
    h, hkv = q.shape[1], k.shape[1]
    if hkv != h:
        k = k.repeat_interleave(h // hkv, dim=1)
        v = v.repeat_interleave(h // hkv, dim=1)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    i = torch.arange(length)[:, None] + p  # absolute positions of the queries
    j = torch.arange(p + length)[None, :]
    keep = (j <= i) & ((i - j < window) if window else True)
    return torch.matmul(torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1), v)


@sdpa_kv.register_fake
def _(q, k, v, k_cache, v_cache, pos, scale, window=0, softcap=0.0):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sdpa_kv_int8's cache rows: x [..., D] -> (int8 codes [..., D], float32 scales [...]), one
    symmetric scale per row (quantize_rows' dynamic symmetric rows: s = max|x| / 127, 1 for an
    all-zero row; q = clamp(round(x / s), -127, 127))."""
    q, s, _ = quantize_rows(x.reshape(-1, x.shape[-1]), None, None, False)
    return q.to(torch.int8).reshape(x.shape), s.reshape(x.shape[:-1])


@torch.library.custom_op("tcc::sdpa_kv_int8", mutates_args=("k_codes", "k_scales", "v_codes", "v_scales"))
def sdpa_kv_int8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_codes: torch.Tensor, k_scales: torch.Tensor,
                 v_codes: torch.Tensor, v_scales: torch.Tensor, pos: torch.Tensor, scale: float, window: int = 0,
                 softcap: float = 0.0) -> torch.Tensor:
    p, length = int(pos.reshape(-1)[0]), k.shape[2]
    if not 0 <= p <= k_codes.shape[2] - length:
        raise ValueError(f"tcc::sdpa_kv_int8: positions {p}..{p + length - 1} do not fit a cache of {k_codes.shape[2]}")
    rows = []
    for x, codes, scales in ((k, k_codes, k_scales), (v, v_codes, v_scales)):
        c, s = quantize_kv(x)
        codes[:, :, p:p + length] = c
        scales[:, :, p:p + length] = s
        rows.append(codes[:, :, :p + length].to(torch.float32) * scales[:, :, :p + length, None])
    kc, vc = rows  # the cache as attention reads it: every row dequantized, the new ones included
    return sdpa_kv(q, kc[:, :, p:], vc[:, :, p:], kc, vc, pos, scale, window, softcap)


@sdpa_kv_int8.register_fake
def _(q, k, v, k_codes, k_scales, v_codes, v_scales, pos, scale, window=0, softcap=0.0):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


# -- operand specs: what the pass manager checks after every pass (tcc.pipeline.check_operands) ----

_F32, _F16, _BF16 = torch.float32, torch.float16, torch.bfloat16
_INT = (torch.int64, torch.int32)
# {op name: {argument position: (operand name, allowed dtypes or None, rank or None)}}: the stored
# tensors' layouts of the docstring above; a missing optional operand (None) is not checked
OPERANDS: dict[str, dict[int, tuple[str, tuple | None, int | None]]] = {
    "dense": {1: ("w", None, 2), 2: ("b", None, 1)},
    "dense_w8": {1: ("qw", (torch.int8,), 2), 2: ("scale", (_F32,), 1), 3: ("b", None, 1)},
    "dense_a8w8": {1: ("qw", (torch.int8,), 2), 2: ("w_scale", (_F32,), 1), 3: ("b", None, 1),
                   4: ("x_scale", (_F32,), None), 5: ("x_zero", (_F32,), None)},
    "dense_w4": {1: ("qw", (torch.uint8,), 2), 2: ("scale", (_F32, _F16), 2), 3: ("zero", (torch.uint8, _F32, _F16), 2),
                 5: ("b", None, 1)},
    "embedding_w8": {0: ("ids", _INT, None), 1: ("qw", (torch.int8,), 2), 2: ("scale", (_F32,), 1)},
    "embedding_w4": {0: ("ids", _INT, None), 1: ("qw", (torch.uint8,), 2), 2: ("scale", (_F32, _F16), 2),
                     3: ("zero", (torch.uint8, _F32, _F16), 2)},
    "dense_bf16": {1: ("w", (_BF16,), 2), 2: ("b", None, 1)},
    "embedding_bf16": {0: ("ids", _INT, None), 1: ("w", (_BF16,), 2)},
    "sdpa": {0: ("q", None, 4), 1: ("k", None, 4), 2: ("v", None, 4)},
    "sdpa_kv": {0: ("q", None, 4), 1: ("k", None, 4), 2: ("v", None, 4), 3: ("k_cache", None, 4),
                4: ("v_cache", None, 4), 5: ("pos", (torch.int64,), None)},
    "sdpa_kv_int8": {0: ("q", None, 4), 1: ("k", None, 4), 2: ("v", None, 4), 3: ("k_codes", (torch.int8,), 4),
                     4: ("k_scales", (_F32,), 3), 5: ("v_codes", (torch.int8,), 4), 6: ("v_scales", (_F32,), 3),
                     7: ("pos", (torch.int64,), None)},
}
_ROWS = {"dense_w8": (1, 2), "dense_a8w8": (1, 2), "embedding_w8": (1, 2), "dense_w4": (1, 2),
         "embedding_w4": (1, 2)}  # scale rows == N


def operand_problems(gm) -> list[str]:
    """Every tcc op node's operands checked against OPERANDS (values: a get_attr's tensor, else the
    node's meta['val'] / meta['tensor_meta']; unknown values are not checked); one line per problem,
    naming the node, the op and the operand."""
    def value(a):
        if not hasattr(a, "op"):
            return a if isinstance(a, torch.Tensor) else None
        if a.op == "get_attr":
            obj = gm
            for part in a.target.split("."):
                obj = getattr(obj, part, None)
            return obj
        return a.meta.get("val", a.meta.get("tensor_meta"))

    problems = []
    for n in gm.graph.nodes:
        if n.op != "call_function" or getattr(n.target, "namespace", None) != LIB:
            continue
        op = n.target.name().split("::")[-1].split(".")[0]
        spec = OPERANDS.get(op, {})
        for i, (name, dtypes, rank) in spec.items():
            v = value(n.args[i]) if i < len(n.args) else None
            if v is None or not hasattr(v, "dtype"):
                continue
            if dtypes is not None and v.dtype not in dtypes:
                problems.append(f"{n.name} (tcc::{op}) operand {name} is {v.dtype}, the spec wants "
                                f"{' or '.join(str(d) for d in dtypes)}")
            if rank is not None and len(v.shape) != rank:
                problems.append(f"{n.name} (tcc::{op}) operand {name} has rank {len(v.shape)} "
                                f"{list(v.shape)}, the spec wants {rank}")
        if op in _ROWS:
            w, s = (value(n.args[i]) if i < len(n.args) else None for i in _ROWS[op])
            if hasattr(w, "shape") and hasattr(s, "shape") and len(w.shape) and len(s.shape) and w.shape[0] != s.shape[0]:
                problems.append(f"{n.name} (tcc::{op}) has {w.shape[0]} weight rows but {s.shape[0]} scale rows")
    return problems
