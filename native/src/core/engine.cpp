// The step engine: owns the live sequences and advances a batch of them by one step per call: every
// sequence says what its forward is (sequence.h), one batched forward runs them all, and each sequence
// gets its sampled rows back. Two decodings: the full canvas (LLaDA, here) and block diffusion (LLaDA2.x,
// SDAR; block_decoding.h) and Dream's (dream_decoding.h), chosen by the model's ModelConfig::decoding.
//
// One step of one full-canvas sequence, as in LLaDA's reference generate():
//   1. the current block's schedule says how many tokens k to commit now (k = 0: nothing to do);
//   2. the model predicts every still-masked position of the current block (with cfg, a second copy of
//      the canvas whose prompt and suffix are masked runs in the same batched forward);
//   3. each such row picks a token x0 (argmax, or Gumbel-max with temperature, optionally restricted to
//      the top-k / top-p candidates; never the mask token, see sampler.h) and a confidence;
//   4. the k most confident rows are committed. Committed tokens are never masked again.
// With parallel decoding, step 1 has no quota and step 4 commits the rows select_parallel picks. A block
// is done when it has no mask left; then, with early stop, an answer that has ended is finished at once
// (the remaining blocks filled with EOS) instead of denoising the blocks after it.
// With a KV cache, step 2's forward is a refresh (the whole canvas, written into the cache) at a block's
// first step, else a read computing only the block (dual) or the block and what follows (prefix).
#include "engine.h"

#include <algorithm>
#include <cmath>
#include <new>
#include <set>
#include <string>

#include "block_decoding.h"
#include "dream_decoding.h"
#include "error.h"
#include "sampler.h"
#include "sequence.h"

namespace vdiff {

class FullCanvasSequence final : public Sequence {
 public:
  // Prompt, answer, suffix; mask tokens where nothing is committed (only ever in the answer).
  std::vector<int32_t> canvas;
  int suffix = 0;
  std::vector<BlockPlan> blocks;
  std::vector<int> block_masks;  // per block: the positions to denoise (fewer than its length with a template)
  bool templated = false;        // created with a template: some answer positions were fixed from the start
  // Progress: the block being worked on and the steps already spent on it.
  int block = 0;
  int step_in_block = 0;
  // KV caches (KVCacheMode other than None): one per canvas the forward sees (two with cfg); freed as
  // soon as the sequence finishes. cache_block: the block of their last refresh (-1: none yet).
  std::unique_ptr<KVCache> cache, uncond_cache;
  int cache_block = -1;

  int answer_begin() const { return prompt_length; }
  int answer_end() const { return prompt_length + params.gen_length; }
  bool parallel() const { return params.parallel_threshold > 0.0 || params.parallel_factor > 0.0; }
  // The first block at or after `from` that has a position to denoise; blocks.size() when none has.
  int open_block(int from) const {
    while (from < static_cast<int>(blocks.size()) && block_masks[from] == 0) ++from;
    return from;
  }
  std::vector<int32_t> answer() const override {
    return std::vector<int32_t>(canvas.begin() + answer_begin(), canvas.begin() + answer_end());
  }
  int suffix_length() const override { return suffix; }
  uint64_t cache_bytes() const override {
    return (cache ? cache->size() : 0) + (uncond_cache ? uncond_cache->size() : 0);
  }
  uint64_t memory_bytes() const override {
    return sizeof(FullCanvasSequence) + canvas.capacity() * sizeof(int32_t) + blocks.capacity() * sizeof(BlockPlan) +
           cache_bytes();
  }

