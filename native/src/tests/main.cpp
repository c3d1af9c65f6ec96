// Native unit tests of the model core: every kernel of every ISA this CPU has against a plain scalar
// reference, the JSON reader, safetensors and config.json error cases, the thread pool, and the whole
// forward pass against a float64 re-implementation and against the PyTorch golden fixtures.
//
//   vdiff-native-tests [--golden DIR]     run every check; one line per check; exit status 1 on any failure
//   vdiff-native-tests --bench            clock, FMA peak and GEMM GFLOP/s on 1 and 2 threads (no checks)
//   vdiff-native-tests --bench-model DIR [--threads N] [--seq-len L] [--rows R] [--read B E]
//                                         forward latency of a model directory (one JSON line); with
//                                         --read, of a KV cache read computing [B, E) (rows from B)
//
// Kernel tests cover every ISA the CPU has; the model tests use the kernels VDIFF_ISA selects (default:
// the widest the CPU has). Golden fixtures default to test/fixtures/golden of the source tree.
#include <sys/stat.h>
#include <time.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "core/config.h"
#include "core/engine.h"
#include "core/error.h"
#include "core/json.h"
#include "core/model.h"
#include "core/safetensors.h"
#include "core/threadpool.h"
#include "cpu/kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace fs = std::filesystem;
using namespace vdiff;
using cpu::Kernels;
using cpu::MatB;
using cpu::WType;

