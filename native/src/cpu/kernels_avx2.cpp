// AVX2 + FMA + F16C kernels. Only avx2_kernels() has external linkage (see kernels.h).
// Same scheme as the AVX-512 file with 8-wide vectors: panels of 16 columns, a 6 x 16 micro-tile in
// 12 ymm accumulators, one FMA chain per output in ascending k (bit-identical to the AVX-512 gemm). bf16
// weights are packed as bf16 pairs, their own size (so at load whatever the model's size), and widened to
// f32 in the micro-kernel, which for full panels is written in assembly (bf16_pair_micro_asm).
#include <immintrin.h>
#include <math.h>  // INFINITY

#include "quant.h"

namespace vdiff::cpu {
namespace {

constexpr int kMR = 6;
constexpr int kNR = 16;   // 2 ymm
constexpr int kKC = 256;  // 16 KiB packed block
constexpr int kLanes = 8;
constexpr int kPrefetchK = 16;  // the micro-kernel prefetches the packed row of B this many k ahead
constexpr bool kSplitThinTail = false;
constexpr int kQuantMR = 6;          // rows per micro-tile of the quantized path (run 3 at a time)
constexpr bool kQ8Unsigned = false;  // signed Q8_0 bytes: the sign trick of quant_rows below

inline int min_int(int a, int b) { return a < b ? a : b; }

// k per block of the quantized path: 1024 (32 blocks: 18 KiB of Q8_0 P, 10 KiB of Q4_0).
int quant_k_block(QType) { return 1024; }

// Lane mask (all-ones lanes) for the first n of 8 lanes.
inline __m256i tail_mask(int n) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lanes);
}

template <WType T>
inline float load1(const void* base, int64_t i) {
  return weight_to_f32(base, T, i);
}

// 8 elements at base[offset..] widened to f32; lanes at or past n read nothing and are zero.
template <WType T>
inline __m256 load8(const void* base, int64_t offset, int n) {
  if constexpr (T == WType::F32) {
    const float* p = static_cast<const float*>(base) + offset;
    return n >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, tail_mask(n));
  } else {
    const uint16_t* p = static_cast<const uint16_t*>(base) + offset;
    __m128i h;
    if (n >= 8) {
      h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    } else {
      alignas(16) uint16_t tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int i = 0; i < n; ++i) tmp[i] = p[i];
      h = _mm_load_si128(reinterpret_cast<const __m128i*>(tmp));
    }
    if constexpr (T == WType::BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    else return _mm256_cvtph_ps(h);
  }
}

// r[i][j] -> r[j][i] for an 8 x 8 block of floats.
inline void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

// A weight W[N][K]'s columns [n0, n0 + nv) over k [k0, k0 + kc), widened: 8 rows x 8 k transposed at a time
// (a bf16 model too large to keep packed at load packs every product this way; one element at a time it
// took 40% of the `small` preset's forward on Zen 3).
template <WType T>
void pack_transposed(const void* W, int64_t ld, int n0, int nv, int k0, int kc, float* P) {
  for (int g = 0; g < kNR / 8; ++g) {
    const int rows = nv - 8 * g;
    if (rows <= 0) {
      for (int k = 0; k < kc; ++k) _mm256_store_ps(P + k * kNR + 8 * g, _mm256_setzero_ps());
      continue;
    }
    for (int kk = 0; kk < kc; kk += 8) {
      const int kn = min_int(8, kc - kk);
      __m256 r[8];
      for (int i = 0; i < 8; ++i)
        r[i] = i < rows ? load8<T>(W, static_cast<int64_t>(n0 + 8 * g + i) * ld + k0 + kk, kn) : _mm256_setzero_ps();
      transpose8(r);
      for (int i = 0; i < kn; ++i) _mm256_store_ps(P + (kk + i) * kNR + 8 * g, r[i]);
    }
  }
}

template <WType T>
void pack_k_major(const void* B, int64_t ld, int n0, int nv, int k0, int kc, float* P) {
  for (int k = 0; k < kc; ++k) {
    const int64_t row = static_cast<int64_t>(k0 + k) * ld + n0;
    _mm256_store_ps(P + k * kNR, load8<T>(B, row, nv));
    _mm256_store_ps(P + k * kNR + 8, nv > 8 ? load8<T>(B, row + 8, nv - 8) : _mm256_setzero_ps());
  }
}