  void plan(StepWork& w, const ModelConfig& config) const override;
  void decide(StepWork& w, const RowResult* rows, StepOutput& out, const ModelConfig& config) const override;
  void apply(const StepWork& w, StepOutput& out, const ModelConfig& config) override;
};

static Error invalid(const std::string& message, const std::string& param = "") {
  return Error(ErrorCode::InvalidArgument, message, param);
}

Engine::Engine(std::shared_ptr<Backend> backend, const EngineOptions& options)
    : backend_(std::move(backend)), options_(options) {
  if (!backend_) throw invalid("Engine needs a backend");
  if (options.prefill_chunk < 0)
    throw invalid("prefill_chunk " + std::to_string(options.prefill_chunk) + " is negative");
  if (options.prefix_cache_bytes > 0 && backend_->config().decoding == Decoding::Block) {
    prefix_cache_ = std::make_shared<PrefixCache>(*backend_, options.prefix_cache_bytes);
    PrefixCache* cache = prefix_cache_.get();
    backend_->set_kv_reclaimer(cache, [cache] { return cache->evict_one(); });
  }
}

Engine::~Engine() {
  if (prefix_cache_) backend_->set_kv_reclaimer(prefix_cache_.get(), nullptr);
}

PrefixCacheStats Engine::prefix_cache_stats() const {
  return prefix_cache_ ? prefix_cache_->stats() : PrefixCacheStats{};
}

// A row whose logits hold NaN or +inf (RowResult::finite); id 0: a scored canvas, `position` in it.
static Error non_finite(uint64_t id, int position) {
  return Error(ErrorCode::Numeric,
               (id == 0 ? "canvas position " : "sequence " + std::to_string(id) + ": answer position ") +
                   std::to_string(position) +
                   ": the model's logits hold NaN or infinity (weights that are not finite, or activations beyond "
                   "the range of the model's dtype); nothing was committed");
}

// Token ids of a prompt or suffix: in the vocabulary, and not the mask token.
static void validate_tokens(const std::vector<int32_t>& tokens, const char* name, const ModelConfig& c) {
  const int vocab = c.embedding_size;
  for (size_t i = 0; i < tokens.size(); ++i) {
    const std::string at = std::string(name) + "[" + std::to_string(i) + "]";
    if (tokens[i] < 0 || tokens[i] >= vocab)
      throw invalid(
          at + " = " + std::to_string(tokens[i]) + " is outside the vocabulary [0, " + std::to_string(vocab) + ")",
          name);
    // The reference would treat a mask token in the context as a hole to fill; holes are the answer's
    // masks only, so it is refused rather than silently rewritten.
    if (tokens[i] == c.mask_token_id) throw invalid(at + " is the mask token " + std::to_string(c.mask_token_id), name);
  }
}

static void validate(const std::vector<int32_t>& prompt, const std::vector<int32_t>& suffix, const SamplingParams& p,
                     const ModelConfig& c) {
  const int vocab = c.embedding_size;
  // An empty prompt is allowed: it is unconditional generation (the reference handles it the same way;
  // with cfg the unconditional copy is then identical to the conditional one).
  validate_tokens(prompt, "prompt", c);
  validate_tokens(suffix, "suffix", c);
  if (p.gen_length < 1)
    throw invalid("gen_length must be >= 1 (got " + std::to_string(p.gen_length) + ")", "gen_length");
  if (p.block_length < 1)
    throw invalid("block_length must be >= 1 (got " + std::to_string(p.block_length) + ")", "block_length");
  if (p.steps < 1) throw invalid("steps must be >= 1 (got " + std::to_string(p.steps) + ")", "steps");
  const int64_t total = static_cast<int64_t>(prompt.size()) + p.gen_length + static_cast<int64_t>(suffix.size());
  if (total > c.max_sequence_length)
    throw invalid("prompt of " + std::to_string(prompt.size()) + " tokens plus gen_length " +
                      std::to_string(p.gen_length) +
                      (suffix.empty() ? "" : " plus suffix of " + std::to_string(suffix.size()) + " tokens") +
                      " exceeds the model context of " + std::to_string(c.max_sequence_length),
                  "gen_length");
  if (!(p.temperature >= 0.0) || !std::isfinite(p.temperature))
    throw invalid("temperature must be a finite number >= 0 (got " + std::to_string(p.temperature) + ")",
                  "temperature");
  // Bounded so that (scale + 1) * (cond - uncond) stays a float (1e39 overflowed to garbage).
  if (!(p.cfg_scale >= 0.0 && p.cfg_scale <= 1000.0))
    throw invalid("cfg_scale must be in [0, 1000] (got " + std::to_string(p.cfg_scale) + ")", "cfg_scale");
  if (p.remasking != Remasking::LowConfidence && p.remasking != Remasking::Random)
    throw invalid("remasking must be low_confidence or random", "remasking");
  if (p.eot_token_id != -1 && (p.eot_token_id < 0 || p.eot_token_id >= vocab))
    throw invalid("eot_token_id " + std::to_string(p.eot_token_id) + " is outside the vocabulary [0, " +
                      std::to_string(vocab) + ") (use -1 for none)",
                  "eot_token_id");
  if (p.min_tokens < 0 || p.min_tokens > p.gen_length)
    throw invalid("min_tokens must be in [0, gen_length " + std::to_string(p.gen_length) + "] (got " +
                      std::to_string(p.min_tokens) + ")",
                  "min_tokens");
  for (size_t i = 0; i < p.stop_token_ids.size(); ++i)
    if (p.stop_token_ids[i] < 0 || p.stop_token_ids[i] >= vocab)
      throw invalid("stop_token_ids[" + std::to_string(i) + "] = " + std::to_string(p.stop_token_ids[i]) +
                        " is outside the vocabulary [0, " + std::to_string(vocab) + ")",
                    "stop_token_ids");
  for (size_t i = 0; i < p.logit_bias.size(); ++i) {
    const auto& [id, bias] = p.logit_bias[i];
    const std::string at = "logit_bias[" + std::to_string(i) + "]";
    if (id < 0 || id >= vocab)
      throw invalid(
          at + ": token " + std::to_string(id) + " is outside the vocabulary [0, " + std::to_string(vocab) + ")",
          "logit_bias");
    if (!(bias >= -100.0f && bias <= 100.0f))
      throw invalid(at + ": bias " + std::to_string(bias) + " is outside [-100, 100]", "logit_bias");
  }
  for (size_t i = 0; i < p.end_token_ids.size(); ++i)
    if (p.end_token_ids[i] < 0 || p.end_token_ids[i] >= vocab)
      throw invalid("end_token_ids[" + std::to_string(i) + "] = " + std::to_string(p.end_token_ids[i]) +
                        " is outside the vocabulary [0, " + std::to_string(vocab) + ")",
                    "end_token_ids");
  // An allowed token the model can write at every position: the first ones bar the most (min_tokens).
  const RowRule rule = RowRule::of(p, c);
  std::set<int32_t> barred_first;
  rule.for_each_barred(0, [&](int32_t id) { barred_first.insert(id); });
  bool drawable = p.allowed_token_ids.empty();
  for (size_t i = 0; i < p.allowed_token_ids.size(); ++i) {
    const int32_t id = p.allowed_token_ids[i];
    if (id < 0 || id >= vocab)
      throw invalid("allowed_token_ids[" + std::to_string(i) + "] = " + std::to_string(id) +
                        " is outside the vocabulary [0, " + std::to_string(vocab) + ")",
                    "allowed_token_ids");
    drawable = drawable || (id != c.mask_token_id && id < c.vocab_size && !barred_first.count(id));
  }
  if (!drawable)
    throw invalid("allowed_token_ids holds no token the model can write" +
                      std::string(barred_first.empty() ? "" : " where min_tokens / ignore_eos bar the end tokens"),
                  "allowed_token_ids");
  // Each position's set: indexes in range, ids in the vocabulary, and a token the model can write there
  // (within allowed_token_ids, when given).
  for (size_t i = 0; i < p.position_allowed.size(); ++i) {
    const int32_t set = p.position_allowed[i];
    if (set < -1 || set >= static_cast<int32_t>(p.allowed_sets.size()))
      throw invalid("position_allowed[" + std::to_string(i) + "] = " + std::to_string(set) + " names no set (" +
                        std::to_string(p.allowed_sets.size()) + " given)",
                    "position_allowed");
  }
  for (size_t s = 0; s < p.allowed_sets.size(); ++s) {
    bool writable = false;
    for (const int32_t id : p.allowed_sets[s]) {
      if (id < 0 || id >= vocab)
        throw invalid("allowed_sets[" + std::to_string(s) + "] holds " + std::to_string(id) +
                          ", outside the vocabulary [0, " + std::to_string(vocab) + ")",
                      "allowed_sets");
      writable =
          writable || (id != c.mask_token_id && id < c.vocab_size &&
                       (rule.allowed.empty() || std::binary_search(rule.allowed.begin(), rule.allowed.end(), id)));
    }
    if (!writable)
      throw invalid("allowed_sets[" + std::to_string(s) + "] holds no token the model can write" +
                        std::string(rule.allowed.empty() ? "" : " within allowed_token_ids"),
                    "allowed_sets");
  }
  if (p.top_k < 0) throw invalid("top_k must be >= 0 (0: off) (got " + std::to_string(p.top_k) + ")", "top_k");
  if (!(p.top_p > 0.0 && p.top_p <= 1.0))
    throw invalid("top_p must be in (0, 1] (1: off) (got " + std::to_string(p.top_p) + ")", "top_p");
  if (!(p.min_p >= 0.0 && p.min_p <= 1.0))
    throw invalid("min_p must be in [0, 1] (0: off) (got " + std::to_string(p.min_p) + ")", "min_p");
  if (!(p.presence_penalty >= -2.0 && p.presence_penalty <= 2.0))
    throw invalid("presence_penalty must be in [-2, 2] (0: off) (got " + std::to_string(p.presence_penalty) + ")",
                  "presence_penalty");
  if (!(p.frequency_penalty >= -2.0 && p.frequency_penalty <= 2.0))
    throw invalid("frequency_penalty must be in [-2, 2] (0: off) (got " + std::to_string(p.frequency_penalty) + ")",
                  "frequency_penalty");
  if (!(p.repetition_penalty > 0.0 && p.repetition_penalty <= 2.0))
    throw invalid("repetition_penalty must be in (0, 2] (1: off) (got " + std::to_string(p.repetition_penalty) + ")",
                  "repetition_penalty");
  if (!(p.parallel_threshold >= 0.0 && p.parallel_threshold <= 1.0))
    throw invalid("parallel_threshold must be in [0, 1] (0: off) (got " + std::to_string(p.parallel_threshold) + ")",
                  "parallel_threshold");
  if (!(p.parallel_factor >= 0.0) || !std::isfinite(p.parallel_factor))
    throw invalid(
        "parallel_factor must be a finite number >= 0 (0: off) (got " + std::to_string(p.parallel_factor) + ")",
        "parallel_factor");
  if (p.parallel_threshold > 0.0 && p.parallel_factor > 0.0)
    throw invalid("parallel_threshold and parallel_factor cannot both be set", "parallel_factor");
  if (p.kv_cache != KVCacheMode::None && p.kv_cache != KVCacheMode::Prefix && p.kv_cache != KVCacheMode::Dual)
    throw invalid("kv_cache must be none, prefix or dual", "kv_cache");
  if (p.top_logprobs < 0 || p.top_logprobs > kMaxTopLogprobs)
    throw invalid("top_logprobs must be in [0, " + std::to_string(kMaxTopLogprobs) + "] (got " +
                      std::to_string(p.top_logprobs) + ")",
                  "top_logprobs");
  if (p.kv_refresh_interval < 0)
    throw invalid("kv_refresh_interval must be >= 0 (0: only at block starts) (got " +
                      std::to_string(p.kv_refresh_interval) + ")",
                  "kv_refresh_interval");
  if (!(p.editing_threshold <= 1.0))
    throw invalid(
        "editing_threshold must be in [0, 1], or < 0 for no editing (got " + std::to_string(p.editing_threshold) + ")",
        "editing_threshold");
  if (p.max_post_steps < 0)
    throw invalid("max_post_steps must be >= 0 (got " + std::to_string(p.max_post_steps) + ")", "max_post_steps");
  if (c.decoding != Decoding::Block && p.editing_threshold >= 0.0)
    throw invalid("editing_threshold: token editing is for block-diffusion models (LLaDA2.1); model type " +
                      c.model_type + " denoises the full canvas",
                  "editing_threshold");
}

// A template (gen_length entries: -1 to denoise, else a token fixed there) that any decoding can take: of
// the answer's length, with ids the model can hold other than the mask, no end token where min_tokens or
// ignore_eos bar it, and at least one position to denoise.
static void check_template(const std::vector<int32_t>& answer_template, const SamplingParams& params,
                           const ModelConfig& config) {
  if (static_cast<int>(answer_template.size()) != params.gen_length)
    throw invalid("template has " + std::to_string(answer_template.size()) + " positions, gen_length is " +
                      std::to_string(params.gen_length),
                  "template");
  int open = 0;
  const RowRule rule = RowRule::of(params, config);
  for (size_t i = 0; i < answer_template.size(); ++i) {
    const int32_t t = answer_template[i];
    if (t == -1) {
      ++open;
      continue;
    }
    if (t < 0 || t >= config.embedding_size || t == config.mask_token_id)
      throw invalid("template[" + std::to_string(i) + "] = " + std::to_string(t) +
                        " is neither -1 (to denoise) nor a token id other than the mask",
                    "template");
    rule.for_each_barred(static_cast<int>(i), [&](int32_t id) {
      if (id == t)
        throw invalid("template[" + std::to_string(i) + "] = " + std::to_string(t) +
                          " is an end token, which min_tokens / ignore_eos bar there",
                      "template");
    });
  }
  if (open == 0) throw invalid("template fixes every position of the answer: nothing is left to denoise", "template");
}

uint64_t Engine::create(const std::vector<int32_t>& prompt, const SamplingParams& params,
                        const std::vector<int32_t>& suffix, const std::vector<int32_t>& answer_template) {
  const ModelConfig& config = backend_->config();
  validate(prompt, suffix, params, config);
  if (!answer_template.empty()) check_template(answer_template, params, config);
  // Block diffusion (block_decoding.h) and Dream (dream_decoding.h) validate the rest of their settings and
  // refuse LLaDA's extras.
  if (config.decoding != Decoding::FullCanvas) {
    std::shared_ptr<Sequence> seq = config.decoding == Decoding::Block
                                        ? make_block_sequence(prompt, params, suffix, answer_template, *backend_,
                                                              prefix_cache_, options_.prefill_chunk)
                                        : make_dream_sequence(prompt, params, suffix, answer_template, *backend_);
    return adopt(std::move(seq), prompt);
  }

  auto seq = std::make_shared<FullCanvasSequence>();
  seq->prompt_length = static_cast<int>(prompt.size());
  seq->suffix = static_cast<int>(suffix.size());
  seq->params = params;
  seq->canvas.reserve(prompt.size() + params.gen_length + suffix.size());
  seq->canvas.assign(prompt.begin(), prompt.end());
  seq->canvas.resize(prompt.size() + params.gen_length, config.mask_token_id);
  seq->canvas.insert(seq->canvas.end(), suffix.begin(), suffix.end());
  seq->blocks = plan_blocks(params.gen_length, params.block_length, params.steps);
  seq->block_masks.resize(seq->blocks.size());
  for (size_t b = 0; b < seq->blocks.size(); ++b) {
    BlockPlan& block = seq->blocks[b];
    int masks = block.length;
    if (!answer_template.empty()) {
      // Template positions are committed from the start; a block's steps are spread over its masks only.
      for (int q = block.start; q < block.start + block.length; ++q)
        if (answer_template[q] != -1) seq->canvas[seq->answer_begin() + q] = answer_template[q], --masks;
      block.steps = masks == 0 ? 0 : std::min(block.steps, masks);
    }
    seq->block_masks[b] = masks;
  }
  seq->templated = !answer_template.empty();
  seq->block = seq->open_block(0);
  // Parallel decoding commits at least one token a step, so a block takes at most its masks in steps.
  if (seq->parallel())
    for (int m : seq->block_masks) seq->steps_total += m;
  else
    for (const BlockPlan& b : seq->blocks) seq->steps_total += b.steps;
  if (params.kv_cache != KVCacheMode::None) {
    const int length = static_cast<int>(seq->canvas.size());
    seq->cache = backend_->make_kv_cache(length);
    if (params.cfg_scale > 0.0) seq->uncond_cache = backend_->make_kv_cache(length);
  }

  return adopt(std::move(seq), prompt);
}

uint64_t Engine::adopt(std::shared_ptr<Sequence> seq, const std::vector<int32_t>& prompt) {
  if (seq->params.repetition_penalty != 1.0) seq->penalised_prompt = prompt;
  seq->rule = RowRule::of(seq->params, backend_->config());
  std::lock_guard<std::mutex> lock(mu_);
  const uint64_t id = next_id_++;
  seq->id = id;
  sequences_.emplace(id, std::move(seq));
  return id;
}

std::shared_ptr<Sequence> Engine::get(uint64_t id) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = sequences_.find(id);
  if (it == sequences_.end()) throw invalid("unknown sequence id " + std::to_string(id));
  return it->second;
}

