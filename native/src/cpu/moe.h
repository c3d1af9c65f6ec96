// Mixture-of-experts routing, independent of any backend: from the f32 router logits of T tokens
// ([T, E], the f32 product of the normed hidden states and the router matrix, which the backend computes)
// to each token's top-k experts and weights, and from those to the tokens grouped by expert, so that a
// backend runs one matrix product per active expert over a contiguous run of rows (a grouped GEMM over
// sorted tokens, the layout a GPU kernel uses too) instead of a loop over experts per token.
//
// Routers (ModelConfig::router):
//   GroupedSigmoid (LLaDA2, HF LLaDA2MoeGate): s = sigmoid(logit) in f32; b = s + expert_bias (f32) is used
//     for the choice only: the n_group groups of E / n_group consecutive experts are scored by the sum of
//     their two largest b, the topk_group best groups are kept, and the top-k experts by b among the kept
//     groups are chosen. The weights are the unbiased s of the chosen experts, divided by (their sum +
//     1e-20) when top_k > 1 (the HF code normalises whatever norm_topk_prob says), then multiplied by
//     routed_scaling_factor — all in f32.
//   Softmax (Qwen3-MoE, SDAR-MoE): p = softmax(logits) over all E in f32 (max subtracted); the top-k p; when
//     norm_topk_prob, divided by their sum (no epsilon).
//
// Deterministic order, everywhere: a larger score first; equal scores (ties) go to the lower index first —
// for the groups kept, for the experts chosen, and for the order of a token's k slots. A NaN score counts
// as larger than any number (as torch.topk does), NaNs among themselves by index. A token's slots are in
// descending order of the choosing score (b for GroupedSigmoid, p for Softmax), the order torch.topk
// returns, so a combine that sums a token's expert outputs over its slots j = 0 .. k-1 adds them in the
// reference's order.
#pragma once
#include <cstdint>
#include <vector>

#include "core/config.h"

namespace vdiff::cpu {

// The router's settings, from ModelConfig (see router_params) or set directly (tests).
struct RouterParams {
  RouterKind kind = RouterKind::None;
  int n_experts = 0;   // E
  int top_k = 0;       // experts per token
  int n_group = 1;     // GroupedSigmoid: E must be a multiple of n_group, with at least 2 experts per group
  int topk_group = 1;  // groups kept, 1 .. n_group; top_k <= topk_group * E / n_group
  float routed_scaling_factor = 1.0f;
  bool norm_topk_prob = true;  // Softmax only (GroupedSigmoid always normalises when top_k > 1)
};

// The routing settings of a config; throws Error(InvalidModel) naming the key when they do not fit
// (router None with experts, E not a multiple of n_group, top_k larger than the kept experts, ...).
RouterParams router_params(const ModelConfig& config);
// The same checks for params set directly.
void validate(const RouterParams& params);

// Each token's top-k: expert[t * top_k + j] and weight[t * top_k + j], j = 0 .. top_k-1 in the slot order
// above.
struct Routing {
  int tokens = 0;
  int top_k = 0;
  std::vector<int32_t> expert;
  std::vector<float> weight;
};

// Routes T tokens. logits: [T, E] f32, row stride ld (>= E). expert_bias: [E] f32, or nullptr (= zeros;
// GroupedSigmoid only, ignored by Softmax). `out` is resized (its storage is reused across calls).
void route(const RouterParams& params, const float* logits, int tokens, int64_t ld, const float* expert_bias,
           Routing& out);

// The routed slots sorted by expert (a counting sort, stable: within one expert, ascending slot =
// ascending token). For expert e the rows offsets[e] .. offsets[e+1]-1 of the sorted order hold its
// tokens: token[r] (the row of the input to gather), slot[r] (= token * top_k + j, the routed slot, where
// the backend puts the expert's output row for the combine) and weight[r] (that slot's weight).
// active: the experts with at least one token, ascending — one matrix product each.
struct ExpertGroups {
  int n_experts = 0;
  std::vector<int32_t> offsets;  // [E + 1]
  std::vector<int32_t> token;    // [T * top_k]
  std::vector<int32_t> slot;     // [T * top_k]
  std::vector<float> weight;     // [T * top_k]
  std::vector<int32_t> active;
  int count(int e) const { return offsets[e + 1] - offsets[e]; }
};

void group_by_expert(const Routing& routing, int n_experts, ExpertGroups& out);

// Process-wide counters of group_by_expert (relaxed atomics; for benchmarks): calls, the active experts
// they found (summed over calls: with one call per MoE layer and forward, the distinct experts whose
// weights a forward reads) and the routed slots.
struct GroupingCounters {
  uint64_t calls = 0;
  uint64_t active_experts = 0;
  uint64_t slots = 0;
};
GroupingCounters grouping_counters();

}  // namespace vdiff::cpu