namespace {

// ------------------------------------------------------------------------------------------------
// Reporting

int g_checks = 0;
int g_failures = 0;

void report(bool ok, const std::string& name, const std::string& detail = "") {
  ++g_checks;
  if (!ok) ++g_failures;
  std::printf("%s %s%s%s\n", ok ? "ok  " : "FAIL", name.c_str(), detail.empty() ? "" : ": ", detail.c_str());
  std::fflush(stdout);
}

std::string fmt(const char* format, double a, double b = 0, double c = 0) {
  char buf[256];
  std::snprintf(buf, sizeof buf, format, a, b, c);
  return buf;
}

// Runs fn and checks it throws vdiff::Error with `code` and a message containing every `needle`.
void expect_error(const std::string& name, ErrorCode code, std::vector<std::string> needles, const std::function<void()>& fn) {
  try {
    fn();
    report(false, name, "no error thrown");
  } catch (const Error& e) {
    std::string msg = e.what();
    bool ok = e.code() == code;
    for (const auto& n : needles) ok = ok && msg.find(n) != std::string::npos;
    report(ok, name, msg + (e.code() == code ? "" : std::string(" [code ") + error_code_name(e.code()) + "]"));
  } catch (const std::exception& e) {
    report(false, name, std::string("unexpected exception: ") + e.what());
  }
}

struct TempDir {
  fs::path path;
  TempDir() {
    std::string tmpl = (fs::temp_directory_path() / "vdiff-test-XXXXXX").string();
    if (!mkdtemp(tmpl.data())) throw std::runtime_error("mkdtemp failed");
    path = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string str() const { return path.string(); }
};

void write_file(const fs::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// ------------------------------------------------------------------------------------------------
// Test data: weights in each storage type, with their exact values as doubles

uint16_t f32_to_bf16_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  bits += 0x7fff + ((bits >> 16) & 1);  // round to nearest even (no NaNs in test data)
  return static_cast<uint16_t>(bits >> 16);
}

struct Values {
  WType type = WType::F32;
  std::vector<float> f32;
  std::vector<uint16_t> half;
  std::vector<double> exact;  // the value each stored element represents
  const void* data() const { return type == WType::F32 ? static_cast<const void*>(f32.data()) : half.data(); }
  size_t bytes() const { return type == WType::F32 ? f32.size() * 4 : half.size() * 2; }
  std::string raw() const { return std::string(static_cast<const char*>(data()), bytes()); }
};

// `count` values of roughly N(0, scale^2) (f16: random bit patterns of magnitude 2^-7 .. 2^0 * scale-ish).
Values random_values(WType type, size_t count, std::mt19937& rng, double scale) {
  Values v;
  v.type = type;
  std::normal_distribution<float> normal(0.0f, static_cast<float>(scale));
  if (type == WType::F32) {
    for (size_t i = 0; i < count; ++i) v.f32.push_back(normal(rng));
    for (float f : v.f32) v.exact.push_back(f);
  } else if (type == WType::BF16) {
    for (size_t i = 0; i < count; ++i) v.half.push_back(f32_to_bf16_bits(normal(rng)));
    for (uint16_t h : v.half) v.exact.push_back(cpu::bf16_to_f32(h));
  } else {
    std::uniform_int_distribution<int> mantissa(0, 1023), sign(0, 1);
    // Exponent fields 8 .. 15 give magnitudes 2^-7 .. 2^0 (scaled by about `scale` via the top field).
    int top = 15 + static_cast<int>(std::floor(std::log2(scale)));
    std::uniform_int_distribution<int> exponent(top - 7, top);
    for (size_t i = 0; i < count; ++i)
      v.half.push_back(static_cast<uint16_t>((sign(rng) << 15) | (exponent(rng) << 10) | mantissa(rng)));
    for (uint16_t h : v.half) v.exact.push_back(cpu::f16_to_f32(h));
  }
  return v;
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

// ------------------------------------------------------------------------------------------------
// Kernels

// Every gemm shape/type/layout of one ISA: within the rigorous bound for f32 recursive summation, sentinel
// columns outside [n0, n1) untouched, and (SIMD ISAs) bit-identical to one sequential fmaf chain per output.
void test_gemm(const Kernels& k, WType type, bool k_major) {
  struct Shape {
    int M, N, K;
  };
  const Shape shapes[] = {{1, 1, 1},    {1, 7, 5},     {5, 17, 33},  {6, 64, 128}, {7, 65, 129},
                          {13, 130, 300}, {12, 200, 16}, {3, 64, 257}, {19, 48, 64}, {4, 9, 0}};
  std::mt19937 rng(1234 + static_cast<int>(type) * 7 + k_major);
  double worst = 0;  // error / bound
  bool sentinels_ok = true, exact_ok = true, bound_ok = true, packed_ok = true;
  int packed_checked = 0;
  const bool simd = std::string(k.isa) != "portable";
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
          float chain = accumulate ? C0[ci] : 0.0f;
          for (int kk = 0; kk < s.K; ++kk) {
            double b = B.exact[k_major ? kk * ldb + n : n * ldb + kk];
            ref += A[m * lda + kk] * b;
            bound += std::fabs(A[m * lda + kk] * b);
            chain = std::fma(A[m * lda + kk], static_cast<float>(b), chain);
          }
          // Recursive summation: |error| <= 2 (K + 1) u sum|terms| with u = 2^-24 (mul + add roundings).
          const double tol = 2.0 * (s.K + 1) * std::ldexp(1.0, -24) * bound + 1e-30;
          double err = std::fabs(C[ci] - ref);
          if (err > tol) bound_ok = false;
          worst = std::max(worst, bound > 0 ? err / bound : err);
          if (simd && std::memcmp(&C[ci], &chain, 4) != 0) exact_ok = false;
        }
      // The weight packed once ahead (MatB::packed) gives the same bits as packing per call.
      if (k.pack_panel != nullptr && !k_major && n0 % k.gemm_nr == 0) {
        const int panels = (s.N + k.gemm_nr - 1) / k.gemm_nr;
        const size_t panel_floats = static_cast<size_t>(k.gemm_nr) * std::max(s.K, 1);
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
    }
  }
  std::string name = std::string(k.isa) + " gemm " + type_name(type) + (k_major ? " B[K][N]" : " W[N][K]");
  report(bound_ok && sentinels_ok && (exact_ok || !simd) && packed_ok, name,
         fmt("max error/sum|terms| %.2e", worst) + (sentinels_ok ? "" : ", wrote outside [n0, n1)") +
             (simd ? (exact_ok ? ", bit-identical to a sequential fma chain" : ", NOT equal to the sequential fma chain") : "") +
             (packed_checked == 0 ? "" : packed_ok ? fmt(", prepacked = per call in %.0f products", packed_checked)
                                                   : ", prepacked weights give DIFFERENT results"));
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
    report(worst < 3e-7 && specials, isa + " exp",
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
  const Case f16[] = {{0x3c00, 1.0f},        {0xc000, -2.0f},          {0x7bff, 65504.0f},
                      {0x0001, std::ldexp(1.0f, -24)}, {0x03ff, 1023 * std::ldexp(1.0f, -24)},
                      {0x0400, std::ldexp(1.0f, -14)}, {0x3555, 0.333251953125f}, {0x7c00, INFINITY},
                      {0xfc00, -INFINITY}};
  bool ok = true;
  for (const Case& c : f16) ok = ok && cpu::f16_to_f32(c.bits) == c.value;
  ok = ok && std::isnan(cpu::f16_to_f32(0x7e00)) && std::signbit(cpu::f16_to_f32(0x8000)) && cpu::f16_to_f32(0x8000) == 0.0f;
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
      std::vector<std::atomic<int>> hits(n);
      std::atomic<int> bad_thread{0};
      pool.parallel_for(n, [&](size_t b, size_t e, int t) {
        if (t < 0 || t >= threads) bad_thread = 1;
        for (size_t i = b; i < e; ++i) hits[i]++;
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
  report(ok, "threadpool parallel_for covers each index once", fmt("%.1f us per 2-thread parallel_for", us));
}

// ------------------------------------------------------------------------------------------------
// JSON

void test_json() {
  {
    Json j = Json::parse(R"( {"a": [1, -2.5e3, true, false, null], "s": "x\"\\\/\b\f\n\r\t\u00e9\ud83d\ude00", "o": {}, "e": []} )");
    const Json& a = *j.find("a");
    bool ok = j.is_object() && a.size() == 5 && a[0].as_int64() == 1 && a[1].as_number() == -2500.0 && a[2].as_bool() &&
              !a[3].as_bool() && a[4].is_null() && j.find("o")->size() == 0 && j.find("e")->size() == 0 && !j.find("zz");
    ok = ok && j.find("s")->as_string() == "x\"\\/\b\f\n\r\t\xc3\xa9\xf0\x9f\x98\x80";
    ok = ok && j.keys() == std::vector<std::string>({"a", "s", "o", "e"});
    report(ok, "json: values, escapes, \\u and surrogate pairs");
  }
  {
    bool ok = Json::parse("9223372036854775807").as_int64() == INT64_MAX && Json::parse("-0").as_int64() == 0 &&
              Json::parse("2.0").is_integer() && !Json::parse("1.5").is_integer() && !Json::parse("1e30").is_integer() &&
              std::isinf(Json::parse("1e400").as_number()) && Json::parse("1e-400").as_number() == 0.0 &&
              Json::parse("\"\xc3\xa9\"").as_string() == "\xc3\xa9";
    bool threw = false;
    try {
      Json::parse("1.5").as_int64();
    } catch (const JsonError&) {
      threw = true;
    }
    bool threw_type = false;
    try {
      Json::parse("\"s\"").as_number();
    } catch (const JsonError& e) {
      threw_type = std::string(e.what()).find("expected a number, got string") != std::string::npos;
    }
    report(ok && threw && threw_type, "json: integers, big/small numbers, raw UTF-8, type errors");
  }
  struct Bad {
    const char* text;
    size_t offset;
    const char* needle;
  };
  const Bad bad[] = {
      {"", 0, "unexpected end"},
      {"{\"a\":1,}", 7, "expected a string key"},
      {"[1,2", 4, "end of input inside an array"},
      {"[1 2]", 3, "expected ',' or ']'"},
      {"{\"a\" 1}", 5, "expected ':'"},
      {"\"abc", 4, "unterminated string"},
      {"\"a\\x\"", 3, "invalid escape"},
      {"\"\\u12g4\"", 5, "invalid hex digit"},
      {"\"\\ud800\"", 1, "high surrogate"},
      {"\"\\udc00\"", 1, "lone low surrogate"},
      {"\"a\nb\"", 2, "control character"},
      {"01", 1, "after the JSON value"},
      {"-", 1, "truncated number"},
      {"1.", 2, "digit after '.'"},
      {"1e+", 3, "exponent"},
      {"tru", 0, "invalid literal"},
      {"{\"a\":1,\"a\":2}", 7, "duplicate key"},
      {"[] x", 3, "after the JSON value"},
      {"\"\xc3", 1, "truncated UTF-8"},
      {"\"\xc3\"", 1, "invalid UTF-8 continuation"},
      {"\"\xc0\xaf\"", 1, "invalid UTF-8"},
      {"\"\xed\xa0\x80\"", 1, "invalid UTF-8"},
  };
  for (const Bad& b : bad) {
    try {
      Json::parse(b.text);
      report(false, std::string("json error: ") + b.needle, "parsed without error");
    } catch (const JsonError& e) {
      bool ok = e.offset() == b.offset && std::string(e.what()).find(b.needle) != std::string::npos;
      report(ok, std::string("json error: ") + b.needle, e.what());
    }
  }
  {
    std::string deep(600, '[');
    deep += std::string(600, ']');
    bool ok = false;
    try {
      Json::parse(deep);
    } catch (const JsonError& e) {
      ok = std::string(e.what()).find("nesting") != std::string::npos;
    }
    report(ok, "json error: nesting depth limit");
  }
}

// ------------------------------------------------------------------------------------------------
// safetensors

struct TensorSpec {
  std::string name;
  std::string dtype;
  std::vector<int64_t> shape;
  std::string bytes;
};

std::string shape_json(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? "," : "") + std::to_string(shape[i]);
  return s + "]";
}

std::string le64(uint64_t n) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return s;
}

// A well-formed file: header padded with spaces to a multiple of 8, tensors laid out in order.
std::string safetensors_bytes(const std::vector<TensorSpec>& tensors) {
  std::string header = "{\"__metadata__\":{\"format\":\"pt\"}";
  std::string data;
  for (const auto& t : tensors) {
    header += ",\"" + t.name + "\":{\"dtype\":\"" + t.dtype + "\",\"shape\":" + shape_json(t.shape) +
              ",\"data_offsets\":[" + std::to_string(data.size()) + "," + std::to_string(data.size() + t.bytes.size()) + "]}";
    data += t.bytes;
  }
  header += "}";
  while (header.size() % 8) header += ' ';
  return le64(header.size()) + header + data;
}

// A file with a hand-written header (for corrupt cases).
std::string raw_safetensors(const std::string& header, const std::string& data) { return le64(header.size()) + header + data; }

std::string float_bytes(std::initializer_list<float> v) {
  return std::string(reinterpret_cast<const char*>(std::data(v)), v.size() * 4);
}

void test_safetensors() {
  TempDir dir;
  const fs::path file = dir.path / "t.safetensors";
  {
    uint16_t bf[4] = {0x3f80, 0x4000, 0xc040, 0x0000};  // 1, 2, -3, 0
    write_file(file, safetensors_bytes({{"a", "F32", {2, 3}, float_bytes({1, 2, 3, 4, 5, 6})},
                                        {"b", "BF16", {4}, std::string(reinterpret_cast<char*>(bf), 8)},
                                        {"empty", "F16", {0, 5}, ""}}));
    auto f = SafetensorsFile::open(file.string());
    const TensorView* a = f->find("a");
    const TensorView* b = f->find("b");
    bool ok = a && b && f->tensors().size() == 3 && a->dtype == DType::F32 && a->shape == std::vector<int64_t>{2, 3} &&
              a->numel() == 6 && static_cast<const float*>(a->data)[5] == 6.0f && b->dtype == DType::BF16 &&
              cpu::bf16_to_f32(static_cast<const uint16_t*>(b->data)[2]) == -3.0f && f->find("empty")->numel() == 0;
    report(ok, "safetensors: valid file (F32, BF16, empty F16, metadata)");
  }
  auto corrupt = [&](const std::string& name, const std::string& bytes, std::vector<std::string> needles) {
    write_file(file, bytes);
    needles.push_back(file.string());
    expect_error("safetensors error: " + name, ErrorCode::InvalidModel, needles, [&] { SafetensorsFile::open(file.string()); });
  };
  const std::string tensor_a = "\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}";
  corrupt("shorter than the length field", "abc", {"truncated", "shorter than the 8-byte"});
  corrupt("header length past the end", raw_safetensors("{" + tensor_a + "}", float_bytes({1, 2})).substr(0, 20),
          {"truncated", "header length"});
  corrupt("implausible header length", std::string("\xff\xff\xff\xff\xff\xff\x00\x00", 8) + "{}", {"implausibly large"});
  corrupt("header is not JSON", raw_safetensors("{\"a\":", ""), {"bad header", "JSON error"});
  corrupt("header is not an object", raw_safetensors("[1,2]", ""), {"expected an object"});
  corrupt("unknown dtype", raw_safetensors("{\"a\":{\"dtype\":\"Q4_K\",\"shape\":[2],\"data_offsets\":[0,8]}}", float_bytes({1, 2})),
          {"tensor \"a\"", "unknown dtype \"Q4_K\""});
  corrupt("size does not match shape", raw_safetensors("{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", float_bytes({1, 2})),
          {"tensor \"a\"", "needs 12 bytes", "span 8"});
  corrupt("data past the end (truncated)", raw_safetensors("{" + tensor_a + "}", float_bytes({1})),
          {"tensor \"a\"", "truncated file"});
  corrupt("end before begin", raw_safetensors("{\"a\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[8,4]}}", float_bytes({1, 2})),
          {"tensor \"a\"", "before begin"});
  corrupt("overlapping tensors",
          raw_safetensors("{" + tensor_a + ",\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", float_bytes({1, 2, 3})),
          {"\"a\"", "\"b\"", "overlap"});
  corrupt("negative shape", raw_safetensors("{\"a\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}", float_bytes({1, 2})),
          {"non-negative"});
  corrupt("missing data_offsets", raw_safetensors("{\"a\":{\"dtype\":\"F32\",\"shape\":[2]}}", float_bytes({1, 2})),
          {"data_offsets"});
  expect_error("safetensors error: missing file", ErrorCode::InvalidModel, {"cannot open", "nope.safetensors"},
               [&] { SafetensorsFile::open((dir.path / "nope.safetensors").string()); });

  // Sharded directories.
  const fs::path shard_dir = dir.path / "sharded";
  fs::create_directories(shard_dir);
  write_file(shard_dir / "s1.safetensors", safetensors_bytes({{"x", "F32", {1}, float_bytes({7})}}));
  write_file(shard_dir / "s2.safetensors", safetensors_bytes({{"y", "F32", {2}, float_bytes({8, 9})}}));
  write_file(shard_dir / "model.safetensors.index.json",
             R"({"metadata": {"total_size": 12}, "weight_map": {"x": "s1.safetensors", "y": "s2.safetensors"}})");
  {
    TensorSet set = TensorSet::load_dir(shard_dir.string());
    bool ok = set.all().size() == 2 && set.files().size() == 2 && static_cast<const float*>(set.get("y").data)[1] == 9.0f &&
              static_cast<const float*>(set.get("x").data)[0] == 7.0f;
    report(ok, "safetensors: sharded directory through the index");
    expect_error("safetensors error: missing tensor names the tensor", ErrorCode::InvalidModel, {"missing tensor \"z\""},
                 [&] { set.get("z"); });
  }
  auto bad_index = [&](const std::string& name, const std::string& index, std::vector<std::string> needles) {
    write_file(shard_dir / "model.safetensors.index.json", index);
    expect_error("safetensors index error: " + name, ErrorCode::InvalidModel, needles,
                 [&] { TensorSet::load_dir(shard_dir.string()); });
  };
  bad_index("missing shard file", R"({"weight_map": {"x": "s3.safetensors"}})", {"s3.safetensors", "cannot open"});
  bad_index("tensor not in its shard", R"({"weight_map": {"x": "s2.safetensors"}})", {"\"x\"", "does not contain"});
  bad_index("path outside the directory", R"({"weight_map": {"x": "../s1.safetensors"}})", {"not a plain file name"});
  bad_index("no weight_map", R"({"metadata": {}})", {"weight_map"});
  bad_index("not JSON", R"({"weight_map": )", {"JSON error"});
  expect_error("safetensors error: empty directory", ErrorCode::InvalidModel, {"neither model.safetensors"},
               [&] { TensorSet::load_dir((dir.path / "nothing").string()); });
}

// ------------------------------------------------------------------------------------------------
// config.json

// config.json text from the base keys, with `changes` applied: a value replaces (or adds) a key, an empty
// value removes it.
std::string config_text(const std::vector<std::pair<std::string, std::string>>& changes = {}) {
  std::vector<std::pair<std::string, std::string>> keys = {
      {"d_model", "64"},      {"n_heads", "4"},        {"n_layers", "2"},      {"mlp_hidden_size", "96"},
      {"vocab_size", "100"}, {"mask_token_id", "99"}, {"eos_token_id", "98"}};
  for (const auto& [key, value] : changes) {
    auto it = std::find_if(keys.begin(), keys.end(), [&](const auto& kv) { return kv.first == key; });
    if (it != keys.end()) keys.erase(it);
    if (!value.empty()) keys.emplace_back(key, value);
  }
  std::string s = "{";
  for (size_t i = 0; i < keys.size(); ++i) s += (i ? ", \"" : "\"") + keys[i].first + "\": " + keys[i].second;
  return s + "}";
}

void test_config() {
  {
    ModelConfig c = ModelConfig::from_json(Json::parse(config_text()));
    bool ok = c.n_kv_heads == 4 && c.embedding_size == 100 && c.rope_theta == 10000.0 && c.rms_norm_eps == 1e-5 &&
              c.max_sequence_length == 4096 && !c.weight_tying && c.head_dim() == 16;
    report(ok, "config: defaults for absent optional keys");
  }
  auto bad = [](const std::string& name, const std::string& text, std::vector<std::string> needles) {
    expect_error("config error: " + name, ErrorCode::InvalidModel, needles,
                 [&] { ModelConfig::from_json(Json::parse(text)); });
  };
  for (const char* key : {"d_model", "n_heads", "n_layers", "mlp_hidden_size", "vocab_size", "mask_token_id", "eos_token_id"})
    bad(std::string("missing ") + key, config_text({{key, ""}}), {"missing required key", std::string("\"") + key + "\""});
  bad("string where an integer belongs", config_text({{"n_kv_heads", "\"4\""}}), {"\"n_kv_heads\"", "integer"});
  bad("fractional integer", config_text({{"max_sequence_length", "10.5"}}), {"\"max_sequence_length\""});
  bad("eos_token_id as a list", config_text({{"eos_token_id", "[98]"}}), {"\"eos_token_id\"", "integer"});
  bad("d_model not divisible by n_heads", config_text({{"n_heads", "5"}}), {"\"d_model\"", "\"n_heads\""});
  bad("n_heads not divisible by n_kv_heads", config_text({{"n_kv_heads", "3"}}), {"\"n_kv_heads\""});
  bad("odd head_dim", config_text({{"d_model", "12"}}), {"head dimension", "even"});
  bad("include_bias true", config_text({{"include_bias", "true"}}), {"\"include_bias\""});
  bad("negative n_layers", config_text({{"n_layers", "-1"}}), {"\"n_layers\"", "positive"});
  bad("zero d_model", config_text({{"d_model", "0"}}), {"\"d_model\"", "positive"});
  bad("mask token outside the vocabulary", config_text({{"mask_token_id", "100"}}), {"\"mask_token_id\""});
  bad("embedding_size below vocab_size", config_text({{"embedding_size", "50"}}), {"\"embedding_size\""});
  bad("rope_theta not positive", config_text({{"rope_theta", "0"}}), {"\"rope_theta\""});
  bad("rms_norm_eps not a number", config_text({{"rms_norm_eps", "\"1e-5\""}}), {"\"rms_norm_eps\""});
  bad("weight_tying not a boolean", config_text({{"weight_tying", "1"}}), {"\"weight_tying\"", "boolean"});
  bad("alibi true", config_text({{"alibi", "true"}}), {"\"alibi\""});
  bad("rope false", config_text({{"rope", "false"}}), {"\"rope\""});
  bad("unsupported layer_norm_type", config_text({{"layer_norm_type", "\"default\""}}), {"\"layer_norm_type\""});
  bad("not an object", "[1]", {"object"});
  {
    ModelConfig c = ModelConfig::from_json(Json::parse(config_text(
        {{"rope", "true"}, {"alibi", "false"}, {"activation_type", "\"silu\""}, {"block_type", "\"llama\""},
         {"layer_norm_type", "\"rms\""}, {"n_kv_heads", "2"}, {"embedding_size", "128"}, {"rope_theta", "500000.0"},
         {"max_sequence_length", "null"}, {"pad_token_id", "98"}})));
    report(c.d_model == 64 && c.n_kv_heads == 2 && c.embedding_size == 128 && c.rope_theta == 500000.0 &&
               c.max_sequence_length == 4096,
           "config: explicit values, supported switches and unknown keys are accepted");
  }
  TempDir dir;
  write_file(dir.path / "config.json", "{\"d_model\": 64,");
  expect_error("config error: bad JSON names the file", ErrorCode::InvalidModel, {"config.json", "JSON error at offset"},
               [&] { ModelConfig::from_file((dir.path / "config.json").string()); });
  write_file(dir.path / "config.json", config_text({{"n_heads", ""}}));
  expect_error("config error: from_file names the file and the key", ErrorCode::InvalidModel, {"config.json", "\"n_heads\""},
               [&] { ModelConfig::from_file((dir.path / "config.json").string()); });
}

// ------------------------------------------------------------------------------------------------
// Whole model: a tiny random checkpoint, a float64 reference forward, and the golden fixtures

struct TinySpec {
  int d_model = 32, n_heads = 4, n_kv_heads = 2, n_layers = 2, hidden = 48, vocab = 50, embedding = 56;
  double theta = 500000.0, eps = 1e-5;
  bool tied = false;
  int max_len = 256;
};

struct TinyModel {
  TinySpec spec;
  std::map<std::string, Values> tensors;
  std::map<std::string, std::vector<int64_t>> shapes;
};

TinyModel make_tiny(const TinySpec& s, WType type, uint32_t seed) {
  TinyModel m;
  m.spec = s;
  std::mt19937 rng(seed);
  const int hd = s.d_model / s.n_heads;
  auto add = [&](const std::string& name, std::vector<int64_t> shape, double scale, bool norm = false) {
    size_t n = 1;
    for (auto d : shape) n *= d;
    Values v = random_values(type, n, rng, scale);
    if (norm) {  // norm weights near 1
      Values w = random_values(WType::F32, n, rng, 0.1);
      for (size_t i = 0; i < n; ++i) {
        float f = 1.0f + w.f32[i];
        if (type == WType::F32) v.f32[i] = f, v.exact[i] = f;
        else if (type == WType::BF16) v.half[i] = f32_to_bf16_bits(f), v.exact[i] = cpu::bf16_to_f32(v.half[i]);
        else v.half[i] = 0x3c00 | (v.half[i] & 0x00ff), v.exact[i] = cpu::f16_to_f32(v.half[i]);  // 1 + small
      }
    }
    m.tensors[name] = std::move(v);
    m.shapes[name] = shape;
  };
  const std::string p = "model.transformer.";
  add(p + "wte.weight", {s.embedding, s.d_model}, 1.0);
  for (int i = 0; i < s.n_layers; ++i) {
    const std::string b = p + "blocks." + std::to_string(i) + ".";
    add(b + "attn_norm.weight", {s.d_model}, 1, true);
    add(b + "ff_norm.weight", {s.d_model}, 1, true);
    add(b + "q_proj.weight", {s.n_heads * hd, s.d_model}, 2.0 / std::sqrt(s.d_model));
    add(b + "k_proj.weight", {s.n_kv_heads * hd, s.d_model}, 2.0 / std::sqrt(s.d_model));
    add(b + "v_proj.weight", {s.n_kv_heads * hd, s.d_model}, 1.0 / std::sqrt(s.d_model));
    add(b + "attn_out.weight", {s.d_model, s.d_model}, 1.0 / std::sqrt(s.d_model));
    add(b + "ff_proj.weight", {s.hidden, s.d_model}, 1.0 / std::sqrt(s.d_model));
    add(b + "up_proj.weight", {s.hidden, s.d_model}, 1.0 / std::sqrt(s.d_model));
    add(b + "ff_out.weight", {s.d_model, s.hidden}, 1.0 / std::sqrt(s.hidden));
  }
  add(p + "ln_f.weight", {s.d_model}, 1, true);
  if (!s.tied) add(p + "ff_out.weight", {s.embedding, s.d_model}, 3.0 / std::sqrt(s.d_model));
  return m;
}

std::string tiny_config_json(const TinySpec& s) {
  std::ostringstream o;
  o.precision(17);
  o << "{\"d_model\": " << s.d_model << ", \"n_heads\": " << s.n_heads << ", \"n_kv_heads\": " << s.n_kv_heads
    << ", \"n_layers\": " << s.n_layers << ", \"mlp_hidden_size\": " << s.hidden << ", \"vocab_size\": " << s.vocab
    << ", \"embedding_size\": " << s.embedding << ", \"mask_token_id\": " << s.vocab - 1
    << ", \"eos_token_id\": " << s.vocab - 2 << ", \"rope_theta\": " << s.theta << ", \"rms_norm_eps\": " << s.eps
    << ", \"max_sequence_length\": " << s.max_len << ", \"weight_tying\": " << (s.tied ? "true" : "false")
    << ", \"block_type\": \"llama\", \"model_type\": \"llada\"}";
  return o.str();
}

// Writes config.json and model.safetensors (or two shards + index). `skip` omits one tensor.
void write_tiny(const fs::path& dir, const TinyModel& m, int shards = 1, const std::string& skip = "",
                const std::string& reshape = "") {
  fs::create_directories(dir);
  write_file(dir / "config.json", tiny_config_json(m.spec));
  std::vector<TensorSpec> specs;
  for (const auto& [name, v] : m.tensors) {
    if (name == skip) continue;
    const char* dtype = v.type == WType::F32 ? "F32" : v.type == WType::BF16 ? "BF16" : "F16";
    std::vector<int64_t> shape = m.shapes.at(name);
    if (name == reshape) shape = {shape[0] / 2, shape[1] * 2};  // same bytes, wrong shape
    specs.push_back({name, dtype, shape, v.raw()});
  }
  if (shards == 1) {
    write_file(dir / "model.safetensors", safetensors_bytes(specs));
    return;
  }
  std::vector<TensorSpec> first(specs.begin(), specs.begin() + specs.size() / 2), second(specs.begin() + specs.size() / 2, specs.end());
  write_file(dir / "model-00001-of-00002.safetensors", safetensors_bytes(first));
  write_file(dir / "model-00002-of-00002.safetensors", safetensors_bytes(second));
  std::string index = "{\"metadata\": {}, \"weight_map\": {";
  for (size_t i = 0; i < specs.size(); ++i)
    index += (i ? ", \"" : "\"") + specs[i].name + "\": \"model-0000" + (i < first.size() ? "1" : "2") + "-of-00002.safetensors\"";
  write_file(dir / "model.safetensors.index.json", index + "}}");
}

// Keys (after RoPE) and values of every layer and position: [layer][position][kv_dim].
struct ReferenceKV {
  std::vector<std::vector<std::vector<double>>> k, v;
};

// The forward pass in float64, written as plainly as possible: logits [L][embedding].
// With `stale`, the keys and values of the positions outside [begin, end) are taken from it instead of
// being computed (what a KV cache read does); `kv_out` receives the keys and values used.
std::vector<std::vector<double>> reference_forward(const TinyModel& m, const std::vector<int32_t>& tokens,
                                                   ReferenceKV* kv_out = nullptr, const ReferenceKV* stale = nullptr,
                                                   int begin = 0, int end = -1) {
  if (end < 0) end = static_cast<int>(tokens.size());
  const TinySpec& s = m.spec;
  const int L = static_cast<int>(tokens.size()), D = s.d_model, hd = D / s.n_heads, H = s.hidden;
  auto W = [&](const std::string& name) -> const std::vector<double>& { return m.tensors.at("model.transformer." + name).exact; };
  auto rms = [&](const std::vector<double>& x, const std::vector<double>& w) {
    double ss = 0;
    for (double v : x) ss += v * v;
    double r = 1.0 / std::sqrt(ss / x.size() + s.eps);
    std::vector<double> y(x.size());
    for (size_t i = 0; i < x.size(); ++i) y[i] = x[i] * r * w[i];
    return y;
  };
  auto matvec = [](const std::vector<double>& w, const std::vector<double>& x, int rows) {
    std::vector<double> y(rows, 0.0);
    const size_t cols = x.size();
    for (int r = 0; r < rows; ++r)
      for (size_t c = 0; c < cols; ++c) y[r] += w[r * cols + c] * x[c];
    return y;
  };
  std::vector<std::vector<double>> x(L);
  for (int t = 0; t < L; ++t) x[t].assign(W("wte.weight").begin() + tokens[t] * D, W("wte.weight").begin() + (tokens[t] + 1) * D);
  for (int layer = 0; layer < s.n_layers; ++layer) {
    const std::string b = "blocks." + std::to_string(layer) + ".";
    std::vector<std::vector<double>> q(L), k(L), v(L);
    for (int t = 0; t < L; ++t) {
      auto n = rms(x[t], W(b + "attn_norm.weight"));
      q[t] = matvec(W(b + "q_proj.weight"), n, s.n_heads * hd);
      k[t] = matvec(W(b + "k_proj.weight"), n, s.n_kv_heads * hd);
      v[t] = matvec(W(b + "v_proj.weight"), n, s.n_kv_heads * hd);
      auto rope = [&](std::vector<double>& vec, int heads) {
        for (int h = 0; h < heads; ++h)
          for (int i = 0; i < hd / 2; ++i) {
            double angle = t * std::pow(s.theta, -2.0 * i / hd);
            double a = vec[h * hd + i], c = vec[h * hd + i + hd / 2];
            vec[h * hd + i] = a * std::cos(angle) - c * std::sin(angle);
            vec[h * hd + i + hd / 2] = c * std::cos(angle) + a * std::sin(angle);
          }
      };
      rope(q[t], s.n_heads);
      rope(k[t], s.n_kv_heads);
    }
    if (stale)
      for (int t = 0; t < L; ++t)
        if (t < begin || t >= end) k[t] = stale->k[layer][t], v[t] = stale->v[layer][t];
    if (kv_out) kv_out->k.push_back(k), kv_out->v.push_back(v);
    for (int t = 0; t < L; ++t) {
      std::vector<double> att(D, 0.0);
      for (int h = 0; h < s.n_heads; ++h) {
        const int kvh = h / (s.n_heads / s.n_kv_heads);
        std::vector<double> score(L);
        double max = -INFINITY, sum = 0;
        for (int j = 0; j < L; ++j) {
          double dot = 0;
          for (int i = 0; i < hd; ++i) dot += q[t][h * hd + i] * k[j][kvh * hd + i];
          score[j] = dot / std::sqrt(static_cast<double>(hd));
          max = std::max(max, score[j]);
        }
        for (double& sc : score) sum += (sc = std::exp(sc - max));
        for (int j = 0; j < L; ++j)
          for (int i = 0; i < hd; ++i) att[h * hd + i] += score[j] / sum * v[j][kvh * hd + i];
      }
      auto o = matvec(W(b + "attn_out.weight"), att, D);
      for (int i = 0; i < D; ++i) x[t][i] += o[i];
    }
    for (int t = 0; t < L; ++t) {
      auto n = rms(x[t], W(b + "ff_norm.weight"));
      auto g = matvec(W(b + "ff_proj.weight"), n, H), u = matvec(W(b + "up_proj.weight"), n, H);
      for (int i = 0; i < H; ++i) g[i] = g[i] / (1.0 + std::exp(-g[i])) * u[i];
      auto o = matvec(W(b + "ff_out.weight"), g, D);
      for (int i = 0; i < D; ++i) x[t][i] += o[i];
    }
  }
  std::vector<std::vector<double>> logits(L);
  const auto& head = s.tied ? W("wte.weight") : W("ff_out.weight");
  for (int t = 0; t < L; ++t) logits[t] = matvec(head, rms(x[t], W("ln_f.weight")), s.embedding);
  return logits;
}

std::vector<int32_t> random_tokens(std::mt19937& rng, int n, int vocab) {
  std::uniform_int_distribution<int> d(0, vocab - 1);
  std::vector<int32_t> t(n);
  for (auto& x : t) x = d(rng);
  return t;
}

// Runs one forward over `seqs`, asking for `rows[i]` of sequence i; returns the logits.
std::vector<float> run_forward(Model& model, const std::vector<std::vector<int32_t>>& seqs,
                               const std::vector<std::vector<int32_t>>& rows, const std::atomic<bool>* cancel = nullptr) {
  std::vector<ForwardSeq> batch;
  size_t n_rows = 0;
  for (size_t i = 0; i < seqs.size(); ++i) {
    batch.push_back({seqs[i].data(), static_cast<int>(seqs[i].size()), rows[i].data(), static_cast<int>(rows[i].size())});
    n_rows += rows[i].size();
  }
  std::vector<float> logits(n_rows * model.config().embedding_size);
  model.forward(batch, logits.data(), cancel);
  return logits;
}

std::vector<int32_t> all_rows(size_t n) {
  std::vector<int32_t> r(n);
  for (size_t i = 0; i < n; ++i) r[i] = static_cast<int32_t>(i);
  return r;
}

void test_model() {
  TempDir tmp;
  const std::string isa = cpu::active_kernels().isa;
  std::mt19937 rng(7);
  // Against the float64 reference, per storage type: one sequence longer than an attention query block
  // (64) so the query blocking is exercised, all rows requested.
  for (WType type : {WType::F32, WType::BF16, WType::F16}) {
    TinySpec spec;
    spec.tied = type == WType::F16;
    TinyModel tiny = make_tiny(spec, type, 100 + static_cast<int>(type));
    const fs::path dir = tmp.path / (std::string("tiny-") + type_name(type));
    write_tiny(dir, tiny);
    auto model = Model::load(dir.string(), LoadOptions{2});
    std::vector<int32_t> tokens = random_tokens(rng, 70, spec.vocab);
    std::vector<float> got = run_forward(*model, {tokens}, {all_rows(tokens.size())});
    auto ref = reference_forward(tiny, tokens);
    double worst = 0, scale = 0;
    for (size_t t = 0; t < tokens.size(); ++t)
      for (int e = 0; e < spec.embedding; ++e) {
        worst = std::max(worst, std::fabs(got[t * spec.embedding + e] - ref[t][e]));
        scale = std::max(scale, std::fabs(ref[t][e]));
      }
    bool meta = model->weight_dtype() == type_name(type) && model->threads() == 2 && model->config().n_kv_heads == 2;
    report(worst <= 1e-5 * scale && meta,
           std::string("model forward (") + isa + ", " + type_name(type) + (spec.tied ? ", tied head" : "") + ") vs float64 reference",
           fmt("max |diff| %.2e, max |logit| %.2f", worst, scale));
  }

  // Batching, row selection and threads must not change a single bit: every output is computed by the
  // same operations in the same order whatever else is in the batch.
  TinySpec spec;
  TinyModel tiny = make_tiny(spec, WType::F32, 5);
  const fs::path dir = tmp.path / "tiny";
  write_tiny(dir, tiny);
  auto model2 = Model::load(dir.string(), LoadOptions{2});
  auto model1 = Model::load(dir.string(), LoadOptions{1});
  std::vector<int32_t> a = random_tokens(rng, 9, spec.vocab), b = random_tokens(rng, 131, spec.vocab), c = random_tokens(rng, 1, spec.vocab);
  std::vector<int32_t> rows_a = {8, 0, 3}, rows_b = {130, 64, 63, 0, 7}, rows_c = {0};
  std::vector<float> batched = run_forward(*model2, {a, b, c}, {rows_a, rows_b, rows_c});
  std::vector<float> alone_a = run_forward(*model2, {a}, {rows_a});
  std::vector<float> alone_b = run_forward(*model1, {b}, {rows_b});
  std::vector<float> alone_c = run_forward(*model1, {c}, {rows_c});
  std::vector<float> joined = alone_a;
  joined.insert(joined.end(), alone_b.begin(), alone_b.end());
  joined.insert(joined.end(), alone_c.begin(), alone_c.end());
  report(batched == joined, "model forward: batch of 3 (lengths 9, 131, 1) equals each alone, 1 vs 2 threads, bit for bit");
  {
    LoadOptions unpacked_options{2};
    unpacked_options.pack_weights_max_bytes = 0;
    auto unpacked = Model::load(dir.string(), unpacked_options);
    const bool packs = cpu::active_kernels().pack_panel != nullptr;
    report(unpacked->packed_weight_bytes() == 0 && (model2->packed_weight_bytes() > 0) == packs &&
               run_forward(*unpacked, {a, b, c}, {rows_a, rows_b, rows_c}) == batched,
           fmt("model forward: weights packed at load (%.0f bytes) give the logits of packing per call, bit for bit",
               static_cast<double>(model2->packed_weight_bytes())));
  }
  {
    // Over 1026 tokens the linear layers work in chunks of rows, whose borders cut through sequences.
    std::vector<std::vector<int32_t>> seqs, rows;
    std::vector<float> alone;
    for (int i = 0; i < 5; ++i) {
      seqs.push_back(random_tokens(rng, 250 - i, spec.vocab));
      rows.push_back({0, 100, 248 - i});
      std::vector<float> one = run_forward(*model1, {seqs.back()}, {rows.back()});
      alone.insert(alone.end(), one.begin(), one.end());
    }
    report(run_forward(*model2, seqs, rows) == alone,
           "model forward: batch of 5 x ~250 tokens (row chunks of the linear layers) equals each alone, bit for bit");
  }
  {
    std::vector<float> full = run_forward(*model2, {b}, {all_rows(b.size())});
    bool ok = true;
    for (size_t r = 0; r < rows_b.size(); ++r)
      ok = ok && std::equal(full.begin() + rows_b[r] * spec.embedding, full.begin() + (rows_b[r] + 1) * spec.embedding,
                            alone_b.begin() + r * spec.embedding);
    report(ok, "model forward: requested rows equal the same rows of a full forward");
  }
  {
    write_tiny(tmp.path / "tiny-sharded", tiny, 2);
    auto sharded = Model::load((tmp.path / "tiny-sharded").string(), LoadOptions{2});
    report(run_forward(*sharded, {b}, {rows_b}) == alone_b && sharded->parameter_count() == model2->parameter_count(),
           "model load: two shards + index give the same logits");
  }
  {
    uint64_t params = 0;
    for (const auto& [name, v] : tiny.tensors) params += v.exact.size();
    report(model2->parameter_count() == params && model2->weight_bytes() == params * 4,
           "model: parameter_count and weight_bytes", std::to_string(params) + " parameters");
  }
  std::atomic<bool> cancel{true};
  expect_error("model forward: cancel flag throws Cancelled", ErrorCode::Cancelled, {"cancel"},
               [&] { run_forward(*model2, {a}, {rows_a}, &cancel); });
  expect_error("model forward: token outside the embedding", ErrorCode::InvalidArgument, {"token 56", "position 2"},
               [&] { run_forward(*model2, {{1, 2, 56}}, {{0}}); });
  expect_error("model forward: logit row outside the sequence", ErrorCode::InvalidArgument, {"logit row 3"},
               [&] { run_forward(*model2, {{1, 2, 3}}, {{3}}); });
  expect_error("model forward: longer than max_sequence_length", ErrorCode::InvalidArgument, {"max_sequence_length"},
               [&] { run_forward(*model2, {std::vector<int32_t>(257, 1)}, {{0}}); });
  // The model still works after the errors above.
  report(run_forward(*model2, {a}, {rows_a}) == alone_a, "model forward: usable after rejected calls");

  // Load errors name the tensor (and the file).
  write_tiny(tmp.path / "missing", tiny, 1, "model.transformer.blocks.1.up_proj.weight");
  expect_error("model load: missing tensor", ErrorCode::InvalidModel, {"missing tensor \"model.transformer.blocks.1.up_proj.weight\""},
               [&] { Model::load((tmp.path / "missing").string()); });
  write_tiny(tmp.path / "reshaped", tiny, 1, "", "model.transformer.blocks.0.k_proj.weight");
  expect_error("model load: wrong shape", ErrorCode::InvalidModel,
               {"model.transformer.blocks.0.k_proj.weight", "[8, 64]", "expected [16, 32]", "model.safetensors"},
               [&] { Model::load((tmp.path / "reshaped").string()); });
  expect_error("model load: no config.json", ErrorCode::InvalidModel, {"config.json"},
               [&] { Model::load((tmp.path / "nowhere").string()); });
}

// One sequence of a cached forward: the canvas, the rows wanted, the cache and the computed range.
struct CachedSeq {
  std::vector<int32_t> tokens;
  std::vector<int32_t> rows;
  KVCache* cache = nullptr;
  int begin = 0, end = -1;
};

std::vector<float> run_cached(Model& model, const std::vector<CachedSeq>& seqs, const std::atomic<bool>* cancel = nullptr) {
  std::vector<ForwardSeq> batch;
  size_t n_rows = 0;
  for (const CachedSeq& s : seqs) {
    batch.push_back({s.tokens.data(), static_cast<int>(s.tokens.size()), s.rows.data(), static_cast<int>(s.rows.size()),
                     s.cache, s.begin, s.end});
    n_rows += s.rows.size();
  }
  std::vector<float> logits(n_rows * model.config().embedding_size);
  model.forward(batch, logits.data(), cancel);
  return logits;
}

std::vector<int32_t> range_rows(int begin, int end) {
  std::vector<int32_t> r;
  for (int p = begin; p < end; ++p) r.push_back(p);
  return r;
}

// The rows `rows` (canvas positions) of a logits block that holds every position of the canvas.
std::vector<float> select_rows(const std::vector<float>& all, const std::vector<int32_t>& rows, int E) {
  std::vector<float> out;
  for (int r : rows) out.insert(out.end(), all.begin() + static_cast<size_t>(r) * E, all.begin() + static_cast<size_t>(r + 1) * E);
  return out;
}

double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double worst = a.size() == b.size() ? 0 : INFINITY;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) worst = std::max(worst, std::fabs(double(a[i]) - b[i]));
  return worst;
}

