// bench/cpu/quant_avx2_variants.cpp: formulations of the AVX2 int8 micro-kernel (kernels_avx2.cpp,
// quant_rows), each over one k block of 1,024 in L1 (16 columns: two ymm of packed weights per 4 k, rows
// broadcast 4 bytes at a time), timed in turn with `nosign` (vpmaddubsw + vpmaddwd + vpaddd on unsigned
// activations: the int8 roof's instruction mix with the kernel's loads) and printed as a ratio to it, so
// the VM's swings cancel. One thread. The sums are not checked here; the kernels' tests check the kernel.
//
//   c++ -O3 -mavx2 -mfma -std=c++20 bench/cpu/quant_avx2_variants.cpp -o /tmp/qv
//   for v in nosign q8 q8_nibbles q8_split q8_int16 q4 q4_int16; do /tmp/qv $v 3; done
//
// Variants (ROWS x 2 vectors of 8 columns):
//   q8          Q8_0 as landed: |a| (vpabsb), the weight with a's sign (vpsignb), vpmaddubsw, vpmaddwd, vpaddd.
//   q8_nibbles  Q8_0 weights w + 128 split into nibbles in the kernel, two vpmaddubsw summed in int16 over the
//               block (each lane at most 3840, 8 steps 30720), widened once per block.
//   q8_split    Q8_0 activations a + 128 = 16 uh + ul staged per row, the signed weights as they are, two
//               vpmaddubsw summed in int16 per block. Exact only with -128 * (sum of each column's weights in
//               the block) added, which the packed panels would have to carry (not timed here).
//   q8_int16    Q8_0 with the weights widened to int16 (vpmovsxbw) and int16 activation pairs: vpmaddwd, vpaddd.
//   q4          Q4_0 before 88be4b5: nibbles times a, vpmaddwd + vpaddd every step.
//   q4_int16    Q4_0 as landed: the block's 8 vpmaddubsw summed in int16 lanes, one vpmaddwd per block.
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {
constexpr int K = 1024;
alignas(64) int8_t P[K * 16];  // Q8_0: [k / 4][16 columns][4]; Q4_0 uses its first half as nibbles
alignas(64) int8_t A[6][K], Aabs[6][K], Ahi[6][K], Alo[6][K];
alignas(64) int16_t A16[6][K];
volatile int g_sink;

inline void keep(__m256i& v) { __asm__("" : "+x"(v)); }
inline int32_t load_i32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
// acc += vpmaddubsw(u, s) in int16 lanes, kept one chain in a register.
inline void add_products16(__m256i& acc, __m256i u, __m256i s) {
  acc = _mm256_add_epi16(acc, _mm256_maddubs_epi16(u, s));
  keep(acc);
}
inline __m256i bcast(const int8_t* p) { return _mm256_set1_epi32(load_i32(p)); }
inline __m256i panel(int offset) { return _mm256_load_si256(reinterpret_cast<const __m256i*>(P + offset)); }

template <int R>
void store(const __m256i (&acc)[R][2], int32_t* out) {
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 2; ++j) _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16 * r + 8 * j), acc[r][j]);
}

template <int R>
__attribute__((noinline)) void nosign(int32_t* out) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[R][2] = {};
  for (int g = 0; g < K / 4; ++g) {
    const __m256i b[2] = {panel(64 * g), panel(64 * g + 32)};
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m256i u = bcast(Aabs[r] + 4 * g);
      for (int j = 0; j < 2; ++j) {
        acc[r][j] = _mm256_add_epi32(acc[r][j], _mm256_madd_epi16(_mm256_maddubs_epi16(u, b[j]), ones));
        keep(acc[r][j]);
      }
    }
  }
  store<R>(acc, out);
}

template <int R>
__attribute__((noinline)) void q8(int32_t* out) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[R][2] = {};
  for (int g = 0; g < K / 4; ++g) {
    const __m256i b[2] = {panel(64 * g), panel(64 * g + 32)};
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m256i a = bcast(A[r] + 4 * g), m = _mm256_abs_epi8(a);
      for (int j = 0; j < 2; ++j) {
        acc[r][j] =
            _mm256_add_epi32(acc[r][j], _mm256_madd_epi16(_mm256_maddubs_epi16(m, _mm256_sign_epi8(b[j], a)), ones));
        keep(acc[r][j]);
      }
    }
  }
  store<R>(acc, out);
}

