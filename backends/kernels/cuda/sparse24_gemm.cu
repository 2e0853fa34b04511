// tcc's 2:4 sparse dense kernel for CUDA (sm_80 and later: sparse tensor cores), called from TVM
// modules built for the cuda targets. Compiled here with nvcc for sm_80 and sm_90; never run on a
// GPU here: the math in tcc_cuda.cuh is checked on the CPU (emulate.cc replays this tile loop).
//
// Contract: y = x W^T + b for a weight W [N, K] whose every chunk of 4 input features (k = 4c ..
// 4c + 3) holds at most 2 nonzeros, given compressed by backends/kernels/cuda/layout.py
// (compress_24), on row-major contiguous CUDA tensors, on TVM's current stream:
//   tcc_cuda_dense_sp24_f32(x[..., K], values f16[N, Kp/2], meta i16[N, Kp/16], b[N], out[..., N])
//   tcc_cuda_dense_sp24_nobias_f32(x, values, meta, out)          Kp = K rounded up to 32
// (meta holds compress_24's uint16 words bit for bit, as int16: the dtype torch and TVM carry.)
//
// The sparse operand of mma.sp is A, so the kernel computes y^T = W x^T: a block owns 64 output
// channels x 64 tokens, 4 warps of 32 x 32; per step of 32 k the x tile goes to shared memory as
// float16 pairs (B fragments), the compressed values and metadata are A fragments read from global
// memory as they lie (one 32-bit word = two kept weights of one chunk), and
// mma.sp::ordered_metadata m16n8k32 f16 -> f32 does the work of a dense m16n8k32 with half the
// multiplies. Numerics: W and x in float16 (W is stored so), products exact, sums in float32: a
// relative error ~1e-3 against the float32 reference.
#include "launch.cuh"

namespace tcc_cuda {
namespace {

__device__ __forceinline__ void mma_sp(float c[4], const uint32_t a[4], const uint32_t b[4], uint32_t e) {
  asm volatile(
      "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, 0x0;\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
}

struct SpParams {
  const float* x;
  const uint32_t* values;  // [N][Kp/4] words of two float16
  const uint16_t* meta;    // [N][Kp/16]
  const float* b;
  float* out;
  int64_t m, n, k, kp;
};

__global__ void __launch_bounds__(kThreads) sp24_kernel(SpParams p) {
  __shared__ uint32_t xs[kBlockN * kSpLds];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wn = warp >> 1, wm = warp & 1;  // wn: 32 output channels, wm: 32 tokens
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kBlockM, m0 = static_cast<int64_t>(blockIdx.y) * kBlockN;
  float acc[2][4][4] = {};
  for (int64_t k0 = 0; k0 < p.kp; k0 += kSpStep) {
    // the x tile [64 tokens][32 k] as float16 pairs
    for (int i = tid; i < kBlockN * 16; i += kThreads) {
      const int r = i >> 4, w = i & 15;
      const int64_t tok = m0 + r, k = k0 + 2 * w;
      const float v0 = (tok < p.m && k < p.k) ? p.x[tok * p.k + k] : 0.0f;
      const float v1 = (tok < p.m && k + 1 < p.k) ? p.x[tok * p.k + k + 1] : 0.0f;
      xs[r * kSpLds + w] = half2_of(v0, v1);
    }
    __syncthreads();
    uint32_t a[2][4], e[2], b[4][4];
    TCC_UNROLL for (int ni = 0; ni < 2; ++ni) {
      const int64_t row0 = n0 + wn * kWarpM + 16 * ni;
      sp_a_frag(p.values, p.n, p.kp / 4, row0, k0 / 4, lane, a[ni]);
      e[ni] = sp_meta_frag(p.meta, p.n, p.kp / 16, row0, k0 / 16, lane);
    }
    TCC_UNROLL for (int mi = 0; mi < 4; ++mi) sp_b_frag(xs, wm * kWarpN + 8 * mi, lane, b[mi]);
    TCC_UNROLL for (int ni = 0; ni < 2; ++ni)
      TCC_UNROLL for (int mi = 0; mi < 4; ++mi) mma_sp(acc[ni][mi], a[ni], b[mi], e[ni]);
    __syncthreads();
  }
  TCC_UNROLL for (int ni = 0; ni < 2; ++ni)
    TCC_UNROLL for (int mi = 0; mi < 4; ++mi)
      TCC_UNROLL for (int r = 0; r < 4; ++r) {
        const int64_t ch = n0 + wn * kWarpM + 16 * ni + acc_row(lane, r);
        const int64_t tok = m0 + wm * kWarpN + 8 * mi + acc_col(lane, r);
        if (ch < p.n && tok < p.m) p.out[tok * p.n + ch] = p.b ? add_rn(acc[ni][mi][r], p.b[ch]) : acc[ni][mi][r];
      }
}

void dense_sp24(const TensorView& x, const TensorView& values, const TensorView& meta, const TensorView* b,
                const TensorView& out, const char* kernel) {
  SpParams p{};
  p.n = out.size(-1);
  p.m = check_rows(x, out, p.n, kernel);
  p.x = static_cast<const float*>(x.data_ptr());
  p.out = static_cast<float*>(out.data_ptr());
  p.k = x.size(-1), p.kp = ceil_div(p.k, kSpStep) * kSpStep;
  const char* packed = "compress the weight with backends/kernels/cuda/layout.py compress_24";
  p.values = device_data<const uint32_t>(values, kernel, "values", kDLFloat, 16, 2, 2);
  check_dim(values, kernel, "values", 0, p.n, "N, the last dim of out");
  check_dim(values, kernel, "values", 1, p.kp / 2, packed);
  p.meta = device_data<const uint16_t>(meta, kernel, "meta", kDLInt, 16, 2, 2);
  check_dim(meta, kernel, "meta", 0, p.n, "N, the last dim of out");
  check_dim(meta, kernel, "meta", 1, p.kp / 16, packed);
  if (b) {
    p.b = device_data<const float>(*b, kernel, "b", kDLFloat, 32, 1, 1);
    check_dim(*b, kernel, "b", 0, p.n, "N, the last dim of out");
  }
  if (p.m == 0 || p.n == 0) return;
  const dim3 grid = grid_2d(ceil_div(p.n, kBlockM), ceil_div(p.m, kBlockN), kernel);
  sp24_kernel<<<grid, kThreads, 0, stream_of(x)>>>(p);
  check_launch(kernel);
}

void dense_sp24_f32(TensorView x, TensorView values, TensorView meta, TensorView b, TensorView out) {
  dense_sp24(x, values, meta, &b, out, "tcc_cuda_dense_sp24_f32");
}

void dense_sp24_nobias_f32(TensorView x, TensorView values, TensorView meta, TensorView out) {
  dense_sp24(x, values, meta, nullptr, out, "tcc_cuda_dense_sp24_nobias_f32");
}

}  // namespace
}  // namespace tcc_cuda

TVM_FFI_DLL_EXPORT_TYPED_FUNC(tcc_cuda_dense_sp24_f32, tcc_cuda::dense_sp24_f32);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(tcc_cuda_dense_sp24_nobias_f32, tcc_cuda::dense_sp24_nobias_f32);
