// Native unit tests of the model core: every kernel of every ISA this CPU has against a plain scalar
// reference, the JSON reader, safetensors and config.json error cases, the thread pool, and the whole
// forward pass against a float64 re-implementation and against the PyTorch golden fixtures.
//
//   vdiff-native-tests [--golden DIR]     run every check; one line per check; exit status 1 on any failure
//
// The benchmarks that were here are vdiff-cli bench-kernels and vdiff-cli bench-forward.
//
// Kernel tests cover every ISA the CPU has; the model tests use the kernels VDIFF_ISA selects (default:
// the widest the CPU has). Golden fixtures default to test/fixtures/golden of the source tree.
// The checks live in one file per area (kernels, io, model, kv_cache, golden: the list is in harness.h).
#include "tests/harness.h"

using namespace vdiff;
using namespace vdiff::test;

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  try {
    auto t0 = std::chrono::steady_clock::now();
    std::printf("ISAs on this CPU: ");
    for (const auto& isa : cpu::available_isas()) std::printf("%s ", isa.c_str());
    std::printf("(model tests use %s)\n", cpu::active_kernels().isa);
    test_scalar_conversions();
    for (const auto& isa : cpu::available_isas()) {
      const Kernels& k = *cpu::kernels_for(isa);
      for (WType type : {WType::F32, WType::BF16, WType::F16})
        for (bool k_major : {false, true}) test_gemm(k, type, k_major);
      test_bf16_denormals(k);
      test_packed_bf16_widened(k);
      test_elementwise(k);
      if (std::string(k.isa) != "portable") test_simd_order(k);
      test_attention(k);
      for (cpu::QType type : {cpu::QType::Q8_0, cpu::QType::Q4_0}) test_quant_gemm(cpu::quant_kernels_for(k), type);
    }
    if (cpu::cpu_has_avx512vnni())  // the AVX2 integer path too, which an AVX-512 table does not pick there
      for (cpu::QType type : {cpu::QType::Q8_0, cpu::QType::Q4_0}) test_quant_gemm(*cpu::quant_avx2_kernels(), type);
    test_quantize_weights();
    test_threadpool();
    test_json();
    test_safetensors();
    test_config();
    test_model();
    test_cpu_isa();
    test_kv_cache();
    test_quant_model();
    test_families();
    test_moe();
    std::string golden = VDIFF_GOLDEN_DIR;
    for (size_t i = 0; i + 1 < args.size(); ++i)
      if (args[i] == "--golden") golden = args[i + 1];
    test_golden(golden);
    test_engine_kv_cache(golden);
    std::string golden_block = VDIFF_GOLDEN_BLOCK_DIR;
    for (size_t i = 0; i + 1 < args.size(); ++i)
      if (args[i] == "--golden-block") golden_block = args[i + 1];
    test_block(golden_block);
    std::string golden_dream = VDIFF_GOLDEN_DREAM_DIR;
    for (size_t i = 0; i + 1 < args.size(); ++i)
      if (args[i] == "--golden-dream") golden_dream = args[i + 1];
    test_dream(golden_dream);
    std::printf("%d checks, %d failed, %.1f s\n", g_checks, g_failures, seconds_since(t0));
  } catch (const std::exception& e) {
    std::printf("FAIL uncaught exception: %s\n", e.what());
    return 1;
  }
  return g_failures == 0 ? 0 : 1;
}
