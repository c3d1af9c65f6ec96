// What every backend shares: the factory, the KV-cache budget, the checks of a forward's batch and the
// host-side sampling of rows.
#include "backend.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <new>
#include <set>

#include "cpu/backend_cpu.h"
#include "error.h"
#include "sampler.h"
#include "threadpool.h"
#ifndef VDIFF_WITH_CUDA
#define VDIFF_WITH_CUDA 0
#endif
#if VDIFF_WITH_CUDA
#include "cuda/cuda_backend.h"
#endif

namespace vdiff {

const char* device_name(Device device) {
  switch (device) {
    case Device::Auto: return "auto";
    case Device::Cpu: return "cpu";
    case Device::Cuda: return "cuda";
  }
  return "?";
}

// ---- the factory ----------------------------------------------------------------------------------

bool Backend::cuda_built() { return VDIFF_WITH_CUDA != 0; }

int Backend::cuda_devices() {
#if VDIFF_WITH_CUDA
  return cuda::device_count();
#else
  return 0;
#endif
}

std::unique_ptr<Backend> Backend::load(const std::string& dir, const LoadOptions& options) {
  Device device = options.device;
  if (device == Device::Auto) device = cuda_devices() > 0 ? Device::Cuda : Device::Cpu;
  try {
    if (device == Device::Cpu) return cpu::load(dir, options);
    if (options.quantize != Quant::None)
      throw Error(ErrorCode::InvalidArgument,
                  "quantizing at load (q8_0, q4_0) is done by the CPU backend only; "
                  "serve a quantized model with --device cpu");
#if VDIFF_WITH_CUDA
    if (cuda::device_count() == 0)
      throw Error(ErrorCode::Unavailable, "device cuda: no CUDA GPU is visible (no device, or no driver)");
    return cuda::load(dir, options);
#else
    throw Error(ErrorCode::Unavailable,
                "device cuda: this build of vdiff has no CUDA backend (nvcc was not found "
                "when it was built, or it was built with VDIFF_CUDA=OFF)");
#endif
  } catch (const std::bad_alloc&) {
    throw Error(ErrorCode::OutOfMemory, dir + ": out of memory while loading the model");
  }
}

Backend::Backend(const ModelConfig& config, const LoadOptions& options)
    : config_(config),
      kv_dtype_(options.kv_cache_dtype),
      account_(std::make_shared<KVCache::Account>()),
      pool_(std::make_unique<ThreadPool>(options.threads)) {
  set_kv_cache_budget(options.kv_cache_budget_bytes);
}

Backend::~Backend() = default;

// ---- KV caches and their budget -------------------------------------------------------------------

// Bytes the caches made from one budget hold, shared with every cache so a cache may outlive its backend.
struct KVCache::Account {
  std::atomic<uint64_t> live{0};
  std::atomic<uint64_t> budget{0};  // 0: no bound
};

KVCache::~KVCache() {
  if (account_) account_->live -= bytes_;
}

void Backend::set_kv_cache_budget(uint64_t bytes) { account_->budget = bytes; }
uint64_t Backend::kv_cache_live_bytes() const { return account_->live.load(); }
uint64_t Backend::kv_cache_budget_bytes() const { return account_->budget.load(); }

uint64_t Backend::kv_cache_bytes(int positions) const {
  const uint64_t kv_dim = static_cast<uint64_t>(config_.n_kv_heads) * config_.head_dim();
  return static_cast<uint64_t>(config_.n_layers) * static_cast<uint64_t>(std::max(positions, 0)) * kv_dim * 2 *
         (kv_dtype_ == KVCacheDType::F32 ? 4 : 2);
}

static std::string size_text(uint64_t b) {
  if (b < 1024) return std::to_string(b) + (b == 1 ? " byte" : " bytes");
  return b < (10u << 20) ? std::to_string((b + 1023) >> 10) + " KiB"
                         : std::to_string((b + (1 << 20) - 1) >> 20) + " MiB";
}

void Backend::set_kv_reclaimer(const void* owner, std::function<bool()> reclaimer) {
  std::lock_guard<std::mutex> lock(reclaimer_mu_);
  if (reclaimer) reclaimer_ = {owner, std::move(reclaimer)};
  else if (reclaimer_.first == owner) reclaimer_ = {};
}

std::unique_ptr<KVCache> Backend::make_kv_cache(int positions, bool reclaim) {
  if (positions < 1 || positions > config_.max_sequence_length)
    throw Error(ErrorCode::InvalidArgument, "KV cache: " + std::to_string(positions) + " positions is outside [1, " +
                                                std::to_string(config_.max_sequence_length) + "]");
  const uint64_t bytes = kv_cache_bytes(positions), budget = account_->budget.load();
  if (budget > 0 && bytes > budget)
    throw Error(ErrorCode::InvalidArgument, "KV cache for " + std::to_string(positions) + " positions needs " +
                                                size_text(bytes) + ", more than the whole cache budget of " +
                                                size_text(budget));
  // Reserve the bytes first (other threads may be making caches too), then allocate.
  uint64_t live = account_->live.load();
  // When they do not fit, the reclaimer (the prefix cache) frees what it holds, one entry at a time.
  for (;;) {
    if (budget > 0 && live + bytes > budget) {
      bool freed = false;
      if (reclaim) {
        std::lock_guard<std::mutex> lock(reclaimer_mu_);
        freed = reclaimer_.second && reclaimer_.second();
      }
      if (!freed)
        throw Error(ErrorCode::OutOfMemory, "KV cache budget exhausted: " + size_text(bytes) + " wanted, " +
                                                size_text(live) + " of " + size_text(budget) + " held by live caches");
      live = account_->live.load();
      continue;  // check the budget again
    }
    if (account_->live.compare_exchange_weak(live, live + bytes)) break;
  }
  std::unique_ptr<KVCache> cache;
  try {
    cache = allocate_kv_cache(positions, bytes);
  } catch (const std::bad_alloc&) {
    account_->live -= bytes;
    throw Error(ErrorCode::OutOfMemory, "cannot allocate a KV cache of " + size_text(bytes));
  } catch (...) {
    account_->live -= bytes;
    throw;
  }
  cache->account_ = account_;  // from here on the cache returns its bytes when it is freed
  cache->owner_ = this;
  cache->positions_ = positions;
  cache->bytes_ = bytes;
  return cache;
}

void Backend::copy_kv(const KVCache& from, KVCache& to, int positions) {
  if (from.owner() != this || to.owner() != this)
    throw Error(ErrorCode::InvalidArgument, "copy_kv: a KV cache made by another backend");
  if (positions < 0 || positions > from.positions() || positions > to.positions() || positions > from.cached_until())
    throw Error(ErrorCode::InvalidArgument, "copy_kv: " + std::to_string(positions) + " positions from a cache of " +
                                                std::to_string(from.positions()) + " (cached to " +
                                                std::to_string(from.cached_until()) + ") into one of " +
                                                std::to_string(to.positions()));
  if (positions == 0) return;
  copy_kv_tables(from, to, positions);
  to.set_cached_until(std::max(to.cached_until(), positions));
}

void Backend::copy_kv_tables(const KVCache&, KVCache&, int) {
  throw Error(ErrorCode::Unavailable, "this backend does not copy KV caches");
}

// ---- the checks of a forward's batch --------------------------------------------------------------

std::vector<int> Backend::caches_computing(const BatchPlan& plan) {
  // A whole-canvas refresh is not filled until every layer is done (a cancel in between leaves it unusable
  // for reads). A read keeps its cache filled: a cancel leaves its computed range half written, and
  // retrying the same range rewrites it. Block-causal: until the call completes, only the keys before
  // `begin` are known good.
  std::vector<int> cached_before(plan.seqs.size(), 0);
  for (size_t s = 0; s < plan.seqs.size(); ++s) {
    const BatchPlan::Seq& p = plan.seqs[s];
    if (!p.cache) continue;
    if (p.block > 0) {
      cached_before[s] = p.cache->cached_until();
      p.cache->set_cached_until(std::min(cached_before[s], p.begin));
      if (p.begin == 0 && p.end == p.length) p.cache->set_filled(false);
    } else if (!p.reads_cache) {
      p.cache->set_filled(false);
    }
  }
  return cached_before;
}

void Backend::caches_computed(const BatchPlan& plan, const std::vector<int>& before) {
  for (size_t s = 0; s < plan.seqs.size(); ++s) {
    const BatchPlan::Seq& p = plan.seqs[s];
    if (!p.cache) continue;
    if (p.block > 0) {
      p.cache->set_cached_until(std::max(before[s], p.end));
      if (p.begin == 0 && p.end == p.length) p.cache->set_filled(true);
    } else {
      p.cache->set_filled(true);
    }
  }
}

BatchPlan Backend::check_batch(const std::vector<ForwardSeq>& batch) const {
  BatchPlan plan;
  std::set<const KVCache*> caches;
  for (size_t s = 0; s < batch.size(); ++s) {
    const ForwardSeq& seq = batch[s];
    const std::string where = "forward: sequence " + std::to_string(s) + ": ";
    const auto invalid = [&where](const std::string& what) { return Error(ErrorCode::InvalidArgument, where + what); };
    if (seq.length < 1 || !seq.tokens) throw invalid("empty");
    if (seq.length > config_.max_sequence_length)
      throw invalid("length " + std::to_string(seq.length) + " exceeds max_sequence_length " +
                    std::to_string(config_.max_sequence_length));
    for (int i = 0; i < seq.length; ++i)
      if (seq.tokens[i] < 0 || seq.tokens[i] >= config_.embedding_size)
        throw invalid("token " + std::to_string(seq.tokens[i]) + " at position " + std::to_string(i) +
                      " is outside [0, " + std::to_string(config_.embedding_size) + ")");
    const int begin = seq.compute_begin, end = seq.compute_end == -1 ? seq.length : seq.compute_end;
    const auto range = [&] {
      char text[64];
      std::snprintf(text, sizeof text, "[%d, %d)", begin, end);
      return std::string(text);
    };
    if (begin < 0 || end > seq.length || begin >= end)
      throw invalid("compute range " + range() + " is not a non-empty part of [0, " + std::to_string(seq.length) + ")");
    const bool whole = begin == 0 && end == seq.length;
    const int block = seq.attention_block;
    if (block < 0) throw invalid("attention_block " + std::to_string(block) + " is negative");
    if (seq.cache) {
      if (seq.cache->owner() != this) throw invalid("the KV cache was made by another model");
      if (seq.cache->positions() != seq.length)
        throw invalid("the KV cache serves " + std::to_string(seq.cache->positions()) + " positions, the canvas has " +
                      std::to_string(seq.length));
      if (!caches.insert(seq.cache).second) throw invalid("the same KV cache appears twice in one forward");
    }
    if (block > 0) {
      // Block-causal: the computed queries attend the keys before their block's end, which this call computes
      // (the range ends at a block boundary or the canvas's end); the keys before `begin` come from the cache.
      if (end != seq.length && end % block != 0)
        throw invalid("compute range " + range() + " ends inside a block of " + std::to_string(block) +
                      " positions (its queries attend keys past it)");
      if (seq.cache && seq.cache->cached_until() < begin)
        throw invalid("the KV cache holds keys up to position " + std::to_string(seq.cache->cached_until()) +
                      ": computing " + range() + " needs them up to " + std::to_string(begin));
      if (!seq.cache && begin != 0) throw invalid("computing " + range() + " (not from position 0) needs a KV cache");
    } else if (seq.cache) {
      if (!whole && !seq.cache->filled())
        throw invalid("the KV cache is not filled: computing " + range() +
                      " needs a forward over the whole canvas first");
    } else if (!whole) {
      throw invalid("computing only " + range() + " of the canvas needs a KV cache");
    }
    if (seq.n_logit_rows < 0 || (seq.n_logit_rows > 0 && !seq.logit_rows)) throw invalid("bad logit rows");
    for (int r = 0; r < seq.n_logit_rows; ++r)
      if (seq.logit_rows[r] < begin || seq.logit_rows[r] >= end)
        throw invalid("logit row " + std::to_string(seq.logit_rows[r]) + " is outside " +
                      (whole ? "[0, " + std::to_string(seq.length) + ")" : "the computed range " + range()));
    plan.seqs.push_back(BatchPlan::Seq{plan.tokens, begin, end, seq.length, seq.cache,
                                       block > 0 ? seq.cache && begin > 0 : !whole && seq.cache, block});
    plan.tokens += end - begin;
    plan.rows += seq.n_logit_rows;
    plan.max_length = std::max(plan.max_length, seq.length);
  }
  return plan;
}

// ---- sampling rows on the host --------------------------------------------------------------------

void sample_task(float* logits, const float* uncond, int row_size, const RowTask& task, RowResult& out,
                 std::vector<int32_t>* scratch) {
  int bad = 0;  // NaN or +inf (NaN < inf is false), without a branch per element
  for (int i = 0; i < row_size; ++i) bad |= !(logits[i] < std::numeric_limits<float>::infinity());
  if (uncond)
    for (int i = 0; i < row_size; ++i) bad |= !(uncond[i] < std::numeric_limits<float>::infinity());
  out.finite = bad == 0;
  if (uncond) apply_cfg(logits, uncond, static_cast<size_t>(row_size), task.cfg_scale);
  if (task.rule) task.rule->adjust(logits, task.position);
  if (task.penalties) task.penalties->apply(logits, row_size);
  out.n_top = 0;
  // The distribution the log-probabilities are read from is the row after the rule's changes (its
  // EOS/EOT options), the one the committed token's probability comes from.
  int vocab = row_size, mask = -1;
  if (task.rule) {
    const RowChoice choice = sample_row(logits, *task.rule, Rng(row_key(task.seed, task.step, task.position)), scratch);
    out.token = choice.token;
    out.probability = choice.probability;
    out.confidence = choice.confidence;
    vocab = std::min(task.rule->vocab_size, row_size);
    mask = task.rule->mask_token_id;
  } else if (task.top_vocab > 0) {
    vocab = std::min(task.top_vocab, row_size);
    mask = task.top_mask;
  }
  const int n_top = std::clamp(task.top_logprobs, 0, kMaxTopLogprobs);
  if (n_top == 0 && task.target < 0) return;
  double max = -std::numeric_limits<double>::infinity();
  for (int i = 0; i < row_size; ++i) max = std::max(max, static_cast<double>(logits[i]));
  double sum = 0.0;
  for (int i = 0; i < row_size; ++i) sum += std::exp(static_cast<double>(logits[i]) - max);
  const double log_sum = std::log(sum);
  if (task.target >= 0 && task.target < row_size) {
    out.target_logprob = static_cast<double>(logits[task.target]) - max - log_sum;
    if (task.rank_vocab > 0) {
      const float own = logits[task.target];
      int above = 0;
      for (int i = 0; i < std::min(task.rank_vocab, row_size); ++i) above += i != task.rank_mask && logits[i] > own;
      out.target_rank = 1 + above;
    }
  }
  // The n_top likeliest tokens that could be drawn (not the mask, not head padding, not a logit of -inf:
  // barred or not allowed), kept sorted by an insertion pass: most rows reject a token at the first
  // comparison.
  for (int i = 0; i < vocab && n_top > 0; ++i) {
    if (i == mask || std::isnan(logits[i]) || logits[i] == -std::numeric_limits<float>::infinity()) continue;
    const float l = logits[i];
    if (out.n_top == n_top && !(l > out.top[n_top - 1].logprob)) continue;
    int at = std::min(out.n_top, n_top - 1);
    while (at > 0 && l > out.top[at - 1].logprob) {
      out.top[at] = out.top[at - 1];
      --at;
    }
    out.top[at] = TopLogprob{i, l};
    out.n_top = std::min(out.n_top + 1, n_top);
  }
  for (int j = 0; j < out.n_top; ++j)
    out.top[j].logprob = static_cast<float>(static_cast<double>(out.top[j].logprob) - max - log_sum);
}

void Backend::predict(const std::vector<ForwardSeq>& batch, const std::vector<RowTask>& tasks, RowResult* out,
                      const std::atomic<bool>* cancel) {
  size_t rows = 0;
  for (const ForwardSeq& s : batch) rows += static_cast<size_t>(std::max(s.n_logit_rows, 0));
  const size_t row_size = static_cast<size_t>(config_.embedding_size);
  // Not zero-filled: with cfg and a batch of 8 at LLaDA's vocabulary this is a few hundred MB, and the
  // forward writes every element.
  std::unique_ptr<float[]> logits;
  try {
    logits.reset(new float[std::max<size_t>(rows, 1) * row_size]);
  } catch (const std::bad_alloc&) {
    throw Error(ErrorCode::OutOfMemory, "cannot allocate the logits of " + std::to_string(rows) + " rows");
  }
  forward(batch, logits.get(), cancel);
  for (const RowTask& t : tasks)
    if (t.cond < 0 || static_cast<size_t>(t.cond) >= rows || t.uncond >= static_cast<int>(rows))
      throw Error(ErrorCode::Internal, "predict: a task names a row the forward did not compute");
  // Per worker thread: the index buffer top-k / top-p filtering sorts, reserved here so that the workers
  // never allocate (the pool's functions must not throw).
  std::vector<std::vector<int32_t>> scratch(pool_->size());
  const bool filtering =
      std::any_of(tasks.begin(), tasks.end(), [](const RowTask& t) { return t.rule && t.rule->filters(); });
  if (filtering)
    for (std::vector<int32_t>& buffer : scratch) buffer.reserve(row_size);
  pool_->parallel_for(tasks.size(), [&](size_t begin, size_t end, int thread) {
    for (size_t j = begin; j < end; ++j) {
      const RowTask& t = tasks[j];
      float* row = logits.get() + static_cast<size_t>(t.cond) * row_size;
      const float* un = t.uncond >= 0 ? logits.get() + static_cast<size_t>(t.uncond) * row_size : nullptr;
      sample_task(row, un, static_cast<int>(row_size), t, out[j], &scratch[thread]);
    }
  });
  if (cancel && cancel->load()) throw Error(ErrorCode::Cancelled, "step cancelled");
}

}  // namespace vdiff
