// The tiled online-softmax attention (cpu/attention.h) of one ISA against a plain float64 softmax
// attention: random queries, keys and values laid out as the backend lays them out (heads side by side,
// GQA groups sharing a key/value head), key counts below, at and past the key tile, bidirectional and
// block-causal rows (from position 0 and from inside the canvas, as a cached read), f32 and bf16 keys and
// values. Also: a row's result is the same bit for bit whichever rows share its call, and rows whose keys
// fit in one tile are exactly the one-pass softmax (scores, softmax, P·V) the backend ran before.
#include "cpu/attention.h"
#include "tests/harness.h"

namespace vdiff::test {

namespace {

struct Case {
  int length, q_heads, kv_heads, hd, block, first, count;
  float q_scale;  // larger: peakier softmax (the running maximum moves more)
  WType type;
};

// Keys and values of kv_heads heads, [length][kv_heads * hd] each, in `type`, with their exact values.
struct KV {
  std::vector<float> f32, k_exact, v_exact;
  std::vector<uint16_t> half;
  std::vector<float> v_f32;
  std::vector<uint16_t> v_half;
};

KV random_kv(size_t n, WType type, std::mt19937& rng) {
  KV kv;
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (size_t i = 0; i < n; ++i) {
    const float k = normal(rng), v = normal(rng);
    if (type == WType::F32) {
      kv.f32.push_back(k), kv.v_f32.push_back(v), kv.k_exact.push_back(k), kv.v_exact.push_back(v);
    } else {
      kv.half.push_back(f32_to_bf16_bits(k)), kv.v_half.push_back(f32_to_bf16_bits(v));
      kv.k_exact.push_back(cpu::bf16_to_f32(kv.half.back())), kv.v_exact.push_back(cpu::bf16_to_f32(kv.v_half.back()));
    }
  }
  return kv;
}

// Returns the largest error over every element, relative to sum_j p_j |v_j| (the size of the terms the
// element sums). Also checks row independence and, for one-tile rows, the one-pass softmax.
struct Outcome {
  double worst = 0;
  bool independent = true;
  bool one_pass_exact = true;
  bool any_tiled = false;
};

Outcome run_case(const Kernels& k, const Case& c, std::mt19937& rng) {
  Outcome o;
  const int hd = c.hd, group = c.q_heads / c.kv_heads;
  const int64_t q_dim = static_cast<int64_t>(c.q_heads) * hd, kv_dim = static_cast<int64_t>(c.kv_heads) * hd;
  const std::vector<float> q = random_floats(static_cast<size_t>(c.count) * q_dim, rng, c.q_scale);
  const KV kv = random_kv(static_cast<size_t>(c.length) * kv_dim, c.type, rng);
  const void* k_data = c.type == WType::F32 ? static_cast<const void*>(kv.f32.data()) : kv.half.data();
  const void* v_data = c.type == WType::F32 ? static_cast<const void*>(kv.v_f32.data()) : kv.v_half.data();
  const size_t elem = c.type == WType::F32 ? 4 : 2;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const cpu::AttentionRows rows{c.count, c.first, c.length, c.block};
  AlignedFloats scratch(cpu::attention_scratch_floats(k, c.count, hd));
  std::vector<float> out(static_cast<size_t>(c.count) * q_dim), alone(hd);
  for (int h = 0; h < c.q_heads; ++h) {
    const int kvh = h / group;
    const MatB K{static_cast<const char*>(k_data) + kvh * hd * elem, c.type, kv_dim, false};
    const MatB V{static_cast<const char*>(v_data) + kvh * hd * elem, c.type, kv_dim, true};
    cpu::attention_rows(k, rows, hd, scale, q.data() + h * hd, q_dim, K, V, out.data() + h * hd, q_dim, scratch.p);
    for (int r = 0; r < c.count; ++r) {
      const int n = rows.keys(r);
      o.any_tiled = o.any_tiled || n > cpu::kKeyTile;
      // float64 reference over the row's keys.
      std::vector<double> s(n);
      double m = -INFINITY;
      for (int j = 0; j < n; ++j) {
        double dot = 0;
        for (int d = 0; d < hd; ++d)
          dot += static_cast<double>(q[r * q_dim + h * hd + d]) * kv.k_exact[j * kv_dim + kvh * hd + d];
        s[j] = dot * scale;
        m = std::max(m, s[j]);
      }
      double sum = 0;
      for (double& v : s) sum += v = std::exp(v - m);
      for (int d = 0; d < hd; ++d) {
        double ref = 0, size = 0;
        for (int j = 0; j < n; ++j) {
          const double v = kv.v_exact[j * kv_dim + kvh * hd + d];
          ref += s[j] / sum * v;
          size += s[j] / sum * std::fabs(v);
        }
        o.worst = std::max(o.worst, std::fabs(out[r * q_dim + h * hd + d] - ref) / size);
      }
      // The row alone (count 1 at its own position) gives the same floats.
      const cpu::AttentionRows one{1, c.first + r, c.length, c.block};
      cpu::attention_rows(k, one, hd, scale, q.data() + r * q_dim + h * hd, q_dim, K, V, alone.data(), hd, scratch.p);
      o.independent = o.independent && std::equal(alone.begin(), alone.end(), out.begin() + r * q_dim + h * hd);
      if (n <= cpu::kKeyTile) {  // the one-pass softmax, as the backend computed it before tiling
        std::vector<float> p(n), want(hd);
        AlignedFloats g(k.gemm_scratch_floats(std::max(hd, n)));
        // Attention reads a bf16 cache widened (f32 queries and probabilities, not the bf16 dot product).
        MatB Kw = K, Vw = V;
        Kw.bf16_dot = Vw.bf16_dot = false;
        k.gemm(1, 0, n, hd, q.data() + r * q_dim + h * hd, q_dim, Kw, p.data(), n, false, g.p);
        k.softmax(p.data(), n, scale);
        k.gemm(1, 0, hd, n, p.data(), n, Vw, want.data(), hd, false, g.p);
        o.one_pass_exact = o.one_pass_exact && std::equal(want.begin(), want.end(), out.begin() + r * q_dim + h * hd);
      }
    }
  }
  return o;
}

}  // namespace

void test_attention(const Kernels& k) {
  std::mt19937 rng(2024);
  const std::string isa = k.isa;
  // length, q heads, kv heads, head dim, block, first row's position, rows, q scale, type
  const std::vector<Case> cases = {
      {1, 2, 2, 64, 0, 0, 1, 1.0f, WType::F32},
      {5, 4, 2, 64, 0, 0, 5, 1.0f, WType::F32},
      {255, 4, 1, 64, 0, 0, 64, 1.0f, WType::F32},
      {256, 2, 2, 64, 0, 0, 64, 1.0f, WType::F32},
      {257, 4, 2, 64, 0, 0, 64, 1.0f, WType::F32},
      {300, 6, 2, 40, 0, 0, 17, 2.0f, WType::F32},
      {700, 8, 2, 64, 0, 64, 64, 1.0f, WType::F32},
      {1029, 4, 4, 128, 0, 0, 9, 3.0f, WType::F32},
      {700, 4, 1, 64, 0, 0, 33, 1.0f, WType::BF16},
      {1100, 2, 1, 64, 0, 640, 64, 1.0f, WType::BF16},
      // Block-causal: row r at position first + r attends min(length, (i / B + 1) * B) keys.
      {600, 4, 2, 64, 32, 0, 64, 1.0f, WType::F32},
      {600, 4, 2, 64, 32, 224, 64, 2.0f, WType::F32},
      {1000, 2, 1, 64, 100, 150, 64, 1.0f, WType::F32},
      {530, 4, 4, 64, 256, 250, 64, 1.0f, WType::BF16},
      {517, 2, 2, 64, 4, 480, 37, 1.0f, WType::F32},
  };
  Outcome all;
  int tiled = 0;
  for (const Case& c : cases) {
    const Outcome o = run_case(k, c, rng);
    if (o.worst > 1e-5 || !o.independent || !o.one_pass_exact)
      std::printf("     case length %d heads %d/%d hd %d block %d first %d rows %d: rel %.2e%s%s\n", c.length,
                  c.q_heads, c.kv_heads, c.hd, c.block, c.first, c.count, o.worst,
                  o.independent ? "" : ", a row differs alone", o.one_pass_exact ? "" : ", one-pass rows differ");
    all.worst = std::max(all.worst, o.worst);
    all.independent = all.independent && o.independent;
    all.one_pass_exact = all.one_pass_exact && o.one_pass_exact;
    tiled += o.any_tiled;
  }
  report(all.worst <= 1e-5 && tiled >= 8,
         isa +
             " attention: tiled online softmax = float64 softmax attention within 1e-5 (lengths 1 to 1100, "
             "GQA 1-4, head dims 40-128, bidirectional and block-causal, f32 and bf16 keys)",
         fmt("max error / sum p|v| %.2e; %.0f of the cases span several key tiles", all.worst, tiled));
  report(all.independent, isa + " attention: each row equals the same row computed alone, bit for bit");
  report(all.one_pass_exact,
         isa + " attention: rows within one key tile are the one-pass softmax (scores, softmax, P·V) bit for bit");
}

}  // namespace vdiff::test
