// A CPU replay of tcc's CUDA kernels (quant_gemm.cu, sparse24_gemm.cu), for tests on a host without
// a GPU: the same blocks, warps, lanes, shared-memory tiles and tcc_cuda.cuh functions (quantization,
// fragment loads, epilogues) as the kernels, with the tensor-core instructions emulated from the
// PTX ISA's element mappings. Built with g++ (-ffp-contract=off) as a shared library that
// emulate.py loads with ctypes; every function takes row-major host arrays.
//
// What it checks: layouts, fragment indexing, quantization, dequantization and epilogues, and the
// loop structure over blocks and steps. What it cannot: the instructions themselves (an mma here
// sums its products exactly and rounds once to float32; the hardware's accumulation order and
// rounding differ within float32 rounding), and anything about timing, memory or synchronization.
#include <cstdint>
#include <vector>

#include "tcc_cuda.cuh"

using namespace tcc_cuda;

namespace {

constexpr int kLanes = 32;
constexpr int kWarps = kThreads / kLanes;

// ---------------------------------------------------------------------------------------------
// Tensor-core instructions (lane = 4 g + t)
// ---------------------------------------------------------------------------------------------

// mma.sync m16n8k32 s32 = {s8|u8} x s8 + s32. A elements a0..a15 (4 per register, low byte first):
// row g for a0-a3 and a8-a11, g + 8 otherwise; column 4 t + (i & 3), + 16 for i >= 8.
// B elements b0..b7: row 4 t + (i & 3), + 16 for i >= 4; column g.
void mma_i8(int32_t c[kLanes][4], const uint32_t a[kLanes][4], const uint32_t b[kLanes][2], bool a_unsigned) {
  int32_t A[16][32], B[32][8];
  for (int lane = 0; lane < kLanes; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    for (int i = 0; i < 16; ++i) {
      const uint32_t raw = (a[lane][i / 4] >> (8 * (i % 4))) & 0xffu;
      const int row = g + ((i < 4 || (i >= 8 && i < 12)) ? 0 : 8), col = 4 * t + (i & 3) + (i >= 8 ? 16 : 0);
      A[row][col] = a_unsigned ? static_cast<int32_t>(raw) : static_cast<int32_t>(static_cast<int8_t>(raw));
    }
    for (int i = 0; i < 8; ++i) {
      const uint32_t raw = (b[lane][i / 4] >> (8 * (i % 4))) & 0xffu;
      B[4 * t + (i & 3) + (i >= 4 ? 16 : 0)][g] = static_cast<int8_t>(raw);
    }
  }
  for (int lane = 0; lane < kLanes; ++lane)
    for (int i = 0; i < 4; ++i) {
      const int row = (lane >> 2) + (i >= 2 ? 8 : 0), col = 2 * (lane & 3) + (i & 1);
      int32_t sum = c[lane][i];
      for (int k = 0; k < 32; ++k) sum += A[row][k] * B[k][col];
      c[lane][i] = sum;
    }
}

float half_lo(uint32_t r) { return f16_value(static_cast<uint16_t>(r & 0xffffu)); }
float half_hi(uint32_t r) { return f16_value(static_cast<uint16_t>(r >> 16)); }
float half_at(uint32_t r, int i) { return i ? half_hi(r) : half_lo(r); }

// D = C + A B for float16 A [16][K] and B [K][8] with float32 C, D: the sum exact, rounded once.
template <int K>
void mma_f16_dense(float c[kLanes][4], const float A[16][K], const float B[K][8]) {
  for (int lane = 0; lane < kLanes; ++lane)
    for (int i = 0; i < 4; ++i) {
      const int row = (lane >> 2) + (i >= 2 ? 8 : 0), col = 2 * (lane & 3) + (i & 1);
      double sum = c[lane][i];
      for (int k = 0; k < K; ++k) sum += static_cast<double>(A[row][k]) * B[k][col];
      c[lane][i] = static_cast<float>(sum);
    }
}

// The m16n8k16 f16 A operand: a0..a7 (2 per register): row g for a0, a1, a4, a5, g + 8 otherwise;
// column 2 t + (i & 1), + 8 for i >= 4.
void f16_a_matrix(const uint32_t a[kLanes][4], float A[16][16]) {
  for (int lane = 0; lane < kLanes; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    for (int i = 0; i < 8; ++i) {
      const int row = g + ((i == 2 || i == 3 || i == 6 || i == 7) ? 8 : 0), col = 2 * t + (i & 1) + (i >= 4 ? 8 : 0);
      A[row][col] = half_at(a[lane][i / 2], i & 1);
    }
  }
}

// mma.sync m16n8k16 f32 = f16 x f16 + f32. B elements b0..b3: row 2 t + (i & 1), + 8 for i >= 2; column g.
void mma_f16(float c[kLanes][4], const uint32_t a[kLanes][4], const uint32_t b[kLanes][2]) {
  float A[16][16], B[16][8];
  f16_a_matrix(a, A);
  for (int lane = 0; lane < kLanes; ++lane)
    for (int i = 0; i < 4; ++i) B[2 * (lane & 3) + (i & 1) + (i >= 2 ? 8 : 0)][lane >> 2] = half_at(b[lane][i / 2], i & 1);
  mma_f16_dense<16>(c, A, B);
}

// The dense 16 x 32 A of mma.sp m16n8k32 f16 (selector 0) from its compressed registers (the
// m16n8k16 A layout over 16 x 16 kept values) and metadata: row r's chunk ch (columns 4 ch ..
// 4 ch + 3) is described in lane 4 (r % 8) + ch / 4, bits 16 (r / 8) + 4 (ch % 4) .. + 3, as the
// positions i0 | i1 << 2 of compressed columns 2 ch and 2 ch + 1. Returns false on an invalid
// nibble (equal positions: undefined behaviour on the GPU).
bool sparse_a_matrix(const uint32_t a[kLanes][4], const uint32_t e[kLanes], float A[16][32]) {
  float comp[16][16];
  f16_a_matrix(a, comp);
  for (int r = 0; r < 16; ++r)
    for (int ch = 0; ch < 8; ++ch) {
      const uint32_t word = e[4 * (r % 8) + ch / 4] >> (16 * (r / 8));
      int i0, i1;
      sp24_decode(static_cast<uint16_t>(word & 0xffffu), ch % 4, &i0, &i1);
      if (i0 == i1) return false;
      for (int i = 0; i < 4; ++i) A[r][4 * ch + i] = 0.0f;
      A[r][4 * ch + i0] = comp[r][2 * ch];
      A[r][4 * ch + i1] = comp[r][2 * ch + 1];
    }
  return true;
}

// mma.sp m16n8k32 f32 = f16 (2:4) x f16 + f32. B elements b0..b7: row 2 t + (i & 1) + 8 (i >> 1); column g.
bool mma_sp(float c[kLanes][4], const uint32_t a[kLanes][4], const uint32_t b[kLanes][4], const uint32_t e[kLanes]) {
  float A[16][32], B[32][8];
  if (!sparse_a_matrix(a, e, A)) return false;
  for (int lane = 0; lane < kLanes; ++lane)
    for (int i = 0; i < 8; ++i) B[2 * (lane & 3) + (i & 1) + 8 * (i >> 1)][lane >> 2] = half_at(b[lane][i / 2], i & 1);
  mma_f16_dense<32>(c, A, B);
  return true;
}

// Accumulators of one warp: [2][4] fragments x 32 lanes x 4 registers.
template <typename T>
struct WarpAcc {
  T v[2][4][kLanes][4] = {};
};

}  // namespace

