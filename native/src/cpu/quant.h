// Block-quantized weights (Q8_0, Q4_0) and the integer GEMM that multiplies them with activations
// quantized per row, in the layout of llama.cpp's formats of the same names (the bytes are our own).
//
// Formats, per row of a weight W[N][K] (K a multiple of 32), blocks b of 32 consecutive k:
//   Q8_0: 32 int8 q[j] at row + 32 b; value = q[j] * d[b].
//   Q4_0: 16 bytes at row + 16 b; byte j holds element j in its low nibble and element j + 16 in its high
//         nibble, unsigned u in 0..15; value = (u - 8) * d[b].
//   d[b]: one IEEE f16 scale per block (a separate [N][K/32] array).
// Activations (the left operand) are quantized per row and block to int16 in [-32767, 32767] with one
// f32 scale per block: s = max|x| / 32767, q = round_to_nearest_even(x * (32767 / max|x|)) (all-zero
// blocks: 0). (int8 activations, as llama.cpp's Q8_0 dot uses, cost the embedded model 9 points of greedy
// agreement against 5 for the weights' own rounding: bench/cpu/RESULTS.md. int16 makes them negligible
// at the same instruction count on AVX2: vpmovsxbw + vpmaddwd replace vpsignb + vpmaddubsw + vpmaddwd.)
//
// The product, per output (m, n): block b's 32 integer products are summed in 8 int32 lanes (lane l:
// k = 2l, 2l+1, 16+2l, 17+2l of the block; exact, and |lane| <= 4 * 32767 * 128 < 2^24, so exact in f32
// too), lane l's float accumulator takes acc[l] = fma(float(lane sum), s_a[m][b] * d_w[n][b], acc[l])
// for b = 0, 1, ... in order, and the output is ((acc0 + acc4) + (acc2 + acc6)) + ((acc1 + acc5) +
// (acc3 + acc7)), added to C when accumulating. Every ISA (portable, AVX2 vpmaddwd, AVX-512 VNNI
// vpdpwssd) computes exactly these operations, so they agree bit for bit. Against the float64 value of
// sum_b s_a d_w (integer dot) — the exact product of the dequantized weights and the dequantized
// activations — the error is at most (K/32/8 + 4) * 2^-23 * sum|products| (recursive summation, with the
// scale product's own rounding; the tests check it).
//
// Static and header-only for the same ODR reason as kernels.h.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

#include "kernels.h"

namespace vdiff::cpu {

enum class QType : int { Q8_0 = 0, Q4_0 = 1 };
constexpr int kQBlock = 32;

static inline const char* qtype_name(QType t) { return t == QType::Q8_0 ? "q8_0" : "q4_0"; }
// Bytes of quantized values per block (not counting the scale).
static inline int qblock_bytes(QType t) { return t == QType::Q8_0 ? 32 : 16; }

// A quantized weight matrix W[N][K] (the product uses W^T, like MatB with k_major == false).
struct QMatB {
  const uint8_t* data = nullptr;     // row n at data + n * ld
  const uint16_t* scales = nullptr;  // f16 bits; row n's block b at scales[n * ld_scales + b]
  QType type = QType::Q8_0;
  int64_t ld = 0;         // bytes between rows
  int64_t ld_scales = 0;  // scales between rows
};

// Activations A[M][K] quantized per row: q[m * ld + k], scales[m * ld_scales + b].
struct QMatA {
  const int16_t* q = nullptr;
  const float* scales = nullptr;
  int64_t ld = 0;
  int64_t ld_scales = 0;
};

struct QuantKernels {
  const char* isa;  // "portable" | "avx2" | "avx512vnni"
  // Quantizes rows A[0..M)[0..K) (K % 32 == 0) into q (M x K, row stride K) and scales (M x K/32).
  void (*quantize_rows)(int M, int K, const float* A, int64_t lda, int16_t* q, float* scales);
  // C[m][n] = (accumulate ? C[m][n] : 0) + sum_k Aq[m][k] * W[n][k] for 0 <= m < M, n0 <= n < n1, as
  // described above (K % 32 == 0).
  void (*gemm)(int M, int n0, int n1, int K, const QMatA& A, const QMatB& B, float* C, int64_t ldc, bool accumulate);
};

// The quantized kernels matching a float kernel table: the same ISA family (avx512 -> avx512vnni when the
// CPU has VNNI, else avx2). Never nullptr.
const QuantKernels& quant_kernels_for(const Kernels& k);
// Per-ISA tables (quant_<isa>.cpp); call only when the CPU supports the ISA.
const QuantKernels* quant_portable_kernels();
const QuantKernels* quant_avx2_kernels();
const QuantKernels* quant_avx512vnni_kernels();
bool cpu_has_avx512vnni();

// ------------------------------------------------------------------------------------------------
// Scalar helpers shared by the kernels, the loader and the tests.

// f32 -> f16 bits, round to nearest even (overflow to inf; NaN stays NaN).
static inline uint16_t f32_to_f16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  x &= 0x7fffffffu;
  if (x > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);
  if (x >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (x < 0x38800000u) {                                               // below 2^-14: subnormal or zero
    if (x < 0x33000000u) return static_cast<uint16_t>(sign);           // below 2^-25: rounds to 0
    const uint32_t mant = (x & 0x7fffffu) | 0x800000u;
    const int shift = 126 - static_cast<int>(x >> 23);  // 14 .. 24 (value = mant * 2^(e-150); unit 2^-24)
    uint32_t h = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (h & 1u))) ++h;
    return static_cast<uint16_t>(sign | h);
  }
  uint32_t h = ((x >> 13) - (112u << 10));  // rebias 127 -> 15
  const uint32_t rem = x & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return static_cast<uint16_t>(sign | h);
}

