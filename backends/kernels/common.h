// Helpers shared by tcc's CPU kernel sources (cpu_kernels.cc, quant_kernels.cc): argument checks
// that raise TypeError/ValueError through TVM-FFI naming the kernel and the argument, TVM's thread
// pool (`parallel`, `split`), and OpenBLAS sgemm/sgemv in the row-major forms the kernels use.
// Everything is in an anonymous namespace: each source gets its own copy, nothing is exported.
#pragma once

#include <cblas.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/function.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

extern "C" {
typedef struct {
  void* sync_handle;
  int32_t num_task;
} TVMParallelGroupEnv;
typedef int (*FTVMParallelLambda)(int task_id, TVMParallelGroupEnv* penv, void* cdata);
int TVMBackendParallelLaunch(FTVMParallelLambda flambda, void* cdata, int num_task);
}

namespace {

using tvm::ffi::TensorView;

// float32 lanes of the widest vector register the build targets (1 zmm, 1 ymm, or an xmm / NEON q
// register): the width of GCC vector-extension types such as `float __attribute__((vector_size(kVecLanes * 4)))`.
#if defined(__AVX512F__)
constexpr int kVecLanes = 16;
#elif defined(__AVX2__)
constexpr int kVecLanes = 8;
#else
constexpr int kVecLanes = 4;
#endif

// How far ahead (bytes) a decode GEMV asks for the weight stream it reads front to back
// (__builtin_prefetch): the hardware prefetcher alone left the W4A8 and bf16 GEMVs below what the a8w8
// one streamed in the same process; 8 KiB ahead brought them level (2, 4 and 16 KiB no better; Zen 5,
// benchmarks/gemv_ab.py, docs/BENCHMARKS.md session 16).
constexpr int64_t kPrefetchAhead = 8192;

// Asks for the cache lines of [p, p + bytes) (prefetches never fault: p may run past an array's end).
inline void prefetch_lines(const void* p, int64_t bytes) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  for (int64_t l = 0; l < bytes; l += 64) __builtin_prefetch(reinterpret_cast<const void*>(a + l), 0, 3);
}

// ---------------------------------------------------------------------------------------------
// Argument checks
// ---------------------------------------------------------------------------------------------

inline const char* dtype_name(DLDataType t) {
  if (t.lanes != 1) return "vector";
  if (t.code == kDLFloat && t.bits == 32) return "float32";
  if (t.code == kDLFloat && t.bits == 16) return "float16";
  if (t.code == kDLFloat && t.bits == 64) return "float64";
  if (t.code == kDLBfloat && t.bits == 16) return "bfloat16";
  if (t.code == kDLInt && t.bits == 8) return "int8";
  if (t.code == kDLInt && t.bits == 16) return "int16";
  if (t.code == kDLInt && t.bits == 32) return "int32";
  if (t.code == kDLInt && t.bits == 64) return "int64";
  if (t.code == kDLUInt && t.bits == 8) return "uint8";
  if (t.code == kDLBool) return "bool";
  return "other";
}

inline std::string shape_str(const TensorView& t) {
  std::string s = "[";
  for (int d = 0; d < t.ndim(); ++d) s += (d ? ", " : "") + std::to_string(t.size(d));
  return s + "]";
}

// Checks dtype, rank range, CPU device and contiguity; returns the data pointer.
template <typename T>
inline T* data_of(const TensorView& t, const char* kernel, const char* arg, DLDataTypeCode code, int bits,
           int min_ndim, int max_ndim) {
  DLDataType dt = t.dtype();
  if (dt.code != code || dt.bits != bits || dt.lanes != 1) {
    DLDataType want{static_cast<uint8_t>(code), static_cast<uint8_t>(bits), 1};
    TVM_FFI_THROW(TypeError) << kernel << ": argument '" << arg << "' must be " << dtype_name(want)
                             << ", got " << dtype_name(dt);
  }
  if (t.ndim() < min_ndim || t.ndim() > max_ndim) {
    TVM_FFI_THROW(ValueError) << kernel << ": argument '" << arg << "' must have rank "
                              << (min_ndim == max_ndim ? std::to_string(min_ndim)
                                  : std::to_string(min_ndim) + " to " + std::to_string(max_ndim))
                              << ", got shape " << shape_str(t);
  }
  if (t.device().device_type != kDLCPU) {
    TVM_FFI_THROW(ValueError) << kernel << ": argument '" << arg << "' must be on the CPU";
  }
  if (!t.IsContiguous()) {
    TVM_FFI_THROW(ValueError) << kernel << ": argument '" << arg << "' must be contiguous";
  }
  return reinterpret_cast<T*>(static_cast<char*>(t.data_ptr()) + t.byte_offset());
}

