/**
 * The serving logic shared by completions and chat completions: checking a request against the model and
 * what the engine supports, turning its fields into the engine's sampling settings, running one prompt's
 * answers through the scheduler while ChoiceDecoders read them, and rendering logprobs and snapshots.
 */
import { Clock, Effect, Option, Random, Stream } from "effect"
import type { KvCacheMode, SamplingSettings } from "../engine/Engine.js"
import { Scheduler, type StepEvent } from "../scheduler/Scheduler.js"
import { RequestMetrics } from "../telemetry/requests.js"
import { Tokenizer, type TokenizerShape } from "../tokenizer/Tokenizer.js"
import { ChoiceDecoder, type ChoiceDelta, NOT_COMMITTED } from "./ChoiceDecoder.js"
import { type ApiError, BadRequest, InternalError, NotFound } from "../api/errors.js"
import { fromGenerationError } from "./errors.js"
import {
  type ChatTokenLogprob,
  type CompletionLogprobs,
  type Diffusion,
  MASK_PLACEHOLDER,
  type Snapshot,
  type Usage
} from "./protocol.js"
import { ServingConfig } from "./ServingConfig.js"

// ---- request checks ----------------------------------------------------------------------------------

/** `model` may be left out; when given it must name the served model. */
export const checkModel = (model: string | undefined) =>
  Effect.flatMap(ServingConfig, (config) =>
    model === undefined || model === config.modelName
      ? Effect.void
      : Effect.fail(
          new NotFound({
            message: `The model \`${model}\` does not exist; this server serves \`${config.modelName}\``,
            param: "model",
            code: "model_not_found"
          })
        ))

const notSupported = (param: string, message: string) =>
  Effect.fail(new BadRequest({ message, param, code: "unsupported_parameter" }))

/** The fields completions and chat share, as the serving code reads them. */
export interface SamplingRequest {
  readonly model?: string
  readonly temperature?: number
  readonly top_p?: number
  readonly top_k?: number
  readonly n?: number
  readonly stop?: string | ReadonlyArray<string>
  readonly stop_token_ids?: ReadonlyArray<number>
  readonly seed?: number
  readonly presence_penalty?: number
  readonly frequency_penalty?: number
  readonly logit_bias?: Readonly<Record<string, number>>
  readonly stream?: boolean
  readonly stream_options?: { readonly include_usage?: boolean; readonly include_snapshots?: boolean }
  readonly return_token_ids?: boolean
  readonly diffusion_steps?: number
  readonly block_length?: number
  readonly remasking?: "low_confidence" | "random"
  readonly cfg_scale?: number
  readonly parallel_threshold?: number
  readonly parallel_factor?: number
  readonly early_stop?: boolean
  readonly kv_cache?: KvCacheMode
}

/** The answer length a request asked for, and under which name (max_tokens or max_completion_tokens). */
export interface MaxTokens {
  readonly value: number
  readonly param: string
}

/** Everything about how to answer a request that does not depend on the prompt. */
export interface AnswerPlan {
  readonly n: number
  readonly seed: number
  readonly stopStrings: ReadonlyArray<string>
  readonly stopTokens: ReadonlySet<number>
  /** EOS and end-of-turn: where an answer ends. */
  readonly endTokens: ReadonlySet<number>
  readonly stream: boolean
  readonly includeUsage: boolean
  readonly includeSnapshots: boolean
  readonly returnTokenIds: boolean
  /**
   * The engine's settings for a prompt (and suffix) of the given lengths; fails when they leave no room
   * for the answer in the context.
   */
  readonly settingsFor: (
    promptLength: number,
    promptParam: string,
    suffixLength?: number
  ) => Effect.Effect<SamplingSettings, BadRequest>
}

/**
 * Checks what completions and chat share and resolves the server's defaults. Parameters the sampler
 * cannot honour (penalties, logit_bias) are accepted only at their neutral values: an answer that
 * silently ignored them would not be the answer the client asked for.
 *
 * Parallel decoding: a request that sets parallel_threshold or parallel_factor (0 turns it off) decides
 * alone; otherwise the server's default applies. top_k -1 and 0 both mean off, as in vLLM.
 */
