/**
 * GET /metrics after real requests through the whole server (fake engine, one sequence at a time): every
 * metric of src/telemetry/metrics.ts is there with the value the requests imply.
 */
import { randomUUID } from "node:crypto"
import { describe, expect, it } from "@effect/vitest"
import { Deferred, Effect, Logger, LogLevel } from "effect"
import { fakeLoader, postJson, request, settings, startServer } from "./http-helpers.js"

const quiet = Effect.provide(Logger.minimumLogLevel(LogLevel.None))

interface Sample {
  readonly name: string
  readonly labels: Readonly<Record<string, string>>
  readonly value: number
}

/** The samples of a Prometheus text exposition (comments skipped). */
const parseSamples = (text: string): Array<Sample> =>
  text
    .split("\n")
    .filter((line) => line !== "" && !line.startsWith("#"))
    .map((line) => {
      const match = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$/.exec(line)
      if (match === null) throw new Error(`not a sample line: ${line}`)
      const labels: Record<string, string> = {}
      for (const [, key, value] of (match[2] ?? "").matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) {
        labels[key!] = value!
      }
      return { name: match[1]!, labels, value: Number(match[3]) }
    })

/** Reads samples of one model's series: `value(name, labels)` is the one sample whose labels include these. */
const scrape = (url: string, model: string) =>
  Effect.map(request(url + "/metrics"), (reply) => {
    const samples = parseSamples(reply.text).filter((s) => s.labels["model_name"] === model)
    const value = (name: string, labels: Record<string, string> = {}): number | undefined => {
      const found = samples.filter((s) => s.name === name && Object.entries(labels).every(([key, v]) => s.labels[key] === v))
      if (found.length > 1) throw new Error(`${name} ${JSON.stringify(labels)} matches ${found.length} samples`)
      return found[0]?.value
    }
    return { reply, samples, value }
  })

