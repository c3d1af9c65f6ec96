/**
 * Every metric vdiff keeps, as Effect Metrics. Telemetry.ts hands them to OpenTelemetry, whose
 * Prometheus exporter renders them on GET /metrics.
 *
 * Names follow vLLM's, so that its dashboards carry over: `vllm:num_requests_running` is
 * `vdiff_num_requests_running` here. (OpenTelemetry's Prometheus exporter turns every character outside
 * `[a-zA-Z0-9_]` into `_` — colons are reserved for recording rules — so a `vdiff:` name would come out
 * as `vdiff_` anyway; the metrics are named as they are scraped.) Counters end in `_total`; histograms
 * get `_bucket`, `_sum` and `_count` series.
 *
 * Labels: the server tags every update with `model_name` through Effect.tagMetrics (Server.ts), so the
 * definitions here carry only their own labels (finished_reason, error_type, route, method, status).
 *
 * Who updates what:
 *   scheduler/Scheduler.ts   running/waiting gauges, queue time, denoising steps, batch size,
 *                            tokens per step, step duration, step phases, KV reuse, prefix cache
 *   telemetry/requests.ts    successes, failures, prompt and generation tokens, time to first token,
 *                            inter-token latency, end-to-end latency (for the OpenAI routes)
 *   http/HttpMetrics.ts      HTTP requests, their duration, requests in flight
 *   server/systemRoutes.ts   model readiness, device memory and the process (at scrape time)
 *
 * @since 0.1.0
 */
import { readdirSync } from "node:fs"
import { Effect, Metric, MetricBoundaries, MetricKey } from "effect"
import type { Phase } from "../engine/Engine.js"

const counter = (name: string, description: string) => Metric.counter(name, { description, incremental: true })
const gauge = (name: string, description: string) => Metric.gauge(name, { description })

const histogram = (name: string, boundaries: ReadonlyArray<number>, description: string) =>
  Metric.histogram(name, MetricBoundaries.fromIterable(boundaries), description)

// Bucket bounds: vLLM's for the latencies it also has, so that the histograms compare bucket by bucket.
const firstTokenBounds = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80, 160, 640, 2560]
const interTokenBounds = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80]
const requestBounds = [0.3, 0.5, 0.8, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30, 40, 50, 60, 120, 240, 480, 960, 1920, 7680]
const stepBounds = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
const httpBounds = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]
const powersOfTwo = (max: number) => Array.from({ length: Math.log2(max) + 1 }, (_, i) => 2 ** i)

// --- scheduler ----------------------------------------------------------------------------------------

export const numRequestsRunning = Metric.gauge("vdiff_num_requests_running", {
  description: "Requests whose sequences are in the running batch (one per prompt)."
})

export const numRequestsWaiting = Metric.gauge("vdiff_num_requests_waiting", {
  description: "Requests waiting in the admission queue for room in the batch."
})

export const kvCacheBytes = Metric.gauge("vdiff_kv_cache_bytes", {
  description: "Bytes held by the KV caches of running sequences and the prefix cache's entries (bounded by --kv-cache-budget when set)."
})

export const requestQueueTime = histogram(
  "vdiff_request_queue_time_seconds",
  requestBounds,
  "Seconds a request waited in the admission queue, from submission to admission into the batch."
)

export const denoisingSteps = counter(
  "vdiff_denoising_steps_total",
  "Batched denoising steps taken (engine forward calls; each advances every sequence of the batch)."
)

export const batchSize = histogram("vdiff_batch_size", powersOfTwo(1024), "Sequences advanced together by one denoising step.")

export const tokensPerStep = histogram(
  "vdiff_tokens_per_step",
  [0, ...powersOfTwo(512)],
  "Answer tokens one sequence committed by denoising in one step (parallel decoding commits more than one); block decoding's prefill and commit forwards are not counted."
)

export const stepDuration = histogram("vdiff_step_duration_seconds", stepBounds, "Seconds one batched denoising step took in the engine.")

export const scoredCanvases = counter(
  "vdiff_scored_canvases_total",
  "Canvases scored rather than denoised (guided_choice, completions' echo with logprobs): one per predicted position."
)

export const scoreDuration = histogram(
  "vdiff_score_duration_seconds",
  stepBounds,
  "Seconds one batched scoring forward took in the engine (run between two denoising steps)."
)

