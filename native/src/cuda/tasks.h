// RowTask <-> the vocabulary reduction's TaskDesc / TaskResult (common.cuh), shared by the backend and the
// op-parity entry points. Plain C++ (vdiff-cuda-tests uses it too).
#pragma once
#include <algorithm>
#include <cmath>

#include "core/backend.h"
#include "core/rng.h"
#include "core/sampler.h"
#include "cuda/ops.h"

namespace vdiff::cuda {

using ops::kMaxTop;
using ops::TaskDesc;
using ops::TaskResult;

// Rows whose draw is restricted by top-k / top-p are sampled on the host by sample_task (their logits
// copied back): ranking a whole vocabulary per row is not worth a kernel for a rarely used option. Dream
// applies its top-p / top-k at any temperature, so its filtered rows go there too. So do rows with
// repetition penalties (a sparse change of a few logits, made by sample_task as on the CPU).
// So do rows with more logit changes (logit_bias, barred tokens) than a TaskDesc holds.
inline int adjust_count(const RowTask& t) {
  if (!t.rule) return 0;
  int n = static_cast<int>(t.rule->bias.size());
  t.rule->for_each_barred(t.position, [&](int32_t) { ++n; });
  return n;
}

// And rows restricted to allowed tokens, for the whole answer or at their position (a change of nearly
// every logit).
// And rows whose target is ranked (vLLM's prompt logprobs: a count over the row, rarely asked for).
inline bool needs_host(const RowTask& t) {
  return t.penalties != nullptr || t.rank_vocab > 0 || adjust_count(t) > ops::kMaxAdjust ||
         (t.rule && (!t.rule->allowed.empty() || t.rule->allowed_at(t.position) != nullptr)) ||
         (t.rule && (t.rule->filters() || (t.rule->dream && (t.rule->top_p < 1.0 || t.rule->top_k > 0))));
}

static_assert(1 + static_cast<int>(DreamAlg::Origin) == ops::kDreamOrigin &&
                  1 + static_cast<int>(DreamAlg::MaskgitPlus) == ops::kDreamMaskgitPlus &&
                  1 + static_cast<int>(DreamAlg::TopkMargin) == ops::kDreamTopkMargin &&
                  1 + static_cast<int>(DreamAlg::Entropy) == ops::kDreamEntropy,
              "TaskDesc::dream is 1 + DreamAlg");

inline TaskDesc task_desc(const RowTask& t, int row_size) {
  TaskDesc d{};
  d.cond = t.cond;
  d.uncond = t.uncond;
  d.cfg_scale_plus_one = static_cast<float>(t.cfg_scale + 1.0);  // apply_cfg's float scale
  d.sample = t.rule != nullptr;
  d.top_logprobs = std::clamp(t.top_logprobs, 0, kMaxTop);
  d.target = t.target >= 0 && t.target < row_size ? t.target : -1;
  d.eos = d.eot = -1;
  d.vocab_size = t.top_vocab > 0 ? std::min(t.top_vocab, row_size) : row_size;  // a scored row's alternatives
  d.mask_token_id = t.top_vocab > 0 ? t.top_mask : -1;
  if (t.rule) {
    const RowRule& r = *t.rule;
    d.temperature = r.temperature;
    d.key = row_key(t.seed, t.step, t.position);
    d.random_remasking = r.remasking == Remasking::Random;
    d.logits_eos_inf = r.logits_eos_inf;
    d.confidence_eos_eot_inf = r.confidence_eos_eot_inf;
    d.eos = r.eos_token_id >= 0 && r.eos_token_id < row_size ? r.eos_token_id : -1;
    d.eot = r.eot_token_id >= 0 && r.eot_token_id < row_size ? r.eot_token_id : -1;
    d.vocab_size = std::min(r.vocab_size, row_size);
    d.mask_token_id = r.mask_token_id;
    if (adjust_count(t) <= ops::kMaxAdjust) {  // RowRule::adjust's order
      for (const auto& [id, bias] : r.bias) d.adjust_token[d.n_adjust] = id, d.adjust_add[d.n_adjust++] = bias;
      r.for_each_barred(t.position,
                        [&](int32_t id) { d.adjust_token[d.n_adjust] = id, d.adjust_add[d.n_adjust++] = -INFINITY; });
    }
    if (r.dream) {  // sample_row_dream: no EOS/EOT options, no random remasking; the algorithm's confidence
      d.dream = 1 + static_cast<int>(r.alg);
      d.logits_eos_inf = d.confidence_eos_eot_inf = d.random_remasking = 0;
    }
  }
  return d;
}

inline void to_row_result(const TaskResult& r, RowResult& out) {
  out.token = r.token;
  out.probability = r.probability;
  out.confidence = r.confidence;
  out.target_logprob = r.target_logprob;
  out.finite = r.finite != 0;
  out.n_top = r.n_top;
  for (int i = 0; i < r.n_top; ++i) out.top[i] = TopLogprob{r.top_token[i], r.top_logprob[i]};
}

}  // namespace vdiff::cuda