// Quantizes one weight row x[0..K) (K % 32 == 0) into `out` (K bytes for Q8_0, K/2 for Q4_0) and
// scales[K/32] (f16 bits). The scale is rounded to f16 first and the values quantized with the rounded
// scale: Q8_0 d = max|x| / 127, q = clamp(rne(x / d), -127, 127); Q4_0 d = m / -8 with m the element of
// largest magnitude (the first one), u = clamp(rne(x / d) + 8, 0, 15). A zero scale gives zeros.
// src/model/quantize.ts implements the same arithmetic (and is tested to produce the same bytes).
static inline void quantize_weight_row(const float* x, int K, QType type, uint8_t* out, uint16_t* scales) {
  for (int b = 0; b < K / kQBlock; ++b) {
    const float* xb = x + b * kQBlock;
    float amax = 0.0f, m = 0.0f;
    for (int j = 0; j < kQBlock; ++j)
      if (std::fabs(xb[j]) > amax) amax = std::fabs(xb[j]), m = xb[j];
    const float d = type == QType::Q8_0 ? amax / 127.0f : m / -8.0f;
    const uint16_t dh = f32_to_f16(d);
    scales[b] = dh;
    const float d16 = f16_to_f32(dh);
    int q[kQBlock];
    for (int j = 0; j < kQBlock; ++j) {
      const float r = d16 != 0.0f ? std::nearbyint(xb[j] / d16) : 0.0f;
      if (type == QType::Q8_0) q[j] = static_cast<int>(std::fmax(-127.0f, std::fmin(127.0f, r)));
      else q[j] = static_cast<int>(std::fmax(0.0f, std::fmin(15.0f, r + 8.0f)));
    }
    if (type == QType::Q8_0) {
      for (int j = 0; j < kQBlock; ++j) out[b * 32 + j] = static_cast<uint8_t>(static_cast<int8_t>(q[j]));
    } else {
      for (int j = 0; j < 16; ++j) out[b * 16 + j] = static_cast<uint8_t>(q[j] | (q[j + 16] << 4));
    }
  }
}

// The value of weight element (n, k) of a quantized matrix, as f32 (exact: an int times an f16).
static inline float qweight_value(const QMatB& B, int n, int k) {
  const uint8_t* row = B.data + static_cast<int64_t>(n) * B.ld;
  const float d = f16_to_f32(B.scales[static_cast<int64_t>(n) * B.ld_scales + k / kQBlock]);
  if (B.type == QType::Q8_0) return static_cast<float>(static_cast<int8_t>(row[k])) * d;
  const int b = k / kQBlock, j = k % kQBlock;
  const uint8_t byte = row[b * 16 + (j & 15)];
  const int u = j < 16 ? (byte & 15) : (byte >> 4);
  return static_cast<float>(u - 8) * d;
}

}  // namespace vdiff::cpu