// The lane masks of a panel of nv columns, and whether it is the full kNR wide (plain loads and stores).
struct PanelMasks {
  __m256i lanes[kNR / 8];
  bool full_width;
};

PanelMasks panel_masks(int nv) { return {{tail_mask(nv), tail_mask(nv - 8)}, nv == kNR}; }

// The loops over rows and vectors are unrolled by pragma so that GCC keeps acc[][] in registers (12 + 2 + 1
// of the 16 ymm at 6 x 16). Without it, GCC stored every accumulator to the stack on every k and the kernel
// ran at half the FMA rate (bench/cpu: 33% of the AVX2 peak before, see RESULTS.md).
template <int R, int NB>
void micro_kernel(int kc, const float* A, int64_t lda, const float* P, float* C, int64_t ldc, const PanelMasks& panel,
                  bool load_c) {
  __m256i mask[NB];
#pragma GCC unroll 4
  for (int j = 0; j < NB; ++j) mask[j] = panel.full_width ? _mm256_set1_epi32(-1) : panel.lanes[j];
  __m256 acc[R][NB];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j)
      acc[i][j] = load_c ? _mm256_maskload_ps(C + i * ldc + 8 * j, mask[j]) : _mm256_setzero_ps();
  for (int k = 0; k < kc; ++k) {
    __m256 b[NB];
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) b[j] = _mm256_load_ps(P + k * kNR + 8 * j);
    _mm_prefetch(reinterpret_cast<const char*>(P + (k + kPrefetchK) * kNR), _MM_HINT_T0);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const __m256 a = _mm256_broadcast_ss(A + i * lda + k);
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm256_fmadd_ps(a, b[j], acc[i][j]);
    }
  }
  if (panel.full_width) {
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) _mm256_storeu_ps(C + i * ldc + 8 * j, acc[i][j]);
  } else {
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) _mm256_maskstore_ps(C + i * ldc + 8 * j, mask[j], acc[i][j]);
  }
}

// The bf16 dot product on bf16-pair panels (gemm_driver.h's Bf16PairPath): P[s][j] holds the bf16 pair
// (k = 2s in the low half, 2s + 1 in the high half) of column j, widened here to f32 with an and (the odd
// half) and a shift (the even one); A[i][2s] is a[2s + 1] and A[i][2s + 1] is a[2s] (staged rounded to bf16,
// pairs swapped), so each output's chain adds the odd product first, as kernels.h defines it. Per k pair the
// odd halves go through every row, then the even ones.
constexpr int kBf16PairMR = 6;