void Engine::release(uint64_t id) {
  std::shared_ptr<Sequence> dropped;  // destroyed after the lock is released
  std::lock_guard<std::mutex> lock(mu_);
  auto it = sequences_.find(id);
  if (it == sequences_.end()) return;
  dropped = std::move(it->second);
  sequences_.erase(it);
}

std::vector<int32_t> Engine::canvas(uint64_t id) const {
  std::shared_ptr<Sequence> seq = get(id);
  std::lock_guard<std::mutex> lock(mu_);  // a step commits under this lock
  return seq->answer();
}

SequenceInfo Engine::info(uint64_t id) const {
  std::shared_ptr<Sequence> seq = get(id);
  std::lock_guard<std::mutex> lock(mu_);
  return SequenceInfo{seq->prompt_length,   seq->answer_length(), seq->suffix_length(), seq->steps_total,
                      seq->steps_done,      seq->finished,        seq->memory_bytes(),  seq->forward_passes,
                      seq->tokens_denoised, seq->kv_refreshes,    seq->cache_bytes(),   seq->positions_computed,
                      seq->prompt_cached};
}

std::vector<double> Engine::score(const std::vector<int32_t>& canvas, const std::vector<int32_t>& positions,
                                  const std::vector<int32_t>& targets, const std::atomic<bool>* cancel) {
  return score(std::vector<ScoreItem>{ScoreItem{canvas, positions, targets}}, cancel)[0].logprobs;
}

