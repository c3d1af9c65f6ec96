// Block decoding in the step engine (core/block_decoding.h): the phases and forwards of a sequence, the
// exact block cache against full recompute (tokens, traces and the largest logit difference), a batch of
// mixed sequences against each alone, editing, the stop after the block holding an end token, the
// settings block decoding refuses, score's block-causal attention, and the golden fixtures of the
// PyTorch reference (test/fixtures/golden-block) when they are there.
//
// Until the block families load, the engine is driven through a tiny LLaDA checkpoint whose config says
// Decoding::Block (BlockModel below): the CPU forward honours ForwardSeq::attention_block whatever the
// family, so this is the same engine path a LLaDA2 or SDAR model takes.
#include <set>
#include <tuple>

#include "core/block_decoding.h"
#include "tests/model_fixtures.h"

namespace vdiff::test {

namespace {

// A backend that runs another one's forward under a config of its own (block decoding, a block length,
// a model type, end tokens) and records what each forward computed and the logits it returned.
class BlockModel final : public ForwardingBackend {
 public:
  BlockModel(std::shared_ptr<Backend> inner, const ModelConfig& config) : ForwardingBackend(std::move(inner), config) {}
  void forward(const std::vector<ForwardSeq>& batch, float* logits, const std::atomic<bool>* cancel) override {
    for (const ForwardSeq& s : batch)
      calls.push_back(std::to_string(s.compute_begin) + "-" +
                      std::to_string(s.compute_end == -1 ? s.length : s.compute_end) + (s.cache ? "c" : "") +
                      (s.attention_block > 0 ? "" : " bidirectional!"));
    inner_->forward(batch, logits, cancel);
    size_t rows = 0;
    for (const ForwardSeq& s : batch) rows += s.n_logit_rows;
    if (record_logits && rows > 0)
      row_logits.emplace_back(logits, logits + rows * static_cast<size_t>(config_.embedding_size));
    if (cancel_after) cancel_after->store(true), cancel_after = nullptr;
  }
  std::vector<std::string> calls;  // "begin-end" per sequence per forward, "c" when it had a cache
  bool record_logits = false;
  std::vector<std::vector<float>> row_logits;  // per forward with rows: the rows' logits
  std::atomic<bool>* cancel_after = nullptr;
};

ModelConfig block_config(const ModelConfig& base, int block, const std::string& model_type = "llada2_moe") {
  ModelConfig c = base;
  c.decoding = Decoding::Block;
  c.block_length = block;
  c.model_type = model_type;
  return c;
}

// One sequence's run: every step's output and, per denoise step, the tokens it wrote at answer positions
// (committed, or with editing written provisionally) with their probabilities: the fixtures' trace.
struct Run {
  std::string phases;  // P, D, C per step
  std::vector<std::vector<std::tuple<int, int, float>>> trace;
  std::vector<int32_t> answer;
  FinishReason reason = FinishReason::None;
  std::vector<StepOutput> outputs;
  SequenceInfo info{};
  int edits = 0;
  bool operator==(const Run& o) const {
    return phases == o.phases && answer == o.answer && reason == o.reason && trace == o.trace;
  }
  // The same denoising (answer, trace, stop) whatever the prefill and commit forwards around it.
  bool same_denoising(const Run& o) const { return answer == o.answer && reason == o.reason && trace == o.trace; }
};

char phase_letter(Phase p) { return p == Phase::Prefill ? 'P' : p == Phase::Commit ? 'C' : 'D'; }

// Runs the sequences to the end, all in one batch per step.
std::vector<Run> run_all(Engine& engine, const std::vector<uint64_t>& ids) {
  std::vector<Run> runs(ids.size());
  std::vector<std::map<int, std::pair<int, float>>> shown(ids.size());  // editing: what provisional showed
  std::vector<uint64_t> running = ids;
  for (int guard = 0; !running.empty() && guard < 10000; ++guard) {
    std::vector<uint64_t> next;
    for (const StepOutput& out : engine.step(running)) {
      const size_t i = std::find(ids.begin(), ids.end(), out.id) - ids.begin();
      Run& r = runs[i];
      r.phases += phase_letter(out.phase);
      r.outputs.push_back(out);
      if (out.phase == Phase::Denoise) {
        // The writes: entries new or changed against what the step before showed.
        std::vector<std::tuple<int, int, float>> writes;
        auto& before = shown[i];
        auto take = [&](const std::vector<CommittedToken>& list) {
          for (const CommittedToken& c : list) {
            auto it = before.find(c.position);
            if (it == before.end() || it->second.first != c.token) {
              if (it != before.end()) ++r.edits;
              writes.emplace_back(c.position, c.token, c.probability);
            }
          }
        };
        take(out.committed);
        take(out.provisional);
        std::sort(writes.begin(), writes.end());
        r.trace.push_back(writes);
        if (!out.provisional.empty() || !out.committed.empty()) {
          std::map<int, std::pair<int, float>> now;
          for (const CommittedToken& c : out.provisional) now[c.position] = {c.token, c.probability};
          if (out.provisional.empty()) now.clear();  // the block closed: the next one starts empty
          before = now;
        }
      }
      if (out.finished) r.reason = out.reason;
      else next.push_back(out.id);
    }
    running = next;
  }
  for (size_t i = 0; i < ids.size(); ++i) {
    runs[i].answer = engine.canvas(ids[i]);
    runs[i].info = engine.info(ids[i]);
  }
  return runs;
}

Run run_one(Engine& engine, const std::vector<int32_t>& prompt, const SamplingParams& p,
            const std::vector<int32_t>& answer_template = {}) {
  const uint64_t id = engine.create(prompt, p, {}, answer_template);
  Run r = run_all(engine, {id})[0];
  engine.release(id);
  return r;
}

SamplingParams block_params(int gen, int block, int steps, KVCacheMode mode, double threshold = 0.0) {
  SamplingParams p;
  p.gen_length = gen, p.block_length = block, p.steps = steps, p.kv_cache = mode;
  p.parallel_threshold = threshold;
  return p;
}

std::string joined(const std::vector<std::string>& calls) {
  std::string s;
  for (const std::string& c : calls) s += (s.empty() ? "" : " ") + c;
  return s;
}

int count(const std::string& s, char c) { return static_cast<int>(std::count(s.begin(), s.end(), c)); }

// The expected forward ranges of a cached run from its phases: block_decoding.h's rules.
std::string expected_calls(const std::string& phases, int P, int B) {
  std::string s;
  int block = P / B;
  for (char ph : phases) {
    std::string c;
    if (ph == 'P') c = "0-" + std::to_string(P / B * B) + "c";
    if (ph == 'D') c = std::to_string(block * B) + "-" + std::to_string((block + 1) * B) + "c";
    if (ph == 'C') c = std::to_string(block * B) + "-" + std::to_string((block + 1) * B) + "c", ++block;
    s += (s.empty() ? "" : " ") + c;
  }
  return s;
}

void expect_refused(const std::string& name, const std::string& param, const std::function<void()>& fn) {
  try {
    fn();
    report(false, "block refuses " + name, "no error thrown");
  } catch (const Error& e) {
    report(e.code() == ErrorCode::InvalidArgument && e.param() == param, "block refuses " + name,
           std::string(e.what()) + " [param " + e.param() + "]");
  }
}

}  // namespace

void test_block_schedule() {
  report(block_schedule(32, 32) == std::vector<int>(32, 1), "block schedule 32/32: all ones");
  report(block_schedule(4, 3) == std::vector<int>({2, 1, 1}), "block schedule 4/3: the first B % steps one more");
  report(block_schedule(4, 6) == std::vector<int>({1, 1, 1, 1, 0, 0}), "block schedule 4/6: zeros past B");
  report(block_schedule(8, 1) == std::vector<int>({8}), "block schedule 8/1: the whole block");
}

// A tiny f32 model, its weights in a temporary directory, served under a block config: blocks of 4 and
// EOS a head-padding id that is never drawn, so runs go to their last block unless a test sets stops.
// Prompts are random ids below the vocabulary's last two (no mask, no EOS).
struct BlockFixture {
  static constexpr int B = 4;
  TempDir tmp;
  TinySpec spec;
  std::shared_ptr<Backend> inner;
  ModelConfig base;
  std::shared_ptr<BlockModel> model;
  std::mt19937 rng;

