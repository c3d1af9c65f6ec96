#include "weights.h"

#include <cstring>
#include <set>

#include "cpu/quant.h"
#include "error.h"

namespace vdiff {

namespace {

std::string shape_string(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

std::string at_layer(const std::string& pattern, int layer) {
  const size_t at = pattern.find("{i}");
  return at == std::string::npos ? pattern : pattern.substr(0, at) + std::to_string(layer) + pattern.substr(at + 3);
}

float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu, bits;
  if (exponent == 0x1f) {
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent == 0) {
    if (mantissa == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do {
        ++e;
        mantissa <<= 1;
      } while ((mantissa & 0x400u) == 0);
      bits = sign | static_cast<uint32_t>(127 - 15 - e) << 23 | (mantissa & 0x3ffu) << 13;
    }
  } else {
    bits = sign | (exponent + 127 - 15) << 23 | mantissa << 13;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

}  // namespace

namespace {

Family llada_family() {
  Family f;
  f.name = "llada";
  f.architectures = {"LLaDAModelLM"};
  f.keys = ConfigKeys::Llada;
  f.decoding = Decoding::FullCanvas;
  f.embed = "model.transformer.wte.weight";
  f.final_norm = "model.transformer.ln_f.weight";
  f.head = "model.transformer.ff_out.weight";
  f.attn_norm = "model.transformer.blocks.{i}.attn_norm.weight";
  f.ffn_norm = "model.transformer.blocks.{i}.ff_norm.weight";
  f.q = "model.transformer.blocks.{i}.q_proj.weight";
  f.k = "model.transformer.blocks.{i}.k_proj.weight";
  f.v = "model.transformer.blocks.{i}.v_proj.weight";
  f.o = "model.transformer.blocks.{i}.attn_out.weight";
  f.gate = "model.transformer.blocks.{i}.ff_proj.weight";
  f.up = "model.transformer.blocks.{i}.up_proj.weight";
  f.down = "model.transformer.blocks.{i}.ff_out.weight";
  return f;
}

// LLaDA2.0 / 2.1 (BailingMoeV2 layout): ../shared/specs/block-diffusion.md A3.
Family llada2_family() {
  Family f;
  f.name = "llada2_moe";
  f.architectures = {"LLaDA2MoeModelLM"};
  f.keys = ConfigKeys::HuggingFace;
  f.decoding = Decoding::Block;
  f.default_block_length = 32;
  f.default_mask_token_id = 156895;
  f.editing = true;
  f.qk_norm = true;
  f.router = RouterKind::GroupedSigmoid;
  const std::string l = "model.layers.{i}.";
  f.embed = "model.word_embeddings.weight";
  f.final_norm = "model.norm.weight";
  f.head = "lm_head.weight";
  f.attn_norm = l + "input_layernorm.weight";
  f.ffn_norm = l + "post_attention_layernorm.weight";
  f.qkv = l + "attention.query_key_value.weight";
  f.o = l + "attention.dense.weight";
  f.q_norm = l + "attention.query_layernorm.weight";
  f.k_norm = l + "attention.key_layernorm.weight";
  f.gate = l + "mlp.gate_proj.weight";
  f.up = l + "mlp.up_proj.weight";
  f.down = l + "mlp.down_proj.weight";
  f.router_weight = l + "mlp.gate.weight";
  f.expert_bias = l + "mlp.gate.expert_bias";
  f.expert_gate = l + "mlp.experts.{e}.gate_proj.weight";
  f.expert_up = l + "mlp.experts.{e}.up_proj.weight";
  f.expert_down = l + "mlp.experts.{e}.down_proj.weight";
  f.shared_gate = l + "mlp.shared_experts.gate_proj.weight";
  f.shared_up = l + "mlp.shared_experts.up_proj.weight";
  f.shared_down = l + "mlp.shared_experts.down_proj.weight";
  return f;
}

// The tensor names of the Qwen2 / Qwen3 layout (Hugging Face transformers), which SDAR and Dream share.
void qwen_names(Family& f) {
  const std::string l = "model.layers.{i}.";
  f.embed = "model.embed_tokens.weight";
  f.final_norm = "model.norm.weight";
  f.head = "lm_head.weight";
  f.attn_norm = l + "input_layernorm.weight";
  f.ffn_norm = l + "post_attention_layernorm.weight";
  f.q = l + "self_attn.q_proj.weight";
  f.k = l + "self_attn.k_proj.weight";
  f.v = l + "self_attn.v_proj.weight";
  f.o = l + "self_attn.o_proj.weight";
  f.gate = l + "mlp.gate_proj.weight";
  f.up = l + "mlp.up_proj.weight";
  f.down = l + "mlp.down_proj.weight";
}

// SDAR (Qwen3 layout): spec B3; sdar_moe adds the Qwen3-MoE experts (softmax router, no shared expert).
Family sdar_family(bool moe) {
  Family f;
  f.name = moe ? "sdar_moe" : "sdar";
  f.architectures = {moe ? "SDARMoeForCausalLM" : "SDARForCausalLM"};
  f.keys = ConfigKeys::HuggingFace;
  f.decoding = Decoding::Block;
  f.default_block_length = 4;
  f.default_mask_token_id = 151669;
  f.qk_norm = true;
  f.router = moe ? RouterKind::Softmax : RouterKind::None;
  qwen_names(f);
  const std::string l = "model.layers.{i}.";
  f.q_norm = l + "self_attn.q_norm.weight";
  f.k_norm = l + "self_attn.k_norm.weight";
  if (moe) {
    f.router_weight = l + "mlp.gate.weight";
    f.expert_gate = l + "mlp.experts.{e}.gate_proj.weight";
    f.expert_up = l + "mlp.experts.{e}.up_proj.weight";
    f.expert_down = l + "mlp.experts.{e}.down_proj.weight";
  }
  return f;
}

// Dream (Qwen2 layout trained as a masked diffusion LM): tools/reference/dream.py.
Family dream_family() {
  Family f;
  f.name = "dream";
  f.model_types = {"Dream"};
  f.architectures = {"DreamModel"};
  f.keys = ConfigKeys::HuggingFace;
  f.decoding = Decoding::Dream;
  f.default_mask_token_id = 151666;
  f.qkv_bias = true;
  f.shifted_logits = true;
  qwen_names(f);
  const std::string l = "model.layers.{i}.";
  f.q_bias = l + "self_attn.q_proj.bias";
  f.k_bias = l + "self_attn.k_proj.bias";
  f.v_bias = l + "self_attn.v_proj.bias";
  return f;
}

std::string at_expert(const std::string& pattern, int layer, int expert) {
  const std::string s = at_layer(pattern, layer);
  const size_t at = s.find("{e}");
  return at == std::string::npos ? s : s.substr(0, at) + std::to_string(expert) + s.substr(at + 3);
}

}  // namespace

const std::vector<const Family*>& families() {
  static const Family llada = llada_family(), llada2 = llada2_family(), sdar = sdar_family(false),
                      sdar_moe = sdar_family(true), dream = dream_family();
  static const std::vector<const Family*> all = {&llada, &llada2, &sdar, &sdar_moe, &dream};
  return all;
}

const Family* find_family(const std::string& model_type) {
  for (const Family* f : families()) {
    if (f->name == model_type) return f;
    for (const std::string& other : f->model_types)
      if (other == model_type) return f;
  }
  return nullptr;
}

const Family& family_of(const ModelConfig& config) {
  if (const Family* f = find_family(config.model_type)) return *f;
  throw Error(ErrorCode::InvalidModel, "config.json: unknown \"model_type\" \"" + config.model_type + "\"");
}

const char* quant_name(Quant q) {
  switch (q) {
    case Quant::None: return "none";
    case Quant::Q8_0: return "q8_0";
    case Quant::Q4_0: return "q4_0";
  }
  return "?";
}

ModelWeights find_weights(const TensorSet& tensors, const ModelConfig& c, const Family& f) {
  ModelWeights out;
  std::set<const void*> counted;
  // A quantized matrix (may_quantize: a projection or the head): the blocks under `name`, the scales
  // under name + "_scale".
  const auto find_quantized = [&](const TensorView& t, const std::string& name, const std::vector<int64_t>& shape) {
    const Quant q = t.dtype == DType::I8 ? Quant::Q8_0 : Quant::Q4_0;
    const int64_t rows = shape[0], cols = shape[1];
    const std::vector<int64_t> stored = {rows, q == Quant::Q8_0 ? cols : cols / 2};
    if (cols % 32 != 0 || t.shape != stored)
      throw Error(ErrorCode::InvalidModel, t.file + ": quantized tensor \"" + name + "\" (" + quant_name(q) +
                                               ") has shape " + shape_string(t.shape) + ", expected " +
                                               shape_string(stored) + " from config.json");
    const TensorView* s = tensors.find(name + "_scale");
    const std::vector<int64_t> scale_shape = {rows, cols / 32};
    if (!s || s->dtype != DType::F16 || s->shape != scale_shape)
      throw Error(ErrorCode::InvalidModel, t.file + ": quantized tensor \"" + name + "\" needs its scales \"" + name +
                                               "_scale\" as F16 " + shape_string(scale_shape));
    WeightRef w;
    w.data = t.data;
    w.dtype = t.dtype;
    w.rows = static_cast<int>(rows);
    w.cols = static_cast<int>(cols);
    w.name = name;
    w.quant = q;
    w.scales = s->data;
    const std::string rotation = tensors.metadata_of(t, "vdiff.rotation");
    if (!rotation.empty() && rotation != "hadamard")
      throw Error(ErrorCode::InvalidModel,
                  t.file + ": unknown \"vdiff.rotation\" \"" + rotation + "\" (this version reads \"hadamard\")");
    w.hadamard = rotation == "hadamard";
    if (counted.insert(t.data).second) {
      out.parameter_count += static_cast<uint64_t>(rows * cols);
      out.bytes += t.nbytes + s->nbytes;
    }
    return w;
  };
  std::set<std::string> used;
  const auto find = [&](const std::string& name, std::vector<int64_t> shape, bool may_quantize = false) {
    const TensorView& t = tensors.get(name);
    used.insert(name);
    if (may_quantize) used.insert(name + "_scale");
    if (may_quantize && (t.dtype == DType::I8 || t.dtype == DType::U8)) return find_quantized(t, name, shape);
    if (t.dtype != DType::F32 && t.dtype != DType::BF16 && t.dtype != DType::F16)
      throw Error(ErrorCode::InvalidModel, t.file + ": tensor \"" + name + "\" has dtype " + dtype_name(t.dtype) +
                                               "; only F32, BF16 and F16 are supported" +
                                               (t.dtype == DType::I8 || t.dtype == DType::U8
                                                    ? " here (only projection and head matrices may be quantized)"
                                                    : ""));
    if (t.shape != shape)
      throw Error(ErrorCode::InvalidModel, t.file + ": tensor \"" + name + "\" has shape " + shape_string(t.shape) +
                                               ", expected " + shape_string(shape) + " from config.json");
    if (counted.insert(t.data).second) {
      out.parameter_count += static_cast<uint64_t>(t.numel());
      out.bytes += t.nbytes;
    }
    WeightRef w;
    w.data = t.data;
    w.dtype = t.dtype;
    w.rows = shape.size() == 2 ? static_cast<int>(shape[0]) : 1;
    w.cols = static_cast<int>(shape.back());
    w.name = name;
    return w;
  };
  // A row range [begin, begin + rows) of a matrix: a view (the fused QKV's q, k and v).
  const auto rows_of = [](const WeightRef& w, int begin, int rows, const char* part) {
    WeightRef r = w;
    r.rows = rows;
    r.name = w.name + "[" + part + "]";
    const uint64_t row_bytes = w.quant == Quant::None   ? static_cast<uint64_t>(w.cols) * dtype_size(w.dtype)
                               : w.quant == Quant::Q8_0 ? static_cast<uint64_t>(w.cols)
                                                        : static_cast<uint64_t>(w.cols) / 2;
    r.data = static_cast<const char*>(w.data) + static_cast<uint64_t>(begin) * row_bytes;
    if (w.scales) r.scales = static_cast<const uint16_t*>(w.scales) + static_cast<uint64_t>(begin) * (w.cols / 32);
    return r;
  };
  const auto mlp = [&](const std::string& gate, const std::string& up, const std::string& down, int64_t width) {
    MlpWeights m;
    m.gate = find(gate, {width, c.d_model}, true);
    m.up = find(up, {width, c.d_model}, true);
    m.down = find(down, {c.d_model, width}, true);
    return m;
  };
  const int64_t D = c.d_model, H = c.mlp_hidden_size, E = c.embedding_size, hd = c.head_dim();
  const int64_t q_rows = c.n_heads * hd, kv_rows = c.n_kv_heads * hd;
  out.embed = find(f.embed, {E, D});
  out.layers.resize(c.n_layers);
  for (int i = 0; i < c.n_layers; ++i) {
    LayerWeights& l = out.layers[i];
    const auto name = [i](const std::string& pattern) { return at_layer(pattern, i); };
    l.attn_norm = find(name(f.attn_norm), {D});
    l.ffn_norm = find(name(f.ffn_norm), {D});
    if (!f.qkv.empty()) {
      const WeightRef qkv = find(name(f.qkv), {q_rows + 2 * kv_rows, D}, true);
      l.q = rows_of(qkv, 0, static_cast<int>(q_rows), "q");
      l.k = rows_of(qkv, static_cast<int>(q_rows), static_cast<int>(kv_rows), "k");
      l.v = rows_of(qkv, static_cast<int>(q_rows + kv_rows), static_cast<int>(kv_rows), "v");
    } else {
      l.q = find(name(f.q), {q_rows, D}, true);
      l.k = find(name(f.k), {kv_rows, D}, true);
      l.v = find(name(f.v), {kv_rows, D}, true);
    }
    l.o = find(name(f.o), {D, q_rows}, true);
    if (c.qkv_bias) {
      if (f.q_bias.empty())
        throw Error(ErrorCode::InvalidModel, "config.json: the " + f.name + " family has no q/k/v biases");
      l.q_bias = find(name(f.q_bias), {q_rows});
      l.k_bias = find(name(f.k_bias), {kv_rows});
      l.v_bias = find(name(f.v_bias), {kv_rows});
    }
    if (c.qk_norm) {
      if (f.q_norm.empty())
        throw Error(ErrorCode::InvalidModel, "config.json: the " + f.name + " family has no QK-norm");
      l.q_norm = find(name(f.q_norm), {hd});
      l.k_norm = find(name(f.k_norm), {hd});
    }
    if (!c.moe_layer(i)) {
      l.mlp = mlp(name(f.gate), name(f.up), name(f.down), H);
      continue;
    }
    // The router stays float: its product is f32 and decides which experts run.
    l.moe.router = find(name(f.router_weight), {c.n_experts, D});
    if (c.expert_bias) {
      if (f.expert_bias.empty())
        throw Error(ErrorCode::InvalidModel, "config.json: the " + f.name + " family has no expert bias");
      l.moe.expert_bias = find(name(f.expert_bias), {c.n_experts});
    }
    l.moe.experts.reserve(c.n_experts);
    for (int e = 0; e < c.n_experts; ++e)
      l.moe.experts.push_back(mlp(at_expert(f.expert_gate, i, e), at_expert(f.expert_up, i, e),
                                  at_expert(f.expert_down, i, e), c.moe_hidden_size));
    if (c.n_shared_experts > 0) {
      if (f.shared_gate.empty())
        throw Error(ErrorCode::InvalidModel, "config.json: the " + f.name + " family has no shared experts");
      l.moe.shared = mlp(name(f.shared_gate), name(f.shared_up), name(f.shared_down),
                         static_cast<int64_t>(c.moe_hidden_size) * c.n_shared_experts);
    }
  }
  out.final_norm = find(f.final_norm, {D});
  out.head = c.weight_tying ? out.embed : find(f.head, {E, D}, true);
  for (const auto& [name, view] : tensors.all()) {
    const std::string buffer = "rotary_emb.inv_freq";
    const bool rotary =
        name.size() >= buffer.size() && name.compare(name.size() - buffer.size(), buffer.size(), buffer) == 0;
    if (!used.count(name) && !rotary) out.unused.push_back(name);
  }
  return out;
}

float weight_element(const WeightRef& w, int64_t i) {
  switch (w.dtype) {
    case DType::F32: {
      float f;
      std::memcpy(&f, static_cast<const char*>(w.data) + 4 * i, 4);
      return f;
    }
    case DType::BF16: {
      uint16_t h;
      std::memcpy(&h, static_cast<const char*>(w.data) + 2 * i, 2);
      const uint32_t bits = static_cast<uint32_t>(h) << 16;
      float f;
      std::memcpy(&f, &bits, 4);
      return f;
    }
    case DType::F16: {
      uint16_t h;
      std::memcpy(&h, static_cast<const char*>(w.data) + 2 * i, 2);
      return f16_to_f32(h);
    }
    default: throw Error(ErrorCode::Internal, "weight_element: not a float dtype");
  }
}

void dequantize_row(const WeightRef& w, int r, float* out) {
  if (w.quant == Quant::None) {
    for (int c = 0; c < w.cols; ++c) out[c] = weight_element(w, static_cast<int64_t>(r) * w.cols + c);
    return;
  }
  const cpu::QType type = w.quant == Quant::Q8_0 ? cpu::QType::Q8_0 : cpu::QType::Q4_0;
  const int64_t row_bytes = static_cast<int64_t>(w.cols) / cpu::kQBlock * cpu::qblock_bytes(type);
  const cpu::QMatB row{static_cast<const uint8_t*>(w.data) + r * row_bytes,
                       static_cast<const uint16_t*>(w.scales) + static_cast<int64_t>(r) * (w.cols / cpu::kQBlock), type,
                       row_bytes, w.cols / cpu::kQBlock};
  for (int c = 0; c < w.cols; ++c) out[c] = cpu::qweight_value(row, 0, c);
  if (w.hadamard) {
    const int R = cpu::hadamard_block(w.cols);
    cpu::hadamard_transform(out, w.cols, R);
    for (int c = 0; c < w.cols; ++c) out[c] /= static_cast<float>(R);
  }
}

}  // namespace vdiff
