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

// One weight tensor in the mapping: a matrix [rows = out features, cols = in features] or a vector
// (rows = 1).
struct WeightRef {
  const void* data = nullptr;
  DType dtype = DType::F32;  // F32, BF16 or F16
  int rows = 0;
  int cols = 0;
  std::string name;
  uint64_t bytes() const { return static_cast<uint64_t>(rows) * cols * dtype_size(dtype); }
};

struct LayerWeights {
  WeightRef attn_norm, ffn_norm;  // [D]
  WeightRef q, k, v, o;           // [n_heads*hd, D], [n_kv_heads*hd, D] x2, [D, n_heads*hd]
  WeightRef gate, up, down;       // [H, D], [H, D], [D, H]
};

struct ModelWeights {
  WeightRef embed;                // [E, D]
  std::vector<LayerWeights> layers;
  WeightRef final_norm;           // [D]
  WeightRef head;                 // [E, D] (the embedding itself when the head is tied)
  uint64_t parameter_count = 0;   // the distinct tensors' elements (a tied head counted once)
  uint64_t bytes = 0;             // ... and their bytes
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
// Error(InvalidModel) naming the file, the tensor and what is wrong.
ModelWeights find_weights(const TensorSet& tensors, const ModelConfig& config, const Family& family);

// The element i of a float weight (F32, BF16 or F16) as f32.
float weight_element(const WeightRef& w, int64_t i);

}  // namespace vdiff
