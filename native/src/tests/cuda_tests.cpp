// vdiff-cuda-tests: the CUDA backend's checks.
//
// Host part (every machine): the per-element arithmetic of the CUDA kernels (cuda/ops.h) run on the CPU
// against the CPU backend's kernels and sampler — conversions, the RMSNorm row, the RoPE pair, SwiGLU, the
// online softmax, and the vocabulary reduction emulated with a few strided "threads" against sample_task —
// and `--device cuda` failing cleanly where no GPU is visible.
//
// Device part (a GPU visible): op parity of every kernel against CPU references, the CUDA backend against
// the CPU backend (plain and KV-cached forwards, predict), the golden fixtures on CUDA (logits, and the
// generated tokens: exact for f32 models, agreement reported for bf16/f16), and batch invariance. Without
// a GPU it prints "SKIPPED: no CUDA device (<reason>)" and exits 0 when the host part passed, unless
// --require-device (bench/gpu/run.sh: a GPU machine whose driver the runtime cannot use must not pass).
//
//   vdiff-cuda-tests [--golden DIR] [--host-only] [--require-device]
#include <cinttypes>

#include "core/backend.h"
#include "core/engine.h"
#include "core/rng.h"
#include "core/sampler.h"
#include "cpu/moe.h"
#include "cuda/attention_tile.h"
#include "cuda/ops.h"
#include "cuda/tasks.h"
#include "tests/model_fixtures.h"
#ifndef VDIFF_WITH_CUDA
#define VDIFF_WITH_CUDA 0
#endif
#if VDIFF_WITH_CUDA
#include "cuda/cuda_backend.h"
#include "cuda/testing.h"
#endif

