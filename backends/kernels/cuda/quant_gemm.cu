// tcc's CUDA kernels for the quantized dense ops (sm_80 and later), called from TVM modules built
// for the cuda targets. Compiled here with nvcc for sm_80 and sm_90; never run on a GPU here: the
// math in tcc_cuda.cuh is checked on the CPU (emulate.cc replays these tile loops).
//
// Contract: each launcher computes the reference op of tcc/ops.py on row-major contiguous CUDA
// tensors, on TVM's current stream, into its last argument; weights come packed by
// backends/kernels/quant_layout.py, as for the CPU kernels (quant_kernels.cc), with the same
// argument lists:
//   tcc_cuda_dense_a8w8_f32(x[..., K], qw int8[ceil(N/16), ceil(K/4), 16, 4], wsum int32[N],
//                           w_scale[N], b[N], bool asym, out[..., N])      dynamic per-row scale
//   tcc_cuda_dense_a8w8_nobias_f32(x, qw, wsum, w_scale, bool asym, out)
//   tcc_cuda_dense_a8w8_static_f32(x, qw, wsum, w_scale, b, x_scale[1], x_zero[1], bool asym, out)
//   tcc_cuda_dense_a8w8_static_nobias_f32(x, qw, wsum, w_scale, x_scale[1], x_zero[1], bool asym, out)
//   tcc_cuda_dense_w4_f32(x[..., K], qw uint8[ceil(N/16), K/2, 16], scale[G, 16 ceil(N/16)],
//                         zero uint8[G, 16 ceil(N/16)], b[N], out[..., N])    group = K / G
//   tcc_cuda_dense_w4_nobias_f32(x, qw, scale, zero, out)
//
// dense_a8w8 (bit-exact with the reference, as the CPU kernel): a block computes 64 rows x 64
// columns with 4 warps of 32 x 32. It first finds its rows' scales (dynamic: a warp-wide min/max
// per row; static: x_scale, x_zero), then per step of 32 k quantizes the x tile into int8 (or uint8
// when asymmetric) codes in shared memory and runs mma.sync m16n8k32 s8.s8 (u8.s8) into int32;
// the packed weight words are B fragments as they lie (one 32-bit word = 4 k of one column). The
// epilogue takes the zero point out with wsum and scales in float64, as the reference.
//
// dense_w4, two paths:
//   tensor cores (M > 16, K and the group multiples of 16): 64 x 64 blocks, per step of 16 k the
//     x tile as two float16 halves (x = hi + lo, ~22 bits) and the weight codes minus the zero
//     point (integers, exact in float16) feed two mma.sync m16n8k16 f16 -> f32 per fragment; the
//     group's scale multiplies the accumulators when a group ends. Within fp32 rounding of the
//     reference unless |x| > 65504 (float16 overflow).
//   CUDA cores (decode and any other shape): a block owns 16 columns x 8 rows; 8 slices of 16
//     threads split K, dequantize exactly as the reference, (code - zero) * scale in float32, and
//     fma into per-row sums that shared memory adds in slice order.
#include "launch.cuh"