double max_abs(const std::vector<float>& a) {
  double m = 0;
  for (float x : a) m = std::max(m, std::fabs(double(x)));
  return m;
}

// Approximate KV caching (ForwardSeq::cache): exact where it must be, the stale-key semantics where it is
// approximate (against the float64 reference), ragged batches, and the errors and the memory budget.
void test_kv_cache() {
  TempDir tmp;
  std::mt19937 rng(11);
  TinySpec spec;  // 4 query heads over 2 kv heads: the cache is indexed per kv head
  TinyModel tiny = make_tiny(spec, WType::F32, 21);
  write_tiny(tmp.path / "tiny", tiny);
  const std::string dir = (tmp.path / "tiny").string();
  const int E = spec.embedding;
  auto model = Model::load(dir, LoadOptions{2});
  LoadOptions bf16_options{2};
  bf16_options.kv_cache_dtype = KVCacheDType::BF16;
  auto bf16_model = Model::load(dir, bf16_options);

  // A canvas of 150 positions: a prefix read computes 130 queries (more than one attention query block).
  const int L = 150, block_begin = 20, block_end = 28;
  std::vector<int32_t> canvas = random_tokens(rng, L, spec.vocab);
  const std::vector<float> full = run_forward(*model, {canvas}, {all_rows(L)});

  for (Model* m : {model.get(), bf16_model.get()}) {
    const bool f32 = m == model.get();
    const std::string kind = f32 ? "f32" : "bf16";
    auto cache = m->make_kv_cache(L);
    report(!cache->filled() && cache->size() == m->kv_cache_bytes(L) &&
               cache->size() == uint64_t(spec.n_layers) * L * (spec.n_kv_heads * spec.d_model / spec.n_heads) * 2 * (f32 ? 4 : 2),
           "kv cache (" + kind + "): size() = kv_cache_bytes = layers x positions x kv_dim x 2 x element",
           std::to_string(cache->size()) + " bytes");
    // (1) A refresh (the whole canvas through a cache) is the uncached forward, bit for bit.
    report(run_cached(*m, {{canvas, all_rows(L), cache.get()}}) == full && cache->filled(),
           "kv cache (" + kind + "): refresh equals the forward without cache, bit for bit, and fills the cache");
    // (2) Reads over an unchanged canvas equal the full forward's rows: prefix (block + everything after
    // it) and dual (the block only, cached keys on both sides).
    for (bool dual : {false, true}) {
      const int end = dual ? block_end : L;
      const std::vector<int32_t> rows = range_rows(block_begin, end);
      const std::vector<float> got = run_cached(*m, {{canvas, rows, cache.get(), block_begin, end}});
      const std::vector<float> want = select_rows(full, rows, E);
      const double diff = max_abs_diff(got, want), scale = max_abs(want);
      const std::string name = "kv cache (" + kind + "): " + (dual ? "dual" : "prefix") + " read [" + std::to_string(block_begin) +
                               ", " + std::to_string(end) + ") of an unchanged canvas equals the full forward";
      // f32 keys are the very values a full forward uses, and every kernel's result per row is
      // independent of the other rows, so the read is exact; bf16 keys carry 8 significant bits.
      report(f32 ? got == want : diff <= 2e-2 * scale, name + (f32 ? " bit for bit" : " within 2e-2 x max|logit|"),
             fmt("max |diff| %.2e, max |logit| %.2f", diff, scale));
    }
  }

  // (3) Where tokens changed since the refresh, a read sees the refresh's keys and values outside its
  // range and fresh ones inside: compare with the float64 reference doing exactly that.
  {
    std::vector<int32_t> before = random_tokens(rng, 90, spec.vocab);
    std::vector<int32_t> after = before;
    for (int p : {3, 25, 26, 31, 40, 70, 89}) after[p] = (after[p] + 7) % spec.vocab;  // prefix, block and suffix change
    ReferenceKV stale;
    reference_forward(tiny, before, &stale);
    for (bool dual : {false, true}) {
      const int begin = 24, end = dual ? 32 : 90;
      auto cache = model->make_kv_cache(90);
      run_cached(*model, {{before, {}, cache.get()}});
      const std::vector<int32_t> rows = range_rows(begin, end);
      const std::vector<float> got = run_cached(*model, {{after, rows, cache.get(), begin, end}});
      const auto ref = reference_forward(tiny, after, nullptr, &stale, begin, end);
      double worst = 0, scale = 0;
      for (size_t r = 0; r < rows.size(); ++r)
        for (int e = 0; e < E; ++e) {
          worst = std::max(worst, std::fabs(got[r * E + e] - ref[rows[r]][e]));
          scale = std::max(scale, std::fabs(ref[rows[r]][e]));
        }
      const std::vector<float> exact = select_rows(run_forward(*model, {after}, {all_rows(90)}), rows, E);
      report(worst <= 1e-5 * scale && max_abs_diff(got, exact) > 1e-3 * scale,
             std::string("kv cache: ") + (dual ? "dual" : "prefix") +
                 " read of a changed canvas uses the refresh's keys outside its range (vs float64 reference)",
             fmt("max |diff| %.2e, max |logit| %.2f; differs from the exact forward by %.2e", worst, scale,
                 max_abs_diff(got, exact)));
    }
  }

  // (4) A ragged batch mixing no cache, a refresh, a prefix read and a dual read (lengths 9, 20, 131, 70)
  // equals each alone, with 2 threads vs 1, bit for bit.
  {
    auto model1 = Model::load(dir, LoadOptions{1});
    std::vector<int32_t> a = random_tokens(rng, 9, spec.vocab), b = random_tokens(rng, 20, spec.vocab),
                         c = random_tokens(rng, 131, spec.vocab), d = random_tokens(rng, 70, spec.vocab);
    auto make_seqs = [&](Model& m, std::vector<std::unique_ptr<KVCache>>& caches) {
      for (int len : {20, 131, 70}) caches.push_back(m.make_kv_cache(len));
      run_cached(m, {{c, {}, caches[1].get()}, {d, {}, caches[2].get()}});  // fill the read caches
      std::vector<int32_t> c2 = c, d2 = d;  // commit a few tokens since the refresh
      c2[60] = 1, c2[61] = 2, d2[33] = 3;
      return std::vector<CachedSeq>{{a, {8, 0, 3}},
                                    {b, {0, 19}, caches[0].get()},
                                    {c2, {130, 64, 63, 50}, caches[1].get(), 50, 131},
                                    {d2, {32, 39}, caches[2].get(), 32, 40}};
    };
    std::vector<std::unique_ptr<KVCache>> caches2, caches1;
    std::vector<CachedSeq> seqs2 = make_seqs(*model, caches2), seqs1 = make_seqs(*model1, caches1);
    std::vector<float> batched = run_cached(*model, seqs2), joined;
    for (const CachedSeq& s : seqs1) {
      std::vector<float> alone = run_cached(*model1, {s});
      joined.insert(joined.end(), alone.begin(), alone.end());
    }
    report(batched == joined, "kv cache: batch of none / refresh / prefix read / dual read (lengths 9, 20, 131, 70) "
                              "equals each alone, 1 vs 2 threads, bit for bit");
  }

  // Errors: each names what is wrong; nothing is touched.
  {
    auto cache = model->make_kv_cache(10);
    std::vector<int32_t> t = random_tokens(rng, 10, spec.vocab);
    expect_error("kv cache: a read needs a filled cache", ErrorCode::InvalidArgument, {"not filled"},
                 [&] { run_cached(*model, {{t, {5}, cache.get(), 4, 10}}); });
    expect_error("kv cache: computing part of the canvas needs a cache", ErrorCode::InvalidArgument, {"needs a KV cache"},
                 [&] { run_cached(*model, {{t, {5}, nullptr, 4, 10}}); });
    run_cached(*model, {{t, {}, cache.get()}});
    expect_error("kv cache: logit row outside the computed range", ErrorCode::InvalidArgument, {"logit row 3", "[4, 8)"},
                 [&] { run_cached(*model, {{t, {3}, cache.get(), 4, 8}}); });
    expect_error("kv cache: empty compute range", ErrorCode::InvalidArgument, {"compute range [4, 4)"},
                 [&] { run_cached(*model, {{t, {}, cache.get(), 4, 4}}); });
    expect_error("kv cache: compute range past the canvas", ErrorCode::InvalidArgument, {"compute range [4, 11)"},
                 [&] { run_cached(*model, {{t, {}, cache.get(), 4, 11}}); });
    expect_error("kv cache: cache of another length", ErrorCode::InvalidArgument, {"serves 10 positions", "has 9"},
                 [&] { run_cached(*model, {{std::vector<int32_t>(t.begin(), t.end() - 1), {}, cache.get()}}); });
    expect_error("kv cache: cache of another model", ErrorCode::InvalidArgument, {"another model"},
                 [&] { run_cached(*bf16_model, {{t, {}, cache.get()}}); });
    expect_error("kv cache: one cache twice in a batch", ErrorCode::InvalidArgument, {"twice"},
                 [&] { run_cached(*model, {{t, {}, cache.get()}, {t, {}, cache.get()}}); });
    expect_error("kv cache: zero positions", ErrorCode::InvalidArgument, {"0 positions"}, [&] { model->make_kv_cache(0); });
    expect_error("kv cache: more positions than max_sequence_length", ErrorCode::InvalidArgument, {"257 positions"},
                 [&] { model->make_kv_cache(257); });
    std::atomic<bool> cancel{true};
    auto fresh = model->make_kv_cache(10);
    expect_error("kv cache: a cancelled refresh throws Cancelled", ErrorCode::Cancelled, {"cancel"},
                 [&] { run_cached(*model, {{t, {}, fresh.get()}}, &cancel); });
    expect_error("kv cache: ... and leaves the cache not filled", ErrorCode::InvalidArgument, {"not filled"},
                 [&] { run_cached(*model, {{t, {5}, fresh.get(), 4, 10}}); });
  }

  // The budget bounds the bytes of all live caches of a model together.
  {
    LoadOptions options{1};
    const uint64_t per_100 = model->kv_cache_bytes(100);
    options.kv_cache_budget_bytes = 2 * per_100 + per_100 / 2;  // room for two caches of 100 positions
    auto bounded = Model::load(dir, options);
    auto first = bounded->make_kv_cache(100);
    auto second = bounded->make_kv_cache(100);
    report(bounded->kv_cache_live_bytes() == 2 * per_100 && bounded->kv_cache_budget_bytes() == options.kv_cache_budget_bytes,
           "kv cache budget: live bytes are accounted", std::to_string(bounded->kv_cache_live_bytes()) + " bytes");
    expect_error("kv cache budget: exhausted by live caches", ErrorCode::OutOfMemory, {"budget exhausted"},
                 [&] { bounded->make_kv_cache(100); });
    expect_error("kv cache budget: one cache larger than the whole budget", ErrorCode::InvalidArgument, {"whole cache budget"},
                 [&] { bounded->make_kv_cache(256); });
    first.reset();
    auto third = bounded->make_kv_cache(100);
    second.reset();
    report(bounded->kv_cache_live_bytes() == per_100, "kv cache budget: freeing a cache returns its bytes");
    third.reset();
    // A cache may outlive its model (it shares the byte account with it).
    auto orphan = bounded->make_kv_cache(10);
    bounded.reset();
    orphan.reset();
  }
}

