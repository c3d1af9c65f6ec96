// The model families beyond LLaDA (llada2_moe, sdar, sdar_moe) and block-causal attention
// (ForwardSeq::attention_block): config.json parsing, and the CPU forward against a float64 reference
// written here, plus the exactness of block-causal cached reads.
#include "tests/model_fixtures.h"

namespace vdiff::test {

namespace {

// A forward with block-causal attention; `cache` and [begin, end) as in ForwardSeq.
std::vector<float> run_block(Backend& model, const std::vector<int32_t>& tokens, const std::vector<int32_t>& rows,
                             int block, KVCache* cache = nullptr, int begin = 0, int end = -1) {
  ForwardSeq s{tokens.data(), static_cast<int>(tokens.size()), rows.data(), static_cast<int>(rows.size()),
               cache, begin, end};
  s.attention_block = block;
  std::vector<float> logits(rows.size() * model.config().embedding_size);
  model.forward({s}, logits.data());
  return logits;
}

// Block-causal attention on the LLaDA tiny model: what the mask implies (a position never sees later
// blocks), the cached reads against the uncached forward, and the checks of check_batch.
void test_block_causal_llada() {
  TempDir tmp;
  std::mt19937 rng(5);
  TinySpec spec;
  write_tiny(tmp.path / "tiny", make_tiny(spec, WType::F32, 9));
  auto model = Backend::load((tmp.path / "tiny").string(), test_options(2));
  const int E = spec.embedding;
  for (int B : {4, 32}) {
    const std::string tag = "block-causal B=" + std::to_string(B) + ": ";
    const int L = 4 * B + B / 2;  // the last block is cut short by the canvas
    std::vector<int32_t> canvas = random_tokens(rng, L, spec.vocab);
    const std::vector<float> full = run_block(*model, canvas, all_rows(L), B);
    // Changing the tokens of block 2 leaves the rows of blocks 0 and 1 exactly as they were, and changes
    // those of block 2 and later.
    std::vector<int32_t> changed = canvas;
    for (int p = 2 * B; p < 3 * B; ++p) changed[p] = (changed[p] + 3) % spec.vocab;
    const std::vector<float> other = run_block(*model, changed, all_rows(L), B);
    const std::vector<int32_t> early = range_rows(0, 2 * B), late = range_rows(2 * B, L);
    report(select_rows(full, early, E) == select_rows(other, early, E) &&
               max_abs_diff(select_rows(full, late, E), select_rows(other, late, E)) > 1e-3,
           tag + "earlier blocks do not see a later block's tokens; later blocks do");
    // The bidirectional forward differs (the mask is in effect).
    report(max_abs_diff(run_forward(*model, {canvas}, {range_rows(0, B)}), select_rows(full, range_rows(0, B), E)) >
               1e-3,
           tag + "differs from bidirectional attention");
    // Without a cache, [0, end) gives the rows of the whole canvas's forward, bit for bit.
    report(run_block(*model, canvas, range_rows(0, 2 * B), B, nullptr, 0, 2 * B) == select_rows(full, early, E),
           tag + "an uncached window [0, 2B) equals the whole canvas's rows, bit for bit");
    // Cached: prefill [0, 2B), then read block 2 and the rest, block by block: equal to the full forward
    // bit for bit, and cached_until follows.
    auto cache = model->make_kv_cache(L);
    report(cache->cached_until() == 0, tag + "a new cache holds nothing");
    const std::vector<float> pre = run_block(*model, canvas, early, B, cache.get(), 0, 2 * B);
    bool ok = pre == select_rows(full, early, E) && cache->cached_until() == 2 * B;
    std::string detail = "cached_until " + std::to_string(cache->cached_until());
    for (int b = 2; b * B < L; ++b) {
      const int begin = b * B, end = std::min(L, begin + B);
      const std::vector<int32_t> rows = range_rows(begin, end);
      const std::vector<float> got = run_block(*model, canvas, rows, B, cache.get(), begin, end);
      ok = ok && got == select_rows(full, rows, E) && cache->cached_until() == end;
      detail += ", " + std::to_string(cache->cached_until());
    }
    report(ok, tag + "prefill then block-by-block cached reads equal the full forward bit for bit", detail);
    // A read of an earlier range keeps cached_until at its maximum; a read past cached_until is refused.
    run_block(*model, canvas, range_rows(B, 2 * B), B, cache.get(), B, 2 * B);
    report(cache->cached_until() == L, tag + "re-reading an earlier block keeps cached_until");
    auto fresh = model->make_kv_cache(L);
    expect_error(tag + "a read past cached_until is refused", ErrorCode::InvalidArgument, {"holds keys up to position 0", "needs them up to"},
                 [&] { run_block(*model, canvas, range_rows(B, 2 * B), B, fresh.get(), B, 2 * B); });
    // A range that ends inside a block (not at the canvas's end) is refused, with or without a cache.
    expect_error(tag + "a range ending inside a block is refused", ErrorCode::InvalidArgument, {"inside a block"},
                 [&] { run_block(*model, canvas, range_rows(0, 3), B, nullptr, 0, B + 1); });
    expect_error(tag + "an uncached range not from 0 is refused", ErrorCode::InvalidArgument, {"needs a KV cache"},
                 [&] { run_block(*model, canvas, range_rows(B, 2 * B), B, nullptr, B, 2 * B); });
  }
  // A whole-canvas block-causal forward through a cache: equal to the uncached one, and every key cached.
  {
    const int B = 4, L = 19;
    std::vector<int32_t> canvas = random_tokens(rng, L, spec.vocab);
    auto cache = model->make_kv_cache(L);
    const std::vector<float> got = run_block(*model, canvas, all_rows(L), B, cache.get());
    report(got == run_block(*model, canvas, all_rows(L), B) && cache->cached_until() == L,
           "block-causal: a whole-canvas forward through a cache equals the uncached one and caches every key");
  }
  std::vector<int32_t> canvas = random_tokens(rng, 8, spec.vocab);
  expect_error("block-causal: a negative attention_block is refused", ErrorCode::InvalidArgument, {"attention_block"},
               [&] { run_block(*model, canvas, {0}, -1); });
}

}  // namespace

void test_families() { test_block_causal_llada(); }

}  // namespace vdiff::test
