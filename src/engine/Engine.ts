/**
 * The Engine service: the native diffusion engine behind an Effect interface. It loads one model and
 * exposes the step API of the addon — create sequences with their sampling settings, advance a batch of
 * them by one denoising step, release them — with typed errors. It decides nothing about who runs when;
 * that is the scheduler's job.
 *
 * `Engine.layer({ modelDir })` loads a model directory; any Effect program can provide it and drive
 * sequences itself, or hand it to the Scheduler.
 */
import { Context, Effect, Layer, Runtime } from "effect"
import { fromNative, type EngineError, type ModelLoadError } from "./errors.js"
import { decodings, lladaFamily, type ModelFamily, type SamplingParams } from "../config/sampling.js"
import {
  type CommittedToken,
  loadAddon,
  type NativeAddon,
  type NativeEngine,
  type NativeModelInfo,
  type NativePrefixCacheStats,
  type StepSnapshot,
  type TopLogprob
} from "./native.js"
import type { CpuIsa } from "../config/Config.js"

export type SequenceId = number

/** How one sequence is denoised (src/config/sampling.ts: the sampling settings' table, and the seed). */
export type SamplingSettings = SamplingParams

export type Remasking = SamplingSettings["remasking"]

/**
 * Approximate KV caching (Fast-dLLM): "prefix" refreshes a cache of every position's keys and values at
 * each block start, then recomputes only the block and what follows it; "dual" only the block. Faster,
 * and approximate: the cached positions are seen as they were at the block start.
 */
export type KvCacheMode = NonNullable<SamplingSettings["kvCache"]>

export type { CommittedToken, TopLogprob } from "./native.js"

export type FinishReason = "length" | "eos"

/** What one step did to one sequence: the addon's StepSnapshot, passed on unchanged. */
export type StepResult = StepSnapshot

export type ModelInfo = NativeModelInfo

export type { ModelFamily } from "../config/sampling.js"

/**
 * What a sequence's forward did in a step (block decoding): "prefill" (the prompt's whole blocks, once,
 * into the KV cache; nothing committed), "denoise" (the open block) or "commit" (the finished block again,
 * from its final tokens, to cache its exact keys and values). Full-canvas sequences always denoise.
 */
export type Phase = "prefill" | "denoise" | "commit"

export const phases: ReadonlyArray<Phase> = ["prefill", "denoise", "commit"]

type Loose = Record<string, unknown>
const field = (object: unknown, ...names: ReadonlyArray<string>): unknown => {
  if (typeof object !== "object" || object === null) return undefined
  for (const name of names) if ((object as Loose)[name] !== undefined) return (object as Loose)[name]
  return undefined
}

/**
 * The warning for a checkpoint with tensors the model does not read: config.json may describe another
 * model (a family, a tied head, biases), and the answers would then be wrong without an error.
 */
export const unusedTensorsWarning = (names: ReadonlyArray<string>, family: string) => {
  const shown = names.slice(0, 5).map((name) => JSON.stringify(name))
  const more = names.length > shown.length ? ` and ${names.length - shown.length} more` : ""
  return (
    `the checkpoint holds ${names.length} tensor${names.length === 1 ? "" : "s"} that the ${family} family does not read ` +
    `(${shown.join(", ")}${more}): check that config.json describes this checkpoint`
  )
}

/**
 * The served model's family, from the engine's model info (`info.family`: its model_type, decoding,
 * trained block length and whether it has token editing); LLaDA (full canvas) when the info says none,
 * as engines from before block decoding and the test engine do.
 */
export const familyOf = (info: ModelInfo): ModelFamily => {
  const family = field(info, "family")
  if (family === undefined) return lladaFamily
  const name = field(family, "name", "modelType")
  const decoding = field(family, "decoding")
  const blockLength = field(family, "blockLength", "block_length")
  const editing = field(family, "editing", "editingAvailable")
  return {
    name: typeof name === "string" ? name : lladaFamily.name,
    decoding: decodings.find((known) => known === decoding) ?? "full_canvas",
    blockLength: typeof blockLength === "number" ? blockLength : 0,
    editing: editing === true
  }
}

/**
 * The model's own end tokens from its config (eos_token_id, and the rest of an eos_token_id list), as the
 * model info reports them (`family.eosTokenId` / `family.stopTokenIds`, else the config's eosTokenId).
 */
