// Shared by the CUDA translation units: error checks, element types, and the per-forward descriptors the
// kernels read.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "core/error.h"
#include "cuda/attention_tile.h"
#include "cuda/ops.h"

namespace vdiff::cuda {

// Element type of weights, GEMM inputs and KV caches on the device.
enum class Elem : int { F32 = 0, BF16 = 1, F16 = 2 };

inline size_t elem_size(Elem e) { return e == Elem::F32 ? 4 : 2; }

// Throws vdiff::Error for a failed CUDA call: OutOfMemory for cudaErrorMemoryAllocation, Internal else.
inline void check(cudaError_t status, const char* what) {
  if (status == cudaSuccess) return;
  const std::string message = std::string("CUDA: ") + what + ": " + cudaGetErrorString(status);
  throw Error(status == cudaErrorMemoryAllocation ? ErrorCode::OutOfMemory : ErrorCode::Internal, message);
}
#define VDIFF_CUDA_CHECK(call) ::vdiff::cuda::check((call), #call)
// After a launch: the launch's own error (a bad configuration), not the kernel's completion.
#define VDIFF_CUDA_LAUNCHED(name) ::vdiff::cuda::check(cudaGetLastError(), name)

// Loads element i of a row of type E as f32.
template <class E>
__device__ __forceinline__ float load_f32(const E* p, int64_t i);
template <>
__device__ __forceinline__ float load_f32<float>(const float* p, int64_t i) {
  return p[i];
}
template <>
__device__ __forceinline__ float load_f32<__nv_bfloat16>(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}
template <>
__device__ __forceinline__ float load_f32<__half>(const __half* p, int64_t i) {
  return __half2float(p[i]);
}

template <class E>
__device__ __forceinline__ E from_f32(float x);
template <>
__device__ __forceinline__ float from_f32<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half from_f32<__half>(float x) {
  return __float2half_rn(x);
}

using ops::kMaxTop;
using ops::TaskDesc;
using ops::TaskResult;

}  // namespace vdiff::cuda