namespace vdiff::test {

namespace ops = cuda::ops;

// ‖a − b‖∞ / max(‖b‖∞, tiny)
double rel_inf(const float* a, const float* b, size_t n) {
  double worst = 0, scale = 1e-30;
  for (size_t i = 0; i < n; ++i) {
    const double d = std::fabs(double(a[i]) - double(b[i]));
    worst = std::isnan(d) ? INFINITY : std::max(worst, d);
    scale = std::max(scale, std::fabs(double(b[i])));
  }
  return worst / scale;
}
double rel_inf(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() ? rel_inf(a.data(), b.data(), a.size()) : INFINITY;
}

// ================================================================================================
// Host checks of ops.h

void host_conversions() {
  int bad_bf16 = 0, bad_f16 = 0;
  for (uint32_t h = 0; h < 65536; ++h) {
    const float a = ops::bf16_to_f32(static_cast<uint16_t>(h)), b = cpu::bf16_to_f32(static_cast<uint16_t>(h));
    const float c = ops::f16_to_f32(static_cast<uint16_t>(h)), d = cpu::f16_to_f32(static_cast<uint16_t>(h));
    bad_bf16 += std::memcmp(&a, &b, 4) != 0;
    bad_f16 += std::memcmp(&c, &d, 4) != 0;
  }
  report(bad_bf16 == 0 && bad_f16 == 0, "host ops: bf16 and f16 -> f32 equal the CPU's on all 65536 bit patterns",
         std::to_string(bad_bf16) + " bf16, " + std::to_string(bad_f16) + " f16 differ");
  std::mt19937 rng(1);
  std::vector<float> values = random_floats(100000, rng, 3.0f);
  values.push_back(0.0f), values.push_back(-0.0f), values.push_back(INFINITY), values.push_back(1e-40f);
  int bad = 0;
  for (float f : values) bad += ops::f32_to_bf16(f) != f32_to_bf16_bits(f);
  const float nan = std::nanf("");
  const bool nan_ok = std::isnan(ops::bf16_to_f32(ops::f32_to_bf16(nan)));
  report(bad == 0 && nan_ok, "host ops: f32 -> bf16 rounds to nearest even (the KV cache's conversion), NaN stays NaN",
         std::to_string(bad) + " of " + std::to_string(values.size()) + " differ");
}

// The kernel's RMSNorm row with `threads` strided partial sums merged in a tree, as a block does.
void emulated_rmsnorm(const float* x, const float* w, float* y, int n, float eps, int threads) {
  std::vector<float> partial(threads, 0.0f);
  for (int t = 0; t < threads; ++t)
    for (int j = t; j < n; j += threads) partial[t] += x[j] * x[j];
  for (int width = 1; width < threads; width *= 2)
    for (int t = 0; t + width < threads; t += 2 * width) partial[t] += partial[t + width];
  const float inverse = ops::rms_inverse(partial[0], n, eps);
  for (int j = 0; j < n; ++j) y[j] = ops::rms_apply(x[j], inverse, w[j]);
}

void host_rmsnorm() {
  std::mt19937 rng(2);
  double worst = 0;
  for (const Kernels* k : {&cpu::active_kernels(), cpu::portable_kernels()})
    for (int n : {8, 37, 512, 4096}) {
      std::vector<float> x = random_floats(n, rng, 2.0f), w = random_floats(n, rng, 0.3f), a(n), b(n);
      for (float& v : w) v += 1.0f;
      emulated_rmsnorm(x.data(), w.data(), a.data(), n, 1e-5f, 256);
      k->rmsnorm(x.data(), w.data(), b.data(), n, 1e-5f);
      worst = std::max(worst, rel_inf(a, b));
    }
  report(worst < 2e-6, "host ops: RMSNorm row (rms_inverse, rms_apply, tree-summed) against the CPU kernels",
         fmt("max rel diff %.1e", worst));
}

void host_rope() {
  // The PyTorch reference's formula in float64: x * cos + rotate_half(x) * sin, angles in float64.
  std::mt19937 rng(3);
  const int hd = 128, half = hd / 2;
  double worst = 0;
  for (int pos : {0, 1, 17, 159, 543, 4095}) {
    std::vector<float> x = random_floats(hd, rng), y = x;
    std::vector<double> want(hd);
    for (int i = 0; i < half; ++i) {
      const double angle = pos * (1.0 / std::pow(500000.0, 2.0 * i / hd));
      const float c = static_cast<float>(std::cos(angle)), s = static_cast<float>(std::sin(angle));
      ops::rope_pair(y[i], y[i + half], c, s);
      want[i] = double(x[i]) * c - double(x[i + half]) * s;
      want[i + half] = double(x[i + half]) * c + double(x[i]) * s;
    }
    for (int i = 0; i < hd; ++i) worst = std::max(worst, std::fabs(y[i] - want[i]));
  }
  report(worst < 1e-6, "host ops: RoPE pair (NeoX rotate-half) against the float64 formula",
         fmt("max |diff| %.1e", worst));
}

void host_silu() {
  std::mt19937 rng(4);
  std::vector<float> g = random_floats(10000, rng, 4.0f), u = random_floats(10000, rng), a(g.size()), b(g.size()),
                     c(g.size());
  for (size_t i = 0; i < g.size(); ++i) a[i] = ops::silu_mul(g[i], u[i]);
  cpu::portable_kernels()->silu_mul(g.data(), u.data(), b.data(), static_cast<int>(g.size()));
  cpu::active_kernels().silu_mul(g.data(), u.data(), c.data(), static_cast<int>(g.size()));
  const bool same = std::memcmp(a.data(), b.data(), a.size() * 4) == 0;
  const double active = rel_inf(a, c);
  report(same && active < 1e-6,
         "host ops: SwiGLU equals the portable kernel bit for bit, the " + std::string(cpu::active_kernels().isa) +
             " one to rounding",
         fmt("max rel diff to the active ISA %.1e", active));
}

void host_online_softmax() {
  // Attention's per-tile merge against the CPU's two-pass softmax followed by P · V.
  std::mt19937 rng(5);
  const Kernels& k = cpu::active_kernels();
  double worst = 0;
  for (int n : {1, 5, 32, 33, 160, 544}) {
    for (int tile : {1, 7, 32}) {
      const int dim = 16;
      std::vector<float> s = random_floats(n, rng, 4.0f), v = random_floats(static_cast<size_t>(n) * dim, rng);
      const float scale = 0.125f;
      ops::SoftmaxState state = ops::softmax_start();
      std::vector<float> acc(dim, 0.0f);
      for (int k0 = 0; k0 < n; k0 += tile) {
        const int nk = std::min(tile, n - k0);
        float m = -INFINITY, sum = 0.0f;
        for (int j = 0; j < nk; ++j) m = std::max(m, s[k0 + j] * scale);
        std::vector<float> p(nk), part(dim, 0.0f);
        for (int j = 0; j < nk; ++j) sum += p[j] = std::exp(s[k0 + j] * scale - m);
        for (int j = 0; j < nk; ++j)
          for (int d = 0; d < dim; ++d) part[d] += p[j] * v[static_cast<size_t>(k0 + j) * dim + d];
        float sa, sb;
        ops::softmax_merge(state, ops::SoftmaxState{m, sum}, sa, sb);
        for (int d = 0; d < dim; ++d) acc[d] = acc[d] * sa + part[d] * sb;
      }
      for (float& a : acc) a /= state.sum;
      // Adding one score at a time (softmax_add) must give the same state as the tiles.
      ops::SoftmaxState one = ops::softmax_start();
      for (int j = 0; j < n; ++j) {
        float weight;
        ops::softmax_add(one, s[j] * scale, weight);
      }
      std::vector<float> p = s, want(dim, 0.0f);
      k.softmax(p.data(), n, scale);
      for (int j = 0; j < n; ++j)
        for (int d = 0; d < dim; ++d) want[d] += p[j] * v[static_cast<size_t>(j) * dim + d];
      worst = std::max({worst, rel_inf(acc, want), static_cast<double>(std::fabs(one.sum - state.sum) / state.sum),
                        one.max != state.max ? 1.0 : 0.0});
    }
  }
  report(worst < 1e-5, "host ops: online softmax (tile merges, one-at-a-time adds) against the CPU softmax · V",
         fmt("max rel diff %.1e", worst));
}

// The top-logprob rounds of the reduction kernel (top_logprobs in kernels.cu) on the host.
void emulated_top_logprobs(const ops::TaskDesc& t, const float* cond, const float* uncond, int row_size, double max,
                           double sum, ops::TaskResult& r) {
  ops::ArgBest previous = ops::arg_none();
  for (int k = 0; k < t.top_logprobs && k < ops::kMaxTop; ++k) {
    ops::ArgBest pick = ops::arg_none();
    for (int i = 0; i < row_size; ++i) ops::top_candidate(pick, t, cond, uncond, i, previous);
    if (pick.index < 0) break;
    r.top_token[k] = pick.index;
    r.top_logprob[k] =
        static_cast<float>(ops::log_probability(ops::final_logit(t, cond, uncond, pick.index), max, sum));
    r.n_top = k + 1;
    previous = pick;
  }
}

// A Dream row as the kernel's dream_row schedules it: `threads` strided DreamPasses merged in thread order,
// partial sums added, the entropy's pass when the algorithm asks, then dream_finish.
ops::TaskResult emulated_dream_row(const ops::TaskDesc& t, const float* cond, const float* uncond, int row_size,
                                   int threads) {
  ops::DreamPass pass = ops::dream_pass_start();
  double raw_max = -INFINITY;
  for (int th = 0; th < threads; ++th) {
    ops::DreamPass mine = ops::dream_pass_start();
    for (int i = th; i < row_size; i += threads) {
      ops::dream_pass_add(mine, t, cond, uncond, i);
      raw_max = ops::max_no_nan(raw_max, static_cast<double>(ops::final_logit(t, cond, uncond, i)));
    }
    pass = th == 0 ? mine : ops::dream_pass_merge(pass, mine);
  }
  const bool usable = ops::dream_usable(pass);
  double sum = 0, raw_sum = 0, negative_entropy = 0;
  for (int th = 0; th < threads; ++th) {
    double part = 0, raw_part = 0;
    for (int i = th; i < row_size; i += threads) {
      if (usable) part += ops::dream_sum_term(t, cond, uncond, i, pass.z1);
      raw_part += ops::row_sum_term(t, cond, uncond, i, raw_max);
    }
    sum += part, raw_sum += raw_part;
  }
  if (usable && t.dream == ops::kDreamEntropy)
    for (int th = 0; th < threads; ++th) {
      double part = 0;
      for (int i = th; i < row_size; i += threads) part += ops::dream_entropy_term(t, cond, uncond, i, pass.z1, sum);
      negative_entropy += part;
    }
  ops::TaskResult r{};
  ops::dream_finish(t, cond, uncond, pass, sum, negative_entropy, r);
  r.target_logprob =
      t.target >= 0 ? ops::log_probability(ops::final_logit(t, cond, uncond, t.target), raw_max, raw_sum) : 0.0;
  emulated_top_logprobs(t, cond, uncond, row_size, raw_max, raw_sum, r);
  return r;
}

// A LLaDA row of the reduction: the RowPasses, the sum, row_finish and the top-logprob rounds.
ops::TaskResult emulated_llada_row(const ops::TaskDesc& t, const float* cond, const float* uncond, int row_size,
                                   int threads) {
  std::vector<ops::RowPass> passes(threads, ops::row_pass_start());
  for (int th = 0; th < threads; ++th)
    for (int i = th; i < row_size; i += threads) ops::row_pass_add(passes[th], t, cond, uncond, i);
  ops::RowPass pass = passes[0];
  for (int th = 1; th < threads; ++th) pass = ops::row_pass_merge(pass, passes[th]);
  double sum = 0;
  for (int th = 0; th < threads; ++th) {
    double part = 0;
    for (int i = th; i < row_size; i += threads) part += ops::row_sum_term(t, cond, uncond, i, pass.max);
    sum += part;
  }
  ops::TaskResult r{};
  ops::row_finish(t, cond, uncond, pass, sum, r);
  emulated_top_logprobs(t, cond, uncond, row_size, pass.max, sum, r);
  return r;
}

// The reduction kernel's schedule on the host, with `threads` threads: the finite flag, then the row of its
// decoding (a Dream row, or `threads` strided RowPasses merged, partial sums added, row_finish and the
// top-logprob rounds) — the same ops.h functions the kernel calls.
ops::TaskResult emulated_reduction(const ops::TaskDesc& t, const float* logits, int row_size, int threads) {
  const float* cond = logits + static_cast<size_t>(t.cond) * row_size;
  const float* uncond = t.uncond >= 0 ? logits + static_cast<size_t>(t.uncond) * row_size : nullptr;
  int bad = 0;  // the kernel's __syncthreads_or over its threads' flags
  for (int i = 0; i < row_size; ++i) bad |= !ops::raw_finite(cond, uncond, i);
  ops::TaskResult r = t.dream ? emulated_dream_row(t, cond, uncond, row_size, threads)
                              : emulated_llada_row(t, cond, uncond, row_size, threads);
  r.finite = bad == 0;
  return r;
}

// Random tasks over rows of `row_size` logits (vocab_size a bit smaller: head padding), with every option.
struct TaskSet {
  std::vector<float> logits;
  std::vector<RowRule> rules;
  std::vector<RowTask> tasks;
  int rows = 0;
};

TaskSet random_tasks(std::mt19937& rng, int row_size, int n_tasks, bool dream = false) {
  TaskSet s;
  s.rows = n_tasks * 2;
  s.logits = random_floats(static_cast<size_t>(s.rows) * row_size, rng, 3.0f);
  std::uniform_int_distribution<int> coin(0, 1), pick(0, row_size - 1), few(0, 3);
  // Some exact ties, so that "ties to the lower id" is exercised.
  for (int r = 0; r < s.rows; ++r) {
    float* row = s.logits.data() + static_cast<size_t>(r) * row_size;
    const int best = static_cast<int>(std::max_element(row, row + row_size) - row);
    row[pick(rng)] = row[best];
  }
  s.rules.resize(n_tasks);
  for (int j = 0; j < n_tasks; ++j) {
    RowRule& rule = s.rules[j];
    rule.row_size = row_size;
    rule.vocab_size = row_size - 6;
    rule.mask_token_id = few(rng) == 0 ? -1 : 7;
    rule.temperature = coin(rng) ? 0.0 : (few(rng) == 0 ? 2.5 : 0.7);
    rule.remasking = few(rng) == 0 ? Remasking::Random : Remasking::LowConfidence;
    rule.eos_token_id = 5;
    rule.eot_token_id = coin(rng) ? 9 : -1;
    rule.logits_eos_inf = few(rng) == 0;
    rule.confidence_eos_eot_inf = few(rng) == 0;
    if (few(rng) == 0) {  // barred end tokens (min_tokens, ignore_eos); task j's position is j
      rule.min_tokens = few(rng) * 150;
      rule.ignore_eos = coin(rng);
      rule.ends = {5, 11};
      if (rule.eot_token_id >= 0) rule.ends.push_back(rule.eot_token_id);
      rule.stops = {pick(rng)};
    }
    if (few(rng) == 0) rule.bias = {{5, -3.0f}, {pick(rng), 4.0f}, {pick(rng), -0.25f}};  // logit_bias
    if (dream) {  // Dream's rows: its algorithms; the EOS options and remasking above must not matter
      rule.dream = true;
      rule.alg = static_cast<DreamAlg>(few(rng));
    }
    RowTask t;
    t.cond = 2 * j;
    t.uncond = few(rng) == 0 ? 2 * j + 1 : -1;
    t.cfg_scale = t.uncond >= 0 ? 1.5 : 0.0;
    t.rule = few(rng) == 0 && j % 5 == 0 ? nullptr : &rule;
    t.seed = 1000 + j, t.step = j % 7, t.position = j;
    t.top_logprobs = few(rng) == 0 ? 5 : 0;
    t.target = coin(rng) ? pick(rng) : -1;
    // Make EOS the favourite of some rows, so the EOS options matter.
    if (few(rng) == 0) s.logits[static_cast<size_t>(t.cond) * row_size + 5] = 20.0f;
    // A few rows a broken model's: NaN or +inf in the row or its cfg copy (RowResult::finite).
    if (few(rng) == 0 && few(rng) == 0)
      s.logits[static_cast<size_t>(coin(rng) || t.uncond < 0 ? t.cond : t.uncond) * row_size + pick(rng)] =
          coin(rng) ? NAN : INFINITY;
    s.tasks.push_back(t);
  }
  return s;
}

// Compares device or emulated results with sample_task's; returns a description of the first mismatch.
std::string compare_results(const TaskSet& s, int row_size, const std::vector<RowResult>& got, int* equal_tokens) {
  std::string first;
  *equal_tokens = 0;
  std::vector<int32_t> scratch;
  for (size_t j = 0; j < s.tasks.size(); ++j) {
    const RowTask& t = s.tasks[j];
    std::vector<float> cond(s.logits.begin() + static_cast<size_t>(t.cond) * row_size,
                            s.logits.begin() + static_cast<size_t>(t.cond + 1) * row_size);
    const float* uncond = t.uncond >= 0 ? s.logits.data() + static_cast<size_t>(t.uncond) * row_size : nullptr;
    RowResult want;
    sample_task(cond.data(), uncond, row_size, t, want, &scratch);
    const RowResult& g = got[j];
    const auto close = [](double a, double b) {
      return a == b || std::fabs(a - b) <= 1e-12 * std::max(1.0, std::fabs(b));
    };
    if (!want.finite || !g.finite) {  // the engine fails the step: only the flag matters
      *equal_tokens += g.finite == want.finite;
      if (g.finite != want.finite && first.empty()) first = "task " + std::to_string(j) + ": finite differs";
      continue;
    }
    bool ok = g.token == want.token && close(g.probability, want.probability) && close(g.confidence, want.confidence) &&
              (t.target < 0 || close(g.target_logprob, want.target_logprob)) && g.n_top == want.n_top;
    for (int k = 0; ok && k < want.n_top; ++k)
      ok = g.top[k].token == want.top[k].token && std::fabs(g.top[k].logprob - want.top[k].logprob) <= 1e-5f;
    *equal_tokens += g.token == want.token;
    if (!ok && first.empty()) {
      char text[256];
      std::snprintf(text, sizeof text, "task %zu: token %d vs %d, p %.17g vs %.17g, conf %.17g vs %.17g, top %d vs %d",
                    j, g.token, want.token, g.probability, want.probability, g.confidence, want.confidence, g.n_top,
                    want.n_top);
      first = text;
    }
  }
  return first;
}

void host_vocab_reduction() {
  std::mt19937 rng(6);
  for (int row_size : {300, 1000}) {
    TaskSet s = random_tasks(rng, row_size, 400);
    TaskSet d = random_tasks(rng, row_size, 400, /*dream=*/true);
    std::vector<RowResult> got_dream(d.tasks.size());
    for (size_t j = 0; j < d.tasks.size(); ++j)
      cuda::to_row_result(emulated_reduction(cuda::task_desc(d.tasks[j], row_size), d.logits.data(), row_size, 13),
                          got_dream[j]);
    int equal_dream = 0;
    const std::string first_dream = compare_results(d, row_size, got_dream, &equal_dream);
    report(first_dream.empty(),
           "host ops: Dream's rows (origin, maskgit_plus, topk_margin, entropy; argmax / Gumbel-max at the "
           "temperature, logit bias, barred tokens, top logprobs, target, non-finite rows flagged) emulated with 13 "
           "threads equal sample_task, "
           "row " +
               std::to_string(row_size),
           first_dream.empty() ? std::to_string(equal_dream) + " of " + std::to_string(d.tasks.size()) + " tokens equal"
                               : first_dream);
    std::vector<RowResult> got(s.tasks.size());
    for (size_t j = 0; j < s.tasks.size(); ++j)
      cuda::to_row_result(emulated_reduction(cuda::task_desc(s.tasks[j], row_size), s.logits.data(), row_size, 13),
                          got[j]);
    int equal = 0;
    const std::string first = compare_results(s, row_size, got, &equal);
    report(first.empty(),
           "host ops: vocabulary reduction (cfg, EOS/EOT rules, logit bias, barred tokens, argmax / Gumbel-max, "
           "float64 softmax, "
           "random remasking, top logprobs, target, non-finite rows flagged) emulated with 13 threads equals "
           "sample_task, row " +
               std::to_string(row_size),
           first.empty() ? std::to_string(equal) + " of " + std::to_string(s.tasks.size()) + " tokens equal" : first);
  }
}

// An attention test case: ragged sequences (whole canvases, and cached reads of part of a canvas with an
// f32 or bf16 cache holding stale keys elsewhere), GQA 4/2, random q/k/v, and the float64 result.
struct AttentionCase {
  struct Spec {
    int length, begin, end;
    int cache;      // 0 none, 1 f32, 2 bf16
    int block = 0;  // block-causal with blocks of this size (0: bidirectional)
    int keys_of(int i) const { return block > 0 ? std::min(length, (i / block + 1) * block) : length; }
  };
  int qh = 4, kvh = 2, hd = 0, T = 0;
  std::vector<Spec> specs;
  std::vector<int> offsets;
  std::vector<float> qkv;                 // [T][(qh + 2 kvh) hd]
  std::vector<std::vector<char>> caches;  // per sequence: [keys | values][length][kv_dim] (empty: none)
  std::vector<float> want;                // [T][qh hd]
};

AttentionCase attention_case(std::mt19937& rng, int hd) {
  AttentionCase c;
  c.hd = hd;
  // Bidirectional, then block-causal: a whole canvas with a bf16 cache, a range [0, 40) of a 70-position
  // canvas without one (no key past 40 is attended), cached reads of one block and of a last short block,
  // and a range whose later query tile spans blocks whose keys some of its queries do not see.
  c.specs = {{5, 0, 5, 0},      {37, 0, 37, 0},      {100, 0, 100, 1},   {70, 32, 48, 1},
             {90, 16, 90, 2},   {17, 0, 17, 2},      {33, 0, 33, 0},     {50, 0, 50, 2, 32},
             {70, 0, 40, 0, 8}, {64, 32, 48, 1, 16}, {45, 40, 45, 1, 4}, {80, 40, 80, 2, 4}};
  const int q_dim = c.qh * hd, kv_dim = c.kvh * hd, ld = q_dim + 2 * kv_dim;
  for (const auto& s : c.specs) c.offsets.push_back(c.T), c.T += s.end - s.begin;
  c.qkv = random_floats(static_cast<size_t>(c.T) * ld, rng);
  c.want.assign(static_cast<size_t>(c.T) * q_dim, 0.0f);
  for (size_t si = 0; si < c.specs.size(); ++si) {
    const auto& s = c.specs[si];
    const int offset = c.offsets[si];
    const size_t n = static_cast<size_t>(s.length) * kv_dim;
    std::vector<float> keys(n), values(n);
    c.caches.emplace_back();
    if (s.cache) {
      std::vector<float> stale = random_floats(2 * n, rng);
      if (s.cache == 2) {
        std::vector<uint16_t> bits(2 * n);
        for (size_t i = 0; i < 2 * n; ++i) bits[i] = f32_to_bf16_bits(stale[i]), stale[i] = cpu::bf16_to_f32(bits[i]);
        c.caches.back().assign(reinterpret_cast<const char*>(bits.data()),
                               reinterpret_cast<const char*>(bits.data() + 2 * n));
      } else {
        c.caches.back().assign(reinterpret_cast<const char*>(stale.data()),
                               reinterpret_cast<const char*>(stale.data() + 2 * n));
      }
      for (size_t i = 0; i < n; ++i) keys[i] = stale[i], values[i] = stale[n + i];
    }
    // Fresh keys in the computed range (as a cache stores them: bf16-rounded in a bf16 cache) ...
    for (int p = s.begin; p < s.end; ++p)
      for (int j = 0; j < kv_dim; ++j) {
        float kf = c.qkv[static_cast<size_t>(offset + p - s.begin) * ld + q_dim + j];
        float vf = c.qkv[static_cast<size_t>(offset + p - s.begin) * ld + q_dim + kv_dim + j];
        if (s.cache == 2) kf = cpu::bf16_to_f32(f32_to_bf16_bits(kf)), vf = cpu::bf16_to_f32(f32_to_bf16_bits(vf));
        keys[static_cast<size_t>(p) * kv_dim + j] = kf, values[static_cast<size_t>(p) * kv_dim + j] = vf;
      }
    // ... but a whole-canvas call attends to the fresh f32 keys even when it stores them into a bf16 cache.
    if (s.begin == 0 && s.end == s.length)
      for (int p = 0; p < s.length; ++p)
        for (int j = 0; j < kv_dim; ++j) {
          keys[static_cast<size_t>(p) * kv_dim + j] = c.qkv[static_cast<size_t>(offset + p) * ld + q_dim + j];
          values[static_cast<size_t>(p) * kv_dim + j] =
              c.qkv[static_cast<size_t>(offset + p) * ld + q_dim + kv_dim + j];
        }
    for (int qi = 0; qi < s.end - s.begin; ++qi)
      for (int h = 0; h < c.qh; ++h) {
        const int kv_head = h / (c.qh / c.kvh);
        const int attended = s.keys_of(s.begin + qi);
        std::vector<double> score(attended);
        double mx = -INFINITY;
        for (int p = 0; p < attended; ++p) {
          double dot = 0;
          for (int d = 0; d < hd; ++d)
            dot += double(c.qkv[static_cast<size_t>(offset + qi) * ld + h * hd + d]) *
                   keys[static_cast<size_t>(p) * kv_dim + kv_head * hd + d];
          score[p] = dot / std::sqrt(double(hd));
          mx = std::max(mx, score[p]);
        }
        double sum = 0;
        for (double& v : score) sum += v = std::exp(v - mx);
        for (int d = 0; d < hd; ++d) {
          double acc = 0;
          for (int p = 0; p < attended; ++p)
            acc += score[p] * values[static_cast<size_t>(p) * kv_dim + kv_head * hd + d];
          c.want[static_cast<size_t>(offset + qi) * q_dim + h * hd + d] = static_cast<float>(acc / sum);
        }
      }
  }
  return c;
}

// A MoE layer's data movement on a routing made by cpu/moe.h (the backend's): T tokens of D, 16 experts,
// top 4 by the grouped-sigmoid router. src: the input row of each sorted row; sorted_row: each slot's row;
// out: random expert outputs per sorted row; want: the float64 combine, each token's slots weighted.
struct MoeCase {
  int k = 4;
  std::vector<float> x, out, weight, want;
  std::vector<int32_t> src, sorted_row;
};

MoeCase moe_case(std::mt19937& rng, int T, int D) {
  MoeCase c;
  cpu::RouterParams p;
  p.kind = RouterKind::GroupedSigmoid, p.n_experts = 16, p.top_k = c.k, p.n_group = 4, p.topk_group = 2;
  p.routed_scaling_factor = 2.5f;
  const std::vector<float> logits = random_floats(static_cast<size_t>(T) * p.n_experts, rng, 3.0f);
  cpu::Routing routing;
  cpu::ExpertGroups groups;
  cpu::route(p, logits.data(), T, p.n_experts, nullptr, routing);
  cpu::group_by_expert(routing, p.n_experts, groups);
  const size_t R = groups.token.size();
  c.x = random_floats(static_cast<size_t>(T) * D, rng);
  c.out = random_floats(R * D, rng);
  c.src = groups.token;
  c.weight = routing.weight;
  c.sorted_row.assign(R, -1);
  for (size_t r = 0; r < R; ++r) c.sorted_row[groups.slot[r]] = static_cast<int32_t>(r);
  c.want.assign(static_cast<size_t>(T) * D, 0.0f);
  for (size_t r = 0; r < R; ++r) {
    const int t = groups.token[r];
    for (int d = 0; d < D; ++d)
      c.want[static_cast<size_t>(t) * D + d] += static_cast<float>(double(groups.weight[r]) * c.out[r * D + d]);
  }
  return c;
}

// Which rows the device samples and which go to the host, and the logit changes a device row carries.
void host_task_routing() {
  RowRule rule;
  rule.row_size = rule.vocab_size = 100;
  rule.bias = {{4, 2.0f}, {7, -1.0f}};
  rule.min_tokens = 3;
  rule.ends = {9};
  rule.stops = {11};
  RowTask t;
  t.rule = &rule;
  t.position = 2;
  const ops::TaskDesc d = cuda::task_desc(t, 100);
  const bool order = d.n_adjust == 4 && d.adjust_token[0] == 4 && d.adjust_add[0] == 2.0f && d.adjust_token[1] == 7 &&
                     d.adjust_token[2] == 9 && d.adjust_add[2] == -INFINITY && d.adjust_token[3] == 11;
  t.position = 3;  // past min_tokens: the bias only
  const bool past = cuda::task_desc(t, 100).n_adjust == 2 && !cuda::needs_host(t);
  RowRule allowed = rule, many = rule, filtered = rule;
  allowed.allowed = {1, 2};
  many.bias.assign(ops::kMaxAdjust - 1, {5, 1.0f});  // with the two barred tokens below min_tokens: one too many
  filtered.temperature = 1.0, filtered.top_k = 5;
  const auto host = [&](const RowRule& r, int position) {
    RowTask x = t;
    x.rule = &r;
    x.position = position;
    return cuda::needs_host(x);
  };
  const bool routed = host(allowed, 3) && host(many, 2) && !host(many, 3) && host(filtered, 3) && !host(rule, 2);
  report(order && past && routed,
         "host ops: a task carries logit_bias then its barred tokens in sample_task's order; rows with allowed "
         "tokens, more than " +
             std::to_string(ops::kMaxAdjust) + " changes or top-k / top-p go to the host",
         "");
}

void host_moe_combine() {
  std::mt19937 rng(11);
  const int T = 23, D = 40;
  const MoeCase c = moe_case(rng, T, D);
  std::vector<float> y(static_cast<size_t>(T) * D);
  for (int64_t idx = 0; idx < static_cast<int64_t>(y.size()); ++idx)
    y[idx] = ops::moe_combine(c.out.data(), c.sorted_row.data(), c.weight.data(), c.k, D, idx);
  const double e = rel_inf(y, c.want);
  report(e < 1e-5, "host ops: the MoE combine of one element (slots in order) on a grouped-sigmoid routing",
         fmt("max rel diff %.1e", e));
}

// The attention kernel's block, emulated on the CPU: every phase of attention_tile.h run for threads 0..127
// in turn (the barrier between phases is the loop boundary), shared memory poisoned with NaN; the cache
// writes by store_kv_element first, as the backend launches them.
void host_attention_tile() {
  std::mt19937 rng(7);
  // Head dim 30: the scalar load path (rows not a multiple of 4 floats); the others read 4 at a time.
  for (int hd : {30, 32, 128, 160}) {
    AttentionCase c = attention_case(rng, hd);
    const int q_dim = c.qh * hd, kv_dim = c.kvh * hd, ld = q_dim + 2 * kv_dim;
    std::vector<cuda::SeqDesc> seqs;
    std::vector<cuda::QueryTile> tiles;
    std::vector<int32_t> token_seq(c.T);
    for (size_t i = 0; i < c.specs.size(); ++i) {
      const auto& s = c.specs[i];
      const bool whole = s.begin == 0 && s.end == s.length;
      seqs.push_back(cuda::SeqDesc{c.offsets[i], s.begin, s.end, s.length, s.cache && !whole ? 1 : 0,
                                   s.cache == 2 ? 1 : 0, c.caches[i].empty() ? nullptr : c.caches[i].data(), s.block});
      for (int t = 0; t < s.end - s.begin; ++t) token_seq[c.offsets[i] + t] = static_cast<int32_t>(i);
      for (int q0 = 0; q0 < s.end - s.begin; q0 += cuda::kAttentionQueries)
        tiles.push_back(
            cuda::QueryTile{static_cast<int>(i), q0, std::min(cuda::kAttentionQueries, s.end - s.begin - q0)});
    }
    for (int64_t idx = 0; idx < static_cast<int64_t>(c.T) * kv_dim; ++idx)
      cuda::store_kv_element(c.qkv.data(), ld, q_dim, q_dim + kv_dim, kv_dim, 0, token_seq.data(), seqs.data(), idx);
    const cuda::AttentionArgs args{c.qkv.data(), ld, q_dim, q_dim + kv_dim, c.qh, c.kvh, hd, 0};
    std::vector<float> got(c.want.size(), std::nanf("")), smem(cuda::attention_smem_floats(hd));
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
    for (const cuda::QueryTile& tile : tiles)
      for (int h = 0; h < c.qh; ++h) {
        std::fill(smem.begin(), smem.end(), std::nanf(""));
        const cuda::AttentionSmem m = cuda::attention_smem(smem.data(), hd);
        const cuda::SeqDesc& s = seqs[tile.seq];
        const int kv_head = h / (c.qh / c.kvh);
        for (int tid = 0; tid < cuda::kAttentionThreads; ++tid) cuda::attention_start(tid, args, s, tile, h, m);
        const int keys = cuda::tile_keys(s, tile);
        for (int k0 = 0; k0 < keys; k0 += cuda::kAttentionKeys) {
          const int nk = std::min(cuda::kAttentionKeys, keys - k0);
          for (int tid = 0; tid < cuda::kAttentionThreads; ++tid)
            cuda::attention_load_keys(tid, args, s, kv_head, k0, nk, m);
          for (int tid = 0; tid < cuda::kAttentionThreads; ++tid)
            cuda::attention_scores(tid, hd, s, tile, k0, nk, scale, m);
          for (int tid = 0; tid < cuda::kAttentionThreads; ++tid) cuda::attention_softmax(tid, nk, m);
          for (int tid = 0; tid < cuda::kAttentionThreads; ++tid) cuda::attention_accumulate(tid, hd, nk, m);
        }
        for (int i = 0; i < tile.nq * hd; ++i)
          got[cuda::attention_out_index(i, hd, s, tile, h, q_dim)] = cuda::attention_result(i, hd, m);
      }
    const double e = rel_inf(got, c.want);
    report(
        e < 1e-5,
        "host ops: the attention kernel's block phases and cache stores, thread by thread (ragged, GQA 4/2, head dim " +
            std::to_string(hd) + (hd % 4 ? ", scalar loads" : ", vector loads") +
            ", no cache / f32 / bf16 cache, whole and cached reads, bidirectional and block-causal) against "
            "float64",
        fmt("max rel diff %.1e", e));
  }
}

// `--device cuda` where no GPU is visible (or the build has none) fails at load with Unavailable.
void host_device_unavailable(const std::string& golden_dir) {
  LoadOptions options;
  options.device = Device::Cuda;
  expect_error("Backend::load with device cuda and no GPU fails cleanly with Unavailable", ErrorCode::Unavailable,
               {"device cuda"}, [&] { Backend::load((fs::path(golden_dir) / "plain").string(), options); });
  options.device = Device::Auto;
  try {
    auto backend = Backend::load((fs::path(golden_dir) / "plain").string(), options);
    report(backend->info().backend == "cpu", "device auto without a GPU picks the CPU", backend->info().backend);
  } catch (const std::exception& e) {
    report(false, "device auto without a GPU picks the CPU", e.what());
  }
}

#if VDIFF_WITH_CUDA
// ================================================================================================
// Device checks

namespace ct = cuda::testing;

std::vector<uint16_t> to_half_bits(const std::vector<float>& v, ct::Type type) {
  std::vector<uint16_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    if (type == ct::Type::BF16) {
      out[i] = f32_to_bf16_bits(v[i]);
    } else {  // f16 by way of the exact f32 -> f16 of values in range (round to nearest)
      const float f = v[i];
      uint32_t bits;
      std::memcpy(&bits, &f, 4);
      const uint32_t sign = (bits >> 16) & 0x8000u;
      int exponent = static_cast<int>((bits >> 23) & 0xff) - 127 + 15;
      uint32_t mantissa = bits & 0x7fffffu;
      if (exponent <= 0) {
        out[i] = static_cast<uint16_t>(sign);  // tiny values flush to zero (test data avoids them)
      } else {
        uint32_t h = (static_cast<uint32_t>(exponent) << 10) | (mantissa >> 13);
        const uint32_t rest = mantissa & 0x1fffu;
        if (rest > 0x1000u || (rest == 0x1000u && (h & 1))) ++h;
        out[i] = static_cast<uint16_t>(sign | h);
      }
    }
  }
  return out;
}

