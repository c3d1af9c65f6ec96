// AVX-512 kernels (F, BW, VL, DQ + F16C/FMA), and the avx512bf16 table: the same kernels with the bf16
// products on vdpbf16ps (AVX512_BF16; only its micro-kernel is compiled for that extension, so the avx512
// table runs on CPUs without it). Only the two table getters have external linkage (see kernels.h).
//
// f32 GEMM layout: C[M, N] = A[M, K] · B(K, N). For each panel of NR = 64 output columns, the whole K x 64
// slice of B is widened to f32 and transposed into a buffer `P` (reading each weight row front to back,
// which the hardware prefetchers follow; the packing cost is shared by all M rows). The micro-kernel then
// walks P in blocks of KC = 128 values of k (32 KiB, L1-resident while every row tile of A streams past)
// and keeps a 6 x 64 tile of C in 24 zmm accumulators: per k it loads 4 vectors of P, broadcasts 6
// values of A and issues 24 FMAs. Accumulators start from C for every k block after the first, so each
// output is one FMA chain in ascending k: the result does not depend on blocking, thread split or M.
//
// bf16 dot GEMM (avx512bf16): the same tiles, with P holding bf16 pairs (k 2i and 2i + 1 of a column in
// one 32-bit lane) and A staged per block as bf16 pairs; per pair of k one vdpbf16ps per accumulator.
#include <immintrin.h>

#include <math.h>  // INFINITY

#include "quant.h"

namespace vdiff::cpu {
namespace {

constexpr int kMR = 6;    // rows of A per micro-tile
constexpr int kNR = 64;   // columns per panel (4 zmm)
constexpr int kKC = 128;  // k per packed block
constexpr int kLanes = 16;
constexpr bool kSplitThinTail = true;  // see the row tiles in gemm_driver.h
constexpr int kPrefetchK = 16;         // the micro-kernel prefetches P this many k ahead (into the next block too)
constexpr int kDotKC = 256;            // k per block of the bf16 dot path (128 pairs: 32 KiB of P)
constexpr int kQuantMR = 3;            // rows per micro-tile of the quantized path: 12 int32 accumulators
constexpr bool kQ8Unsigned = true;     // vpdpbusd multiplies unsigned weight bytes (quant.h)

inline int min_int(int a, int b) { return a < b ? a : b; }

// k per block of the quantized path: the most whole 256-k steps whose packed panel block takes at most
// 85% of the L1 data cache the CPU reports, so that it stays there while the row tiles pass over it with
// their rows of A (Zen 5, 48 KiB: Q8_0 512 k, 36 KiB; Q4_0 1024 k, 40 KiB; both measured faster than the
// half-size block, and Q8_0's 1024 k, 72 KiB, slower).
int quant_k_block(QType type) {
  const size_t step_bytes = static_cast<size_t>(256 / kQBlock) * kNR * qpacked_column_bytes(type);
  const size_t steps = cache_sizes().l1d_bytes * 85 / 100 / step_bytes;
  return 256 * static_cast<int>(steps < 1 ? 1 : steps > 8 ? 8 : steps);
}

inline __mmask16 tail_mask(int n) {
  if (n >= 16) return 0xffff;
  if (n <= 0) return 0;
  return static_cast<__mmask16>((1u << n) - 1);
}

// 16 consecutive elements starting at base[offset] (only the lanes in `mask`), widened to f32.
template <WType T>
inline __m512 load16(const void* base, int64_t offset, __mmask16 mask) {
  if constexpr (T == WType::F32) {
    return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(base) + offset);
  } else {
    __m256i h = _mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(base) + offset);
    if constexpr (T == WType::BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    else return _mm512_cvtph_ps(h);
  }
}

// In-register transpose of a 16 x 16 f32 block: r[i][j] -> r[j][i].
inline void transpose16(__m512 r[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // u[4q + c] holds, in each 128-bit lane l, column 4l + c of rows 4q .. 4q+3.
  for (int q = 0; q < 4; ++q) {
    u[4 * q + 0] = _mm512_shuffle_ps(t[4 * q], t[4 * q + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[4 * q + 1] = _mm512_shuffle_ps(t[4 * q], t[4 * q + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[4 * q + 2] = _mm512_shuffle_ps(t[4 * q + 1], t[4 * q + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[4 * q + 3] = _mm512_shuffle_ps(t[4 * q + 1], t[4 * q + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  // Gather lane l of u[c], u[4+c], u[8+c], u[12+c] into output column 4l + c.
  for (int c = 0; c < 4; ++c) {
    __m512 v = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88);  // u[c].l0 u[c].l2 u[4+c].l0 u[4+c].l2
    __m512 w = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xdd);  // lanes 1 and 3
    __m512 x = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88);
    __m512 y = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xdd);
    r[c] = _mm512_shuffle_f32x4(v, x, 0x88);
    r[8 + c] = _mm512_shuffle_f32x4(v, x, 0xdd);
    r[4 + c] = _mm512_shuffle_f32x4(w, y, 0x88);
    r[12 + c] = _mm512_shuffle_f32x4(w, y, 0xdd);
  }
}

// P[k][j] = W[n0 + j][k0 + k] for a weight matrix W[N][K]; zero for j >= nv.
template <WType T>
void pack_transposed(const void* W, int64_t ld, int n0, int nv, int k0, int kc, float* P) {
  for (int g = 0; g < kNR / 16; ++g) {
    const int rows = nv - 16 * g;
    if (rows <= 0) {
      for (int k = 0; k < kc; ++k) _mm512_store_ps(P + k * kNR + 16 * g, _mm512_setzero_ps());
      continue;
    }
    for (int kk = 0; kk < kc; kk += 16) {
      const int kn = min_int(16, kc - kk);
      const __mmask16 km = tail_mask(kn);
      __m512 r[16];
      for (int i = 0; i < 16; ++i)
        r[i] = i < rows ? load16<T>(W, static_cast<int64_t>(n0 + 16 * g + i) * ld + k0 + kk, km) : _mm512_setzero_ps();
      transpose16(r);
      for (int i = 0; i < kn; ++i) _mm512_store_ps(P + (kk + i) * kNR + 16 * g, r[i]);
    }
  }
}

// P[k][j] = B[k0 + k][n0 + j] for a plain B[K][N]; zero for j >= nv.
template <WType T>
void pack_k_major(const void* B, int64_t ld, int n0, int nv, int k0, int kc, float* P) {
  for (int k = 0; k < kc; ++k) {
    const int64_t row = static_cast<int64_t>(k0 + k) * ld + n0;
    for (int g = 0; g < kNR / 16; ++g)
      _mm512_store_ps(P + k * kNR + 16 * g, load16<T>(B, row + 16 * g, tail_mask(nv - 16 * g)));
  }
}

// The lane masks of a panel of nv columns.
struct PanelMasks {
  __mmask16 lanes[kNR / 16];
};

PanelMasks panel_masks(int nv) {
  PanelMasks m;
  for (int j = 0; j < kNR / 16; ++j) m.lanes[j] = tail_mask(nv - 16 * j);
  return m;
}

// C[0..R)[0..16*NB) (masked) = (load_c ? C : 0) + A[0..R)[0..kc) · P[0..kc)[0..16*NB).
template <int R, int NB>
void micro_kernel(int kc, const float* A, int64_t lda, const float* P, float* C, int64_t ldc, const PanelMasks& panel,
                  bool load_c) {
  const __mmask16* masks = panel.lanes;
  __m512 acc[R][NB];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < NB; ++j)
      acc[i][j] = load_c ? _mm512_maskz_loadu_ps(masks[j], C + i * ldc + 16 * j) : _mm512_setzero_ps();
  const float* a_row[R];
  for (int i = 0; i < R; ++i) a_row[i] = A + i * lda;
  for (int k = 0; k < kc; ++k) {
    __m512 b[NB];
    for (int j = 0; j < NB; ++j) b[j] = _mm512_load_ps(P + k * kNR + 16 * j);
    for (int j = 0; j < NB; ++j)
      _mm_prefetch(reinterpret_cast<const char*>(P + (k + kPrefetchK) * kNR + 16 * j), _MM_HINT_T0);
    for (int i = 0; i < R; ++i) {
      __m512 a = _mm512_set1_ps(a_row[i][k]);
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_fmadd_ps(a, b[j], acc[i][j]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < NB; ++j) _mm512_mask_storeu_ps(C + i * ldc + 16 * j, masks[j], acc[i][j]);
}

// quantize_activations (quant.h) on 16 lanes: the same max, scale, inverse and rounding (the current
// mode, round to nearest even), so the same bytes.
void quantize_rows_isa(int M, int K, const float* A, int64_t lda, QBlockA* out) {
  const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  for (int m = 0; m < M; ++m)
    for (int b = 0; b < K / kQBlock; ++b) {
      const float* x = A + static_cast<int64_t>(m) * lda + b * kQBlock;
      QBlockA& o = out[static_cast<int64_t>(m) * (K / kQBlock) + b];
      const __m512 x0 = _mm512_loadu_ps(x), x1 = _mm512_loadu_ps(x + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_and_ps(x0, absmask), _mm512_and_ps(x1, absmask)));
      o.scale = amax / 127.0f;
      const __m512 inv = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
      const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, inv)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, inv));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o.q), _mm512_cvtepi32_epi8(q0));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o.q + 16), _mm512_cvtepi32_epi8(q1));
      o.sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
    }
}

