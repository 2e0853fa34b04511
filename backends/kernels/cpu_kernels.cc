// tcc's hand-written CPU kernels for the dense ops, called from TVM modules (x86-64 and aarch64).
//
// Contract: each kernel computes exactly the reference op in tcc/ops.py, in fp32, on row-major
// contiguous CPU tensors, and writes its result into the last argument (destination-passing style,
// as R.call_dps_packed calls it). Every argument's dtype, rank and shape is checked; a mismatch
// raises a ValueError/TypeError through TVM-FFI that names the kernel and the argument.
//
//   tcc_dense_f32(x[..., K], w[N, K], b[N], out[..., N])             out = x w^T + b
//   tcc_dense_nobias_f32(x, w, out)
//   tcc_dense_w8_f32(x[..., K], qw int8[N, K], scale[N], b[N], out)  out = x (qw * scale)^T + b
//   tcc_dense_w8_nobias_f32(x, qw, scale, out)
//   tcc_sdpa_f32(q[B,H,Sq,D], k[B,Hkv,Sk,D], v[B,Hkv,Sk,Dv], mask, double scale, bool causal,
//                out[B,H,Sq,Dv])
//   tcc_sdpa_nomask_f32(q, k, v, double scale, bool causal, out)
//   tcc_sdpa_kv_f32(q[B,H,L,D], k[B,Hkv,L,D], v[B,Hkv,L,Dv], k_cache[B,Hkv,C,D], v_cache[B,Hkv,C,Dv],
//                   pos int64[1], double scale, int64 window, double softcap, out[B,H,L,Dv])
//       writes k/v into the caches at rows pos..pos+L-1 (in place: the caches are inputs the runtime
//       keeps between calls), then causal attention of the L queries over cache rows 0..pos+L-1;
//       window > 0: query row t sees only rows t-window+1..t (sliding-window layers); softcap > 0:
//       scaled scores s become softcap * tanh(s / softcap) (Gemma-2), before the mask
//   tcc_sdpa_kv_i8_f32(q, k, v, k_codes int8[B,Hkv,C,D], k_scales[B,Hkv,C], v_codes int8[B,Hkv,C,Dv],
//                      v_scales[B,Hkv,C], pos int64[1], double scale, int64 window, double softcap, out)
//       the same over an int8 cache: the new rows are quantized (one scale per KV head and position)
//       and attention reads codes * scale
//
// sdpa: query head h reads KV head h / (H / Hkv); `mask` is an additive float mask of rank <= 4,
// right-aligned against [B, H, Sq, Sk], each dim 1 (broadcast) or full; `causal` lets query i see
// keys j <= i + Sk - Sq (torch's tril(Sk - Sq)). A row that sees no key at all is NaN, as in the
// reference (softmax of all -inf). scale and causal come as Relax PrimValues (relax.prim_value).
//
// Math: fp32 GEMMs are cblas_sgemm from scipy-openblas32 (symbols prefixed scipy_), except dense up
// to 16 rows (dense_small_m: each weight row streamed once for all rows, FMA in registers). dense_w8 keeps
// the weights int8 in memory; up to 16 rows it multiplies the codes directly (dense_small_m's tiles), above that it dequantizes blocks of output channels (64 KiB of fp32 for M <= 16,
// else 512 KiB) into a per-thread scratch buffer, one sgemm per block. sdpa with up to 16 query rows
// (a decode step, a speculative verify) runs sdpa_rows, no BLAS, the query heads that share a KV head
// together: each row is summed in one order whatever the rows around it, so a verify row is the
// decode step's bit for bit. Threads: OpenBLAS is set to
// one thread and the kernels split their work over TVM's own thread pool (TVMBackendParallelLaunch,
// resolved from libtvm_runtime when the module is loaded), so TVM's and OpenBLAS's pools never
// fight for cores: dense splits the longer of M and N, sdpa splits (batch, head, block of 64 query
// rows), or with up to 16 query rows ranges of (batch, head). The pool's size is TVM's: TVM_NUM_THREADS, else half the logical CPUs on x86 (TVM assumes
// hyper-threading), all of them elsewhere.
#include "common.h"

#include <array>
#include <cmath>
#include <utility>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#elif defined(__aarch64__)
#include <arm_neon.h>
#endif

