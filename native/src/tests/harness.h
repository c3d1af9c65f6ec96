// Shared by the native test files: the check reporter (one line per check, counted for the summary),
// error expectations, temporary directories, and random weights of each storage type with their exact
// values. Header-only: every helper is inline, the two counters are inline variables.
#pragma once

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

#include "core/backend.h"
#include "core/config.h"
#include "core/engine.h"
#include "core/error.h"
#include "core/json.h"
#include "core/safetensors.h"
#include "core/threadpool.h"
#include "cpu/kernels.h"
#include "cpu/quant.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace vdiff::test {

namespace fs = std::filesystem;
using cpu::Kernels;
using cpu::MatB;
using cpu::WType;

// ------------------------------------------------------------------------------------------------
// Reporting

// Load options of the model tests: `threads` host threads on the device VDIFF_TEST_DEVICE names (cpu,
// the default, or cuda — the GPU script runs the same model and golden tests on the CUDA backend).
inline LoadOptions test_options(int threads) {
  LoadOptions options;
  options.threads = threads;
  const char* device = std::getenv("VDIFF_TEST_DEVICE");
  options.device = device && std::string(device) == "cuda" ? Device::Cuda : Device::Cpu;
  return options;
}

// A test backend that passes everything to another one (its caches included) under a config of its own;
// tests derive from it to record or change what a forward sees.
class ForwardingBackend : public Backend {
 public:
  ForwardingBackend(std::shared_ptr<Backend> inner, const ModelConfig& config)
      : Backend(config, test_options(1)), inner_(std::move(inner)) {}
  BackendInfo info() const override { return inner_->info(); }
  std::string weight_dtype() const override { return inner_->weight_dtype(); }
  uint64_t parameter_count() const override { return inner_->parameter_count(); }
  uint64_t weight_bytes() const override { return inner_->weight_bytes(); }
  uint64_t kv_cache_bytes(int positions) const override { return inner_->kv_cache_bytes(positions); }
  using Backend::make_kv_cache;
  std::unique_ptr<KVCache> make_kv_cache(int positions, bool reclaim) override {
    return inner_->make_kv_cache(positions, reclaim);
  }
  void set_kv_reclaimer(const void* owner, std::function<bool()> reclaimer) override {
    inner_->set_kv_reclaimer(owner, std::move(reclaimer));
  }
  void copy_kv(const KVCache& from, KVCache& to, int positions) override { inner_->copy_kv(from, to, positions); }
  uint64_t kv_cache_live_bytes() const override { return inner_->kv_cache_live_bytes(); }
  uint64_t kv_cache_budget_bytes() const override { return inner_->kv_cache_budget_bytes(); }
  void forward(const std::vector<ForwardSeq>& batch, float* logits, const std::atomic<bool>* cancel) override {
    inner_->forward(batch, logits, cancel);
  }

 protected:
  std::unique_ptr<KVCache> allocate_kv_cache(int, uint64_t) override {
    throw Error(ErrorCode::Internal, "ForwardingBackend: caches come from the inner backend");
  }
  std::shared_ptr<Backend> inner_;
};

inline int g_checks = 0;
inline int g_failures = 0;

inline void report(bool ok, const std::string& name, const std::string& detail = "") {
  ++g_checks;
  if (!ok) ++g_failures;
  std::printf("%s %s%s%s\n", ok ? "ok  " : "FAIL", name.c_str(), detail.empty() ? "" : ": ", detail.c_str());
  std::fflush(stdout);
}

inline std::string fmt(const char* format, double a, double b = 0, double c = 0) {
  char buf[256];
  std::snprintf(buf, sizeof buf, format, a, b, c);
  return buf;
}

