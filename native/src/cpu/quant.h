// Block-quantized weights (Q8_0, Q4_0) and the integer GEMM that multiplies them with activations
// quantized to int8 per row and block of 32, in the layout of llama.cpp's formats of the same names (the
// bytes are our own).
//
// Formats, per row of a weight W[N][K] (K a multiple of 32), blocks b of 32 consecutive k:
//   Q8_0: 32 int8 q[j] at row + 32 b; value = q[j] * d[b].
//   Q4_0: 16 bytes at row + 16 b; byte j holds element j in its low nibble and element j + 16 in its high
//         nibble, unsigned u in 0..15; value = (u - 8) * d[b].
//   d[b]: one IEEE f16 scale per block (a separate [N][K/32] array).
// Activations (the left operand) are quantized to int8 per row and block of 32 (QBlockA): scale
// s = max|x| / 127 (f32), q = round_to_nearest_even(x * (127 / max|x|)), so |q| <= 127; an all-zero block
// has s = 0 and q = 0. Each block also carries sum(q), which the integer kernels use to multiply with
// unsigned bytes (below).
//
// The product, per output (m, n): acc starts at C[m][n] when accumulating, else at 0; for each block b in
// ascending order, I = sum_j q_a[j] * q_w[j] (exact in int32: |I| <= 32 * 127 * 128), then
// acc = fma(float(I), s_a[m][b] * d_w[n][b], acc) (the scale product rounded to f32 first; float(I) is
// exact). Every ISA computes exactly these operations, so they agree bit for bit:
//   - avx512vnni: vpdpbusd, unsigned weight bytes times signed activations; a Q8_0 weight is stored as
//     q + 128 and a Q4_0 one as its nibble u = q + 8, and I = sum(u_w * q_a) - offset * sum(q_a);
//   - avx2: vpmaddubsw + vpmaddwd (the sign of each activation moved onto its weight for Q8_0, so that no
//     pair of products saturates int16; Q4_0's nibbles are small enough to multiply as they are);
//   - portable: plain integer loops.
// A Q8_0 value is in [-127, 127], as quantize_weight_row (and llama.cpp) write them; a stored -128 (which
// the AVX2 sign trick could not negate) reads as -127 on every path (q8_value).
// Rotation (QMatB::rotation = R > 0): the weight's rows were multiplied by the Walsh-Hadamard matrix H_R
// (entries +-1, H_R H_R = R I) block by block of R consecutive k before they were quantized, and the
// activations are transformed the same way (hadamard_transform) before their int8 rounding, with the
// scales multiplied by 1 / R (exact: R is a power of two). The product is then the same W x in exact
// arithmetic, (W H)(H x) / R, but an outlier of x or of a weight row is spread over R values before it
// is rounded to 8 (or 4) bits, so much less is lost to rounding. `vdiff quantize` and --quantize rotate
// Q8_0 weights (weight_rotation; the metadata "vdiff.rotation": "hadamard"); R = 0: not rotated.
// The SIMD kernels read the weight packed at load (QuantKernels::pack_panel; the MoE experts, which stay
// mapped, per product): panels of `nr` columns, per block of 32 k the integer bytes laid out for the
// instruction, then the panel's f32 scales.
// Against the float64 value of sum_b s_a d_w I (the exact product of the dequantized operands) the error
// is at most (K/32 + 2) * 2^-23 * sum|products| (the tests check it).
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
static inline constexpr int qblock_bytes(QType t) { return t == QType::Q8_0 ? 32 : 16; }

// A quantized weight matrix W[N][K] (the product uses W^T, like MatB with k_major == false).
struct QMatB {
  const uint8_t* data = nullptr;     // row n at data + n * ld
  const uint16_t* scales = nullptr;  // f16 bits; row n's block b at scales[n * ld_scales + b]
  QType type = QType::Q8_0;
  int64_t ld = 0;                // bytes between rows
  int64_t ld_scales = 0;         // scales between rows
  const void* packed = nullptr;  // the matrix packed at load for the ISA's gemm (QuantKernels::pack_panel)
  int rotation = 0;              // R: rows rotated by Hadamard blocks of R k (above); 0: none
};

// A block of 32 activations quantized to int8: 40 bytes, read by the kernels as they are staged.
struct QBlockA {
  int8_t q[kQBlock];
  float scale;  // max|x| / 127
  int32_t sum;  // sum of q
};
static_assert(sizeof(QBlockA) == 40, "QBlockA is packed as the kernels read it");

