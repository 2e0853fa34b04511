// tcc's low-precision CPU kernels: W8A8 dense (int8 activations x int8 weights, integer dot
// products) and int4 weight-only dense, called from TVM modules like cpu_kernels.cc (x86-64 and
// aarch64).
//
// Contract: each kernel computes the reference op of tcc/ops.py (tcc::dense_a8w8, tcc::dense_w4) on
// row-major contiguous CPU tensors and writes its result into the last argument (destination-passing
// style, as R.call_dps_packed calls it). The weights come pre-packed by quant_layout.py (pack_a8w8,
// pack_w4), which documents the layouts; every argument's dtype, rank and shape is checked, and a
// mismatch raises a ValueError/TypeError through TVM-FFI naming the kernel and the argument.
//
//   tcc_dense_a8w8_f32(x[..., K], qw int8[ceil(N/16), ceil(K/4), 16, 4], wsum int32[N],
//                      w_scale[N], b[N], bool asym, out[..., N])      dynamic per-row activation scale
//   tcc_dense_a8w8_nobias_f32(x, qw, wsum, w_scale, bool asym, out)
//   tcc_dense_a8w8_static_f32(x, qw, wsum, w_scale, b, x_scale[1], x_zero[1], bool asym, out)
//   tcc_dense_a8w8_static_nobias_f32(x, qw, wsum, w_scale, x_scale[1], x_zero[1], bool asym, out)
//   tcc_dense_w4_f32(x[..., K], qw uint8[ceil(N/16), K/2, 16], scale[G, 16 ceil(N/16)],
//                    zero uint8 or float32 [G, 16 ceil(N/16)], b[N], out[..., N])     group = K / G
//   tcc_dense_w4_nobias_f32(x, qw, scale, zero, out)
//   tcc_embedding_w4_f32(ids int64 [...], qw (pack_w4a8's or pack_w4's), scale, zero, int64 V, out[..., D])
//                    rows of an int4 table (tcc::embedding_w4) read from a tied LM head's packed codes
//
// asym comes as a Relax PrimValue. x_zero is read only when asym (then an integer in [0, 255]);
// x_scale must be positive. x must be finite (a NaN/inf row gives an unspecified result).
//
// dense_a8w8 numerics are bit-exact with the reference: activations quantize with its float32
// division and round-half-even, the dot products are exact in int32 (K <= 65536), and the epilogue
// is the reference's float64 (acc * s) * w_scale, rounded to float32, plus b in float32. Each ISA
// stores the codes c = q - o with an offset o that makes them fit its instruction, and adds
// (o - z) * wsum[n] back:
//   AVX-512 VNNI  vpdpbusd u8 x s8: c = q + 128 (symmetric) or q (asym) as uint8
//   AVX2          widened to int16, vpmaddwd: c = q - z as int16 (no correction)
//   NEON dotprod  sdot s8 x s8: c = q (symmetric) or q - 128 (asym) as int8
//   NEON          smull s8 x s8 -> s16 (|product| <= 2^14, no overflow), sadalp into int32; codes as sdot
//   scalar        portable C++ (any other target), codes as AVX2
// The -march flags choose the path at compile time (__AVX512VNNI__, __AVX2__, __ARM_FEATURE_DOTPROD);
// the object carries the string "tcc_int8_path=<path>;" naming it.
//
// dense_w4 has two paths, both within fp32 rounding of the reference (which dequantizes
// w = (code - zero) * scale and runs an fp32 GEMM):
//   M <= 32 (decode, GEMV, small batches): a fused loop over tiles of 16 columns: unpack a byte of
//     each column (k = 2j and 2j + 1), convert the codes to float, FMA into per-row accumulators;
//     scale and zero point come out of each group, s * (sum_k x_k code_k - zero * sum_k x_k).
//     GCC vector extensions at the register width: zmm, 2 ymm, or 4 xmm / NEON q per 16 columns.
//   M > 32: dequantize blocks of columns exactly as the reference does into a per-thread fp32
//     buffer (~512 KiB) and call OpenBLAS sgemm (measured faster from M ~ 48 on).
//
// dense_w4a8 (tcc::dense_w4 acts="int8", pack_w4a8's layout) quantizes each row's blocks of `group`
// k to int8 (bit-exact with the reference's codes), then integer dot products of int4 codes x int8
// codes per group, and per group and column acc += s_w s_x (sum_k q code - zero sum_k q) in fp32:
//   M <= 32 (decode): per tile of 16 columns and 4 rows, the codes unpack in registers (and/shift)
//     and vpdpbusd / maddubs / sdot / smull them against the activation quads, 4 chains per row.
//   M > 32 (prefill): a GEMM. Per panel of tiles the codes unpack once to one signed byte each,
//     code - zero (integer zero points: the zero point leaves the per-row work), in the layout
//     int8_tile reads; blocks of rows run vpdpbusd on it (VNNI: 8 rows x 3 tiles, activations as
//     q + 128, each group's accumulators starting at -128 sum_k w) or int8_tile (the other ISAs),
//     and each group's int32 sums fold into fp32 accumulators: acc += T (s_w s_x).
//
// Threads: TVM's pool (common.h `parallel`). dense_a8w8 quantizes the rows in one launch, then
// splits the columns (in tiles of 16) or, when M > N, the rows; dense_w4 splits the longer of M, N.
#include "common.h"

#include <array>
#include <cmath>
#include <utility>

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define TCC_INT8_VNNI 1
#define TCC_INT8_PATH "avx512vnni"
#elif defined(__AVX2__)
#include <immintrin.h>
#define TCC_INT8_AVX2 1
#define TCC_INT8_PATH "avx2"
#elif defined(__aarch64__) && defined(__ARM_FEATURE_DOTPROD)
#include <arm_neon.h>
#define TCC_INT8_SDOT 1
#define TCC_INT8_PATH "neon-dotprod"
#elif defined(__aarch64__)
#include <arm_neon.h>
#define TCC_INT8_NEON 1
#define TCC_INT8_PATH "neon"
#else
#define TCC_INT8_SCALAR 1
#define TCC_INT8_PATH "scalar"
#endif

#if defined(__x86_64__) && !defined(TCC_INT8_VNNI) && !defined(TCC_INT8_AVX2)
#include <immintrin.h>  // SSE2, for the int4 kernel
#endif

// The chosen path, as a string in the object (tests and people read it with `strings`).
[[gnu::used]] static const char kInt8PathTag[] = "tcc_int8_path=" TCC_INT8_PATH ";";

namespace {

constexpr int64_t kTile = 16;         // output columns per packed weight tile
constexpr int64_t kMaxK = 65536;      // int32 accumulators stay exact up to here
constexpr int64_t kW4DirectRows = 32;  // dense_w4: the fused loop up to this many rows, sgemm above

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Fully unrolls a loop over registers before GCC decides what stays in registers.
#define UNROLL _Pragma("GCC unroll 64")

// ---------------------------------------------------------------------------------------------
// int8 tile kernels, one per ISA:
//   int8_tile<MR, NV>(a, lda, w, tile_bytes, kq, c): for MR rows of codes a (row stride lda) and NV
//   packed weight tiles w (tile_bytes apart, kq quads of k each), c[r][16 v + j] = sum_k a[r][k] *
//   w[column 16 v + j][k], exact in int32.
// ---------------------------------------------------------------------------------------------

#if TCC_INT8_VNNI
using Code = uint8_t;
int32_t code_offset(bool asym, int32_t) { return asym ? 0 : -128; }
constexpr int kMR = 8, kNV = 3;  // 24 zmm accumulators + 3 weight vectors + 1 broadcast

template <int MR, int NV>
void int8_tile(const Code* a, int64_t lda, const int8_t* w, int64_t tile_bytes, int64_t kq, int32_t* c) {
  __m512i acc[MR][NV];
  UNROLL for (int r = 0; r < MR; ++r)
    UNROLL for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_si512();
  for (int64_t q = 0; q < kq; ++q) {
    __m512i wv[NV];
    UNROLL for (int v = 0; v < NV; ++v) wv[v] = _mm512_loadu_si512(w + v * tile_bytes + q * 64);
    UNROLL for (int r = 0; r < MR; ++r) {
      int32_t a4;
      std::memcpy(&a4, a + r * lda + 4 * q, 4);
      const __m512i av = _mm512_set1_epi32(a4);
      UNROLL for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbusd_epi32(acc[r][v], av, wv[v]);
    }
  }
  UNROLL for (int r = 0; r < MR; ++r)
    UNROLL for (int v = 0; v < NV; ++v) _mm512_storeu_si512(c + (r * NV + v) * kTile, acc[r][v]);
}

#elif TCC_INT8_AVX2
using Code = int16_t;
int32_t code_offset(bool, int32_t z) { return z; }
constexpr int kMR = 4, kNV = 1;

// A tile in two halves of 8 columns: per quad, 2 x 16 bytes (4 columns x 4 k each) widen to int16,
// vpmaddwd against the row's 4 int16 codes gives [c0 k01, c0 k23, c1 k01, ...]; pairs add at the end.
template <int MR, int NV>
void int8_tile(const Code* a, int64_t lda, const int8_t* w, int64_t tile_bytes, int64_t kq, int32_t* c) {
  for (int v = 0; v < NV; ++v) {
    for (int h = 0; h < 2; ++h) {
      const int8_t* wt = w + v * tile_bytes + h * 32;
      __m256i acc[MR][2];
      UNROLL for (auto& row : acc) row[0] = row[1] = _mm256_setzero_si256();
      for (int64_t q = 0; q < kq; ++q) {
        const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wt + q * 64)));
        const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wt + q * 64 + 16)));
        UNROLL for (int r = 0; r < MR; ++r) {
          int64_t a4;
          std::memcpy(&a4, a + r * lda + 4 * q, 8);
          const __m256i av = _mm256_set1_epi64x(a4);
          acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(w0, av));
          acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(w1, av));
        }
      }
      UNROLL for (int r = 0; r < MR; ++r) {
        __m256i s = _mm256_hadd_epi32(acc[r][0], acc[r][1]);    // c0 c1 c4 c5 | c2 c3 c6 c7
        s = _mm256_permute4x64_epi64(s, _MM_SHUFFLE(3, 1, 2, 0));  // c0 .. c7
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + (r * NV + v) * kTile + h * 8), s);
      }
    }
  }
}

#elif TCC_INT8_SDOT
using Code = int8_t;
int32_t code_offset(bool asym, int32_t) { return asym ? 128 : 0; }
constexpr int kMR = 4, kNV = 1;  // 16 accumulators + 4 weight registers

