#include "dream_decoding.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "error.h"
#include "sampler.h"

namespace vdiff {

namespace {

Error invalid(const std::string& message, const std::string& param) {
  return Error(ErrorCode::InvalidArgument, message, param);
}

class DreamSequence final : public Sequence {
 public:
  std::vector<int32_t> canvas;  // prompt, then the answer (mask tokens where nothing is committed yet)
  std::vector<float> ts;        // the time schedule, steps + 1 entries
  bool templated = false;       // a template fixed some answer positions: it ends where the template ends

  int answer_begin() const { return prompt_length; }
  std::vector<int32_t> answer() const override {
    return std::vector<int32_t>(canvas.begin() + answer_begin(), canvas.end());
  }
  uint64_t cache_bytes() const override { return 0; }
  uint64_t memory_bytes() const override {
    return sizeof(DreamSequence) + canvas.capacity() * sizeof(int32_t) + ts.capacity() * sizeof(float);
  }

  void plan(StepWork& w, const ModelConfig& config) const override {
    const int step = steps_done;
    std::vector<int32_t> masked;
    for (int p = answer_begin(); p < static_cast<int>(canvas.size()); ++p)
      if (canvas[p] == config.mask_token_id) masked.push_back(p);
    const int n = static_cast<int>(masked.size());
    if (params.alg == DreamAlg::Origin) {
      const double reveal = dream_reveal_probability(step, steps_total, ts);
      for (int32_t p : masked)
        if (row_rng(params.seed, step, p - prompt_length).uniform(kRevealDraw) < reveal) w.rows.push_back(p);
      w.k = static_cast<int>(w.rows.size());
    } else {
      w.k = std::min(dream_transfer_count(n, step, steps_total, ts), n);
      if (w.k > 0) w.rows = masked;
    }
    w.finishes = step + 1 >= steps_total;
    if (w.rows.empty()) return;  // nothing to commit: no forward, the step still counts
    w.logit_rows.reserve(w.rows.size());
    for (int32_t p : w.rows) w.logit_rows.push_back(config.prediction_row(p));
    const int length = static_cast<int>(canvas.size());
    w.forwards.push_back(ForwardSeq{canvas.data(), length, w.logit_rows.data(), static_cast<int>(w.logit_rows.size())});
    w.computed = length;
  }

  void decide(StepWork& w, const RowResult* rows, StepOutput& out, const ModelConfig&) const override {
    out.block = 0;
    const int n = static_cast<int>(w.rows.size());
    if (n == 0) return;
    std::vector<int> chosen;
    if (params.alg == DreamAlg::Origin) {
      for (int r = 0; r < n; ++r) chosen.push_back(r);
    } else if (params.alg_temp > 0.0) {
      // k draws without replacement from softmax(confidence / alg_temp): the k largest of
      // confidence / alg_temp plus Gumbel noise.
      std::vector<double> keys(n);
      for (int r = 0; r < n; ++r) {
        const double u = row_rng(params.seed, steps_done, w.rows[r] - prompt_length).uniform(kSelectDraw);
        keys[r] = rows[r].confidence / params.alg_temp - std::log(-std::log(u));
      }
      chosen = select_most_confident(keys.data(), n, w.k);
    } else {
      std::vector<double> confidence(n);
      for (int r = 0; r < n; ++r) confidence[r] = rows[r].confidence;
      chosen = select_most_confident(confidence.data(), n, w.k);
    }
    for (int r : chosen) {
      const RowResult& c = rows[r];
      out.committed.push_back(CommittedToken{w.rows[r] - answer_begin(), c.token, static_cast<float>(c.probability),
                                             std::vector<TopLogprob>(c.top, c.top + c.n_top)});
    }
  }

