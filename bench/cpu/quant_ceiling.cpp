// bench/cpu/quant_ceiling.cpp: the ceiling of the quantized micro-kernel's design (kernels_avx512.cpp,
// quant_micro), measured with its register work alone: per block of 32 k, R x NB = 3 x 4 int32 chains
// started from a per-row value, 8 vpdpbusd each, then either one vpaddd each (what the chains would cost
// with nothing after them) or the kernel's conversion, fma(float(I), s_a * d_w, c). No loads of P or A.
//
//   c++ -O3 -std=c++20 bench/cpu/quant_ceiling.cpp -o /tmp/quant_ceiling && /tmp/quant_ceiling
//
// Needs AVX-512 VNNI. One thread; prints vpdpbusd per ns for both and their ratio.
#include <immintrin.h>
#include <chrono>
#include <cstdio>
template <int V>
__attribute__((target("avx512f,avx512vnni,avx512bw"), noinline)) float run(long iters, const int* src) {
  __m512i acc[3][4], isum[3][4];
  __m512 f[3][4];
  __m512i b[4], a[3];
  for (int j = 0; j < 4; ++j) b[j] = _mm512_set1_epi32(src[j] * 0x01010101);
  for (int r = 0; r < 3; ++r) a[r] = _mm512_set1_epi32(src[4 + r] * 0x01010101);
  __m512 w[4];
  for (int j = 0; j < 4; ++j) w[j] = _mm512_set1_ps(0.999f + j);
  for (int r = 0; r < 3; ++r)
    for (int j = 0; j < 4; ++j) f[r][j] = _mm512_setzero_ps(), isum[r][j] = _mm512_setzero_si512();
  for (long it = 0; it < iters; ++it) {
#pragma GCC unroll 3
    for (int r = 0; r < 3; ++r) {
      int x = src[8 + r];
      asm volatile("" : "+r"(x));
      const __m512i init = _mm512_set1_epi32(-128 * x);
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) acc[r][j] = init;
    }
#pragma GCC unroll 8
    for (int g = 0; g < 8; ++g)
#pragma GCC unroll 3
      for (int r = 0; r < 3; ++r)
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_dpbusd_epi32(acc[r][j], b[j], a[r]);
#pragma GCC unroll 3
    for (int r = 0; r < 3; ++r) {
      __m512 sa = _mm512_set1_ps(1.0f + r);
      asm volatile("" : "+v"(sa));
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        if (V == 0) isum[r][j] = _mm512_add_epi32(isum[r][j], acc[r][j]);
        else f[r][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r][j]), _mm512_mul_ps(sa, w[j]), f[r][j]);
      }
    }
  }
  float out = 0;
  for (int r = 0; r < 3; ++r)
    for (int j = 0; j < 4; ++j) out += _mm512_reduce_add_ps(f[r][j]) + _mm512_reduce_add_epi32(isum[r][j]);
  return out;
}
int main() {
  int src[16] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11};
  const long iters = 20000000;
  for (int rep = 0; rep < 3; ++rep) {
    double t[2];
    float sink = 0;
    for (int v = 0; v < 2; ++v) {
      auto t0 = std::chrono::steady_clock::now();
      sink += v == 0 ? run<0>(iters, src) : run<1>(iters, src);
      t[v] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
    const double dp = 96.0 * iters;
    std::printf("init+dpbusd+vpaddd %.3f s (%.2f dpbusd/ns); +cvt/mul/fma %.3f s (%.2f/ns, %.1f%% of the first)  %g\n",
                t[0], dp / t[0] / 1e9, t[1], dp / t[1] / 1e9, 100 * t[0] / t[1], sink);
  }
}
