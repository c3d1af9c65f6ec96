// LoadOptions::cpu_isa: the same checkpoint loaded on every ISA this CPU has runs on that ISA's kernels
// (BackendInfo says which) and gives the logits of the portable kernels and of the float64 reference
// within f32 rounding, over a canvas of 600 tokens (several attention key tiles); an unknown name and an ISA
// this CPU lacks are refused at load with typed errors naming the setting.
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
    double scale = 0;
    for (const auto& row : ref)
      for (double v : row) scale = std::max(scale, std::fabs(v));
    std::vector<float> portable;
    std::string detail;
    bool ok = true;
    for (const std::string& isa : isas) {
      LoadOptions options = test_options(2);
      options.device = Device::Cpu;
      options.cpu_isa = isa;
      auto model = Backend::load(dir.string(), options);
      const BackendInfo info = model->info();
      const std::vector<float> got = run_forward(*model, {tokens}, {all_rows(tokens.size())});
      if (portable.empty()) portable = got;
      double worst = 0;
      for (size_t t = 0; t < tokens.size(); ++t)
        for (int e = 0; e < spec.embedding; ++e)
          worst = std::max(worst, std::fabs(got[t * spec.embedding + e] - ref[t][e]));
      const double vs_portable = max_abs_diff(got, portable);
      ok = ok && info.device == isa && info.gemm == isa && worst <= 1e-5 * scale && vs_portable <= 1e-5 * scale;
      detail += isa + " (reported " + info.device + "/" + info.gemm +
                "): " + fmt("vs float64 %.2e, vs portable %.2e; ", worst, vs_portable);
    }
    report(ok && isas.size() >= 1,
           std::string("cpu_isa: the ") + type_name(type) +
               " model on every ISA of this CPU reports it and gives the portable and float64 logits "
               "within 1e-5 x max|logit| (600 tokens)",
           detail + fmt("max |logit| %.2f", scale));
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
