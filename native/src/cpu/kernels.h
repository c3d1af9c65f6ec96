// The CPU kernel interface: one table of functions per instruction set (portable C++, AVX2+FMA,
// AVX-512), chosen once at run time. The model calls kernels single-threaded on slices of the work and
// does the threading itself.
//
// ODR note: the AVX2/AVX-512 translation units are compiled with wider -m flags. Anything with external
// linkage they define could be picked by the linker for the portable code too, so they define nothing but
// their table getter, and the helpers in this header are `static`. For the same reason the GEMM driver they
// share (gemm_driver.h) is a header each of them includes inside its own anonymous namespace, not a
// translation unit or template with external linkage of its own.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace vdiff::cpu {

enum class WType : int { F32 = 0, BF16 = 1, F16 = 2 };

// The right-hand operand of a GEMM.
//   k_major == false: a weight matrix W[N][K] as PyTorch's Linear stores it (the product uses W^T).
//   k_major == true:  a plain B[K][N] (used for attention's P·V).
// `ld` is the distance in elements between consecutive rows of the stored matrix.
struct MatB {
  const void* data = nullptr;
  WType type = WType::F32;
  int64_t ld = 0;
  bool k_major = false;
  // Optional: the whole matrix already in the layout the gemm packs into (Kernels::pack_panel, panel p at
  // packed + p * packed_panel_bytes(B, K) bytes). The gemm then reads it instead of packing per call, with
  // the same values in the same order, so the result is bit for bit the same; its n0 must be a multiple of
  // gemm_nr.
  const void* packed = nullptr;
  // A bf16 B is multiplied as the bf16 dot product (Kernels::gemm) unless this is false: then it is widened
  // to f32 like an f16 one (attention over a bf16 KV cache keeps f32 queries and probabilities).
  bool bf16_dot = true;
};

struct Kernels {
  const char* isa;  // "portable" | "avx2" | "avx512" | "avx512bf16" | "amx"
  int gemm_nr;      // column panel width: callers should split N at multiples of it
  // Floats of per-thread scratch (64-byte aligned) the gemm needs for a given K.
  size_t (*gemm_scratch_floats)(int K);

  // C[m][n] = (accumulate ? C[m][n] : 0) + sum_k A[m][k] * B(k, n), for 0 <= m < M and n0 <= n < n1.
  //
  // f32 and f16 B: B's elements are widened to f32 and the products accumulated in f32 in ascending k, one
  // fused multiply-add at a time in the SIMD kernels (so they agree bit for bit with each other; the
  // portable kernel multiplies, then adds).
  //
  // bf16 B with bf16_dot (the bf16 dot product, as vdpbf16ps and llama.cpp compute it): A's elements are
  // first rounded to bf16 (round_to_bf16), then each output is one f32 chain over the pairs of k (2i, 2i+1)
  // in ascending i, adding the odd product first: c += a[2i+1] b[2i+1]; c += a[2i] b[2i] (an odd K pads a
  // zero). The products of two bf16 values are exact in f32, so each step rounds once; denormal inputs
  // count as zero and denormal sums flush to zero. Every ISA computes exactly this (the avx512bf16 path with
  // vdpbf16ps, the others with the FMA or multiply-add it equals under FTZ/DAZ), so all agree bit for bit;
  // only a product below 2^-126 may differ. The one exception is amx, whose TDPBF16PS sums each 32 k in an
  // order of its own: the same rounded operands and denormal rules, an f32 result within the bound of
  // recursive summation, deterministic and independent of M and the thread split, but not these bits.
  void (*gemm)(int M, int n0, int n1, int K, const float* A, int64_t lda, const MatB& B, float* C, int64_t ldc,
               bool accumulate, float* scratch);

  // rmsnorm, silu_mul, softmax and exp below: the SIMD ISAs agree bit for bit here too, in the order of the
  // AVX-512 registers, which the AVX2 kernels reproduce with two or four 8-lane registers (a model must
  // answer the same on any SIMD CPU: test/api-responses holds recorded answers byte for byte):
  //   exp: x clamped to [-104, 88.8], n = round(x log2 e), r = x - n ln 2 (two fused steps), a degree-5
  //     polynomial, times 2^n with one rounding (denormal results kept, +inf past the top);
  //   rmsnorm's sum of squares: fused, element i in lane i mod 32 (a tail past the last whole 32 in lane
  //     i mod 16), the two 16-lane halves added, then the 16 lanes reduced as _mm512_reduce_add_ps does
  //     (upper 8 + lower 8, upper 4 + lower 4, then (0 + 2) + (1 + 3));
  //   softmax's sum: element i in lane i mod 16, reduced the same way.
  // The portable kernels multiply, then add, in plain order. tests/kernels_tests.cpp spells the order out
  // in scalar code (simd_order) and holds every SIMD ISA to it.
  //
  // y = x * (1 / sqrt(mean(x^2) + eps)) * w, all f32 (y may alias x).
  void (*rmsnorm)(const float* x, const float* w, float* y, int n, float eps);

  // out = silu(gate) * up = gate / (1 + exp(-gate)) * up (out may alias gate or up).
  void (*silu_mul)(const float* gate, const float* up, float* out, int n);