export const makePlan = (request: SamplingRequest, maxTokens: MaxTokens | undefined) =>
  Effect.gen(function*() {
    const config = yield* ServingConfig
    const tokenizer = yield* Tokenizer
    const scheduler = yield* Scheduler
    yield* checkModel(request.model)

    if (request.parallel_threshold !== undefined && request.parallel_factor !== undefined &&
      request.parallel_threshold > 0 && request.parallel_factor > 0) {
      return yield* new BadRequest({
        message: "parallel_threshold and parallel_factor cannot both be set: they are two rules for the same choice",
        param: "parallel_factor"
      })
    }
    for (const param of ["presence_penalty", "frequency_penalty"] as const) {
      const value = request[param]
      if (value !== undefined && value !== 0) {
        return yield* notSupported(param, `${param} other than 0 is not supported: a diffusion model does not generate left to right`)
      }
    }
    if (request.logit_bias !== undefined && Object.keys(request.logit_bias).length > 0) {
      return yield* notSupported("logit_bias", "logit_bias is not supported yet")
    }
    if (request.stream_options !== undefined && request.stream !== true) {
      return yield* new BadRequest({ message: "stream_options can only be given when stream is true", param: "stream_options" })
    }

    const n = request.n ?? 1
    const { maxConcurrent } = yield* scheduler.stats
    if (n > maxConcurrent) {
      return yield* new BadRequest({
        message: `n must be at most ${maxConcurrent} (the server's batch size), got ${n}`,
        param: "n"
      })
    }

    const stopStrings = request.stop === undefined ? [] : typeof request.stop === "string" ? [request.stop] : [...request.stop]
    if (stopStrings.includes("")) {
      return yield* new BadRequest({ message: "stop strings must not be empty", param: "stop" })
    }
    const special = tokenizer.specialTokens
    const endTokens = new Set([special.eos, ...Option.toArray(special.eot)])
    const seed = request.seed ?? (yield* Random.nextIntBetween(0, 2 ** 31))
    const defaults = config.defaults
    const parallel = request.parallel_threshold !== undefined || request.parallel_factor !== undefined
      ? { threshold: request.parallel_threshold ?? 0, factor: request.parallel_factor ?? 0 }
      : { threshold: defaults.parallelThreshold ?? 0, factor: defaults.parallelFactor ?? 0 }

    const settingsFor = (
      promptLength: number,
      promptParam: string,
      suffixLength = 0
    ): Effect.Effect<SamplingSettings, BadRequest> => {
      const context = promptLength + suffixLength
      const has = suffixLength === 0
        ? `${promptLength} tokens`
        : `${promptLength} tokens and the suffix ${suffixLength}`
      const room = config.maxModelLen - context
      if (room < 1) {
        return Effect.fail(
          new BadRequest({
            message: `This model's maximum context length is ${config.maxModelLen} tokens, and the ${promptParam} ` +
              `has ${has}, which leaves no room for an answer. Please shorten the ${promptParam}` +
              `${suffixLength === 0 ? "" : " or the suffix"}.`,
            param: promptParam,
            code: "context_length_exceeded"
          })
        )
      }
      if (maxTokens !== undefined && maxTokens.value > room) {
        return Effect.fail(
          new BadRequest({
            message: `This model's maximum context length is ${config.maxModelLen} tokens. However, you requested ` +
              `${context + maxTokens.value} tokens (${promptLength} in the ${promptParam}, ` +
              `${suffixLength === 0 ? "" : `${suffixLength} in the suffix, `}${maxTokens.value} ` +
              `for the answer). Please reduce the length of the ${promptParam} or ${maxTokens.param}.`,
            param: maxTokens.param,
            code: "context_length_exceeded"
          })
        )
      }
      const genLength = maxTokens?.value ?? Math.min(defaults.maxTokens, room)
      return Effect.succeed({
        genLength,
        blockLength: Math.min(request.block_length ?? defaults.blockLength, genLength),
        steps: request.diffusion_steps ?? defaults.steps ?? genLength,
        temperature: request.temperature ?? defaults.temperature,
        remasking: request.remasking ?? defaults.remasking,
        cfgScale: request.cfg_scale ?? defaults.cfgScale,
        seed,
        logitsEosInf: false,
        confidenceEosEotInf: false,
        eotTokenId: Option.getOrElse(special.eot, () => -1),
        topK: Math.max(0, request.top_k ?? defaults.topK ?? 0),
        topP: request.top_p ?? defaults.topP ?? 1,
        parallelThreshold: parallel.threshold,
        parallelFactor: parallel.factor,
        earlyStop: request.early_stop ?? defaults.earlyStop ?? true,
        kvCache: request.kv_cache ?? defaults.kvCache ?? "none"
      })
    }

    return {
      n,
      seed,
      stopStrings,
      stopTokens: new Set(request.stop_token_ids ?? []),
      endTokens,
      stream: request.stream === true,
      includeUsage: request.stream_options?.include_usage === true,
      includeSnapshots: request.stream_options?.include_snapshots === true,
      returnTokenIds: request.return_token_ids === true,
      settingsFor
    } satisfies AnswerPlan
  })

