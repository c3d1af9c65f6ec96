/**
 * The server, composed: configuration → model host (loads in the background) → HTTP application (system
 * routes + the OpenAI routes behind the readiness gate, wrapped in the middleware) → Node HTTP server.
 *
 *   HTTP span (@effect/platform's tracer; not for /health* and /metrics) · metric label model_name ·
 *   request id · access log · HTTP metrics          (around the whole exchange, streams included)
 *   errors → responses · security headers · CORS · body limit · failed-auth limit · auth · rate limit
 *   router: /health*, /version, /metrics, /v1/engine/stats | OpenAI routes (503 until the model is ready)
 *
 * Telemetry (telemetry/Telemetry.ts) sits beneath everything: the metrics that GET /metrics renders, and
 * the tracer that exports spans over OTLP when --otlp-endpoint / OTEL_EXPORTER_OTLP_ENDPOINT is set.
 *
 * `run` is the process's life: listen, load, log one ready line, serve; on interruption (SIGTERM/SIGINT
 * under NodeRuntime.runMain) refuse new work, drain in-flight work up to --shutdown-timeout, let the last
 * responses go out, close the server and release the model.
 *
 * @since 0.1.0
 */
import { createServer, type Server as NodeServer } from "node:http"
import { HttpApp, HttpMiddleware, HttpRouter, HttpServer, type HttpServerRequest, HttpServerResponse } from "@effect/platform"
import type { ServeError } from "@effect/platform/HttpServerError"
import { NodeHttpServer } from "@effect/platform-node"
import { Context, Effect, Fiber, Layer } from "effect"
import type { ApiError } from "../api/errors.js"
import type { RequestId } from "../api/RequestId.js"
import { ChatFormatter } from "../chat/ChatFormatter.js"
import { type Settings, servedModelName } from "../config/Config.js"
import { packageInfo } from "../config/package.js"
import { auth } from "../http/auth.js"
import { renderErrors } from "../http/errorResponses.js"
import * as HttpMetrics from "../http/HttpMetrics.js"
import { accessLog, bodyLimit, cors, pathOf, requestId, securityHeaders } from "../http/middleware.js"
import * as RateLimiter from "../http/RateLimiter.js"
import * as RouteTable from "../http/routeTable.js"
import * as Sampling from "../config/sampling.js"
import { ServingConfig, type ServingDefaults } from "../openai/ServingConfig.js"
import { Scheduler } from "../scheduler/Scheduler.js"
import * as Telemetry from "../telemetry/Telemetry.js"
import { Tokenizer } from "../tokenizer/Tokenizer.js"
import { type Loader, loadNative, ModelHost, type ModelLoadFailed } from "./ModelHost.js"
import * as ModelHostModule from "./ModelHost.js"
import { orServiceUnavailable } from "./modelUnavailable.js"
import * as Playground from "../playground/Playground.js"
import * as SystemRoutes from "./systemRoutes.js"

/** What the OpenAI routes need from the server, besides the request. */
export type ApiServices = Scheduler | Tokenizer | ChatFormatter | ServingConfig | RequestId

export type ApiRouter = HttpRouter.HttpRouter<ApiError, ApiServices>

export interface ServerOptions {
  readonly config: Settings
  /** The OpenAI-compatible routes (src/openai/routes.ts). */
  readonly api: ApiRouter
  /** Loads the model; by default the native engine on --model. */
  readonly load?: Loader
  /** Metrics and tracing; by default `telemetryLayer(config)`. */
  readonly telemetry?: Layer.Layer<Telemetry.Telemetry>
}

/** Telemetry as the configuration asks: spans over OTLP/HTTP when --otlp-endpoint is set. */
export const telemetryLayer = (config: Settings): Layer.Layer<Telemetry.Telemetry> =>
  Telemetry.layer({ serviceVersion: packageInfo().version, otlpEndpoint: config.otlpEndpoint })

/** Probes and scrapes come every few seconds and would drown the traces that matter. */
const untraced = (request: HttpServerRequest.HttpServerRequest): boolean => {
  const path = pathOf(request.url)
  return path === "/metrics" || path === "/health" || path.startsWith("/health/")
}

/** What a request gets for the fields it leaves out, as the configuration says. */
export const servingDefaults = (config: Settings): ServingDefaults => Sampling.defaultsFromConfig(config)

/** The model loader the configuration asks for. */
export const nativeLoader = (config: Settings): Loader =>
  loadNative({
    modelDir: config.model,
    device: config.device,
    gpuMemoryUtilization: config.gpuMemoryUtilization,
    quantize: config.quantize,
    cpuIsa: config.cpuIsa,
    threads: config.threads,
    kvCacheDtype: config.kvCacheDtype,
    kvCacheBudgetBytes: config.kvCacheBudget,
    prefixCacheBytes: config.prefixCache,
    prefillChunk: config.prefillChunk,
    modelName: servedModelName(config),
    scheduler: {
      maxConcurrent: config.maxConcurrentRequests,
      queueCapacity: config.maxQueueSize,
      maxBatchTokens: config.maxBatchTokens === 0 ? Number.MAX_SAFE_INTEGER : config.maxBatchTokens,
      requestTimeoutMs: config.requestTimeout * 1000
    },
    defaults: servingDefaults(config),
    generationConfig: config.generationConfig
  })

