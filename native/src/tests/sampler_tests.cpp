// Tests of the sampler and the step engine against a small fake model whose logits are a known function
// of the canvas, so every expectation can be computed here independently.
#include <atomic>
#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "core/engine.h"
#include "core/error.h"
#include "core/sampler.h"

using namespace vdiff;

static int g_failures = 0;
static int g_checks = 0;

#define CHECK(cond)                                                                 \
  do {                                                                              \
    ++g_checks;                                                                     \
    if (!(cond)) {                                                                  \
      ++g_failures;                                                                 \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
    }                                                                               \
  } while (0)

// Runs fn, expects a vdiff::Error with `code` whose message contains `fragment`.
static void expect_error(ErrorCode code, const std::string& fragment, const std::function<void()>& fn, int line) {
  ++g_checks;
  try {
    fn();
  } catch (const Error& e) {
    if (e.code() == code && std::string(e.what()).find(fragment) != std::string::npos) return;
    std::fprintf(stderr, "line %d: wrong error %s: %s\n", line, error_code_name(e.code()), e.what());
    ++g_failures;
    return;
  }
  std::fprintf(stderr, "line %d: expected an error containing '%s'\n", line, fragment.c_str());
  ++g_failures;
}
#define EXPECT_ERROR(code, fragment, body) \
  expect_error(                            \
      code, fragment, [&] { body; }, __LINE__)

// ---- the fake model -------------------------------------------------------------------------------

constexpr int kVocab = 16;
constexpr int kMask = 15;
constexpr int kEos = 14;
constexpr int kEot = 13;

// logits(row) = rule(canvas, position). The default rule mixes the position with every token on the
// canvas, so logits change as tokens are committed and differ between a prompt and a masked prompt.
using LogitRule = std::function<void(const int32_t* canvas, int length, int position, float* out)>;

static float hash_unit(uint64_t x) {
  uint64_t state = x;
  return static_cast<float>(splitmix64(state) >> 40) / static_cast<float>(1ull << 24);  // [0, 1)
}

static void default_rule(const int32_t* canvas, int length, int position, float* out) {
  uint64_t h = 1469598103934665603ull;
  for (int i = 0; i < length; ++i) h = (h ^ static_cast<uint64_t>(canvas[i] + 7 * i)) * 1099511628211ull;
  for (int v = 0; v < kVocab; ++v) out[v] = 6.0f * hash_unit(h + 1000003ull * position + v) - 3.0f;
}

class FakeModel : public Backend {
 public:
  explicit FakeModel(LogitRule rule = default_rule, int max_length = 64)
      : Backend(ModelConfig{}, LoadOptions{}), rule_(std::move(rule)) {
    config_.d_model = 8;
    config_.n_heads = 1;
    config_.n_kv_heads = 1;
    config_.n_layers = 1;
    config_.mlp_hidden_size = 8;
    config_.vocab_size = kVocab;
    config_.embedding_size = kVocab;
    config_.mask_token_id = kMask;
    config_.eos_token_id = kEos;
    config_.max_sequence_length = max_length;
  }
  BackendInfo info() const override { return BackendInfo{"fake", "fake", "none", 0, 0}; }
  std::string weight_dtype() const override { return "f32"; }
  uint64_t parameter_count() const override { return 0; }
  uint64_t weight_bytes() const override { return 0; }

  void forward(const std::vector<ForwardSeq>& batch, float* logits, const std::atomic<bool>* cancel) override {
    if (cancel && cancel->load()) throw Error(ErrorCode::Cancelled, "cancelled in forward");
    ++forwards;
    seen.clear();
    for (const ForwardSeq& s : batch) {
      seen.push_back({std::vector<int32_t>(s.tokens, s.tokens + s.length),
                      std::vector<int32_t>(s.logit_rows, s.logit_rows + s.n_logit_rows)});
      for (int r = 0; r < s.n_logit_rows; ++r) {
        rule_(s.tokens, s.length, s.logit_rows[r], logits);
        logits += kVocab;
      }
    }
    if (after_forward) after_forward();
  }

  struct Seen {
    std::vector<int32_t> tokens;
    std::vector<int32_t> rows;
  };
  std::vector<Seen> seen;  // the last forward's batch
  int forwards = 0;
  std::function<void()> after_forward;  // lets a test act while the step is between forward and commit

 protected:
  std::unique_ptr<KVCache> allocate_kv_cache(int, uint64_t) override {
    throw Error(ErrorCode::InvalidArgument, "this model does not support KV caching");
  }

 private:
  LogitRule rule_;
};

static SamplingParams params(int gen, int block, int steps) {
  SamplingParams p;
  p.gen_length = gen;
  p.block_length = block;
  p.steps = steps;
  return p;
}

// Runs one sequence to the end; returns its answer and every step's output.
static std::vector<int32_t> run_to_end(Engine& engine, uint64_t id, std::vector<StepOutput>* steps = nullptr) {
  for (int guard = 0; guard < 10000; ++guard) {
    StepOutput out = engine.step({id}).at(0);
    if (steps) steps->push_back(out);
    if (out.finished) break;
  }
  return engine.canvas(id);
}

// An independent, plain re-statement of the reference loop for one sequence at temperature 0 with
// low_confidence remasking: logits of every position, confidence -inf outside the block and at
// non-masks, stable sort, commit the top k. Used to check the engine end to end. With a suffix the
// canvas is prompt, masks, suffix. With parallel decoding (Fast-dLLM's rule, restated): a block runs
// until it has no mask; each step commits the top-ranked position and then, in rank order, each next one
// while its confidence passes the threshold, or 1 - factor / (n + 1) for the n-th. `steps_taken` counts
// the steps.
static std::vector<int32_t> reference_answer(const LogitRule& rule, const std::vector<int32_t>& prompt,
                                             const SamplingParams& p, const std::vector<int32_t>& suffix = {},
                                             int* steps_taken = nullptr) {
  std::vector<int32_t> x(prompt);
  x.resize(prompt.size() + p.gen_length, kMask);
  x.insert(x.end(), suffix.begin(), suffix.end());
  const int lp = static_cast<int>(prompt.size());
  const bool parallel = p.parallel_threshold > 0 || p.parallel_factor > 0;
  if (steps_taken) *steps_taken = 0;
  for (const BlockPlan& b : plan_blocks(p.gen_length, p.block_length, p.steps)) {
    for (int step = 0; parallel || step < b.steps; ++step) {
      int masks = 0;
      for (int q = lp + b.start; q < lp + b.start + b.length; ++q) masks += x[q] == kMask;
      if (masks == 0) break;
      if (steps_taken) ++*steps_taken;
      int k = parallel ? masks : transfers_at(b.length, b.steps, step);
      std::vector<std::pair<double, int>> ranked;  // (confidence, position)
      std::vector<int32_t> x0(x.size());
      for (int pos = 0; pos < static_cast<int>(x.size()); ++pos) {
        float l[kVocab];
        rule(x.data(), static_cast<int>(x.size()), pos, l);
        // Penalties, restated: per token, its count among the answer's committed tokens (not masks, EOS or
        // EOT) and whether the prompt holds it.
        for (int v = 0; v < kVocab; ++v) {
          int count = 0;
          bool in_prompt = false;
          for (int q = lp; q < lp + p.gen_length; ++q)
            count += x[q] == v && v != kMask && v != kEos && v != p.eot_token_id;
          for (int q = 0; q < lp; ++q) in_prompt = in_prompt || x[q] == v;
          double value = l[v];
          if (p.repetition_penalty != 1.0 && (count > 0 || in_prompt))
            value = value > 0 ? value / p.repetition_penalty : value * p.repetition_penalty;
          if (count > 0) value -= p.frequency_penalty * count + p.presence_penalty;
          l[v] = static_cast<float>(value);
        }
        int best = 0;  // x0: argmax over every token but the mask (see sampler.h)
        for (int v = 1; v < kVocab; ++v)
          if (v != kMask && l[v] > l[best]) best = v;
        float max = l[0];
        for (int v = 1; v < kVocab; ++v) max = std::max(max, l[v]);
        double sum = 0;  // the softmax is over the whole row, the mask token included
        for (int v = 0; v < kVocab; ++v) sum += std::exp(static_cast<double>(l[v]) - max);
        double conf = std::exp(static_cast<double>(l[best]) - max) / sum;
        if (pos >= lp + b.start + b.length || x[pos] != kMask) conf = -INFINITY;
        x0[pos] = best;
        ranked.push_back({conf, pos});
      }
      std::stable_sort(ranked.begin(), ranked.end(), [](auto& a, auto& c) { return a.first > c.first; });
      if (parallel) {
        int passed = 1;
        while (passed < k) {
          const double bar = p.parallel_threshold > 0 ? p.parallel_threshold : 1.0 - p.parallel_factor / (passed + 2);
          if (ranked[passed].first < bar) break;
          ++passed;
        }
        k = passed;
      }
      for (int i = 0; i < k; ++i) x[ranked[i].second] = x0[ranked[i].second];
    }
  }
  return std::vector<int32_t>(x.begin() + lp, x.begin() + lp + p.gen_length);
}

// ---- tests ----------------------------------------------------------------------------------------