namespace tcc_cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// Tensor-core instructions
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ void mma_i8(int32_t c[4], const uint32_t a[4], const uint32_t b[2], bool a_unsigned) {
  if (a_unsigned) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

__device__ __forceinline__ void mma_f16(float c[4], const uint32_t a[4], const uint32_t b[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// ---------------------------------------------------------------------------------------------
// dense_a8w8
// ---------------------------------------------------------------------------------------------

struct A8Params {
  const float* x;
  const uint32_t* qw;  // packed int8 weights as words [tiles][quads][16]
  const int32_t* wsum;
  const float* w_scale;
  const float* b;        // or null
  const float* x_scale;  // static: [1] (and x_zero [1]); null: dynamic per row
  const float* x_zero;
  float* out;
  int64_t m, n, k, tiles, quads;
  bool asym;
};

__global__ void __launch_bounds__(kThreads) a8w8_kernel(A8Params p) {
  __shared__ uint32_t codes[kBlockM * kLds];
  __shared__ RowQuant rq[kBlockM];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kBlockM, n0 = static_cast<int64_t>(blockIdx.x) * kBlockN;

  // 1. each warp finds the scale (and zero point) of 16 of the block's rows
  for (int i = 0; i < kBlockM / 4; ++i) {
    const int r = warp * (kBlockM / 4) + i;
    const int64_t row = m0 + r;
    if (p.x_scale) {
      if (lane == 0) rq[r] = a8_static_params(p.x_scale, p.x_zero, p.asym);
      continue;
    }
    float lo = INFINITY, hi = -INFINITY;
    if (row < p.m)
      for (int64_t k = lane; k < p.k; k += 32) {
        const float v = p.x[row * p.k + k];
        lo = fminf(lo, v);
        hi = fmaxf(hi, v);
      }
    TCC_UNROLL for (int off = 16; off > 0; off >>= 1) {
      lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, off));
      hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, off));
    }
    if (lane == 0) rq[r] = a8_row_params(lo, hi, p.asym);
  }
  __syncthreads();

  const int wm = warp >> 1, wn = warp & 1;
  int32_t acc[2][4][4] = {};
  for (int64_t k0 = 0; k0 < p.k; k0 += kA8Step) {
    // 2. the x tile [64 rows][32 k] as codes, 4 per word
    for (int i = tid; i < kBlockM * 8; i += kThreads) {
      const int r = i >> 3, w = i & 7;
      const int64_t row = m0 + r;
      int32_t c[4];
      TCC_UNROLL for (int e = 0; e < 4; ++e) {
        const int64_t k = k0 + 4 * w + e;
        c[e] = (row < p.m && k < p.k) ? a8_code(p.x[row * p.k + k], rq[r], p.asym) : 0;
      }
      codes[r * kLds + w] = a8_pack4(c);
    }
    __syncthreads();
    // 3. the warp's 32 x 32 tile: 2 x 4 mma
    uint32_t a[2][4], b[4][2];
    TCC_UNROLL for (int mi = 0; mi < 2; ++mi) a_frag(codes, wm * kWarpM + 16 * mi, lane, a[mi]);
    TCC_UNROLL for (int ni = 0; ni < 4; ++ni) a8_b_frag(p.qw, p.tiles, p.quads, n0 + wn * kWarpN + 8 * ni, k0 / 4, lane, b[ni]);
    TCC_UNROLL for (int mi = 0; mi < 2; ++mi)
      TCC_UNROLL for (int ni = 0; ni < 4; ++ni) mma_i8(acc[mi][ni], a[mi], b[ni], p.asym);
    __syncthreads();
  }

  // 4. epilogue
  TCC_UNROLL for (int mi = 0; mi < 2; ++mi)
    TCC_UNROLL for (int ni = 0; ni < 4; ++ni)
      TCC_UNROLL for (int r = 0; r < 4; ++r) {
        const int lr = wm * kWarpM + 16 * mi + acc_row(lane, r);
        const int64_t row = m0 + lr, col = n0 + wn * kWarpN + 8 * ni + acc_col(lane, r);
        if (row < p.m && col < p.n)
          p.out[row * p.n + col] = a8_epilogue(acc[mi][ni][r], p.wsum[col], rq[lr], p.w_scale[col], p.b, col);
      }
}