/**
 * The OpenAI routes behind the readiness gate: while the model is ready each request gets its services
 * from the host; otherwise it fails with 503 (loading, draining, failed: see modelUnavailable.ts).
 */
export const gate = (api: ApiRouter) =>
  HttpRouter.use(api, (handler) =>
    Effect.flatMap(ModelHost, (host) =>
      Effect.flatMap(orServiceUnavailable(host.use), (model) =>
        handler.pipe(
          Effect.provideService(Scheduler, model.scheduler),
          Effect.provideService(Tokenizer, model.tokenizer),
          Effect.provideService(ChatFormatter, model.chat),
          Effect.provideService(ServingConfig, model.serving)
        )
      )
    )
  )

/**
 * While the server drains, every response says `Connection: close`, so a keep-alive client (a load
 * balancer's pooled connection) sends its next request elsewhere instead of on a connection this server is
 * about to stop reading: a request that arrives on one after the app has stopped gets no answer, and the
 * connection stays open until the client's own timeout (seen as a 300 s HAProxy stall in the rolling
 * restart test, with the replica already drained).
 */
const closeWhileDraining = <E, R>(app: HttpApp.Default<E, R>): HttpApp.Default<E, R | ModelHost> =>
  Effect.zipRight(
    Effect.flatMap(ModelHost, (host) =>
      HttpApp.appendPreResponseHandler((_request, response) =>
        Effect.map(host.state, (state) => (state === "draining" ? HttpServerResponse.setHeader(response, "connection", "close") : response))
      )
    ),
    app
  )

/** Serves the application on the HttpServer in context. */
export const layerServe = (options: ServerOptions) =>
  Layer.unwrapEffect(
    Effect.gen(function* () {
      const { config } = options
      const metrics = yield* HttpMetrics.HttpMetrics
      const modelName = servedModelName(config)
      const routes = HttpRouter.concatAll(
        SystemRoutes.router({ modelName, queueCapacity: config.maxQueueSize }),
        Playground.router,
        gate(options.api)
      )
      const table = RouteTable.fromRouters(routes)
      const app = routes.pipe(
        RateLimiter.rateLimit({ keyedByApiKey: config.apiKey.length > 0, trustProxy: config.trustProxy }),
        auth(config.apiKey),
        RateLimiter.limitFailedAuth({ trustProxy: config.trustProxy }),
        bodyLimit(config.maxBodySize),
        cors(config.allowedOrigins),
        securityHeaders,
        closeWhileDraining,
        renderErrors(table)
      )
      // Around the exchange as a whole, so that the log and the counters see a stream's end; every metric
      // updated in it is labelled with the model's name.
      return HttpServer.serve(app, (app) =>
        requestId(
          accessLog({ trustProxy: config.trustProxy, onRecord: metrics.record(table), routine: untraced })(metrics.track(app))
        ).pipe(Effect.tagMetrics("model_name", modelName))
      ).pipe(
        HttpMiddleware.withTracerDisabledWhen(untraced),
        // Spans named by route pattern ("POST /v1/completions"), as OpenTelemetry's conventions ask.
        HttpMiddleware.withSpanNameGenerator((request) => `${request.method} ${table.find(pathOf(request.url))?.route ?? "unmatched"}`)
      )
    })
  )

/**
 * Everything but the listening socket: telemetry, model host, rate limiter, HTTP metrics and the served app.
 * Provide an HttpServer (NodeHttpServer.layer, or NodeHttpServer.layerTest in tests).
 */
export const layerApp = (options: ServerOptions) => {
  // The scheduler's fiber is forked while loading: it keeps the model_name label for its metrics.
  const load = (options.load ?? nativeLoader(options.config)).pipe(Effect.tagMetrics("model_name", servedModelName(options.config)))
  const host = ModelHostModule.layer({ modelDir: options.config.model, load })
  const limiter = RateLimiter.layer({
    limit: options.config.rateLimitRequests,
    windowMs: options.config.rateLimitWindow * 1000
  })
  return layerServe(options).pipe(
    Layer.provideMerge(Layer.mergeAll(host, limiter, HttpMetrics.layer)),
    Layer.provideMerge(options.telemetry ?? telemetryLayer(options.config))
  )
}

/**
 * The Node server under the HttpServer, so that shutdown can close it while the app still answers.
 * Effect's HttpServer detaches the app from the server before it closes it, when the layers are released;
 * a request arriving between the two (on a load balancer's pooled keep-alive connection) would get no
 * answer, and the server's close would then wait for that connection until the client gave up.
 */