static void test_schedule() {
  // The reference case: divisible everywhere.
  auto plan = plan_blocks(128, 32, 128);
  CHECK(plan.size() == 4);
  for (int b = 0; b < 4; ++b) CHECK(plan[b].start == 32 * b && plan[b].length == 32 && plan[b].steps == 32);
  // Short last block; the step remainder goes to the first blocks.
  plan = plan_blocks(10, 4, 5);
  CHECK(plan.size() == 3);
  CHECK(plan[0].length == 4 && plan[1].length == 4 && plan[2].length == 2 && plan[2].start == 8);
  CHECK(plan[0].steps == 2 && plan[1].steps == 2 && plan[2].steps == 1);
  // Fewer steps than blocks: one step per block. More steps than tokens: clamped to the block length.
  plan = plan_blocks(10, 4, 2);
  CHECK(plan[0].steps == 1 && plan[1].steps == 1 && plan[2].steps == 1);
  plan = plan_blocks(8, 8, 20);
  CHECK(plan.size() == 1 && plan[0].steps == 8);
  plan = plan_blocks(5, 100, 3);
  CHECK(plan.size() == 1 && plan[0].length == 5 && plan[0].steps == 3);

  // Transfers: base each, remainder on the first steps, summing to the mask count.
  CHECK(transfers_at(10, 4, 0) == 3 && transfers_at(10, 4, 1) == 3);
  CHECK(transfers_at(10, 4, 2) == 2 && transfers_at(10, 4, 3) == 2);
  bool sums_ok = true;
  for (int masked = 1; masked <= 40; ++masked)
    for (int steps = 1; steps <= masked; ++steps) {
      int sum = 0, previous = masked;
      for (int s = 0; s < steps; ++s) {
        const int k = transfers_at(masked, steps, s);
        sums_ok = sums_ok && k >= 1 && k <= previous;  // non-increasing, never empty when steps <= masked
        previous = k;
        sum += k;
      }
      sums_ok = sums_ok && sum == masked;
    }
  CHECK(sums_ok);
}

static void test_select_most_confident() {
  const double c[] = {0.5, 0.9, 0.5, 0.9, 0.1};
  CHECK((select_most_confident(c, 5, 3) == std::vector<int>{0, 1, 3}));  // the tie at 0.5 goes to index 0
  CHECK((select_most_confident(c, 5, 1) == std::vector<int>{1}));        // the tie at 0.9 goes to index 1
  CHECK((select_most_confident(c, 5, 0).empty()));
  CHECK((select_most_confident(c, 5, 9) == std::vector<int>{0, 1, 2, 3, 4}));
  const double with_nan[] = {NAN, 0.0, -INFINITY};
  CHECK((select_most_confident(with_nan, 3, 1) == std::vector<int>{1}));
  CHECK((select_most_confident(with_nan, 3, 2) == std::vector<int>{0, 1}));  // NaN ranks like -inf, lower index first
}

static void test_cfg_formula() {
  float cond[3] = {1.0f, -2.0f, 0.5f};
  const float un[3] = {0.0f, 1.0f, 0.5f};
  apply_cfg(cond, un, 3, 1.5);
  CHECK(cond[0] == 2.5f && cond[1] == 1.0f + 2.5f * -3.0f && cond[2] == 0.5f);
}

static void test_sample_row_argmax_and_probability() {
  RowRule rule;
  rule.row_size = rule.vocab_size = 4;
  rule.eos_token_id = 3;
  Rng rng(1);
  float l[4] = {1.0f, 2.0f, 2.0f, 0.0f};
  RowChoice c = sample_row(l, rule, rng);
  CHECK(c.token == 1);  // first index on ties, like torch.argmax
  const double expected = std::exp(2.0) / (std::exp(1.0) + 2 * std::exp(2.0) + 1.0);
  CHECK(std::fabs(c.probability - expected) < 1e-15);
  CHECK(c.confidence == c.probability);
}

static void test_eos_options() {
  RowRule rule;
  rule.row_size = rule.vocab_size = 4;
  rule.eos_token_id = 3;
  rule.eot_token_id = 2;
  Rng rng(1);

  // logits_eos_inf: EOS can never be x0.
  rule.logits_eos_inf = true;
  float a[4] = {0.0f, 1.0f, 0.5f, 9.0f};
  RowChoice c = sample_row(a, rule, rng);
  CHECK(c.token == 1);
  CHECK(std::fabs(c.probability - std::exp(1.0) / (1.0 + std::exp(1.0) + std::exp(0.5))) < 1e-15);
  rule.logits_eos_inf = false;

  // confidence_eos_eot_inf at temperature 0: x0 is still EOS, but its probability and confidence are 0,
  // and the other probabilities are renormalised without EOS and EOT.
  rule.confidence_eos_eot_inf = true;
  float b[4] = {0.0f, 1.0f, 0.5f, 9.0f};
  c = sample_row(b, rule, rng);
  CHECK(c.token == 3 && c.probability == 0.0 && c.confidence == 0.0);
  float d[4] = {0.0f, 1.0f, 0.5f, -1.0f};
  c = sample_row(d, rule, rng);
  CHECK(c.token == 1 && std::fabs(c.probability - std::exp(1.0) / (1.0 + std::exp(1.0))) < 1e-15);
  float e[4] = {0.0f, 1.0f, 5.0f, -1.0f};  // x0 = EOT
  c = sample_row(e, rule, rng);
  CHECK(c.token == 2 && c.probability == 0.0);

  // At temperature > 0 the reference only drops EOT from the softmax: with an overwhelming EOS logit the
  // sample is EOS and its probability is the (renormalised-without-EOT) softmax one.
  rule.temperature = 1.0;
  float f[4] = {0.0f, 0.0f, 0.0f, 40.0f};
  c = sample_row(f, rule, rng);
  CHECK(c.token == 3 && c.probability > 0.999);
}

static void test_gumbel() {
  // Determinism: the stream depends only on (seed, step, position).
  Rng a = row_rng(7, 3, 5), b = row_rng(7, 3, 5), other = row_rng(7, 3, 6), other_step = row_rng(7, 4, 5);
  const uint64_t x = a.next();
  CHECK(x == b.next());
  CHECK(x != other.next() && x != other_step.next());
  bool open_interval = true;
  Rng u(0);
  for (int i = 0; i < 100000; ++i) {
    const double v = u.uniform_open();
    open_interval = open_interval && v > 0.0 && v < 1.0;
  }
  CHECK(open_interval);

  // Gumbel-max at temperature 1 samples the softmax distribution.
  RowRule rule;
  rule.row_size = rule.vocab_size = 3;
  rule.temperature = 1.0;
  const int n = 60000;
  int counts[3] = {0, 0, 0};
  for (int i = 0; i < n; ++i) {
    float l[3] = {std::log(0.5f), std::log(0.3f), std::log(0.2f)};
    Rng rng = row_rng(42, i, 0);
    ++counts[sample_row(l, rule, rng).token];
  }
  CHECK(std::fabs(counts[0] / double(n) - 0.5) < 0.01);
  CHECK(std::fabs(counts[1] / double(n) - 0.3) < 0.01);
  CHECK(std::fabs(counts[2] / double(n) - 0.2) < 0.01);

  // Temperature 0.5 sharpens it: p_i proportional to p_i^(1/T) = p_i^2.
  rule.temperature = 0.5;
  counts[0] = counts[1] = counts[2] = 0;
  for (int i = 0; i < n; ++i) {
    float l[3] = {std::log(0.5f), std::log(0.3f), std::log(0.2f)};
    Rng rng = row_rng(43, i, 0);
    ++counts[sample_row(l, rule, rng).token];
  }
  CHECK(std::fabs(counts[0] / double(n) - 0.25 / 0.38) < 0.01);

  // Random remasking draws its confidence from the row stream: uniform, deterministic.
  rule.temperature = 0.0;
  rule.remasking = Remasking::Random;
  float l[3] = {0.0f, 1.0f, 2.0f};
  Rng r1 = row_rng(5, 0, 0), r2 = row_rng(5, 0, 0);
  const RowChoice c1 = sample_row(l, rule, r1);
  const RowChoice c2 = sample_row(l, rule, r2);
  CHECK(c1.token == 2 && c1.confidence == c2.confidence && c1.confidence > 0 && c1.confidence < 1);
  CHECK(c1.confidence != c1.probability);
}

static void test_validation() {
  Engine engine(std::make_shared<FakeModel>(default_rule, 64));
  SamplingParams p = params(8, 4, 8);
  EXPECT_ERROR(ErrorCode::InvalidArgument, "prompt[1] = 16 is outside the vocabulary [0, 16)",
               engine.create({1, 16}, p));
  EXPECT_ERROR(ErrorCode::InvalidArgument, "prompt[0] = -1", engine.create({-1}, p));
  EXPECT_ERROR(ErrorCode::InvalidArgument, "mask token", engine.create({1, kMask}, p));
  EXPECT_ERROR(ErrorCode::InvalidArgument, "prompt of 60 tokens plus gen_length 8 exceeds the model context of 64",
               engine.create(std::vector<int32_t>(60, 1), p));
  SamplingParams q = p;
  q.gen_length = 0;
  EXPECT_ERROR(ErrorCode::InvalidArgument, "gen_length", engine.create({1}, q));
  q = p, q.block_length = 0;
  EXPECT_ERROR(ErrorCode::InvalidArgument, "block_length", engine.create({1}, q));
  q = p, q.steps = 0;
  EXPECT_ERROR(ErrorCode::InvalidArgument, "steps", engine.create({1}, q));
  q = p, q.temperature = -0.5;
  EXPECT_ERROR(ErrorCode::InvalidArgument, "temperature", engine.create({1}, q));
  q = p, q.temperature = NAN;
  EXPECT_ERROR(ErrorCode::InvalidArgument, "temperature", engine.create({1}, q));
  q = p, q.cfg_scale = -1;
  EXPECT_ERROR(ErrorCode::InvalidArgument, "cfg_scale", engine.create({1}, q));
  q = p, q.cfg_scale = NAN;
  EXPECT_ERROR(ErrorCode::InvalidArgument, "cfg_scale", engine.create({1}, q));
  q = p, q.eot_token_id = 16;
  EXPECT_ERROR(ErrorCode::InvalidArgument, "eot_token_id", engine.create({1}, q));
  CHECK(engine.live() == 0);

  // Exactly at the context limit, and an empty prompt, are fine.
  CHECK(engine.create(std::vector<int32_t>(56, 1), p) > 0);
  const uint64_t empty = engine.create({}, p);
  CHECK(engine.info(empty).prompt_length == 0);
  run_to_end(engine, empty);
  CHECK(engine.info(empty).finished);

  EXPECT_ERROR(ErrorCode::InvalidArgument, "unknown sequence id 999", engine.step({999}));
  EXPECT_ERROR(ErrorCode::InvalidArgument, "finished", engine.step({empty}));
  const uint64_t a = engine.create({1}, p);
  EXPECT_ERROR(ErrorCode::InvalidArgument, "twice", engine.step({a, a}));
  CHECK(engine.info(a).steps_done == 0);
}

