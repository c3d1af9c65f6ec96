// The native boundary: a Backend holds one model's weights on one device and does the tensor work of a
// denoising step — a batched forward over canvases, then, per requested row, the token it would take, how
// sure it is and (on request) the most likely alternatives. Logits stay where they were computed; only
// sampled rows come back. Everything that is not tensor work is written once, here and in the engine:
// loading and checking the weights (weights.h), the checks of a forward's batch, the KV-cache budget,
// the sampler's rules and its (seed, step, position)-keyed random numbers (sampler.h, rng.h).
//
// Backends: CpuBackend (cpu/backend_cpu.cpp) and CudaBackend (cuda/, built when nvcc is found), made by
// Backend::load from LoadOptions::device.
#pragma once
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "config.h"
#include "weights.h"  // Quant

namespace vdiff {

class ThreadPool;
struct RowRule;    // sampler.h
struct Penalties;  // sampler.h

enum class Device { Auto, Cpu, Cuda };
const char* device_name(Device device);  // "auto" | "cpu" | "cuda"

// Element type of the KV caches: f32 keeps a cached read exactly equal to a full forward over an
// unchanged canvas; bf16 halves the memory at about 3 significant digits per key and value.
enum class KVCacheDType { F32, BF16 };

struct LoadOptions {
  Device device = Device::Cpu;  // Auto: CUDA when a GPU is visible (and the build has CUDA), else CPU
  int threads = 0;              // host worker threads (the CPU forward, host-side sampling); <= 0: all cores
  KVCacheDType kv_cache_dtype = KVCacheDType::F32;
  // Upper bound on the bytes all live KV caches of this model hold together; 0: no bound (on a GPU: what
  // gpu_memory_utilization leaves after the weights).
  uint64_t kv_cache_budget_bytes = 0;
  // CPU: the projection and head weights are packed once at load into the layout the GEMM reads, when
  // the packed copies take at most this many bytes in all; 0: never. A copy no larger than the stored
  // matrix (bf16 on the avx512bf16 path; f32 whose rows fill whole panels) replaces it, its mapped pages
  // released, and is not counted.
  uint64_t pack_weights_max_bytes = uint64_t{4} << 30;
  // CPU: quantize the projection and head matrices at load (Q8_0 or Q4_0, cpu/quant.h) into a copy in
  // memory, the float originals staying mapped; matrices a checkpoint already stores quantized, and
  // those whose in-features are not a multiple of 32, are kept as stored. CPU only (CUDA: not yet).
  Quant quantize = Quant::None;
  // CPU: the kernels' instruction set: "auto" (the widest this CPU has, or the one the environment
  // variable VDIFF_ISA names), "portable", "avx2", "avx512" or "avx512bf16". Load throws Error(InvalidArgument) for
  // another name, Error(Unavailable) for one this CPU lacks (the message lists those it has).
  std::string cpu_isa = "auto";
  // CUDA: the share of the device's memory the backend may use for weights, KV caches and activations.
  double gpu_memory_utilization = 0.9;
  // CUDA: report upload progress (bytes done, bytes total); may be empty.
  void (*progress)(void* context, uint64_t done, uint64_t total) = nullptr;
  void* progress_context = nullptr;
};

// What /health, /v1/engine/stats and the CLI report about the backend.
struct BackendInfo {
  std::string backend;        // "cpu" | "cuda"
  std::string device;         // CPU: the ISA path ("avx512", ...); CUDA: the GPU's name
  std::string gemm;           // the matrix-product implementation ("avx512", "cublas", "tiled fallback", ...)
  uint64_t memory_used = 0;   // bytes the backend holds on its device (weights, caches, scratch)
  uint64_t memory_total = 0;  // the device's memory (CPU: 0, not reported)
};

class Backend;

// Keys and values of every layer for every position of one canvas, for caching in the style of
// Fast-dLLM. Keys are stored after RoPE at their absolute canvas positions, so a cached key is exactly the
// key a full forward would use as long as the tokens it was computed from are unchanged. Made by
// Backend::make_kv_cache for one canvas length; owned by the sequence that uses it; freed with it (which
// returns its bytes to the budget). Only its backend's forward reads or writes it.
class KVCache {
 public:
  virtual ~KVCache();
  int positions() const { return positions_; }
  uint64_t size() const { return bytes_; }
  const Backend* owner() const { return owner_; }
  // True once a forward has computed every position into it (a refresh); calls that compute only part
  // of the canvas need it. A refresh that was cancelled leaves the cache not filled.
  bool filled() const { return filled_; }
  void set_filled(bool filled) { filled_ = filled; }
  // Block-causal forwards (ForwardSeq::attention_block > 0): positions [0, cached_until()) hold keys and
  // values a read may use. A forward that computes [begin, end) with begin <= cached_until() sets it to
  // max(cached_until, end) once it completes; a cancelled one leaves it at min(cached_until, begin). The
  // engine decides which of them are final (a block's keys are exact once computed from its final tokens).
  int cached_until() const { return cached_until_; }
  void set_cached_until(int positions) { cached_until_ = positions; }