// A model that forwards to another and records what each forward computed; it can also set the cancel
// flag once a forward is done (the engine then cancels the step after the cache was written).
class RecordingModel final : public Model {
 public:
  explicit RecordingModel(std::shared_ptr<Model> inner) : inner_(std::move(inner)) {}
  const ModelConfig& config() const override { return inner_->config(); }
  int threads() const override { return inner_->threads(); }
  std::string weight_dtype() const override { return inner_->weight_dtype(); }
  uint64_t parameter_count() const override { return inner_->parameter_count(); }
  uint64_t weight_bytes() const override { return inner_->weight_bytes(); }
  uint64_t kv_cache_bytes(int positions) const override { return inner_->kv_cache_bytes(positions); }
  std::unique_ptr<KVCache> make_kv_cache(int positions) override { return inner_->make_kv_cache(positions); }
  uint64_t kv_cache_live_bytes() const override { return inner_->kv_cache_live_bytes(); }
  void forward(const std::vector<ForwardSeq>& batch, float* logits, const std::atomic<bool>* cancel) override {
    for (const ForwardSeq& s : batch)
      calls.push_back(std::to_string(s.compute_begin) + "-" + std::to_string(s.compute_end == -1 ? s.length : s.compute_end) +
                      (s.cache ? "c" : ""));
    inner_->forward(batch, logits, cancel);
    if (cancel_after) cancel_after->store(true), cancel_after = nullptr;
  }
  std::vector<std::string> calls;  // "begin-end" per sequence per forward, "c" when it had a cache
  std::atomic<bool>* cancel_after = nullptr;