describe("GET /metrics", () => {
  it.scopedLive("reports every metric with the values the requests imply", () =>
    Effect.gen(function* () {
      // Metrics are process-wide: a model name of its own keeps this test's series apart.
      const model = `metrics-${randomUUID().slice(0, 8)}`
      const config = yield* Effect.promise(() =>
        settings(["--served-model-name", model, "--max-concurrent-requests", "1", "--max-queue-size", "1", "--rate-limit-requests", "7"])
      )
      const { url } = yield* startServer({ config, load: fakeLoader(config, { stepMs: 10 }) })
      const completions = url + "/v1/completions"
      // seed 0: the fake engine's tokens then stay clear of EOS, so every answer runs to its length.
      const usages: Array<{ prompt_tokens: number; completion_tokens: number }> = []

      // 1. a completion, 2. a stream (with its usage), 3. a chat completion
      const plain = yield* postJson(completions, { model, prompt: "Hi", max_tokens: 4, seed: 0 })
      expect(plain.status).toBe(200)
      usages.push(plain.json.usage)
      const stream = yield* postJson(completions, {
        model,
        prompt: "Hi",
        max_tokens: 3,
        seed: 0,
        stream: true,
        stream_options: { include_usage: true }
      })
      expect(stream.status).toBe(200)
      const events = stream.text
        .split("\n\n")
        .filter((e) => e.startsWith("data: {"))
        .map((e) => JSON.parse(e.slice(6)))
      usages.push(events.at(-1).usage)
      const chat = yield* postJson(url + "/v1/chat/completions", {
        model,
        messages: [{ role: "user", content: "Hello" }],
        max_tokens: 5,
        seed: 0
      })
      expect(chat.status).toBe(200)
      usages.push(chat.json.usage)

      // 4. a long request holds the only batch slot, 5. a second waits in the one-place queue, 6. a third
      // finds the queue full: 503. Meanwhile the gauges show one running and one waiting.
      // (Long enough, at 10 ms a step, for the next two requests to arrive while it runs, even on a busy machine.)
      const longTokens = 80
      const long = yield* Effect.fork(postJson(completions, { model, prompt: "Hi", max_tokens: longTokens, seed: 0 }))
      yield* waitFor(url, model, "vdiff_num_requests_running", 1)
      const queued = yield* Effect.fork(postJson(completions, { model, prompt: "Hi", max_tokens: 2, seed: 0 }))
      yield* waitFor(url, model, "vdiff_num_requests_waiting", 1)
      const busy = yield* scrape(url, model)
      expect(busy.value("vdiff_num_requests_running")).toBe(1)
      expect(busy.value("vdiff_num_requests_waiting")).toBe(1)
      const refused = yield* postJson(completions, { model, prompt: "Hi", max_tokens: 2, seed: 0 })
      expect(refused.status).toBe(503)
      expect(refused.json.error.code).toBe("queue_full")
      for (const reply of [yield* long.await, yield* queued.await]) {
        if (reply._tag !== "Success") throw new Error("a request failed")
        expect(reply.value.status).toBe(200)
        usages.push(reply.value.json.usage)
      }

      const promptTokens = usages.reduce((sum, u) => sum + u.prompt_tokens, 0)
      const generated = usages.reduce((sum, u) => sum + u.completion_tokens, 0)
      expect(generated).toBe(4 + 3 + 5 + longTokens + 2)
      // One sequence at a time and one token per step: a step per generated token, each a batch of one.
      const steps = generated
      // The fake engine's answers grow by one token a step: every token but an answer's first is a growth.
      const growths = generated - usages.length

      const { reply, value } = yield* scrape(url, model)
      expect(reply.headers.get("content-type")).toBe("text/plain; version=0.0.4; charset=utf-8")
      expect(reply.text).toContain("# TYPE vdiff_request_success_total counter")
      expect(reply.text).toContain("# TYPE vdiff_time_to_first_token_seconds histogram")
      expect(reply.text).not.toContain("effect_fiber_")

      expect(value("vdiff_model_ready")).toBe(1)
      // The fake engine's backend: no weights, no caches left, no device memory reported.
      expect(value("vdiff_device_memory_used_bytes", { backend: "cpu", device: "fake" })).toBe(0)
      expect(value("vdiff_device_memory_total_bytes", { backend: "cpu", device: "fake" })).toBe(0)
      expect(value("vdiff_num_requests_running")).toBe(0)
      expect(value("vdiff_num_requests_waiting")).toBe(0)
      expect(value("vdiff_request_success_total", { finished_reason: "length" })).toBe(5)
      expect(value("vdiff_request_failure_total", { error_type: "queue_full" })).toBe(1)
      expect(value("vdiff_prompt_tokens_total")).toBe(promptTokens)
      expect(value("vdiff_generation_tokens_total")).toBe(generated)
      expect(value("vdiff_time_to_first_token_seconds_count")).toBe(5)
      // Each first token came at least one step (10 ms) after its request arrived.
      expect(value("vdiff_time_to_first_token_seconds_sum")!).toBeGreaterThanOrEqual(5 * 0.009)
      expect(value("vdiff_inter_token_latency_seconds_count")).toBe(growths)
      expect(value("vdiff_inter_token_latency_seconds_sum")!).toBeGreaterThanOrEqual(growths * 0.009)
      expect(value("vdiff_e2e_request_latency_seconds_count")).toBe(5)
      expect(value("vdiff_e2e_request_latency_seconds_sum")!).toBeGreaterThanOrEqual(steps * 0.009)
      expect(value("vdiff_request_queue_time_seconds_count")).toBe(5)
      // The queued request waited for most of the long one's steps.
      expect(value("vdiff_request_queue_time_seconds_sum")!).toBeGreaterThan(0.1)
      expect(value("vdiff_denoising_steps_total")).toBe(steps)
      expect(value("vdiff_step_duration_seconds_count")).toBe(steps)
      expect(value("vdiff_step_duration_seconds_sum")!).toBeGreaterThanOrEqual(steps * 0.009)
      expect(value("vdiff_batch_size_count")).toBe(steps)
      expect(value("vdiff_batch_size_sum")).toBe(steps)
      expect(value("vdiff_batch_size_bucket", { le: "1" })).toBe(steps)
      expect(value("vdiff_tokens_per_step_count")).toBe(steps)
      expect(value("vdiff_tokens_per_step_sum")).toBe(generated)
      expect(value("vdiff_tokens_per_step_bucket", { le: "0" })).toBe(0)
      expect(value("vdiff_tokens_per_step_bucket", { le: "1" })).toBe(steps)

      const http = (route: string, status: string, name = "vdiff_http_requests_total") => value(name, { route, method: "POST", status })
      expect(http("/v1/completions", "200")).toBe(4)
      expect(http("/v1/chat/completions", "200")).toBe(1)
      expect(http("/v1/completions", "503")).toBe(1)
      expect(http("/v1/completions", "200", "vdiff_http_request_duration_seconds_count")).toBe(4)
      expect(http("/v1/completions", "200", "vdiff_http_request_duration_seconds_sum")!).toBeGreaterThanOrEqual(
        (4 + 3 + longTokens + 2) * 0.009
      )
      // The scrape itself is the one request in flight.
      expect(value("vdiff_http_requests_in_flight")).toBe(1)

      // 7. a stream whose client goes away: cancelled, and 499 for the HTTP figures; 8. one request over
      // the rate limit: 429, seen by the HTTP figures only (it never reaches the generation route).
      yield* Effect.promise(async () => {
        const abort = new AbortController()
        const response = await fetch(completions, {
          method: "POST",
          headers: { "content-type": "application/json" },
          body: JSON.stringify({ model, prompt: "Hi", max_tokens: 60, seed: 0, stream: true }),
          signal: abort.signal
        })
        await response.body!.getReader().read()
        abort.abort()
      })
      yield* waitFor(url, model, "vdiff_request_failure_total", 1, { error_type: "cancelled" })
      const limited = yield* postJson(completions, { model, prompt: "Hi", max_tokens: 2, seed: 0 })
      expect(limited.status).toBe(429)

      const after = yield* scrape(url, model)
      expect(after.value("vdiff_request_failure_total", { error_type: "cancelled" })).toBe(1)
      expect(after.value("vdiff_request_success_total", { finished_reason: "length" })).toBe(5)
      expect(after.value("vdiff_e2e_request_latency_seconds_count")).toBe(5)
      expect(after.value("vdiff_time_to_first_token_seconds_count")).toBe(6)
      expect(after.value("vdiff_http_requests_total", { route: "/v1/completions", method: "POST", status: "499" })).toBe(1)
      expect(after.value("vdiff_http_requests_total", { route: "/v1/completions", method: "POST", status: "429" })).toBe(1)
      expect(after.value("vdiff_request_failure_total", { error_type: "rate_limit_error" })).toBeUndefined()
      expect(after.value("vdiff_num_requests_running")).toBe(0)
    }).pipe(quiet)
  )

  it.scopedLive("reports the bytes the running sequences' KV caches hold, and frees them when they finish", () =>
    Effect.gen(function* () {
      const model = `kv-${randomUUID().slice(0, 8)}`
      const config = yield* Effect.promise(() => settings(["--served-model-name", model, "--kv-cache", "dual"]))
      const { url } = yield* startServer({ config, load: fakeLoader(config, { stepMs: 10 }) })
      const long = yield* Effect.fork(postJson(url + "/v1/completions", { model, prompt: "Hi", max_tokens: 60, seed: 0 }))
      let held = 0
      for (let tries = 0; tries < 500 && held === 0; tries++) {
        held = (yield* scrape(url, model)).value("vdiff_kv_cache_bytes") ?? 0
        if (held === 0) yield* Effect.sleep(5)
      }
      const reply = yield* long.await
      if (reply._tag !== "Success") throw new Error("the request failed")
      expect(reply.value.json.diffusion.kv_cache).toBe("dual")
      // The fake model's cache takes 64 bytes per canvas position: prompt plus answer.
      expect(held).toBe(64 * (reply.value.json.usage.prompt_tokens + 60))
      yield* waitFor(url, model, "vdiff_kv_cache_bytes", 0)
    }).pipe(quiet)
  )

  it.scopedLive("counts failures by the error's code, a stream's error event included", () =>
    Effect.gen(function* () {
      const model = `failures-${randomUUID().slice(0, 8)}`
      const config = yield* Effect.promise(() => settings(["--served-model-name", model, "--request-timeout", "0.15"]))
      const { url } = yield* startServer({ config, load: fakeLoader(config, { stepMs: 10 }) })
      const completions = url + "/v1/completions"

      const tooLong = yield* postJson(completions, { model, prompt: "Hi", max_tokens: 100_000 })
      expect(tooLong.status).toBe(400)
      expect(tooLong.json.error.code).toBe("context_length_exceeded")
      // The head goes out with the first chunk; the deadline passes mid-stream and ends it with an error event.
      const stream = yield* postJson(completions, { model, prompt: "Hi", max_tokens: 60, seed: 0, stream: true })
      expect(stream.status).toBe(200)
      expect(stream.text).toContain(`"code":"timeout"`)

      const { value } = yield* scrape(url, model)
      expect(value("vdiff_request_failure_total", { error_type: "context_length_exceeded" })).toBe(1)
      expect(value("vdiff_request_failure_total", { error_type: "timeout" })).toBe(1)
      expect(value("vdiff_request_success_total", { finished_reason: "length" })).toBe(0)
      expect(value("vdiff_e2e_request_latency_seconds_count")).toBeUndefined()
      expect(value("vdiff_time_to_first_token_seconds_count")).toBe(1)
      expect(value("vdiff_http_requests_total", { route: "/v1/completions", method: "POST", status: "200" })).toBe(1)
      expect(value("vdiff_http_requests_total", { route: "/v1/completions", method: "POST", status: "400" })).toBe(1)
    }).pipe(quiet)
  )

  it.scopedLive("reports the model as not ready while it loads", () =>
    Effect.gen(function* () {
      const model = `loading-${randomUUID().slice(0, 8)}`
      const config = yield* Effect.promise(() => settings(["--served-model-name", model]))
      const hold = yield* Deferred.make<void>()
      const { url } = yield* startServer({ config, load: fakeLoader(config, { hold }), awaitReady: false })
      expect((yield* scrape(url, model)).value("vdiff_model_ready")).toBe(0)
    }).pipe(quiet)
  )

  it.scopedLive("has the counters at 0 on a fresh server's first scrape, so rate() sees their first increment", () =>
    Effect.gen(function* () {
      const model = `fresh-${randomUUID().slice(0, 8)}`
      const config = yield* Effect.promise(() => settings(["--served-model-name", model]))
      const { url } = yield* startServer({ config, load: fakeLoader(config) })
      const { value } = yield* scrape(url, model)
      expect(value("vdiff_request_success_total", { finished_reason: "stop" })).toBe(0)
      expect(value("vdiff_request_success_total", { finished_reason: "length" })).toBe(0)
      expect(value("vdiff_request_failure_total", { error_type: "queue_full" })).toBe(0)
      expect(value("vdiff_request_failure_total", { error_type: "timeout" })).toBe(0)
      expect(value("vdiff_generation_tokens_total")).toBe(0)
      expect(value("vdiff_prompt_tokens_total")).toBe(0)
      expect(value("vdiff_step_phase_total", { phase: "denoise" })).toBe(0)
      expect(value("vdiff_scored_canvases_total")).toBe(0)
    }).pipe(quiet)
  )

  it.scopedLive("counts the canvases and forwards of scoring requests (guided_choice, echo with logprobs)", () =>
    Effect.gen(function* () {
      const model = `scored-${randomUUID().slice(0, 8)}`
      const config = yield* Effect.promise(() => settings(["--served-model-name", model, "--max-concurrent-requests", "2"]))
      const { url } = yield* startServer({ config, load: fakeLoader(config) })
      const choice = yield* postJson(url + "/v1/completions", { model, prompt: "Hi", guided_choice: ["a", "bc"], temperature: 0 })
      expect(choice.status).toBe(200)
      const canvases = choice.json.diffusion.forward_passes as number
      const echo = yield* postJson(url + "/v1/completions", { model, prompt: "Hello", echo: true, logprobs: 0, max_tokens: 0 })
      expect(echo.status).toBe(200)
      const promptCanvases = (echo.json.usage.prompt_tokens as number) - 1
      const { value } = yield* scrape(url, model)
      expect(value("vdiff_scored_canvases_total")).toBe(canvases + promptCanvases)
      // Forwards of at most 2 canvases (the batch size).
      expect(value("vdiff_score_duration_seconds_count")).toBe(Math.ceil(canvases / 2) + Math.ceil(promptCanvases / 2))
      expect(value("vdiff_denoising_steps_total")).toBe(0)
    }).pipe(quiet)
  )

  it.scopedLive("reports the process: CPU time, resident memory, start time, open files and the V8 heap", () =>
    Effect.gen(function* () {
      const model = `process-${randomUUID().slice(0, 8)}`
      const config = yield* Effect.promise(() => settings(["--served-model-name", model]))
      const { url } = yield* startServer({ config, load: fakeLoader(config) })
      const { value, reply } = yield* scrape(url, model)
      const started = Date.now() / 1000 - process.uptime()
      expect(value("process_cpu_seconds_total")).toBeGreaterThan(0)
      expect(value("process_resident_memory_bytes")).toBeGreaterThan(10 * 2 ** 20)
      expect(Math.abs(value("process_start_time_seconds")! - started)).toBeLessThan(2)
      expect(value("process_open_fds")).toBeGreaterThan(2)
      expect(value("nodejs_heap_size_used_bytes")).toBeGreaterThan(0)
      expect(value("nodejs_heap_size_used_bytes")).toBeLessThanOrEqual(value("nodejs_heap_size_total_bytes")!)
      expect(value("nodejs_external_memory_bytes")).toBeGreaterThan(0)
      expect(reply.text).toContain("# HELP process_resident_memory_bytes Resident memory size in bytes")
      // The CPU time only grows.
      const later = yield* scrape(url, model)
      expect(later.value("process_cpu_seconds_total")).toBeGreaterThanOrEqual(value("process_cpu_seconds_total")!)
    }).pipe(quiet)
  )
})

/** Polls /metrics until the series has the value (the server's fibers run on their own). */
const waitFor = (url: string, model: string, name: string, expected: number, labels: Record<string, string> = {}) =>
  Effect.gen(function* () {
    for (let tries = 0; tries < 500; tries++) {
      if ((yield* scrape(url, model)).value(name, labels) === expected) return
      yield* Effect.sleep(5)
    }
    throw new Error(`${name} ${JSON.stringify(labels)} never reached ${expected}`)
  })
