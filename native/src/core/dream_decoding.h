// Dream's generation (ModelConfig::decoding == Dream) as a sequence of the step engine, after
// tools/reference/dream_generate.py (Dream's diffusion_generate):
//
// The canvas is prompt + gen_length masks, attended bidirectionally, with no blocks; every step one
// forward over the whole canvas, whose predictions are shifted (ModelConfig::prediction_row). Step i of
// `steps` has times t = ts[i], s = ts[i + 1] of ts = linspace(1, eps, steps + 1) in float32
// (dream_timesteps). With n masks left:
//   maskgit_plus, topk_margin, entropy: k = int(n (1 - s / t)) in float32 (all n at the last step;
//     dream_transfer_count); the rows of the masked positions are sampled (sampler.h, sample_row_dream) and
//     the k with the highest confidence are committed (ties to the lower position), or with alg_temp > 0 k
//     positions drawn without replacement from softmax(confidence / alg_temp) (Gumbel top-k with the
//     draws kSelectDraw of the rows' streams);
//   origin: each masked position is revealed with probability 1 - s / t (1 at the last step; draw
//     kRevealDraw of its row's stream), and only the revealed rows are sampled and committed.
// A step with nothing to commit runs no forward (the reference's would change nothing). The sequence
// finishes after `steps` steps; there is no early stop, and an end token is an ordinary token
// (finish_reason Eos when the answer holds EOS, a stop token or eot_token_id).
#pragma once
#include <memory>
#include <vector>

#include "sequence.h"

namespace vdiff {

// Checks the settings against Dream decoding (refusing those that do not apply, each naming its field:
// cfg_scale, remasking, suffix, min_p, parallel_threshold, parallel_factor, kv_cache,
// logits_eos_inf, confidence_eos_eot_inf; alg_temp and eps out of range) and makes the sequence, with a
// template's tokens in place (the steps commit the masks around them). The common checks (engine.cpp,
// validate, the template's) ran before.
std::shared_ptr<Sequence> make_dream_sequence(const std::vector<int32_t>& prompt, const SamplingParams& params,
                                              const std::vector<int32_t>& suffix,
                                              const std::vector<int32_t>& answer_template, const Backend& backend);

// linspace(1, eps, steps + 1) in float32, torch's scalar rule: step = (eps - 1) / steps; entry i below
// (steps + 1) / 2 is 1 + step i, the others eps - step (steps - i), each operation rounded to float32.
std::vector<float> dream_timesteps(int steps, double eps);

// Positions committed at step i of `steps` with `masks` masks left (maskgit_plus, topk_margin, entropy):
// int(float32(masks) * float32(1 - float32(ts[i + 1] / ts[i]))), all of them at the last step.
int dream_transfer_count(int masks, int step, int steps, const std::vector<float>& ts);

// Origin's probability of revealing a masked position at step i: float32(1 - float32(ts[i + 1] / ts[i])),
// 1 at the last step.
double dream_reveal_probability(int step, int steps, const std::vector<float>& ts);

}  // namespace vdiff
