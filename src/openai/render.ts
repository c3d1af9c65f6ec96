/**
 * Rendering answers as OpenAI responses: tokens, logprobs and snapshots, and ONE response builder that
 * completions and chat share (`respond`): the JSON body of a finished request, or the server-sent events
 * of a streamed one — head fields, choice indexes (prompt × n + answer), finish reasons, token ids,
 * snapshots, the usage chunk and the `diffusion` statistics. An endpoint gives only what its choices say
 * in their own words (completions: `text`; chat: `message` / `delta`), through a `ChoiceRenderer`.
 */
import { HttpServerResponse } from "@effect/platform"
import { Clock, Effect, Option } from "effect"
import { lladaFamily, type ModelFamily } from "../config/sampling.js"
import { phaseOf, provisionalOf, type TopLogprob } from "../engine/Engine.js"
import type { TokenizerShape } from "../tokenizer/Tokenizer.js"
import { type ChoiceDecoder, NOT_COMMITTED } from "./ChoiceDecoder.js"
import type { AnswerPlan } from "./plan.js"
import { type ChatTokenLogprob, type CompletionLogprobs, type FinishReason, MASK_PLACEHOLDER, type Snapshot } from "./protocol.js"
import { type ChoiceUpdate, diffusionOfJobs, mergedChunks, type PromptJob, runToEnd, usageOfJobs, worthAChunk } from "./run.js"
import { respondSse } from "./streaming.js"

/** What JSON cannot say (-Infinity) said as vLLM does. */
const LOGPROB_FLOOR = -9999

export const logprobOf = (probability: number): number => (probability > 0 ? Math.log(probability) : LOGPROB_FLOOR)

/** A log-probability as JSON can say it. */
const finiteLogprob = (logprob: number): number => (Number.isFinite(logprob) ? logprob : LOGPROB_FLOOR)

/**
 * Renders single tokens for logprobs and snapshots, caching each id's text. A token of a byte-level
 * vocabulary may be part of a character; its text then holds U+FFFD and its bytes are unknown (null).
 */
export class TokenTexts {
  private readonly cache = new Map<number, string>()
  constructor(private readonly tokenizer: TokenizerShape) {}

  text(id: number): string {
    let text = this.cache.get(id)
    if (text === undefined) {
      text = this.tokenizer.decode([id])
      this.cache.set(id, text)
    }
    return text
  }

  bytes(id: number): Array<number> | null {
    const text = this.text(id)
    return text.includes("\uFFFD") ? null : Array.from(new TextEncoder().encode(text))
  }
}

/**
 * Completions logprobs of the decoder's tokens [from, to); offsets shifted by `textStart` (echo). With
 * `top` > 0 each token's `top_logprobs` maps the `top` likeliest tokens at the step that committed it
 * (the engine's alternatives) to their logprobs, plus the chosen token when it is not among them — up to
 * top + 1 entries, as OpenAI documents. Tokens that render to the same text keep the likelier's entry.
 * With 0 it is null, as the recorded responses have it.
 */
export const completionLogprobs = (
  decoder: ChoiceDecoder,
  from: number,
  to: number,
  top: number,
  textStart: number,
  texts: TokenTexts
): CompletionLogprobs =>
  tokenLogprobs(
    {
      ids: decoder.tokenIds.slice(from, to),
      logprobs: decoder.probabilities.slice(from, to).map(logprobOf),
      alternatives: decoder.alternatives.slice(from, to),
      offsets: decoder.textOffsets.slice(from, to).map((offset) => offset + textStart)
    },
    top,
    texts
  )

/**
 * Completions logprobs of tokens given with their logprobs (null: none, as for a prompt's first token),
 * their likeliest alternatives and their text offsets; `top` as completionLogprobs says.
 */
export const tokenLogprobs = (
  given: {
    readonly ids: ReadonlyArray<number>
    readonly logprobs: ReadonlyArray<number | null>
    readonly alternatives: ReadonlyArray<ReadonlyArray<TopLogprob>>
    readonly offsets: ReadonlyArray<number>
  },
  top: number,
  texts: TokenTexts
): CompletionLogprobs => {
  const { ids, logprobs } = given
  const tokens = ids.map((id) => texts.text(id))
  const topOf = (i: number): Record<string, number> | null => {
    const own = logprobs[i]!
    if (own === null) return null
    const entries: Record<string, number> = {}
    for (const alternative of given.alternatives[i]!.slice(0, top)) {
      const text = texts.text(alternative.token)
      if (!Object.hasOwn(entries, text)) {
        entries[text] = alternative.token === ids[i] ? own : finiteLogprob(alternative.logprob)
      }
    }
    if (!Object.hasOwn(entries, tokens[i]!)) entries[tokens[i]!] = own
    return entries
  }
  return {
    tokens,
    token_logprobs: logprobs.map((logprob) => (logprob === null ? null : finiteLogprob(logprob))),
    top_logprobs: top > 0 ? tokens.map((_, i) => topOf(i)) : null,
    text_offset: [...given.offsets]
  }
}

