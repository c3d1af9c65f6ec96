// Portable C++ kernels: the fallback for CPUs without AVX2, and a second opinion in the tests. Plain
// multiply-then-add (the baseline x86-64 ISA has no FMA), so f32 and f16 products differ from the SIMD
// kernels by ordinary f32 rounding only; bf16 products (the bf16 dot product of kernels.h, whose products
// are exact) agree with them bit for bit.
#include <cmath>
#include <cstdlib>
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>  // MXCSR: FTZ and DAZ for the bf16 dot product
#endif

#include "kernels.h"

namespace vdiff::cpu {
namespace {

constexpr int kRows = 4;  // rows of A sharing one converted column of B

// Column n of B, converted to f32, into col[0..K).
void load_column(const MatB& B, int n, int K, float* col) {
  if (B.k_major) {
    for (int k = 0; k < K; ++k) col[k] = weight_to_f32(B.data, B.type, static_cast<int64_t>(k) * B.ld + n);
  } else {
    const int64_t row = static_cast<int64_t>(n) * B.ld;
    for (int k = 0; k < K; ++k) col[k] = weight_to_f32(B.data, B.type, row + k);
  }
}

// The bf16 dot product (kernels.h): A rounded to bf16, pairs of k with the odd product added first, each
// addition rounded once (the products are exact), under FTZ and DAZ as vdpbf16ps computes it.
// Not vectorized: GCC 12 at -O2/-O3 turns the odd-then-even chain into an in-order vector reduction that
// adds the even product twice (A = [1, 0], W = [1, 0] gave 2); kernels_tests checks the chain bit for bit.
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("no-tree-vectorize")))
#endif
void gemm_bf16(int M, int n0, int n1, int K, const float* A, int64_t lda, const MatB& B, float* C, int64_t ldc,
               bool accumulate, float* scratch) {
#if defined(__x86_64__) || defined(__i386__)
  const unsigned saved = _mm_getcsr();
  _mm_setcsr(saved | 0x8040u);
#endif
  const int Kp = (K + 1) / 2 * 2;
  float* col = scratch;    // Kp floats: column n of B, widened, with a zero pad
  float* rows = col + Kp;  // kRows x Kp floats: rows of A rounded to bf16, with a zero pad
  col[Kp - 1] = 0.0f;
  for (int m0 = 0; m0 < M; m0 += kRows) {
    const int mr = M - m0 < kRows ? M - m0 : kRows;
    for (int r = 0; r < mr; ++r) {
      const float* a = A + static_cast<int64_t>(m0 + r) * lda;
      float* row = rows + r * Kp;
      row[Kp - 1] = 0.0f;
      for (int k = 0; k < K; ++k) row[k] = bf16_to_f32(round_to_bf16(a[k]));
    }
    for (int n = n0; n < n1; ++n) {
      load_column(B, n, K, col);
      for (int r = 0; r < mr; ++r) {
        const float* row = rows + r * Kp;
        float* c = C + static_cast<int64_t>(m0 + r) * ldc + n;
        float s = accumulate ? *c : 0.0f;
        for (int k = 0; k < Kp; k += 2) {
          s += row[k + 1] * col[k + 1];
          s += row[k] * col[k];
        }
        *c = s;
      }
    }
  }
#if defined(__x86_64__) || defined(__i386__)
  _mm_setcsr(saved);
#endif
}

void gemm(int M, int n0, int n1, int K, const float* A, int64_t lda, const MatB& B, float* C, int64_t ldc,
          bool accumulate, float* scratch) {
  if (B.type == WType::BF16 && B.bf16_dot && K > 0)
    return gemm_bf16(M, n0, n1, K, A, lda, B, C, ldc, accumulate, scratch);
  float* col = scratch;  // K floats
  for (int n = n0; n < n1; ++n) {
    load_column(B, n, K, col);
    int m = 0;
    for (; m + kRows <= M; m += kRows) {
      const float* a0 = A + static_cast<int64_t>(m) * lda;
      const float* a1 = a0 + lda;
      const float* a2 = a1 + lda;
      const float* a3 = a2 + lda;
      float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
      for (int k = 0; k < K; ++k) {
        float b = col[k];
        s0 += a0[k] * b;
        s1 += a1[k] * b;
        s2 += a2[k] * b;
        s3 += a3[k] * b;
      }
      float* c = C + static_cast<int64_t>(m) * ldc + n;
      if (accumulate) {
        c[0] += s0;
        c[ldc] += s1;
        c[2 * ldc] += s2;
        c[3 * ldc] += s3;
      } else {
        c[0] = s0;
        c[ldc] = s1;
        c[2 * ldc] = s2;
        c[3 * ldc] = s3;
      }
    }
    for (; m < M; ++m) {
      const float* a = A + static_cast<int64_t>(m) * lda;
      float s = 0;
      for (int k = 0; k < K; ++k) s += a[k] * col[k];
      float* c = C + static_cast<int64_t>(m) * ldc + n;
      *c = accumulate ? *c + s : s;
    }
  }
}

// The bf16 product's column and kRows rounded rows, each padded to an even length.
size_t gemm_scratch_floats(int K) { return K > 0 ? (1 + kRows) * static_cast<size_t>(K + 1) : 1; }

void rmsnorm(const float* x, const float* w, float* y, int n, float eps) {
  float partial[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) partial[j] += x[i + j] * x[i + j];
  float sum = 0;
  for (; i < n; ++i) sum += x[i] * x[i];
  for (int j = 0; j < 8; ++j) sum += partial[j];
  float r = 1.0f / std::sqrt(sum / static_cast<float>(n) + eps);
  for (i = 0; i < n; ++i) y[i] = x[i] * r * w[i];
}

void silu_mul(const float* gate, const float* up, float* out, int n) {
  for (int i = 0; i < n; ++i) {
    float g = gate[i];
    out[i] = g / (1.0f + std::exp(-g)) * up[i];
  }
}

void softmax(float* x, int n, float scale) {
  if (n <= 0) return;
  float max = -INFINITY;
  for (int i = 0; i < n; ++i) {
    x[i] *= scale;
    max = x[i] > max ? x[i] : max;
  }
  float sum = 0;
  for (int i = 0; i < n; ++i) {
    x[i] = std::exp(x[i] - max);
    sum += x[i];
  }
  for (int i = 0; i < n; ++i) x[i] /= sum;
}

void exp_(const float* x, float* y, int n) {
  for (int i = 0; i < n; ++i) y[i] = std::exp(x[i]);
}

void convert(const void* src, WType type, float* dst, int n) {
  for (int i = 0; i < n; ++i) dst[i] = weight_to_f32(src, type, i);
}

}  // namespace

const Kernels* portable_kernels() {
  static const Kernels table = {"portable", 1,       gemm_scratch_floats,
                                gemm,       rmsnorm, silu_mul,
                                softmax,    exp_,    convert,
                                nullptr,    nullptr, nullptr,
                                nullptr,    nullptr};
  return &table;
}

}  // namespace vdiff::cpu