// Runs fn and checks it throws vdiff::Error with `code` and a message containing every `needle`.
inline void expect_error(const std::string& name, ErrorCode code, std::vector<std::string> needles,
                         const std::function<void()>& fn) {
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

inline void write_file(const fs::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// ------------------------------------------------------------------------------------------------
// Test data: weights in each storage type, with their exact values as doubles

inline uint16_t f32_to_bf16_bits(float f) {
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
  // A quantized matrix's dequantized values: the engine multiplies them with its activations quantized to
  // int8 per block of 32 (cpu/quant.h), so the references do too (reference_matvec).
  bool int8_activations = false;
  // ... and when the quantized rows were rotated (cpu/quant.h), `exact` holds the rotated basis's values
  // and the activations are rotated alike before their rounding: this is the Hadamard width (0: none).
  int rotation = 0;
  const void* data() const { return type == WType::F32 ? static_cast<const void*>(f32.data()) : half.data(); }
  size_t bytes() const { return type == WType::F32 ? f32.size() * 4 : half.size() * 2; }
  std::string raw() const { return std::string(static_cast<const char*>(data()), bytes()); }
};

// `count` values of roughly N(0, scale^2) (f16: random bit patterns of magnitude 2^-7 .. 2^0 * scale-ish).
inline Values random_values(WType type, size_t count, std::mt19937& rng, double scale) {
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

// What the engine's bf16 dot product (Kernels::gemm with a bf16 B and MatB::bf16_dot) multiplies in place
// of an activation x: x as f32, rounded to bf16 (cpu::round_to_bf16), widened back.
inline double bf16_activation(double x) { return cpu::bf16_to_f32(cpu::round_to_bf16(static_cast<float>(x))); }

// How the engine multiplies a weight's left operand, which the float64 references repeat.
enum class RefActivations {
  Exact,  // f32 and f16 weights, the MoE router, attention: as they are
  Bf16,   // the bf16 dot product: each x as f32, rounded to bf16 (bf16_activation)
  Int8,   // quantized weights: per block of 32, x as f32 quantized as cpu::quantize_activations does
};

// x with each block of 32 replaced by what the engine's int8 activations represent: q * scale, with q and
// the scale computed from the f32 values by cpu::quantize_activations (the reference's x is float64, so
// near a rounding tie it can differ from the engine's by one step). With a `rotation` R, x as f32 is first
// rotated (cpu::hadamard_transform) and each value is q * scale / R, in the rotated basis.
inline std::vector<double> int8_activations(const std::vector<double>& x, int rotation = 0) {
  std::vector<double> out(x.size());
  std::vector<float> f(x.begin(), x.end());
  if (rotation > 0) cpu::hadamard_transform(f.data(), static_cast<int>(f.size()), rotation);
  cpu::QBlockA block;
  for (size_t b = 0; b + 32 <= x.size(); b += 32) {
    cpu::quantize_activations(1, 32, f.data() + b, 32, &block);
    for (int j = 0; j < 32; ++j)
      out[b + j] = static_cast<double>(block.q[j]) * block.scale / (rotation > 0 ? rotation : 1);
  }
  return out;
}

// A row of a float matrix quantized, rotated first by Hadamard blocks of cpu::hadamard_block(K) when
// `rotate` (quantizing at load rotates when cpu::weight_rotation says so). Returns the rotation (0: none).
inline int quantize_row_rotated(std::vector<float> row, cpu::QType type, bool rotate, uint8_t* blocks,
                                uint16_t* scales) {
  const int K = static_cast<int>(row.size()), rotation = rotate ? cpu::hadamard_block(K) : 0;
  cpu::hadamard_transform(row.data(), K, rotation);
  cpu::quantize_weight_row(row.data(), K, type, blocks, scales);
  return rotation;
}

// The float64 references' matrix product: rows [r0, r0 + rows) of a [*, x.size()] weight matrix with exact
// values w times x, its activations as the engine multiplies them (RefActivations).
inline std::vector<double> reference_matvec(const std::vector<double>& w, RefActivations mode,
                                            const std::vector<double>& x, int rows, int r0 = 0, int rotation = 0) {
  std::vector<double> in = mode == RefActivations::Int8 ? int8_activations(x, rotation) : x;
  if (mode == RefActivations::Bf16)
    for (double& v : in) v = bf16_activation(v);
  std::vector<double> y(rows, 0.0);
  const size_t cols = in.size();
  for (int r = 0; r < rows; ++r)
    for (size_t c = 0; c < cols; ++c) y[r] += w[(static_cast<size_t>(r0) + r) * cols + c] * in[c];
  return y;
}
inline std::vector<double> reference_matvec(const Values& w, const std::vector<double>& x, int rows, int r0 = 0) {
  const RefActivations mode = w.int8_activations      ? RefActivations::Int8
                              : w.type == WType::BF16 ? RefActivations::Bf16
                                                      : RefActivations::Exact;
  return reference_matvec(w.exact, mode, x, rows, r0, w.rotation);
}

inline std::vector<float> random_floats(size_t count, std::mt19937& rng, float scale = 1.0f) {
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

inline const char* type_name(WType t) { return t == WType::F32 ? "f32" : t == WType::BF16 ? "bf16" : "f16"; }

inline double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// ------------------------------------------------------------------------------------------------
// The suites, one file each (main.cpp runs them in this order)

void test_scalar_conversions();                                     // kernels_tests.cpp
void test_gemm(const Kernels& k, WType type, bool k_major);         // kernels_tests.cpp
void test_bf16_denormals(const Kernels& k);                         // kernels_tests.cpp
void test_packed_bf16_widened(const Kernels& k);                    // kernels_tests.cpp
void test_elementwise(const Kernels& k);                            // kernels_tests.cpp
void test_simd_order(const Kernels& k);                             // kernels_tests.cpp
void test_attention(const Kernels& k);                              // attention_tests.cpp
void test_threadpool();                                             // kernels_tests.cpp
void test_quantize_weights();                                       // kernels_tests.cpp
void test_quant_gemm(const cpu::QuantKernels& k, cpu::QType type);  // kernels_tests.cpp
void test_quant_model();                                            // quant_tests.cpp
void test_json();                                                   // io_tests.cpp
void test_safetensors();                                            // io_tests.cpp
void test_config();                                                 // io_tests.cpp
void test_model();                                                  // model_tests.cpp
void test_cpu_isa();                                                // isa_tests.cpp
void test_kv_cache();                                               // kv_cache_tests.cpp
void test_golden(const std::string& golden_dir);                    // golden_tests.cpp
void test_engine_kv_cache(const std::string& golden_dir);           // golden_tests.cpp
void test_families();                                               // family_tests.cpp
void test_moe();                                                    // moe_tests.cpp
void test_block(const std::string& golden_block_dir);               // block_tests.cpp
void test_dream(const std::string& golden_dream_dir);               // dream_tests.cpp

}  // namespace vdiff::test