void dense_a8w8(const TensorView& x, const TensorView& qw, const TensorView& wsum, const TensorView& w_scale,
                const TensorView* b, const TensorView* x_scale, const TensorView* x_zero, bool asym,
                const TensorView& out, const char* kernel) {
  A8Params p{};
  p.w_scale = device_data<const float>(w_scale, kernel, "w_scale", kDLFloat, 32, 1, 1);
  p.n = w_scale.size(0);
  p.m = check_rows(x, out, p.n, kernel);
  p.x = static_cast<const float*>(x.data_ptr());
  p.out = static_cast<float*>(out.data_ptr());
  p.k = x.size(-1);
  if (p.k > 65536) {
    TVM_FFI_THROW(ValueError) << kernel << ": K = " << p.k << " exceeds 65536 (int32 accumulators stay exact up to there)";
  }
  p.tiles = ceil_div(p.n, kTile), p.quads = ceil_div(p.k, 4);
  p.qw = device_data<const uint32_t>(qw, kernel, "qw", kDLInt, 8, 4, 4);
  const char* packed = "pack the weights with backends/kernels/quant_layout.py pack_a8w8";
  check_dim(qw, kernel, "qw", 0, p.tiles, packed);
  check_dim(qw, kernel, "qw", 1, p.quads, packed);
  check_dim(qw, kernel, "qw", 2, kTile, packed);
  check_dim(qw, kernel, "qw", 3, 4, packed);
  p.wsum = device_data<const int32_t>(wsum, kernel, "wsum", kDLInt, 32, 1, 1);
  check_dim(wsum, kernel, "wsum", 0, p.n, "N, the size of w_scale");
  if (b) {
    p.b = device_data<const float>(*b, kernel, "b", kDLFloat, 32, 1, 1);
    check_dim(*b, kernel, "b", 0, p.n, "N, the size of w_scale");
  }
  if (x_scale) {
    p.x_scale = device_data<const float>(*x_scale, kernel, "x_scale", kDLFloat, 32, 1, 1);
    p.x_zero = device_data<const float>(*x_zero, kernel, "x_zero", kDLFloat, 32, 1, 1);
    check_dim(*x_scale, kernel, "x_scale", 0, 1, "one per-tensor scale");
    check_dim(*x_zero, kernel, "x_zero", 0, 1, "one per-tensor zero point");
  }
  p.asym = asym;
  if (p.m == 0 || p.n == 0) return;
  const dim3 grid = grid_2d(ceil_div(p.n, kBlockN), ceil_div(p.m, kBlockM), kernel);
  a8w8_kernel<<<grid, kThreads, 0, stream_of(x)>>>(p);
  check_launch(kernel);
}

// ---------------------------------------------------------------------------------------------
// dense_w4
// ---------------------------------------------------------------------------------------------

struct W4Params {
  const float* x;
  const uint8_t* qw;  // [tiles][K/2][16]
  const float* scale_t;  // [G][np]
  const uint8_t* zero_t;  // [G][np]
  const float* b;
  float* out;
  int64_t m, n, k, np, group;
};

__global__ void __launch_bounds__(kThreads) w4_mma_kernel(W4Params p) {
  __shared__ uint32_t xs_hi[kBlockM * kLds], xs_lo[kBlockM * kLds];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wm = warp >> 1, wn = warp & 1;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kBlockM, n0 = static_cast<int64_t>(blockIdx.x) * kBlockN;
  float acc[2][4][4] = {}, part[2][4][4] = {};  // part: the current group's sums
  for (int64_t k0 = 0; k0 < p.k; k0 += kW4Step) {
    for (int i = tid; i < kBlockM * 8; i += kThreads) {
      const int r = i >> 3, w = i & 7;
      const int64_t row = m0 + r;
      const float v0 = row < p.m ? p.x[row * p.k + k0 + 2 * w] : 0.0f;
      const float v1 = row < p.m ? p.x[row * p.k + k0 + 2 * w + 1] : 0.0f;
      uint16_t h0, l0, h1, l1;
      split_half(v0, &h0, &l0);
      split_half(v1, &h1, &l1);
      xs_hi[r * kLds + w] = pack_half2(h0, h1);
      xs_lo[r * kLds + w] = pack_half2(l0, l1);
    }
    __syncthreads();
    uint32_t a_hi[2][4], a_lo[2][4], b[4][2];
    TCC_UNROLL for (int mi = 0; mi < 2; ++mi) {
      a_frag(xs_hi, wm * kWarpM + 16 * mi, lane, a_hi[mi]);
      a_frag(xs_lo, wm * kWarpM + 16 * mi, lane, a_lo[mi]);
    }
    TCC_UNROLL for (int ni = 0; ni < 4; ++ni)
      w4_b_frag(p.qw, p.zero_t, p.k / 2, p.np, p.group, n0 + wn * kWarpN + 8 * ni, k0, lane, b[ni]);
    TCC_UNROLL for (int mi = 0; mi < 2; ++mi)
      TCC_UNROLL for (int ni = 0; ni < 4; ++ni) {
        mma_f16(part[mi][ni], a_lo[mi], b[ni]);
        mma_f16(part[mi][ni], a_hi[mi], b[ni]);
      }
    __syncthreads();
    if ((k0 + kW4Step) % p.group == 0) {  // the group ends: acc += scale * part
      const int64_t grp = k0 / p.group;
      TCC_UNROLL for (int ni = 0; ni < 4; ++ni)
        TCC_UNROLL for (int r = 0; r < 4; ++r) {
          const int64_t col = n0 + wn * kWarpN + 8 * ni + acc_col(lane, r);
          const float s = col < p.np ? p.scale_t[grp * p.np + col] : 0.0f;
          TCC_UNROLL for (int mi = 0; mi < 2; ++mi) {
            acc[mi][ni][r] = fma_rn(s, part[mi][ni][r], acc[mi][ni][r]);
            part[mi][ni][r] = 0.0f;
          }
        }
    }
  }
  TCC_UNROLL for (int mi = 0; mi < 2; ++mi)
    TCC_UNROLL for (int ni = 0; ni < 4; ++ni)
      TCC_UNROLL for (int r = 0; r < 4; ++r) {
        const int64_t row = m0 + wm * kWarpM + 16 * mi + acc_row(lane, r);
        const int64_t col = n0 + wn * kWarpN + 8 * ni + acc_col(lane, r);
        if (row < p.m && col < p.n) p.out[row * p.n + col] = p.b ? add_rn(acc[mi][ni][r], p.b[col]) : acc[mi][ni][r];
      }
}

