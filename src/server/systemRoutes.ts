/**
 * The server's own endpoints, beside the OpenAI API: health and probes, version, engine statistics and
 * Prometheus metrics.
 *
 *   GET /health          status healthy|degraded|unhealthy, state, model, backend, memory, queue, uptime
 *                        (503 when unhealthy, i.e. the model failed to load)
 *   GET /health/live     200 while the process runs
 *   GET /health/ready    200 once the model is loaded; 503 while loading, draining or failed
 *   GET /version         package version, Node and Effect versions
 *   GET /v1/engine/stats the scheduler's live figures and the engine's model info
 *   GET /metrics         Prometheus text of every metric (telemetry/metrics.ts lists them)
 *
 * @since 0.1.0
 */
import { HttpRouter, HttpServerResponse } from "@effect/platform"
import { Effect, Metric, ModuleVersion, Option } from "effect"
import { packageInfo } from "../config/package.js"
import { familyOf, type ModelInfo } from "../engine/Engine.js"
import type { SchedulerStats } from "../scheduler/Scheduler.js"
import * as Metrics from "../telemetry/metrics.js"
import { Telemetry } from "../telemetry/Telemetry.js"
import { ModelHost, type ModelState } from "./ModelHost.js"
import { orServiceUnavailable } from "./modelUnavailable.js"

export interface SystemInfo {
  /** The served model name (known before the model loads). */
  readonly modelName: string
  /** --max-queue-size, reported before the scheduler exists. */
  readonly queueCapacity: number
}

/** What runs the forward pass, as /health and /v1/engine/stats report it; null until the model is loaded. */
const backendOf = (info: ModelInfo) => ({
  name: info.backend,
  device: info.device,
  gemm: info.gemm,
  memory_used_bytes: info.memoryUsedBytes,
  memory_total_bytes: info.memoryTotalBytes
})

export type HealthStatus = "healthy" | "degraded" | "unhealthy"

const healthStatus = (state: ModelState, stats: SchedulerStats | undefined): HealthStatus => {
  if (state === "error") return "unhealthy"
  if (state !== "ready") return "degraded"
  // A full queue means new requests are being turned away.
  return stats !== undefined && stats.waiting >= stats.capacity ? "degraded" : "healthy"
}

const schedulerStats = Effect.flatMap(ModelHost, (host) =>
  host.current.pipe(
    Effect.flatMap((model) => model.scheduler.stats),
    Effect.option
  )
)