// A full-width tile of R = 1..6 rows in assembly: at 6 rows its 12 accumulators, the and-mask, the two widened
// vectors and the broadcast take all 16 ymm registers, and GCC, given the same code in intrinsics, spilled
// the mask and moved registers around every step (67% of the FMA peak in L1 against 90-97% here and for the
// f32 micro-kernel), and ran the 4-row tail at half the 6-row rate (bench/cpu/RESULTS.md). The assembler's
// .if keeps the lines of rows below R. Registers: ymm0..11 the accumulators (row i in ymm 2i and 2i + 1),
// ymm12 the mask of the high halves, ymm13/14 a widened pair of column vectors, ymm15 the broadcast of A.
// A's rows are addressed as a, a + lda, a + 2 lda and a3 = a + 3 lda, a3 + lda, a3 + 2 lda (lda in bytes).
template <int R>
void bf16_pair_micro_asm(int steps, const float* A, int64_t lda, const uint32_t* P, float* C, int64_t ldc,
                         bool load_c) {
  static_assert(R >= 1 && R <= 6, "six rows fill the registers");
  const float* a3 = A + 3 * lda;
  const int64_t lda_bytes = lda * 4, ldc_bytes = ldc * 4;
  int64_t n = steps;
  const int64_t load = load_c ? 1 : 0;
  // clang-format off
// Row i's two FMAs with the broadcast of the A element at addr, if R > i.
#define VDIFF_ROW_FMA(i, addr, r0, r1)                 \
  ".if %c[rows] > " #i "\n\t"                          \
  "vbroadcastss " addr ", %%ymm15\n\t"                 \
  "vfmadd231ps %%ymm15, %%ymm13, %%ymm" #r0 "\n\t"     \
  "vfmadd231ps %%ymm15, %%ymm14, %%ymm" #r1 "\n\t"     \
  ".endif\n\t"
#define VDIFF_ROWS_FMA(offset)                                                                      \
  VDIFF_ROW_FMA(0, offset "(%[a])", 0, 1)  VDIFF_ROW_FMA(1, offset "(%[a], %[lda])", 2, 3)          \
  VDIFF_ROW_FMA(2, offset "(%[a], %[lda], 2)", 4, 5)  VDIFF_ROW_FMA(3, offset "(%[a3])", 6, 7)      \
  VDIFF_ROW_FMA(4, offset "(%[a3], %[lda])", 8, 9)  VDIFF_ROW_FMA(5, offset "(%[a3], %[lda], 2)", 10, 11)
// Row i of C (at rax, which then steps to the next row) loaded into, stored from or zeroed in its
// accumulators, if R > i.
#define VDIFF_ROW_LOAD(i, r0, r1)                      \
  ".if %c[rows] > " #i "\n\t"                          \
  "vmovups (%%rax), %%ymm" #r0 "\n\t"                  \
  "vmovups 32(%%rax), %%ymm" #r1 "\n\t"                \
  "add %[ldc], %%rax\n\t"                              \
  ".endif\n\t"
#define VDIFF_ROW_STORE(i, r0, r1)                     \
  ".if %c[rows] > " #i "\n\t"                          \
  "vmovups %%ymm" #r0 ", (%%rax)\n\t"                  \
  "vmovups %%ymm" #r1 ", 32(%%rax)\n\t"                \
  "add %[ldc], %%rax\n\t"                              \
  ".endif\n\t"
#define VDIFF_ROW_ZERO(i, r0, r1)                      \
  ".if %c[rows] > " #i "\n\t"                          \
  "vxorps %%ymm" #r0 ", %%ymm" #r0 ", %%ymm" #r0 "\n\t" \
  "vxorps %%ymm" #r1 ", %%ymm" #r1 ", %%ymm" #r1 "\n\t" \
  ".endif\n\t"
  __asm__ volatile(
      "test %[load], %[load]\n\t"
      "jz 3f\n\t"
      "mov %[c], %%rax\n\t"
      VDIFF_ROW_LOAD(0, 0, 1) VDIFF_ROW_LOAD(1, 2, 3) VDIFF_ROW_LOAD(2, 4, 5)
      VDIFF_ROW_LOAD(3, 6, 7) VDIFF_ROW_LOAD(4, 8, 9) VDIFF_ROW_LOAD(5, 10, 11)
      "jmp 4f\n\t"
      "3:\n\t"
      VDIFF_ROW_ZERO(0, 0, 1) VDIFF_ROW_ZERO(1, 2, 3) VDIFF_ROW_ZERO(2, 4, 5)
      VDIFF_ROW_ZERO(3, 6, 7) VDIFF_ROW_ZERO(4, 8, 9) VDIFF_ROW_ZERO(5, 10, 11)
      "4:\n\t"
      "vpcmpeqd %%ymm12, %%ymm12, %%ymm12\n\t"
      "vpslld $16, %%ymm12, %%ymm12\n\t"
      "test %[n], %[n]\n\t"
      "jle 2f\n\t"
      "1:\n\t"
      "vpand (%[p]), %%ymm12, %%ymm13\n\t"  // the odd k: the high halves
      "vpand 32(%[p]), %%ymm12, %%ymm14\n\t"
      VDIFF_ROWS_FMA("")
      "vmovdqa (%[p]), %%ymm13\n\t"  // the even k: the low halves, shifted up
      "vmovdqa 32(%[p]), %%ymm14\n\t"
      "vpslld $16, %%ymm13, %%ymm13\n\t"
      "vpslld $16, %%ymm14, %%ymm14\n\t"
      "prefetcht0 %c[ahead](%[p])\n\t"
      VDIFF_ROWS_FMA("4")
      "add $64, %[p]\n\t"
      "add $8, %[a]\n\t"
      "add $8, %[a3]\n\t"
      "dec %[n]\n\t"
      "jnz 1b\n\t"
      "2:\n\t"
      "mov %[c], %%rax\n\t"
      VDIFF_ROW_STORE(0, 0, 1) VDIFF_ROW_STORE(1, 2, 3) VDIFF_ROW_STORE(2, 4, 5)
      VDIFF_ROW_STORE(3, 6, 7) VDIFF_ROW_STORE(4, 8, 9) VDIFF_ROW_STORE(5, 10, 11)
      : [p] "+r"(P), [a] "+r"(A), [a3] "+r"(a3), [n] "+r"(n)
      : [c] "r"(C), [ldc] "r"(ldc_bytes), [lda] "r"(lda_bytes), [load] "r"(load), [rows] "i"(R),
        [ahead] "i"(kPrefetchK * kNR * sizeof(uint32_t))
      : "rax", "cc", "memory", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9",
        "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
#undef VDIFF_ROW_FMA
#undef VDIFF_ROWS_FMA
#undef VDIFF_ROW_LOAD
#undef VDIFF_ROW_STORE
#undef VDIFF_ROW_ZERO
  // clang-format on
}

// A panel narrower than 16 columns: the same chain in intrinsics, with masked loads and stores of C.
template <int R, int NB>
void bf16_pair_micro(int steps, const float* A, int64_t lda, const uint32_t* P, float* C, int64_t ldc,
                     const PanelMasks& panel, bool load_c) {
  if constexpr (NB == 2)
    if (panel.full_width) return bf16_pair_micro_asm<R>(steps, A, lda, P, C, ldc, load_c);
  const __m256i* mask = panel.lanes;
  __m256 acc[R][NB];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j)
      acc[i][j] = load_c ? _mm256_maskload_ps(C + i * ldc + 8 * j, mask[j]) : _mm256_setzero_ps();
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  for (int s = 0; s < steps; ++s) {
    const __m256i* pairs = reinterpret_cast<const __m256i*>(P + s * kNR);
    __m256 b[NB];
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) b[j] = _mm256_castsi256_ps(_mm256_and_si256(_mm256_load_si256(pairs + j), high));
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const __m256 a = _mm256_broadcast_ss(A + i * lda + 2 * s);
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm256_fmadd_ps(a, b[j], acc[i][j]);
    }
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) b[j] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_load_si256(pairs + j), 16));
    _mm_prefetch(reinterpret_cast<const char*>(P + (s + kPrefetchK) * kNR), _MM_HINT_T0);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const __m256 a = _mm256_broadcast_ss(A + i * lda + 2 * s + 1);
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm256_fmadd_ps(a, b[j], acc[i][j]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) _mm256_maskstore_ps(C + i * ldc + 8 * j, mask[j], acc[i][j]);
}

