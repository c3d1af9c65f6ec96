/**
 * Server-sent events for `stream: true`: each chunk as `data: {json}\n\n`, then `data: [DONE]\n\n`.
 *
 * The chunk stream is started, and its first chunk awaited, before the response head is sent. So what
 * fails at admission (queue full, draining, a deadline passed in the queue, a request the engine refuses)
 * still gets its own HTTP status; a failure after that becomes a `data: {"error": ...}` event followed by
 * `data: [DONE]`. The body is the scheduler's stream itself, pulled by the response writer in the
 * request's fiber: when the client goes away the server interrupts that fiber, the request's scope
 * closes, and the scheduler cancels the sequences.
 */
import { Headers, HttpServerResponse } from "@effect/platform"
import { Cause, Chunk, Effect, Option, Stream } from "effect"
import { RequestId } from "../api/RequestId.js"
import { errorTypeOf, RequestMetrics } from "../telemetry/requests.js"
import { type ApiError, InternalError, toErrorBody } from "../api/errors.js"

export const sseEvent = (data: unknown): string => `data: ${JSON.stringify(data)}\n\n`

export const SSE_DONE = "data: [DONE]\n\n"

/**
 * How events are written: chat and completions send `data: {json}` lines ending with `data: [DONE]`;
 * the Responses API sends `event: <type>` lines, numbers its events, and has no [DONE].
 */
export interface SseEncoding {
  readonly event: (chunk: unknown) => string
  /** The last event of a stream, after the chunks or after an error event. */
  readonly done: string
  /** The event an error after the response head becomes. */
  readonly error: (error: ApiError, requestId: string) => unknown
}

export const chatEncoding: SseEncoding = {
  event: sseEvent,
  done: SSE_DONE,
  error: (error, requestId) => toErrorBody(error, requestId)
}

export interface SseParts {
  /** Chunks sent first, once the stream is known to have started (e.g. chat's role chunks). */
  readonly preamble: ReadonlyArray<unknown>
  readonly chunks: Stream.Stream<unknown, ApiError>
  /** Chunks sent after `chunks` ended (e.g. the usage chunk); computed then. */
  readonly epilogue: Effect.Effect<ReadonlyArray<unknown>, ApiError>
  /** Default: chat's. */
  readonly encoding?: SseEncoding
}

/** The error a failed stream reports; logged here, since the access log has already seen a 200. */
const apiErrorOf = (cause: Cause.Cause<ApiError>): Effect.Effect<ApiError> =>
  Option.match(Cause.failureOption(cause), {
    onSome: (error) => Effect.logWarning("stream ended with an error event", error._tag, error.message).pipe(Effect.as(error)),
    onNone: () =>
      Effect.logError("stream failed after the response head was sent", cause).pipe(
        Effect.as(new InternalError({ message: "internal error while streaming" }))
      )
  })

/** An SSE response; needs the request's Scope, which the HTTP router provides to handlers. */
export const respondSse = (parts: SseParts) =>
  Effect.gen(function* () {
    const requestId = yield* RequestId
    const metrics = yield* RequestMetrics
    const encoding = parts.encoding ?? chatEncoding
    const pull = yield* Stream.toPull(parts.chunks)
    const first = yield* pull.pipe(
      Effect.map((chunk) => ({ chunk, ended: false })),
      Effect.catchAll(
        Option.match({
          onNone: () => Effect.succeed({ chunk: Chunk.empty<unknown>(), ended: true }),
          onSome: Effect.fail
        })
      )
    )
    const rest = first.ended ? Stream.empty : Stream.repeatEffectChunkOption(pull)
    const body = Stream.fromIterable(parts.preamble).pipe(
      Stream.concat(Stream.fromChunk(first.chunk)),
      Stream.concat(rest),
      Stream.concat(Stream.fromIterableEffect(parts.epilogue)),
      Stream.map(encoding.event),
      Stream.concat(Stream.make(encoding.done)),
      Stream.catchAllCause((cause) =>
        Cause.isInterruptedOnly(cause)
          ? Stream.failCause(cause)
          : Stream.fromEffect(apiErrorOf(cause)).pipe(
              Stream.tap((error) => metrics.failed(errorTypeOf(error))),
              Stream.map((error) => encoding.event(encoding.error(error, requestId))),
              Stream.concat(Stream.make(encoding.done))
            )
      ),
      Stream.encodeText
    )
    return HttpServerResponse.stream(body, {
      contentType: "text/event-stream",
      headers: Headers.fromInput({ "cache-control": "no-cache", "x-accel-buffering": "no" })
    })
  })
