// tcc's bf16-weight CPU kernels: dense with bfloat16 weights and float32 activations, outputs and
// accumulation (tcc::dense_bf16), and the bf16 embedding gather (tcc::embedding_bf16), called from
// TVM modules like cpu_kernels.cc (x86-64 and aarch64).
//
// Contract: each kernel computes the reference op of tcc/ops.py on row-major contiguous CPU tensors
// and writes its result into the last argument (destination-passing style, as R.call_dps_packed
// calls it). The weights are the bf16 bit patterns as int16 (numpy and TVM's runtime have no
// bfloat16 of their own), unpacked [N, K] as the artifact stores them; every argument's dtype, rank
// and shape is checked, and a mismatch raises a ValueError/TypeError naming the kernel and argument.
//
//   tcc_dense_bf16_f32(x[..., K], w int16 [N, K], b[N], out[..., N])
//   tcc_dense_bf16_nobias_f32(x, w, out)
//   tcc_embedding_bf16_f32(ids int64 [...], w int16 [V, D], out[..., D])   ids clipped to 0..V-1
//
// dense_bf16 has two paths:
//   M <= kDirectRows (decode, small batches: memory-bound, the weights stream from memory once, at
//   half fp32's bytes): one weight row at a time, front to back, for all M activation rows (`direct`).
//     AVX-512 BF16 (__AVX512BF16__, -march with avx512bf16): vdpbf16ps, 32 k per instruction. The
//       activations are split once per call into hi = bf16(x) and lo = bf16(x - hi) and both halves
//       are multiplied (acc += hi w + lo w; bf16 x bf16 products are exact in fp32), so x is carried
//       to 2^-16 of its magnitude instead of bf16's 2^-8: the reference does not round x.
//     otherwise (AVX2/FMA, AVX-512 without BF16, SSE2, NEON, scalar): each bf16 weight widens to
//       fp32 by a 16-bit shift (exact) and FMAs into fp32 accumulators at the register width.
//   M > kDirectRows (prefill): blocks of weight rows widened to fp32 into a per-thread buffer
//     (~512 KiB) and OpenBLAS sgemm, exactly the reference's products.
// The -march flags choose the path at compile time; the object carries "tcc_bf16_path=<path>;"
// (avx512bf16 or fp32-fma). Error vs the reference: fp32 summation order, plus at most 2^-16 of
// sum_k |x_k w_k| for the hi/lo split (tests/test_bf16.py states the bound it checks).
//
// Threads: TVM's pool (common.h `parallel`): the rows of W (N) split in units of 16; the sgemm
// path splits M instead when M > N.
#include "common.h"

#include <cstring>

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define TCC_BF16_DPBF16 1
#define TCC_BF16_PATH "avx512bf16"
#else
#define TCC_BF16_PATH "fp32-fma"
#endif

#if defined(__x86_64__)
#include <immintrin.h>
#elif defined(__aarch64__)
#include <arm_neon.h>
#endif

// The chosen path, as a string in the object (tests and people read it with `strings`).
[[gnu::used]] static const char kBf16PathTag[] = "tcc_bf16_path=" TCC_BF16_PATH ";";

namespace {

constexpr int64_t kDirectRows = 4;  // the fused loop up to this many rows of x, sgemm above
constexpr int64_t kGrain = 16;      // rows of W per unit of work

#define UNROLL _Pragma("GCC unroll 64")

inline float bf16_to_f32(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// float32 -> bf16, round to nearest even (x finite).
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// fp32 vectors at the register width (GCC vector extensions), bf16 widened by a shift per ISA.
#if defined(__AVX512F__)
constexpr int kLanes = 16, kRegs = 32;
#elif defined(__AVX2__)
constexpr int kLanes = 8, kRegs = 16;
#elif defined(__aarch64__)
constexpr int kLanes = 4, kRegs = 32;
#else
constexpr int kLanes = 4, kRegs = 16;
#endif
typedef float vf __attribute__((vector_size(kLanes * 4)));
typedef float vf_u __attribute__((vector_size(kLanes * 4), aligned(1), may_alias));

// kLanes bf16 values at p as fp32.
inline vf widen(const uint16_t* p) {
#if defined(__AVX512F__)
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return (vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
#elif defined(__AVX2__)
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return (vf)_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16);
#elif defined(__aarch64__)
  return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16));
#elif defined(__SSE2__)
  const __m128i h = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return (vf)_mm_unpacklo_epi16(_mm_setzero_si128(), h);
#else
  vf r;
  for (int i = 0; i < kLanes; ++i) r[i] = bf16_to_f32(p[i]);
  return r;
#endif
}

