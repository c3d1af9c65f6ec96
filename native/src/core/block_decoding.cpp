// Block diffusion as a sequence of the step engine; block_decoding.h has the rules.
#include "block_decoding.h"

#include <algorithm>
#include <string>

#include "error.h"
#include "sampler.h"
#include "weights.h"

namespace vdiff {

namespace {

Error invalid(const std::string& message, const std::string& param) {
  return Error(ErrorCode::InvalidArgument, message, param);
}

class BlockSequence final : public Sequence {
 public:
  // Prompt, then mask tokens up to nb * B positions.
  std::vector<int32_t> canvas;
  int B = 0;                   // block length
  int n_blocks = 0;            // nb
  int first_block = 0;         // P / B: the block holding the answer's first position
  std::vector<int> schedule;   // the open block's quota per step
  std::vector<int32_t> stops;  // EOS and the stop tokens (and the request's EOT)
  // A template's fixed positions (canvas-wide; empty without a template): never denoised, edited or reported.
  std::vector<bool> fixed;
  int32_t mask = 0;
  // Progress: the open block (absolute index), its denoise steps so far and, editing, its forwards
  // without masks. [pending_commit, commit_end): the finished blocks whose commit forward is due
  // (pending_commit -1: none); more than one when the blocks after a finished one hold nothing to denoise
  // (a template's fixed tokens only).
  int block = 0;
  int step_in_block = 0;
  int post = 0;
  int prefilled = 0;      // prompt positions [0, prefilled) in the cache: copied or prefilled
  int prefill_chunk = 0;  // positions per prefill forward (a multiple of B); 0: the rest at once
  int pending_commit = -1;
  int commit_end = -1;
  std::unique_ptr<KVCache> cache;           // kv_cache Prefix; freed when the sequence finishes
  std::weak_ptr<PrefixCache> prefix_cache;  // where finished prefixes are left for later sequences
  bool looked_up = false;                   // the prefix cache was asked (once counted)
  bool prefill_started = false;             // its prefill forwards began (registered with the prefix cache)
  bool waiting = false;                     // this step: another sequence is prefilling the same blocks
  int copied = 0;  // prompt positions copied by prepare(); published to prompt_cached by apply() (under the
                   // engine's lock, which Engine::info reads under)
  int keep = 0;    // positions to leave in the prefix cache after this step (settle)
  std::unique_ptr<KVCache> retired;  // the cache of a sequence that finished this step, until settle

  ~BlockSequence() override { end_prefill(); }
  // Editing: per canvas position, the probability and alternatives of its last write (reported with it).
  std::vector<float> probability;
  std::vector<std::vector<TopLogprob>> top;

  bool editing() const { return params.editing_threshold >= 0.0; }
  bool templated() const { return !fixed.empty(); }
  bool is_fixed(int p) const { return templated() && fixed[p]; }
  // Block b's masks; with `answer_only`, those of the answer (not the padding after it to the block's end).
  int masks_in(int b, bool answer_only = false) const {
    int masks = 0;
    const int end = answer_only ? std::min((b + 1) * B, answer_end()) : (b + 1) * B;
    for (int p = b * B; p < end; ++p) masks += canvas[p] == mask ? 1 : 0;
    return masks;
  }
  // The first block from `b` on with an answer position to denoise (n_blocks: none): the blocks before it
  // are final as laid (a template's tokens, and padding never reported). Without a template, b itself.
  int next_open(int b) const {
    while (b < n_blocks && masks_in(b, true) == 0) ++b;
    return b;
  }
  // Block b's quota per step: the reference's schedule of B over the steps; a block holding template
  // positions spreads its steps over its masks only, as full-canvas decoding does.
  std::vector<int> schedule_of(int b) const {
    bool holds_fixed = false;
    for (int p = b * B; p < (b + 1) * B && !holds_fixed; ++p) holds_fixed = is_fixed(p);
    if (!holds_fixed) return block_schedule(B, params.steps);
    const int masks = masks_in(b);
    return block_schedule(masks, std::max(1, std::min(params.steps, masks)));
  }
  int answer_end() const { return prompt_length + params.gen_length; }
  int length() const { return static_cast<int>(canvas.size()); }
  std::vector<int32_t> answer() const override {
    return std::vector<int32_t>(canvas.begin() + prompt_length, canvas.begin() + answer_end());
  }
  uint64_t cache_bytes() const override { return cache ? cache->size() : 0; }
  uint64_t memory_bytes() const override {
    uint64_t tops = 0;
    for (const auto& t : top) tops += t.capacity() * sizeof(TopLogprob);
    return sizeof(BlockSequence) + canvas.capacity() * sizeof(int32_t) + schedule.capacity() * sizeof(int) +
           probability.capacity() * sizeof(float) + top.capacity() * sizeof(top[0]) + tops + cache_bytes();
  }