std::vector<Engine::Scored> Engine::score(const std::vector<ScoreItem>& items, const std::atomic<bool>* cancel) {
  const ModelConfig& config = backend_->config();
  const int vocab = std::min(config.vocab_size, config.embedding_size);
  const bool many = items.size() > 1;
  // "score: " for one canvas (as score() always said), "score: items[i]: " for a batch.
  const auto where = [&](size_t i) {
    return std::string("score: ") + (many ? "items[" + std::to_string(i) + "]: " : "");
  };
  if (items.empty()) throw invalid("score: no canvas to score");
  for (size_t i = 0; i < items.size(); ++i) {
    const ScoreItem& item = items[i];
    const int length = static_cast<int>(item.canvas.size());
    if (length < 1 || length > config.max_sequence_length)
      throw invalid(where(i) + "the canvas must hold 1 to " + std::to_string(config.max_sequence_length) +
                    " tokens, got " + std::to_string(length));
    for (int j = 0; j < length; ++j)
      if (item.canvas[j] < 0 || item.canvas[j] >= config.embedding_size)
        throw invalid(where(i) + "canvas[" + std::to_string(j) + "] = " + std::to_string(item.canvas[j]) +
                      " is not a token id");
    if (item.top_logprobs < 0 || item.top_logprobs > kMaxTopLogprobs)
      throw invalid(where(i) + "top_logprobs must be in [0, " + std::to_string(kMaxTopLogprobs) + "], got " +
                    std::to_string(item.top_logprobs));
    if (item.positions.size() != item.targets.size())
      throw invalid(where(i) + std::to_string(item.positions.size()) + " positions but " +
                    std::to_string(item.targets.size()) + " targets");
    for (size_t j = 0; j < item.positions.size(); ++j) {
      if (item.positions[j] < 0 || item.positions[j] >= length)
        throw invalid(where(i) + "positions[" + std::to_string(j) + "] = " + std::to_string(item.positions[j]) +
                      " is outside the canvas");
      if (item.targets[j] < 0 || item.targets[j] >= vocab)
        throw invalid(where(i) + "targets[" + std::to_string(j) + "] = " + std::to_string(item.targets[j]) +
                      " is outside the vocabulary");
    }
  }
  std::vector<Scored> out(items.size());
  // The wanted rows of every canvas, in item order: with shifted logits (Dream) the row predicting
  // position p is the output row p - 1.
  std::vector<std::vector<int32_t>> rows(items.size());
  std::vector<ForwardSeq> seqs;
  std::vector<RowTask> tasks;
  for (size_t i = 0; i < items.size(); ++i) {
    const ScoreItem& item = items[i];
    out[i].logprobs.resize(item.positions.size());
    out[i].top.resize(item.top_logprobs > 0 ? item.positions.size() : 0);
    out[i].ranks.resize(item.rank ? item.positions.size() : 0);
    if (item.positions.empty()) continue;
    for (const int32_t p : item.positions) rows[i].push_back(config.prediction_row(p));
    ForwardSeq seq;
    seq.tokens = item.canvas.data();
    seq.length = static_cast<int>(item.canvas.size());
    seq.logit_rows = rows[i].data();
    seq.n_logit_rows = static_cast<int>(rows[i].size());
    // A block-diffusion model sees its canvas through its block-causal attention.
    if (config.decoding == Decoding::Block) seq.attention_block = config.block_length;
    seqs.push_back(seq);
    for (const int32_t target : item.targets) {
      RowTask task;
      task.cond = static_cast<int>(tasks.size());
      task.target = target;
      // The alternatives: tokens of the vocabulary other than the mask (not head padding).
      task.top_logprobs = item.top_logprobs;
      task.top_vocab = vocab, task.top_mask = config.mask_token_id;
      if (item.rank) task.rank_vocab = vocab, task.rank_mask = config.mask_token_id;
      tasks.push_back(task);
    }
  }
  if (tasks.empty()) return out;
  std::vector<RowResult> results(tasks.size());
  {
    std::lock_guard<std::mutex> step_lock(step_mu_);
    backend_->predict(seqs, tasks, results.data(), cancel);
  }
  size_t r = 0;
  for (size_t i = 0; i < items.size(); ++i) {
    for (size_t j = 0; j < items[i].positions.size(); ++j, ++r) {
      if (!results[r].finite) {
        const Error e = non_finite(0, items[i].positions[j]);
        throw many ? Error(e.code(), "items[" + std::to_string(i) + "]: " + e.what()) : e;
      }
      out[i].logprobs[j] = results[r].target_logprob;
      if (items[i].rank) out[i].ranks[j] = results[r].target_rank;
      if (items[i].top_logprobs == 0) continue;
      std::vector<TopLogprob>& top = out[i].top[j];
      for (int t = 0; t < results[r].n_top && static_cast<int>(top.size()) < items[i].top_logprobs; ++t) {
        const TopLogprob& alt = results[r].top[t];
        if (alt.token != config.mask_token_id && alt.token < vocab) top.push_back(alt);
      }
    }
  }
  return out;
}