// quantize_weight_row (quant.h) on 16 lanes, per block of 32: max|x| (a NaN never wins, as in the scalar
// compare), for Q4_0 the first element of that magnitude, the scale through f16, then x / d rounded to
// nearest even and clamped with min/max, whose NaN rule (the second operand) is fmin's and fmax's here.
void quantize_weights(const float* x, int K, QType type, uint8_t* out, uint16_t* scales) {
  const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  const bool q8 = type == QType::Q8_0;
  for (int b = 0; b < K / kQBlock; ++b) {
    const float* xb = x + b * kQBlock;
    const __m512 x0 = _mm512_loadu_ps(xb), x1 = _mm512_loadu_ps(xb + 16);
    const __m512 a0 = _mm512_and_ps(x0, absmask), a1 = _mm512_and_ps(x1, absmask);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(a0, _mm512_max_ps(a1, _mm512_setzero_ps())));
    float m = 0.0f;
    if (!q8 && amax > 0.0f) {
      const __m512 v = _mm512_set1_ps(amax);
      const uint32_t at = _mm512_cmp_ps_mask(a0, v, _CMP_EQ_OQ) | uint32_t{_mm512_cmp_ps_mask(a1, v, _CMP_EQ_OQ)} << 16;
      m = xb[__builtin_ctz(at)];
    }
    const float d16 = weight_block_scale(type, amax, m, scales + b);
    __m512 r0 = _mm512_setzero_ps(), r1 = _mm512_setzero_ps();
    if (d16 != 0.0f) {
      const __m512 d = _mm512_set1_ps(d16);
      constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
      r0 = _mm512_roundscale_ps(_mm512_div_ps(x0, d), kNearest);
      r1 = _mm512_roundscale_ps(_mm512_div_ps(x1, d), kNearest);
    }
    if (q8) {
      const __m512 hi = _mm512_set1_ps(127.0f), lo = _mm512_set1_ps(-127.0f);
      const __m512i q0 = _mm512_cvtps_epi32(_mm512_max_ps(_mm512_min_ps(r0, hi), lo));
      const __m512i q1 = _mm512_cvtps_epi32(_mm512_max_ps(_mm512_min_ps(r1, hi), lo));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 32 * b), _mm512_cvtepi32_epi8(q0));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 32 * b + 16), _mm512_cvtepi32_epi8(q1));
    } else {
      const __m512 hi = _mm512_set1_ps(15.0f), eight = _mm512_set1_ps(8.0f), zero = _mm512_setzero_ps();
      const __m512i u0 = _mm512_cvtps_epi32(_mm512_max_ps(_mm512_min_ps(_mm512_add_ps(r0, eight), hi), zero));
      const __m512i u1 = _mm512_cvtps_epi32(_mm512_max_ps(_mm512_min_ps(_mm512_add_ps(r1, eight), hi), zero));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16 * b),
                       _mm512_cvtepi32_epi8(_mm512_or_si512(u0, _mm512_slli_epi32(u1, 4))));
    }
  }
}

