// The end of a SIMD kernels file (kernels_avx2.cpp, kernels_avx512.cpp): the weight-type dispatch of
// `convert` and the ISA's table of kernels, written once. Include it at the END of that file's
// `namespace vdiff::cpu { namespace {` (like gemm_driver.h, for internal linkage and the file's -m flags),
// after its convert_t<T>, rmsnorm, silu_mul, softmax and exp_ and gemm_driver.h (which defines gemm,
// gemm_scratch_floats, pack_panel and packed_panel_bytes, and the quantized path's quant_gemm,
// quant_gemm_scratch_floats, quant_pack_panel and quant_packed_panel_bytes); it includes nothing.

// Kernels::convert: the file's convert_t by the weight type.
void convert(const void* src, WType type, float* dst, int n) {
  switch (type) {
    case WType::F32: return convert_t<WType::F32>(src, dst, n);
    case WType::BF16: return convert_t<WType::BF16>(src, dst, n);
    case WType::F16: return convert_t<WType::F16>(src, dst, n);
  }
}

// The table an ISA's getter returns: this file's kernels under the ISA's name.
const Kernels* kernel_table(const char* isa) {
  static const Kernels table = {isa,
                                kNR,
                                gemm_scratch_floats,
                                gemm,
                                rmsnorm,
                                silu_mul,
                                softmax,
                                exp_,
                                convert,
                                pack_panel,
                                packed_panel_bytes,
                                bf16_a_row_bytes,
                                stage_bf16_a,
                                gemm_staged};
  return &table;
}

// The quantized table an ISA's getter returns: this file's quantized kernels under the ISA's name.
const QuantKernels* quant_kernel_table(const char* isa) {
  static const QuantKernels table = {.isa = isa,
                                     .nr = kNR,
                                     .q8_unsigned = kQ8Unsigned,
                                     .quantize = quantize_rows_isa,
                                     .rotate = hadamard_isa,
                                     .quantize_weights = quantize_weights,
                                     .gemm = quant_gemm,
                                     .gemm_scratch_floats = quant_gemm_scratch_floats,
                                     .pack_panel = quant_pack_panel,
                                     .packed_panel_bytes = quant_packed_panel_bytes};
  return &table;
}