size_t Engine::live() const {
  std::lock_guard<std::mutex> lock(mu_);
  return sequences_.size();
}

// ---- one full-canvas step ------------------------------------------------------------------------

void FullCanvasSequence::plan(StepWork& w, const ModelConfig& config) const {
  const int32_t mask = config.mask_token_id;
  const BlockPlan& plan = blocks[block];
  const int masks = block_masks[block];
  w.k = parallel() ? masks : transfers_at(masks, plan.steps, step_in_block);
  if (w.k == 0) return;  // nothing would be committed: no forward needed, the step still counts
  // The candidates are the block's still-masked positions: earlier blocks are complete (a block is
  // left only when it has no mask), later ones wait.
  const int block_begin = prompt_length + plan.start;
  for (int p = block_begin; p < block_begin + plan.length; ++p)
    if (canvas[p] == mask) w.rows.push_back(p);
  if (w.rows.empty()) return;  // cannot happen while k <= masks left in the block; nothing to sample
  const int length = static_cast<int>(canvas.size());
  const int n = static_cast<int>(w.rows.size());
  // With a cache: a refresh computes the whole canvas; a read only the block (dual) or the block and
  // everything after it (prefix). A refresh that was cancelled left its cache not filled.
  int begin = 0, end = length;
  if (cache) {
    const int interval = params.kv_refresh_interval;
    w.refresh = cache_block != block || (interval > 0 && step_in_block % interval == 0) || !cache->filled() ||
                (uncond_cache && !uncond_cache->filled());
    if (!w.refresh) {
      begin = block_begin;
      end = params.kv_cache == KVCacheMode::Dual ? block_begin + plan.length : length;
    }
  }
  w.forwards.push_back(ForwardSeq{canvas.data(), length, w.rows.data(), n, cache.get(), begin, end});
  w.computed = end - begin;
  if (params.cfg_scale > 0.0) {
    w.uncond = canvas;
    std::fill(w.uncond.begin(), w.uncond.begin() + answer_begin(), mask);
    std::fill(w.uncond.begin() + answer_end(), w.uncond.end(), mask);
    w.forwards.push_back(ForwardSeq{w.uncond.data(), length, w.rows.data(), n, uncond_cache.get(), begin, end});
  }
}