// hadamard_transform (quant.h) on 16 lanes, for R of 32, 64 or 128 (R / 16 registers per block): the
// butterflies at distance 1, 2, 4 and 8 inside each register (its partner x[i ^ h] permuted in, then
// fma(+-1, x[i], partner): x[i] + x[i + h] in the lower lane, x[i - h] - x[i] in the upper one), then those
// at 16, 32 and 64 between registers, in the scalar order, so the same bits.
void hadamard_isa(float* x, int K, int R) {
  if (R % 16 != 0 || R > 128) return hadamard_transform(x, K, R);
  const int nv = R / 16;
  __m512i partner[4];
  __m512 sign[4];
  for (int s = 0; s < 4; ++s) {
    alignas(64) int32_t idx[16];
    alignas(64) float sg[16];
    for (int i = 0; i < 16; ++i) idx[i] = i ^ (1 << s), sg[i] = (i & (1 << s)) ? -1.0f : 1.0f;
    partner[s] = _mm512_load_si512(idx);
    sign[s] = _mm512_load_ps(sg);
  }
  for (int b = 0; b < K; b += R) {
    __m512 v[8];
    for (int i = 0; i < nv; ++i) v[i] = _mm512_loadu_ps(x + b + 16 * i);
    for (int s = 0; s < 4; ++s)
      for (int i = 0; i < nv; ++i) v[i] = _mm512_fmadd_ps(sign[s], v[i], _mm512_permutexvar_ps(partner[s], v[i]));
    for (int d = 1; d < nv; d *= 2)
      for (int i = 0; i < nv; i += 2 * d)
        for (int j = i; j < i + d; ++j) {
          const __m512 u = v[j], w = v[j + d];
          v[j] = _mm512_add_ps(u, w);
          v[j + d] = _mm512_sub_ps(u, w);
        }
    for (int i = 0; i < nv; ++i) _mm512_storeu_ps(x + b + 16 * i, v[i]);
  }
}

// The 4 signed bytes at a broadcast to every lane of a register (vpbroadcastd from memory). Written as asm:
// GCC would otherwise fold the broadcast into each vpdpbusd as an embedded-broadcast memory operand, which
// runs 35% slower on Zen 5 (measured on 4 x 4 and 6 x 4 tiles from L1).
__attribute__((always_inline)) inline __m512i broadcast4(const int8_t* a) {
  __m512i x;
  asm("vpbroadcastd %1, %0" : "=v"(x) : "m"(*reinterpret_cast<const int32_t*>(a)));
  return x;
}

// The quantized micro-kernel (gemm_driver.h) on vpdpbusd: per block, R x NB int32 accumulators start at
// -offset * sum(q_a) (the unsigned weights' offset, quant.h) and take 4 k per instruction; then each
// output's chain in C takes fma(float(I), s_a * d_w, c). R x NB = 6 x 4 needs 24 + NB + 1 registers.
template <QType T, int R, int NB>
__attribute__((target("avx512vnni"))) void quant_micro(int blocks, const QBlockA* A, int64_t lda, const uint8_t* P,
                                                       float* C, int64_t ldc, const PanelMasks& panel, bool load_c) {
  constexpr int kWeightBytes = kNR * qblock_bytes(T);
  constexpr int kBlockBytes = kNR * qpacked_column_bytes(T);
  constexpr int32_t kOffset = T == QType::Q8_0 ? 128 : 8;
  const __mmask16* masks = panel.lanes;
  // The outputs' chains live in a contiguous tile for the whole k block: C's rows are often a multiple of
  // 4 KiB apart, and loading and storing them after every block of 32 k measured 15% slower (the rows
  // share L1 sets and the loads wait on the stores to the same low address bits).
  alignas(64) float tile[R][NB * 16];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j)
      _mm512_store_ps(tile[r] + 16 * j,
                      load_c ? _mm512_maskz_loadu_ps(masks[j], C + r * ldc + 16 * j) : _mm512_setzero_ps());
  for (int s = 0; s < blocks; ++s, P += kBlockBytes) {
    __m512i acc[R][NB];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512i init = _mm512_set1_epi32(-kOffset * A[r * lda + s].sum);
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) acc[r][j] = init;
    }
    if constexpr (T == QType::Q8_0) {
#pragma GCC unroll 8
      for (int g = 0; g < 8; ++g) {
        __m512i b[NB];
#pragma GCC unroll 4
        for (int j = 0; j < NB; ++j) b[j] = _mm512_load_si512(P + g * 4 * kNR + 64 * j);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          const __m512i a = broadcast4(A[r * lda + s].q + 4 * g);
#pragma GCC unroll 4
          for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_dpbusd_epi32(acc[r][j], b[j], a);
        }
      }
    } else {
      const __m512i low = _mm512_set1_epi8(0x0f);
#pragma GCC unroll 4
      for (int g = 0; g < 4; ++g)
#pragma GCC unroll 2
        for (int half = 0; half < 2; ++half) {
          __m512i b[NB];
#pragma GCC unroll 4
          for (int j = 0; j < NB; ++j) {
            const __m512i v = _mm512_load_si512(P + g * 4 * kNR + 64 * j);
            b[j] = _mm512_and_si512(half == 0 ? v : _mm512_srli_epi16(v, 4), low);
          }
#pragma GCC unroll 8
          for (int r = 0; r < R; ++r) {
            const __m512i a = broadcast4(A[r * lda + s].q + 4 * g + 16 * half);
#pragma GCC unroll 4
            for (int j = 0; j < NB; ++j) acc[r][j] = _mm512_dpbusd_epi32(acc[r][j], b[j], a);
          }
        }
    }
    const float* ws = reinterpret_cast<const float*>(P + kWeightBytes);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 sa = _mm512_set1_ps(A[r * lda + s].scale);
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) {
        const __m512 scale = _mm512_mul_ps(sa, _mm512_load_ps(ws + 16 * j));
        float* t = tile[r] + 16 * j;
        _mm512_store_ps(t, _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r][j]), scale, _mm512_load_ps(t)));
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j)
      _mm512_mask_storeu_ps(C + r * ldc + 16 * j, masks[j], _mm512_load_ps(tile[r] + 16 * j));
}