// Bf16PairPath's pack of a bf16 weight W[N][K]: a row's 32-bit words are its pairs already, so 8 rows x 8
// words are transposed at a time (an odd kc's last pair holds a zero past kc).
void pack_bf16_pairs(const uint16_t* W, int64_t ld, int n0, int nv, int k0, int kc, uint32_t* P) {
  const int steps = (kc + 1) / 2;
  for (int g = 0; g < kNR / 8; ++g) {
    const int rows = nv - 8 * g;
    for (int ss = 0; ss < steps; ss += 8) {
      const int sn = min_int(8, steps - ss);
      __m256 r[8];
      for (int i = 0; i < 8; ++i) {
        if (i >= rows) {
          r[i] = _mm256_setzero_ps();
          continue;
        }
        const uint16_t* row = W + static_cast<int64_t>(n0 + 8 * g + i) * ld + k0 + 2 * ss;
        if (2 * (ss + sn) > kc) {  // an odd kc's last pair: its k past kc is zero, and not read
          alignas(32) uint16_t pairs[16] = {};
          __builtin_memcpy(pairs, row, sizeof(uint16_t) * (kc - 2 * ss));
          r[i] = _mm256_load_ps(reinterpret_cast<const float*>(pairs));
        } else {
          const float* words = reinterpret_cast<const float*>(row);
          r[i] = sn >= 8 ? _mm256_loadu_ps(words) : _mm256_maskload_ps(words, tail_mask(sn));
        }
      }
      transpose8(r);
      for (int i = 0; i < sn; ++i) _mm256_store_ps(reinterpret_cast<float*>(P + (ss + i) * kNR + 8 * g), r[i]);
    }
  }
}