void FullCanvasSequence::decide(StepWork& w, const RowResult* rows, StepOutput& out, const ModelConfig& config) const {
  const int32_t mask = config.mask_token_id;
  const SamplingParams& p = params;
  out.block = block;
  std::vector<double> confidence(w.rows.size());
  for (size_t r = 0; r < w.rows.size(); ++r) confidence[r] = rows[r].confidence;
  const int n = static_cast<int>(confidence.size());
  const std::vector<int> chosen = parallel()
                                      ? select_parallel(confidence.data(), n, p.parallel_threshold, p.parallel_factor)
                                      : select_most_confident(confidence.data(), n, w.k);
  for (int r : chosen) {
    const RowResult& c = rows[r];
    out.committed.push_back(CommittedToken{w.rows[r] - answer_begin(), c.token, static_cast<float>(c.probability),
                                           std::vector<TopLogprob>(c.top, c.top + c.n_top)});
  }

  // The block is done when this step committed its last mask.
  const BlockPlan& plan = blocks[block];
  const int block_end = plan.start + plan.length;  // in the answer
  int masks_left = -static_cast<int>(chosen.size());
  for (int q = plan.start; q < block_end; ++q) masks_left += canvas[answer_begin() + q] == mask;
  w.block_done = masks_left == 0;
  const bool last_block = open_block(block + 1) == static_cast<int>(blocks.size());
  w.finishes = w.block_done && last_block;
  // Early stop fills what follows with EOS, which would overwrite a template's fixed tokens: not with one.
  if (w.block_done && !last_block && p.early_stop && !templated) {
    // The answer up to the end of this block is final once this step's tokens are in.
    std::vector<int32_t> answer(canvas.begin() + answer_begin(), canvas.begin() + answer_begin() + block_end);
    for (const CommittedToken& t : out.committed) answer[t.position] = t.token;
    if (answer_has_ended(answer.data(), block_end, config.eos_token_id, p.eot_token_id)) {
      for (int q = block_end; q < answer_length(); ++q)
        out.committed.push_back(CommittedToken{q, config.eos_token_id, 1.0f, {}});
      out.filled = answer_length() - block_end;
      w.finishes = true;
    }
  }
}