static void test_matches_reference_loop() {
  // Greedy low-confidence decoding against the plain re-statement above, over several shapes including
  // non-divisible ones.
  struct Case {
    std::vector<int32_t> prompt;
    int gen, block, steps;
  };
  const std::vector<Case> cases = {
      {{1, 2, 3}, 16, 4, 16}, {{4}, 16, 16, 4}, {{5, 6}, 11, 4, 7}, {{}, 9, 3, 2}, {{7, 8, 9, 10}, 12, 5, 30}};
  for (const Case& c : cases) {
    auto model = std::make_shared<FakeModel>();
    Engine engine(model);
    const SamplingParams p = params(c.gen, c.block, c.steps);
    const uint64_t id = engine.create(c.prompt, p);
    std::vector<StepOutput> steps;
    const std::vector<int32_t> answer = run_to_end(engine, id, &steps);
    CHECK(answer == reference_answer(default_rule, c.prompt, p));

    // Bookkeeping: steps counted, k tokens a step, each output's committed positions ascending and
    // inside its block, and the committed tokens together are the answer.
    const auto plan = plan_blocks(c.gen, c.block, c.steps);
    int planned = 0;
    for (const auto& b : plan) planned += b.steps;
    CHECK(static_cast<int>(steps.size()) == planned);
    CHECK(engine.info(id).steps_total == planned && engine.info(id).steps_done == planned);
    std::vector<int32_t> rebuilt(c.gen, kMask);
    bool ordered = true;
    int step_in_block = 0;
    for (size_t s = 0; s < steps.size(); ++s) {
      CHECK(steps[s].steps_done == static_cast<int>(s) + 1);
      if (s > 0 && steps[s].block != steps[s - 1].block) step_in_block = 0;
      const BlockPlan& block = plan[steps[s].block];
      CHECK(static_cast<int>(steps[s].committed.size()) == transfers_at(block.length, block.steps, step_in_block++));
      CHECK(steps[s].finished == (s + 1 == steps.size()));
      for (size_t i = 0; i < steps[s].committed.size(); ++i) {
        const CommittedToken& t = steps[s].committed[i];
        ordered = ordered && (i == 0 || steps[s].committed[i - 1].position < t.position);
        ordered = ordered && t.position >= block.start && t.position < block.start + block.length;
        ordered = ordered && rebuilt[t.position] == kMask && t.probability > 0.0f && t.probability <= 1.0f;
        rebuilt[t.position] = t.token;
      }
    }
    CHECK(ordered);
    CHECK(rebuilt == answer);
  }
}

static void test_penalties() {
  // Penalties::of: counts over the answer's committed tokens, masks and end tokens left out; the prompt's
  // distinct tokens only with a repetition penalty.
  SamplingParams p = params(8, 8, 8);
  p.presence_penalty = 0.5, p.frequency_penalty = 0.25;
  const std::vector<int32_t> prompt = {3, 3, 9}, answer = {3, kMask, 5, 3, kEos, kEot, 5, 3};
  Penalties pen = Penalties::of(p, prompt, answer, kMask, kEos, kEot, kVocab);
  CHECK((pen.answer == std::vector<std::pair<int32_t, int>>{{3, 3}, {5, 2}}));
  CHECK(pen.prompt.empty());
  float row[kVocab];
  for (int v = 0; v < kVocab; ++v) row[v] = static_cast<float>(v) - 4.0f;
  pen.apply(row, kVocab);
  CHECK(row[3] == -1.0f - 0.75f - 0.5f && row[5] == 1.0f - 0.5f - 0.5f && row[9] == 5.0f && row[kEos] == 10.0f);
  p.presence_penalty = p.frequency_penalty = 0.0, p.repetition_penalty = 1.25;
  pen = Penalties::of(p, prompt, answer, kMask, kEos, kEot, kVocab);
  CHECK((pen.prompt == std::vector<int32_t>{3, 9}));
  for (int v = 0; v < kVocab; ++v) row[v] = static_cast<float>(v) - 4.0f;
  pen.apply(row, kVocab);
  // Divided when positive, multiplied when negative, once per token however often it appears.
  CHECK(row[3] == -1.25f && row[5] == 1.0f / 1.25f && row[9] == 5.0f / 1.25f && row[4] == 0.0f && row[6] == 2.0f);

  // End to end against the restated reference loop, and never a no-op on these shapes.
  struct Case {
    std::vector<int32_t> prompt;
    double presence, frequency, repetition;
  };
  for (const Case& c : std::vector<Case>{{{1, 2, 3}, 1.0, 0.0, 1.0},
                                         {{4, 4}, 0.0, 0.7, 1.0},
                                         {{5, 6, 7}, 0.0, 0.0, 1.8},
                                         {{8}, 0.3, 0.4, 1.3},
                                         {{9, 1}, -1.0, -0.5, 0.6}}) {
    SamplingParams q = params(16, 4, 16);
    q.eot_token_id = kEot;
    const std::vector<int32_t> plain = reference_answer(default_rule, c.prompt, q);
    q.presence_penalty = c.presence, q.frequency_penalty = c.frequency, q.repetition_penalty = c.repetition;
    Engine engine(std::make_shared<FakeModel>());
    const std::vector<int32_t> answer = run_to_end(engine, engine.create(c.prompt, q));
    CHECK(answer == reference_answer(default_rule, c.prompt, q));
    CHECK(answer != plain);
  }

  Engine engine(std::make_shared<FakeModel>());
  SamplingParams q = params(8, 4, 8);
  q.presence_penalty = 2.5;
  EXPECT_ERROR(ErrorCode::InvalidArgument, "presence_penalty must be in [-2, 2]", engine.create({1}, q));
  q = params(8, 4, 8), q.frequency_penalty = -2.01;
  EXPECT_ERROR(ErrorCode::InvalidArgument, "frequency_penalty must be in [-2, 2]", engine.create({1}, q));
  q = params(8, 4, 8), q.repetition_penalty = 0.0;
  EXPECT_ERROR(ErrorCode::InvalidArgument, "repetition_penalty must be in (0, 2]", engine.create({1}, q));
  q.repetition_penalty = NAN;
  EXPECT_ERROR(ErrorCode::InvalidArgument, "repetition_penalty", engine.create({1}, q));
  CHECK(engine.live() == 0);
}

static void test_rows_requested() {
  // The forward is asked only for the still-masked rows of the current block, over the whole canvas.
  auto model = std::make_shared<FakeModel>();
  Engine engine(model);
  const uint64_t id = engine.create({1, 2}, params(8, 4, 4));  // 2 blocks x 2 steps x 2 tokens
  engine.step({id});
  CHECK(model->seen.size() == 1 && model->seen[0].tokens.size() == 10);
  CHECK((model->seen[0].rows == std::vector<int32_t>{2, 3, 4, 5}));
  engine.step({id});
  CHECK(model->seen[0].rows.size() == 2);
  for (int32_t r : model->seen[0].rows) CHECK(r >= 2 && r < 6);
  engine.step({id});
  CHECK((model->seen[0].rows == std::vector<int32_t>{6, 7, 8, 9}));
}

static void test_cfg_in_engine() {
  // The unconditional copy is the canvas with the prompt masked, in the same forward, and the sampled
  // logits are un + (s + 1) * (cond - un). The rule gives different logits with and without the prompt.
  const LogitRule rule = [](const int32_t* canvas, int, int position, float* out) {
    for (int v = 0; v < kVocab; ++v) out[v] = 0.0f;
    const bool prompt_visible = canvas[0] != kMask;
    out[1] = prompt_visible ? 1.0f : 0.0f;
    out[2] = prompt_visible ? 0.9f : 0.5f;
    out[3] = 0.8f + 0.01f * position;
  };
  auto model = std::make_shared<FakeModel>(rule);
  Engine engine(model);
  SamplingParams p = params(2, 2, 1);
  p.cfg_scale = 1.0;
  const uint64_t id = engine.create({4, 5}, p);
  const StepOutput out = engine.step({id}).at(0);
  CHECK(model->seen.size() == 2);
  CHECK((model->seen[1].tokens == std::vector<int32_t>{kMask, kMask, kMask, kMask}));
  CHECK((model->seen[0].tokens == std::vector<int32_t>{4, 5, kMask, kMask}));
  CHECK(model->seen[0].rows == model->seen[1].rows);
  CHECK(out.committed.size() == 2 && out.committed[0].token == 1);
  // Guided logits at answer position 0 (canvas position 2): 1 -> 2.0, 2 -> 1.3, 3 -> 0.82, others 0.
  const double z = std::exp(2.0) + std::exp(1.3) + std::exp(0.82f) + 13.0;
  CHECK(std::fabs(out.committed[0].probability - std::exp(2.0) / z) < 1e-6);
}