#include "gemm_driver.h"

// ------------------------------------------------------------------------------------------------
// The bf16 dot path (vdpbf16ps): P and A hold bf16 pairs, P[s][j] = B(2s, j) | B(2s + 1, j) << 16.

// 16 floats rounded as round_to_bf16 (kernels.h) does; the bf16 bits in the low half of each lane.
inline __m512i round_bf16x16(__m512 v) {
  const __m512i x = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(x, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd)), 16);
  const __m512i magnitude = _mm512_and_si512(x, _mm512_set1_epi32(0x7fffffff));
  const __mmask16 nan = _mm512_cmpgt_epi32_mask(magnitude, _mm512_set1_epi32(0x7f800000));
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(0x0040)));
  const __mmask16 denormal = _mm512_testn_epi32_mask(x, _mm512_set1_epi32(0x7f800000));
  return _mm512_mask_mov_epi32(r, denormal, _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(0x8000)));
}

inline __mmask32 tail_mask32(int n) {
  if (n >= 32) return 0xffffffffu;
  if (n <= 0) return 0;
  return static_cast<__mmask32>((1u << n) - 1);
}

struct Bf16DotPath {
  using AT = uint32_t;
  using PT = uint32_t;
  static constexpr int kMR = ::vdiff::cpu::kMR;
  static constexpr int kKC = kDotKC;
  static constexpr int kKStep = 2, kKPad = 2;
  static constexpr bool kStagesA = true;
  static int k_block() { return kKC; }

  // out[r][s] = bf16(A[r][2s]) | bf16(A[r][2s + 1]) << 16 (an odd kc's last pair padded with zero).
  static void stage(const float* A, int64_t lda, int rows, int kc, uint32_t* out) {
    const int steps = k_steps<Bf16DotPath>(kc);
    for (int r = 0; r < rows; ++r) {
      const float* a = A + r * lda;
      uint16_t* o = reinterpret_cast<uint16_t*>(out + static_cast<int64_t>(r) * steps);
      for (int k = 0; k < kc; k += 16) {
        const __mmask16 m = tail_mask(kc - k);
        // The pad element of an odd kc is the zero of a lane past kc, stored with its pair.
        _mm256_mask_storeu_epi16(o + k, tail_mask(2 * steps - k),
                                 _mm512_cvtepi32_epi16(round_bf16x16(_mm512_maskz_loadu_ps(m, a + k))));
      }
    }
  }

  static L2Prefetch source(const MatB& B, int n0, int nv, int k0, int kc) { return source_of(B, n0, nv, k0, kc); }