// a * b + c
inline vf fmadd(vf a, vf b, vf c) {
#if defined(__AVX512F__)
  return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__AVX2__) && defined(__FMA__)
  return (vf)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#elif defined(__aarch64__)
  return vfmaq_f32(c, a, b);
#else
  return a * b + c;
#endif
}

inline float hsum(vf v) {
  float s = 0.0f;
  UNROLL for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

struct Dense {
  int64_t m, n, k;
  const float* x;
  const uint16_t* w;
  const float* b;
  float* out;
  const uint16_t* xh;  // AVX-512 BF16: x split into bf16 hi and lo halves, [M][kp], zero padded
  const uint16_t* xl;
  int64_t kp;
};

inline void store(const Dense& p, int64_t row, int64_t col, float s) {
  p.out[row * p.n + col] = s + (p.b ? p.b[col] : 0.0f);
}

// One weight row at a time, front to back, for all MR rows of x: a decode step then reads W as one
// stream, which the hardware prefetcher follows and a software prefetch (common.h kPrefetchAhead)
// keeps in flight. Blocks of 4 weight rows read at once (4 streams a row apart, restarting every row
// block) streamed 28-40 GB/s on the 2-core Zen 5 EPYC where the a8w8 GEMV streamed 43-52 in the same
// process; this loop streams 40-85, about as fast as a8w8 (benchmarks/gemv_ab.py, docs/BENCHMARKS.md
// session 16). Each x row sums over k in kAccs interleaved accumulators (vector u of each step of
// kAccs vectors into accumulator u, a partial vector into accumulator 0), the same order for every
// MR: a speculative verify's row equals the decode step's bit for bit.
#if defined(TCC_BF16_DPBF16)
constexpr int64_t kStep = 32;  // k per vector
constexpr int kAccs = 4;
typedef __m512 Acc;
typedef __m512i WVec;
inline WVec load_w(const uint16_t* w, int64_t k, int64_t k_end) {  // zero past k_end
  const __mmask32 mask = k_end - k >= 32 ? ~__mmask32(0) : (__mmask32(1) << (k_end - k)) - 1;
  return _mm512_maskz_loadu_epi16(mask, w + k);
}
// acc + x[r, k:k+32] . w, with x as its hi and lo bf16 halves (zero-padded to kp)
inline Acc madd(const Dense& p, int r, int64_t k, WVec w, Acc acc) {
  acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(p.xh + r * p.kp + k), (__m512bh)w);
  return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(p.xl + r * p.kp + k), (__m512bh)w);
}
constexpr bool kMaskedTail = true;  // the last partial vector too (masked), no scalar tail
#else
// bf16 widened to fp32, FMA; the k past the last full vector in scalar
constexpr int64_t kStep = kLanes;
constexpr int kAccs = kRegs >= 32 ? 4 : 2;  // MR x kAccs accumulators, a weight vector and x fit the registers
typedef vf Acc;
typedef vf WVec;
inline WVec load_w(const uint16_t* w, int64_t k, int64_t) { return widen(w + k); }
inline Acc madd(const Dense& p, int r, int64_t k, WVec w, Acc acc) {
  return fmadd(*reinterpret_cast<const vf_u*>(p.x + r * p.k + k), w, acc);
}
constexpr bool kMaskedTail = false;
#endif

