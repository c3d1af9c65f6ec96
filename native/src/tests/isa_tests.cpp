// LoadOptions::cpu_isa: the same checkpoint loaded on every ISA this CPU has runs on that ISA's kernels
// (BackendInfo says which) and gives the logits of the portable kernels and of the float64 reference
// within f32 rounding, over a canvas of 600 tokens (several attention key tiles). A bf16 model: the SIMD
// ISAs (avx2, avx512, avx512bf16; not amx, whose tiles sum in an order of their own) give the same logits
// bit for bit (their bf16 dot products are the same operations), and each ISA the float64 logits and the SIMD ones the
// portable logits (whose f32 products elsewhere, as attention's, multiply then add) within kBf16LogitBound
// (model_fixtures.h). An unknown name and an ISA this CPU lacks are refused at load with typed errors naming the
// setting.
#include "tests/model_fixtures.h"

namespace vdiff::test {

void test_cpu_isa() {
  TempDir tmp;
  std::mt19937 rng(31);
  const std::vector<std::string> isas = cpu::available_isas();
  for (WType type : {WType::F32, WType::BF16}) {
    TinySpec spec;
    spec.max_len = 640;
    const TinyModel tiny = make_tiny(spec, type, 60 + static_cast<int>(type));
    const fs::path dir = tmp.path / (std::string("tiny-") + type_name(type));
    write_tiny(dir, tiny);
    const std::vector<int32_t> tokens = random_tokens(rng, 600, spec.vocab);  // > 2 key tiles
    const auto ref = reference_forward(tiny, tokens);
    const std::vector<int32_t> rows = all_rows(tokens.size());
    std::vector<float> simd;                         // the first SIMD ISA's logits
    std::vector<std::vector<double>> portable_rows;  // portable's
    std::string detail, simd_first;
    bool ok = true, reported = true, simd_equal = true;
    LogitErrors worst_ref;
    for (const std::string& isa : isas) {
      LoadOptions options = test_options(2);
      options.device = Device::Cpu;
      options.cpu_isa = isa;
      auto model = Backend::load(dir.string(), options);
      const BackendInfo info = model->info();
      const std::vector<float> got = run_forward(*model, {tokens}, {rows});
      reported = reported && info.device == isa && info.gemm == isa;
      if (isa == "portable") {
        for (size_t t = 0; t < tokens.size(); ++t)
          portable_rows.emplace_back(got.begin() + t * spec.embedding, got.begin() + (t + 1) * spec.embedding);
      }
      const LogitErrors vs_ref = logit_errors(got, ref, rows, spec.embedding);
      ok = ok && logits_within(vs_ref, type, 1e-5);
      detail += isa + " (reported " + info.device + "/" + info.gemm + "): " + fmt("vs float64 %.2e", vs_ref.worst);
      if (isa != "portable" && !portable_rows.empty()) {
        LogitErrors vs_portable = logit_errors(got, portable_rows, rows, spec.embedding);
        vs_portable.scale = vs_ref.scale;  // relative to the float64 logits' max, as against float64
        ok = ok && logits_within(vs_portable, type, 1e-5);
        detail += fmt(", vs portable %.2e (median row %.2e)", vs_portable.worst, vs_portable.median_row);
      }
      if (vs_ref.worst >= worst_ref.worst) worst_ref = vs_ref;
      // The SIMD ISAs but amx (TDPBF16PS sums in an order of its own, kernels.h): the same bf16 products.
      if (type == WType::BF16 && isa != "portable" && isa != "amx") {
        if (simd.empty()) simd = got, simd_first = isa;
        else if (got != simd) simd_equal = false, detail += " (differs from " + simd_first + ")";
      }
      detail += "; ";
    }
    detail +=
        fmt("max |logit| %.2f, the worst against float64: median row %.2e", worst_ref.scale, worst_ref.median_row);
    const std::string checks =
        type == WType::BF16
            ? "the bf16 model on every ISA of this CPU reports it; the SIMD ISAs but amx give the same logits bit for "
              "bit, "
              "and every ISA the float64 logits and the SIMD ISAs the portable logits " +
                  logit_bound_text(type, 1e-5) + " (600 tokens)"
            : "the f32 model on every ISA of this CPU reports it and gives the portable and float64 logits "
              "within 1e-5 x max|logit| (600 tokens)";
    report(ok && reported && simd_equal && !isas.empty() && isas.front() == "portable", "cpu_isa: " + checks, detail);
  }

  TinySpec spec;
  const fs::path dir = tmp.path / "tiny-errors";
  write_tiny(dir, make_tiny(spec, WType::F32, 3));
  LoadOptions options = test_options(1);
  options.device = Device::Cpu;
  {
    options.cpu_isa = "auto";
    auto model = Backend::load(dir.string(), options);
    report(model->info().device == cpu::active_kernels().isa, "cpu_isa: auto is the default kernels' ISA",
           model->info().device);
  }
  options.cpu_isa = "sse4";
  expect_error("cpu_isa: an unknown name is refused at load, naming the setting", ErrorCode::InvalidArgument,
               {"--cpu-isa", "sse4", "not one of auto, portable, avx2, avx512"},
               [&] { Backend::load(dir.string(), options); });
  std::string available = "available: auto";
  for (const std::string& isa : isas) available += ", " + isa;
  for (const std::string isa : {"avx2", "avx512"}) {
    if (cpu::kernels_for(isa)) continue;
    options.cpu_isa = isa;
    expect_error("cpu_isa: " + isa + ", which this CPU lacks, is refused at load listing the ISAs it has",
                 ErrorCode::Unavailable, {"--cpu-isa", isa + ": this CPU does not support it", available},
                 [&] { Backend::load(dir.string(), options); });
  }
}

}  // namespace vdiff::test