inline float hmax8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// quantize_weight_row (quant.h) on 8 lanes, per block of 32: max|x| (a NaN never wins, as in the scalar
// compare), for Q4_0 the first element of that magnitude, the scale through f16, then x / d rounded to
// nearest even and clamped with min/max, whose NaN rule (the second operand) is fmin's and fmax's here.
void quantize_weights(const float* x, int K, QType type, uint8_t* out, uint16_t* scales) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const bool q8 = type == QType::Q8_0;
  for (int b = 0; b < K / kQBlock; ++b) {
    const float* xb = x + b * kQBlock;
    __m256 v[4], a[4];
    __m256 mx = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_loadu_ps(xb + 8 * i);
      a[i] = _mm256_and_ps(v[i], absmask);
      mx = _mm256_max_ps(a[i], mx);
    }
    mx = _mm256_max_ps(mx, _mm256_permute2f128_ps(mx, mx, 1));
    mx = _mm256_max_ps(mx, _mm256_permute_ps(mx, 0x4e));
    mx = _mm256_max_ps(mx, _mm256_permute_ps(mx, 0xb1));
    const float amax = _mm256_cvtss_f32(mx);
    float m = 0.0f;
    if (!q8 && amax > 0.0f) {
      uint32_t at = 0;
      for (int i = 0; i < 4; ++i)
        at |= static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(a[i], mx, _CMP_EQ_OQ))) << (8 * i);
      m = xb[__builtin_ctz(at)];
    }
    const float d16 = weight_block_scale(type, amax, m, scales + b);
    const __m256 d = _mm256_set1_ps(d16);
    const __m256 hi = _mm256_set1_ps(q8 ? 127.0f : 15.0f), lo = _mm256_set1_ps(q8 ? -127.0f : 0.0f);
    const __m256 shift = _mm256_set1_ps(q8 ? 0.0f : 8.0f);
    alignas(32) int32_t q[kQBlock];
    for (int i = 0; i < 4; ++i) {
      __m256 r = _mm256_setzero_ps();
      if (d16 != 0.0f) r = _mm256_round_ps(_mm256_div_ps(v[i], d), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      if (!q8) r = _mm256_add_ps(r, shift);
      _mm256_store_si256(reinterpret_cast<__m256i*>(q + 8 * i),
                         _mm256_cvtps_epi32(_mm256_max_ps(_mm256_min_ps(r, hi), lo)));
    }
    if (q8) {
      for (int j = 0; j < kQBlock; ++j) out[32 * b + j] = static_cast<uint8_t>(static_cast<int8_t>(q[j]));
    } else {
      for (int j = 0; j < 16; ++j) out[16 * b + j] = static_cast<uint8_t>(q[j] | (q[j + 16] << 4));
    }
  }
}

// hadamard_transform (quant.h) on 8 lanes, for R of 32, 64 or 128 (R / 8 registers per block): the
// butterflies at distance 1, 2 and 4 inside each register (its partner x[i ^ h] permuted in, then
// fma(+-1, x[i], partner)), then those at 8 .. 64 between registers, in the scalar order, so the same bits.
void hadamard_isa(float* x, int K, int R) {
  if (R % 8 != 0 || R > 128) return hadamard_transform(x, K, R);
  const int nv = R / 8;
  __m256i partner[3];
  __m256 sign[3];
  for (int s = 0; s < 3; ++s) {
    alignas(32) int32_t idx[8];
    alignas(32) float sg[8];
    for (int i = 0; i < 8; ++i) idx[i] = i ^ (1 << s), sg[i] = (i & (1 << s)) ? -1.0f : 1.0f;
    partner[s] = _mm256_load_si256(reinterpret_cast<const __m256i*>(idx));
    sign[s] = _mm256_load_ps(sg);
  }
  for (int b = 0; b < K; b += R) {
    __m256 v[16];
    for (int i = 0; i < nv; ++i) v[i] = _mm256_loadu_ps(x + b + 8 * i);
    for (int s = 0; s < 3; ++s)
      for (int i = 0; i < nv; ++i) v[i] = _mm256_fmadd_ps(sign[s], v[i], _mm256_permutevar8x32_ps(v[i], partner[s]));
    for (int d = 1; d < nv; d *= 2)
      for (int i = 0; i < nv; i += 2 * d)
        for (int j = i; j < i + d; ++j) {
          const __m256 u = v[j], w = v[j + d];
          v[j] = _mm256_add_ps(u, w);
          v[j + d] = _mm256_sub_ps(u, w);
        }
    for (int i = 0; i < nv; ++i) _mm256_storeu_ps(x + b + 8 * i, v[i]);
  }
}

