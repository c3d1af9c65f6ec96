/**
 * Traces: the span tree of real requests (in-memory exporter), OTLP/HTTP export to a collector on
 * loopback when an endpoint is configured, no-op spans otherwise, and log lines that carry their trace.
 */
import { randomUUID } from "node:crypto"
import { createServer, type IncomingHttpHeaders } from "node:http"
import { HttpServer } from "@effect/platform"
import { NodeHttpServer } from "@effect/platform-node"
import { InMemorySpanExporter, type ReadableSpan, SimpleSpanProcessor } from "@opentelemetry/sdk-trace-base"
import { describe, expect, it } from "@effect/vitest"
import { ConfigProvider, Context, Effect, Exit, Layer, Logger, LogLevel, Scope } from "effect"
import type * as Config from "../src/config/Config.js"
import { router } from "../src/openai/routes.js"
import { makeJsonLogger } from "../src/server/logging.js"
import { ModelHost } from "../src/server/ModelHost.js"
import * as Server from "../src/server/Server.js"
import * as Telemetry from "../src/telemetry/Telemetry.js"
import { type FakeLoaderOptions, fakeLoader, postJson, request, settings } from "./http-helpers.js"

/** The whole server on 127.0.0.1:0 in `scope`, with the given telemetry (else the configuration's). */
const serve = (config: Config.Settings, scope: Scope.Scope, telemetry?: Layer.Layer<Telemetry.Telemetry>, engine: FakeLoaderOptions = {}) =>
  Effect.gen(function* () {
    const context = yield* Layer.buildWithScope(
      Server.layerApp({
        config,
        api: router,
        load: fakeLoader(config, engine),
        ...(telemetry === undefined ? {} : { telemetry })
      }).pipe(Layer.provideMerge(NodeHttpServer.layer(() => createServer(), { host: "127.0.0.1", port: 0 }))),
      scope
    ).pipe(Effect.orDie)
    const address = Context.get(context, HttpServer.HttpServer).address
    if (address._tag !== "TcpAddress") return yield* Effect.die("expected a TCP address")
    yield* Effect.orDie(Context.get(context, ModelHost).awaitReady)
    return `http://127.0.0.1:${address.port}`
  })

const spanId = (span: ReadableSpan) => span.spanContext().spanId
const parentId = (span: ReadableSpan) => span.parentSpanContext?.spanId

