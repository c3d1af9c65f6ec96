// Quantized GEMM (quant.h) with AVX2: weights widened to int16 (vpmovsxbw, or the nibbles by vpmovzxbw),
// products with the int16 activations summed in pairs into int32 by vpmaddwd (exact: 2 * 32767 * 128 <
// 2^31). Only quant_avx2_kernels() has external linkage (see kernels.h).
#include <immintrin.h>

#include "quant.h"

namespace vdiff::cpu {
namespace {

inline __m256i dot32(__m256i w0, __m256i w1, __m256i a0, __m256i a1) {
  return _mm256_add_epi32(_mm256_madd_epi16(a0, w0), _mm256_madd_epi16(a1, w1));
}

#include "quant_simd.h"

}  // namespace

const QuantKernels* quant_avx2_kernels() {
  static const QuantKernels table = {"avx2", quantize_rows, qgemm};
  return &table;
}

}  // namespace vdiff::cpu
