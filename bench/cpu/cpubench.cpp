// bench/cpu: the roof of this CPU per instruction family, and how close the engine's GEMMs and forward
// come to it. Prints JSON (one object) and a table on stderr.
//
//   1. Peaks: independent chains of one instruction on every requested thread at once (f32 FMA on ymm
//      and zmm, int16 dot vpmaddwd, int8 dot by vpmaddubsw+vpmaddwd (what the quantized GEMM issues on
//      AVX2), vpdpwssd / vpdpbusd on ymm and zmm (vpdpbusd zmm: the quantized GEMM with VNNI), bf16 dot
//      vdpbf16ps, and AMX's tdpbf16ps and tdpbssd tiles);
//      each family only where cpuid reports it. A multiply-add counts as 2 operations.
//   2. GEMMs of the model's shapes through the kernels the engine dispatched (f32 packed, and the
//      integer GEMMs of Q8_0 / Q4_0 including the activations' quantization), split over the threads by
//      columns like the backend, each as a percentage of its family's peak.
//   3. Optionally a model's forward over T tokens (--logit-rows of them through the head) as stored, and quantized at
//      load to Q8_0 and Q4_0, with its rate against the relevant peak.
//
// Built by bench/cpu/run.sh against libvdiff_core.a:
//   cpubench [--threads 2] [--model DIR] [--tokens 160] [--formats none,q8_0,q4_0] [--pack-max-mb N]
//            [--logit-rows 32] [--forward-trials 5] [--gemms none|MxNxK[,MxNxK...]]
//   --gemms none skips the GEMMs; a list of shapes runs only those (e.g. 160x4096x4096 for an A/B).
//   --logit-rows 160 gives every row's logits, as PyTorch's forward does; --pack-max-mb 0 keeps the
//   weights as stored, packed per product, as for a model too big to pack at load.
#include <immintrin.h>
#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "core/backend.h"
#include "cpu/kernels.h"
#include "cpu/quant.h"

using namespace vdiff;
using namespace vdiff::cpu;

