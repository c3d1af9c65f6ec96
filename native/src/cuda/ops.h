// The per-element arithmetic of the CUDA kernels as small VDIFF_HD functions: the kernels call them on
// the device, and vdiff-cuda-tests calls the very same functions on the CPU against the CPU backend's
// kernels and sampler, so that only indexing and synchronisation wait for a GPU. Plain C++ when not
// compiled by nvcc (rng.h defines VDIFF_HD).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "core/rng.h"

namespace vdiff::cuda::ops {

// ---- element types ------------------------------------------------------------------------------

VDIFF_HD float bits_to_f32(uint32_t bits) {
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

VDIFF_HD uint32_t f32_to_bits(float f) {
  uint32_t bits;
  memcpy(&bits, &f, 4);
  return bits;
}

VDIFF_HD float bf16_to_f32(uint16_t h) { return bits_to_f32(static_cast<uint32_t>(h) << 16); }

// Round to nearest even, NaN stays NaN: the CPU backend's conversion for bf16 KV caches.
VDIFF_HD uint16_t f32_to_bf16(float f) {
  uint32_t bits = f32_to_bits(f);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

VDIFF_HD float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
  if (exponent == 0x1f) return bits_to_f32(sign | 0x7f800000u | (mantissa << 13));
  if (exponent != 0) return bits_to_f32(sign | ((exponent + 112) << 23) | (mantissa << 13));
  if (mantissa == 0) return bits_to_f32(sign);
  // A subnormal half is mantissa * 2^-24, exact in f32.
  const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
  return sign ? -magnitude : magnitude;
}

// ---- RMSNorm: y = x * (1 / sqrt(mean(x^2) + eps)) * w, in f32 ---------------------------------------

// The row's scale from its sum of squares (summed in whatever order the caller reduces).
VDIFF_HD float rms_inverse(float sum_squares, int n, float eps) {
  return 1.0f / sqrtf(sum_squares / static_cast<float>(n) + eps);
}
VDIFF_HD float rms_apply(float x, float inverse, float w) { return x * inverse * w; }

// ---- RoPE: NeoX rotate-half, one pair (x[i], x[i + half]) at a time ------------------------------------

VDIFF_HD void rope_pair(float& x1, float& x2, float c, float s) {
  const float a = x1, b = x2;
  x1 = a * c - b * s;
  x2 = b * c + a * s;
}

// ---- mixture of experts: the combine of one element -----------------------------------------------------
// Element idx (token idx / D, column idx % D) of a MoE layer's routed output: the token's expert rows
// (out[sorted_row[slot]], rows of D) weighted and summed over its k slots in slot order, the first one
// assigned — the CPU backend's order (cpu/moe.h).
VDIFF_HD float moe_combine(const float* out, const int32_t* sorted_row, const float* weight, int k, int D,
                           int64_t idx) {
  const int64_t t = idx / D, d = idx % D;
  float y = 0.0f;
  for (int j = 0; j < k; ++j) {
    const int64_t slot = t * k + j;
    const float v = weight[slot] * out[static_cast<int64_t>(sorted_row[slot]) * D + d];
    y = j == 0 ? v : y + v;
  }
  return y;
}

// ---- SwiGLU: silu(gate) * up ----------------------------------------------------------------------

VDIFF_HD float silu_mul(float gate, float up) { return gate / (1.0f + expf(-gate)) * up; }

// ---- attention's online softmax (flash-style), f32 ----------------------------------------------------
// The running state of one query row over the keys seen so far: the largest scaled score m and the sum of
// exp(score - m). Adding a key rescales the sum (and the caller's output accumulator by `rescale`).

struct SoftmaxState {
  float max;
  float sum;
};

VDIFF_HD SoftmaxState softmax_start() { return SoftmaxState{-INFINITY, 0.0f}; }

// Adds one score; returns the factor the previous accumulator must be multiplied by, and the weight of
// the new key in `weight`.
VDIFF_HD float softmax_add(SoftmaxState& s, float score, float& weight) {
  const float m = score > s.max ? score : s.max;
  const float rescale = s.max == -INFINITY ? 0.0f : expf(s.max - m);
  weight = expf(score - m);
  s.sum = s.sum * rescale + weight;
  s.max = m;
  return rescale;
}

// Merges a state b into a (a tile's partial result): the factors for a's and b's accumulators.
VDIFF_HD void softmax_merge(SoftmaxState& a, const SoftmaxState& b, float& scale_a, float& scale_b) {
  const float m = a.max > b.max ? a.max : b.max;
  scale_a = a.max == -INFINITY ? 0.0f : expf(a.max - m);
  scale_b = b.max == -INFINITY ? 0.0f : expf(b.max - m);
  a.sum = a.sum * scale_a + b.sum * scale_b;
  a.max = m;
}

// ---- the vocabulary reduction (sampler.h's sample_row semantics) -----------------------------------------

// A product and a sum rounded one at a time, as the CPU backend rounds them. nvcc contracts `a * b + c`
// into one fused multiply-add (one rounding), which moves a third of the CFG logits of a row by an ulp;
// the _rn intrinsics are never contracted.
#if defined(__CUDA_ARCH__)
VDIFF_HD float mul_rn(float a, float b) { return __fmul_rn(a, b); }
VDIFF_HD float add_rn(float a, float b) { return __fadd_rn(a, b); }
VDIFF_HD double mul_rn(double a, double b) { return __dmul_rn(a, b); }
VDIFF_HD double sub_rn(double a, double b) { return __dsub_rn(a, b); }
#else
VDIFF_HD float mul_rn(float a, float b) { return a * b; }
VDIFF_HD float add_rn(float a, float b) { return a + b; }
VDIFF_HD double mul_rn(double a, double b) { return a * b; }
VDIFF_HD double sub_rn(double a, double b) { return a - b; }
#endif

// Classifier-free guidance on one logit, in float like the reference: un + (scale + 1) * (cond - un).
VDIFF_HD float cfg_logit(float cond, float uncond, float scale_plus_one) {
  return add_rn(uncond, mul_rn(scale_plus_one, cond - uncond));
}

// Whether x0 may be `token`: a real token (not head padding) and not the mask.
VDIFF_HD bool drawable(int token, int vocab_size, int mask_token_id) {
  return token < vocab_size && token != mask_token_id;
}

// The Gumbel-max score of token `index` at temperature T > 0: l - T * log(-log(u)) in float64, with
// u = uniform_at(key, index) (the reference's argmax of exp(l) / (-log u)^T, as a logarithm).
VDIFF_HD double gumbel_score(float logit, double temperature, uint64_t key, uint64_t index) {
  const double u = uniform_at(key, index);
  return sub_rn(static_cast<double>(logit), mul_rn(temperature, log(-log(u))));
}

// An (value, index) candidate for a max reduction: higher value wins, ties to the lower index; index < 0
// is "none" and loses to everything. NaN values never win (they rank like -inf below every finite).
struct ArgBest {
  double value;
  int index;
};

VDIFF_HD ArgBest arg_none() { return ArgBest{-INFINITY, -1}; }

VDIFF_HD bool arg_better(const ArgBest& a, const ArgBest& b) {
  if (a.index < 0) return false;
  if (b.index < 0) return true;
  const double va = a.value != a.value ? -INFINITY : a.value, vb = b.value != b.value ? -INFINITY : b.value;
  return va > vb || (va == vb && a.index < b.index);
}

VDIFF_HD ArgBest arg_max(const ArgBest& a, const ArgBest& b) { return arg_better(b, a) ? b : a; }

// A ranking for the top logprobs: (logit, id) ranks before (logit', id') when it is larger, ties to the
// lower id; NaN ranks as -inf.
VDIFF_HD bool ranks_before(float la, int ia, float lb, int ib) {
  const float a = la != la ? -INFINITY : la, b = lb != lb ? -INFINITY : lb;
  return a > b || (a == b && ia < ib);
}

// float64 sum of exp(l - max) over a row, as partial sums relative to their own max merged pairwise.
struct SumExp {
  double max;
  double sum;
};

VDIFF_HD SumExp sumexp_none() { return SumExp{-INFINITY, 0.0}; }

VDIFF_HD SumExp sumexp_merge(const SumExp& a, const SumExp& b) {
  if (a.max == -INFINITY) return b;
  if (b.max == -INFINITY) return a;
  const double m = a.max > b.max ? a.max : b.max;
  return SumExp{m, a.sum * exp(a.max - m) + b.sum * exp(b.max - m)};
}

// log-probability of a logit under the row's softmax whose max and sum of exp(l - max) are given.
VDIFF_HD double log_probability(float logit, double max, double sum) {
  return static_cast<double>(logit) - max - log(sum);
}

// Probability as sample_row reports it: exp(l - max) / sum, 0 for a row without a usable distribution.
VDIFF_HD double probability(float logit, double max, double sum) {
  if (!(max > -INFINITY && max < INFINITY)) return 0.0;
  const double p = exp(static_cast<double>(logit) - max) / sum;
  return p != p ? 0.0 : p;
}

// ---- one task of the vocabulary reduction ------------------------------------------------------------
// A RowTask flattened (tasks.h makes it): the kernel gives each task a block whose threads stride over the
// row, each folding its elements into a RowPass, then merge; the host tests run the same functions with
// a few emulated threads against sample_task.

// Logit changes a task carries (RowRule::adjust: logit_bias, then the barred tokens as -inf); rows with
// more are sampled on the host.
constexpr int kMaxAdjust = 16;

struct TaskDesc {
  int cond, uncond;  // rows of the logits buffer; uncond -1: no cfg
  float cfg_scale_plus_one;
  int sample;  // 0: no draw (only the target / top logprobs)
  double temperature;
  uint64_t key;  // row_key(seed, step, position)
  int random_remasking;
  int logits_eos_inf, confidence_eos_eot_inf;
  int eos, eot;                   // -1: none (or outside the row)
  int vocab_size, mask_token_id;  // drawable: [0, vocab_size) except the mask
  int top_logprobs;
  int target;  // -1: none
  int dream;   // 0: LLaDA's rule (above); else Dream's (sample_row_dream, no filters), 1 + its DreamAlg
  // RowRule::adjust in its order: add[k] added to token[k]'s logit (-inf: set to -inf), for the draw and
  // everything after it.
  int n_adjust;
  int adjust_token[kMaxAdjust];
  float adjust_add[kMaxAdjust];
};

// TaskDesc::dream: 1 + DreamAlg (core/engine.h: Origin, MaskgitPlus, TopkMargin, Entropy).
constexpr int kDreamOrigin = 1, kDreamMaskgitPlus = 2, kDreamTopkMargin = 3, kDreamEntropy = 4;

constexpr int kMaxTop = 20;

struct TaskResult {
  int token;
  int n_top;
  int finite;  // RowResult::finite
  double probability, confidence, target_logprob;
  int top_token[kMaxTop];
  float top_logprob[kMaxTop];
};

// The logit the draw sees: cfg, then the rule's adjustments (sample_task) and logits_eos_inf (sample_row
// sets it to -inf first).
VDIFF_HD float draw_logit(const TaskDesc& t, const float* cond, const float* uncond, int i) {
  float l = uncond ? cfg_logit(cond[i], uncond[i], t.cfg_scale_plus_one) : cond[i];
  if (!t.sample) return l;
  for (int k = 0; k < t.n_adjust; ++k)
    if (t.adjust_token[k] == i) l = t.adjust_add[k] == -INFINITY ? -INFINITY : add_rn(l, t.adjust_add[k]);
  if (t.logits_eos_inf && i == t.eos) l = -INFINITY;
  return l;
}

// The logit the softmax, the top logprobs and the target see: also confidence_eos_eot_inf (EOS only at
// temperature 0, EOT always, as sample_row does after the draw).
VDIFF_HD float final_logit(const TaskDesc& t, const float* cond, const float* uncond, int i) {
  float l = draw_logit(t, cond, uncond, i);
  if (t.sample && t.confidence_eos_eot_inf && ((t.temperature == 0.0 && i == t.eos) || i == t.eot)) l = -INFINITY;
  return l;
}

// Whether a row's raw logit is one a model can give: not NaN, not +inf (RowResult::finite).
VDIFF_HD bool raw_finite(const float* cond, const float* uncond, int i) {
  return cond[i] < INFINITY && (uncond == nullptr || uncond[i] < INFINITY);
}

// max ignoring NaN, like std::max(max, x) in the CPU sampler.
VDIFF_HD double max_no_nan(double a, double b) { return a < b ? b : (a != a ? b : a); }

// Pass 1 over a row: the softmax's max and the drawn token (argmax, or Gumbel-max at temperature > 0).
struct RowPass {
  double max;
  ArgBest best;
};

VDIFF_HD RowPass row_pass_start() { return RowPass{-INFINITY, arg_none()}; }

VDIFF_HD void row_pass_add(RowPass& p, const TaskDesc& t, const float* cond, const float* uncond, int i) {
  p.max = max_no_nan(p.max, static_cast<double>(final_logit(t, cond, uncond, i)));
  if (t.sample && drawable(i, t.vocab_size, t.mask_token_id)) {
    const float l = draw_logit(t, cond, uncond, i);
    const double score =
        t.temperature > 0.0 ? gumbel_score(l, t.temperature, t.key, static_cast<uint64_t>(i)) : static_cast<double>(l);
    p.best = arg_max(p.best, ArgBest{score, i});
  }
}

VDIFF_HD RowPass row_pass_merge(const RowPass& a, const RowPass& b) {
  return RowPass{max_no_nan(a.max, b.max), arg_max(a.best, b.best)};
}

// Pass 2's term: exp(l - max) in float64 (0 for a row without a usable max).
VDIFF_HD double row_sum_term(const TaskDesc& t, const float* cond, const float* uncond, int i, double max) {
  if (!(max > -INFINITY && max < INFINITY)) return 0.0;
  return exp(static_cast<double>(final_logit(t, cond, uncond, i)) - max);
}

// The result's scalar part from the reductions.
VDIFF_HD void row_finish(const TaskDesc& t, const float* cond, const float* uncond, const RowPass& p, double sum,
                         TaskResult& r) {
  const int token = p.best.index < 0 ? 0 : p.best.index;
  r.token = t.sample ? token : 0;
  r.probability = t.sample ? probability(final_logit(t, cond, uncond, token), p.max, sum) : 0.0;
  r.confidence = !t.sample ? 0.0 : t.random_remasking ? uniform_at(t.key, kConfidenceDraw) : r.probability;
  r.target_logprob = t.target >= 0 ? log_probability(final_logit(t, cond, uncond, t.target), p.max, sum) : 0.0;
  r.n_top = 0;
}

// A candidate for the next top logprob: a drawable token, not NaN, ranked after `previous` (none: any).
VDIFF_HD void top_candidate(ArgBest& pick, const TaskDesc& t, const float* cond, const float* uncond, int i,
                            const ArgBest& previous) {
  if (!drawable(i, t.vocab_size, t.mask_token_id)) return;
  const float l = final_logit(t, cond, uncond, i);
  if (l != l || l == -INFINITY) return;  // a token that cannot be drawn is no alternative
  const ArgBest c{static_cast<double>(l), i};
  if (previous.index >= 0 && !arg_better(previous, c)) return;
  pick = arg_max(pick, c);
}

// ---- Dream's rows (core/sampler.cpp sample_row_dream without its top-p / top-k filters) ----------------
// z = the row at the temperature in float64 (l / T, or l at T = 0), NaN as -inf. Pass 1 folds the largest
// z and the next (DreamPass: the top two of the multiset, so a tie counts twice) and x0 (the argmax of z,
// or Gumbel-max at T > 0, over the drawable tokens; ties to the lower id); pass 2 sums exp(z - max); for
// the entropy a third pass sums p log(p + 1e-10). Threads' passes merge in thread order (the kernel merges
// them one by one in shared memory, as the host emulation does).

VDIFF_HD double dream_z(const TaskDesc& t, const float* cond, const float* uncond, int i) {
  const float l = draw_logit(t, cond, uncond, i);
  const double r = l != l ? -INFINITY : static_cast<double>(l);
  return t.temperature > 0.0 ? r / t.temperature : r;
}

struct DreamPass {
  double z1, z2;  // the largest z and the next (-inf: none)
  ArgBest best;   // x0
};

VDIFF_HD DreamPass dream_pass_start() { return DreamPass{-INFINITY, -INFINITY, arg_none()}; }

VDIFF_HD void dream_top2(DreamPass& p, double z) {
  if (z > p.z1) p.z2 = p.z1, p.z1 = z;
  else if (z > p.z2) p.z2 = z;
}

VDIFF_HD void dream_pass_add(DreamPass& p, const TaskDesc& t, const float* cond, const float* uncond, int i) {
  const double z = dream_z(t, cond, uncond, i);
  dream_top2(p, z);
  if (drawable(i, t.vocab_size, t.mask_token_id)) {
    const double score = t.temperature > 0.0 ? z - log(-log(uniform_at(t.key, static_cast<uint64_t>(i)))) : z;
    p.best = arg_max(p.best, ArgBest{score, i});
  }
}

VDIFF_HD DreamPass dream_pass_merge(const DreamPass& a, const DreamPass& b) {
  DreamPass r = a;
  dream_top2(r, b.z1);
  dream_top2(r, b.z2);
  r.best = arg_max(a.best, b.best);
  return r;
}

// Pass 2's and pass 3's terms (the row's max z finite).
VDIFF_HD double dream_sum_term(const TaskDesc& t, const float* cond, const float* uncond, int i, double max) {
  return exp(dream_z(t, cond, uncond, i) - max);
}
VDIFF_HD double dream_entropy_term(const TaskDesc& t, const float* cond, const float* uncond, int i, double max,
                                   double sum) {
  const double p = exp(dream_z(t, cond, uncond, i) - max) / sum;
  return p * log(p + 1e-10);
}

// Whether the row has a usable distribution (sample_row_dream returns token 0, probability 0 otherwise).
VDIFF_HD bool dream_usable(const DreamPass& p) { return p.z1 > -INFINITY && p.z1 < INFINITY && p.best.index >= 0; }

// token, probability and confidence (negative_entropy: pass 3's sum, for kDreamEntropy).
VDIFF_HD void dream_finish(const TaskDesc& t, const float* cond, const float* uncond, const DreamPass& p, double sum,
                           double negative_entropy, TaskResult& r) {
  r.token = 0;
  r.probability = r.confidence = 0.0;
  r.n_top = 0;
  if (!dream_usable(p)) return;
  r.token = p.best.index;
  r.probability = exp(dream_z(t, cond, uncond, r.token) - p.z1) / sum;
  switch (t.dream) {
    case kDreamTopkMargin: r.confidence = exp(p.z1 - p.z1) / sum - exp(p.z2 - p.z1) / sum; break;
    case kDreamEntropy: r.confidence = negative_entropy; break;
    default: r.confidence = r.probability;  // origin, maskgit_plus
  }
}

}  // namespace vdiff::cuda::ops