// The block's int16 sums hi and lo widened and added to tot: 16 * hi + lo.
template <int R>
void widen(__m256i (&tot)[R][2], __m256i (&hi)[R][2], __m256i (&lo)[R][2]) {
  const __m256i ones = _mm256_set1_epi16(1), sixteen = _mm256_set1_epi16(16);
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 2; ++j)
      tot[r][j] = _mm256_add_epi32(
          tot[r][j], _mm256_add_epi32(_mm256_madd_epi16(hi[r][j], sixteen), _mm256_madd_epi16(lo[r][j], ones)));
}

template <int R>
__attribute__((noinline)) void q8_nibbles(int32_t* out) {
  const __m256i low = _mm256_set1_epi8(0x0f);
  __m256i tot[R][2] = {};
  for (int blk = 0; blk < K / 32; ++blk) {
    __m256i lo[R][2] = {}, hi[R][2] = {};
#pragma GCC unroll 8
    for (int g = 8 * blk; g < 8 * blk + 8; ++g)
      for (int j = 0; j < 2; ++j) {
        const __m256i u = panel(64 * g + 32 * j);
        const __m256i L = _mm256_and_si256(u, low), H = _mm256_and_si256(_mm256_srli_epi16(u, 4), low);
#pragma GCC unroll 6
        for (int r = 0; r < R; ++r) {
          const __m256i a = bcast(A[r] + 4 * g);
          add_products16(lo[r][j], L, a);
          add_products16(hi[r][j], H, a);
        }
      }
    widen<R>(tot, hi, lo);
  }
  store<R>(tot, out);
}

template <int R>
__attribute__((noinline)) void q8_split(int32_t* out) {
  __m256i tot[R][2] = {};
  for (int blk = 0; blk < K / 32; ++blk) {
    __m256i lo[R][2] = {}, hi[R][2] = {};
#pragma GCC unroll 8
    for (int g = 8 * blk; g < 8 * blk + 8; ++g) {
      const __m256i b[2] = {panel(64 * g), panel(64 * g + 32)};
#pragma GCC unroll 6
      for (int r = 0; r < R; ++r) {
        const __m256i uh = bcast(Ahi[r] + 4 * g), ul = bcast(Alo[r] + 4 * g);
        for (int j = 0; j < 2; ++j) {
          add_products16(hi[r][j], uh, b[j]);
          add_products16(lo[r][j], ul, b[j]);
        }
      }
    }
    widen<R>(tot, hi, lo);
  }
  store<R>(tot, out);
}

// Q8_0 in int16: the weights widened with vpmovsxbw (panel bytes read as [k / 2][16 columns][2]), pairs of
// activations staged as int16 and broadcast, vpmaddwd + vpaddd: no sign to apply.
template <int R>
__attribute__((noinline)) void q8_int16(int32_t* out) {
  __m256i acc[R][2] = {};
  for (int h = 0; h < K / 2; ++h) {
    __m256i b[2];
    for (int j = 0; j < 2; ++j)
      b[j] = _mm256_cvtepi8_epi16(_mm_load_si128(reinterpret_cast<const __m128i*>(P + 32 * h + 16 * j)));
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m256i a = _mm256_set1_epi32(load_i32(A16[r] + 2 * h));
      for (int j = 0; j < 2; ++j) {
        acc[r][j] = _mm256_add_epi32(acc[r][j], _mm256_madd_epi16(b[j], a));
        keep(acc[r][j]);
      }
    }
  }
  store<R>(acc, out);
}

