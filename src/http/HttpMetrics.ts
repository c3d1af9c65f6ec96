/**
 * The HTTP figures: requests answered and how long they took, by route pattern, method and status
 * (vdiff_http_requests_total, vdiff_http_request_duration_seconds), and requests in flight
 * (vdiff_http_requests_in_flight; shutdown also waits for these to reach zero). The metrics are Effect
 * Metrics of telemetry/metrics.ts, rendered on GET /metrics.
 *
 * The access log (middleware.ts) times each exchange and watches for the client going away; `record`
 * counts the record it makes, so the two always agree.
 *
 * @since 0.1.0
 */
import type { HttpApp } from "@effect/platform"
import { Context, Effect, Layer, Metric, MetricLabel, Stream, SubscriptionRef } from "effect"
import * as Metrics from "../telemetry/metrics.js"
import type { RequestRecord } from "./middleware.js"
import type { RouteTable } from "./routeTable.js"

export interface HttpMetricsShape {
  /** Requests of this server being answered now. */
  readonly inFlight: Effect.Effect<number>
  /** Waits until no request is being answered. */
  readonly idle: Effect.Effect<void>
  /** Middleware: counts the request as in flight while it runs (for streams: until its end). */
  readonly track: <E, R>(app: HttpApp.Default<E, R>) => HttpApp.Default<E, R>
  /** Counts an answered request and its duration (the access log's `onRecord`). */
  readonly record: (routes: RouteTable) => (record: RequestRecord) => Effect.Effect<void>
}

export class HttpMetrics extends Context.Tag("vdiff/HttpMetrics")<HttpMetrics, HttpMetricsShape>() {}

export const make: Effect.Effect<HttpMetricsShape> = Effect.gen(function* () {
  const inFlight = yield* SubscriptionRef.make(0)
  const add = (delta: number) =>
    SubscriptionRef.update(inFlight, (n) => n + delta).pipe(Effect.zipRight(Metric.incrementBy(Metrics.httpRequestsInFlight, delta)))
  return {
    inFlight: SubscriptionRef.get(inFlight),
    idle: inFlight.changes.pipe(
      Stream.takeUntil((n) => n === 0),
      Stream.runDrain
    ),
    track: (app) =>
      Effect.acquireUseRelease(
        add(1),
        () => app,
        () => add(-1)
      ),
    record: (routes) => (record) => {
      // Unknown paths share one label, so clients cannot grow the series without bound.
      const route = routes.find(record.path)?.route ?? "unmatched"
      const labels = tags({ route, method: record.method, status: String(record.status) })
      return Metric.increment(Metric.taggedWithLabels(Metrics.httpRequests, labels)).pipe(
        Effect.zipRight(Metric.update(Metric.taggedWithLabels(Metrics.httpRequestDuration, labels), record.durationMs / 1000))
      )
    }
  }
})

const tags = (labels: Record<string, string>) => Object.entries(labels).map(([key, value]) => MetricLabel.make(key, value))

export const layer: Layer.Layer<HttpMetrics> = Layer.effect(HttpMetrics, make)