/** Checks that every id of a token prompt is one the tokenizer knows. */
export const checkTokenIds = (tokens: ReadonlyArray<number>, param: string, tokenizer: TokenizerShape) => {
  if (tokens.length === 0) return Effect.fail(new BadRequest({ message: `${param} must not be empty`, param }))
  const bad = tokens.findIndex((id) => id >= tokenizer.vocabSize)
  return bad < 0
    ? Effect.void
    : Effect.fail(
        new BadRequest({
          message: `token id ${tokens[bad]} is not in the vocabulary (ids 0 to ${tokenizer.vocabSize - 1})`,
          param: `${param}[${bad}]`
        })
      )
}

// ---- running one prompt ------------------------------------------------------------------------------

/** One step's effect on one choice. */
export interface ChoiceUpdate {
  /** Which of the prompt's n answers. */
  readonly index: number
  readonly decoder: ChoiceDecoder
  readonly delta: ChoiceDelta
  readonly event: StepEvent
  /** The answer canvas right after this step (when the request asked for snapshots). */
  readonly canvas?: ReadonlyArray<number>
}

/** What denoising one answer took so far, as its step events report it. */
export interface DenoisingTally {
  steps: number
  forwardPasses: number
  /** Forward passes that recomputed the whole canvas to refresh a KV cache. */
  kvRefreshes: number
  /** Positions committed by denoising. */
  tokensDenoised: number
  /** Positions an early stop filled with EOS. */
  tokensSkipped: number
}

/** One prompt's n answers in flight: a decoder per answer, and the stream that feeds them. */
export interface PromptRun {
  readonly decoders: ReadonlyArray<ChoiceDecoder>
  /** Per answer: the work its denoising took (every step event counts, also after its text ended). */
  readonly tallies: ReadonlyArray<DenoisingTally>
  /**
   * The scheduler's step events read into the decoders. It ends as soon as every answer has ended (at an
   * end token or a stop), which ends the scheduler stream early and so cancels the request's sequences.
   * Updates of answers that had already ended are dropped.
   */
  readonly updates: Stream.Stream<ChoiceUpdate, ApiError>
}