static void test_eos_finish_reason() {
  // A rule that always prefers EOS: the answer is all EOS, reason Eos. With logits_eos_inf it is not.
  const LogitRule rule = [](const int32_t*, int, int, float* out) {
    for (int v = 0; v < kVocab; ++v) out[v] = 0.1f * v;
    out[kEos] = 5.0f;
    out[kMask] = -5.0f;
  };
  auto model = std::make_shared<FakeModel>(rule);
  Engine engine(model);
  SamplingParams p = params(4, 4, 2);
  uint64_t id = engine.create({1}, p);
  std::vector<StepOutput> steps;
  CHECK((run_to_end(engine, id, &steps) == std::vector<int32_t>(4, kEos)));
  CHECK(steps.back().reason == FinishReason::Eos && steps.front().reason == FinishReason::None);
  p.logits_eos_inf = true;
  id = engine.create({1}, p);
  steps.clear();
  CHECK((run_to_end(engine, id, &steps) == std::vector<int32_t>(4, kEot)));  // 13 is the next best
  CHECK(steps.back().reason == FinishReason::Length);
  p.eot_token_id = kEot;
  id = engine.create({1}, p);
  steps.clear();
  run_to_end(engine, id, &steps);
  CHECK(steps.back().reason == FinishReason::Eos);  // EOT counts as an end too
}

static void test_barred_end_tokens_rows() {
  // min_tokens bars EOS, EOT, the model's stop tokens and the request's below it; ignore_eos the first
  // three everywhere. Barred logits are -inf before the rule, so the probability leaves them out.
  ModelConfig c;
  c.vocab_size = c.embedding_size = kVocab;
  c.mask_token_id = kMask;
  c.eos_token_id = kEos;
  c.stop_token_ids = {12};
  SamplingParams p;
  p.eot_token_id = kEot;
  p.min_tokens = 2;
  p.stop_token_ids = {11};
  const auto row = [] {
    std::vector<float> l(kVocab, 0.0f);
    l[kEos] = 9.0f, l[kEot] = 8.0f, l[12] = 7.0f, l[11] = 6.0f, l[3] = 1.0f;
    return l;
  };
  const auto sample_at = [&](const RowRule& rule, int position, int top) {
    std::vector<float> l = row();
    RowTask t;
    t.rule = &rule;
    t.position = position;
    t.top_logprobs = top;
    RowResult r;
    sample_task(l.data(), nullptr, kVocab, t, r);
    return r;
  };
  RowRule rule = RowRule::of(p, c);
  RowResult r = sample_at(rule, 0, 3);
  CHECK(r.token == 3);
  CHECK(std::fabs(r.probability - std::exp(1.0) / (std::exp(1.0) + 11.0)) < 1e-15);  // 0..10 but 3, and the mask
  CHECK(r.n_top == 3 && r.top[0].token == 3 && r.top[1].token == 0 && r.top[2].token == 1);
  CHECK(sample_at(rule, 1, 0).token == 3);
  CHECK(sample_at(rule, 2, 0).token == kEos);  // from min_tokens on, nothing is barred
  p.ignore_eos = true;
  rule = RowRule::of(p, c);
  CHECK(sample_at(rule, 0, 0).token == 3);
  CHECK(sample_at(rule, 7, 0).token == 11);  // the request's stop token is barred only below min_tokens
  p.end_token_ids = {11};                    // unless the caller ends answers at it too
  rule = RowRule::of(p, c);
  CHECK(sample_at(rule, 7, 0).token == 3);
  p.end_token_ids.clear();
  p.min_tokens = 0;
  rule = RowRule::of(p, c);
  CHECK(sample_at(rule, 0, 0).token == 11);
  // Dream's rows are barred the same way.
  c.decoding = Decoding::Dream;
  p.min_tokens = 1;
  rule = RowRule::of(p, c);
  CHECK(rule.dream && sample_at(rule, 0, 0).token == 3 && sample_at(rule, 1, 0).token == 11);
  // Nothing barred without the options: no allocation either.
  p.min_tokens = 0, p.ignore_eos = false;
  c.decoding = Decoding::FullCanvas;
  rule = RowRule::of(p, c);
  CHECK(rule.ends.empty() && rule.stops.empty() && sample_at(rule, 0, 0).token == kEos);

  // logit_bias is added in float before everything else, at every position; a barred token stays barred.
  p.logit_bias = {{3, 8.5f}, {kEos, -1.0f}, {kVocab, 50.0f}};  // an id outside the row is ignored
  rule = RowRule::of(p, c);
  CHECK(rule.bias.size() == 2);
  r = sample_at(rule, 5, 2);
  CHECK(r.token == 3);                                                                        // 1 + 8.5 = 9.5 > 9 - 1
  const double z = std::exp(9.5) + std::exp(8.0) * 2 + std::exp(7.0) + std::exp(6.0) + 11.0;  // EOS and EOT at 8
  CHECK(std::fabs(r.probability - std::exp(9.5) / z) < 1e-12);
  CHECK(r.n_top == 2 && r.top[1].token == kEot && std::fabs(r.top[1].logprob - (8.0 - std::log(z))) < 1e-5);
  p.min_tokens = 6;
  rule = RowRule::of(p, c);
  r = sample_at(rule, 5, 0);
  CHECK(r.token == 3 && std::fabs(r.probability - std::exp(9.5) / (std::exp(9.5) + 11.0)) < 1e-12);

  // allowed_token_ids: every other logit is -inf before the bias (which still applies to the allowed).
  p.min_tokens = 0, p.logit_bias = {{12, 3.0f}};
  p.allowed_token_ids = {12, 0, 11, 12};
  rule = RowRule::of(p, c);
  CHECK((rule.allowed == std::vector<int32_t>{0, 11, 12}));
  r = sample_at(rule, 0, 5);
  CHECK(r.token == 12 && r.n_top == 3 && r.top[1].token == 11 && r.top[2].token == 0);
  CHECK(std::fabs(r.probability - std::exp(10.0) / (std::exp(10.0) + std::exp(6.0) + 1.0)) < 1e-12);

  // position_allowed: a position's set narrows the row further; positions without one (-1, or past the
  // list) keep allowed_token_ids alone.
  p.position_allowed = {-1, 0, 1};
  p.allowed_sets = {{0, 11, 40}, {0, 0}};
  rule = RowRule::of(p, c);
  CHECK(rule.allowed_at(0) == nullptr && rule.allowed_at(3) == nullptr && rule.allowed_at(-1) == nullptr);
  CHECK((*rule.allowed_at(1) == std::vector<int32_t>{0, 11}) && (*rule.allowed_at(2) == std::vector<int32_t>{0}));
  CHECK(sample_at(rule, 0, 5).token == 12);
  r = sample_at(rule, 1, 5);
  CHECK(r.token == 11 && r.n_top == 2 && std::fabs(r.probability - std::exp(6.0) / (std::exp(6.0) + 1.0)) < 1e-12);
  r = sample_at(rule, 2, 5);
  CHECK(r.token == 0 && r.probability == 1.0);
  CHECK(sample_at(rule, 3, 5).token == 12);
}