 private:
  std::shared_ptr<Model> inner_;
};

// Every step of one sequence: committed tokens and their probabilities, flattened.
struct Trace {
  std::vector<int32_t> answer;
  std::vector<float> probabilities;
  int steps = 0;
  bool operator==(const Trace& o) const { return answer == o.answer && probabilities == o.probabilities && steps == o.steps; }
};

// Runs the given sequences to the end, all in one batch per step.
std::vector<Trace> run_engine(Engine& engine, const std::vector<uint64_t>& ids) {
  std::vector<Trace> traces(ids.size());
  std::vector<uint64_t> running = ids;
  for (int guard = 0; !running.empty() && guard < 10000; ++guard) {
    std::vector<uint64_t> next;
    for (const StepOutput& out : engine.step(running)) {
      Trace& t = traces[std::find(ids.begin(), ids.end(), out.id) - ids.begin()];
      for (const CommittedToken& c : out.committed) t.probabilities.push_back(c.probability);
      ++t.steps;
      if (!out.finished) next.push_back(out.id);
    }
    running = next;
  }
  for (size_t i = 0; i < ids.size(); ++i) traces[i].answer = engine.canvas(ids[i]);
  return traces;
}

SamplingParams golden_params(const Json& p) {
  SamplingParams s;
  s.gen_length = static_cast<int>(p.find("gen_length")->as_int64());
  s.block_length = static_cast<int>(p.find("block_length")->as_int64());
  s.steps = static_cast<int>(p.find("steps")->as_int64());
  s.temperature = p.find("temperature")->as_number();
  s.remasking = p.find("remasking")->as_string() == "random" ? Remasking::Random : Remasking::LowConfidence;
  s.cfg_scale = p.find("cfg_scale")->as_number();
  s.logits_eos_inf = p.find("logits_eos_inf")->as_bool();
  s.confidence_eos_eot_inf = p.find("confidence_eos_eot_inf")->as_bool();
  s.eot_token_id = static_cast<int>(p.find("eot_token_id")->as_int64());
  return s;
}

