/**
 * Running a request's prompts: each prompt's n answers go to the scheduler as one request, and its step
 * events are read into one ChoiceDecoder per answer as they come, with a tally of the denoising work.
 * Rendering what the decoders hold is render.ts's job.
 */
import { type Context, Effect, type Option, Stream } from "effect"
import { type ApiError, InternalError } from "../api/errors.js"
import { type Phase, phaseOf, type SamplingSettings, type StepResult } from "../engine/Engine.js"
import { type GenerationRequest, Scheduler, type StepEvent } from "../scheduler/Scheduler.js"
import { RequestMetrics } from "../telemetry/requests.js"
import { Tokenizer, type TokenizerShape } from "../tokenizer/Tokenizer.js"
import { pickTemplateValues, templateCanvases, templateChains } from "./chains.js"
import { ChoiceDecoder, type ChoiceDelta, NOT_COMMITTED } from "./ChoiceDecoder.js"
import { fromGenerationError } from "./errors.js"
import { type AnswerPlan, checkNoMaskToken, type PreparedPrompt } from "./plan.js"
import type { Diffusion, Usage } from "./protocol.js"
import { lladaFamily, type ModelFamily } from "../config/sampling.js"

/** One step's effect on one choice. */
export interface ChoiceUpdate {
  /** Which of the prompt's n answers. */
  readonly index: number
  readonly decoder: ChoiceDecoder
  readonly delta: ChoiceDelta
  /** The engine's step result this update came from, as it came. */
  readonly step: StepResult
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
  /**
   * Step events that ran a forward, by its phase (block decoding; full canvas: all "denoise"). A sequence
   * waiting for another's prefill of the same prompt blocks steps without one.
   */
  phases: Record<Phase, number>
  /** Prompt positions whose keys and values came from the prefix cache. */
  promptCached: number
}

/**
 * The decoders of n answers settled without denoising (choices, empty answers): no stops, ending at these
 * end tokens only.
 */
export const settledDecoders = (
  n: number,
  genLength: number,
  endTokens: ReadonlySet<number>,
  tokenizer: TokenizerShape
): ReadonlyArray<ChoiceDecoder> =>
  Array.from(
    { length: n },
    () =>
      new ChoiceDecoder({
        genLength,
        endTokens,
        stopTokens: new Set(),
        stopStrings: [],
        detokenizer: tokenizer.detokenizer({ skipSpecialTokens: true })
      })
  )

/**
 * Tells the request's metrics, once the answers' updates have all gone by, what was answered: the prompt's
 * tokens, the answers' tokens and finish reasons. For answers settled without denoising (choices, empty
 * answers), which end by construction.
 */
export const answeredAtEnd = (
  metrics: Context.Tag.Service<typeof RequestMetrics>,
  promptTokens: number,
  decoders: ReadonlyArray<ChoiceDecoder>
): Stream.Stream<never> =>
  Stream.fromEffect(
    Effect.suspend(() =>
      metrics.answered({
        promptTokens,
        generationTokens: decoders.reduce((sum, decoder) => sum + decoder.tokenIds.length, 0),
        finishReasons: decoders.map((decoder) => decoder.finishReason ?? "length")
      })
    )
  ).pipe(Stream.drain)

/** The tally of an answer nothing has been done for yet. */
export const emptyTally = (): DenoisingTally => ({
  steps: 0,
  forwardPasses: 0,
  kvRefreshes: 0,
  tokensDenoised: 0,
  tokensSkipped: 0,
  phases: { prefill: 0, denoise: 0, commit: 0 },
  promptCached: 0
})

/**
 * The step result of an answer settled whole without denoising (a scored choice, an empty answer): what
 * it committed, in one event that finishes it.
 */
