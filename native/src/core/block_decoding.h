// Block diffusion (ModelConfig::decoding == Block: LLaDA2.0/2.1, SDAR) as a sequence of the step engine.
//
// The canvas is the prompt plus mask tokens up to nb * B positions, nb = ceil((P + G) / B), B the model's
// block length; the answer is canvas[P, P + G) (the positions past it in the last block are denoised like
// the others but never reported). Attention is block-causal with blocks aligned at position 0, so the
// blocks b = P / B .. nb - 1 are written one after the other; the prompt's tail (P mod B tokens) sits in
// the first of them, is recomputed with it every step, and is never committed or edited.
//
// A denoise step of block b (tools/reference/block_generate.py has the same rules):
//   x0 = the row's token (argmax at temperature 0), p its float64 softmax probability; the confidence of
//   a masked position is p. Without editing the step commits {confidence > parallel_threshold} when it
//   holds at least the step's quota, else the quota's most confident (ties to the lower position); the
//   quotas of a block are [B / steps] * steps with the first B % steps one more; parallel_threshold 0:
//   the quota only. A block is done when it has no mask.
//   With editing (LLaDA2.1, editing_threshold >= 0; steps unused): masks {confidence > parallel_threshold},
//   else the single most confident; and every committed position of the block (not the prompt's) whose
//   x0 differs from its token with p > editing_threshold takes x0. A step whose input had no mask and that
//   edits nothing ends the block; so does a block without masks that already took max_post_steps such
//   steps.
// After a block is done, the sequence finishes when the answer up to the block's end holds the EOS or a
// stop token (later blocks stay masks), or when it was the last block.
//
// With a template (structured output's JSON skeleton; engine.cpp checks it), its tokens are in place from
// the start and are never denoised, edited or reported. A block whose answer positions are all template
// tokens is never denoised: it is committed with the block before it (Commit [bB, b'B) over the run of
// such blocks; after the prefill for those before the first block to denoise). A block holding template
// tokens spreads its steps over its masks (quotas of its masks over min(steps, masks) steps), as
// full-canvas blocks do. No end token finishes a templated answer: it runs to the template's end.
//
// Forwards and phases (StepOutput::phase), one per step:
//   kv_cache Prefix (the exact block cache): Prefill [0, (P / B) B) once when P >= B (no rows sampled;
//     [C, (P / B) B) when the prefix cache held the prompt's first C positions, none when it held them all;
//     in chunks of prefill_chunk positions, one per step, when set; with a prefix cache, Prefill steps with
//     no forward while another sequence prefills the same leading blocks, which are then copied);
//     Denoise [bB, (b + 1) B) attending the cached keys before it; Commit [bB, (b + 1) B) from the block's
//     final tokens once it is done, which caches its exact keys and values (none when the sequence
//     finishes). forwards = prefill (one, or one per chunk) + denoise steps + one commit per block but the last.
//   kv_cache None: every step is a Denoise forward over [0, (b + 1) B), no cache.
// Reported tokens: without editing the committed ones of each step (answer positions only); with
// editing, the block's written tokens are provisional (StepOutput::provisional) and reach `committed`,
// with their final values, in the step that closes the block.
#pragma once
#include <memory>
#include <vector>

#include "prefix_cache.h"
#include "sequence.h"

namespace vdiff {

// Checks the settings against block decoding (refusing LLaDA's that do not apply to it, each naming its
// field: cfg_scale, remasking, suffix, parallel_factor, kv_cache dual, block_length other than
// the model's, editing_threshold on a family without editing, a canvas beyond the context) and makes the
// sequence, with its KV cache for kv_cache Prefix. The common checks (engine.cpp, validate) ran before.
// prefill_chunk > 0 (EngineOptions): the prefill runs in forwards of at most that many positions (whole
// blocks, at least one), one per step: Prefill [C, C + chunk), [C + chunk, C + 2 chunk), ...
// With kv_cache Prefix and a prefix cache, the prompt's whole blocks that an earlier sequence computed are
// copied from it (StepOutput::prompt_cached), and the prefill computes only the rest; the sequence leaves
// its prompt's whole blocks there after its prefill, and its exact prefix (prompt and committed answer
// blocks) when it finishes.
std::shared_ptr<Sequence> make_block_sequence(const std::vector<int32_t>& prompt, const SamplingParams& params,
                                              const std::vector<int32_t>& suffix,
                                              const std::vector<int32_t>& answer_template, Backend& backend,
                                              const std::shared_ptr<PrefixCache>& prefix_cache = nullptr,
                                              int prefill_chunk = 0);

// The quota of each step of a block of `block_length` positions over `steps` steps (the reference's
// schedule: block_length / steps each, the first block_length % steps one more; zeros past block_length).
std::vector<int> block_schedule(int block_length, int steps);

}  // namespace vdiff