namespace {

// ---------------------------------------------------------------------------------------------
// dense and dense_w8
// ---------------------------------------------------------------------------------------------

struct DenseShape {
  int64_t m, n, k;
};

DenseShape check_dense(const char* kernel, const TensorView& x, const TensorView& w, const TensorView* scale,
                       const TensorView* b, const TensorView& out) {
  f32_in(x, kernel, "x", 1, 64);
  int64_t n = w.size(0), k = x.size(-1);
  check_dim(w, kernel, scale ? "qw" : "w", 1, k, "K, the last dim of x");
  if (scale) {
    f32_in(*scale, kernel, "scale", 1, 1);
    check_dim(*scale, kernel, "scale", 0, n, "N, the rows of qw");
  }
  if (b) {
    f32_in(*b, kernel, "b", 1, 1);
    check_dim(*b, kernel, "b", 0, n, scale ? "N, the rows of qw" : "N, the rows of w");
  }
  f32_out(out, kernel, x.ndim(), x.ndim());
  for (int d = 0; d + 1 < x.ndim(); ++d) check_dim(out, kernel, "out", d, x.size(d), "the leading dims of x");
  check_dim(out, kernel, "out", x.ndim() - 1, n, "N");
  int64_t m = x.numel() / std::max<int64_t>(k, 1);
  if (k == 0) m = out.numel() / std::max<int64_t>(n, 1);
  check_blas_int(m, kernel, "M");
  check_blas_int(n, kernel, "N");
  check_blas_int(k, kernel, "K");
  return {m, n, k};
}

// The rectangle [m0, m1) x [n0, n1) of out that task `task` of `num_tasks` computes: the longer
// of M and N is split, in units of 16.
void dense_tile(const DenseShape& s, int task, int num_tasks, int64_t* m0, int64_t* m1, int64_t* n0,
                int64_t* n1) {
  *m0 = 0, *m1 = s.m, *n0 = 0, *n1 = s.n;
  if (s.n >= s.m) split(s.n, 16, task, num_tasks, n0, n1);
  else split(s.m, 16, task, num_tasks, m0, m1);
}

// Runs `gemm(m0, m1, n0, n1)` on each thread's output tile after writing the bias into it (the
// GEMM accumulates onto it); empty tiles and K = 0 stop after the bias.
template <typename F>
void for_each_tile(const DenseShape& s, float* op, const float* bp, F gemm) {
  parallel([&](int task, int num_tasks) {
    int64_t m0, m1, n0, n1;
    dense_tile(s, task, num_tasks, &m0, &m1, &n0, &n1);
    if (m0 >= m1 || n0 >= n1) return;
    fill_bias(op, bp, s.n, m0, m1, n0, n1);
    if (s.k == 0) return;
    gemm(m0, m1, n0, n1);
  });
}

// Small M (speculative verify, a few decode rows): OpenBLAS sgemm packs the weight panels it reads
// once anyway, so M = 8 cost 2.2x a GEMV. Up to kSmallRows rows, dense streams each block of kNR
// weight rows once for all the rows of x instead: per block of up to 4 rows of x, 4 x kNR dot
// products accumulate lane-wise in registers (FMA) and reduce at the end; the columns are split
// over threads as for the GEMV. F32V is the register: AVX-512 zmm, AVX2+FMA ymm, NEON q, else a
// 4-float GCC vector (separate multiply and add). M = 1 takes the same path (as fast as OpenBLAS
// sgemv here), so each output element is summed in the same order whatever M is: a verify row's
// logits are bit-identical to the decode step's.
#if defined(__AVX512F__)
typedef __m512 F32V;
constexpr int kF32Lanes = 16, kNR = 4;
inline F32V vload(const float* p) { return _mm512_loadu_ps(p); }
inline F32V vload(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline F32V vzero() { return _mm512_setzero_ps(); }
inline F32V vfma(F32V a, F32V b, F32V c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(F32V v) { return _mm512_reduce_add_ps(v); }
inline F32V vset1(float x) { return _mm512_set1_ps(x); }
inline void vstore(float* p, F32V v) { _mm512_storeu_ps(p, v); }
constexpr int kPvRows = 6;  // sdpa's p v: rows x 4 vectors of accumulators in registers (of 32)
#elif defined(__AVX2__) && defined(__FMA__)
typedef __m256 F32V;
constexpr int kF32Lanes = 8, kNR = 2;
inline F32V vload(const float* p) { return _mm256_loadu_ps(p); }
inline F32V vload(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline F32V vzero() { return _mm256_setzero_ps(); }
inline F32V vfma(F32V a, F32V b, F32V c) { return _mm256_fmadd_ps(a, b, c); }
inline F32V vset1(float x) { return _mm256_set1_ps(x); }
inline void vstore(float* p, F32V v) { _mm256_storeu_ps(p, v); }
constexpr int kPvRows = 3;  // (of 16 registers)
inline float vsum(F32V v) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}
#elif defined(__aarch64__)
typedef float32x4_t F32V;
constexpr int kF32Lanes = 4, kNR = 4;
inline F32V vload(const float* p) { return vld1q_f32(p); }
inline F32V vload(const int8_t* p) {
  int32_t four;
  std::memcpy(&four, p, 4);
  return vcvtq_f32_s32(vmovl_s16(vget_low_s16(vmovl_s8(vreinterpret_s8_s32(vdup_n_s32(four))))));
}
inline F32V vzero() { return vdupq_n_f32(0.0f); }
inline F32V vfma(F32V a, F32V b, F32V c) { return vfmaq_f32(c, a, b); }
inline float vsum(F32V v) { return vaddvq_f32(v); }
inline F32V vset1(float x) { return vdupq_n_f32(x); }
inline void vstore(float* p, F32V v) { vst1q_f32(p, v); }
constexpr int kPvRows = 6;  // (of 32 registers)
#else
typedef float F32V __attribute__((vector_size(16)));
typedef float F32V_u __attribute__((vector_size(16), aligned(1), may_alias));
constexpr int kF32Lanes = 4, kNR = 2;
inline F32V vload(const float* p) { return *reinterpret_cast<const F32V_u*>(p); }
inline F32V vload(const int8_t* p) {
  return F32V{static_cast<float>(p[0]), static_cast<float>(p[1]), static_cast<float>(p[2]), static_cast<float>(p[3])};
}
inline F32V vzero() { return F32V{0.0f, 0.0f, 0.0f, 0.0f}; }
inline F32V vfma(F32V a, F32V b, F32V c) { return a * b + c; }
inline float vsum(F32V v) { return (v[0] + v[1]) + (v[2] + v[3]); }
inline F32V vset1(float x) { return F32V{x, x, x, x}; }
inline void vstore(float* p, F32V v) { *reinterpret_cast<F32V_u*>(p) = v; }
constexpr int kPvRows = 3;  // (of 16 registers)
#endif
#ifndef TCC_DENSE_SMALL_ROWS  // -DTCC_DENSE_SMALL_ROWS=0: OpenBLAS only (benchmarks/decode_gemv.py --rows compares)
#define TCC_DENSE_SMALL_ROWS 16
#endif
constexpr int64_t kSmallRows = TCC_DENSE_SMALL_ROWS;

// out[i * ldo + r] += x[i, :] . w[r, :] for i < MR, r < NR (x and w rows k apart; w float32, or int8
// codes converted to float32 as they are loaded)
template <int MR, int NR, typename W = float>
void dot_tile(const float* x, const W* w, int64_t k, float* out, int64_t ldo) {
  F32V acc[MR][NR];
#pragma GCC unroll 4
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) acc[i][r] = vzero();
  int64_t j = 0;
  for (; j + kF32Lanes <= k; j += kF32Lanes) {
    F32V wv[NR];
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) wv[r] = vload(w + r * k + j);
#pragma GCC unroll 4
    for (int i = 0; i < MR; ++i) {
      const F32V xv = vload(x + i * k + j);
#pragma GCC unroll 4
      for (int r = 0; r < NR; ++r) acc[i][r] = vfma(xv, wv[r], acc[i][r]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) {
      float s = vsum(acc[i][r]);
      // the tail's products round to float32 before each add (exact in double): no FMA contraction,
      // which the compiler may apply in one instantiation and not in another
      for (int64_t jj = j; jj < k; ++jj) s += static_cast<float>(static_cast<double>(x[i * k + jj]) * w[r * k + jj]);
      out[i * ldo + r] += s;
    }
}

template <int NR, typename W = float>
void dot_rows(int64_t mr, const float* x, const W* w, int64_t k, float* out, int64_t ldo) {
  switch (mr) {
    case 1: dot_tile<1, NR, W>(x, w, k, out, ldo); break;
    case 2: dot_tile<2, NR, W>(x, w, k, out, ldo); break;
    case 3: dot_tile<3, NR, W>(x, w, k, out, ldo); break;
    default: dot_tile<4, NR, W>(x, w, k, out, ldo); break;
  }
}

// out[m0:m1, n0:n1] += x[m0:m1] w[n0:n1]^T, each block of kNR rows of w read from memory once
void dense_small_m(const DenseShape& s, const float* xp, const float* wp, float* op, int64_t m0, int64_t m1,
                   int64_t n0, int64_t n1) {
  int64_t r = n0;
  for (; r + kNR <= n1; r += kNR)
    for (int64_t i = m0; i < m1; i += 4)
      dot_rows<kNR>(std::min<int64_t>(4, m1 - i), xp + i * s.k, wp + r * s.k, s.k, op + i * s.n + r, s.n);
  for (; r < n1; ++r)
    for (int64_t i = m0; i < m1; i += 4)
      dot_rows<1>(std::min<int64_t>(4, m1 - i), xp + i * s.k, wp + r * s.k, s.k, op + i * s.n + r, s.n);
}

void dense(const TensorView& x, const TensorView& w, const TensorView* b, const TensorView& out,
           const char* kernel) {
  f32_in(w, kernel, "w", 2, 2);
  DenseShape s = check_dense(kernel, x, w, nullptr, b, out);
  const float* xp = f32_in(x, kernel, "x", 1, 64);
  const float* wp = f32_in(w, kernel, "w", 2, 2);
  const float* bp = b ? f32_in(*b, kernel, "b", 1, 1) : nullptr;
  float* op = f32_out(out, kernel, 1, 64);
  for_each_tile(s, op, bp, [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
    if (s.m <= kSmallRows) dense_small_m(s, xp, wp, op, m0, m1, n0, n1);
    else sgemm_nt(m1 - m0, n1 - n0, s.k, 1.0f, xp + m0 * s.k, s.k, wp + n0 * s.k, s.k, 1.0f, op + m0 * s.n + n0, s.n);
  });
}

// Up to this many rows of x (a decode step, a speculative verify), dense_w8 reads the int8 codes
// directly (a decode step reads a quarter of the bytes a dequantized fp32 copy would take: SmolLM2's
// tied int8 LM head 2.0 -> 0.6 ms): dense_small_m's dot tiles with each block of kNR code rows
// converted to fp32 as it is loaded, once for up to 4 rows of x, so each output is summed in the
// same order whatever M is (a verify row equals the decode step bit for bit).
constexpr int64_t kW8SmallRows = 16;

// Output channels dequantized per block, a multiple of 16: about 64 KiB of fp32 weights when
// there are few rows (the block is read once, so it should stay in L1/L2), 512 KiB otherwise (fewer,
// larger sgemm calls). Measured on M = 1 and M = 128 with K = 384 and 576.
int64_t w8_block(int64_t m, int64_t k) {
  const int64_t bytes = (m <= 16 ? 64 : 512) * 1024;
  return std::max<int64_t>(16, bytes / 4 / std::max<int64_t>(k, 1) / 16 * 16);
}

void dense_w8(const TensorView& x, const TensorView& qw, const TensorView& scale, const TensorView* b,
              const TensorView& out, const char* kernel) {
  const int8_t* qp = data_of<const int8_t>(qw, kernel, "qw", kDLInt, 8, 2, 2);
  DenseShape s = check_dense(kernel, x, qw, &scale, b, out);
  const float* xp = f32_in(x, kernel, "x", 1, 64);
  const float* sp = f32_in(scale, kernel, "scale", 1, 1);
  const float* bp = b ? f32_in(*b, kernel, "b", 1, 1) : nullptr;
  float* op = f32_out(out, kernel, 1, 64);
  if (s.m <= kW8SmallRows) {  // decode, verify: straight from the codes, out[i, r] += scale[r] * (x[i] . q[r])
    for_each_tile(s, op, bp, [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
      float acc[4 * kNR];
      for (int64_t r = n0; r < n1;) {
        const int nr = r + kNR <= n1 ? kNR : 1;
        for (int64_t i = m0; i < m1; i += 4) {
          const int64_t mr = std::min<int64_t>(4, m1 - i);
          std::fill(acc, acc + 4 * kNR, 0.0f);
          if (nr == kNR) dot_rows<kNR, int8_t>(mr, xp + i * s.k, qp + r * s.k, s.k, acc, kNR);
          else dot_rows<1, int8_t>(mr, xp + i * s.k, qp + r * s.k, s.k, acc, kNR);
          // (the product rounds to float32 before the add, in every instantiation: a float multiply-add
          // could be contracted to an FMA in one loop shape and not in another)
          for (int64_t ii = 0; ii < mr; ++ii)
            for (int rr = 0; rr < nr; ++rr)
              op[(i + ii) * s.n + r + rr] += static_cast<float>(static_cast<double>(acc[ii * kNR + rr]) * sp[r + rr]);
        }
        r += nr;
      }
    });
    return;
  }
  const int64_t block = w8_block(s.m, s.k);
  for_each_tile(s, op, bp, [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
    float* wf = scratch<float>(block * s.k);
    for (int64_t c0 = n0; c0 < n1; c0 += block) {
      int64_t c1 = std::min(n1, c0 + block);
      for (int64_t r = c0; r < c1; ++r) {
        const int8_t* src = qp + r * s.k;
        float* dst = wf + (r - c0) * s.k;
        const float sc = sp[r];
        for (int64_t i = 0; i < s.k; ++i) dst[i] = static_cast<float>(src[i]) * sc;
      }
      sgemm_nt(m1 - m0, c1 - c0, s.k, 1.0f, xp + m0 * s.k, s.k, wf, s.k, 1.0f, op + m0 * s.n + c0, s.n);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// sdpa
// ---------------------------------------------------------------------------------------------

// exp(x) to ~1 ulp for x <= 88 (Cephes' polynomial), branch-free so the softmax loop vectorizes;
// exp(-inf) = 0 and exp(NaN) = NaN.
inline float exp_f32(float x) {
  const float lo = -87.0f, hi = 88.0f;
  float xc = x > lo ? x : lo;
  xc = xc < hi ? xc : hi;
  float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln 2)
  float r = xc - n * 0.693359375f + n * 2.12194440e-4f;               // x - n ln 2, in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  float y = p * __builtin_bit_cast(float, (static_cast<int32_t>(n) + 127) << 23);  // p * 2^n
  y = x > lo ? y : 0.0f;
  return x == x ? y : x;
}

// max(row[0:n]), -inf for n = 0; NaNs are skipped (they reach the output through exp anyway).
// Written with 16 partial maxima so it vectorizes without -ffast-math.
float row_max(const float* row, int64_t n) {
  constexpr int L = 16;
  float part[L];
  std::fill(part, part + L, -std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + L <= n; j += L)
    for (int l = 0; l < L; ++l) part[l] = row[j + l] > part[l] ? row[j + l] : part[l];
  for (; j < n; ++j) part[0] = row[j] > part[0] ? row[j] : part[0];
  return *std::max_element(part, part + L);
}

// row[0:n] = softmax(row[0:n]); a row whose max is -inf (no visible key) becomes NaN.
void softmax_row(float* row, int64_t n) {
  const float mx = row_max(row, n);
  if (mx == -std::numeric_limits<float>::infinity()) {
    std::fill(row, row + n, std::numeric_limits<float>::quiet_NaN());
    return;
  }
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    float e = exp_f32(row[j] - mx);
    row[j] = e;
    sum += e;
  }
  const float inv = 1.0f / sum;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) row[j] *= inv;
}

struct Sdpa {
  int64_t batch, heads, kv_heads, sq, sk, d, dv;
  int64_t kv_rows;          // rows stored per KV head: sk, or a KV cache's capacity (>= sk)
  const float *q, *k, *v;
  const float* mask;        // nullptr: no mask
  int64_t mask_stride[4];   // element strides over [B, H, Sq, Sk], 0 where broadcast
  float scale;
  bool causal;
  int64_t window;           // causal only: row i sees keys j > i + shift - window too (0: all)
  float softcap;            // 0: none; else scores s -> softcap * tanh(s / softcap)
  float* out;
};

constexpr int64_t kQueryBlock = 64;  // query rows per task: the scores block stays in L2

// Rows [i0, i1) of head h of batch b.
void sdpa_block(const Sdpa& s, int64_t b, int64_t h, int64_t i0, int64_t i1) {
  const int64_t hkv = h / (s.heads / s.kv_heads);
  const float* q = s.q + ((b * s.heads + h) * s.sq + i0) * s.d;
  const float* k = s.k + (b * s.kv_heads + hkv) * s.kv_rows * s.d;
  const float* v = s.v + (b * s.kv_heads + hkv) * s.kv_rows * s.dv;
  float* out = s.out + ((b * s.heads + h) * s.sq + i0) * s.dv;
  const int64_t rows = i1 - i0, shift = s.sk - s.sq;  // causal: row i sees keys j <= i + shift
  // Keys that any row of this block can see; the later ones are skipped altogether.
  const int64_t cols = s.causal ? std::clamp<int64_t>(i1 - 1 + shift + 1, 0, s.sk) : s.sk;
  if (cols == 0) {
    std::fill(out, out + rows * s.dv, std::numeric_limits<float>::quiet_NaN());
    return;
  }
  float* scores = scratch<float>(rows * cols);
  sgemm_nt(rows, cols, s.d, s.scale, q, s.d, k, s.d, 0.0f, scores, cols);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = i0 + r;
    float* row = scores + r * cols;
    if (s.softcap > 0.0f) {
      for (int64_t j = 0; j < cols; ++j) row[j] = s.softcap * std::tanh(row[j] / s.softcap);
    }
    if (s.mask) {
      const float* m = s.mask + b * s.mask_stride[0] + h * s.mask_stride[1] + i * s.mask_stride[2];
      const int64_t mj = s.mask_stride[3];
      if (mj == 0) {
        for (int64_t j = 0; j < cols; ++j) row[j] += m[0];
      } else {
        for (int64_t j = 0; j < cols; ++j) row[j] += m[j];
      }
    }
    if (s.causal) {
      for (int64_t j = std::max<int64_t>(0, i + shift + 1); j < cols; ++j) row[j] = -std::numeric_limits<float>::infinity();
      if (s.window > 0) {
        const int64_t first = std::clamp<int64_t>(i + shift - s.window + 1, 0, cols);
        std::fill(row, row + first, -std::numeric_limits<float>::infinity());
      }
    }
    softmax_row(row, cols);
  }
  sgemm_nn(rows, s.dv, cols, scores, cols, v, s.dv, 0.0f, out, s.dv);
}

constexpr int64_t kSdpaRows = 16;
constexpr int64_t kKvAhead = 16;  // rows of the KV cache a decode step asks for ahead
constexpr int kPvVecs = 4;  // p v: vectors of lanes per row in one pass over the keys

// o_r[e0 : e0 + VC lanes] = sum over keys j in [j0, j1), in key order, of p_r[j] v[j][e0 ...] for RC
// rows that see the same keys. The rows' accumulators stay in registers and their chains interleave
// (one row at a time, o in memory, was bound by the FMA's latency: 4 cycles a key).
template <int RC, int VC>
void pv_tile(const float* const* p, const float* v, int64_t dv, int64_t j0, int64_t j1, int64_t e0, float* const* o) {
  F32V acc[RC][VC];
#pragma GCC unroll 8
  for (int r = 0; r < RC; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < VC; ++c) acc[r][c] = vzero();
  for (int64_t j = j0; j < j1; ++j) {
    prefetch_lines(v + (j + kKvAhead) * dv + e0, VC * kF32Lanes * 4);  // (sdpa_rows: why)
    F32V vj[VC];
#pragma GCC unroll 4
    for (int c = 0; c < VC; ++c) vj[c] = vload(v + j * dv + e0 + c * kF32Lanes);
#pragma GCC unroll 8
    for (int r = 0; r < RC; ++r) {
      const F32V pr = vset1(p[r][j]);
#pragma GCC unroll 4
      for (int c = 0; c < VC; ++c) acc[r][c] = vfma(pr, vj[c], acc[r][c]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < RC; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < VC; ++c) vstore(o[r] + e0 + c * kF32Lanes, acc[r][c]);
}

template <int RC>
void pv_rows(const float* const* p, const float* v, int64_t dv, int64_t j0, int64_t j1, float* const* o) {
  int64_t e = 0;
  for (; e + kPvVecs * kF32Lanes <= dv; e += kPvVecs * kF32Lanes) pv_tile<RC, kPvVecs>(p, v, dv, j0, j1, e, o);
  for (; e + kF32Lanes <= dv; e += kF32Lanes) pv_tile<RC, 1>(p, v, dv, j0, j1, e, o);
  for (; e < dv; ++e)
    for (int r = 0; r < RC; ++r) {
      float acc = 0.0f;
      for (int64_t j = j0; j < j1; ++j) acc += p[r][j] * v[j * dv + e];
      o[r][e] = acc;
    }
}

template <int... R>
constexpr std::array<void (*)(const float* const*, const float*, int64_t, int64_t, int64_t, float* const*), sizeof...(R)>
pv_table(std::integer_sequence<int, R...>) {
  return {pv_rows<R + 1>...};
}
constexpr auto kPvRowsFns = pv_table(std::make_integer_sequence<int, kPvRows>{});  // [rows - 1]

// Few query rows (a decode step, a speculative verify: Sq <= kSdpaRows), heads [h0, h1) of batch b,
// which share one KV head: at each position their rows see the same keys, so they run together (the
// keys read once for all of them; grouped-query attention has 4-8 query heads per KV head). Each
// row's result depends only on its query and the keys it sees, never on the rows or the padding
// around it: the scores are dot_tile's (each q.k summed in one order whatever the tile), the softmax
// runs over exactly the row's visible keys, and p v is summed key by key in key order. So a verify row
// at position t equals the decode step at t bit for bit (sdpa_block's BLAS sums in another order for 1
// and for 8 rows, and its softmax runs over the block's columns, the masked ones included).
void sdpa_rows(const Sdpa& s, int64_t b, int64_t h0, int64_t h1) {
  const int64_t nh = h1 - h0, hkv = h0 / (s.heads / s.kv_heads), shift = s.sk - s.sq;
  const float* k = s.k + (b * s.kv_heads + hkv) * s.kv_rows * s.d;
  const float* v = s.v + (b * s.kv_heads + hkv) * s.kv_rows * s.dv;
  // row i sees keys [first(i), end(i)): causal up to i + shift, the last `window` of them if sliding
  auto end = [&](int64_t i) { return s.causal ? std::clamp<int64_t>(i + shift + 1, 0, s.sk) : s.sk; };
  auto first = [&](int64_t i) {
    return s.causal && s.window > 0 ? std::clamp<int64_t>(i + shift - s.window + 1, 0, end(i)) : int64_t{0};
  };
  // the heads' query rows at position i, one after another (dot_tile reads rows d apart)
  float* qrows = scratch<float, 3>(nh * s.d);
  float* scores = scratch<float>(nh * s.sk);
  // A decode step last read this layer's keys and values a whole step ago: they come from memory, and
  // the hardware prefetcher alone left the attention latency-bound (0.5B shape, 132 positions: 9.4 us
  // with the cache cold against 4.3 us warm). The first kKvAhead rows of both are asked for here, then
  // the score and p v loops ask kKvAhead rows ahead of the row they read: 6.2 us cold, and 26.8 -> 14.9
  // us for the 1B shape's 32 / 8 heads (session 20, a bench cycling 256 MB of caches).
  const int64_t ahead_rows = std::min<int64_t>(kKvAhead, end(s.sq - 1) - first(0));
  prefetch_lines(k + first(0) * s.d, ahead_rows * s.d * 4);
  prefetch_lines(v + first(0) * s.dv, ahead_rows * s.dv * 4);
  for (int64_t i = 0; i < s.sq; ++i) {
    const int64_t j0 = first(i), j1 = end(i);
    auto out = [&](int64_t r) { return s.out + ((b * s.heads + h0 + r) * s.sq + i) * s.dv; };
    if (j1 == 0) {
      for (int64_t r = 0; r < nh; ++r) std::fill(out(r), out(r) + s.dv, std::numeric_limits<float>::quiet_NaN());
      continue;
    }
    for (int64_t r = 0; r < nh; ++r)
      std::memcpy(qrows + r * s.d, s.q + ((b * s.heads + h0 + r) * s.sq + i) * s.d, sizeof(float) * s.d);
    for (int64_t r = 0; r < nh; r += 4) {  // scores of up to 4 rows at once (the keys read once)
      const int mr = static_cast<int>(std::min<int64_t>(4, nh - r));
      float* sc = scores + r * s.sk;
      for (int m = 0; m < mr; ++m) std::fill(sc + m * s.sk + j0, sc + m * s.sk + j1, 0.0f);
      int64_t j = j0;
      for (; j + kNR <= j1; j += kNR) {
        if (r == 0) prefetch_lines(k + (j + kKvAhead) * s.d, kNR * s.d * 4);
        dot_rows<kNR>(mr, qrows + r * s.d, k + j * s.d, s.d, sc + j, s.sk);
      }
      for (; j < j1; ++j) dot_rows<1>(mr, qrows + r * s.d, k + j * s.d, s.d, sc + j, s.sk);
    }
    for (int64_t r = 0; r < nh; ++r) {
      float* row = scores + r * s.sk;
      for (int64_t j = j0; j < j1; ++j) row[j] *= s.scale;
      if (s.softcap > 0.0f) {
        for (int64_t j = j0; j < j1; ++j) row[j] = s.softcap * std::tanh(row[j] / s.softcap);
      }
      if (s.mask) {
        const float* m = s.mask + b * s.mask_stride[0] + (h0 + r) * s.mask_stride[1] + i * s.mask_stride[2];
        const int64_t mj = s.mask_stride[3];
        for (int64_t j = j0; j < j1; ++j) row[j] += m[j * mj];
      }
      softmax_row(row + j0, j1 - j0);
    }
    for (int64_t r = 0; r < nh; r += kPvRows) {
      const int rc = static_cast<int>(std::min<int64_t>(kPvRows, nh - r));
      const float* p[kPvRows];
      float* o[kPvRows];
      for (int m = 0; m < rc; ++m) p[m] = scores + (r + m) * s.sk, o[m] = out(r + m);
      kPvRowsFns[rc - 1](p, v, s.dv, j0, j1, o);
    }
  }
}

void run_sdpa(const Sdpa& s, int64_t out_numel);

// Checks sdpa and sdpa_kv share: query heads a multiple of the KV heads; out is [B, H, Sq, Dv].
void check_heads(const Sdpa& s, const char* kernel) {
  if (s.kv_heads == 0 || s.heads % s.kv_heads != 0) {
    TVM_FFI_THROW(ValueError) << kernel << ": q has " << s.heads << " heads and k has " << s.kv_heads
                              << ": the query heads must be a multiple of the KV heads";
  }
}

void check_out(const Sdpa& s, const TensorView& out, const char* kernel) {
  check_dim(out, kernel, "out", 0, s.batch, "B");
  check_dim(out, kernel, "out", 1, s.heads, "H");
  check_dim(out, kernel, "out", 2, s.sq, "Sq, the query length");
  check_dim(out, kernel, "out", 3, s.dv, "Dv, the last dim of v");
}

void sdpa(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView* mask, double scale,
          bool causal, const TensorView& out, const char* kernel) {
  Sdpa s{};
  s.q = f32_in(q, kernel, "q", 4, 4);
  s.k = f32_in(k, kernel, "k", 4, 4);
  s.v = f32_in(v, kernel, "v", 4, 4);
  s.out = f32_out(out, kernel, 4, 4);
  s.batch = q.size(0), s.heads = q.size(1), s.sq = q.size(2), s.d = q.size(3);
  s.kv_heads = k.size(1), s.sk = k.size(2), s.dv = v.size(3);
  s.kv_rows = s.sk;
  check_dim(k, kernel, "k", 0, s.batch, "B, as in q");
  check_heads(s, kernel);
  check_dim(k, kernel, "k", 3, s.d, "D, as in q");
  check_dim(v, kernel, "v", 0, s.batch, "B, as in q");
  check_dim(v, kernel, "v", 1, s.kv_heads, "Hkv, as in k");
  check_dim(v, kernel, "v", 2, s.sk, "Sk, as in k");
  check_out(s, out, kernel);
  for (int64_t n : {s.sq, s.sk, s.d, s.dv}) check_blas_int(n, kernel, "a dim of q, k or v");
  if (mask) {
    s.mask = f32_in(*mask, kernel, "mask", 0, 4);
    const int64_t full[4] = {s.batch, s.heads, s.sq, s.sk};
    int64_t stride = 1;
    for (int d = 3; d >= 0; --d) {
      const int md = d - (4 - mask->ndim());  // mask dims are right-aligned
      const int64_t size = md >= 0 ? mask->size(md) : 1;
      if (size != 1 && size != full[d]) {
        TVM_FFI_THROW(ValueError) << kernel << ": argument 'mask' has shape " << shape_str(*mask)
                                  << ", which does not broadcast to [B, H, Sq, Sk] = [" << full[0] << ", "
                                  << full[1] << ", " << full[2] << ", " << full[3] << "]";
      }
      s.mask_stride[d] = size == 1 ? 0 : stride;
      stride *= size;
    }
  }
  s.scale = static_cast<float>(scale);
  s.causal = causal;
  run_sdpa(s, out.numel());
}

void run_sdpa(const Sdpa& s, int64_t out_numel) {
  if (s.sq == 0 || s.dv == 0 || s.batch * s.heads == 0) return;
  if (s.sk == 0) {  // softmax over no keys
    std::fill(s.out, s.out + out_numel, std::numeric_limits<float>::quiet_NaN());
    return;
  }
  if (s.sq <= kSdpaRows) {  // each thread a range of heads, run by the runs that share a KV head
    const int64_t group = s.heads / s.kv_heads;
    return parallel([&](int task, int num_tasks) {
      int64_t t0, t1;
      split(s.batch * s.heads, 1, task, num_tasks, &t0, &t1);
      for (int64_t t = t0; t < t1;) {
        const int64_t b = t / s.heads, h = t % s.heads, h1 = std::min((h / group + 1) * group, t1 - b * s.heads);
        sdpa_rows(s, b, h, h1);
        t = b * s.heads + h1;
      }
    });
  }
  const int64_t qblocks = (s.sq + kQueryBlock - 1) / kQueryBlock;
  const int64_t tasks = s.batch * s.heads * qblocks;
  parallel([&](int task, int num_tasks) {
    int64_t t0, t1;
    split(tasks, 1, task, num_tasks, &t0, &t1);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t blk = t % qblocks, bh = t / qblocks;
      const int64_t i0 = blk * kQueryBlock, i1 = std::min(s.sq, i0 + kQueryBlock);
      sdpa_block(s, bh / s.heads, bh % s.heads, i0, i1);
    }
  });
}

// Checks sdpa_kv and sdpa_kv_int8 share: k and v [B, Hkv, L, D / Dv] against q; the caches
// k_cache [B, Hkv, C, D] and v_cache [B, Hkv, C, Dv] (named as the kernel names them); out; and
// positions pos..pos+L-1 within C. Fills s's shapes; returns pos.
int64_t check_kv(Sdpa& s, const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& k_cache,
                 const TensorView& v_cache, const char* kc_name, const char* vc_name, const TensorView& pos,
                 const TensorView& out, const char* kernel) {
  const int64_t* p = data_of<const int64_t>(pos, kernel, "pos", kDLInt, 64, 1, 1);
  s.batch = q.size(0), s.heads = q.size(1), s.sq = q.size(2), s.d = q.size(3);
  s.kv_heads = k.size(1), s.dv = v.size(3), s.kv_rows = k_cache.size(2);
  const int64_t len = k.size(2);
  check_heads(s, kernel);
  check_dim(k, kernel, "k", 0, s.batch, "B, as in q");
  check_dim(k, kernel, "k", 2, s.sq, "L, the query length");
  check_dim(k, kernel, "k", 3, s.d, "D, as in q");
  for (const TensorView* t : {&v, &k_cache, &v_cache}) {
    const char* name = t == &v ? "v" : t == &k_cache ? kc_name : vc_name;
    check_dim(*t, kernel, name, 0, s.batch, "B, as in q");
    check_dim(*t, kernel, name, 1, s.kv_heads, "Hkv, as in k");
  }
  check_dim(v, kernel, "v", 2, len, "L, as in k");
  check_dim(k_cache, kernel, kc_name, 3, s.d, "D, as in q");
  check_dim(v_cache, kernel, vc_name, 2, s.kv_rows, "C, as in k_cache");
  check_dim(v_cache, kernel, vc_name, 3, s.dv, "Dv, as in v");
  check_out(s, out, kernel);
  const int64_t p0 = p[0];
  if (p0 < 0 || p0 + len > s.kv_rows) {
    TVM_FFI_THROW(ValueError) << kernel << ": positions " << p0 << ".." << p0 + len - 1
                              << " do not fit the KV cache of " << s.kv_rows << " positions";
  }
  return p0;
}

// sdpa_kv: write the new keys/values into the caches at rows pos..pos+L-1, then causal attention of
// the L queries over cache rows 0..pos+L-1 (tcc::sdpa_kv). The caches are the Relax function's
// inputs, held by the runtime between calls; this kernel is their only writer.
void sdpa_kv(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& k_cache,
             const TensorView& v_cache, const TensorView& pos, double scale, int64_t window, double softcap,
             const TensorView& out) {
  const char* kernel = "tcc_sdpa_kv_f32";
  Sdpa s{};
  s.q = f32_in(q, kernel, "q", 4, 4);
  const float* kn = f32_in(k, kernel, "k", 4, 4);
  const float* vn = f32_in(v, kernel, "v", 4, 4);
  float* kc = const_cast<float*>(f32_in(k_cache, kernel, "k_cache", 4, 4));
  float* vc = const_cast<float*>(f32_in(v_cache, kernel, "v_cache", 4, 4));
  s.out = f32_out(out, kernel, 4, 4);
  const int64_t p0 = check_kv(s, q, k, v, k_cache, v_cache, "k_cache", "v_cache", pos, out, kernel), len = s.sq;
  for (int64_t bh = 0; bh < s.batch * s.kv_heads; ++bh) {
    std::memcpy(kc + (bh * s.kv_rows + p0) * s.d, kn + bh * len * s.d, sizeof(float) * len * s.d);
    std::memcpy(vc + (bh * s.kv_rows + p0) * s.dv, vn + bh * len * s.dv, sizeof(float) * len * s.dv);
  }
  s.k = kc, s.v = vc, s.sk = p0 + len;
  for (int64_t n : {s.sq, s.sk, s.d, s.dv}) check_blas_int(n, kernel, "a dim of q or the cache");
  s.scale = static_cast<float>(scale);
  s.causal = true;
  s.window = window;
  s.softcap = static_cast<float>(softcap);
  run_sdpa(s, out.numel());
}

// sdpa_kv_int8: the caches hold int8 codes [B, Hkv, C, D] and one float32 scale per row [B, Hkv, C]
// (tcc::sdpa_kv_int8). The new rows are quantized as tcc/ops.py quantize_kv does (s = max|x| / 127,
// 1 for an all-zero row; codes = clamp(round(x / s), -127, 127), round half to even); attention reads
// every row as codes * scale, so a step reads one byte per cached value (plus a scale per row).
// Decode (at most kDirectRows query rows): sdpa_int8_decode. Longer chunks dequantize the rows a
// block of queries sees into per-thread buffers and run sdpa_block on them (BLAS), one task per
// (batch, KV head, block of 64 query rows) for all the query heads that share that KV head.
struct KvInt8 {
  const int8_t *kc, *vc;
  const float *ks, *vs;
};

constexpr int64_t kDirectRows = 4;

void quantize_kv_rows(const float* x, int64_t rows, int64_t d, int8_t* codes, float* scales) {
  for (int64_t r = 0; r < rows; ++r, x += d, codes += d) {
    float amax = 0.0f;
#pragma omp simd reduction(max : amax)
    for (int64_t i = 0; i < d; ++i) amax = std::max(amax, std::fabs(x[i]));
    float s = amax / 127.0f;
    s = s > 0.0f ? s : 1.0f;
    for (int64_t i = 0; i < d; ++i) {
      const float v = std::clamp(x[i] / s, -127.0f, 127.0f);
      codes[i] = static_cast<int8_t>(std::nearbyint(v));  // default rounding: half to even
    }
    scales[r] = s;
  }
}

// Decode (L <= kDirectRows): the G * L query rows of one KV head's group are contiguous in q and
// out ([G * L, D]). Three parallel passes over a shared scores buffer [B * H * L, Sk]:
//   1. per (batch, KV head, tile of kKeyTile keys): the tile's keys dequantized into a per-thread
//      buffer (L1/L2), scores = scale * q k^T by one sgemm for all the group's rows;
//   2. per query row: soft cap, the causal / sliding-window range, softmax;
//   3. per (batch, KV head, kValueCols output columns): out += p_j * v_scale_j * codes_j over the
//      visible keys, each code converted once for all the group's rows.
constexpr int64_t kKeyTile = 256;
constexpr int64_t kValueCols = 16;

void sdpa_int8_decode(const Sdpa& s, const KvInt8& c) {
  const int64_t group = s.heads / s.kv_heads, rows = group * s.sq, sk = s.sk;
  const int64_t tiles = (sk + kKeyTile - 1) / kKeyTile, bkv = s.batch * s.kv_heads;
  std::vector<float> scores(static_cast<size_t>(bkv * rows * sk));
  parallel([&](int task, int num_tasks) {  // 1. scores
    int64_t t0, t1;
    split(bkv * tiles, 1, task, num_tasks, &t0, &t1);
    float* k = scratch<float, 1>(kKeyTile * s.d);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t g = t / tiles, j0 = t % tiles * kKeyTile, n = std::min(kKeyTile, sk - j0);
      const int64_t kvh = g * s.kv_rows + j0;
      for (int64_t j = 0; j < n; ++j) {
        const float ks = c.ks[kvh + j];
        const int8_t* kj = c.kc + (kvh + j) * s.d;
#pragma omp simd
        for (int64_t e = 0; e < s.d; ++e) k[j * s.d + e] = static_cast<float>(kj[e]) * ks;
      }
      sgemm_nt(rows, n, s.d, s.scale, s.q + g * rows * s.d, s.d, k, s.d, 0.0f, scores.data() + g * rows * sk + j0, sk);
    }
  });
  parallel([&](int task, int num_tasks) {  // 2. softmax over each row's visible keys
    int64_t r0, r1;
    split(bkv * rows, 1, task, num_tasks, &r0, &r1);
    for (int64_t r = r0; r < r1; ++r) {
      float* row = scores.data() + r * sk;
      const int64_t t = r % s.sq + sk - s.sq;  // the query's absolute position: it sees rows j0..t
      const int64_t j0 = s.window > 0 ? std::max<int64_t>(0, t - s.window + 1) : 0;
      if (s.softcap > 0.0f) {
        for (int64_t j = j0; j <= t; ++j) row[j] = s.softcap * std::tanh(row[j] / s.softcap);
      }
      std::fill(row, row + j0, 0.0f);
      std::fill(row + t + 1, row + sk, 0.0f);
      softmax_row(row + j0, t + 1 - j0);
    }
  });
  const int64_t chunks = (s.dv + kValueCols - 1) / kValueCols;
  parallel([&](int task, int num_tasks) {  // 3. out = p v
    int64_t t0, t1;
    split(bkv * chunks, 1, task, num_tasks, &t0, &t1);
    float* acc = scratch<float, 1>(rows * kValueCols);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t g = t / chunks, e0 = t % chunks * kValueCols, w = std::min(kValueCols, s.dv - e0);
      const float* p = scores.data() + g * rows * sk;
      std::fill(acc, acc + rows * kValueCols, 0.0f);
      for (int64_t j = 0; j < sk; ++j) {
        const int8_t* vj = c.vc + (g * s.kv_rows + j) * s.dv + e0;
        const float vs = c.vs[g * s.kv_rows + j];
        float v[kValueCols] = {};
        for (int64_t e = 0; e < w; ++e) v[e] = static_cast<float>(vj[e]) * vs;
        for (int64_t r = 0; r < rows; ++r) {
          const float pr = p[r * sk + j];
          if (pr == 0.0f) continue;  // outside the row's causal / window range
          float* a = acc + r * kValueCols;
#pragma omp simd
          for (int64_t e = 0; e < kValueCols; ++e) a[e] += pr * v[e];
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        std::copy(acc + r * kValueCols, acc + r * kValueCols + w, s.out + (g * rows + r) * s.dv + e0);
      }
    }
  });
}

// Query rows [i0, i1) of every query head over KV head hkv (batch b): the rows they see dequantized,
// then sdpa_block per head on a one-KV-head view.
void sdpa_int8_block(const Sdpa& s, const KvInt8& c, int64_t b, int64_t hkv, int64_t i0, int64_t i1) {
  const int64_t group = s.heads / s.kv_heads, kvh = (b * s.kv_heads + hkv) * s.kv_rows;
  const int64_t cols = std::clamp<int64_t>(i1 + s.sk - s.sq, 0, s.sk);
  float* k = scratch<float, 1>(std::max<int64_t>(cols * s.d, 1));
  float* v = scratch<float, 2>(std::max<int64_t>(cols * s.dv, 1));
  for (int64_t j = 0; j < cols; ++j) {
    const float ks = c.ks[kvh + j], vs = c.vs[kvh + j];
    const int8_t *kj = c.kc + (kvh + j) * s.d, *vj = c.vc + (kvh + j) * s.dv;
#pragma omp simd
    for (int64_t e = 0; e < s.d; ++e) k[j * s.d + e] = static_cast<float>(kj[e]) * ks;
#pragma omp simd
    for (int64_t e = 0; e < s.dv; ++e) v[j * s.dv + e] = static_cast<float>(vj[e]) * vs;
  }
  Sdpa one = s;  // batch 1, the group's query heads over one KV head of `cols` rows
  one.batch = 1, one.heads = group, one.kv_heads = 1, one.kv_rows = cols;
  one.q = s.q + (b * s.heads + hkv * group) * s.sq * s.d;
  one.out = s.out + (b * s.heads + hkv * group) * s.sq * s.dv;
  one.k = k, one.v = v;
  for (int64_t g = 0; g < group; ++g) sdpa_block(one, 0, g, i0, i1);
}

void sdpa_kv_int8(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& k_codes,
                  const TensorView& k_scales, const TensorView& v_codes, const TensorView& v_scales,
                  const TensorView& pos, double scale, int64_t window, double softcap, const TensorView& out) {
  const char* kernel = "tcc_sdpa_kv_i8_f32";
  Sdpa s{};
  KvInt8 c{};
  s.q = f32_in(q, kernel, "q", 4, 4);
  const float* kn = f32_in(k, kernel, "k", 4, 4);
  const float* vn = f32_in(v, kernel, "v", 4, 4);
  int8_t* kc = const_cast<int8_t*>(data_of<const int8_t>(k_codes, kernel, "k_codes", kDLInt, 8, 4, 4));
  int8_t* vc = const_cast<int8_t*>(data_of<const int8_t>(v_codes, kernel, "v_codes", kDLInt, 8, 4, 4));
  float* ks = const_cast<float*>(f32_in(k_scales, kernel, "k_scales", 3, 3));
  float* vs = const_cast<float*>(f32_in(v_scales, kernel, "v_scales", 3, 3));
  s.out = f32_out(out, kernel, 4, 4);
  const int64_t p0 = check_kv(s, q, k, v, k_codes, v_codes, "k_codes", "v_codes", pos, out, kernel), len = s.sq;
  for (const TensorView* t : {&k_scales, &v_scales}) {
    const char* name = t == &k_scales ? "k_scales" : "v_scales";
    check_dim(*t, kernel, name, 0, s.batch, "B, as in q");
    check_dim(*t, kernel, name, 1, s.kv_heads, "Hkv, as in k");
    check_dim(*t, kernel, name, 2, s.kv_rows, "C, as in k_codes");
  }
  for (int64_t bh = 0; bh < s.batch * s.kv_heads; ++bh) {
    const int64_t row = bh * s.kv_rows + p0;
    quantize_kv_rows(kn + bh * len * s.d, len, s.d, kc + row * s.d, ks + row);
    quantize_kv_rows(vn + bh * len * s.dv, len, s.dv, vc + row * s.dv, vs + row);
  }
  c.kc = kc, c.vc = vc, c.ks = ks, c.vs = vs;
  s.sk = p0 + len;
  for (int64_t n : {s.sq, s.sk, s.d, s.dv}) check_blas_int(n, kernel, "a dim of q or the cache");
  s.scale = static_cast<float>(scale);
  s.causal = true;
  s.window = window;
  s.softcap = static_cast<float>(softcap);
  if (s.sq == 0 || s.dv == 0 || s.batch * s.heads == 0) return;
  if (s.sq <= kDirectRows) {
    sdpa_int8_decode(s, c);
    return;
  }
  const int64_t qblocks = (s.sq + kQueryBlock - 1) / kQueryBlock;
  parallel([&](int task, int num_tasks) {
    int64_t t0, t1;
    split(s.batch * s.kv_heads * qblocks, 1, task, num_tasks, &t0, &t1);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t blk = t % qblocks, bkv = t / qblocks, i0 = blk * kQueryBlock;
      sdpa_int8_block(s, c, bkv / s.kv_heads, bkv % s.kv_heads, i0, std::min(s.sq, i0 + kQueryBlock));
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Exported kernels
// ---------------------------------------------------------------------------------------------

void dense_f32(TensorView x, TensorView w, TensorView b, TensorView out) {
  dense(x, w, &b, out, "tcc_dense_f32");
}

void dense_nobias_f32(TensorView x, TensorView w, TensorView out) {
  dense(x, w, nullptr, out, "tcc_dense_nobias_f32");
}

void dense_w8_f32(TensorView x, TensorView qw, TensorView scale, TensorView b, TensorView out) {
  dense_w8(x, qw, scale, &b, out, "tcc_dense_w8_f32");
}

void dense_w8_nobias_f32(TensorView x, TensorView qw, TensorView scale, TensorView out) {
  dense_w8(x, qw, scale, nullptr, out, "tcc_dense_w8_nobias_f32");
}

void sdpa_f32(TensorView q, TensorView k, TensorView v, TensorView mask, double scale, bool causal,
              TensorView out) {
  sdpa(q, k, v, &mask, scale, causal, out, "tcc_sdpa_f32");
}

void sdpa_nomask_f32(TensorView q, TensorView k, TensorView v, double scale, bool causal, TensorView out) {
  sdpa(q, k, v, nullptr, scale, causal, out, "tcc_sdpa_nomask_f32");
}

void sdpa_kv_f32(TensorView q, TensorView k, TensorView v, TensorView k_cache, TensorView v_cache, TensorView pos,
                 double scale, int64_t window, double softcap, TensorView out) {
  sdpa_kv(q, k, v, k_cache, v_cache, pos, scale, window, softcap, out);
}

void sdpa_kv_i8_f32(TensorView q, TensorView k, TensorView v, TensorView k_codes, TensorView k_scales,
                    TensorView v_codes, TensorView v_scales, TensorView pos, double scale, int64_t window,
                    double softcap, TensorView out) {
  sdpa_kv_int8(q, k, v, k_codes, k_scales, v_codes, v_scales, pos, scale, window, softcap, out);
}

}  // namespace

TVM_FFI_DLL_EXPORT_TYPED_FUNC(tcc_dense_f32, dense_f32);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(tcc_dense_nobias_f32, dense_nobias_f32);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(tcc_dense_w8_f32, dense_w8_f32);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(tcc_dense_w8_nobias_f32, dense_w8_nobias_f32);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(tcc_sdpa_f32, sdpa_f32);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(tcc_sdpa_nomask_f32, sdpa_nomask_f32);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(tcc_sdpa_kv_f32, sdpa_kv_f32);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(tcc_sdpa_kv_i8_f32, sdpa_kv_i8_f32);
