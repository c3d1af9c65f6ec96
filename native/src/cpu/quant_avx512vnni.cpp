// Quantized GEMM (quant.h) with AVX512_VNNI: vpdpbusd on ymm registers (AVX512VL) sums four
// |w| x sign(a, w) products into each int32 lane in one instruction (no intermediate saturation).
// Selected only when cpuid reports AVX512_VNNI (dispatch.cpp). Only quant_avx512vnni_kernels() has
// external linkage (see kernels.h).
#include <immintrin.h>

#include "quant.h"

namespace vdiff::cpu {
namespace {

inline __m256i dot32(__m256i w, __m256i a) {
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_sign_epi8(w, w), _mm256_sign_epi8(a, w));
}

#include "quant_simd.h"

}  // namespace

const QuantKernels* quant_avx512vnni_kernels() {
  static const QuantKernels table = {"avx512vnni", quantize_rows, qgemm};
  return &table;
}

}  // namespace vdiff::cpu
