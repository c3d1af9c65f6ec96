// The step engine: owns the live sequences and advances a batch of them by one denoising step per call.
//
// One step of one sequence, as in LLaDA's reference generate():
//   1. the current block's schedule says how many tokens k to commit now (k = 0: nothing to do);
//   2. the model predicts every still-masked position of the current block (with cfg, a second copy of
//      the canvas whose prompt is masked runs in the same batched forward);
//   3. each such row picks a token x0 (argmax, or Gumbel-max with temperature; never the mask token, see
//      sampler.h) and a confidence;
//   4. the k most confident rows are committed. Committed tokens are never masked again.
#include "engine.h"

#include <algorithm>
#include <cmath>
#include <new>
#include <set>
#include <string>

#include "error.h"
#include "sampler.h"
#include "threadpool.h"

namespace vdiff {

class Sequence {
 public:
  std::vector<int32_t> canvas;  // prompt followed by the answer; mask tokens where nothing is committed
  int prompt_length = 0;
  SamplingParams params;
  std::vector<BlockPlan> blocks;
  int steps_total = 0;
  // Progress: the block being worked on and the steps already spent on it.
  int block = 0;
  int step_in_block = 0;
  int steps_done = 0;
  bool finished = false;
  FinishReason reason = FinishReason::None;

