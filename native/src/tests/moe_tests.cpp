// Mixture-of-experts routing (cpu/moe.h) against a float64 naive reference: the LLaDA2 grouped-sigmoid
// router (groups that hold a top-k expert by score excluded, the bias changing the choice but not the
// weights, ties), the Qwen3-MoE softmax router, the grouping of tokens by expert and a grouped product
// over it against a per-token sum, and the config checks.
#include "cpu/moe.h"
#include "tests/harness.h"

namespace vdiff::test {
namespace {

using cpu::ExpertGroups;
using cpu::RouterParams;
using cpu::Routing;

// The reference: every number in double, choices by sorting (score descending, index ascending).
struct RefRoute {
  std::vector<int> expert;
  std::vector<double> weight;
};

std::vector<int> ref_order(const std::vector<double>& score) {
  std::vector<int> idx(score.size());
  for (size_t i = 0; i < idx.size(); ++i) idx[i] = static_cast<int>(i);
  std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) { return score[a] > score[b]; });
  return idx;
}

RefRoute ref_route(const RouterParams& p, const float* logits, const float* bias) {
  const int E = p.n_experts;
  RefRoute r;
  std::vector<double> s(E), b(E);
  if (p.kind == RouterKind::GroupedSigmoid) {
    for (int e = 0; e < E; ++e) {
      s[e] = 1.0 / (1.0 + std::exp(-static_cast<double>(logits[e])));
      b[e] = s[e] + (bias ? bias[e] : 0.0);
    }
    const int per = E / p.n_group;
    std::vector<double> gs(p.n_group);
    for (int g = 0; g < p.n_group; ++g) {
      std::vector<double> in(b.begin() + g * per, b.begin() + (g + 1) * per);
      std::sort(in.begin(), in.end(), std::greater<double>());
      gs[g] = in[0] + in[1];
    }
    auto gorder = ref_order(gs);
    std::vector<bool> keep(p.n_group, false);
    for (int i = 0; i < p.topk_group; ++i) keep[gorder[i]] = true;
    for (int e = 0; e < E; ++e)
      if (!keep[e / per]) b[e] = -INFINITY;
    auto order = ref_order(b);
    double sum = 0;
    for (int j = 0; j < p.top_k; ++j) sum += s[order[j]];
    for (int j = 0; j < p.top_k; ++j) {
      r.expert.push_back(order[j]);
      double w = s[order[j]];
      if (p.top_k > 1) w /= sum + 1e-20;
      r.weight.push_back(w * p.routed_scaling_factor);
    }
  } else {
    double mx = -INFINITY, total = 0;
    for (int e = 0; e < E; ++e) mx = std::max(mx, static_cast<double>(logits[e]));
    for (int e = 0; e < E; ++e) total += s[e] = std::exp(logits[e] - mx);
    for (int e = 0; e < E; ++e) s[e] /= total;
    auto order = ref_order(s);
    double sum = 0;
    for (int j = 0; j < p.top_k; ++j) sum += s[order[j]];
    for (int j = 0; j < p.top_k; ++j) {
      r.expert.push_back(order[j]);
      r.weight.push_back(p.norm_topk_prob ? s[order[j]] / sum : s[order[j]]);
    }
  }
  return r;
}

// Checks route() against the reference on every token: the same experts in the same order, weights to a
// relative 1e-5.
void check_against_reference(const std::string& name, const RouterParams& p, const std::vector<float>& logits,
                             int tokens, const float* bias) {
  Routing r;
  cpu::route(p, logits.data(), tokens, p.n_experts, bias, r);
  int choice_mismatch = 0;
  double worst = 0;
  for (int t = 0; t < tokens; ++t) {
    RefRoute ref = ref_route(p, logits.data() + static_cast<size_t>(t) * p.n_experts, bias);
    for (int j = 0; j < p.top_k; ++j) {
      if (r.expert[t * p.top_k + j] != ref.expert[j]) ++choice_mismatch;
      worst = std::max(worst, std::abs(r.weight[t * p.top_k + j] - ref.weight[j]) / std::abs(ref.weight[j]));
    }
  }
  report(choice_mismatch == 0 && worst < 1e-5 && r.tokens == tokens && r.top_k == p.top_k, name,
         fmt("%g tokens, %g choice mismatches, max weight rel err %.2e", tokens, choice_mismatch, worst));
}

