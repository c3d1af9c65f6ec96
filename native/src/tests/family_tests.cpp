// The model families beyond LLaDA (llada2_moe, sdar, sdar_moe) and block-causal attention
// (ForwardSeq::attention_block): config.json parsing, and the CPU forward against a float64 reference
// written here, plus the exactness of block-causal cached reads.
#include "tests/model_fixtures.h"

namespace vdiff::test {

namespace {

// A forward with block-causal attention; `cache` and [begin, end) as in ForwardSeq.
std::vector<float> run_block(Backend& model, const std::vector<int32_t>& tokens, const std::vector<int32_t>& rows,
                             int block, KVCache* cache = nullptr, int begin = 0, int end = -1) {
  ForwardSeq s{
      tokens.data(), static_cast<int>(tokens.size()), rows.data(), static_cast<int>(rows.size()), cache, begin, end};
  s.attention_block = block;
  std::vector<float> logits(rows.size() * model.config().embedding_size);
  model.forward({s}, logits.data());
  return logits;
}

// Block-causal attention on the LLaDA tiny model: what the mask implies (a position never sees later
// blocks), the cached reads against the uncached forward, and the checks of check_batch.
void test_block_causal_llada() {
  TempDir tmp;
  std::mt19937 rng(5);
  TinySpec spec;
  write_tiny(tmp.path / "tiny", make_tiny(spec, WType::F32, 9));
  auto model = Backend::load((tmp.path / "tiny").string(), test_options(2));
  const int E = spec.embedding;
  for (int B : {4, 32}) {
    const std::string tag = "block-causal B=" + std::to_string(B) + ": ";
    const int L = 4 * B + B / 2;  // the last block is cut short by the canvas
    std::vector<int32_t> canvas = random_tokens(rng, L, spec.vocab);
    const std::vector<float> full = run_block(*model, canvas, all_rows(L), B);
    // Changing the tokens of block 2 leaves the rows of blocks 0 and 1 exactly as they were, and changes
    // those of block 2 and later.
    std::vector<int32_t> changed = canvas;
    for (int p = 2 * B; p < 3 * B; ++p) changed[p] = (changed[p] + 3) % spec.vocab;
    const std::vector<float> other = run_block(*model, changed, all_rows(L), B);
    const std::vector<int32_t> early = range_rows(0, 2 * B), late = range_rows(2 * B, L);
    report(select_rows(full, early, E) == select_rows(other, early, E) &&
               max_abs_diff(select_rows(full, late, E), select_rows(other, late, E)) > 1e-3,
           tag + "earlier blocks do not see a later block's tokens; later blocks do");
    // The bidirectional forward differs (the mask is in effect).
    report(
        max_abs_diff(run_forward(*model, {canvas}, {range_rows(0, B)}), select_rows(full, range_rows(0, B), E)) > 1e-3,
        tag + "differs from bidirectional attention");
    // Without a cache, [0, end) gives the rows of the whole canvas's forward, bit for bit.
    report(run_block(*model, canvas, range_rows(0, 2 * B), B, nullptr, 0, 2 * B) == select_rows(full, early, E),
           tag + "an uncached window [0, 2B) equals the whole canvas's rows, bit for bit");
    // Cached: prefill [0, 2B), then read block 2 and the rest, block by block: equal to the full forward
    // bit for bit, and cached_until follows.
    auto cache = model->make_kv_cache(L);
    report(cache->cached_until() == 0, tag + "a new cache holds nothing");
    const std::vector<float> pre = run_block(*model, canvas, early, B, cache.get(), 0, 2 * B);
    bool ok = pre == select_rows(full, early, E) && cache->cached_until() == 2 * B;
    std::string detail = "cached_until " + std::to_string(cache->cached_until());
    for (int b = 2; b * B < L; ++b) {
      const int begin = b * B, end = std::min(L, begin + B);
      const std::vector<int32_t> rows = range_rows(begin, end);
      const std::vector<float> got = run_block(*model, canvas, rows, B, cache.get(), begin, end);
      ok = ok && got == select_rows(full, rows, E) && cache->cached_until() == end;
      detail += ", " + std::to_string(cache->cached_until());
    }
    report(ok, tag + "prefill then block-by-block cached reads equal the full forward bit for bit", detail);
    // A read of an earlier range keeps cached_until at its maximum; a read past cached_until is refused.
    run_block(*model, canvas, range_rows(B, 2 * B), B, cache.get(), B, 2 * B);
    report(cache->cached_until() == L, tag + "re-reading an earlier block keeps cached_until");
    auto fresh = model->make_kv_cache(L);
    expect_error(tag + "a read past cached_until is refused", ErrorCode::InvalidArgument,
                 {"holds keys up to position 0", "needs them up to"},
                 [&] { run_block(*model, canvas, range_rows(B, 2 * B), B, fresh.get(), B, 2 * B); });
    // A range that ends inside a block (not at the canvas's end) is refused, with or without a cache.
    expect_error(tag + "a range ending inside a block is refused", ErrorCode::InvalidArgument, {"inside a block"},
                 [&] { run_block(*model, canvas, range_rows(0, 3), B, nullptr, 0, B + 1); });
    expect_error(tag + "an uncached range not from 0 is refused", ErrorCode::InvalidArgument, {"needs a KV cache"},
                 [&] { run_block(*model, canvas, range_rows(B, 2 * B), B, nullptr, B, 2 * B); });
  }
  // A whole-canvas block-causal forward through a cache: equal to the uncached one, and every key cached.
  {
    const int B = 4, L = 19;
    std::vector<int32_t> canvas = random_tokens(rng, L, spec.vocab);
    auto cache = model->make_kv_cache(L);
    const std::vector<float> got = run_block(*model, canvas, all_rows(L), B, cache.get());
    report(got == run_block(*model, canvas, all_rows(L), B) && cache->cached_until() == L,
           "block-causal: a whole-canvas forward through a cache equals the uncached one and caches every key");
  }
  std::vector<int32_t> canvas = random_tokens(rng, 8, spec.vocab);
  expect_error("block-causal: a negative attention_block is refused", ErrorCode::InvalidArgument, {"attention_block"},
               [&] { run_block(*model, canvas, {0}, -1); });
}

// ------------------------------------------------------------------------------------------------
// config.json of the new families

using Keys = std::vector<std::pair<std::string, std::string>>;

// A JSON object from (key, JSON text) pairs, with `changes` applied: a key in changes replaces the
// value of the same key (an empty text drops it); new keys are appended.
std::string config_text_of(const Keys& base, const Keys& changes = {}) {
  Keys keys = base;
  for (const auto& [k, v] : changes) {
    auto it = std::find_if(keys.begin(), keys.end(), [&k](const auto& kv) { return kv.first == k; });
    if (it == keys.end()) keys.push_back({k, v});
    else it->second = v;
  }
  std::string out = "{";
  for (const auto& [k, v] : keys)
    if (!v.empty()) out += (out.size() > 1 ? ", \"" : "\"") + k + "\": " + v;
  return out + "}";
}

// LLaDA2.1-mini's config.json keys (spec A1), without mask_token_id and block_size (the defaults apply).
std::string llada2_mini_config(const Keys& changes = {}) {
  const Keys keys = {
      {"architectures", "[\"LLaDA2MoeModelLM\"]"},
      {"model_type", "\"llada2_moe\""},
      {"hidden_size", "2048"},
      {"num_hidden_layers", "20"},
      {"num_attention_heads", "16"},
      {"num_key_value_heads", "4"},
      {"head_dim", "128"},
      {"intermediate_size", "5120"},
      {"moe_intermediate_size", "512"},
      {"num_experts", "256"},
      {"num_experts_per_tok", "8"},
      {"num_shared_experts", "1"},
      {"first_k_dense_replace", "1"},
      {"n_group", "8"},
      {"topk_group", "4"},
      {"routed_scaling_factor", "2.5"},
      {"score_function", "\"sigmoid\""},
      {"moe_router_enable_expert_bias", "true"},
      {"norm_topk_prob", "true"},
      {"router_dtype", "\"fp32\""},
      {"vocab_size", "157184"},
      {"rope_theta", "600000"},
      {"partial_rotary_factor", "0.5"},
      {"rope_scaling", "null"},
      {"rms_norm_eps", "1e-06"},
      {"max_position_embeddings", "32768"},
      {"use_qkv_bias", "false"},
      {"use_bias", "false"},
      {"use_qk_norm", "true"},
      {"tie_word_embeddings", "false"},
      {"pad_token_id", "156892"},
      {"eos_token_id", "156892"},
      {"use_sliding_window", "false"},
      {"sliding_window", "4096"},
  };
  return config_text_of(keys, changes);
}

// SDAR-4B-Chat's config.json keys (spec B1), with the stop ids as a list.
std::string sdar_4b_config(const Keys& changes = {}) {
  const Keys keys = {
      {"architectures", "[\"SDARForCausalLM\"]"},
      {"model_type", "\"sdar\""},
      {"hidden_size", "2560"},
      {"num_hidden_layers", "36"},
      {"num_attention_heads", "32"},
      {"num_key_value_heads", "8"},
      {"head_dim", "128"},
      {"intermediate_size", "9728"},
      {"vocab_size", "151936"},
      {"rope_theta", "1000000"},
      {"rms_norm_eps", "1e-06"},
      {"max_position_embeddings", "32768"},
      {"tie_word_embeddings", "false"},
      {"attention_bias", "false"},
      {"rope_scaling", "null"},
      {"use_sliding_window", "false"},
      {"hidden_act", "\"silu\""},
      {"bos_token_id", "151643"},
      {"eos_token_id", "[151645, 151643]"},
  };
  return config_text_of(keys, changes);
}

const Keys sdar_moe_keys = {{"model_type", "\"sdar_moe\""},
                            {"architectures", "[\"SDARMoeForCausalLM\"]"},
                            {"num_experts", "128"},
                            {"num_experts_per_tok", "8"},
                            {"moe_intermediate_size", "768"}};

Keys plus(Keys a, const Keys& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

void test_family_configs() {
  const auto parse = [](const std::string& text) { return ModelConfig::from_json(Json::parse(text)); };
  {
    const ModelConfig c = parse(llada2_mini_config());
    const Family& f = family_of(c);
    const bool ok = c.model_type == "llada2_moe" && f.name == "llada2_moe" && c.decoding == Decoding::Block &&
                    c.block_length == 32 && c.mask_token_id == 156895 && c.eos_token_id == 156892 &&
                    c.stop_token_ids.empty() && c.d_model == 2048 && c.n_heads == 16 && c.n_kv_heads == 4 &&
                    c.head_dim() == 128 && c.rope_dims() == 64 && c.rotary_dim == 64 && c.qk_norm &&
                    c.mlp_hidden_size == 5120 && c.moe_hidden_size == 512 && c.n_experts == 256 &&
                    c.experts_per_token == 8 && c.n_shared_experts == 1 && c.first_k_dense == 1 && c.n_group == 8 &&
                    c.topk_group == 4 && c.routed_scaling_factor == 2.5 && c.router == RouterKind::GroupedSigmoid &&
                    c.expert_bias && !c.moe_layer(0) && c.moe_layer(1) && c.moe_layer(19) && c.rope_theta == 600000 &&
                    c.max_sequence_length == 32768 && !c.weight_tying && c.vocab_size == 157184 &&
                    c.embedding_size == 157184 && f.editing && f.default_block_length == 32 && !f.shifted_logits;
    report(ok,
           "family config: LLaDA2.1-mini parses (partial rotary 64 of 128, groups, defaults mask 156895, block 32)");
    const ModelConfig d = parse(llada2_mini_config(
        {{"partial_rotary_factor", ""}, {"rotary_dim", "64"}, {"block_size", "64"}, {"mask_token_id", "7"}}));
    report(d.rotary_dim == 64 && d.block_length == 64 && d.mask_token_id == 7,
           "family config: rotary_dim, block_size and mask_token_id keys override the defaults");
    const ModelConfig a = parse(llada2_mini_config({{"model_type", ""}}));
    report(a.model_type == "llada2_moe", "family config: \"architectures\" names the family without model_type");
  }
  {
    const ModelConfig c = parse(sdar_4b_config());
    const Family& f = family_of(c);
    const bool ok = c.model_type == "sdar" && c.decoding == Decoding::Block && c.block_length == 4 &&
                    c.mask_token_id == 151669 && c.eos_token_id == 151645 &&
                    c.stop_token_ids == std::vector<int>{151643} && c.d_model == 2560 && c.head_dim() == 128 &&
                    c.n_heads * c.head_dim() == 4096 && c.rope_dims() == 128 && c.qk_norm && c.n_experts == 0 &&
                    !c.moe_layer(0) && c.mlp_hidden_size == 9728 && !f.editing && c.rms_norm_eps == 1e-6 &&
                    c.router == RouterKind::None;
    report(ok, "family config: SDAR-4B parses (head_dim 128 != hidden/heads, eos list, defaults mask 151669, block 4)");
    const ModelConfig m = parse(sdar_4b_config(plus(
        sdar_moe_keys, {{"norm_topk_prob", "true"}, {"decoder_sparse_step", "1"}, {"mlp_only_layers", "[0, 5]"}})));
    report(m.model_type == "sdar_moe" && m.router == RouterKind::Softmax && m.n_experts == 128 &&
               m.experts_per_token == 8 && m.norm_topk_prob && !m.moe_layer(0) && m.moe_layer(1) && !m.moe_layer(5) &&
               m.moe_layer(35) && m.n_shared_experts == 0 && m.block_length == 4 && m.mask_token_id == 151669,
           "family config: SDAR-MoE parses (softmax router, mlp_only_layers dense)");
    const ModelConfig all_moe = parse(sdar_4b_config(plus(sdar_moe_keys, {{"intermediate_size", ""}})));
    report(!all_moe.norm_topk_prob && all_moe.moe_layer(0) && all_moe.mlp_hidden_size == 0,
           "family config: SDAR-MoE defaults (every layer MoE, no dense width needed, norm_topk_prob false as "
           "Qwen3-MoE)");
    const ModelConfig arch = parse(sdar_4b_config({{"model_type", ""}}));
    report(arch.model_type == "sdar", "family config: SDARForCausalLM names sdar");
  }
  {
    const ModelConfig c = parse(
        "{\"model_type\": \"llada\", \"d_model\": 32, \"n_heads\": 4, \"n_layers\": 1, \"mlp_hidden_size\": 8, "
        "\"vocab_size\": 10, \"mask_token_id\": 9, \"eos_token_id\": 8}");
    report(c.model_type == "llada" && c.decoding == Decoding::FullCanvas && c.block_length == 0 &&
               family_of(c).name == "llada" && c.n_experts == 0 && !c.qk_norm && c.rope_dims() == 8,
           "family config: llada stays full-canvas with LLaDA's keys");
  }
  const auto bad = [&](const std::string& name, const std::string& text, std::vector<std::string> needles) {
    expect_error("family config error: " + name, ErrorCode::InvalidModel, needles, [&] { parse(text); });
  };
  bad("unknown model_type", sdar_4b_config({{"model_type", "\"mamba\""}}),
      {"unknown \"model_type\" \"mamba\"", "llada2_moe", "sdar", "dream"});
  bad("unknown architectures", "{\"architectures\": [\"MambaForCausalLM\"], \"d_model\": 8}", {"MambaForCausalLM"});
  bad("model_type not a string", "{\"model_type\": 3}", {"\"model_type\""});
  bad("missing hidden_size", llada2_mini_config({{"hidden_size", ""}}), {"\"hidden_size\""});
  bad("missing num_experts", llada2_mini_config({{"num_experts", ""}}), {"\"num_experts\""});
  bad("missing eos_token_id", llada2_mini_config({{"eos_token_id", ""}}), {"\"eos_token_id\""});
  bad("missing intermediate_size with a dense layer", llada2_mini_config({{"intermediate_size", ""}}),
      {"\"intermediate_size\""});
  bad("partial rotary disagreeing with rotary_dim", llada2_mini_config({{"rotary_dim", "32"}}),
      {"\"rotary_dim\"", "\"partial_rotary_factor\""});
  bad("odd rotary_dim", llada2_mini_config({{"partial_rotary_factor", ""}, {"rotary_dim", "63"}}),
      {"\"rotary_dim\"", "even"});
  bad("rotary_dim above head_dim", llada2_mini_config({{"partial_rotary_factor", ""}, {"rotary_dim", "256"}}),
      {"\"rotary_dim\"", "at most"});
  bad("odd head_dim", sdar_4b_config({{"head_dim", "127"}}), {"\"head_dim\"", "even"});
  bad("heads not divisible by kv heads", sdar_4b_config({{"num_key_value_heads", "5"}}),
      {"\"num_attention_heads\"", "\"num_key_value_heads\""});
  bad("top-k above experts", llada2_mini_config({{"num_experts_per_tok", "300"}}), {"\"num_experts_per_tok\""});
  bad("n_group not dividing experts", llada2_mini_config({{"n_group", "7"}}), {"\"n_group\"", "divide"});
  bad("topk_group above n_group", llada2_mini_config({{"topk_group", "9"}}), {"\"topk_group\""});
  bad("top-k above the kept groups' experts", llada2_mini_config({{"topk_group", "1"}, {"num_experts_per_tok", "40"}}),
      {"\"num_experts_per_tok\"", "\"topk_group\""});
  bad("softmax score function for llada2", llada2_mini_config({{"score_function", "\"softmax\""}}),
      {"\"score_function\""});
  bad("qkv bias", llada2_mini_config({{"use_qkv_bias", "true"}}), {"\"use_qkv_bias\"", "not supported"});
  bad("attention bias", sdar_4b_config({{"attention_bias", "true"}}), {"\"attention_bias\""});
  bad("rope scaling", sdar_4b_config({{"rope_scaling", "{\"type\": \"yarn\"}"}}), {"\"rope_scaling\""});
  bad("sliding window", sdar_4b_config({{"use_sliding_window", "true"}}), {"\"use_sliding_window\""});
  bad("block_size 0", sdar_4b_config({{"block_size", "0"}}), {"\"block_size\""});
  bad("eos list with a bad entry", sdar_4b_config({{"eos_token_id", "[151645, \"x\"]"}}), {"\"eos_token_id\""});
  bad("eos list empty", sdar_4b_config({{"eos_token_id", "[]"}}), {"\"eos_token_id\"", "empty"});
  bad("default mask id outside a small vocabulary", sdar_4b_config({{"vocab_size", "150000"}}),
      {"\"mask_token_id\" = 151669", "outside the vocabulary"});
  bad("mlp_only_layers naming a missing layer", sdar_4b_config(plus(sdar_moe_keys, {{"mlp_only_layers", "[40]"}})),
      {"\"mlp_only_layers\"", "40"});
  bad("shared experts on SDAR-MoE", sdar_4b_config(plus(sdar_moe_keys, {{"shared_expert_intermediate_size", "64"}})),
      {"\"shared_expert_intermediate_size\""});
}

// ------------------------------------------------------------------------------------------------
// Tiny random models of each family, and their forward in float64

struct FamSpec {
  std::string type;  // llada2_moe | sdar | sdar_moe
  int d_model = 32, n_heads = 4, n_kv_heads = 2, head_dim = 16, n_layers = 3, hidden = 64, vocab = 60;
  int rotary_dim = 0;  // 0: whole head
  int experts = 0, top_k = 0, moe_hidden = 32, shared = 0, first_dense = 0, n_group = 1, topk_group = 1;
  double scaling = 1.0;
  bool norm_topk = true, expert_bias = false, tied = false;
  std::vector<int> mlp_only;
  double theta = 10000.0, eps = 1e-6;
  int max_len = 512;
};

struct FamModel {
  FamSpec spec;
  std::map<std::string, Values> tensors;
  std::map<std::string, std::vector<int64_t>> shapes;
  bool moe_layer(int i) const {
    if (spec.experts == 0 || i < spec.first_dense) return false;
    return std::find(spec.mlp_only.begin(), spec.mlp_only.end(), i) == spec.mlp_only.end();
  }
};

FamModel make_family_model(const FamSpec& s, WType type, uint32_t seed) {
  FamModel m;
  m.spec = s;
  std::mt19937 rng(seed);
  const int D = s.d_model, hd = s.head_dim;
  const auto add = [&](const std::string& name, std::vector<int64_t> shape, double scale, bool norm = false,
                       WType as = WType::F32, bool keep_type = false) {
    size_t n = 1;
    for (auto d : shape) n *= d;
    const WType t = keep_type ? as : type;
    Values v = random_values(t, n, rng, scale);
    if (norm) {  // norm weights near 1 (f32 or bf16 here)
      for (size_t i = 0; i < n; ++i) {
        const float f = 1.0f + static_cast<float>(v.exact[i]);
        if (t == WType::F32) v.f32[i] = f, v.exact[i] = f;
        else v.half[i] = f32_to_bf16_bits(f), v.exact[i] = cpu::bf16_to_f32(v.half[i]);
      }
    }
    m.tensors[name] = std::move(v);
    m.shapes[name] = shape;
  };
  const bool llada2 = s.type == "llada2_moe";
  const std::string l0 = "model.layers.";
  add(llada2 ? "model.word_embeddings.weight" : "model.embed_tokens.weight", {s.vocab, D}, 1.0);
  const double in_scale = 1.0 / std::sqrt(D);
  for (int i = 0; i < s.n_layers; ++i) {
    const std::string l = l0 + std::to_string(i) + ".";
    add(l + "input_layernorm.weight", {D}, 0.1, true);
    add(l + "post_attention_layernorm.weight", {D}, 0.1, true);
    if (llada2) {
      add(l + "attention.query_key_value.weight", {(s.n_heads + 2 * s.n_kv_heads) * hd, D}, 2 * in_scale);
      add(l + "attention.query_layernorm.weight", {hd}, 0.1, true);
      add(l + "attention.key_layernorm.weight", {hd}, 0.1, true);
      add(l + "attention.dense.weight", {D, s.n_heads * hd}, 1.0 / std::sqrt(s.n_heads * hd));
    } else {
      add(l + "self_attn.q_proj.weight", {s.n_heads * hd, D}, 2 * in_scale);
      add(l + "self_attn.k_proj.weight", {s.n_kv_heads * hd, D}, 2 * in_scale);
      add(l + "self_attn.v_proj.weight", {s.n_kv_heads * hd, D}, in_scale);
      add(l + "self_attn.q_norm.weight", {hd}, 0.1, true);
      add(l + "self_attn.k_norm.weight", {hd}, 0.1, true);
      add(l + "self_attn.o_proj.weight", {D, s.n_heads * hd}, 1.0 / std::sqrt(s.n_heads * hd));
    }
    const auto mlp = [&](const std::string& p, int width) {
      add(p + "gate_proj.weight", {width, D}, in_scale);
      add(p + "up_proj.weight", {width, D}, in_scale);
      add(p + "down_proj.weight", {D, width}, 1.0 / std::sqrt(width));
    };
    if (!m.moe_layer(i)) {
      mlp(l + "mlp.", s.hidden);
      continue;
    }
    add(l + "mlp.gate.weight", {s.experts, D}, 2 * in_scale);
    // The bias (f32, as sglang keeps it) is large enough to change which experts are chosen.
    if (s.expert_bias) add(l + "mlp.gate.expert_bias", {s.experts}, 0.3, false, WType::F32, true);
    for (int e = 0; e < s.experts; ++e) mlp(l + "mlp.experts." + std::to_string(e) + ".", s.moe_hidden);
    if (s.shared > 0) mlp(l + "mlp.shared_experts.", s.moe_hidden * s.shared);
  }
  add("model.norm.weight", {D}, 0.1, true);
  if (!s.tied) add("lm_head.weight", {s.vocab, D}, 3 * in_scale);
  return m;
}

std::string family_config_json(const FamSpec& s) {
  std::ostringstream o;
  o.precision(17);
  o << "{\"model_type\": \"" << s.type << "\", \"hidden_size\": " << s.d_model
    << ", \"num_hidden_layers\": " << s.n_layers << ", \"num_attention_heads\": " << s.n_heads
    << ", \"num_key_value_heads\": " << s.n_kv_heads << ", \"head_dim\": " << s.head_dim
    << ", \"intermediate_size\": " << s.hidden << ", \"vocab_size\": " << s.vocab << ", \"rope_theta\": " << s.theta
    << ", \"rms_norm_eps\": " << s.eps << ", \"max_position_embeddings\": " << s.max_len
    << ", \"tie_word_embeddings\": " << (s.tied ? "true" : "false") << ", \"mask_token_id\": " << s.vocab - 1
    << ", \"eos_token_id\": [" << s.vocab - 2 << ", " << s.vocab - 3 << "]";
  if (s.rotary_dim > 0) o << ", \"partial_rotary_factor\": " << static_cast<double>(s.rotary_dim) / s.head_dim;
  if (s.experts > 0) {
    o << ", \"num_experts\": " << s.experts << ", \"num_experts_per_tok\": " << s.top_k
      << ", \"moe_intermediate_size\": " << s.moe_hidden
      << ", \"norm_topk_prob\": " << (s.norm_topk ? "true" : "false");
    if (s.type == "llada2_moe")
      o << ", \"num_shared_experts\": " << s.shared << ", \"first_k_dense_replace\": " << s.first_dense
        << ", \"n_group\": " << s.n_group << ", \"topk_group\": " << s.topk_group
        << ", \"routed_scaling_factor\": " << s.scaling << ", \"score_function\": \"sigmoid\""
        << ", \"moe_router_enable_expert_bias\": " << (s.expert_bias ? "true" : "false") << ", \"use_qk_norm\": true";
    else {
      o << ", \"mlp_only_layers\": [";
      for (size_t i = 0; i < s.mlp_only.size(); ++i) o << (i ? ", " : "") << s.mlp_only[i];
      o << "]";
    }
  }
  o << "}";
  return o.str();
}

void write_family_model(const fs::path& dir, const FamModel& m, const std::string& skip = "") {
  fs::create_directories(dir);
  write_file(dir / "config.json", family_config_json(m.spec));
  std::vector<TensorSpec> specs;
  for (const auto& [name, v] : m.tensors) {
    if (name == skip) continue;
    specs.push_back({name,
                     v.type == WType::F32    ? "F32"
                     : v.type == WType::BF16 ? "BF16"
                                             : "F16",
                     m.shapes.at(name), v.raw()});
  }
  write_file(dir / "model.safetensors", safetensors_bytes(specs));
}

// What the float64 reference saw of the routing: tokens whose choice the group limit (resp. the bias)
// changed, against a plain top-k over all experts (resp. over the unbiased scores).
struct RoutingStats {
  int routed = 0, group_changed = 0, bias_changed = 0;
};

// The forward of every family in float64, as plainly as possible: logits [L][vocab] of the canvas under
// block-causal attention with blocks of B (0: bidirectional).
std::vector<std::vector<double>> family_reference(const FamModel& m, const std::vector<int32_t>& tokens, int B,
                                                  RoutingStats* stats = nullptr) {
  const FamSpec& s = m.spec;
  const bool llada2 = s.type == "llada2_moe";
  const int L = static_cast<int>(tokens.size()), D = s.d_model, hd = s.head_dim;
  const int rd = s.rotary_dim > 0 ? s.rotary_dim : hd;
  const auto W = [&](const std::string& name) -> const std::vector<double>& { return m.tensors.at(name).exact; };
  const auto rms = [&](const double* x, int n, const std::vector<double>& w) {
    double ss = 0;
    for (int i = 0; i < n; ++i) ss += x[i] * x[i];
    const double r = 1.0 / std::sqrt(ss / n + s.eps);
    std::vector<double> y(n);
    for (int i = 0; i < n; ++i) y[i] = x[i] * r * w[i];
    return y;
  };
  // Rows [r0, r0 + rows) of matrix `name` times x: a projection, expert or head, so a bf16 one is the bf16
  // dot product (reference_matvec). Not the router: see below.
  const auto matvec = [&](const std::string& name, const std::vector<double>& x, int rows, int r0 = 0) {
    return reference_matvec(m.tensors.at(name), x, rows, r0);
  };
  const auto swiglu = [&](const std::string& p, const std::vector<double>& x, int width) {
    auto g = matvec(p + "gate_proj.weight", x, width), u = matvec(p + "up_proj.weight", x, width);
    for (int i = 0; i < width; ++i) g[i] = g[i] / (1.0 + std::exp(-g[i])) * u[i];
    return matvec(p + "down_proj.weight", g, D);
  };
  const auto top = [](const std::vector<double>& score, const std::vector<bool>& allowed, int k) {
    std::vector<int> idx;
    for (int i = 0; i < static_cast<int>(score.size()); ++i)
      if (allowed[i]) idx.push_back(i);
    std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) { return score[a] > score[b]; });
    idx.resize(k);
    return idx;
  };
  const std::string embed = llada2 ? "model.word_embeddings.weight" : "model.embed_tokens.weight";
  std::vector<std::vector<double>> x(L);
  for (int t = 0; t < L; ++t) x[t].assign(W(embed).begin() + tokens[t] * D, W(embed).begin() + (tokens[t] + 1) * D);
  for (int layer = 0; layer < s.n_layers; ++layer) {
    const std::string l = "model.layers." + std::to_string(layer) + ".";
    std::vector<std::vector<double>> q(L), k(L), v(L);
    for (int t = 0; t < L; ++t) {
      const auto n = rms(x[t].data(), D, W(l + "input_layernorm.weight"));
      if (llada2) {
        const std::string qkv = l + "attention.query_key_value.weight";
        q[t] = matvec(qkv, n, s.n_heads * hd);
        k[t] = matvec(qkv, n, s.n_kv_heads * hd, s.n_heads * hd);
        v[t] = matvec(qkv, n, s.n_kv_heads * hd, (s.n_heads + s.n_kv_heads) * hd);
      } else {
        q[t] = matvec(l + "self_attn.q_proj.weight", n, s.n_heads * hd);
        k[t] = matvec(l + "self_attn.k_proj.weight", n, s.n_kv_heads * hd);
        v[t] = matvec(l + "self_attn.v_proj.weight", n, s.n_kv_heads * hd);
      }
      const auto& qn = W(l + (llada2 ? "attention.query_layernorm.weight" : "self_attn.q_norm.weight"));
      const auto& kn = W(l + (llada2 ? "attention.key_layernorm.weight" : "self_attn.k_norm.weight"));
      const auto norm_rope = [&](std::vector<double>& vec, int heads, const std::vector<double>& w) {
        for (int h = 0; h < heads; ++h) {
          const auto y = rms(vec.data() + h * hd, hd, w);
          std::copy(y.begin(), y.end(), vec.begin() + h * hd);
          for (int i = 0; i < rd / 2; ++i) {
            const double angle = t * std::pow(s.theta, -2.0 * i / rd);
            const double a = vec[h * hd + i], c = vec[h * hd + i + rd / 2];
            vec[h * hd + i] = a * std::cos(angle) - c * std::sin(angle);
            vec[h * hd + i + rd / 2] = c * std::cos(angle) + a * std::sin(angle);
          }
        }
      };
      norm_rope(q[t], s.n_heads, qn);
      norm_rope(k[t], s.n_kv_heads, kn);
    }
    for (int t = 0; t < L; ++t) {
      const int keys = B > 0 ? std::min(L, (t / B + 1) * B) : L;
      std::vector<double> att(s.n_heads * hd, 0.0);
      for (int h = 0; h < s.n_heads; ++h) {
        const int kvh = h / (s.n_heads / s.n_kv_heads);
        std::vector<double> score(keys);
        double max = -INFINITY, sum = 0;
        for (int j = 0; j < keys; ++j) {
          double dot = 0;
          for (int i = 0; i < hd; ++i) dot += q[t][h * hd + i] * k[j][kvh * hd + i];
          score[j] = dot / std::sqrt(static_cast<double>(hd));
          max = std::max(max, score[j]);
        }
        for (double& sc : score) sum += (sc = std::exp(sc - max));
        for (int j = 0; j < keys; ++j)
          for (int i = 0; i < hd; ++i) att[h * hd + i] += score[j] / sum * v[j][kvh * hd + i];
      }
      const auto o = matvec(l + (llada2 ? "attention.dense.weight" : "self_attn.o_proj.weight"), att, D);
      for (int i = 0; i < D; ++i) x[t][i] += o[i];
    }
    for (int t = 0; t < L; ++t) {
      const auto n = rms(x[t].data(), D, W(l + "post_attention_layernorm.weight"));
      std::vector<double> y(D, 0.0);
      if (!m.moe_layer(layer)) {
        y = swiglu(l + "mlp.", n, s.hidden);
      } else {
        const int E = s.experts;
        // The router: f32 logits from the widened weight whatever its type (the engine's router Weight has
        // bf16_dot = false, as the LLaDA2 / Qwen3-MoE references compute it), so no rounding of n.
        const auto logits = reference_matvec(W(l + "mlp.gate.weight"), RefActivations::Exact, n, E);
        std::vector<int> chosen;
        std::vector<double> weight;
        std::vector<bool> all(E, true);
        if (llada2) {  // grouped sigmoid: bias for the choice, group-limited, unbiased weights
          std::vector<double> sc(E), biased(E);
          for (int e = 0; e < E; ++e) {
            sc[e] = 1.0 / (1.0 + std::exp(-logits[e]));
            biased[e] = sc[e] + (s.expert_bias ? W(l + "mlp.gate.expert_bias")[e] : 0.0);
          }
          const int per = E / s.n_group;
          std::vector<double> group_score(s.n_group);
          for (int g = 0; g < s.n_group; ++g) {
            std::vector<double> in(biased.begin() + g * per, biased.begin() + (g + 1) * per);
            std::sort(in.rbegin(), in.rend());
            group_score[g] = in[0] + in[1];
          }
          const auto groups = top(group_score, std::vector<bool>(s.n_group, true), s.topk_group);
          std::vector<bool> allowed(E, false);
          for (int g : groups)
            for (int e = g * per; e < (g + 1) * per; ++e) allowed[e] = true;
          chosen = top(biased, allowed, s.top_k);
          double sum = 0;
          for (int e : chosen) sum += sc[e];
          for (int e : chosen) weight.push_back(sc[e] / (sum + 1e-20) * s.scaling);
          if (stats) {
            auto sorted = [](std::vector<int> v) { return std::sort(v.begin(), v.end()), v; };
            stats->routed++;
            stats->group_changed += sorted(top(biased, all, s.top_k)) != sorted(chosen);
            stats->bias_changed += sorted(top(sc, allowed, s.top_k)) != sorted(chosen);
          }
        } else {  // softmax top-k, renormalised
          std::vector<double> p(E);
          const double mx = *std::max_element(logits.begin(), logits.end());
          double sum = 0;
          for (int e = 0; e < E; ++e) sum += (p[e] = std::exp(logits[e] - mx));
          for (double& pe : p) pe /= sum;
          chosen = top(p, all, s.top_k);
          double chosen_sum = 0;
          for (int e : chosen) chosen_sum += p[e];
          for (int e : chosen) weight.push_back(s.norm_topk ? p[e] / chosen_sum : p[e]);
          if (stats) stats->routed++;
        }
        for (size_t j = 0; j < chosen.size(); ++j) {
          const auto out = swiglu(l + "mlp.experts." + std::to_string(chosen[j]) + ".", n, s.moe_hidden);
          for (int i = 0; i < D; ++i) y[i] += weight[j] * out[i];
        }
        if (s.shared > 0) {
          const auto out = swiglu(l + "mlp.shared_experts.", n, s.moe_hidden * s.shared);
          for (int i = 0; i < D; ++i) y[i] += out[i];
        }
      }
      for (int i = 0; i < D; ++i) x[t][i] += y[i];
    }
  }
  // The head (a tied one: the embedding's matrix, bf16 in a bf16 model); an overriding `head` is a quantized
  // one, whose activations are int8.
  const Values& head_v = m.tensors.at(s.tied ? embed : "lm_head.weight");
  std::vector<std::vector<double>> logits(L);
  for (int t = 0; t < L; ++t)
    logits[t] = reference_matvec(head_v, rms(x[t].data(), D, W("model.norm.weight")), s.vocab);
  return logits;
}

// The largest |got - reference| over rows x vocab, and the largest |reference|.
std::pair<double, double> compare(const std::vector<float>& got, const std::vector<std::vector<double>>& ref,
                                  const std::vector<int32_t>& rows, int V) {
  double worst = got.size() == rows.size() * V ? 0 : INFINITY, scale = 0;
  for (size_t r = 0; r < rows.size() && got.size() == rows.size() * V; ++r)
    for (int e = 0; e < V; ++e) {
      worst = std::max(worst, std::fabs(got[r * V + e] - ref[rows[r]][e]));
      scale = std::max(scale, std::fabs(ref[rows[r]][e]));
    }
  return {worst, scale};
}

// Whether LoadOptions::quantize (and vdiff quantize) quantizes a family tensor: the projections, experts
// and shared experts (in-features a multiple of 32); not the embedding, head, norms, router or bias.
bool quantized_at_load(const std::string& name, const std::vector<int64_t>& shape) {
  return shape.size() == 2 && shape[1] % 32 == 0 && name.find("embed") == std::string::npos &&
         name.find("mlp.gate.weight") == std::string::npos && name != "lm_head.weight";
}

// `m` with the matrices quantized at load replaced by their dequantized values (in the basis of their
// Hadamard rotation, as quantizing at load rotates them).
FamModel dequantized(const FamModel& m, cpu::QType type) {
  FamModel out = m;
  // Into v: the dequantized values of `exact` [rows, cols], flagged for the references.
  const auto dequant = [&](const std::vector<double>& exact, int rows, int cols, Values& v) {
    std::vector<uint8_t> blocks(cols);
    std::vector<uint16_t> scales(cols / 32);
    v.exact.assign(exact.size(), 0.0);
    for (int r = 0; r < rows; ++r) {
      const auto row = exact.begin() + static_cast<size_t>(r) * cols;
      v.rotation = quantize_row_rotated(std::vector<float>(row, row + cols), type, cpu::weight_rotation(type, cols) > 0,
                                        blocks.data(), scales.data());
      const cpu::QMatB B{blocks.data(), scales.data(), type, cols, cols / 32};
      for (int c = 0; c < cols; ++c) v.exact[static_cast<size_t>(r) * cols + c] = cpu::qweight_value(B, 0, c);
    }
    // Quantized weights multiply int8 activations (no bf16 dot product): an f32 matrix of the dequantized
    // values.
    v.type = WType::F32;
    v.int8_activations = true;
    v.f32.assign(v.exact.begin(), v.exact.end());
    v.half.clear();
  };
  for (auto& [name, v] : out.tensors) {
    const std::vector<int64_t>& shape = m.shapes.at(name);
    if (!quantized_at_load(name, shape)) continue;
    dequant(std::vector<double>(v.exact), static_cast<int>(shape[0]), static_cast<int>(shape[1]), v);
  }
  return out;
}

// Writes `m` quantized as vdiff quantize writes it: the matrices quantized at load, rotated as there (the
// metadata says so) and stored as I8 (Q8_0) / U8 (Q4_0) blocks plus F16 "_scale"s — LLaDA2's fused QKV as
// one quantized matrix, read back as row views.
void write_family_quantized(const fs::path& dir, const FamModel& m, cpu::QType type) {
  const bool rotated = cpu::weight_rotation(type, 32) > 0;
  fs::create_directories(dir);
  write_file(dir / "config.json", family_config_json(m.spec));
  std::vector<TensorSpec> specs;
  for (const auto& [name, v] : m.tensors) {
    const std::vector<int64_t>& shape = m.shapes.at(name);
    if (!quantized_at_load(name, shape)) {
      specs.push_back({name, v.type == WType::F32 ? "F32" : "BF16", shape, v.raw()});
      continue;
    }
    const int rows = static_cast<int>(shape[0]), cols = static_cast<int>(shape[1]);
    const int row_bytes = cols / 32 * cpu::qblock_bytes(type);
    std::string blocks(static_cast<size_t>(rows) * row_bytes, '\0');
    std::vector<uint16_t> scales(static_cast<size_t>(rows) * cols / 32);
    std::vector<float> row(cols);
    for (int r = 0; r < rows; ++r) {
      for (int c = 0; c < cols; ++c) row[c] = static_cast<float>(v.exact[static_cast<size_t>(r) * cols + c]);
      quantize_row_rotated(row, type, rotated, reinterpret_cast<uint8_t*>(blocks.data()) + r * row_bytes,
                           scales.data() + static_cast<size_t>(r) * cols / 32);
    }
    specs.push_back({name, type == cpu::QType::Q8_0 ? "I8" : "U8", {rows, row_bytes}, blocks});
    specs.push_back({name + "_scale",
                     "F16",
                     {rows, cols / 32},
                     std::string(reinterpret_cast<const char*>(scales.data()), scales.size() * 2)});
  }
  write_file(dir / "model.safetensors", safetensors_bytes(specs, rotated ? ",\"vdiff.rotation\":\"hadamard\"" : ""));
}

struct FamilyCase {
  std::string name;
  FamSpec spec;
  int block;
};

// Forward of each family against the float64 reference (f32 and bf16 weights; Q8_0 and Q4_0 experts and
// projections against the dequantized reference), block-causal cached reads against the full forward bit
// for bit, and a mixed batch against each sequence alone.
void test_family_forward() {
  std::vector<FamilyCase> cases;
  {
    FamSpec s;  // LLaDA2: fused QKV, head_dim 16 != 32/4, partial rotary 8 of 16, GQA 4/2, layer 0 dense,
                // 8 experts in 4 groups (2 kept), top-3, bias, shared expert, scaling 2.5
    s.type = "llada2_moe";
    s.rotary_dim = 8;
    s.experts = 8, s.top_k = 3, s.shared = 1, s.first_dense = 1, s.n_group = 4, s.topk_group = 2;
    s.scaling = 2.5, s.expert_bias = true, s.theta = 600000.0;
    cases.push_back({"llada2_moe", s, 4});
  }
  {
    FamSpec s;  // SDAR: Qwen3 dense, QK-norm, full rotary, head_dim 16 != 32/4, GQA 4/2
    s.type = "sdar", s.n_layers = 2, s.theta = 1000000.0;
    cases.push_back({"sdar", s, 4});
  }
  {
    FamSpec s;  // SDAR-MoE: softmax top-2 of 6, renormalised; layer 1 dense (mlp_only_layers); tied head
    s.type = "sdar_moe", s.n_layers = 3, s.experts = 6, s.top_k = 2, s.mlp_only = {1}, s.tied = true;
    s.n_heads = 4, s.n_kv_heads = 1;
    cases.push_back({"sdar_moe", s, 8});
  }
  TempDir tmp;
  std::mt19937 rng(77);
  for (const FamilyCase& fc : cases) {
    const FamSpec& s = fc.spec;
    const int V = s.vocab, B = fc.block;
    for (WType type : {WType::F32, WType::BF16}) {
      const std::string tag = fc.name + " (" + type_name(type) + ")";
      const FamModel m = make_family_model(
          s, type, static_cast<uint32_t>(1000 + 7 * (&fc - cases.data())) + (type == WType::F32 ? 0 : 1));
      const fs::path dir = tmp.path / (fc.name + "-" + type_name(type));
      write_family_model(dir, m);
      auto model = Backend::load(dir.string(), test_options(2));
      const int L = 5 * B + 3;  // the last block is cut short
      const std::vector<int32_t> canvas = random_tokens(rng, L, V);
      RoutingStats stats;
      const auto ref = family_reference(m, canvas, B, &stats);
      const std::vector<float> full = run_block(*model, canvas, all_rows(L), B);
      const std::string bound = type == WType::BF16 ? ", " + logit_bound_text(type, 2e-5) : "";
      const LogitErrors e = logit_errors(full, ref, all_rows(L), V);
      report(logits_within(e, type, 2e-5), tag + ": block-causal forward equals the float64 reference" + bound,
             logit_errors_text(e));
      if (type == WType::F32 && s.experts > 0 && s.type == "llada2_moe")
        report(stats.group_changed > 0 && stats.bias_changed > 0,
               tag + ": the reference's routing exercised the group limit and the bias",
               std::to_string(stats.group_changed) + " and " + std::to_string(stats.bias_changed) + " of " +
                   std::to_string(stats.routed) + " routings changed by them");
      // Bidirectional attention over the same canvas is the reference's B = 0.
      {
        const auto bi_ref = family_reference(m, canvas, 0);
        const LogitErrors e2 = logit_errors(run_forward(*model, {canvas}, {all_rows(L)}), bi_ref, all_rows(L), V);
        report(logits_within(e2, type, 2e-5), tag + ": bidirectional forward equals the float64 reference" + bound,
               logit_errors_text(e2));
      }
      // Cached: prefill two blocks, then block by block: the full forward's rows bit for bit.
      {
        auto cache = model->make_kv_cache(L);
        bool ok = run_block(*model, canvas, range_rows(0, 2 * B), B, cache.get(), 0, 2 * B) ==
                  select_rows(full, range_rows(0, 2 * B), V);
        for (int begin = 2 * B; begin < L; begin += B) {
          const int end = std::min(L, begin + B);
          ok = ok && run_block(*model, canvas, range_rows(begin, end), B, cache.get(), begin, end) ==
                         select_rows(full, range_rows(begin, end), V);
        }
        report(ok && cache->cached_until() == L,
               tag + ": prefill + block-by-block cached reads equal the full forward bit for bit");
      }
      // A batch mixing an uncached window, a cached block read and a bidirectional canvas: each sequence's
      // rows equal its forward alone (MoE routing and grouping do not leak between sequences).
      {
        const std::vector<int32_t> other = random_tokens(rng, 2 * B + 1, V);
        auto cache = model->make_kv_cache(L);
        run_block(*model, canvas, {}, B, cache.get(), 0, 3 * B);
        const std::vector<int32_t> r0 = range_rows(0, 2 * B), r1 = range_rows(3 * B, 4 * B),
                                   r2 = all_rows(other.size());
        std::vector<ForwardSeq> batch(3);
        batch[0] = {canvas.data(), L, r0.data(), static_cast<int>(r0.size()), nullptr, 0, 2 * B};
        batch[0].attention_block = B;
        batch[1] = {canvas.data(), L, r1.data(), static_cast<int>(r1.size()), cache.get(), 3 * B, 4 * B};
        batch[1].attention_block = B;
        batch[2] = {other.data(), static_cast<int>(other.size()), r2.data(), static_cast<int>(r2.size())};
        std::vector<float> got((r0.size() + r1.size() + r2.size()) * V);
        model->forward(batch, got.data());
        std::vector<float> want = select_rows(full, r0, V);
        const std::vector<float> want1 = select_rows(full, r1, V), want2 = run_forward(*model, {other}, {r2});
        want.insert(want.end(), want1.begin(), want1.end());
        want.insert(want.end(), want2.begin(), want2.end());
        report(got == want, tag + ": a mixed batch gives each sequence its own rows bit for bit");
      }
      if (type != WType::F32) continue;
      // More tokens than the MoE layer routes at once (1024): three canvases of 400 in one forward, each
      // sequence's rows as alone.
      if (s.experts > 0) {
        std::vector<std::vector<int32_t>> canvases, rows;
        for (int i = 0; i < 3; ++i) canvases.push_back(random_tokens(rng, 400, V)), rows.push_back({0, 199, 399});
        const std::vector<float> together = run_forward(*model, canvases, rows);
        std::vector<float> alone;
        for (int i = 0; i < 3; ++i) {
          const std::vector<float> one = run_forward(*model, {canvases[i]}, {rows[i]});
          alone.insert(alone.end(), one.begin(), one.end());
        }
        report(together == alone, tag + ": 1200 tokens in one forward (MoE routed in chunks) equal each canvas alone");
      }
      // Quantized at load: against the reference with the dequantized weights.
      for (cpu::QType q : {cpu::QType::Q8_0, cpu::QType::Q4_0}) {
        LoadOptions options = test_options(2);
        options.quantize = q == cpu::QType::Q8_0 ? Quant::Q8_0 : Quant::Q4_0;
        if (options.device != Device::Cpu) continue;
        auto qmodel = Backend::load(dir.string(), options);
        const FamModel dq = dequantized(m, q);
        const auto qref = family_reference(dq, canvas, B);
        const std::vector<float> got = run_block(*qmodel, canvas, all_rows(L), B);
        const auto [qw, qs] = compare(got, qref, all_rows(L), V);
        const double off = max_abs_diff(got, full);
        report(qmodel->weight_dtype() == cpu::qtype_name(q) && qw <= 2e-3 * qs && off > 10 * qw,
               tag + ": " + cpu::qtype_name(q) + " at load equals the dequantized reference",
               fmt("max |diff| %.2e (%.2e from the float model), max |logit| %.2f", qw, off, qs));
        // The same quantization stored in the checkpoint: the same logits, bit for bit.
        const fs::path qdir = tmp.path / (fc.name + "-stored-" + cpu::qtype_name(q));
        write_family_quantized(qdir, m, q);
        auto stored = Backend::load(qdir.string(), test_options(2));
        const std::vector<float> from_file = run_block(*stored, canvas, all_rows(L), B);
        const std::string what = tag + ": a " + cpu::qtype_name(q) + " checkpoint (vdiff quantize's layout" +
                                 (s.type == "llada2_moe" ? ", fused QKV quantized as one" : "") + ")";
        report(from_file == got && stored->weight_dtype() == cpu::qtype_name(q),
               what + " gives the logits of quantizing at load, bit for bit");
      }
    }
  }
}

// Checkpoints that do not match their config are refused naming the tensor.
void test_family_weights_errors() {
  TempDir tmp;
  FamSpec s;
  s.type = "llada2_moe";
  s.n_layers = 2, s.experts = 4, s.top_k = 2, s.shared = 1, s.first_dense = 1, s.n_group = 2, s.topk_group = 1;
  s.expert_bias = true;
  const FamModel m = make_family_model(s, WType::BF16, 3);
  const auto refuse = [&](const std::string& name, const std::string& skip, const std::string& needle) {
    const fs::path dir = tmp.path / name;
    write_family_model(dir, m, skip);
    expect_error("family weights: " + name, ErrorCode::InvalidModel, {needle},
                 [&] { Backend::load(dir.string(), test_options(1)); });
  };
  refuse("missing expert", "model.layers.1.mlp.experts.3.down_proj.weight",
         "model.layers.1.mlp.experts.3.down_proj.weight");
  refuse("missing expert bias", "model.layers.1.mlp.gate.expert_bias", "model.layers.1.mlp.gate.expert_bias");
  refuse("missing shared expert", "model.layers.1.mlp.shared_experts.up_proj.weight", "shared_experts.up_proj");
  refuse("missing fused qkv", "model.layers.0.attention.query_key_value.weight", "query_key_value");
  refuse("missing dense layer", "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.gate_proj.weight");
  // The same checkpoint loads (and a bf16 expert bias is read).
  FamModel bf = m;
  Values& bias = bf.tensors.at("model.layers.1.mlp.gate.expert_bias");
  Values b16;
  b16.type = WType::BF16;
  for (double x : bias.exact) b16.half.push_back(f32_to_bf16_bits(static_cast<float>(x)));
  for (uint16_t h : b16.half) b16.exact.push_back(cpu::bf16_to_f32(h));
  bias = b16;
  write_family_model(tmp.path / "ok", bf);
  auto model = Backend::load((tmp.path / "ok").string(), test_options(1));
  std::mt19937 rng(1);
  const std::vector<int32_t> canvas = random_tokens(rng, 12, s.vocab);
  const LogitErrors e =
      logit_errors(run_block(*model, canvas, all_rows(12), 4), family_reference(bf, canvas, 4), all_rows(12), s.vocab);
  report(model->config().model_type == "llada2_moe" && logits_within(e, WType::BF16, 2e-5),
         "family weights: a bf16 expert bias loads and routes as the reference (a bf16 model: " +
             logit_bound_text(WType::BF16, 2e-5) + ")",
         logit_errors_text(e));
}

}  // namespace

void test_families() {
  test_block_causal_llada();
  test_family_configs();
  test_family_forward();
  test_family_weights_errors();
}

}  // namespace vdiff::test