  static void pack(const MatB& B, int n0, int nv, int k0, int kc, uint32_t* P) {
    const int steps = k_steps<Bf16DotPath>(kc);
    const uint16_t* b = static_cast<const uint16_t*>(B.data);
    if (B.k_major) {
      // Rows k0 + 2s and k0 + 2s + 1 of B[K][N], interleaved.
      for (int s = 0; s < steps; ++s) {
        const uint16_t* even = b + static_cast<int64_t>(k0 + 2 * s) * B.ld + n0;
        const bool has_odd = 2 * s + 1 < kc;
        for (int g = 0; g < kNR / 16; ++g) {
          const __mmask16 m = tail_mask(nv - 16 * g);
          const __m512i lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, even + 16 * g));
          const __m512i hi = has_odd ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, even + B.ld + 16 * g))
                                     : _mm512_setzero_si512();
          _mm512_store_si512(P + s * kNR + 16 * g, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
        }
      }
      return;
    }
    // A weight W[N][K]: each 32-bit word of a row is already a pair; 16 rows x 16 words transposed at a time.
    for (int g = 0; g < kNR / 16; ++g) {
      const int rows = nv - 16 * g;
      if (rows <= 0) {
        for (int s = 0; s < steps; ++s) _mm512_store_si512(P + s * kNR + 16 * g, _mm512_setzero_si512());
        continue;
      }
      for (int ss = 0; ss < steps; ss += 16) {
        const __mmask32 km = tail_mask32(kc - 2 * ss);
        __m512 r[16];
        for (int i = 0; i < 16; ++i)
          r[i] = i < rows ? _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(
                                km, b + static_cast<int64_t>(n0 + 16 * g + i) * B.ld + k0 + 2 * ss))
                          : _mm512_setzero_ps();
        transpose16(r);
        for (int i = 0; i < min_int(16, steps - ss); ++i)
          _mm512_store_si512(P + (ss + i) * kNR + 16 * g, _mm512_castps_si512(r[i]));
      }
    }
  }

  template <int R, int NB>
  __attribute__((target("avx512bf16"))) static void micro(int steps, const uint32_t* A, int64_t lda, const uint32_t* P,
                                                          float* C, int64_t ldc, const PanelMasks& panel, bool load_c) {
    const __mmask16* masks = panel.lanes;
    __m512 acc[R][NB];
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < NB; ++j)
        acc[i][j] = load_c ? _mm512_maskz_loadu_ps(masks[j], C + i * ldc + 16 * j) : _mm512_setzero_ps();
    for (int s = 0; s < steps; ++s) {
      __m512bh b[NB];
      for (int j = 0; j < NB; ++j) b[j] = (__m512bh)_mm512_load_si512(P + s * kNR + 16 * j);
      for (int j = 0; j < NB; ++j)
        _mm_prefetch(reinterpret_cast<const char*>(P + (s + kPrefetchK) * kNR + 16 * j), _MM_HINT_T0);
      for (int i = 0; i < R; ++i) {
        const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(A[i * lda + s]));
        for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], a, b[j]);
      }
    }
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < NB; ++j) _mm512_mask_storeu_ps(C + i * ldc + 16 * j, masks[j], acc[i][j]);
  }
};

// The avx512bf16 table's entries: bf16 B on the dot path, everything else as the avx512 table.
void gemm_dot(int M, int n0, int n1, int K, const float* A, int64_t lda, const MatB& B, float* C, int64_t ldc,
              bool accumulate, float* scratch) {
  if (B.type != WType::BF16 || !B.bf16_dot || M <= 0 || n1 <= n0 || K <= 0)
    return gemm(M, n0, n1, K, A, lda, B, C, ldc, accumulate, scratch);
  gemm_path<Bf16DotPath>(M, n0, n1, K, A, lda, B, C, ldc, accumulate, scratch);
}

size_t gemm_dot_scratch_floats(int K) {
  const size_t d = path_scratch_floats<Bf16DotPath>(K), s = gemm_scratch_floats(K);
  return d > s ? d : s;
}

size_t dot_packed_panel_bytes(const MatB& B, int K) {
  return B.type == WType::BF16 && B.bf16_dot ? path_panel_bytes<Bf16DotPath>(K) : packed_panel_bytes(B, K);
}

size_t dot_a_row_bytes(int K) { return staged_row_bytes<Bf16DotPath>(K); }
void dot_stage_a(int M, int K, const float* A, int64_t lda, void* out) { stage_rows<Bf16DotPath>(M, K, A, lda, out); }

void dot_pack_panel(const MatB& B, int N, int K, int panel, void* out) {
  if (B.type != WType::BF16 || !B.bf16_dot) return pack_panel(B, N, K, panel, out);
  const int n0 = panel * kNR;
  Bf16DotPath::pack(B, n0, min_int(kNR, N - n0), 0, K, static_cast<uint32_t*>(out));
}

// ------------------------------------------------------------------------------------------------
// The amx table: bf16 products on AMX tiles (TDPBF16PS), everything else as the avx512bf16 table (the
// quantized products too: AMX's int8 tiles measured no faster than vpdpbusd there, bench/cpu/RESULTS.md,
// as each block of 32 k still needs its scales applied in f32). A is Bf16DotPath's staged rows; per k
// block it is copied into tiles (16 rows x 16 pairs of k, 1 KiB each, contiguous), as its rows lie pages
// apart. The weights are Bf16DotPath's panels with each 16 pairs of k rearranged into four B tiles
// (amx_pack_panel; the same size, packed at load). Each 32 x 64 tile of C runs in two halves of 32
// columns; a half keeps four C tiles (2 row groups x 2 column tiles), two A and two B tiles: all eight
// tile registers. The pairs past the last whole 16 of a block (a K that is not a multiple of 32) run on
// vdpbf16ps.
//
// The result is the bf16 dot product of A rounded to bf16, accumulated in f32, but not the chain of
// kernels.h: TDPBF16PS sums 32 products per instruction in an order of its own (it flushes denormals as
// vdpbf16ps does). It is deterministic, and does not depend on M, the thread split or the packing (every
// output sees the same k blocks and tiles in the same order); tests bound it against float64
// (kernels_tests.cpp).

constexpr int kAmxKC = 2048;  // k per block (1024 pairs): C's tiles are read and written once per block
constexpr int kAmxSteps = kAmxKC / 2;
constexpr int kAmxMR = 32;          // rows per tile of C
constexpr int kAmxStagedRows = 64;  // rows of A gemm_amx stages at a time (the backend stages them all once)

// The tile configuration (palette 1): every tile 16 rows of 64 bytes. 0-3: C (16 x 16 f32), 4-5: A (16 rows
// x 16 pairs of k), 6-7: B (16 pairs of k x 16 columns).
struct alignas(64) AmxTileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
  AmxTileConfig() {
    for (int t = 0; t < 8; ++t) colsb[t] = 64, rows[t] = 16;
  }
};

// Loads the tile configuration for this thread's products and releases the tiles after them (so that the
// thread's saved state stays small between calls).
class AmxTiles {
 public:
  __attribute__((target("amx-tile"))) AmxTiles() {
    static const AmxTileConfig config;
    _tile_loadconfig(&config);
  }
  __attribute__((target("amx-tile"))) ~AmxTiles() { _tile_release(); }
  AmxTiles(const AmxTiles&) = delete;
  AmxTiles& operator=(const AmxTiles&) = delete;
};