__global__ void __launch_bounds__(kThreads) w4_simt_kernel(W4Params p) {
  __shared__ float part[kW4SimtSlices * kW4SimtRows * kTile];
  const int tid = threadIdx.x, c = tid % kTile, slice = tid / kTile;
  const int64_t tile = blockIdx.x, row0 = static_cast<int64_t>(blockIdx.y) * kW4SimtRows;
  const int rows = static_cast<int>(p.m - row0 < kW4SimtRows ? p.m - row0 : kW4SimtRows);
  float acc[kW4SimtRows];
  w4_simt_partial(p.x, p.qw, p.scale_t, p.zero_t, p.k, p.np, p.group, tile, c, slice, row0, rows, acc);
  TCC_UNROLL for (int r = 0; r < kW4SimtRows; ++r) part[(slice * kW4SimtRows + r) * kTile + c] = acc[r];
  __syncthreads();
  const int r = tid / kTile;  // 8 rows x 16 columns: one output each
  const int64_t col = tile * kTile + c;
  if (r < rows && col < p.n) {
    const float s = w4_simt_sum(part, r, c);
    p.out[(row0 + r) * p.n + col] = p.b ? add_rn(s, p.b[col]) : s;
  }
}

void dense_w4(const TensorView& x, const TensorView& qw, const TensorView& scale, const TensorView& zero,
              const TensorView* b, const TensorView& out, const char* kernel) {
  W4Params p{};
  p.n = out.size(-1);
  p.m = check_rows(x, out, p.n, kernel);
  p.x = static_cast<const float*>(x.data_ptr());
  p.out = static_cast<float*>(out.data_ptr());
  p.k = x.size(-1), p.np = ceil_div(p.n, kTile) * kTile;
  if (p.k % 2) {
    TVM_FFI_THROW(ValueError) << kernel << ": K = " << p.k << " (the last dim of x) must be even for int4 weights";
  }
  const char* packed = "pack the weights with backends/kernels/quant_layout.py pack_w4";
  p.qw = device_data<const uint8_t>(qw, kernel, "qw", kDLUInt, 8, 3, 3);
  check_dim(qw, kernel, "qw", 0, p.np / kTile, packed);
  check_dim(qw, kernel, "qw", 1, p.k / 2, packed);
  check_dim(qw, kernel, "qw", 2, kTile, packed);
  p.scale_t = device_data<const float>(scale, kernel, "scale", kDLFloat, 32, 2, 2);
  p.zero_t = device_data<const uint8_t>(zero, kernel, "zero", kDLUInt, 8, 2, 2);
  const int64_t groups = scale.size(0);
  if (p.k > 0 && (groups == 0 || p.k % groups != 0 || (p.k / groups) % 2 != 0)) {
    TVM_FFI_THROW(ValueError) << kernel << ": argument 'scale' has shape " << shape_str(scale) << ": its " << groups
                              << " groups must divide K = " << p.k << " into groups of even size";
  }
  p.group = groups ? p.k / groups : 0;
  check_dim(scale, kernel, "scale", 1, p.np, packed);
  check_dim(zero, kernel, "zero", 0, groups, "G, the groups of scale");
  check_dim(zero, kernel, "zero", 1, p.np, packed);
  if (b) {
    p.b = device_data<const float>(*b, kernel, "b", kDLFloat, 32, 1, 1);
    check_dim(*b, kernel, "b", 0, p.n, "N, the last dim of out");
  }
  if (p.m == 0 || p.n == 0) return;
  if (w4_uses_mma(p.m, p.k, p.group)) {
    w4_mma_kernel<<<grid_2d(ceil_div(p.n, kBlockN), ceil_div(p.m, kBlockM), kernel), kThreads, 0, stream_of(x)>>>(p);
  } else {
    w4_simt_kernel<<<grid_2d(p.np / kTile, ceil_div(p.m, kW4SimtRows), kernel), kThreads, 0, stream_of(x)>>>(p);
  }
  check_launch(kernel);
}

