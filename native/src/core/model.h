// A LLaDA-architecture mask predictor: weights memory-mapped from safetensors, batched forward pass on CPU.
#pragma once
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "config.h"

namespace vdiff {

struct LoadOptions {
  int threads = 0;  // worker threads for the forward pass; <= 0: hardware concurrency
};

// One sequence of a batched forward. Sequences of different lengths share one call: the linear layers
// run over all tokens of the batch concatenated, attention runs per sequence over its own keys only.
struct ForwardSeq {
  const int32_t* tokens = nullptr;       // the whole canvas (prompt + answer, mask tokens included)
  int length = 0;
  const int32_t* logit_rows = nullptr;   // positions (0 <= p < length) whose logits are wanted
  int n_logit_rows = 0;
};

class Model {
 public:
  // Loads <dir>/config.json and <dir>/model.safetensors or the shards named by
  // <dir>/model.safetensors.index.json. Tensors may be f32, bf16 or f16 and stay memory-mapped.
  // Throws Error(InvalidModel) naming the file and the problem.
  static std::unique_ptr<Model> load(const std::string& dir, const LoadOptions& options = {});
  virtual ~Model() = default;

  virtual const ModelConfig& config() const = 0;
  virtual int threads() const = 0;
  virtual std::string weight_dtype() const = 0;   // "f32" | "bf16" | "f16" (of the projection weights)
  virtual uint64_t parameter_count() const = 0;
  virtual uint64_t weight_bytes() const = 0;

  // Computes logits for the requested rows of every sequence. `logits` receives
  // sum(n_logit_rows) rows of config().embedding_size floats, in batch order then row order.
  // Checks `cancel` between layers and throws Error(Cancelled) when it is set.
  // Not reentrant: one forward at a time per Model (the Engine serialises steps).
  virtual void forward(const std::vector<ForwardSeq>& batch, float* logits,
                       const std::atomic<bool>* cancel = nullptr) = 0;
};

}  // namespace vdiff
