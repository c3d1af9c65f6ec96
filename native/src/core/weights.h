// A model family as one description, and a checkpoint's weights found and checked against it — once, for
// every backend. A backend never looks a tensor up by name: it receives ModelWeights, whose tensors are
// still the memory-mapped views of the safetensors files (the CPU computes from them in place, the CUDA
// backend uploads them).
//
// A family says which tensors a checkpoint holds (names and shapes from config.json) and which layer kinds
// the forward runs. Today one family exists (LLaDA: pre-norm blocks, bidirectional attention, SwiGLU);
// the block-diffusion and mixture-of-experts families join as further descriptions, not as `if`s in a
// backend's forward.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "config.h"
#include "safetensors.h"

namespace vdiff {

// Block quantization of a weight matrix (cpu/quant.h has the formats): None, or blocks of 32 along a
// row with one f16 scale each — Q8_0 (int8 values), Q4_0 (4-bit values, two per byte).
enum class Quant { None, Q8_0, Q4_0 };
const char* quant_name(Quant q);  // "none" | "q8_0" | "q4_0"

// One weight tensor in the mapping: a matrix [rows = out features, cols = in features] or a vector
// (rows = 1).
//
// A quantized checkpoint (vdiff quantize) stores a quantized matrix under its usual name — dtype I8 and
// shape [rows, cols] for Q8_0, U8 and [rows, cols / 2] for Q4_0 — and its f16 scales [rows, cols / 32]
// under the name + "_scale"; the safetensors metadata names the format ("vdiff.quantization").
struct WeightRef {
  const void* data = nullptr;
  DType dtype = DType::F32;  // F32, BF16 or F16; I8 (Q8_0) or U8 (Q4_0) when quantized
  int rows = 0;
  int cols = 0;  // in elements (not bytes), quantized or not
  std::string name;
  Quant quant = Quant::None;
  const void* scales = nullptr;  // quantized: f16 [rows][cols / 32]
  uint64_t bytes() const {
    const uint64_t n = static_cast<uint64_t>(rows) * cols;
    switch (quant) {
      case Quant::Q8_0: return n + n / 32 * 2;
      case Quant::Q4_0: return n / 2 + n / 32 * 2;
      default: return n * dtype_size(dtype);
    }
  }
};

// One SwiGLU MLP: down(silu(gate x) * up x). A dense layer's (width mlp_hidden_size), one expert's or the
// shared experts' (width moe_hidden_size, times n_shared_experts for the shared one).
struct MlpWeights {
  WeightRef gate, up, down;  // [H, D], [H, D], [D, H]
  bool present() const { return gate.data != nullptr; }
};

// A mixture-of-experts layer (ModelConfig::router says how tokens are routed).
struct MoeWeights {
  WeightRef router;       // [n_experts, D], float (the router product is f32)
  WeightRef expert_bias;  // [n_experts] (GroupedSigmoid; data == nullptr when absent): for the choice only
  std::vector<MlpWeights> experts;
  MlpWeights shared;  // absent (gate.data == nullptr) when the family has none
};

struct LayerWeights {
  WeightRef attn_norm, ffn_norm;  // [D]
  // Separate projections: q [n_heads*hd, D], k and v [n_kv_heads*hd, D]. A fused checkpoint (LLaDA2's
  // query_key_value [(n_heads + 2 n_kv_heads) hd, D]) gives q, k and v as row ranges of the one matrix.
  WeightRef q, k, v, o;  // o: [D, n_heads*hd]
  WeightRef q_norm, k_norm;  // [hd] (ModelConfig::qk_norm), else absent
  MlpWeights mlp;            // dense layers (ModelConfig::moe_layer(i) false), else absent
  MoeWeights moe;            // MoE layers, else empty
};

struct ModelWeights {
  WeightRef embed;  // [E, D]
  std::vector<LayerWeights> layers;
  WeightRef final_norm;          // [D]
  WeightRef head;                // [E, D] (the embedding itself when the head is tied)
  uint64_t parameter_count = 0;  // the distinct tensors' elements (a tied head counted once)
  uint64_t bytes = 0;            // ... and their bytes
};

// The tensor names of a family; `{i}` stands for the layer index.
struct Family {
  std::string name;
  std::string embed, final_norm, head;
  std::string attn_norm, ffn_norm, q, k, v, o, gate, up, down;
};

// The family of a config (today LLaDA's for every config the parser accepts).
const Family& family_of(const ModelConfig& config);

// Finds every tensor the family names with the shape config.json implies and a float dtype. Throws
// Error(InvalidModel) naming the file, the tensor and what is wrong. With allow_quantized (the CPU
// backend), the projection and head matrices may also be quantized (see WeightRef); the embedding and
// the norms are always float.
ModelWeights find_weights(const TensorSet& tensors, const ModelConfig& config, const Family& family,
                          bool allow_quantized = false);

// The element i of a float weight (F32, BF16 or F16) as f32.
float weight_element(const WeightRef& w, int64_t i);

}  // namespace vdiff