template <int MR, int NV>
void int8_tile(const Code* a, int64_t lda, const int8_t* w, int64_t tile_bytes, int64_t kq, int32_t* c) {
  int32x4_t acc[MR][NV * 4];
  UNROLL for (auto& row : acc)
    UNROLL for (auto& v : row) v = vdupq_n_s32(0);
  for (int64_t q = 0; q < kq; ++q) {
    int8x16_t wv[NV * 4];  // 4 columns x 4 k each
    UNROLL for (int j = 0; j < NV * 4; ++j) wv[j] = vld1q_s8(w + (j / 4) * tile_bytes + q * 64 + (j % 4) * 16);
    UNROLL for (int r = 0; r < MR; ++r) {
      int32_t a4;
      std::memcpy(&a4, a + r * lda + 4 * q, 4);
      const int8x16_t av = vreinterpretq_s8_s32(vdupq_n_s32(a4));
      UNROLL for (int j = 0; j < NV * 4; ++j) acc[r][j] = vdotq_s32(acc[r][j], wv[j], av);
    }
  }
  UNROLL for (int r = 0; r < MR; ++r)
    UNROLL for (int j = 0; j < NV * 4; ++j) vst1q_s32(c + r * NV * kTile + j * 4, acc[r][j]);
}

#elif TCC_INT8_NEON
using Code = int8_t;
int32_t code_offset(bool asym, int32_t) { return asym ? 128 : 0; }
constexpr int kMR = 2, kNV = 1;  // 16 accumulators + 4 weight registers

template <int MR, int NV>
void int8_tile(const Code* a, int64_t lda, const int8_t* w, int64_t tile_bytes, int64_t kq, int32_t* c) {
  int32x4_t lo[MR][NV * 4], hi[MR][NV * 4];  // [c0 k01, c0 k23, c1 k01, c1 k23], the same for c2, c3
  UNROLL for (int r = 0; r < MR; ++r)
    UNROLL for (int j = 0; j < NV * 4; ++j) lo[r][j] = hi[r][j] = vdupq_n_s32(0);
  for (int64_t q = 0; q < kq; ++q) {
    int8x16_t wv[NV * 4];
    UNROLL for (int j = 0; j < NV * 4; ++j) wv[j] = vld1q_s8(w + (j / 4) * tile_bytes + q * 64 + (j % 4) * 16);
    UNROLL for (int r = 0; r < MR; ++r) {
      int32_t a4;
      std::memcpy(&a4, a + r * lda + 4 * q, 4);
      const int8x16_t av = vreinterpretq_s8_s32(vdupq_n_s32(a4));
      UNROLL for (int j = 0; j < NV * 4; ++j) {
        lo[r][j] = vpadalq_s16(lo[r][j], vmull_s8(vget_low_s8(wv[j]), vget_low_s8(av)));
        hi[r][j] = vpadalq_s16(hi[r][j], vmull_high_s8(wv[j], av));
      }
    }
  }
  UNROLL for (int r = 0; r < MR; ++r)
    UNROLL for (int j = 0; j < NV * 4; ++j) vst1q_s32(c + r * NV * kTile + j * 4, vpaddq_s32(lo[r][j], hi[r][j]));
}

#else
using Code = int16_t;
int32_t code_offset(bool, int32_t z) { return z; }
constexpr int kMR = 4, kNV = 1;

template <int MR, int NV>
void int8_tile(const Code* a, int64_t lda, const int8_t* w, int64_t tile_bytes, int64_t kq, int32_t* c) {
  int32_t acc[MR][NV * kTile] = {};
  for (int64_t q = 0; q < kq; ++q) {
    UNROLL for (int v = 0; v < NV; ++v) {
      const int8_t* wq = w + v * tile_bytes + q * 64;
      UNROLL for (int r = 0; r < MR; ++r) {
        const Code* aq = a + r * lda + 4 * q;
        for (int j = 0; j < kTile; ++j)
          acc[r][v * kTile + j] += aq[0] * wq[4 * j] + aq[1] * wq[4 * j + 1] + aq[2] * wq[4 * j + 2] +
                                   aq[3] * wq[4 * j + 3];
      }
    }
  }
  std::memcpy(c, acc, sizeof(acc));
}
#endif

using Int8Tile = void (*)(const Code*, int64_t, const int8_t*, int64_t, int64_t, int32_t*);

template <int MR, int... V>
constexpr std::array<Int8Tile, sizeof...(V)> tile_row(std::integer_sequence<int, V...>) {
  return {int8_tile<MR, V + 1>...};
}
template <int... R>
constexpr std::array<std::array<Int8Tile, kNV>, kMR> tile_table(std::integer_sequence<int, R...>) {
  return {tile_row<R + 1>(std::make_integer_sequence<int, kNV>{})...};
}
// kInt8Tiles[mr - 1][nv - 1] = int8_tile<mr, nv>
constexpr auto kInt8Tiles = tile_table(std::make_integer_sequence<int, kMR>{});

// ---------------------------------------------------------------------------------------------
// dense_a8w8
// ---------------------------------------------------------------------------------------------

struct A8W8 {
  int64_t m, n, k;
  int64_t kq;   // quads of k in the packed weights: ceil(K / 4)
  int64_t lda;  // codes per row in the activation buffer: K rounded up to 16, zero-padded
  const float* x;
  const int8_t* qw;
  const int32_t* wsum;
  const float* w_scale;
  const float* b;
  float* out;
  bool asym, dynamic;
  float x_scale, x_zero;  // static quantization only
};

struct RowScale {
  float s;       // the row's activation scale
  int32_t corr;  // o - z: acc + corr * wsum[n] = sum_k (q - z) qw[n, k]
};

// Round half to even for |v| < 2^22 (the default rounding mode), as torch.round; no -ffast-math.
inline float round_even(float v) { return (v + 12582912.0f) - 12582912.0f; }

// min and max of x[0:n] (+inf / -inf for n = 0). Exact in any order, so the loop may vectorize.
void row_range(const float* x, int64_t n, float* lo, float* hi) {
  float mn = std::numeric_limits<float>::infinity(), mx = -mn;
#pragma omp simd reduction(min : mn) reduction(max : mx)
  for (int64_t i = 0; i < n; ++i) {
    mn = x[i] < mn ? x[i] : mn;
    mx = x[i] > mx ? x[i] : mx;
  }
  *lo = mn, *hi = mx;
}

// Quantizes row x[0:k] as tcc/ops.py quantize_rows does and writes the codes q - o into out[0:lda]
// (zero past k). The clamp comes before the rounding: both bounds minus z are integers, so
// clamp(round(v) + z) = round(clamp(v, lo - z, hi - z)) + z, and the rounded value stays small.
RowScale quantize_row(const A8W8& p, const float* x, Code* out) {
  float s = p.x_scale, z = p.asym ? p.x_zero : 0.0f;
  if (p.dynamic) {
    float lo, hi;
    row_range(x, p.k, &lo, &hi);
    if (p.asym) {
      lo = std::min(lo, 0.0f), hi = std::max(hi, 0.0f);
      s = (hi - lo) / 255.0f;
    } else {
      s = std::max(hi, -lo) / 127.0f;
    }
    s = s > 0.0f ? s : 1.0f;
    z = p.asym ? round_even(-lo / s) : 0.0f;
  }
  const int32_t zi = static_cast<int32_t>(z), o = code_offset(p.asym, zi);
  const float vlo = (p.asym ? 0.0f : -127.0f) - z, vhi = (p.asym ? 255.0f : 127.0f) - z;
  const int64_t k = p.k;  // (a local: stores through Code* may alias p)
  for (int64_t i = 0; i < k; ++i) {
    float v = x[i] / s;
    v = v < vlo ? vlo : v;
    v = v > vhi ? vhi : v;
    out[i] = static_cast<Code>(static_cast<int32_t>(round_even(v)) + zi - o);
  }
  std::fill(out + k, out + p.lda, Code(0));
  return {s, o - zi};
}

// out[row0 + r, n0:n1] = float64(acc + corr * wsum) * s * w_scale, to float32, + b  (r < mr)
void a8w8_epilogue(const A8W8& p, const RowScale* rows, int64_t row0, int mr, int64_t n0, int64_t n1,
                   const int32_t* acc, int64_t ldc) {
  for (int r = 0; r < mr; ++r) {
    const double s = rows[r].s;
    const uint32_t corr = static_cast<uint32_t>(rows[r].corr);
    const int32_t* a = acc + r * ldc - n0;
    float* y = p.out + (row0 + r) * p.n;
    // (the true sum fits int32; unsigned arithmetic wraps where an intermediate would not)
    if (p.b) {
      for (int64_t j = n0; j < n1; ++j) {
        const int32_t v = static_cast<int32_t>(static_cast<uint32_t>(a[j]) + corr * static_cast<uint32_t>(p.wsum[j]));
        y[j] = static_cast<float>(static_cast<double>(v) * s * static_cast<double>(p.w_scale[j])) + p.b[j];
      }
    } else {
      for (int64_t j = n0; j < n1; ++j) {
        const int32_t v = static_cast<int32_t>(static_cast<uint32_t>(a[j]) + corr * static_cast<uint32_t>(p.wsum[j]));
        y[j] = static_cast<float>(static_cast<double>(v) * s * static_cast<double>(p.w_scale[j]));
      }
    }
  }
}

void a8w8_run(const A8W8& p) {
  if (p.m == 0 || p.n == 0) return;
  Code* codes = scratch<Code, 2>(p.m * p.lda);
  RowScale* rows = scratch<RowScale>(p.m);
  parallel([&](int task, int num_tasks) {
    int64_t r0, r1;
    split(p.m, 1, task, num_tasks, &r0, &r1);
    for (int64_t r = r0; r < r1; ++r) rows[r] = quantize_row(p, p.x + r * p.k, codes + r * p.lda);
  });
  const int64_t tiles = ceil_div(p.n, kTile), tile_bytes = p.kq * 4 * kTile;
  parallel([&](int task, int num_tasks) {
    int64_t m0 = 0, m1 = p.m, t0 = 0, t1 = tiles;
    if (p.n >= p.m) split(tiles, 1, task, num_tasks, &t0, &t1);
    else split(p.m, kMR, task, num_tasks, &m0, &m1);
    int32_t acc[kMR * kNV * kTile];
    for (int64_t t = t0; t < t1; t += kNV) {
      const int nv = static_cast<int>(std::min<int64_t>(kNV, t1 - t));
      const int64_t n0 = t * kTile, n1 = std::min(p.n, (t + nv) * kTile);
      for (int64_t r = m0; r < m1; r += kMR) {
        const int mr = static_cast<int>(std::min<int64_t>(kMR, m1 - r));
        kInt8Tiles[mr - 1][nv - 1](codes + r * p.lda, p.lda, p.qw + t * tile_bytes, tile_bytes, p.kq, acc);
        a8w8_epilogue(p, rows + r, r, mr, n0, n1, acc, nv * kTile);
      }
    }
  });
}

