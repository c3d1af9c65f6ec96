#include "config.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "error.h"
#include "json.h"
#include "weights.h"

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

// A token id or a non-empty list of them ("eos_token_id": 2 or [151645, 151643]).
std::vector<int> read_token_ids(const Json& j, const char* key) {
  const Json* v = member(j, key);
  if (!v || v->is_null()) bad(std::string("missing required key \"") + key + "\"");
  std::vector<int> ids;
  const auto one = [&](const Json& x) {
    if (!x.is_integer() || x.as_int64() < 0 || x.as_int64() > INT32_MAX)
      bad(std::string("\"") + key + "\" must be a token id or a list of token ids");
    ids.push_back(static_cast<int>(x.as_int64()));
  };
  if (v->is_array()) {
    for (const Json& x : v->items()) one(x);
    if (ids.empty()) bad(std::string("\"") + key + "\" is an empty list");
  } else {
    one(*v);
  }
  return ids;
}

std::vector<int> read_int_list(const Json& j, const char* key) {
  const Json* v = member(j, key);
  std::vector<int> out;
  if (!v || v->is_null()) return out;
  if (!v->is_array()) bad(std::string("\"") + key + "\" must be a list of integers");
  for (const Json& x : v->items()) {
    if (!x.is_integer() || x.as_int64() < INT32_MIN || x.as_int64() > INT32_MAX)
      bad(std::string("\"") + key + "\" must be a list of integers");
    out.push_back(static_cast<int>(x.as_int64()));
  }
  return out;
}

// The family config.json names: "model_type", else an "architectures" entry, else LLaDA (whose older
// configs name neither).
const Family& resolve_family(const Json& j) {
  const Json* type = member(j, "model_type");
  if (type && !type->is_null()) {
    if (!type->is_string()) bad("\"model_type\" must be a string");
    if (const Family* f = find_family(type->as_string())) return *f;
    std::string known;
    for (const Family* f : families()) known += (known.empty() ? "" : ", ") + f->name;
    bad("unknown \"model_type\" \"" + type->as_string() + "\" (this engine serves " + known + ")");
  }
  const Json* archs = member(j, "architectures");
  if (archs && archs->is_array() && archs->size() > 0) {
    std::string names;
    for (const Json& a : archs->items()) {
      if (!a.is_string()) continue;
      names += (names.empty() ? "" : ", ") + a.as_string();
      for (const Family* f : families())
        for (const std::string& name : f->architectures)
          if (name == a.as_string()) return *f;
    }
    bad("no \"model_type\", and \"architectures\" [" + names + "] names no family this engine serves");
  }
  return *find_family("llada");
}

// Keys of the Hugging Face families that change the architecture in a way this engine does not implement.
// "attention_bias" is the family's own switch where it has q/k/v biases (Family::qkv_bias).
void reject_unsupported_hf(const Json& j, const Family& f) {
  for (const char* key : {"use_qkv_bias", "use_bias", "attention_bias", "mlp_bias", "use_sliding_window"}) {
    if (f.qkv_bias && std::string(key) == "attention_bias") continue;
    const Json* v = member(j, key);
    if (!v || v->is_null()) continue;
    if (!v->is_bool()) bad(std::string("\"") + key + "\" must be a boolean");
    if (v->as_bool()) bad(std::string("\"") + key + "\" = true is not supported");
  }
  const Json* scaling = member(j, "rope_scaling");
  if (scaling && !scaling->is_null()) bad("\"rope_scaling\" is not supported (only plain RoPE)");
  const Json* act = member(j, "hidden_act");
  if (act && !act->is_null() && !(act->is_string() && act->as_string() == "silu"))
    bad("\"hidden_act\" must be \"silu\"");
}