  int answer_length() const { return static_cast<int>(canvas.size()) - prompt_length; }
  uint64_t memory_bytes() const {
    return sizeof(Sequence) + canvas.capacity() * sizeof(int32_t) + blocks.capacity() * sizeof(BlockPlan);
  }
};

static Error invalid(const std::string& message) { return Error(ErrorCode::InvalidArgument, message); }

Engine::Engine(std::shared_ptr<Model> model) : model_(std::move(model)) {
  if (!model_) throw invalid("Engine needs a model");
  pool_ = std::make_unique<ThreadPool>(model_->threads());
}

Engine::~Engine() = default;

static void validate(const std::vector<int32_t>& prompt, const SamplingParams& p, const ModelConfig& c) {
  const int vocab = c.embedding_size;
  // An empty prompt is allowed: it is unconditional generation (the reference handles it the same way;
  // with cfg the unconditional copy is then identical to the conditional one).
  for (size_t i = 0; i < prompt.size(); ++i) {
    if (prompt[i] < 0 || prompt[i] >= vocab)
      throw invalid("prompt[" + std::to_string(i) + "] = " + std::to_string(prompt[i]) +
                    " is outside the vocabulary [0, " + std::to_string(vocab) + ")");
    // The reference would treat a mask token in the prompt as a hole to fill; that is infilling, which
    // this API does not offer, so it is refused rather than silently rewritten.
    if (prompt[i] == c.mask_token_id)
      throw invalid("prompt[" + std::to_string(i) + "] is the mask token " + std::to_string(c.mask_token_id));
  }
  if (p.gen_length < 1) throw invalid("gen_length must be >= 1 (got " + std::to_string(p.gen_length) + ")");
  if (p.block_length < 1)
    throw invalid("block_length must be >= 1 (got " + std::to_string(p.block_length) + ")");
  if (p.steps < 1) throw invalid("steps must be >= 1 (got " + std::to_string(p.steps) + ")");
  const int64_t total = static_cast<int64_t>(prompt.size()) + p.gen_length;
  if (total > c.max_sequence_length)
    throw invalid("prompt of " + std::to_string(prompt.size()) + " tokens plus gen_length " +
                  std::to_string(p.gen_length) + " exceeds the model context of " +
                  std::to_string(c.max_sequence_length));
  if (!(p.temperature >= 0.0) || !std::isfinite(p.temperature))
    throw invalid("temperature must be a finite number >= 0 (got " + std::to_string(p.temperature) + ")");
  if (!(p.cfg_scale >= 0.0) || !std::isfinite(p.cfg_scale))
    throw invalid("cfg_scale must be a finite number >= 0 (got " + std::to_string(p.cfg_scale) + ")");
  if (p.remasking != Remasking::LowConfidence && p.remasking != Remasking::Random)
    throw invalid("remasking must be low_confidence or random");
  if (p.eot_token_id != -1 && (p.eot_token_id < 0 || p.eot_token_id >= vocab))
    throw invalid("eot_token_id " + std::to_string(p.eot_token_id) + " is outside the vocabulary [0, " +
                  std::to_string(vocab) + ") (use -1 for none)");
}

uint64_t Engine::create(const std::vector<int32_t>& prompt, const SamplingParams& params) {
  const ModelConfig& config = model_->config();
  validate(prompt, params, config);

  auto seq = std::make_shared<Sequence>();
  seq->prompt_length = static_cast<int>(prompt.size());
  seq->params = params;
  seq->canvas.reserve(prompt.size() + params.gen_length);
  seq->canvas.assign(prompt.begin(), prompt.end());
  seq->canvas.resize(prompt.size() + params.gen_length, config.mask_token_id);
  seq->blocks = plan_blocks(params.gen_length, params.block_length, params.steps);
  for (const BlockPlan& b : seq->blocks) seq->steps_total += b.steps;

  std::lock_guard<std::mutex> lock(mu_);
  const uint64_t id = next_id_++;
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
  return std::vector<int32_t>(seq->canvas.begin() + seq->prompt_length, seq->canvas.end());
}

SequenceInfo Engine::info(uint64_t id) const {
  std::shared_ptr<Sequence> seq = get(id);
  std::lock_guard<std::mutex> lock(mu_);
  return SequenceInfo{seq->prompt_length, seq->answer_length(), seq->steps_total, seq->steps_done,
                      seq->finished, seq->memory_bytes()};
}

size_t Engine::live() const {
  std::lock_guard<std::mutex> lock(mu_);
  return sequences_.size();
}

namespace {

// What one sequence does in the step being built.
struct Work {
  std::shared_ptr<Sequence> seq;
  int k = 0;                     // tokens to commit now
  std::vector<int32_t> rows;     // canvas positions that get logits (the block's still-masked ones)
  std::vector<int32_t> uncond;   // cfg only: the canvas with the prompt masked
  size_t first_row = 0;          // index of rows[0] among all conditional rows of the step
  size_t cond_offset = 0;        // row index into the logits buffer of the conditional rows
  size_t uncond_offset = 0;      // ... of the unconditional rows (cfg only)
};

// One row of sampling work, self-contained so rows can run on any thread.
struct RowJob {
  float* logits;
  const float* uncond;  // nullptr without cfg
  double cfg_scale;
  const RowRule* rule;
  uint64_t seed;
  int step;
  int position;  // in the answer
  RowChoice* out;
};

}  // namespace

std::vector<StepOutput> Engine::step(const std::vector<uint64_t>& ids, const std::atomic<bool>* cancel) {
  std::lock_guard<std::mutex> step_lock(step_mu_);
  const ModelConfig& config = model_->config();
  const int vocab = config.embedding_size;
  const int32_t mask = config.mask_token_id;

  // Resolve and check the batch before any work.
  std::vector<Work> work(ids.size());
  {
    std::set<uint64_t> seen;
    for (size_t i = 0; i < ids.size(); ++i) {
      if (!seen.insert(ids[i]).second)
        throw invalid("sequence " + std::to_string(ids[i]) + " appears twice in one step");
      work[i].seq = get(ids[i]);
      if (work[i].seq->finished) throw invalid("sequence " + std::to_string(ids[i]) + " is already finished");
    }
  }

  // Plan: the rows each sequence needs, and the batched forward that computes them.
  std::vector<ForwardSeq> batch;
  size_t n_rows = 0, n_cond_rows = 0;
  for (Work& w : work) {
    const Sequence& s = *w.seq;
    const BlockPlan& block = s.blocks[s.block];
    w.k = transfers_at(block.length, block.steps, s.step_in_block);
    if (w.k == 0) continue;  // nothing would be committed: no forward needed, the step still counts
    // The candidates are the block's still-masked positions: earlier blocks are complete (each step
    // commits exactly k real tokens and the schedule sums to the block length), later ones wait.
    const int block_begin = s.prompt_length + block.start;
    for (int p = block_begin; p < block_begin + block.length; ++p)
      if (s.canvas[p] == mask) w.rows.push_back(p);
    if (w.rows.empty()) continue;  // cannot happen while k <= masks left in the block; nothing to sample
    const int length = static_cast<int>(s.canvas.size());
    const int n = static_cast<int>(w.rows.size());
    w.first_row = n_cond_rows;
    n_cond_rows += n;
    w.cond_offset = n_rows;
    batch.push_back(ForwardSeq{s.canvas.data(), length, w.rows.data(), n});
    n_rows += n;
    if (s.params.cfg_scale > 0.0) {
      w.uncond = s.canvas;
      std::fill(w.uncond.begin(), w.uncond.begin() + s.prompt_length, mask);
      w.uncond_offset = n_rows;
      batch.push_back(ForwardSeq{w.uncond.data(), length, w.rows.data(), n});
      n_rows += n;
    }
  }

  // Not zero-filled: with cfg and a batch of 8 at LLaDA's vocabulary this is a few hundred MB, and the
  // forward writes every element.
  std::unique_ptr<float[]> logits(new float[n_rows * static_cast<size_t>(vocab)]);
  if (n_rows > 0) model_->forward(batch, logits.get(), cancel);

  // Sample every row, in parallel across rows.
  std::vector<RowRule> rules(work.size());
  std::vector<RowChoice> choices(n_cond_rows);
  std::vector<RowJob> jobs;
  jobs.reserve(n_cond_rows);
  for (size_t i = 0; i < work.size(); ++i) {
    const Work& w = work[i];
    const SamplingParams& p = w.seq->params;
    rules[i] = RowRule{vocab, std::min(config.vocab_size, vocab), mask, p.temperature, p.remasking,
                       config.eos_token_id, p.eot_token_id, p.logits_eos_inf, p.confidence_eos_eot_inf};
    const bool cfg = p.cfg_scale > 0.0;
    for (size_t r = 0; r < w.rows.size(); ++r) {
      float* row = logits.get() + (w.cond_offset + r) * vocab;
      const float* un = cfg ? logits.get() + (w.uncond_offset + r) * vocab : nullptr;
      jobs.push_back(RowJob{row, un, p.cfg_scale, &rules[i], p.seed, w.seq->steps_done,
                            w.rows[r] - w.seq->prompt_length, &choices[w.first_row + r]});
    }
  }
  pool_->parallel_for(jobs.size(), [&jobs, vocab](size_t begin, size_t end, int) {
    for (size_t j = begin; j < end; ++j) {
      const RowJob& job = jobs[j];
      if (job.uncond) apply_cfg(job.logits, job.uncond, vocab, job.cfg_scale);
      Rng rng = row_rng(job.seed, job.step, job.position);
      *job.out = sample_row(job.logits, *job.rule, rng);
    }
  });

  if (cancel && cancel->load()) throw Error(ErrorCode::Cancelled, "step cancelled");

  // Decide everything (and allocate everything) before touching any sequence.
  std::vector<StepOutput> outputs(work.size());
  for (size_t i = 0; i < work.size(); ++i) {
    const Work& w = work[i];
    const Sequence& s = *w.seq;
    StepOutput& out = outputs[i];
    out.id = ids[i];
    out.block = s.block;
    std::vector<double> confidence(w.rows.size());
    for (size_t r = 0; r < w.rows.size(); ++r) confidence[r] = choices[w.first_row + r].confidence;
    for (int r : select_most_confident(confidence.data(), static_cast<int>(confidence.size()), w.k)) {
      const RowChoice& c = choices[w.first_row + r];
      out.committed.push_back(CommittedToken{w.rows[r] - s.prompt_length, c.token,
                                             static_cast<float>(c.probability)});
    }
  }

  // Commit.
  std::lock_guard<std::mutex> lock(mu_);
  for (size_t i = 0; i < work.size(); ++i) {
    Sequence& s = *work[i].seq;
    StepOutput& out = outputs[i];
    for (const CommittedToken& t : out.committed) s.canvas[s.prompt_length + t.position] = t.token;
    ++s.steps_done;
    if (++s.step_in_block == s.blocks[s.block].steps) {
      s.step_in_block = 0;
      if (++s.block == static_cast<int>(s.blocks.size())) {
        s.block = static_cast<int>(s.blocks.size()) - 1;
        s.finished = true;
        const bool eos = std::any_of(s.canvas.begin() + s.prompt_length, s.canvas.end(), [&](int32_t t) {
          return t == config.eos_token_id || (s.params.eot_token_id >= 0 && t == s.params.eot_token_id);
        });
        s.reason = eos ? FinishReason::Eos : FinishReason::Length;
      }
    }
    out.finished = s.finished;
    out.reason = s.reason;
    out.steps_done = s.steps_done;
  }
  return outputs;
}

}  // namespace vdiff
