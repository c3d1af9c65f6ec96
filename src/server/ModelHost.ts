/**
 * The ModelHost holds the served model through its life: loading → ready → draining, or loading → error.
 *
 * The HTTP server starts listening before the model has loaded (a large model takes minutes, and liveness
 * probes must answer meanwhile), so the model is loaded on a background fiber and requests ask the host
 * for it: `use` gives the engine, scheduler, tokenizer and serving config while the state is ready, and
 * fails with ModelUnavailable otherwise (loading, draining, failed), which the HTTP edge answers with 503.
 *
 * `drain` is the shutdown path: new work is refused from then on, and in-flight work finishes until the
 * timeout, after which the scheduler ends what is left. Closing the host's scope releases the model.
 *
 * @since 0.1.0
 */
import { readFileSync } from "node:fs"
import { join } from "node:path"
import { Clock, Context, Deferred, Effect, Either, Layer, Option, Ref, Schema, Scope } from "effect"
import { type ChatFormatterShape, fromTokenizerConfig } from "../chat/ChatFormatter.js"
import type { EngineShape } from "../engine/Engine.js"
import * as Sampling from "../config/sampling.js"
import * as Engine from "../engine/Engine.js"
import type { ServingConfigShape, ServingDefaults } from "../openai/ServingConfig.js"
import * as Scheduler from "../scheduler/Scheduler.js"
import type { SchedulerOptions, SchedulerShape } from "../scheduler/Scheduler.js"
import type { TokenizerShape } from "../tokenizer/Tokenizer.js"
import { GENERATION_CONFIG, readModelDefaults } from "../config/generationConfig.js"
import * as Tokenizer from "../tokenizer/Tokenizer.js"
import type { CpuIsa } from "../config/Config.js"

export type ModelState = "loading" | "ready" | "draining" | "error"

/** What a loaded model gives the serving code. */
export interface LoadedModel {
  readonly engine: EngineShape
  readonly scheduler: SchedulerShape
  readonly tokenizer: TokenizerShape
  readonly chat: ChatFormatterShape
  readonly serving: ServingConfigShape
}

/** The model could not be loaded; `message` says why, for the one line the server logs before exiting. */
export class ModelLoadFailed extends Schema.TaggedError<ModelLoadFailed>()("ModelLoadFailed", {
  modelDir: Schema.String,
  message: Schema.String
}) {}

/**
 * The host has no model to serve: it is still loading, the server is draining, or loading failed
 * (`message` says why). The HTTP edge answers 503 for it (server/modelUnavailable.ts).
 */
export class ModelUnavailable extends Schema.TaggedError<ModelUnavailable>()("ModelUnavailable", {
  state: Schema.Literal("loading", "draining", "error"),
  message: Schema.String
}) {}

/** Where the host is, with the model once loaded (until released) and why loading failed, once it has. */
interface HostState {
  readonly state: ModelState
  readonly model: LoadedModel | undefined
  readonly failure: string | undefined
}

export interface ModelHostShape {
  readonly modelDir: string
  readonly state: Effect.Effect<ModelState>
  /** The loaded model while ready; otherwise why there is none to use. */
  readonly use: Effect.Effect<LoadedModel, ModelUnavailable>
  /** The loaded model while ready or draining (for stats and health); otherwise why there is none. */
  readonly current: Effect.Effect<LoadedModel, ModelUnavailable>
  /** Why loading failed, once it has. */
  readonly failure: Effect.Effect<Option.Option<string>>
  /** Waits until the model is ready; fails if loading fails. */
  readonly awaitReady: Effect.Effect<LoadedModel, ModelLoadFailed>
  /** Refuses new work from now on, lets in-flight work run until `timeoutMs`, then ends it. */
  readonly drain: (timeoutMs: number) => Effect.Effect<void>
}

export class ModelHost extends Context.Tag("vdiff/ModelHost")<ModelHost, ModelHostShape>() {}

/** Loads a model; runs in the host's scope, so what it acquires is released when the host closes. */
export type Loader = Effect.Effect<LoadedModel, ModelLoadFailed, Scope.Scope>

export interface ModelHostOptions {
  readonly modelDir: string
  readonly load: Loader
}

