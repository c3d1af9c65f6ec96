// vdiff-cli bench-kernels: core clock, measured AVX-512 FMA peak and GEMM GFLOP/s of the active kernels
// on 1 and 2 threads. Checks nothing (the kernel tests are in vdiff-native-tests).
#include <time.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cli/bench_native.h"
#include "core/threadpool.h"
#include "cpu/kernels.h"

namespace vdiff::cli {
namespace {

using cpu::Kernels;
using cpu::MatB;
using cpu::WType;

// Random weights of roughly N(0, scale^2), stored as f32 or bf16 (what the benchmark's gemm reads).
struct Weights {
  WType type = WType::F32;
  std::vector<float> f32;
  std::vector<uint16_t> bf16;
  const void* data() const { return type == WType::F32 ? static_cast<const void*>(f32.data()) : bf16.data(); }
};

Weights random_weights(WType type, size_t count, std::mt19937& rng, double scale) {
  Weights w;
  w.type = type;
  std::normal_distribution<float> normal(0.0f, static_cast<float>(scale));
  for (size_t i = 0; i < count; ++i) {
    const float f = normal(rng);
    if (type == WType::F32) {
      w.f32.push_back(f);
    } else {
      uint32_t bits;
      std::memcpy(&bits, &f, 4);
      bits += 0x7fff + ((bits >> 16) & 1);  // round to nearest even (no NaNs here)
      w.bf16.push_back(static_cast<uint16_t>(bits >> 16));
    }
  }
  return w;
}

std::vector<float> random_floats(size_t count, std::mt19937& rng, float scale = 1.0f) {
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> out(count);
  for (auto& x : out) x = normal(rng);
  return out;
}

struct AlignedFloats {
  float* p;
  explicit AlignedFloats(size_t n) : p(static_cast<float*>(std::aligned_alloc(64, ((n * 4 + 63) / 64) * 64))) {}
  ~AlignedFloats() { std::free(p); }
};

const char* type_name(WType t) { return t == WType::F32 ? "f32" : t == WType::BF16 ? "bf16" : "f16"; }

// Core clock estimate: a chain of dependent 64-bit multiplies, 3 cycles each on every x86 core since
// Nehalem/Zen (a chain of add-immediates is no good: recent cores fold those at rename).
double measure_ghz() {
#if defined(__x86_64__)
  // Best of several short runs: the machine may be shared, and preemption only ever adds time.
  const long iterations = 400000;
  uint64_t x = 3, m = 1;
  double best = 1e9;
  for (int trial = 0; trial < 20; ++trial) {
    auto t0 = std::chrono::steady_clock::now();
    for (long i = 0; i < iterations; ++i)
      asm volatile(
          "imul %1, %0\n\timul %1, %0\n\timul %1, %0\n\timul %1, %0\n\timul %1, %0\n\t"
          "imul %1, %0\n\timul %1, %0\n\timul %1, %0\n\timul %1, %0\n\timul %1, %0\n\t"
          : "+r"(x)
          : "r"(m));
    best = std::min(best, seconds_since(t0));
  }
  return iterations * 10.0 * 3.0 / best / 1e9;
#else
  return 0;
#endif
}

#if defined(__x86_64__)
// Measured single-core peak of 512-bit FMAs: 24 independent register chains (more than latency x ports),
// written in assembly so the compiler cannot reshape the loop.
__attribute__((target("avx512f"))) double measure_avx512_fma_gflops() {
  const long iterations = 1000000;
  double best = 1e9;
  for (int trial = 0; trial < 20; ++trial) {
    long n = iterations;
    auto t0 = std::chrono::steady_clock::now();
    asm volatile(
        "vpxord %%zmm24, %%zmm24, %%zmm24\n\t"
        "vpxord %%zmm25, %%zmm25, %%zmm25\n\t"
        "1:\n\t"
        "vfmadd231ps %%zmm24, %%zmm25, %%zmm0\n\t vfmadd231ps %%zmm24, %%zmm25, %%zmm1\n\t"
        "vfmadd231ps %%zmm24, %%zmm25, %%zmm2\n\t vfmadd231ps %%zmm24, %%zmm25, %%zmm3\n\t"
        "vfmadd231ps %%zmm24, %%zmm25, %%zmm4\n\t vfmadd231ps %%zmm24, %%zmm25, %%zmm5\n\t"
        "vfmadd231ps %%zmm24, %%zmm25, %%zmm6\n\t vfmadd231ps %%zmm24, %%zmm25, %%zmm7\n\t"
        "vfmadd231ps %%zmm24, %%zmm25, %%zmm8\n\t vfmadd231ps %%zmm24, %%zmm25, %%zmm9\n\t"
        "vfmadd231ps %%zmm24, %%zmm25, %%zmm10\n\t vfmadd231ps %%zmm24, %%zmm25, %%zmm11\n\t"
        "vfmadd231ps %%zmm24, %%zmm25, %%zmm12\n\t vfmadd231ps %%zmm24, %%zmm25, %%zmm13\n\t"
        "vfmadd231ps %%zmm24, %%zmm25, %%zmm14\n\t vfmadd231ps %%zmm24, %%zmm25, %%zmm15\n\t"
        "vfmadd231ps %%zmm24, %%zmm25, %%zmm16\n\t vfmadd231ps %%zmm24, %%zmm25, %%zmm17\n\t"
        "vfmadd231ps %%zmm24, %%zmm25, %%zmm18\n\t vfmadd231ps %%zmm24, %%zmm25, %%zmm19\n\t"
        "vfmadd231ps %%zmm24, %%zmm25, %%zmm20\n\t vfmadd231ps %%zmm24, %%zmm25, %%zmm21\n\t"
        "vfmadd231ps %%zmm24, %%zmm25, %%zmm22\n\t vfmadd231ps %%zmm24, %%zmm25, %%zmm23\n\t"
        "dec %0\n\t"
        "jnz 1b\n\t"
        : "+r"(n)
        :
        : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12",
          "xmm13", "xmm14", "xmm15", "xmm16", "xmm17", "xmm18", "xmm19", "xmm20", "xmm21", "xmm22", "xmm23", "xmm24",
          "xmm25", "cc");
    best = std::min(best, seconds_since(t0));
  }
  return iterations * 24.0 * 32.0 / best / 1e9;
}
#endif

}  // namespace

int bench_kernels() {
  const Kernels& k = cpu::active_kernels();
  double ghz = measure_ghz();
  std::printf("kernels: %s; clock (dependent imul chain, best of 20): %.2f GHz\n", k.isa, ghz);
  double peak = 0;  // measured GFLOP/s of one core
#if defined(__x86_64__)
  if (std::string(k.isa) == "avx512") {
    peak = measure_avx512_fma_gflops();
    std::printf(
        "measured 1-core AVX-512 FMA peak (best of 20): %.1f GFLOP/s = %.1f flop/cycle at %.2f GHz "
        "(2 FMA units x 16 lanes x 2 flops = 64)\n",
        peak, peak / ghz, ghz);
  }
#endif
  if (peak == 0) peak = 64 * ghz;
  struct Shape {
    int M, N, K;
  };
  std::mt19937 rng(1);
  for (WType type : {WType::F32, WType::BF16}) {
    for (Shape s : {Shape{160, 768, 768}, Shape{160, 2048, 768}, Shape{160, 768, 2048}, Shape{32, 8192, 768}}) {
      Weights W = random_weights(type, static_cast<size_t>(s.N) * s.K, rng, 0.05);
      std::vector<float> A = random_floats(static_cast<size_t>(s.M) * s.K, rng), C(static_cast<size_t>(s.M) * s.N);
      for (int threads : {1, 2}) {
        ThreadPool pool(threads);
        std::vector<AlignedFloats*> scratch;
        for (int t = 0; t < threads; ++t) scratch.push_back(new AlignedFloats(k.gemm_scratch_floats(s.K)));
        const size_t panels = (s.N + k.gemm_nr - 1) / k.gemm_nr;
        auto run = [&] {
          pool.parallel_for(panels, [&](size_t b, size_t e, int t) {
            int n0 = static_cast<int>(b * k.gemm_nr), n1 = static_cast<int>(std::min<size_t>(e * k.gemm_nr, s.N));
            k.gemm(s.M, n0, n1, s.K, A.data(), s.K, MatB{W.data(), type, s.K, false}, C.data(), s.N, false,
                   scratch[t]->p);
          });
        };
        run();
        int reps = 0;
        auto t0 = std::chrono::steady_clock::now();
        double best = 1e9;
        while (seconds_since(t0) < 1.0 || reps < 5) {
          auto t1 = std::chrono::steady_clock::now();
          run();
          best = std::min(best, seconds_since(t1));
          ++reps;
        }
        double gflops = 2.0 * s.M * s.N * s.K / best / 1e9;
        std::printf(
            "gemm %-4s M=%-4d N=%-5d K=%-5d threads=%d: %6.1f GFLOP/s (best of %d) = %3.0f%% of %d x measured peak\n",
            type_name(type), s.M, s.N, s.K, threads, gflops, reps, 100.0 * gflops / (threads * peak), threads);
        for (auto* p : scratch) delete p;
      }
    }
  }
  return 0;
}

}  // namespace vdiff::cli