// Checks the arguments (see the top of the file) and runs the kernel.
void dense_a8w8(const TensorView& x, const TensorView& qw, const TensorView& wsum, const TensorView& w_scale,
                const TensorView* b, const TensorView* x_scale, const TensorView* x_zero, bool asym,
                const TensorView& out, const char* kernel) {
  A8W8 p{};
  p.x = f32_in(x, kernel, "x", 1, 64);
  p.qw = data_of<const int8_t>(qw, kernel, "qw", kDLInt, 8, 4, 4);
  p.wsum = data_of<const int32_t>(wsum, kernel, "wsum", kDLInt, 32, 1, 1);
  p.w_scale = f32_in(w_scale, kernel, "w_scale", 1, 1);
  p.out = f32_out(out, kernel, x.ndim(), x.ndim());
  p.k = x.size(-1), p.n = w_scale.size(0), p.kq = ceil_div(p.k, 4), p.lda = ceil_div(p.k, 16) * 16;
  p.m = p.k ? x.numel() / p.k : out.numel() / std::max<int64_t>(p.n, 1);
  if (p.k > kMaxK) {
    TVM_FFI_THROW(ValueError) << kernel << ": K = " << p.k << " is larger than " << kMaxK
                              << ", where int32 accumulation could overflow";
  }
  const std::string packed = " (pack the weights with backends/kernels/quant_layout.py pack_a8w8)";
  check_dim(qw, kernel, "qw", 0, ceil_div(p.n, kTile), ("ceil(N / 16), N = " + std::to_string(p.n) + packed).c_str());
  check_dim(qw, kernel, "qw", 1, p.kq, ("ceil(K / 4), K = " + std::to_string(p.k) + packed).c_str());
  check_dim(qw, kernel, "qw", 2, kTile, ("16 columns per tile" + packed).c_str());
  check_dim(qw, kernel, "qw", 3, 4, ("4 k per quad" + packed).c_str());
  check_dim(wsum, kernel, "wsum", 0, p.n, "N, the size of w_scale");
  if (b) {
    p.b = f32_in(*b, kernel, "b", 1, 1);
    check_dim(*b, kernel, "b", 0, p.n, "N, the size of w_scale");
  }
  for (int d = 0; d + 1 < x.ndim(); ++d) check_dim(out, kernel, "out", d, x.size(d), "the leading dims of x");
  check_dim(out, kernel, "out", x.ndim() - 1, p.n, "N, the size of w_scale");
  p.asym = asym, p.dynamic = x_scale == nullptr;
  if (!p.dynamic) {
    const float* xs = f32_in(*x_scale, kernel, "x_scale", 1, 1);
    const float* xz = f32_in(*x_zero, kernel, "x_zero", 1, 1);
    check_dim(*x_scale, kernel, "x_scale", 0, 1, "one per-tensor scale");
    check_dim(*x_zero, kernel, "x_zero", 0, 1, "one per-tensor zero point");
    p.x_scale = *xs, p.x_zero = *xz;
    if (!(p.x_scale > 0.0f) || !std::isfinite(p.x_scale)) {
      TVM_FFI_THROW(ValueError) << kernel << ": x_scale must be a positive finite number, got " << p.x_scale;
    }
    if (asym && !(p.x_zero >= 0.0f && p.x_zero <= 255.0f && p.x_zero == std::floor(p.x_zero))) {
      TVM_FFI_THROW(ValueError) << kernel << ": x_zero must be an integer in [0, 255] for asymmetric "
                                << "activations, got " << p.x_zero;
    }
  }
  a8w8_run(p);
}

// ---------------------------------------------------------------------------------------------
// dense_w4
// ---------------------------------------------------------------------------------------------

// 16 columns of float32 as native vectors (GCC vector extensions at the register width, so the
// arithmetic compiles to plain SIMD): 1 zmm, 2 ymm, or 4 xmm / NEON q registers.
constexpr int kLanes = kVecLanes;  // common.h
constexpr int kVecs = kTile / kLanes;
typedef float vf __attribute__((vector_size(kLanes * 4)));
typedef float vf_u __attribute__((vector_size(kLanes * 4), aligned(1), may_alias));
typedef uint8_t u8x16 __attribute__((vector_size(16)));
typedef uint8_t u8x16_u __attribute__((vector_size(16), aligned(1), may_alias));

struct F16 {
  vf v[kVecs];
};

inline F16 load_f16(const float* p) {
  F16 r;
  UNROLL for (int i = 0; i < kVecs; ++i) r.v[i] = *reinterpret_cast<const vf_u*>(p + i * kLanes);
  return r;
}

inline u8x16 load_u8x16(const uint8_t* p) { return *reinterpret_cast<const u8x16_u*>(p); }

// 16 bytes -> 16 floats (GCC 12 scalarizes __builtin_convertvector here, so intrinsics per ISA).
inline F16 to_float(u8x16 c) {
  F16 r;
#if defined(__AVX512F__)
  r.v[0] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32((__m128i)c));
#elif defined(__AVX2__)
  r.v[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32((__m128i)c));
  r.v[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64((__m128i)c, (__m128i)c)));
#elif defined(__aarch64__)
  const uint16x8_t lo = vmovl_u8(vget_low_u8((uint8x16_t)c)), hi = vmovl_high_u8((uint8x16_t)c);
  r.v[0] = vcvtq_f32_u32(vmovl_u16(vget_low_u16(lo)));
  r.v[1] = vcvtq_f32_u32(vmovl_high_u16(lo));
  r.v[2] = vcvtq_f32_u32(vmovl_u16(vget_low_u16(hi)));
  r.v[3] = vcvtq_f32_u32(vmovl_high_u16(hi));
#elif defined(__SSE2__)
  const __m128i zero = _mm_setzero_si128();
  const __m128i lo = _mm_unpacklo_epi8((__m128i)c, zero), hi = _mm_unpackhi_epi8((__m128i)c, zero);
  r.v[0] = _mm_cvtepi32_ps(_mm_unpacklo_epi16(lo, zero));
  r.v[1] = _mm_cvtepi32_ps(_mm_unpackhi_epi16(lo, zero));
  r.v[2] = _mm_cvtepi32_ps(_mm_unpacklo_epi16(hi, zero));
  r.v[3] = _mm_cvtepi32_ps(_mm_unpackhi_epi16(hi, zero));
#else
  for (int i = 0; i < kTile; ++i) r.v[i / kLanes][i % kLanes] = c[i];
#endif
  return r;
}

struct W4 {
  int64_t m, n, k;
  int64_t np;     // columns of scale and zero: N rounded up to 16
  int64_t group;  // k per scale
  const float* x;
  const uint8_t* qw;
  const float* scale;
  const uint8_t* zero;       // integer zero points (codes), or
  const float* zero_f32;     // fractional ones (quantize zero=float); one of the two is set
  const float* b;
  float* out;
};

// 16 columns' zero points at offset `at` of zero_t, as float32.
inline F16 w4_zero(const W4& p, int64_t at) {
  return p.zero_f32 ? load_f16(p.zero_f32 + at) : to_float(load_u8x16(p.zero + at));
}

// The weights of tile t for k = 2j (lo) and 2j + 1 (hi), dequantized as the reference does:
// (code - zero) * scale in float32.
struct W4Tile {
  const uint8_t* codes;  // [K/2][16]
  F16 s, z;              // the current group's scale and zero point, 16 columns

  W4Tile(const W4& p, int64_t t) : codes(p.qw + t * (p.k / 2) * kTile) {}
  void set_group(const W4& p, int64_t t, int64_t g) {
    s = load_f16(p.scale + g * p.np + t * kTile);
    z = w4_zero(p, g * p.np + t * kTile);
  }
  void pair(int64_t j, F16* lo, F16* hi) const {
    const u8x16 c = load_u8x16(codes + j * kTile);
    const F16 l = to_float(c & 15), h = to_float(c >> 4);
    UNROLL for (int i = 0; i < kVecs; ++i) {
      lo->v[i] = (l.v[i] - z.v[i]) * s.v[i];
      hi->v[i] = (h.v[i] - z.v[i]) * s.v[i];
    }
  }
};

// Writes the accumulators of MR rows x one tile of 16 output columns (+ bias), the tile cut at n.
template <int MR>
void store_tile(const F16* acc, float* out, const float* b, int64_t n, int64_t t, int64_t row0) {
  const int64_t n0 = t * kTile, cols = std::min(kTile, n - n0);
  float y[kTile];
  for (int r = 0; r < MR; ++r) {
    UNROLL for (int i = 0; i < kVecs; ++i) *reinterpret_cast<vf_u*>(y + i * kLanes) = acc[r].v[i];
    float* o = out + (row0 + r) * n + n0;
    if (b) {
      for (int64_t c = 0; c < cols; ++c) o[c] = y[c] + b[n0 + c];
    } else {
      std::memcpy(o, y, cols * sizeof(float));
    }
  }
}

// out[row0 : row0 + MR, 16 t : 16 t + 16] (clipped to N) = x W^T + b, the fused loop. The scale
// and zero point come out of each group: sum_k x_k (c_k - z) s = s (sum_k x_k c_k - z xsum), where
// xsum[r][g] is the sum of row r's x over group g; per k only the codes convert and multiply.
template <int MR>
void w4_direct(const W4& p, const float* xsum, int64_t t, int64_t row0) {
  const uint8_t* codes = p.qw + t * (p.k / 2) * kTile;
  const int64_t groups = p.k / p.group;
  const float* x = p.x + row0 * p.k;
  F16 acc[MR];
  UNROLL for (int r = 0; r < MR; ++r)
    UNROLL for (int i = 0; i < kVecs; ++i) acc[r].v[i] = vf{};
  for (int64_t g = 0, j = 0; g < groups; ++g) {
    F16 even[MR], odd[MR];  // sum_k x_k c_k over the group, for even and odd k (two chains)
    UNROLL for (int r = 0; r < MR; ++r)
      UNROLL for (int i = 0; i < kVecs; ++i) even[r].v[i] = odd[r].v[i] = vf{};
    for (const int64_t j1 = j + p.group / 2; j < j1; ++j) {
      const u8x16 c = load_u8x16(codes + j * kTile);
      const F16 lo = to_float(c & 15), hi = to_float(c >> 4);
      UNROLL for (int r = 0; r < MR; ++r) {
        const float x0 = x[r * p.k + 2 * j], x1 = x[r * p.k + 2 * j + 1];
        UNROLL for (int i = 0; i < kVecs; ++i) {
          even[r].v[i] += lo.v[i] * x0;
          odd[r].v[i] += hi.v[i] * x1;
        }
      }
    }
    const F16 s = load_f16(p.scale + g * p.np + t * kTile);
    const F16 z = w4_zero(p, g * p.np + t * kTile);
    UNROLL for (int r = 0; r < MR; ++r) {
      const float xs = xsum[(row0 + r) * groups + g];
      UNROLL for (int i = 0; i < kVecs; ++i) acc[r].v[i] += s.v[i] * (even[r].v[i] + odd[r].v[i] - z.v[i] * xs);
    }
  }
  store_tile<MR>(acc, p.out, p.b, p.n, t, row0);
}