// The Hugging Face keys (LLaDA2 / BailingMoeV2, Qwen3, Qwen3-MoE) into a ModelConfig.
ModelConfig from_hf_keys(const Json& j, const Family& f) {
  ModelConfig c;
  const int zero = 0, one = 1, default_max_len = 4096;
  c.d_model = read_int(j, "hidden_size", nullptr);
  c.n_layers = read_int(j, "num_hidden_layers", nullptr);
  c.n_heads = read_int(j, "num_attention_heads", nullptr);
  c.n_kv_heads = read_int(j, "num_key_value_heads", &c.n_heads);
  c.head_dim_size = read_int(j, "head_dim", &zero);
  c.vocab_size = read_int(j, "vocab_size", nullptr);
  c.embedding_size = c.vocab_size;
  c.mask_token_id = read_int(j, "mask_token_id", f.default_mask_token_id >= 0 ? &f.default_mask_token_id : nullptr);
  const std::vector<int> eos = read_token_ids(j, "eos_token_id");
  c.eos_token_id = eos[0];
  c.stop_token_ids.assign(eos.begin() + 1, eos.end());
  c.max_sequence_length = read_int(j, "max_position_embeddings", &default_max_len);
  c.rope_theta = read_double(j, "rope_theta", 10000.0);
  c.rms_norm_eps = read_double(j, "rms_norm_eps", 1e-6);
  c.weight_tying = read_bool(j, "tie_word_embeddings", false);
  c.qk_norm = read_bool(j, "use_qk_norm", f.qk_norm);
  if (f.decoding == Decoding::Block) c.block_length = read_int(j, "block_size", &f.default_block_length);
  c.qkv_bias = f.qkv_bias && read_bool(j, "attention_bias", true);
  c.shifted_logits = f.shifted_logits;
  // Dream's attention derives the head size from hidden_size; a "head_dim" that disagrees is another model.
  if (f.decoding == Decoding::Dream && c.head_dim_size > 0 && c.n_heads > 0 && c.head_dim_size * c.n_heads != c.d_model)
    bad("\"head_dim\" = " + std::to_string(c.head_dim_size) + " is not \"hidden_size\" / \"num_attention_heads\"");
  reject_unsupported_hf(j, f);

  // Partial rotary: "rotary_dim", or "partial_rotary_factor" times the head dimension (both: they agree).
  const int hd = c.head_dim_size > 0 ? c.head_dim_size : (c.n_heads > 0 ? c.d_model / c.n_heads : 0);
  const Json* factor = member(j, "partial_rotary_factor");
  int from_factor = 0;
  if (factor && !factor->is_null()) {
    const double pf = read_double(j, "partial_rotary_factor", 1.0);
    if (!(pf > 0 && pf <= 1)) bad("\"partial_rotary_factor\" must be in (0, 1]");
    const double dims = pf * hd;
    if (dims != std::floor(dims))
      bad("\"partial_rotary_factor\" x head_dim = " + std::to_string(dims) + " is not a whole number of dims");
    from_factor = static_cast<int>(dims);
  }
  c.rotary_dim = read_int(j, "rotary_dim", &from_factor);
  if (from_factor > 0 && c.rotary_dim != from_factor)
    bad("\"rotary_dim\" = " + std::to_string(c.rotary_dim) +
        " disagrees with \"partial_rotary_factor\" x head_dim = " + std::to_string(from_factor));
  if (c.rotary_dim == hd) c.rotary_dim = 0;  // the whole head

  c.router = f.router;
  if (f.router != RouterKind::None) {
    c.n_experts = read_int(j, "num_experts", nullptr);
    c.experts_per_token = read_int(j, "num_experts_per_tok", nullptr);
    c.moe_hidden_size = read_int(j, "moe_intermediate_size", nullptr);
    if (f.router == RouterKind::GroupedSigmoid) {
      c.n_shared_experts = read_int(j, "num_shared_experts", &zero);
      c.first_k_dense = read_int(j, "first_k_dense_replace", &zero);
      c.n_group = read_int(j, "n_group", &one);
      c.topk_group = read_int(j, "topk_group", &one);
      c.routed_scaling_factor = read_double(j, "routed_scaling_factor", 1.0);
      // The HF gate normalises the top-k weights whatever norm_topk_prob says (moe.h); kept for the record.
      c.norm_topk_prob = read_bool(j, "norm_topk_prob", true);
      c.expert_bias = read_bool(j, "moe_router_enable_expert_bias", true);
      const Json* score = member(j, "score_function");
      if (score && !score->is_null() && !(score->is_string() && score->as_string() == "sigmoid"))
        bad("\"score_function\" must be \"sigmoid\"");
    } else {
      c.norm_topk_prob = read_bool(j, "norm_topk_prob", false);  // Qwen3MoeConfig's default
      c.moe_layer_step = read_int(j, "decoder_sparse_step", &one);
      c.dense_layers = read_int_list(j, "mlp_only_layers");
      const Json* shared = member(j, "shared_expert_intermediate_size");
      if (shared && !shared->is_null() && !(shared->is_integer() && shared->as_int64() == 0))
        bad("\"shared_expert_intermediate_size\" is not supported by " + f.name);
    }
    if (c.moe_layer_step < 1) bad("\"decoder_sparse_step\" must be positive");
    // The dense width is needed only when some layer is dense.
    c.mlp_hidden_size = read_int(j, "intermediate_size", &zero);
    if (c.n_layers > 0 && c.has_dense_layer() && c.mlp_hidden_size <= 0)
      c.mlp_hidden_size = read_int(j, "intermediate_size", nullptr);
  } else {
    c.mlp_hidden_size = read_int(j, "intermediate_size", nullptr);
  }
  return c;
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
  const Family& family = resolve_family(j);
  if (family.keys == ConfigKeys::HuggingFace) {
    ModelConfig c = from_hf_keys(j, family);
    c.model_type = family.name;
    c.decoding = family.decoding;
    c.validate();
    return c;
  }
  ModelConfig c;
  c.model_type = family.name;
  c.decoding = family.decoding;
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
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec))
    throw Error(ErrorCode::InvalidModel, path + ": is a directory, not a file");
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
    // from_json names "config.json"; the path says it better.
    const std::string own = "config.json: ";
    std::string message = e.what();
    if (message.rfind(own, 0) == 0) message.erase(0, own.size());
    throw Error(e.code(), path + ": " + message, e.param());
  }
}

