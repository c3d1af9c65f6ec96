// Quantized GEMM (quant.h) with AVX512_VNNI: vpdpwssd on ymm registers (AVX512VL) multiplies int16
// pairs and adds them into each int32 lane in one instruction (no saturation).
// Selected only when cpuid reports AVX512_VNNI (dispatch.cpp). Only quant_avx512vnni_kernels() has
// external linkage (see kernels.h).
#include <immintrin.h>

#include "quant.h"

namespace vdiff::cpu {
namespace {

inline __m256i dot32(__m256i w0, __m256i w1, __m256i a0, __m256i a1) {
  return _mm256_dpwssd_epi32(_mm256_dpwssd_epi32(_mm256_setzero_si256(), a0, w0), a1, w1);
}

#include "quant_simd.h"

}  // namespace

const QuantKernels* quant_avx512vnni_kernels() {
  static const QuantKernels table = {"avx512vnni", quantize_rows, qgemm};
  return &table;
}

}  // namespace vdiff::cpu