// out[0:MR, c] (+ b).
template <int MR>
void direct(const Dense& p, int64_t c) {
  const uint16_t* w = p.w + c * p.k;
  Acc acc[MR][kAccs];
  UNROLL for (int r = 0; r < MR; ++r) UNROLL for (int u = 0; u < kAccs; ++u) acc[r][u] = Acc{};
  const int64_t full = kMaskedTail ? p.k : p.k / kStep * kStep;  // the k the vector loop covers
  int64_t k = 0;
  for (; k + kAccs * kStep <= full; k += kAccs * kStep) {
    for (int64_t b = 0; b < kAccs * kStep * 2; b += 64)
      __builtin_prefetch(reinterpret_cast<const char*>(w + k) + kPrefetchAhead + b, 0, 3);
    UNROLL for (int u = 0; u < kAccs; ++u) {
      const WVec wv = load_w(w, k + u * kStep, p.k);
      UNROLL for (int r = 0; r < MR; ++r) acc[r][u] = madd(p, r, k + u * kStep, wv, acc[r][u]);
    }
  }
  for (; k < full; k += kStep) {
    const WVec wv = load_w(w, k, p.k);
    UNROLL for (int r = 0; r < MR; ++r) acc[r][0] = madd(p, r, k, wv, acc[r][0]);
  }
  UNROLL for (int r = 0; r < MR; ++r) {
    Acc t = acc[r][0];
    UNROLL for (int u = 1; u < kAccs; ++u) t = t + acc[r][u];
    float s = hsum((vf)t);
    // the scalar tail's products round to float32 before each add (exact in double): no FMA
    // contraction, which the compiler may apply in one instantiation and not in another
    for (int64_t j = full; j < p.k; ++j)
      s += static_cast<float>(static_cast<double>(p.x[r * p.k + j]) * static_cast<double>(bf16_to_f32(w[j])));
    store(p, r, c, s);
  }
}

template <int MR>
void direct_rows(const Dense& p, int64_t n0, int64_t n1) {
  for (int64_t c = n0; c < n1; ++c) direct<MR>(p, c);
}

// out[m0:m1, c0:c1] += x W[c0:c1]^T: the rows c0..c1 of W widened into buf [c1 - c0][K], then sgemm.
void sgemm_block(const Dense& p, int64_t m0, int64_t m1, int64_t c0, int64_t c1, float* buf) {
  const int64_t kv = p.k / kLanes * kLanes;
  for (int64_t c = c0; c < c1; ++c) {
    const uint16_t* w = p.w + c * p.k;
    float* dst = buf + (c - c0) * p.k;
    for (int64_t k = 0; k < kv; k += kLanes) *reinterpret_cast<vf_u*>(dst + k) = widen(w + k);
    for (int64_t k = kv; k < p.k; ++k) dst[k] = bf16_to_f32(w[k]);
  }
  sgemm_nt(m1 - m0, c1 - c0, p.k, 1.0f, p.x + m0 * p.k, p.k, buf, p.k, 1.0f, p.out + m0 * p.n + c0, p.n);
}

void dense_run(Dense& p) {
  if (p.m == 0 || p.n == 0) return;
  const bool direct_path = p.m <= kDirectRows && p.k > 0;
#if defined(TCC_BF16_DPBF16)
  if (direct_path) {  // the hi and lo halves of x, once per call
    p.kp = (p.k + 31) / 32 * 32;
    uint16_t* xh = scratch<uint16_t, 0>(2 * p.m * p.kp);
    uint16_t* xl = xh + p.m * p.kp;
    for (int64_t r = 0; r < p.m; ++r)
      for (int64_t k = 0; k < p.kp; ++k) {
        const float v = k < p.k ? p.x[r * p.k + k] : 0.0f;
        const uint16_t h = f32_to_bf16(v);
        xh[r * p.kp + k] = h;
        xl[r * p.kp + k] = f32_to_bf16(v - bf16_to_f32(h));
      }
    p.xh = xh, p.xl = xl;
  }
#endif
  parallel([&](int task, int num_tasks) {
    int64_t m0 = 0, m1 = p.m, n0 = 0, n1 = p.n;
    if (direct_path || p.n >= p.m) split(p.n, kGrain, task, num_tasks, &n0, &n1);
    else split(p.m, kGrain, task, num_tasks, &m0, &m1);
    if (m0 >= m1 || n0 >= n1) return;
    if (p.k == 0) return fill_bias(p.out, p.b, p.n, m0, m1, n0, n1);
    if (direct_path) {
      switch (p.m) {
        case 1: return direct_rows<1>(p, n0, n1);
        case 2: return direct_rows<2>(p, n0, n1);
        case 3: return direct_rows<3>(p, n0, n1);
        default: return direct_rows<4>(p, n0, n1);
      }
    }
    fill_bias(p.out, p.b, p.n, m0, m1, n0, n1);
    const int64_t block = std::max<int64_t>(kGrain, 512 * 1024 / 4 / p.k / kGrain * kGrain);
    float* buf = scratch<float, 1>(p.k * block);
    for (int64_t c0 = n0; c0 < n1; c0 += block) sgemm_block(p, m0, m1, c0, std::min(n1, c0 + block), buf);
  });
}

