// The pieces of one LLaDA denoising step that do not touch the model: the block plan and transfer
// schedule, the per-sequence random numbers, picking a token for one row of logits (with top-k / top-p
// filtering), choosing which rows to commit (a fixed quota, or confidence-aware parallel decoding), and
// the early-stop test. engine.cpp strings them together; sampler_tests.cpp checks each on its own.
//
// Semantics follow LLaDA's reference generate() (ML-GSAI/LLaDA generate.py); where the reference leaves
// a case undefined (gen_length not a multiple of block_length, steps not a multiple of the block count)
// the rule is the one tools/reference/generate.py documents; see plan_blocks.
#pragma once
#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include "engine.h"
#include "rng.h"

namespace vdiff {

// ---- random numbers -------------------------------------------------------------------------------

uint64_t splitmix64(uint64_t& state);

// A counter-based stream: the index-th draw is uniform_at(key, index) (rng.h), a pure function, so a
// device that draws every token of a row at once gets the numbers a CPU loop gets one by one.
class Rng {
 public:
  explicit Rng(uint64_t key) : key_(key) {}
  uint64_t key() const { return key_; }
  // The next draw of the stream (draws 0, 1, 2, ...).
  uint64_t next() { return bits_at(key_, counter_++); }
  // Uniform in the open interval (0, 1): never 0, so -log(u) is finite and positive.
  double uniform_open() { return uniform_at(key_, counter_++); }
  // Draw `index` of the stream, whatever was drawn before.
  double uniform(uint64_t index) const { return uniform_at(key_, index); }

 private:
  uint64_t key_;
  uint64_t counter_ = 0;
};

// The stream for one row of one step of one sequence (rng.h, row_key).
inline Rng row_rng(uint64_t seed, int step, int position) { return Rng(row_key(seed, step, position)); }

// ---- block plan and transfer schedule -------------------------------------------------------------

struct BlockPlan {
  int start;   // first answer position of the block
  int length;  // positions in the block (the last block may be shorter)
  int steps;   // denoising steps spent on the block (>= 1)
};

// Splits the answer into blocks of block_length (the last one may be shorter) and the step budget over
// them: steps / n_blocks each, the remainder one extra on the first blocks, each clamped to
// [1, block length]. With both divisions exact (the only case the reference accepts) every block gets
// steps / n_blocks. Requires gen_length, block_length and steps >= 1 (the engine validates first).
std::vector<BlockPlan> plan_blocks(int gen_length, int block_length, int steps);

// Tokens to commit at step `step` (0-based) of a block that starts with `masked` mask tokens and gets
// `steps` steps: masked / steps each, the remainder one extra on the first steps.
int transfers_at(int masked, int steps, int step);

// ---- one row --------------------------------------------------------------------------------------

struct RowRule {
  int row_size = 0;        // floats per row of logits (the model's embedding_size)
  int vocab_size = 0;      // x0 is drawn from [0, vocab_size): rows past it are head padding, not tokens
  int mask_token_id = -1;  // never drawn as x0 (-1: none)
  double temperature = 0.0;
  Remasking remasking = Remasking::LowConfidence;
  int eos_token_id = -1;
  int eot_token_id = -1;  // -1: none
  bool logits_eos_inf = false;
  bool confidence_eos_eot_inf = false;
  int top_k = 0;       // > 0: only the top_k best tokens can be drawn (temperature > 0 only); 0: off
  double top_p = 1.0;  // < 1: only the nucleus can be drawn (temperature > 0 only); 1: off
  double min_p = 0.0;  // > 0: only tokens with p >= min_p * p(likeliest) at the temperature can be drawn; 0: off
  // Dream's rows (sample_row_dream) instead of LLaDA's, with the confidence of its algorithm.
  bool dream = false;
  DreamAlg alg = DreamAlg::Entropy;
  // Barred end tokens (SamplingParams::min_tokens, ignore_eos): answer positions below min_tokens bar
  // `ends` (EOS, EOT, the model's stop tokens) and `stops` (the request's), the others `ends` with ignore_eos.
  int min_tokens = 0;
  bool ignore_eos = false;
  std::vector<int32_t> ends, stops;             // ids inside the row only
  std::vector<std::pair<int32_t, float>> bias;  // SamplingParams::logit_bias, ids inside the row only
  std::vector<int32_t> allowed;                 // SamplingParams::allowed_token_ids, ascending, distinct
  std::vector<int32_t> position_sets;           // SamplingParams::position_allowed
  std::vector<std::vector<int32_t>> sets;       // SamplingParams::allowed_sets, each ascending, distinct

