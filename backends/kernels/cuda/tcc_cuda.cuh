// The math of tcc's CUDA kernels that does not need a GPU: weight layouts, tensor-core fragment
// indexing, activation quantization, fp16 conversion, 2:4 metadata and the epilogues. Every
// function here is __host__ __device__: the kernels (quant_gemm.cu, sparse24_gemm.cu) call them on
// the GPU, and emulate.cc calls the same functions on the CPU to replay each kernel's tile loop,
// so tests check this file against tcc/ops.py without a GPU. It compiles with nvcc and with g++.
//
// Fragments follow the PTX ISA's mma.sync / mma.sp register layouts. In a warp, lane = 4 g + t
// (g = groupID = lane >> 2, t = threadID_in_group = lane & 3). For the shapes used here:
//   m16n8k32 s8/u8  A 16x32 (row): 4 regs of 4 bytes, reg r: row g + 8 (r & 1), k 16 (r >> 1) + 4 t + byte
//                   B 32x8 (col): 2 regs, reg r: k 16 r + 4 t + byte, column g
//   m16n8k16 f16    A 16x16: 4 regs of 2 halves, reg r: row g + 8 (r & 1), k 8 (r >> 1) + 2 t + half
//                   B 16x8: 2 regs, reg r: k 8 r + 2 t + half, column g
//   m16n8k32 f16 sparse (mma.sp): A is the 16x16 compressed matrix with the m16n8k16 A layout,
//                   compressed column 2 c + i holding the i-th kept element of chunk c (original
//                   columns 4 c .. 4 c + 3); B 32x8: 4 regs, reg r: k 8 r + 2 t + half, column g;
//                   metadata (sparsity selector 0): lane 4 g + h (h = 0, 1) holds row g's chunks
//                   4 h .. 4 h + 3 in bits 0-15 and row g + 8's in bits 16-31, 4 bits per chunk
//                   (kept indices i0 | i1 << 2, i0 < i1).
//   Accumulators (all shapes), 4 regs: reg r: row g + 8 (r >> 1), column 2 t + (r & 1).
// The low byte/half of a register is the lower k.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#include <cuda_fp16.h>
#define TCC_HD __host__ __device__ __forceinline__
#define TCC_UNROLL _Pragma("unroll")
#else
#include <cmath>
#include <cstring>
#define TCC_HD inline
#define TCC_UNROLL
#endif