void dense_bf16(const TensorView& x, const TensorView& w, const TensorView* b, const TensorView& out,
                const char* kernel) {
  Dense p{};
  p.x = f32_in(x, kernel, "x", 1, 64);
  p.w = data_of<const uint16_t>(w, kernel, "w", kDLInt, 16, 2, 2);
  p.out = f32_out(out, kernel, x.ndim(), x.ndim());
  p.k = x.size(-1), p.n = out.size(-1);
  p.m = p.k ? x.numel() / p.k : out.numel() / std::max<int64_t>(p.n, 1);
  for (int d = 0; d + 1 < x.ndim(); ++d) check_dim(out, kernel, "out", d, x.size(d), "the leading dims of x");
  const std::string n = "N = " + std::to_string(p.n) + ", the last dim of out";
  check_dim(w, kernel, "w", 0, p.n, n.c_str());
  check_dim(w, kernel, "w", 1, p.k, ("K = " + std::to_string(p.k) + ", the last dim of x").c_str());
  if (b) {
    p.b = f32_in(*b, kernel, "b", 1, 1);
    check_dim(*b, kernel, "b", 0, p.n, n.c_str());
  }
  check_blas_int(p.m, kernel, "M");
  check_blas_int(p.k, kernel, "K");
  check_blas_int(p.n, kernel, "N");
  dense_run(p);
}

void embedding_bf16(const TensorView& ids, const TensorView& w, const TensorView& out, const char* kernel) {
  const int64_t* id = data_of<const int64_t>(ids, kernel, "ids", kDLInt, 64, 0, 63);
  const uint16_t* table = data_of<const uint16_t>(w, kernel, "w", kDLInt, 16, 2, 2);
  float* o = f32_out(out, kernel, ids.ndim() + 1, ids.ndim() + 1);
  const int64_t v = w.size(0), d = w.size(1), count = ids.numel();
  for (int i = 0; i < ids.ndim(); ++i) check_dim(out, kernel, "out", i, ids.size(i), "the dims of ids");
  check_dim(out, kernel, "out", ids.ndim(), d, "D, the last dim of w");
  if (v == 0 && count > 0) TVM_FFI_THROW(ValueError) << kernel << ": the table 'w' has no rows";
  for (int64_t i = 0; i < count; ++i) {
    const int64_t row = std::min(std::max<int64_t>(id[i], 0), v - 1);  // as R.take(mode="clip")
    const uint16_t* src = table + row * d;
    float* dst = o + i * d;
    for (int64_t j = 0; j < d; ++j) dst[j] = bf16_to_f32(src[j]);
  }
}

// ---------------------------------------------------------------------------------------------
// Exported kernels
// ---------------------------------------------------------------------------------------------

void dense_bf16_f32(TensorView x, TensorView w, TensorView b, TensorView out) {
  dense_bf16(x, w, &b, out, "tcc_dense_bf16_f32");
}

void dense_bf16_nobias_f32(TensorView x, TensorView w, TensorView out) {
  dense_bf16(x, w, nullptr, out, "tcc_dense_bf16_nobias_f32");
}

void embedding_bf16_f32(TensorView ids, TensorView w, TensorView out) {
  embedding_bf16(ids, w, out, "tcc_embedding_bf16_f32");
}

}  // namespace

TVM_FFI_DLL_EXPORT_TYPED_FUNC(tcc_dense_bf16_f32, dense_bf16_f32);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(tcc_dense_bf16_nobias_f32, dense_bf16_nobias_f32);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(tcc_embedding_bf16_f32, embedding_bf16_f32);