float element(const std::vector<uint16_t>& bits, ct::Type type, size_t i) {
  return type == ct::Type::BF16 ? cpu::bf16_to_f32(bits[i]) : cpu::f16_to_f32(bits[i]);
}

void device_ops() {
  std::mt19937 rng(11);
  const Kernels& k = cpu::active_kernels();
  // Embedding gather: exact.
  for (ct::Type type : {ct::Type::F32, ct::Type::BF16, ct::Type::F16}) {
    const int V = 300, D = 96;
    std::vector<float> table = random_floats(static_cast<size_t>(V) * D, rng);
    std::vector<uint16_t> bits = to_half_bits(table, type);
    const void* data = type == ct::Type::F32 ? static_cast<const void*>(table.data()) : bits.data();
    const size_t bytes = type == ct::Type::F32 ? table.size() * 4 : bits.size() * 2;
    std::vector<int32_t> tokens = random_tokens(rng, 77, V);
    std::vector<float> got(tokens.size() * D), want(got.size());
    ct::embed(tokens, data, bytes, type, D, got.data());
    for (size_t t = 0; t < tokens.size(); ++t)
      for (int j = 0; j < D; ++j)
        want[t * D + j] = type == ct::Type::F32 ? table[tokens[t] * D + j] : element(bits, type, tokens[t] * D + j);
    report(got == want, std::string("cuda op: embedding gather (") +
                            (type == ct::Type::F32    ? "f32"
                             : type == ct::Type::BF16 ? "bf16"
                                                      : "f16") +
                            ") exact");
  }
  // RMSNorm.
  {
    const int rows = 37, D = 4096;
    std::vector<float> x = random_floats(static_cast<size_t>(rows) * D, rng, 2.0f), w = random_floats(D, rng, 0.2f);
    for (float& v : w) v += 1.0f;
    std::vector<float> got(x.size()), want(x.size());
    ct::rmsnorm(x.data(), rows, D, w.data(), 1e-5f, got.data());
    for (int r = 0; r < rows; ++r) k.rmsnorm(x.data() + r * D, w.data(), want.data() + r * D, D, 1e-5f);
    const double e = rel_inf(got, want);
    report(e < 2e-6, "cuda op: RMSNorm against the CPU kernel", fmt("max rel diff %.1e", e));
  }
  // RoPE (GQA: 4 query heads, 2 kv heads), over the whole head and partial (the first half of it).
  for (const int rot : {64, 32}) {
    const int T = 50, qh = 4, kvh = 2, hd = 64, half = rot / 2, L = 600;
    std::vector<float> cos(static_cast<size_t>(L) * half), sin(cos.size());
    for (int p = 0; p < L; ++p)
      for (int i = 0; i < half; ++i) {
        const double a = p * (1.0 / std::pow(500000.0, 2.0 * i / rot));
        cos[p * half + i] = static_cast<float>(std::cos(a)), sin[p * half + i] = static_cast<float>(std::sin(a));
      }
    std::vector<float> x = random_floats(static_cast<size_t>(T) * (qh + kvh) * hd, rng), want = x;
    std::vector<int32_t> positions = random_tokens(rng, T, L);
    for (int t = 0; t < T; ++t)
      for (int h = 0; h < qh + kvh; ++h)
        for (int i = 0; i < half; ++i) {
          float* row = want.data() + (static_cast<size_t>(t) * (qh + kvh) + h) * hd;
          ops::rope_pair(row[i], row[i + half], cos[positions[t] * half + i], sin[positions[t] * half + i]);
        }
    ct::rope(x.data(), T, qh, kvh, hd, rot, positions.data(), cos.data(), sin.data(), L);
    const double e = rel_inf(x, want);
    report(e < 1e-6, "cuda op: RoPE over " + std::to_string(rot) + " of 64 dims against ops::rope_pair on the CPU",
           fmt("max rel diff %.1e", e));
  }
  // QK-norm: every head of q (4) and k (2) normalised with its own weights, against the CPU's RMSNorm.
  {
    const int T = 21, qh = 4, kvh = 2, hd = 128;
    std::vector<float> x = random_floats(static_cast<size_t>(T) * (qh + kvh) * hd, rng, 3.0f), want = x;
    std::vector<float> qw = random_floats(hd, rng, 0.3f), kw = random_floats(hd, rng, 0.3f);
    for (size_t i = 0; i < qw.size(); ++i) qw[i] += 1.0f, kw[i] += 1.0f;
    for (int t = 0; t < T; ++t)
      for (int h = 0; h < qh + kvh; ++h) {
        float* row = want.data() + (static_cast<size_t>(t) * (qh + kvh) + h) * hd;
        k.rmsnorm(row, h < qh ? qw.data() : kw.data(), row, hd, 1e-6f);
      }
    ct::qk_norm(x.data(), T, qh, kvh, hd, qw.data(), kw.data(), 1e-6f);
    const double e = rel_inf(x, want);
    report(e < 2e-6, "cuda op: QK-norm (per head, own weights) against the CPU's RMSNorm", fmt("max rel diff %.1e", e));
  }
  // The MoE layer's gather of routed rows and its combine, on a routing by cpu/moe.h.
  {
    const int T = 19, D = 96;
    const MoeCase mc = moe_case(rng, T, D);
    std::vector<float> rows(mc.src.size() * D), y(static_cast<size_t>(T) * D);
    ct::moe_rows(mc.x.data(), D, mc.src, rows.data(), mc.out.data(), mc.sorted_row, mc.weight, T, mc.k, y.data());
    bool gathered = true;
    for (size_t r = 0; r < mc.src.size(); ++r)
      gathered = gathered && std::memcmp(rows.data() + r * D, mc.x.data() + static_cast<size_t>(mc.src[r]) * D,
                                         D * sizeof(float)) == 0;
    const double e = rel_inf(y, mc.want);
    report(gathered && e < 1e-6, "cuda op: MoE gather of the routed rows (exact) and combine against float64",
           fmt("max rel diff %.1e", e));
  }
  // SwiGLU.
  {
    const int T = 33, H = 1000;
    std::vector<float> g = random_floats(static_cast<size_t>(T) * H, rng, 4.0f), u = random_floats(g.size(), rng);
    std::vector<float> got(g.size()), want(g.size());
    ct::swiglu(g.data(), u.data(), T, H, got.data());
    k.silu_mul(g.data(), u.data(), want.data(), static_cast<int>(g.size()));
    const double e = rel_inf(got, want);
    report(e < 1e-6, "cuda op: SwiGLU against the CPU kernel", fmt("max rel diff %.1e", e));
  }
  // Attention: ragged sequences, GQA, whole canvases and cached reads (f32 and bf16 caches).
  for (int hd : {32, 128}) {
    AttentionCase c = attention_case(rng, hd);
    std::vector<ct::AttentionSeq> seqs;
    for (size_t i = 0; i < c.specs.size(); ++i) {
      ct::AttentionSeq a;
      a.offset = c.offsets[i], a.begin = c.specs[i].begin, a.end = c.specs[i].end, a.length = c.specs[i].length;
      a.cache = c.caches[i].empty() ? nullptr : c.caches[i].data();
      a.cache_bf16 = c.specs[i].cache == 2;
      a.block = c.specs[i].block;
      seqs.push_back(a);
    }
    for (bool simple : {false, true}) {
      std::vector<float> got(c.want.size(), std::nanf(""));
      ct::attention(c.qkv.data(), c.T, c.qh, c.kvh, hd, seqs, got.data(), simple);
      const double e = rel_inf(got, c.want);
      report(e < 1e-5,
             std::string("cuda op: attention, ") + (simple ? "simple" : "register-blocked") +
                 " kernel (ragged, GQA 4/2, head dim " + std::to_string(hd) +
                 ", no cache / f32 cache / bf16 cache, whole canvas and cached reads) against float64",
             fmt("max rel diff %.1e", e));
    }
  }
  // GEMM: the tiled kernel and cuBLAS, each type, several M, with and without accumulation.
  for (bool use_cublas : {false, true})
    for (ct::Type type : {ct::Type::F32, ct::Type::BF16, ct::Type::F16}) {
      double worst = 0;
      bool ran = true;
      std::string library;
      for (int M : {1, 37, 160})
        for (bool accumulate : {false, true}) {
          const int N = 200, K = 96;
          std::vector<float> A = random_floats(static_cast<size_t>(M) * K, rng),
                             W = random_floats(static_cast<size_t>(N) * K, rng, 0.1f);
          std::vector<float> C = random_floats(static_cast<size_t>(M) * N, rng), want(C.size());
          std::vector<uint16_t> Ab = to_half_bits(A, type), Wb = to_half_bits(W, type);
          for (int m = 0; m < M; ++m)
            for (int n = 0; n < N; ++n) {
              double acc = accumulate ? C[m * N + n] : 0.0;
              for (int kk = 0; kk < K; ++kk)
                acc += (type == ct::Type::F32 ? double(A[m * K + kk]) * W[n * K + kk]
                                              : double(element(Ab, type, m * K + kk)) * element(Wb, type, n * K + kk));
              want[m * N + n] = static_cast<float>(acc);
            }
          const void* a = type == ct::Type::F32 ? static_cast<const void*>(A.data()) : Ab.data();
          const void* w = type == ct::Type::F32 ? static_cast<const void*>(W.data()) : Wb.data();
          ran = ct::gemm(a, w, type, M, N, K, C.data(), accumulate, use_cublas, &library) && ran;
          if (ran) worst = std::max(worst, rel_inf(C, want));
        }
      const std::string name = std::string("cuda op: GEMM ") + (use_cublas ? "cuBLAS" : "tiled") + " (" +
                               (type == ct::Type::F32    ? "f32"
                                : type == ct::Type::BF16 ? "bf16"
                                                         : "f16") +
                               ", M 1/37/160, += and =)";
      if (!ran) {
        std::printf("SKIPPED: %s: cuBLAS did not load\n", name.c_str());
        continue;
      }
      report(worst < 1e-5, name + " against float64",
             fmt("max rel diff %.1e", worst) + (library.empty() ? "" : ", " + library));
    }
  // The vocabulary reduction against sample_task: LLaDA's rows, then Dream's.
  for (const bool dream : {false, true})
    for (int row_size : {300, 126464}) {
      TaskSet s = random_tasks(rng, row_size, row_size > 1000 ? 48 : 400, dream);
      std::vector<RowResult> got(s.tasks.size());
      ct::reduce_rows(s.logits.data(), s.rows, row_size, s.tasks, got.data());
      int equal = 0;
      const std::string first = compare_results(s, row_size, got, &equal);
      report(first.empty(),
             std::string("cuda op: vocabulary reduction") + (dream ? " of Dream's rows" : "") +
                 " equals sample_task, row " + std::to_string(row_size),
             first.empty() ? std::to_string(equal) + " of " + std::to_string(s.tasks.size()) + " tokens equal" : first);
    }
}

