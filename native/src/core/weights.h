// A model family as one description, and a checkpoint's weights found and checked against it — once, for
// every backend. A backend never looks a tensor up by name: it receives ModelWeights, whose tensors are
// still the memory-mapped views of the safetensors files (the CPU computes from them in place, the CUDA
// backend uploads them).
//
// A family says which tensors a checkpoint holds (names and shapes from config.json) and how it decodes:
// llada (LLaDA: bidirectional attention, full canvas), llada2_moe (LLaDA2.x: fused QKV, QK-norm, partial
// rotary, dense first layers then grouped-sigmoid MoE with a shared expert; block decoding, editing) and
// sdar / sdar_moe (Qwen3 layout: QK-norm; softmax-routed MoE; block decoding) and dream (Qwen2 layout:
// q/k/v biases, shifted logits; Dream's full-canvas decoding). The differences are data
// here and in ModelConfig, not `if`s in a backend's forward.
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
// under the name + "_scale"; the safetensors metadata names the format ("vdiff.quantization") and, when the
// rows were rotated before quantizing, "vdiff.rotation": "hadamard".
struct WeightRef {
  const void* data = nullptr;
  DType dtype = DType::F32;  // F32, BF16 or F16; I8 (Q8_0) or U8 (Q4_0) when quantized
  int rows = 0;
  int cols = 0;  // in elements (not bytes), quantized or not
  std::string name;
  Quant quant = Quant::None;
  const void* scales = nullptr;  // quantized: f16 [rows][cols / 32]
  bool hadamard = false;         // quantized: rows rotated by Hadamard blocks before quantizing (cpu/quant.h)
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
  WeightRef q, k, v, o;              // o: [D, n_heads*hd]
  WeightRef q_bias, k_bias, v_bias;  // [n_heads*hd], [n_kv_heads*hd] x 2 (ModelConfig::qkv_bias), else absent
  WeightRef q_norm, k_norm;          // [hd] (ModelConfig::qk_norm), else absent
  MlpWeights mlp;                    // dense layers (ModelConfig::moe_layer(i) false), else absent
  MoeWeights moe;                    // MoE layers, else empty
};

struct ModelWeights {
  WeightRef embed;  // [E, D]
  std::vector<LayerWeights> layers;
  WeightRef final_norm;          // [D]
  WeightRef head;                // [E, D] (the embedding itself when the head is tied)
  uint64_t parameter_count = 0;  // the distinct tensors' elements (a tied head counted once)
  uint64_t bytes = 0;            // ... and their bytes
  // Tensors of the checkpoint that the family does not read, by name (sorted): a config.json that does
  // not describe the checkpoint (a head that is tied but stored, biases the config turns off, another
  // family's layers). Rotary inverse-frequency buffers, which some exports keep, are not counted.
  std::vector<std::string> unused;
};

// How a family's config.json names its keys: LLaDA's own (d_model, n_heads, ...) or the Hugging Face
// transformers names (hidden_size, num_attention_heads, ...).
enum class ConfigKeys { Llada, HuggingFace };

// A model family, as one description: what config.json says it is, how it decodes, and the tensors a
// checkpoint holds. The forward reads the layer structure from ModelConfig (head_dim, rotary_dim, qk_norm,
// moe_layer, router) and the tensors from ModelWeights; nothing else in a backend depends on the family.
struct Family {
  std::string name;                        // config.json "model_type" (and ModelConfig::model_type)
  std::vector<std::string> model_types;    // further "model_type" spellings that name it (Dream's "Dream")
  std::vector<std::string> architectures;  // config.json "architectures" entries that name it
  ConfigKeys keys = ConfigKeys::Llada;
  Decoding decoding = Decoding::FullCanvas;
  int default_block_length = 0;          // Block decoding: when config.json has no "block_size"
  int default_mask_token_id = -1;        // when config.json has no "mask_token_id"; -1: it must have one
  bool editing = false;                  // LLaDA2.1 token editing (SamplingParams::editing_threshold) applies
  bool qk_norm = false;                  // query/key RMSNorm before RoPE (a config key may turn it off: use_qk_norm)
  RouterKind router = RouterKind::None;  // of its MoE layers (None: no MoE)
  bool qkv_bias = false;                 // q/k/v biases unless config.json says "attention_bias": false
  bool shifted_logits = false;           // the row of position i predicts token i + 1 (ModelConfig::shifted_logits)

  // Tensor names: `{i}` stands for the layer index, `{e}` for the expert index. An empty name: the family
  // has no such tensor.
  std::string embed, final_norm, head;
  std::string attn_norm, ffn_norm;
  std::string qkv;  // fused [(n_heads + 2 n_kv_heads) hd, D]; q, k and v are its row ranges. Empty: q, k, v.
  std::string q, k, v, o;
  std::string q_bias, k_bias, v_bias;               // [rows of q / k / v] (ModelConfig::qkv_bias)
  std::string q_norm, k_norm;                       // [hd] (ModelConfig::qk_norm)
  std::string gate, up, down;                       // a dense layer's MLP
  std::string router_weight, expert_bias;           // MoE: [n_experts, D], [n_experts]
  std::string expert_gate, expert_up, expert_down;  // MoE: one expert's MLP
  std::string shared_gate, shared_up, shared_down;  // MoE: the shared expert(s), one MLP
};

// Every family this engine serves, and the one config.json names (nullptr: none).
const std::vector<const Family*>& families();
const Family* find_family(const std::string& model_type);
// The family of a parsed config (ModelConfig::model_type); throws Error(InvalidModel) for an unknown one.
const Family& family_of(const ModelConfig& config);

// Finds every tensor the family names with the shape config.json implies and a float dtype. Throws
// Error(InvalidModel) naming the file, the tensor and what is wrong. The projection and head matrices may
// also be quantized (see WeightRef); the embedding and the norms are always float.
ModelWeights find_weights(const TensorSet& tensors, const ModelConfig& config, const Family& family);

// The element i of a float weight (F32, BF16 or F16) as f32.
float weight_element(const WeightRef& w, int64_t i);

// Row r of a matrix as f32 (cols values): a float one as stored; a quantized one dequantized (each value
// its integer times its block's f16 scale, exact in f32) and, when its rows were rotated before
// quantizing, rotated back (H deq / R: the weight the CPU's rotated product multiplies by). For a backend
// that runs quantized checkpoints in a float type (the CUDA backend, in bf16).
void dequantize_row(const WeightRef& w, int r, float* out);

}  // namespace vdiff