export const runPrompt = (
  prompt: ReadonlyArray<number>,
  settings: SamplingSettings,
  plan: AnswerPlan,
  suffix: ReadonlyArray<number> = []
) =>
  Effect.gen(function*() {
    const scheduler = yield* Scheduler
    const tokenizer = yield* Tokenizer
    const metrics = yield* RequestMetrics
    yield* metrics.started(plan.n)
    const decoders = Array.from({ length: plan.n }, () =>
      new ChoiceDecoder({
        genLength: settings.genLength,
        endTokens: plan.endTokens,
        stopTokens: plan.stopTokens,
        stopStrings: plan.stopStrings,
        detokenizer: tokenizer.detokenizer({ skipSpecialTokens: true })
      }))
    const tallies: Array<DenoisingTally> = decoders.map(() => ({
      steps: 0,
      forwardPasses: 0,
      kvRefreshes: 0,
      tokensDenoised: 0,
      tokensSkipped: 0
    }))
    const allEnded = () => decoders.every((decoder) => decoder.finished)
    const request = suffix.length === 0 ? { prompt, settings, n: plan.n } : { prompt, suffix, settings, n: plan.n }
    const updates = scheduler.generateStream(request).pipe(
      Stream.mapError(fromGenerationError),
      // Events arrive in chunks and `map` runs over a whole chunk at once, so whether all answers had
      // ended is recorded with each event's updates rather than asked afterwards.
      Stream.map((event) => {
        const tally = tallies[event.index]!
        tally.steps = event.stepsDone
        tally.forwardPasses = event.forwardPasses
        tally.kvRefreshes = event.kvRefreshes
        tally.tokensDenoised += event.committed.length - event.filled
        tally.tokensSkipped += event.filled
        const decoder = decoders[event.index]!
        // An update is rendered later than it is made (the decoder has moved on by then), so it carries
        // what it needs: the delta's token range, and a copy of the canvas for a snapshot.
        const updates: ReadonlyArray<ChoiceUpdate> = decoder.finished ? [] : [{
          index: event.index,
          decoder,
          delta: decoder.commit(event.committed),
          event,
          ...(plan.includeSnapshots ? { canvas: Array.from(decoder.canvas) } : {})
        }]
        return { updates, allEnded: allEnded() }
      }),
      Stream.takeUntil((step) => step.allEnded),
      Stream.flatMap((step) => Stream.fromIterable(step.updates)),
      // Time to first token and inter-token latency: when an answer's committed prefix grows (or it ends).
      Stream.tap((update) =>
        update.delta.endToken > update.delta.firstToken || update.delta.finishReason !== null
          ? metrics.advanced(update.decoder)
          : Effect.void
      ),
      // The scheduler ends the stream when every sequence has committed every position, which ends every
      // decoder; if one has not ended, the engine broke its contract.
      Stream.concat(
        Stream.fromEffect(
          Effect.suspend(() =>
            allEnded()
              ? metrics.answered({
                promptTokens: prompt.length + suffix.length,
                generationTokens: decoders.reduce((sum, decoder) => sum + decoder.tokenIds.length, 0),
                finishReasons: decoders.map((decoder) => decoder.finishReason ?? "length")
              })
              : Effect.fail(new InternalError({ message: "an answer ended with positions never committed" }))
          )
        ).pipe(Stream.drain)
      )
    )
    return { decoders, tallies, updates } satisfies PromptRun
  })

/** A prompt of the request, tokenized, with the name its errors carry ("prompt[2]", "messages"). */
export interface PreparedPrompt {
  readonly tokens: ReadonlyArray<number>
  readonly param: string
  /** Tokens after the answer (completions' `suffix`): the answer is infilled between the two. */
  readonly suffix?: ReadonlyArray<number>
}

/** One prompt's answers, set up but not yet run. */
export interface PromptJob {
  readonly prompt: PreparedPrompt
  readonly settings: SamplingSettings
  readonly totalSteps: number
  readonly run: PromptRun
}

/**
 * Refuses a prompt or suffix that holds the mask token (typed as text, e.g. "<|mdm_mask|>", or given as
 * an id): on the canvas it marks the positions the model writes, so it cannot stand for itself in the
 * context. The engine refuses it too, but only once the request is queued and in its own words.
 */
