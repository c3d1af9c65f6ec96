// Quantized GEMM (quant.h) with AVX2: int8 products by vpmaddubsw (|w| x sign(a, w), pairs into int16:
// at most 2 * 128 * 127 < 2^15, no saturation) and vpmaddwd (pairs into int32). Only
// quant_avx2_kernels() has external linkage (see kernels.h).
#include <immintrin.h>

#include "quant.h"

namespace vdiff::cpu {
namespace {

inline __m256i dot32(__m256i w, __m256i a) {
  const __m256i p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(a, w));
  return _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
}

#include "quant_simd.h"

}  // namespace

const QuantKernels* quant_avx2_kernels() {
  static const QuantKernels table = {"avx2", quantize_rows, qgemm};
  return &table;
}

}  // namespace vdiff::cpu