namespace {

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// Pins the calling thread to the i-th CPU it may run on. A new thread starts beside its parent and is
// moved to an idle CPU only some milliseconds later, which a trial of a few milliseconds would measure.
void pin_to_cpu(int i) {
  cpu_set_t allowed;
  if (sched_getaffinity(0, sizeof allowed, &allowed) != 0 || CPU_COUNT(&allowed) == 0) return;
  int nth = i % CPU_COUNT(&allowed);
  for (int c = 0; c < CPU_SETSIZE; ++c)
    if (CPU_ISSET(c, &allowed) && nth-- == 0) {
      cpu_set_t one;
      CPU_ZERO(&one);
      CPU_SET(c, &one);
      pthread_setaffinity_np(pthread_self(), sizeof one, &one);
      return;
    }
}

// Runs fn(thread) on `threads` threads at once; returns the wall time (best of `trials`).
double timed_parallel(int threads, int trials, const std::function<void(int)>& fn) {
  double best = 1e30;
  for (int t = 0; t < trials; ++t) {
    std::atomic<int> ready{0};
    std::atomic<bool> go{false};
    std::vector<std::thread> pool;
    double t0 = 0;
    for (int i = 0; i < threads; ++i)
      pool.emplace_back([&, i] {
        pin_to_cpu(i);
        ready.fetch_add(1);
        while (!go.load()) {
        }
        fn(i);
      });
    while (ready.load() < threads) {
    }
    t0 = now();
    go.store(true);
    for (auto& th : pool) th.join();
    best = std::min(best, now() - t0);
  }
  return best;
}

volatile float g_sink_f;
volatile int g_sink_i;

// Short runs, best of many: on a shared machine a short run is more often left alone for its whole length.
constexpr long kIters = 8'000'000;

__attribute__((target("avx2,fma"))) void peak_fma_ymm() {
  __m256 a[12];
  for (int i = 0; i < 12; ++i) a[i] = _mm256_set1_ps(1.0f + i * 1e-3f);
  const __m256 b = _mm256_set1_ps(0.999999f), c = _mm256_set1_ps(1e-7f);
  for (long it = 0; it < kIters / 4; ++it)
#pragma GCC unroll 16
    for (int i = 0; i < 12; ++i) a[i] = _mm256_fmadd_ps(a[i], b, c);
  __m256 s = a[0];
  for (int i = 1; i < 12; ++i) s = _mm256_add_ps(s, a[i]);
  g_sink_f = _mm256_cvtss_f32(s);
}

__attribute__((target("avx512f"))) void peak_fma_zmm() {
  __m512 a[12];
  for (int i = 0; i < 12; ++i) a[i] = _mm512_set1_ps(1.0f + i * 1e-3f);
  const __m512 b = _mm512_set1_ps(0.999999f), c = _mm512_set1_ps(1e-7f);
  for (long it = 0; it < kIters / 4; ++it)
#pragma GCC unroll 16
    for (int i = 0; i < 12; ++i) a[i] = _mm512_fmadd_ps(a[i], b, c);
  __m512 s = a[0];
  for (int i = 1; i < 12; ++i) s = _mm512_add_ps(s, a[i]);
  g_sink_f = _mm512_reduce_add_ps(s);
}

// The AVX2 int8 dot as the quantized GEMM issues it: maddubs, madd, add (32 multiply-adds).
__attribute__((target("avx2"))) void peak_int8_avx2() {
  __m256i acc[8];
  for (int i = 0; i < 8; ++i) acc[i] = _mm256_set1_epi32(i);
  const __m256i u = _mm256_set1_epi8(3), s = _mm256_set1_epi8(-2), ones = _mm256_set1_epi16(1);
  for (long it = 0; it < kIters / 4; ++it)
#pragma GCC unroll 16
    for (int i = 0; i < 8; ++i) {
      // The empty asm makes x opaque, so the products are not hoisted out of the loop; each chain then
      // depends on its 1-cycle add only, and the products' throughput is what is measured.
      __m256i x = u;
      asm volatile("" : "+x"(x));
      acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(_mm256_maddubs_epi16(x, s), ones));
    }
  __m256i t = acc[0];
  for (int i = 1; i < 8; ++i) t = _mm256_add_epi32(t, acc[i]);
  g_sink_i = _mm256_extract_epi32(t, 0);
}

// The AVX2 int16 dot the quantized GEMM issues: vpmaddwd (16 multiply-adds) and an add.
__attribute__((target("avx2"))) void peak_int16_avx2() {
  __m256i acc[8];
  for (int i = 0; i < 8; ++i) acc[i] = _mm256_set1_epi32(i);
  const __m256i u = _mm256_set1_epi16(3), s = _mm256_set1_epi16(-2);
  for (long it = 0; it < kIters / 4; ++it)
#pragma GCC unroll 16
    for (int i = 0; i < 8; ++i) {
      __m256i x = u;
      asm volatile("" : "+x"(x));
      acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(x, s));
    }
  __m256i t = acc[0];
  for (int i = 1; i < 8; ++i) t = _mm256_add_epi32(t, acc[i]);
  g_sink_i = _mm256_extract_epi32(t, 0);
}

__attribute__((target("avx512f,avx512vl,avx512vnni"))) void peak_vnni16_ymm() {
  __m256i acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = _mm256_set1_epi32(i);
  const __m256i u = _mm256_set1_epi16(3), s = _mm256_set1_epi16(-2);
  for (long it = 0; it < kIters / 4; ++it)
#pragma GCC unroll 16
    for (int i = 0; i < 12; ++i) acc[i] = _mm256_dpwssd_epi32(acc[i], u, s);
  __m256i t = acc[0];
  for (int i = 1; i < 12; ++i) t = _mm256_add_epi32(t, acc[i]);
  g_sink_i = _mm256_extract_epi32(t, 0);
}

