/** Structured logs: one JSON object per line, the level honoured, trace and span ids inside a span. */
import { diag } from "@opentelemetry/api"
import { InMemorySpanExporter, SimpleSpanProcessor } from "@opentelemetry/sdk-trace-base"
import { describe, expect, it } from "@effect/vitest"
import { Effect } from "effect"
import * as Logging from "../src/server/logging.js"
import * as Telemetry from "../src/telemetry/Telemetry.js"

describe("JSON logs", () => {
  it.effect("writes one object per line: timestamp, level, message, trace ids in a span, then the fields", () => {
    const written: Array<string> = []
    const exporter = new InMemorySpanExporter()
    return Effect.gen(function* () {
      yield* Effect.logDebug("below the level")
      yield* Effect.logInfo("below the level too")
      yield* Effect.logWarning("queue almost full").pipe(Effect.annotateLogs({ request_id: "req-1", waiting: 7 }))
      yield* Effect.logError("in a span").pipe(Effect.withSpan("vdiff.test"))
      yield* Effect.logError("failed", new Error("boom"))

      expect(written.every((chunk) => chunk.endsWith("\n") && chunk.indexOf("\n") === chunk.length - 1)).toBe(true)
      const [warning, inSpan, failed, ...rest] = written.map((line) => JSON.parse(line) as Record<string, unknown>)
      expect(rest).toEqual([])

      expect(Object.keys(warning!)).toEqual(["timestamp", "level", "message", "request_id", "waiting"])
      expect(warning).toEqual({
        timestamp: expect.stringMatching(/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/),
        level: "warn",
        message: "queue almost full",
        request_id: "req-1",
        waiting: 7
      })

      const [span] = exporter.getFinishedSpans()
      expect(span!.name).toBe("vdiff.test")
      expect(Object.keys(inSpan!)).toEqual(["timestamp", "level", "message", "trace_id", "span_id"])
      expect(inSpan).toMatchObject({
        level: "error",
        trace_id: span!.spanContext().traceId,
        span_id: span!.spanContext().spanId
      })

      expect(failed!["message"]).toEqual(["failed", "Error: boom"])
      expect(failed).not.toHaveProperty("trace_id")
    }).pipe(
      Effect.provide(
        Logging.layer(
          "warning",
          Logging.makeJsonLogger((line) => written.push(line))
        )
      ),
      Effect.provide(Telemetry.layer({ spanProcessors: [new SimpleSpanProcessor(exporter)] }))
    )
  })

  it.effect("writes nothing at --log-level none", () => {
    const written: Array<string> = []
    return Effect.logFatal("unseen").pipe(
      Effect.zipRight(Effect.sync(() => expect(written).toEqual([]))),
      Effect.provide(
        Logging.layer(
          "none",
          Logging.makeJsonLogger((line) => written.push(line))
        )
      )
    )
  })

  it.effect("writes what OpenTelemetry reports (a collector it cannot reach) as warnings while tracing", () => {
    const written: Array<string> = []
    return Effect.gen(function* () {
      diag.error("export failed", new Error("connect ECONNREFUSED 127.0.0.1:4318"))
      diag.info("chatter")
      yield* Effect.yieldNow()
      expect(written.map((line) => JSON.parse(line))).toMatchObject([
        { level: "warn", message: ["opentelemetry: export failed", "Error: connect ECONNREFUSED 127.0.0.1:4318"] }
      ])
    }).pipe(
      Effect.provide(Telemetry.layer({ spanProcessors: [new SimpleSpanProcessor(new InMemorySpanExporter())] })),
      Effect.provide(
        Logging.layer(
          "info",
          Logging.makeJsonLogger((line) => written.push(line))
        )
      )
    )
  })
})