LoadOptions device_options(Device device) {
  LoadOptions o;
  o.device = device;
  o.threads = 2;
  return o;
}

std::vector<fs::path> golden_models(const std::string& golden_dir) {
  std::vector<fs::path> out;
  for (const auto& entry : fs::directory_iterator(golden_dir))
    if (entry.path().extension() == ".json" && fs::is_directory(entry.path().parent_path() / entry.path().stem()))
      out.push_back(entry.path());
  std::sort(out.begin(), out.end());
  return out;
}

Json read_json(const fs::path& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return Json::parse(ss.str());
}

// The CUDA backend against the CPU backend on the golden models: plain forwards of several canvases in one
// batch, KV-cached forwards (a refresh, then a dual-cache read), and predict.
void device_backend_parity(const std::string& golden_dir) {
  std::mt19937 rng(21);
  for (const fs::path& json_path : golden_models(golden_dir)) {
    const std::string name = json_path.stem().string(), dir = (json_path.parent_path() / name).string();
    try {
      auto cpu_backend = Backend::load(dir, device_options(Device::Cpu));
      auto gpu = Backend::load(dir, device_options(Device::Cuda));
      const ModelConfig& c = gpu->config();
      const bool f32 = gpu->weight_dtype() == "f32";
      // bf16 / f16 weights: the GPU feeds its GEMMs activations in the weights' type and sums in its own
      // order; the CPU rounds them to bf16 only for bf16 weights (the bf16 dot product), keeps f32 for f16.
      const double tolerance = f32 ? 1e-4 : 5e-2;
      std::vector<std::vector<int32_t>> seqs = {random_tokens(rng, 9, c.vocab_size),
                                                random_tokens(rng, 40, c.vocab_size),
                                                random_tokens(rng, 23, c.vocab_size)};
      std::vector<std::vector<int32_t>> rows = {all_rows(9), all_rows(40), {0, 5, 22}};
      const std::vector<float> a = run_forward(*gpu, seqs, rows), b = run_forward(*cpu_backend, seqs, rows);
      const double e = rel_inf(a, b);
      report(e < tolerance,
             "cuda backend: " + name + " (" + gpu->weight_dtype() + ") batched forward against the CPU backend",
             fmt("max rel diff %.1e", e));

      // A refresh then a dual-cache read of [8, 16), on each backend.
      const int L = 30;
      std::vector<int32_t> canvas = random_tokens(rng, L, c.vocab_size);
      std::vector<float> cached[2];
      int i = 0;
      for (Backend* be : {gpu.get(), cpu_backend.get()}) {
        auto cache = be->make_kv_cache(L);
        run_cached(*be, {{canvas, {0}, cache.get(), 0, -1}});
        std::vector<int32_t> changed = canvas;
        changed[10] = (changed[10] + 1) % c.vocab_size;
        cached[i++] = run_cached(*be, {{changed, range_rows(8, 16), cache.get(), 8, 16}});
      }
      const double ec = rel_inf(cached[0], cached[1]);
      report(ec < tolerance, "cuda backend: " + name + " dual-cache read after a refresh against the CPU backend",
             fmt("max rel diff %.1e", ec));

      // predict at temperature 0: the same tokens as the CPU backend (f32 models).
      RowRule rule;
      rule.row_size = c.embedding_size, rule.vocab_size = c.vocab_size, rule.mask_token_id = c.mask_token_id;
      rule.eos_token_id = c.eos_token_id;
      std::vector<RowTask> tasks;
      for (int r = 0; r < 52; ++r) {
        RowTask t;
        t.cond = r, t.rule = &rule, t.seed = 7, t.step = 1, t.position = r, t.top_logprobs = 3,
        t.target = r % c.vocab_size;
        tasks.push_back(t);
      }
      std::vector<ForwardSeq> batch;
      for (size_t s = 0; s < seqs.size(); ++s)
        batch.push_back(
            {seqs[s].data(), static_cast<int>(seqs[s].size()), rows[s].data(), static_cast<int>(rows[s].size())});
      std::vector<RowResult> ga(tasks.size()), gb(tasks.size());
      gpu->predict(batch, tasks, ga.data());
      cpu_backend->predict(batch, tasks, gb.data());
      int same = 0;
      double worst_p = 0;
      for (size_t j = 0; j < tasks.size(); ++j) {
        same += ga[j].token == gb[j].token;
        worst_p = std::max(worst_p, std::fabs(ga[j].probability - gb[j].probability));
      }
      if (f32)
        report(same == static_cast<int>(tasks.size()) && worst_p < 1e-4,
               "cuda backend: " + name + " predict at temperature 0 takes the CPU backend's tokens",
               std::to_string(same) + " of " + std::to_string(tasks.size()) + fmt(" equal, max |dp| %.1e", worst_p));
      else
        std::printf("info cuda backend: %s (%s) predict: %d of %zu tokens as on the CPU, max |dp| %.1e\n", name.c_str(),
                    gpu->weight_dtype().c_str(), same, tasks.size(), worst_p);
      const BackendInfo info = gpu->info();
      report(info.backend == "cuda" && !info.device.empty() && info.memory_total > 0 && info.memory_used > 0,
             "cuda backend: " + name + " info",
             info.device + ", gemm " + info.gemm + ", " + std::to_string(info.memory_used >> 20) + " of " +
                 std::to_string(info.memory_total >> 20) + " MiB");
    } catch (const std::exception& e) {
      report(false, "cuda backend: " + name, e.what());
    }
  }
}