// A quantized weight prepared for an ISA's products: packed panels (QuantKernels::pack_panel) when the
// ISA packs, else the row-major blocks.
struct QuantKernels {
  const char* isa;   // "portable" | "avx2" | "avx512vnni"
  int nr;            // panel width of the packed weights (0: the gemm reads QMatB's rows; nothing is packed)
  bool q8_unsigned;  // its panels hold Q8_0 bytes as q + 128 (pack_quant_blocks' q8_unsigned)
  // quantize_activations (below), compiled for this ISA.
  void (*quantize)(int M, int K, const float* A, int64_t lda, QBlockA* out);
  // hadamard_transform (below) on this ISA's registers: the same butterflies in the same order, so the
  // same bits (an add and a subtract are an fma with +-1, rounded once).
  void (*rotate)(float* x, int K, int R);
  // quantize_weight_row (below) on this ISA's registers: the same divisions, roundings and clamps, so the
  // same bytes (`--quantize` at load quantizes every projection with it).
  void (*quantize_weights)(const float* x, int K, QType type, uint8_t* out, uint16_t* scales);
  // C[m][n] for 0 <= m < M, n0 <= n < n1 as described above (K % 32 == 0), row m of the activations at
  // A + m * (K / 32). The SIMD gemms read B.packed (n0 a multiple of nr) or, when it is nullptr, pack B's
  // rows per k block into the scratch: gemm_scratch_floats(K) floats, 64-byte aligned.
  void (*gemm)(int M, int n0, int n1, int K, const QBlockA* A, const QMatB& B, float* C, int64_t ldc, bool accumulate,
               float* scratch);
  size_t (*gemm_scratch_floats)(int K);
  // Panel p of B (columns [p * nr, +nr), past N zero) in this ISA's layout, packed_panel_bytes(K, type)
  // bytes at out (64-byte aligned). nullptr where nr is 0.
  void (*pack_panel)(const QMatB& B, int N, int K, int panel, void* out);
  size_t (*packed_panel_bytes)(int K, QType type);
};

// The quantized kernels matching a float kernel table: the same ISA family (avx512 -> avx512vnni when the
// CPU has VNNI, else avx2). Never nullptr.
const QuantKernels& quant_kernels_for(const Kernels& k);
// Per-ISA tables; call only when the CPU supports the ISA.
const QuantKernels* quant_portable_kernels();    // quant_portable.cpp
const QuantKernels* quant_avx2_kernels();        // kernels_avx2.cpp
const QuantKernels* quant_avx512vnni_kernels();  // kernels_avx512.cpp
bool cpu_has_avx512vnni();

// Quantizes rows A[0..M)[0..K) (K % 32 == 0, row stride lda) into blocks, row m at out + m * (K / 32).
// The same arithmetic on every ISA; SIMD only where the loop vectorizes as written.
static inline void quantize_activations(int M, int K, const float* A, int64_t lda, QBlockA* out) {
  for (int m = 0; m < M; ++m)
    for (int b = 0; b < K / kQBlock; ++b) {
      const float* x = A + static_cast<int64_t>(m) * lda + b * kQBlock;
      QBlockA& o = out[static_cast<int64_t>(m) * (K / kQBlock) + b];
      float amax = 0.0f;
      for (int j = 0; j < kQBlock; ++j) amax = amax >= std::fabs(x[j]) ? amax : std::fabs(x[j]);
      o.scale = amax / 127.0f;
      const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
      int32_t sum = 0;
      for (int j = 0; j < kQBlock; ++j) {
        o.q[j] = static_cast<int8_t>(std::nearbyint(x[j] * inv));
        sum += o.q[j];
      }
      o.sum = sum;
    }
}

// The Hadamard block width for K in-features (K % 32 == 0): the largest power of two <= 128 dividing K.
static inline int hadamard_block(int K) {
  int r = 128;
  while (K % r != 0) r /= 2;
  return r;
}

// The rotation `vdiff quantize` and --quantize give a weight of K in-features: Q8_0 hadamard_block(K), Q4_0
// none. Measured on the embedded model (bench/cpu/quant-quality.ts, against exact f32 products): rotating
// took Q8_0's greedy agreement from 84.8% to 88.0% (32 prompts x 32 tokens) and from 73.0% to 83.2%
// (48 x 64) at the same held-out loss; for Q4_0 it lowered the loss increase (0.25% to 0.19%) but its
// greedy agreement fell from 68.4% to 38.4%, so Q4_0 is left unrotated. src/model/quantize.ts decides alike.
static inline int weight_rotation(QType type, int K) { return type == QType::Q8_0 ? hadamard_block(K) : 0; }

// The LM head is not quantized (`vdiff quantize` and --quantize keep it in its stored dtype; a checkpoint
// that stores it quantized still loads), as GPTQ and AWQ keep it and llama.cpp gives it more bits: its
// int8 input cost the most greedy tokens of any. Measured on the embedded model against exact f32 products
// (rotated Q8_0): 88.0% of the tokens with the head quantized, 94.5% without (32 prompts x 32 tokens;
// 83.2% and 90.0% at 48 x 64); Q4_0 at 48 x 64: 52.8% with, 73.5% without. An 8B model's head is 6.5% of
// its weights and runs only over the rows whose logits are asked for.