RouterParams llada2_params(int E, int k, int groups, int kept, float scale) {
  RouterParams p;
  p.kind = RouterKind::GroupedSigmoid;
  p.n_experts = E;
  p.top_k = k;
  p.n_group = groups;
  p.topk_group = kept;
  p.routed_scaling_factor = scale;
  return p;
}

// logit of a wanted sigmoid score
float logit(double s) { return static_cast<float>(std::log(s / (1 - s))); }

bool contains(const int32_t* v, int n, int x) { return std::find(v, v + n, x) != v + n; }

void test_grouped_random() {
  std::mt19937 rng(23);
  // The llada2-mini router shape: 256 experts in 8 groups, 4 kept, top-8, x2.5; bias as trained models
  // have it (small, of either sign).
  RouterParams p = llada2_params(256, 8, 8, 4, 2.5f);
  const int T = 64;
  auto logits = random_floats(static_cast<size_t>(T) * 256, rng, 2.0f);
  auto bias = random_floats(256, rng, 0.05f);
  check_against_reference("moe: grouped sigmoid (256 experts, 8 groups, keep 4, top 8) = f64 reference", p, logits, T,
                          bias.data());
  check_against_reference("moe: grouped sigmoid without bias = f64 reference", p, logits, T, nullptr);
  // How often the group limit mattered: a token whose best-by-score experts are not all chosen.
  Routing r;
  cpu::route(p, logits.data(), T, 256, bias.data(), r);
  int excluded = 0;
  for (int t = 0; t < T; ++t) {
    std::vector<double> b(256);
    for (int e = 0; e < 256; ++e) b[e] = 1.0 / (1.0 + std::exp(-logits[t * 256 + e])) + bias[e];
    auto order = ref_order(b);
    for (int j = 0; j < 8; ++j)
      if (!contains(r.expert.data() + t * 8, 8, order[j])) {
        ++excluded;
        break;
      }
  }
  report(excluded > 0, "moe: random tokens where the group limit excluded a top-8 expert",
         fmt("%g of %g tokens", excluded, T));
  // One group (n_group 1): a plain top-k of the biased scores; top_k 1 is not normalised.
  check_against_reference("moe: sigmoid, one group, top 4 = f64 reference", llada2_params(32, 4, 1, 1, 1.0f), logits, T,
                          bias.data());
  check_against_reference("moe: sigmoid top 1 (weight not normalised) = f64 reference",
                          llada2_params(32, 1, 4, 2, 2.5f), logits, T, bias.data());
}

void test_group_exclusion() {
  // 16 experts, 4 groups of 4, keep 2 groups, top 3. Group 0 holds the best expert by score (0.99) but its
  // second is poor; groups 1 and 2 have two good experts each, so they win on the top-2 sum and expert 0 is
  // excluded although a plain top-3 would choose it.
  RouterParams p = llada2_params(16, 3, 4, 2, 2.5f);
  std::vector<double> s = {0.99, 0.05, 0.04, 0.03,  //
                           0.80, 0.75, 0.10, 0.10,  //
                           0.70, 0.72, 0.20, 0.10,  //
                           0.60, 0.10, 0.10, 0.10};
  std::vector<float> logits;
  for (double v : s) logits.push_back(logit(v));
  Routing r;
  cpu::route(p, logits.data(), 1, 16, nullptr, r);
  auto plain = ref_order(s);
  bool precondition = plain[0] == 0;  // expert 0 is the best by score
  bool ok = precondition && !contains(r.expert.data(), 3, 0) && r.expert == std::vector<int32_t>{4, 5, 9};
  report(ok, "moe: group limit excludes the group holding the top expert by score",
         fmt("chosen %g %g %g", r.expert[0], r.expert[1], r.expert[2]));
  double sum = 0.80 + 0.75 + 0.72;
  double worst = 0;
  const double want[3] = {0.80, 0.75, 0.72};
  for (int j = 0; j < 3; ++j) worst = std::max(worst, std::abs(r.weight[j] - want[j] / sum * 2.5));
  report(worst < 1e-6, "moe: weights of the kept experts = unbiased scores / sum x 2.5", fmt("max err %.2e", worst));
  check_against_reference("moe: group exclusion case = f64 reference", p, logits, 1, nullptr);
}