// One column tile of C (16 rows x 16 columns): read and written in place when all of it lies in the
// output, else through a buffer of the valid rows and lanes.
struct AmxCTile {
  float* at;
  int64_t stride;  // bytes
  int rows;        // valid rows (0..16)
  __mmask16 lanes;
  bool direct;
  alignas(64) float buffer[16 * 16];

  void open(float* C, int64_t ldc, int valid_rows, __mmask16 valid_lanes, bool load_c) {
    rows = valid_rows < 0 ? 0 : valid_rows > 16 ? 16 : valid_rows;
    lanes = rows > 0 ? valid_lanes : 0;
    direct = rows == 16 && lanes == 0xffff;
    if (direct) {
      at = C, stride = ldc * 4;
      return;
    }
    at = buffer, stride = 64;
    for (int r = 0; r < 16; ++r)
      _mm512_store_ps(buffer + 16 * r,
                      load_c && r < rows ? _mm512_maskz_loadu_ps(lanes, C + r * ldc) : _mm512_setzero_ps());
  }
  void close(float* C, int64_t ldc) const {
    if (direct) return;
    for (int r = 0; r < rows; ++r) _mm512_mask_storeu_ps(C + r * ldc, lanes, _mm512_load_ps(buffer + 16 * r));
  }
};

// A's rows [0, rows) over pairs [0, whole) (a multiple of 16) as tiles: tile (g, c) holds rows 16g.. and
// pairs 16c.. at out + (g * whole / 16 + c) * 256; rows past `rows` are zero.
void amx_stage_tiles(int rows, int whole, const uint32_t* A, int64_t lda, uint32_t* out) {
  const int chunks = whole / 16;
  for (int g = 0; g < (rows + 15) / 16; ++g)
    for (int r = 0; r < 16; ++r) {
      const int m = 16 * g + r;
      uint32_t* o = out + static_cast<int64_t>(g) * chunks * 256 + 16 * r;
      for (int c = 0; c < chunks; ++c)
        _mm512_store_si512(o + 256 * c, m < rows ? _mm512_loadu_si512(A + m * lda + 16 * c) : _mm512_setzero_si512());
    }
}

