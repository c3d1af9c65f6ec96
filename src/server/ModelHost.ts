/**
 * The ModelHost holds the served model through its life: loading → ready → draining, or loading → error.
 *
 * The HTTP server starts listening before the model has loaded (a large model takes minutes, and liveness
 * probes must answer meanwhile), so the model is loaded on a background fiber and requests ask the host
 * for it: `use` gives the engine, scheduler, tokenizer and serving config while the state is ready, and
 * fails with the 503 a client should see otherwise (loading, draining, failed).
 *
 * `drain` is the shutdown path: new work is refused from then on, and in-flight work finishes until the
 * timeout, after which the scheduler ends what is left. Closing the host's scope releases the model.
 *
 * @since 0.1.0
 */
import { Context, Deferred, Effect, Layer, Option, Schema, Scope } from "effect"
import { type ChatFormatterShape, fromTokenizerConfig } from "../chat/ChatFormatter.js"
import type { EngineShape } from "../engine/Engine.js"
import * as Engine from "../engine/Engine.js"
import { ServiceUnavailable } from "../openai/errors.js"
import type { ServingConfigShape, ServingDefaults } from "../openai/ServingConfig.js"
import * as Scheduler from "../scheduler/Scheduler.js"
import type { SchedulerOptions, SchedulerShape } from "../scheduler/Scheduler.js"
import type { TokenizerShape } from "../tokenizer/Tokenizer.js"
import * as Tokenizer from "../tokenizer/Tokenizer.js"

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

export interface ModelHostShape {
  readonly modelDir: string
  readonly state: Effect.Effect<ModelState>
  /** The loaded model while ready; otherwise the 503 the request should get. */
  readonly use: Effect.Effect<LoadedModel, ServiceUnavailable>
  /** The loaded model while ready or draining (for stats and health); otherwise the 503. */
  readonly current: Effect.Effect<LoadedModel, ServiceUnavailable>
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
  Effect.gen(function*() {
    const scope = yield* Effect.scope
    const loaded = yield* Deferred.make<LoadedModel, ModelLoadFailed>()
    let state: ModelState = "loading"
    let model: LoadedModel | undefined
    let failure: string | undefined

    yield* options.load.pipe(
      Scope.extend(scope),
      Effect.tap((m) =>
        Effect.sync(() => {
          model = m
          // A shutdown that began while loading keeps the host draining.
          if (state === "loading") state = "ready"
        })
      ),
      Effect.tapError((error) =>
        Effect.sync(() => {
          failure = error.message
          state = "error"
        })
      ),
      Effect.intoDeferred(loaded),
      Effect.forkIn(scope)
    )

    yield* Effect.addFinalizer(() =>
      Effect.sync(() => {
        model = undefined
      }).pipe(Effect.zipRight(Effect.logDebug("model released")))
    )

    const notServing = (): ServiceUnavailable => {
      switch (state) {
        case "loading":
          return new ServiceUnavailable({ message: "the model is still loading", code: "model_not_ready", retryAfterSeconds: 5 })
        case "draining":
          return new ServiceUnavailable({ message: "the server is shutting down", code: "draining", retryAfterSeconds: 5 })
        default:
          return new ServiceUnavailable({
            message: `the model failed to load: ${failure ?? "unknown error"}`,
            code: "model_load_failed",
            retryAfterSeconds: 60
          })
      }
    }

    const drain = (timeoutMs: number) =>
      Effect.gen(function*() {
        if (state === "draining") return
        state = state === "error" ? "error" : "draining"
        if (model !== undefined) yield* model.scheduler.drain(timeoutMs)
      })

    return {
      modelDir: options.modelDir,
      state: Effect.sync(() => state),
      use: Effect.suspend(() =>
        state === "ready" && model !== undefined ? Effect.succeed(model) : Effect.fail(notServing())
      ),
      current: Effect.suspend(() => model !== undefined ? Effect.succeed(model) : Effect.fail(notServing())),
      failure: Effect.sync(() => Option.fromNullable(failure)),
      awaitReady: Deferred.await(loaded),
      drain
    } satisfies ModelHostShape
  })

export const layer = (options: ModelHostOptions): Layer.Layer<ModelHost> => Layer.scoped(ModelHost, make(options))

// --- the native model ---------------------------------------------------------------------------------

export interface NativeModelOptions {
  readonly modelDir: string
  readonly threads: number
  /** Element type of the KV caches (absent: f32) and the bound on their bytes together (absent or 0: none). */
  readonly kvCacheDtype?: "f32" | "bf16" | undefined
  readonly kvCacheBudgetBytes?: number | undefined
  readonly scheduler: SchedulerOptions
  /** --served-model-name, resolved. */
  readonly modelName: string
  readonly defaults: ServingDefaults
}

/** Loads the tokenizer and the weights of `modelDir` with the native engine and starts its scheduler. */
export const loadNative = (options: NativeModelOptions): Loader =>
  Effect.gen(function*() {
    const tokenizer = yield* Tokenizer.make(options.modelDir)
    const engine = yield* Engine.make({
      modelDir: options.modelDir,
      threads: options.threads,
      kvCacheDtype: options.kvCacheDtype,
      kvCacheBudgetBytes: options.kvCacheBudgetBytes
    })
    return yield* fromEngine(engine, tokenizer, options)
  }).pipe(
    Effect.catchTags({
      TokenizerLoadError: (e) => Effect.fail(new ModelLoadFailed({ modelDir: options.modelDir, message: e.message })),
      MissingSpecialToken: (e) => Effect.fail(new ModelLoadFailed({ modelDir: options.modelDir, message: e.message })),
      ModelLoadError: (e) => Effect.fail(new ModelLoadFailed({ modelDir: options.modelDir, message: e.message })),
      InvalidRequestError: (e) => Effect.fail(new ModelLoadFailed({ modelDir: options.modelDir, message: e.message })),
      EngineFailure: (e) => Effect.fail(new ModelLoadFailed({ modelDir: options.modelDir, message: e.message }))
    })
  )

/**
 * Completes a loaded engine and tokenizer into a served model (the fake engine in tests, or the native
 * one): the chat formatter from the tokenizer's config, and a scheduler over the engine.
 */
export const fromEngine = (
  engine: EngineShape,
  tokenizer: TokenizerShape,
  options: Omit<NativeModelOptions, "modelDir" | "threads" | "kvCacheDtype" | "kvCacheBudgetBytes">
): Effect.Effect<LoadedModel, ModelLoadFailed, Scope.Scope> =>
  Effect.gen(function*() {
    const chat = yield* fromTokenizerConfig(tokenizer.tokenizerConfig).pipe(
      Effect.mapError((e) => new ModelLoadFailed({ modelDir: tokenizer.modelDir, message: e.message }))
    )
    const scheduler = yield* Scheduler.make(options.scheduler).pipe(Effect.provideService(Engine.Engine, engine))
    const serving: ServingConfigShape = {
      modelName: options.modelName,
      created: Math.floor(Date.now() / 1000),
      maxModelLen: engine.info.config.maxSequenceLength,
      defaults: options.defaults
    }
    return { engine, scheduler, tokenizer, chat, serving }
  })
