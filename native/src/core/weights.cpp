#include "weights.h"

#include <cstring>
#include <set>

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

const Family& family_of(const ModelConfig&) {
  static const Family llada{
      .name = "llada",
      .embed = "model.transformer.wte.weight",
      .final_norm = "model.transformer.ln_f.weight",
      .head = "model.transformer.ff_out.weight",
      .attn_norm = "model.transformer.blocks.{i}.attn_norm.weight",
      .ffn_norm = "model.transformer.blocks.{i}.ff_norm.weight",
      .q = "model.transformer.blocks.{i}.q_proj.weight",
      .k = "model.transformer.blocks.{i}.k_proj.weight",
      .v = "model.transformer.blocks.{i}.v_proj.weight",
      .o = "model.transformer.blocks.{i}.attn_out.weight",
      .gate = "model.transformer.blocks.{i}.ff_proj.weight",
      .up = "model.transformer.blocks.{i}.up_proj.weight",
      .down = "model.transformer.blocks.{i}.ff_out.weight",
  };
  return llada;
}

const char* quant_name(Quant q) {
  switch (q) {
    case Quant::None: return "none";
    case Quant::Q8_0: return "q8_0";
    case Quant::Q4_0: return "q4_0";
  }
  return "?";
}

ModelWeights find_weights(const TensorSet& tensors, const ModelConfig& c, const Family& f, bool allow_quantized) {
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
    if (counted.insert(t.data).second) {
      out.parameter_count += static_cast<uint64_t>(rows * cols);
      out.bytes += t.nbytes + s->nbytes;
    }
    return w;
  };
  const auto find = [&](const std::string& name, std::vector<int64_t> shape, bool may_quantize = false) {
    const TensorView& t = tensors.get(name);
    if (allow_quantized && may_quantize && (t.dtype == DType::I8 || t.dtype == DType::U8))
      return find_quantized(t, name, shape);
    if (t.dtype != DType::F32 && t.dtype != DType::BF16 && t.dtype != DType::F16)
      throw Error(ErrorCode::InvalidModel, t.file + ": tensor \"" + name + "\" has dtype " + dtype_name(t.dtype) +
                                               "; only F32, BF16 and F16 are supported" +
                                               (t.dtype == DType::I8 || t.dtype == DType::U8
                                                    ? " here (quantized checkpoints load on the CPU backend)"
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
  const int64_t D = c.d_model, H = c.mlp_hidden_size, E = c.embedding_size, hd = c.head_dim();
  out.embed = find(f.embed, {E, D});
  out.layers.resize(c.n_layers);
  for (int i = 0; i < c.n_layers; ++i) {
    LayerWeights& l = out.layers[i];
    l.attn_norm = find(at_layer(f.attn_norm, i), {D});
    l.ffn_norm = find(at_layer(f.ffn_norm, i), {D});
    l.q = find(at_layer(f.q, i), {c.n_heads * hd, D}, true);
    l.k = find(at_layer(f.k, i), {c.n_kv_heads * hd, D}, true);
    l.v = find(at_layer(f.v, i), {c.n_kv_heads * hd, D}, true);
    l.o = find(at_layer(f.o, i), {D, c.n_heads * hd}, true);
    l.mlp.gate = find(at_layer(f.gate, i), {H, D}, true);
    l.mlp.up = find(at_layer(f.up, i), {H, D}, true);
    l.mlp.down = find(at_layer(f.down, i), {D, H}, true);
  }
  out.final_norm = find(f.final_norm, {D});
  out.head = c.weight_tying ? out.embed : find(f.head, {E, D}, true);
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

}  // namespace vdiff