void w4_direct_rows(const W4& p, const float* xsum, int64_t t, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; r += 4) {
    switch (std::min<int64_t>(4, r1 - r)) {
      case 1: w4_direct<1>(p, xsum, t, r); break;
      case 2: w4_direct<2>(p, xsum, t, r); break;
      case 3: w4_direct<3>(p, xsum, t, r); break;
      default: w4_direct<4>(p, xsum, t, r); break;
    }
  }
}

// out[m0:m1, c0:c1] += x W[c0:c1]^T: dequantizes the block (c0 a multiple of 16) into buf [K][bc]
// and calls sgemm.
void w4_sgemm_block(const W4& p, int64_t m0, int64_t m1, int64_t c0, int64_t c1, float* buf) {
  const int64_t bc = ceil_div(c1 - c0, kTile) * kTile;
  for (int64_t t = c0 / kTile; t * kTile < c1; ++t) {
    W4Tile tile(p, t);
    float* dst = buf + (t * kTile - c0);
    for (int64_t g = 0, j = 0; g < p.k / p.group; ++g) {
      tile.set_group(p, t, g);
      for (const int64_t j1 = j + p.group / 2; j < j1; ++j) {
        F16 lo, hi;
        tile.pair(j, &lo, &hi);
        UNROLL for (int i = 0; i < kVecs; ++i) {
          *reinterpret_cast<vf_u*>(dst + 2 * j * bc + i * kLanes) = lo.v[i];
          *reinterpret_cast<vf_u*>(dst + (2 * j + 1) * bc + i * kLanes) = hi.v[i];
        }
      }
    }
  }
  sgemm_nn(m1 - m0, c1 - c0, p.k, p.x + m0 * p.k, p.k, buf, bc, 1.0f, p.out + m0 * p.n + c0, p.n);
}

// Columns per dequantized block: ~512 KiB of fp32 (as dense_w8 in cpu_kernels.cc), a multiple of 16.
int64_t w4_block(int64_t k) { return std::max<int64_t>(kTile, 512 * 1024 / 4 / std::max<int64_t>(k, 1) / kTile * kTile); }

void w4_run(const W4& p) {
  if (p.m == 0 || p.n == 0) return;
  const bool direct = p.m <= kW4DirectRows && p.k > 0;
  float* xsum = nullptr;  // direct: the sum of each row's x over each group, [M][G]
  if (direct) {
    const int64_t groups = p.k / p.group;
    xsum = scratch<float, 3>(p.m * groups);
    for (int64_t r = 0; r < p.m; ++r)
      for (int64_t g = 0; g < groups; ++g) {
        float sum = 0.0f;
        for (int64_t i = 0; i < p.group; ++i) sum += p.x[r * p.k + g * p.group + i];
        xsum[r * groups + g] = sum;
      }
  }
  parallel([&](int task, int num_tasks) {
    int64_t m0 = 0, m1 = p.m, n0 = 0, n1 = p.n;
    if (p.n >= p.m) split(p.n, kTile, task, num_tasks, &n0, &n1);
    else split(p.m, kTile, task, num_tasks, &m0, &m1);
    if (m0 >= m1 || n0 >= n1) return;
    if (p.k == 0) return fill_bias(p.out, p.b, p.n, m0, m1, n0, n1);
    if (direct) {
      for (int64_t t = n0 / kTile; t * kTile < n1; ++t) w4_direct_rows(p, xsum, t, m0, m1);
      return;
    }
    fill_bias(p.out, p.b, p.n, m0, m1, n0, n1);
    const int64_t block = w4_block(p.k);
    float* buf = scratch<float, 1>(p.k * block);
    for (int64_t c0 = n0; c0 < n1; c0 += block) w4_sgemm_block(p, m0, m1, c0, std::min(n1, c0 + block), buf);
  });
}

void dense_w4(const TensorView& x, const TensorView& qw, const TensorView& scale, const TensorView& zero,
              const TensorView* b, const TensorView& out, const char* kernel) {
  W4 p{};
  p.x = f32_in(x, kernel, "x", 1, 64);
  p.qw = data_of<const uint8_t>(qw, kernel, "qw", kDLUInt, 8, 3, 3);
  p.scale = f32_in(scale, kernel, "scale", 2, 2);
  if (zero.dtype().code == kDLFloat) {
    p.zero_f32 = f32_in(zero, kernel, "zero", 2, 2);
  } else {
    p.zero = data_of<const uint8_t>(zero, kernel, "zero", kDLUInt, 8, 2, 2);
  }
  p.out = f32_out(out, kernel, x.ndim(), x.ndim());
  p.k = x.size(-1), p.n = out.size(-1), p.np = ceil_div(p.n, kTile) * kTile;
  p.m = p.k ? x.numel() / p.k : out.numel() / std::max<int64_t>(p.n, 1);
  for (int d = 0; d + 1 < x.ndim(); ++d) check_dim(out, kernel, "out", d, x.size(d), "the leading dims of x");
  if (p.k % 2) {
    TVM_FFI_THROW(ValueError) << kernel << ": K = " << p.k << " (the last dim of x) must be even for int4 weights";
  }
  const std::string packed = " (pack the weights with backends/kernels/quant_layout.py pack_w4)";
  const std::string n = "N = " + std::to_string(p.n) + ", the last dim of out";
  check_dim(qw, kernel, "qw", 0, p.np / kTile, ("ceil(N / 16), " + n + packed).c_str());
  check_dim(qw, kernel, "qw", 1, p.k / 2, ("K / 2, K = " + std::to_string(p.k) + packed).c_str());
  check_dim(qw, kernel, "qw", 2, kTile, ("16 columns per tile" + packed).c_str());
  check_dim(scale, kernel, "scale", 1, p.np, ("16 ceil(N / 16), " + n + packed).c_str());
  const int64_t groups = scale.size(0);
  if (p.k > 0 && (groups == 0 || p.k % groups != 0 || (p.k / groups) % 2 != 0)) {
    TVM_FFI_THROW(ValueError) << kernel << ": argument 'scale' has shape " << shape_str(scale) << ": its "
                              << groups << " groups must divide K = " << p.k << " into groups of even size";
  }
  p.group = groups ? p.k / groups : 0;
  check_dim(zero, kernel, "zero", 0, groups, "G, the groups of scale");
  check_dim(zero, kernel, "zero", 1, p.np, ("16 ceil(N / 16), " + n + packed).c_str());
  if (b) {
    p.b = f32_in(*b, kernel, "b", 1, 1);
    check_dim(*b, kernel, "b", 0, p.n, n.c_str());
  }
  check_blas_int(p.m, kernel, "M");
  check_blas_int(p.k, kernel, "K");
  w4_run(p);
}

// ---------------------------------------------------------------------------------------------
// dense_w4a8: tcc::dense_w4 with acts="int8" (quant_layout.pack_w4a8's layout)
// ---------------------------------------------------------------------------------------------

typedef int32_t vi __attribute__((vector_size(kLanes * 4)));
typedef int32_t vi_u __attribute__((vector_size(kLanes * 4), aligned(1), may_alias));
typedef uint32_t vu __attribute__((vector_size(kLanes * 4)));
typedef uint32_t vu_u __attribute__((vector_size(kLanes * 4), aligned(1), may_alias));

struct W4A8 {
  int64_t m, n, k;
  int64_t groups, group, octets;  // octets: ceil(group / 8), the packed k per group in units of 8
  int64_t lda;                    // activation codes per row: groups * octets * 8
  const float* x;
  const uint8_t* qw;         // [T][G][O][16][4]
  const float* scale;        // [T][G][16] float32, or
  const uint16_t* scale_h;   // float16 bits; one of the two is set
  const uint8_t* zero;       // [T][G][16] integer zero points, or
  const float* zero_f32;     // fractional ones
  const float* b;
  float* out;
};

// Half-precision bits -> float (the portable path; the SIMD paths convert 16 at a time).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16, e = (h >> 10) & 0x1f, man = h & 0x3ff;
  if (e == 0) {
    const float v = std::ldexp(static_cast<float>(man), -24);  // zero or subnormal
    return sign ? -v : v;
  }
  const uint32_t f = sign | (e == 31 ? 0x7f800000u | (man << 13) : ((e + 112) << 23) | (man << 13));
  float r;
  std::memcpy(&r, &f, 4);
  return r;
}

inline F16 load_half16(const uint16_t* p) {
  F16 r;
#if defined(__AVX512F__)
  r.v[0] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(__AVX2__) && defined(__F16C__)
  r.v[0] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  r.v[1] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
#elif defined(__aarch64__)
  UNROLL for (int i = 0; i < 4; ++i) r.v[i] = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p + 4 * i)));
#else
  for (int i = 0; i < kTile; ++i) r.v[i / kLanes][i % kLanes] = half_to_float(p[i]);
#endif
  return r;
}