static void test_barred_end_tokens_in_engine() {
  // A rule that always prefers EOS, then EOT, then 12: min_tokens keeps the end off the first positions.
  const LogitRule rule = [](const int32_t*, int, int, float* out) {
    for (int v = 0; v < kVocab; ++v) out[v] = 0.1f * v;
    out[kEos] = 5.0f;
    out[kMask] = -5.0f;
  };
  Engine engine(std::make_shared<FakeModel>(rule));
  SamplingParams p = params(4, 4, 2);
  p.min_tokens = 2;
  std::vector<StepOutput> steps;
  CHECK((run_to_end(engine, engine.create({1}, p), &steps) == std::vector<int32_t>{kEot, kEot, kEos, kEos}));
  CHECK(steps.back().reason == FinishReason::Eos);
  p.min_tokens = 0;
  p.ignore_eos = true;
  steps.clear();
  CHECK((run_to_end(engine, engine.create({1}, p), &steps) == std::vector<int32_t>(4, kEot)));
  CHECK(steps.back().reason == FinishReason::Length);
  p.eot_token_id = kEot;  // EOT is an end token too
  CHECK((run_to_end(engine, engine.create({1}, p)) == std::vector<int32_t>(4, 12)));
  p.ignore_eos = false;
  p.min_tokens = 4;
  p.stop_token_ids = {12};  // and the request's stop tokens below min_tokens
  CHECK((run_to_end(engine, engine.create({1}, p)) == std::vector<int32_t>(4, 11)));
  // Early stop cannot end an answer before min_tokens: there is no end token before it.
  p = params(8, 4, 8);
  p.early_stop = true;
  p.min_tokens = 6;
  CHECK((run_to_end(engine, engine.create({1}, p)) ==
         std::vector<int32_t>{kEot, kEot, kEot, kEot, kEot, kEot, kEos, kEos}));

  SamplingParams huge_cfg = params(8, 4, 8);
  huge_cfg.cfg_scale = 1e39;
  EXPECT_ERROR(ErrorCode::InvalidArgument, "cfg_scale must be in [0, 1000]", engine.create({1}, huge_cfg));
  SamplingParams over = params(8, 4, 8), under = over, outside = over;
  over.min_tokens = 9;
  under.min_tokens = -1;
  outside.stop_token_ids = {3, kVocab};
  EXPECT_ERROR(ErrorCode::InvalidArgument, "min_tokens must be in [0, gen_length 8] (got 9)", engine.create({1}, over));
  EXPECT_ERROR(ErrorCode::InvalidArgument, "min_tokens must be in", engine.create({1}, under));
  EXPECT_ERROR(ErrorCode::InvalidArgument, "stop_token_ids[1] = 16 is outside the vocabulary",
               engine.create({1}, outside));
  SamplingParams biased = params(8, 4, 8), wild = biased;
  biased.logit_bias = {{2, 1.0f}, {-1, 1.0f}};
  wild.logit_bias = {{2, 100.5f}};
  EXPECT_ERROR(ErrorCode::InvalidArgument, "logit_bias[1]: token -1 is outside the vocabulary",
               engine.create({1}, biased));
  EXPECT_ERROR(ErrorCode::InvalidArgument, "logit_bias[0]: bias 100.5", engine.create({1}, wild));
  SamplingParams outside_allowed = params(8, 4, 8), only_mask = outside_allowed;
  outside_allowed.allowed_token_ids = {3, kVocab + 2};
  only_mask.allowed_token_ids = {kMask};
  EXPECT_ERROR(ErrorCode::InvalidArgument, "allowed_token_ids[1] = 18 is outside the vocabulary",
               engine.create({1}, outside_allowed));
  EXPECT_ERROR(ErrorCode::InvalidArgument, "allowed_token_ids holds no token the model can write",
               engine.create({1}, only_mask));
  SamplingParams only_end = params(8, 4, 8), only_stop = only_end;
  only_end.allowed_token_ids = {kEos, kMask};
  only_end.ignore_eos = true;
  only_stop.allowed_token_ids = {4};
  only_stop.stop_token_ids = {4};
  only_stop.min_tokens = 2;
  for (const SamplingParams& q : {only_end, only_stop})
    EXPECT_ERROR(ErrorCode::InvalidArgument, "holds no token the model can write where min_tokens / ignore_eos bar",
                 engine.create({1}, q));
  only_stop.min_tokens = 0;  // the stop token is then barred nowhere
  CHECK(engine.create({1}, only_stop) > 0);
  SamplingParams two = params(8, 4, 8);
  two.allowed_token_ids = {4, 6};
  for (int32_t t : run_to_end(engine, engine.create({1}, two))) CHECK(t == 4 || t == 6);
  // Per-position sets: position 1 takes only 3 or 5, positions 2 and 3 only 7; the rest as the rule likes.
  SamplingParams placed = params(8, 4, 8);
  placed.position_allowed = {-1, 0, 1, 1};
  placed.allowed_sets = {{3, 5}, {7}};
  const std::vector<int32_t> answer = run_to_end(engine, engine.create({1}, placed));
  CHECK((answer == std::vector<int32_t>{kEos, 5, 7, 7, kEos, kEos, kEos, kEos}));
  SamplingParams no_set = params(8, 4, 8), bad_id = no_set, unwritable = no_set, outside_global = no_set;
  no_set.position_allowed = {0, 1};
  no_set.allowed_sets = {{3}};
  bad_id.position_allowed = {0};
  bad_id.allowed_sets = {{3, kVocab}};
  unwritable.position_allowed = {0};
  unwritable.allowed_sets = {{kMask}};
  outside_global.allowed_token_ids = {4, 6};
  outside_global.position_allowed = {0};
  outside_global.allowed_sets = {{3, 5}};
  EXPECT_ERROR(ErrorCode::InvalidArgument, "position_allowed[1] = 1 names no set (1 given)",
               engine.create({1}, no_set));
  EXPECT_ERROR(ErrorCode::InvalidArgument, "allowed_sets[0] holds 16, outside the vocabulary",
               engine.create({1}, bad_id));
  EXPECT_ERROR(ErrorCode::InvalidArgument, "allowed_sets[0] holds no token the model can write",
               engine.create({1}, unwritable));
  EXPECT_ERROR(ErrorCode::InvalidArgument, "holds no token the model can write within allowed_token_ids",
               engine.create({1}, outside_global));
  // A template may not fix an end token where it is barred.
  SamplingParams t = params(4, 4, 4);
  t.min_tokens = 2;
  CHECK(engine.create({1}, t, {}, {-1, -1, kEos, kEos}) > 0);
  EXPECT_ERROR(ErrorCode::InvalidArgument, "template[1] = 14 is an end token",
               engine.create({1}, t, {}, {-1, kEos, kEos, kEos}));
}

static void test_non_finite_logits() {
  // Canvases holding token 9 get NaN logits, those holding 10 +inf at one position: the step fails with
  // Numeric naming the sequence and position, commits nothing, and the other sequences step alone.
  const LogitRule rule = [](const int32_t* canvas, int length, int position, float* out) {
    default_rule(canvas, length, position, out);
    for (int i = 0; i < length; ++i) {
      if (canvas[i] == 9) out[2] = std::nanf("");
      if (canvas[i] == 10 && position == 4) out[5] = std::numeric_limits<float>::infinity();
    }
  };
  Engine engine(std::make_shared<FakeModel>(rule));
  const uint64_t good = engine.create({1, 2}, params(4, 4, 4));
  const uint64_t nan = engine.create({1, 9}, params(4, 4, 4));
  EXPECT_ERROR(ErrorCode::Numeric,
               "sequence " + std::to_string(nan) + ": answer position 0: the model's logits hold NaN",
               engine.step({good, nan}));
  CHECK(engine.info(good).steps_done == 0 && engine.info(nan).steps_done == 0);
  CHECK(!engine.step({good})[0].committed.empty());
  const uint64_t inf = engine.create({1, 10}, params(4, 4, 4));
  EXPECT_ERROR(ErrorCode::Numeric, "sequence " + std::to_string(inf) + ": answer position 2", engine.step({inf}));
  // A -inf logit is a token the model rules out, not a fault.
  const LogitRule minus = [](const int32_t* canvas, int length, int position, float* out) {
    default_rule(canvas, length, position, out);
    out[3] = -std::numeric_limits<float>::infinity();
  };
  Engine ruled_out(std::make_shared<FakeModel>(minus));
  for (int32_t t : run_to_end(ruled_out, ruled_out.create({1}, params(4, 4, 4)))) CHECK(t != 3);
  // Scoring too.
  EXPECT_ERROR(ErrorCode::Numeric, "canvas position 1", engine.score({1, kMask, 9}, {1}, {4}));
}

static void test_never_samples_mask_or_padding() {
  // Rows where the mask token and the head padding (ids >= vocab_size) have the highest logits: x0 is
  // the best real token, and its probability is still the softmax over the whole row.
  const int vocab = 12;  // ids 12 .. 15 are padding rows of the head; the mask token is 11 here
  RowRule rule;
  rule.row_size = kVocab;
  rule.vocab_size = vocab;
  rule.mask_token_id = 11;
  float l[kVocab];
  for (int v = 0; v < kVocab; ++v) l[v] = v >= 11 ? 5.0f : 0.1f * v;
  Rng rng(0);
  RowChoice c = sample_row(l, rule, rng);
  CHECK(c.token == 10);
  const double z = 5.0 * std::exp(5.0) + [] {
    double s = 0;
    for (int v = 0; v < 11; ++v) s += std::exp(0.1 * v);
    return s;
  }();
  CHECK(std::fabs(c.probability - std::exp(1.0) / z) < 1e-12);
  rule.temperature = 2.0;
  bool real_tokens = true;
  for (int i = 0; i < 2000; ++i) {
    for (int v = 0; v < kVocab; ++v) l[v] = v >= 11 ? 5.0f : 0.1f * v;
    Rng r = row_rng(9, i, 0);
    const int t = sample_row(l, rule, r).token;
    real_tokens = real_tokens && t >= 0 && t < 11;
  }
  CHECK(real_tokens);

  // In the engine: a model that always rates the mask token highest still gets every position filled,
  // k tokens a step.
  const LogitRule rule_mask_first = [](const int32_t*, int, int position, float* out) {
    for (int v = 0; v < kVocab; ++v) out[v] = 0.0f;
    out[kMask] = 10.0f;
    out[3 + position % 5] = 2.0f;
  };
  auto model = std::make_shared<FakeModel>(rule_mask_first);
  Engine engine(model);
  const uint64_t id = engine.create({1}, params(6, 3, 4));  // blocks of 3 with 2 steps: 2 then 1 tokens
  std::vector<StepOutput> steps;
  const std::vector<int32_t> answer = run_to_end(engine, id, &steps);
  CHECK((answer == std::vector<int32_t>{4, 5, 6, 7, 3, 4}));
  CHECK(steps.size() == 4 && steps[0].committed.size() == 2 && steps[1].committed.size() == 1);
}

static void test_gumbel_determinism_in_engine() {
  auto run = [](uint64_t seed, Remasking remasking) {
    Engine engine(std::make_shared<FakeModel>());
    SamplingParams p = params(12, 4, 6);
    p.temperature = 1.0;
    p.remasking = remasking;
    p.seed = seed;
    const uint64_t id = engine.create({1, 2, 3}, p);
    return run_to_end(engine, id);
  };
  CHECK(run(11, Remasking::LowConfidence) == run(11, Remasking::LowConfidence));
  CHECK(run(11, Remasking::Random) == run(11, Remasking::Random));
  int differing = 0;
  for (uint64_t s = 0; s < 5; ++s)
    differing += run(100 + s, Remasking::LowConfidence) != run(200 + s, Remasking::LowConfidence);
  CHECK(differing >= 4);

  // Batching does not change a sequence's result: same seeds alone and together.
  Engine engine(std::make_shared<FakeModel>());
  SamplingParams p = params(12, 4, 6);
  p.temperature = 0.7;
  p.seed = 11;
  const uint64_t a = engine.create({1, 2, 3}, p);
  SamplingParams q = params(8, 8, 8);
  q.cfg_scale = 0.5;
  const uint64_t b = engine.create({4, 5}, q);
  bool a_done = false, b_done = false;
  while (!a_done || !b_done) {
    std::vector<uint64_t> ids;
    if (!a_done) ids.push_back(a);
    if (!b_done) ids.push_back(b);
    for (const StepOutput& o : engine.step(ids)) (o.id == a ? a_done : b_done) = o.finished;
  }
  Engine alone_a(std::make_shared<FakeModel>());
  CHECK(engine.canvas(a) == run_to_end(alone_a, alone_a.create({1, 2, 3}, p)));
  Engine alone_b(std::make_shared<FakeModel>());
  CHECK(engine.canvas(b) == run_to_end(alone_b, alone_b.create({4, 5}, q)));
}