  // The rule of a sequence's rows: its sampling settings on this model's rows.
  static RowRule of(const SamplingParams& p, const ModelConfig& config);
  // Whether the draw is restricted to candidates (then it ranks the row: see sample_row).
  bool filters() const { return temperature > 0.0 && (top_k > 0 || top_p < 1.0 || min_p > 0.0); }
  // The tokens answer position `position` is restricted to (SamplingParams::position_allowed), or null.
  const std::vector<int32_t>* allowed_at(int position) const {
    if (position < 0 || position >= static_cast<int>(position_sets.size())) return nullptr;
    const int32_t set = position_sets[static_cast<size_t>(position)];
    return set < 0 ? nullptr : &sets[static_cast<size_t>(set)];
  }
  // Calls f(id) for each token barred at answer position `position` (an id may come twice).
  template <typename F>
  void for_each_barred(int position, F f) const {
    if (position < min_tokens || ignore_eos)
      for (int32_t id : ends) f(id);
    if (position < min_tokens)
      for (int32_t id : stops) f(id);
  }
  // The rule's changes to a row of logits at answer position `position`, which sample_task makes after cfg
  // and before the penalties: the tokens not allowed (by allowed_token_ids, then by the position's set) set
  // to -inf, the bias added, then the barred tokens set to -inf.
  void adjust(float* logits, int position) const;
};

// Penalties on the tokens a sequence already holds, applied to every row of its step before the rule
// (OpenAI's presence and frequency penalties, Hugging Face's and vLLM's repetition penalty). A diffusion
// answer is written in no fixed order, so "already generated" means committed anywhere in the answer so
// far; masks and the end tokens (EOS, EOT: the padding after an answer) are not counted. For each token t
// in the prompt or the answer (repetition) or in the answer (the other two), in float64 and stored as
// float: l = repetition != 1 ? (l > 0 ? l / repetition : l * repetition) : l; then
// l -= frequency * count(t) + presence. The row's probability, confidence and log-probabilities are those
// of the penalised logits: they rank the commits, so a repeated token is also committed later.
struct Penalties {
  double presence = 0.0, frequency = 0.0, repetition = 1.0;
  std::vector<std::pair<int32_t, int>> answer;  // (token, count >= 1), ascending token
  std::vector<int32_t> prompt;                  // distinct prompt tokens, ascending (repetition != 1 only)

