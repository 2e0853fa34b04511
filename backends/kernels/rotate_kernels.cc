// tcc's online-rotation kernel: the fast Walsh-Hadamard transform that rotate(online=...) puts before
// a down projection (tcc/compress/rotation.py), called from TVM modules like cpu_kernels.cc (x86-64
// and aarch64).
//
//   tcc_fwht_f32(x[..., K], int64 block, out[..., K])
//     out = each `block` consecutive features of each row of x times H_block, the normalised
//     Sylvester Walsh-Hadamard matrix (symmetric, H H = I): the same function as the Program's
//     x.view(..., K / block, block) @ H_block, in log2(block) butterfly stages (block log2(block)
//     additions per block instead of block^2 multiply-adds).
//
// Numerics: bit-exact with tcc/compress/rotation.py fwht (the reference the kernel matches): the
// butterflies run in its order (stride h = 1, 2, 4, ...; a + b and a - b in float32), then one
// float32 multiply by block^-1/2 rounded to float32. Against the matmul by H the difference is float32
// rounding (tests/test_rotate_kernel.py).
// block: a power of two dividing K (a ValueError otherwise). Stages with h below the vector width
// permute lanes in registers (GCC vector extensions: zmm, ymm, or NEON q); the rest add and subtract
// whole vectors. Threads: TVM's pool (common.h `parallel`) splits the row blocks; up to 16384
// elements (a decode step's rows) the calling thread runs alone.
#include "common.h"

#include <cmath>
#include <utility>

namespace {

constexpr int kFwhtLanes = kVecLanes;  // common.h
constexpr int64_t kFwhtSerial = 16384;  // elements up to which the calling thread does it alone
typedef float fv __attribute__((vector_size(kFwhtLanes * 4)));
typedef float fv_u __attribute__((vector_size(kFwhtLanes * 4), aligned(1), may_alias));
typedef int32_t iv __attribute__((vector_size(kFwhtLanes * 4)));

// One stage of stride H < kFwhtLanes inside a vector: lane i with bit H clear gets v[i] + v[i + H],
// with it set v[i - H] - v[i] (the reference's a + b and a - b; the sign multiply is exact).
template <int H, int... I>
inline fv stage_in_register(fv v, std::integer_sequence<int, I...>) {
  const fv p = __builtin_shuffle(v, iv{(I ^ H)...});
  return p + v * fv{((I & H) ? -1.0f : 1.0f)...};
}

template <int H = 1>
inline fv stages_in_register(fv v) {
  if constexpr (H < kFwhtLanes) {
    return stages_in_register<2 * H>(stage_in_register<H>(v, std::make_integer_sequence<int, kFwhtLanes>{}));
  } else {
    return v;
  }
}

// out[0:n] = fwht(x[0:n]) for one block of n = 2^j floats.
void fwht_block(const float* x, float* out, int64_t n, float scale) {
  if (n < kFwhtLanes) {  // short blocks: scalar butterflies
    std::memcpy(out, x, n * sizeof(float));
    for (int64_t h = 1; h < n; h *= 2)
      for (int64_t j = 0; j < n; j += 2 * h)
        for (int64_t i = j; i < j + h; ++i) {
          const float a = out[i], b = out[i + h];
          out[i] = a + b, out[i + h] = a - b;
        }
    for (int64_t i = 0; i < n; ++i) out[i] *= scale;
    return;
  }
  for (int64_t i = 0; i < n; i += kFwhtLanes) {
    *reinterpret_cast<fv_u*>(out + i) = stages_in_register(*reinterpret_cast<const fv_u*>(x + i));
  }
  for (int64_t h = kFwhtLanes; h < n; h *= 2)
    for (int64_t j = 0; j < n; j += 2 * h)
      for (int64_t i = j; i < j + h; i += kFwhtLanes) {
        const fv a = *reinterpret_cast<fv_u*>(out + i), b = *reinterpret_cast<fv_u*>(out + i + h);
        *reinterpret_cast<fv_u*>(out + i) = a + b;
        *reinterpret_cast<fv_u*>(out + i + h) = a - b;
      }
  for (int64_t i = 0; i < n; i += kFwhtLanes) *reinterpret_cast<fv_u*>(out + i) *= scale;
}

void fwht_f32(TensorView x, int64_t block, TensorView out) {
  const char* kernel = "tcc_fwht_f32";
  const float* xp = f32_in(x, kernel, "x", 1, 64);
  float* op = f32_out(out, kernel, x.ndim(), x.ndim());
  for (int d = 0; d < x.ndim(); ++d) check_dim(out, kernel, "out", d, x.size(d), "the shape of x");
  const int64_t k = x.size(-1);
  if (block < 1 || (block & (block - 1)) || (k > 0 && k % block)) {
    TVM_FFI_THROW(ValueError) << kernel << ": block " << block << " must be a power of two dividing K = " << k;
  }
  const int64_t blocks = k ? x.numel() / block : 0;
  const float scale = static_cast<float>(std::pow(static_cast<double>(block), -0.5));  // Python's block ** -0.5
  if (blocks == 0) return;
  if (x.numel() <= kFwhtSerial) {  // a decode step's row: a thread launch would cost more than the transform
    for (int64_t b = 0; b < blocks; ++b) fwht_block(xp + b * block, op + b * block, block, scale);
    return;
  }
  parallel([&](int task, int num_tasks) {
    int64_t b0, b1;
    split(blocks, 1, task, num_tasks, &b0, &b1);
    for (int64_t b = b0; b < b1; ++b) fwht_block(xp + b * block, op + b * block, block, scale);
  });
}

}  // namespace

TVM_FFI_DLL_EXPORT_TYPED_FUNC(tcc_fwht_f32, fwht_f32);
