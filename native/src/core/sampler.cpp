#include "sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

namespace vdiff {

// ---- random numbers -------------------------------------------------------------------------------

uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// ---- block plan and transfer schedule -------------------------------------------------------------

std::vector<BlockPlan> plan_blocks(int gen_length, int block_length, int steps) {
  const int n_blocks = (gen_length + block_length - 1) / block_length;
  // The step budget is shared out evenly over the blocks, the remainder one extra on the first blocks,
  // then clamped to [1, block length]: every block needs a step to be filled, and steps beyond its length
  // would commit nothing (the reference runs them as no-op forwards; the tokens are the same).
  const int base = steps / n_blocks;
  const int extra = steps % n_blocks;
  std::vector<BlockPlan> plan;
  plan.reserve(n_blocks);
  for (int b = 0; b < n_blocks; ++b) {
    const int start = b * block_length;
    const int length = std::min(block_length, gen_length - start);
    const int block_steps = std::clamp(base + (b < extra ? 1 : 0), 1, length);
    plan.push_back({start, length, block_steps});
  }
  return plan;
}

int transfers_at(int masked, int steps, int step) { return masked / steps + (step < masked % steps ? 1 : 0); }

// ---- one row --------------------------------------------------------------------------------------

static int32_t token_of(int32_t id) { return id; }
static int32_t token_of(const std::pair<int32_t, float>& bias) { return bias.first; }

// The entries of `items` (token ids, or (token, bias) pairs) whose token is inside a row of logits.
template <typename T>
static std::vector<T> inside_row(const std::vector<T>& items, const ModelConfig& config) {
  std::vector<T> in;
  for (const T& item : items)
    if (token_of(item) >= 0 && token_of(item) < config.embedding_size) in.push_back(item);
  return in;
}

static std::vector<int32_t> distinct(std::vector<int32_t> ids) {
  std::sort(ids.begin(), ids.end());
  ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
  return ids;
}

static std::vector<std::vector<int32_t>> sets_inside_row(const std::vector<std::vector<int32_t>>& sets,
                                                         const ModelConfig& config) {
  std::vector<std::vector<int32_t>> in;
  for (const auto& set : sets) in.push_back(distinct(inside_row(set, config)));
  return in;
}

// The tokens that end an answer: EOS, the end-of-turn token, the model's stop tokens and the caller's.
static std::vector<int32_t> end_tokens(const SamplingParams& p, const ModelConfig& config) {
  std::vector<int32_t> ends(config.stop_token_ids.begin(), config.stop_token_ids.end());
  ends.push_back(config.eos_token_id);
  ends.push_back(p.eot_token_id);
  ends.insert(ends.end(), p.end_token_ids.begin(), p.end_token_ids.end());
  return inside_row(ends, config);
}

RowRule RowRule::of(const SamplingParams& p, const ModelConfig& config) {
  return RowRule{.row_size = config.embedding_size,
                 .vocab_size = std::min(config.vocab_size, config.embedding_size),
                 .mask_token_id = config.mask_token_id,
                 .temperature = p.temperature,
                 .remasking = p.remasking,
                 .eos_token_id = config.eos_token_id,
                 .eot_token_id = p.eot_token_id,
                 .logits_eos_inf = p.logits_eos_inf,
                 .confidence_eos_eot_inf = p.confidence_eos_eot_inf,
                 .top_k = p.top_k,
                 .top_p = p.top_p,
                 .min_p = p.min_p,
                 .dream = config.decoding == Decoding::Dream,
                 .alg = p.alg,
                 .min_tokens = p.min_tokens,
                 .ignore_eos = p.ignore_eos,
                 .ends = p.min_tokens > 0 || p.ignore_eos ? end_tokens(p, config) : std::vector<int32_t>{},
                 .stops = p.min_tokens > 0 ? inside_row(p.stop_token_ids, config) : std::vector<int32_t>{},
                 .bias = inside_row(p.logit_bias, config),
                 .allowed = distinct(inside_row(p.allowed_token_ids, config)),
                 .position_sets = p.position_allowed,
                 .sets = sets_inside_row(p.allowed_sets, config)};
}

// Sets every logit of the row outside `kept` (ascending) to -inf.
static void keep_only(float* logits, int row_size, const std::vector<int32_t>& kept) {
  size_t next = 0;  // the first kept id >= i
  for (int i = 0; i < row_size; ++i) {
    while (next < kept.size() && kept[next] < i) ++next;
    if (next == kept.size() || kept[next] != i) logits[i] = -std::numeric_limits<float>::infinity();
  }
}

void RowRule::adjust(float* logits, int position) const {
  if (!allowed.empty()) keep_only(logits, row_size, allowed);
  if (const std::vector<int32_t>* set = allowed_at(position)) keep_only(logits, row_size, *set);
  for (const auto& [id, b] : bias) logits[id] += b;
  for_each_barred(position, [&](int32_t id) { logits[id] = -std::numeric_limits<float>::infinity(); });
}

Penalties Penalties::of(const SamplingParams& p, const std::vector<int32_t>& prompt, const std::vector<int32_t>& answer,
                        int mask, int eos, int eot, int row_size) {
  Penalties out;
  out.presence = p.presence_penalty, out.frequency = p.frequency_penalty, out.repetition = p.repetition_penalty;
  std::vector<int32_t> held;
  for (int32_t t : answer)
    if (t >= 0 && t < row_size && t != mask && t != eos && t != eot) held.push_back(t);
  std::sort(held.begin(), held.end());
  for (size_t i = 0; i < held.size();) {
    size_t j = i;
    while (j < held.size() && held[j] == held[i]) ++j;
    out.answer.emplace_back(held[i], static_cast<int>(j - i));
    i = j;
  }
  if (out.repetition != 1.0) {
    for (int32_t t : prompt)
      if (t >= 0 && t < row_size) out.prompt.push_back(t);
    std::sort(out.prompt.begin(), out.prompt.end());
    out.prompt.erase(std::unique(out.prompt.begin(), out.prompt.end()), out.prompt.end());
  }
  return out;
}

void Penalties::apply(float* logits, int row_size) const {
  const auto repeat = [&](int32_t t) {
    const double l = logits[t];
    logits[t] = static_cast<float>(l > 0.0 ? l / repetition : l * repetition);
  };
  if (repetition != 1.0) {
    // Every token of the prompt or the answer once: walk the two sorted lists together.
    size_t a = 0, q = 0;
    while (a < answer.size() || q < prompt.size()) {
      const int32_t ta = a < answer.size() ? answer[a].first : INT32_MAX;
      const int32_t tq = q < prompt.size() ? prompt[q] : INT32_MAX;
      const int32_t t = std::min(ta, tq);
      if (t < row_size) repeat(t);
      a += ta == t;
      q += tq == t;
    }
  }
  if (presence != 0.0 || frequency != 0.0)
    for (const auto& [t, count] : answer)
      if (t < row_size) logits[t] = static_cast<float>(static_cast<double>(logits[t]) - frequency * count - presence);
}

void apply_cfg(float* cond, const float* uncond, size_t n, double cfg_scale) {
  const float scale = static_cast<float>(cfg_scale + 1.0);
  for (size_t i = 0; i < n; ++i) cond[i] = uncond[i] + scale * (cond[i] - uncond[i]);
}

static constexpr float kMinusInf = -std::numeric_limits<float>::infinity();

// Whether x0 may be `token`: a real token (not head padding) and not the mask.
static inline bool drawable(int token, const RowRule& rule) {
  return token < rule.vocab_size && token != rule.mask_token_id;
}

// argmax over the drawable tokens, the first index winning ties like torch.argmax.
static int32_t argmax(const float* v, const RowRule& rule) {
  int32_t best = -1;
  for (int i = 0; i < rule.vocab_size; ++i)
    if (drawable(i, rule) && (best < 0 || v[i] > v[best])) best = i;
  return best < 0 ? 0 : best;
}

// float64 softmax probability of entry `index`.
static double softmax_probability(const float* logits, int n, int index) {
  double max = -std::numeric_limits<double>::infinity();
  for (int i = 0; i < n; ++i) max = std::max(max, static_cast<double>(logits[i]));
  if (!std::isfinite(max)) return 0.0;  // every entry -inf (or NaN/inf logits): no usable distribution
  double sum = 0.0;
  for (int i = 0; i < n; ++i) sum += std::exp(static_cast<double>(logits[i]) - max);
  return std::exp(static_cast<double>(logits[index]) - max) / sum;
}

static bool in_vocab(int token, int vocab) { return token >= 0 && token < vocab; }

// The ranking top-k and top-p filter by: higher logit first, ties to the lower id; NaN ranks as -inf.
static inline float rank_logit(float logit) { return std::isnan(logit) ? kMinusInf : logit; }

static inline bool ranks_before(const float* logits, int32_t a, int32_t b) {
  const float la = rank_logit(logits[a]), lb = rank_logit(logits[b]);
  return la > lb || (la == lb && a < b);
}

// The last candidate of a filtered draw: the candidates are the drawable tokens ranked no lower than it
// (see sampler.h for the rule). -1: no restriction (no drawable token, or no usable distribution).
static int32_t last_candidate(const float* logits, const RowRule& rule, std::vector<int32_t>& order) {
  order.clear();
  for (int i = 0; i < rule.vocab_size; ++i)
    if (drawable(i, rule)) order.push_back(i);
  const int n = static_cast<int>(order.size());
  if (n == 0) return -1;
  const auto better = [logits](int32_t a, int32_t b) { return ranks_before(logits, a, b); };
  // order[0 .. sorted) is the head of the ranking, in order; it grows only as far as needed, since a
  // full sort of a 126k-token row for every row of every step would cost more than the draw itself.
  int sorted = 0;
  const auto sort_head = [&](int count) {
    std::partial_sort(order.begin(), order.begin() + count, order.end(), better);
    sorted = count;
  };
  const int keep = rule.top_k > 0 ? std::min(rule.top_k, n) : n;
  if (keep < n) sort_head(keep);
  if (rule.top_p >= 1.0) return keep < n ? order[keep - 1] : -1;

  if (sorted == 0) sort_head(std::min(n, 64));
  const double max = rank_logit(logits[order[0]]);
  if (!std::isfinite(max)) return keep < n ? order[keep - 1] : -1;
  const double temperature = rule.temperature;
  const auto weight = [&](int32_t id) {
    return std::exp((static_cast<double>(rank_logit(logits[id])) - max) / temperature);
  };
  double total = 0.0;  // over the tokens top-k kept: order[0 .. keep), sorted or not
  for (int j = 0; j < keep; ++j) total += weight(order[j]);
  const double target = rule.top_p * total;
  double mass = 0.0;
  for (int j = 0; j < keep; ++j) {
    if (j == sorted) sort_head(std::min(keep, sorted * 8));
    mass += weight(order[j]);
    if (mass >= target) return order[j];
  }
  return keep < n ? order[keep - 1] : -1;  // rounding kept the sum below the target: every kept token
}

RowChoice sample_row(float* logits, const RowRule& rule, const Rng& rng, std::vector<int32_t>* scratch) {
  if (rule.dream) return sample_row_dream(logits, rule, rng, scratch);
  const int n = rule.row_size;
  if (rule.logits_eos_inf && in_vocab(rule.eos_token_id, n)) logits[rule.eos_token_id] = kMinusInf;

  RowChoice choice;
  if (rule.temperature > 0.0) {
    int32_t last = -1;  // the last top-k / top-p candidate; -1: every drawable token is one
    if (rule.top_k > 0 || rule.top_p < 1.0) {
      std::vector<int32_t> local;
      last = last_candidate(logits, rule, scratch ? *scratch : local);
    }
    // min-p: p_i >= min_p * p_max of softmax(l / T) is l_i >= l_max + T * log(min_p); the likeliest
    // token always passes.
    double min_logit = -std::numeric_limits<double>::infinity();
    if (rule.min_p > 0.0) {
      double max = -std::numeric_limits<double>::infinity();
      for (int i = 0; i < rule.vocab_size; ++i)
        if (drawable(i, rule)) max = std::max(max, static_cast<double>(rank_logit(logits[i])));
      if (std::isfinite(max)) min_logit = max + rule.temperature * std::log(rule.min_p);
    }
    // Gumbel-max in float64: the reference takes argmax of exp(l) / (-log u)^T. Its logarithm,
    // l - T * log(-log u), has the same argmax and cannot overflow. Token i's noise is draw i of the row's
    // stream (a pure function of the index), so it is drawn for the candidates alone: the filters above
    // leave few of them (min-p 0.1 a handful of 8,192), and the two logarithms a draw were 4% of a step.
    double best = -std::numeric_limits<double>::infinity();
    int32_t best_index = -1;
    for (int i = 0; i < rule.vocab_size; ++i) {
      const bool candidate = drawable(i, rule) && (last < 0 || i == last || ranks_before(logits, i, last)) &&
                             static_cast<double>(logits[i]) >= min_logit;
      if (!candidate) continue;
      const double u = rng.uniform(static_cast<uint64_t>(i));
      const double score = static_cast<double>(logits[i]) - rule.temperature * std::log(-std::log(u));
      if (best_index < 0 || score > best) {
        best = score;
        best_index = i;
      }
    }
    choice.token = best_index < 0 ? 0 : best_index;
  } else {
    choice.token = argmax(logits, rule);
  }

  // The reference's confidence_eos_eot_inf writes `logits_with_noise[eos] = logits[eot] = -inf` after x0
  // is taken: it never changes x0, only the softmax below. At temperature 0 its noisy logits are the
  // logits tensor itself, so EOS and EOT both drop out; at temperature > 0 they are a separate float64
  // tensor, so only EOT does. A row whose x0 dropped out gets probability 0 and is committed last.
  if (rule.confidence_eos_eot_inf) {
    if (rule.temperature == 0.0 && in_vocab(rule.eos_token_id, n)) logits[rule.eos_token_id] = kMinusInf;
    if (in_vocab(rule.eot_token_id, n)) logits[rule.eot_token_id] = kMinusInf;
  }
  choice.probability = softmax_probability(logits, n, choice.token);
  if (std::isnan(choice.probability)) choice.probability = 0.0;

  if (rule.remasking == Remasking::Random) {
    // A draw of the row stream past any token's (rng.h, kConfidenceDraw).
    choice.confidence = rng.uniform(kConfidenceDraw);
  } else {
    choice.confidence = choice.probability;
  }
  return choice;
}

RowChoice sample_row_dream(const float* logits, const RowRule& rule, const Rng& rng, std::vector<int32_t>* scratch) {
  const int n = rule.row_size;
  const double temperature = rule.temperature;
  // z: the row at the temperature, float64; NaN ranks (and weighs) as -inf.
  const auto z = [&](int i) {
    const double l = rank_logit(logits[i]);
    return temperature > 0.0 ? l / temperature : l;
  };
  const auto before = [&](int32_t a, int32_t b) {  // the ranking: higher z first, ties to the lower id
    const double za = z(a), zb = z(b);
    return za > zb || (za == zb && a < b);
  };
  RowChoice choice;
  int32_t top = 0;
  for (int i = 1; i < n; ++i)
    if (before(i, top)) top = i;
  const double max = z(top);
  if (!std::isfinite(max)) return choice;  // no usable distribution: token 0, probability 0
  double total = 0.0;
  for (int i = 0; i < n; ++i) total += std::exp(z(i) - max);

  // The filters keep a prefix of the ranking: the tokens ranked no lower than `last` (-1: every token).
  int32_t last = -1;
  if (rule.top_p < 1.0 || rule.top_k > 0) {
    std::vector<int32_t> local;
    std::vector<int32_t>& order = scratch ? *scratch : local;
    order.resize(n);
    std::iota(order.begin(), order.end(), 0);
    // order[0 .. sorted) is the head of the ranking; it grows only as far as the filters look.
    int sorted = 0;
    const auto sort_to = [&](int count) {
      if (count <= sorted) return;
      count = std::min(n, std::max(count, sorted * 8));
      std::partial_sort(order.begin() + sorted, order.begin() + count, order.end(), before);
      sorted = count;
    };
    int kept = n;  // the prefix order[0 .. kept)
    if (rule.top_p < 1.0) {
      double mass = 0.0;
      for (int j = 0; j < n; ++j) {
        sort_to(std::max(j + 1, 64));
        if (j > 0 && mass / total > rule.top_p) {
          kept = j;
          break;
        }
        mass += std::exp(z(order[j]) - max);
      }
    }
    if (rule.top_k > 0 && rule.top_k < kept) {
      sort_to(rule.top_k);
      const double kth = z(order[rule.top_k - 1]);
      int j = rule.top_k;  // ties with the top_k-th are kept
      for (; j < kept; ++j) {
        sort_to(j + 1);
        if (z(order[j]) < kth) break;
      }
      kept = j;
    }
    if (kept < n) last = order[kept - 1];
  }
  const auto is_kept = [&](int32_t i) { return last < 0 || i == last || before(i, last); };

  double sum = last < 0 ? total : 0.0;  // of the kept tokens' weights
  double best = -std::numeric_limits<double>::infinity();
  int32_t x0 = -1;
  for (int i = 0; i < n; ++i) {
    if (!is_kept(i)) continue;
    if (last >= 0) sum += std::exp(z(i) - max);
    if (!drawable(i, rule)) continue;
    // Gumbel-max draws from p at temperature > 0; at 0 the first of the highest z wins.
    const double score = temperature > 0.0 ? z(i) - std::log(-std::log(rng.uniform(static_cast<uint64_t>(i)))) : z(i);
    if (x0 < 0 || score > best) best = score, x0 = i;
  }
  if (x0 < 0) return choice;  // nothing drawable is kept (only the mask or padding)
  choice.token = x0;
  choice.probability = std::exp(z(x0) - max) / sum;
  switch (rule.alg) {
    case DreamAlg::Origin:
    case DreamAlg::MaskgitPlus: choice.confidence = choice.probability; break;
    case DreamAlg::TopkMargin: {
      double first = 0.0, second = 0.0;
      for (int i = 0; i < n; ++i) {
        if (!is_kept(i)) continue;
        const double p = std::exp(z(i) - max) / sum;
        if (p > first) second = first, first = p;
        else if (p > second) second = p;
      }
      choice.confidence = first - second;
      break;
    }
    case DreamAlg::Entropy: {
      double negative_entropy = 0.0;
      for (int i = 0; i < n; ++i) {
        if (!is_kept(i)) continue;
        const double p = std::exp(z(i) - max) / sum;
        negative_entropy += p * std::log(p + 1e-10);
      }
      choice.confidence = negative_entropy;
      break;
    }
  }
  return choice;
}

// NaN ranks like -inf.
static inline double rank_confidence(double c) { return std::isnan(c) ? -INFINITY : c; }

// The ranking of rows: more confident first, ties to the lower index.
static auto more_confident(const double* confidence) {
  return [confidence](int a, int b) {
    const double ca = rank_confidence(confidence[a]), cb = rank_confidence(confidence[b]);
    return ca > cb || (ca == cb && a < b);
  };
}

std::vector<int> select_most_confident(const double* confidence, int n, int k) {
  k = std::clamp(k, 0, n);
  std::vector<int> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::partial_sort(order.begin(), order.begin() + k, order.end(), more_confident(confidence));
  order.resize(k);
  std::sort(order.begin(), order.end());
  return order;
}

// ---- confidence-aware parallel decoding -----------------------------------------------------------

std::vector<int> select_parallel(const double* confidence, int n, double threshold, double factor) {
  std::vector<int> order(std::max(n, 0));
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), more_confident(confidence));
  int take = n > 0 ? 1 : 0;  // the most confident row, whatever its confidence
  while (take < n) {
    const int count = take + 1;  // committing this row would make `count` tokens in this step
    const double bar = threshold > 0.0 ? threshold : 1.0 - factor / (count + 1);
    if (!(rank_confidence(confidence[order[take]]) >= bar)) break;
    ++take;
  }
  order.resize(take);
  std::sort(order.begin(), order.end());
  return order;
}

// ---- early stop -----------------------------------------------------------------------------------

bool answer_has_ended(const int32_t* answer, int length, int eos, int eot) {
  const auto is_end = [eos, eot](int32_t t) { return t == eos || (eot >= 0 && t == eot); };
  int first = 0;
  while (first < length && !is_end(answer[first])) ++first;
  if (first == length) return false;
  for (int i = first + 1; i < length; ++i)
    if (!is_end(answer[i])) return false;
  return true;
}

}  // namespace vdiff
