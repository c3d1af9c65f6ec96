// The CPU backend: the LLaDA forward on the CPU kernels of this machine's instruction set (kernels.h),
// weights memory-mapped in their stored dtype, activations f32. Backend::load makes it for Device::Cpu.
#pragma once
#include <memory>
#include <string>

#include "core/backend.h"

namespace vdiff::cpu {

std::unique_ptr<Backend> load(const std::string& dir, const LoadOptions& options);

}  // namespace vdiff::cpu