__attribute__((target("avx512f,avx512vl,avx512vnni"))) void peak_vnni_ymm() {
  __m256i acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = _mm256_set1_epi32(i);
  const __m256i u = _mm256_set1_epi8(3), s = _mm256_set1_epi8(-2);
  for (long it = 0; it < kIters / 4; ++it)
#pragma GCC unroll 16
    for (int i = 0; i < 12; ++i) acc[i] = _mm256_dpbusd_epi32(acc[i], u, s);
  __m256i t = acc[0];
  for (int i = 1; i < 12; ++i) t = _mm256_add_epi32(t, acc[i]);
  g_sink_i = _mm256_extract_epi32(t, 0);
}

__attribute__((target("avx512f,avx512vnni"))) void peak_vnni_zmm() {
  __m512i acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = _mm512_set1_epi32(i);
  const __m512i u = _mm512_set1_epi8(3), s = _mm512_set1_epi8(-2);
  for (long it = 0; it < kIters / 4; ++it)
#pragma GCC unroll 16
    for (int i = 0; i < 12; ++i) acc[i] = _mm512_dpbusd_epi32(acc[i], u, s);
  __m512i t = acc[0];
  for (int i = 1; i < 12; ++i) t = _mm512_add_epi32(t, acc[i]);
  g_sink_i = _mm512_reduce_add_epi32(t);
}

// 24 chains: with 12, vdpbf16ps's latency holds this family about 10% under its rate on Zen 5.
__attribute__((target("avx512f,avx512bf16"))) void peak_bf16_zmm() {
  __m512 acc[24];
  for (int i = 0; i < 24; ++i) acc[i] = _mm512_set1_ps(static_cast<float>(i));
  const __m512bh a = (__m512bh)_mm512_set1_epi16(0x3f80), b = (__m512bh)_mm512_set1_epi16(0x3f80);
  for (long it = 0; it < kIters / 8; ++it)
#pragma GCC unroll 24
    for (int i = 0; i < 24; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
  __m512 t = acc[0];
  for (int i = 1; i < 24; ++i) t = _mm512_add_ps(t, acc[i]);
  g_sink_f = _mm512_reduce_add_ps(t);
}

// AMX tiles (where the CPU has them and Linux grants this process their state, which the engine requests
// when it looks for its amx kernels): four C tiles of 16 x 16 f32 / int32, chained through TDPBF16PS
// (16 x 16 x 32 bf16 multiply-adds each) or TDPBSSD (16 x 16 x 64 int8), kIters / 64 steps of the four.
struct alignas(64) AmxConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16};
};
alignas(64) uint8_t g_amx_operand[16 * 64];

template <bool Int8>
__attribute__((target("amx-tile,amx-bf16,amx-int8"))) void peak_amx() {
  static const AmxConfig config;
  _tile_loadconfig(&config);
  _tile_loadd(4, g_amx_operand, 64);
  _tile_loadd(5, g_amx_operand, 64);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (long it = 0; it < kIters / 64; ++it) {
    if constexpr (Int8) {
      _tile_dpbssd(0, 4, 5);
      _tile_dpbssd(1, 4, 5);
      _tile_dpbssd(2, 4, 5);
      _tile_dpbssd(3, 4, 5);
    } else {
      _tile_dpbf16ps(0, 4, 5);
      _tile_dpbf16ps(1, 4, 5);
      _tile_dpbf16ps(2, 4, 5);
      _tile_dpbf16ps(3, 4, 5);
    }
  }
  alignas(64) int32_t out[256];
  _tile_stored(0, out, 64);
  g_sink_i = out[0];
  _tile_release();
}

struct Peak {
  std::string family;
  double gops = 0;  // operations per second / 1e9 (a multiply-add is 2)
};

// One instruction family's micro-benchmark: fn runs kIters / 4 steps of `chains` independent chains, each
// step `ops` operations.
struct PeakKernel {
  std::string family;
  void (*fn)();
  double ops;
  int chains;
};

