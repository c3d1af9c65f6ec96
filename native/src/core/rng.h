// The sampler's random numbers as pure functions of a key and an index, so that any backend draws the
// same noise: the CPU loops over a row's tokens, a GPU gives each token its own thread, and both get
// uniform_at(row_key(seed, step, position), token). Header-only and `VDIFF_HD`, so CUDA code calls the
// very same arithmetic the CPU tests check.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define VDIFF_HD __host__ __device__ __forceinline__
#else
#define VDIFF_HD inline
#endif

namespace vdiff {

// splitmix64's output function: a bijective mix of 64 bits.
VDIFF_HD uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

constexpr uint64_t kGolden64 = 0x9E3779B97F4A7C15ull;

// The key of one row of one step of one sequence: every (seed, step, position) its own stream, so a row's
// noise does not depend on which other rows were sampled, in which order, on how many threads or devices,
// or on whether an earlier step was cancelled and retried.
VDIFF_HD uint64_t row_key(uint64_t seed, int step, int position) {
  const uint64_t a = mix64(seed + kGolden64);
  return mix64(a ^ (static_cast<uint64_t>(static_cast<uint32_t>(step)) << 32 | static_cast<uint32_t>(position)));
}

// The index-th 64 random bits of a key's stream (splitmix64 with the counter as its state).
VDIFF_HD uint64_t bits_at(uint64_t key, uint64_t index) { return mix64(key + (index + 1) * kGolden64); }

// Uniform in the open interval (0, 1): 53 random bits shifted by half a unit, (k + 0.5) / 2^53, never 0
// or 1, so -log(-log(u)) is finite.
VDIFF_HD double uniform_at(uint64_t key, uint64_t index) {
  return (static_cast<double>(bits_at(key, index) >> 11) + 0.5) * 0x1.0p-53;
}

// Draw indices of a row's stream: token i's Gumbel noise is draw i; random remasking's confidence is
// draw kConfidenceDraw (past any vocabulary), so neither shifts the other.
constexpr uint64_t kConfidenceDraw = uint64_t{1} << 40;
// Dream (dream_decoding.h): origin's test whether a masked position is revealed this step, and alg_temp's
// noise for drawing which positions a step commits.
constexpr uint64_t kRevealDraw = kConfidenceDraw + 1;
constexpr uint64_t kSelectDraw = kConfidenceDraw + 2;

}  // namespace vdiff