/** Two completions logprobs one after the other (an echoed prompt's, then its answer's). */
export const concatLogprobs = (a: CompletionLogprobs, b: CompletionLogprobs): CompletionLogprobs => ({
  tokens: [...a.tokens, ...b.tokens],
  token_logprobs: [...a.token_logprobs, ...b.token_logprobs],
  top_logprobs: a.top_logprobs === null || b.top_logprobs === null ? null : [...a.top_logprobs, ...b.top_logprobs],
  text_offset: [...a.text_offset, ...b.text_offset]
})

/**
 * Chat logprobs of the decoder's tokens [from, to): each token's logprob (of the probability it had when
 * committed) and its `top` likeliest alternatives at that step, most likely first, as the engine reported
 * them (none for a token fixed by a template, which no step chose).
 */
export const chatLogprobs = (
  decoder: ChoiceDecoder,
  from: number,
  to: number,
  top: number,
  texts: TokenTexts
): { content: Array<ChatTokenLogprob> } => ({
  content: decoder.tokenIds.slice(from, to).map((id, i) => {
    const logprob = logprobOf(decoder.probabilities[from + i]!)
    return {
      token: texts.text(id),
      logprob,
      bytes: texts.bytes(id),
      // The chosen token among its alternatives carries the same logprob as itself.
      top_logprobs: decoder.alternatives[from + i]!.slice(0, top).map((alternative) => ({
        token: texts.text(alternative.token),
        logprob: alternative.token === id ? logprob : finiteLogprob(alternative.logprob),
        bytes: texts.bytes(alternative.token)
      }))
    }
  })
})

/**
 * The snapshot of an update made with `includeSnapshots` (which copied the canvas). Under block decoding
 * it also says the step's phase and, with token editing, which positions hold provisional tokens (shown
 * in the canvas, not yet final).
 */
export const snapshotOf = (update: ChoiceUpdate, texts: TokenTexts, blockLength: number, family: ModelFamily = lladaFamily): Snapshot => {
  const tokens = update.canvas === undefined ? [] : Array.from(update.canvas)
  const provisional = family.decoding === "block" ? provisionalOf(update.step).filter((p) => p.position < tokens.length) : []
  for (const p of provisional) if (tokens[p.position] === NOT_COMMITTED) tokens[p.position] = p.token
  const canvas: Array<string> = []
  let masked = 0
  for (const token of tokens) {
    if (token === NOT_COMMITTED) {
      canvas.push(MASK_PLACEHOLDER)
      masked++
    } else canvas.push(texts.text(token))
  }
  const snapshot = {
    step: update.step.stepsDone,
    total_steps: update.step.stepsTotal,
    block: update.step.block,
    block_length: blockLength,
    masked,
    canvas,
    committed_now: update.step.committed.map((c) => c.position)
  }
  if (family.decoding !== "block") return snapshot
  return {
    ...snapshot,
    phase: phaseOf(update.step),
    ...(family.editing ? { provisional: provisional.map((p) => p.position) } : {})
  }
}

/** Seconds since the epoch, for `created`. */
export const nowSeconds = Effect.map(Clock.currentTimeMillis, (ms) => Math.floor(ms / 1000))

// ---- the response ------------------------------------------------------------------------------------

/** What an endpoint's choices say in their own words; `respond` adds what every choice has. */
export interface ChoiceRenderer {
  /** The response's `id` and `object`s: "cmpl-…", "text_completion" (both), "chatcmpl-…", "chat.completion" / "chat.completion.chunk". */
  readonly id: string
  readonly object: string
  readonly chunkObject: string
  readonly modelName: string
  /** Renders single tokens (for snapshots), with a cache shared by the request. */
  readonly texts: TokenTexts
  /** Whether the client wants per-token data (logprobs), so that a step without new text is worth a chunk. */
  readonly wantsTokens: boolean
  /** A finished answer's own fields: `text` and `logprobs`, or `message` and `logprobs`. */
  readonly choice: (job: PromptJob, decoder: ChoiceDecoder) => Record<string, unknown>
  /** A stream update's own fields: `text` and `logprobs`, or `delta` and `logprobs`. */
  readonly delta: (job: PromptJob, update: ChoiceUpdate) => Record<string, unknown>
  /**
   * The choices' text is known only once each has ended (structured output's JSON): a step that adds text
   * but ends nothing is worth no chunk on that account.
   */
  readonly textAtEnd?: boolean
  /** The finish reason a choice reports for the one its answer ended with (chat: "tool_calls" for a required call). */
  readonly finishAs?: (reason: FinishReason) => string
  /** Fields of the whole (non-streamed) response besides its choices (chat's prompt_logprobs). */
  readonly responseFields?: () => Record<string, unknown>
  /** The chunk that opens a choice's stream, when there is one (chat: the role; completions: an echo). */
  readonly opening?: ((job: PromptJob) => Record<string, unknown>) | undefined
}