std::vector<PeakKernel> peak_kernels() {
  std::vector<PeakKernel> out;
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    out.push_back({"f32 FMA ymm (AVX2)", peak_fma_ymm, 16, 12});
    out.push_back({"int16 vpmaddwd ymm (AVX2)", peak_int16_avx2, 32, 8});
    out.push_back({"int8 maddubs+madd ymm (AVX2)", peak_int8_avx2, 64, 8});
  }
  if (__builtin_cpu_supports("avx512f")) out.push_back({"f32 FMA zmm (AVX-512F)", peak_fma_zmm, 32, 12});
  if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl")) {
    out.push_back({"int16 vpdpwssd ymm (AVX512_VNNI)", peak_vnni16_ymm, 32, 12});
    out.push_back({"int8 vpdpbusd ymm (AVX512_VNNI)", peak_vnni_ymm, 64, 12});
    out.push_back({"int8 vpdpbusd zmm (AVX512_VNNI)", peak_vnni_zmm, 128, 12});
  }
  // kIters / 8 steps of 24 chains: the same count as kIters / 4 steps of 12.
  if (__builtin_cpu_supports("avx512bf16")) out.push_back({"bf16 vdpbf16ps zmm (AVX512_BF16)", peak_bf16_zmm, 64, 12});
  // kIters / 64 steps of 4 tiles = kIters / 4 steps of 4 chains of a sixteenth of a tile's operations.
  if (kernels_for("amx") != nullptr) {
    out.push_back({"bf16 tdpbf16ps tile (AMX)", peak_amx<false>, 16 * 16 * 32 * 2 / 16, 4});
    out.push_back({"int8 tdpbssd tile (AMX)", peak_amx<true>, 16 * 16 * 64 * 2 / 16, 4});
  }
  return out;
}

// The family's rate over the best of `trials` runs on every thread at once.
double measure_peak(const PeakKernel& p, int threads, int trials) {
  const double t = timed_parallel(threads, trials, [&](int) { p.fn(); });
  return threads * (kIters / 4.0) * p.chains * p.ops / t / 1e9;
}

std::vector<Peak> measure_peaks(int threads) {
  std::vector<Peak> out;
  for (const PeakKernel& p : peak_kernels()) out.push_back({p.family, measure_peak(p, threads, 15)});
  return out;
}

// The speed of this machine's cores changes from minute to minute (it shares its host), so a percentage
// of a peak measured at another moment can be off by a factor of two. Each figure is therefore timed in
// trials that alternate with trials of its family's peak; the figure is its best trial against the best
// peak trial of the same stretch of time.
struct Interleaved {
  double seconds = 1e30;  // best trial of the work
  double peak_gops = 0;   // best trial of the peak beside it
};

Interleaved interleaved(const std::string& family, int threads, int trials, const std::function<double()>& trial) {
  const std::vector<PeakKernel> kernels = peak_kernels();
  const PeakKernel* peak = nullptr;
  for (const PeakKernel& p : kernels)
    if (peak == nullptr && p.family.rfind(family, 0) == 0) peak = &p;  // the first match, as peak_of
  Interleaved out;
  for (int t = 0; t < trials; ++t) {
    if (peak != nullptr) out.peak_gops = std::max(out.peak_gops, measure_peak(*peak, threads, 2));
    out.seconds = std::min(out.seconds, trial());
  }
  if (peak != nullptr) out.peak_gops = std::max(out.peak_gops, measure_peak(*peak, threads, 2));
  return out;
}

double peak_of(const std::vector<Peak>& peaks, const std::string& prefix) {
  for (const Peak& p : peaks)
    if (p.family.rfind(prefix, 0) == 0) return p.gops;
  return 0;
}

std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  return "unknown";
}

// The family whose peak bounds each kind of work on the dispatched path.
std::string f32_family(const Kernels& k) {
  const std::string isa = k.isa;
  return isa.rfind("avx512", 0) == 0 || isa == "amx" ? "f32 FMA zmm" : "f32 FMA ymm";
}
// bf16 weights: the bf16 dot product, on vdpbf16ps where the path has it, else on the FMA units.
std::string bf16_family(const Kernels& k) {
  const std::string isa = k.isa;
  return isa == "amx" ? "bf16 tdpbf16ps tile" : isa == "avx512bf16" ? "bf16 vdpbf16ps zmm" : f32_family(k);
}
// The quantized GEMM's products are int8 activations x int8 (or 4-bit) weights (quant.h).
std::string int8_family(const QuantKernels& q) {
  return std::string(q.isa) == "avx512vnni" ? "int8 vpdpbusd zmm" : "int8 maddubs+madd ymm";
}

