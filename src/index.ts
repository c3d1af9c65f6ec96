/**
 * vdiff as a library: the layers that load a masked-diffusion model and schedule generation, for any
 * Effect program — with or without the HTTP server.
 *
 * ```ts
 * import { Effect } from "effect"
 * import * as Vdiff from "vdiff"
 *
 * const program = Effect.gen(function*() {
 *   const tokenizer = yield* Vdiff.Tokenizer
 *   const prompt = tokenizer.encode("ROMEO:")
 *   const result = yield* Vdiff.generate({ prompt, settings: { ...Vdiff.defaultSettings, genLength: 32 } })
 *   return tokenizer.decode(result.choices[0]!.tokens, { skipSpecialTokens: true })
 * })
 * program.pipe(Effect.provide(Vdiff.layer({ modelDir: "models/shakespeare" })), Effect.runPromise)
 * ```
 */
import { Effect, Layer, Stream } from "effect"
import * as ChatFormatterModule from "./chat/ChatFormatter.js"
import * as EngineModule from "./engine/Engine.js"
import * as SchedulerModule from "./scheduler/Scheduler.js"
import * as TokenizerModule from "./tokenizer/Tokenizer.js"

export { ChatFormatter } from "./chat/ChatFormatter.js"
export type { ChatMessage } from "./chat/ChatFormatter.js"
export { Engine } from "./engine/Engine.js"
export type { CommittedToken, EngineShape, FinishReason, SamplingSettings, StepResult } from "./engine/Engine.js"
export { EngineFailure, InvalidRequestError, ModelLoadError } from "./engine/errors.js"
export { Scheduler } from "./scheduler/Scheduler.js"
export type {
  ChoiceResult,
  GenerationError,
  GenerationRequest,
  GenerationResult,
  SchedulerOptions,
  SchedulerStats,
  StepEvent
} from "./scheduler/Scheduler.js"
export { Draining, QueueFull, RequestTimeout } from "./scheduler/errors.js"
export { Tokenizer } from "./tokenizer/Tokenizer.js"

export * as EngineLayer from "./engine/Engine.js"
export * as SchedulerLayer from "./scheduler/Scheduler.js"
export * as TokenizerLayer from "./tokenizer/Tokenizer.js"

/** LLaDA's usual settings: 128 tokens in blocks of 32, one token per step, greedy. */
export const defaultSettings: EngineModule.SamplingSettings = {
  genLength: 128,
  blockLength: 32,
  steps: 128,
  temperature: 0,
  remasking: "low_confidence",
  cfgScale: 0,
  seed: 0,
  logitsEosInf: false,
  confidenceEosEotInf: false,
  eotTokenId: -1
}

export interface LayerOptions extends Partial<SchedulerModule.SchedulerOptions> {
  readonly modelDir: string
  /** Forward-pass threads; 0 or absent: all cores. */
  readonly threads?: number
}

/**
 * Everything generation needs for one model directory: Engine, Scheduler, Tokenizer and ChatFormatter.
 * The scheduler fiber lives as long as the layer's scope.
 */
export const layer = (options: LayerOptions) => {
  const engine = EngineModule.layer({ modelDir: options.modelDir, threads: options.threads ?? 0 })
  const scheduler = SchedulerModule.layer({
    maxConcurrent: options.maxConcurrent ?? 8,
    queueCapacity: options.queueCapacity ?? 64,
    maxBatchTokens: options.maxBatchTokens ?? 65_536,
    requestTimeoutMs: options.requestTimeoutMs ?? 0
  })
  const tokenizer = TokenizerModule.layer(options.modelDir)
  return Layer.mergeAll(Layer.provideMerge(scheduler, engine), Layer.provideMerge(ChatFormatterModule.layer, tokenizer))
}

/** Runs a request to the end on the Scheduler in context and returns its answers. */
export const generate = (request: SchedulerModule.GenerationRequest) =>
  Effect.flatMap(SchedulerModule.Scheduler, (scheduler) => scheduler.generate(request))

/** The request's step events as they happen; ending the stream early cancels the request. */
export const generateStream = (request: SchedulerModule.GenerationRequest) =>
  Stream.unwrap(Effect.map(SchedulerModule.Scheduler, (scheduler) => scheduler.generateStream(request)))

/** A step event with the answer's canvas after it: token ids, the model's mask token where still masked. */
export interface CanvasEvent extends SchedulerModule.StepEvent {
  readonly canvas: ReadonlyArray<number>
}

/**
 * generateStream with each answer's canvas as it forms, for a caller that wants to watch it (the HTTP
 * playground renders the same from the committed tokens). Built from the events alone: no engine call.
 */
export const generateCanvasStream = (request: SchedulerModule.GenerationRequest) =>
  Stream.unwrap(
    Effect.map(EngineModule.Engine, (engine) => {
      const mask = engine.info.config.maskTokenId
      const canvases = Array.from({ length: request.n ?? 1 }, () => new Array<number>(request.settings.genLength).fill(mask))
      return Stream.map(generateStream(request), (event): CanvasEvent => {
        const canvas = canvases[event.index]!
        for (const c of event.step.committed) canvas[c.position] = c.token
        return { ...event, canvas: [...canvas] }
      })
    })
  )