  void apply(const StepWork& w, StepOutput& out, const ModelConfig& config) override {
    for (const CommittedToken& t : out.committed) canvas[answer_begin() + t.position] = t.token;
    if (!w.finishes) return;
    finished = true;
    const auto is_end = [&](int32_t t) {
      if (t == config.eos_token_id || (params.eot_token_id >= 0 && t == params.eot_token_id)) return true;
      return std::find(config.stop_token_ids.begin(), config.stop_token_ids.end(), t) != config.stop_token_ids.end();
    };
    reason = !templated && std::any_of(canvas.begin() + answer_begin(), canvas.end(), is_end) ? FinishReason::Eos
                                                                                              : FinishReason::Length;
  }
};

}  // namespace

std::vector<float> dream_timesteps(int steps, double eps) {
  const int count = steps + 1;
  const float start = 1.0f, end = static_cast<float>(eps);
  const float step = (end - start) / static_cast<float>(count - 1);
  std::vector<float> out(count);
  const int half = count / 2;
  for (int i = 0; i < count; ++i) {
    if (i < half) {
      const float offset = step * static_cast<float>(i);
      out[i] = start + offset;
    } else {
      const float offset = step * static_cast<float>(count - 1 - i);
      out[i] = end - offset;
    }
  }
  return out;
}

int dream_transfer_count(int masks, int step, int steps, const std::vector<float>& ts) {
  if (step >= steps - 1) return masks;
  const float ratio = ts[step + 1] / ts[step];
  const float fraction = 1.0f - ratio;
  const float product = static_cast<float>(masks) * fraction;
  return static_cast<int>(product);
}

double dream_reveal_probability(int step, int steps, const std::vector<float>& ts) {
  if (step >= steps - 1) return 1.0;
  const float ratio = ts[step + 1] / ts[step];
  return static_cast<double>(1.0f - ratio);
}

std::shared_ptr<Sequence> make_dream_sequence(const std::vector<int32_t>& prompt, const SamplingParams& p,
                                              const std::vector<int32_t>& suffix,
                                              const std::vector<int32_t>& answer_template, const Backend& backend) {
  const ModelConfig& config = backend.config();
  const std::string model = " (model type " + config.model_type + ")";
  if (p.cfg_scale > 0.0) throw invalid("cfg_scale does not apply to Dream decoding" + model, "cfg_scale");
  if (p.remasking != Remasking::LowConfidence)
    throw invalid("remasking does not apply to Dream decoding (its alg chooses what to commit)" + model, "remasking");
  if (!suffix.empty()) throw invalid("a suffix (infilling) is not supported by Dream decoding" + model, "suffix");
  if (p.min_p > 0.0) throw invalid("min_p does not apply to Dream decoding" + model, "min_p");
  if (p.parallel_threshold > 0.0)
    throw invalid("parallel_threshold does not apply to Dream decoding" + model, "parallel_threshold");
  if (p.parallel_factor > 0.0)
    throw invalid("parallel_factor does not apply to Dream decoding" + model, "parallel_factor");
  if (p.kv_cache != KVCacheMode::None)
    throw invalid("kv_cache must be none for Dream decoding (it recomputes the canvas every step)" + model, "kv_cache");
  if (p.logits_eos_inf) throw invalid("logits_eos_inf does not apply to Dream decoding" + model, "logits_eos_inf");
  if (p.confidence_eos_eot_inf)
    throw invalid("confidence_eos_eot_inf does not apply to Dream decoding" + model, "confidence_eos_eot_inf");
  if (p.alg != DreamAlg::Origin && p.alg != DreamAlg::MaskgitPlus && p.alg != DreamAlg::TopkMargin &&
      p.alg != DreamAlg::Entropy)
    throw invalid("alg must be origin, maskgit_plus, topk_margin or entropy", "alg");
  if (!(p.alg_temp >= 0.0) || !std::isfinite(p.alg_temp))
    throw invalid("alg_temp must be a finite number >= 0 (got " + std::to_string(p.alg_temp) + ")", "alg_temp");
  if (!(p.eps > 0.0 && p.eps < 1.0)) throw invalid("eps must be in (0, 1) (got " + std::to_string(p.eps) + ")", "eps");

  auto seq = std::make_shared<DreamSequence>();
  seq->prompt_length = static_cast<int>(prompt.size());
  seq->params = p;
  seq->canvas.reserve(prompt.size() + p.gen_length);
  seq->canvas.assign(prompt.begin(), prompt.end());
  seq->canvas.resize(prompt.size() + p.gen_length, config.mask_token_id);
  // A template's tokens (engine.cpp checked it) are in place from the start: the steps commit its masks.
  for (size_t q = 0; q < answer_template.size(); ++q)
    if (answer_template[q] != -1) seq->canvas[prompt.size() + q] = answer_template[q];
  seq->templated = !answer_template.empty();
  seq->steps_total = p.steps;
  seq->ts = dream_timesteps(p.steps, p.eps);
  return seq;
}

}  // namespace vdiff