// The CUDA backend against the CPU backend on the block-diffusion models of test/fixtures/golden-block
// (LLaDA2: fused QKV, QK-norm, partial rotary, dense then grouped-sigmoid MoE layers with a shared expert;
// SDAR: QK-norm; SDAR-MoE: softmax-routed experts): block-causal forwards of ragged canvases in one batch,
// and the exact cache of finished blocks — a prefill of two blocks, then the third block read from it,
// against the CPU's same calls and against the GPU's own full recompute of the three blocks.
void device_block_parity(const std::string& dir) {
  std::mt19937 rng(41);
  for (const std::string name : {"llada2", "sdar", "sdar_moe"}) {
    const std::string model = (fs::path(dir) / name).string();
    try {
      auto cpu_backend = Backend::load(model, device_options(Device::Cpu));
      auto gpu = Backend::load(model, device_options(Device::Cuda));
      const ModelConfig& c = gpu->config();
      const int B = c.block_length;
      const double tolerance = gpu->weight_dtype() == "f32" ? 1e-4 : 5e-2;
      std::vector<CachedSeq> batch;
      for (int n : {9, 3 * B + 1, 2 * B})
        batch.push_back({random_tokens(rng, n, c.vocab_size), all_rows(n), nullptr, 0, -1, B});
      const double e = rel_inf(run_cached(*gpu, batch), run_cached(*cpu_backend, batch));
      report(e < tolerance,
             "cuda backend: " + name + " (" + gpu->weight_dtype() + ", block " + std::to_string(B) +
                 ") block-causal batched forward against the CPU backend",
             fmt("max rel diff %.1e", e));

      const int L = 4 * B;
      const std::vector<int32_t> canvas = random_tokens(rng, L, c.vocab_size);
      std::vector<float> read[2];
      int i = 0;
      for (Backend* be : {gpu.get(), cpu_backend.get()}) {
        auto cache = be->make_kv_cache(L);
        run_cached(*be, {{canvas, {0}, cache.get(), 0, 2 * B, B}});
        read[i++] = run_cached(*be, {{canvas, range_rows(2 * B, 3 * B), cache.get(), 2 * B, 3 * B, B}});
      }
      const std::vector<float> full = run_cached(*gpu, {{canvas, range_rows(2 * B, 3 * B), nullptr, 0, 3 * B, B}});
      const double ec = rel_inf(read[0], read[1]), ef = rel_inf(read[0], full);
      report(ec < tolerance && ef < 1e-5,
             "cuda backend: " + name +
                 " block read from the cache of two finished blocks, against the CPU backend "
                 "and the GPU's full recompute",
             fmt("max rel diff %.1e (CPU), ", ec) + fmt("%.1e (recompute)", ef));
    } catch (const std::exception& e) {
      report(false, "cuda backend: " + name, e.what());
    }
  }
}