// x[0 .. K) <- its unnormalised Walsh-Hadamard transform per block of R (a power of two dividing K):
// log2(R) rounds of butterflies (a, b) -> (a + b, a - b) at distance 1, 2, .., R / 2, each an f32 add,
// so every ISA and src/model/quantize.ts (which rotates the rows of `vdiff quantize` checkpoints) get the
// same bits.
static inline void hadamard_transform(float* x, int K, int R) {
  if (R <= 1) return;
  for (int b = 0; b < K; b += R)
    for (int h = 1; h < R; h *= 2)
      for (int i = b; i < b + R; i += 2 * h)
        for (int j = i; j < i + h; ++j) {
          const float u = x[j], v = x[j + h];
          x[j] = u + v;
          x[j + h] = u - v;
        }
}

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

// The scale of one weight block from its largest magnitude `amax` and (Q4_0) the first element `m` of that
// magnitude, rounded to f16: its bits into *scale, its value returned (quantize_weight_row says how).
static inline float weight_block_scale(QType type, float amax, float m, uint16_t* scale) {
  *scale = f32_to_f16(type == QType::Q8_0 ? amax / 127.0f : m / -8.0f);
  return f16_to_f32(*scale);
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
    const float d16 = weight_block_scale(type, amax, m, scales + b);
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

// A stored Q8_0 byte as the kernels read it: its signed value, -128 read as -127.
static inline int q8_value(uint8_t byte) {
  const int v = static_cast<int8_t>(byte);
  return v < -127 ? -127 : v;
}

// The bytes one column of a packed panel takes per block of 32 k: its integer bytes and its f32 scale.
static inline constexpr int qpacked_column_bytes(QType t) { return qblock_bytes(t) + 4; }

// The layout the SIMD kernels read, element by element (each ISA packs it on its registers, gemm_driver.h
// pack_quant_panel_blocks, and the kernel tests hold those to these bytes):
// blocks [b0, b0 + nb) of the columns [n0, n0 + nr) of B (past N zero),
// per block of 32 k, the integer bytes as groups of 4 consecutive k per column, then the nr f32 scales.
//   Q8_0: group g (k = 4g .. 4g+3) at g * 4 * nr: column c's 4 bytes at 4c, XOR 0x80 when
//         `q8_unsigned` (q + 128, for vpdpbusd's unsigned operand); 8 groups.
//   Q4_0: group pair p (k = 4p .. 4p+3 in the low nibbles, 16+4p .. 19+4p in the high ones) at p * 4 * nr:
//         column c's 4 bytes at 4c, which are the stored bytes 4p .. 4p+3 of its block as they are; 4 pairs.
static inline void pack_quant_blocks(const QMatB& B, int N, int n0, int nr, int b0, int nb, bool q8_unsigned,
                                     void* out) {
  const int qbytes = qblock_bytes(B.type);
  const uint8_t flip = B.type == QType::Q8_0 && q8_unsigned ? 0x80 : 0x00;
  uint8_t* o = static_cast<uint8_t*>(out);
  for (int b = b0; b < b0 + nb; ++b, o += static_cast<size_t>(nr) * qpacked_column_bytes(B.type)) {
    float* scales = reinterpret_cast<float*>(o + static_cast<size_t>(nr) * qbytes);
    for (int c = 0; c < nr; ++c) {
      const int n = n0 + c;
      const uint8_t* block =
          n < N ? B.data + static_cast<int64_t>(n) * B.ld + static_cast<int64_t>(b) * qbytes : nullptr;
      for (int g = 0; g < qbytes / 4; ++g)
        for (int kk = 0; kk < 4; ++kk) {
          uint8_t byte = block ? block[4 * g + kk] : 0;
          if (B.type == QType::Q8_0) byte = static_cast<uint8_t>(q8_value(byte)) ^ flip;
          o[(static_cast<size_t>(g) * nr + c) * 4 + kk] = block ? byte : 0;
        }
      scales[c] = block ? f16_to_f32(B.scales[static_cast<int64_t>(n) * B.ld_scales + b]) : 0.0f;
    }
  }
}

// The value of weight element (n, k) of a quantized matrix, as f32 (exact: an int times an f16).
static inline float qweight_value(const QMatB& B, int n, int k) {
  const uint8_t* row = B.data + static_cast<int64_t>(n) * B.ld;
  const float d = f16_to_f32(B.scales[static_cast<int64_t>(n) * B.ld_scales + k / kQBlock]);
  if (B.type == QType::Q8_0) return static_cast<float>(q8_value(row[k])) * d;
  const int b = k / kQBlock, j = k % kQBlock;
  const uint8_t byte = row[b * 16 + (j & 15)];
  const int u = j < 16 ? (byte & 15) : (byte >> 4);
  return static_cast<float>(u - 8) * d;
}

}  // namespace vdiff::cpu