template <int R, bool kInt16>
__attribute__((noinline)) void q4(int32_t* out) {
  const __m256i ones = _mm256_set1_epi16(1), low = _mm256_set1_epi8(0x0f);
  __m256i tot[R][2] = {};
  for (int blk = 0; blk < K / 32; ++blk) {
    __m256i acc[R][2] = {};
#pragma GCC unroll 8
    for (int gh = 0; gh < 8; ++gh) {
      const int g = gh >> 1, half = gh & 1;
      __m256i b[2];
      for (int j = 0; j < 2; ++j) {
        const __m256i v = panel(256 * blk + 64 * g + 32 * j);
        b[j] = _mm256_and_si256(half == 0 ? v : _mm256_srli_epi16(v, 4), low);
      }
#pragma GCC unroll 6
      for (int r = 0; r < R; ++r) {
        const __m256i a = bcast(A[r] + 32 * blk + 4 * g + 16 * half);
        for (int j = 0; j < 2; ++j) {
          const __m256i p = _mm256_maddubs_epi16(b[j], a);
          acc[r][j] = kInt16 ? _mm256_add_epi16(acc[r][j], p) : _mm256_add_epi32(acc[r][j], _mm256_madd_epi16(p, ones));
          keep(acc[r][j]);
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < 2; ++j)
        tot[r][j] = _mm256_add_epi32(tot[r][j], kInt16 ? _mm256_madd_epi16(acc[r][j], ones) : acc[r][j]);
  }
  store<R>(tot, out);
}

using Kernel = void (*)(int32_t*);

template <int R>
Kernel pick(const std::string& v) {
  if (v == "nosign") return nosign<R>;
  if (v == "q8") return q8<R>;
  if (v == "q8_nibbles") return q8_nibbles<R>;
  if (v == "q8_split") return q8_split<R>;
  if (v == "q8_int16") return q8_int16<R>;
  if (v == "q4") return q4<R, false>;
  if (v == "q4_int16") return q4<R, true>;
  return nullptr;
}

// Multiply-adds per ns over reps calls.
double rate(Kernel f, int rows, int reps) {
  int32_t out[96];
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < reps; ++i) f(out);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  g_sink = out[0];
  return static_cast<double>(reps) * K * 16 * rows / s / 1e9;
}
}  // namespace

int main(int argc, char** argv) {
  const std::string v = argc > 1 ? argv[1] : "q8";
  const int rows = argc > 2 ? std::atoi(argv[2]) : 3;
  const Kernel f = rows == 2   ? pick<2>(v)
                   : rows == 3 ? pick<3>(v)
                   : rows == 4 ? pick<4>(v)
                   : rows == 6 ? pick<6>(v)
                               : nullptr;
  if (f == nullptr) {
    std::fprintf(stderr, "usage: %s nosign|q8|q8_nibbles|q8_split|q8_int16|q4|q4_int16 [2|3|4|6]\n", argv[0]);
    return 2;
  }
  for (int i = 0; i < K * 16; ++i) P[i] = static_cast<int8_t>((i * 37) % 255 - 127);
  for (int r = 0; r < 6; ++r)
    for (int k = 0; k < K; ++k) {
      const int a = (k * 13 + r) % 255 - 127, u = a + 128;
      A[r][k] = static_cast<int8_t>(a);
      A16[r][k] = static_cast<int16_t>(a);
      Aabs[r][k] = static_cast<int8_t>(a < 0 ? -a : a);
      Ahi[r][k] = static_cast<int8_t>(u >> 4);
      Alo[r][k] = static_cast<int8_t>(u & 15);
    }
  std::vector<double> ratio, best_ref, best_var;
  for (int t = 0; t < 15; ++t) {
    const double ref = rate(nosign<3>, 3, 20000), var = rate(f, rows, 20000);
    ratio.push_back(var / ref);
    best_ref.push_back(ref);
    best_var.push_back(var);
  }
  std::sort(ratio.begin(), ratio.end());
  const double ref = *std::max_element(best_ref.begin(), best_ref.end());
  const double var = *std::max_element(best_var.begin(), best_var.end());
  std::printf("%-10s %d rows: %.3f of nosign (median of 15 alternations, %.3f-%.3f); best %.1f against %.1f GMAC/s\n",
              v.c_str(), rows, ratio[7], ratio[0], ratio[14], var, ref);
}
