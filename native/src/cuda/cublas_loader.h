// cuBLAS opened at run time (dlopen), with the few prototypes the backend calls declared here, so the
// build needs no cuBLAS. Plain C++: handles and streams are opaque pointers.
#pragma once
#include <string>

namespace vdiff::cuda {

struct Cublas {
  // The enum values of cublas_api.h / library_types.h that the backend uses.
  static constexpr int kOpN = 0, kOpT = 1;
  static constexpr int kR32F = 0, kR16F = 2, kR16BF = 14;  // cudaDataType_t
  static constexpr int kCompute32F = 68;                   // CUBLAS_COMPUTE_32F (no TF32)
  static constexpr int kComputeDefaultAlgo = -1;           // CUBLAS_GEMM_DEFAULT

  using Handle = void*;
  int (*create)(Handle*) = nullptr;
  int (*destroy)(Handle) = nullptr;
  int (*set_stream)(Handle, void* stream) = nullptr;
  int (*set_workspace)(Handle, void* workspace, size_t bytes) = nullptr;  // optional (may stay null)
  int (*gemm_ex)(Handle, int transa, int transb, int m, int n, int k, const void* alpha, const void* A, int a_type,
                 int lda, const void* B, int b_type, int ldb, const void* beta, void* C, int c_type, int ldc,
                 int compute_type, int algo) = nullptr;

  std::string library;  // the file that was opened
  bool loaded() const { return gemm_ex != nullptr; }
};

// Opens cuBLAS once per process: $VDIFF_CUBLAS_DIR/libcublas.so.{13,12} first (bench/gpu/run.sh sets it
// to the lib folder of the nvidia-cublas Python package), then libcublas.so.13 and .12 by the loader's
// search path. Set VDIFF_CUBLAS=0 to skip it (the tiled fallback then does every product). Returns
// nullptr and a reason when none loads.
const Cublas* load_cublas(std::string* reason);

}  // namespace vdiff::cuda