export const modelEndTokens = (info: ModelInfo): ReadonlyArray<number> => {
  const family = field(info, "family")
  const eos = field(family, "eosTokenId") ?? field(info.config, "eosTokenId")
  const more = field(family, "stopTokenIds") ?? field(info.config, "stopTokenIds")
  const ids = [eos, ...(Array.isArray(more) ? more : [])]
  return ids.filter((id): id is number => typeof id === "number" && Number.isInteger(id) && id >= 0)
}

/** The phase of a sequence's forward in a step ("denoise" where the engine does not say). */
export const phaseOf = (step: StepResult): Phase => {
  const phase = field(step, "phase")
  return phase === "prefill" || phase === "commit" ? phase : "denoise"
}

/**
 * With token editing, the open block's committed tokens that may still change (answer positions,
 * ascending), as of this step; they reach `committed` when their block closes. Empty otherwise.
 */
export const provisionalOf = (step: StepResult): ReadonlyArray<CommittedToken> => {
  const provisional = field(step, "provisional")
  return Array.isArray(provisional) ? (provisional as ReadonlyArray<CommittedToken>) : []
}

/** A canvas to score (Engine.score): what the model sees, and which token's log-probability to give where. */
export interface ScoreItem {
  readonly canvas: ReadonlyArray<number>
  readonly positions: ReadonlyArray<number>
  readonly targets: ReadonlyArray<number>
  /** 0 .. 20 (absent: 0): each position's likeliest tokens to report besides its target's log-probability. */
  readonly topLogprobs?: number
  /** Also each target's rank in its row: 1 + the tokens of the vocabulary (not the mask) likelier than it. */
  readonly rank?: boolean
}

/** What scoring one canvas gave: per target, its log-probability and (with topLogprobs) its position's likeliest tokens. */
export interface Scored {
  readonly logprobs: Float64Array
  /** Per target, most likely first (the mask token left out); empty without topLogprobs. */
  readonly top: ReadonlyArray<ReadonlyArray<TopLogprob>>
  /** Per target, with `rank`: its rank (1: the likeliest); empty without. */
  readonly ranks: Int32Array
}

export interface EngineShape {
  readonly modelDir: string
  readonly info: ModelInfo
  /**
   * Validates and creates a sequence; fails with InvalidRequestError naming the bad field. With a
   * suffix the answer is infilled between prompt and suffix.
   */
  readonly create: (
    prompt: ReadonlyArray<number>,
    settings: SamplingSettings,
    suffix?: ReadonlyArray<number>,
    /** genLength entries: -1 where the model writes, else the token fixed there from the start. */
    template?: ReadonlyArray<number>
  ) => Effect.Effect<SequenceId, EngineError>
  /**
   * One denoising step for every given sequence, in one batched forward off the JS thread. Interrupting
   * the effect cancels the native step; the sequences are then left as they were.
   */
  readonly step: (ids: ReadonlyArray<SequenceId>) => Effect.Effect<ReadonlyArray<StepResult>, EngineError>
  /**
   * The model's log-probabilities of given tokens at given positions of given canvases (mask tokens where
   * it is to predict), all in one batched forward off the JS thread; no sequence is involved. Per item, one
   * log-probability per target.
   */
  readonly score: (items: ReadonlyArray<ScoreItem>) => Effect.Effect<ReadonlyArray<Scored>, EngineError>
  /** Frees the sequence's memory now. Unknown ids are ignored. */
  readonly release: (id: SequenceId) => Effect.Effect<void>
  /** The answer region of the canvas; the mask token id where nothing is committed yet. */
  readonly canvas: (id: SequenceId) => Effect.Effect<Int32Array, EngineError>
  /** How many sequences are alive in the engine. */
  readonly live: Effect.Effect<number>
  /**
   * Bytes the KV caches of live sequences and the prefix cache hold now (counted against
   * EngineOptions.kvCacheBudgetBytes).
   */
  readonly kvCacheBytes: Effect.Effect<number>
  /** The prefix cache's figures (all zero without one). */
  readonly prefixCache: Effect.Effect<NativePrefixCacheStats>
}

export class Engine extends Context.Tag("vdiff/Engine")<Engine, EngineShape>() {}