// The golden fixtures on CUDA: the logits against PyTorch's, and the generated answers through the
// Engine (exact for f32 models; the agreement reported, and bounded loosely, for bf16 / f16).
void device_golden(const std::string& golden_dir) {
  for (const fs::path& json_path : golden_models(golden_dir)) {
    const std::string name = json_path.stem().string(), dir = (json_path.parent_path() / name).string();
    try {
      Json fixture = read_json(json_path);
      std::shared_ptr<Backend> gpu = Backend::load(dir, device_options(Device::Cuda));
      const bool f32 = gpu->weight_dtype() == "f32";
      const int E = gpu->config().embedding_size;
      double worst = 0, scale = 0;
      for (const Json& f : fixture.find("forward")->items()) {
        std::vector<int32_t> tokens;
        for (const Json& t : f.find("tokens")->items()) tokens.push_back(static_cast<int32_t>(t.as_int64()));
        std::vector<float> got = run_forward(*gpu, {tokens}, {all_rows(tokens.size())});
        const Json& logits = *f.find("logits");
        for (size_t t = 0; t < tokens.size(); ++t)
          for (int e = 0; e < E; ++e) {
            const double want = logits[t][e].as_number();
            worst = std::max(worst, std::fabs(got[t * E + e] - want));
            scale = std::max(scale, std::fabs(want));
          }
      }
      report(worst <= (f32 ? 1e-4 : 5e-2) * scale, "cuda golden " + name + " (" + gpu->weight_dtype() + ") logits",
             fmt("max |diff| %.2e, max |logit| %.2f, ratio %.1e", worst, scale, worst / std::max(scale, 1e-30)));

      Engine engine(gpu);
      int cases = 0, equal = 0, tokens_equal = 0, tokens_total = 0;
      for (const Json& c : fixture.find("generate")->items()) {
        std::vector<int32_t> prompt, answer;
        for (const Json& t : c.find("prompt")->items()) prompt.push_back(static_cast<int32_t>(t.as_int64()));
        for (const Json& t : c.find("answer")->items()) answer.push_back(static_cast<int32_t>(t.as_int64()));
        const SamplingParams s = golden_params(*c.find("params"));
        if (s.temperature != 0.0 || s.remasking == Remasking::Random) continue;  // only temperature 0 is comparable
        const uint64_t id = engine.create(prompt, s);
        for (int guard = 0; guard < 10000; ++guard)
          if (engine.step({id}).at(0).finished) break;
        const std::vector<int32_t> got = engine.canvas(id);
        engine.release(id);
        ++cases;
        equal += got == answer;
        for (size_t i = 0; i < std::min(got.size(), answer.size()); ++i) tokens_equal += got[i] == answer[i];
        tokens_total += static_cast<int>(answer.size());
      }
      const std::string detail = std::to_string(equal) + " of " + std::to_string(cases) + " answers equal, " +
                                 std::to_string(tokens_equal) + " of " + std::to_string(tokens_total) + " tokens";
      if (f32)
        report(cases > 0 && equal == cases, "cuda golden " + name + ": temperature-0 answers equal PyTorch's exactly",
               detail);
      else
        report(cases > 0 && tokens_equal * 2 >= tokens_total,
               "cuda golden " + name + " (" + gpu->weight_dtype() +
                   "): temperature-0 agreement with PyTorch (reported; at least half)",
               detail);
    } catch (const std::exception& e) {
      report(false, "cuda golden " + name, e.what());
    }
  }
}