// Sums of one group of one tile: c[r][j] = sum over the group's octets o and i < 8 of
// a[r * lda + 8 o + i] * code(column j, k = 8 o + i), exact in int32 (|c| <= 15 * 127 * group).
// w: the group's packed octets (64 bytes each), a: the group's activation codes of row 0.
#if TCC_INT8_VNNI
// Four accumulator chains per row (low and high nibbles of even and odd octets): vpdpbusd's latency
// would otherwise bound a GEMV row (measured: 1.6x faster in cache at M = 1 than two chains).
template <int MR>
inline void w4a8_dot(const uint8_t* w, int64_t octets, const int8_t* a, int64_t lda, int32_t (*c)[kTile]) {
  const __m512i mask = _mm512_set1_epi8(0x0F);
  __m512i acc[MR][4];
  UNROLL for (int r = 0; r < MR; ++r) UNROLL for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_si512();
  auto octet = [&](int64_t o, int j) {
    const __m512i v = _mm512_loadu_si512(w + o * 64);
    const __m512i wl = _mm512_and_si512(v, mask), wh = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
    UNROLL for (int r = 0; r < MR; ++r) {
      int32_t a0, a1;
      std::memcpy(&a0, a + r * lda + 8 * o, 4);
      std::memcpy(&a1, a + r * lda + 8 * o + 4, 4);
      acc[r][j] = _mm512_dpbusd_epi32(acc[r][j], wl, _mm512_set1_epi32(a0));
      acc[r][j + 1] = _mm512_dpbusd_epi32(acc[r][j + 1], wh, _mm512_set1_epi32(a1));
    }
  };
  int64_t o = 0;
  for (; o + 2 <= octets; o += 2) {
    octet(o, 0);
    octet(o + 1, 2);
  }
  if (o < octets) octet(o, 0);
  UNROLL for (int r = 0; r < MR; ++r)
    _mm512_storeu_si512(c[r], _mm512_add_epi32(_mm512_add_epi32(acc[r][0], acc[r][1]), _mm512_add_epi32(acc[r][2], acc[r][3])));
}
#elif TCC_INT8_AVX2
// vpmaddubsw (u8 codes x s8 activations, pairs summed in int16: |sum| <= 2 * 15 * 127; the low and
// high nibbles' sums add, <= 7620, still int16), then vpmaddwd with ones into int32.
template <int MR>
inline void w4a8_dot(const uint8_t* w, int64_t octets, const int8_t* a, int64_t lda, int32_t (*c)[kTile]) {
  const __m256i mask = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256i acc[MR][2];
  UNROLL for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  for (int64_t o = 0; o < octets; ++o) {
    UNROLL for (int h = 0; h < 2; ++h) {  // columns 0..7, 8..15
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + o * 64 + h * 32));
      const __m256i wl = _mm256_and_si256(v, mask), wh = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
      UNROLL for (int r = 0; r < MR; ++r) {
        int32_t a0, a1;
        std::memcpy(&a0, a + r * lda + 8 * o, 4);
        std::memcpy(&a1, a + r * lda + 8 * o + 4, 4);
        const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(wl, _mm256_set1_epi32(a0)),
                                           _mm256_maddubs_epi16(wh, _mm256_set1_epi32(a1)));
        acc[r][h] = _mm256_add_epi32(acc[r][h], _mm256_madd_epi16(p, ones));
      }
    }
  }
  UNROLL for (int r = 0; r < MR; ++r) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(c[r]), acc[r][0]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(c[r] + 8), acc[r][1]);
  }
}
#elif TCC_INT8_SDOT || TCC_INT8_NEON
template <int MR>
inline void w4a8_dot(const uint8_t* w, int64_t octets, const int8_t* a, int64_t lda, int32_t (*c)[kTile]) {
  const uint8x16_t mask = vdupq_n_u8(0x0F);
#if TCC_INT8_SDOT
  int32x4_t acc[MR][4];  // 4 columns each
  UNROLL for (int r = 0; r < MR; ++r) UNROLL for (int j = 0; j < 4; ++j) acc[r][j] = vdupq_n_s32(0);
#else
  int32x4_t lo[MR][4], hi[MR][4];  // [c0 k01, c0 k23, c1 k01, c1 k23] and the same for c2, c3
  UNROLL for (int r = 0; r < MR; ++r) UNROLL for (int j = 0; j < 4; ++j) lo[r][j] = hi[r][j] = vdupq_n_s32(0);
#endif
  for (int64_t o = 0; o < octets; ++o) {
    int8x16_t wl[4], wh[4];  // 4 columns x 4 k each
    UNROLL for (int j = 0; j < 4; ++j) {
      const uint8x16_t v = vld1q_u8(w + o * 64 + 16 * j);
      wl[j] = vreinterpretq_s8_u8(vandq_u8(v, mask));
      wh[j] = vreinterpretq_s8_u8(vshrq_n_u8(v, 4));
    }
    UNROLL for (int r = 0; r < MR; ++r) {
      int32_t a0, a1;
      std::memcpy(&a0, a + r * lda + 8 * o, 4);
      std::memcpy(&a1, a + r * lda + 8 * o + 4, 4);
      const int8x16_t al = vreinterpretq_s8_s32(vdupq_n_s32(a0)), ah = vreinterpretq_s8_s32(vdupq_n_s32(a1));
      UNROLL for (int j = 0; j < 4; ++j) {
#if TCC_INT8_SDOT
        acc[r][j] = vdotq_s32(vdotq_s32(acc[r][j], wl[j], al), wh[j], ah);
#else
        // |code * a| <= 15 * 127: a pair of products sums in int16 without overflow
        lo[r][j] = vpadalq_s16(lo[r][j], vmlal_s8(vmull_s8(vget_low_s8(wl[j]), vget_low_s8(al)),
                                                  vget_low_s8(wh[j]), vget_low_s8(ah)));
        hi[r][j] = vpadalq_s16(hi[r][j], vmlal_high_s8(vmull_high_s8(wl[j], al), wh[j], ah));
#endif
      }
    }
  }
  UNROLL for (int r = 0; r < MR; ++r)
    UNROLL for (int j = 0; j < 4; ++j) {
#if TCC_INT8_SDOT
      vst1q_s32(c[r] + 4 * j, acc[r][j]);
#else
      vst1q_s32(c[r] + 4 * j, vpaddq_s32(lo[r][j], hi[r][j]));
#endif
    }
}
#else
template <int MR>
inline void w4a8_dot(const uint8_t* w, int64_t octets, const int8_t* a, int64_t lda, int32_t (*c)[kTile]) {
  int32_t acc[MR][kTile] = {};
  for (int64_t o = 0; o < octets; ++o) {
    const uint8_t* wo = w + o * 64;
    for (int r = 0; r < MR; ++r) {
      const int8_t* ao = a + r * lda + 8 * o;
      for (int j = 0; j < kTile; ++j)
        for (int i = 0; i < 4; ++i) acc[r][j] += (wo[4 * j + i] & 15) * ao[i] + (wo[4 * j + i] >> 4) * ao[4 + i];
    }
  }
  std::memcpy(c, acc, sizeof(acc));
}
#endif

// Activations of rows [r0, r1): every block (group) of k quantized symmetrically as
// tcc/ops.py quantize_blocks does (quantize_rows' dynamic symmetric rows: float32 division,
// round half to even), the codes q + off into a[r][lda] as T (off, meaning 0, past each group's
// end), the scale into xs[r][G] and the sum of the block's codes q into qsum[r][G].
template <typename T>
void w4a8_quantize(const W4A8& p, int64_t r0, int64_t r1, T* a, int32_t off, float* xs, int32_t* qsum) {
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t g = 0; g < p.groups; ++g) {
      const float* x = p.x + r * p.k + g * p.group;
      T* q = a + r * p.lda + g * p.octets * 8;
      float lo, hi;
      row_range(x, p.group, &lo, &hi);
      float s = std::max(hi, -lo) / 127.0f;
      s = s > 0.0f ? s : 1.0f;
      int32_t sum = 0;
      const int64_t group = p.group;  // (a local: stores through T* may alias p)
      int64_t i = 0;
      if (group % kLanes == 0) {
        // Whole vectors, the same operations lane by lane (so the same codes): GCC's own vectorized loop
        // (below) runs 4 vectors a step and sent a group of 32 through its scalar tail, which made this
        // function 22 % of the W4A8 GEMM's time in a 0.5B prefill (perf, Zen 5).
        typedef T vt __attribute__((vector_size(kLanes * sizeof(T))));
        const vf sv = vf{} + s, lo127 = vf{} - 127.0f, hi127 = vf{} + 127.0f, magic = vf{} + 12582912.0f;
        vi acc{};
        for (; i < group; i += kLanes) {
          vf v;
          std::memcpy(&v, x + i, sizeof v);
          v = v / sv;
          v = v < lo127 ? lo127 : v;
          v = v > hi127 ? hi127 : v;
          const vi c = __builtin_convertvector((v + magic) - magic, vi);
          acc += c;
          const vt out = __builtin_convertvector(c + off, vt);
          std::memcpy(q + i, &out, sizeof out);
        }
        for (int l = 0; l < kLanes; ++l) sum += acc[l];
      }
#pragma omp simd reduction(+ : sum)
      for (int64_t j = i; j < group; ++j) {
        float v = x[j] / s;
        v = v < -127.0f ? -127.0f : v;
        v = v > 127.0f ? 127.0f : v;
        const int32_t c = static_cast<int32_t>(round_even(v));
        q[j] = static_cast<T>(c + off);
        sum += c;
      }
      std::fill(q + p.group, q + p.octets * 8, static_cast<T>(off));
      xs[r * p.groups + g] = s;
      qsum[r * p.groups + g] = sum;
    }
}

// A tile's scales or zero points of group g, 16 columns as float32.
inline F16 w4a8_scale(const W4A8& p, int64_t at) { return p.scale_h ? load_half16(p.scale_h + at) : load_f16(p.scale + at); }
inline F16 w4a8_zero(const W4A8& p, int64_t at) {
  return p.zero_f32 ? load_f16(p.zero_f32 + at) : to_float(load_u8x16(p.zero + at));
}

// out[row0 : row0 + MR, 16 t : 16 t + 16] (clipped to N) = the integer path:
// sum_g xs[r][g] scale[n][g] (sum_k q[r][k] code[n][k] - zero[n][g] qsum[r][g]) + b.
template <int MR>
void w4a8_direct(const W4A8& p, const int8_t* a, const float* xs, const int32_t* qsum, int64_t t, int64_t row0) {
  F16 acc[MR];
  UNROLL for (int r = 0; r < MR; ++r)
    UNROLL for (int i = 0; i < kVecs; ++i) acc[r].v[i] = vf{};
  const uint8_t* w = p.qw + t * p.groups * p.octets * 64;
  alignas(64) int32_t c[MR][kTile];
  for (int64_t g = 0; g < p.groups; ++g) {
    // the tile's codes front to back (common.h kPrefetchAhead: +2-10 % with the weights in huge pages, +12-20 %
    // in 4 KiB pages; prefetching the scales too, and the same for the a8w8 tile, gained nothing)
    for (int64_t o = 0; o < p.octets; ++o) __builtin_prefetch(w + (g * p.octets + o) * 64 + kPrefetchAhead, 0, 3);
    w4a8_dot<MR>(w + g * p.octets * 64, p.octets, a + row0 * p.lda + g * p.octets * 8, p.lda, c);
    const int64_t at = (t * p.groups + g) * kTile;
    const F16 s = w4a8_scale(p, at), z = w4a8_zero(p, at);
    UNROLL for (int r = 0; r < MR; ++r) {
      const float sx = xs[(row0 + r) * p.groups + g], qs = static_cast<float>(qsum[(row0 + r) * p.groups + g]);
      UNROLL for (int i = 0; i < kVecs; ++i) {
        const vf ci = __builtin_convertvector(*reinterpret_cast<const vi_u*>(c[r] + i * kLanes), vf);
        acc[r].v[i] += (s.v[i] * sx) * (ci - z.v[i] * qs);
      }
    }
  }
  store_tile<MR>(acc, p.out, p.b, p.n, t, row0);
}

