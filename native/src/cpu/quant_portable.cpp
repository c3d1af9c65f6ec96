// Quantized GEMM (quant.h) in plain C++: the same integer lane sums, fused multiply-adds and final
// summation order as the SIMD kernels, so all ISAs agree bit for bit.
#include <cmath>

#include "quant.h"

namespace vdiff::cpu {
namespace {

void quantize_rows(int M, int K, const float* A, int64_t lda, int16_t* q, float* scales) {
  const int nblocks = K / kQBlock;
  for (int m = 0; m < M; ++m)
    for (int b = 0; b < nblocks; ++b) {
      const float* x = A + static_cast<int64_t>(m) * lda + b * kQBlock;
      float amax = 0.0f;
      for (int j = 0; j < kQBlock; ++j) amax = std::fmax(amax, std::fabs(x[j]));
      scales[static_cast<int64_t>(m) * nblocks + b] = amax / 32767.0f;
      const float inv = amax > 0.0f ? 32767.0f / amax : 0.0f;
      int16_t* out = q + static_cast<int64_t>(m) * K + b * kQBlock;
      for (int j = 0; j < kQBlock; ++j) out[j] = static_cast<int16_t>(std::nearbyint(x[j] * inv));
    }
}

// Block b of a weight row as 32 signed ints.
inline void unpack_block(const QMatB& B, const uint8_t* row, int b, int w[kQBlock]) {
  if (B.type == QType::Q8_0) {
    for (int j = 0; j < kQBlock; ++j) w[j] = static_cast<int8_t>(row[32 * b + j]);
  } else {
    for (int j = 0; j < 16; ++j) {
      const uint8_t byte = row[16 * b + j];
      w[j] = (byte & 15) - 8;
      w[j + 16] = (byte >> 4) - 8;
    }
  }
}

void qgemm(int M, int n0, int n1, int K, const QMatA& A, const QMatB& B, float* C, int64_t ldc, bool accumulate) {
  const int nblocks = K / kQBlock;
  int w[kQBlock];
  for (int n = n0; n < n1; ++n) {
    const uint8_t* row = B.data + static_cast<int64_t>(n) * B.ld;
    const uint16_t* ws = B.scales + static_cast<int64_t>(n) * B.ld_scales;
    for (int m = 0; m < M; ++m) {
      const int16_t* a = A.q + static_cast<int64_t>(m) * A.ld;
      const float* as = A.scales + static_cast<int64_t>(m) * A.ld_scales;
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int b = 0; b < nblocks; ++b) {
        unpack_block(B, row, b, w);
        const float s = as[b] * f16_to_f32(ws[b]);
        const int16_t* ab = a + 32 * b;
        for (int l = 0; l < 8; ++l) {
          const int j = 2 * l;
          const int sum = w[j] * ab[j] + w[j + 1] * ab[j + 1] + w[j + 16] * ab[j + 16] + w[j + 17] * ab[j + 17];
          acc[l] = std::fma(static_cast<float>(sum), s, acc[l]);
        }
      }
      const float v = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
      float& out = C[static_cast<int64_t>(m) * ldc + n];
      out = accumulate ? out + v : v;
    }
  }
}

}  // namespace

const QuantKernels* quant_portable_kernels() {
  static const QuantKernels table = {"portable", quantize_rows, qgemm};
  return &table;
}

}  // namespace vdiff::cpu