// quantize_activations (quant.h) on 8 lanes: the same max, scale, inverse and rounding (the current mode,
// round to nearest even), so the same bytes.
void quantize_rows_isa(int M, int K, const float* A, int64_t lda, QBlockA* out) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  for (int m = 0; m < M; ++m)
    for (int b = 0; b < K / kQBlock; ++b) {
      const float* x = A + static_cast<int64_t>(m) * lda + b * kQBlock;
      QBlockA& o = out[static_cast<int64_t>(m) * (K / kQBlock) + b];
      __m256 v[4], mx = _mm256_setzero_ps();
      for (int i = 0; i < 4; ++i) {
        v[i] = _mm256_loadu_ps(x + 8 * i);
        mx = _mm256_max_ps(mx, _mm256_and_ps(v[i], absmask));
      }
      const float amax = hmax8(mx);
      o.scale = amax / 127.0f;
      const __m256 inv = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
      __m256i q[4], sum = _mm256_setzero_si256();
      for (int i = 0; i < 4; ++i) {
        q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));
        sum = _mm256_add_epi32(sum, q[i]);
      }
      // packs work per 128-bit lane: [q0 0..3, q1 0..3 | q0 4..7, q1 4..7] and so on; the permutes restore order.
      const __m256i w01 = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[0], q[1]), 0xd8);
      const __m256i w23 = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[2], q[3]), 0xd8);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o.q),
                          _mm256_permute4x64_epi64(_mm256_packs_epi16(w01, w23), 0xd8));
      __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
      o.sum = _mm_cvtsi128_si32(s4);
    }
}

// An empty statement that reads and writes v in a register: integer sums may be reassociated, and GCC turned
// each accumulator's chain of eight vpaddd into a tree over all 48 products of a block, stored on the stack
// (48 spills and reloads per block); this keeps each accumulator one chain in a register.
inline void keep_in_register(__m256i& v) { __asm__("" : "+x"(v)); }

inline int32_t load_i32(const int8_t* p) {
  int32_t v;
  __builtin_memcpy(&v, p, 4);
  return v;
}

// Rows [0, RC) of the quantized micro-kernel over one block at P (gemm_driver.h): int32 lanes per column
// from vpmaddubsw + vpmaddwd. Q8_0: |a| times the weight with a's sign (vpsignb), so no pair of products
// passes 2 * 127 * 127 (no int16 saturation). Q4_0: the nibbles (0..15) times a as they are, summed over the
// block in int16 lanes, then widened onto lanes starting at -8 * sum(q_a).
template <QType T, int RC, int NB>
void quant_rows(const QBlockA* A, int64_t lda, const uint8_t* P, float* C, int64_t ldc, const __m256i* mask,
                bool full_width, bool chain) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[RC][NB];
#pragma GCC unroll 4
  for (int r = 0; r < RC; ++r) {
    const __m256i init = _mm256_set1_epi32(T == QType::Q8_0 ? 0 : -8 * A[r * lda].sum);
#pragma GCC unroll 2
    for (int j = 0; j < NB; ++j) acc[r][j] = init;
  }
  if constexpr (T == QType::Q8_0) {
#pragma GCC unroll 8
    for (int g = 0; g < 8; ++g) {
      __m256i b[NB];
#pragma GCC unroll 2
      for (int j = 0; j < NB; ++j) b[j] = _mm256_load_si256(reinterpret_cast<const __m256i*>(P + g * 4 * kNR + 32 * j));
#pragma GCC unroll 4
      for (int r = 0; r < RC; ++r) {
        const __m256i a = _mm256_set1_epi32(load_i32(A[r * lda].q + 4 * g));
        const __m256i magnitude = _mm256_abs_epi8(a);
#pragma GCC unroll 2
        for (int j = 0; j < NB; ++j) {
          acc[r][j] = _mm256_add_epi32(
              acc[r][j], _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(b[j], a)), ones));
          keep_in_register(acc[r][j]);
        }
      }
    }
  } else {
    // Each step's vpmaddubsw lane is at most 2 * 15 * 128 = 3840 in magnitude, so the block's 8 steps sum
    // exactly in int16 lanes (at most 30720), widened once per block: one multiply per 32 products, not two.
    const __m256i low = _mm256_set1_epi8(0x0f);
    __m256i sum16[RC][NB];
#pragma GCC unroll 4
    for (int r = 0; r < RC; ++r)
#pragma GCC unroll 2
      for (int j = 0; j < NB; ++j) sum16[r][j] = _mm256_setzero_si256();
#pragma GCC unroll 8
    for (int gh = 0; gh < 8; ++gh) {
      const int g = gh >> 1, half = gh & 1;
      __m256i b[NB];
#pragma GCC unroll 2
      for (int j = 0; j < NB; ++j) {
        const __m256i v = _mm256_load_si256(reinterpret_cast<const __m256i*>(P + g * 4 * kNR + 32 * j));
        b[j] = _mm256_and_si256(half == 0 ? v : _mm256_srli_epi16(v, 4), low);
      }
#pragma GCC unroll 4
      for (int r = 0; r < RC; ++r) {
        const __m256i a = _mm256_set1_epi32(load_i32(A[r * lda].q + 4 * g + 16 * half));
#pragma GCC unroll 2
        for (int j = 0; j < NB; ++j) {
          sum16[r][j] = _mm256_add_epi16(sum16[r][j], _mm256_maddubs_epi16(b[j], a));
          keep_in_register(sum16[r][j]);
        }
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < RC; ++r)
#pragma GCC unroll 2
      for (int j = 0; j < NB; ++j) acc[r][j] = _mm256_add_epi32(acc[r][j], _mm256_madd_epi16(sum16[r][j], ones));
  }
  const float* ws = reinterpret_cast<const float*>(P + kNR * qblock_bytes(T));
#pragma GCC unroll 4
  for (int r = 0; r < RC; ++r) {
    const __m256 sa = _mm256_set1_ps(A[r * lda].scale);
#pragma GCC unroll 2
    for (int j = 0; j < NB; ++j) {
      float* c = C + r * ldc + 8 * j;
      const __m256 scale = _mm256_mul_ps(sa, _mm256_load_ps(ws + 8 * j));
      const __m256 prev = !chain       ? _mm256_setzero_ps()
                          : full_width ? _mm256_loadu_ps(c)
                                       : _mm256_maskload_ps(c, mask[j]);
      const __m256 v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][j]), scale, prev);
      if (full_width) _mm256_storeu_ps(c, v);
      else _mm256_maskstore_ps(c, mask[j], v);
    }
  }
}

