// Mixture-of-experts routing and the grouping of tokens by expert (moe.h has the rules).
#include "cpu/moe.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <string>

#include "core/error.h"

namespace vdiff::cpu {
namespace {

// The total order of every choice: larger first, NaN above every number, ties to the lower index.
inline bool before(float a, int ia, float b, int ib) {
  const bool na = std::isnan(a), nb = std::isnan(b);
  if (na != nb) return na;
  if (!na && a != b) return a > b;
  return ia < ib;
}

// The indices of the k best of score[0 .. n) in that order, written to `out` (k entries); `idx` scratch.
void top_k(const float* score, int n, int k, std::vector<int32_t>& idx, int32_t* out) {
  idx.resize(n);
  for (int i = 0; i < n; ++i) idx[i] = i;
  std::partial_sort(idx.begin(), idx.begin() + k, idx.end(),
                    [score](int32_t a, int32_t b) { return before(score[a], a, score[b], b); });
  std::copy(idx.begin(), idx.begin() + k, out);
}

[[noreturn]] void bad(const std::string& key, const std::string& what) {
  throw Error(ErrorCode::InvalidModel, "MoE router: " + key + " " + what, key);
}

std::atomic<uint64_t> g_calls{0}, g_active{0}, g_slots{0};

}  // namespace

GroupingCounters grouping_counters() {
  GroupingCounters c;
  c.calls = g_calls.load(std::memory_order_relaxed);
  c.active_experts = g_active.load(std::memory_order_relaxed);
  c.slots = g_slots.load(std::memory_order_relaxed);
  return c;
}

void validate(const RouterParams& p) {
  if (p.kind == RouterKind::None) bad("router", "is none but the model has experts");
  if (p.n_experts < 1) bad("num_experts", "must be at least 1");
  if (p.top_k < 1 || p.top_k > p.n_experts)
    bad("num_experts_per_tok",
        "must be 1 .. num_experts (" + std::to_string(p.n_experts) + "), got " + std::to_string(p.top_k));
  if (p.kind == RouterKind::GroupedSigmoid) {
    if (p.n_group < 1 || p.n_experts % p.n_group != 0)
      bad("n_group", "must divide num_experts (" + std::to_string(p.n_experts) + "), got " + std::to_string(p.n_group));
    if (p.n_experts / p.n_group < 2) bad("n_group", "leaves fewer than 2 experts per group (a group scores its top 2)");
    if (p.topk_group < 1 || p.topk_group > p.n_group)
      bad("topk_group",
          "must be 1 .. n_group (" + std::to_string(p.n_group) + "), got " + std::to_string(p.topk_group));
    if (p.top_k > p.topk_group * (p.n_experts / p.n_group))
      bad("num_experts_per_tok", "is larger than the experts of the topk_group kept groups");
  }
  if (!std::isfinite(p.routed_scaling_factor)) bad("routed_scaling_factor", "must be finite");
}

RouterParams router_params(const ModelConfig& c) {
  RouterParams p;
  p.kind = c.router;
  p.n_experts = c.n_experts;
  p.top_k = c.experts_per_token;
  p.n_group = c.n_group;
  p.topk_group = c.topk_group;
  p.routed_scaling_factor = static_cast<float>(c.routed_scaling_factor);
  p.norm_topk_prob = c.norm_topk_prob;
  validate(p);
  return p;
}

void route(const RouterParams& p, const float* logits, int tokens, int64_t ld, const float* expert_bias, Routing& out) {
  const int E = p.n_experts, K = p.top_k;
  out.tokens = tokens;
  out.top_k = K;
  out.expert.resize(static_cast<size_t>(tokens) * K);
  out.weight.resize(static_cast<size_t>(tokens) * K);
  std::vector<float> score(E), choice(E);
  std::vector<int32_t> idx;

  if (p.kind == RouterKind::GroupedSigmoid) {
    const int G = p.n_group, per = E / G;
    std::vector<float> group_score(G);
    std::vector<int32_t> kept(p.topk_group);
    std::vector<char> keep(G);
    for (int t = 0; t < tokens; ++t) {
      const float* row = logits + t * ld;
      for (int e = 0; e < E; ++e) {
        score[e] = 1.0f / (1.0f + std::exp(-row[e]));
        choice[e] = expert_bias ? score[e] + expert_bias[e] : score[e];
      }
      if (G > 1) {
        for (int g = 0; g < G; ++g) {
          // The two largest biased scores of the group (in the same total order), summed in f32.
          const float* s = choice.data() + g * per;
          int first = 0, second = 1;
          if (before(s[1], 1, s[0], 0)) std::swap(first, second);
          for (int i = 2; i < per; ++i) {
            if (before(s[i], i, s[first], first)) {
              second = first;
              first = i;
            } else if (before(s[i], i, s[second], second)) {
              second = i;
            }
          }
          group_score[g] = s[first] + s[second];
        }
        top_k(group_score.data(), G, p.topk_group, idx, kept.data());
        std::fill(keep.begin(), keep.end(), 0);
        for (int32_t g : kept) keep[g] = 1;
        for (int e = 0; e < E; ++e)
          if (!keep[e / per]) choice[e] = -INFINITY;
      }
      int32_t* chosen = out.expert.data() + static_cast<size_t>(t) * K;
      float* w = out.weight.data() + static_cast<size_t>(t) * K;
      top_k(choice.data(), E, K, idx, chosen);
      float sum = 0.0f;
      for (int j = 0; j < K; ++j) {
        w[j] = score[chosen[j]];
        sum += w[j];
      }
      const float denom = sum + 1e-20f;
      for (int j = 0; j < K; ++j) {
        if (K > 1) w[j] = w[j] / denom;
        w[j] = w[j] * p.routed_scaling_factor;
      }
    }
  } else if (p.kind == RouterKind::Softmax) {
    for (int t = 0; t < tokens; ++t) {
      const float* row = logits + t * ld;
      float mx = row[0];
      for (int e = 1; e < E; ++e) mx = std::max(mx, row[e]);
      float total = 0.0f;
      for (int e = 0; e < E; ++e) {
        score[e] = std::exp(row[e] - mx);
        total += score[e];
      }
      for (int e = 0; e < E; ++e) score[e] = score[e] / total;
      int32_t* chosen = out.expert.data() + static_cast<size_t>(t) * K;
      float* w = out.weight.data() + static_cast<size_t>(t) * K;
      top_k(score.data(), E, K, idx, chosen);
      float sum = 0.0f;
      for (int j = 0; j < K; ++j) {
        w[j] = score[chosen[j]];
        sum += w[j];
      }
      if (p.norm_topk_prob)
        for (int j = 0; j < K; ++j) w[j] = w[j] / sum;
    }
  } else {
    validate(p);  // throws: RouterKind::None
  }
}

void group_by_expert(const Routing& r, int n_experts, ExpertGroups& out) {
  const size_t slots = static_cast<size_t>(r.tokens) * r.top_k;
  out.n_experts = n_experts;
  out.offsets.assign(n_experts + 1, 0);
  out.token.resize(slots);
  out.slot.resize(slots);
  out.weight.resize(slots);
  out.active.clear();
  for (size_t s = 0; s < slots; ++s) {
    const int e = r.expert[s];
    if (e < 0 || e >= n_experts)
      throw Error(ErrorCode::Internal, "group_by_expert: expert " + std::to_string(e) + " out of range");
    ++out.offsets[e + 1];
  }
  for (int e = 0; e < n_experts; ++e) {
    if (out.offsets[e + 1] > 0) out.active.push_back(e);
    out.offsets[e + 1] += out.offsets[e];
  }
  std::vector<int32_t> next(out.offsets.begin(), out.offsets.end() - 1);
  for (size_t s = 0; s < slots; ++s) {
    const int32_t row = next[r.expert[s]]++;
    out.token[row] = static_cast<int32_t>(s / r.top_k);
    out.slot[row] = static_cast<int32_t>(s);
    out.weight[row] = r.weight[s];
  }
  g_calls.fetch_add(1, std::memory_order_relaxed);
  g_active.fetch_add(out.active.size(), std::memory_order_relaxed);
  g_slots.fetch_add(slots, std::memory_order_relaxed);
}

}  // namespace vdiff::cpu