const checkNoMaskToken = (prompts: ReadonlyArray<PreparedPrompt>) =>
  Effect.flatMap(Tokenizer, (tokenizer) => {
    const mask = tokenizer.specialTokens.mask
    for (const prompt of prompts) {
      for (const [param, tokens] of [[prompt.param, prompt.tokens], ["suffix", prompt.suffix ?? []]] as const) {
        if (tokens.includes(mask)) {
          return Effect.fail(
            new BadRequest({
              message: `${param} contains the mask token ${JSON.stringify(tokenizer.decode([mask]))} (id ${mask}), ` +
                "which marks the positions the model fills in and cannot be part of a prompt",
              param
            })
          )
        }
      }
    }
    return Effect.void
  })

/** Resolves every prompt's settings (failing before anything runs if one does not fit) and sets it up. */
export const preparePromptJobs = (prompts: ReadonlyArray<PreparedPrompt>, plan: AnswerPlan) =>
  Effect.zipRight(
    checkNoMaskToken(prompts),
    Effect.forEach(prompts, (prompt) =>
      Effect.gen(function*() {
        const suffix = prompt.suffix ?? []
        const settings = yield* plan.settingsFor(prompt.tokens.length, prompt.param, suffix.length)
        const run = yield* runPrompt(prompt.tokens, settings, plan, suffix)
        return { prompt, settings, totalSteps: plannedSteps(settings), run } satisfies PromptJob
      }))
  )

/** Runs every prompt's answers to their end, all at once (they share the scheduler's batches). */
export const runToEnd = (jobs: ReadonlyArray<PromptJob>) =>
  Effect.forEach(jobs, (job) => Stream.runDrain(job.run.updates), { concurrency: "unbounded", discard: true })

/**
 * Every prompt's updates merged as they come, each turned into a chunk (or nothing) by `render`, which is
 * given the choice's index in the response: prompt index × n + answer index.
 */
export const mergedChunks = <A>(
  jobs: ReadonlyArray<PromptJob>,
  n: number,
  render: (job: PromptJob, choiceIndex: number, update: ChoiceUpdate) => Option.Option<A>
): Stream.Stream<A, ApiError> =>
  Stream.mergeAll(
    jobs.map((job, p) => Stream.filterMap(job.run.updates, (update) => render(job, p * n + update.index, update))),
    { concurrency: "unbounded" }
  )

/** Whether a stream update is worth a chunk: new text, an end, a snapshot, or tokens the client wants. */
export const worthAChunk = (update: ChoiceUpdate, snapshot: boolean, wantsTokens: boolean): boolean =>
  update.delta.text !== "" ||
  update.delta.finishReason !== null ||
  snapshot ||
  (wantsTokens && update.delta.firstToken < update.delta.endToken)

/** Usage of a request; a suffix counts as prompt tokens, as OpenAI counts it. */
export const usageOfJobs = (jobs: ReadonlyArray<PromptJob>): Usage =>
  usageOf(
    jobs.reduce((sum, job) => sum + job.prompt.tokens.length + (job.prompt.suffix?.length ?? 0), 0),
    jobs.flatMap((job) => job.run.decoders)
  )

/** The request's denoising statistics: summed over every answer of every prompt. */
export const diffusionOfJobs = (jobs: ReadonlyArray<PromptJob>): Diffusion => {
  const tallies = jobs.flatMap((job) => job.run.tallies)
  const sum = (field: keyof DenoisingTally) => tallies.reduce((total, tally) => total + tally[field], 0)
  const steps = sum("steps")
  const settings = jobs[0]?.settings
  const threshold = settings?.parallelThreshold ?? 0
  const factor = settings?.parallelFactor ?? 0
  return {
    steps,
    forward_passes: sum("forwardPasses"),
    kv_refreshes: sum("kvRefreshes"),
    tokens_per_step: steps === 0 ? 0 : sum("tokensDenoised") / steps,
    skipped_tokens: sum("tokensSkipped"),
    kv_cache: settings?.kvCache ?? "none",
    parallel: threshold > 0 ? { threshold } : factor > 0 ? { factor } : null
  }
}