export const make = (options: ModelHostOptions): Effect.Effect<ModelHostShape, never, Scope.Scope> =>
  Effect.gen(function* () {
    const scope = yield* Effect.scope
    const loaded = yield* Deferred.make<LoadedModel, ModelLoadFailed>()
    const host = yield* Ref.make<HostState>({ state: "loading", model: undefined, failure: undefined })

    yield* options.load.pipe(
      Scope.extend(scope),
      // A shutdown that began while loading keeps the host draining.
      Effect.tap((model) => Ref.update(host, (h): HostState => ({ ...h, model, state: h.state === "loading" ? "ready" : h.state }))),
      Effect.tapError((error) => Ref.update(host, (h): HostState => ({ ...h, state: "error", failure: error.message }))),
      Effect.intoDeferred(loaded),
      Effect.forkIn(scope)
    )

    yield* Effect.addFinalizer(() =>
      Ref.update(host, (h) => ({ ...h, model: undefined })).pipe(Effect.zipRight(Effect.logDebug("model released")))
    )

    const unavailable = (h: HostState): ModelUnavailable => {
      switch (h.state) {
        case "loading":
          return new ModelUnavailable({ state: "loading", message: "the model is still loading" })
        case "draining":
          return new ModelUnavailable({ state: "draining", message: "the server is shutting down" })
        default:
          return new ModelUnavailable({
            state: "error",
            message: `the model failed to load: ${h.failure ?? "unknown error"}`
          })
      }
    }

    const drain = (timeoutMs: number) =>
      Effect.gen(function* () {
        const before = yield* Ref.getAndUpdate(
          host,
          (h): HostState => (h.state === "draining" || h.state === "error" ? h : { ...h, state: "draining" })
        )
        if (before.state === "draining") return
        if (before.model !== undefined) yield* before.model.scheduler.drain(timeoutMs)
      })

    return {
      modelDir: options.modelDir,
      state: Effect.map(Ref.get(host), (h) => h.state),
      use: Effect.flatMap(Ref.get(host), (h) =>
        h.state === "ready" && h.model !== undefined ? Effect.succeed(h.model) : Effect.fail(unavailable(h))
      ),
      current: Effect.flatMap(Ref.get(host), (h) => (h.model !== undefined ? Effect.succeed(h.model) : Effect.fail(unavailable(h)))),
      failure: Effect.map(Ref.get(host), (h) => Option.fromNullable(h.failure)),
      awaitReady: Deferred.await(loaded),
      drain
    } satisfies ModelHostShape
  })

export const layer = (options: ModelHostOptions): Layer.Layer<ModelHost> => Layer.scoped(ModelHost, make(options))

// --- the native model ---------------------------------------------------------------------------------

export interface NativeModelOptions {
  readonly modelDir: string
  /** Where the forward runs (--device) and, on a GPU, the share of its memory to use. */
  readonly device: "auto" | "cpu" | "cuda"
  readonly gpuMemoryUtilization?: number | undefined
  /** Quantize the matrices at load (--quantize). */
  readonly quantize?: "none" | "q8_0" | "q4_0" | undefined
  /** The CPU kernels' instruction set (--cpu-isa); absent: auto. */
  readonly cpuIsa?: CpuIsa | undefined
  readonly threads: number
  /** Element type of the KV caches (absent: f32) and the bound on their bytes together (absent or 0: none). */
  readonly kvCacheDtype?: "f32" | "bf16" | undefined
  readonly kvCacheBudgetBytes?: number | undefined
  /** Bytes of the prefix cache of a block-diffusion model (--prefix-cache); absent or 0: none. */
  readonly prefixCacheBytes?: number | undefined
  /** Prompt positions a block-diffusion sequence prefills per step (--prefill-chunk); absent or 0: all at once. */
  readonly prefillChunk?: number | undefined
  readonly scheduler: SchedulerOptions
  /** --served-model-name, resolved. */
  readonly modelName: string
  readonly defaults: ServingDefaults
  /**
   * auto (absent): the model directory's generation_config.json recommends the defaults the server leaves
   * at their documented values (Sampling.withModelDefaults); vdiff: the server's alone.
   */
  readonly generationConfig?: "auto" | "vdiff" | undefined
}

/** Loads the tokenizer and the weights of `modelDir` with the native engine and starts its scheduler. */
export const loadNative = (options: NativeModelOptions): Loader =>
  Effect.gen(function* () {
    const tokenizer = yield* Tokenizer.make(options.modelDir)
    const engine = yield* Engine.make({
      modelDir: options.modelDir,
      device: options.device,
      gpuMemoryUtilization: options.gpuMemoryUtilization,
      quantize: options.quantize,
      cpuIsa: options.cpuIsa,
      threads: options.threads,
      kvCacheDtype: options.kvCacheDtype,
      kvCacheBudgetBytes: options.kvCacheBudgetBytes,
      prefixCacheBytes: options.prefixCacheBytes,
      prefillChunk: options.prefillChunk
    })
    return yield* fromEngine(engine, tokenizer, options)
  }).pipe(
    Effect.mapError((e) => (e._tag === "ModelLoadFailed" ? e : new ModelLoadFailed({ modelDir: options.modelDir, message: e.message })))
  )

/**
 * Completes a loaded engine and tokenizer into a served model (the fake engine in tests, or the native
 * one): the chat formatter from the tokenizer's config, and a scheduler over the engine.
 */
