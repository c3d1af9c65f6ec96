// Run-time choice of the kernel table: the widest ISA this CPU supports, unless VDIFF_ISA names one (the
// process-wide default of "auto"), or a model's load option names one (kernels_for_setting).
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdlib>

#include "core/error.h"
#include "kernels.h"
#include "quant.h"

namespace vdiff::cpu {

namespace {

bool cpu_has_avx2() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if defined(__x86_64__) || defined(__i386__)
  // libgcc also checks (via XGETBV) that the OS saves the zmm state before reporting avx512f.
  __builtin_cpu_init();
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

bool cpu_has_bf16_dot() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

bool cpu_has_vnni() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return cpu_has_avx512() && __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

// AMX tiles with bf16 products (and the AVX512_BF16 the amx table falls back on): the CPU has them and Linux lets this
// process use their state (which it grants on request, once per process: arch_prctl ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA).
bool cpu_has_amx() {
#if defined(__x86_64__) && defined(SYS_arch_prctl)
  static const bool usable = [] {
    __builtin_cpu_init();
    if (!cpu_has_bf16_dot() || !__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-bf16")) return false;
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return usable;
#else
  return false;
#endif
}

// The ISA names, lowest first.
const char* const kIsaNames[] = {"portable", "avx2", "avx512", "avx512bf16", "amx"};
// "portable, avx2, ...": the names for the errors that list them.
std::string isa_list() {
  std::string out;
  for (const char* name : kIsaNames) out += (out.empty() ? "" : ", ") + std::string(name);
  return out;
}

bool known_isa(const std::string& name) {
  for (const char* known : kIsaNames)
    if (name == known) return true;
  return false;
}

const Kernels* select_default() {
  if (cpu_has_amx()) return amx_kernels();
  if (cpu_has_bf16_dot()) return avx512bf16_kernels();
  if (cpu_has_avx512()) return avx512_kernels();
  if (cpu_has_avx2()) return avx2_kernels();
  return portable_kernels();
}

}  // namespace

const CacheSizes& cache_sizes() {
  static const CacheSizes sizes = [] {
    auto reported = [](int name, size_t fallback) {
      const long v = sysconf(name);
      return v > 0 ? static_cast<size_t>(v) : fallback;
    };
    return CacheSizes{reported(_SC_LEVEL1_DCACHE_SIZE, size_t{32} << 10),
                      reported(_SC_LEVEL2_CACHE_SIZE, size_t{256} << 10)};
  }();
  return sizes;
}

const Kernels* kernels_for(const std::string& isa) {
  if (isa == "portable") return portable_kernels();
  if (isa == "avx2") return cpu_has_avx2() ? avx2_kernels() : nullptr;
  if (isa == "avx512") return cpu_has_avx512() ? avx512_kernels() : nullptr;
  if (isa == "avx512bf16") return cpu_has_bf16_dot() ? avx512bf16_kernels() : nullptr;
  if (isa == "amx") return cpu_has_amx() ? amx_kernels() : nullptr;
  return nullptr;
}

std::vector<std::string> available_isas() {
  std::vector<std::string> out;
  for (const char* name : kIsaNames)
    if (kernels_for(name) != nullptr) out.push_back(name);
  return out;
}

bool cpu_has_avx512vnni() { return cpu_has_vnni(); }

const QuantKernels& quant_kernels_for(const Kernels& k) {
  const std::string isa = k.isa;
  const bool avx512 = isa == "avx512" || isa == "avx512bf16" || isa == "amx";
  if (avx512 && cpu_has_vnni()) return *quant_avx512vnni_kernels();
  if ((avx512 || isa == "avx2") && cpu_has_avx2()) return *quant_avx2_kernels();
  return *quant_portable_kernels();
}

const Kernels& kernels_for_setting(const std::string& isa) {
  if (isa.empty() || isa == "auto") return active_kernels();
  const std::string setting = "--cpu-isa (VDIFF_CPU_ISA) " + isa + ": ";
  if (!known_isa(isa)) throw Error(ErrorCode::InvalidArgument, setting + "not one of auto, " + isa_list());
  if (const Kernels* k = kernels_for(isa)) return *k;
  std::string available = "auto";
  for (const std::string& name : available_isas()) available += ", " + name;
  throw Error(ErrorCode::Unavailable, setting + "this CPU does not support it; available: " + available);
}

const Kernels& active_kernels() {
  // Initialised once; when VDIFF_ISA is bad the initialiser throws and the next call tries again.
  static const Kernels* chosen = [] {
    const char* requested = std::getenv("VDIFF_ISA");
    if (!requested || !*requested) return select_default();
    std::string name(requested);
    if (!known_isa(name)) throw Error(ErrorCode::InvalidArgument, "VDIFF_ISA=" + name + " is not one of " + isa_list());
    const Kernels* k = kernels_for(name);
    if (!k) throw Error(ErrorCode::InvalidArgument, "VDIFF_ISA=" + name + " is not supported by this CPU");
    return k;
  }();
  return *chosen;
}

}  // namespace vdiff::cpu
