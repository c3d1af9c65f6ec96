/**
 * The HTTP middleware of the server, each a function from an HttpApp to an HttpApp. Server.ts applies
 * them in this order, outermost first: request id · access log (which hands each exchange's record to
 * the request counters of HttpMetrics.ts) · requests in flight (HttpMetrics.ts) · errors → responses (errorResponses.ts) · security headers · CORS · body size limit · failed-auth limit
 * (RateLimiter.ts) · auth (auth.ts) · rate limit (RateLimiter.ts) · router. Headers that every response
 * must carry — errors included — are added with pre-response handlers, which run on whatever response
 * finally goes out.
 *
 * @since 0.1.0
 */
import { randomUUID } from "node:crypto"
import type { IncomingMessage } from "node:http"
import { HttpApp, HttpIncomingMessage, HttpServerRequest, HttpServerResponse, UrlParams } from "@effect/platform"
import { RequestError } from "@effect/platform/HttpServerError"
import { NodeHttpServerRequest } from "@effect/platform-node"
import { Cause, Clock, Effect, Exit, Inspectable, Option, Stream } from "effect"
import { BadRequest, Forbidden, PayloadTooLarge } from "../api/errors.js"
import { RequestId } from "../api/RequestId.js"

/** The path of a request URL, without the query string. */
export const pathOf = (url: string): string => {
  const q = url.indexOf("?")
  return q < 0 ? url : url.slice(0, q)
}

/**
 * Paths anyone may call without an API key and without counting against a rate limit: probes, version,
 * metrics (scrapers) and the static page at GET /.
 */
const publicPaths: ReadonlySet<string> = new Set(["/health", "/health/live", "/health/ready", "/version", "/metrics"])

export const isPublic = (request: HttpServerRequest.HttpServerRequest): boolean => {
  const path = pathOf(request.url)
  return publicPaths.has(path) || (path === "/" && (request.method === "GET" || request.method === "HEAD"))
}

/**
 * The client's address: the peer's, or with `trustProxy` the first (original client's) address of
 * X-Forwarded-For, which any client can forge, so only behind a proxy that sets it.
 */
export const clientAddress = (request: HttpServerRequest.HttpServerRequest, trustProxy: boolean): string => {
  if (trustProxy) {
    const forwarded = request.headers["x-forwarded-for"]?.split(",")[0]?.trim()
    if (forwarded !== undefined && forwarded !== "") return forwarded
  }
  return Option.getOrElse(request.remoteAddress, () => "unknown")
}

const setHeaders = (headers: Record<string, string>) =>
  HttpApp.appendPreResponseHandler((_request, response) => Effect.succeed(HttpServerResponse.setHeaders(response, headers)))

// --- request id ---------------------------------------------------------------------------------------

const saneRequestId = /^[A-Za-z0-9._-]{1,128}$/

/**
 * Takes a sane incoming X-Request-ID (letters, digits, `._-`, at most 128) or makes one; provides it as
 * RequestId to everything inside, echoes it on the response and annotates every log line with it.
 */
export const requestId = <E, R>(app: HttpApp.Default<E, R>): HttpApp.Default<E, Exclude<R, RequestId>> =>
  Effect.flatMap(HttpServerRequest.HttpServerRequest, (request) => {
    const incoming = request.headers["x-request-id"]
    const id = incoming !== undefined && saneRequestId.test(incoming) ? incoming : randomUUID().replace(/-/g, "")
    return setHeaders({ "x-request-id": id }).pipe(
      Effect.zipRight(app),
      Effect.provideService(RequestId, id),
      Effect.annotateLogs("request_id", id)
    )
  })

// --- access log ---------------------------------------------------------------------------------------

/**
 * Starts watching for the client going away before its response is complete; the function answers
 * whether it has. The status alone cannot tell for a stream: when its client goes away the platform ends
 * the exchange as though the response had gone out, with the response's own status.
 */
const watchClientGone = (request: HttpServerRequest.HttpServerRequest): Effect.Effect<() => boolean> =>
  Effect.sync(() => {
    let gone = false
    const response = NodeHttpServerRequest.toServerResponse(request)
    response.once("close", () => {
      gone = !response.writableEnded
    })
    return () => gone
  })

/** The status an exchange ended with: 499 when the client went away, 500 for a failure nothing answered. */
const exchangeStatus = (exit: Exit.Exit<HttpServerResponse.HttpServerResponse, unknown>, clientGone: boolean) =>
  clientGone || (Exit.isFailure(exit) && Cause.isInterruptedOnly(exit.cause)) ? 499 : Exit.isSuccess(exit) ? exit.value.status : 500

