// The step API: sequences are created with their sampling settings, advanced together one denoising
// step per call (one batched forward), and released explicitly. Policy (who runs, when to stop, timeouts)
// belongs to the caller; this class only denoises.
#pragma once
#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "backend.h"
#include "prefix_cache.h"

namespace vdiff {

enum class Remasking { LowConfidence, Random };

// Approximate KV caching (Fast-dLLM), per sequence. At the first step of every block one forward over
// the whole canvas refreshes the cache (its logits serve that step); the block's later steps compute
//   Prefix: the block and everything after it, attending to the cached prefix;
//   Dual:   the block only, attending to the cached prefix and the cached rest (suffix and later blocks).
// Approximate because the cached keys and values are those of the canvas at the refresh, before this
// block's commits. Memory: Backend::kv_cache_bytes(canvas length) per sequence (twice with cfg).
enum class KVCacheMode { None, Prefix, Dual };

// Dream's choice of what a step commits (core/dream_decoding.h): the k most confident masked positions
// by the token's probability (MaskgitPlus), by the gap between the two likeliest tokens (TopkMargin) or
// by negative entropy (Entropy); Origin reveals each mask independently with probability 1 - s/t.
enum class DreamAlg { Origin, MaskgitPlus, TopkMargin, Entropy };

struct SamplingParams {
  int gen_length = 128;      // answer length in tokens (>= 1); prompt + gen_length <= max_sequence_length
  int block_length = 32;     // semi-autoregressive block size (>= 1); the last block may be shorter
  int steps = 128;           // total denoising steps over all blocks (>= 1)
  double temperature = 0.0;  // 0: argmax; > 0: Gumbel-max in float64 with the sequence's RNG
  Remasking remasking = Remasking::LowConfidence;
  double cfg_scale = 0.0;               // > 0: classifier-free guidance with an unconditional copy (prompt masked)
  uint64_t seed = 0;                    // seeds the per-sequence RNG: same seed, same output
  bool logits_eos_inf = false;          // reference option: forbid EOS in the logits
  bool confidence_eos_eot_inf = false;  // reference option: EOS/EOT confidence to -inf
  int eot_token_id = -1;                // end-of-turn token (LLaDA-Instruct: 126348); -1: none

  // Candidate filtering of the draw at temperature > 0 (no effect at temperature 0); see sampler.h.
  int top_k = 0;       // >= 0; 0: off
  double top_p = 1.0;  // in (0, 1]; 1: off
  double min_p = 0.0;  // in [0, 1]: only tokens at least min_p times as likely as the likeliest; 0: off

  // Penalties on tokens the answer already holds (sampler.h, Penalties), at every temperature.
  double presence_penalty = 0.0;    // in [-2, 2]: subtracted from a token's logit once it is in the answer
  double frequency_penalty = 0.0;   // in [-2, 2]: subtracted once per time the token is in the answer
  double repetition_penalty = 1.0;  // in (0, 2]: a token in the prompt or the answer: logit / r if > 0, else * r

  // Confidence-aware parallel decoding (Fast-dLLM); at most one of the two may be set (> 0). When set it
  // replaces the per-step quota of `steps`: each step commits the block's most confident masked position
  // plus those that pass the rule (sampler.h, select_parallel), and a block ends when it has no masks.
  // The step count then depends on the data; gen_length steps is its upper bound.
  double parallel_threshold = 0.0;  // in [0, 1]; 0: off
  double parallel_factor = 0.0;     // >= 0; 0: off

  // Early stop: when a block completes and the answer up to its end has ended (sampler.h,
  // answer_has_ended), the remaining blocks are not denoised but filled with EOS in that same step.
  // Off by default: the reference denoises every block, and its padding after the end token is not
  // all EOS. The answer up to its first end token is the same either way.
  bool early_stop = false;

  KVCacheMode kv_cache = KVCacheMode::None;
  // With a cache, also refresh at every kv_refresh_interval-th step inside a block (1: every step, which
  // gives the uncached output exactly); 0: only at block starts.
  int kv_refresh_interval = 0;

