// The whole forward pass on tiny random checkpoints against the float64 reference, and load errors.
#include "tests/model_fixtures.h"

namespace vdiff::test {

void test_model() {
  TempDir tmp;
  const std::string isa = cpu::active_kernels().isa;
  std::mt19937 rng(7);
  // Against the float64 reference, per storage type: one sequence longer than an attention query block
  // (64) so the query blocking is exercised, all rows requested.
  for (WType type : {WType::F32, WType::BF16, WType::F16}) {
    TinySpec spec;
    spec.tied = type == WType::F16;
    TinyModel tiny = make_tiny(spec, type, 100 + static_cast<int>(type));
    const fs::path dir = tmp.path / (std::string("tiny-") + type_name(type));
    write_tiny(dir, tiny);
    auto model = Backend::load(dir.string(), test_options(2));
    std::vector<int32_t> tokens = random_tokens(rng, 70, spec.vocab);
    std::vector<float> got = run_forward(*model, {tokens}, {all_rows(tokens.size())});
    auto ref = reference_forward(tiny, tokens);
    const LogitErrors e = logit_errors(got, ref, all_rows(tokens.size()), spec.embedding);
    bool meta =
        model->weight_dtype() == type_name(type) && model->info().backend == "cpu" && model->config().n_kv_heads == 2;
    report(logits_within(e, type, 1e-5) && meta,
           std::string("model forward (") + isa + ", " + type_name(type) + (spec.tied ? ", tied head" : "") +
               ") vs float64 reference" + (type == WType::BF16 ? ": " + logit_bound_text(type, 1e-5) : ""),
           logit_errors_text(e));
  }

  // Batching, row selection and threads must not change a single bit: every output is computed by the
  // same operations in the same order whatever else is in the batch.
  TinySpec spec;
  TinyModel tiny = make_tiny(spec, WType::F32, 5);
  const fs::path dir = tmp.path / "tiny";
  write_tiny(dir, tiny);
  auto model2 = Backend::load(dir.string(), test_options(2));
  auto model1 = Backend::load(dir.string(), test_options(1));
  std::vector<int32_t> a = random_tokens(rng, 9, spec.vocab), b = random_tokens(rng, 131, spec.vocab),
                       c = random_tokens(rng, 1, spec.vocab);
  std::vector<int32_t> rows_a = {8, 0, 3}, rows_b = {130, 64, 63, 0, 7}, rows_c = {0};
  std::vector<float> batched = run_forward(*model2, {a, b, c}, {rows_a, rows_b, rows_c});
  std::vector<float> alone_a = run_forward(*model2, {a}, {rows_a});
  std::vector<float> alone_b = run_forward(*model1, {b}, {rows_b});
  std::vector<float> alone_c = run_forward(*model1, {c}, {rows_c});
  std::vector<float> joined = alone_a;
  joined.insert(joined.end(), alone_b.begin(), alone_b.end());
  joined.insert(joined.end(), alone_c.begin(), alone_c.end());
  report(batched == joined,
         "model forward: batch of 3 (lengths 9, 131, 1) equals each alone, 1 vs 2 threads, bit for bit");
  {
    LoadOptions unpacked_options = test_options(2);
    unpacked_options.pack_weights_max_bytes = 0;
    auto unpacked = Backend::load(dir.string(), unpacked_options);
    const bool packs = cpu::active_kernels().pack_panel != nullptr;
    report(unpacked->packed_weight_bytes() == 0 && (model2->packed_weight_bytes() > 0) == packs &&
               run_forward(*unpacked, {a, b, c}, {rows_a, rows_b, rows_c}) == batched,
           fmt("model forward: weights packed at load (%.0f bytes) give the logits of packing per call, bit for bit",
               static_cast<double>(model2->packed_weight_bytes())));
  }
  {
    // Over 1026 tokens the linear layers work in chunks of rows, whose borders cut through sequences.
    std::vector<std::vector<int32_t>> seqs, rows;
    std::vector<float> alone;
    for (int i = 0; i < 5; ++i) {
      seqs.push_back(random_tokens(rng, 250 - i, spec.vocab));
      rows.push_back({0, 100, 248 - i});
      std::vector<float> one = run_forward(*model1, {seqs.back()}, {rows.back()});
      alone.insert(alone.end(), one.begin(), one.end());
    }
    report(run_forward(*model2, seqs, rows) == alone,
           "model forward: batch of 5 x ~250 tokens (row chunks of the linear layers) equals each alone, bit for bit");
  }
  {
    std::vector<float> full = run_forward(*model2, {b}, {all_rows(b.size())});
    bool ok = true;
    for (size_t r = 0; r < rows_b.size(); ++r)
      ok = ok && std::equal(full.begin() + rows_b[r] * spec.embedding, full.begin() + (rows_b[r] + 1) * spec.embedding,
                            alone_b.begin() + r * spec.embedding);
    report(ok, "model forward: requested rows equal the same rows of a full forward");
  }
  {
    write_tiny(tmp.path / "tiny-sharded", tiny, 2);
    auto sharded = Backend::load((tmp.path / "tiny-sharded").string(), test_options(2));
    report(run_forward(*sharded, {b}, {rows_b}) == alone_b && sharded->parameter_count() == model2->parameter_count(),
           "model load: two shards + index give the same logits");
  }
  {
    uint64_t params = 0;
    for (const auto& [name, v] : tiny.tensors) params += v.exact.size();
    report(model2->parameter_count() == params && model2->weight_bytes() == params * 4,
           "model: parameter_count and weight_bytes", std::to_string(params) + " parameters");
  }
  std::atomic<bool> cancel{true};
  expect_error("model forward: cancel flag throws Cancelled", ErrorCode::Cancelled, {"cancel"},
               [&] { run_forward(*model2, {a}, {rows_a}, &cancel); });
  expect_error("model forward: token outside the embedding", ErrorCode::InvalidArgument, {"token 56", "position 2"},
               [&] {
                 run_forward(*model2, {{1, 2, 56}}, {{0}});
               });
  expect_error("model forward: logit row outside the sequence", ErrorCode::InvalidArgument, {"logit row 3"}, [&] {
    run_forward(*model2, {{1, 2, 3}}, {{3}});
  });
  expect_error("model forward: longer than max_sequence_length", ErrorCode::InvalidArgument, {"max_sequence_length"},
               [&] { run_forward(*model2, {std::vector<int32_t>(257, 1)}, {{0}}); });
  // The model still works after the errors above.
  report(run_forward(*model2, {a}, {rows_a}) == alone_a, "model forward: usable after rejected calls");

  // Load errors name the tensor (and the file).
  write_tiny(tmp.path / "missing", tiny, 1, "model.transformer.blocks.1.up_proj.weight");
  expect_error("model load: missing tensor", ErrorCode::InvalidModel,
               {"missing tensor \"model.transformer.blocks.1.up_proj.weight\""},
               [&] { Backend::load((tmp.path / "missing").string()); });
  write_tiny(tmp.path / "reshaped", tiny, 1, "", "model.transformer.blocks.0.k_proj.weight");
  expect_error("model load: wrong shape", ErrorCode::InvalidModel,
               {"model.transformer.blocks.0.k_proj.weight", "[8, 64]", "expected [16, 32]", "model.safetensors"},
               [&] { Backend::load((tmp.path / "reshaped").string()); });
  expect_error("model load: no config.json", ErrorCode::InvalidModel, {"config.json"},
               [&] { Backend::load((tmp.path / "nowhere").string()); });
}

}  // namespace vdiff::test