/** What the access log and the request counters learn about each answered request. */
export interface RequestRecord {
  readonly method: string
  readonly path: string
  /** 499 when the client went away before the response was complete. */
  readonly status: number
  /** From the request's arrival to the response's end, unrounded. */
  readonly durationMs: number
  readonly client: string
}

/**
 * One structured log line per request once its response is complete (for streams: when the stream ends),
 * through Effect's logger: method, path, status, duration, client (request_id comes from the annotation).
 * Never logs headers, so neither the Authorization header nor keys appear. `onRecord` also receives each
 * record (the request counters of HttpMetrics.ts), so the exchange is timed and watched in one place.
 */
export const accessLog =
  (options: {
    readonly trustProxy: boolean
    readonly onRecord?: (record: RequestRecord) => Effect.Effect<void>
    /**
     * Requests whose successful answers are logged at debug level, not info: probes and scrapes, which a
     * Kubernetes Deployment and Prometheus send several times a minute. Their failures stay at info.
     */
    readonly routine?: (request: HttpServerRequest.HttpServerRequest) => boolean
  }) =>
  <E, R>(app: HttpApp.Default<E, R>): HttpApp.Default<E, R> =>
    Effect.gen(function* () {
      const request = yield* HttpServerRequest.HttpServerRequest
      const started = yield* Clock.currentTimeNanos
      const clientGone = yield* watchClientGone(request)
      return yield* app.pipe(
        Effect.onExit((exit) =>
          Effect.gen(function* () {
            const record: RequestRecord = {
              method: request.method,
              path: pathOf(request.url),
              status: exchangeStatus(exit, clientGone()),
              durationMs: Number((yield* Clock.currentTimeNanos) - started) / 1e6,
              client: clientAddress(request, options.trustProxy)
            }
            // The request's span (the server span, when traced) says so too: its status code is what was
            // sent (a stream's 200), which alone reads as a success (telemetry/serverSpans.ts).
            if (record.status === 499) yield* Effect.annotateCurrentSpan("vdiff.client_gone", true)
            const routine = record.status < 400 && options.routine?.(request) === true
            yield* (routine ? Effect.logDebug("request") : Effect.logInfo("request")).pipe(
              Effect.annotateLogs({
                method: record.method,
                path: record.path,
                status: record.status,
                duration_ms: Math.round(record.durationMs * 1000) / 1000,
                client: record.client
              })
            )
            if (options.onRecord !== undefined) yield* options.onRecord(record)
          })
        )
      )
    })

// --- security headers ---------------------------------------------------------------------------------

/**
 * Sent on every response. X-XSS-Protection is "0": the browsers' XSS auditors are gone or were themselves
 * a source of leaks, and current advice (OWASP, MDN) is to turn them off explicitly. HSTS only has an
 * effect when the server is reached over HTTPS (behind a TLS proxy); browsers ignore it on plain HTTP.
 */
export const securityHeaderValues: Readonly<Record<string, string>> = {
  "x-content-type-options": "nosniff",
  "x-frame-options": "DENY",
  "x-xss-protection": "0",
  "strict-transport-security": "max-age=31536000; includeSubDomains"
}

export const securityHeaders = <E, R>(app: HttpApp.Default<E, R>): HttpApp.Default<E, R> =>
  Effect.zipRight(setHeaders(securityHeaderValues), app)

// --- CORS ---------------------------------------------------------------------------------------------

const corsMethods = "GET, POST, OPTIONS"
const corsDefaultHeaders = "authorization, content-type, x-request-id"
/** Response headers a browser script may read. */
const corsExposed = "x-request-id, retry-after, x-ratelimit-limit, x-ratelimit-remaining, x-ratelimit-reset"

/**
 * Cross-origin access for the origins given (`*`: any). With none, no response carries CORS headers, so
 * browsers keep other origins out. A preflight (OPTIONS with Origin and Access-Control-Request-Method) is
 * answered here, before auth (browsers send preflights without credentials): 204 for an allowed origin,
 * 403 otherwise. A POST from a page of an origin not allowed that is not JSON (a form, plain text: what a
 * page can send without a preflight) is refused the same way.
 *
 * Why not @effect/platform's HttpMiddleware.cors (0.97): it answers every OPTIONS request with 204, for
 * any origin and before anything else, where a preflight from an origin not allowed gets a 403 with the
 * API's error body here; with no origins given it allows every origin (`*`), where here none is the safe
 * default; and with one origin it sends that origin to every client. Keep this one unless those change.
 */