// A sequence's logits do not depend on what else is in the batch (to f32 rounding: cuBLAS may pick other
// kernels for other row counts), and its argmax rows are the same.
void device_batch_invariance(const std::string& golden_dir) {
  std::mt19937 rng(31);
  for (const std::string name : {"plain", "gqa"}) {
    try {
      auto gpu = Backend::load((fs::path(golden_dir) / name).string(), device_options(Device::Cuda));
      const int E = gpu->config().embedding_size, V = gpu->config().vocab_size;
      std::vector<std::vector<int32_t>> seqs, rows;
      for (int n : {3, 17, 64, 31, 50, 8}) seqs.push_back(random_tokens(rng, n, V)), rows.push_back(all_rows(n));
      const std::vector<float> together = run_forward(*gpu, seqs, rows);
      std::vector<float> alone;
      for (size_t s = 0; s < seqs.size(); ++s) {
        std::vector<float> one = run_forward(*gpu, {seqs[s]}, {rows[s]});
        alone.insert(alone.end(), one.begin(), one.end());
      }
      int argmax_same = 0, n_rows = static_cast<int>(together.size() / E);
      for (int r = 0; r < n_rows; ++r) {
        const float* a = together.data() + static_cast<size_t>(r) * E;
        const float* b = alone.data() + static_cast<size_t>(r) * E;
        argmax_same += std::max_element(a, a + V) - a == std::max_element(b, b + V) - b;
      }
      const double e = rel_inf(together, alone);
      report(e < 1e-5 && argmax_same == n_rows,
             "cuda batch invariance: " + name + ", 6 canvases in one batch vs each alone",
             fmt("max rel diff %.1e, bit-exact: ", e) + (e == 0 ? "yes" : "no") + ", " + std::to_string(argmax_same) +
                 " of " + std::to_string(n_rows) + " argmax rows equal");
    } catch (const std::exception& e) {
      report(false, "cuda batch invariance: " + name, e.what());
    }
  }
}
#endif

}  // namespace vdiff::test

