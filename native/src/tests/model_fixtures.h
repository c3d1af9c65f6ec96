// Model fixtures shared by the io, model, kv-cache, golden tests and the model benchmark: a safetensors
// writer, a tiny random checkpoint written to disk, the float64 reference forward, and helpers that run
// a forward (plain or cached) and compare logits.
#pragma once

#include "tests/harness.h"

namespace vdiff::test {

// ------------------------------------------------------------------------------------------------
// safetensors

struct TensorSpec {
  std::string name;
  std::string dtype;
  std::vector<int64_t> shape;
  std::string bytes;
};

inline std::string shape_json(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? "," : "") + std::to_string(shape[i]);
  return s + "]";
}

inline std::string le64(uint64_t n) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return s;
}

// A well-formed file: header padded with spaces to a multiple of 8, tensors laid out in order.
// `metadata`: more members of "__metadata__", as JSON (",\"key\":\"value\"").
inline std::string safetensors_bytes(const std::vector<TensorSpec>& tensors, const std::string& metadata = "") {
  std::string header = "{\"__metadata__\":{\"format\":\"pt\"" + metadata + "}";
  std::string data;
  for (const auto& t : tensors) {
    header += ",\"" + t.name + "\":{\"dtype\":\"" + t.dtype + "\",\"shape\":" + shape_json(t.shape) +
              ",\"data_offsets\":[" + std::to_string(data.size()) + "," + std::to_string(data.size() + t.bytes.size()) +
              "]}";
    data += t.bytes;
  }
  header += "}";
  while (header.size() % 8) header += ' ';
  return le64(header.size()) + header + data;
}

// A file with a hand-written header (for corrupt cases).
inline std::string raw_safetensors(const std::string& header, const std::string& data) {
  return le64(header.size()) + header + data;
}

