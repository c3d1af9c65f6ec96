// A LLaDA-architecture mask predictor: weights memory-mapped from safetensors, batched forward pass on CPU.
#pragma once
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "config.h"

namespace vdiff {

// Element type of the KV caches: f32 keeps a cached read exactly equal to a full forward over an
// unchanged canvas; bf16 halves the memory at about 3 significant digits per key and value.
enum class KVCacheDType { F32, BF16 };

struct LoadOptions {
  int threads = 0;  // worker threads for the forward pass; <= 0: hardware concurrency
  KVCacheDType kv_cache_dtype = KVCacheDType::F32;
  // Upper bound on the bytes all live KV caches of this model hold together; 0: no bound.
  uint64_t kv_cache_budget_bytes = 0;
  // The projection and head weights are packed once at load into the layout the GEMM reads (f32), so
  // no forward repacks them: the same results, less work per call — most where a call has few rows (a
  // cached block, a small batch). Done when the packed copies take at most this many bytes in all
  // (they are f32: twice a bf16 checkpoint); 0: never.
  uint64_t pack_weights_max_bytes = uint64_t{4} << 30;
};

// Keys and values of every layer for every position of one canvas, for approximate caching in the
// style of Fast-dLLM. Keys are stored after RoPE at their absolute canvas positions, so a cached key is
// exactly the key a full forward would use as long as the tokens it was computed from are unchanged.
// Made by Model::make_kv_cache for one canvas length; owned by the sequence that uses it; freed with it
// (which returns its bytes to the model's budget). Only Model::forward reads or writes it.
class KVCache {
 public:
  virtual ~KVCache() = default;
  virtual int positions() const = 0;  // the canvas length it serves
  virtual uint64_t size() const = 0;  // bytes it holds
  // True once a forward has computed every position into it (a refresh); calls that compute only part
  // of the canvas need it. A refresh that was cancelled leaves the cache not filled.
  virtual bool filled() const = 0;
};

// One sequence of a batched forward. Sequences of different lengths share one call: the linear layers
// run over the computed tokens of the batch concatenated, attention runs per sequence over its own keys.
//
// Without a cache every position is computed. With a cache, the call computes the positions
// [compute_begin, compute_end) of the canvas and writes their keys and values into the cache; the keys
// and values of the other positions come from the cache, i.e. from the last call that computed them:
//   - a refresh computes the whole canvas (the default range): the cache is filled, and the logits are
//     bit for bit those of the same call without a cache (attention uses the fresh keys);
//   - a read computes a part only and needs a filled cache: the prefix cache's steps compute
//     [block start, length), the dual cache's steps [block start, block end).
// Such a read is approximate exactly where tokens outside the range changed since they were computed.
struct ForwardSeq {
  const int32_t* tokens = nullptr;       // the whole canvas (prompt + answer, mask tokens included)
  int length = 0;
  const int32_t* logit_rows = nullptr;   // positions (compute_begin <= p < compute_end) whose logits are wanted
  int n_logit_rows = 0;
  KVCache* cache = nullptr;              // optional; made by this model for `length` positions
  int compute_begin = 0;
  int compute_end = -1;                  // -1: length. Without a cache the range must be the whole canvas.
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
  // Bytes of the weights packed at load (LoadOptions::pack_weights_max_bytes); 0: none packed.
  virtual uint64_t packed_weight_bytes() const { return 0; }

  // Computes logits for the requested rows of every sequence. `logits` receives
  // sum(n_logit_rows) rows of config().embedding_size floats, in batch order then row order.
  // Checks `cancel` between layers and throws Error(Cancelled) when it is set.
  // Not reentrant: one forward at a time per Model (the Engine serialises steps).
  virtual void forward(const std::vector<ForwardSeq>& batch, float* logits,
                       const std::atomic<bool>* cancel = nullptr) = 0;

  // Bytes a KV cache for a canvas of `positions` tokens takes: layers x positions x kv_dim x 2 (keys and
  // values) x the element size. 0 for a model without cache support.
  virtual uint64_t kv_cache_bytes(int positions) const { return 0; }
  // A new, not yet filled cache for a canvas of `positions` tokens. Throws Error(InvalidArgument) when
  // positions is outside [1, max_sequence_length] or one cache alone exceeds the budget (it could never
  // be served), Error(OutOfMemory) when the live caches leave too little of the budget or the
  // allocation fails. The default: caching not supported (InvalidArgument).
  virtual std::unique_ptr<KVCache> make_kv_cache(int positions);
  // Bytes held by this model's live caches, and the budget they share (0: none).
  virtual uint64_t kv_cache_live_bytes() const { return 0; }
  virtual uint64_t kv_cache_budget_bytes() const { return 0; }
};

}  // namespace vdiff