export const settledStep = (committed: StepResult["committed"], forwardPasses: number, reason: StepResult["reason"]): StepResult => ({
  id: -1,
  committed,
  finished: true,
  reason,
  block: 0,
  stepsDone: 0,
  stepsTotal: 0,
  filled: 0,
  forwardPasses,
  kvRefreshes: 0
})

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
  suffix: ReadonlyArray<number> = [],
  template?: ReadonlyArray<number>,
  templateChoices?: PreparedPrompt["templateChoices"]
) =>
  Effect.gen(function* () {
    const scheduler = yield* Scheduler
    const tokenizer = yield* Tokenizer
    const metrics = yield* RequestMetrics
    yield* metrics.started(plan.n)
    const decoders = Array.from(
      { length: plan.n },
      () =>
        new ChoiceDecoder(
          template === undefined
            ? {
                genLength: settings.genLength,
                endTokens: plan.endTokens,
                stopTokens: plan.stopTokens,
                stopStrings: plan.stopStrings,
                minTokens: plan.minTokens,
                includeStopString: plan.includeStopString,
                detokenizer: tokenizer.detokenizer({ skipSpecialTokens: true })
              }
            : {
                genLength: settings.genLength,
                endTokens: new Set(),
                stopTokens: new Set(),
                stopStrings: [],
                detokenizer: tokenizer.detokenizer({ skipSpecialTokens: true }),
                template,
                lengthReason: "stop"
              }
        )
    )
    const tallies = decoders.map(() => emptyTally())
    if (template?.includes(NOT_COMMITTED) === false) {
      // A template with nothing left to write (a call of a function without arguments) is the answer as
      // it stands: the answers end at once, with no denoising.
      const settled = Stream.suspend(() =>
        Stream.fromIterable(
          decoders.map((decoder, index): ChoiceUpdate => ({ index, decoder, delta: decoder.commit([]), step: settledStep([], 0, "eos") }))
        )
      )
      const updates = settled.pipe(
        Stream.tap((update) => metrics.advanced(update.decoder)),
        Stream.concat(answeredAtEnd(metrics, prompt.length + suffix.length, decoders))
      )
      return { decoders, tallies, updates } satisfies PromptRun
    }
    const allEnded = () => decoders.every((decoder) => decoder.finished)
    const request = {
      prompt,
      settings,
      n: plan.n,
      ...(suffix.length === 0 ? {} : { suffix }),
      ...(template === undefined ? {} : { template }),
      answersComplete: allEnded
    }
    // Forward passes an answer's sequence does not count: the scoring of its template's choices.
    const scoredPasses = decoders.map(() => 0)
    const events: Stream.Stream<StepEvent & { readonly scored?: boolean }, ApiError> =
      template === undefined || templateChoices === undefined || templateChoices.choices.length === 0
        ? scheduler.generateStream(request).pipe(Stream.mapError(fromGenerationError))
        : chosenThenDenoised(prompt, settings, template, templateChoices, request, decoders, scheduler, tokenizer.specialTokens.mask)
    const updates = events.pipe(
      // Events arrive in chunks and `map` runs over a whole chunk at once, so whether all answers had
      // ended is recorded with each event's updates rather than asked afterwards.
      Stream.map(({ index, step: event, scored }) => {
        const tally = tallies[index]!
        // A prefill step in which a sequence waited for another's prefill of the same prompt ran no forward.
        const phase = phaseOf(event)
        if (scored === true) scoredPasses[index] = event.forwardPasses
        else {
          if (phase !== "prefill" || event.forwardPasses > tally.forwardPasses - scoredPasses[index]!) tally.phases[phase]++
          tally.steps = event.stepsDone
          tally.kvRefreshes = event.kvRefreshes
          tally.tokensDenoised += event.committed.length - event.filled
          tally.tokensSkipped += event.filled
        }
        tally.forwardPasses = scoredPasses[index]! + (scored === true ? 0 : event.forwardPasses)
        tally.promptCached = event.promptCached ?? 0
        const decoder = decoders[index]!
        // An update is rendered later than it is made (the decoder has moved on by then), so it carries
        // what it needs: the delta's token range, and a copy of the canvas for a snapshot.
        const updates: ReadonlyArray<ChoiceUpdate> = decoder.finished
          ? []
          : [
              {
                index,
                decoder,
                delta: decoder.commit(event.committed),
                step: event,
                ...(plan.includeSnapshots ? { canvas: Array.from(decoder.canvas) } : {})
              }
            ]
        return { updates, allEnded: allEnded() }
      }),
      Stream.takeUntil((step) => step.allEnded),
      Stream.mapConcat((step) => step.updates),
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

/**
 * The events of answers whose template has values to choose (enums, booleans): the choices scored in one
 * job of the scheduler's queue, each answer's picks (its seed) committed in one event, then each answer
 * whose template still has slots denoised as its own sequence, around its picks, with its own seed (seed +
 * its index, as the scheduler seeds a request's n answers).
 */
const chosenThenDenoised = (
  prompt: ReadonlyArray<number>,
  settings: SamplingSettings,
  template: ReadonlyArray<number>,
  { choices, pad }: NonNullable<PreparedPrompt["templateChoices"]>,
  request: GenerationRequest,
  decoders: ReadonlyArray<ChoiceDecoder>,
  scheduler: Context.Tag.Service<typeof Scheduler>,
  mask: number
) =>
  Stream.unwrap(
    Effect.gen(function* () {
      const items = templateCanvases(prompt, template, choices, pad, mask)
      const scores = yield* scheduler.score({ items }).pipe(Effect.mapError(fromGenerationError))
      const chains = templateChains(choices, scores)
      const answers = yield* Effect.forEach(decoders, (_, index) =>
        pickTemplateValues(choices, chains, template, pad, settings, settings.seed + index)
      )
      const picked = answers.map(({ committed, template: filled }, index) => {
        const done = !filled.includes(NOT_COMMITTED)
        // The scoring is the prompt's one piece of work: its canvases count once, with the first answer.
        const step = { ...settledStep(committed, index === 0 ? items.length : 0, done ? "eos" : null), finished: done }
        return { index, step, scored: true }
      })
      const denoised = answers.flatMap(({ template: filled }, index) =>
        filled.includes(NOT_COMMITTED)
          ? [
              scheduler
                .generateStream({
                  ...request,
                  n: 1,
                  settings: { ...settings, seed: settings.seed + index },
                  template: filled,
                  answersComplete: () => decoders[index]!.finished
                })
                .pipe(
                  Stream.mapError(fromGenerationError),
                  Stream.map((event) => ({ ...event, index }))
                )
            ]
          : []
      )
      return Stream.concat(Stream.fromIterable(picked), Stream.mergeAll(denoised, { concurrency: "unbounded" }))
    })
  )

/** One prompt's answers, set up but not yet run. */
export interface PromptJob {
  readonly prompt: PreparedPrompt
  readonly settings: SamplingSettings
  readonly run: PromptRun
}

/** Resolves every prompt's settings (failing before anything runs if one does not fit) and sets it up. */
export const preparePromptJobs = (prompts: ReadonlyArray<PreparedPrompt>, plan: AnswerPlan) => {
  const kept = prompts.map(plan.truncatePrompt)
  return Effect.zipRight(
    checkNoMaskToken(kept),
    Effect.forEach(kept, (prompt) =>
      Effect.gen(function* () {
        const suffix = prompt.suffix ?? []
        const settings = yield* plan.settingsFor(prompt.tokens.length, prompt.param, suffix.length)
        // A template's number slots restrict their positions' tokens (structured.ts).
        const run = yield* runPrompt(
          prompt.tokens,
          prompt.templateAllowed === undefined ? settings : { ...settings, ...prompt.templateAllowed },
          plan,
          suffix,
          prompt.template,
          prompt.templateChoices
        )
        return { prompt, settings, run } satisfies PromptJob
      })
    )
  )
}

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
): Stream.Stream<A, ApiError> => {
  const streams = jobs.map((job, p) => Stream.filterMap(job.run.updates, (update) => render(job, p * n + update.index, update)))
  // One prompt (the usual request) needs no merging, which would pass every chunk through a queue.
  return streams.length === 1 ? streams[0]! : Stream.mergeAll(streams, { concurrency: "unbounded" })
}

/** Whether a stream update is worth a chunk: new text, an end, a snapshot, or tokens the client wants. */
export const worthAChunk = (update: ChoiceUpdate, snapshot: boolean, wantsTokens: boolean): boolean =>
  update.delta.text !== "" ||
  update.delta.finishReason !== null ||
  snapshot ||
  (wantsTokens && update.delta.firstToken < update.delta.endToken)

/**
 * Usage of a request; a suffix counts as prompt tokens, as OpenAI counts it. Cached tokens: per prompt,
 * the ones every one of its answers copied from the prefix cache.
 */
export const usageOfJobs = (jobs: ReadonlyArray<PromptJob>): Usage =>
  usageOf(
    jobs.reduce((sum, job) => sum + job.prompt.tokens.length + (job.prompt.suffix?.length ?? 0), 0),
    jobs.flatMap((job) => job.run.decoders),
    jobs.reduce((sum, job) => sum + (job.run.tallies.length === 0 ? 0 : Math.min(...job.run.tallies.map((tally) => tally.promptCached))), 0)
  )

/** The request's denoising statistics: summed over every answer of every prompt. */
export const diffusionOfJobs = (jobs: ReadonlyArray<PromptJob>, family: ModelFamily = lladaFamily): Diffusion => {
  const tallies = jobs.flatMap((job) => job.run.tallies)
  const sum = (field: Exclude<keyof DenoisingTally, "phases">) => tallies.reduce((total, tally) => total + tally[field], 0)
  const steps = sum("steps")
  const forwardPasses = sum("forwardPasses")
  const settings = jobs[0]?.settings
  const threshold = settings?.parallelThreshold ?? 0
  const factor = settings?.parallelFactor ?? 0
  const common = {
    steps,
    forward_passes: forwardPasses,
    kv_refreshes: sum("kvRefreshes"),
    tokens_per_step: steps === 0 ? 0 : sum("tokensDenoised") / steps,
    skipped_tokens: sum("tokensSkipped"),
    kv_cache: settings?.kvCache ?? "none",
    parallel: threshold > 0 ? { threshold } : factor > 0 ? { factor } : null
  }
  if (family.decoding === "dream") {
    // Dream's sampler: the unmasking algorithm and its time schedule (every step evaluates the whole canvas).
    return {
      ...common,
      decoding: "dream",
      dream: { alg: settings?.alg ?? "entropy", alg_temp: settings?.algTemp ?? 0, eps: settings?.eps ?? 1e-3 }
    }
  }
  if (family.decoding !== "block") return common
  // Block decoding: the forwards by phase, and the tokens each forward committed (prefill and commit
  // forwards commit none, so this is below tokens_per_step's denoising rate).
  const phase = (name: Phase) => tallies.reduce((total, tally) => total + tally.phases[name], 0)
  const editing = settings?.editingThreshold
  return {
    ...common,
    decoding: "block",
    block_length: settings?.blockLength ?? family.blockLength,
    forwards: { prefill: phase("prefill"), denoise: phase("denoise"), commit: phase("commit") },
    tokens_per_forward: forwardPasses === 0 ? 0 : sum("tokensDenoised") / forwardPasses,
    editing: editing === undefined || editing < 0 ? null : { threshold: editing, max_post_steps: settings?.maxPostSteps ?? 16 }
  }
}

export const usageOf = (promptTokens: number, decoders: ReadonlyArray<ChoiceDecoder>, cachedTokens = 0): Usage => {
  const completionTokens = decoders.reduce((sum, decoder) => sum + decoder.tokenIds.length, 0)
  return {
    prompt_tokens: promptTokens,
    completion_tokens: completionTokens,
    total_tokens: promptTokens + completionTokens,
    prompt_tokens_details: { cached_tokens: cachedTokens }
  }
}