void FullCanvasSequence::apply(const StepWork& w, StepOutput& out, const ModelConfig& config) {
  for (const CommittedToken& t : out.committed) canvas[answer_begin() + t.position] = t.token;
  if (w.refresh) cache_block = block;
  if (!w.block_done) {
    ++step_in_block;
  } else if (!w.finishes) {
    block = open_block(block + 1);
    step_in_block = 0;
  } else {
    finished = true;
    const bool eos = std::any_of(canvas.begin() + answer_begin(), canvas.begin() + answer_end(), [&](int32_t t) {
      return t == config.eos_token_id || (params.eot_token_id >= 0 && t == params.eot_token_id);
    });
    reason = eos ? FinishReason::Eos : FinishReason::Length;
    cache.reset();  // never read again
    uncond_cache.reset();
  }
}

// ---- the step -------------------------------------------------------------------------------------

Engine::Pinned Engine::pin(const std::vector<uint64_t>& ids) const {
  Pinned sequences;
  std::set<uint64_t> seen;
  for (uint64_t id : ids) {
    if (!seen.insert(id).second) throw invalid("sequence " + std::to_string(id) + " appears twice in one step");
    sequences.push_back(get(id));
  }
  return sequences;
}

std::vector<StepOutput> Engine::step(const std::vector<uint64_t>& ids, const std::atomic<bool>* cancel) {
  return step_pinned(pin(ids), cancel);
}