inline const float* f32_in(const TensorView& t, const char* kernel, const char* arg, int min_ndim, int max_ndim) {
  return data_of<const float>(t, kernel, arg, kDLFloat, 32, min_ndim, max_ndim);
}

inline float* f32_out(const TensorView& t, const char* kernel, int min_ndim, int max_ndim) {
  return data_of<float>(t, kernel, "out", kDLFloat, 32, min_ndim, max_ndim);
}

inline void check_dim(const TensorView& t, const char* kernel, const char* arg, int dim, int64_t want,
               const char* what) {
  int64_t got = t.size(dim);
  if (got != want) {
    TVM_FFI_THROW(ValueError) << kernel << ": argument '" << arg << "' has shape " << shape_str(t)
                              << ", its dim " << dim << " must be " << want << " (" << what << ")";
  }
}

inline void check_blas_int(int64_t n, const char* kernel, const char* what) {
  if (n > std::numeric_limits<blasint>::max()) {
    TVM_FFI_THROW(ValueError) << kernel << ": " << what << " = " << n << " is too large for a 32-bit BLAS";
  }
}

// ---------------------------------------------------------------------------------------------
// Threads: TVM's pool runs the tasks, OpenBLAS runs single-threaded inside each task.
// ---------------------------------------------------------------------------------------------

inline void blas_single_threaded() {
  static const bool once = (scipy_openblas_set_num_threads(1), true);
  (void)once;
}

// Runs fn(task, num_tasks) on every thread of TVM's pool.
template <typename F>
inline void parallel(F&& fn) {
  blas_single_threaded();
  auto lambda = [](int task, TVMParallelGroupEnv* env, void* cdata) -> int {
    (*static_cast<F*>(cdata))(task, env->num_task);
    return 0;
  };
  if (TVMBackendParallelLaunch(lambda, &fn, 0) != 0) {
    TVM_FFI_THROW(RuntimeError) << "TVMBackendParallelLaunch failed";
  }
}

// The part [begin, end) of `n` items, in units of `grain`, that task `task` of `num_tasks` owns.
inline void split(int64_t n, int64_t grain, int task, int num_tasks, int64_t* begin, int64_t* end) {
  int64_t units = (n + grain - 1) / grain;
  int64_t per = units / num_tasks, extra = units % num_tasks;
  int64_t first = task * per + std::min<int64_t>(task, extra);
  int64_t count = per + (task < extra ? 1 : 0);
  *begin = std::min(n, first * grain);
  *end = std::min(n, (first + count) * grain);
}

// ---------------------------------------------------------------------------------------------
// BLAS
// ---------------------------------------------------------------------------------------------

// C[m, n] = alpha * A[m, k] B[n, k]^T + beta * C   (all row-major, given leading dimensions).
// One row goes to sgemv: sgemm would first copy all of B into its packed layout. (c is zeroed
// first when beta = 0: it may hold NaNs, and 0 * NaN is NaN if sgemv scales y by beta.)
inline void sgemm_nt(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* b,
              int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 1 && k > 0) {
    if (beta == 0.0f) std::fill(c, c + n, 0.0f);
    scipy_cblas_sgemv(CblasRowMajor, CblasNoTrans, n, k, alpha, b, ldb, a, 1, beta, c, 1);
    return;
  }
  scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, k, alpha, a, std::max<int64_t>(lda, 1),
                    b, std::max<int64_t>(ldb, 1), beta, c, std::max<int64_t>(ldc, 1));
}

// C[m, n] = A[m, k] B[k, n] + beta * C
inline void sgemm_nn(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
              float beta, float* c, int64_t ldc) {
  if (m == 1 && n > 0) {
    if (beta == 0.0f) std::fill(c, c + n, 0.0f);
    scipy_cblas_sgemv(CblasRowMajor, CblasTrans, k, n, 1.0f, b, ldb, a, 1, beta, c, 1);
    return;
  }
  scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, n, k, 1.0f, a, std::max<int64_t>(lda, 1),
                    b, std::max<int64_t>(ldb, 1), beta, c, std::max<int64_t>(ldc, 1));
}

// A per-thread buffer of at least n elements of T, reused across calls (one per type and tag).
template <typename T, int Tag = 0>
inline T* scratch(size_t n) {
  thread_local std::vector<T> buf;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

// out[m0:m1, n0:n1] = b[n0:n1] (or 0) broadcast over rows
inline void fill_bias(float* out, const float* b, int64_t n, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  for (int64_t i = m0; i < m1; ++i) {
    float* row = out + i * n + n0;
    if (b) std::memcpy(row, b + n0, (n1 - n0) * sizeof(float));
    else std::memset(row, 0, (n1 - n0) * sizeof(float));
  }
}

}  // namespace