extern "C" {

// ---------------------------------------------------------------------------------------------
// dense_a8w8 (a8w8_kernel)
// ---------------------------------------------------------------------------------------------

// The kernel's activation quantization alone: codes [m][k], scale and zero point [m].
void tcc_emu_a8_quantize(const float* x, int64_t m, int64_t k, const float* x_scale, const float* x_zero, int asym,
                         int32_t* codes, float* s, float* z) {
  for (int64_t row = 0; row < m; ++row) {
    RowQuant r;
    if (x_scale) {
      r = a8_static_params(x_scale, x_zero, asym);
    } else {
      float lo = INFINITY, hi = -INFINITY;
      for (int64_t i = 0; i < k; ++i) lo = std::fmin(lo, x[row * k + i]), hi = std::fmax(hi, x[row * k + i]);
      r = a8_row_params(lo, hi, asym);
    }
    for (int64_t i = 0; i < k; ++i) codes[row * k + i] = a8_code(x[row * k + i], r, asym);
    s[row] = r.s, z[row] = r.z;
  }
}

void tcc_emu_dense_a8w8(const float* x, const int8_t* qw, const int32_t* wsum, const float* w_scale, const float* b,
                        const float* x_scale, const float* x_zero, int asym, int64_t m, int64_t n, int64_t k,
                        float* out) {
  const uint32_t* qw32 = reinterpret_cast<const uint32_t*>(qw);
  const int64_t tiles = ceil_div(n, kTile), quads = ceil_div(k, 4);
  for (int64_t by = 0; by < ceil_div(m, kBlockM); ++by)
    for (int64_t bx = 0; bx < ceil_div(n, kBlockN); ++bx) {
      const int64_t m0 = by * kBlockM, n0 = bx * kBlockN;
      RowQuant rq[kBlockM];
      for (int r = 0; r < kBlockM; ++r) {
        const int64_t row = m0 + r;
        float lo = INFINITY, hi = -INFINITY;
        for (int64_t i = 0; row < m && i < k; ++i) lo = std::fmin(lo, x[row * k + i]), hi = std::fmax(hi, x[row * k + i]);
        rq[r] = x_scale ? a8_static_params(x_scale, x_zero, asym) : a8_row_params(lo, hi, asym);
      }
      std::vector<WarpAcc<int32_t>> acc(kWarps);
      uint32_t codes[kBlockM * kLds] = {};
      for (int64_t k0 = 0; k0 < k; k0 += kA8Step) {
        for (int i = 0; i < kBlockM * 8; ++i) {
          const int r = i >> 3, w = i & 7;
          const int64_t row = m0 + r;
          int32_t c[4];
          for (int e = 0; e < 4; ++e) {
            const int64_t kk = k0 + 4 * w + e;
            c[e] = (row < m && kk < k) ? a8_code(x[row * k + kk], rq[r], asym) : 0;
          }
          codes[r * kLds + w] = a8_pack4(c);
        }
        for (int warp = 0; warp < kWarps; ++warp) {
          const int wm = warp >> 1, wn = warp & 1;
          uint32_t a[2][kLanes][4], bf[4][kLanes][2];
          for (int lane = 0; lane < kLanes; ++lane) {
            for (int mi = 0; mi < 2; ++mi) a_frag(codes, wm * kWarpM + 16 * mi, lane, a[mi][lane]);
            for (int ni = 0; ni < 4; ++ni) a8_b_frag(qw32, tiles, quads, n0 + wn * kWarpN + 8 * ni, k0 / 4, lane, bf[ni][lane]);
          }
          for (int mi = 0; mi < 2; ++mi)
            for (int ni = 0; ni < 4; ++ni) mma_i8(acc[warp].v[mi][ni], a[mi], bf[ni], asym);
        }
      }
      for (int warp = 0; warp < kWarps; ++warp)
        for (int lane = 0; lane < kLanes; ++lane)
          for (int mi = 0; mi < 2; ++mi)
            for (int ni = 0; ni < 4; ++ni)
              for (int r = 0; r < 4; ++r) {
                const int lr = (warp >> 1) * kWarpM + 16 * mi + acc_row(lane, r);
                const int64_t row = m0 + lr, col = n0 + (warp & 1) * kWarpN + 8 * ni + acc_col(lane, r);
                if (row < m && col < n)
                  out[row * n + col] = a8_epilogue(acc[warp].v[mi][ni][lane][r], wsum[col], rq[lr], w_scale[col], b, col);
              }
    }
}

// ---------------------------------------------------------------------------------------------
// dense_w4 (w4_mma_kernel, w4_simt_kernel)
// ---------------------------------------------------------------------------------------------

// path 0: the launcher's choice, 1: CUDA cores, 2: tensor cores. Returns the path run, or -1 when
// the tensor-core path was asked for a shape it does not take.
int tcc_emu_dense_w4(const float* x, const uint8_t* qw, const float* scale_t, const uint8_t* zero_t, const float* b,
                     int64_t m, int64_t n, int64_t k, int64_t groups, int path, float* out) {
  const int64_t np = ceil_div(n, kTile) * kTile, group = groups ? k / groups : 0;
  if (path == 0) path = w4_uses_mma(m, k, group) ? 2 : 1;
  if (path == 2 && !(k > 0 && k % kW4Step == 0 && group % kW4Step == 0)) return -1;
  if (path == 1) {
    for (int64_t tile = 0; tile < np / kTile; ++tile)
      for (int64_t row0 = 0; row0 < m; row0 += kW4SimtRows) {
        const int rows = static_cast<int>(m - row0 < kW4SimtRows ? m - row0 : kW4SimtRows);
        float part[kW4SimtSlices * kW4SimtRows * kTile];
        for (int tid = 0; tid < kThreads; ++tid) {
          const int c = tid % kTile, slice = tid / kTile;
          float acc[kW4SimtRows];
          w4_simt_partial(x, qw, scale_t, zero_t, k, np, group, tile, c, slice, row0, rows, acc);
          for (int r = 0; r < kW4SimtRows; ++r) part[(slice * kW4SimtRows + r) * kTile + c] = acc[r];
        }
        for (int tid = 0; tid < kThreads; ++tid) {
          const int r = tid / kTile, c = tid % kTile;
          const int64_t col = tile * kTile + c;
          if (r < rows && col < n) {
            const float s = w4_simt_sum(part, r, c);
            out[(row0 + r) * n + col] = b ? add_rn(s, b[col]) : s;
          }
        }
      }
    return 1;
  }
  for (int64_t by = 0; by < ceil_div(m, kBlockM); ++by)
    for (int64_t bx = 0; bx < ceil_div(n, kBlockN); ++bx) {
      const int64_t m0 = by * kBlockM, n0 = bx * kBlockN;
      std::vector<WarpAcc<float>> acc(kWarps), part(kWarps);
      uint32_t xs_hi[kBlockM * kLds] = {}, xs_lo[kBlockM * kLds] = {};
      for (int64_t k0 = 0; k0 < k; k0 += kW4Step) {
        for (int i = 0; i < kBlockM * 8; ++i) {
          const int r = i >> 3, w = i & 7;
          const int64_t row = m0 + r;
          const float v0 = row < m ? x[row * k + k0 + 2 * w] : 0.0f, v1 = row < m ? x[row * k + k0 + 2 * w + 1] : 0.0f;
          uint16_t h0, l0, h1, l1;
          split_half(v0, &h0, &l0);
          split_half(v1, &h1, &l1);
          xs_hi[r * kLds + w] = pack_half2(h0, h1);
          xs_lo[r * kLds + w] = pack_half2(l0, l1);
        }
        for (int warp = 0; warp < kWarps; ++warp) {
          const int wm = warp >> 1, wn = warp & 1;
          uint32_t a_hi[2][kLanes][4], a_lo[2][kLanes][4], bf[4][kLanes][2];
          for (int lane = 0; lane < kLanes; ++lane) {
            for (int mi = 0; mi < 2; ++mi) {
              a_frag(xs_hi, wm * kWarpM + 16 * mi, lane, a_hi[mi][lane]);
              a_frag(xs_lo, wm * kWarpM + 16 * mi, lane, a_lo[mi][lane]);
            }
            for (int ni = 0; ni < 4; ++ni)
              w4_b_frag(qw, zero_t, k / 2, np, group, n0 + wn * kWarpN + 8 * ni, k0, lane, bf[ni][lane]);
          }
          for (int mi = 0; mi < 2; ++mi)
            for (int ni = 0; ni < 4; ++ni) {
              mma_f16(part[warp].v[mi][ni], a_lo[mi], bf[ni]);
              mma_f16(part[warp].v[mi][ni], a_hi[mi], bf[ni]);
            }
          if ((k0 + kW4Step) % group == 0)
            for (int lane = 0; lane < kLanes; ++lane)
              for (int ni = 0; ni < 4; ++ni)
                for (int r = 0; r < 4; ++r) {
                  const int64_t col = n0 + wn * kWarpN + 8 * ni + acc_col(lane, r);
                  const float s = col < np ? scale_t[(k0 / group) * np + col] : 0.0f;
                  for (int mi = 0; mi < 2; ++mi) {
                    float& p = part[warp].v[mi][ni][lane][r];
                    acc[warp].v[mi][ni][lane][r] = fma_rn(s, p, acc[warp].v[mi][ni][lane][r]);
                    p = 0.0f;
                  }
                }
        }
      }
      for (int warp = 0; warp < kWarps; ++warp)
        for (int lane = 0; lane < kLanes; ++lane)
          for (int mi = 0; mi < 2; ++mi)
            for (int ni = 0; ni < 4; ++ni)
              for (int r = 0; r < 4; ++r) {
                const int64_t row = m0 + (warp >> 1) * kWarpM + 16 * mi + acc_row(lane, r);
                const int64_t col = n0 + (warp & 1) * kWarpN + 8 * ni + acc_col(lane, r);
                const float v = acc[warp].v[mi][ni][lane][r];
                if (row < m && col < n) out[row * n + col] = b ? add_rn(v, b[col]) : v;
              }
    }
  return 2;
}

// ---------------------------------------------------------------------------------------------
// dense_sp24 (sp24_kernel)
// ---------------------------------------------------------------------------------------------

// The weight [n][Kp] as mma.sp sees it: fragments loaded as the kernel loads them, decoded by the
// instruction's rules. Returns 0, or -1 on a metadata nibble the instruction does not accept.
int tcc_emu_sp24_weight(const uint16_t* values, const uint16_t* meta, int64_t n, int64_t k, float* w) {
  const uint32_t* values32 = reinterpret_cast<const uint32_t*>(values);
  const int64_t kp = ceil_div(k, kSpStep) * kSpStep;
  for (int64_t row0 = 0; row0 < n; row0 += 16)
    for (int64_t k0 = 0; k0 < kp; k0 += kSpStep) {
      uint32_t a[kLanes][4], e[kLanes];
      for (int lane = 0; lane < kLanes; ++lane) {
        sp_a_frag(values32, n, kp / 4, row0, k0 / 4, lane, a[lane]);
        e[lane] = sp_meta_frag(meta, n, kp / 16, row0, k0 / 16, lane);
      }
      float A[16][32];
      if (!sparse_a_matrix(a, e, A)) return -1;
      for (int r = 0; r < 16 && row0 + r < n; ++r)
        for (int c = 0; c < kSpStep; ++c) w[(row0 + r) * kp + k0 + c] = A[r][c];
    }
  return 0;
}

int tcc_emu_dense_sp24(const float* x, const uint16_t* values, const uint16_t* meta, const float* b, int64_t m,
                       int64_t n, int64_t k, float* out) {
  const uint32_t* values32 = reinterpret_cast<const uint32_t*>(values);
  const int64_t kp = ceil_div(k, kSpStep) * kSpStep;
  for (int64_t by = 0; by < ceil_div(m, kBlockN); ++by)
    for (int64_t bx = 0; bx < ceil_div(n, kBlockM); ++bx) {
      const int64_t n0 = bx * kBlockM, m0 = by * kBlockN;
      std::vector<WarpAcc<float>> acc(kWarps);
      uint32_t xs[kBlockN * kSpLds] = {};
      for (int64_t k0 = 0; k0 < kp; k0 += kSpStep) {
        for (int i = 0; i < kBlockN * 16; ++i) {
          const int r = i >> 4, w = i & 15;
          const int64_t tok = m0 + r, kk = k0 + 2 * w;
          const float v0 = (tok < m && kk < k) ? x[tok * k + kk] : 0.0f;
          const float v1 = (tok < m && kk + 1 < k) ? x[tok * k + kk + 1] : 0.0f;
          xs[r * kSpLds + w] = half2_of(v0, v1);
        }
        for (int warp = 0; warp < kWarps; ++warp) {
          const int wn = warp >> 1, wm = warp & 1;
          uint32_t a[2][kLanes][4], e[2][kLanes], bf[4][kLanes][4];
          for (int lane = 0; lane < kLanes; ++lane) {
            for (int ni = 0; ni < 2; ++ni) {
              const int64_t row0 = n0 + wn * kWarpM + 16 * ni;
              sp_a_frag(values32, n, kp / 4, row0, k0 / 4, lane, a[ni][lane]);
              e[ni][lane] = sp_meta_frag(meta, n, kp / 16, row0, k0 / 16, lane);
            }
            for (int mi = 0; mi < 4; ++mi) sp_b_frag(xs, wm * kWarpN + 8 * mi, lane, bf[mi][lane]);
          }
          for (int ni = 0; ni < 2; ++ni)
            for (int mi = 0; mi < 4; ++mi)
              if (!mma_sp(acc[warp].v[ni][mi], a[ni], bf[mi], e[ni])) return -1;
        }
      }
      for (int warp = 0; warp < kWarps; ++warp)
        for (int lane = 0; lane < kLanes; ++lane)
          for (int ni = 0; ni < 2; ++ni)
            for (int mi = 0; mi < 4; ++mi)
              for (int r = 0; r < 4; ++r) {
                const int64_t ch = n0 + (warp >> 1) * kWarpM + 16 * ni + acc_row(lane, r);
                const int64_t tok = m0 + (warp & 1) * kWarpN + 8 * mi + acc_col(lane, r);
                const float v = acc[warp].v[ni][mi][lane][r];
                if (ch < n && tok < m) out[tok * n + ch] = b ? add_rn(v, b[ch]) : v;
              }
    }
  return 0;
}

// float32 -> float16 bits and back, as the kernels convert.
void tcc_emu_to_f16(const float* x, int64_t n, uint16_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = f16_bits(x[i]);
}

void tcc_emu_from_f16(const uint16_t* h, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = f16_value(h[i]);
}

}  // extern "C"