static void test_cancellation() {
  auto model = std::make_shared<FakeModel>();
  Engine engine(model);
  SamplingParams p = params(8, 4, 4);
  p.temperature = 0.8;
  p.seed = 3;
  const uint64_t id = engine.create({1, 2}, p);
  engine.step({id});
  const std::vector<int32_t> before = engine.canvas(id);
  const SequenceInfo info_before = engine.info(id);

  // Set before the step: the model refuses.
  std::atomic<bool> cancel{true};
  EXPECT_ERROR(ErrorCode::Cancelled, "", engine.step({id}, &cancel));
  // Set while the forward runs (after the model's own checks): the engine refuses to commit.
  cancel = false;
  model->after_forward = [&cancel] { cancel = true; };
  EXPECT_ERROR(ErrorCode::Cancelled, "cancelled", engine.step({id}, &cancel));
  model->after_forward = nullptr;
  CHECK(engine.canvas(id) == before);
  CHECK(engine.info(id).steps_done == info_before.steps_done);

  // The retried step does what it would have done without the cancellation.
  run_to_end(engine, id);
  Engine fresh(std::make_shared<FakeModel>());
  CHECK(engine.canvas(id) == run_to_end(fresh, fresh.create({1, 2}, p)));
}

static void test_release() {
  auto model = std::make_shared<FakeModel>();
  Engine engine(model);
  const uint64_t a = engine.create({1}, params(4, 4, 4));
  const uint64_t b = engine.create({1}, params(4, 4, 4));
  CHECK(engine.live() == 2);
  CHECK(engine.info(a).memory_bytes >= 5 * sizeof(int32_t));
  engine.release(a);
  engine.release(a);  // unknown ids are ignored
  CHECK(engine.live() == 1);
  EXPECT_ERROR(ErrorCode::InvalidArgument, "unknown", engine.canvas(a));
  // Released while its step runs: the step completes and reports it, then it is gone.
  model->after_forward = [&] { engine.release(b); };
  const auto out = engine.step({b});
  model->after_forward = nullptr;
  CHECK(out.size() == 1 && out[0].id == b && out[0].committed.size() == 1);
  CHECK(engine.live() == 0);
  CHECK(engine.step({}).empty());
}

// ---- top-k / top-p --------------------------------------------------------------------------------

// Frequencies of the tokens sample_row draws for the logits `l` over `n` seeded rows.
static std::vector<double> draw_frequencies(const std::vector<float>& l, const RowRule& rule, int n, uint64_t seed) {
  std::vector<int> counts(l.size(), 0);
  std::vector<int32_t> scratch;
  for (int i = 0; i < n; ++i) {
    std::vector<float> row(l);
    Rng rng = row_rng(seed, i, 0);
    ++counts[sample_row(row.data(), rule, rng, &scratch).token];
  }
  std::vector<double> frequencies;
  for (int c : counts) frequencies.push_back(static_cast<double>(c) / n);
  return frequencies;
}

static void test_top_k_top_p_rows() {
  const std::vector<float> l = {std::log(0.5f), std::log(0.3f), std::log(0.2f)};
  RowRule rule;
  rule.row_size = rule.vocab_size = 3;

  // Temperature 0: filtering changes nothing (the argmax is always a candidate).
  for (int k : {0, 1, 2}) {
    for (double p : {1.0, 0.1}) {
      rule.top_k = k;
      rule.top_p = p;
      std::vector<float> row(l);
      Rng rng(3);
      const RowChoice c = sample_row(row.data(), rule, rng);
      CHECK(c.token == 0 && std::fabs(c.probability - 0.5) < 1e-6);
    }
  }

  const int n = 60000;
  rule.temperature = 1.0;
  // top_k = 1: always the best token; top_k = 2: the best two, renormalised (0.625, 0.375).
  rule.top_k = 1, rule.top_p = 1.0;
  CHECK(draw_frequencies(l, rule, 2000, 1)[0] == 1.0);
  rule.top_k = 2;
  std::vector<double> f = draw_frequencies(l, rule, n, 2);
  CHECK(f[2] == 0.0 && std::fabs(f[0] - 0.625) < 0.01);
  // top_p: the shortest prefix whose mass reaches p. 0.45 -> {0}; 0.55 -> {0, 1}; 0.75 -> {0, 1}.
  rule.top_k = 0, rule.top_p = 0.45;
  CHECK(draw_frequencies(l, rule, 2000, 3)[0] == 1.0);
  rule.top_p = 0.55;
  f = draw_frequencies(l, rule, n, 4);
  CHECK(f[2] == 0.0 && std::fabs(f[0] - 0.625) < 0.01);
  rule.top_p = 0.75;
  CHECK(draw_frequencies(l, rule, n, 5)[2] == 0.0);
  // ... after temperature scaling: at T = 2 the probabilities are proportional to sqrt(p) =
  // (0.4155, 0.3218, 0.2627), so the first two hold 0.737 < 0.75 and the third token is a candidate.
  rule.temperature = 2.0;
  f = draw_frequencies(l, rule, n, 6);
  CHECK(std::fabs(f[2] - 0.2627) < 0.01);
  // top-k first, then top-p over what top-k kept, renormalised: 0.625 >= 0.6 leaves only token 0.
  rule.temperature = 1.0;
  rule.top_k = 2, rule.top_p = 0.6;
  CHECK(draw_frequencies(l, rule, 2000, 7)[0] == 1.0);

  // The filter never shifts the random stream: whenever the unfiltered draw is a candidate, the
  // filtered draw is the same token.
  rule.top_k = 2, rule.top_p = 1.0;
  RowRule open = rule;
  open.top_k = 0;
  bool aligned = true;
  for (int i = 0; i < 5000; ++i) {
    std::vector<float> a(l), b(l);
    Rng ra = row_rng(8, i, 0), rb = row_rng(8, i, 0);
    const int32_t unfiltered = sample_row(a.data(), open, ra).token;
    const int32_t filtered = sample_row(b.data(), rule, rb).token;
    if (unfiltered != 2) aligned = aligned && filtered == unfiltered;
  }
  CHECK(aligned);

  // The mask token and head padding are never candidates, and ties rank the lower id first.
  RowRule masked;
  masked.row_size = 6;
  masked.vocab_size = 5;  // id 5 is head padding
  masked.mask_token_id = 0;
  masked.temperature = 1.0;
  masked.top_k = 1;
  const std::vector<float> tied = {9.0f, 1.0f, 3.0f, 3.0f, 2.0f, 9.0f};
  CHECK(draw_frequencies(tied, masked, 1000, 9)[2] == 1.0);
  masked.top_k = 2;
  f = draw_frequencies(tied, masked, n, 10);
  CHECK(f[0] == 0.0 && f[1] == 0.0 && f[4] == 0.0 && f[5] == 0.0 && std::fabs(f[2] - 0.5) < 0.01);

  // A long, flat row (the head of the ranking grows past its first sort): logits -0.001 * id over 5000
  // ids, top_p 0.9. The cut-off computed here in float64; draws stay at or below it and reach near it.
  const int v = 5000;
  std::vector<float> flat(v);
  for (int i = 0; i < v; ++i) flat[i] = -0.001f * static_cast<float>(i);
  double total = 0.0;
  for (int i = 0; i < v; ++i) total += std::exp(static_cast<double>(flat[i]) - flat[0]);
  int cutoff = 0;
  for (double mass = 0.0;; ++cutoff) {
    mass += std::exp(static_cast<double>(flat[cutoff]) - flat[0]);
    if (mass >= 0.9 * total) break;
  }
  RowRule wide;
  wide.row_size = wide.vocab_size = v;
  wide.temperature = 1.0;
  wide.top_p = 0.9;
  int highest = 0;
  std::vector<int32_t> scratch;
  for (int i = 0; i < 3000; ++i) {
    std::vector<float> row(flat);
    Rng rng = row_rng(11, i, 0);
    highest = std::max(highest, static_cast<int>(sample_row(row.data(), wide, rng, &scratch).token));
  }
  CHECK(cutoff > 2000 && highest <= cutoff && highest > cutoff - 60);  // about 2240: past two growths of the head
}

// ---- parallel decoding and early stop, the pure parts ---------------------------------------------

static void test_select_parallel() {
  // Threshold: the top-1 always, then every row at or above the threshold.
  const double a[] = {0.5, 0.95, 0.91, 0.2, 0.9};
  CHECK((select_parallel(a, 5, 0.9, 0.0) == std::vector<int>{1, 2, 4}));
  const double low[] = {0.3, 0.5};
  CHECK((select_parallel(low, 2, 0.9, 0.0) == std::vector<int>{1}));
  CHECK(select_parallel(low, 0, 0.9, 0.0).empty());
  const double ties[] = {0.4, 0.4, 0.4};
  CHECK((select_parallel(ties, 3, 0.9, 0.0) == std::vector<int>{0}));  // the tie goes to the lower index
  CHECK((select_parallel(ties, 3, 0.4, 0.0) == std::vector<int>{0, 1, 2}));
  const double with_nan[] = {NAN, 0.1};
  CHECK((select_parallel(with_nan, 2, 0.05, 0.0) == std::vector<int>{1}));  // NaN ranks last, never passes

  // Factor 1: the n-th most confident needs 1 - 1/(n + 1): 2/3 for the second, 3/4 for the third, ...
  const double b[] = {0.99, 0.7, 0.76, 0.5};
  CHECK((select_parallel(b, 4, 0.0, 1.0) == std::vector<int>{0, 2}));  // 0.76 >= 2/3, then 0.7 < 3/4
  const double c[] = {0.99, 0.98, 0.1};
  CHECK((select_parallel(c, 3, 0.0, 1.0) == std::vector<int>{0, 1}));  // (Fast-dLLM's loop would take all 3)
  const double d[] = {0.2, 0.1};
  CHECK((select_parallel(d, 2, 0.0, 1.0) == std::vector<int>{0}));
  // A larger factor lowers every bar: factor 2 asks 1/3 of the second and 1/2 of the third.
  const double e[] = {0.9, 0.34, 0.5, 0.55};
  CHECK((select_parallel(e, 4, 0.0, 2.0) == std::vector<int>{0, 2, 3}));  // 0.55, 0.5 pass; 0.34 < 0.6
}