// The quantized micro-kernel (gemm_driver.h): rows in runs of up to 3 (3 x 2 accumulators, the weights and
// the broadcasts fit the 16 ymm registers), each run over the block of P in L1.
template <QType T, int R, int NB>
void quant_micro(int blocks, const QBlockA* A, int64_t lda, const uint8_t* P, float* C, int64_t ldc,
                 const PanelMasks& panel, bool load_c) {
  constexpr int kBlockBytes = kNR * qpacked_column_bytes(T);
  for (int s = 0; s < blocks; ++s, P += kBlockBytes) {
    const bool chain = load_c || s > 0;
    if constexpr (R > 3) {
      quant_rows<T, 3, NB>(A + s, lda, P, C, ldc, panel.lanes, panel.full_width, chain);
      quant_rows<T, R - 3, NB>(A + 3 * lda + s, lda, P, C + 3 * ldc, ldc, panel.lanes, panel.full_width, chain);
    } else {
      quant_rows<T, R, NB>(A + s, lda, P, C, ldc, panel.lanes, panel.full_width, chain);
    }
  }
}

#define VDIFF_BF16_PAIR_PANELS 1  // Bf16PairPath with bf16_pair_micro and pack_bf16_pairs above
#include "gemm_driver.h"

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Cephes expf as in the AVX-512 file. 2^n is built in exponent fields, as 2^(n/2) * 2^(n - n/2) so both
// factors stay normal over the whole range n in [-126, 128]; below the range the result is 0 (the true
// value is a subnormal under 1.2e-38), above it inf.
inline __m256 exp8(__m256 x) {
  // kernels.h's SIMD exp, as exp16 of the AVX-512 table computes it: clamped to [-104, 88.8] (min/max return
  // their second operand for NaN, so NaN passes through), scaled by 2^n in two exact halves so that the
  // result rounds once (as _mm512_scalef_ps: a denormal result too, +inf past the top).
  x = _mm256_min_ps(_mm256_set1_ps(88.8f), x);
  x = _mm256_max_ps(_mm256_set1_ps(-104.0f), x);
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  __m256 y = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
  // n is in [-150, 128]: 2^(n/2) and 2^(n - n/2) are normal, and y * 2^(n/2) is exact.
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i half = _mm256_srai_epi32(ni, 1);
  const __m256i bias = _mm256_set1_epi32(127);
  __m256 scale1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, bias), 23));
  __m256 scale2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, half), bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(y, scale1), scale2);
}