std::vector<StepOutput> Engine::step_pinned(const Pinned& sequences, const std::atomic<bool>* cancel) {
  std::lock_guard<std::mutex> step_lock(step_mu_);
  const ModelConfig& config = backend_->config();

  // Check the batch before any work.
  for (const std::shared_ptr<Sequence>& s : sequences)
    if (s->finished) throw invalid("sequence " + std::to_string(s->id) + " is already finished");
  // What the sequences deferred to their first step (a prefix copied from the prefix cache).
  for (const std::shared_ptr<Sequence>& s : sequences) s->prepare();

  // Plan: the forwards and rows each sequence needs, laid out in one batched forward.
  std::vector<StepWork> work(sequences.size());
  std::vector<ForwardSeq> batch;
  size_t n_rows = 0, n_tasks = 0;
  for (size_t i = 0; i < sequences.size(); ++i) {
    StepWork& w = work[i];
    sequences[i]->plan(w, config);
    w.first_task = n_tasks;
    if (!w.forwards.empty()) n_tasks += w.rows.size();
    for (size_t f = 0; f < w.forwards.size(); ++f) {
      (f == 0 ? w.cond_offset : w.uncond_offset) = n_rows;
      n_rows += static_cast<size_t>(w.forwards[f].n_logit_rows);
      batch.push_back(w.forwards[f]);
    }
  }

  // One forward over the batch; every row comes back sampled (the logits stay in the backend).
  std::vector<Penalties> penalties(work.size());
  std::vector<RowTask> tasks;
  tasks.reserve(n_tasks);
  for (size_t i = 0; i < work.size(); ++i) {
    const StepWork& w = work[i];
    const Sequence& s = *sequences[i];
    const SamplingParams& p = s.params;
    if (w.forwards.empty()) continue;
    const bool penalised = Penalties::wanted(p);
    if (penalised)
      penalties[i] = Penalties::of(p, s.penalised_prompt, s.answer(), config.mask_token_id, config.eos_token_id,
                                   p.eot_token_id, config.embedding_size);
    const bool cfg = w.forwards.size() > 1;
    for (size_t r = 0; r < w.rows.size(); ++r) {
      RowTask t;
      t.cond = static_cast<int>(w.cond_offset + r);
      t.uncond = cfg ? static_cast<int>(w.uncond_offset + r) : -1;
      t.cfg_scale = p.cfg_scale;
      t.rule = &s.rule;
      t.penalties = penalised ? &penalties[i] : nullptr;
      t.seed = p.seed;
      t.step = s.steps_done;
      t.position = w.rows[r] - s.prompt_length;
      t.top_logprobs = p.top_logprobs;
      tasks.push_back(t);
    }
  }
  std::vector<RowResult> choices(n_tasks);
  if (!batch.empty()) backend_->predict(batch, tasks, choices.data(), cancel);
  if (cancel && cancel->load()) throw Error(ErrorCode::Cancelled, "step cancelled");
  for (size_t i = 0; i < work.size(); ++i)
    for (size_t r = 0; r < work[i].rows.size(); ++r)
      if (!choices[work[i].first_task + r].finite)
        throw non_finite(sequences[i]->id, work[i].rows[r] - sequences[i]->prompt_length);

  // Decide everything (and allocate everything) before touching any sequence.
  std::vector<StepOutput> outputs(work.size());
  for (size_t i = 0; i < work.size(); ++i) {
    outputs[i].id = sequences[i]->id;
    outputs[i].phase = work[i].phase;
    sequences[i]->decide(work[i], choices.data() + work[i].first_task, outputs[i], config);
  }

  // Commit.
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (size_t i = 0; i < work.size(); ++i) {
      const StepWork& w = work[i];
      Sequence& s = *sequences[i];
      StepOutput& out = outputs[i];
      const int forwards = static_cast<int>(w.forwards.size());
      if (w.phase == Phase::Denoise) ++s.steps_done;
      s.forward_passes += forwards;
      s.positions_computed += static_cast<int64_t>(forwards) * w.computed;
      if (w.refresh) s.kv_refreshes += forwards;
      s.tokens_denoised += static_cast<int>(out.committed.size()) - out.filled;
      s.apply(w, out, config);
      out.finished = s.finished;
      out.reason = s.reason;
      out.steps_done = s.steps_done;
      out.steps_total = s.steps_total;
      out.forward_passes = s.forward_passes;
      out.kv_refreshes = s.kv_refreshes;
      out.positions_computed = s.positions_computed;
      out.prompt_cached = s.prompt_cached;
    }
  }
  // What the step left to do with no lock held (a finished prefix copied into the prefix cache).
  for (const std::shared_ptr<Sequence>& s : sequences) s->settle();
  return outputs;
}

}  // namespace vdiff