// Columns [32 half, 32 half + 32) of C[0..rows)[0..16 nb) (rows <= 32, masked) = (load_c ? C : 0) + the
// tiles of A (up to two row groups, `chunks` tiles each, the second group's `group_stride` elements after
// the first's) . P's chunks of 16 pairs. C tile i is row group i / 2 and column tile i % 2 of the half.
__attribute__((target("amx-tile,amx-bf16"))) void amx_tile_block(int rows, int nb, int half, int chunks,
                                                                 const uint32_t* At, int64_t group_stride,
                                                                 const uint32_t* P, float* C, int64_t ldc,
                                                                 const PanelMasks& panel, bool load_c) {
  const bool two = rows > 16;
  const int tiles = two ? 4 : 2;
  AmxCTile c[4];
  for (int i = 0; i < tiles; ++i) {
    const int j = 2 * half + (i & 1);
    c[i].open(C + 16 * (i >> 1) * ldc + 16 * j, ldc, j < nb ? rows - 16 * (i >> 1) : 0, panel.lanes[j], load_c);
  }
  if (load_c) {
    _tile_loadd(0, c[0].at, c[0].stride);
    _tile_loadd(1, c[1].at, c[1].stride);
    if (two) {
      _tile_loadd(2, c[2].at, c[2].stride);
      _tile_loadd(3, c[3].at, c[3].stride);
    }
  } else {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  }
  const uint32_t* Ph = P + 2 * half * 256;
  for (int k = 0; k < chunks; ++k) {
    _tile_loadd(4, At + 256 * k, 64);
    _tile_loadd(6, Ph + 16 * k * kNR, 64);
    _tile_loadd(7, Ph + 16 * k * kNR + 256, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if (two) {
      _tile_loadd(5, At + group_stride + 256 * k, 64);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c[0].at, c[0].stride);
  _tile_stored(1, c[1].at, c[1].stride);
  if (two) {
    _tile_stored(2, c[2].at, c[2].stride);
    _tile_stored(3, c[3].at, c[3].stride);
  }
  for (int i = 0; i < tiles; ++i) c[i].close(C + 16 * (i >> 1) * ldc + 16 * (2 * half + (i & 1)), ldc);
}

// The amx panels: Bf16DotPath's, with each whole chunk of 16 pairs of k ([pair][64 columns]) rearranged
// into its four B tiles ([column tile][pair][16 columns], 1 KiB each, read as they lie); the pairs past the
// last whole chunk stay as they were (the vdpbf16ps micro-kernel reads them).
void amx_tile_chunks(uint32_t* P, int steps) {
  for (int c = 0; c + 16 <= steps; c += 16) {
    uint32_t* chunk = P + c * kNR;
    __m512i rows[16][4];
    for (int r = 0; r < 16; ++r)
      for (int j = 0; j < 4; ++j) rows[r][j] = _mm512_load_si512(chunk + r * kNR + 16 * j);
    for (int j = 0; j < 4; ++j)
      for (int r = 0; r < 16; ++r) _mm512_store_si512(chunk + 256 * j + 16 * r, rows[r][j]);
  }
}

void amx_pack_panel(const MatB& B, int N, int K, int panel, void* out) {
  dot_pack_panel(B, N, K, panel, out);
  if (B.type == WType::BF16 && B.bf16_dot) amx_tile_chunks(static_cast<uint32_t*>(out), k_steps<Bf16DotPath>(K));
}

// Rows per row block: the block's tiles of one k block take at most half of L2 (they are read again for
// every panel), a multiple of kAmxMR.
int amx_row_block_rows() {
  static const int rows = [] {
    const int r = static_cast<int>(cache_sizes().l2_bytes / 2 / (sizeof(uint32_t) * kAmxSteps)) / kAmxMR * kAmxMR;
    return r < kAmxMR ? kAmxMR : r;
  }();
  return rows;
}

// Scratch: a packed k block of one panel, then a row block's tiles of A.
size_t amx_tiles_offset_floats() { return aligned_floats(sizeof(uint32_t) * kAmxSteps * kNR); }
size_t amx_scratch_floats() {
  return amx_tiles_offset_floats() + aligned_floats(sizeof(uint32_t) * kAmxSteps * amx_row_block_rows());
}

// C[M][n0, n1) = (accumulate ? C : 0) + A . B with A as staged rows (Bf16DotPath's layout, row m at
// A + m * lda pairs) and B bf16 (packed at load, or packed here per k block). K blocks outermost, then row
// blocks, then panels, then the panel's two halves, then tiles of 32 rows: a half's k block (128 KiB) stays
// in L2 while the row tiles pass over it.
void amx_gemm_rows(int M, int n0, int n1, int K, const uint32_t* A, int64_t lda, const MatB& B, float* C, int64_t ldc,
                   bool accumulate, float* scratch) {
  uint32_t* const pack_buffer = reinterpret_cast<uint32_t*>(scratch);
  uint32_t* const tiles = reinterpret_cast<uint32_t*>(scratch + amx_tiles_offset_floats());
  const size_t panel_bytes = path_panel_bytes<Bf16DotPath>(K);
  const int mc = amx_row_block_rows();
  for (int k0 = 0; k0 < K; k0 += kAmxKC) {
    const int kc = min_int(kAmxKC, K - k0);
    const int steps = k_steps<Bf16DotPath>(kc), whole = steps / 16 * 16;
    const bool load_c = accumulate || k0 > 0;
    const uint32_t* Ak = A + k0 / 2;
    for (int m0 = 0; m0 < M; m0 += mc) {
      const int rows = min_int(mc, M - m0);
      const int64_t group_stride = static_cast<int64_t>(whole / 16) * 256;
      amx_stage_tiles(rows, whole, Ak + m0 * lda, lda, tiles);
      for (int np = n0; np < n1; np += kNR) {
        const int nv = min_int(kNR, n1 - np), nb = (nv + 15) / 16;
        const PanelMasks masks = panel_masks(nv);
        const uint32_t* Pk = pack_buffer;
        if (B.packed != nullptr)
          Pk = reinterpret_cast<const uint32_t*>(static_cast<const char*>(B.packed) + (np / kNR) * panel_bytes) +
               static_cast<int64_t>(k0 / 2) * kNR;
        else Bf16DotPath::pack(B, np, nv, k0, kc, pack_buffer), amx_tile_chunks(pack_buffer, steps);
        for (int half = 0; half < 2 && 2 * half < nb && whole > 0; ++half)
          for (int m = 0; m < rows; m += kAmxMR)
            amx_tile_block(min_int(kAmxMR, rows - m), nb, half, whole / 16, tiles + (m / 16) * group_stride,
                           group_stride, Pk, C + static_cast<int64_t>(m0 + m) * ldc + np, ldc, masks, load_c);
        if (whole == steps) continue;
        for (int m = 0; m < rows; m += kAmxMR) {
          const int r = min_int(kAmxMR, rows - m);
          float* Cm = C + static_cast<int64_t>(m0 + m) * ldc + np;
          // The last pairs of the block on vdpbf16ps, Bf16DotPath::kMR rows at a time.
          for (int i = 0; i < r; i += Bf16DotPath::kMR)
            select_micro<Bf16DotPath>(min_int(Bf16DotPath::kMR, r - i), nb)(
                steps - whole, Ak + (m0 + m + i) * lda + whole, lda, Pk + whole * kNR, Cm + i * ldc, ldc, masks,
                load_c || whole > 0);
        }
      }
    }
  }
}

// The amx table's gemm: A staged per call into `scratch` past amx_scratch_floats (whole rows: the tiles
// are copied from them per k block), the rest as amx_gemm_rows.
void gemm_amx(int M, int n0, int n1, int K, const float* A, int64_t lda, const MatB& B, float* C, int64_t ldc,
              bool accumulate, float* scratch) {
  if (B.type != WType::BF16 || !B.bf16_dot || M <= 0 || n1 <= n0 || K <= 0)
    return gemm(M, n0, n1, K, A, lda, B, C, ldc, accumulate, scratch);
  uint32_t* const staged = reinterpret_cast<uint32_t*>(scratch + amx_scratch_floats());
  const int64_t staged_ld = static_cast<int64_t>(staged_row_bytes<Bf16DotPath>(K) / 4);
  const AmxTiles tiles;
  for (int m0 = 0; m0 < M; m0 += kAmxStagedRows) {  // a bounded part of the scratch at a time
    const int rows = min_int(kAmxStagedRows, M - m0);
    stage_rows<Bf16DotPath>(rows, K, A + static_cast<int64_t>(m0) * lda, lda, staged);
    amx_gemm_rows(rows, n0, n1, K, staged, staged_ld, B, C + static_cast<int64_t>(m0) * ldc, ldc, accumulate, scratch);
  }
}

void gemm_amx_staged(int M, int n0, int n1, int K, const void* As, const MatB& B, float* C, int64_t ldc,
                     bool accumulate, float* scratch) {
  if (M <= 0 || n1 <= n0) return;
  if (K <= 0) return gemm_empty_k(M, n0, n1, C, ldc, accumulate);
  const AmxTiles tiles;
  amx_gemm_rows(M, n0, n1, K, static_cast<const uint32_t*>(As),
                static_cast<int64_t>(staged_row_bytes<Bf16DotPath>(K) / 4), B, C, ldc, accumulate, scratch);
}

size_t gemm_amx_scratch_floats(int K) {
  const size_t a = amx_scratch_floats() + aligned_floats(staged_row_bytes<Bf16DotPath>(K) * kAmxStagedRows),
               d = gemm_dot_scratch_floats(K);
  return a > d ? a : d;
}

// exp(x) = 2^n * exp(r) with n = round(x / ln 2) and |r| <= ln2 / 2; exp(r) by the Cephes expf
// polynomial (about 1 ulp), 2^n applied with scalef so that overflow gives inf and underflow 0.
inline __m512 exp16(__m512 x) {
  // min/max return their second operand for NaN, so NaN passes through.
  x = _mm512_min_ps(_mm512_set1_ps(88.8f), x);
  x = _mm512_max_ps(_mm512_set1_ps(-104.0f), x);
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  __m512 y = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(y, n);
}

void exp_(const float* x, float* y, int n) {
  for (int i = 0; i < n; i += 16) {
    __mmask16 m = tail_mask(n - i);
    _mm512_mask_storeu_ps(y + i, m, exp16(_mm512_maskz_loadu_ps(m, x + i)));
  }
}

void rmsnorm(const float* x, const float* w, float* y, int n, float eps) {
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  int i = 0;
  for (; i + 32 <= n; i += 32) {
    __m512 a = _mm512_loadu_ps(x + i), b = _mm512_loadu_ps(x + i + 16);
    s0 = _mm512_fmadd_ps(a, a, s0);
    s1 = _mm512_fmadd_ps(b, b, s1);
  }
  for (; i < n; i += 16) {
    __m512 a = _mm512_maskz_loadu_ps(tail_mask(n - i), x + i);
    s0 = _mm512_fmadd_ps(a, a, s0);
  }
  float sum = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
  // __builtin_sqrtf rather than std::sqrt: no out-of-line inline function may come from this TU.
  __m512 r = _mm512_set1_ps(1.0f / __builtin_sqrtf(sum / static_cast<float>(n) + eps));
  for (i = 0; i < n; i += 16) {
    __mmask16 m = tail_mask(n - i);
    __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), r);
    _mm512_mask_storeu_ps(y + i, m, _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, w + i)));
  }
}