 protected:
  KVCache() = default;

 private:
  friend class Backend;
  struct Account;
  std::shared_ptr<Account> account_;  // the budget the bytes were reserved from
  const Backend* owner_ = nullptr;
  int positions_ = 0;
  uint64_t bytes_ = 0;
  bool filled_ = false;
  int cached_until_ = 0;
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
  const int32_t* tokens = nullptr;  // the whole canvas (prompt + answer, mask tokens included)
  int length = 0;
  const int32_t* logit_rows = nullptr;  // positions (compute_begin <= p < compute_end) whose rows are wanted
  int n_logit_rows = 0;
  KVCache* cache = nullptr;  // optional; made by this backend for `length` positions
  int compute_begin = 0;
  int compute_end = -1;  // -1: length. Without a cache the range must be the whole canvas.
  // 0: bidirectional attention over the whole canvas. B > 0: block-causal with blocks of B positions
  // aligned at 0 — the query at position i attends the keys j < min(length, (i / B + 1) * B). Then a
  // cache read needs only the keys before compute_begin (KVCache::cached_until() >= compute_begin), and
  // without a cache the range may be any [0, end) (what lies after `end` is never attended by it). The
  // range must end at a block boundary or at `length` (its queries attend their whole block).
  int attention_block = 0;
};

// A forward's batch after its checks: per sequence, the computed range and where its tokens sit among
// all T computed tokens. Made by Backend::check_batch for every backend alike.
struct BatchPlan {
  struct Seq {
    int offset;        // index of its first computed token among the T computed tokens
    int begin, end;    // the computed range of its canvas
    int length;        // canvas length: the keys its queries attend to
    KVCache* cache;    // nullptr: no cache
    bool reads_cache;  // keys outside [begin, end) come from the cache
    int block = 0;     // ForwardSeq::attention_block: 0 bidirectional, B > 0 block-causal
    // Block-causal: the number of keys the query at canvas position i attends.
    int keys_of(int i) const { return block > 0 ? std::min(length, (i / block + 1) * block) : length; }
  };
  std::vector<Seq> seqs;
  int tokens = 0;  // T
  int rows = 0;    // logit rows requested over the batch
  int max_length = 0;
};

constexpr int kMaxTopLogprobs = 20;

// One row a step asks for: the row `cond` of the forward's requested rows (batch order, then row order)
// — with cfg combined with the unconditional copy's row `uncond` — sampled by `rule` with the noise of
// (seed, step, position).
struct RowTask {
  int cond = 0;
  int uncond = -1;  // -1: no cfg
  double cfg_scale = 0.0;
  const RowRule* rule = nullptr;         // nullptr: no sampling (only `target` is wanted)
  const Penalties* penalties = nullptr;  // applied after cfg and RowRule::adjust, before the draw; nullptr: none
  uint64_t seed = 0;
  int step = 0;
  int position = 0;      // in the answer
  int top_logprobs = 0;  // 0 .. kMaxTopLogprobs alternatives to report
  int32_t target = -1;   // >= 0: also report the natural log-probability of this token (scoring)
  // > 0 with a target: also report the target's rank among the tokens [0, rank_vocab) other than
  // rank_mask (1 + how many have a larger logit), as vLLM's prompt logprobs do. Such rows are ranked on
  // the host (sample_task).
  int rank_vocab = 0;
  int32_t rank_mask = -1;
  // Without a rule (scoring), > 0: the top alternatives are tokens of [0, top_vocab) other than top_mask
  // (a sampled row's are its rule's drawable tokens); 0: any token of the row.
  int top_vocab = 0;
  int32_t top_mask = -1;
};

struct TopLogprob {
  int32_t token;
  float logprob;
};

struct RowResult {
  int32_t token = 0;         // x0: the token this row would take
  double probability = 0.0;  // float64 softmax probability of `token`
  double confidence = 0.0;   // what committing ranks by (never NaN)
  double target_logprob = 0.0;
  int target_rank = 0;  // with RowTask::rank_vocab > 0
  // False when the row's logits (cond or uncond, before anything changed them) held NaN or +inf: a model
  // that cannot be trusted here (non-finite weights, or values beyond its dtype's range). The engine fails
  // the step with Error(Numeric) rather than commit what such a row says.
  bool finite = true;
  int n_top = 0;
  TopLogprob top[kMaxTopLogprobs];  // the n_top likeliest drawable tokens, most likely first, ties to the lower id
};

class Backend {
 public:
  // Loads <dir>/config.json and <dir>/model.safetensors (or the shards of model.safetensors.index.json)
  // onto options.device. Throws Error(InvalidModel) naming the file and the problem, and
  // Error(Unavailable) when the device asked for is not there (no CUDA in this build, no GPU visible).
  static std::unique_ptr<Backend> load(const std::string& dir, const LoadOptions& options = {});
  // Whether this build has the CUDA backend, and how many GPUs it sees (0 without the build, a driver or
  // a device; never throws).
  static bool cuda_built();
  static int cuda_devices();