  BlockFixture(uint32_t weights_seed, uint32_t prompts_seed) : rng(prompts_seed) {
    write_tiny(tmp.path / "tiny", make_tiny(spec, WType::F32, weights_seed));
    inner = Backend::load((tmp.path / "tiny").string(), test_options(2));
    base = block_config(inner->config(), B);
    base.eos_token_id = spec.embedding - 1;
    model = std::make_shared<BlockModel>(inner, base);
  }
  std::vector<int32_t> prompt_of(int n) { return random_tokens(rng, n, spec.vocab - 2); }
};

void test_block_engine() {
  BlockFixture fixture(77, 9);
  auto& [tmp, spec, inner, base, model, rng] = fixture;
  const int B = BlockFixture::B;
  auto prompt_of = [&](int n) { return fixture.prompt_of(n); };
  Engine engine(model);

  // Phases and forwards: prompt 6 (one whole block and a tail of 2), 10 answer tokens: canvas 16, blocks 1..3.
  {
    const std::vector<int32_t> prompt = prompt_of(6);
    model->calls.clear();
    const Run cached = run_one(engine, prompt, block_params(10, B, 4, KVCacheMode::Prefix));
    const std::string cached_calls = joined(model->calls);
    model->calls.clear();
    const Run full = run_one(engine, prompt, block_params(10, B, 4, KVCacheMode::None));
    const std::string full_calls = joined(model->calls);
    // Block 1 holds 2 masks (one per step), blocks 2 and 3 four each.
    report(cached.phases == "PDDCDDDDCDDDD", "block phases, cached: prefill, denoise per step, commit between blocks",
           cached.phases + ": " + cached_calls);
    report(cached_calls == expected_calls(cached.phases, 6, B) && cached_calls.substr(0, 14) == "0-4c 4-8c 4-8c",
           "block forwards, cached: prefill [0,4), the open block with the prompt tail, commit of the final block",
           cached_calls);
    std::string from_cached;  // each cached denoise [b, e)c is an uncached [0, e)
    for (size_t i = 0, at = 0; i < cached.phases.size(); ++i) {
      const size_t space = cached_calls.find(' ', at);
      const std::string call = cached_calls.substr(at, space == std::string::npos ? std::string::npos : space - at);
      at = space + 1;
      if (cached.phases[i] == 'D')
        from_cached +=
            (from_cached.empty() ? "0-" : " 0-") + call.substr(call.find('-') + 1, call.size() - call.find('-') - 2);
    }
    report(full.phases == "DDDDDDDDDD" && full_calls == from_cached,
           "block forwards, no cache: [0, block end) every step", full_calls);
    const SequenceInfo& ci = cached.info;
    const int denoise = count(cached.phases, 'D'), commits = count(cached.phases, 'C');
    report(ci.forward_passes == 1 + denoise + commits && commits == 2 && ci.steps_done == denoise &&
               ci.kv_refreshes == 1 + commits && ci.positions_computed == 4 + 4 * (denoise + commits) &&
               full.info.forward_passes == 10 && full.info.kv_refreshes == 0 &&
               full.info.positions_computed == 2 * 8 + 4 * 12 + 4 * 16,
           "block counters: forwards = prefill + denoise steps + one commit per block but the last",
           fmt("%g forwards, %g refreshes, %g positions", ci.forward_passes, ci.kv_refreshes,
               static_cast<double>(ci.positions_computed)));
    report(cached.same_denoising(full) && cached.info.tokens_denoised == 10 && cached.reason == FinishReason::Length &&
               std::find(cached.answer.begin(), cached.answer.end(), spec.vocab - 1) == cached.answer.end(),
           "block cached == full recompute: same tokens, probabilities and steps (prompt 6, block 4)");
    bool blocks_ok = true;
    for (const StepOutput& o : cached.outputs) {
      if (o.phase == Phase::Prefill) blocks_ok = blocks_ok && o.block == 0 && o.committed.empty();
      if (o.phase == Phase::Commit) blocks_ok = blocks_ok && o.committed.empty() && o.provisional.empty();
      for (const CommittedToken& t : o.committed) blocks_ok = blocks_ok && t.position >= 0 && t.position < 10;
    }
    report(blocks_ok && cached.outputs.back().finished,
           "block outputs: prefill and commit commit nothing; answer positions only");

    // The cache: one for the whole canvas (nb * B positions), accounted while the sequence runs, freed
    // when it finishes; none without a cache.
    {
      const uint64_t id = engine.create(prompt, block_params(10, B, 4, KVCacheMode::Prefix));
      const uint64_t plain = engine.create(prompt, block_params(10, B, 4, KVCacheMode::None));
      const SequenceInfo before = engine.info(id);
      const uint64_t live = inner->kv_cache_live_bytes();
      run_all(engine, {id, plain});
      const SequenceInfo after = engine.info(id);
      report(before.kv_cache_bytes == inner->kv_cache_bytes(16) && live == before.kv_cache_bytes &&
                 engine.info(plain).kv_cache_bytes == 0 && after.finished && after.kv_cache_bytes == 0 &&
                 inner->kv_cache_live_bytes() == 0 && before.memory_bytes > before.kv_cache_bytes,
             "block cache: the whole canvas's (16 positions), accounted, freed when the sequence finishes",
             std::to_string(before.kv_cache_bytes) + " bytes");
      engine.release(id);
      engine.release(plain);
    }

    // Prompts shorter than a block and a multiple of it; no prefill / a prefill and no tail.
    model->calls.clear();
    const Run short_prompt = run_one(engine, prompt_of(3), block_params(5, B, 2, KVCacheMode::Prefix));
    report(short_prompt.phases.find('P') == std::string::npos && joined(model->calls).substr(0, 8) == "0-4c 0-4",
           "block prompt shorter than a block: no prefill, the first block holds it", joined(model->calls));
    model->calls.clear();
    const Run whole = run_one(engine, prompt_of(8), block_params(4, B, 4, KVCacheMode::Prefix));
    report(whole.phases == "PDDDD" && joined(model->calls) == "0-8c 8-12c 8-12c 8-12c 8-12c",
           "block prompt of whole blocks: prefill then the answer's single block, no commit after the last",
           whole.phases + ": " + joined(model->calls));
  }

  // The cached form == full recompute on many sequences (prompt lengths 0..13, thresholds, steps), and
  // the largest logit difference between them over every denoise forward.
  {
    double worst = 0.0, worst_logit = 0.0;
    int cases = 0, same = 0, threshold_steps = 0;
    for (int P = 0; P <= 13; ++P) {
      const std::vector<int32_t> prompt = prompt_of(P);
      for (auto [steps, threshold] : {std::pair{4, 0.0}, std::pair{2, 0.0}, std::pair{4, 0.3}, std::pair{3, 0.15}}) {
        const int gen = 3 + (P * 5) % 11;
        model->record_logits = true;
        model->row_logits.clear();
        const Run cached = run_one(engine, prompt, block_params(gen, B, steps, KVCacheMode::Prefix, threshold));
        std::vector<std::vector<float>> a = std::move(model->row_logits);
        model->row_logits.clear();
        const Run full = run_one(engine, prompt, block_params(gen, B, steps, KVCacheMode::None, threshold));
        std::vector<std::vector<float>> b = std::move(model->row_logits);
        model->record_logits = false;
        ++cases;
        const bool ok = full.phases.size() == size_t(count(cached.phases, 'D')) && full.trace == cached.trace &&
                        full.answer == cached.answer && full.reason == cached.reason && a.size() == b.size();
        same += ok;
        if (ok)
          for (size_t f = 0; f < a.size(); ++f)
            worst = std::max(worst, max_abs_diff(a[f], b[f])), worst_logit = std::max(worst_logit, max_abs(a[f]));
        for (const auto& step : cached.trace) threshold_steps += step.size() > 1 && steps == 4;
      }
    }
    report(
        same == cases && worst <= 1e-4 * worst_logit,
        "block cached == full recompute token for token (prompts 0..13, steps 4/2/3, thresholds 0/0.3/0.15)",
        std::to_string(same) + " of " + std::to_string(cases) + " equal; largest logit difference " +
            fmt("%.3g (max |logit| %.3g); %g threshold steps committing > quota", worst, worst_logit, threshold_steps));
  }

  // A batch of 8 mixed sequences (prompt lengths, answer lengths, cached or not, thresholds, editing)
  // gives each what it gets alone.
  {
    struct Spec {
      std::vector<int32_t> prompt;
      SamplingParams params;
    };
    std::vector<Spec> specs;
    const int lengths[8] = {0, 3, 4, 6, 8, 9, 13, 2};
    for (int i = 0; i < 8; ++i) {
      SamplingParams p = block_params(2 + (i * 7) % 13, B, i % 3 == 0 ? 4 : 2,
                                      i % 2 ? KVCacheMode::Prefix : KVCacheMode::None, i % 4 == 1 ? 0.2 : 0.0);
      if (i == 5 || i == 6) p.editing_threshold = i == 5 ? 0.0 : 0.5, p.max_post_steps = 3, p.parallel_threshold = 0.4;
      specs.push_back({prompt_of(lengths[i]), p});
    }
    std::vector<uint64_t> ids;
    for (const Spec& s : specs) ids.push_back(engine.create(s.prompt, s.params));
    const std::vector<Run> together = run_all(engine, ids);
    int same = 0;
    std::string phases;
    for (size_t i = 0; i < specs.size(); ++i) {
      same += run_one(engine, specs[i].prompt, specs[i].params) == together[i];
      phases += (i ? " " : "") + together[i].phases;
      engine.release(ids[i]);
    }
    // Steps where one sequence prefilled or committed while another denoised.
    int mixed = 0;
    for (size_t k = 0;; ++k) {
      std::set<char> at;
      for (const Run& r : together)
        if (k < r.phases.size()) at.insert(r.phases[k]);
      if (at.empty()) break;
      mixed += at.size() > 1;
    }
    report(same == 8 && mixed > 0,
           "block batch of 8 mixed (prompts 0..13, cached / not, threshold, editing) == each alone, " +
               std::to_string(mixed) + " steps mixing phases",
           std::to_string(same) + " of 8; phases " + phases);
  }

  // Editing: provisional tokens while the block is open, committed with their final values when it
  // closes; at most max_post_steps forwards without masks per block; cached == full recompute.
  {
    int edits = 0, cases = 0, ok_cases = 0, same = 0;
    std::string detail;
    for (int P : {2, 4, 7}) {
      const std::vector<int32_t> prompt = prompt_of(P);
      for (double edit : {0.0, 0.3}) {
        for (int post : {0, 2, 16}) {
          SamplingParams p = block_params(9, B, 4, KVCacheMode::Prefix, 0.5);
          p.editing_threshold = edit, p.max_post_steps = post;
          const Run cached = run_one(engine, prompt, p);
          p.kv_cache = KVCacheMode::None;
          const Run full = run_one(engine, prompt, p);
          ++cases;
          same += cached.same_denoising(full);
          edits += cached.edits;
          // Per block: the steps without masks stay within max_post_steps; every answer position is
          // committed exactly once, when its block closes, with the canvas's final token.
          bool ok = true;
          std::map<int, int> committed;
          for (const StepOutput& o : cached.outputs) {
            for (const CommittedToken& t : o.committed) {
              ok = ok && committed.count(t.position) == 0 && cached.answer[t.position] == t.token;
              committed[t.position] = t.token;
              ok = ok && o.provisional.empty();
            }
            for (const CommittedToken& t : o.provisional) ok = ok && committed.count(t.position) == 0;
          }
          ok = ok && static_cast<int>(committed.size()) == 9 && cached.info.tokens_denoised == 9;
          ok_cases += ok;
        }
      }
    }
    report(ok_cases == cases && same == cases && edits > 0,
           "block editing: provisional until the block closes, committed once with the final token; cached == "
           "full recompute",
           std::to_string(same) + " of " + std::to_string(cases) + " equal, " + std::to_string(edits) + " edits");

    // max_post_steps bounds the forwards of a block without masks: with editing_threshold 0 every
    // differing prediction is an edit, so blocks tend to use all of them.
    const std::vector<int32_t> prompt = prompt_of(4);
    for (int post : {0, 1, 3}) {
      SamplingParams p = block_params(4, B, 4, KVCacheMode::None, 0.99);  // one block, one mask per step
      p.editing_threshold = 0.0, p.max_post_steps = post;
      const Run r = run_one(engine, prompt, p);
      // Steps with masks: 4 (one each, the threshold is never passed on this random model or rarely);
      // then at most `post` more.
      const int steps = r.info.steps_done;
      report(steps >= 1 && steps <= 4 + post && r.info.steps_done <= r.info.steps_total,
             "block editing: max_post_steps " + std::to_string(post) + " bounds the block's forwards",
             std::to_string(steps) + " steps of at most " + std::to_string(r.info.steps_total));
    }
  }

  // Stop: the block holding an end token is the last one denoised; later blocks stay masks. The stop
  // token: one whose first occurrence in the answer is in its second block, on the first of a few prompts
  // that has one (else the answer's first token).
  {
    const int P = 5, G = 14;  // canvas blocks 1..4: answer 0..2, 3..6, 7..10, 11..13
    const SamplingParams p = block_params(G, B, 4, KVCacheMode::Prefix);
    std::vector<int32_t> prompt;
    Run free_run;
    int32_t stop = -1;
    for (int attempt = 0; attempt < 8 && stop < 0; ++attempt) {
      prompt = prompt_of(P);
      free_run = run_one(engine, prompt, p);
      for (int q = 3; q < 7 && stop < 0; ++q)
        if (std::find(free_run.answer.begin(), free_run.answer.begin() + q, free_run.answer[q]) ==
            free_run.answer.begin() + q)
          stop = free_run.answer[q];
    }
    if (stop < 0) stop = free_run.answer[0];
    const int first =
        static_cast<int>(std::find(free_run.answer.begin(), free_run.answer.end(), stop) - free_run.answer.begin());
    const int last_block = (P + first) / B;            // canvas block holding it
    const int answer_done = (last_block + 1) * B - P;  // answer positions up to that block's end
    ModelConfig with_stop = base;
    with_stop.stop_token_ids = {stop};
    Engine stop_engine(std::make_shared<BlockModel>(inner, with_stop));
    const Run stopped = run_one(stop_engine, prompt, p);
    bool later_masks = true;
    for (int q = answer_done; q < G; ++q) later_masks = later_masks && stopped.answer[q] == spec.vocab - 1;
    // The free run's phases up to the end of that block's denoising (its commit is skipped).
    const size_t commits_before = static_cast<size_t>(last_block - P / B);
    size_t cut = 0;
    for (size_t seen = 0; cut < free_run.phases.size(); ++cut)
      if (free_run.phases[cut] == 'C' && seen++ == commits_before) break;
    report(stopped.reason == FinishReason::Eos && later_masks &&
               std::equal(stopped.answer.begin(), stopped.answer.begin() + answer_done, free_run.answer.begin()) &&
               stopped.phases == free_run.phases.substr(0, cut) && free_run.reason == FinishReason::Length,
           "block stop: after the block holding a stop token, the rest stays masks, no commit after it",
           "stop token " + std::to_string(stop) + " first at answer position " + std::to_string(first) + ": " +
               stopped.phases + " of " + free_run.phases);
  }

  // A template (structured output's JSON skeleton): its tokens are in place from the start and never
  // denoised, edited or reported; a block they fill alone is never denoised, only committed with the block
  // before it; a block holding some spreads its steps over its masks; an end token in a value does not
  // end the answer; cached equals recompute.
  {
    // Prompts of their own, so that the tests after these draw what they drew before.
    std::mt19937 own(31);
    auto own_prompt = [&](int n) { return random_tokens(own, n, spec.vocab - 2); };
    const std::vector<int32_t> prompt = own_prompt(6);  // blocks 1 (tail of 2 + answer 0-1) .. 4 (answer 10-13)
    const int32_t F = 3, G = 4;                         // fixed tokens
    const std::vector<int32_t> tmpl = {-1, F, F, G, F, G, -1, F, -1, -1, G, F, -1, G};
    const SamplingParams cached_p = block_params(14, B, 4, KVCacheMode::Prefix);
    const SamplingParams full_p = block_params(14, B, 4, KVCacheMode::None);
    auto run_templated = [&](const std::vector<int32_t>& prompt_, const SamplingParams& p,
                             const std::vector<int32_t>& t) {
      const uint64_t id = engine.create(prompt_, p, {}, t);
      Run r = run_all(engine, {id})[0];
      engine.release(id);
      return r;
    };
    model->calls.clear();
    const Run cached = run_templated(prompt, cached_p, tmpl);
    const std::string cached_calls = joined(model->calls);
    model->calls.clear();
    const Run full = run_templated(prompt, full_p, tmpl);
    const std::string full_calls = joined(model->calls);
    bool kept = true, reported_fixed = false;
    for (size_t q = 0; q < tmpl.size(); ++q) kept = kept && (tmpl[q] == -1 || cached.answer[q] == tmpl[q]);
    for (const auto& step : cached.trace)
      for (const auto& [pos, tok, prob] : step) reported_fixed = reported_fixed || tmpl[pos] != -1;
    report(kept && !reported_fixed && std::count(cached.answer.begin(), cached.answer.end(), spec.vocab - 1) == 0,
           "block template: its tokens stay, only the other positions are denoised and reported");
    report(cached.phases == "PDCDDDCD" && cached_calls == "0-4c 4-8c 4-12c 12-16c 12-16c 12-16c 12-16c 16-20c",
           "block template: a block of template tokens only is not denoised, committed with the block before; a "
           "block's steps spread over its masks",
           cached.phases + ": " + cached_calls);
    report(cached.same_denoising(full) && full.phases == "DDDDD" && full_calls == "0-8 0-16 0-16 0-16 0-20" &&
               cached.info.steps_done == 5 && cached.reason == FinishReason::Length,
           "block template: cached == full recompute", full.phases + ": " + full_calls);

    // Template blocks before the first one to denoise are committed after the prefill.
    model->calls.clear();
    const std::vector<int32_t> four = own_prompt(4);
    const Run leading = run_templated(four, cached_p, {F, G, F, G, -1, F, -1, -1, G, G, G, G, -1, F});
    const std::string leading_calls = joined(model->calls);
    const Run leading_full = run_templated(four, full_p, {F, G, F, G, -1, F, -1, -1, G, G, G, G, -1, F});
    // (The last block's two positions past the answer are denoised with its one mask, as without a template.)
    report(leading.phases == "PCDDDCDDD" && leading_calls == "0-4c 4-8c 8-12c 8-12c 8-12c 8-16c 16-20c 16-20c 16-20c" &&
               leading.same_denoising(leading_full),
           "block template: leading template blocks committed after the prefill, with the blocks between",
           leading.phases + ": " + leading_calls);

    // An end token in a value does not end a templated answer: the model's EOS barred or not, the answer
    // runs to the template's end. With an end token fixed early, every block is still denoised.
    SamplingParams stop_p = cached_p;
    std::vector<int32_t> with_end = tmpl;
    with_end[1] = base.eos_token_id;
    const Run ended = run_templated(prompt, stop_p, with_end);
    report(ended.reason == FinishReason::Length && ended.phases == "PDCDDDCD" &&
               std::count(ended.answer.begin(), ended.answer.end(), spec.vocab - 1) == 0,
           "block template: an end token does not stop it before the template's end", ended.phases);

    // An all -1 template is no template.
    const Run plain = run_one(engine, prompt, cached_p);
    report(run_templated(prompt, cached_p, std::vector<int32_t>(14, -1)) == plain,
           "block template: all -1 is the same as none");

    // Editing (LLaDA2.1) never rewrites a template token, at the lowest threshold.
    SamplingParams edit_p = cached_p;
    edit_p.editing_threshold = 0.0, edit_p.max_post_steps = 2;
    const Run edited = run_templated(prompt, edit_p, tmpl);
    bool edit_kept = true, edit_reported = false;
    for (size_t q = 0; q < tmpl.size(); ++q) edit_kept = edit_kept && (tmpl[q] == -1 || edited.answer[q] == tmpl[q]);
    for (const StepOutput& o : edited.outputs) {
      for (const CommittedToken& c : o.committed) edit_reported = edit_reported || tmpl[c.position] != -1;
      for (const CommittedToken& c : o.provisional) edit_reported = edit_reported || tmpl[c.position] != -1;
    }
    report(edit_kept && !edit_reported && edited.reason == FinishReason::Length,
           "block template with editing: template tokens never edited nor reported");

    // In a batch beside untemplated sequences, each gets what it gets alone.
    const std::vector<int32_t> nine = own_prompt(9);
    const uint64_t a = engine.create(prompt, cached_p, {}, tmpl);
    const uint64_t b = engine.create(nine, block_params(7, B, 4, KVCacheMode::Prefix));
    const std::vector<Run> both = run_all(engine, {a, b});
    engine.release(a), engine.release(b);
    report(both[0].same_denoising(cached) &&
               both[1].same_denoising(run_one(engine, nine, block_params(7, B, 4, KVCacheMode::Prefix))),
           "block template: in a batch, each sequence as alone");
  }

  // A step cancelled after its forward (prefill, denoise, commit), retried, changes nothing.
  {
    const std::vector<int32_t> prompt = prompt_of(6);
    const SamplingParams p = block_params(10, B, 4, KVCacheMode::Prefix);
    const Run want = run_one(engine, prompt, p);
    for (int cancel_at : {0, 1, 3, 4}) {
      const uint64_t id = engine.create(prompt, p);
      std::atomic<bool> cancel{false};
      bool cancelled = false;
      Run got;
      for (int step = 0, guard = 0; guard < 200; ++guard) {
        if (step == cancel_at && !cancelled) model->cancel_after = &cancel;
        try {
          StepOutput out = engine.step({id}, &cancel).at(0);
          got.phases += phase_letter(out.phase);
          ++step;
          if (out.finished) break;
        } catch (const Error& e) {
          cancelled = e.code() == ErrorCode::Cancelled;
          cancel.store(false);
        }
      }
      got.answer = engine.canvas(id);
      engine.release(id);
      report(cancelled && got.phases == want.phases && got.answer == want.answer,
             std::string("block: a step cancelled after its forward (") + want.phases[cancel_at] +
                 "), retried, changes nothing");
    }
  }

  // Settings that do not apply to block decoding are refused, each naming its field.
  {
    const std::vector<int32_t> prompt = prompt_of(5);
    auto with = [&](auto change) {
      SamplingParams p = block_params(8, B, 4, KVCacheMode::Prefix);
      change(p);
      return p;
    };
    expect_refused("cfg_scale", "cfg_scale",
                   [&] { engine.create(prompt, with([](SamplingParams& p) { p.cfg_scale = 1; })); });
    expect_refused("remasking random", "remasking",
                   [&] { engine.create(prompt, with([](SamplingParams& p) { p.remasking = Remasking::Random; })); });
    expect_refused("a suffix", "suffix", [&] { engine.create(prompt, with([](SamplingParams&) {}), {1, 2}); });
    expect_refused("a template of the wrong length", "template", [&] {
      engine.create(prompt, with([](SamplingParams&) {}), {}, {3, -1});
    });
    expect_refused("a template with nothing to denoise", "template",
                   [&] { engine.create(prompt, with([](SamplingParams&) {}), {}, std::vector<int32_t>(8, 3)); });
    expect_refused("parallel_factor", "parallel_factor",
                   [&] { engine.create(prompt, with([](SamplingParams& p) { p.parallel_factor = 1; })); });
    expect_refused("kv_cache dual", "kv_cache",
                   [&] { engine.create(prompt, with([](SamplingParams& p) { p.kv_cache = KVCacheMode::Dual; })); });
    expect_refused("block_length other than the model's", "block_length",
                   [&] { engine.create(prompt, with([](SamplingParams& p) { p.block_length = 8; })); });
    expect_refused("max_post_steps < 0", "max_post_steps",
                   [&] { engine.create(prompt, with([](SamplingParams& p) { p.max_post_steps = -1; })); });
    expect_refused("editing_threshold > 1", "editing_threshold",
                   [&] { engine.create(prompt, with([](SamplingParams& p) { p.editing_threshold = 1.5; })); });
    ModelConfig short_context = base;
    short_context.max_sequence_length = 254;
    Engine short_engine(std::make_shared<BlockModel>(inner, short_context));
    expect_refused("a canvas past the context (254 tokens, whole blocks 256)", "gen_length",
                   [&] { short_engine.create(prompt, with([&](SamplingParams& p) { p.gen_length = 249; })); });
    ModelConfig sdar = block_config(inner->config(), B, "sdar");
    Engine sdar_engine(std::make_shared<BlockModel>(inner, sdar));
    expect_refused("editing on a family without it (sdar)", "editing_threshold",
                   [&] { sdar_engine.create(prompt, with([](SamplingParams& p) { p.editing_threshold = 0.5; })); });
    Engine llada(inner);
    SamplingParams p = block_params(8, B, 4, KVCacheMode::None);
    p.editing_threshold = 0.5;
    expect_refused("editing on a full-canvas model (llada)", "editing_threshold", [&] { llada.create(prompt, p); });
    // What does apply passes: temperature, top-k, top_logprobs.
    SamplingParams ok =
        with([](SamplingParams& q) { q.temperature = 0.8, q.top_k = 5, q.top_logprobs = 3, q.seed = 7; });
    const Run a = run_one(engine, prompt, ok), b = run_one(engine, prompt, ok);
    bool tops = true;
    for (const StepOutput& o : a.outputs)
      for (const CommittedToken& t : o.committed) tops = tops && t.top.size() == 3;
    report(a == b && tops, "block sampling at temperature 0.8, top-k 5, top_logprobs 3: reproducible per seed");
  }

  // score() on a block model reads the canvas through the block-causal attention.
  {
    const std::vector<int32_t> canvas = prompt_of(11);
    const std::vector<int32_t> positions = {0, 3, 4, 9, 10}, targets = {1, 2, 3, 4, 5};
    const std::vector<double> scores = engine.score(canvas, positions, targets);
    ForwardSeq s;
    s.tokens = canvas.data(), s.length = 11, s.logit_rows = positions.data(), s.n_logit_rows = 5;
    s.attention_block = B;
    std::vector<float> logits(5 * static_cast<size_t>(spec.embedding));
    inner->forward({s}, logits.data());
    double worst = 0.0;
    for (int r = 0; r < 5; ++r) {
      const float* row = logits.data() + r * spec.embedding;
      double max = -INFINITY, sum = 0.0;
      for (int i = 0; i < spec.embedding; ++i) max = std::max(max, double(row[i]));
      for (int i = 0; i < spec.embedding; ++i) sum += std::exp(double(row[i]) - max);
      worst = std::max(worst, std::fabs(scores[r] - (double(row[targets[r]]) - max - std::log(sum))));
    }
    Engine bidirectional(inner);
    const std::vector<double> full = bidirectional.score(canvas, positions, targets);
    report(worst < 1e-9 && full[0] != scores[0], "block score: the block-causal forward's log-probabilities",
           fmt("max difference %.3g", worst));
  }

  // score() of several canvases in one batched forward: each item as it scores alone; errors name the item.
  {
    const std::vector<int32_t> a = prompt_of(11), b = prompt_of(7);
    const std::vector<Engine::ScoreItem> items = {{a, {0, 3, 10}, {1, 2, 3}}, {b, {}, {}}, {b, {6, 2}, {4, 5}}};
    const std::vector<Engine::Scored> batch = engine.score(items);
    double worst = 0.0;
    bool shapes = batch.size() == 3;
    for (size_t i = 0; shapes && i < items.size(); ++i) {
      const std::vector<double> alone = engine.score(items[i].canvas, items[i].positions, items[i].targets);
      shapes = batch[i].logprobs.size() == alone.size() && batch[i].top.empty();
      for (size_t j = 0; shapes && j < alone.size(); ++j)
        worst = std::max(worst, std::fabs(batch[i].logprobs[j] - alone[j]));
    }
    report(shapes && worst < 1e-6, "score of a batch of canvases: each as it scores alone",
           fmt("max difference %.3g", worst));
    // With top_logprobs: each position's likeliest tokens, most likely first, the mask token left out; the
    // target's own log-probability is among them when it is the likeliest.
    {
      Engine::ScoreItem item{a, {0, 3, 10}, {1, 2, 3}, 5};
      const Engine::Scored scored = engine.score(std::vector<Engine::ScoreItem>{item})[0];
      bool ordered = scored.top.size() == 3;
      for (size_t j = 0; ordered && j < scored.top.size(); ++j) {
        const std::vector<TopLogprob>& top = scored.top[j];
        ordered = top.size() == 5;
        for (size_t t = 0; ordered && t < top.size(); ++t) {
          ordered = top[t].token != base.mask_token_id && top[t].token < base.vocab_size;
          if (t > 0) ordered = ordered && top[t].logprob <= top[t - 1].logprob;
        }
        // No token outside the top is likelier than the last of it: the target's logprob is below the first.
        ordered = ordered && scored.logprobs[j] <= top[0].logprob + 1e-6;
      }
      report(ordered, "score with top_logprobs 5: the likeliest tokens per position, in order, no mask token");
      // As many as asked, however many of the mask and the head padding (here 7 of 56) rank among them.
      const Engine::ScoreItem wide{a, {0, 3, 10}, {1, 2, 3}, kMaxTopLogprobs};
      const Engine::Scored all = engine.score(std::vector<Engine::ScoreItem>{wide})[0];
      bool full = all.top.size() == 3;
      for (const std::vector<TopLogprob>& top : all.top) {
        full = full && static_cast<int>(top.size()) == kMaxTopLogprobs;
        for (const TopLogprob& t : top) full = full && t.token != base.mask_token_id && t.token < base.vocab_size;
      }
      report(full, "score with top_logprobs 20: 20 alternatives, the mask and head padding left out");
      // rank: 1 + the vocabulary's tokens (not the mask) with a larger log-probability, counted here from
      // the forward's own row.
      item.rank = true;
      item.top_logprobs = 0;
      const Engine::Scored ranked = engine.score(std::vector<Engine::ScoreItem>{item})[0];
      ForwardSeq s;
      s.tokens = a.data(), s.length = static_cast<int>(a.size()), s.logit_rows = item.positions.data(),
      s.n_logit_rows = 3;
      s.attention_block = B;
      std::vector<float> logits(3 * static_cast<size_t>(spec.embedding));
      inner->forward({s}, logits.data());
      bool ranks = ranked.ranks.size() == 3 && ranked.top.empty();
      for (int j = 0; ranks && j < 3; ++j) {
        const float* row = logits.data() + j * spec.embedding;
        int above = 0;
        for (int i = 0; i < base.vocab_size; ++i) above += i != base.mask_token_id && row[i] > row[item.targets[j]];
        ranks = ranked.ranks[j] == 1 + above;
      }
      report(ranks, "score with rank: 1 + the tokens likelier than the target",
             ranked.ranks.size() == 3 ? fmt("%.0f %.0f %.0f", ranked.ranks[0], ranked.ranks[1], ranked.ranks[2]) : "");
    }
    std::vector<Engine::ScoreItem> bad = items;
    bad[2].targets[1] = spec.embedding + 5;
    const auto refused = [&](const std::vector<Engine::ScoreItem>& these, const std::string& fragment) {
      try {
        engine.score(these);
        report(false, "score refuses " + fragment, "no error thrown");
      } catch (const Error& e) {
        report(e.code() == ErrorCode::InvalidArgument && std::string(e.what()).find(fragment) != std::string::npos,
               "score refuses " + fragment, e.what());
      }
    };
    refused(bad, "score: items[2]: targets[1]");
    refused({}, "no canvas");
  }
}

// The golden fixtures of the PyTorch reference (tools/reference/block_generate.py): every case's answer,
// trace (positions and tokens exactly, probabilities within 1e-4), denoise steps per block, forwards per
// phase and edits, alone in the cached and the full-recompute form, and in the fixture's batch.
void test_block_golden(const std::string& dir) {
  for (const std::string name : {"llada2", "sdar", "sdar_moe"}) {
    const std::string label = "block golden " + name;
    try {
      std::ifstream in(fs::path(dir) / (name + ".json"));
      if (!in) {
        report(false, label, "no fixture " + (fs::path(dir) / (name + ".json")).string());
        continue;
      }
      std::stringstream ss;
      ss << in.rdbuf();
      const Json fixture = Json::parse(ss.str());
      std::shared_ptr<Backend> loaded = Backend::load((fs::path(dir) / name).string(), test_options(2));
      auto recorder = std::make_shared<BlockModel>(loaded, loaded->config());  // the same model, logits recorded
      Engine engine(recorder);
      const ModelConfig& config = engine.backend().config();
      report(config.decoding == Decoding::Block && config.block_length == fixture.find("block_size")->as_int64() &&
                 config.mask_token_id == fixture.find("mask_token_id")->as_int64(),
             label + ": the family decodes in blocks of the fixture's size with its mask token",
             config.model_type + ", block " + std::to_string(config.block_length));

      struct Case {
        std::string name;
        std::vector<int32_t> prompt;
        std::vector<int32_t> tmpl;  // the template of <name>-template.json's cases
        SamplingParams params;
        const Json* json;
      };
      auto cases_of = [](const Json& file) {
        std::vector<Case> cases;
        for (const Json& c : file.find("generate")->items()) {
          Case k;
          k.name = c.find("name")->as_string();
          for (const Json& t : c.find("prompt")->items()) k.prompt.push_back(static_cast<int32_t>(t.as_int64()));
          if (const Json* t = c.find("template"))
            for (const Json& id : t->items()) k.tmpl.push_back(static_cast<int32_t>(id.as_int64()));
          const Json& p = *c.find("params");
          k.params.gen_length = static_cast<int>(p.find("gen_length")->as_int64());
          k.params.block_length = static_cast<int>(p.find("block_length")->as_int64());
          k.params.steps = static_cast<int>(p.find("steps")->as_int64());
          k.params.parallel_threshold = p.find("threshold")->as_number();
          k.params.editing_threshold = p.find("editing_threshold")->as_number();
          k.params.max_post_steps = static_cast<int>(p.find("max_post_steps")->as_int64());
          k.params.kv_cache = KVCacheMode::Prefix;
          k.json = &c;
          cases.push_back(k);
        }
        return cases;
      };
      const std::vector<Case> cases = cases_of(fixture);

      // What a run must show for its case; "" when it does.
      auto mismatch = [&](const Case& k, const Run& r, bool cached, double* worst_p) -> std::string {
        const Json& c = *k.json;
        std::vector<int32_t> answer;
        for (const Json& t : c.find("answer")->items()) answer.push_back(static_cast<int32_t>(t.as_int64()));
        if (r.answer != answer) return "answer differs";
        if ((r.reason == FinishReason::Eos) != c.find("finished_eos")->as_bool()) return "finish reason differs";
        const auto& trace = c.find("trace")->items();
        if (trace.size() != r.trace.size())
          return "denoise steps " + std::to_string(r.trace.size()) + " vs " + std::to_string(trace.size());
        for (size_t st = 0; st < trace.size(); ++st) {
          const auto& want = trace[st].items();
          if (want.size() != r.trace[st].size()) return "step " + std::to_string(st) + " writes a different count";
          for (size_t e = 0; e < want.size(); ++e) {
            const auto& entry = want[e].items();
            const auto& [pos, tok, prob] = r.trace[st][e];
            if (pos != entry[0].as_int64() || tok != entry[1].as_int64())
              return "step " + std::to_string(st) + " writes other positions or tokens";
            *worst_p = std::max(*worst_p, std::fabs(prob - entry[2].as_number()));
          }
        }
        std::vector<int> block_steps;
        int last_block = -1;
        for (const StepOutput& o : r.outputs) {
          if (o.phase != Phase::Denoise) continue;
          if (o.block != last_block) block_steps.push_back(0), last_block = o.block;
          ++block_steps.back();
        }
        std::vector<int> want_steps;
        for (const Json& n : c.find("block_steps")->items()) want_steps.push_back(static_cast<int>(n.as_int64()));
        if (block_steps != want_steps) return "denoise steps per block differ";
        if (r.edits != c.find("edits")->as_int64()) return "edits " + std::to_string(r.edits);
        const Json& f = *c.find("forwards");
        if (cached && (count(r.phases, 'P') != f.find("prefill")->as_int64() ||
                       count(r.phases, 'D') != f.find("denoise")->as_int64() ||
                       count(r.phases, 'C') != f.find("commit")->as_int64() ||
                       r.info.forward_passes != static_cast<int>(r.phases.size())))
          return "forwards per phase differ: " + r.phases;
        if (!cached && r.phases != std::string(f.find("denoise")->as_int64(), 'D'))
          return "uncached phases " + r.phases;
        return "";
      };

      int ok_alone = 0;
      double worst_p = 0.0, worst_logit = 0.0, max_logit = 0.0;
      std::vector<Run> alone;
      for (const Case& k : cases) {
        recorder->record_logits = true;
        recorder->row_logits.clear();
        const Run cached = run_one(engine, k.prompt, k.params);
        const std::vector<std::vector<float>> cached_logits = std::move(recorder->row_logits);
        recorder->row_logits.clear();
        SamplingParams none = k.params;
        none.kv_cache = KVCacheMode::None;
        const Run full = run_one(engine, k.prompt, none);
        recorder->record_logits = false;
        if (cached_logits.size() == recorder->row_logits.size())
          for (size_t f = 0; f < cached_logits.size(); ++f) {
            worst_logit = std::max(worst_logit, max_abs_diff(cached_logits[f], recorder->row_logits[f]));
            max_logit = std::max(max_logit, max_abs(cached_logits[f]));
          }
        else worst_logit = INFINITY;
        const std::string a = mismatch(k, cached, true, &worst_p), b = mismatch(k, full, false, &worst_p);
        const bool ok = a.empty() && b.empty() && cached.same_denoising(full);
        ok_alone += ok;
        if (!ok)
          report(false, label + " case " + k.name,
                 (a.empty() ? "" : "cached: " + a + "; ") + (b.empty() ? "" : "no cache: " + b + "; ") +
                     (cached.same_denoising(full) ? "" : "cached != full recompute"));
        alone.push_back(cached);
      }
      report(ok_alone == static_cast<int>(cases.size()) && worst_p <= 1e-4 && worst_logit <= 1e-4 * max_logit,
             label + ": every case token for token, alone, cached and full recompute",
             std::to_string(ok_alone) + " of " + std::to_string(cases.size()) +
                 fmt(" cases; largest probability difference to the reference %.2g; largest logit difference cached "
                     "vs full recompute %.3g (max |logit| %.3g)",
                     worst_p, worst_logit, max_logit));

      // With a prefix cache: every case twice; the second time its whole prompt blocks are copied, and every
      // run denoises as the case alone (the reference's tokens).
      {
        Engine prefixed(loaded, {.prefix_cache_bytes = uint64_t{64} << 20});
        int same = 0, copied = 0, whole_blocks = 0;
        for (int round = 0; round < 2; ++round)
          for (size_t i = 0; i < cases.size(); ++i) {
            const Run r = run_one(prefixed, cases[i].prompt, cases[i].params);
            same += r.same_denoising(alone[i]) && mismatch(cases[i], r, false, &worst_p) != "answer differs";
            if (round == 1) {
              copied += r.info.prompt_cached ==
                            static_cast<int>(cases[i].prompt.size()) / config.block_length * config.block_length &&
                        r.info.prompt_cached > 0;
              whole_blocks += static_cast<int>(cases[i].prompt.size()) >= config.block_length;
            }
          }
        report(same == 2 * static_cast<int>(cases.size()) && copied == whole_blocks && whole_blocks > 0,
               label + ": with a prefix cache, every case as alone; run again, its whole prompt blocks are copied",
               std::to_string(same) + " of " + std::to_string(2 * cases.size()) + " runs; " + std::to_string(copied) +
                   " of " + std::to_string(whole_blocks) + " prompts with a whole block copied it");
      }

      for (const Json& batch : fixture.find("batches")->items()) {
        std::vector<size_t> members;
        std::vector<uint64_t> ids;
        for (const Json& i : batch.items()) members.push_back(static_cast<size_t>(i.as_int64()));
        for (size_t m : members) ids.push_back(engine.create(cases[m].prompt, cases[m].params));
        const std::vector<Run> together = run_all(engine, ids);
        int same = 0;
        double worst = 0.0;
        std::string names;
        for (size_t j = 0; j < members.size(); ++j) {
          same += together[j] == alone[members[j]] && mismatch(cases[members[j]], together[j], true, &worst).empty();
          names += (j ? " " : "") + cases[members[j]].name;
          engine.release(ids[j]);
        }
        report(same == static_cast<int>(members.size()),
               label + ": the fixture's batch gives each case what it gets alone",
               std::to_string(same) + " of " + std::to_string(members.size()) + " (" + names + ")");
      }

      // Templates (structured output's skeleton; tools/reference/make_block_template_fixtures.py): each case
      // token for token against the reference, cached and full recompute, with the same forwards per phase.
      if (name != std::string("sdar_moe")) {
        std::ifstream tin(fs::path(dir) / (name + std::string("-template.json")));
        if (!tin) {
          report(false, label + " templates", "no fixture " + name + "-template.json");
        } else {
          std::stringstream ts;
          ts << tin.rdbuf();
          const Json tfixture = Json::parse(ts.str());
          const std::vector<Case> tcases = cases_of(tfixture);
          int ok = 0;
          double worst = 0.0;
          for (const Case& k : tcases) {
            const Run cached = run_one(engine, k.prompt, k.params, k.tmpl);
            SamplingParams none = k.params;
            none.kv_cache = KVCacheMode::None;
            const Run full = run_one(engine, k.prompt, none, k.tmpl);
            const std::string a = mismatch(k, cached, true, &worst), b = mismatch(k, full, false, &worst);
            const bool same = a.empty() && b.empty() && cached.same_denoising(full);
            ok += same;
            if (!same) report(false, label + " template case " + k.name, "cached: " + a + "; no cache: " + b);
          }
          report(ok == static_cast<int>(tcases.size()) && !tcases.empty() && worst <= 1e-4,
                 label + ": template cases token for token against the reference, cached and full recompute",
                 std::to_string(ok) + " of " + std::to_string(tcases.size()) +
                     fmt(" cases; largest probability difference %.2g", worst));
        }
      }
    } catch (const std::exception& e) {
      report(false, label, e.what());
    }
  }
}

// Prefix caching across sequences (prefix_cache.h): what a later sequence copies, what it computes, and that
// its answer is the one it gets with no prefix cache at all, token for token and probability for probability.
void test_block_prefix_cache() {
  BlockFixture fixture(78, 11);
  auto& [tmp, spec, inner, base, model, rng] = fixture;
  const int B = BlockFixture::B;
  auto prompt_of = [&](int n) { return fixture.prompt_of(n); };
  const uint64_t per_position = inner->kv_cache_bytes(1);
  Engine cached(model, {.prefix_cache_bytes = 64 * per_position});
  Engine plain(model);
  const SamplingParams params = block_params(10, B, 4, KVCacheMode::Prefix);
  auto plain_run = [&](const std::vector<int32_t>& prompt) { return run_one(plain, prompt, params); };
  auto cached_run = [&](const std::vector<int32_t>& prompt, std::string& calls) {
    model->calls.clear();
    Run r = run_one(cached, prompt, params);
    calls = joined(model->calls);
    return r;
  };
  std::string calls;

  // Prompt A: 10 tokens (two whole blocks and a tail of 2), canvas 20.
  const std::vector<int32_t> a = prompt_of(10);
  const Run first = cached_run(a, calls);
  PrefixCacheStats st = cached.prefix_cache_stats();
  report(first == plain_run(a) && first.outputs.back().prompt_cached == 0 && calls.substr(0, 4) == "0-8c" &&
             st.lookups == 1 && st.hits == 0 && st.inserts == 2 && st.entries == 1 &&
             st.bytes == inner->kv_cache_bytes(16),
         "prefix cache, first sequence: prefills [0, 8) and keeps it, then its exact prefix [0, 16) (prompt and "
         "committed blocks) in its place when it finishes; its run is the plain engine's",
         calls + fmt(" | %g entries, %g bytes", st.entries, static_cast<double>(st.bytes)));

  // The same prompt again: its two whole blocks are copied, no prefill.
  const Run again = cached_run(a, calls);
  st = cached.prefix_cache_stats();
  report(again.same_denoising(first) && again.phases.find('P') == std::string::npos && calls.substr(0, 5) == "8-12c" &&
             again.outputs.front().prompt_cached == 8 && again.info.prompt_cached == 8 &&
             again.info.positions_computed == first.info.positions_computed - 8 && st.hits == 1 &&
             st.hit_positions == 8,
         "prefix cache, the same prompt: [0, 8) copied, no prefill, the same tokens and probabilities",
         again.phases + ": " + calls);

  // A prompt sharing only the first block: [0, 4) copied, the prefill computes [4, 12).
  std::vector<int32_t> b(a.begin(), a.begin() + 4);
  for (int32_t t : prompt_of(10)) b.push_back(t);
  const Run shared = cached_run(b, calls);
  report(shared.same_denoising(plain_run(b)) && shared.phases[0] == 'P' && calls.substr(0, 5) == "4-12c" &&
             shared.info.prompt_cached == 4,
         "prefix cache, one shared block: [0, 4) copied, the prefill computes the rest, the plain engine's answer",
         calls.substr(0, 20));

  // The next turn: A, its answer's committed blocks and more; the finished sequence left [0, 16).
  std::vector<int32_t> turn(a);
  for (int i = 0; i < 6; ++i) turn.push_back(first.answer[i]);
  for (int32_t t : prompt_of(5)) turn.push_back(t);
  const Run next = cached_run(turn, calls);
  report(next.same_denoising(plain_run(turn)) && next.info.prompt_cached == 16 && calls.substr(0, 6) == "16-20c",
         "prefix cache, the next turn: the prompt and answer blocks of the last one copied (16 positions)", calls);

  // copy_kv's checks.
  {
    std::unique_ptr<KVCache> from = inner->make_kv_cache(12), to = inner->make_kv_cache(8);
    expect_error("copy_kv refuses positions the source has not cached", ErrorCode::InvalidArgument, {"cached to 0"},
                 [&] { inner->copy_kv(*from, *to, 4); });
    from->set_cached_until(12);
    expect_error("copy_kv refuses more positions than the target holds", ErrorCode::InvalidArgument,
                 {"12 positions", "one of 8"}, [&] { inner->copy_kv(*from, *to, 12); });
    std::shared_ptr<Backend> other = Backend::load((tmp.path / "tiny").string(), test_options(1));
    std::unique_ptr<KVCache> foreign = other->make_kv_cache(8);
    expect_error("copy_kv refuses a cache of another backend", ErrorCode::InvalidArgument, {"another backend"},
                 [&] { inner->copy_kv(*from, *foreign, 4); });
    inner->copy_kv(*from, *to, 8);
    report(to->cached_until() == 8, "copy_kv marks the copied positions cached");
  }

  // Not a block model, or no capacity: no prefix cache.
  report(plain.prefix_cache_stats().capacity_bytes == 0 && plain_run(a).info.prompt_cached == 0,
         "prefix cache: none without capacity");

  // Capacity: room for one entry of 16 positions; a second prompt's evicts the first.
  {
    Engine small(model, {.prefix_cache_bytes = inner->kv_cache_bytes(16)});
    run_one(small, a, params);
    const std::vector<int32_t> c = prompt_of(10);
    run_one(small, c, params);
    const PrefixCacheStats s = small.prefix_cache_stats();
    const Run back = run_one(small, a, params);
    report(s.entries == 1 && s.evictions == 1 && s.bytes <= s.capacity_bytes && back.info.prompt_cached == 0 &&
               back.same_denoising(first),
           "prefix cache capacity: the least recently used entry makes room",
           fmt("%g entries, %g evictions", s.entries, static_cast<double>(s.evictions)));
  }

  // The KV budget: entries give way to a sequence's cache; a sequence never gives way to an entry.
  {
    LoadOptions options = test_options(2);
    options.kv_cache_budget_bytes = inner->kv_cache_bytes(20);  // one canvas of 20 positions
    std::shared_ptr<Backend> tight = Backend::load((tmp.path / "tiny").string(), options);
    auto tight_model = std::make_shared<BlockModel>(tight, base);
    Engine engine(tight_model, {.prefix_cache_bytes = 64 * per_position});
    const uint64_t id = engine.create(a, params);
    const Run alone = run_all(engine, {id})[0];
    engine.release(id);
    const PrefixCacheStats full = engine.prefix_cache_stats();  // the live sequence held the whole budget
    const Run after = run_one(engine, a, params);               // and now nothing holds it
    const PrefixCacheStats later = engine.prefix_cache_stats();
    const uint64_t id2 = engine.create(prompt_of(10), params);  // needs the budget the entry holds
    const PrefixCacheStats reclaimed = engine.prefix_cache_stats();
    engine.release(id2);
    report(alone.same_denoising(first) && full.entries == 0 && full.inserts == 0 && after.same_denoising(first) &&
               later.entries == 0 && reclaimed.entries == 0 && tight->kv_cache_live_bytes() == 0,
           "prefix cache under a full KV budget: nothing kept while sequences hold it, no sequence refused",
           fmt("%g entries after the first run, %g inserts", full.entries, static_cast<double>(full.inserts)));
    // A budget with room for an entry beside a sequence: the entry goes when a second sequence needs it.
    LoadOptions roomy = options;
    roomy.kv_cache_budget_bytes = inner->kv_cache_bytes(20) + inner->kv_cache_bytes(16);
    std::shared_ptr<Backend> two = Backend::load((tmp.path / "tiny").string(), roomy);
    Engine engine2(std::make_shared<BlockModel>(two, base), {.prefix_cache_bytes = 64 * per_position});
    run_one(engine2, a, params);
    const PrefixCacheStats held = engine2.prefix_cache_stats();
    const uint64_t s1 = engine2.create(prompt_of(10), params);
    const uint64_t s2 = engine2.create(prompt_of(3), block_params(1, B, 1, KVCacheMode::Prefix));  // 4 positions
    const PrefixCacheStats given = engine2.prefix_cache_stats();
    report(held.entries == 1 && given.entries == 0 && given.evictions == 1,
           "prefix cache: an entry gives its budget to a new sequence (reclaimed, not refused)",
           fmt("%g entries held, %g after", held.entries, given.entries) + fmt(" (%g bytes held, %g evictions)",
                                                                               static_cast<double>(held.bytes),
                                                                               static_cast<double>(given.evictions)));
    engine2.release(s1);
    engine2.release(s2);

    // Room that takes two evictions: the budget is checked again after each (never exceeded).
    LoadOptions two_entries = options;
    two_entries.kv_cache_budget_bytes = inner->kv_cache_bytes(36);
    std::shared_ptr<Backend> three = Backend::load((tmp.path / "tiny").string(), two_entries);
    Engine engine3(std::make_shared<BlockModel>(three, base), {.prefix_cache_bytes = 64 * per_position});
    run_one(engine3, prompt_of(10), block_params(2, B, 2, KVCacheMode::Prefix));  // keeps [0, 8)
    run_one(engine3, prompt_of(10), block_params(2, B, 2, KVCacheMode::Prefix));  // keeps another [0, 8)
    const PrefixCacheStats two_held = engine3.prefix_cache_stats();
    const uint64_t wide = engine3.create(prompt_of(10), block_params(22, B, 4, KVCacheMode::Prefix));  // 32 positions
    const PrefixCacheStats after_wide = engine3.prefix_cache_stats();
    report(two_held.entries == 2 && after_wide.entries == 0 && after_wide.evictions == 2 &&
               three->kv_cache_live_bytes() == inner->kv_cache_bytes(32) &&
               three->kv_cache_live_bytes() <= three->kv_cache_budget_bytes(),
           "prefix cache: a sequence needing two entries' room evicts both, the budget never exceeded",
           fmt("%g entries before, %g evictions; live %g bytes", two_held.entries,
               static_cast<double>(after_wide.evictions), static_cast<double>(three->kv_cache_live_bytes())));
    engine3.release(wide);

    // An insert the budget cannot hold even without the entries drops none of them.
    LoadOptions snug = options;
    snug.kv_cache_budget_bytes = inner->kv_cache_bytes(8 + 16 + 16);
    std::shared_ptr<Backend> four = Backend::load((tmp.path / "tiny").string(), snug);
    Engine engine4(std::make_shared<BlockModel>(four, base), {.prefix_cache_bytes = 64 * per_position});
    run_one(engine4, prompt_of(10), block_params(2, B, 2, KVCacheMode::Prefix));                      // keeps [0, 8)
    const uint64_t idle = engine4.create(prompt_of(3), block_params(13, B, 4, KVCacheMode::Prefix));  // 16 positions
    const Run blocked = run_one(engine4, prompt_of(14), block_params(2, B, 2, KVCacheMode::Prefix));  // 16; keep 12
    const PrefixCacheStats kept = engine4.prefix_cache_stats();
    report(blocked.reason == FinishReason::Length && kept.entries == 1 && kept.inserts == 1 && kept.evictions == 0,
           "prefix cache: an insert that cannot fit the budget even alone leaves the entries as they are",
           fmt("%g entries, %g inserts, %g evictions", kept.entries, static_cast<double>(kept.inserts),
               static_cast<double>(kept.evictions)));
    engine4.release(idle);
  }
}

// Chunked prefill (EngineOptions::prefill_chunk): the prompt's whole blocks in forwards of whole blocks, one
// per step, beside the other sequences' steps; the answers are those of one prefill forward.
void test_block_prefill_chunks() {
  BlockFixture fixture(79, 12);
  auto& [tmp, spec, inner, base, model, rng] = fixture;
  const int B = BlockFixture::B;
  auto prompt_of = [&](int n) { return fixture.prompt_of(n); };
  Engine whole(model);
  const SamplingParams params = block_params(8, B, 4, KVCacheMode::Prefix);
  const std::vector<int32_t> long_prompt = prompt_of(14), short_prompt = prompt_of(3);  // 3 whole blocks; none
  const Run alone = run_one(whole, long_prompt, params), short_alone = run_one(whole, short_prompt, params);

  for (const auto& [chunk, calls_expected] :
       std::vector<std::pair<int, std::string>>{{5, "0-4c 4-8c 8-12c 12-16c"}, {8, "0-8c 8-12c 12-16c"}}) {
    Engine chunked(model, {.prefill_chunk = chunk});
    model->calls.clear();
    const Run r = run_one(chunked, long_prompt, params);
    const std::string calls = joined(model->calls);
    const int prefills = count(r.phases, 'P');
    report(r.same_denoising(alone) && calls.substr(0, calls_expected.size()) == calls_expected &&
               prefills == (chunk == 5 ? 3 : 2) && r.info.positions_computed == alone.info.positions_computed &&
               r.info.forward_passes == alone.info.forward_passes + prefills - 1,
           "block prefill in chunks of " + std::to_string(chunk) + " (whole blocks of 4): the same answer, " +
               std::to_string(prefills) + " prefill forwards",
           r.phases + ": " + calls.substr(0, 40));
  }

  // Beside a sequence that is denoising: it steps while the long prompt prefills, both as alone.
  {
    Engine chunked(model, {.prefill_chunk = 4});
    const uint64_t a = chunked.create(long_prompt, params), b = chunked.create(short_prompt, params);
    const std::vector<Run> together = run_all(chunked, {a, b});
    report(together[0].same_denoising(alone) && together[1].same_denoising(short_alone) &&
               together[0].phases.substr(0, 3) == "PPP" && together[1].phases == short_alone.phases,
           "block prefill in chunks beside a denoising sequence: it takes its steps meanwhile; both as alone",
           together[0].phases + " | " + together[1].phases);
    chunked.release(a);
    chunked.release(b);
  }

  // With the prefix cache: the copied blocks, then the rest in chunks.
  {
    Engine both(model, {.prefix_cache_bytes = 64 * inner->kv_cache_bytes(1), .prefill_chunk = 4});
    std::vector<int32_t> first(long_prompt.begin(), long_prompt.begin() + 5);  // the first block and one more
    run_one(both, first, params);
    model->calls.clear();
    const Run r = run_one(both, long_prompt, params);
    report(
        r.same_denoising(alone) && r.info.prompt_cached == 4 && joined(model->calls).substr(0, 14) == "4-8c 8-12c 12-",
        "block prefill in chunks after a prefix-cache hit: [0, 4) copied, then [4, 8) and [8, 12)",
        joined(model->calls).substr(0, 30));
  }
  // Sequences stepped together with the same prompt (n > 1, or a burst of one system prompt): one prefills,
  // the others wait for its blocks in steps without a forward and copy them.
  for (const int chunk : {0, 4}) {
    Engine shared(model, {.prefix_cache_bytes = 64 * inner->kv_cache_bytes(1), .prefill_chunk = chunk});
    const uint64_t a = shared.create(long_prompt, params), b = shared.create(long_prompt, params),
                   c = shared.create(long_prompt, params);
    model->calls.clear();
    const std::vector<Run> runs = run_all(shared, {a, b, c});
    const std::string calls = joined(model->calls);
    const std::string label = chunk == 0 ? "one forward" : "chunks of 4";
    const std::string waits = chunk == 0 ? "P" : "PPP";
    report(runs[0].same_denoising(alone) && runs[1].same_denoising(alone) && runs[2].same_denoising(alone) &&
               runs[0].info.prompt_cached == 0 && runs[1].info.prompt_cached == 12 &&
               runs[2].info.prompt_cached == 12 && runs[1].phases.substr(0, waits.size() + 1) == waits + "D" &&
               runs[1].info.forward_passes == alone.info.forward_passes - 1 &&
               std::count(calls.begin(), calls.end(), 'c') ==
                   static_cast<long>(3 * (alone.info.forward_passes - 1) + waits.size()),
           "block prefill shared by 3 sequences with one prompt (" + label +
               "): one computes it, the others wait without a forward and copy it; all as alone",
           runs[1].phases + fmt(" | copied %g, %g forwards", runs[1].info.prompt_cached, runs[1].info.forward_passes));
    shared.release(a);
    shared.release(b);
    shared.release(c);
  }
  // A short prompt that shares only the first block of a long one being prefilled in chunks does not wait:
  // the other has more left to compute than it has.
  {
    Engine shared(model, {.prefix_cache_bytes = 64 * inner->kv_cache_bytes(1), .prefill_chunk = 4});
    const std::vector<int32_t> short_shared(long_prompt.begin(), long_prompt.begin() + 6);  // one whole block
    const Run short_run = run_one(whole, short_shared, params);
    const uint64_t a = shared.create(long_prompt, params), b = shared.create(short_shared, params);
    const std::vector<Run> runs = run_all(shared, {a, b});
    report(runs[1].same_denoising(short_run) && runs[1].info.forward_passes == short_run.info.forward_passes &&
               runs[1].info.prompt_cached == 0 && runs[0].same_denoising(alone),
           "block prefill: a sequence sharing one block with a longer prefill under way computes its own",
           runs[1].phases);
    shared.release(a);
    shared.release(b);
  }
  // The one prefilling goes away: the one waiting prefills for itself.
  {
    Engine shared(model, {.prefix_cache_bytes = 64 * inner->kv_cache_bytes(1), .prefill_chunk = 4});
    const uint64_t a = shared.create(long_prompt, params), b = shared.create(long_prompt, params);
    const std::vector<StepOutput> first = shared.step({a, b});
    shared.release(a);
    model->calls.clear();
    const Run rest = run_all(shared, {b})[0];
    report(first[1].phase == Phase::Prefill && first[1].forward_passes == 0 && rest.same_denoising(alone) &&
               rest.info.prompt_cached == 0 && joined(model->calls).substr(0, 14) == "0-4c 4-8c 8-12",
           "block prefill: a sequence waiting for a released one's prefill computes its own",
           joined(model->calls).substr(0, 30));
    shared.release(b);
  }
  expect_error("engine refuses a negative prefill_chunk", ErrorCode::InvalidArgument, {"prefill_chunk"},
               [&] { Engine bad(model, {.prefill_chunk = -1}); });
}

void test_block(const std::string& golden_block_dir) {
  test_block_schedule();
  test_block_engine();
  test_block_prefix_cache();
  test_block_prefill_chunks();
  test_block_golden(golden_block_dir);
}

}  // namespace vdiff::test
