// AVX2 + FMA + F16C kernels. Only avx2_kernels() has external linkage (see kernels.h).
// Same scheme as the AVX-512 file with 8-wide vectors: panels of 16 columns, a 6 x 16 micro-tile in
// 12 ymm accumulators, one FMA chain per output in ascending k (bit-identical to the AVX-512 gemm).
#include <immintrin.h>
#include <math.h>  // INFINITY

#include "kernels.h"

namespace vdiff::cpu {
namespace {

constexpr int kMR = 6;
constexpr int kNR = 16;   // 2 ymm
constexpr int kKC = 256;  // 16 KiB packed block
constexpr int kLanes = 8;
constexpr int kPrefetchK = 16;  // the micro-kernel prefetches the packed row of B this many k ahead
constexpr bool kSplitThinTail = false;

inline int min_int(int a, int b) { return a < b ? a : b; }

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

template <WType T>
void pack_transposed(const void* W, int64_t ld, int n0, int nv, int k0, int kc, float* P) {
  for (int j = 0; j < kNR; ++j) {
    if (j < nv) {
      const int64_t row = static_cast<int64_t>(n0 + j) * ld + k0;
      for (int k = 0; k < kc; ++k) P[k * kNR + j] = load1<T>(W, row + k);
    } else {
      for (int k = 0; k < kc; ++k) P[k * kNR + j] = 0.0f;
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
  const __m256 lo = _mm256_set1_ps(-87.3365447504f), hi = _mm256_set1_ps(88.72283935546875f);
  const __m256 underflow = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  const __m256 overflow = _mm256_cmp_ps(x, hi, _CMP_GT_OQ);
  x = _mm256_min_ps(hi, x);  // NaN passes through (min/max return the second operand)
  x = _mm256_max_ps(lo, x);
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
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i half = _mm256_srai_epi32(ni, 1);
  const __m256i bias = _mm256_set1_epi32(127);
  __m256 scale1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, bias), 23));
  __m256 scale2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, half), bias), 23));
  y = _mm256_mul_ps(_mm256_mul_ps(y, scale1), scale2);
  y = _mm256_andnot_ps(underflow, y);
  return _mm256_blendv_ps(y, _mm256_set1_ps(INFINITY), overflow);
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
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int i = 0;
  for (; i + 16 <= n; i += 16) {
    __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + 8);
    s0 = _mm256_fmadd_ps(a, a, s0);
    s1 = _mm256_fmadd_ps(b, b, s1);
  }
  for (; i < n; i += 8) {
    __m256 a = loadn(x + i, n - i);
    s0 = _mm256_fmadd_ps(a, a, s0);
  }
  float sum = hsum(_mm256_add_ps(s0, s1));
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
  __m256 vsum = _mm256_setzero_ps();
  for (int i = 0; i < n; i += 8) {
    __m256 e = exp8(_mm256_sub_ps(loadn(x + i, n - i), max));
    if (n - i < 8) e = _mm256_and_ps(e, _mm256_castsi256_ps(tail_mask(n - i)));
    storen(x + i, n - i, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  const __m256 sum = _mm256_set1_ps(hsum(vsum));
  for (int i = 0; i < n; i += 8) storen(x + i, n - i, _mm256_div_ps(loadn(x + i, n - i), sum));
}

template <WType T>
void convert_t(const void* src, float* dst, int n) {
  for (int i = 0; i < n; i += 8) storen(dst + i, n - i, load8<T>(src, i, n - i));
}

#include "kernel_table.h"

}  // namespace

const Kernels* avx2_kernels() { return kernel_table("avx2"); }

}  // namespace vdiff::cpu