inline std::string float_bytes(std::initializer_list<float> v) {
  return std::string(reinterpret_cast<const char*>(std::data(v)), v.size() * 4);
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

inline TinyModel make_tiny(const TinySpec& s, WType type, uint32_t seed) {
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

inline std::string tiny_config_json(const TinySpec& s) {
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
inline void write_tiny(const fs::path& dir, const TinyModel& m, int shards = 1, const std::string& skip = "",
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
  std::vector<TensorSpec> first(specs.begin(), specs.begin() + specs.size() / 2),
      second(specs.begin() + specs.size() / 2, specs.end());
  write_file(dir / "model-00001-of-00002.safetensors", safetensors_bytes(first));
  write_file(dir / "model-00002-of-00002.safetensors", safetensors_bytes(second));
  std::string index = "{\"metadata\": {}, \"weight_map\": {";
  for (size_t i = 0; i < specs.size(); ++i)
    index += (i ? ", \"" : "\"") + specs[i].name + "\": \"model-0000" + (i < first.size() ? "1" : "2") +
             "-of-00002.safetensors\"";
  write_file(dir / "model.safetensors.index.json", index + "}}");
}

// Keys (after RoPE) and values of every layer and position: [layer][position][kv_dim].
struct ReferenceKV {
  std::vector<std::vector<std::vector<double>>> k, v;
};

// The forward pass in float64, written as plainly as possible: logits [L][embedding].
// With `stale`, the keys and values of the positions outside [begin, end) are taken from it instead of
// being computed (what a KV cache read does); `kv_out` receives the keys and values used.
inline std::vector<std::vector<double>> reference_forward(const TinyModel& m, const std::vector<int32_t>& tokens,
                                                          ReferenceKV* kv_out = nullptr,
                                                          const ReferenceKV* stale = nullptr, int begin = 0,
                                                          int end = -1) {
  if (end < 0) end = static_cast<int>(tokens.size());
  const TinySpec& s = m.spec;
  const int L = static_cast<int>(tokens.size()), D = s.d_model, hd = D / s.n_heads, H = s.hidden;
  auto W = [&](const std::string& name) -> const std::vector<double>& {
    return m.tensors.at("model.transformer." + name).exact;
  };
  auto rms = [&](const std::vector<double>& x, const std::vector<double>& w) {
    double ss = 0;
    for (double v : x) ss += v * v;
    double r = 1.0 / std::sqrt(ss / x.size() + s.eps);
    std::vector<double> y(x.size());
    for (size_t i = 0; i < x.size(); ++i) y[i] = x[i] * r * w[i];
    return y;
  };
  // Every matrix here is a projection or the head: a bf16 one is the bf16 dot product (reference_matvec).
  auto matvec = [&](const std::string& name, const std::vector<double>& x, int rows) {
    return reference_matvec(m.tensors.at("model.transformer." + name), x, rows);
  };
  std::vector<std::vector<double>> x(L);
  for (int t = 0; t < L; ++t)
    x[t].assign(W("wte.weight").begin() + tokens[t] * D, W("wte.weight").begin() + (tokens[t] + 1) * D);
  for (int layer = 0; layer < s.n_layers; ++layer) {
    const std::string b = "blocks." + std::to_string(layer) + ".";
    std::vector<std::vector<double>> q(L), k(L), v(L);
    for (int t = 0; t < L; ++t) {
      auto n = rms(x[t], W(b + "attn_norm.weight"));
      q[t] = matvec(b + "q_proj.weight", n, s.n_heads * hd);
      k[t] = matvec(b + "k_proj.weight", n, s.n_kv_heads * hd);
      v[t] = matvec(b + "v_proj.weight", n, s.n_kv_heads * hd);
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
      auto o = matvec(b + "attn_out.weight", att, D);
      for (int i = 0; i < D; ++i) x[t][i] += o[i];
    }
    for (int t = 0; t < L; ++t) {
      auto n = rms(x[t], W(b + "ff_norm.weight"));
      auto g = matvec(b + "ff_proj.weight", n, H), u = matvec(b + "up_proj.weight", n, H);
      for (int i = 0; i < H; ++i) g[i] = g[i] / (1.0 + std::exp(-g[i])) * u[i];
      auto o = matvec(b + "ff_out.weight", g, D);
      for (int i = 0; i < D; ++i) x[t][i] += o[i];
    }
  }
  std::vector<std::vector<double>> logits(L);
  const std::string head = s.tied ? "wte.weight" : "ff_out.weight";  // a tied head: the embedding's matrix
  for (int t = 0; t < L; ++t) logits[t] = matvec(head, rms(x[t], W("ln_f.weight")), s.embedding);
  return logits;
}

inline std::vector<int32_t> random_tokens(std::mt19937& rng, int n, int vocab) {
  std::uniform_int_distribution<int> d(0, vocab - 1);
  std::vector<int32_t> t(n);
  for (auto& x : t) x = d(rng);
  return t;
}

// Runs one forward over `seqs`, asking for `rows[i]` of sequence i; returns the logits.
inline std::vector<float> run_forward(Backend& model, const std::vector<std::vector<int32_t>>& seqs,
                                      const std::vector<std::vector<int32_t>>& rows,
                                      const std::atomic<bool>* cancel = nullptr) {
  std::vector<ForwardSeq> batch;
  size_t n_rows = 0;
  for (size_t i = 0; i < seqs.size(); ++i) {
    batch.push_back(
        {seqs[i].data(), static_cast<int>(seqs[i].size()), rows[i].data(), static_cast<int>(rows[i].size())});
    n_rows += rows[i].size();
  }
  std::vector<float> logits(n_rows * model.config().embedding_size);
  model.forward(batch, logits.data(), cancel);
  return logits;
}

inline std::vector<int32_t> all_rows(size_t n) {
  std::vector<int32_t> r(n);
  for (size_t i = 0; i < n; ++i) r[i] = static_cast<int32_t>(i);
  return r;
}

// One sequence of a cached forward: the canvas, the rows wanted, the cache and the computed range.
struct CachedSeq {
  std::vector<int32_t> tokens;
  std::vector<int32_t> rows;
  KVCache* cache = nullptr;
  int begin = 0, end = -1;
  int block = 0;  // ForwardSeq::attention_block
};

inline std::vector<float> run_cached(Backend& model, const std::vector<CachedSeq>& seqs,
                                     const std::atomic<bool>* cancel = nullptr) {
  std::vector<ForwardSeq> batch;
  size_t n_rows = 0;
  for (const CachedSeq& s : seqs) {
    batch.push_back({s.tokens.data(), static_cast<int>(s.tokens.size()), s.rows.data(), static_cast<int>(s.rows.size()),
                     s.cache, s.begin, s.end, s.block});
    n_rows += s.rows.size();
  }
  std::vector<float> logits(n_rows * model.config().embedding_size);
  model.forward(batch, logits.data(), cancel);
  return logits;
}

inline std::vector<int32_t> range_rows(int begin, int end) {
  std::vector<int32_t> r;
  for (int p = begin; p < end; ++p) r.push_back(p);
  return r;
}

// The rows `rows` (canvas positions) of a logits block that holds every position of the canvas.
inline std::vector<float> select_rows(const std::vector<float>& all, const std::vector<int32_t>& rows, int E) {
  std::vector<float> out;
  for (int r : rows)
    out.insert(out.end(), all.begin() + static_cast<size_t>(r) * E, all.begin() + static_cast<size_t>(r + 1) * E);
  return out;
}

inline double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double worst = a.size() == b.size() ? 0 : INFINITY;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) worst = std::max(worst, std::fabs(double(a[i]) - b[i]));
  return worst;
}

inline double max_abs(const std::vector<float>& a) {
  double m = 0;
  for (float x : a) m = std::max(m, std::fabs(double(x)));
  return m;
}

// ------------------------------------------------------------------------------------------------
// Logits against a float64 reference

// A model's logits (row i of `got` is the reference's row rows[i], E per row) against the reference.
struct LogitErrors {
  double worst = 0;       // the largest |got - reference|
  double scale = 0;       // the largest |reference|
  double median_row = 0;  // the median over the rows of a row's largest |got - reference|
};

inline LogitErrors logit_errors(const std::vector<float>& got, const std::vector<std::vector<double>>& ref,
                                const std::vector<int32_t>& rows, int E) {
  LogitErrors e;
  if (got.size() != rows.size() * E) return {INFINITY, INFINITY, INFINITY};
  std::vector<double> per_row(rows.size(), 0.0);
  for (size_t r = 0; r < rows.size(); ++r)
    for (int i = 0; i < E; ++i) {
      per_row[r] = std::max(per_row[r], std::fabs(got[r * E + i] - ref[rows[r]][i]));
      e.scale = std::max(e.scale, std::fabs(ref[rows[r]][i]));
    }
  for (double w : per_row) e.worst = std::max(e.worst, w);
  if (!per_row.empty()) {
    std::nth_element(per_row.begin(), per_row.begin() + per_row.size() / 2, per_row.end());
    e.median_row = per_row[per_row.size() / 2];
  }
  return e;
}

// The tolerance of a bf16 model's logits against a float64 reference (or against another computation
// order, as the portable kernels' f32 products), relative to max|logit|.
//
// f32 and f16 weights keep the f32 bound of each check (1e-5 x max|logit|, 2e-5 for the families). A bf16
// weight is multiplied as the bf16 dot product: each activation first rounded to bf16, which the float64
// reference does too (reference_matvec), from its double where the engine rounds its f32 value. Where the
// two lie on either side of a bf16 rounding midpoint (a chance of about 2^8 times their f32-level relative
// difference per element) they round to neighbours one bf16 ulp apart: 2^-8 to 2^-7 of that element. Such a
// flip moves the logits by about one bf16 ulp of a term |w x| (carried on by the residual stream and, for a
// key or value, attention), far less than one bf16 ulp of the largest logit. Measured: at most 2.95e-3 x
// max|logit| (cpu_isa, 600 tokens, each ISA against float64 and the SIMD ISAs against portable; the
// shorter canvases of the model and family checks show none above their f32 bound). So: every logit within
// 2^-7 x max|logit| (one bf16 ulp of the largest logit, 2.6x that), and the median row within the check's
// f32 bound, as a flip is rare (under a sixth of the rows feel one): a bf16 product computed otherwise
// everywhere (activations not rounded, rounded differently) moves every row by about 1e-3 x max|logit|.
constexpr double kBf16LogitBound = 1.0 / 128;

inline bool logits_within(const LogitErrors& e, WType weights, double f32_bound) {
  if (weights != WType::BF16) return e.worst <= f32_bound * e.scale;
  return e.worst <= kBf16LogitBound * e.scale && e.median_row <= f32_bound * e.scale;
}

// The bound logits_within applies, for a check's name.
inline std::string logit_bound_text(WType weights, double f32_bound) {
  std::string bound = fmt("%.0e", f32_bound);  // 1e-05 -> 1e-5
  if (bound.find("e-0") != std::string::npos) bound.erase(bound.find("e-0") + 2, 1);
  if (weights != WType::BF16) return "within " + bound + " x max|logit|";
  return "within 2^-7 x max|logit| (bf16 rounding of the activations), the median row within " + bound + " x";
}

inline std::string logit_errors_text(const LogitErrors& e) {
  return fmt("max |diff| %.2e (%.2e x max|logit|), ", e.worst, e.worst / e.scale) +
         fmt("median row %.2e, max |logit| %.2f", e.median_row, e.scale);
}

// The sampling settings of a golden case ("params" of test/fixtures/golden/*.json).
inline SamplingParams golden_params(const Json& p) {
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

}  // namespace vdiff::test