/** Whether a Content-Type header names JSON (application/json, or a `+json` type), parameters aside. */
const isJson = (contentType: string | undefined) => {
  const type = (contentType ?? "").split(";")[0]!.trim().toLowerCase()
  return type === "application/json" || (type.startsWith("application/") && type.endsWith("+json"))
}

export const cors = (allowedOrigins: ReadonlyArray<string>) => {
  const anyOrigin = allowedOrigins.includes("*")
  const allowed = (origin: string) => anyOrigin || allowedOrigins.includes(origin)
  // With a list, the answer depends on Origin, so caches must key on it.
  const vary: Record<string, string> = allowedOrigins.length > 0 && !anyOrigin ? { vary: "Origin" } : {}
  return <E, R>(app: HttpApp.Default<E, R>): HttpApp.Default<E | Forbidden, R> =>
    Effect.gen(function* () {
      const request = yield* HttpServerRequest.HttpServerRequest
      const origin = request.headers["origin"]
      const preflight =
        request.method === "OPTIONS" && origin !== undefined && request.headers["access-control-request-method"] !== undefined
      if (origin === undefined || !allowed(origin)) {
        if (preflight) {
          return yield* new Forbidden({
            message: `cross-origin requests from ${origin} are not allowed`,
            code: "origin_not_allowed"
          })
        }
        // A page may send a form or plain text anywhere without asking first (no preflight): the browser
        // hides the answer, but the server would still run it. So a POST from a page whose origin is not
        // allowed must be JSON, which browsers ask about first (and the preflight above refuses). The
        // playground, served from this server, sends JSON; clients that are not browsers send no Origin.
        if (origin !== undefined && request.method === "POST" && !isJson(request.headers["content-type"])) {
          return yield* new Forbidden({
            message:
              `cross-origin requests from ${origin} are not allowed: a page's POST must be sent as ` + "Content-Type: application/json",
            code: "origin_not_allowed"
          })
        }
        if (Object.keys(vary).length > 0) yield* setHeaders(vary)
        return yield* app
      }
      const allowOrigin = { "access-control-allow-origin": anyOrigin ? "*" : origin, ...vary }
      if (preflight) {
        return HttpServerResponse.empty({
          status: 204,
          headers: {
            ...allowOrigin,
            "access-control-allow-methods": corsMethods,
            // Echoing what the browser asks for lets SDKs send their own headers (x-stainless-*, ...);
            // the origin is already allowed, and auth still applies to the real request.
            "access-control-allow-headers": request.headers["access-control-request-headers"] ?? corsDefaultHeaders,
            "access-control-max-age": "600"
          }
        })
      }
      yield* setHeaders({ ...allowOrigin, "access-control-expose-headers": corsExposed })
      return yield* app
    })
}

// --- body size limit ----------------------------------------------------------------------------------

const tooLarge = (limit: number) => new PayloadTooLarge({ message: `request body is larger than ${limit} bytes`, code: "body_too_large" })

/**
 * How much of an oversized body is read and thrown away before the 413 goes out. A server that answers
 * and closes while the client is still sending leaves unread bytes behind, and the connection is reset:
 * the client sees EPIPE or ECONNRESET instead of its 413. Beyond this bound the connection is simply
 * closed, so a huge upload costs no more than reading it this far.
 */
export const drainBound = (limit: number): number => Math.max(limit, Math.min(8 * limit, 16 * 1024 * 1024))

/**
 * Reads the whole body, failing once it passes `limit`. Past the limit the rest is read and discarded
 * up to `drainBound(limit)` bytes in all, so that the client, still sending, gets its 413 (the platform's
 * own limit destroys the socket at once, leaving the client with no answer); past the bound it fails at
 * once and the connection is closed.
 */