int main(int argc, char** argv) {
  using namespace vdiff::test;
  std::string golden_dir = VDIFF_GOLDEN_DIR;
  bool host_only = false, require_device = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--golden" && i + 1 < argc) golden_dir = argv[++i];
    else if (a == "--host-only") host_only = true;
    else if (a == "--require-device") require_device = true;  // the device script: no GPU is a failure
    else {
      std::fprintf(stderr, "usage: vdiff-cuda-tests [--golden DIR] [--host-only] [--require-device]\n");
      return 2;
    }
  }
  std::printf("== host checks of the CUDA kernels' arithmetic (cuda/ops.h)\n");
  host_conversions();
  host_rmsnorm();
  host_rope();
  host_moe_combine();
  host_silu();
  host_online_softmax();
  host_vocab_reduction();
  host_task_routing();
  host_attention_tile();
  bool device = false;
  std::string reason;
#if VDIFF_WITH_CUDA
  device = vdiff::cuda::testing::available(&reason);
#else
  reason = "this build has no CUDA backend (nvcc not found, or VDIFF_CUDA=OFF)";
#endif
  if (!device) host_device_unavailable(golden_dir);
  if (host_only) {
    std::printf("SKIPPED: device checks (--host-only)\n");
  } else if (!device && require_device) {
    report(false, "a CUDA device (--require-device)", reason);
  } else if (!device) {
    std::printf(
        "SKIPPED: no CUDA device (%s): op parity, backend parity, golden fixtures on CUDA and batch invariance "
        "wait for a GPU (bench/gpu/run.sh)\n",
        reason.c_str());
  } else {
#if VDIFF_WITH_CUDA
    std::printf("== op parity (each kernel against the CPU)\n");
    device_ops();
    std::printf("== the CUDA backend against the CPU backend\n");
    device_backend_parity(golden_dir);
    device_block_parity((fs::path(golden_dir).parent_path() / "golden-block").string());
    std::printf("== golden fixtures on CUDA\n");
    device_golden(golden_dir);
    std::printf("== batch invariance on the GPU\n");
    device_batch_invariance(golden_dir);
#endif
  }
  std::printf("\n%d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