void test_bias_choice_not_weights() {
  // 8 experts, 2 groups of 4, keep both, top 2. Without bias experts 0 and 1 win; a bias on expert 6 makes
  // it chosen instead of 1, and its weight is its own unbiased score.
  RouterParams p = llada2_params(8, 2, 2, 2, 2.5f);
  std::vector<double> s = {0.90, 0.80, 0.30, 0.20, 0.10, 0.20, 0.70, 0.15};
  std::vector<float> logits, bias(8, 0.0f);
  for (double v : s) logits.push_back(logit(v));
  bias[6] = 0.25f;  // 0.7 + 0.25 > 0.9: expert 6 first, then 0, and 1 (0.8) drops out
  Routing plain, biased;
  cpu::route(p, logits.data(), 1, 8, nullptr, plain);
  cpu::route(p, logits.data(), 1, 8, bias.data(), biased);
  report(plain.expert == std::vector<int32_t>{0, 1} && biased.expert == std::vector<int32_t>{6, 0},
         "moe: expert bias changes the choice (slots in biased-score order)",
         fmt("without %g,%g; with %g", plain.expert[0], plain.expert[1], biased.expert[0]));
  const double sum = 0.90 + 0.70;
  double err = std::max(std::abs(biased.weight[0] - 0.70 / sum * 2.5), std::abs(biased.weight[1] - 0.90 / sum * 2.5));
  report(err < 1e-6, "moe: expert bias does not enter the weights (unbiased 0.7 and 0.9 normalised)",
         fmt("weights %.6f %.6f", biased.weight[0], biased.weight[1]));
  check_against_reference("moe: bias case = f64 reference", p, logits, 1, bias.data());
  // A bias that moves a whole group: group 1 (experts 4..7) kept only because of its bias.
  RouterParams one = llada2_params(8, 2, 2, 1, 1.0f);
  std::vector<float> gbias = {0, 0, 0, 0, 0.5f, 0.5f, 0.5f, 0.5f};
  Routing a, b;
  cpu::route(one, logits.data(), 1, 8, nullptr, a);
  cpu::route(one, logits.data(), 1, 8, gbias.data(), b);
  report(a.expert == std::vector<int32_t>{0, 1} && b.expert == std::vector<int32_t>{6, 5},
         "moe: expert bias moves the kept group", fmt("without %g,%g; with %g", a.expert[0], a.expert[1], b.expert[0]));
}

void test_ties() {
  // Every score equal: groups 0 .. topk_group-1 kept, the lowest experts chosen, in index order.
  RouterParams p = llada2_params(16, 3, 4, 2, 2.5f);
  std::vector<float> flat(16, 0.25f);
  Routing r;
  cpu::route(p, flat.data(), 1, 16, nullptr, r);
  bool w_ok = true;
  for (float w : r.weight) w_ok = w_ok && std::abs(w - 2.5f / 3) < 1e-6;
  report(r.expert == std::vector<int32_t>{0, 1, 2} && w_ok, "moe: all-equal scores choose the lowest experts first",
         fmt("%g %g %g", r.expert[0], r.expert[1], r.expert[2]));
  // Group ties: groups 1 and 3 have the same top-2 sum, only one can be kept: group 1 (lower index).
  std::vector<float> g(16, logit(0.1));
  g[5] = g[6] = logit(0.6);
  g[13] = g[14] = logit(0.6);
  RouterParams keep1 = llada2_params(16, 2, 4, 1, 1.0f);
  cpu::route(keep1, g.data(), 1, 16, nullptr, r);
  report(r.expert == std::vector<int32_t>{5, 6}, "moe: tied groups keep the lower group",
         fmt("%g %g", r.expert[0], r.expert[1]));
  // An expert tie at the top-k boundary: experts 3 and 11 tie for the last slot; 3 wins.
  std::vector<float> b(16, logit(0.1));
  b[7] = logit(0.9);
  b[3] = b[11] = logit(0.5);
  cpu::route(llada2_params(16, 2, 4, 4, 1.0f), b.data(), 1, 16, nullptr, r);
  report(r.expert == std::vector<int32_t>{7, 3}, "moe: an expert tie at the boundary goes to the lower index",
         fmt("%g %g", r.expert[0], r.expert[1]));
  // Softmax ties, the same rule.
  RouterParams sm;
  sm.kind = RouterKind::Softmax;
  sm.n_experts = 8;
  sm.top_k = 3;
  std::vector<float> st = {0.0f, 1.0f, 1.0f, 0.0f, 1.0f, 1.0f, 0.0f, 0.0f};
  cpu::route(sm, st.data(), 1, 8, nullptr, r);
  report(r.expert == std::vector<int32_t>{1, 2, 4} && std::abs(r.weight[0] - 1.0f / 3) < 1e-6,
         "moe: softmax ties go to the lower index", fmt("%g %g %g", r.expert[0], r.expert[1], r.expert[2]));
}

