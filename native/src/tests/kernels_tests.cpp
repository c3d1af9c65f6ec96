// Kernels of every ISA against scalar references, the scalar f16/bf16 conversions, the thread pool.
#include <thread>

#include "cpu/quant.h"
#include "tests/harness.h"

namespace vdiff::test {

// ------------------------------------------------------------------------------------------------
// Kernels

// Every gemm shape/type/layout of one ISA: within the rigorous bound for f32 recursive summation, sentinel
// columns outside [n0, n1) untouched, and (SIMD ISAs) bit-identical to one sequential fmaf chain per output.
// bf16 B is the bf16 dot product (kernels.h): A rounded to bf16, the odd product of each pair of k first.
// There every ISA, portable too, must equal that chain bit for bit; the bound holds against the float64
// product of the rounded A, and a stated bound (2^-8 + (K + 1) 2^-24) sum|terms| against the float64
// product of A itself. The amx bf16 products (TDPBF16PS, kernels.h) are held to the bound alone, and each
// row to the same bits whether computed alone or among others.
void test_gemm(const Kernels& k, WType type, bool k_major) {
  struct Shape {
    int M, N, K;
  };
  // {40, 70, 1100} spans several k blocks of every path (the amx one's too, with a k tail past its last
  // whole 32) and a partial second group of 16 rows. {301, 40, 300} and {2105, 20, 290} have more rows than a row block
  // of the prepacked path (sized from the L2 cache, at most about 2,000 rows for a 2 MiB L2), so they cover several row
  // blocks, a thin last block merged with the one before it, and several k blocks; the last has more columns than a
  // chunk of gemm_path (512 columns at that many rows for an L2 of up to 4 MiB), so it covers several chunks.
  const Shape shapes[] = {{1, 1, 1},      {1, 7, 5},       {5, 17, 33},    {6, 64, 128},  {7, 65, 129},
                          {13, 130, 300}, {12, 200, 16},   {3, 64, 257},   {19, 48, 64},  {4, 9, 0},
                          {301, 40, 300}, {2105, 20, 290}, {1100, 530, 8}, {40, 70, 1100}};
  std::mt19937 rng(1234 + static_cast<int>(type) * 7 + k_major);
  double worst = 0, worst_unrounded = 0;  // error / bound
  bool sentinels_ok = true, exact_ok = true, bound_ok = true, packed_ok = true;
  int packed_checked = 0, staged_checked = 0;
  bool staged_ok = true;
  const bool bf16_dot = type == WType::BF16;
  // amx: TDPBF16PS sums 32 products in an order of its own (kernels.h), so its bf16 products are held to the
  // bound alone, and to giving each row the same bits whatever the rows computed with it.
  const bool amx_bf16 = bf16_dot && std::string(k.isa) == "amx";
  const bool exact_chain = (std::string(k.isa) != "portable" || bf16_dot) && !amx_bf16;
  bool rows_alone_ok = true;
  int rows_alone_checked = 0;
  for (const Shape& s : shapes) {
    for (int variant = 0; variant < 3; ++variant) {
      const bool accumulate = variant == 1;
      const int n0 = variant == 2 ? std::min(3, s.N - 1) : 0;
      const int n1 = variant == 2 ? std::max(n0 + 1, s.N - 2) : s.N;
      const int64_t lda = s.K + 3, ldc = s.N + 5;
      const int64_t ldb = k_major ? s.N + 1 : s.K + 2;
      const size_t b_rows = k_major ? s.K : s.N;
      Values B = random_values(type, b_rows * ldb + 1, rng, 0.5);
      std::vector<float> A = random_floats(s.M * lda + 1, rng);
      std::vector<float> C0 = random_floats(s.M * ldc + 1, rng);
      std::vector<float> C = C0;
      AlignedFloats scratch(k.gemm_scratch_floats(std::max(s.K, 1)));
      k.gemm(s.M, n0, n1, s.K, A.data(), lda, MatB{B.data(), type, ldb, k_major}, C.data(), ldc, accumulate, scratch.p);
      for (int m = 0; m < s.M; ++m)
        for (int n = 0; n < s.N + 5; ++n) {
          const size_t ci = m * ldc + n;
          if (n < n0 || n >= n1) {
            if (std::memcmp(&C[ci], &C0[ci], 4) != 0) sentinels_ok = false;
            continue;
          }
          double ref = accumulate ? C0[ci] : 0.0, bound = std::fabs(ref);
          double unrounded = ref, unrounded_bound = bound;
          float chain = accumulate ? C0[ci] : 0.0f;
          const int k_pad = bf16_dot ? (s.K + 1) / 2 * 2 : s.K;
          for (int step = 0; step < k_pad; ++step) {
            const int kk = bf16_dot ? (step ^ 1) : step;  // bf16: the odd k of each pair first
            if (kk >= s.K) continue;                      // the zero pad of an odd K
            const double b = B.exact[k_major ? kk * ldb + n : n * ldb + kk];
            const float a = bf16_dot ? cpu::bf16_to_f32(cpu::round_to_bf16(A[m * lda + kk])) : A[m * lda + kk];
            ref += a * b;
            bound += std::fabs(a * b);
            unrounded += A[m * lda + kk] * b;
            unrounded_bound += std::fabs(A[m * lda + kk] * b);
            chain = std::fma(a, static_cast<float>(b), chain);
          }
          // Recursive summation: |error| <= 2 (K + 1) u sum|terms| with u = 2^-24 (mul + add roundings).
          const double u = std::ldexp(1.0, -24);
          const double tol = 2.0 * (s.K + 1) * u * bound + 1e-30;
          double err = std::fabs(C[ci] - ref);
          if (err > tol) bound_ok = false;
          worst = std::max(worst, bound > 0 ? err / bound : err);
          if (bf16_dot) {
            const double err_unrounded = std::fabs(C[ci] - unrounded);
            if (err_unrounded > (std::ldexp(1.0, -8) + (s.K + 1) * u) * unrounded_bound + 1e-30) bound_ok = false;
            worst_unrounded =
                std::max(worst_unrounded, unrounded_bound > 0 ? err_unrounded / unrounded_bound : err_unrounded);
          }
          if (exact_chain && std::memcmp(&C[ci], &chain, 4) != 0) exact_ok = false;
        }
      // amx: each row computed alone (a tile of one valid row) gives the bits it got among the others.
      if (amx_bf16 && s.K > 0) {
        for (int m = 0; m < s.M; m += std::max(1, s.M / 40)) {
          std::vector<float> row(C0.begin() + m * ldc, C0.begin() + (m + 1) * ldc);
          k.gemm(1, n0, n1, s.K, A.data() + m * lda, lda, MatB{B.data(), type, ldb, k_major}, row.data(), ldc,
                 accumulate, scratch.p);
          if (std::memcmp(row.data(), C.data() + m * ldc, ldc * 4) != 0) rows_alone_ok = false;
          ++rows_alone_checked;
        }
      }
      // The weight packed once ahead (MatB::packed) gives the same bits as packing per call.
      if (k.pack_panel != nullptr && !k_major && n0 % k.gemm_nr == 0) {
        const int panels = (s.N + k.gemm_nr - 1) / k.gemm_nr;
        const size_t panel_floats = k.packed_panel_bytes(MatB{B.data(), type, ldb, false}, std::max(s.K, 1)) / 4;
        AlignedFloats packed(panels * panel_floats);
        const MatB plain{B.data(), type, ldb, false};
        for (int p = 0; p < panels; ++p) k.pack_panel(plain, s.N, s.K, p, packed.p + p * panel_floats);
        // The unpacked data it would read otherwise is all zeros here, so a gemm that ignored the packed
        // copy would give other results.
        Values zeros;
        zeros.type = type;
        if (type == WType::F32) zeros.f32.assign(b_rows * ldb + 1, 0.0f);
        else zeros.half.assign(b_rows * ldb + 1, 0);
        MatB prepacked{zeros.data(), type, ldb, false, packed.p};
        std::vector<float> C2 = C0;
        k.gemm(s.M, n0, n1, s.K, A.data(), lda, prepacked, C2.data(), ldc, accumulate, scratch.p);
        if (std::memcmp(C2.data(), C.data(), C.size() * 4) != 0) packed_ok = false;
        ++packed_checked;
      }
      // A staged once (Kernels::stage_bf16_a) gives the same bits as A staged per call.
      if (bf16_dot && k.gemm_staged != nullptr && s.K > 0) {
        const size_t row_bytes = k.bf16_a_row_bytes(s.K);
        AlignedFloats staged(s.M * row_bytes / 4 + 16);
        k.stage_bf16_a(s.M, s.K, A.data(), lda, staged.p);
        std::vector<float> C3 = C0;
        k.gemm_staged(s.M, n0, n1, s.K, staged.p, MatB{B.data(), type, ldb, k_major}, C3.data(), ldc, accumulate,
                      scratch.p);
        if (std::memcmp(C3.data(), C.data(), C.size() * 4) != 0) staged_ok = false;
        ++staged_checked;
      }
    }
  }
  std::string name = std::string(k.isa) + " gemm " + type_name(type) + (k_major ? " B[K][N]" : " W[N][K]");
  report(bound_ok && sentinels_ok && (exact_ok || !exact_chain) && packed_ok && staged_ok && rows_alone_ok, name,
         fmt("max error/sum|terms| %.2e", worst) +
             (bf16_dot ? fmt(" (against A unrounded: %.2e)", worst_unrounded) : std::string()) +
             (sentinels_ok ? "" : ", wrote outside [n0, n1)") +
             (exact_chain ? (exact_ok ? (bf16_dot ? ", bit-identical to the bf16 dot chain (odd k of each pair first)"
                                                  : ", bit-identical to a sequential fma chain")
                                      : ", NOT equal to the sequential chain")
                          : "") +
             (rows_alone_checked == 0 ? ""
              : rows_alone_ok         ? fmt(", %.0f rows alone = among the others", rows_alone_checked)
                                      : ", a row alone gives DIFFERENT results") +
             (packed_checked == 0 ? ""
              : packed_ok         ? fmt(", prepacked = per call in %.0f products", packed_checked)
                                  : ", prepacked weights give DIFFERENT results") +
             (staged_checked == 0 ? ""
              : staged_ok         ? fmt(", A staged once = per call in %.0f products", staged_checked)
                                  : ", A staged once gives DIFFERENT results"));
}

// The bf16 dot product's denormals (kernels.h): denormal inputs count as zero and a denormal sum flushes
// to zero, as vdpbf16ps computes them; every path (the FMA ones under FTZ/DAZ) must give these bits.
void test_bf16_denormals(const Kernels& k) {
  struct Case {
    const char* what;
    float a0, a1, c0;  // A's two k, C's value before accumulating
    uint16_t w0, w1;   // the bf16 weights
    float want;
  };
  const Case cases[] = {
      // odd first: 1.5 x 2^-126, then minus 2^-126: 2^-127 is denormal and flushes to +0
      {"a denormal sum flushes to zero", -1.0f, 1.0f, 0.0f, 0x0080, 0x00c0, 0.0f},
      // 2^100 x the denormal bf16 2^-133 would be the normal 2^-33
      {"a denormal weight counts as zero", std::ldexp(1.0f, 100), 0.0f, 0.0f, 0x0001, 0, 0.0f},
      // 1e-39 is a denormal float; times 2^100 it would be 1.3e-9
      {"a denormal activation counts as zero", 1e-39f, 0.0f, 0.0f, 0x7180, 0, 0.0f},
      {"a denormal partial result before it counts as zero", 0.0f, 0.0f, 1e-39f, 0, 0, 0.0f},
      {"normal values are untouched", 1.0f, 2.0f, 0.5f, 0x3f80, 0x4000, 5.5f},
  };
  bool ok = true;
  std::string first_bad;
  for (const Case& c : cases) {
    const float A[2] = {c.a0, c.a1};
    const uint16_t W[2] = {c.w0, c.w1};
    AlignedFloats scratch(k.gemm_scratch_floats(2));
    float C = c.c0;
    k.gemm(1, 0, 1, 2, A, 2, MatB{W, WType::BF16, 2, false}, &C, 1, /*accumulate=*/true, scratch.p);
    if (std::memcmp(&C, &c.want, 4) != 0 && ok) {
      ok = false;
      first_bad = std::string(c.what) + fmt(": got %g", C);
    }
  }
  report(ok, std::string(k.isa) + " gemm bf16: denormal inputs count as zero and denormal sums flush to zero",
         ok ? "as vdpbf16ps" : first_bad);
}

// A bf16 weight packed for a product without the bf16 dot (MatB::bf16_dot false: widened to f32, as the MoE
// router is): pack_panel writes exactly packed_panel_bytes per panel, nothing past it, and the product from
// the packed copy has the bits of the product that packs per call.
void test_packed_bf16_widened(const Kernels& k) {
  if (k.pack_panel == nullptr) return;
  const int N = 2 * k.gemm_nr + 3, K = 37, M = 5;
  std::mt19937 rng(41);
  Values W = random_values(WType::BF16, static_cast<size_t>(N) * K, rng, 0.5);
  const MatB widened{W.data(), WType::BF16, K, false, nullptr, /*bf16_dot=*/false};
  const size_t bytes = k.packed_panel_bytes(widened, K);
  const int panels = (N + k.gemm_nr - 1) / k.gemm_nr;
  const size_t guard = 256;  // floats past the last panel, which nothing may write
  AlignedFloats packed(panels * bytes / 4 + guard);
  std::fill(packed.p, packed.p + panels * bytes / 4 + guard, -7.0f);
  for (int p = 0; p < panels; ++p) k.pack_panel(widened, N, K, p, reinterpret_cast<char*>(packed.p) + p * bytes);
  bool guard_ok = true;
  for (size_t i = 0; i < guard; ++i) guard_ok = guard_ok && packed.p[panels * bytes / 4 + i] == -7.0f;
  std::vector<float> A = random_floats(static_cast<size_t>(M) * K, rng);
  std::vector<float> want(static_cast<size_t>(M) * N), got(want.size());
  AlignedFloats scratch(k.gemm_scratch_floats(K));
  k.gemm(M, 0, N, K, A.data(), K, widened, want.data(), N, false, scratch.p);
  MatB prepacked = widened;
  prepacked.packed = packed.p;
  k.gemm(M, 0, N, K, A.data(), K, prepacked, got.data(), N, false, scratch.p);
  const bool same = std::memcmp(want.data(), got.data(), want.size() * 4) == 0;
  report(guard_ok && same, std::string(k.isa) + " gemm bf16 without the bf16 dot: packed once, as packed per call",
         !guard_ok ? "pack_panel wrote past packed_panel_bytes"
         : same    ? fmt("%.0f bytes a panel", static_cast<double>(bytes))
                   : "other bits");
}

// The SIMD ISAs' reductions and exp in the one order kernels.h defines (the AVX-512 registers' order), as
// scalar code: what every SIMD ISA must give bit for bit, so that a model answers the same on any of them.
namespace simd_order {

// _mm512_reduce_add_ps of 16 lanes: halves added (8 lanes), then halves again (4), then (0+2) + (1+3).
float reduce16(const float* lane) {
  float u[8], v[4];
  for (int j = 0; j < 8; ++j) u[j] = lane[8 + j] + lane[j];
  for (int j = 0; j < 4; ++j) v[j] = u[4 + j] + u[j];
  return (v[0] + v[2]) + (v[1] + v[3]);
}

// exp: clamped to [-104, 88.8], n = round(x log2 e), r = x - n ln 2 in two parts, a degree-5 polynomial,
// scaled by 2^n with one rounding (ldexpf: a denormal result is rounded once, as _mm512_scalef_ps does).
float exp(float x) {
  if (std::isnan(x)) return x;
  x = 88.8f < x ? 88.8f : x;
  x = -104.0f > x ? -104.0f : x;
  const float n = std::nearbyint(x * 1.44269504088896341f);
  float r = std::fmaf(-n, 0.693359375f, x);
  r = std::fmaf(-n, -2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = std::fmaf(p, r, c);
  const float y = std::fmaf(p, r * r, r) + 1.0f;
  return std::ldexp(y, static_cast<int>(n));
}

// rmsnorm: the squares summed by fmaf in 32 lanes (element i in lane i mod 32; a tail past the last whole
// 32 in lanes i mod 16), the two halves added lane by lane, then reduce16.
void rmsnorm(const float* x, const float* w, float* y, int n, float eps) {
  float lane[32] = {};
  int i = 0;
  for (; i + 32 <= n; i += 32)
    for (int l = 0; l < 32; ++l) lane[l] = std::fmaf(x[i + l], x[i + l], lane[l]);
  for (; i < n; i += 16)
    for (int l = 0; l < 16 && i + l < n; ++l) lane[l] = std::fmaf(x[i + l], x[i + l], lane[l]);
  float half[16];
  for (int l = 0; l < 16; ++l) half[l] = lane[l] + lane[16 + l];
  const float r = 1.0f / std::sqrt(reduce16(half) / static_cast<float>(n) + eps);
  for (int j = 0; j < n; ++j) y[j] = x[j] * r * w[j];
}

// softmax: scaled, the max subtracted, exp above, the sum in 16 lanes (element i in lane i mod 16), reduce16.
void softmax(float* x, int n, float scale) {
  float max = -INFINITY;
  for (int i = 0; i < n; ++i) x[i] *= scale, max = std::max(max, x[i]);
  float lane[16] = {};
  for (int i = 0; i < n; ++i) x[i] = exp(x[i] - max), lane[i % 16] += x[i];
  const float sum = reduce16(lane);
  for (int i = 0; i < n; ++i) x[i] /= sum;
}

}  // namespace simd_order

// A SIMD ISA's rmsnorm, softmax, exp and silu_mul equal simd_order's bit for bit over lengths around the
// register widths (8, 16, 32) and real model widths, and exp over its whole input range.
void test_simd_order(const Kernels& k) {
  std::mt19937 rng(7);
  int differ = 0;
  std::string first;
  auto check = [&](bool same, const std::string& what) {
    if (!same && differ++ == 0) first = what;
  };
  // Sums in another order often round to the same result, so each length gets many draws.
  for (int n : {1, 7, 8, 9, 15, 16, 17, 24, 28, 31, 32, 33, 40, 48, 63, 64, 100, 256, 768, 4096})
    for (int draw = 0; draw < 40; ++draw) {
      std::vector<float> x = random_floats(n, rng, 2.0f), w = random_floats(n, rng), got(n), want(n);
      k.rmsnorm(x.data(), w.data(), got.data(), n, 1e-5f);
      simd_order::rmsnorm(x.data(), w.data(), want.data(), n, 1e-5f);
      check(got == want, fmt("rmsnorm n=%.0f", n));
      std::vector<float> s = random_floats(n, rng, 40.0f);  // spread wide enough that some exp underflow
      got = s, want = s;
      k.softmax(got.data(), n, 0.5f);
      simd_order::softmax(want.data(), n, 0.5f);
      check(got == want, fmt("softmax n=%.0f", n));
      std::vector<float> g = random_floats(n, rng, 8.0f), u = random_floats(n, rng);
      k.silu_mul(g.data(), u.data(), got.data(), n);
      for (int i = 0; i < n; ++i) want[i] = g[i] / (1.0f + simd_order::exp(0.0f - g[i])) * u[i];
      check(got == want, fmt("silu_mul n=%.0f", n));
    }
  // exp: every 1021st float from -110 to 90 (the denormal results and both clamps), and the specials.
  std::vector<float> x;
  for (float v = -110.0f; v < 90.0f; v = std::nextafter(v, 100.0f)) {
    x.push_back(v);
    for (int skip = 0; skip < 1020 && v < 90.0f; ++skip) v = std::nextafter(v, 100.0f);
  }
  for (float v : {-INFINITY, INFINITY, 0.0f, -0.0f, 88.8f, -104.0f, -87.4f, 88.75f}) x.push_back(v);
  std::vector<float> y(x.size());
  k.exp(x.data(), y.data(), static_cast<int>(x.size()));
  int exp_differ = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    const float want = simd_order::exp(x[i]);
    if (std::memcmp(&want, &y[i], 4) != 0 && exp_differ++ == 0)
      check(false, fmt("exp(%.9g) = %.9g, the order's %.9g", x[i], y[i], want));
  }
  report(differ == 0,
         std::string(k.isa) + " rmsnorm, softmax, silu_mul and exp: the SIMD order of kernels.h bit for bit",
         differ == 0 ? fmt("%.0f exp inputs, 20 lengths x 40 draws", static_cast<double>(x.size()))
                     : fmt("%.0f cases differ (%.0f exp inputs), first: ", differ, exp_differ) + first);
}

void test_elementwise(const Kernels& k) {
  std::mt19937 rng(99);
  const std::string isa = k.isa;
  {  // rmsnorm
    double worst = 0;
    for (int n : {1, 7, 16, 33, 100, 768}) {
      std::vector<float> x = random_floats(n, rng, 2.0f), w = random_floats(n, rng), y(n);
      k.rmsnorm(x.data(), w.data(), y.data(), n, 1e-5f);
      double ss = 0;
      for (float v : x) ss += static_cast<double>(v) * v;
      double r = 1.0 / std::sqrt(ss / n + 1e-5);
      for (int i = 0; i < n; ++i) {
        double ref = x[i] * r * w[i];
        worst = std::max(worst, std::fabs(y[i] - ref) / (std::fabs(ref) + 1e-30));
      }
      // In place.
      std::vector<float> z = x;
      k.rmsnorm(z.data(), w.data(), z.data(), n, 1e-5f);
      if (z != y) worst = 1;
    }
    report(worst < 1e-6, isa + " rmsnorm", fmt("max relative error %.2e", worst));
  }
  {  // silu_mul, including large |gate| where exp over/underflows
    double worst = 0;
    for (int n : {1, 5, 16, 31, 200}) {
      std::vector<float> g = random_floats(n, rng, 4.0f), u = random_floats(n, rng), out(n);
      if (n == 200) g[0] = 100.0f, g[1] = -100.0f, g[2] = 89.0f, g[3] = -89.0f, g[4] = 0.0f;
      k.silu_mul(g.data(), u.data(), out.data(), n);
      for (int i = 0; i < n; ++i) {
        double ref = g[i] / (1.0 + std::exp(-static_cast<double>(g[i]))) * u[i];
        worst = std::max(worst, std::fabs(out[i] - ref) / (std::fabs(ref) + 1e-30));
      }
    }
    report(worst < 1e-6, isa + " silu_mul", fmt("max relative error %.2e", worst));
  }
  {  // softmax with a scale
    double worst = 0;
    for (int n : {1, 3, 16, 17, 160, 333}) {
      std::vector<float> x = random_floats(n, rng, 6.0f), y = x;
      k.softmax(y.data(), n, 0.125f);
      double max = -INFINITY, sum = 0;
      for (float v : x) max = std::max(max, v * 0.125);
      for (float v : x) sum += std::exp(v * 0.125 - max);
      for (int i = 0; i < n; ++i) {
        double ref = std::exp(x[i] * 0.125 - max) / sum;
        worst = std::max(worst, std::fabs(y[i] - ref) / ref);
      }
    }
    report(worst < 2e-6, isa + " softmax", fmt("max relative error %.2e", worst));
  }
  {  // exp over the normal range, plus the special values
    const int n = 100003;
    std::vector<float> x(n), y(n);
    for (int i = 0; i < n; ++i) x[i] = -87.0f + (88.7f + 87.0f) * i / (n - 1);
    k.exp(x.data(), y.data(), n);
    double worst = 0;
    for (int i = 0; i < n; ++i) {
      double ref = std::exp(static_cast<double>(x[i]));
      worst = std::max(worst, std::fabs(y[i] - ref) / ref);
    }
    float special_in[6] = {-INFINITY, INFINITY, NAN, 0.0f, -120.0f, 100.0f}, special_out[6];
    k.exp(special_in, special_out, 6);
    bool specials = special_out[0] == 0.0f && std::isinf(special_out[1]) && special_out[1] > 0 &&
                    std::isnan(special_out[2]) && special_out[3] == 1.0f && special_out[4] == 0.0f &&
                    std::isinf(special_out[5]);
    report(
        worst < 3e-7 && specials, isa + " exp",
        fmt("max relative error %.2e on [-87, 88.7]", worst) + (specials ? ", specials ok" : ", SPECIAL VALUES WRONG"));
  }
  {  // convert: every bf16 and f16 bit pattern, and f32 rows of odd length
    std::vector<uint16_t> all(65536);
    for (int i = 0; i < 65536; ++i) all[i] = static_cast<uint16_t>(i);
    std::vector<float> out(65536);
    bool ok = true;
    for (WType t : {WType::BF16, WType::F16}) {
      k.convert(all.data() + 1, t, out.data(), 65535);  // odd start and length: tails and unaligned loads
      for (int i = 1; i < 65536; ++i) {
        float ref = t == WType::BF16 ? cpu::bf16_to_f32(all[i]) : cpu::f16_to_f32(all[i]);
        float got = out[i - 1];
        if (!(std::memcmp(&got, &ref, 4) == 0 || (std::isnan(got) && std::isnan(ref)))) ok = false;
      }
    }
    std::vector<float> f = random_floats(37, rng), g(37);
    k.convert(f.data(), WType::F32, g.data(), 37);
    ok = ok && f == g;
    report(ok, isa + " convert (all bf16/f16 bit patterns, f32)");
  }
}

void test_scalar_conversions() {
  struct Case {
    uint16_t bits;
    float value;
  };
  const Case f16[] = {{0x3c00, 1.0f},
                      {0xc000, -2.0f},
                      {0x7bff, 65504.0f},
                      {0x0001, std::ldexp(1.0f, -24)},
                      {0x03ff, 1023 * std::ldexp(1.0f, -24)},
                      {0x0400, std::ldexp(1.0f, -14)},
                      {0x3555, 0.333251953125f},
                      {0x7c00, INFINITY},
                      {0xfc00, -INFINITY}};
  bool ok = true;
  for (const Case& c : f16) ok = ok && cpu::f16_to_f32(c.bits) == c.value;
  ok = ok && std::isnan(cpu::f16_to_f32(0x7e00)) && std::signbit(cpu::f16_to_f32(0x8000)) &&
       cpu::f16_to_f32(0x8000) == 0.0f;
  ok = ok && cpu::bf16_to_f32(0x3f80) == 1.0f && cpu::bf16_to_f32(0xc2f7) == -123.5f;
  report(ok, "scalar f16/bf16 -> f32 conversions (known values, subnormals, inf, nan, -0)");
}

// ------------------------------------------------------------------------------------------------
// Thread pool

void test_threadpool() {
  bool ok = true;
  for (int threads : {1, 2, 3, 5}) {
    ThreadPool pool(threads);
    ok = ok && pool.size() == threads;
    for (size_t n : {0, 1, 2, 3, 7, 1000}) {
      std::vector<std::atomic<int>> hits(n), running(threads);
      std::atomic<int> bad_thread{0};
      pool.parallel_for(n, [&](size_t b, size_t e, int t) {
        // A thread index in range, and no other chunk running under it now (it names scratch).
        if (t < 0 || t >= threads || running[t].exchange(1) != 0) {
          bad_thread = 1;
          return;
        }
        for (size_t i = b; i < e; ++i) hits[i]++;
        running[t] = 0;
      });
      for (auto& h : hits) ok = ok && h.load() == 1;
      ok = ok && bad_thread == 0;
    }
  }
  // Many back-to-back jobs: catches lost wake-ups and races between generations.
  ThreadPool pool(2);
  std::atomic<long> total{0};
  const int rounds = 20000;
  auto t0 = std::chrono::steady_clock::now();
  for (int r = 0; r < rounds; ++r)
    pool.parallel_for(4, [&](size_t b, size_t e, int) { total += static_cast<long>(e - b); });
  double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() / rounds;
  ok = ok && total == 4L * rounds;
  // Jobs smaller than the pool (workers without a chunk may first see the next job), back to back; then
  // jobs spaced wider than the spin, so that the workers and the caller sleep and are woken.
  ThreadPool wide(5);
  std::atomic<long> covered{0};
  long expected = 0;
  for (int r = 0; r < rounds; ++r) {
    const size_t n = static_cast<size_t>(r % 7);
    expected += static_cast<long>(n);
    wide.parallel_for(n, [&](size_t b, size_t e, int) { covered += static_cast<long>(e - b); });
  }
  ok = ok && covered == expected;
  std::atomic<long> spaced{0};
  for (int r = 0; r < 50; ++r) {
    std::this_thread::sleep_for(std::chrono::microseconds(r % 2 ? 300 : 20));
    pool.parallel_for(2, [&](size_t b, size_t e, int) { spaced += static_cast<long>(e - b); });
  }
  ok = ok && spaced == 100;
  report(ok, "threadpool parallel_for covers each index once (back to back, smaller than the pool, and spaced)",
         fmt("%.1f us per 2-thread parallel_for", us));
}

// ------------------------------------------------------------------------------------------------
// Quantized kernels (cpu/quant.h)

// Weight quantization (the scalar quantize_weight_row every path shares): each value within half a scale
// step of the original (Q8_0; a whole step for Q4_0's one-sided clamp), the format's value range.
void test_quantize_weights() {
  std::mt19937 rng(77);
  for (cpu::QType type : {cpu::QType::Q8_0, cpu::QType::Q4_0}) {
    const int K = 256;
    std::vector<float> x = random_floats(K, rng, 0.05f);
    for (int j = 64; j < 96; ++j) x[j] = 0.0f;  // an all-zero block
    x[100] = 3.0f;                              // an outlier block
    std::vector<uint8_t> q(K);
    std::vector<uint16_t> d(K / 32);
    cpu::quantize_weight_row(x.data(), K, type, q.data(), d.data());
    cpu::QMatB B{q.data(), d.data(), type, K, K / 32};
    bool ok = true;
    double worst = 0;
    for (int k = 0; k < K; ++k) {
      const double step = std::fabs(cpu::f16_to_f32(d[k / 32]));
      const double err = std::fabs(cpu::qweight_value(B, 0, k) - static_cast<double>(x[k]));
      const double allowed = (type == cpu::QType::Q8_0 ? 0.5 : 1.0) * step * (1 + 1e-3);
      if (err > allowed) ok = false;
      worst = std::max(worst, step > 0 ? err / step : err);
    }
    for (int k = 64; k < 96; ++k) ok = ok && cpu::qweight_value(B, 0, k) == 0.0f;
    report(ok, std::string("quantize weights ") + cpu::qtype_name(type) + " within the rounding step",
           fmt("worst |error| / step %.3f", worst));
  }
  // f32 -> f16 rounding against the f16 -> f32 widening: every f16 round-trips, midpoints go to even.
  bool ok = true;
  for (uint32_t h = 0; h < 0x10000; ++h) {
    if ((h & 0x7c00) == 0x7c00) continue;
    const float f = cpu::f16_to_f32(static_cast<uint16_t>(h));
    if (cpu::f32_to_f16(f) != (h == 0x8000 ? 0x8000 : h)) ok = false;
    if ((h & 0x7fff) < 0x7bff) {  // the midpoint to the next f16 up ties to the even one
      const float next = cpu::f16_to_f32(static_cast<uint16_t>(h + 1));
      const float mid = static_cast<float>((static_cast<double>(f) + next) / 2);
      if (static_cast<double>(mid) * 2 == static_cast<double>(f) + next &&
          cpu::f32_to_f16(mid) != ((h & 1) ? h + 1 : h))
        ok = false;
    }
  }
  report(ok, "f32_to_f16 round-trips every finite f16 and ties to even");

  // The Hadamard rotation: the block width for K, and the transform against the matrix's definition
  // H[i][j] = (-1)^popcount(i & j) per block (exact on small integers), applied twice = R times x.
  ok = cpu::hadamard_block(96) == 32 && cpu::hadamard_block(192) == 64 && cpu::hadamard_block(4096) == 128 &&
       cpu::hadamard_block(12288) == 128 && cpu::hadamard_block(1408) == 128 && cpu::hadamard_block(160) == 32;
  std::uniform_int_distribution<int> small(-50, 50);
  for (int R : {32, 64, 128}) {
    const int K = 3 * R;
    std::vector<float> x(K);
    for (float& v : x) v = static_cast<float>(small(rng));
    std::vector<float> y = x;
    cpu::hadamard_transform(y.data(), K, R);
    for (int b = 0; b < K; b += R)
      for (int i = 0; i < R; ++i) {
        double want = 0;
        for (int j = 0; j < R; ++j) want += (__builtin_popcount(i & j) % 2 ? -1.0 : 1.0) * x[b + j];
        ok = ok && y[b + i] == want;
      }
    cpu::hadamard_transform(y.data(), K, R);
    for (int k = 0; k < K; ++k) ok = ok && y[k] == static_cast<float>(R) * x[k];
  }
  report(ok, "hadamard_transform equals the Hadamard matrix per block, and applied twice is R times x");
}

// One ISA's activation quantization and gemm for one format: the activations within half a step, with
// their sum, and identical to the portable ones; the product within the bound of quant.h against the
// float64 product of the dequantized operands (a stored Q8_0 -128 among them); sentinel columns untouched;
// every SIMD path, on the packed weights and on the row-major ones, bit-identical to the portable kernel.
void test_quant_gemm(const cpu::QuantKernels& k, cpu::QType type) {
  const cpu::QuantKernels& ref = *cpu::quant_portable_kernels();
  if (type == cpu::QType::Q8_0) {
    // The ISA's rotation: hadamard_transform's bits on random floats (roundings included), every width.
    std::mt19937 r(99);
    bool rot_same = true;
    for (int R : {32, 64, 128})
      for (int K : {R, 3 * R, 4096}) {
        if (K % R != 0) continue;
        std::vector<float> x = random_floats(K, r, 3.0f), y = x;
        cpu::hadamard_transform(x.data(), K, R);
        k.rotate(y.data(), K, R);
        rot_same = rot_same && x == y;
      }
    report(rot_same, std::string("quantized (") + k.isa + "): rotate equals hadamard_transform bit for bit");
  }
  {
    // The ISA's weight quantization: quantize_weight_row's bytes and scales on random rows and on blocks
    // made to catch a difference: all zeros (and -0), ties at half a step, the largest magnitude twice
    // with both signs (Q4_0 takes the first), values past the clamp after the f16 rounding of the scale,
    // tiny and huge values, an infinity and a NaN.
    std::mt19937 r(77 + static_cast<int>(type));
    const int K = 32 * 24;
    std::vector<float> x = random_floats(K, r, 1.0f);
    for (int j = 0; j < 32; ++j) x[j] = j % 2 ? 0.0f : -0.0f;
    for (int j = 0; j < 32; ++j) x[32 + j] = 0.5f * static_cast<float>(j - 16);
    x[64 + 3] = -2.5f, x[64 + 9] = 2.5f;
    for (int j = 0; j < 32; ++j) x[96 + j] = 127.49f * static_cast<float>(j - 16) / 16.0f;
    for (int j = 0; j < 32; ++j) x[128 + j] = std::ldexp(x[128 + j], -130);
    for (int j = 0; j < 32; ++j) x[160 + j] = std::ldexp(x[160 + j], 100);
    x[192 + 5] = INFINITY;
    x[224 + 7] = NAN;
    std::vector<uint8_t> want(K, 0xCD), got(K, 0xCD);
    std::vector<uint16_t> want_s(K / 32, 1), got_s(K / 32, 2);
    bool same_bytes = true;
    for (int trial = 0; trial < 4; ++trial) {
      if (trial > 0) x = random_floats(K, r, trial == 1 ? 1e-3f : 40.0f);
      cpu::quantize_weight_row(x.data(), K, type, want.data(), want_s.data());
      k.quantize_weights(x.data(), K, type, got.data(), got_s.data());
      same_bytes = same_bytes && want == got && want_s == got_s;
    }
    report(same_bytes, std::string("quantized (") + k.isa + "): quantize_weights writes quantize_weight_row's " +
                           (type == cpu::QType::Q8_0 ? "q8_0" : "q4_0") + " bytes and scales");
  }
  struct Shape {
    int M, N, K;
  };
  // The last has more columns than a chunk of gemm_path (512 columns at that many rows for an L2 of up to
  // 4 MiB).
  const Shape shapes[] = {{1, 1, 32},    {1, 7, 64},   {5, 17, 96},   {4, 2, 256},    {7, 33, 320},
                          {13, 40, 512}, {3, 5, 4096}, {8, 70, 1056}, {19, 130, 288}, {1100, 530, 32}};
  std::mt19937 rng(4321 + static_cast<int>(type));
  bool act_ok = true, act_same = true, bound_ok = true, sentinels_ok = true, same = true, same_rows = true,
       packs_same = true;
  double worst = 0;
  for (const Shape& s : shapes)
    for (int variant = 0; variant < 3; ++variant) {
      const bool accumulate = variant == 1;
      // A column range: whole panels from the first one past 0 (n0 a multiple of the panel width).
      const int step = k.nr > 0 ? k.nr : 1;
      const int n0 = variant == 2 && s.N > step ? step : 0;
      const int n1 = variant == 2 ? std::max(n0 + 1, s.N - 1) : s.N;
      const int64_t lda = s.K + 5, ldc = s.N + 3;
      const int nb = s.K / 32;
      const int row_bytes = s.K / 32 * cpu::qblock_bytes(type);
      const int64_t ldw = row_bytes + 16, lds = nb + 3;
      std::vector<float> W = random_floats(static_cast<size_t>(s.N) * s.K, rng, 0.05f);
      std::vector<uint8_t> wq(s.N * ldw, 0xAB);
      std::vector<uint16_t> wd(s.N * lds, 0);
      for (int n = 0; n < s.N; ++n)
        cpu::quantize_weight_row(W.data() + static_cast<size_t>(n) * s.K, s.K, type, wq.data() + n * ldw,
                                 wd.data() + n * lds);
      // A stored Q8_0 -128 (not written by quantize_weight_row) reads as -127 on every path.
      if (type == cpu::QType::Q8_0 && variant == 1) wq[s.K / 2] = 0x80;
      const cpu::QMatB B{wq.data(), wd.data(), type, ldw, lds};
      cpu::QMatB Bp = B;
      std::vector<uint8_t> packed;
      if (k.nr > 0) {
        const int panels = (s.N + k.nr - 1) / k.nr;
        const size_t panel_bytes = k.packed_panel_bytes(s.K, type);
        packed.resize(panels * panel_bytes + 64);
        uint8_t* base = packed.data() + (64 - reinterpret_cast<uintptr_t>(packed.data()) % 64) % 64;
        for (int p = 0; p < panels; ++p) k.pack_panel(B, s.N, s.K, p, base + p * panel_bytes);
        Bp.packed = base;
        // The ISA's pack writes pack_quant_blocks' bytes (its own transposes; the zero columns past N).
        std::vector<uint8_t> want(panel_bytes);
        for (int p = 0; p < panels; ++p) {
          cpu::pack_quant_blocks(B, s.N, p * k.nr, k.nr, 0, nb, k.q8_unsigned, want.data());
          if (std::memcmp(want.data(), base + p * panel_bytes, panel_bytes) != 0) packs_same = false;
        }
      }
      std::vector<float> A = random_floats(s.M * lda, rng, 2.0f);
      if (variant == 0) std::fill(A.begin(), A.begin() + 32, 0.0f);  // an all-zero activation block
      if (variant == 2) A[3] = 1e-30f;                               // a block of tiny values
      std::vector<cpu::QBlockA> aq(s.M * nb), aq_ref(s.M * nb);
      k.quantize(s.M, s.K, A.data(), lda, aq.data());
      ref.quantize(s.M, s.K, A.data(), lda, aq_ref.data());
      if (std::memcmp(aq.data(), aq_ref.data(), aq.size() * sizeof(cpu::QBlockA)) != 0) act_same = false;
      for (int m = 0; m < s.M; ++m)
        for (int b = 0; b < nb; ++b) {
          const cpu::QBlockA& blk = aq[m * nb + b];
          int sum = 0;
          for (int j = 0; j < 32; ++j) {
            const double q = blk.q[j], x = A[m * lda + b * 32 + j];
            sum += blk.q[j];
            // Half a step, plus the f32 roundings of the scale, its inverse and x * inverse.
            if (std::fabs(q) > 127 || std::fabs(q * blk.scale - x) > (0.5 + 4 * 127 * std::ldexp(1.0, -24)) * blk.scale)
              act_ok = false;
          }
          if (sum != blk.sum) act_ok = false;
        }
      std::vector<float> C0 = random_floats(s.M * ldc, rng), C = C0, Cr = C0, Crows = C0;
      std::vector<float> scratch(k.gemm_scratch_floats(s.K) + 16);
      float* scratch_aligned = scratch.data() + (16 - reinterpret_cast<uintptr_t>(scratch.data()) / 4 % 16) % 16;
      k.gemm(s.M, n0, n1, s.K, aq.data(), Bp, C.data(), ldc, accumulate, scratch_aligned);
      k.gemm(s.M, n0, n1, s.K, aq.data(), B, Crows.data(), ldc, accumulate, scratch_aligned);
      ref.gemm(s.M, n0, n1, s.K, aq.data(), B, Cr.data(), ldc, accumulate, nullptr);
      if (std::memcmp(C.data(), Cr.data(), C.size() * 4) != 0) same = false;
      if (std::memcmp(Crows.data(), Cr.data(), C.size() * 4) != 0) same_rows = false;
      for (int m = 0; m < s.M; ++m)
        for (int n = 0; n < s.N + 3; ++n) {
          const size_t ci = m * ldc + n;
          if (n < n0 || n >= n1) {
            if (std::memcmp(&C[ci], &C0[ci], 4) != 0) sentinels_ok = false;
            continue;
          }
          double exact = 0, mag = 0;
          for (int kk = 0; kk < s.K; ++kk) {
            const cpu::QBlockA& blk = aq[m * nb + kk / 32];
            const double term = static_cast<double>(blk.q[kk % 32]) * blk.scale * cpu::qweight_value(B, n, kk);
            exact += term;
            mag += std::fabs(term);
          }
          const double c0 = accumulate ? C0[ci] : 0.0;
          // quant.h: (K/32 + 2) * 2^-23 * sum|terms|, the chain here starting from C.
          const double tol = (nb + 2) * std::ldexp(1.0, -23) * (mag + std::fabs(c0)) + 1e-30;
          const double err = std::fabs(C[ci] - (c0 + exact));
          if (err > tol) bound_ok = false;
          worst = std::max(worst, mag > 0 ? err / mag : err);
        }
    }
  const std::string name = std::string("quant ") + k.isa + " " + cpu::qtype_name(type);
  report(act_ok, name + " activations within half a step, with their sum");
  report(act_same, name + " activations identical to portable");
  report(bound_ok, name + " gemm within the bound of the float64 product",
         fmt("worst |error| / sum|terms| %.2e", worst));
  report(sentinels_ok, name + " gemm leaves columns outside [n0, n1) untouched");
  report(same, name + " gemm on packed weights bit-identical to portable");
  report(same_rows, name + " gemm on row-major weights bit-identical to portable");
  if (k.nr > 0) report(packs_same, name + " pack_panel writes pack_quant_blocks' bytes");
}

}  // namespace vdiff::test