// The GEMM (M > kW4DirectRows, prefill). Both forms compute, per group, the integer sums
// T = sum_k q (code - z), exact in int32, then acc += T (s sx) in float32 (fractional zero points:
// T = sum_k q code, and acc -= (s z) (qsum sx)), per block of rows and panel of output tiles; the
// activations quantize first (row by row, in parallel), then the threads split the panels (or the
// rows, when M > N).
#if TCC_INT8_VNNI
// AVX-512 VNNI reads the packed codes where they lie: per octet of k, one 64-byte load per tile gives
// the low nibbles (k 0..3) and, shifted, the high ones (k 4..7) as uint8, and vpdpbusd multiplies
// them by the int8 activation codes (4 bytes broadcast per row). Each group's int32 sums start at the
// zero points' share, -z qsum, so they end at T:
//   kZeroOne:   one integer zero point for the whole panel (symmetric int4: 8), a broadcast per row;
//   kZeroEach:  integer zero points per column and group, vpmulld per row and tile;
//   kZeroFloat: fractional zero points, subtracted in float32 (above).
// (Unpacking each panel to int8 code - z first, as the other ISAs do, cost 14 % of the time at
// M = 128, K = 896, and a pass over the output another 7 %: session 17, benchmarks/gemv_ab.py --m 128.)
// 3 rows x 4 tiles: 12 int32 and 12 float32 accumulators, 4 code vectors, 1 broadcast and the nibble
// mask in zmm. (8 x 3, the float32 accumulators in L1, as the unpacked panel had it: 12-17 % slower
// with one zero point, 2-5 % with zero points per column; 4 x 3 and 6 x 2 between; gemv_ab.py --m 128.)
enum ZeroPoints { kZeroFloat, kZeroOne, kZeroEach };
constexpr int kGemmMR = 3, kGemmNV = 4;

// acc += vpdpbusd(a uint8, b int8) with acc tied to its register (GCC 12 copies the intrinsic's
// accumulators into new registers around every call when float32 accumulators are live beside them).
inline __m512i dpbusd(__m512i acc, __m512i a, __m512i b) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
  return acc;
}

// out[row0 : row0 + MR, tiles t ... t + NV - 1] (+ b); zero: the panel's zero point (kZeroOne).
template <int MR, int NV, int ZP>
void w4a8_gemm_block(const W4A8& p, const int8_t* a, const float* xs, const int32_t* qsum, const float* qsx,
                     int64_t t, int64_t row0, int32_t zero) {
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  const int64_t tile_bytes = p.groups * p.octets * 64, tile_groups = p.groups * kTile;
  __m512 f[MR][NV];
  UNROLL for (int r = 0; r < MR; ++r) UNROLL for (int v = 0; v < NV; ++v) f[r][v] = _mm512_setzero_ps();
  for (int64_t g = 0; g < p.groups; ++g) {
    const int64_t at = (t * p.groups + g) * kTile;  // tile t + v's scales and zero points: at + v tile_groups
    __m512i acc[MR][NV], z[NV];
    if (ZP == kZeroEach)
      UNROLL for (int v = 0; v < NV; ++v)
        z[v] = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p.zero + at + v * tile_groups)));
    UNROLL for (int r = 0; r < MR; ++r) {
      const int32_t qs = qsum[(row0 + r) * p.groups + g];
      UNROLL for (int v = 0; v < NV; ++v) {
        if (ZP == kZeroFloat) acc[r][v] = _mm512_setzero_si512();
        else if (ZP == kZeroOne) acc[r][v] = _mm512_set1_epi32(-zero * qs);
        else acc[r][v] = _mm512_mullo_epi32(z[v], _mm512_set1_epi32(-qs));
      }
    }
    const uint8_t* wg = p.qw + t * tile_bytes + g * p.octets * 64;
    const int8_t* ag = a + row0 * p.lda + g * p.octets * 8;
    for (int64_t o = 0; o < p.octets; ++o) {
      UNROLL for (int h = 0; h < 2; ++h) {  // low nibbles: k 8 o + 0..3, high: 8 o + 4..7
        __m512i c[NV];
        UNROLL for (int v = 0; v < NV; ++v) {
          const __m512i raw = _mm512_loadu_si512(wg + v * tile_bytes + o * 64);
          c[v] = _mm512_and_si512(h ? _mm512_srli_epi16(raw, 4) : raw, m4);
        }
        UNROLL for (int r = 0; r < MR; ++r) {
          int32_t a4;
          std::memcpy(&a4, ag + r * p.lda + 8 * o + 4 * h, 4);
          const __m512i av = _mm512_set1_epi32(a4);
          UNROLL for (int v = 0; v < NV; ++v) acc[r][v] = dpbusd(acc[r][v], c[v], av);
        }
      }
    }
    UNROLL for (int v = 0; v < NV; ++v) {
      const __m512 s = w4a8_scale(p, at + v * tile_groups).v[0];
      const __m512 sz = ZP == kZeroFloat ? _mm512_mul_ps(s, _mm512_loadu_ps(p.zero_f32 + at + v * tile_groups)) : s;
      UNROLL for (int r = 0; r < MR; ++r) {
        const int64_t rg = (row0 + r) * p.groups + g;
        f[r][v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r][v]), _mm512_mul_ps(s, _mm512_set1_ps(xs[rg])), f[r][v]);
        if (ZP == kZeroFloat) f[r][v] = _mm512_fnmadd_ps(sz, _mm512_set1_ps(qsx[rg]), f[r][v]);
      }
    }
  }
  UNROLL for (int v = 0; v < NV; ++v) {
    const int64_t n0 = (t + v) * kTile;
    const __mmask16 cols = n0 + kTile <= p.n ? 0xFFFF : static_cast<__mmask16>((1u << (p.n - n0)) - 1);
    const __m512 bias = p.b ? _mm512_maskz_loadu_ps(cols, p.b + n0) : _mm512_setzero_ps();
    UNROLL for (int r = 0; r < MR; ++r) _mm512_mask_storeu_ps(p.out + (row0 + r) * p.n + n0, cols, _mm512_add_ps(f[r][v], bias));
  }
}

using GemmBlock = void (*)(const W4A8&, const int8_t*, const float*, const int32_t*, const float*, int64_t, int64_t,
                           int32_t);
template <int ZP, int MR, int... V>
constexpr std::array<GemmBlock, sizeof...(V)> gemm_row(std::integer_sequence<int, V...>) {
  return {w4a8_gemm_block<MR, V + 1, ZP>...};
}
template <int ZP, int... R>
constexpr std::array<std::array<GemmBlock, kGemmNV>, kGemmMR> gemm_table(std::integer_sequence<int, R...>) {
  return {gemm_row<ZP, R + 1>(std::make_integer_sequence<int, kGemmNV>{})...};
}
// kGemmBlocks[zp][mr - 1][nv - 1] = w4a8_gemm_block<mr, nv, zp>
constexpr std::array<std::array<std::array<GemmBlock, kGemmNV>, kGemmMR>, 3> kGemmBlocks = {
    gemm_table<kZeroFloat>(std::make_integer_sequence<int, kGemmMR>{}),
    gemm_table<kZeroOne>(std::make_integer_sequence<int, kGemmMR>{}),
    gemm_table<kZeroEach>(std::make_integer_sequence<int, kGemmMR>{})};

// The zero points of tiles [t, t + nv) (their columns < N): kZeroOne with *zero set where all are equal.
int panel_zero_points(const W4A8& p, int64_t t, int nv, int32_t* zero) {
  if (p.zero_f32) return kZeroFloat;
  const int64_t cols = std::min<int64_t>(nv * kTile, p.n - t * kTile);
  *zero = p.zero[t * p.groups * kTile];
  for (int64_t v = 0; v * kTile < cols; ++v)
    for (int64_t g = 0; g < p.groups; ++g) {
      const uint8_t* z = p.zero + ((t + v) * p.groups + g) * kTile;
      for (int64_t j = 0; j < std::min<int64_t>(kTile, cols - v * kTile); ++j)
        if (z[j] != *zero) return kZeroEach;
    }
  return kZeroOne;
}

using GemmCode = int8_t;

// out[m0:m1, tiles t0 .. t1 - 1] (+ b), panel by panel.
void w4a8_gemm_panels(const W4A8& p, const GemmCode* a, const float* xs, const int32_t* qsum, const float* qsx,
                      int64_t m0, int64_t m1, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; t += kGemmNV) {
    const int nv = static_cast<int>(std::min<int64_t>(kGemmNV, t1 - t));
    int32_t zero = 0;
    const auto& blocks = kGemmBlocks[panel_zero_points(p, t, nv, &zero)];
    for (int64_t r = m0; r < m1; r += kGemmMR) blocks[std::min<int64_t>(kGemmMR, m1 - r) - 1][nv - 1](p, a, xs, qsum, qsx, t, r, zero);
  }
}
#else
// The other ISAs unpack a panel of up to kGemmNV tiles (16 kGemmNV output columns) once into one
// signed weight code per byte, w = code - zero (integer zero points) or code (fractional ones),
// [G][kGemmNV][Q][16][4] (Q = 2 octets quads of k per group, the layout int8_tile reads), with the
// tiles' scales (and scale x zero point, fractional zero points only) as float32; then every block of
// rows runs on it (int8_tile per group into memory, then the group's sums fold into float32
// accumulators). The integer zero point thus costs nothing per row: it is in the codes.
constexpr int kGemmMR = kMR, kGemmNV = kNV;  // int8_tile's blocking

struct W4A8Panel {
  int64_t quads;  // Q, quads of k per group
  int8_t* w;      // [G][kGemmNV][Q][64]
  float* s;       // [G][kGemmNV][16]
  float* sz;      // [G][kGemmNV][16]: scale * zero point (fractional zero points only)
};

typedef uint8_t vb __attribute__((vector_size(kLanes * 4)));
typedef uint8_t vb_u __attribute__((vector_size(kLanes * 4), aligned(1), may_alias));

// Unpacks tiles [t0, t0 + nv) into the panel.
void w4a8_unpack(const W4A8& p, int64_t t0, int nv, const W4A8Panel& w) {
  const vu m4 = vu{} + 0x0F0F0F0Fu;
  for (int v = 0; v < nv; ++v)
    for (int64_t g = 0; g < p.groups; ++g) {
      const int64_t at = ((t0 + v) * p.groups + g) * kTile, slot = (g * kGemmNV + v) * kTile;
      const F16 s = w4a8_scale(p, at);
      vu zrep[kVecs];  // the integer zero point of each column, in each of its 4 bytes
      if (p.zero_f32) {
        const F16 z = load_f16(p.zero_f32 + at);
        UNROLL for (int i = 0; i < kVecs; ++i) {
          *reinterpret_cast<vf_u*>(w.sz + slot + i * kLanes) = s.v[i] * z.v[i];
          zrep[i] = vu{};
        }
      } else {
        UNROLL for (int i = 0; i < kVecs; ++i)
          UNROLL for (int j = 0; j < kLanes; ++j) zrep[i][j] = p.zero[at + i * kLanes + j] * 0x01010101u;
      }
      UNROLL for (int i = 0; i < kVecs; ++i) *reinterpret_cast<vf_u*>(w.s + slot + i * kLanes) = s.v[i];
      const uint8_t* src = p.qw + ((t0 + v) * p.groups + g) * p.octets * 64;
      int8_t* dst = w.w + (g * kGemmNV + v) * w.quads * 64;
      for (int64_t o = 0; o < p.octets; ++o)
        UNROLL for (int i = 0; i < kVecs; ++i) {
          const vu c = *reinterpret_cast<const vu_u*>(src + o * 64 + i * kLanes * 4);
          // bytewise code - zero (no borrow between the bytes of a lane)
          *reinterpret_cast<vb_u*>(dst + 2 * o * 64 + i * kLanes * 4) = (vb)(c & m4) - (vb)zrep[i];
          *reinterpret_cast<vb_u*>(dst + (2 * o + 1) * 64 + i * kLanes * 4) = (vb)((c >> 4) & m4) - (vb)zrep[i];
        }
    }
}

