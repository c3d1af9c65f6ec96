// Approximate KV caching in Model::forward against the float64 reference.
#include "tests/model_fixtures.h"

namespace vdiff::test {

// Approximate KV caching (ForwardSeq::cache): exact where it must be, the stale-key semantics where it is
// approximate (against the float64 reference), ragged batches, and the errors and the memory budget.
void test_kv_cache() {
  TempDir tmp;
  std::mt19937 rng(11);
  TinySpec spec;  // 4 query heads over 2 kv heads: the cache is indexed per kv head
  TinyModel tiny = make_tiny(spec, WType::F32, 21);
  write_tiny(tmp.path / "tiny", tiny);
  const std::string dir = (tmp.path / "tiny").string();
  const int E = spec.embedding;
  auto model = Backend::load(dir, test_options(2));
  LoadOptions bf16_options = test_options(2);
  bf16_options.kv_cache_dtype = KVCacheDType::BF16;
  auto bf16_model = Backend::load(dir, bf16_options);

  // A canvas of 150 positions: a prefix read computes 130 queries (more than one attention query block).
  const int L = 150, block_begin = 20, block_end = 28;
  std::vector<int32_t> canvas = random_tokens(rng, L, spec.vocab);
  const std::vector<float> full = run_forward(*model, {canvas}, {all_rows(L)});

  for (Backend* m : {model.get(), bf16_model.get()}) {
    const bool f32 = m == model.get();
    const std::string kind = f32 ? "f32" : "bf16";
    auto cache = m->make_kv_cache(L);
    report(!cache->filled() && cache->size() == m->kv_cache_bytes(L) &&
               cache->size() ==
                   uint64_t(spec.n_layers) * L * (spec.n_kv_heads * spec.d_model / spec.n_heads) * 2 * (f32 ? 4 : 2),
           "kv cache (" + kind + "): size() = kv_cache_bytes = layers x positions x kv_dim x 2 x element",
           std::to_string(cache->size()) + " bytes");
    // (1) A refresh (the whole canvas through a cache) is the uncached forward, bit for bit.
    report(run_cached(*m, {{canvas, all_rows(L), cache.get()}}) == full && cache->filled(),
           "kv cache (" + kind + "): refresh equals the forward without cache, bit for bit, and fills the cache");
    // (2) Reads over an unchanged canvas equal the full forward's rows: prefix (block + everything after
    // it) and dual (the block only, cached keys on both sides).
    for (bool dual : {false, true}) {
      const int end = dual ? block_end : L;
      const std::vector<int32_t> rows = range_rows(block_begin, end);
      const std::vector<float> got = run_cached(*m, {{canvas, rows, cache.get(), block_begin, end}});
      const std::vector<float> want = select_rows(full, rows, E);
      const double diff = max_abs_diff(got, want), scale = max_abs(want);
      const std::string name = "kv cache (" + kind + "): " + (dual ? "dual" : "prefix") + " read [" +
                               std::to_string(block_begin) + ", " + std::to_string(end) +
                               ") of an unchanged canvas equals the full forward";
      // f32 keys are the very values a full forward uses, and every kernel's result per row is
      // independent of the other rows, so the read is exact; bf16 keys carry 8 significant bits.
      report(f32 ? got == want : diff <= 2e-2 * scale, name + (f32 ? " bit for bit" : " within 2e-2 x max|logit|"),
             fmt("max |diff| %.2e, max |logit| %.2f", diff, scale));
    }
  }

  // (3) Where tokens changed since the refresh, a read sees the refresh's keys and values outside its
  // range and fresh ones inside: compare with the float64 reference doing exactly that.
  {
    std::vector<int32_t> before = random_tokens(rng, 90, spec.vocab);
    std::vector<int32_t> after = before;
    for (int p : {3, 25, 26, 31, 40, 70, 89})
      after[p] = (after[p] + 7) % spec.vocab;  // prefix, block and suffix change
    ReferenceKV stale;
    reference_forward(tiny, before, &stale);
    for (bool dual : {false, true}) {
      const int begin = 24, end = dual ? 32 : 90;
      auto cache = model->make_kv_cache(90);
      run_cached(*model, {{before, {}, cache.get()}});
      const std::vector<int32_t> rows = range_rows(begin, end);
      const std::vector<float> got = run_cached(*model, {{after, rows, cache.get(), begin, end}});
      const auto ref = reference_forward(tiny, after, nullptr, &stale, begin, end);
      double worst = 0, scale = 0;
      for (size_t r = 0; r < rows.size(); ++r)
        for (int e = 0; e < E; ++e) {
          worst = std::max(worst, std::fabs(got[r * E + e] - ref[rows[r]][e]));
          scale = std::max(scale, std::fabs(ref[rows[r]][e]));
        }
      const std::vector<float> exact = select_rows(run_forward(*model, {after}, {all_rows(90)}), rows, E);
      report(worst <= 1e-5 * scale && max_abs_diff(got, exact) > 1e-3 * scale,
             std::string("kv cache: ") + (dual ? "dual" : "prefix") +
                 " read of a changed canvas uses the refresh's keys outside its range (vs float64 reference)",
             fmt("max |diff| %.2e, max |logit| %.2f; differs from the exact forward by %.2e", worst, scale,
                 max_abs_diff(got, exact)));
    }
  }

  // (4) A ragged batch mixing no cache, a refresh, a prefix read and a dual read (lengths 9, 20, 131, 70)
  // equals each alone, with 2 threads vs 1, bit for bit.
  {
    auto model1 = Backend::load(dir, test_options(1));
    std::vector<int32_t> a = random_tokens(rng, 9, spec.vocab), b = random_tokens(rng, 20, spec.vocab),
                         c = random_tokens(rng, 131, spec.vocab), d = random_tokens(rng, 70, spec.vocab);
    auto make_seqs = [&](Backend& m, std::vector<std::unique_ptr<KVCache>>& caches) {
      for (int len : {20, 131, 70}) caches.push_back(m.make_kv_cache(len));
      run_cached(m, {{c, {}, caches[1].get()}, {d, {}, caches[2].get()}});  // fill the read caches
      std::vector<int32_t> c2 = c, d2 = d;                                  // commit a few tokens since the refresh
      c2[60] = 1, c2[61] = 2, d2[33] = 3;
      return std::vector<CachedSeq>{{a, {8, 0, 3}},
                                    {b, {0, 19}, caches[0].get()},
                                    {c2, {130, 64, 63, 50}, caches[1].get(), 50, 131},
                                    {d2, {32, 39}, caches[2].get(), 32, 40}};
    };
    std::vector<std::unique_ptr<KVCache>> caches2, caches1;
    std::vector<CachedSeq> seqs2 = make_seqs(*model, caches2), seqs1 = make_seqs(*model1, caches1);
    std::vector<float> batched = run_cached(*model, seqs2), joined;
    for (const CachedSeq& s : seqs1) {
      std::vector<float> alone = run_cached(*model1, {s});
      joined.insert(joined.end(), alone.begin(), alone.end());
    }
    report(batched == joined,
           "kv cache: batch of none / refresh / prefix read / dual read (lengths 9, 20, 131, 70) "
           "equals each alone, 1 vs 2 threads, bit for bit");
  }

  // Errors: each names what is wrong; nothing is touched.
  {
    auto cache = model->make_kv_cache(10);
    std::vector<int32_t> t = random_tokens(rng, 10, spec.vocab);
    expect_error("kv cache: a read needs a filled cache", ErrorCode::InvalidArgument, {"not filled"}, [&] {
      run_cached(*model, {{t, {5}, cache.get(), 4, 10}});
    });
    expect_error("kv cache: computing part of the canvas needs a cache", ErrorCode::InvalidArgument,
                 {"needs a KV cache"}, [&] {
                   run_cached(*model, {{t, {5}, nullptr, 4, 10}});
                 });
    run_cached(*model, {{t, {}, cache.get()}});
    expect_error("kv cache: logit row outside the computed range", ErrorCode::InvalidArgument,
                 {"logit row 3", "[4, 8)"}, [&] {
                   run_cached(*model, {{t, {3}, cache.get(), 4, 8}});
                 });
    expect_error("kv cache: empty compute range", ErrorCode::InvalidArgument, {"compute range [4, 4)"}, [&] {
      run_cached(*model, {{t, {}, cache.get(), 4, 4}});
    });
    expect_error("kv cache: compute range past the canvas", ErrorCode::InvalidArgument, {"compute range [4, 11)"}, [&] {
      run_cached(*model, {{t, {}, cache.get(), 4, 11}});
    });
    expect_error("kv cache: cache of another length", ErrorCode::InvalidArgument, {"serves 10 positions", "has 9"},
                 [&] {
                   run_cached(*model, {{std::vector<int32_t>(t.begin(), t.end() - 1), {}, cache.get()}});
                 });
    expect_error("kv cache: cache of another model", ErrorCode::InvalidArgument, {"another model"}, [&] {
      run_cached(*bf16_model, {{t, {}, cache.get()}});
    });
    expect_error("kv cache: one cache twice in a batch", ErrorCode::InvalidArgument, {"twice"}, [&] {
      run_cached(*model, {{t, {}, cache.get()}, {t, {}, cache.get()}});
    });
    expect_error("kv cache: zero positions", ErrorCode::InvalidArgument, {"0 positions"},
                 [&] { model->make_kv_cache(0); });
    expect_error("kv cache: more positions than max_sequence_length", ErrorCode::InvalidArgument, {"257 positions"},
                 [&] { model->make_kv_cache(257); });
    std::atomic<bool> cancel{true};
    auto fresh = model->make_kv_cache(10);
    expect_error("kv cache: a cancelled refresh throws Cancelled", ErrorCode::Cancelled, {"cancel"}, [&] {
      run_cached(*model, {{t, {}, fresh.get()}}, &cancel);
    });
    expect_error("kv cache: ... and leaves the cache not filled", ErrorCode::InvalidArgument, {"not filled"}, [&] {
      run_cached(*model, {{t, {5}, fresh.get(), 4, 10}});
    });
  }

  // The budget bounds the bytes of all live caches of a model together.
  {
    LoadOptions options = test_options(1);
    const uint64_t per_100 = model->kv_cache_bytes(100);
    options.kv_cache_budget_bytes = 2 * per_100 + per_100 / 2;  // room for two caches of 100 positions
    auto bounded = Backend::load(dir, options);
    auto first = bounded->make_kv_cache(100);
    auto second = bounded->make_kv_cache(100);
    report(bounded->kv_cache_live_bytes() == 2 * per_100 &&
               bounded->kv_cache_budget_bytes() == options.kv_cache_budget_bytes,
           "kv cache budget: live bytes are accounted", std::to_string(bounded->kv_cache_live_bytes()) + " bytes");
    expect_error("kv cache budget: exhausted by live caches", ErrorCode::OutOfMemory, {"budget exhausted"},
                 [&] { bounded->make_kv_cache(100); });
    expect_error("kv cache budget: one cache larger than the whole budget", ErrorCode::InvalidArgument,
                 {"whole cache budget"}, [&] { bounded->make_kv_cache(256); });
    first.reset();
    auto third = bounded->make_kv_cache(100);
    second.reset();
    report(bounded->kv_cache_live_bytes() == per_100, "kv cache budget: freeing a cache returns its bytes");
    third.reset();
    // A cache may outlive its model (it shares the byte account with it).
    auto orphan = bounded->make_kv_cache(10);
    bounded.reset();
    orphan.reset();
  }
}

}  // namespace vdiff::test
