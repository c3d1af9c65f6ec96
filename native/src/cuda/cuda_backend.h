// The CUDA backend's entry points, as plain C++ (no CUDA headers): Backend::load calls them when the build
// defines VDIFF_WITH_CUDA=1 (CMake does when nvcc is found and VDIFF_CUDA is not OFF).
#pragma once
#include <memory>
#include <string>

#include "core/backend.h"

namespace vdiff::cuda {

// Loads <dir> onto the first visible GPU (weights uploaded in their stored dtype, progress reported through
// options.progress). Throws Error(Unavailable) when no GPU is visible or the driver is missing,
// Error(InvalidModel) for a bad checkpoint, Error(OutOfMemory) when the weights do not fit under
// options.gpu_memory_utilization.
std::unique_ptr<Backend> load(const std::string& dir, const LoadOptions& options);

// GPUs the CUDA runtime sees; 0 without a driver or a device. Never throws.
int device_count();

// Why device_count() is 0 ("no CUDA driver", "no CUDA device", ...); empty when a device is visible.
std::string unavailable_reason();

// Per-operation device times of the CUDA forwards (for benchmarks): while on, each forward records CUDA
// events after every operation; take_profile() returns {"forwards": N, "ms": {"gemm qkv": ms per forward,
// ...}} summed over the forwards since the last take, and clears it. Off by default.
void set_profiling(bool on);
std::string take_profile();

}  // namespace vdiff::cuda
