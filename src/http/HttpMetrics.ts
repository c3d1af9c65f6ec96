/**
 * The few HTTP figures the server keeps itself: requests answered by route pattern, method and status, and
 * requests in flight (shutdown waits for these to reach zero). A later telemetry module replaces this with
 * OpenTelemetry metrics; until then /metrics renders these as Prometheus text.
 *
 * @since 0.1.0
 */
import { type HttpApp, HttpServerRequest } from "@effect/platform"
import { Cause, Context, Effect, Exit, Layer } from "effect"
import { pathOf } from "./middleware.js"
import type { RouteTable } from "./routeTable.js"

export interface RequestCount {
  readonly route: string
  readonly method: string
  readonly status: number
  readonly count: number
}

export interface HttpMetricsShape {
  readonly requests: Effect.Effect<ReadonlyArray<RequestCount>>
  readonly inFlight: Effect.Effect<number>
  /** Middleware: counts the request while it runs and once it is answered. */
  readonly count: (routes: RouteTable) => <E, R>(app: HttpApp.Default<E, R>) => HttpApp.Default<E, R>
}

export class HttpMetrics extends Context.Tag("vdiff/HttpMetrics")<HttpMetrics, HttpMetricsShape>() {}

export const make: Effect.Effect<HttpMetricsShape> = Effect.sync(() => {
  const counts = new Map<string, { route: string; method: string; status: number; count: number }>()
  let inFlight = 0
  return {
    requests: Effect.sync(() => [...counts.values()].map((c) => ({ ...c }))),
    inFlight: Effect.sync(() => inFlight),
    count: (routes) => (app) =>
      Effect.flatMap(HttpServerRequest.HttpServerRequest, (request) =>
        Effect.sync(() => inFlight++).pipe(
          Effect.zipRight(app),
          Effect.onExit((exit) =>
            Effect.sync(() => {
              inFlight--
              const status = Exit.isSuccess(exit) ? exit.value.status : Cause.isInterruptedOnly(exit.cause) ? 499 : 500
              // Unknown paths share one label, so clients cannot grow the table.
              const route = routes.find(pathOf(request.url))?.route ?? "unmatched"
              const key = `${route} ${request.method} ${status}`
              const entry = counts.get(key)
              if (entry !== undefined) entry.count++
              else counts.set(key, { route, method: request.method, status, count: 1 })
            })
          )
        ))
  }
})

export const layer: Layer.Layer<HttpMetrics> = Layer.effect(HttpMetrics, make)