static void test_answer_has_ended() {
  const int32_t a[] = {3, 4, kEos, kEos, kEos};
  CHECK(answer_has_ended(a, 5, kEos, -1));
  CHECK(!answer_has_ended(a, 2, kEos, -1));  // the end token lies past the final part
  const int32_t b[] = {3, kEos, 4, kEos};
  CHECK(!answer_has_ended(b, 4, kEos, -1));  // a real token after the end token
  CHECK(answer_has_ended(b, 2, kEos, -1));
  const int32_t c[] = {3, kEot, kEos, kEot};
  CHECK(answer_has_ended(c, 4, kEos, kEot));
  CHECK(!answer_has_ended(c, 4, kEos, -1));  // without an EOT token, 13 is an ordinary token
  CHECK(!answer_has_ended(c, 0, kEos, kEot));
}

// ---- the engine with the new options --------------------------------------------------------------

static void test_new_options_validation() {
  Engine engine(std::make_shared<FakeModel>(default_rule, 64));
  const SamplingParams p = params(8, 4, 8);
  SamplingParams q = p;
  q.top_k = -1;
  EXPECT_ERROR(ErrorCode::InvalidArgument, "top_k", engine.create({1}, q));
  for (double bad : {0.0, -0.5, 1.5, static_cast<double>(NAN)}) {
    q = p, q.top_p = bad;
    EXPECT_ERROR(ErrorCode::InvalidArgument, "top_p", engine.create({1}, q));
  }
  for (double bad : {-0.1, 1.01, static_cast<double>(NAN)}) {
    q = p, q.parallel_threshold = bad;
    EXPECT_ERROR(ErrorCode::InvalidArgument, "parallel_threshold", engine.create({1}, q));
  }
  for (double bad : {-1.0, static_cast<double>(INFINITY), static_cast<double>(NAN)}) {
    q = p, q.parallel_factor = bad;
    EXPECT_ERROR(ErrorCode::InvalidArgument, "parallel_factor", engine.create({1}, q));
  }
  q = p, q.parallel_threshold = 0.9, q.parallel_factor = 1.0;
  EXPECT_ERROR(ErrorCode::InvalidArgument, "cannot both be set", engine.create({1}, q));
  EXPECT_ERROR(ErrorCode::InvalidArgument, "suffix[1] = 16 is outside the vocabulary", engine.create({1}, p, {2, 16}));
  EXPECT_ERROR(ErrorCode::InvalidArgument, "suffix[0] is the mask token", engine.create({1}, p, {kMask}));
  EXPECT_ERROR(ErrorCode::InvalidArgument,
               "prompt of 50 tokens plus gen_length 8 plus suffix of 7 tokens exceeds the model context of 64",
               engine.create(std::vector<int32_t>(50, 1), p, std::vector<int32_t>(7, 2)));
  CHECK(engine.live() == 0);
  // At the limit, and every option at its edge, is fine.
  q = p, q.top_k = 1, q.top_p = 1.0, q.parallel_threshold = 1.0, q.early_stop = true;
  CHECK(engine.create(std::vector<int32_t>(50, 1), q, std::vector<int32_t>(6, 2)) > 0);
}

static void test_top_k_in_engine() {
  // top_k = 1 at any temperature draws the argmax, so the answer is the greedy one; at temperature 0
  // top-k / top-p change nothing at all.
  const std::vector<int32_t> prompt = {1, 2, 3};
  const SamplingParams greedy = params(12, 4, 6);
  Engine reference(std::make_shared<FakeModel>());
  const std::vector<int32_t> expected = run_to_end(reference, reference.create(prompt, greedy));
  SamplingParams p = greedy;
  p.temperature = 1.5, p.top_k = 1, p.seed = 5;
  Engine a(std::make_shared<FakeModel>());
  CHECK(run_to_end(a, a.create(prompt, p)) == expected);
  p = greedy, p.top_k = 2, p.top_p = 0.3;
  Engine b(std::make_shared<FakeModel>());
  CHECK(run_to_end(b, b.create(prompt, p)) == expected);
  // Sampling with a nucleus is deterministic per seed and differs from sampling without it.
  auto sampled = [&](double top_p) {
    SamplingParams s = greedy;
    s.temperature = 1.0, s.top_p = top_p, s.seed = 21;
    Engine e(std::make_shared<FakeModel>());
    return run_to_end(e, e.create(prompt, s));
  };
  CHECK(sampled(0.5) == sampled(0.5));
  CHECK(sampled(0.5) != sampled(1.0));
  // min_p = 1 keeps only the likeliest token: the greedy answer at any temperature; a smaller min_p
  // still samples, deterministically per seed.
  p = greedy, p.temperature = 2.0, p.min_p = 1.0, p.seed = 8;
  Engine c(std::make_shared<FakeModel>());
  CHECK(run_to_end(c, c.create(prompt, p)) == expected);
  auto min_p_sampled = [&](double min_p) {
    SamplingParams s = greedy;
    s.temperature = 1.0, s.min_p = min_p, s.seed = 21;
    Engine e(std::make_shared<FakeModel>());
    return run_to_end(e, e.create(prompt, s));
  };
  CHECK(min_p_sampled(0.2) == min_p_sampled(0.2));
  CHECK(min_p_sampled(0.0) == sampled(1.0));  // 0 is off
}

static void test_min_p_rows() {
  // One row: every drawn token passes p >= min_p * p_max of softmax(l / T); with min_p the set of
  // tokens drawn over many seeds is exactly those that pass.
  std::vector<float> base(kVocab);
  for (int v = 0; v < kVocab; ++v) base[v] = 0.25f * static_cast<float>(v % 9);
  RowRule rule;
  rule.row_size = rule.vocab_size = kVocab;
  rule.mask_token_id = kMask;
  rule.temperature = 0.7;
  rule.min_p = 0.3;
  const double max = 0.25 * 8;
  std::vector<bool> passes(kVocab), drawn(kVocab);
  for (int v = 0; v < kVocab; ++v) passes[v] = v != kMask && std::exp((base[v] - max) / rule.temperature) >= rule.min_p;
  for (uint64_t seed = 0; seed < 2000; ++seed) {
    std::vector<float> row = base;
    drawn[sample_row(row.data(), rule, Rng(seed)).token] = true;
  }
  CHECK(drawn == passes);
  EXPECT_ERROR(ErrorCode::InvalidArgument, "min_p must be in [0, 1]", {
    Engine e(std::make_shared<FakeModel>());
    SamplingParams bad = params(4, 4, 4);
    bad.min_p = 1.5;
    e.create({1}, bad);
  });
}

static void test_suffix() {
  // The canvas is prompt, masks, suffix; only answer rows are predicted; the answer is the middle.
  auto model = std::make_shared<FakeModel>();
  Engine engine(model);
  const std::vector<int32_t> prompt = {1, 2}, suffix = {7, 8, 9};
  const SamplingParams p = params(6, 3, 4);
  const uint64_t id = engine.create(prompt, p, suffix);
  engine.step({id});
  CHECK((model->seen[0].tokens == std::vector<int32_t>{1, 2, kMask, kMask, kMask, kMask, kMask, kMask, 7, 8, 9}));
  CHECK((model->seen[0].rows == std::vector<int32_t>{2, 3, 4}));
  const SequenceInfo info = engine.info(id);
  CHECK(info.prompt_length == 2 && info.gen_length == 6 && info.suffix_length == 3);
  std::vector<StepOutput> steps;
  const std::vector<int32_t> answer = run_to_end(engine, id, &steps);
  CHECK(answer.size() == 6);
  CHECK(answer == reference_answer(default_rule, prompt, p, suffix));
  CHECK(answer != reference_answer(default_rule, prompt, p));  // the suffix is context: it changes the answer
  for (const StepOutput& o : steps)
    for (const CommittedToken& t : o.committed) CHECK(t.position >= 0 && t.position < 6);
  CHECK((model->seen[0].tokens[8] == 7 && model->seen[0].tokens.size() == 11));  // never overwritten

  // Under cfg the unconditional copy masks the prompt and the suffix.
  SamplingParams g = params(2, 2, 1);
  g.cfg_scale = 1.0;
  const uint64_t c = engine.create({4, 5}, g, {6});
  engine.step({c});
  CHECK(model->seen.size() == 2);
  CHECK((model->seen[0].tokens == std::vector<int32_t>{4, 5, kMask, kMask, 6}));
  CHECK((model->seen[1].tokens == std::vector<int32_t>{kMask, kMask, kMask, kMask, kMask}));
  CHECK(engine.info(c).forward_passes == 2);  // cfg evaluates the canvas twice per step
}