/**
 * The phase mix of the steps: each sequence's forward in each batched step, by `phase` — prefill (a
 * prompt's whole blocks), denoise (an open block), commit (a finished block cached from its final tokens).
 * Full-canvas (LLaDA) sequences always denoise. Over vdiff_denoising_steps_total: the mix per step.
 *
 * One counter per phase, each with its label in its key: `Metric.tagged` at the update would build the
 * labelled key again at every update (a new label array, so Effect's per-labels cache never hits), for
 * every sequence at every step.
 */
export const stepPhases: Readonly<Record<Phase, Metric.Metric.Counter<number>>> = (() => {
  const key = MetricKey.counter("vdiff_step_phase_total", {
    description:
      "Sequence forwards by phase (prefill, denoise, commit): one per sequence per batched step; full-canvas models always denoise.",
    incremental: true
  })
  const phase = (name: string) => Metric.fromMetricKey(MetricKey.tagged(key, "phase", name))
  return { prefill: phase("prefill"), denoise: phase("denoise"), commit: phase("commit") }
})()

/** Key/value positions the forwards attended (telemetry/kvReuse.ts: per sequence forward, in canvas positions). */
export const kvPositionsAttended = counter(
  "vdiff_kv_positions_attended_total",
  "Canvas positions whose keys and values the sequences' forwards attended (per sequence forward)."
)

/** Of those, the positions read from a KV cache instead of computed. */
export const kvPositionsReused = counter(
  "vdiff_kv_positions_reused_total",
  "Of the attended positions, those read from a KV cache rather than computed by the forward."
)

/**
 * The prefix cache of a block-diffusion model, in prompt tokens as vLLM counts its own: the prompts of
 * sequences that looked it up (kv_cache prefix, at least one whole block), and of those the tokens whose
 * keys and values were copied from it instead of computed.
 */
export const prefixCacheQueries = counter(
  "vdiff_prefix_cache_queries_total",
  "Prompt tokens of the sequences that looked the prefix cache up (block-diffusion models with --prefix-cache)."
)

export const prefixCacheHits = counter(
  "vdiff_prefix_cache_hits_total",
  "Of the queried prompt tokens, those whose keys and values came from the prefix cache instead of being computed."
)

/** reused / attended since the server started: the share of the KV the forwards reused. */
export const kvReuseShare = Metric.gauge("vdiff_kv_reuse_share", {
  description: "Share of the attended key/value positions read from a KV cache, since start (reused / attended)."
})

// --- requests (OpenAI routes) -------------------------------------------------------------------------

export const requestSuccess = counter(
  "vdiff_request_success_total",
  "Answers (choices) generated to their end, by finished_reason (stop, length)."
)

export const requestFailure = counter(
  "vdiff_request_failure_total",
  "Generation requests that failed, by error_type (the error code, e.g. queue_full, timeout, " +
    "context_length_exceeded; cancelled when the client went away)."
)

export const promptTokens = counter("vdiff_prompt_tokens_total", "Prompt tokens of the requests answered (as in their usage).")

export const generationTokens = counter(
  "vdiff_generation_tokens_total",
  "Answer tokens of the requests answered (as in their usage: up to the end of each answer)."
)

export const timeToFirstToken = histogram(
  "vdiff_time_to_first_token_seconds",
  firstTokenBounds,
  "Seconds from a request's arrival to the first token of the answer's committed prefix."
)

export const interTokenLatency = histogram(
  "vdiff_inter_token_latency_seconds",
  interTokenBounds,
  "Seconds between two successive growths of an answer's committed prefix (one observation per growth)."
)

export const e2eRequestLatency = histogram(
  "vdiff_e2e_request_latency_seconds",
  requestBounds,
  "Seconds from a request's arrival to its last byte, for requests answered without error."
)

// --- HTTP ---------------------------------------------------------------------------------------------

export const httpRequests = counter(
  "vdiff_http_requests_total",
  "HTTP requests answered, by route pattern, method and status (499: the client went away)."
)

export const httpRequestDuration = histogram(
  "vdiff_http_request_duration_seconds",
  httpBounds,
  "Seconds from an HTTP request's arrival to its response's last byte, by route pattern, method and status."
)

export const httpRequestsInFlight = Metric.gauge("vdiff_http_requests_in_flight", {
  description: "HTTP requests being answered."
})

// --- the server ---------------------------------------------------------------------------------------

