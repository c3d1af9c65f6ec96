// The PyTorch golden fixtures (test/fixtures/golden): the forward token for token, and the engine's
// cache modes on the golden cases.
#include "tests/model_fixtures.h"

namespace vdiff::test {

// A model that forwards to another and records what each forward computed; it can also set the cancel
// flag once a forward is done (the engine then cancels the step after the cache was written).
class RecordingModel final : public ForwardingBackend {
 public:
  explicit RecordingModel(std::shared_ptr<Backend> inner) : ForwardingBackend(inner, inner->config()) {}
  void forward(const std::vector<ForwardSeq>& batch, float* logits, const std::atomic<bool>* cancel) override {
    for (const ForwardSeq& s : batch)
      calls.push_back(std::to_string(s.compute_begin) + "-" +
                      std::to_string(s.compute_end == -1 ? s.length : s.compute_end) + (s.cache ? "c" : ""));
    inner_->forward(batch, logits, cancel);
    if (cancel_after) cancel_after->store(true), cancel_after = nullptr;
  }
  std::vector<std::string> calls;  // "begin-end" per sequence per forward, "c" when it had a cache
  std::atomic<bool>* cancel_after = nullptr;
};

// Every step of one sequence: committed tokens and their probabilities, flattened.
struct Trace {
  std::vector<int32_t> answer;
  std::vector<float> probabilities;
  int steps = 0;
  bool operator==(const Trace& o) const {
    return answer == o.answer && probabilities == o.probabilities && steps == o.steps;
  }
};

// Runs the given sequences to the end, all in one batch per step.
std::vector<Trace> run_engine(Engine& engine, const std::vector<uint64_t>& ids) {
  std::vector<Trace> traces(ids.size());
  std::vector<uint64_t> running = ids;
  for (int guard = 0; !running.empty() && guard < 10000; ++guard) {
    std::vector<uint64_t> next;
    for (const StepOutput& out : engine.step(running)) {
      Trace& t = traces[std::find(ids.begin(), ids.end(), out.id) - ids.begin()];
      for (const CommittedToken& c : out.committed) t.probabilities.push_back(c.probability);
      ++t.steps;
      if (!out.finished) next.push_back(out.id);
    }
    running = next;
  }
  for (size_t i = 0; i < ids.size(); ++i) traces[i].answer = engine.canvas(ids[i]);
  return traces;
}

// The engine's cache modes: a refresh every step is the uncached output exactly (on the golden cases);
// the default schedule refreshes once per block and computes what each mode says; caches are accounted,
// bounded and freed; a mixed batch equals each alone; a cancelled step retried changes nothing.
void test_engine_kv_cache(const std::string& golden_dir) {
  for (const std::string name : {"plain", "gqa", "odd"}) {
    try {
      std::ifstream in(fs::path(golden_dir) / (name + ".json"));
      std::stringstream ss;
      ss << in.rdbuf();
      Json fixture = Json::parse(ss.str());
      Engine engine(Backend::load((fs::path(golden_dir) / name).string(), test_options(2)));
      int cases = 0, same = 0, reference = 0;
      for (const Json& c : fixture.find("generate")->items()) {
        std::vector<int32_t> prompt, answer;
        for (const Json& t : c.find("prompt")->items()) prompt.push_back(static_cast<int32_t>(t.as_int64()));
        for (const Json& t : c.find("answer")->items()) answer.push_back(static_cast<int32_t>(t.as_int64()));
        SamplingParams none = golden_params(*c.find("params"));
        std::vector<uint64_t> ids = {engine.create(prompt, none)};
        for (KVCacheMode mode : {KVCacheMode::Prefix, KVCacheMode::Dual}) {
          SamplingParams p = none;
          p.kv_cache = mode;
          p.kv_refresh_interval = 1;
          ids.push_back(engine.create(prompt, p));
        }
        std::vector<Trace> t = run_engine(engine, ids);  // the three in one batch
        ++cases;
        same += t[1] == t[0] && t[2] == t[0];
        reference += t[0].answer == answer;
        for (uint64_t id : ids) engine.release(id);
      }
      report(cases > 0 && same == cases && reference == cases,
             "engine kv cache: golden " + name + ": prefix and dual refreshed every step equal no cache exactly",
             std::to_string(same) + " of " + std::to_string(cases) + " cases equal, " + std::to_string(reference) +
                 " equal the reference answer");
    } catch (const std::exception& e) {
      report(false, "engine kv cache: golden " + name, e.what());
    }
  }

  TempDir tmp;
  TinySpec spec;
  write_tiny(tmp.path / "tiny", make_tiny(spec, WType::F32, 33));
  const std::string dir = (tmp.path / "tiny").string();
  std::mt19937 rng(5);
  auto prompt_of = [&](int n) {
    std::vector<int32_t> p = random_tokens(rng, n, spec.vocab - 2);  // no mask, no EOS
    return p;
  };
  auto params_of = [](KVCacheMode mode, int gen, int block, int steps, double cfg = 0.0) {
    SamplingParams p;
    p.gen_length = gen, p.block_length = block, p.steps = steps, p.cfg_scale = cfg, p.kv_cache = mode;
    return p;
  };

  // What each mode computes, step by step: prompt 5, 3 blocks of 4, 2 steps each, a suffix of 2 (L = 19).
  {
    auto recorder = std::make_shared<RecordingModel>(Backend::load(dir, test_options(2)));
    Engine engine(recorder);
    const std::vector<int32_t> prompt = prompt_of(5), suffix = {1, 2};
    auto calls_of = [&](KVCacheMode mode) {
      recorder->calls.clear();
      uint64_t id = engine.create(prompt, params_of(mode, 12, 4, 6), suffix);
      std::vector<Trace> t = run_engine(engine, {id});
      SequenceInfo info = engine.info(id);
      engine.release(id);
      std::string joined;
      for (const std::string& c : recorder->calls) joined += (joined.empty() ? "" : " ") + c;
      return joined + " / " + std::to_string(info.forward_passes) + " forwards, " + std::to_string(info.kv_refreshes) +
             " refreshes";
    };
    const std::string none = calls_of(KVCacheMode::None), prefix = calls_of(KVCacheMode::Prefix),
                      dual = calls_of(KVCacheMode::Dual);
    report(none == "0-19 0-19 0-19 0-19 0-19 0-19 / 6 forwards, 0 refreshes",
           "engine kv cache: none computes the whole canvas", none);
    report(prefix == "0-19c 5-19c 0-19c 9-19c 0-19c 13-19c / 6 forwards, 3 refreshes",
           "engine kv cache: prefix refreshes at each block start, then computes block + rest", prefix);
    report(dual == "0-19c 5-9c 0-19c 9-13c 0-19c 13-17c / 6 forwards, 3 refreshes",
           "engine kv cache: dual refreshes at each block start, then computes the block only", dual);
    SamplingParams every2 = params_of(KVCacheMode::Dual, 8, 8, 8);
    every2.kv_refresh_interval = 3;
    recorder->calls.clear();
    uint64_t id = engine.create(prompt, every2);
    run_engine(engine, {id});
    engine.release(id);
    std::string joined;
    for (const std::string& c : recorder->calls) joined += (joined.empty() ? "" : " ") + c;
    report(joined == "0-13c 5-13c 5-13c 0-13c 5-13c 5-13c 0-13c 5-13c",
           "engine kv cache: kv_refresh_interval 3 refreshes at steps 0, 3, 6 of a block", joined);

    // A step cancelled after its forward wrote the cache, retried, gives what an uncancelled run gives:
    // once on a refresh step and once on a read step.
    for (int cancel_at : {2, 3}) {
      uint64_t plain = engine.create(prompt, params_of(KVCacheMode::Dual, 12, 4, 6));
      const Trace want = run_engine(engine, {plain})[0];
      engine.release(plain);
      uint64_t seq = engine.create(prompt, params_of(KVCacheMode::Dual, 12, 4, 6));
      Trace got;
      std::atomic<bool> cancel{false};
      bool cancelled = false;
      for (int step = 0, guard = 0; guard < 100; ++guard) {
        if (step == cancel_at && !cancelled) recorder->cancel_after = &cancel;
        try {
          StepOutput out = engine.step({seq}, &cancel).at(0);
          for (const CommittedToken& c : out.committed) got.probabilities.push_back(c.probability);
          ++got.steps, ++step;
          if (out.finished) break;
        } catch (const Error& e) {
          cancelled = e.code() == ErrorCode::Cancelled;
          cancel.store(false);
        }
      }
      got.answer = engine.canvas(seq);
      engine.release(seq);
      report(cancelled && got == want, "engine kv cache: a step cancelled after its forward (" +
                                           std::string(cancel_at == 2 ? "a refresh" : "a read") +
                                           "), retried, changes nothing");
    }
  }

  // A mixed batch (no cache, prefix, dual, dual with cfg; prompts of different lengths, different block
  // sizes) gives each sequence what it gets alone.
  {
    Engine engine(Backend::load(dir, test_options(2)));
    struct Spec {
      std::vector<int32_t> prompt;
      SamplingParams params;
    };
    std::vector<Spec> specs = {{prompt_of(3), params_of(KVCacheMode::None, 16, 4, 8)},
                               {prompt_of(11), params_of(KVCacheMode::Prefix, 12, 6, 12)},
                               {prompt_of(7), params_of(KVCacheMode::Dual, 20, 5, 8)},
                               {prompt_of(4), params_of(KVCacheMode::Dual, 8, 4, 8, 1.5)},
                               {prompt_of(9), params_of(KVCacheMode::Prefix, 9, 3, 9, 0.5)}};
    for (size_t i = 0; i < specs.size(); ++i) specs[i].params.seed = i, specs[i].params.temperature = i % 2 ? 0.7 : 0.0;
    std::vector<uint64_t> ids;
    for (const Spec& s : specs) ids.push_back(engine.create(s.prompt, s.params));
    const std::vector<Trace> together = run_engine(engine, ids);
    bool ok = true;
    for (size_t i = 0; i < specs.size(); ++i) {
      uint64_t id = engine.create(specs[i].prompt, specs[i].params);
      ok = ok && run_engine(engine, {id})[0] == together[i];
      engine.release(id);
    }
    bool differs = !(together[2].answer == run_engine(engine, {engine.create(specs[2].prompt,
                                                                             [&] {
                                                                               SamplingParams p = specs[2].params;
                                                                               p.kv_cache = KVCacheMode::None;
                                                                               return p;
                                                                             }())})[0]
                                               .answer);
    report(
        ok,
        "engine kv cache: a batch mixing none / prefix / dual / cfg, different lengths and blocks, equals each alone",
        std::string("(dual ") + (differs ? "differs from" : "equals") + " no cache on this tiny random model)");
  }

  // Memory: reported per sequence, freed when it finishes, bounded by the model's budget.
  {
    LoadOptions options = test_options(1);
    auto probe = Backend::load(dir, options);
    const uint64_t per_seq = probe->kv_cache_bytes(5 + 16);
    options.kv_cache_budget_bytes = 3 * per_seq;
    std::shared_ptr<Backend> model = Backend::load(dir, options);
    Engine engine(model);
    const std::vector<int32_t> prompt = prompt_of(5);
    uint64_t a = engine.create(prompt, params_of(KVCacheMode::Prefix, 16, 4, 4));
    uint64_t b = engine.create(prompt, params_of(KVCacheMode::Dual, 16, 4, 4, 1.0));  // cfg: two caches
    uint64_t c = engine.create(prompt, params_of(KVCacheMode::None, 16, 4, 4));
    SequenceInfo ia = engine.info(a), ib = engine.info(b), ic = engine.info(c);
    report(ia.kv_cache_bytes == per_seq && ib.kv_cache_bytes == 2 * per_seq && ic.kv_cache_bytes == 0 &&
               ia.memory_bytes >= per_seq && model->kv_cache_live_bytes() == 3 * per_seq,
           "engine kv cache: bytes per sequence reported (x2 with cfg) and accounted",
           std::to_string(per_seq) + " bytes per cache");
    expect_error("engine kv cache: create beyond the budget held by live caches", ErrorCode::OutOfMemory,
                 {"budget exhausted"}, [&] { engine.create(prompt, params_of(KVCacheMode::Dual, 16, 4, 4)); });
    expect_error("engine kv cache: a cache larger than the whole budget", ErrorCode::InvalidArgument,
                 {"whole cache budget"}, [&] { engine.create(prompt_of(60), params_of(KVCacheMode::Dual, 16, 4, 4)); });
    run_engine(engine, {a});
    report(engine.info(a).kv_cache_bytes == 0 && model->kv_cache_live_bytes() == 2 * per_seq,
           "engine kv cache: a finished sequence's cache is freed before release");
    engine.release(b);
    report(model->kv_cache_live_bytes() == 0, "engine kv cache: release frees the caches");
    expect_error("engine kv cache: negative kv_refresh_interval", ErrorCode::InvalidArgument, {"kv_refresh_interval"},
                 [&] {
                   SamplingParams p = params_of(KVCacheMode::Dual, 16, 4, 4);
                   p.kv_refresh_interval = -1;
                   engine.create(prompt, p);
                 });
  }
}

// The PyTorch reference's fixtures: logits of every position of a few sequences per model.
void test_golden(const std::string& golden_dir) {
  if (!fs::is_directory(golden_dir)) {
    report(false, "golden fixtures", "directory " + golden_dir + " not found");
    return;
  }
  std::vector<fs::path> cases;
  for (const auto& entry : fs::directory_iterator(golden_dir))
    if (entry.path().extension() == ".json" && fs::is_directory(entry.path().parent_path() / entry.path().stem()))
      cases.push_back(entry.path());
  std::sort(cases.begin(), cases.end());
  if (cases.empty()) report(false, "golden fixtures", "no <name>.json with a <name>/ model directory in " + golden_dir);
  for (const fs::path& json_path : cases) {
    const std::string name = json_path.stem().string();
    try {
      std::ifstream in(json_path);
      std::stringstream ss;
      ss << in.rdbuf();
      Json fixture = Json::parse(ss.str());
      auto model = Backend::load((json_path.parent_path() / name).string(), test_options(2));
      const int E = model->config().embedding_size;
      double scale = 0;
      std::vector<double> row_worst;  // per position of every sequence: its largest |diff|
      size_t n_seqs = 0;
      for (const Json& f : fixture.find("forward")->items()) {
        std::vector<int32_t> tokens;
        for (const Json& t : f.find("tokens")->items()) tokens.push_back(static_cast<int32_t>(t.as_int64()));
        std::vector<float> got = run_forward(*model, {tokens}, {all_rows(tokens.size())});
        const Json& logits = *f.find("logits");
        for (size_t t = 0; t < tokens.size(); ++t) {
          double w = 0;
          for (int e = 0; e < E; ++e) {
            double want = logits[t][e].as_number();
            w = std::max(w, std::fabs(got[t * E + e] - want));
            scale = std::max(scale, std::fabs(want));
          }
          row_worst.push_back(w);
        }
        ++n_seqs;
      }
      LogitErrors errors;
      errors.scale = scale;
      for (double w : row_worst) errors.worst = std::max(errors.worst, w);
      if (!row_worst.empty()) {
        std::nth_element(row_worst.begin(), row_worst.begin() + row_worst.size() / 2, row_worst.end());
        errors.median_row = row_worst[row_worst.size() / 2];
      }
      // Fixture floats carry 6 significant digits, i.e. up to 5e-6 relative rounding of their own; the
      // README suggests 1e-4 * max|logit|; a bf16 model's activations are rounded to bf16 on both sides
      // (logits_within, model_fixtures.h).
      const WType weights = model->weight_dtype() == "bf16" ? WType::BF16 : WType::F32;
      report(n_seqs > 0 && logits_within(errors, weights, 1e-4),
             "golden " + name + " (" + model->weight_dtype() + ", " + std::to_string(n_seqs) + " sequences): logits " +
                 logit_bound_text(weights, 1e-4),
             logit_errors_text(errors));
    } catch (const std::exception& e) {
      report(false, "golden " + name, e.what());
    }
  }
}

}  // namespace vdiff::test