export class Listener extends Context.Tag("vdiff/Listener")<
  Listener,
  {
    /**
     * Stops accepting connections and ends the idle ones; connections with a request in progress close
     * after their response (every response says `Connection: close` while draining). Waits until all are
     * gone, up to `graceMs`, then ends those left.
     */
    readonly close: (graceMs: number) => Effect.Effect<void>
  }
>() {}

const listenerOf = (server: NodeServer): Context.Tag.Service<typeof Listener> => ({
  close: (graceMs) =>
    Effect.async<void>((resume) => {
      if (!server.listening) return resume(Effect.void)
      // server.close ends the idle keep-alive connections itself (Node >= 19) and calls back once the
      // last connection has ended.
      server.close(() => resume(Effect.void))
    }).pipe(Effect.timeoutOption(graceMs), Effect.zipRight(Effect.sync(() => server.closeAllConnections())))
})

/** The whole server listening on --host/--port. */
export const layer = (
  options: ServerOptions
): Layer.Layer<
  ModelHost | HttpMetrics.HttpMetrics | HttpServer.HttpServer | Listener | RateLimiter.RateLimiter | Telemetry.Telemetry,
  ServeError
> =>
  Layer.unwrapEffect(
    Effect.sync(() => {
      const server = createServer()
      return layerApp(options).pipe(
        Layer.provideMerge(NodeHttpServer.layer(() => server, { host: options.config.host, port: options.config.port })),
        Layer.provideMerge(Layer.succeed(Listener, listenerOf(server)))
      )
    })
  )

/** How long shutdown waits for responses to finish going out once the work behind them has ended. */
const flushGraceMs = 5000

/**
 * Shutdown: readiness turns 503 and new work is refused, in-flight work drains up to `timeoutMs` (the
 * scheduler then ends what is left, and streams end with an error event), and the last responses are
 * given time to go out.
 */
export const shutdown = (timeoutMs: number) =>
  Effect.gen(function* () {
    const host = yield* ModelHost
    const metrics = yield* HttpMetrics.HttpMetrics
    // Nothing to drain when the model never loaded.
    if ((yield* host.state) === "error") return
    yield* Effect.logInfo("shutting down: draining in-flight requests").pipe(Effect.annotateLogs({ timeout_s: timeoutMs / 1000 }))
    yield* host.drain(timeoutMs)
    // Interruptible inside the timeout, so that the grace ends on time wherever shutdown runs.
    yield* metrics.idle.pipe(Effect.interruptible, Effect.timeoutOption(flushGraceMs))
    yield* Effect.logInfo("drained; closing the server and releasing the model")
  })

/**
 * The server's life, for NodeRuntime.runMain: listen, load the model, log the ready line, serve until
 * interrupted, then shut down (see `shutdown`). Fails if the socket cannot be opened or the model cannot
 * be loaded, after logging why.
 */
export const run = (options: ServerOptions): Effect.Effect<never, ServeError | ModelLoadFailed> =>
  Effect.scoped(
    Effect.gen(function* () {
      const { config } = options
      const context = yield* Layer.build(layer(options)).pipe(
        Effect.tapError((error) => Effect.logError(`cannot listen on ${config.host}:${config.port}: ${String(error.cause)}`))
      )
      const host = Context.get(context, ModelHost)
      const address = HttpServer.formatAddress(Context.get(context, HttpServer.HttpServer).address)
      // Added after the layers were built, so it runs before they are released: drain, then close.
      // Finalizers run uninterruptibly, where timeouts (which interrupt what they time) cannot fire;
      // the shutdown runs on a fiber of its own, interruptible, and the finalizer waits for it.
      yield* Effect.addFinalizer(() =>
        shutdown(config.shutdownTimeout * 1000).pipe(
          // The server stops listening before the app is detached from it: see Listener.
          Effect.zipRight(Effect.flatMap(Listener, (listener) => listener.close(flushGraceMs))),
          Effect.provide(context),
          Effect.interruptible,
          Effect.forkDaemon,
          Effect.flatMap(Fiber.join)
        )
      )
      yield* Effect.logInfo(`listening on ${address}; loading the model`).pipe(Effect.annotateLogs({ address, model_dir: config.model }))
      const loaded = yield* host.awaitReady.pipe(
        Effect.tapError((error) => Effect.logError(`cannot load the model from ${error.modelDir}: ${error.message}`))
      )
      const model = servedModelName(config)
      const { backend, device } = loaded.engine.info
      yield* Effect.logInfo(`vdiff ready on ${address}: model ${model}, backend ${backend} (${device})`).pipe(
        Effect.annotateLogs({
          address,
          model,
          model_dir: config.model,
          backend,
          device,
          device_setting: config.device,
          otlp_endpoint: config.otlpEndpoint ?? null
        })
      )
      return yield* Effect.never
    })
  )