void ModelConfig::validate() const {
  // The keys are named as this family's config.json names them.
  const bool hf = model_type != "llada";
  const auto key = [hf](const char* llada, const char* huggingface) { return hf ? huggingface : llada; };
  const auto q = [](const std::string& k) { return "\"" + k + "\""; };
  auto positive = [&](const char* k, int v) {
    if (v <= 0) bad(q(k) + " must be positive, got " + std::to_string(v));
  };
  positive(key("d_model", "hidden_size"), d_model);
  positive(key("n_heads", "num_attention_heads"), n_heads);
  positive(key("n_kv_heads", "num_key_value_heads"), n_kv_heads);
  positive(key("n_layers", "num_hidden_layers"), n_layers);
  if (has_dense_layer()) positive(key("mlp_hidden_size", "intermediate_size"), mlp_hidden_size);
  positive("vocab_size", vocab_size);
  positive("embedding_size", embedding_size);
  positive(key("max_sequence_length", "max_position_embeddings"), max_sequence_length);
  if (head_dim_size < 0) bad("\"head_dim\" must be positive, got " + std::to_string(head_dim_size));
  if (head_dim_size == 0 && d_model % n_heads != 0)
    bad(q(key("d_model", "hidden_size")) + " (" + std::to_string(d_model) + ") must be divisible by " +
        q(key("n_heads", "num_attention_heads")) + " (" + std::to_string(n_heads) + ")");
  if (n_heads % n_kv_heads != 0)
    bad(q(key("n_heads", "num_attention_heads")) + " (" + std::to_string(n_heads) + ") must be divisible by " +
        q(key("n_kv_heads", "num_key_value_heads")) + " (" + std::to_string(n_kv_heads) + ")");
  if (head_dim() % 2 != 0)
    bad(std::string(hf ? "\"head_dim\"" : "head dimension \"d_model\"/\"n_heads\"") + " = " +
        std::to_string(head_dim()) + " must be even for rotary embeddings");
  if (rotary_dim < 0 || rotary_dim % 2 != 0 || rotary_dim > head_dim())
    bad("\"rotary_dim\" = " + std::to_string(rotary_dim) + " must be even and at most the head dimension " +
        std::to_string(head_dim()));
  if (embedding_size < vocab_size)
    bad("\"embedding_size\" (" + std::to_string(embedding_size) + ") must be at least \"vocab_size\" (" +
        std::to_string(vocab_size) + ")");
  if (mask_token_id < 0 || mask_token_id >= vocab_size)
    bad("\"mask_token_id\" = " + std::to_string(mask_token_id) + " is outside the vocabulary [0, " +
        std::to_string(vocab_size) + ")");
  if (eos_token_id < 0 || eos_token_id >= vocab_size)
    bad("\"eos_token_id\" = " + std::to_string(eos_token_id) + " is outside the vocabulary [0, " +
        std::to_string(vocab_size) + ")");
  for (int id : stop_token_ids)
    if (id < 0 || id >= vocab_size)
      bad("\"eos_token_id\" lists " + std::to_string(id) + ", outside the vocabulary [0, " +
          std::to_string(vocab_size) + ")");
  if (!(rope_theta > 0) || !std::isfinite(rope_theta)) bad("\"rope_theta\" must be a positive number");
  if (!(rms_norm_eps > 0) || !std::isfinite(rms_norm_eps)) bad("\"rms_norm_eps\" must be a positive number");
  if (include_bias) bad("\"include_bias\" = true is not supported (this engine has no bias terms)");
  if (decoding == Decoding::Block && (block_length < 1 || block_length > max_sequence_length))
    bad("\"block_size\" = " + std::to_string(block_length) + " must be in [1, " +
        q(key("max_sequence_length", "max_position_embeddings")) + " = " + std::to_string(max_sequence_length) + "]");
  if (decoding != Decoding::Block && block_length != 0) bad("\"block_size\" applies to block decoding only");
  // Mixture of experts.
  if (router == RouterKind::None) {
    if (n_experts != 0) bad("experts without a router");
    return;
  }
  positive("num_experts", n_experts);
  positive("num_experts_per_tok", experts_per_token);
  positive("moe_intermediate_size", moe_hidden_size);
  if (experts_per_token > n_experts)
    bad("\"num_experts_per_tok\" (" + std::to_string(experts_per_token) + ") must be at most \"num_experts\" (" +
        std::to_string(n_experts) + ")");
  if (n_shared_experts < 0) bad("\"num_shared_experts\" must not be negative");
  if (first_k_dense < 0 || first_k_dense > n_layers)
    bad("\"first_k_dense_replace\" = " + std::to_string(first_k_dense) + " must be in [0, " + q("num_hidden_layers") +
        " = " + std::to_string(n_layers) + "]");
  for (int d : dense_layers)
    if (d < 0 || d >= n_layers) bad("\"mlp_only_layers\" lists layer " + std::to_string(d) + ", which does not exist");
  if (!(routed_scaling_factor > 0) || !std::isfinite(routed_scaling_factor))
    bad("\"routed_scaling_factor\" must be a positive number");
  if (router == RouterKind::GroupedSigmoid) {
    if (n_group < 1 || n_experts % n_group != 0)
      bad("\"n_group\" = " + std::to_string(n_group) + " must divide \"num_experts\" = " + std::to_string(n_experts));
    if (n_experts / n_group < 2)
      bad("\"n_group\" = " + std::to_string(n_group) +
          " leaves fewer than 2 experts per group (groups are scored by their top 2)");
    if (topk_group < 1 || topk_group > n_group)
      bad("\"topk_group\" = " + std::to_string(topk_group) +
          " must be in [1, \"n_group\" = " + std::to_string(n_group) + "]");
    if (experts_per_token > topk_group * (n_experts / n_group))
      bad("\"num_experts_per_tok\" (" + std::to_string(experts_per_token) + ") is more than the " +
          std::to_string(topk_group * (n_experts / n_group)) + " experts of the \"topk_group\" groups kept");
  } else if (n_group != 1 || topk_group != 1 || n_shared_experts != 0 || first_k_dense != 0) {
    bad("expert groups, shared experts and first_k_dense_replace belong to the grouped-sigmoid router only");
  }
}

}  // namespace vdiff