// ---------------------------------------------------------------------------------------------
// Exported launchers
// ---------------------------------------------------------------------------------------------

void dense_a8w8_f32(TensorView x, TensorView qw, TensorView wsum, TensorView w_scale, TensorView b, bool asym,
                    TensorView out) {
  dense_a8w8(x, qw, wsum, w_scale, &b, nullptr, nullptr, asym, out, "tcc_cuda_dense_a8w8_f32");
}

void dense_a8w8_nobias_f32(TensorView x, TensorView qw, TensorView wsum, TensorView w_scale, bool asym,
                           TensorView out) {
  dense_a8w8(x, qw, wsum, w_scale, nullptr, nullptr, nullptr, asym, out, "tcc_cuda_dense_a8w8_nobias_f32");
}

void dense_a8w8_static_f32(TensorView x, TensorView qw, TensorView wsum, TensorView w_scale, TensorView b,
                           TensorView x_scale, TensorView x_zero, bool asym, TensorView out) {
  dense_a8w8(x, qw, wsum, w_scale, &b, &x_scale, &x_zero, asym, out, "tcc_cuda_dense_a8w8_static_f32");
}

void dense_a8w8_static_nobias_f32(TensorView x, TensorView qw, TensorView wsum, TensorView w_scale,
                                  TensorView x_scale, TensorView x_zero, bool asym, TensorView out) {
  dense_a8w8(x, qw, wsum, w_scale, nullptr, &x_scale, &x_zero, asym, out, "tcc_cuda_dense_a8w8_static_nobias_f32");
}

void dense_w4_f32(TensorView x, TensorView qw, TensorView scale, TensorView zero, TensorView b, TensorView out) {
  dense_w4(x, qw, scale, zero, &b, out, "tcc_cuda_dense_w4_f32");
}

void dense_w4_nobias_f32(TensorView x, TensorView qw, TensorView scale, TensorView zero, TensorView out) {
  dense_w4(x, qw, scale, zero, nullptr, out, "tcc_cuda_dense_w4_nobias_f32");
}

}  // namespace
}  // namespace tcc_cuda

TVM_FFI_DLL_EXPORT_TYPED_FUNC(tcc_cuda_dense_a8w8_f32, tcc_cuda::dense_a8w8_f32);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(tcc_cuda_dense_a8w8_nobias_f32, tcc_cuda::dense_a8w8_nobias_f32);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(tcc_cuda_dense_a8w8_static_f32, tcc_cuda::dense_a8w8_static_f32);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(tcc_cuda_dense_a8w8_static_nobias_f32, tcc_cuda::dense_a8w8_static_nobias_f32);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(tcc_cuda_dense_w4_f32, tcc_cuda::dense_w4_f32);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(tcc_cuda_dense_w4_nobias_f32, tcc_cuda::dense_w4_nobias_f32);
