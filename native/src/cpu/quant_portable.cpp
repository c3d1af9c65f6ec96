// Quantized GEMM (quant.h) in plain C++: the reference the SIMD kernels agree with bit for bit.
#include <cmath>

#include "quant.h"

namespace vdiff::cpu {
namespace {

// Block b of a weight row as 32 signed ints.
inline void unpack_block(const QMatB& B, const uint8_t* row, int b, int w[kQBlock]) {
  if (B.type == QType::Q8_0) {
    for (int j = 0; j < kQBlock; ++j) w[j] = q8_value(row[32 * b + j]);
  } else {
    for (int j = 0; j < 16; ++j) {
      const uint8_t byte = row[16 * b + j];
      w[j] = (byte & 15) - 8;
      w[j + 16] = (byte >> 4) - 8;
    }
  }
}

void gemm(int M, int n0, int n1, int K, const QBlockA* A, const QMatB& B, float* C, int64_t ldc, bool accumulate,
          float*) {
  const int nblocks = K / kQBlock;
  int w[kQBlock];
  for (int n = n0; n < n1; ++n) {
    const uint8_t* row = B.data + static_cast<int64_t>(n) * B.ld;
    const uint16_t* ws = B.scales + static_cast<int64_t>(n) * B.ld_scales;
    for (int m = 0; m < M; ++m) {
      const QBlockA* a = A + static_cast<int64_t>(m) * nblocks;
      float& out = C[static_cast<int64_t>(m) * ldc + n];
      float acc = accumulate ? out : 0.0f;
      for (int b = 0; b < nblocks; ++b) {
        unpack_block(B, row, b, w);
        int32_t dot = 0;
        for (int j = 0; j < kQBlock; ++j) dot += w[j] * a[b].q[j];
        acc = std::fma(static_cast<float>(dot), a[b].scale * f16_to_f32(ws[b]), acc);
      }
      out = acc;
    }
  }
}

size_t no_scratch(int) { return 0; }

}  // namespace

const QuantKernels* quant_portable_kernels() {
  static const QuantKernels table = {.isa = "portable",
                                     .nr = 0,
                                     .q8_unsigned = false,
                                     .quantize = quantize_activations,
                                     .rotate = hadamard_transform,
                                     .quantize_weights = quantize_weight_row,
                                     .gemm = gemm,
                                     .gemm_scratch_floats = no_scratch,
                                     .pack_panel = nullptr,
                                     .packed_panel_bytes = nullptr};
  return &table;
}

}  // namespace vdiff::cpu