  static bool wanted(const SamplingParams& p) {
    return p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 || p.repetition_penalty != 1.0;
  }
  // The penalties of a sequence holding `answer` (mask tokens where uncommitted) after `prompt`; ids
  // outside [0, row_size) are ignored.
  static Penalties of(const SamplingParams& p, const std::vector<int32_t>& prompt, const std::vector<int32_t>& answer,
                      int mask, int eos, int eot, int row_size);
  // In place on one row of logits (row_size floats).
  void apply(float* logits, int row_size) const;
};

struct RowChoice {
  int32_t token = 0;         // x0: the token this row would take
  double probability = 0.0;  // float64 softmax probability of `token`
  double confidence = 0.0;   // what the top-k selection ranks by (never NaN)
};

// Classifier-free guidance, in place on the conditional row: cond = un + (scale + 1) * (cond - un),
// in float like the reference does on float logits.
void apply_cfg(float* cond, const float* uncond, size_t n, double cfg_scale);

// Picks x0 for one row and says how confident it is. May overwrite entries of `logits` (the EOS/EOT
// options set them to -inf, as the reference does on its logits tensor). Does not throw; allocates only
// for top-k / top-p filtering, and then only when no `scratch` (vocab_size ints, reused) is given.
//
// top-k and top-p restrict the candidates of the Gumbel-max draw at temperature > 0; at temperature 0
// they change nothing (the argmax is always a candidate). Candidates are ranked by logit, ties to the
// lower id; only drawable tokens (not the mask, not head padding) take part. top-k keeps the first
// top_k of them. top-p then keeps the shortest prefix of that ranking whose probability mass reaches
// top_p, where the mass is the float64 softmax of logit / temperature over the tokens top-k kept
// (renormalised), accumulated in rank order until sum >= top_p * total. The first candidate is always
// kept. Every token still consumes its uniform draw, so filtering never shifts the random stream.
// The reported probability and confidence stay the unfiltered softmax of the raw logits (as without
// filtering): filtering changes which token is drawn, not how sure the model was of it.
//
// One deliberate difference from the reference: x0 is never the mask token nor a head-padding id
// (>= vocab_size). The reference would "commit" such a prediction, leaving the position masked (or
// holding a non-token), so a step could commit fewer than k tokens and a finished answer could still
// hold masks. Its probability still comes from the softmax over the whole row, as in the reference, so
// whenever the reference's x0 is a real token the two agree exactly.
RowChoice sample_row(float* logits, const RowRule& rule, const Rng& rng, std::vector<int32_t>* scratch = nullptr);

// Dream's rule for one row (sample_row calls it when rule.dream), as tools/reference/dream_generate.py's
// sample_tokens: z = logits / temperature (temperature > 0) in float64; top_p < 1 drops, in the ranking
// (higher z first, ties to the lower id), every token after the first whose preceding cumulative
// probability exceeds top_p; top_k > 0 then drops the tokens below the top_k-th largest remaining z
// (ties kept); p = softmax of what is left. Unlike LLaDA's rule the filters also apply at temperature 0,
// where they change the probabilities (not x0). x0: argmax of p (ties to the lower id) at temperature 0,
// else a draw from p (Gumbel-max with the row's stream); never the mask token nor head padding.
// probability = p(x0); confidence: MaskgitPlus and Origin p(x0), TopkMargin p(top 1) - p(top 2), Entropy
// sum p log(p + 1e-10). `scratch` (row_size ints) is reused by the filters.
RowChoice sample_row_dream(const float* logits, const RowRule& rule, const Rng& rng,
                           std::vector<int32_t>* scratch = nullptr);

// Indices (into confidence[0..n)) of the k most confident rows, ties to the lower index, returned in
// ascending index order. k is clamped to [0, n].
std::vector<int> select_most_confident(const double* confidence, int n, int k);

// ---- confidence-aware parallel decoding (Fast-dLLM) -----------------------------------------------

// Which rows one step of parallel decoding commits, instead of a fixed quota. The rows are ranked by
// confidence (ties to the lower index, NaN last); the most confident one is always committed, so every
// step makes progress. Then, in rank order, the n-th row (n = 2, 3, ...) is committed too while
//   threshold mode (threshold > 0):  confidence >= threshold
//   factor mode    (factor > 0):     confidence >= 1 - factor / (n + 1)
// and the first row that fails ends the selection. The factor rule is Fast-dLLM's: commit n tokens when
// (n + 1) * (1 - c_n) <= factor, where c_n is the n-th highest confidence; the bar rises with n, so more
// tokens at once need more confidence each. (Fast-dLLM's loop also commits every row when only the last
// one fails the bar; that is an off-by-one in its loop, not the rule, and is not copied.) Exactly one
// of threshold and factor must be > 0. Returns indices in ascending order; empty only when n == 0.
std::vector<int> select_parallel(const double* confidence, int n, double threshold, double factor);

// ---- early stop -----------------------------------------------------------------------------------

// Whether an answer whose first `length` positions are final has ended: it holds an end token (EOS, or
// EOT when eot >= 0) and every position after the first one, up to `length`, is an end token too.
bool answer_has_ended(const int32_t* answer, int length, int eos, int eot);

}  // namespace vdiff