export const usageOf = (promptTokens: number, decoders: ReadonlyArray<ChoiceDecoder>): Usage => {
  const completionTokens = decoders.reduce((sum, decoder) => sum + decoder.tokenIds.length, 0)
  return { prompt_tokens: promptTokens, completion_tokens: completionTokens, total_tokens: promptTokens + completionTokens }
}

// ---- rendering tokens --------------------------------------------------------------------------------

/** What JSON cannot say (-Infinity) said as vLLM does. */
const LOGPROB_FLOOR = -9999

export const logprobOf = (probability: number): number => (probability > 0 ? Math.log(probability) : LOGPROB_FLOOR)

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

/** Completions logprobs of the decoder's tokens [from, to); offsets shifted by `textStart` (echo). */
export const completionLogprobs = (
  decoder: ChoiceDecoder,
  from: number,
  to: number,
  top: number,
  textStart: number,
  texts: TokenTexts
): CompletionLogprobs => {
  const ids = decoder.tokenIds.slice(from, to)
  const logprobs = decoder.probabilities.slice(from, to).map(logprobOf)
  const tokens = ids.map((id) => texts.text(id))
  return {
    tokens,
    token_logprobs: logprobs,
    top_logprobs: top > 0 ? tokens.map((token, i) => ({ [token]: logprobs[i]! })) : null,
    text_offset: decoder.textOffsets.slice(from, to).map((offset) => offset + textStart)
  }
}

/** Chat logprobs of the decoder's tokens [from, to). */
export const chatLogprobs = (
  decoder: ChoiceDecoder,
  from: number,
  to: number,
  top: number,
  texts: TokenTexts
): { content: Array<ChatTokenLogprob> } => ({
  content: decoder.tokenIds.slice(from, to).map((id, i) => {
    const entry = { token: texts.text(id), logprob: logprobOf(decoder.probabilities[from + i]!), bytes: texts.bytes(id) }
    return { ...entry, top_logprobs: top > 0 ? [entry] : [] }
  })
})

/**
 * Denoising steps a sequence runs in all, as the engine plans them (native/src/core/sampler.cpp
 * plan_blocks): the step budget shared evenly over the blocks, the remainder to the first blocks, each
 * block's share clamped to [1, block length]. With parallel decoding the count depends on the model's
 * confidence; its upper bound is one step per answer token. An early stop may end either sooner.
 */
export const plannedSteps = (settings: SamplingSettings): number => {
  if ((settings.parallelThreshold ?? 0) > 0 || (settings.parallelFactor ?? 0) > 0) return settings.genLength
  const blocks = Math.ceil(settings.genLength / settings.blockLength)
  const base = Math.floor(settings.steps / blocks)
  const extra = settings.steps % blocks
  let total = 0
  for (let b = 0; b < blocks; b++) {
    const length = Math.min(settings.blockLength, settings.genLength - b * settings.blockLength)
    total += Math.min(Math.max(base + (b < extra ? 1 : 0), 1), length)
  }
  return total
}

/** The snapshot of an update made with `includeSnapshots` (which copied the canvas). */
export const snapshotOf = (update: ChoiceUpdate, totalSteps: number, texts: TokenTexts): Snapshot => {
  const canvas: Array<string> = []
  let masked = 0
  for (const token of update.canvas ?? []) {
    if (token === NOT_COMMITTED) {
      canvas.push(MASK_PLACEHOLDER)
      masked++
    } else canvas.push(texts.text(token))
  }
  return {
    step: update.event.stepsDone,
    total_steps: totalSteps,
    block: update.event.block,
    masked,
    canvas,
    committed_now: update.event.committed.map((c) => c.position)
  }
}

/** Seconds since the epoch, for `created`. */
export const nowSeconds = Effect.map(Clock.currentTimeMillis, (ms) => Math.floor(ms / 1000))