  void plan(StepWork& w, const ModelConfig& config) const override;
  void decide(StepWork& w, const RowResult* rows, StepOutput& out, const ModelConfig& config) const override;
  void apply(const StepWork& w, StepOutput& out, const ModelConfig& config) override;

 private:
  ForwardSeq forward_of(int begin, int end, const StepWork& w, bool with_cache) const {
    ForwardSeq f;
    f.tokens = canvas.data();
    f.length = length();
    f.logit_rows = w.rows.data();
    f.n_logit_rows = static_cast<int>(w.rows.size());
    f.cache = with_cache ? cache.get() : nullptr;
    f.compute_begin = begin;
    f.compute_end = end;
    f.attention_block = B;
    return f;
  }
  bool is_stop(int32_t t) const { return std::find(stops.begin(), stops.end(), t) != stops.end(); }

  void end_prefill() {
    if (!prefill_started) return;
    if (const std::shared_ptr<PrefixCache> prefixes = prefix_cache.lock()) prefixes->prefill_ended(this);
    prefill_started = false;
  }

 public:
  // Until its prefill begins, on the stepping thread at every step: the prompt's whole blocks the prefix
  // cache holds are copied (a failed copy leaves them to the prefill); while another sequence is prefilling
  // more of the same blocks, this one waits for them (a step without a forward); else its prefill begins.
  void prepare() override {
    waiting = false;
    const int whole = first_block * B;
    if (prefill_started || !cache || prefilled >= whole) return;
    const std::shared_ptr<PrefixCache> prefixes = prefix_cache.lock();
    if (!prefixes) return;
    const PrefixCache::Hit hit = prefixes->find(canvas.data(), whole, B, !looked_up);
    looked_up = true;
    if (hit.positions > prefilled && prefixes->copy_into(hit, *cache, prefilled)) copied = prefilled = hit.positions;
    if (prefilled >= whole) return;
    waiting = prefixes->awaits(canvas.data(), whole, B, prefilled);
    if (waiting) return;
    prefixes->prefilling(this, canvas.data(), whole, B, prefilled);
    prefill_started = true;
  }
  // The exact prefix apply() marked ([0, keep): prompt blocks after the prefill, everything committed when
  // the sequence finished) copied into the prefix cache, outside the engine's lock; a prefill that is done
  // stops being waited for.
  void settle() override {
    if (keep > 0)
      if (const std::shared_ptr<PrefixCache> prefixes = prefix_cache.lock())
        if (const KVCache* from = cache ? cache.get() : retired.get()) prefixes->insert(canvas.data(), keep, B, *from);
    keep = 0;
    retired.reset();
    if (prefilled >= first_block * B) end_prefill();
  }
};

void BlockSequence::plan(StepWork& w, const ModelConfig&) const {
  if (cache && prefilled < first_block * B) {  // the prompt's whole blocks, once, or chunk by chunk
    w.phase = Phase::Prefill;
    if (waiting) return;  // for another sequence's prefill of the same blocks: no forward
    const int end = prefill_chunk > 0 ? std::min(first_block * B, prefilled + prefill_chunk) : first_block * B;
    w.forwards.push_back(forward_of(prefilled, end, w, true));
    w.computed = end - prefilled;
    w.refresh = true;
    return;
  }
  if (pending_commit >= 0) {  // the finished blocks from their final tokens: their exact keys and values
    w.phase = Phase::Commit;
    w.forwards.push_back(forward_of(pending_commit * B, commit_end * B, w, true));
    w.computed = (commit_end - pending_commit) * B;
    w.refresh = true;
    return;
  }
  w.phase = Phase::Denoise;
  // The rows: the block's masks and, editing, its committed positions too (never the prompt's tail nor a
  // template's tokens).
  const int begin = block * B, end = (block + 1) * B;
  for (int p = std::max(begin, prompt_length); p < end; ++p)
    if (canvas[p] == mask || (editing() && !is_fixed(p))) w.rows.push_back(p);
  const int from = cache ? begin : 0;
  w.forwards.push_back(forward_of(from, end, w, cache != nullptr));
  w.computed = end - from;
}

void BlockSequence::decide(StepWork& w, const RowResult* rows, StepOutput& out, const ModelConfig&) const {
  if (w.phase != Phase::Denoise) {
    out.block = (w.phase == Phase::Commit ? pending_commit : block) - first_block;
    return;
  }
  out.block = block - first_block;
  const int n = static_cast<int>(w.rows.size());
  std::vector<int> masked;  // indices into rows
  for (int r = 0; r < n; ++r)
    if (canvas[w.rows[r]] == mask) masked.push_back(r);
  std::vector<double> confidence(masked.size());
  for (size_t i = 0; i < masked.size(); ++i) confidence[i] = rows[masked[i]].confidence;
  const double threshold = params.parallel_threshold;
  std::vector<int> above;  // indices into masked
  if (threshold > 0.0)
    for (size_t i = 0; i < masked.size(); ++i)
      if (confidence[i] > threshold) above.push_back(static_cast<int>(i));
  // The quota: the schedule's (with editing: one); past the schedule (it cannot happen: the schedule
  // sums to B) whatever is left.
  const int quota = editing()                                           ? 1
                    : step_in_block < static_cast<int>(schedule.size()) ? schedule[step_in_block]
                                                                        : static_cast<int>(masked.size());
  std::vector<int> chosen;  // indices into masked, ascending
  if (!masked.empty()) {
    if (threshold > 0.0 && static_cast<int>(above.size()) >= quota && !above.empty()) chosen = above;
    else chosen = select_most_confident(confidence.data(), static_cast<int>(masked.size()), quota);
  }
  std::vector<bool> writes_row(n, false);
  for (int i : chosen) writes_row[masked[i]] = true;
  int edits = 0;
  if (editing())
    for (int r = 0; r < n; ++r) {
      const int32_t current = canvas[w.rows[r]];
      if (current != mask && rows[r].probability > params.editing_threshold && rows[r].token != current)
        writes_row[r] = true, ++edits;
    }
  for (int r = 0; r < n; ++r)
    if (writes_row[r])
      w.writes.push_back(StepWork::Write{w.rows[r], rows[r].token, static_cast<float>(rows[r].probability),
                                         std::vector<TopLogprob>(rows[r].top, rows[r].top + rows[r].n_top)});

  // Is the block done?
  const int masks_after = static_cast<int>(masked.size() - chosen.size());
  if (editing()) {
    w.post = post + (masked.empty() ? 1 : 0);
    w.block_done = (masked.empty() && edits == 0) || (masks_after == 0 && w.post + 1 > params.max_post_steps);
  } else {
    w.block_done = masks_after == 0;
  }

  // The block after this step's writes, for the stop test and the reports.
  const int begin = block * B, end = (block + 1) * B;
  const int answer_from = std::max(begin, prompt_length), answer_to = std::min(end, answer_end());
  std::vector<int32_t> tokens(canvas.begin() + begin, canvas.begin() + end);
  for (const StepWork::Write& x : w.writes) tokens[x.position - begin] = x.token;
  if (w.block_done) {
    // A templated answer is as long as its template: an end token in a value ends the value, not the answer.
    bool stop = false;
    for (int p = prompt_length; p < answer_to && !stop && !templated(); ++p)
      stop = is_stop(p < begin ? canvas[p] : tokens[p - begin]);
    w.eos = stop;
    w.finishes = stop || next_open(block + 1) == n_blocks;
  }

  if (!editing()) {
    for (const StepWork::Write& x : w.writes)
      if (x.position < answer_end())
        out.committed.push_back(CommittedToken{x.position - prompt_length, x.token, x.probability, x.top});
    return;
  }
  // Editing: the block's written answer positions, provisional until the block closes.
  std::vector<CommittedToken>& report = w.block_done ? out.committed : out.provisional;
  size_t next = 0;  // this step's writes, ascending
  for (int p = answer_from; p < answer_to; ++p) {
    if (is_fixed(p)) continue;
    while (next < w.writes.size() && w.writes[next].position < p) ++next;
    if (next < w.writes.size() && w.writes[next].position == p) {
      const StepWork::Write& x = w.writes[next];
      report.push_back(CommittedToken{p - prompt_length, x.token, x.probability, x.top});
    } else if (canvas[p] != mask) {
      report.push_back(CommittedToken{p - prompt_length, canvas[p], probability[p], top[p]});
    }
  }
}

void BlockSequence::apply(const StepWork& w, StepOutput&, const ModelConfig&) {
  prompt_cached = copied;
  switch (w.phase) {
    case Phase::Prefill:
      prefilled += w.computed;
      if (w.computed > 0) {
        if (const std::shared_ptr<PrefixCache> prefixes = prefix_cache.lock())
          prefixes->prefill_progress(this, prefilled);
      }
      if (prefilled == first_block * B) keep = prefilled;
      return;
    case Phase::Commit: pending_commit = commit_end = -1; return;
    case Phase::Denoise: break;
  }
  for (const StepWork::Write& x : w.writes) {
    canvas[x.position] = x.token;
    if (editing()) {
      probability[x.position] = x.probability;
      top[x.position] = x.top;
    }
  }
  post = w.post;
  if (!w.block_done) {
    ++step_in_block;
    return;
  }
  if (w.finishes) {
    finished = true;
    reason = w.eos ? FinishReason::Eos : FinishReason::Length;
    keep = block * B;            // the blocks before this one were committed from their final tokens
    retired = std::move(cache);  // never read again; freed once settle() has kept its prefix
    return;
  }
  // The next block to denoise; the blocks between hold a template's tokens only and are final as laid.
  const int next = next_open(block + 1);
  if (cache) pending_commit = block, commit_end = next;
  block = next;
  schedule = schedule_of(block);
  step_in_block = 0;
  post = 0;
}

}  // namespace

std::vector<int> block_schedule(int block_length, int steps) {
  std::vector<int> quota(steps, block_length / steps);
  for (int i = 0; i < block_length % steps; ++i) ++quota[i];
  return quota;
}

std::shared_ptr<Sequence> make_block_sequence(const std::vector<int32_t>& prompt, const SamplingParams& p,
                                              const std::vector<int32_t>& suffix,
                                              const std::vector<int32_t>& answer_template, Backend& backend,
                                              const std::shared_ptr<PrefixCache>& prefix_cache, int prefill_chunk) {
  const ModelConfig& c = backend.config();
  const std::string family = "model type " + c.model_type + " (block diffusion)";
  if (p.cfg_scale > 0.0) throw invalid("cfg_scale: classifier-free guidance does not apply to " + family, "cfg_scale");
  if (p.remasking != Remasking::LowConfidence)
    throw invalid("remasking: " + family + " commits by confidence (low_confidence) only", "remasking");
  if (!suffix.empty()) throw invalid("suffix: infilling does not apply to " + family, "suffix");
  if (p.parallel_factor > 0.0)
    throw invalid("parallel_factor does not apply to " + family + "; its rule is parallel_threshold",
                  "parallel_factor");
  if (p.kv_cache == KVCacheMode::Dual)
    throw invalid("kv_cache dual does not apply to " + family + ": its cache is prefix (exact) or none", "kv_cache");
  if (p.block_length != c.block_length)
    throw invalid("block_length " + std::to_string(p.block_length) + ": " + family + " was trained with blocks of " +
                      std::to_string(c.block_length),
                  "block_length");
  if (p.editing_threshold >= 0.0 && !family_of(c).editing)
    throw invalid("editing_threshold: model type " + c.model_type + " has no token editing (LLaDA2.1 has)",
                  "editing_threshold");
  const int B = c.block_length, P = static_cast<int>(prompt.size());
  const int64_t n_blocks = (static_cast<int64_t>(P) + p.gen_length + B - 1) / B;
  if (n_blocks * B > c.max_sequence_length)
    throw invalid("prompt of " + std::to_string(P) + " tokens plus gen_length " + std::to_string(p.gen_length) +
                      ", rounded up to whole blocks of " + std::to_string(B) + ", exceeds the model context of " +
                      std::to_string(c.max_sequence_length),
                  "gen_length");

  auto seq = std::make_shared<BlockSequence>();
  seq->params = p;
  seq->prompt_length = P;
  seq->B = B;
  seq->n_blocks = static_cast<int>(n_blocks);
  seq->first_block = P / B;
  seq->mask = c.mask_token_id;
  seq->stops.push_back(c.eos_token_id);
  seq->stops.insert(seq->stops.end(), c.stop_token_ids.begin(), c.stop_token_ids.end());
  if (p.eot_token_id >= 0) seq->stops.push_back(p.eot_token_id);
  seq->canvas.assign(prompt.begin(), prompt.end());
  seq->canvas.resize(static_cast<size_t>(n_blocks * B), c.mask_token_id);
  // A template's tokens are in place from the start (engine.cpp checked it): the blocks they fill alone
  // are never denoised, only committed with the block before them.
  if (std::any_of(answer_template.begin(), answer_template.end(), [](int32_t t) { return t != -1; })) {
    seq->fixed.assign(seq->canvas.size(), false);
    for (int q = 0; q < p.gen_length; ++q)
      if (answer_template[q] != -1) seq->canvas[P + q] = answer_template[q], seq->fixed[P + q] = true;
  }
  seq->block = seq->next_open(seq->first_block);
  seq->schedule = seq->schedule_of(seq->block);
  // Template blocks before the first one to denoise: committed after the prefill.
  if (seq->block > seq->first_block && p.kv_cache == KVCacheMode::Prefix)
    seq->pending_commit = seq->first_block, seq->commit_end = seq->block;
  // Planned steps: the schedule's per block; with editing a block takes at most its masks plus
  // max_post_steps (every step with masks commits one at least).
  for (int b = seq->first_block; b < seq->n_blocks; ++b) {
    const int masks = seq->masks_in(b);
    if (seq->masks_in(b, true) == 0) continue;
    seq->steps_total += seq->editing() ? masks + p.max_post_steps : static_cast<int>(seq->schedule_of(b).size());
  }
  if (seq->editing()) {
    seq->probability.assign(seq->canvas.size(), 0.0f);
    seq->top.resize(seq->canvas.size());
  }
  // The prefill (of first_block * B positions: none for a prompt shorter than a block) runs in chunks of
  // whole blocks, at least one.
  seq->prefill_chunk = prefill_chunk > 0 ? std::max(B, prefill_chunk / B * B) : 0;
  if (p.kv_cache == KVCacheMode::Prefix) {
    seq->cache = backend.make_kv_cache(seq->length());
    seq->prefix_cache = prefix_cache;
  }
  return seq;
}

}  // namespace vdiff
