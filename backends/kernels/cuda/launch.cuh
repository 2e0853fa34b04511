// Host side of tcc's CUDA kernels: argument checks and the stream, for the launchers that TVM
// calls (TVM_FFI_DLL_EXPORT_TYPED_FUNC over ffi::TensorView, destination-passing style as
// R.call_dps_packed calls them). A wrong dtype, rank, shape or device raises TypeError/ValueError
// through TVM-FFI naming the kernel and the argument, as backends/kernels/common.h does on the CPU.
// Everything is in an anonymous namespace: each source gets its own copy, nothing is exported.
#pragma once

#include <cuda_runtime.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/c_env_api.h>
#include <tvm/ffi/function.h>

#include <string>

#include "tcc_cuda.cuh"

namespace tcc_cuda {
namespace {

using tvm::ffi::TensorView;

inline std::string shape_str(const TensorView& t) {
  std::string s = "[";
  for (int d = 0; d < t.ndim(); ++d) s += (d ? ", " : "") + std::to_string(t.size(d));
  return s + "]";
}

inline const char* dtype_name(DLDataTypeCode code, int bits) {
  if (code == kDLFloat) return bits == 32 ? "float32" : bits == 16 ? "float16" : "float";
  if (code == kDLInt) return bits == 8 ? "int8" : bits == 16 ? "int16" : bits == 32 ? "int32" : "int";
  if (code == kDLUInt) return bits == 8 ? "uint8" : bits == 16 ? "uint16" : "uint";
  return "other";
}

// Checks dtype, rank range, CUDA device and contiguity; returns the data pointer.
template <typename T>
T* device_data(const TensorView& t, const char* kernel, const char* arg, DLDataTypeCode code, int bits,
               int min_ndim, int max_ndim) {
  const DLDataType dt = t.dtype();
  if (dt.code != code || dt.bits != bits || dt.lanes != 1) {
    TVM_FFI_THROW(TypeError) << kernel << ": argument '" << arg << "' must be " << dtype_name(code, bits);
  }
  if (t.ndim() < min_ndim || t.ndim() > max_ndim) {
    TVM_FFI_THROW(ValueError) << kernel << ": argument '" << arg << "' has shape " << shape_str(t)
                              << ", rank must be " << min_ndim << (min_ndim == max_ndim ? "" : " or more");
  }
  if (t.device().device_type != kDLCUDA) {
    TVM_FFI_THROW(ValueError) << kernel << ": argument '" << arg << "' must be on a CUDA device";
  }
  if (!t.IsContiguous()) {
    TVM_FFI_THROW(ValueError) << kernel << ": argument '" << arg << "' must be contiguous";
  }
  return reinterpret_cast<T*>(static_cast<char*>(t.data_ptr()) + t.byte_offset());
}

inline void check_dim(const TensorView& t, const char* kernel, const char* arg, int dim, int64_t want,
                      const char* what) {
  if (t.size(dim) != want) {
    TVM_FFI_THROW(ValueError) << kernel << ": argument '" << arg << "' has shape " << shape_str(t) << ", its dim "
                              << dim << " must be " << want << " (" << what << ")";
  }
}

// x [..., K] -> out [..., N]: the leading dims agree; returns M (rows of x viewed as [M, K]).
inline int64_t check_rows(const TensorView& x, const TensorView& out, int64_t n, const char* kernel) {
  device_data<const float>(x, kernel, "x", kDLFloat, 32, 1, 64);
  device_data<float>(out, kernel, "out", kDLFloat, 32, x.ndim(), x.ndim());
  for (int d = 0; d + 1 < x.ndim(); ++d) check_dim(out, kernel, "out", d, x.size(d), "the leading dims of x");
  check_dim(out, kernel, "out", x.ndim() - 1, n, "N");
  const int64_t k = x.size(-1);
  return k ? x.numel() / k : out.numel() / (n ? n : 1);
}

// A grid of x by y blocks; y is limited to 65535 by the hardware.
inline dim3 grid_2d(int64_t x, int64_t y, const char* kernel) {
  if (y > 65535 || x > 2147483647) {
    TVM_FFI_THROW(ValueError) << kernel << ": " << x << " x " << y << " blocks exceed the CUDA grid limits (too many rows)";
  }
  return dim3(static_cast<unsigned>(x), static_cast<unsigned>(y));
}

// The stream TVM runs the model on (the current stream of x's device).
inline cudaStream_t stream_of(const TensorView& x) {
  return static_cast<cudaStream_t>(TVMFFIEnvGetStream(x.device().device_type, x.device().device_id));
}

inline void check_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    TVM_FFI_THROW(RuntimeError) << kernel << ": kernel launch failed: " << cudaGetErrorString(err);
  }
}

}  // namespace
}  // namespace tcc_cuda