void test_softmax_random() {
  std::mt19937 rng(7);
  RouterParams p;
  p.kind = RouterKind::Softmax;
  p.n_experts = 128;
  p.top_k = 8;
  const int T = 48;
  auto logits = random_floats(static_cast<size_t>(T) * 128, rng, 3.0f);
  check_against_reference("moe: softmax top 8 of 128, renormalised = f64 reference", p, logits, T, nullptr);
  p.norm_topk_prob = false;
  check_against_reference("moe: softmax top 8 of 128, not renormalised = f64 reference", p, logits, T, nullptr);
  // The bias is a GroupedSigmoid thing: Softmax ignores it.
  Routing a, b;
  std::vector<float> bias(128, 0.0f);
  bias[5] = 100.0f;
  cpu::route(p, logits.data(), T, 128, nullptr, a);
  cpu::route(p, logits.data(), T, 128, bias.data(), b);
  report(a.expert == b.expert && a.weight == b.weight, "moe: softmax router ignores expert_bias");
  // Large logits do not overflow (the max is subtracted).
  std::vector<float> big = {1000.0f, 999.0f, -1000.0f, 998.0f};
  RouterParams q;
  q.kind = RouterKind::Softmax;
  q.n_experts = 4;
  q.top_k = 2;
  check_against_reference("moe: softmax with logits near 1000 = f64 reference", q, big, 1, nullptr);
}

void test_grouping_and_product() {
  std::mt19937 rng(5);
  RouterParams p = llada2_params(32, 4, 4, 2, 2.5f);
  const int T = 37, D = 24, N = 20;
  auto logits = random_floats(static_cast<size_t>(T) * 32, rng, 2.0f);
  // A row stride larger than E.
  std::vector<float> strided(static_cast<size_t>(T) * 40, 99.0f);
  for (int t = 0; t < T; ++t) std::copy_n(logits.data() + t * 32, 32, strided.data() + t * 40);
  Routing r, rs;
  cpu::route(p, logits.data(), T, 32, nullptr, r);
  cpu::route(p, strided.data(), T, 40, nullptr, rs);
  report(r.expert == rs.expert && r.weight == rs.weight, "moe: route reads rows at the given stride");

  ExpertGroups g;
  const cpu::GroupingCounters before = cpu::grouping_counters();
  cpu::group_by_expert(r, 32, g);
  const cpu::GroupingCounters after = cpu::grouping_counters();
  report(after.calls == before.calls + 1 && after.active_experts == before.active_experts + g.active.size() &&
             after.slots == before.slots + T * 4,
         "moe: grouping counters count calls, active experts and slots");
  bool ok = g.offsets.front() == 0 && g.offsets.back() == T * 4;
  std::vector<int> seen(T * 4, 0);
  int active = 0;
  for (int e = 0; e < 32; ++e) {
    if (g.count(e) > 0) ++active;
    for (int row = g.offsets[e]; row < g.offsets[e + 1]; ++row) {
      const int s = g.slot[row];
      ok = ok && r.expert[s] == e && g.token[row] == s / 4 && g.weight[row] == r.weight[s];
      if (row > g.offsets[e]) ok = ok && g.token[row] > g.token[row - 1];  // ascending tokens per expert
      ++seen[s];
    }
  }
  for (int c : seen) ok = ok && c == 1;
  bool active_ok = static_cast<int>(g.active.size()) == active && std::is_sorted(g.active.begin(), g.active.end());
  for (int e : g.active) active_ok = active_ok && g.count(e) > 0;
  report(ok && active_ok, "moe: group_by_expert is a stable sort of every slot by expert",
         fmt("%g active experts of 32, %g slots", active, T * 4));

  // A grouped product over the sorted layout (one gemm per active expert over its gathered rows, outputs
  // scattered to their slots, then summed per token over its slots) = the per-token sum in double.
  auto x = random_floats(static_cast<size_t>(T) * D, rng, 1.0f);
  std::vector<std::vector<float>> W(32);
  for (auto& w : W) w = random_floats(static_cast<size_t>(N) * D, rng, 0.3f);
  const cpu::Kernels& k = cpu::active_kernels();
  std::vector<float> gathered, out, slot_out(static_cast<size_t>(T) * 4 * N);
  AlignedFloats scratch(k.gemm_scratch_floats(D));
  for (int e : g.active) {
    const int M = g.count(e);
    gathered.resize(static_cast<size_t>(M) * D);
    out.resize(static_cast<size_t>(M) * N);
    for (int i = 0; i < M; ++i) std::copy_n(x.data() + g.token[g.offsets[e] + i] * D, D, gathered.data() + i * D);
    cpu::MatB B;
    B.data = W[e].data();
    B.type = WType::F32;
    B.ld = D;
    k.gemm(M, 0, N, D, gathered.data(), D, B, out.data(), N, false, scratch.p);
    for (int i = 0; i < M; ++i) std::copy_n(out.data() + i * N, N, slot_out.data() + g.slot[g.offsets[e] + i] * N);
  }
  double worst = 0;
  for (int t = 0; t < T; ++t)
    for (int n = 0; n < N; ++n) {
      double got = 0, want = 0;
      for (int j = 0; j < 4; ++j) {
        got += static_cast<double>(r.weight[t * 4 + j]) * slot_out[(t * 4 + j) * N + n];
        const int e = r.expert[t * 4 + j];
        double dot = 0;
        for (int d = 0; d < D; ++d) dot += static_cast<double>(x[t * D + d]) * W[e][n * D + d];
        want += r.weight[t * 4 + j] * dot;
      }
      worst = std::max(worst, std::abs(got - want));
    }
  report(worst < 1e-4, "moe: grouped product over sorted tokens = per-token sum (f64)", fmt("max abs err %.2e", worst));

  // Empty input.
  cpu::route(p, logits.data(), 0, 32, nullptr, r);
  cpu::group_by_expert(r, 32, g);
  report(r.expert.empty() && g.active.empty() && g.offsets.back() == 0, "moe: zero tokens route to nothing");
}

