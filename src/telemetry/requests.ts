/**
 * The metrics of one generation request, from the route that takes it to its last byte.
 *
 * `tracked(handler)` wraps a route handler: it starts the request's clock and gives the handler a
 * RequestMetrics, which the serving code tells what happens to the answers (a committed prefix grew, a
 * prompt's answers all ended, the request failed). When the request's scope closes — after the response
 * has gone out, streams included — the request is settled once:
 *
 *   failed               → vdiff_request_failure_total{error_type}
 *   answers left unended → vdiff_request_failure_total{error_type="cancelled"} (the client went away)
 *   otherwise            → vdiff_e2e_request_latency_seconds
 *
 * and, as they happen: time to first token (the first answer's prefix growing, or ending, in the
 * request), inter-token latency (each later growth of the same answer's prefix, once per growth however
 * many tokens it adds), successes by finished_reason and the usage's prompt and generation tokens (when a
 * prompt's answers have all ended).
 *
 * @since 0.1.0
 */
import { Cause, Clock, Context, Effect, Metric, Option, type Scope } from "effect"
import * as Metrics from "./metrics.js"

/** A prompt's answers, all ended. */
export interface Answered {
  readonly promptTokens: number
  /** The usage's completion tokens of the prompt's answers, together. */
  readonly generationTokens: number
  /** One per answer: stop, length. */
  readonly finishReasons: ReadonlyArray<string>
}

export interface RequestMetricsShape {
  /** `answers` more answers are being generated. */
  readonly started: (answers: number) => Effect.Effect<void>
  /** The committed prefix of `answer` (any object that stands for it) grew, or the answer ended. */
  readonly advanced: (answer: object) => Effect.Effect<void>
  readonly answered: (answers: Answered) => Effect.Effect<void>
  /** The request failed; the first failure is the one counted. */
  readonly failed: (errorType: string) => Effect.Effect<void>
}

export class RequestMetrics extends Context.Tag("vdiff/RequestMetrics")<RequestMetrics, RequestMetricsShape>() {}

/** The label of an API error: its code when it has one ("queue_full"), else its type. */
export const errorTypeOf = (error: { readonly code: string | null; readonly type: string }): string => error.code ?? error.type

/** A fresh RequestMetrics and the effect that settles it (see the module comment). */
export const make = Effect.gen(function* () {
  const arrived = yield* Clock.currentTimeNanos
  let failure: string | undefined
  let unended = 0
  let answeredAny = false
  let firstTokenSeen = false
  const lastGrowth = new Map<object, bigint>()

  const shape: RequestMetricsShape = {
    started: (answers) => Effect.sync(() => void (unended += answers)),
    advanced: (answer) =>
      Effect.gen(function* () {
        const now = yield* Clock.currentTimeNanos
        if (!firstTokenSeen) {
          firstTokenSeen = true
          yield* Metric.update(Metrics.timeToFirstToken, Metrics.secondsBetween(arrived, now))
        }
        const previous = lastGrowth.get(answer)
        if (previous !== undefined) {
          yield* Metric.update(Metrics.interTokenLatency, Metrics.secondsBetween(previous, now))
        }
        lastGrowth.set(answer, now)
      }),
    answered: (answers) =>
      Effect.gen(function* () {
        unended -= answers.finishReasons.length
        answeredAny = true
        for (const reason of answers.finishReasons) {
          yield* Metric.increment(Metric.tagged(Metrics.requestSuccess, "finished_reason", reason))
        }
        yield* Metric.incrementBy(Metrics.promptTokens, answers.promptTokens)
        yield* Metric.incrementBy(Metrics.generationTokens, answers.generationTokens)
      }),
    failed: (errorType) => Effect.sync(() => void (failure ??= errorType))
  }

  const settle = Effect.gen(function* () {
    const errorType = failure ?? (unended > 0 ? "cancelled" : undefined)
    if (errorType !== undefined) {
      yield* Metric.increment(Metric.tagged(Metrics.requestFailure, "error_type", errorType))
    } else if (answeredAny) {
      yield* Metric.update(Metrics.e2eRequestLatency, Metrics.secondsBetween(arrived, yield* Clock.currentTimeNanos))
    }
  })

  return { metrics: shape, settle }
})

/**
 * Runs a generation route's handler with a RequestMetrics, counting its failure (`errorType` names it)
 * and settling the request when the request's scope closes. Finalizers run with the fiber-local settings
 * of when they were added, so what is counted then keeps the metric labels the request had.
 */
export const tracked = <A, E, R>(
  handler: Effect.Effect<A, E, R>,
  errorType: (error: E) => string
): Effect.Effect<A, E, Exclude<R, RequestMetrics> | Scope.Scope> =>
  Effect.gen(function* () {
    const { metrics, settle } = yield* make
    yield* Effect.addFinalizer(() => settle)
    return yield* handler.pipe(
      Effect.tapErrorCause((cause) =>
        Option.match(Cause.failureOption(cause), {
          onSome: (error) => metrics.failed(errorType(error)),
          // Interrupted (the client went away) is settled as cancelled; a defect is a server error.
          onNone: () => (Cause.isInterruptedOnly(cause) ? Effect.void : metrics.failed("internal_error"))
        })
      ),
      Effect.provideService(RequestMetrics, metrics)
    )
  })