  virtual ~Backend();

  const ModelConfig& config() const { return config_; }
  virtual BackendInfo info() const = 0;
  virtual std::string weight_dtype() const = 0;  // "f32" | "bf16" | "f16" (of the projection weights)
  virtual uint64_t parameter_count() const = 0;
  virtual uint64_t weight_bytes() const = 0;
  // CPU: bytes of the weights packed at load (LoadOptions::pack_weights_max_bytes); 0: none packed.
  virtual uint64_t packed_weight_bytes() const { return 0; }
  // Tensors of the checkpoint the model does not read (ModelWeights::unused): worth a warning at load.
  const std::vector<std::string>& unused_tensors() const { return unused_tensors_; }

  // One step's tensor work: a forward over `batch`, then every task sampled from its rows into
  // out[0 .. tasks.size()). The default computes the rows into host memory with forward() and samples
  // them on the host pool; a device backend overrides it so that logits never leave the device.
  // Checks `cancel` between layers and throws Error(Cancelled) when it is set. Not reentrant: one call
  // at a time per backend (the Engine serialises steps).
  virtual void predict(const std::vector<ForwardSeq>& batch, const std::vector<RowTask>& tasks, RowResult* out,
                       const std::atomic<bool>* cancel = nullptr);

  // The requested rows' logits in host memory: sum(n_logit_rows) rows of config().embedding_size
  // floats, in batch order then row order. For tests, op parity and tools; steps use predict().
  virtual void forward(const std::vector<ForwardSeq>& batch, float* logits,
                       const std::atomic<bool>* cancel = nullptr) = 0;