namespace tcc_cuda {

// ---------------------------------------------------------------------------------------------
// Tiling (shared by the kernels, their launchers and the emulator)
// ---------------------------------------------------------------------------------------------

constexpr int kTile = 16;        // columns per packed weight tile (quant_layout.py TILE)
constexpr int kThreads = 128;    // 4 warps per block in every kernel
constexpr int kBlockM = 64;      // block tile rows (tokens; 2:4: output channels)
constexpr int kBlockN = 64;      // block tile columns (output channels; 2:4: tokens)
constexpr int kWarpM = 32;       // warp tile: 2 x 2 warps of 32 x 32
constexpr int kWarpN = 32;
constexpr int kA8Step = 32;      // k per step: one m16n8k32 int8 mma
constexpr int kW4Step = 16;      // one m16n8k16 f16 mma
constexpr int kSpStep = 32;      // one m16n8k32 sparse f16 mma (16 compressed columns)
constexpr int kLds = 12;         // a8w8/w4 shared-memory row stride in 32-bit words: 8 words + 4 pad
                                 // (no bank conflicts for the 8 x 4 lanes of a fragment load)
constexpr int kSpLds = 20;       // 16 words + 4 pad
constexpr int kW4SimtRows = 8;   // dense_w4 SIMT kernel: rows per block, 16 columns x 8 k-slices
constexpr int kW4SimtSlices = kThreads / kTile;
constexpr uint16_t kSpPadMeta = 0x4444;  // four chunks keeping indices 0 and 1 (padding)

TCC_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------------
// IEEE float32 operations, the same on host and device (no fast-math contraction)
// ---------------------------------------------------------------------------------------------

TCC_HD float div_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

TCC_HD float fma_rn(float a, float b, float c) {
#ifdef __CUDA_ARCH__
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

TCC_HD float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

TCC_HD float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

// round half to even (torch.round)
TCC_HD float round_even(float x) {
#ifdef __CUDA_ARCH__
  return rintf(x);
#else
  return std::nearbyint(x);
#endif
}

// float32 -> float16 bits, round to nearest even (as __float2half_rn and numpy's astype(float16))
TCC_HD uint16_t f16_bits(float f) {
#ifdef __CUDA_ARCH__
  return __half_as_ushort(__float2half_rn(f));
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t abs = u & 0x7fffffffu;
  if (abs >= 0x7f800000u) return static_cast<uint16_t>(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0u));
  if (abs >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: inf
  const int exp = static_cast<int>(abs >> 23) - 127;
  if (exp >= -14) {  // normal half: keep 10 of 23 mantissa bits
    const uint32_t mant = abs & 0x7fffffu;
    uint32_t h = (static_cast<uint32_t>(exp + 15) << 10) | (mant >> 13);
    const uint32_t rest = mant & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // a carry into the exponent is right
    return static_cast<uint16_t>(sign | h);
  }
  if (exp < -25) return static_cast<uint16_t>(sign);  // below half the smallest subnormal: 0
  const uint32_t mant = (abs & 0x7fffffu) | 0x800000u;  // subnormal half: value = h * 2^-24
  const int shift = -exp - 1;                           // 14 .. 24 bits drop
  uint32_t h = mant >> shift;
  const uint32_t rest = mant & ((1u << shift) - 1), half = 1u << (shift - 1);
  if (rest > half || (rest == half && (h & 1u))) ++h;
  return static_cast<uint16_t>(sign | h);
#endif
}

TCC_HD float f16_value(uint16_t h) {
#ifdef __CUDA_ARCH__
  return __half2float(__ushort_as_half(h));
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  uint32_t u;
  if (exp == 0x1fu) {
    u = sign | 0x7f800000u | (mant << 13);
  } else if (exp != 0) {
    u = sign | ((exp + 112u) << 23) | (mant << 13);
  } else {  // zero or subnormal: mant * 2^-24, exact in float32
    const float v = static_cast<float>(mant) * 5.9604644775390625e-08f;
    std::memcpy(&u, &v, 4);
    u |= sign;
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

TCC_HD uint32_t pack_half2(uint16_t lo, uint16_t hi) { return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16); }

TCC_HD uint32_t half2_of(float lo, float hi) { return pack_half2(f16_bits(lo), f16_bits(hi)); }

// x = hi + lo as two float16 values (dense_w4's tensor-core path keeps ~22 bits of each x)
TCC_HD void split_half(float x, uint16_t* hi, uint16_t* lo) {
  *hi = f16_bits(x);
  *lo = f16_bits(x - f16_value(*hi));  // exact in float32
}

// ---------------------------------------------------------------------------------------------
// dense_a8w8: activation quantization (tcc/ops.py quantize_rows) and epilogue
// ---------------------------------------------------------------------------------------------

struct RowQuant {
  float s;  // scale
  float z;  // zero point (an integer; 0 when symmetric)
};

// A row's dynamic scale and zero point from its minimum and maximum, as ops.quantize_rows.
TCC_HD RowQuant a8_row_params(float lo, float hi, bool asym) {
  RowQuant r;
  if (asym) {
    lo = lo < 0.0f ? lo : 0.0f;
    hi = hi > 0.0f ? hi : 0.0f;
    r.s = div_rn(hi - lo, 255.0f);
  } else {
    r.s = div_rn(-lo > hi ? -lo : hi, 127.0f);
  }
  if (!(r.s > 0.0f)) r.s = 1.0f;
  r.z = asym ? round_even(div_rn(-lo, r.s)) : 0.0f;
  return r;
}

// The static per-tensor scale and zero point (the zero point only when asymmetric).
TCC_HD RowQuant a8_static_params(const float* x_scale, const float* x_zero, bool asym) {
  return RowQuant{*x_scale, asym ? *x_zero : 0.0f};
}

// The code of x: clamp(round(x / s) + z) to [-127, 127] (symmetric) or [0, 255] (asymmetric).
TCC_HD int32_t a8_code(float x, RowQuant r, bool asym) {
  float q = add_rn(round_even(div_rn(x, r.s)), r.z);
  const float lo = asym ? 0.0f : -127.0f, hi = asym ? 255.0f : 127.0f;
  q = q < lo ? lo : (q > hi ? hi : q);
  return static_cast<int32_t>(q);
}

// Four codes, k ascending from the low byte (one s8/u8 fragment register).
TCC_HD uint32_t a8_pack4(const int32_t c[4]) {
  return (static_cast<uint32_t>(c[0]) & 0xffu) | ((static_cast<uint32_t>(c[1]) & 0xffu) << 8) |
         ((static_cast<uint32_t>(c[2]) & 0xffu) << 16) | ((static_cast<uint32_t>(c[3]) & 0xffu) << 24);
}

// y = (sum_k (q - z) w) * s * w_scale [+ b], from acc = sum_k q w and wsum = sum_k w: the
// reference's float64 product rounded to float32, then the bias added in float32.
TCC_HD float a8_epilogue(int32_t acc, int32_t wsum, RowQuant r, float w_scale, const float* b, int64_t n) {
  const double dot = static_cast<double>(acc) - static_cast<double>(r.z) * static_cast<double>(wsum);
  const float y = static_cast<float>(dot * static_cast<double>(r.s) * static_cast<double>(w_scale));
  return b ? add_rn(y, b[n]) : y;
}

// B fragment (m16n8k32 int8) of columns col0 .. col0 + 7, k = 4 q0 .. 4 q0 + 31, from the packed
// weight viewed as 32-bit words [tiles][quads][16]: word (tile, q, c) = qw[16 tile + c][4 q .. 4 q + 3]
// (quant_layout.pack_a8w8). Zero past the packed tiles or quads.
TCC_HD void a8_b_frag(const uint32_t* qw, int64_t tiles, int64_t quads, int64_t col0, int64_t q0, int lane,
                      uint32_t b[2]) {
  const int g = lane >> 2, t = lane & 3;
  const int64_t col = col0 + g, tile = col / kTile, c = col % kTile;
  TCC_UNROLL for (int r = 0; r < 2; ++r) {
    const int64_t q = q0 + 4 * r + t;
    b[r] = (tile < tiles && q < quads) ? qw[(tile * quads + q) * kTile + c] : 0u;
  }
}

// ---------------------------------------------------------------------------------------------
// dense_w4: int4 codes (quant_layout.pack_w4) on tensor cores and on CUDA cores
// ---------------------------------------------------------------------------------------------

// The tensor-core path takes more than 16 rows with K and the group multiples of 16 (a step of 16 k
// then lies in one group); the CUDA-core path everything else.
TCC_HD bool w4_uses_mma(int64_t m, int64_t k, int64_t group) {
  return m > 16 && k > 0 && k % kW4Step == 0 && group % kW4Step == 0;
}

// Byte j (k = 2 j low nibble, 2 j + 1 high nibble) of column col, from qw [tiles][K/2][16].
TCC_HD uint8_t w4_byte(const uint8_t* qw, int64_t half_k, int64_t col, int64_t j) {
  return qw[((col / kTile) * half_k + j) * kTile + col % kTile];
}

// (code - zero) for both nibbles of a byte as a half2: integers in [-15, 15], exact in float16.
TCC_HD uint32_t w4_centered_half2(uint8_t byte, uint8_t zero) {
  return half2_of(static_cast<float>(byte & 15) - static_cast<float>(zero),
                  static_cast<float>(byte >> 4) - static_cast<float>(zero));
}

// B fragment (m16n8k16 f16) of columns col0 .. col0 + 7, k = k0 .. k0 + 15 (in one group), codes
// minus the group's zero point (the scale is applied to the accumulators per group). Zero past
// the packed columns np.
TCC_HD void w4_b_frag(const uint8_t* qw, const uint8_t* zero_t, int64_t half_k, int64_t np, int64_t group,
                      int64_t col0, int64_t k0, int lane, uint32_t b[2]) {
  const int g = lane >> 2, t = lane & 3;
  const int64_t col = col0 + g;
  if (col >= np) {
    b[0] = b[1] = 0u;
    return;
  }
  const uint8_t z = zero_t[(k0 / group) * np + col];
  TCC_UNROLL for (int r = 0; r < 2; ++r) b[r] = w4_centered_half2(w4_byte(qw, half_k, col, k0 / 2 + 4 * r + t), z);
}

// The reference's dequantized weight (code - zero) * scale in float32 (ops.dequantize_w4).
TCC_HD float w4_weight(int code, uint8_t zero, float scale) {
  return mul_rn(static_cast<float>(code) - static_cast<float>(zero), scale);
}

// The SIMT kernel's partial sums: thread (c, slice) of the block for tile `tile`, rows
// row0 .. row0 + rows - 1: acc[r] = sum over j = slice, slice + 8, ... of x[row][2j] w[2j] +
// x[row][2j+1] w[2j+1] for column 16 tile + c, fused multiply-adds in this order.
TCC_HD void w4_simt_partial(const float* x, const uint8_t* qw, const float* scale_t, const uint8_t* zero_t,
                            int64_t k, int64_t np, int64_t group, int64_t tile, int c, int slice, int64_t row0,
                            int rows, float acc[kW4SimtRows]) {
  const int64_t col = tile * kTile + c, half_k = k / 2;
  TCC_UNROLL for (int r = 0; r < kW4SimtRows; ++r) acc[r] = 0.0f;
  for (int64_t j = slice; j < half_k; j += kW4SimtSlices) {
    const uint8_t byte = qw[(tile * half_k + j) * kTile + c];
    const int64_t grp = 2 * j / group;
    const float s = scale_t[grp * np + col];
    const uint8_t z = zero_t[grp * np + col];
    const float w_lo = w4_weight(byte & 15, z, s), w_hi = w4_weight(byte >> 4, z, s);
    TCC_UNROLL for (int r = 0; r < kW4SimtRows; ++r) {
      if (r < rows) {
        const float* xr = x + (row0 + r) * k + 2 * j;
        acc[r] = fma_rn(xr[1], w_hi, fma_rn(xr[0], w_lo, acc[r]));
      }
    }
  }
}

// Row r, column c of the SIMT block's result: the slices' partial sums ([slice][row][16], as
// w4_simt_partial left them) added in slice order.
TCC_HD float w4_simt_sum(const float* part, int r, int c) {
  float s = 0.0f;
  for (int slice = 0; slice < kW4SimtSlices; ++slice) s = add_rn(s, part[(slice * kW4SimtRows + r) * kTile + c]);
  return s;
}

// ---------------------------------------------------------------------------------------------
// 2:4 sparse weights for mma.sp (layout.py compress_24 writes them)
// ---------------------------------------------------------------------------------------------
//   values  float16 [N, Kp / 2]   Kp = K rounded up to 32: per chunk of 4 input features, the two
//                                 kept weights in increasing k (0 past K)
//   meta    uint16  [N, Kp / 16]  word w: chunks 4 w .. 4 w + 3, chunk 4 w + i in bits 4 i .. 4 i + 3
//                                 as i0 | i1 << 2 (i0 < i1, the kept positions in the chunk)

// The kept positions (i0 < i1) of chunk `chunk_in_word` (0..3) of a metadata word.
TCC_HD void sp24_decode(uint16_t word, int chunk_in_word, int* i0, int* i1) {
  const int nib = (word >> (4 * chunk_in_word)) & 15;
  *i0 = nib & 3;
  *i1 = nib >> 2;
}

// A fragment of mma.sp m16n8k32: rows row0 .. row0 + 15 of the compressed values (viewed as
// 32-bit half2 words, `kc_words` = Kp / 4 per row), step at compressed word w0 = k0 / 4. Zero for
// rows past n.
TCC_HD void sp_a_frag(const uint32_t* values, int64_t n, int64_t kc_words, int64_t row0, int64_t w0, int lane,
                      uint32_t a[4]) {
  const int g = lane >> 2, t = lane & 3;
  TCC_UNROLL for (int r = 0; r < 4; ++r) {
    const int64_t row = row0 + g + 8 * (r & 1);
    a[r] = row < n ? values[row * kc_words + w0 + 4 * (r >> 1) + t] : 0u;
  }
}

// Metadata register of mma.sp m16n8k32 (selector 0) for rows row0 .. row0 + 15, step at metadata
// word m0 = k0 / 16 (`meta_words` = Kp / 16 per row). Rows past n keep indices 0 and 1.
TCC_HD uint32_t sp_meta_frag(const uint16_t* meta, int64_t n, int64_t meta_words, int64_t row0, int64_t m0,
                             int lane) {
  const int g = lane >> 2, h = lane & 1;
  const int64_t r0 = row0 + g, r1 = row0 + g + 8;
  const uint32_t lo = r0 < n ? meta[r0 * meta_words + m0 + h] : kSpPadMeta;
  const uint32_t hi = r1 < n ? meta[r1 * meta_words + m0 + h] : kSpPadMeta;
  return lo | (hi << 16);
}

// B fragment of mma.sp m16n8k32 f16: columns (tokens) col0 .. col0 + 7 from the block's x tile in
// shared memory as half2 words (kSpLds per token; word w = k 2 w, 2 w + 1 of the step).
TCC_HD void sp_b_frag(const uint32_t* x, int col0, int lane, uint32_t b[4]) {
  const int g = lane >> 2, t = lane & 3;
  TCC_UNROLL for (int r = 0; r < 4; ++r) b[r] = x[(col0 + g) * kSpLds + 4 * r + t];
}

// ---------------------------------------------------------------------------------------------
// Fragments every kernel uses
// ---------------------------------------------------------------------------------------------

// A fragment of rows row0 .. row0 + 15 from a tile in shared memory (kLds words per row, a step of
// 8 words): m16n8k32 int8 (a word = 4 k) and m16n8k16 f16 (a word = 2 k) place words alike: register
// r = row g + 8 (r & 1), word 4 (r >> 1) + t.
TCC_HD void a_frag(const uint32_t* tile, int row0, int lane, uint32_t a[4]) {
  const int g = lane >> 2, t = lane & 3;
  a[0] = tile[(row0 + g) * kLds + t];
  a[1] = tile[(row0 + g + 8) * kLds + t];
  a[2] = tile[(row0 + g) * kLds + 4 + t];
  a[3] = tile[(row0 + g + 8) * kLds + 4 + t];
}

// Accumulator register r of a lane: (row, column) offsets in the 16 x 8 tile.
TCC_HD int acc_row(int lane, int r) { return (lane >> 2) + 8 * (r >> 1); }
TCC_HD int acc_col(int lane, int r) { return 2 * (lane & 3) + (r & 1); }

}  // namespace tcc_cuda