void silu_mul(const float* gate, const float* up, float* out, int n) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int i = 0; i < n; i += 16) {
    __mmask16 m = tail_mask(n - i);
    __m512 g = _mm512_maskz_loadu_ps(m, gate + i);
    __m512 u = _mm512_maskz_loadu_ps(m, up + i);
    __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
    _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(one, e)), u));
  }
}

void softmax(float* x, int n, float scale) {
  if (n <= 0) return;
  const __m512 s = _mm512_set1_ps(scale);
  __m512 vmax = _mm512_set1_ps(-INFINITY);
  for (int i = 0; i < n; i += 16) {
    __mmask16 m = tail_mask(n - i);
    __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), s);
    _mm512_mask_storeu_ps(x + i, m, v);
    vmax = _mm512_mask_max_ps(vmax, m, vmax, v);
  }
  const __m512 max = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
  __m512 vsum = _mm512_setzero_ps();
  for (int i = 0; i < n; i += 16) {
    __mmask16 m = tail_mask(n - i);
    __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + i), max));
    _mm512_mask_storeu_ps(x + i, m, e);
    vsum = _mm512_mask_add_ps(vsum, m, vsum, e);
  }
  const __m512 sum = _mm512_set1_ps(_mm512_reduce_add_ps(vsum));
  for (int i = 0; i < n; i += 16) {
    __mmask16 m = tail_mask(n - i);
    _mm512_mask_storeu_ps(x + i, m, _mm512_div_ps(_mm512_maskz_loadu_ps(m, x + i), sum));
  }
}

template <WType T>
void convert_t(const void* src, float* dst, int n) {
  for (int i = 0; i < n; i += 16) {
    __mmask16 m = tail_mask(n - i);
    _mm512_mask_storeu_ps(dst + i, m, load16<T>(src, i, m));
  }
}

#include "kernel_table.h"

}  // namespace

const Kernels* avx512_kernels() { return kernel_table("avx512"); }

const QuantKernels* quant_avx512vnni_kernels() { return quant_kernel_table("avx512vnni"); }

const Kernels* avx512bf16_kernels() {
  static const Kernels table = [] {
    Kernels t = *kernel_table("avx512");
    t.isa = "avx512bf16";
    t.gemm = gemm_dot;
    t.gemm_scratch_floats = gemm_dot_scratch_floats;
    t.pack_panel = dot_pack_panel;
    t.packed_panel_bytes = dot_packed_panel_bytes;
    t.bf16_a_row_bytes = dot_a_row_bytes;
    t.stage_bf16_a = dot_stage_a;
    t.gemm_staged = gemm_staged_path<Bf16DotPath>;
    return t;
  }();
  return &table;
}

const Kernels* amx_kernels() {
  static const Kernels table = [] {
    Kernels t = *avx512bf16_kernels();
    t.isa = "amx";
    t.gemm = gemm_amx;
    t.gemm_scratch_floats = gemm_amx_scratch_floats;
    t.gemm_staged = gemm_amx_staged;
    t.pack_panel = amx_pack_panel;
    return t;
  }();
  return &table;
}

}  // namespace vdiff::cpu