export interface EngineOptions {
  readonly modelDir: string
  /** Worker threads for the forward pass; 0 or absent: all cores. */
  readonly threads?: number
  /** Element type of the KV caches; absent: "f32" (a read of an unchanged canvas is exact), "bf16": half the memory. */
  readonly kvCacheDtype?: "f32" | "bf16" | undefined
  /**
   * Bound on the bytes all live KV caches hold together; 0 or absent: none. Beyond it create fails:
   * InvalidRequestError when one cache alone is larger, EngineFailure VDIFF_OUT_OF_MEMORY otherwise.
   */
  readonly kvCacheBudgetBytes?: number | undefined
  /**
   * Block-diffusion models: bytes of whole prompt blocks' keys and values kept across requests for later
   * prompts that start with the same blocks (exact); 0 or absent: none.
   */
  readonly prefixCacheBytes?: number | undefined
  /**
   * Block-diffusion models: the most prompt positions a sequence prefills in one step (whole blocks), so
   * that a long prompt does not hold up the other sequences' steps; 0 or absent: the whole prompt at once.
   */
  readonly prefillChunk?: number | undefined
  /** Where the forward runs; absent: "cpu". "auto" takes a visible GPU, else the CPU. */
  readonly device?: "auto" | "cpu" | "cuda" | undefined
  /** CUDA: the share of the GPU's memory vdiff may use, in (0, 1]; absent: 0.9. */
  readonly gpuMemoryUtilization?: number | undefined
  /** CPU: quantize the matrices at load (Q8_0 or Q4_0); absent or "none": as stored. */
  readonly quantize?: "none" | "q8_0" | "q4_0" | undefined
  /** CPU: the kernels' instruction set; absent or "auto": the widest the CPU has. */
  readonly cpuIsa?: CpuIsa | undefined
}

/** Wraps an already loaded native engine. */
export const fromNativeEngine = (modelDir: string, native: NativeEngine, addon: NativeAddon): EngineShape => ({
  modelDir,
  info: native.info(),
  create: (prompt, s, suffix, template) =>
    Effect.try({
      try: () =>
        // The settings are the params object the addon reads: the same fields, passed as they are.
        native.create(
          Int32Array.from(prompt),
          s,
          suffix === undefined ? undefined : Int32Array.from(suffix),
          template === undefined ? undefined : Int32Array.from(template)
        ),
      catch: fromNative
    }),
  step: (ids) =>
    Effect.async<ReadonlyArray<StepResult>, EngineError>((resume) => {
      const token = new addon.CancelToken()
      native.step([...ids], token).then(
        (results) => resume(Effect.succeed(results)),
        (cause) => resume(Effect.fail(fromNative(cause)))
      )
      return Effect.sync(() => token.cancel())
    }),
  score: (items) =>
    Effect.tryPromise({
      try: () =>
        native.scoreBatch(
          items.map((item) => ({
            canvas: Int32Array.from(item.canvas),
            positions: Int32Array.from(item.positions),
            targets: Int32Array.from(item.targets),
            ...(item.topLogprobs === undefined ? {} : { topLogprobs: item.topLogprobs }),
            ...(item.rank === true ? { rank: true } : {})
          }))
        ),
      catch: fromNative
    }),
  release: (id) => Effect.sync(() => native.release(id)),
  canvas: (id) => Effect.try({ try: () => native.canvas(id), catch: fromNative }),
  live: Effect.sync(() => native.live()),
  kvCacheBytes: Effect.sync(() => native.kvCacheBytes()),
  prefixCache: Effect.sync(() => native.prefixCache())
})

/** Loads the model directory with the addon. Sequences still alive when the scope closes are released. */
export const make = (options: EngineOptions): Effect.Effect<EngineShape, ModelLoadError | EngineError> =>
  Effect.gen(function* () {
    const addon = yield* Effect.try({ try: () => loadAddon(), catch: fromNative })
    const runtime = yield* Effect.runtime<never>()
    // A device backend uploads the weights: one log line per 256 MiB, with the share done.
    const onProgress = (done: number, total: number) =>
      Runtime.runFork(runtime)(
        Effect.logInfo(`uploading weights: ${(done / 2 ** 20).toFixed(0)} of ${(total / 2 ** 20).toFixed(0)} MiB`).pipe(
          Effect.annotateLogs({ bytes_done: done, bytes_total: total })
        )
      )
    const native = yield* Effect.tryPromise({
      try: () =>
        addon.loadModel(options.modelDir, {
          device: options.device ?? "cpu",
          onProgress,
          quantize: options.quantize,
          cpuIsa: options.cpuIsa,
          gpuMemoryUtilization: options.gpuMemoryUtilization,
          threads: options.threads ?? 0,
          kvCacheDtype: options.kvCacheDtype,
          kvCacheBudgetBytes: options.kvCacheBudgetBytes,
          prefixCacheBytes: options.prefixCacheBytes,
          prefillChunk: options.prefillChunk
        }),
      catch: fromNative
    })
    return fromNativeEngine(options.modelDir, native, addon)
  })

export const layer = (options: EngineOptions): Layer.Layer<Engine, EngineError> => Layer.effect(Engine, make(options))