  // End tokens barred from the answer (vLLM's min_tokens and ignore_eos): an answer position below
  // min_tokens never takes EOS, eot_token_id, one of the model's stop tokens (ModelConfig::stop_token_ids) or
  // one of stop_token_ids; with ignore_eos no position takes the first three. A barred token's logit is
  // -inf before anything else reads the row (as logits_eos_inf does for EOS), so its probability is 0 and it
  // is never drawn. A diffusion answer knows its positions from the start, so the bar is by position.
  int min_tokens = 0;  // in [0, gen_length]
  bool ignore_eos = false;
  std::vector<int32_t> stop_token_ids;  // the request's stop tokens (the caller cuts the answer at them)
  // Further tokens the caller ends an answer at, barred as EOS is (a chat template's turn end, such as
  // Qwen's <|im_end|>, that config.json does not name).
  std::vector<int32_t> end_token_ids;

  // OpenAI's logit_bias: (token, bias in [-100, 100]) added, in float, to the token's logit after cfg and
  // before everything else reads the row (the barred tokens, the penalties, the rule), at every position.
  std::vector<std::pair<int32_t, float>> logit_bias;
  // vLLM's allowed_token_ids: when not empty, every other token's logit is -inf before the bias.
  std::vector<int32_t> allowed_token_ids;
  // Tokens allowed at single answer positions (a JSON template's number slots: digits only):
  // position_allowed[i] indexes allowed_sets for answer position i, -1 (or i past its end) for none.
  // At such a position every token outside the set (and outside allowed_token_ids, when given) is -inf.
  std::vector<int32_t> position_allowed;
  std::vector<std::vector<int32_t>> allowed_sets;

  // Alternatives reported with every committed token: its step's top_logprobs likeliest tokens with their
  // log-probabilities (0 .. kMaxTopLogprobs; 0: none).
  int top_logprobs = 0;

  // Block decoding (ModelConfig::decoding == Block: LLaDA2.x, SDAR; core/block_decoding.h) reads these with
  // their own meaning, and refuses the LLaDA settings that do not apply to it (cfg, remasking random,
  // suffix, templates, parallel_factor, kv_cache dual; early_stop and kv_refresh_interval have no effect:
  // it always stops after the block holding EOS, a stop token or eot_token_id, and its cache is exact):
  //   block_length must be the model's; steps is per block (the reference's schedule: block_length / steps
  //   tokens a step, the first block_length % steps steps one more); parallel_threshold > 0 commits every
  //   masked position whose confidence is strictly above it when they are at least the step's quota, else
  //   the quota's most confident (LLaDA2.0 "threshold", SDAR "low_confidence_dynamic"); 0: the quota only.
  //   kv_cache None recomputes the window [0, block end) every step (the reference's form); Prefix (the
  //   default for these families) prefills whole prompt blocks once and caches each finished block exactly.
  // LLaDA2.1 editing (families that have it): after each forward, a committed position of the open block
  // (not the prompt's) whose prediction differs from its token with probability > editing_threshold is
  // rewritten; a block with no mask left takes up to max_post_steps more forwards while edits happen.
  // < 0: off (LLaDA2.0 behaviour).
  double editing_threshold = -1.0;
  int max_post_steps = 16;

