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
#include <vector>

#include "model.h"

namespace vdiff {

enum class Remasking { LowConfidence, Random };

struct SamplingParams {
  int gen_length = 128;        // answer length in tokens (>= 1); prompt + gen_length <= max_sequence_length
  int block_length = 32;       // semi-autoregressive block size (>= 1); the last block may be shorter
  int steps = 128;             // total denoising steps over all blocks (>= 1)
  double temperature = 0.0;    // 0: argmax; > 0: Gumbel-max in float64 with the sequence's RNG
  Remasking remasking = Remasking::LowConfidence;
  double cfg_scale = 0.0;      // > 0: classifier-free guidance with an unconditional copy (prompt masked)
  uint64_t seed = 0;           // seeds the per-sequence RNG: same seed, same output
  bool logits_eos_inf = false;          // reference option: forbid EOS in the logits
  bool confidence_eos_eot_inf = false;  // reference option: EOS/EOT confidence to -inf
  int eot_token_id = -1;       // end-of-turn token (LLaDA-Instruct: 126348); -1: none
};

struct CommittedToken {
  int32_t position;    // index into the answer (0 .. gen_length-1)
  int32_t token;
  float probability;   // the softmax probability of `token` at the step it was committed
};

enum class FinishReason { None, Length, Eos };

struct StepOutput {
  uint64_t id = 0;
  std::vector<CommittedToken> committed;  // in ascending position order
  bool finished = false;
  FinishReason reason = FinishReason::None;  // Eos when the answer holds an EOS/EOT token, else Length
  int block = 0;        // the block this step worked on
  int steps_done = 0;   // denoising steps done so far by this sequence (this one included)
};

struct SequenceInfo {
  int prompt_length;
  int gen_length;
  int steps_total;        // planned steps over all blocks
  int steps_done;
  bool finished;
  uint64_t memory_bytes;  // what this sequence holds (canvas, schedules, scratch)
};

class Sequence;    // defined in engine.cpp
class ThreadPool;  // threadpool.h

class Engine {
 public:
  explicit Engine(std::shared_ptr<Model> model);
  ~Engine();

  const Model& model() const { return *model_; }

  // Validates the prompt (token ids in range, length within the context) and the settings; throws
  // Error(InvalidArgument) naming the bad field. Returns the new sequence's id.
  uint64_t create(const std::vector<int32_t>& prompt, const SamplingParams& params);

  // Advances every given sequence by one denoising step in one batched forward. Unknown or finished ids
  // throw Error(InvalidArgument); a set `cancel` flag throws Error(Cancelled) and leaves every sequence
  // as it was before the call. Thread-safe with create/release/info (one step at a time).
  std::vector<StepOutput> step(const std::vector<uint64_t>& ids, const std::atomic<bool>* cancel = nullptr);

  // Frees the sequence's memory now (or, when a step holding it is in flight, as that step returns).
  // Unknown ids are ignored.
  void release(uint64_t id);

  // The answer region of the canvas (mask tokens where nothing is committed yet).
  std::vector<int32_t> canvas(uint64_t id) const;
  SequenceInfo info(uint64_t id) const;
  size_t live() const;

 private:
  std::shared_ptr<Sequence> get(uint64_t id) const;
  std::shared_ptr<Model> model_;
  std::unique_ptr<ThreadPool> pool_;  // the sampler's per-row work (softmax, argmax) runs on it
  mutable std::mutex mu_;       // guards sequences_ and next_id_
  std::mutex step_mu_;          // one step at a time
  std::map<uint64_t, std::shared_ptr<Sequence>> sequences_;
  uint64_t next_id_ = 1;
};

}  // namespace vdiff