void test_router_params() {
  ModelConfig c;
  c.n_experts = 256;
  c.experts_per_token = 8;
  c.n_group = 8;
  c.topk_group = 4;
  c.routed_scaling_factor = 2.5;
  c.router = RouterKind::GroupedSigmoid;
  RouterParams p = cpu::router_params(c);
  report(p.n_experts == 256 && p.top_k == 8 && p.n_group == 8 && p.topk_group == 4 && p.routed_scaling_factor == 2.5f,
         "moe: router_params from the llada2-mini config");
  auto with = [&](auto change) {
    ModelConfig d = c;
    change(d);
    return d;
  };
  expect_error("moe: n_group must divide num_experts", ErrorCode::InvalidModel, {"n_group"},
               [&] { cpu::router_params(with([](ModelConfig& d) { d.n_group = 7; })); });
  expect_error("moe: one expert per group is refused", ErrorCode::InvalidModel, {"n_group"},
               [&] { cpu::router_params(with([](ModelConfig& d) { d.n_group = 256; })); });
  expect_error("moe: topk_group above n_group is refused", ErrorCode::InvalidModel, {"topk_group"},
               [&] { cpu::router_params(with([](ModelConfig& d) { d.topk_group = 9; })); });
  expect_error("moe: top_k above the kept groups' experts is refused", ErrorCode::InvalidModel, {"num_experts_per_tok"},
               [&] {
                 cpu::router_params(with([](ModelConfig& d) {
                   d.topk_group = 1;
                   d.experts_per_token = 33;
                 }));
               });
  expect_error("moe: experts without a router are refused", ErrorCode::InvalidModel, {"router"},
               [&] { cpu::router_params(with([](ModelConfig& d) { d.router = RouterKind::None; })); });
  // Softmax ignores the group settings.
  p = cpu::router_params(with([](ModelConfig& d) {
    d.router = RouterKind::Softmax;
    d.n_group = 7;
  }));
  report(p.kind == RouterKind::Softmax, "moe: softmax router ignores n_group");
}

}  // namespace

void test_moe() {
  test_grouped_random();
  test_group_exclusion();
  test_bias_choice_not_weights();
  test_ties();
  test_softmax_random();
  test_grouping_and_product();
  test_router_params();
}

}  // namespace vdiff::test