  // x = softmax(x * scale), in place.
  void (*softmax)(float* x, int n, float scale);

  // y = exp(x) elementwise (exposed for tests; accurate to a few ulp, exp(-inf) = 0).
  void (*exp)(const float* x, float* y, int n);

  // dst[i] = float(src[i]) for a row of weights of any supported type.
  void (*convert)(const void* src, WType type, float* dst, int n);

  // Packs column panel `panel` of the product's right-hand side B (N columns, K rows: columns
  // [panel * gemm_nr, +gemm_nr)) into out (packed_panel_bytes(B, K) bytes, 64-byte aligned), as gemm
  // would; columns past N are zero. Lets a caller pack a constant matrix (a weight) once instead of on every
  // gemm call (MatB::packed). nullptr for an ISA whose gemm does not pack (portable).
  void (*pack_panel)(const MatB& B, int N, int K, int panel, void* out);
  size_t (*packed_panel_bytes)(const MatB& B, int K);  // nullptr where pack_panel is; B's data may be null

  // The bf16 dot product's left operand prepared once for many gemm calls (the products of one layer
  // input with several weights, in column ranges): stage_bf16_a writes A's rows rounded to bf16, in the
  // layout this ISA's bf16 products read, bf16_a_row_bytes(K) bytes per row (a multiple of 64) from `out`
  // (64-byte aligned); gemm_staged is gemm for a bf16 B (bf16_dot) with row m of A at As + m *
  // bf16_a_row_bytes(K), bit for bit the same result. nullptr where the ISA has none (portable).
  size_t (*bf16_a_row_bytes)(int K);
  void (*stage_bf16_a)(int M, int K, const float* A, int64_t lda, void* out);
  void (*gemm_staged)(int M, int n0, int n1, int K, const void* As, const MatB& B, float* C, int64_t ldc,
                      bool accumulate, float* scratch);
};

// f32 -> bf16 bits as the bf16 dot product rounds its left operand: round to nearest even; a denormal
// counts as zero (its sign kept); NaN stays a quiet NaN.
static inline uint16_t round_to_bf16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7f800000u) == 0) return static_cast<uint16_t>((x >> 16) & 0x8000u);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x0040u);
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

// The data caches this CPU reports (sysconf, from cpuid), for the GEMM's cache blocking; conservative
// defaults where it reports nothing (32 KiB L1d, 256 KiB L2).
struct CacheSizes {
  size_t l1d_bytes;
  size_t l2_bytes;
};
const CacheSizes& cache_sizes();

// The kernels for the running CPU: the widest available ISA, or the one named by the environment
// variable VDIFF_ISA=portable|avx2|avx512|avx512bf16|amx. Throws vdiff::Error(InvalidArgument) when VDIFF_ISA names an
// unknown ISA or one this CPU lacks.
const Kernels& active_kernels();

// The table for one ISA, or nullptr when the CPU (or the build) lacks it.
const Kernels* kernels_for(const std::string& isa);
std::vector<std::string> available_isas();

// The table a model's load option asks for (LoadOptions::cpu_isa): "auto" is active_kernels(); a named
// ISA is its table. Throws vdiff::Error(InvalidArgument) for an unknown name and Error(Unavailable),
// listing the available ones, for an ISA this CPU lacks.
const Kernels& kernels_for_setting(const std::string& isa);

// Per-ISA tables (defined in kernels_<isa>.cpp; call only when the CPU supports the ISA).
const Kernels* portable_kernels();
const Kernels* avx2_kernels();
const Kernels* avx512_kernels();
const Kernels* avx512bf16_kernels();  // avx512's table with the bf16 products on vdpbf16ps
const Kernels* amx_kernels();         // avx512bf16's table with the bf16 products on AMX tiles

// Scalar conversions shared by every translation unit (static: each TU keeps its own copy).
static inline float bf16_to_f32(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

static inline float f16_to_f32(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exponent = (h >> 10) & 0x1f;
  uint32_t mantissa = h & 0x3ff;
  uint32_t bits;
  if (exponent == 0x1f) {
    bits = sign | 0x7f800000u | (mantissa << 13);  // inf / nan
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);  // normal: rebias 15 -> 127
  } else if (mantissa == 0) {
    bits = sign;  // zero
  } else {
    // Subnormal half: normalise the mantissa into an f32 normal.
    int e = -1;
    do {
      ++e;
      mantissa <<= 1;
    } while ((mantissa & 0x400) == 0);
    bits = sign | ((112 - e) << 23) | ((mantissa & 0x3ff) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

static inline float weight_to_f32(const void* base, WType type, int64_t index) {
  switch (type) {
    case WType::F32: {
      float f;  // memcpy: safetensors gives no alignment guarantee
      std::memcpy(&f, static_cast<const char*>(base) + index * 4, 4);
      return f;
    }
    case WType::BF16: {
      uint16_t h;
      std::memcpy(&h, static_cast<const char*>(base) + index * 2, 2);
      return bf16_to_f32(h);
    }
    case WType::F16: {
      uint16_t h;
      std::memcpy(&h, static_cast<const char*>(base) + index * 2, 2);
      return f16_to_f32(h);
    }
  }
  return 0.0f;
}

}  // namespace vdiff::cpu