  // Bytes a KV cache for a canvas of `positions` tokens takes: layers x positions x kv_dim x 2 (keys and
  // values) x the element size.
  virtual uint64_t kv_cache_bytes(int positions) const;
  // A new, not yet filled cache for a canvas of `positions` tokens. Throws Error(InvalidArgument) when
  // positions is outside [1, max_sequence_length] or one cache alone exceeds the budget (it could never
  // be served), Error(OutOfMemory) when the live caches leave too little of the budget or the
  // allocation fails.
  std::unique_ptr<KVCache> make_kv_cache(int positions) { return make_kv_cache(positions, true); }
  // The same, for a cache that must not make room: without `reclaim`, a full budget throws at once instead
  // of asking the reclaimer (set_kv_reclaimer) to free something first.
  virtual std::unique_ptr<KVCache> make_kv_cache(int positions, bool reclaim);
  // Called by make_kv_cache when the live caches leave too little of the budget: frees what it can spare
  // (one piece at a time) and returns whether it freed anything; make_kv_cache then tries again. One per
  // backend, set by `owner` (the engine's prefix cache, prefix_cache.h), which clears it (an empty function)
  // before it goes; clearing another owner's does nothing.
  virtual void set_kv_reclaimer(const void* owner, std::function<bool()> reclaimer);
  // Copies the keys and values of positions [0, positions) of every layer from one cache into another
  // (both made by this backend; `from` cached that far), and marks them cached in `to`
  // (KVCache::cached_until). Throws Error(InvalidArgument) for caches of another backend or positions
  // outside either. On a device the copy is queued before any later forward.
  virtual void copy_kv(const KVCache& from, KVCache& to, int positions);
  // Bytes held by this backend's live caches, and the budget they share (0: none).
  virtual uint64_t kv_cache_live_bytes() const;
  virtual uint64_t kv_cache_budget_bytes() const;
  KVCacheDType kv_cache_dtype() const { return kv_dtype_; }

 protected:
  Backend(const ModelConfig& config, const LoadOptions& options);

  // Checks a forward's batch before anything is touched — canvases within the context, token ids in the
  // embedding, compute ranges, caches made by this backend for that length and filled where read, logit
  // rows inside the computed range — and lays out its computed tokens. Throws Error(InvalidArgument).
  BatchPlan check_batch(const std::vector<ForwardSeq>& batch) const;
  // The caches' state around a forward, the same for every backend: before the layers run,
  // caches_computing() marks what the call is about to rewrite as not usable (a whole-canvas refresh: not
  // filled; a block-causal call: keys known good only before its `begin`) and returns what it needs to
  // restore; caches_computed() then marks the call's result usable (filled; cached up to its `end`).
  // A cancelled forward calls only the first, which leaves its caches honest.
  static std::vector<int> caches_computing(const BatchPlan& plan);
  static void caches_computed(const BatchPlan& plan, const std::vector<int>& before);
  // The backend's own cache object for `positions` positions (its bytes already reserved from the budget).
  virtual std::unique_ptr<KVCache> allocate_kv_cache(int positions, uint64_t bytes) = 0;
  // copy_kv's copy, after its checks. Both caches hold [layer][keys | values][position][kv_dim] tables of
  // their own number of positions.
  // The default throws Error(Unavailable).
  virtual void copy_kv_tables(const KVCache& from, KVCache& to, int positions);
  // The bound the budget starts with; a device backend may lower it once it knows its free memory.
  void set_kv_cache_budget(uint64_t bytes);
  ThreadPool& host_pool() const { return *pool_; }

  ModelConfig config_;
  std::vector<std::string> unused_tensors_;  // set by the backend's load from ModelWeights::unused

 private:
  KVCacheDType kv_dtype_;
  std::shared_ptr<KVCache::Account> account_;
  std::mutex reclaimer_mu_;
  std::pair<const void*, std::function<bool()>> reclaimer_;  // owner, function
  std::unique_ptr<ThreadPool> pool_;
};

// Host-side sampling of one task from its rows of logits (`uncond` nullptr without cfg): applies cfg in
// place, then the rule (sample_row), the top logprobs and the target's log-probability. Used by the
// default predict() and by tests that check a device's sampling against it. `scratch` (vocab ints) is
// reused by top-k / top-p filtering.
void sample_task(float* logits, const float* uncond, int row_size, const RowTask& task, RowResult& out,
                 std::vector<int32_t>* scratch = nullptr);

}  // namespace vdiff