// acc[(r kGemmNV + v) 16 + j] = row row0 + r (r < MR), column j of the panel's tile v (v < NV), over
// all groups (acc: float32, which the function writes). FZ: fractional zero points.
template <int MR, int NV, bool FZ>
void w4a8_gemm_block(const W4A8& p, const Code* a, const float* xs, const float* qsx, const W4A8Panel& w,
                     int64_t row0, float* out) {
  alignas(64) int32_t c[MR * NV * kTile];
  F16 acc[MR][NV];
  UNROLL for (int r = 0; r < MR; ++r)
    UNROLL for (int v = 0; v < NV; ++v) UNROLL for (int i = 0; i < kVecs; ++i) acc[r][v].v[i] = vf{};
  for (int64_t g = 0; g < p.groups; ++g) {
    int8_tile<MR, NV>(a + row0 * p.lda + g * w.quads * 4, p.lda, w.w + g * kGemmNV * w.quads * 64, w.quads * 64,
                      w.quads, c);
    UNROLL for (int r = 0; r < MR; ++r) {
      const float sx = xs[(row0 + r) * p.groups + g], qs = qsx[(row0 + r) * p.groups + g];
      UNROLL for (int v = 0; v < NV; ++v) {
        const int64_t slot = (g * kGemmNV + v) * kTile;
        UNROLL for (int i = 0; i < kVecs; ++i) {
          const vf ci = __builtin_convertvector(*reinterpret_cast<const vi_u*>(c + (r * NV + v) * kTile + i * kLanes), vf);
          acc[r][v].v[i] += ci * (*reinterpret_cast<const vf_u*>(w.s + slot + i * kLanes) * sx);
          if (FZ) acc[r][v].v[i] -= *reinterpret_cast<const vf_u*>(w.sz + slot + i * kLanes) * qs;
        }
      }
    }
  }
  UNROLL for (int r = 0; r < MR; ++r)
    UNROLL for (int v = 0; v < NV; ++v)
      UNROLL for (int i = 0; i < kVecs; ++i) *reinterpret_cast<vf_u*>(out + (r * kGemmNV + v) * kTile + i * kLanes) = acc[r][v].v[i];
}

using GemmBlock = void (*)(const W4A8&, const Code*, const float*, const float*, const W4A8Panel&, int64_t, float*);
template <bool FZ, int MR, int... V>
constexpr std::array<GemmBlock, sizeof...(V)> gemm_row(std::integer_sequence<int, V...>) {
  return {w4a8_gemm_block<MR, V + 1, FZ>...};
}
template <bool FZ, int... R>
constexpr std::array<std::array<GemmBlock, kGemmNV>, kGemmMR> gemm_table(std::integer_sequence<int, R...>) {
  return {gemm_row<FZ, R + 1>(std::make_integer_sequence<int, kGemmNV>{})...};
}
// kGemmBlocks[fz][mr - 1][nv - 1] = w4a8_gemm_block<mr, nv, fz>
constexpr std::array<std::array<std::array<GemmBlock, kGemmNV>, kGemmMR>, 2> kGemmBlocks = {
    gemm_table<false>(std::make_integer_sequence<int, kGemmMR>{}),
    gemm_table<true>(std::make_integer_sequence<int, kGemmMR>{})};

// out[row0 : row0 + mr, the panel's nv tiles t0 ...] (+ b).
void w4a8_gemm_rows(const W4A8& p, const Code* a, const float* xs, const float* qsx, const W4A8Panel& w,
                    int64_t t0, int nv, int64_t row0, int mr) {
  alignas(64) float acc[kGemmMR * kGemmNV * kTile];
  kGemmBlocks[p.zero_f32 != nullptr][mr - 1][nv - 1](p, a, xs, qsx, w, row0, acc);
  for (int v = 0; v < nv; ++v) {
    const int64_t n0 = (t0 + v) * kTile, cols = std::min<int64_t>(kTile, p.n - n0);
    float bias[kTile] = {};
    if (p.b) std::memcpy(bias, p.b + n0, cols * sizeof(float));
    for (int r = 0; r < mr; ++r) {
      const float* y = acc + (r * kGemmNV + v) * kTile;
      float* o = p.out + (row0 + r) * p.n + n0;
      if (cols == kTile) {
        for (int j = 0; j < kTile; ++j) o[j] = y[j] + bias[j];
      } else {
        for (int64_t j = 0; j < cols; ++j) o[j] = y[j] + bias[j];
      }
    }
  }
}

using GemmCode = Code;

void w4a8_gemm_panels(const W4A8& p, const GemmCode* a, const float* xs, const int32_t*, const float* qsx,
                      int64_t m0, int64_t m1, int64_t t0, int64_t t1) {
  W4A8Panel w{2 * p.octets};
  w.w = scratch<int8_t, 9>(p.groups * kGemmNV * w.quads * 64);
  w.s = scratch<float, 11>(p.groups * kGemmNV * kTile);
  w.sz = scratch<float, 12>(p.groups * kGemmNV * kTile);
  for (int64_t t = t0; t < t1; t += kGemmNV) {
    const int nv = static_cast<int>(std::min<int64_t>(kGemmNV, t1 - t));
    w4a8_unpack(p, t, nv, w);
    for (int64_t r = m0; r < m1; r += kGemmMR)
      w4a8_gemm_rows(p, a, xs, qsx, w, t, nv, r, static_cast<int>(std::min<int64_t>(kGemmMR, m1 - r)));
  }
}
#endif

void w4a8_gemm(const W4A8& p, float* xs, int32_t* qsum) {
  GemmCode* a = scratch<GemmCode, 8>(p.m * p.lda);
  float* qsx = scratch<float, 10>(p.m * p.groups);  // qsum * xs
  parallel([&](int task, int num_tasks) {
    int64_t r0, r1;
    split(p.m, 1, task, num_tasks, &r0, &r1);
    w4a8_quantize(p, r0, r1, a, 0, xs, qsum);
    for (int64_t i = r0 * p.groups; i < r1 * p.groups; ++i) qsx[i] = static_cast<float>(qsum[i]) * xs[i];
  });
  parallel([&](int task, int num_tasks) {
    const int64_t tiles = ceil_div(p.n, kTile);
    int64_t m0 = 0, m1 = p.m, t0 = 0, t1 = tiles;
    if (p.n >= p.m) split(tiles, 1, task, num_tasks, &t0, &t1);
    else split(p.m, kGemmMR, task, num_tasks, &m0, &m1);
    if (m0 < m1 && t0 < t1) w4a8_gemm_panels(p, a, xs, qsum, qsx, m0, m1, t0, t1);
  });
}

void w4a8_run(const W4A8& p) {
  if (p.m == 0 || p.n == 0) return;
  if (p.k == 0) {
    return parallel([&](int task, int num_tasks) {
      int64_t n0, n1;
      split(p.n, kTile, task, num_tasks, &n0, &n1);
      if (n0 < n1) fill_bias(p.out, p.b, p.n, 0, p.m, n0, n1);
    });
  }
  float* xs = scratch<float, 5>(p.m * p.groups);
  int32_t* qsum = scratch<int32_t, 6>(p.m * p.groups);
  if (p.m > kW4DirectRows) return w4a8_gemm(p, xs, qsum);
  int8_t* a = scratch<int8_t, 4>(p.m * p.lda);
  w4a8_quantize(p, 0, p.m, a, 0, xs, qsum);
  parallel([&](int task, int num_tasks) {
    int64_t n0, n1;
    split(p.n, kTile, task, num_tasks, &n0, &n1);  // the weight rows (output columns), evenly
    for (int64_t t = n0 / kTile; t * kTile < n1; ++t)
      for (int64_t r = 0; r < p.m; r += 4) {
        switch (std::min<int64_t>(4, p.m - r)) {
          case 1: w4a8_direct<1>(p, a, xs, qsum, t, r); break;
          case 2: w4a8_direct<2>(p, a, xs, qsum, t, r); break;
          case 3: w4a8_direct<3>(p, a, xs, qsum, t, r); break;
          default: w4a8_direct<4>(p, a, xs, qsum, t, r); break;
        }
      }
  });
}

void dense_w4a8(const TensorView& x, const TensorView& qw, const TensorView& scale, const TensorView& zero,
                const TensorView* b, const TensorView& out, const char* kernel) {
  W4A8 p{};
  p.x = f32_in(x, kernel, "x", 1, 64);
  p.qw = data_of<const uint8_t>(qw, kernel, "qw", kDLUInt, 8, 5, 5);
  if (scale.dtype().code == kDLFloat && scale.dtype().bits == 16) {
    p.scale_h = data_of<const uint16_t>(scale, kernel, "scale", kDLFloat, 16, 3, 3);
  } else {
    p.scale = f32_in(scale, kernel, "scale", 3, 3);
  }
  if (zero.dtype().code == kDLFloat) {
    p.zero_f32 = f32_in(zero, kernel, "zero", 3, 3);
  } else {
    p.zero = data_of<const uint8_t>(zero, kernel, "zero", kDLUInt, 8, 3, 3);
  }
  p.out = f32_out(out, kernel, x.ndim(), x.ndim());
  p.k = x.size(-1), p.n = out.size(-1);
  p.m = p.k ? x.numel() / p.k : out.numel() / std::max<int64_t>(p.n, 1);
  for (int d = 0; d + 1 < x.ndim(); ++d) check_dim(out, kernel, "out", d, x.size(d), "the leading dims of x");
  const std::string packed = " (pack the weights with backends/kernels/quant_layout.py pack_w4a8)";
  const std::string n = "N = " + std::to_string(p.n) + ", the last dim of out";
  check_dim(qw, kernel, "qw", 0, ceil_div(p.n, kTile), ("ceil(N / 16), " + n + packed).c_str());
  p.groups = qw.size(1);
  if (p.k > 0 && (p.groups == 0 || p.k % p.groups != 0 || (p.k / p.groups) % 2 != 0)) {
    TVM_FFI_THROW(ValueError) << kernel << ": argument 'qw' has shape " << shape_str(qw) << ": its "
                              << p.groups << " groups must divide K = " << p.k << " into groups of even size";
  }
  p.group = p.groups ? p.k / p.groups : 0;
  p.octets = ceil_div(p.group, 8), p.lda = p.groups * p.octets * 8;
  check_dim(qw, kernel, "qw", 2, p.octets, ("ceil(group / 8), group = K / G = " + std::to_string(p.group) + packed).c_str());
  check_dim(qw, kernel, "qw", 3, kTile, ("16 columns per tile" + packed).c_str());
  check_dim(qw, kernel, "qw", 4, 4, ("4 k per nibble" + packed).c_str());
  for (const auto* a : {&scale, &zero}) {
    const char* name = a == &scale ? "scale" : "zero";
    check_dim(*a, kernel, name, 0, qw.size(0), ("ceil(N / 16), " + n + packed).c_str());
    check_dim(*a, kernel, name, 1, p.groups, "G, the groups of qw");
    check_dim(*a, kernel, name, 2, kTile, ("16 columns per tile" + packed).c_str());
  }
  if (b) {
    p.b = f32_in(*b, kernel, "b", 1, 1);
    check_dim(*b, kernel, "b", 0, p.n, n.c_str());
  }
  check_blas_int(p.m, kernel, "M");
  check_blas_int(p.k, kernel, "K");
  w4a8_run(p);
}

