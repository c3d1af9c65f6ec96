import { Agent, get as httpGet } from "node:http"
import type { Socket } from "node:net"
import { describe, expect, it } from "@effect/vitest"
import { Deferred, Effect, Exit, Fiber, Logger, LogLevel } from "effect"
import { packageInfo } from "../src/config/package.js"
import { router as openaiRouter } from "../src/openai/routes.js"
import * as Server from "../src/server/Server.js"
import { fakeLoader, postJson, request, settings, startServer } from "./http-helpers.js"

const quiet = Effect.provide(Logger.minimumLogLevel(LogLevel.None))

const modelName = (url: string) => Effect.map(request(url + "/v1/models"), (r) => r.json.data[0].id as string)

/**
 * An SSE response read as it arrives: `events` fills with each `data: ...` payload. (The fake engine
 * commits token (prompt[0] + seed + position) % 1000 at step position+1; with prompt "Hi" and seed 0 those
 * are printable ASCII bytes of the test tokenizer, so a text chunk comes out at every step.)
 */
const openStream = (url: string, body: unknown) =>
  Effect.promise(async () => {
    const response = await fetch(url + "/v1/completions", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(body)
    })
    const reader = response.body!.getReader()
    const decoder = new TextDecoder()
    const events: Array<string> = []
    let buffer = ""
    const pull = async (): Promise<boolean> => {
      const { done, value } = await reader.read()
      if (done) return false
      buffer += decoder.decode(value, { stream: true })
      for (let end = buffer.indexOf("\n\n"); end >= 0; end = buffer.indexOf("\n\n")) {
        events.push(buffer.slice(0, end).replace(/^data: /, ""))
        buffer = buffer.slice(end + 2)
      }
      return true
    }
    return {
      status: response.status,
      headers: response.headers,
      events,
      /** Reads until at least `count` events have come (or the stream ended). */
      waitFor: (count: number) =>
        Effect.promise(async () => {
          while (events.length < count && (await pull()));
        }),
      /** Reads to the end. */
      rest: Effect.promise(async () => {
        while (await pull());
        return events
      })
    }
  })

