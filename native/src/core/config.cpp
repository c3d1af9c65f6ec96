#include "config.h"

#include <cmath>
#include <fstream>
#include <sstream>

#include "error.h"
#include "json.h"

namespace vdiff {

namespace {

[[noreturn]] void bad(const std::string& message) { throw Error(ErrorCode::InvalidModel, "config.json: " + message); }

const Json* member(const Json& j, const char* key) { return j.find(key); }

int read_int(const Json& j, const char* key, const int* fallback) {
  const Json* v = member(j, key);
  if (!v || v->is_null()) {
    if (fallback) return *fallback;
    bad(std::string("missing required key \"") + key + "\"");
  }
  if (!v->is_integer()) bad(std::string("\"") + key + "\" must be an integer, got " + Json::type_name(v->type()));
  int64_t x = v->as_int64();
  if (x < INT32_MIN || x > INT32_MAX) bad(std::string("\"") + key + "\" = " + std::to_string(x) + " is out of range");
  return static_cast<int>(x);
}

double read_double(const Json& j, const char* key, double fallback) {
  const Json* v = member(j, key);
  if (!v || v->is_null()) return fallback;
  if (!v->is_number()) bad(std::string("\"") + key + "\" must be a number, got " + Json::type_name(v->type()));
  return v->as_number();
}

bool read_bool(const Json& j, const char* key, bool fallback) {
  const Json* v = member(j, key);
  if (!v || v->is_null()) return fallback;
  if (!v->is_bool()) bad(std::string("\"") + key + "\" must be a boolean, got " + Json::type_name(v->type()));
  return v->as_bool();
}

// Optional switches of the LLaDA/OLMo config family that change the architecture. This engine implements
// one combination; a config asking for another must fail loudly instead of producing wrong logits.
void reject_unsupported(const Json& j) {
  struct Switch {
    const char* key;
    bool supported;
  };
  const Switch switches[] = {
      {"alibi", false},
      {"rope", true},
      {"attention_layer_norm", false},
      {"scale_logits", false},
      {"include_qkv_bias", false},
      {"norm_after", false},
  };
  for (const auto& s : switches) {
    const Json* v = member(j, s.key);
    if (!v || v->is_null()) continue;
    if (!v->is_bool()) bad(std::string("\"") + s.key + "\" must be a boolean");
    if (v->as_bool() != s.supported)
      bad(std::string("\"") + s.key + "\" = " + (v->as_bool() ? "true" : "false") + " is not supported");
  }
  struct Choice {
    const char* key;
    const char* allowed[3];
  };
  const Choice choices[] = {
      {"layer_norm_type", {"rms", "rms_norm", nullptr}},
      {"activation_type", {"silu", "swiglu", nullptr}},
      {"block_type", {"llama", nullptr, nullptr}},
  };
  for (const auto& c : choices) {
    const Json* v = member(j, c.key);
    if (!v || v->is_null()) continue;
    if (!v->is_string()) bad(std::string("\"") + c.key + "\" must be a string");
    bool ok = false;
    for (const char* a : c.allowed)
      if (a && v->as_string() == a) ok = true;
    if (!ok) bad(std::string("\"") + c.key + "\" = \"" + v->as_string() + "\" is not supported");
  }
}

}  // namespace

ModelConfig ModelConfig::from_json(const Json& j) {
  if (!j.is_object()) bad(std::string("expected a JSON object, got ") + Json::type_name(j.type()));
  ModelConfig c;
  c.d_model = read_int(j, "d_model", nullptr);
  c.n_heads = read_int(j, "n_heads", nullptr);
  c.n_layers = read_int(j, "n_layers", nullptr);
  c.mlp_hidden_size = read_int(j, "mlp_hidden_size", nullptr);
  c.vocab_size = read_int(j, "vocab_size", nullptr);
  c.mask_token_id = read_int(j, "mask_token_id", nullptr);
  // Required: the sampler stops on it, and guessing LLaDA's id for another vocabulary would be wrong.
  c.eos_token_id = read_int(j, "eos_token_id", nullptr);
  c.n_kv_heads = read_int(j, "n_kv_heads", &c.n_heads);
  c.embedding_size = read_int(j, "embedding_size", &c.vocab_size);
  const int default_max_len = 4096;
  c.max_sequence_length = read_int(j, "max_sequence_length", &default_max_len);
  c.rope_theta = read_double(j, "rope_theta", 10000.0);
  c.rms_norm_eps = read_double(j, "rms_norm_eps", 1e-5);
  c.weight_tying = read_bool(j, "weight_tying", false);
  c.include_bias = read_bool(j, "include_bias", false);
  reject_unsupported(j);
  c.validate();
  return c;
}

ModelConfig ModelConfig::from_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(ErrorCode::InvalidModel, path + ": cannot open");
  std::ostringstream ss;
  ss << in.rdbuf();
  Json j;
  try {
    j = Json::parse(ss.str());
  } catch (const JsonError& e) {
    throw Error(ErrorCode::InvalidModel, path + ": " + e.what());
  }
  try {
    return from_json(j);
  } catch (const Error& e) {
    throw Error(e.code(), path + ": " + e.what());
  }
}

void ModelConfig::validate() const {
  auto positive = [](const char* key, int v) {
    if (v <= 0) bad(std::string("\"") + key + "\" must be positive, got " + std::to_string(v));
  };
  positive("d_model", d_model);
  positive("n_heads", n_heads);
  positive("n_kv_heads", n_kv_heads);
  positive("n_layers", n_layers);
  positive("mlp_hidden_size", mlp_hidden_size);
  positive("vocab_size", vocab_size);
  positive("embedding_size", embedding_size);
  positive("max_sequence_length", max_sequence_length);
  if (d_model % n_heads != 0)
    bad("\"d_model\" (" + std::to_string(d_model) + ") must be divisible by \"n_heads\" (" + std::to_string(n_heads) +
        ")");
  if (n_heads % n_kv_heads != 0)
    bad("\"n_heads\" (" + std::to_string(n_heads) + ") must be divisible by \"n_kv_heads\" (" +
        std::to_string(n_kv_heads) + ")");
  if (head_dim() % 2 != 0)
    bad("head dimension \"d_model\"/\"n_heads\" = " + std::to_string(head_dim()) +
        " must be even for rotary embeddings");
  if (embedding_size < vocab_size)
    bad("\"embedding_size\" (" + std::to_string(embedding_size) + ") must be at least \"vocab_size\" (" +
        std::to_string(vocab_size) + ")");
  if (mask_token_id < 0 || mask_token_id >= vocab_size)
    bad("\"mask_token_id\" = " + std::to_string(mask_token_id) + " is outside the vocabulary [0, " +
        std::to_string(vocab_size) + ")");
  if (eos_token_id < 0 || eos_token_id >= vocab_size)
    bad("\"eos_token_id\" = " + std::to_string(eos_token_id) + " is outside the vocabulary [0, " +
        std::to_string(vocab_size) + ")");
  if (!(rope_theta > 0) || !std::isfinite(rope_theta)) bad("\"rope_theta\" must be a positive number");
  if (!(rms_norm_eps > 0) || !std::isfinite(rms_norm_eps)) bad("\"rms_norm_eps\" must be a positive number");
  if (include_bias) bad("\"include_bias\" = true is not supported (this engine has no bias terms)");
}

}  // namespace vdiff