  // Dream decoding (ModelConfig::decoding == Dream; other decodings ignore them). `steps` are over the
  // whole answer, whose steps commit what the time schedule linspace(1, eps, steps + 1) says; alg_temp > 0
  // draws the positions from softmax(confidence / alg_temp) instead of taking the most confident.
  DreamAlg alg = DreamAlg::Entropy;
  double alg_temp = 0.0;  // >= 0
  double eps = 1e-3;      // in (0, 1)
};

// What a sequence's forward does in a step (Block decoding; FullCanvas sequences always Denoise):
//   Prefill: the prompt's whole blocks, once (or in chunks), into the KV cache (no rows sampled); with a
//            prefix cache, a sequence whose prompt starts with the blocks another is prefilling waits for
//            them in Prefill steps without a forward (forward_passes does not grow), then copies them;
//   Denoise: the open block, attending to the cache (or, without cache, the window up to the block's end);
//   Commit:  the finished block again from its final tokens, to cache its exact keys and values (none
//            after the last block).
enum class Phase { Prefill, Denoise, Commit };

struct CommittedToken {
  int32_t position;  // index into the answer (0 .. gen_length-1)
  int32_t token;
  float probability;            // the softmax probability of `token` at the step it was committed; 1 for the
                                // EOS an early stop fills in (certain by rule, not sampled)
  std::vector<TopLogprob> top;  // SamplingParams::top_logprobs alternatives at that step (none when filled)
};

enum class FinishReason { None, Length, Eos };

struct StepOutput {
  uint64_t id = 0;
  std::vector<CommittedToken> committed;  // in ascending position order
  bool finished = false;
  FinishReason reason = FinishReason::None;  // Eos when the answer holds an EOS/EOT token, else Length
  int block = 0;           // the block this step worked on (Block: counted from the block holding the answer's first
                           // position; a prefill says 0, a commit the block it caches)
  int steps_done = 0;      // denoising steps done so far by this sequence (this one included; Block: Denoise phases)
  int steps_total = 0;     // planned steps (an upper bound with parallel decoding or early stop)
  int filled = 0;          // how many of `committed` (the last ones) an early stop filled with EOS
  int forward_passes = 0;  // canvas evaluations so far (this step's included): 1 per step, 2 with cfg
                           // (a cached step's partial forward counts as one)
  int kv_refreshes = 0;    // of those, the ones that refreshed a KV cache (whole-canvas forwards; Block: the
                           // prefill and commit forwards, which write keys and values that stay)
  int64_t positions_computed = 0;  // canvas positions the forwards computed so far: the cost a cache cuts
  int prompt_cached = 0;           // prompt positions copied from the prefix cache instead of computed
  Phase phase = Phase::Denoise;    // what this step's forward did for the sequence
  // Editing: the open block's committed tokens that may still change (answer positions, ascending); they
  // reach `committed` only when their block closes. Empty without editing.
  std::vector<CommittedToken> provisional;
};

struct SequenceInfo {
  int prompt_length;
  int gen_length;
  int suffix_length;
  int steps_total;  // planned steps over all blocks; an upper bound with parallel decoding or early stop
  int steps_done;
  bool finished;
  uint64_t memory_bytes;       // what this sequence holds (canvas, schedules, scratch)
  int forward_passes;          // canvas evaluations so far (see StepOutput)
  int tokens_denoised;         // answer positions committed by sampling (not filled by an early stop)
  int kv_refreshes;            // forward passes that refreshed a KV cache (see StepOutput)
  uint64_t kv_cache_bytes;     // held by its KV caches (included in memory_bytes; 0 once finished)
  int64_t positions_computed;  // see StepOutput
  int prompt_cached;           // see StepOutput
};

class Sequence;  // defined in engine.cpp

// How the engine serves block-causal models (ModelConfig::decoding == Block); other models ignore both.
struct EngineOptions {
  // > 0: up to that many bytes of finished prefixes' keys and values are kept for later sequences that
  // start with the same whole blocks (prefix_cache.h); 0: none.
  uint64_t prefix_cache_bytes = 0;
  // > 0: a sequence prefills its prompt's whole blocks in forwards of at most this many positions (rounded
  // down to whole blocks, at least one), one per step, so that a long prompt does not hold up the steps of
  // the sequences batched with it; the keys are the same (each chunk attends the cached blocks before it
  // exactly as one forward would). 0: all in one forward.
  int prefill_chunk = 0;
};

class Engine {
 public:
  explicit Engine(std::shared_ptr<Backend> backend, const EngineOptions& options = {});
  ~Engine();

  const Backend& backend() const { return *backend_; }
  // The prefix cache's figures (all zero without one).
  PrefixCacheStats prefix_cache_stats() const;

  // Validates the prompt and suffix (token ids in range, no mask token, prompt + gen_length + suffix
  // within the context) and the settings; throws Error(InvalidArgument) naming the bad field. Returns the
  // new sequence's id. A KV cache is allocated here: beyond the model's cache budget this throws
  // Error(InvalidArgument) when the cache alone exceeds it, Error(OutOfMemory) when live caches hold
  // too much of it (see Backend::make_kv_cache).
  //
  // The canvas is prompt, gen_length masks, suffix: with a suffix the answer is infilled between the two.
  // The suffix is context like the prompt (the model sees it every step; it never changes); positions,
  // blocks and the answer are those of the masked middle only. Under cfg the unconditional copy masks
  // the prompt and the suffix (everything that is not answer), as the reference's formula does for any
  // non-mask token of its canvas.
  //
  // With a template (gen_length entries: -1 for a position to denoise, else the token fixed there), the
  // fixed tokens are committed from the start and never change: a masked diffusion model fills the rest
  // around them (structured output: a JSON skeleton with its values denoised in place). Each block's steps
  // are spread over its masks only; a block without masks is skipped; early stop is off (it would
  // overwrite fixed tokens). Throws Error(InvalidArgument) for a template of the wrong length, with ids
  // outside the embedding or the mask token, or with nothing left to denoise.
  uint64_t create(const std::vector<int32_t>& prompt, const SamplingParams& params,
                  const std::vector<int32_t>& suffix = {}, const std::vector<int32_t>& answer_template = {});