// ---------------------------------------------------------------------------------------------
// embedding_w4: rows of an int4 table stored in a dense kernel's packed layout (a tied LM head's
// codes, stored once): out[i, k] = (code(row, k) - zero(row, k / group)) * scale(row, k / group) in
// float32, as tcc::embedding_w4 (bit-exact: one subtraction and one product, both exact roundings)
//   qw rank 5, pack_w4a8: qw [T, G, O, 16, 4], scale / zero [T, G, 16]
//   qw rank 3, pack_w4:   qw [T, D/2, 16],     scale / zero [G, 16 T]
// scale float16 or float32, zero uint8 or float32; ids clipped to 0..V-1 (as R.take(mode="clip")).
// ---------------------------------------------------------------------------------------------

void embedding_w4(const TensorView& ids, const TensorView& qw, const TensorView& scale, const TensorView& zero,
                  int64_t v, const TensorView& out, const char* kernel) {
  const int64_t* id = data_of<const int64_t>(ids, kernel, "ids", kDLInt, 64, 0, 63);
  const bool w4a8 = qw.ndim() == 5;
  const uint8_t* codes = data_of<const uint8_t>(qw, kernel, "qw", kDLUInt, 8, 3, 5);
  const bool half = scale.dtype().code == kDLFloat && scale.dtype().bits == 16;
  const uint16_t* scale_h = half ? data_of<const uint16_t>(scale, kernel, "scale", kDLFloat, 16, 2, 3) : nullptr;
  const float* scale_f = half ? nullptr : f32_in(scale, kernel, "scale", 2, 3);
  const bool zf = zero.dtype().code == kDLFloat;
  const float* zero_f = zf ? f32_in(zero, kernel, "zero", 2, 3) : nullptr;
  const uint8_t* zero_u = zf ? nullptr : data_of<const uint8_t>(zero, kernel, "zero", kDLUInt, 8, 2, 3);
  float* o = f32_out(out, kernel, ids.ndim() + 1, ids.ndim() + 1);
  for (int i = 0; i < ids.ndim(); ++i) check_dim(out, kernel, "out", i, ids.size(i), "the dims of ids");
  const int64_t d = out.size(ids.ndim()), count = ids.numel(), tiles = qw.size(0);
  if (qw.ndim() == 4) TVM_FFI_THROW(ValueError) << kernel << ": argument 'qw' must have rank 3 (pack_w4) or 5 (pack_w4a8)";
  const int64_t groups = w4a8 ? qw.size(1) : scale.size(0);
  if (v <= 0 || v > tiles * kTile) {
    if (count > 0) TVM_FFI_THROW(ValueError) << kernel << ": V = " << v << " rows do not fit qw " << shape_str(qw);
    return;
  }
  if (groups == 0 || d % groups != 0 || (d / groups) % 2 != 0) {
    TVM_FFI_THROW(ValueError) << kernel << ": D = " << d << " (the last dim of out) must split into " << groups
                              << " groups of even size";
  }
  const int64_t group = d / groups, octets = ceil_div(group, 8);
  const std::string layout = w4a8 ? " (pack_w4a8's layout)" : " (pack_w4's layout)";
  if (w4a8) {
    check_dim(qw, kernel, "qw", 2, octets, ("ceil(group / 8)" + layout).c_str());
    check_dim(qw, kernel, "qw", 3, kTile, ("16 rows per tile" + layout).c_str());
    check_dim(qw, kernel, "qw", 4, 4, ("4 k per nibble" + layout).c_str());
  } else {
    check_dim(qw, kernel, "qw", 1, d / 2, ("D / 2" + layout).c_str());
    check_dim(qw, kernel, "qw", 2, kTile, ("16 rows per tile" + layout).c_str());
  }
  for (const auto* a : {&scale, &zero}) {
    const char* name = a == &scale ? "scale" : "zero";
    if (a->ndim() != (w4a8 ? 3 : 2)) TVM_FFI_THROW(ValueError) << kernel << ": argument '" << name << "' has rank "
                                                              << a->ndim() << layout;
    if (w4a8) {
      check_dim(*a, kernel, name, 0, tiles, ("T, the tiles of qw" + layout).c_str());
      check_dim(*a, kernel, name, 1, groups, "G, the groups of qw");
      check_dim(*a, kernel, name, 2, kTile, ("16 rows per tile" + layout).c_str());
    } else {
      check_dim(*a, kernel, name, 0, groups, "G");
      check_dim(*a, kernel, name, 1, tiles * kTile, ("16 T, the rows of qw" + layout).c_str());
    }
  }
  for (int64_t i = 0; i < count; ++i) {
    const int64_t row = std::min(std::max<int64_t>(id[i], 0), v - 1), t = row / kTile, c = row % kTile;
    float* dst = o + i * d;
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t at = w4a8 ? (t * groups + g) * kTile + c : g * tiles * kTile + row;
      const float s = half ? half_to_float(scale_h[at]) : scale_f[at];
      const float z = zf ? zero_f[at] : static_cast<float>(zero_u[at]);
      for (int64_t kk = 0; kk < group; ++kk) {
        uint8_t code;
        if (w4a8) {  // byte [t, g, o, c, i]: k = 8 o + i low nibble, k = 8 o + i + 4 high nibble
          const int64_t oc = kk / 8, i4 = kk % 8;
          const uint8_t byte = codes[(((t * groups + g) * octets + oc) * kTile + c) * 4 + (i4 & 3)];
          code = i4 < 4 ? byte & 15 : byte >> 4;
        } else {  // byte [t, j, c]: k = 2 j low nibble, k = 2 j + 1 high nibble
          const int64_t k = g * group + kk;
          const uint8_t byte = codes[(t * (d / 2) + k / 2) * kTile + c];
          code = k % 2 ? byte >> 4 : byte & 15;
        }
        dst[g * group + kk] = (static_cast<float>(code) - z) * s;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Exported kernels
// ---------------------------------------------------------------------------------------------

void dense_a8w8_f32(TensorView x, TensorView qw, TensorView wsum, TensorView w_scale, TensorView b, bool asym,
                    TensorView out) {
  dense_a8w8(x, qw, wsum, w_scale, &b, nullptr, nullptr, asym, out, "tcc_dense_a8w8_f32");
}

void dense_a8w8_nobias_f32(TensorView x, TensorView qw, TensorView wsum, TensorView w_scale, bool asym,
                           TensorView out) {
  dense_a8w8(x, qw, wsum, w_scale, nullptr, nullptr, nullptr, asym, out, "tcc_dense_a8w8_nobias_f32");
}

void dense_a8w8_static_f32(TensorView x, TensorView qw, TensorView wsum, TensorView w_scale, TensorView b,
                           TensorView x_scale, TensorView x_zero, bool asym, TensorView out) {
  dense_a8w8(x, qw, wsum, w_scale, &b, &x_scale, &x_zero, asym, out, "tcc_dense_a8w8_static_f32");
}

void dense_a8w8_static_nobias_f32(TensorView x, TensorView qw, TensorView wsum, TensorView w_scale,
                                  TensorView x_scale, TensorView x_zero, bool asym, TensorView out) {
  dense_a8w8(x, qw, wsum, w_scale, nullptr, &x_scale, &x_zero, asym, out, "tcc_dense_a8w8_static_nobias_f32");
}

void dense_w4_f32(TensorView x, TensorView qw, TensorView scale, TensorView zero, TensorView b, TensorView out) {
  dense_w4(x, qw, scale, zero, &b, out, "tcc_dense_w4_f32");
}

void dense_w4_nobias_f32(TensorView x, TensorView qw, TensorView scale, TensorView zero, TensorView out) {
  dense_w4(x, qw, scale, zero, nullptr, out, "tcc_dense_w4_nobias_f32");
}

void embedding_w4_f32(TensorView ids, TensorView qw, TensorView scale, TensorView zero, int64_t v, TensorView out) {
  embedding_w4(ids, qw, scale, zero, v, out, "tcc_embedding_w4_f32");
}

void dense_w4a8_f32(TensorView x, TensorView qw, TensorView scale, TensorView zero, TensorView b, TensorView out) {
  dense_w4a8(x, qw, scale, zero, &b, out, "tcc_dense_w4a8_f32");
}

void dense_w4a8_nobias_f32(TensorView x, TensorView qw, TensorView scale, TensorView zero, TensorView out) {
  dense_w4a8(x, qw, scale, zero, nullptr, out, "tcc_dense_w4a8_nobias_f32");
}

}  // namespace

TVM_FFI_DLL_EXPORT_TYPED_FUNC(tcc_dense_a8w8_f32, dense_a8w8_f32);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(tcc_dense_a8w8_nobias_f32, dense_a8w8_nobias_f32);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(tcc_dense_a8w8_static_f32, dense_a8w8_static_f32);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(tcc_dense_a8w8_static_nobias_f32, dense_a8w8_static_nobias_f32);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(tcc_dense_w4_f32, dense_w4_f32);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(tcc_dense_w4_nobias_f32, dense_w4_nobias_f32);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(tcc_dense_w4a8_f32, dense_w4a8_f32);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(tcc_dense_w4a8_nobias_f32, dense_w4a8_nobias_f32);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(tcc_embedding_w4_f32, embedding_w4_f32);
