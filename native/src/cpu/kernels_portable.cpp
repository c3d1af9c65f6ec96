// Portable C++ kernels: the fallback for CPUs without AVX2, and a second opinion in the tests. Plain
// multiply-then-add (the baseline x86-64 ISA has no FMA), so results differ from the SIMD kernels by
// ordinary f32 rounding only.
#include <cmath>
#include <cstdlib>

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

void gemm(int M, int n0, int n1, int K, const float* A, int64_t lda, const MatB& B, float* C, int64_t ldc,
          bool accumulate, float* scratch) {
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

size_t gemm_scratch_floats(int K) { return K > 0 ? static_cast<size_t>(K) : 1; }

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
  static const Kernels table = {"portable", 1,      gemm_scratch_floats, gemm, rmsnorm, silu_mul, softmax, exp_,
                                convert,    nullptr};
  return &table;
}

}  // namespace vdiff::cpu