  // Advances every given sequence by one denoising step in one batched forward. Unknown or finished ids
  // throw Error(InvalidArgument); a set `cancel` flag throws Error(Cancelled) and leaves every sequence
  // as it was before the call (but for a prefix a block sequence copied from the prefix cache at its first
  // step, which stays). Thread-safe with create/release/info (one step at a time).
  std::vector<StepOutput> step(const std::vector<uint64_t>& ids, const std::atomic<bool>* cancel = nullptr);

  // The same in two parts, for a caller that runs the step later on another thread (the addon): pin
  // looks the sequences up now (unknown or repeated ids throw Error(InvalidArgument)) and keeps them
  // alive, so a release() between the two frees them only when that step returns.
  using Pinned = std::vector<std::shared_ptr<Sequence>>;
  Pinned pin(const std::vector<uint64_t>& ids) const;
  std::vector<StepOutput> step_pinned(const Pinned& sequences, const std::atomic<bool>* cancel = nullptr);

  // The model's log-probability (natural log of a float64 softmax of the whole output row, head padding
  // included, as the probabilities of committed tokens are computed) of
  // targets[i] at canvas position positions[i], from one forward over the whole canvas: the masked-token
  // likelihood of a text, for evaluating answers (put the mask token where the model is to predict; the
  // rest is what it sees). No sequence is involved; serialised with step(). Throws Error(InvalidArgument)
  // for a canvas outside [1, max_sequence_length] tokens or with ids outside the embedding, positions
  // outside the canvas, targets outside the vocabulary, or lists of different lengths; Error(Cancelled).
  std::vector<double> score(const std::vector<int32_t>& canvas, const std::vector<int32_t>& positions,
                            const std::vector<int32_t>& targets, const std::atomic<bool>* cancel = nullptr);

  // One canvas to score: what the model sees, the tokens whose log-probabilities are wanted where, and how
  // many of each position's likeliest tokens to report besides (0 .. kMaxTopLogprobs).
  struct ScoreItem {
    std::vector<int32_t> canvas, positions, targets;
    int top_logprobs = 0;
    bool rank = false;  // also each target's rank in its row (1: the likeliest), as vLLM's prompt logprobs
  };
  // Per item: its targets' log-probabilities and, per target, its position's top_logprobs likeliest
  // tokens, most likely first (tokens of the vocabulary other than the mask token).
  struct Scored {
    std::vector<double> logprobs;
    std::vector<std::vector<TopLogprob>> top;
    std::vector<int> ranks;  // with ScoreItem::rank: 1 + the tokens of the vocabulary (not the mask) likelier
  };
  // score() for several canvases in one batched forward (each checked as score() checks one; the errors
  // name the item). A Numeric error names the item and position.
  std::vector<Scored> score(const std::vector<ScoreItem>& items, const std::atomic<bool>* cancel = nullptr);

  // Frees the sequence's memory now (or, when a step holding it is in flight, as that step returns).
  // Unknown ids are ignored.
  void release(uint64_t id);

  // The answer region of the canvas (mask tokens where nothing is committed yet).
  std::vector<int32_t> canvas(uint64_t id) const;
  SequenceInfo info(uint64_t id) const;
  size_t live() const;

 private:
  // Registers a new sequence made from `prompt` (kept for repetition_penalty) and returns its id.
  uint64_t adopt(std::shared_ptr<Sequence> seq, const std::vector<int32_t>& prompt);
  std::shared_ptr<Sequence> get(uint64_t id) const;
  std::shared_ptr<Backend> backend_;
  EngineOptions options_;
  std::shared_ptr<PrefixCache> prefix_cache_;  // after backend_: it goes first
  mutable std::mutex mu_;                      // guards sequences_ and next_id_
  std::mutex step_mu_;                         // one step at a time
  std::map<uint64_t, std::shared_ptr<Sequence>> sequences_;
  uint64_t next_id_ = 1;
};

}  // namespace vdiff
