/**
 * The log-probabilities of a prompt's tokens, for completions' `echo` with `logprobs`: what an evaluation
 * harness (lm-evaluation-harness's completions backends) asks for to get a continuation's log-likelihood
 * and whether it is the model's greedy choice.
 *
 * A left-to-right model reads these off one forward. A masked diffusion model has no left-to-right
 * factorisation of its own; vdiff uses the chain rule in reading order, as for guided_choice
 * (openai/choice.ts): token i is predicted on a canvas holding the prompt's first i tokens in place and
 * masks over the rest of the prompt (the model knows how long the text is, as it does for an answer). The
 * first token has no logprob (null, as OpenAI's). A prompt of P tokens is P - 1 canvases of P positions,
 * one scoring job of the scheduler, run in batched forwards between two steps.
 */
import { Effect, Stream } from "effect"
import type { TopLogprob } from "../engine/Engine.js"
import { Scheduler } from "../scheduler/Scheduler.js"
import { RequestMetrics } from "../telemetry/requests.js"
import { Tokenizer } from "../tokenizer/Tokenizer.js"
import { fromGenerationError } from "./errors.js"
import type { AnswerPlan, PreparedPrompt } from "./plan.js"
import type { RankedLogprob } from "./protocol.js"
import type { TokenTexts } from "./render.js"
import { answeredAtEnd, type ChoiceUpdate, emptyTally, type PromptJob, settledDecoders, settledStep } from "./run.js"

export interface PromptLogprobs {
  readonly ids: ReadonlyArray<number>
  /** Per token; null for the first. */
  readonly logprobs: ReadonlyArray<number | null>
  /** Per token, its position's `top` likeliest tokens (none for the first). */
  readonly alternatives: ReadonlyArray<ReadonlyArray<TopLogprob>>
  /** Where each token's text starts in the prompt's text as the tokenizer decodes it (special tokens left out). */
  readonly offsets: ReadonlyArray<number>
  /** Per token, with ranks asked for: 1 + the tokens likelier than it (null for the first); else empty. */
  readonly ranks: ReadonlyArray<number | null>
}

/** Scores the prompt's tokens (after the first) with `top` alternatives each (and ranks), as one scoring job. */
export const scorePrompt = (tokens: ReadonlyArray<number>, top: number, rank = false) =>
  Effect.gen(function* () {
    const scheduler = yield* Scheduler
    const tokenizer = yield* Tokenizer
    const mask = tokenizer.specialTokens.mask
    const items = tokens.slice(1).map((target, at) => {
      const i = at + 1
      return {
        canvas: [...tokens.slice(0, i), ...new Array<number>(tokens.length - i).fill(mask)],
        positions: [i],
        targets: [target],
        topLogprobs: top,
        rank
      }
    })
    const scored = items.length === 0 ? [] : yield* scheduler.score({ items }).pipe(Effect.mapError(fromGenerationError))
    const detokenizer = tokenizer.detokenizer({ skipSpecialTokens: true })
    let length = 0
    const offsets = tokens.map((token) => {
      const at = length
      length += detokenizer.push(token).length
      return at
    })
    return {
      ids: tokens,
      logprobs: [null, ...scored.map((s) => s.logprobs[0]!)],
      alternatives: [[], ...scored.map((s) => s.top[0] ?? [])],
      offsets,
      ranks: rank ? [null, ...scored.map((s) => s.ranks[0]!)] : []
    } satisfies PromptLogprobs
  }).pipe(Effect.withSpan("vdiff.prompt_logprobs", { attributes: { "vdiff.prompt_tokens": tokens.length } }))

/**
 * vLLM's prompt_logprobs: per prompt token (null for the first), a map from token id to its logprob, rank
 * and text: the prompt's token and its position's `top` likeliest tokens (ranks 1 to top), once each.
 */
export const rankedLogprobs = (scored: PromptLogprobs, top: number, texts: TokenTexts) =>
  scored.ids.map((id, i) => {
    const logprob = scored.logprobs[i]
    if (logprob === null || logprob === undefined) return null
    const entries: Record<string, typeof RankedLogprob.Type> = {}
    scored.alternatives[i]!.slice(0, top).forEach((alternative, k) => {
      entries[String(alternative.token)] = { logprob: alternative.logprob, rank: k + 1, decoded_token: texts.text(alternative.token) }
    })
    entries[String(id)] = { logprob: Math.max(logprob, -9999), rank: scored.ranks[i] ?? 0, decoded_token: texts.text(id) }
    return entries
  })

/**
 * Completions with `max_tokens: 0` (only with echo, as OpenAI's legacy completions took it to score a
 * text): each prompt's n answers are empty, finish reason "length", and nothing is denoised.
 */
export const promptOnlyJobs = (prompts: ReadonlyArray<PreparedPrompt>, plan: AnswerPlan) =>
  Effect.forEach(prompts.map(plan.truncatePrompt), (prompt) =>
    Effect.gen(function* () {
      const tokenizer = yield* Tokenizer
      const metrics = yield* RequestMetrics
      const settings = yield* plan.settingsFor(prompt.tokens.length, prompt.param)
      yield* metrics.started(plan.n)
      const decoders = settledDecoders(plan.n, 0, new Set(), tokenizer)
      const updates = Stream.fromIterable(
        decoders.map((decoder, index): ChoiceUpdate => ({ index, decoder, delta: decoder.commit([]), step: settledStep([], 0, "length") }))
      ).pipe(Stream.concat(answeredAtEnd(metrics, prompt.tokens.length, decoders)))
      return { prompt, settings, run: { decoders, tallies: decoders.map(() => emptyTally()), updates } } satisfies PromptJob
    })
  )