export const router = (info: SystemInfo) =>
  HttpRouter.empty.pipe(
    HttpRouter.get(
      "/health",
      Effect.gen(function* () {
        const host = yield* ModelHost
        const state = yield* host.state
        const model = yield* Effect.option(host.current)
        const stats = Option.getOrUndefined(yield* schedulerStats)
        const status = healthStatus(state, stats)
        const memory = process.memoryUsage()
        return HttpServerResponse.unsafeJson(
          {
            status,
            state,
            model: info.modelName,
            backend: Option.match(model, { onNone: () => null, onSome: (m) => backendOf(m.engine.info) }),
            ...(state === "error" ? { error: Option.getOrNull(yield* host.failure) } : {}),
            memory: {
              rss_bytes: memory.rss,
              heap_used_bytes: memory.heapUsed,
              heap_total_bytes: memory.heapTotal,
              external_bytes: memory.external,
              array_buffers_bytes: memory.arrayBuffers,
              weight_bytes: Option.match(model, { onNone: () => null, onSome: (m) => m.engine.info.weightBytes })
            },
            queue: {
              waiting: stats?.waiting ?? 0,
              capacity: stats?.capacity ?? info.queueCapacity,
              running: stats?.running ?? 0
            },
            uptime_s: Math.round(process.uptime() * 1000) / 1000
          },
          { status: status === "unhealthy" ? 503 : 200 }
        )
      })
    ),
    HttpRouter.get("/health/live", Effect.succeed(HttpServerResponse.unsafeJson({ status: "alive" }))),
    HttpRouter.get(
      "/health/ready",
      Effect.gen(function* () {
        const host = yield* ModelHost
        yield* orServiceUnavailable(host.use)
        return HttpServerResponse.unsafeJson({ status: "ready" })
      })
    ),
    HttpRouter.get(
      "/version",
      Effect.sync(() =>
        HttpServerResponse.unsafeJson({
          name: packageInfo().name,
          version: packageInfo().version,
          node: process.version,
          effect: ModuleVersion.getCurrentVersion()
        })
      )
    ),
    HttpRouter.get(
      "/v1/engine/stats",
      Effect.gen(function* () {
        const host = yield* ModelHost
        const { engine, scheduler } = yield* orServiceUnavailable(host.current)
        const stats = yield* scheduler.stats
        const config = engine.info.config
        const family = familyOf(engine.info)
        const prefix = yield* engine.prefixCache
        return HttpServerResponse.unsafeJson({
          model: info.modelName,
          backend: backendOf(engine.info),
          state: yield* host.state,
          scheduler: {
            waiting: stats.waiting,
            running: stats.running,
            running_sequences: stats.runningSequences,
            queue_capacity: stats.capacity,
            max_concurrent: stats.maxConcurrent,
            draining: stats.draining,
            steps_total: stats.stepsTotal,
            sequence_steps_total: stats.sequenceStepsTotal,
            tokens_committed: stats.tokensCommitted,
            requests_finished: stats.requestsFinished,
            cancelled_total: stats.cancelledTotal,
            steps_after_cancel_max: stats.stepsAfterCancelMax,
            average_batch_size: stats.averageBatchSize,
            average_tokens_per_step: stats.averageTokensPerStep
          },
          engine: {
            live_sequences: yield* engine.live,
            weight_dtype: engine.info.weightDtype,
            parameters: engine.info.parameterCount,
            weight_bytes: engine.info.weightBytes,
            max_sequence_length: config.maxSequenceLength,
            vocab_size: config.vocabSize,
            layers: config.nLayers,
            d_model: config.dModel,
            // The other families than LLaDA name themselves, as in /v1/models.
            ...(family.decoding !== "full_canvas"
              ? { family: { name: family.name, decoding: family.decoding, block_length: family.blockLength, editing: family.editing } }
              : {}),
            // Block-diffusion models with --prefix-cache: whole prompt blocks kept across requests.
            ...(prefix.capacityBytes > 0
              ? {
                  prefix_cache: {
                    capacity_bytes: prefix.capacityBytes,
                    bytes: prefix.bytes,
                    entries: prefix.entries,
                    lookups: prefix.lookups,
                    hits: prefix.hits,
                    hit_tokens: prefix.hitPositions,
                    inserts: prefix.inserts,
                    evictions: prefix.evictions
                  }
                }
              : {})
          }
        })
      })
    ),
    HttpRouter.get(
      "/metrics",
      Effect.gen(function* () {
        const host = yield* ModelHost
        const telemetry = yield* Telemetry
        // Readiness is sampled when scraped; everything else is updated where it happens (and the counters
        // are there from the first scrape on).
        yield* Metric.set(Metrics.modelReady, (yield* host.state) === "ready" ? 1 : 0)
        yield* Metrics.countersFromZero
        yield* Metrics.processMetrics
        const model = yield* Effect.option(host.current)
        if (Option.isSome(model)) {
          const { engine } = model.value
          const tagged = (gauge: Metric.Metric.Gauge<number>, value: number) =>
            Metric.set(gauge.pipe(Metric.tagged("backend", engine.info.backend), Metric.tagged("device", engine.info.device)), value)
          yield* tagged(Metrics.deviceMemoryUsedBytes, engine.info.memoryUsedBytes + (yield* engine.kvCacheBytes))
          yield* tagged(Metrics.deviceMemoryTotalBytes, engine.info.memoryTotalBytes)
        }
        return HttpServerResponse.text(yield* telemetry.scrape, {
          contentType: "text/plain; version=0.0.4; charset=utf-8"
        })
      })
    )
  )