static void test_parallel_decoding() {
  struct Case {
    std::vector<int32_t> prompt;
    int gen, block;
    double threshold, factor;
  };
  const std::vector<Case> cases = {{{1, 2, 3}, 16, 4, 0.2, 0.0},
                                   {{4}, 16, 16, 0.1, 0.0},
                                   {{5, 6}, 11, 4, 0.0, 1.0},
                                   {{}, 9, 3, 0.0, 3.0},
                                   {{7, 8}, 12, 5, 1.0, 0.0}};
  bool fewer_steps = false;
  for (const Case& c : cases) {
    SamplingParams p = params(c.gen, c.block, c.gen);
    p.parallel_threshold = c.threshold;
    p.parallel_factor = c.factor;
    Engine engine(std::make_shared<FakeModel>());
    const uint64_t id = engine.create(c.prompt, p);
    CHECK(engine.info(id).steps_total == c.gen);  // the upper bound
    std::vector<StepOutput> steps;
    const std::vector<int32_t> answer = run_to_end(engine, id, &steps);
    int reference_steps = 0;
    CHECK(answer == reference_answer(default_rule, c.prompt, p, {}, &reference_steps));
    CHECK(static_cast<int>(steps.size()) == reference_steps);
    const SequenceInfo info = engine.info(id);
    CHECK(info.steps_done == reference_steps && info.forward_passes == reference_steps);
    CHECK(info.tokens_denoised == c.gen);
    // Every step commits at least one token of its block, and never crosses into the next block.
    bool ok = true;
    for (const StepOutput& o : steps) {
      ok = ok && !o.committed.empty() && o.filled == 0;
      for (const CommittedToken& t : o.committed) ok = ok && t.position / c.block == o.block;
    }
    CHECK(ok);
    fewer_steps = fewer_steps || reference_steps < c.gen;
  }
  CHECK(fewer_steps);  // the low thresholds really commit several tokens a step

  // A confident model: threshold 0.9 commits a whole block per step.
  const LogitRule sure = [](const int32_t*, int, int position, float* out) {
    for (int v = 0; v < kVocab; ++v) out[v] = 0.0f;
    out[1 + position % 5] = 12.0f;
  };
  Engine engine(std::make_shared<FakeModel>(sure));
  SamplingParams p = params(12, 4, 12);
  p.parallel_threshold = 0.9;
  std::vector<StepOutput> steps;
  run_to_end(engine, engine.create({1}, p), &steps);
  CHECK(steps.size() == 3 && steps[0].committed.size() == 4 && steps[2].steps_done == 3);
}

static void test_early_stop() {
  // Ends after three tokens: 5, 5, 5, then EOS everywhere.
  const LogitRule ends = [](const int32_t* canvas, int length, int position, float* out) {
    for (int v = 0; v < kVocab; ++v) out[v] = 0.0f;
    out[position >= 1 + 3 ? kEos : 5] = 4.0f;  // position counts the one-token prompt
  };
  SamplingParams p = params(12, 4, 12);
  p.early_stop = true;
  Engine engine(std::make_shared<FakeModel>(ends));
  std::vector<StepOutput> steps;
  const uint64_t id = engine.create({1}, p);
  const std::vector<int32_t> answer = run_to_end(engine, id, &steps);
  CHECK((answer == std::vector<int32_t>{5, 5, 5, kEos, kEos, kEos, kEos, kEos, kEos, kEos, kEos, kEos}));
  CHECK(steps.size() == 4);  // the first block only
  const StepOutput& last = steps.back();
  CHECK(last.finished && last.reason == FinishReason::Eos && last.filled == 8);
  CHECK(last.committed.size() == 9);  // the block's last token, then the fill
  bool fill_ok = true;
  for (size_t i = 1; i < last.committed.size(); ++i)
    fill_ok = fill_ok && last.committed[i].position == 3 + static_cast<int>(i) && last.committed[i].token == kEos &&
              last.committed[i].probability == 1.0f;
  CHECK(fill_ok);
  const SequenceInfo info = engine.info(id);
  CHECK(info.steps_done == 4 && info.tokens_denoised == 4 && info.forward_passes == 4 && info.finished);

  // Without early stop: the same answer here, in all 12 steps.
  p.early_stop = false;
  Engine full(std::make_shared<FakeModel>(ends));
  steps.clear();
  CHECK(run_to_end(full, full.create({1}, p), &steps) == answer);
  CHECK(steps.size() == 12 && steps.back().filled == 0);

  // An end token followed by a real token is not an end: denoising goes on.
  const LogitRule pause = [](const int32_t*, int, int position, float* out) {
    for (int v = 0; v < kVocab; ++v) out[v] = 0.0f;
    out[position == 1 + 1 ? kEos : 5] = 4.0f;
  };
  p.early_stop = true;
  Engine paused(std::make_shared<FakeModel>(pause));
  steps.clear();
  run_to_end(paused, paused.create({1}, p), &steps);
  CHECK(steps.size() == 12);

  // EOT ends an answer when the sequence has one; with parallel decoding the stop comes after the
  // first block's single step.
  const LogitRule eot = [](const int32_t*, int, int position, float* out) {
    for (int v = 0; v < kVocab; ++v) out[v] = 0.0f;
    out[position == 1 + 2 ? kEot : position > 1 + 2 ? kEos : 5] = 12.0f;
  };
  p.eot_token_id = kEot;
  p.parallel_threshold = 0.9;
  Engine turn(std::make_shared<FakeModel>(eot));
  steps.clear();
  const std::vector<int32_t> t = run_to_end(turn, turn.create({1}, p), &steps);
  CHECK((t == std::vector<int32_t>{5, 5, kEot, kEos, kEos, kEos, kEos, kEos, kEos, kEos, kEos, kEos}));
  CHECK(steps.size() == 1 && steps[0].filled == 8 && steps[0].reason == FinishReason::Eos);

  // With a suffix the fill stays inside the answer.
  p = params(8, 4, 8);
  p.early_stop = true;
  Engine infill(std::make_shared<FakeModel>(ends));
  const std::vector<int32_t> filled = run_to_end(infill, infill.create({1}, p, {7, 7}));
  CHECK((filled == std::vector<int32_t>{5, 5, 5, kEos, kEos, kEos, kEos, kEos}));
}

static void test_template() {
  // A template fixes answer positions from the start; the model denoises only the others, each block's
  // steps spread over its masks, a block with none skipped.
  auto model = std::make_shared<FakeModel>();
  Engine engine(model);
  const std::vector<int32_t> prompt = {1, 2};
  SamplingParams p = params(8, 4, 8);  // two blocks of 4, 4 steps each without a template
  p.early_stop = true;                 // ignored with a template: it would overwrite fixed tokens
  const std::vector<int32_t> tmpl = {9, -1, -1, 9, 3, 3, 3, -1};  // block 0: 2 masks, block 1: 1 mask
  const uint64_t id = engine.create(prompt, p, {}, tmpl);
  CHECK(engine.info(id).steps_total == 3);  // min(4, masks) per block: 2 + 1
  engine.step({id});
  CHECK((model->seen[0].tokens == std::vector<int32_t>{1, 2, 9, kMask, kMask, 9, 3, 3, 3, kMask}));
  CHECK((model->seen[0].rows == std::vector<int32_t>{3, 4}));  // only the masks of block 0
  std::vector<StepOutput> steps;
  const std::vector<int32_t> answer = run_to_end(engine, id, &steps);
  CHECK(steps.size() == 2 && engine.info(id).steps_done == 3);
  for (size_t q = 0; q < tmpl.size(); ++q) CHECK(tmpl[q] == -1 ? answer[q] != kMask : answer[q] == tmpl[q]);
  for (const StepOutput& o : steps)
    for (const CommittedToken& t : o.committed) CHECK(tmpl[t.position] == -1);  // fixed tokens never reported

  // A block whose positions are all fixed is skipped: steps go to the first block with a mask.
  const uint64_t skip = engine.create(prompt, params(8, 4, 8), {}, {4, 4, 4, 4, -1, 5, -1, 5});
  const std::vector<StepOutput> first = engine.step({skip});
  CHECK(first[0].block == 1 && !first[0].committed.empty() && first[0].committed[0].position >= 4);

  // All -1 is no template: the same answer as without one.
  const uint64_t plain = engine.create(prompt, params(8, 4, 8));
  const uint64_t open = engine.create(prompt, params(8, 4, 8), {}, std::vector<int32_t>(8, -1));
  CHECK(run_to_end(engine, plain) == run_to_end(engine, open));

  EXPECT_ERROR(ErrorCode::InvalidArgument, "template has 3 positions",
               engine.create(prompt, params(8, 4, 8), {}, {-1, -1, -1}));
  EXPECT_ERROR(ErrorCode::InvalidArgument, "nothing is left to denoise",
               engine.create(prompt, params(2, 2, 2), {}, {3, 4}));
  EXPECT_ERROR(ErrorCode::InvalidArgument, "template[1]", engine.create(prompt, params(2, 2, 2), {}, {-1, kMask}));
  EXPECT_ERROR(ErrorCode::InvalidArgument, "template[0]", engine.create(prompt, params(2, 2, 2), {}, {kVocab, -1}));
}

int main() {
  test_schedule();
  test_select_most_confident();
  test_cfg_formula();
  test_sample_row_argmax_and_probability();
  test_eos_options();
  test_gumbel();
  test_validation();
  test_matches_reference_loop();
  test_penalties();
  test_rows_requested();
  test_cfg_in_engine();
  test_eos_finish_reason();
  test_barred_end_tokens_rows();
  test_barred_end_tokens_in_engine();
  test_non_finite_logits();
  test_never_samples_mask_or_padding();
  test_gumbel_determinism_in_engine();
  test_cancellation();
  test_release();
  test_top_k_top_p_rows();
  test_select_parallel();
  test_answer_has_ended();
  test_new_options_validation();
  test_top_k_in_engine();
  test_min_p_rows();
  test_suffix();
  test_parallel_decoding();
  test_early_stop();
  test_template();
  std::printf("%d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
