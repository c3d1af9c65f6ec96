// One live sequence of the step engine, whatever its decoding. A step asks each sequence what its forward
// is (plan), runs every sequence's forward in one batch, hands each its sampled rows (decide: the
// decision only, nothing changes, so a cancelled or failed step leaves every sequence as it was) and then
// lets it apply the decision (apply, under the engine's lock). Two decodings implement it:
//   FullCanvasSequence (engine.cpp): LLaDA's semi-autoregressive denoising of the answer on a
//     bidirectional canvas, with the approximate Fast-dLLM caches;
//   BlockSequence (block_decoding.h): block diffusion (LLaDA2.x, SDAR) with its exact block cache.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "backend.h"
#include "engine.h"
#include "sampler.h"

namespace vdiff {

// What one sequence does in the step being built.
struct StepWork {
  Phase phase = Phase::Denoise;
  // The forwards: none (nothing to compute this step), one, or two with cfg (the unconditional copy
  // second, asking for the same rows). Their logit_rows point into `rows`, their tokens into the
  // sequence's canvas or `uncond`, which stay put until the step is applied.
  std::vector<ForwardSeq> forwards;
  std::vector<int32_t> rows;        // canvas positions whose rows are sampled (in every forward)
  std::vector<int32_t> logit_rows;  // shifted logits: the forward's output rows predicting `rows`
  std::vector<int32_t> uncond;      // cfg: the canvas with the prompt and suffix masked
  int computed = 0;                 // canvas positions each forward computes
  bool refresh = false;             // the forwards write keys and values meant to stay (counted as kv refreshes)

  // Where the rows sit in the step's batch (set by the engine).
  size_t first_task = 0;     // index of rows[0] among the step's sampling tasks
  size_t cond_offset = 0;    // row index of rows[0] among the forward's logit rows
  size_t uncond_offset = 0;  // ... of the unconditional copy's (cfg only)

  // The decision (decide), applied by apply.
  int k = 0;                // FullCanvas: tokens to commit now (quota mode)
  bool block_done = false;  // this step closes the sequence's block
  bool finishes = false;    // ... and that ends the sequence
  bool eos = false;         // Block: ... because the answer so far holds an end token
  int post = 0;             // Block with editing: the block's forwards without masks, this one included
  struct Write {
    int32_t position;  // canvas position
    int32_t token;
    float probability;
    std::vector<TopLogprob> top;
  };
  std::vector<Write> writes;  // Block: the canvas positions this step sets (commits and edits)
};

class Sequence {
 public:
  virtual ~Sequence() = default;

  // This step's forwards and rows. Const: a step that fails after planning changes nothing.
  virtual void plan(StepWork& w, const ModelConfig& config) const = 0;
  // What the sampled rows (rows[i] is w.rows[i]'s) change: fills w's decision and out's committed and
  // provisional tokens and block. Const, may allocate.
  virtual void decide(StepWork& w, const RowResult* rows, StepOutput& out, const ModelConfig& config) const = 0;
  // Applies the decision; must not throw. The engine has counted the forwards before.
  virtual void apply(const StepWork& w, StepOutput& out, const ModelConfig& config) = 0;
  // On the stepping thread, before plan(): work deferred from the sequence's creation (block decoding: the
  // prefix-cache copy). Must not throw; what it did stays even if the step is then cancelled.
  virtual void prepare() {}
  // On the stepping thread after apply(), with no engine lock held: work the step left (block decoding:
  // keeping a prefix in the prefix cache). Must not throw.
  virtual void settle() {}

  // The answer region of the canvas (mask tokens where nothing is committed yet).
  virtual std::vector<int32_t> answer() const = 0;
  virtual int answer_length() const { return params.gen_length; }
  virtual int suffix_length() const { return 0; }
  virtual uint64_t cache_bytes() const = 0;
  virtual uint64_t memory_bytes() const = 0;

  uint64_t id = 0;
  SamplingParams params;
  RowRule rule;  // how its rows are sampled: RowRule::of(params), made once when the engine adopts it
  int prompt_length = 0;
  // The prompt's tokens, kept only for repetition_penalty (sampler.h, Penalties).
  std::vector<int32_t> penalised_prompt;
  int steps_total = 0;
  int steps_done = 0;
  bool finished = false;
  FinishReason reason = FinishReason::None;
  // Statistics.
  int forward_passes = 0;
  int tokens_denoised = 0;
  int kv_refreshes = 0;
  int64_t positions_computed = 0;
  int prompt_cached = 0;  // prompt positions copied from the prefix cache
};

}  // namespace vdiff