inline __m256 loadn(const float* p, int n) { return n >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, tail_mask(n)); }
inline void storen(float* p, int n, __m256 v) {
  if (n >= 8) _mm256_storeu_ps(p, v);
  else _mm256_maskstore_ps(p, tail_mask(n), v);
}

void exp_(const float* x, float* y, int n) {
  for (int i = 0; i < n; i += 8) storen(y + i, n - i, exp8(loadn(x + i, n - i)));
}

void rmsnorm(const float* x, const float* w, float* y, int n, float eps) {
  // The sum of squares in kernels.h's SIMD order: the AVX-512 table's two 16-lane accumulators, here as
  // four of 8 lanes (s0a, s0b = its first; s1a, s1b = its second); a tail goes to the first, 16 at a time.
  __m256 s0a = _mm256_setzero_ps(), s0b = _mm256_setzero_ps(), s1a = _mm256_setzero_ps(), s1b = _mm256_setzero_ps();
  int i = 0;
  for (; i + 32 <= n; i += 32) {
    __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + 8);
    __m256 c = _mm256_loadu_ps(x + i + 16), d = _mm256_loadu_ps(x + i + 24);
    s0a = _mm256_fmadd_ps(a, a, s0a);
    s0b = _mm256_fmadd_ps(b, b, s0b);
    s1a = _mm256_fmadd_ps(c, c, s1a);
    s1b = _mm256_fmadd_ps(d, d, s1b);
  }
  for (; i < n; i += 16) {
    __m256 a = loadn(x + i, n - i), b = loadn(x + i + 8, n - i - 8);  // zeros past n add nothing
    s0a = _mm256_fmadd_ps(a, a, s0a);
    s0b = _mm256_fmadd_ps(b, b, s0b);
  }
  float sum = hsum(_mm256_add_ps(_mm256_add_ps(s0a, s1a), _mm256_add_ps(s0b, s1b)));
  __m256 r = _mm256_set1_ps(1.0f / __builtin_sqrtf(sum / static_cast<float>(n) + eps));
  for (i = 0; i < n; i += 8)
    storen(y + i, n - i, _mm256_mul_ps(_mm256_mul_ps(loadn(x + i, n - i), r), loadn(w + i, n - i)));
}

void silu_mul(const float* gate, const float* up, float* out, int n) {
  const __m256 one = _mm256_set1_ps(1.0f);
  for (int i = 0; i < n; i += 8) {
    __m256 g = loadn(gate + i, n - i), u = loadn(up + i, n - i);
    __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
    storen(out + i, n - i, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), u));
  }
}

void softmax(float* x, int n, float scale) {
  if (n <= 0) return;
  const __m256 s = _mm256_set1_ps(scale);
  __m256 vmax = _mm256_set1_ps(-INFINITY);
  for (int i = 0; i < n; i += 8) {
    __m256 v = _mm256_mul_ps(loadn(x + i, n - i), s);
    storen(x + i, n - i, v);
    if (n - i < 8) v = _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), v, _mm256_castsi256_ps(tail_mask(n - i)));
    vmax = _mm256_max_ps(vmax, v);
  }
  const __m256 max = _mm256_set1_ps(hmax(vmax));
  // The sum in kernels.h's SIMD order: 16 lanes (element i in lane i mod 16), here as two of 8.
  __m256 vsum[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int i = 0; i < n; i += 8) {
    __m256 e = exp8(_mm256_sub_ps(loadn(x + i, n - i), max));
    if (n - i < 8) e = _mm256_and_ps(e, _mm256_castsi256_ps(tail_mask(n - i)));
    storen(x + i, n - i, e);
    vsum[(i >> 3) & 1] = _mm256_add_ps(vsum[(i >> 3) & 1], e);
  }
  const __m256 sum = _mm256_set1_ps(hsum(_mm256_add_ps(vsum[0], vsum[1])));
  for (int i = 0; i < n; i += 8) storen(x + i, n - i, _mm256_div_ps(loadn(x + i, n - i), sum));
}

template <WType T>
void convert_t(const void* src, float* dst, int n) {
  for (int i = 0; i < n; i += 8) storen(dst + i, n - i, load8<T>(src, i, n - i));
}

#include "kernel_table.h"

}  // namespace

const QuantKernels* quant_avx2_kernels() { return quant_kernel_table("avx2"); }

const Kernels* avx2_kernels() { return kernel_table("avx2"); }

}  // namespace vdiff::cpu