/**
 * The response to a request whose prompts are set up as `jobs`: run to the end and rendered as one JSON
 * body, or streamed as server-sent events.
 */
export const respond = (plan: AnswerPlan, jobs: ReadonlyArray<PromptJob>, renderer: ChoiceRenderer) =>
  Effect.gen(function* () {
    const created = yield* nowSeconds
    const head = (object: string) => ({ id: renderer.id, object, created, model: renderer.modelName })
    const summary = () => ({ usage: usageOfJobs(jobs), diffusion: diffusionOfJobs(jobs, plan.family) })
    const finishAs = renderer.finishAs ?? ((reason: FinishReason) => reason)

    if (!plan.stream) {
      yield* runToEnd(jobs)
      const choices = jobs.flatMap((job, p) =>
        job.run.decoders.map((decoder, j) => ({
          index: p * plan.n + j,
          ...renderer.choice(job, decoder),
          finish_reason: finishAs(decoder.finishReason ?? "length"),
          ...(plan.returnTokenIds ? { prompt_token_ids: job.prompt.tokens, token_ids: decoder.tokenIds } : {})
        }))
      )
      return HttpServerResponse.unsafeJson({ ...head(renderer.object), choices, ...summary(), ...renderer.responseFields?.() })
    }

    // vLLM's continuous usage: the prompt tokens (those cached so far), and the answer tokens the chunks
    // have carried so far.
    const sent = new Map<number, number>()
    const usageSoFar = () => {
      const usage = usageOfJobs(jobs)
      const completion = [...sent.values()].reduce((sum, n) => sum + n, 0)
      return { ...usage, completion_tokens: completion, total_tokens: usage.prompt_tokens + completion }
    }
    const chunk = (choice: Record<string, unknown>, tokensSent?: number) => {
      if (tokensSent !== undefined) sent.set(choice["index"] as number, tokensSent)
      return {
        ...head(renderer.chunkObject),
        choices: [choice],
        ...(plan.includeUsage ? { usage: plan.continuousUsage ? usageSoFar() : null } : {})
      }
    }
    // vLLM's return_token_ids in a stream: the prompt's ids on a choice's first chunk, new ids on every one.
    const started = new Set<number>()
    const promptIds = (index: number, job: PromptJob) => {
      if (!plan.returnTokenIds || started.has(index)) return {}
      started.add(index)
      return { prompt_token_ids: job.prompt.tokens }
    }
    const opening = renderer.opening
    const preamble =
      opening === undefined
        ? []
        : jobs.flatMap((job, p) =>
            job.run.decoders.map((_, j) => {
              const index = p * plan.n + j
              return chunk({ index, ...opening(job), finish_reason: null, ...promptIds(index, job) })
            })
          )
    const chunks = mergedChunks(jobs, plan.n, (job, index, update) => {
      const judged = renderer.textAtEnd === true ? { ...update, delta: { ...update.delta, text: "" } } : update
      if (!worthAChunk(judged, plan.includeSnapshots, renderer.wantsTokens || plan.returnTokenIds)) return Option.none()
      const { decoder, delta } = update
      return Option.some(
        chunk(
          {
            index,
            ...renderer.delta(job, update),
            finish_reason: delta.finishReason === null ? null : finishAs(delta.finishReason),
            ...(plan.includeSnapshots ? { snapshot: snapshotOf(update, renderer.texts, job.settings.blockLength, plan.family) } : {}),
            ...promptIds(index, job),
            ...(plan.returnTokenIds ? { token_ids: decoder.tokenIds.slice(delta.firstToken, delta.endToken) } : {})
          },
          delta.endToken
        )
      )
    })
    const epilogue = Effect.sync(() => (plan.includeUsage ? [{ ...head(renderer.chunkObject), choices: [], ...summary() }] : []))
    return yield* respondSse({ preamble, chunks, epilogue })
  })