const readBody = (source: IncomingMessage, limit: number) =>
  Effect.async<Buffer, PayloadTooLarge | BadRequest>((resume) => {
    const bound = drainBound(limit)
    const chunks: Array<Buffer> = []
    let bytes = 0
    const stop = () => {
      source.off("data", onData)
      source.off("end", onEnd)
      source.off("error", onError)
    }
    const onData = (chunk: Buffer) => {
      bytes += chunk.length
      if (bytes <= limit) return void chunks.push(chunk)
      chunks.length = 0
      if (bytes <= bound) return
      stop()
      resume(Effect.fail(tooLarge(limit)))
    }
    const onEnd = () => {
      stop()
      resume(bytes <= limit ? Effect.succeed(Buffer.concat(chunks)) : Effect.fail(tooLarge(limit)))
    }
    const onError = () => {
      stop()
      resume(Effect.fail(new BadRequest({ message: "the request body could not be read" })))
    }
    source.on("data", onData)
    source.once("end", onEnd)
    source.once("error", onError)
    return Effect.sync(stop)
  })

/**
 * The request with its body already read: the body's readers (`text`, `json`, `urlParamsBody`,
 * `arrayBuffer`, `stream`) serve the buffered copy; everything else is the original request's, and so
 * is what platform-node reads of it (`source`, `response`: NodeHttpServerRequest.toIncomingMessage and
 * toServerResponse). `modify` (a router mounted under a prefix) keeps the buffered body.
 */
class BufferedRequest extends Inspectable.Class implements HttpServerRequest.HttpServerRequest {
  readonly [HttpServerRequest.TypeId]: HttpServerRequest.TypeId = HttpServerRequest.TypeId
  readonly [HttpIncomingMessage.TypeId]: HttpIncomingMessage.TypeId = HttpIncomingMessage.TypeId
  constructor(
    readonly original: HttpServerRequest.HttpServerRequest,
    readonly body: Buffer
  ) {
    super()
  }
  get source() {
    return this.original.source
  }
  get response() {
    return NodeHttpServerRequest.toServerResponse(this.original)
  }
  get url() {
    return this.original.url
  }
  get originalUrl() {
    return this.original.originalUrl
  }
  get method() {
    return this.original.method
  }
  get cookies() {
    return this.original.cookies
  }
  get headers() {
    return this.original.headers
  }
  get remoteAddress() {
    return this.original.remoteAddress
  }
  get multipart() {
    return this.original.multipart
  }
  get multipartStream() {
    return this.original.multipartStream
  }
  get upgrade() {
    return this.original.upgrade
  }
  modify(options: Parameters<HttpServerRequest.HttpServerRequest["modify"]>[0]) {
    return new BufferedRequest(this.original.modify(options), this.body)
  }
  get text(): Effect.Effect<string> {
    return Effect.succeed(this.body.toString("utf8"))
  }
  get json(): Effect.Effect<unknown, RequestError> {
    return Effect.flatMap(this.text, (text) =>
      Effect.try({
        try: (): unknown => (text === "" ? null : JSON.parse(text)),
        catch: (cause) => new RequestError({ request: this, reason: "Decode", cause })
      })
    )
  }
  get urlParamsBody() {
    return Effect.map(this.text, (text) => UrlParams.fromInput(new URLSearchParams(text)))
  }
  get arrayBuffer() {
    return Effect.succeed(new Uint8Array(this.body).buffer)
  }
  get stream() {
    return Stream.succeed(new Uint8Array(this.body))
  }
  toJSON(): unknown {
    return { _id: "BufferedRequest", method: this.method, url: this.originalUrl, bytes: this.body.length }
  }
}

/**
 * Refuses a body over `limit` bytes with 413 and closes the connection: once the body has been read and
 * discarded (see `readBody`), or at once when Content-Length says it is larger than `drainBound(limit)`.
 * A body is read here, in full, before auth and the handler run, and handed on as a buffered copy, so
 * handlers never see a partial or oversized body.
 */
export const bodyLimit =
  (limit: number) =>
  <E, R>(app: HttpApp.Default<E, R>): HttpApp.Default<E | PayloadTooLarge | BadRequest, R> =>
    Effect.gen(function* () {
      const request = yield* HttpServerRequest.HttpServerRequest
      const declared = request.headers["content-length"]
      const hasBody = (declared !== undefined && declared !== "0") || request.headers["transfer-encoding"] !== undefined
      if (!hasBody || request.method === "GET" || request.method === "HEAD") return yield* app
      const closeAfter = setHeaders({ connection: "close" })
      if (declared !== undefined && Number(declared) > drainBound(limit)) {
        return yield* Effect.zipRight(closeAfter, tooLarge(limit))
      }
      const body = yield* readBody(NodeHttpServerRequest.toIncomingMessage(request), limit).pipe(Effect.tapError(() => closeAfter))
      return yield* Effect.provideService(app, HttpServerRequest.HttpServerRequest, new BufferedRequest(request, body))
    })