describe("while the model loads", () => {
  it.scopedLive("answers liveness, reports loading, and refuses API work with 503 until it is ready", () =>
    Effect.gen(function* () {
      const config = yield* Effect.promise(() => settings())
      const hold = yield* Deferred.make<void>()
      const { url, host } = yield* startServer({ config, load: fakeLoader(config, { hold }), awaitReady: false })

      expect(yield* request(url + "/health/live")).toMatchObject({ status: 200, json: { status: "alive" } })

      const ready = yield* request(url + "/health/ready")
      expect(ready.status).toBe(503)
      expect(ready.headers.get("retry-after")).toBe("5")
      expect(ready.json.error).toMatchObject({ type: "service_unavailable_error", code: "model_not_ready" })

      const health = yield* request(url + "/health")
      expect(health.status).toBe(200)
      expect(health.json).toEqual({
        status: "degraded",
        state: "loading",
        model: config.model.split("/").at(-1),
        backend: null,
        memory: {
          rss_bytes: expect.any(Number),
          heap_used_bytes: expect.any(Number),
          heap_total_bytes: expect.any(Number),
          external_bytes: expect.any(Number),
          array_buffers_bytes: expect.any(Number),
          weight_bytes: null
        },
        queue: { waiting: 0, capacity: 64, running: 0 },
        uptime_s: expect.any(Number)
      })

      const completion = yield* postJson(url + "/v1/completions", { model: "any", prompt: "Hi", max_tokens: 2 })
      expect(completion.status).toBe(503)
      expect(completion.headers.get("retry-after")).toBe("5")
      expect(completion.json.error.code).toBe("model_not_ready")
      expect((yield* request(url + "/v1/models")).status).toBe(503)
      expect((yield* request(url + "/v1/engine/stats")).status).toBe(503)
      expect((yield* request(url + "/metrics")).text).toMatch(/\nvdiff_model_ready\{model_name="[^"]+"\} 0\n/)

      yield* Deferred.succeed(hold, undefined)
      yield* host.awaitReady

      expect(yield* request(url + "/health/ready")).toMatchObject({ status: 200, json: { status: "ready" } })
      expect((yield* request(url + "/health")).json).toMatchObject({ status: "healthy", state: "ready" })
      const name = yield* modelName(url)
      const done = yield* postJson(url + "/v1/completions", { model: name, prompt: "Hi", max_tokens: 2 })
      expect(done.status).toBe(200)
      expect(done.json.choices[0].finish_reason).toBe("length")
      expect((yield* request(url + "/metrics")).text).toMatch(/\nvdiff_model_ready\{model_name="[^"]+"\} 1\n/)
    }).pipe(quiet)
  )

  it.scopedLive("reports a model that failed to load as unhealthy, and refuses work", () =>
    Effect.gen(function* () {
      const config = yield* Effect.promise(() => settings())
      const { url, host } = yield* startServer({
        config,
        load: fakeLoader(config, { fail: "weights are corrupt" }),
        awaitReady: false
      })
      expect(Exit.isFailure(yield* Effect.exit(host.awaitReady))).toBe(true)
      const health = yield* request(url + "/health")
      expect(health.status).toBe(503)
      expect(health.json).toMatchObject({ status: "unhealthy", state: "error", error: "weights are corrupt" })
      const ready = yield* request(url + "/health/ready")
      expect(ready.status).toBe(503)
      expect(ready.json.error.code).toBe("model_load_failed")
      expect(ready.json.error.message).toContain("weights are corrupt")
      expect((yield* postJson(url + "/v1/completions", { model: "m", prompt: "x" })).status).toBe(503)
      expect((yield* request(url + "/health/live")).status).toBe(200)
    }).pipe(quiet)
  )
})

describe("system endpoints", () => {
  it.scopedLive("/version, /v1/engine/stats and /metrics", () =>
    Effect.gen(function* () {
      // Metrics are process-wide: a model name of its own keeps this test's series apart.
      const config = yield* Effect.promise(() =>
        settings(["--max-concurrent-requests", "4", "--max-queue-size", "9", "--served-model-name", "system-endpoints"])
      )
      const { url } = yield* startServer({ config })

      expect((yield* request(url + "/version")).json).toEqual({
        name: "vdiff",
        version: packageInfo().version,
        node: process.version,
        effect: expect.stringMatching(/^3\.\d+\.\d+$/)
      })

      const name = yield* modelName(url)
      yield* postJson(url + "/v1/completions", { model: name, prompt: "Hi", max_tokens: 5, n: 2 })
      const stats = yield* request(url + "/v1/engine/stats")
      expect(stats.status).toBe(200)
      expect(stats.json).toEqual({
        model: name,
        backend: { name: "cpu", device: "fake", gemm: "none", memory_used_bytes: 0, memory_total_bytes: 0 },
        state: "ready",
        scheduler: {
          waiting: 0,
          running: 0,
          running_sequences: 0,
          queue_capacity: 9,
          max_concurrent: 4,
          draining: false,
          steps_total: 5,
          sequence_steps_total: 10,
          tokens_committed: 10,
          requests_finished: 1,
          cancelled_total: 0,
          steps_after_cancel_max: 0,
          average_batch_size: 2,
          average_tokens_per_step: 1
        },
        engine: {
          live_sequences: 0,
          weight_dtype: "f32",
          parameters: 0,
          weight_bytes: 0,
          max_sequence_length: 4096,
          vocab_size: 1000,
          layers: 1,
          d_model: 8
        }
      })

      yield* request(url + "/no/such/path")
      yield* request(url + "/no/other/path")
      const metrics = yield* request(url + "/metrics")
      expect(metrics.headers.get("content-type")).toBe("text/plain; version=0.0.4; charset=utf-8")
      const lines = metrics.text.split("\n")
      const labels = `model_name="${name}"`
      expect(lines).toContain(`vdiff_http_requests_total{route="/v1/completions",method="POST",status="200",${labels}} 1`)
      expect(lines).toContain(`vdiff_http_requests_total{route="/v1/models",method="GET",status="200",${labels}} 1`)
      // Unknown paths share one label.
      expect(lines).toContain(`vdiff_http_requests_total{route="unmatched",method="GET",status="404",${labels}} 2`)
      expect(lines).toContain(`vdiff_denoising_steps_total{${labels}} 5`)
      expect(lines).toContain(`vdiff_tokens_per_step_sum{${labels}} 10`)
      expect(lines).toContain("# TYPE vdiff_http_requests_total counter")
    }).pipe(quiet)
  )
})

describe("draining", () => {
  it.scopedLive("refuses new work with 503 while in-flight streams finish", () =>
    Effect.gen(function* () {
      const config = yield* Effect.promise(() => settings())
      const { url, host } = yield* startServer({ config, load: fakeLoader(config, { stepMs: 15 }) })
      const name = yield* modelName(url)
      const stream = yield* openStream(url, { model: name, prompt: "Hi", max_tokens: 40, seed: 0, stream: true })
      expect(stream.status).toBe(200)
      // A stream carries the same headers as any response.
      expect(stream.headers.get("content-type")).toContain("text/event-stream")
      expect(stream.headers.get("x-request-id")).toMatch(/^[0-9a-f]{32}$/)
      expect(stream.headers.get("x-content-type-options")).toBe("nosniff")
      yield* stream.waitFor(1)

      const drain = yield* Effect.fork(host.drain(30_000))
      expect(stream.events).not.toContain("[DONE]")
      yield* Effect.sleep(20)
      const ready = yield* request(url + "/health/ready")
      expect(ready.status).toBe(503)
      expect(ready.json.error.code).toBe("draining")
      expect((yield* request(url + "/health")).json).toMatchObject({ status: "degraded", state: "draining" })
      const refused = yield* postJson(url + "/v1/completions", { model: name, prompt: "Hi", max_tokens: 2 })
      expect(refused.status).toBe(503)
      expect(refused.json.error.code).toBe("draining")
      expect(refused.headers.get("retry-after")).not.toBeNull()
      // While draining, every response closes its connection: a pooled client sends its next request elsewhere.
      expect(refused.headers.get("connection")).toBe("close")
      expect(ready.headers.get("connection")).toBe("close")

      const events = yield* stream.rest
      expect(events.at(-1)).toBe("[DONE]")
      expect(JSON.parse(events.at(-2)!).choices[0].finish_reason).toBe("length")
      expect(events.some((e) => e.includes(`"error"`))).toBe(false)
      yield* Fiber.join(drain)
    }).pipe(quiet)
  )

  it.scopedLive("ends the streams still running at the shutdown timeout with an error event", () =>
    Effect.gen(function* () {
      const config = yield* Effect.promise(() => settings())
      const { url, host } = yield* startServer({ config, load: fakeLoader(config, { stepMs: 15 }) })
      const name = yield* modelName(url)
      const stream = yield* openStream(url, { model: name, prompt: "Hi", max_tokens: 200, seed: 0, stream: true })
      yield* stream.waitFor(1)
      yield* host.drain(50)
      const events = yield* stream.rest
      expect(events.at(-1)).toBe("[DONE]")
      const error = JSON.parse(events.at(-2)!)
      expect(error.error).toMatchObject({ type: "service_unavailable_error", code: "draining" })
      // It ended long before its 200 steps.
      expect(events.length).toBeLessThan(50)
    }).pipe(quiet)
  )
})

/**
 * One GET on `agent`'s pooled connection: its status, how the connection ended instead of an answer, or
 * "unanswered" when neither happened within 2 s.
 */
const getOn = (agent: Agent, url: string): Promise<number | string> =>
  new Promise((resolve) => {
    const req = httpGet(url, { agent, timeout: 2000 }, (res) => {
      res.resume()
      res.on("end", () => resolve(res.statusCode ?? 0))
    })
    req.on("timeout", () => {
      resolve("unanswered")
      req.destroy()
    })
    req.on("error", (error: NodeJS.ErrnoException) => resolve(error.code ?? error.message))
  })

describe("Server.run's shutdown", () => {
  it.live("answers or closes a pooled keep-alive connection until the server has closed, never leaving a request unanswered", () =>
    Effect.gen(function* () {
      const config = yield* Effect.promise(() => settings(["--host", "127.0.0.1", "--shutdown-timeout", "5"]))
      // The model's release takes a second, as a large model's can: the server must not stop answering
      // while it runs.
      const load = Effect.zipLeft(
        fakeLoader(config),
        Effect.addFinalizer(() => Effect.sleep(1000))
      )
      const address = yield* Deferred.make<string>()
      const logger = Logger.make(({ message }) => {
        const text = String(Array.isArray(message) ? message[0] : message)
        const match = /^vdiff ready on (\S+):/.exec(text)
        if (match !== null) Deferred.unsafeDone(address, Exit.succeed(match[1]!))
      })
      const server = yield* Effect.fork(
        Server.run({ config, api: openaiRouter, load }).pipe(Effect.provide(Logger.replace(Logger.defaultLogger, logger)))
      )
      const url = yield* Deferred.await(address)
      const agent = new Agent({ keepAlive: true, maxSockets: 1 })
      const sockets = new Set<Socket>()
      agent.on("free", (socket) => sockets.add(socket))
      expect(yield* Effect.promise(() => getOn(agent, url + "/health/live"))).toBe(200)
      expect(sockets.size).toBe(1)

      // SIGTERM under runMain interrupts run; meanwhile the pooled connection keeps sending.
      const stopped = yield* Effect.fork(Fiber.interrupt(server))
      const outcomes: Array<number | string> = []
      const started = Date.now()
      while (Date.now() - started < 4000 && (yield* Fiber.poll(stopped))._tag === "None") {
        // Each request gets an answer or sees its connection end; none waits unanswered.
        const outcome = yield* Effect.promise(() => getOn(agent, url + "/health/live"))
        outcomes.push(outcome)
        if (typeof outcome === "string") break
        yield* Effect.sleep(10)
      }
      // The server closed the pooled connection and ended its life soon after the drain.
      yield* Fiber.join(stopped).pipe(Effect.timeout(4000), Effect.orDie)
      expect(Date.now() - started).toBeLessThan(4000)
      expect(outcomes.length).toBeGreaterThan(0)
      expect(
        outcomes.every((o) => o === 200 || o === "ECONNRESET" || o === "ECONNREFUSED" || o === "EPIPE"),
        String(outcomes)
      ).toBe(true)
      expect(
        [...sockets].every((socket) => socket.destroyed),
        "the pooled connection is closed"
      ).toBe(true)
      agent.destroy()
    })
  )
})