describe("tracing", () => {
  it.scopedLive("records a span per request with queue, prompt and generation spans beneath it", () =>
    Effect.gen(function* () {
      const exporter = new InMemorySpanExporter()
      const lines: Array<Record<string, unknown>> = []
      const logger = makeJsonLogger((line) => lines.push(JSON.parse(line)))
      const model = `traced-${randomUUID().slice(0, 8)}`
      const config = yield* Effect.promise(() => settings(["--served-model-name", model]))
      const telemetry = Telemetry.layer({ spanProcessors: [new SimpleSpanProcessor(exporter)] })
      const url = yield* serve(config, yield* Effect.scope, telemetry).pipe(Effect.provide(Logger.replace(Logger.defaultLogger, logger)))

      // A caller's trace continues in vdiff's spans (W3C traceparent).
      const callerTrace = "4bf92f3577b34da6a3ce929d0e0e4736"
      const completion = yield* postJson(
        url + "/v1/completions",
        { model, prompt: "Hi", max_tokens: 4, seed: 0 },
        {
          traceparent: `00-${callerTrace}-00f067aa0ba902b7-01`
        }
      )
      expect(completion.status).toBe(200)
      const chat = yield* postJson(url + "/v1/chat/completions", {
        model,
        messages: [{ role: "user", content: "Hello" }],
        max_tokens: 3,
        seed: 0
      })
      expect(chat.status).toBe(200)
      const stream = yield* postJson(url + "/v1/completions", { model, prompt: "Hi", max_tokens: 2, seed: 0, stream: true })
      expect(stream.status).toBe(200)
      yield* request(url + "/health")
      yield* request(url + "/health/ready")
      yield* request(url + "/metrics")

      const spans = exporter.getFinishedSpans()
      const named = (name: string) => spans.filter((s) => s.name === name)
      const childrenOf = (parent: ReadableSpan) => spans.filter((s) => parentId(s) === spanId(parent)).map((s) => s.name)

      // Probes and scrapes are left out.
      expect(spans.map((s) => s.name).filter((name) => name.includes("health") || name.includes("metrics"))).toEqual([])

      const [traced, streamed] = named("POST /v1/completions")
      expect(named("POST /v1/completions")).toHaveLength(2)
      expect(traced!.kind).toBe(1) // SERVER
      expect(traced!.spanContext().traceId).toBe(callerTrace)
      expect(parentId(traced!)).toBe("00f067aa0ba902b7")
      expect(traced!.attributes["http.response.status_code"]).toBe(200)
      expect(childrenOf(traced!).sort()).toEqual(["vdiff.generate", "vdiff.queue_wait", "vdiff.tokenize"])
      for (const child of spans.filter((s) => parentId(s) === spanId(traced!))) {
        expect(child.spanContext().traceId).toBe(callerTrace)
      }

      const generate = spans.find((s) => s.name === "vdiff.generate" && parentId(s) === spanId(traced!))!
      expect(generate.attributes).toMatchObject({
        "vdiff.n": 1,
        "vdiff.prompt_tokens": 2,
        "vdiff.gen_length": 4,
        "vdiff.steps": 4,
        "vdiff.tokens_committed": 4
      })
      const tokenize = spans.find((s) => s.name === "vdiff.tokenize" && parentId(s) === spanId(traced!))!
      expect(tokenize.attributes).toMatchObject({ "vdiff.prompts": 1, "vdiff.prompt_tokens": 2 })
      // The wait ends where the generation begins.
      const queueWait = spans.find((s) => s.name === "vdiff.queue_wait" && parentId(s) === spanId(traced!))!
      expect(hrNanos(queueWait.endTime)).toBeLessThanOrEqual(hrNanos(generate.startTime))

      const [chatSpan] = named("POST /v1/chat/completions")
      expect(childrenOf(chatSpan!).sort()).toEqual(["vdiff.generate", "vdiff.queue_wait", "vdiff.render_prompt"])
      const render = spans.find((s) => s.name === "vdiff.render_prompt")!
      expect(render.attributes["vdiff.messages"]).toBe(1)
      expect(render.attributes["vdiff.prompt_tokens"]).toBe(chat.json.usage.prompt_tokens)

      // A stream's span lasts until its last event has gone out, after its generation.
      expect(childrenOf(streamed!).sort()).toEqual(["vdiff.generate", "vdiff.queue_wait", "vdiff.tokenize"])
      const streamGenerate = spans.find((s) => s.name === "vdiff.generate" && parentId(s) === spanId(streamed!))!
      expect(streamGenerate.attributes["vdiff.steps"]).toBe(2)
      expect(hrNanos(streamed!.endTime)).toBeGreaterThanOrEqual(hrNanos(streamGenerate.endTime))

      // The access log line of a traced request names its trace and span.
      const access = lines.filter((l) => l["message"] === "request" && l["path"] === "/v1/completions")
      expect(access[0]).toMatchObject({ trace_id: callerTrace, span_id: spanId(traced!), status: 200 })
      const probe = lines.find((l) => l["message"] === "request" && l["path"] === "/health")!
      expect(probe["trace_id"]).toBeUndefined()
    }).pipe(Effect.provide(Logger.minimumLogLevel(LogLevel.Debug)))
  )

  it.scopedLive("follows a caller's sampling decision: a traceparent flagged not sampled records no spans", () =>
    Effect.gen(function* () {
      const exporter = new InMemorySpanExporter()
      const model = `sampled-${randomUUID().slice(0, 8)}`
      const config = yield* Effect.promise(() => settings(["--served-model-name", model]))
      const url = yield* serve(config, yield* Effect.scope, Telemetry.layer({ spanProcessors: [new SimpleSpanProcessor(exporter)] }))
      const unsampled = "0af7651916cd43dd8448eb211c80319c"
      const sampled = "4bf92f3577b34da6a3ce929d0e0e4736"
      for (const [trace, flags] of [
        [unsampled, "00"],
        [sampled, "01"]
      ] as const) {
        const response = yield* postJson(
          url + "/v1/completions",
          { model, prompt: "Hi", max_tokens: 2, seed: 0 },
          { traceparent: `00-${trace}-00f067aa0ba902b7-${flags}` }
        )
        expect(response.status).toBe(200)
      }
      const untraced = yield* postJson(url + "/v1/completions", { model, prompt: "Hi", max_tokens: 2, seed: 0 })
      expect(untraced.status).toBe(200)
      // A request's server span may end just after its client has the body.
      const tracesNow = () => exporter.getFinishedSpans().map((span) => span.spanContext().traceId)
      for (let i = 0; i < 200 && tracesNow().filter((trace) => trace !== sampled).length < 4; i++) yield* Effect.sleep(10)
      const traces = tracesNow()
      expect(traces.filter((trace) => trace === unsampled)).toEqual([])
      expect(traces.filter((trace) => trace === sampled).length).toBeGreaterThanOrEqual(4) // the request and its children
      // Without a caller's trace, a request is traced as before.
      expect(traces.filter((trace) => trace !== sampled).length).toBeGreaterThanOrEqual(4)
    })
  )

  it.scopedLive("marks 5xx server spans as errors, leaves 4xx unset, and keeps credentials out", () =>
    Effect.gen(function* () {
      const exporter = new InMemorySpanExporter()
      const config = yield* Effect.promise(() => settings(["--request-timeout", "0.2"]))
      const telemetry = Telemetry.layer({ spanProcessors: [new SimpleSpanProcessor(exporter)] })
      const url = yield* serve(config, yield* Effect.scope, telemetry, { stepMs: 20 })

      // Seed 0: no EOS among the first hundred tokens, which would end the answer before its deadline.
      const timedOut = yield* postJson(url + "/v1/completions", { prompt: "Hi", max_tokens: 100, seed: 0 })
      expect(timedOut.status).toBe(504)
      const bad = yield* postJson(
        url + "/v1/completions?api_key=sk-in-query&trace=1",
        { prompt: "Hi", temperature: 9 },
        {
          "api-key": "sk-in-header",
          "proxy-authorization": "Basic c2VjcmV0"
        }
      )
      expect(bad.status).toBe(400)
      const ok = yield* postJson(url + "/v1/completions", { prompt: "Hi", max_tokens: 2 })
      expect(ok.status).toBe(200)

      const spans = exporter.getFinishedSpans().filter((span) => span.name === "POST /v1/completions")
      const byStatus = (code: number) => spans.find((span) => span.attributes["http.response.status_code"] === code)!
      // OpenTelemetry's HTTP conventions: a server's 5xx is an error, a 4xx is the client's and stays unset.
      expect(byStatus(504).status).toMatchObject({ code: 2 }) // ERROR
      expect(byStatus(504).attributes["error.type"]).toBe("504")
      expect(byStatus(400).status.code).toBe(0) // UNSET
      expect(byStatus(400).attributes["error.type"]).toBeUndefined()
      expect(byStatus(200).status.code).toBe(1) // OK
      const exported = JSON.stringify(spans.map((span) => span.attributes))
      expect(exported).not.toMatch(/sk-in-query|sk-in-header|c2VjcmV0/)
      expect(byStatus(400).attributes["url.query"]).toBe("api_key=REDACTED&trace=1")
      expect(byStatus(400).attributes["http.request.header.api-key"]).toBe("REDACTED")
    })
  )

  it.scopedLive("marks the span of a stream whose client went away (the 499 of the metrics): vdiff.client_gone, status unset", () =>
    Effect.gen(function* () {
      const exporter = new InMemorySpanExporter()
      const config = yield* Effect.promise(() => settings())
      const telemetry = Telemetry.layer({ spanProcessors: [new SimpleSpanProcessor(exporter)] })
      const url = yield* serve(config, yield* Effect.scope, telemetry, { stepMs: 20 })
      yield* Effect.promise(async () => {
        const controller = new AbortController()
        const response = await fetch(url + "/v1/completions", {
          method: "POST",
          headers: { "content-type": "application/json" },
          // Seed 0 writes printable text from the first step on, so the first chunk comes at once.
          body: JSON.stringify({ prompt: "Hi", max_tokens: 50, seed: 0, stream: true }),
          signal: controller.signal
        })
        await response.body!.getReader().read()
        controller.abort()
      })
      const ok = yield* postJson(url + "/v1/completions", { prompt: "Hi", max_tokens: 2, stream: true })
      expect(ok.status).toBe(200)
      const spans = () => exporter.getFinishedSpans().filter((span) => span.name === "POST /v1/completions")
      while (spans().length < 2) yield* Effect.sleep(10)
      const [gone, whole] = [...spans()].sort(
        (a, b) => Number(b.attributes["vdiff.client_gone"] === true) - Number(a.attributes["vdiff.client_gone"] === true)
      )
      // What was sent was a 200 head; the response did not go out whole, and not by the server's fault.
      expect(gone!.attributes).toMatchObject({ "http.response.status_code": 200, "vdiff.client_gone": true })
      expect(gone!.status.code).toBe(0) // UNSET
      expect(whole!.attributes["vdiff.client_gone"]).toBeUndefined()
      expect(whole!.status.code).toBe(1) // OK
    })
  )

  it.scopedLive("exports spans over OTLP/HTTP to the configured endpoint", () =>
    Effect.gen(function* () {
      const received: Array<{ method: string; url: string; headers: IncomingHttpHeaders; body: string }> = []
      const collector = createServer((req, res) => {
        const chunks: Array<Buffer> = []
        req.on("data", (chunk: Buffer) => chunks.push(chunk))
        req.on("end", () => {
          received.push({ method: req.method!, url: req.url!, headers: req.headers, body: Buffer.concat(chunks).toString() })
          res.writeHead(200, { "content-type": "application/json" }).end("{}")
        })
      })
      const port = yield* Effect.acquireRelease(
        Effect.async<number>((resume) => {
          collector.listen(0, "127.0.0.1", () => resume(Effect.succeed((collector.address() as { port: number }).port)))
        }),
        () => Effect.async<void>((resume) => void collector.close(() => resume(Effect.void)))
      )
      const model = `otlp-${randomUUID().slice(0, 8)}`
      // Only the base URL is given, as in OTEL_EXPORTER_OTLP_ENDPOINT; /v1/traces is appended.
      const config = yield* Effect.promise(() => settings(["--served-model-name", model, "--otlp-endpoint", `http://127.0.0.1:${port}/`]))
      const scope = yield* Scope.make()
      const url = yield* serve(config, scope)
      const completion = yield* postJson(url + "/v1/completions", { model, prompt: "Hi", max_tokens: 3, seed: 0 })
      expect(completion.status).toBe(200)
      // Spans are batched; closing the server flushes them.
      yield* Scope.close(scope, Exit.void)

      const traces = received.filter((r) => r.method === "POST" && r.url === "/v1/traces")
      expect(traces.length).toBeGreaterThan(0)
      expect(traces[0]!.headers["content-type"]).toContain("application/json")
      const names = traces.flatMap((t) =>
        (JSON.parse(t.body) as OtlpTraces).resourceSpans.flatMap((rs) => rs.scopeSpans.flatMap((ss) => ss.spans.map((s) => s.name)))
      )
      expect(names).toEqual(expect.arrayContaining(["POST /v1/completions", "vdiff.tokenize", "vdiff.queue_wait", "vdiff.generate"]))
      const resource = (JSON.parse(traces[0]!.body) as OtlpTraces).resourceSpans[0]!.resource.attributes
      expect(resource).toContainEqual({ key: "service.name", value: { stringValue: "vdiff" } })

      // OTEL_EXPORTER_OTLP_TRACES_ENDPOINT alone turns tracing on, and is the URL itself (nothing appended).
      received.length = 0
      const signalOnly = yield* Effect.promise(() => settings(["--served-model-name", model]))
      const second = yield* Scope.make()
      const tracedUrl = yield* serve(signalOnly, second).pipe(
        Effect.withConfigProvider(
          ConfigProvider.fromMap(new Map([["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", `http://127.0.0.1:${port}/spans`]]))
        )
      )
      expect((yield* postJson(tracedUrl + "/v1/completions", { model, prompt: "Hi", max_tokens: 2 })).status).toBe(200)
      yield* Scope.close(second, Exit.void)
      expect(received.filter((r) => r.method === "POST").map((r) => r.url)).toContain("/spans")
    }).pipe(Effect.provide(Logger.minimumLogLevel(LogLevel.None)))
  )

  it.effect("is off without an endpoint: spans are no-ops and log lines carry no trace", () =>
    Effect.gen(function* () {
      const lines: Array<Record<string, unknown>> = []
      const telemetry = yield* Telemetry.Telemetry
      expect(telemetry.tracing).toBe(false)
      const span = yield* Effect.currentSpan.pipe(Effect.withSpan("anything"))
      expect(span.sampled).toBe(false)
      yield* Effect.logInfo("inside a span").pipe(
        Effect.withSpan("anything"),
        Effect.provide(
          Logger.replace(
            Logger.defaultLogger,
            makeJsonLogger((line) => lines.push(JSON.parse(line)))
          )
        )
      )
      expect(lines).toHaveLength(1)
      expect(lines[0]).not.toHaveProperty("trace_id")
    }).pipe(Effect.provide(Telemetry.layer({})))
  )
})

interface OtlpTraces {
  readonly resourceSpans: ReadonlyArray<{
    readonly resource: { readonly attributes: ReadonlyArray<unknown> }
    readonly scopeSpans: ReadonlyArray<{ readonly spans: ReadonlyArray<{ readonly name: string }> }>
  }>
}

const hrNanos = ([seconds, nanos]: readonly [number, number]) => BigInt(seconds) * 1_000_000_000n + BigInt(nanos)