// The engine's cache modes: a refresh every step is the uncached output exactly (on the golden cases);
// the default schedule refreshes once per block and computes what each mode says; caches are accounted,
// bounded and freed; a mixed batch equals each alone; a cancelled step retried changes nothing.
void test_engine_kv_cache(const std::string& golden_dir) {
  for (const std::string name : {"plain", "gqa", "odd"}) {
    try {
      std::ifstream in(fs::path(golden_dir) / (name + ".json"));
      std::stringstream ss;
      ss << in.rdbuf();
      Json fixture = Json::parse(ss.str());
      Engine engine(Model::load((fs::path(golden_dir) / name).string(), LoadOptions{2}));
      int cases = 0, same = 0, reference = 0;
      for (const Json& c : fixture.find("generate")->items()) {
        std::vector<int32_t> prompt, answer;
        for (const Json& t : c.find("prompt")->items()) prompt.push_back(static_cast<int32_t>(t.as_int64()));
        for (const Json& t : c.find("answer")->items()) answer.push_back(static_cast<int32_t>(t.as_int64()));
        SamplingParams none = golden_params(*c.find("params"));
        std::vector<uint64_t> ids = {engine.create(prompt, none)};
        for (KVCacheMode mode : {KVCacheMode::Prefix, KVCacheMode::Dual}) {
          SamplingParams p = none;
          p.kv_cache = mode;
          p.kv_refresh_interval = 1;
          ids.push_back(engine.create(prompt, p));
        }
        std::vector<Trace> t = run_engine(engine, ids);  // the three in one batch
        ++cases;
        same += t[1] == t[0] && t[2] == t[0];
        reference += t[0].answer == answer;
        for (uint64_t id : ids) engine.release(id);
      }
      report(cases > 0 && same == cases && reference == cases,
             "engine kv cache: golden " + name + ": prefix and dual refreshed every step equal no cache exactly",
             std::to_string(same) + " of " + std::to_string(cases) + " cases equal, " + std::to_string(reference) +
                 " equal the reference answer");
    } catch (const std::exception& e) {
      report(false, "engine kv cache: golden " + name, e.what());
    }
  }

  TempDir tmp;
  TinySpec spec;
  write_tiny(tmp.path / "tiny", make_tiny(spec, WType::F32, 33));
  const std::string dir = (tmp.path / "tiny").string();
  std::mt19937 rng(5);
  auto prompt_of = [&](int n) {
    std::vector<int32_t> p = random_tokens(rng, n, spec.vocab - 2);  // no mask, no EOS
    return p;
  };
  auto params_of = [](KVCacheMode mode, int gen, int block, int steps, double cfg = 0.0) {
    SamplingParams p;
    p.gen_length = gen, p.block_length = block, p.steps = steps, p.cfg_scale = cfg, p.kv_cache = mode;
    return p;
  };

  // What each mode computes, step by step: prompt 5, 3 blocks of 4, 2 steps each, a suffix of 2 (L = 19).
  {
    auto recorder = std::make_shared<RecordingModel>(Model::load(dir, LoadOptions{2}));
    Engine engine(recorder);
    const std::vector<int32_t> prompt = prompt_of(5), suffix = {1, 2};
    auto calls_of = [&](KVCacheMode mode) {
      recorder->calls.clear();
      uint64_t id = engine.create(prompt, params_of(mode, 12, 4, 6), suffix);
      std::vector<Trace> t = run_engine(engine, {id});
      SequenceInfo info = engine.info(id);
      engine.release(id);
      std::string joined;
      for (const std::string& c : recorder->calls) joined += (joined.empty() ? "" : " ") + c;
      return joined + " / " + std::to_string(info.forward_passes) + " forwards, " + std::to_string(info.kv_refreshes) + " refreshes";
    };
    const std::string none = calls_of(KVCacheMode::None), prefix = calls_of(KVCacheMode::Prefix), dual = calls_of(KVCacheMode::Dual);
    report(none == "0-19 0-19 0-19 0-19 0-19 0-19 / 6 forwards, 0 refreshes", "engine kv cache: none computes the whole canvas", none);
    report(prefix == "0-19c 5-19c 0-19c 9-19c 0-19c 13-19c / 6 forwards, 3 refreshes",
           "engine kv cache: prefix refreshes at each block start, then computes block + rest", prefix);
    report(dual == "0-19c 5-9c 0-19c 9-13c 0-19c 13-17c / 6 forwards, 3 refreshes",
           "engine kv cache: dual refreshes at each block start, then computes the block only", dual);
    SamplingParams every2 = params_of(KVCacheMode::Dual, 8, 8, 8);
    every2.kv_refresh_interval = 3;
    recorder->calls.clear();
    uint64_t id = engine.create(prompt, every2);
    run_engine(engine, {id});
    engine.release(id);
    std::string joined;
    for (const std::string& c : recorder->calls) joined += (joined.empty() ? "" : " ") + c;
    report(joined == "0-13c 5-13c 5-13c 0-13c 5-13c 5-13c 0-13c 5-13c",
           "engine kv cache: kv_refresh_interval 3 refreshes at steps 0, 3, 6 of a block", joined);

    // A step cancelled after its forward wrote the cache, retried, gives what an uncancelled run gives:
    // once on a refresh step and once on a read step.
    for (int cancel_at : {2, 3}) {
      uint64_t plain = engine.create(prompt, params_of(KVCacheMode::Dual, 12, 4, 6));
      const Trace want = run_engine(engine, {plain})[0];
      engine.release(plain);
      uint64_t seq = engine.create(prompt, params_of(KVCacheMode::Dual, 12, 4, 6));
      Trace got;
      std::atomic<bool> cancel{false};
      bool cancelled = false;
      for (int step = 0, guard = 0; guard < 100; ++guard) {
        if (step == cancel_at && !cancelled) recorder->cancel_after = &cancel;
        try {
          StepOutput out = engine.step({seq}, &cancel).at(0);
          for (const CommittedToken& c : out.committed) got.probabilities.push_back(c.probability);
          ++got.steps, ++step;
          if (out.finished) break;
        } catch (const Error& e) {
          cancelled = e.code() == ErrorCode::Cancelled;
          cancel.store(false);
        }
      }
      got.answer = engine.canvas(seq);
      engine.release(seq);
      report(cancelled && got == want, "engine kv cache: a step cancelled after its forward (" +
                                           std::string(cancel_at == 2 ? "a refresh" : "a read") + "), retried, changes nothing");
    }
  }

  // A mixed batch (no cache, prefix, dual, dual with cfg; prompts of different lengths, different block
  // sizes) gives each sequence what it gets alone.
  {
    Engine engine(Model::load(dir, LoadOptions{2}));
    struct Spec {
      std::vector<int32_t> prompt;
      SamplingParams params;
    };
    std::vector<Spec> specs = {{prompt_of(3), params_of(KVCacheMode::None, 16, 4, 8)},
                               {prompt_of(11), params_of(KVCacheMode::Prefix, 12, 6, 12)},
                               {prompt_of(7), params_of(KVCacheMode::Dual, 20, 5, 8)},
                               {prompt_of(4), params_of(KVCacheMode::Dual, 8, 4, 8, 1.5)},
                               {prompt_of(9), params_of(KVCacheMode::Prefix, 9, 3, 9, 0.5)}};
    for (size_t i = 0; i < specs.size(); ++i) specs[i].params.seed = i, specs[i].params.temperature = i % 2 ? 0.7 : 0.0;
    std::vector<uint64_t> ids;
    for (const Spec& s : specs) ids.push_back(engine.create(s.prompt, s.params));
    const std::vector<Trace> together = run_engine(engine, ids);
    bool ok = true;
    for (size_t i = 0; i < specs.size(); ++i) {
      uint64_t id = engine.create(specs[i].prompt, specs[i].params);
      ok = ok && run_engine(engine, {id})[0] == together[i];
      engine.release(id);
    }
    bool differs = !(together[2].answer == run_engine(engine, {engine.create(specs[2].prompt, [&] {
                       SamplingParams p = specs[2].params;
                       p.kv_cache = KVCacheMode::None;
                       return p;
                     }())})[0].answer);
    report(ok, "engine kv cache: a batch mixing none / prefix / dual / cfg, different lengths and blocks, equals each alone",
           std::string("(dual ") + (differs ? "differs from" : "equals") + " no cache on this tiny random model)");
  }

  // Memory: reported per sequence, freed when it finishes, bounded by the model's budget.
  {
    LoadOptions options{1};
    auto probe = Model::load(dir, options);
    const uint64_t per_seq = probe->kv_cache_bytes(5 + 16);
    options.kv_cache_budget_bytes = 3 * per_seq;
    std::shared_ptr<Model> model = Model::load(dir, options);
    Engine engine(model);
    const std::vector<int32_t> prompt = prompt_of(5);
    uint64_t a = engine.create(prompt, params_of(KVCacheMode::Prefix, 16, 4, 4));
    uint64_t b = engine.create(prompt, params_of(KVCacheMode::Dual, 16, 4, 4, 1.0));  // cfg: two caches
    uint64_t c = engine.create(prompt, params_of(KVCacheMode::None, 16, 4, 4));
    SequenceInfo ia = engine.info(a), ib = engine.info(b), ic = engine.info(c);
    report(ia.kv_cache_bytes == per_seq && ib.kv_cache_bytes == 2 * per_seq && ic.kv_cache_bytes == 0 &&
               ia.memory_bytes >= per_seq && model->kv_cache_live_bytes() == 3 * per_seq,
           "engine kv cache: bytes per sequence reported (x2 with cfg) and accounted", std::to_string(per_seq) + " bytes per cache");
    expect_error("engine kv cache: create beyond the budget held by live caches", ErrorCode::OutOfMemory, {"budget exhausted"},
                 [&] { engine.create(prompt, params_of(KVCacheMode::Dual, 16, 4, 4)); });
    expect_error("engine kv cache: a cache larger than the whole budget", ErrorCode::InvalidArgument, {"whole cache budget"},
                 [&] { engine.create(prompt_of(60), params_of(KVCacheMode::Dual, 16, 4, 4)); });
    run_engine(engine, {a});
    report(engine.info(a).kv_cache_bytes == 0 && model->kv_cache_live_bytes() == 2 * per_seq,
           "engine kv cache: a finished sequence's cache is freed before release");
    engine.release(b);
    report(model->kv_cache_live_bytes() == 0, "engine kv cache: release frees the caches");
    expect_error("engine kv cache: negative kv_refresh_interval", ErrorCode::InvalidArgument, {"kv_refresh_interval"}, [&] {
      SamplingParams p = params_of(KVCacheMode::Dual, 16, 4, 4);
      p.kv_refresh_interval = -1;
      engine.create(prompt, p);
    });
  }
}

