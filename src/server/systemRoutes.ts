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
 *   GET /metrics         Prometheus text
 *
 * @since 0.1.0
 */
import { HttpRouter, HttpServerResponse } from "@effect/platform"
import { Effect, ModuleVersion, Option } from "effect"
import { packageInfo } from "../config/package.js"
import { HttpMetrics } from "../http/HttpMetrics.js"
import type { SchedulerStats } from "../scheduler/Scheduler.js"
import { ModelHost, type ModelState } from "./ModelHost.js"

export interface SystemInfo {
  /** The served model name (known before the model loads). */
  readonly modelName: string
  /** --max-queue-size, reported before the scheduler exists. */
  readonly queueCapacity: number
}

/** The compute backend; the CUDA engine will report "cuda". */
const backend = "cpu"

export type HealthStatus = "healthy" | "degraded" | "unhealthy"

const healthStatus = (state: ModelState, stats: SchedulerStats | undefined): HealthStatus => {
  if (state === "error") return "unhealthy"
  if (state !== "ready") return "degraded"
  // A full queue means new requests are being turned away.
  return stats !== undefined && stats.waiting >= stats.capacity ? "degraded" : "healthy"
}

const schedulerStats = Effect.flatMap(ModelHost, (host) =>
  host.current.pipe(Effect.flatMap((model) => model.scheduler.stats), Effect.option))

export const router = (info: SystemInfo) =>
  HttpRouter.empty.pipe(
    HttpRouter.get(
      "/health",
      Effect.gen(function*() {
        const host = yield* ModelHost
        const state = yield* host.state
        const model = yield* Effect.option(host.current)
        const stats = Option.getOrUndefined(yield* schedulerStats)
        const status = healthStatus(state, stats)
        const memory = process.memoryUsage()
        return HttpServerResponse.unsafeJson({
          status,
          state,
          model: info.modelName,
          backend,
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
        }, { status: status === "unhealthy" ? 503 : 200 })
      })
    ),
    HttpRouter.get("/health/live", Effect.succeed(HttpServerResponse.unsafeJson({ status: "alive" }))),
    HttpRouter.get(
      "/health/ready",
      Effect.gen(function*() {
        const host = yield* ModelHost
        yield* host.use
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
          effect: ModuleVersion.getCurrentVersion(),
          backend
        })
      )
    ),
    HttpRouter.get(
      "/v1/engine/stats",
      Effect.gen(function*() {
        const host = yield* ModelHost
        const { engine, scheduler } = yield* host.current
        const stats = yield* scheduler.stats
        const config = engine.info.config
        return HttpServerResponse.unsafeJson({
          model: info.modelName,
          backend,
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
            average_batch_size: stats.averageBatchSize,
            average_tokens_per_step: stats.averageTokensPerStep
          },
          engine: {
            live_sequences: yield* engine.live,
            threads: engine.info.threads,
            weight_dtype: engine.info.weightDtype,
            parameters: engine.info.parameterCount,
            weight_bytes: engine.info.weightBytes,
            max_sequence_length: config.maxSequenceLength,
            vocab_size: config.vocabSize,
            layers: config.nLayers,
            d_model: config.dModel
          }
        })
      })
    ),
    HttpRouter.get(
      "/metrics",
      Effect.gen(function*() {
        const host = yield* ModelHost
        const metrics = yield* HttpMetrics
        const stats = Option.getOrUndefined(yield* schedulerStats)
        const state = yield* host.state
        return HttpServerResponse.text(
          prometheusText({
            requests: yield* metrics.requests,
            inFlight: yield* metrics.inFlight,
            ready: state === "ready",
            stats,
            queueCapacity: info.queueCapacity
          }),
          { contentType: "text/plain; version=0.0.4; charset=utf-8" }
        )
      })
    )
  )

const escapeLabel = (value: string) => value.replace(/\\/g, "\\\\").replace(/"/g, "\\\"").replace(/\n/g, "\\n")

/** The Prometheus text exposition format (version 0.0.4) of the figures the server keeps. */
export const prometheusText = (input: {
  readonly requests: ReadonlyArray<{ route: string; method: string; status: number; count: number }>
  readonly inFlight: number
  readonly ready: boolean
  readonly stats: SchedulerStats | undefined
  readonly queueCapacity: number
}): string => {
  const lines: Array<string> = []
  const metric = (name: string, type: "counter" | "gauge", help: string, samples: ReadonlyArray<string>) => {
    lines.push(`# HELP ${name} ${help}`, `# TYPE ${name} ${type}`, ...samples)
  }
  metric(
    "vdiff_http_requests_total",
    "counter",
    "HTTP requests answered, by route pattern, method and status.",
    input.requests.map((r) =>
      `vdiff_http_requests_total{route="${escapeLabel(r.route)}",method="${r.method}",status="${r.status}"} ${r.count}`
    )
  )
  metric("vdiff_http_requests_in_flight", "gauge", "HTTP requests being answered.", [
    `vdiff_http_requests_in_flight ${input.inFlight}`
  ])
  metric("vdiff_model_ready", "gauge", "1 when the model is loaded and the server takes work.", [
    `vdiff_model_ready ${input.ready ? 1 : 0}`
  ])
  const s = input.stats
  metric("vdiff_queue_waiting", "gauge", "Requests waiting for a batch slot.", [`vdiff_queue_waiting ${s?.waiting ?? 0}`])
  metric("vdiff_queue_capacity", "gauge", "Requests that may wait for a batch slot.", [
    `vdiff_queue_capacity ${s?.capacity ?? input.queueCapacity}`
  ])
  metric("vdiff_running_requests", "gauge", "Requests being decoded.", [`vdiff_running_requests ${s?.running ?? 0}`])
  metric("vdiff_running_sequences", "gauge", "Sequences in the current batch.", [
    `vdiff_running_sequences ${s?.runningSequences ?? 0}`
  ])
  metric("vdiff_scheduler_steps_total", "counter", "Batched denoising steps taken.", [
    `vdiff_scheduler_steps_total ${s?.stepsTotal ?? 0}`
  ])
  metric("vdiff_tokens_committed_total", "counter", "Answer tokens committed.", [
    `vdiff_tokens_committed_total ${s?.tokensCommitted ?? 0}`
  ])
  metric("vdiff_requests_finished_total", "counter", "Generation requests finished.", [
    `vdiff_requests_finished_total ${s?.requestsFinished ?? 0}`
  ])
  return lines.join("\n") + "\n"
}
