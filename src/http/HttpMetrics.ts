/**
 * The HTTP figures: requests answered and how long they took, by route pattern, method and status
 * (vdiff_http_requests_total, vdiff_http_request_duration_seconds), and requests in flight
 * (vdiff_http_requests_in_flight; shutdown also waits for these to reach zero). The metrics are Effect
 * Metrics of telemetry/metrics.ts, rendered on GET /metrics.
 *
 * @since 0.1.0
 */
import { type HttpApp, HttpServerRequest } from "@effect/platform"
import { Clock, Context, Effect, Layer, Metric, MetricLabel } from "effect"
import * as Metrics from "../telemetry/metrics.js"
import { exchangeStatus, pathOf, watchClientGone } from "./middleware.js"
import type { RouteTable } from "./routeTable.js"

export interface HttpMetricsShape {
  /** Requests of this server being answered now. */
  readonly inFlight: Effect.Effect<number>
  /** Middleware: counts the request while it runs and once it is answered (for streams: its end). */
  readonly count: (routes: RouteTable) => <E, R>(app: HttpApp.Default<E, R>) => HttpApp.Default<E, R>
}

export class HttpMetrics extends Context.Tag("vdiff/HttpMetrics")<HttpMetrics, HttpMetricsShape>() {}

export const make: Effect.Effect<HttpMetricsShape> = Effect.sync(() => {
  let inFlight = 0
  return {
    inFlight: Effect.sync(() => inFlight),
    count: (routes) => (app) =>
      Effect.flatMap(HttpServerRequest.HttpServerRequest, (request) =>
        Effect.gen(function*() {
          const started = yield* Clock.currentTimeNanos
          const clientGone = yield* watchClientGone(request)
          inFlight++
          yield* Metric.increment(Metrics.httpRequestsInFlight)
          return yield* app.pipe(
            Effect.onExit((exit) =>
              Effect.gen(function*() {
                inFlight--
                yield* Metric.incrementBy(Metrics.httpRequestsInFlight, -1)
                const status = exchangeStatus(exit, clientGone())
                // Unknown paths share one label, so clients cannot grow the series without bound.
                const route = routes.find(pathOf(request.url))?.route ?? "unmatched"
                const labels = { route, method: request.method, status: String(status) }
                yield* Metric.increment(Metric.taggedWithLabels(Metrics.httpRequests, tags(labels)))
                yield* Metric.update(
                  Metric.taggedWithLabels(Metrics.httpRequestDuration, tags(labels)),
                  Metrics.secondsBetween(started, yield* Clock.currentTimeNanos)
                )
              })
            )
          )
        }))
  }
})

const tags = (labels: Record<string, string>) =>
  Object.entries(labels).map(([key, value]) => MetricLabel.make(key, value))

export const layer: Layer.Layer<HttpMetrics> = Layer.effect(HttpMetrics, make)