export const modelReady = Metric.gauge("vdiff_model_ready", {
  description: "1 when the model is loaded and the server takes work, else 0."
})

/** Bytes the backend holds on its device (weights, packed or quantized copies, KV caches); labels backend, device. */
export const deviceMemoryUsedBytes = Metric.gauge("vdiff_device_memory_used_bytes", {
  description: "Bytes the backend holds on its device: weights, their packed or quantized copies, and live KV caches."
})

/** The device's memory (a GPU's; 0 on the CPU, not reported); labels backend, device. */
export const deviceMemoryTotalBytes = Metric.gauge("vdiff_device_memory_total_bytes", {
  description: "The device's memory in bytes (a GPU's total; 0 on the CPU)."
})

// --- the process: the standard series of Prometheus's client libraries, so process dashboards work ------

// CPU time as a gauge holding the total: the server tags every update with its model_name, so a counter
// fed by differences would split one process's time among the servers of a process (tests run several).
export const processCpuSeconds = gauge("process_cpu_seconds_total", "Total user and system CPU time spent in seconds.")
export const processResidentMemoryBytes = gauge(
  "process_resident_memory_bytes",
  "Resident memory size in bytes (mapped model weights included, as the kernel counts them)."
)
export const processStartTimeSeconds = gauge("process_start_time_seconds", "Start time of the process since the Unix epoch in seconds.")
export const processOpenFds = gauge("process_open_fds", "Number of open file descriptors.")
export const nodejsHeapUsedBytes = gauge("nodejs_heap_size_used_bytes", "V8 heap in use, in bytes.")
export const nodejsHeapTotalBytes = gauge("nodejs_heap_size_total_bytes", "V8 heap allocated, in bytes.")
export const nodejsExternalMemoryBytes = gauge(
  "nodejs_external_memory_bytes",
  "Memory of C++ objects bound to JavaScript objects, in bytes."
)

/** Open file descriptors (Linux: /proc/self/fd); undefined where that cannot be read. */
const openFds = (): number | undefined => {
  try {
    return readdirSync("/proc/self/fd").length - 1 // not the one readdirSync opened to list them
  } catch {
    return undefined
  }
}

/** The process series, read now (at scrape time). */
export const processMetrics = Effect.suspend(() => {
  const cpu = process.cpuUsage()
  const memory = process.memoryUsage()
  const fds = openFds()
  return Effect.all(
    [
      Metric.set(processCpuSeconds, (cpu.user + cpu.system) / 1e6),
      Metric.set(processResidentMemoryBytes, memory.rss),
      Metric.set(processStartTimeSeconds, Math.round(Date.now() / 1000 - process.uptime())),
      Metric.set(nodejsHeapUsedBytes, memory.heapUsed),
      Metric.set(nodejsHeapTotalBytes, memory.heapTotal),
      Metric.set(nodejsExternalMemoryBytes, memory.external),
      ...(fds === undefined ? [] : [Metric.set(processOpenFds, fds)])
    ],
    { discard: true }
  )
})

/** Seconds between two Clock.currentTimeNanos readings. */
export const secondsBetween = (start: bigint, end: bigint): number => Number(end - start) / 1e9

/**
 * The counters at 0 before their first event, so that a fresh server's first scrape already has every
 * series rate() and increase() read (a series that appears with its first increment has no earlier
 * sample to count it from): the finish reasons and the error types this server raises, the token, step,
 * phase and cache counters. Adding 0 changes nothing, so the scrape does it every time.
 */
export const countersFromZero = Effect.all(
  [
    ...["length", "stop"].map((reason) => Metric.incrementBy(Metric.tagged(requestSuccess, "finished_reason", reason), 0)),
    ...["cancelled", "queue_full", "draining", "timeout", "model_not_loaded", "out_of_memory", "internal_error"].map((type) =>
      Metric.incrementBy(Metric.tagged(requestFailure, "error_type", type), 0)
    ),
    ...[
      promptTokens,
      generationTokens,
      denoisingSteps,
      scoredCanvases,
      kvPositionsAttended,
      kvPositionsReused,
      prefixCacheQueries,
      prefixCacheHits
    ].map((counter) => Metric.incrementBy(counter, 0)),
    ...Object.values(stepPhases).map((counter) => Metric.incrementBy(counter, 0))
  ],
  { discard: true }
)