export const fromEngine = (
  engine: EngineShape,
  tokenizer: TokenizerShape,
  options: Omit<
    NativeModelOptions,
    | "modelDir"
    | "device"
    | "gpuMemoryUtilization"
    | "quantize"
    | "cpuIsa"
    | "threads"
    | "kvCacheDtype"
    | "kvCacheBudgetBytes"
    | "prefixCacheBytes"
    | "prefillChunk"
  >
): Effect.Effect<LoadedModel, ModelLoadFailed, Scope.Scope> =>
  Effect.gen(function* () {
    const chat = yield* fromTokenizerConfig(tokenizer.tokenizerConfig).pipe(
      Effect.mapError((e) => new ModelLoadFailed({ modelDir: tokenizer.modelDir, message: e.message }))
    )
    const mismatch = tokenizerMismatch(engine.info.config, tokenizer)
    if (mismatch !== undefined) yield* Effect.logWarning(`the tokenizer does not fit config.json: ${mismatch}`)
    const family = Engine.familyOf(engine.info)
    const unused = engine.info.unusedTensors ?? []
    if (unused.length > 0) yield* Effect.logWarning(Engine.unusedTensorsWarning(unused, family.name))
    const scheduler = yield* Scheduler.make(options.scheduler).pipe(Effect.provideService(Engine.Engine, engine))
    const defaults =
      options.generationConfig === "vdiff" ? options.defaults : yield* underModelDefaults(options.defaults, tokenizer.modelDir, family)
    const serving: ServingConfigShape = {
      modelName: options.modelName,
      created: Math.floor((yield* Clock.currentTimeMillis) / 1000),
      maxModelLen: engine.info.config.maxSequenceLength,
      defaults,
      family,
      // Block decoding stops after the block that holds one of the model's end tokens; the answer ends there.
      // Dream denoises the whole answer; its text ends at the first of the model's end tokens or its chat
      // template's turn end.
      ...(family.decoding !== "full_canvas"
        ? {
            endTokenIds: [
              ...new Set([...Engine.modelEndTokens(engine.info), ...configEndTokens(tokenizer.modelDir), ...templateTurnEnd(tokenizer)])
            ]
          }
        : {})
    }
    return { engine, scheduler, tokenizer, chat, serving }
  })

/**
 * How the tokenizer and config.json disagree, if they do: the engine masks with config.json's mask id, and
 * the text is made of the tokenizer's ids, so a tokenizer of another model writes and reads the wrong
 * tokens (a directory assembled from two models). The vocabulary may be smaller than the model's (padded
 * embeddings), not larger.
 */
export const tokenizerMismatch = (config: { readonly vocabSize: number; readonly maskTokenId: number }, tokenizer: TokenizerShape) => {
  const problems: Array<string> = []
  if (tokenizer.specialTokens.mask !== config.maskTokenId) {
    problems.push(`its mask token is id ${tokenizer.specialTokens.mask}, config.json's mask_token_id ${config.maskTokenId}`)
  }
  if (tokenizer.vocabSize > config.vocabSize) {
    problems.push(`it has ${tokenizer.vocabSize} tokens, more than the model's vocab_size ${config.vocabSize}`)
  }
  return problems.length === 0 ? undefined : problems.join("; ")
}

export { GENERATION_CONFIG } from "../config/generationConfig.js"

/**
 * The server's defaults with the model's generation_config.json beneath them (Sampling.withModelDefaults),
 * logging the settings it decided; unchanged when the directory has no such file. A file that is not JSON
 * or holds a value out of range fails the load, naming the file.
 */
const underModelDefaults = (defaults: ServingDefaults, modelDir: string, family: Sampling.ModelFamily) =>
  Effect.gen(function* () {
    const model = yield* Either.mapLeft(readModelDefaults(modelDir, family), (message) => new ModelLoadFailed({ modelDir, message }))
    const { defaults: merged, applied } = Sampling.withModelDefaults(defaults, model)
    const listed = Object.entries(applied).map(([field, value]) => `${field} ${String(value)}`)
    if (listed.length > 0) {
      yield* Effect.logInfo(
        `sampling defaults from the model's ${GENERATION_CONFIG}: ${listed.join(", ")} (a flag set to another value wins; --generation-config vdiff ignores the file)`
      )
    }
    return merged
  })

/** ChatML's turn end (Qwen2's template, which Dream's and SDAR's chat templates are). */
const CHATML_TURN_END = "<|im_end|>"

/**
 * The turn end of the model's own chat template: `<|im_end|>` when the template closes turns with it and
 * the vocabulary has it. Dream's config names only `<|endoftext|>` (the padding after an answer), while its
 * chat answers end with `<|im_end|>` first. None for other templates.
 */
const templateTurnEnd = (tokenizer: TokenizerShape): ReadonlyArray<number> => {
  const template = tokenizer.tokenizerConfig["chat_template"]
  const text = typeof template === "string" ? template : JSON.stringify(template ?? "")
  return text.includes(CHATML_TURN_END) ? Option.toArray(tokenizer.tokenId(CHATML_TURN_END)) : []
}

/**
 * config.json's eos_token_id, an id or a list of them (SDAR: <|im_end|> and <|endoftext|>): the tokens
 * block decoding stops at. None when the file has none (the engine's own report still counts).
 */
const configEndTokens = (modelDir: string): ReadonlyArray<number> => {
  try {
    const eos: unknown = JSON.parse(readFileSync(join(modelDir, "config.json"), "utf8"))["eos_token_id"]
    const ids = Array.isArray(eos) ? eos : [eos]
    return ids.filter((id): id is number => Number.isInteger(id) && id >= 0)
  } catch {
    return []
  }
}