// The PyTorch reference's fixtures: logits of every position of a few sequences per model.
void test_golden(const std::string& golden_dir) {
  if (!fs::is_directory(golden_dir)) {
    report(false, "golden fixtures", "directory " + golden_dir + " not found");
    return;
  }
  std::vector<fs::path> cases;
  for (const auto& entry : fs::directory_iterator(golden_dir))
    if (entry.path().extension() == ".json" && fs::is_directory(entry.path().parent_path() / entry.path().stem()))
      cases.push_back(entry.path());
  std::sort(cases.begin(), cases.end());
  if (cases.empty()) report(false, "golden fixtures", "no <name>.json with a <name>/ model directory in " + golden_dir);
  for (const fs::path& json_path : cases) {
    const std::string name = json_path.stem().string();
    try {
      std::ifstream in(json_path);
      std::stringstream ss;
      ss << in.rdbuf();
      Json fixture = Json::parse(ss.str());
      auto model = Model::load((json_path.parent_path() / name).string(), LoadOptions{2});
      const int E = model->config().embedding_size;
      double worst = 0, scale = 0;
      size_t n_seqs = 0;
      for (const Json& f : fixture.find("forward")->items()) {
        std::vector<int32_t> tokens;
        for (const Json& t : f.find("tokens")->items()) tokens.push_back(static_cast<int32_t>(t.as_int64()));
        std::vector<float> got = run_forward(*model, {tokens}, {all_rows(tokens.size())});
        const Json& logits = *f.find("logits");
        for (size_t t = 0; t < tokens.size(); ++t)
          for (int e = 0; e < E; ++e) {
            double want = logits[t][e].as_number();
            worst = std::max(worst, std::fabs(got[t * E + e] - want));
            scale = std::max(scale, std::fabs(want));
          }
        ++n_seqs;
      }
      // Fixture floats carry 6 significant digits, i.e. up to 5e-6 relative rounding of their own; the
      // README suggests 1e-4 * max|logit|.
      report(n_seqs > 0 && worst <= 1e-4 * scale,
             "golden " + name + " (" + model->weight_dtype() + ", " + std::to_string(n_seqs) + " sequences)",
             fmt("max |diff| %.2e, max |logit| %.2f, ratio %.1e", worst, scale, worst / scale));
    } catch (const std::exception& e) {
      report(false, "golden " + name, e.what());
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Benchmarks

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

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

void bench() {
  const Kernels& k = cpu::active_kernels();
  double ghz = measure_ghz();
  std::printf("kernels: %s; clock (dependent imul chain, best of 20): %.2f GHz\n", k.isa, ghz);
  double peak = 0;  // measured GFLOP/s of one core
#if defined(__x86_64__)
  if (std::string(k.isa) == "avx512") {
    peak = measure_avx512_fma_gflops();
    std::printf("measured 1-core AVX-512 FMA peak (best of 20): %.1f GFLOP/s = %.1f flop/cycle at %.2f GHz "
                "(2 FMA units x 16 lanes x 2 flops = 64)\n", peak, peak / ghz, ghz);
  }
#endif
  if (peak == 0) peak = 64 * ghz;
  struct Shape {
    int M, N, K;
  };
  std::mt19937 rng(1);
  for (WType type : {WType::F32, WType::BF16}) {
    for (Shape s : {Shape{160, 768, 768}, Shape{160, 2048, 768}, Shape{160, 768, 2048}, Shape{32, 8192, 768}}) {
      Values W = random_values(type, static_cast<size_t>(s.N) * s.K, rng, 0.05);
      std::vector<float> A = random_floats(static_cast<size_t>(s.M) * s.K, rng), C(static_cast<size_t>(s.M) * s.N);
      for (int threads : {1, 2}) {
        ThreadPool pool(threads);
        std::vector<AlignedFloats*> scratch;
        for (int t = 0; t < threads; ++t) scratch.push_back(new AlignedFloats(k.gemm_scratch_floats(s.K)));
        const size_t panels = (s.N + k.gemm_nr - 1) / k.gemm_nr;
        auto run = [&] {
          pool.parallel_for(panels, [&](size_t b, size_t e, int t) {
            int n0 = static_cast<int>(b * k.gemm_nr), n1 = static_cast<int>(std::min<size_t>(e * k.gemm_nr, s.N));
            k.gemm(s.M, n0, n1, s.K, A.data(), s.K, MatB{W.data(), type, s.K, false}, C.data(), s.N, false, scratch[t]->p);
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
        std::printf("gemm %-4s M=%-4d N=%-5d K=%-5d threads=%d: %6.1f GFLOP/s (best of %d) = %3.0f%% of %d x measured peak\n",
                    type_name(type), s.M, s.N, s.K, threads, gflops, reps, 100.0 * gflops / (threads * peak), threads);
        for (auto* p : scratch) delete p;
      }
    }
  }
}

// Forward latency of a model directory: bench-model DIR [--threads N] [--seq-len L] [--rows R] [--read B E]
int bench_model(const std::string& dir, int threads, int seq_len, int rows, int read_begin, int read_end) {
  auto model = Model::load(dir, LoadOptions{threads});
  std::mt19937 rng(3);
  std::vector<int32_t> tokens = random_tokens(rng, seq_len, model->config().vocab_size);
  std::vector<int32_t> logit_rows;
  const bool read = read_begin >= 0;
  for (int i = 0; i < rows; ++i) logit_rows.push_back(read ? read_begin + i : seq_len - rows + i);
  std::unique_ptr<KVCache> cache;
  if (read) {
    cache = model->make_kv_cache(seq_len);
    run_cached(*model, {{tokens, {}, cache.get()}});
  }
  auto run = [&] {
    if (read) run_cached(*model, {{tokens, logit_rows, cache.get(), read_begin, read_end}});
    else run_forward(*model, {tokens}, {logit_rows});
  };
  run();
  // Wall time, and process CPU time (all threads): on a shared machine the CPU time of a 1-thread run is
  // the better measure of the work itself.
  auto cpu_seconds = [] {
    timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
  };
  std::vector<double> times, cpu_times;
  auto t0 = std::chrono::steady_clock::now();
  while (seconds_since(t0) < 3.0 || times.size() < 5) {
    auto t1 = std::chrono::steady_clock::now();
    double c1 = cpu_seconds();
    run();
    times.push_back(seconds_since(t1) * 1e3);
    cpu_times.push_back((cpu_seconds() - c1) * 1e3);
  }
  std::sort(times.begin(), times.end());
  std::sort(cpu_times.begin(), cpu_times.end());
  std::printf("{\"model\": \"%s\", \"isa\": \"%s\", \"dtype\": \"%s\", \"parameters\": %llu, \"threads\": %d, \"seq_len\": %d, "
              "\"logit_rows\": %d, \"computed\": %d, \"median_ms\": %.3f, \"min_ms\": %.3f, \"median_cpu_ms\": %.3f, \"min_cpu_ms\": %.3f, \"runs\": %zu}\n",
              dir.c_str(), cpu::active_kernels().isa, model->weight_dtype().c_str(),
              static_cast<unsigned long long>(model->parameter_count()), threads, seq_len, rows, read ? read_end - read_begin : seq_len, times[times.size() / 2],
              times[0], cpu_times[cpu_times.size() / 2], cpu_times[0], times.size());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  auto option = [&](const std::string& name, int fallback) {
    for (size_t i = 0; i + 1 < args.size(); ++i)
      if (args[i] == name) return std::atoi(args[i + 1].c_str());
    return fallback;
  };
  try {
    if (!args.empty() && args[0] == "--bench") {
      bench();
      return 0;
    }
    if (args.size() >= 2 && args[0] == "--bench-model") {
      int read_begin = -1, read_end = -1;
      for (size_t i = 0; i + 2 < args.size(); ++i)
        if (args[i] == "--read") read_begin = std::atoi(args[i + 1].c_str()), read_end = std::atoi(args[i + 2].c_str());
      return bench_model(args[1], option("--threads", 2), option("--seq-len", 160), option("--rows", 32), read_begin, read_end);
    }

    auto t0 = std::chrono::steady_clock::now();
    std::printf("ISAs on this CPU: ");
    for (const auto& isa : cpu::available_isas()) std::printf("%s ", isa.c_str());
    std::printf("(model tests use %s)\n", cpu::active_kernels().isa);
    test_scalar_conversions();
    for (const auto& isa : cpu::available_isas()) {
      const Kernels& k = *cpu::kernels_for(isa);
      for (WType type : {WType::F32, WType::BF16, WType::F16})
        for (bool k_major : {false, true}) test_gemm(k, type, k_major);
      test_elementwise(k);
    }
    test_threadpool();
    test_json();
    test_safetensors();
    test_config();
    test_model();
    test_kv_cache();
    std::string golden = VDIFF_GOLDEN_DIR;
    for (size_t i = 0; i + 1 < args.size(); ++i)
      if (args[i] == "--golden") golden = args[i + 1];
    test_golden(golden);
    test_engine_kv_cache(golden);
    std::printf("%d checks, %d failed, %.1f s\n", g_checks, g_failures, seconds_since(t0));
  } catch (const std::exception& e) {
    std::printf("FAIL uncaught exception: %s\n", e.what());
    return 1;
  }
  return g_failures == 0 ? 0 : 1;
}