struct GemmResult {
  std::string name;
  int M, N, K;
  double seconds, gops, percent;
  std::string family;
  double peak_gops;  // the family's peak measured beside it
};

}  // namespace

int main(int argc, char** argv) {
  int threads = 2, tokens = 160;
  std::string model, formats = "none,q8_0,q4_0";
  int forward_trials = 5;      // timed forwards per format (after one warm-up)
  int logit_rows_wanted = 32;  // rows of the forward that go through the head (all: PyTorch's forward)
  long long pack_max_mb = -1;  // LoadOptions::pack_weights_max_bytes in MiB (-1: the default)
  std::string gemm_shapes;     // --gemms: "none", or MxNxK[,MxNxK...] in place of the default shapes
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--threads") threads = std::atoi(argv[i + 1]);
    else if (a == "--model") model = argv[i + 1];
    else if (a == "--tokens") tokens = std::atoi(argv[i + 1]);
    else if (a == "--formats") formats = argv[i + 1];
    else if (a == "--pack-max-mb") pack_max_mb = std::atoll(argv[i + 1]);
    else if (a == "--logit-rows") logit_rows_wanted = std::atoi(argv[i + 1]);
    else if (a == "--forward-trials") forward_trials = std::atoi(argv[i + 1]);
    else if (a == "--gemms") gemm_shapes = argv[i + 1];
  }
  const Kernels& k = active_kernels();
  const QuantKernels& qk = quant_kernels_for(k);
  std::fprintf(stderr, "cpu: %s; dispatched: f32 %s, quantized %s; %d threads\n", cpu_model().c_str(), k.isa, qk.isa,
               threads);
  const std::vector<Peak> peaks = measure_peaks(threads);
  for (const Peak& p : peaks) std::fprintf(stderr, "peak %-36s %8.1f GOP/s\n", p.family.c_str(), p.gops);

  // GEMMs of the `small` shapes (d 768, hidden 2048), fat (160 rows) and skinny (8 rows).
  std::vector<GemmResult> gemms;
  std::mt19937 rng(1);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  struct Shape {
    int M, N, K;
  };
  std::vector<Shape> shapes = {Shape{160, 2048, 768}, Shape{160, 768, 2048}, Shape{8, 2048, 768},
                               Shape{160, 4096, 4096}};
  if (!gemm_shapes.empty()) {
    shapes.clear();
    for (size_t at = 0; gemm_shapes != "none" && at < gemm_shapes.size();) {
      size_t end = gemm_shapes.find(',', at);
      if (end == std::string::npos) end = gemm_shapes.size();
      Shape s{};
      if (std::sscanf(gemm_shapes.substr(at, end - at).c_str(), "%dx%dx%d", &s.M, &s.N, &s.K) != 3 || s.M <= 0 ||
          s.N <= 0 || s.K <= 0 || s.K % kQBlock != 0) {
        std::fprintf(stderr, "--gemms: '%s' is not MxNxK with K a multiple of %d\n",
                     gemm_shapes.substr(at, end - at).c_str(), kQBlock);
        return 2;
      }
      shapes.push_back(s);
      at = end + 1;
    }
  }
  for (Shape s : shapes) {
    std::vector<float> A(static_cast<size_t>(s.M) * s.K), W(static_cast<size_t>(s.N) * s.K),
        C(static_cast<size_t>(s.M) * s.N);
    for (auto& x : A) x = normal(rng);
    for (auto& x : W) x = normal(rng) * 0.02f;
    const double flops = 2.0 * s.M * s.N * s.K;
    // f32 and bf16 weights, packed once (as the backend does at load).
    for (WType wt : {WType::F32, WType::BF16}) {
      if (k.pack_panel == nullptr) break;
      std::vector<uint16_t> w16;
      if (wt == WType::BF16)
        for (float x : W) w16.push_back(round_to_bf16(x));
      const void* wdata = wt == WType::BF16 ? static_cast<const void*>(w16.data()) : W.data();
      const int panels = (s.N + k.gemm_nr - 1) / k.gemm_nr;
      const size_t panel_bytes = k.packed_panel_bytes(MatB{wdata, wt, s.K, false}, s.K);
      // 64-byte aligned, as the backend's Buffer (the kernels load packed panels with aligned loads).
      struct Aligned {
        float* p;
        explicit Aligned(size_t n) : p(static_cast<float*>(std::aligned_alloc(64, (n * 4 + 63) / 64 * 64))) {}
        Aligned(const Aligned&) = delete;
        Aligned(Aligned&& o) noexcept : p(o.p) { o.p = nullptr; }
        ~Aligned() { std::free(p); }
        float* data() const { return p; }
      } packed(static_cast<size_t>(panels) * panel_bytes / 4);
      const MatB raw{wdata, wt, s.K, false};
      for (int p = 0; p < panels; ++p)
        k.pack_panel(raw, s.N, s.K, p, reinterpret_cast<char*>(packed.data()) + static_cast<size_t>(p) * panel_bytes);
      const MatB b{wdata, wt, s.K, false, packed.data()};
      std::vector<Aligned> scratch;
      for (int th = 0; th < threads; ++th) scratch.emplace_back(k.gemm_scratch_floats(s.K));
      const int per = (panels + threads - 1) / threads;
      const std::string family = wt == WType::BF16 ? bf16_family(k) : f32_family(k);
      // bf16 weights as the backend multiplies them: A rounded and laid out once (rows split over the
      // threads), then each thread's columns from that copy.
      const bool staged = wt == WType::BF16 && k.gemm_staged != nullptr;
      const size_t staged_row = staged ? k.bf16_a_row_bytes(s.K) : 0;
      Aligned staged_a((s.M * staged_row + 3) / 4 + 1);
      const int per_rows = (s.M + threads - 1) / threads;
      std::barrier sync(threads);
      const Interleaved r = interleaved(family, threads, 30, [&] {
        return timed_parallel(threads, 1,
                              [&](int th) {
                                const int n0 = std::min(s.N, th * per * k.gemm_nr),
                                          n1 = std::min(s.N, (th + 1) * per * k.gemm_nr);
                                for (int rep = 0; rep < 2; ++rep) {
                                  if (!staged) {
                                    k.gemm(s.M, n0, n1, s.K, A.data(), s.K, b, C.data(), s.N, false,
                                           scratch[th].data());
                                    continue;
                                  }
                                  const int m0 = std::min(s.M, th * per_rows), m1 = std::min(s.M, (th + 1) * per_rows);
                                  char* out = reinterpret_cast<char*>(staged_a.data());
                                  k.stage_bf16_a(m1 - m0, s.K, A.data() + static_cast<size_t>(m0) * s.K, s.K,
                                                 out + m0 * staged_row);
                                  sync.arrive_and_wait();
                                  k.gemm_staged(s.M, n0, n1, s.K, out, b, C.data(), s.N, false, scratch[th].data());
                                  sync.arrive_and_wait();
                                }
                              }) /
               2;
      });
      const double t = r.seconds;
      gemms.push_back({wt == WType::BF16 ? "bf16" : "f32", s.M, s.N, s.K, t, flops / t / 1e9,
                       100 * flops / t / 1e9 / r.peak_gops, family, r.peak_gops});
    }
    for (QType qt : {QType::Q8_0, QType::Q4_0}) {
      const int64_t row_bytes = s.K / kQBlock * qblock_bytes(qt);
      std::vector<uint8_t> wq(static_cast<size_t>(s.N) * row_bytes);
      std::vector<uint16_t> ws(static_cast<size_t>(s.N) * (s.K / kQBlock));
      for (int n = 0; n < s.N; ++n)
        quantize_weight_row(W.data() + static_cast<size_t>(n) * s.K, s.K, qt, wq.data() + n * row_bytes,
                            ws.data() + n * (s.K / kQBlock));
      QMatB b{wq.data(), ws.data(), qt, row_bytes, s.K / kQBlock};
      // Packed once (as the backend does at load) where the ISA's gemm reads panels.
      const int nr = qk.nr > 0 ? qk.nr : 1;
      const int panels = (s.N + nr - 1) / nr;
      const size_t panel_bytes = qk.nr > 0 ? qk.packed_panel_bytes(s.K, qt) : 0;
      void* packed = qk.nr > 0 ? std::aligned_alloc(64, (panels * panel_bytes + 63) / 64 * 64) : nullptr;
      for (int p = 0; qk.nr > 0 && p < panels; ++p)
        qk.pack_panel(b, s.N, s.K, p, static_cast<char*>(packed) + static_cast<size_t>(p) * panel_bytes);
      b.packed = packed;
      std::vector<QBlockA> aq(static_cast<size_t>(s.M) * (s.K / kQBlock));
      std::vector<float*> scratch;
      for (int th = 0; th < threads; ++th)
        scratch.push_back(
            static_cast<float*>(std::aligned_alloc(64, (qk.gemm_scratch_floats(s.K) * 4 + 127) / 64 * 64)));
      const int per_rows = (s.M + threads - 1) / threads, per_cols = (panels + threads - 1) / threads * nr;
      std::barrier sync(threads);
      const Interleaved r = interleaved(int8_family(qk), threads, 30, [&] {
        return timed_parallel(threads, 1,
                              [&](int th) {
                                for (int rep = 0; rep < 2; ++rep) {
                                  // Activations quantized by rows over the threads, then the product by columns (the
                                  // backend's order).
                                  const int m0 = std::min(s.M, th * per_rows), m1 = std::min(s.M, (th + 1) * per_rows);
                                  qk.quantize(m1 - m0, s.K, A.data() + static_cast<size_t>(m0) * s.K, s.K,
                                              aq.data() + static_cast<size_t>(m0) * (s.K / kQBlock));
                                  sync.arrive_and_wait();
                                  const int n0 = std::min(s.N, th * per_cols), n1 = std::min(s.N, (th + 1) * per_cols);
                                  qk.gemm(s.M, n0, n1, s.K, aq.data(), b, C.data(), s.N, false, scratch[th]);
                                  sync.arrive_and_wait();
                                }
                              }) /
               2;
      });
      for (float* p : scratch) std::free(p);
      std::free(packed);
      const double t = r.seconds;
      gemms.push_back({qtype_name(qt), s.M, s.N, s.K, t, flops / t / 1e9, 100 * flops / t / 1e9 / r.peak_gops,
                       int8_family(qk), r.peak_gops});
    }
  }
  for (const GemmResult& g : gemms)
    std::fprintf(stderr, "gemm %-5s %4d x %4d x %4d  %8.1f GOP/s  %5.1f%% of %s (%.1f beside it)\n", g.name.c_str(),
                 g.M, g.N, g.K, g.gops, g.percent, g.family.c_str(), g.peak_gops);

  // The forward.
  std::string forwards_json;
  if (!model.empty()) {
    for (size_t at = 0; at <= formats.size();) {
      const size_t comma = std::min(formats.find(',', at), formats.size());
      const std::string f = formats.substr(at, comma - at);
      at = comma + 1;
      LoadOptions options;
      options.threads = threads;
      if (pack_max_mb >= 0) options.pack_weights_max_bytes = static_cast<uint64_t>(pack_max_mb) << 20;
      options.quantize = f == "q8_0" ? Quant::Q8_0 : f == "q4_0" ? Quant::Q4_0 : Quant::None;
      const double load_start = now();
      auto backend = Backend::load(model, options);
      const double load_seconds = now() - load_start;
      const ModelConfig& c = backend->config();
      std::vector<int32_t> toks(tokens);
      for (int i = 0; i < tokens; ++i) toks[i] = (i * 7919) % (c.vocab_size - 8) + 1;
      const int rows = std::min(logit_rows_wanted, tokens);
      std::vector<int32_t> logit_rows(rows);
      for (int i = 0; i < rows; ++i) logit_rows[i] = tokens - rows + i;
      std::vector<float> logits(static_cast<size_t>(rows) * c.embedding_size);
      ForwardSeq seq;
      seq.tokens = toks.data();
      seq.length = tokens;
      seq.logit_rows = logit_rows.data();
      seq.n_logit_rows = rows;
      backend->forward({seq}, logits.data());  // warm-up
      const double hd = c.head_dim();
      const double per_token = 2.0 * c.d_model * (c.n_heads * hd + 2 * c.n_kv_heads * hd) +
                               2.0 * c.n_heads * hd * c.d_model + 3 * 2.0 * c.d_model * c.mlp_hidden_size;
      const double attention = 4.0 * tokens * tokens * c.n_heads * hd;  // QK^T and PV
      const double flops = c.n_layers * (tokens * per_token + attention) + 2.0 * rows * c.d_model * c.embedding_size;
      const std::string dtype = backend->weight_dtype();
      std::string family = f == "none" ? (dtype == "bf16" ? bf16_family(k) : f32_family(k)) : int8_family(qk);
      // The f32 part of a quantized forward (attention) still runs on the FMA units; the figure is against
      // the int8 peak, which bounds its matrices.
      const Interleaved r = interleaved(family, threads, forward_trials, [&] {
        const double t0 = now();
        backend->forward({seq}, logits.data());
        return now() - t0;
      });
      const double best = r.seconds, peak = r.peak_gops;
      std::fprintf(
          stderr,
          "forward %-5s (%s, %s) %d tokens: %.1f ms, %.1f GFLOP/s, %.1f%% of %s (%.1f beside it); load %.1f s\n",
          f.c_str(), dtype.c_str(), backend->info().gemm.c_str(), tokens, best * 1e3, flops / best / 1e9,
          100 * flops / best / 1e9 / peak, family.c_str(), peak, load_seconds);
      char buf[512];
      std::snprintf(buf, sizeof buf,
                    "%s{\"format\":\"%s\",\"weights\":\"%s\",\"gemm\":\"%s\",\"tokens\":%d,\"ms\":%.2f,\"gflops\":%.2f,"
                    "\"percent\":%.2f,\"peak\":\"%s\",\"peak_gops\":%.2f,\"memory_bytes\":%llu,\"load_s\":%.2f}",
                    forwards_json.empty() ? "" : ",", f.c_str(), dtype.c_str(), backend->info().gemm.c_str(), tokens,
                    best * 1e3, flops / best / 1e9, 100 * flops / best / 1e9 / peak, family.c_str(), peak,
                    static_cast<unsigned long long>(backend->info().memory_used), load_seconds);
      forwards_json += buf;
    }
  }

  std::printf("{\"cpu\":\"%s\",\"isa\":\"%s\",\"quantized\":\"%s\",\"threads\":%d,\"peaks\":[", cpu_model().c_str(),
              k.isa, qk.isa, threads);
  for (size_t i = 0; i < peaks.size(); ++i)
    std::printf("%s{\"family\":\"%s\",\"gops\":%.2f}", i ? "," : "", peaks[i].family.c_str(), peaks[i].gops);
  std::printf("],\"gemms\":[");
  for (size_t i = 0; i < gemms.size(); ++i)
    std::printf(
        "%s{\"weights\":\"%s\",\"M\":%d,\"N\":%d,\"K\":%d,\"gops\":%.2f,\"percent\":%.2f,\"peak\":\"%s\",\"peak_gops\":"
        "%.2f}",
        i ? "," : "", gemms[i].name.c_str(), gemms[i].M, gemms[i].N, gemms[i].K, gemms[i].gops, gemms[i].percent,
        gemms[i].family.c_str(), gemms[i].peak_gops);
  std::printf("],\"forwards\":[%s]}\n", forwards_json.c_str());
  return 0;
}
