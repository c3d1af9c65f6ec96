/**
 * A per-client sliding-window rate limit: at most `limit` requests in any `windowMs` milliseconds.
 *
 * It keeps, per client, the times of the requests it let through within the last window (a sliding log),
 * so the limit is exact: the (limit+1)-th request inside any window is refused, and Retry-After is the time
 * until the oldest of them leaves the window. Refused requests do not count. Clients idle for a whole window
 * are dropped on a sweep that runs at most once per window, so memory stays bounded by the clients active
 * in the last window (times `limit` entries each).
 *
 * Two middlewares use it: `rateLimit` counts requests per API key (else address), and `limitFailedAuth`
 * counts failed authentication per address, under keys of their own in the same limiter.
 *
 * @effect/experimental's RateLimiter offers fixed windows and token buckets, not a sliding window, and
 * needs a store layer; this one is small enough to own. Time comes from Effect's Clock, so tests drive it
 * with TestClock.
 *
 * @since 0.1.0
 */
import { createHash } from "node:crypto"
import { HttpApp, HttpServerRequest, HttpServerResponse } from "@effect/platform"
import { Clock, Context, Effect, Layer } from "effect"
import { RateLimited, Unauthorized } from "../api/errors.js"
import { bearerToken } from "./auth.js"
import { clientAddress, isPublic } from "./middleware.js"

export interface RateLimitOptions {
  /** Requests allowed per window; 0 turns the limiter off. */
  readonly limit: number
  readonly windowMs: number
}

export interface Decision {
  readonly allowed: boolean
  readonly limit: number
  /** Requests still allowed in the current window after this one. */
  readonly remaining: number
  /** Milliseconds until the oldest counted request leaves the window (one more becomes available). */
  readonly resetMs: number
}

export interface RateLimiterShape {
  readonly options: RateLimitOptions
  /** Counts a request of `client` if it is within the limit. */
  readonly consume: (client: string) => Effect.Effect<Decision>
  /** Whether one more request of `client` would be within the limit, counting nothing. */
  readonly peek: (client: string) => Effect.Effect<Decision>
  /** Clients currently tracked. */
  readonly clients: Effect.Effect<number>
}

export class RateLimiter extends Context.Tag("vdiff/RateLimiter")<RateLimiter, RateLimiterShape>() {}

export const make = (options: RateLimitOptions): Effect.Effect<RateLimiterShape> =>
  Effect.sync(() => {
    /** Per client, the times (ms) of its counted requests, oldest first. */
    const logs = new Map<string, Array<number>>()
    let lastSweep = -Infinity

    const sweep = (now: number) => {
      if (now - lastSweep < options.windowMs) return
      lastSweep = now
      for (const [client, log] of logs) {
        if (log[log.length - 1]! <= now - options.windowMs) logs.delete(client)
      }
    }

    /** Decides on one more request of `client` at `now`, counting it when allowed and `count` is set. */
    const decide = (client: string, count: boolean) =>
      Effect.map(Clock.currentTimeMillis, (now): Decision => {
        sweep(now)
        const log = logs.get(client) ?? []
        // A request made at t counts during [t, t + window).
        let expired = 0
        while (expired < log.length && log[expired]! <= now - options.windowMs) expired++
        if (expired > 0) log.splice(0, expired)
        const allowed = log.length < options.limit
        if (allowed && count) log.push(now)
        if (log.length > 0) logs.set(client, log)
        else logs.delete(client)
        return {
          allowed,
          limit: options.limit,
          remaining: options.limit - log.length,
          resetMs: log.length > 0 ? log[0]! + options.windowMs - now : 0
        }
      })

    return {
      options,
      consume: (client) => decide(client, true),
      peek: (client) => decide(client, false),
      clients: Effect.sync(() => logs.size)
    }
  })

export const layer = (options: RateLimitOptions): Layer.Layer<RateLimiter> => Layer.effect(RateLimiter, make(options))

const seconds = (ms: number) => Math.max(0, Math.ceil(ms / 1000))

/**
 * Limits failed authentication per client address (the peer's; X-Forwarded-For only with `trustProxy`),
 * in the same window and with the same limit as requests, so API keys cannot be guessed at any speed:
 * auth runs before the request limit, which therefore never sees a request with a wrong or missing key.
 * Each 401 from auth (inside this: a missing or unknown key) counts against the address; once it has had `limit` of them in
 * the window, every request of it that needs a key gets 429 with Retry-After before its key is even
 * checked — checking it would tell a guesser when a guess is right. Off when the limit is 0.
 */
export const limitFailedAuth =
  (options: { readonly trustProxy: boolean }) =>
  <E, R>(app: HttpApp.Default<E, R>): HttpApp.Default<E | RateLimited, R | RateLimiter> =>
    Effect.gen(function* () {
      const limiter = yield* RateLimiter
      const request = yield* HttpServerRequest.HttpServerRequest
      if (limiter.options.limit === 0 || isPublic(request) || request.method === "OPTIONS") return yield* app
      const client = "auth-failures:" + clientAddress(request, options.trustProxy)
      const refuse = (decision: Decision) => {
        const retryAfterSeconds = Math.max(1, seconds(decision.resetMs))
        return new RateLimited({
          message:
            `too many failed authentication attempts (${decision.limit} per ${limiter.options.windowMs / 1000} s); ` +
            `retry in ${retryAfterSeconds} s`,
          code: "rate_limit_exceeded",
          retryAfterSeconds
        })
      }
      const before = yield* limiter.peek(client)
      if (!before.allowed) return yield* refuse(before)
      return yield* app.pipe(
        Effect.tapError((error) =>
          isAuthFailure(error)
            ? Effect.flatMap(limiter.consume(client), (decision) => (decision.allowed ? Effect.void : Effect.fail(refuse(decision))))
            : Effect.void
        )
      )
    })

const isAuthFailure = (error: unknown): boolean =>
  error instanceof Unauthorized && (error.code === "missing_api_key" || error.code === "invalid_api_key")

/**
 * Applies the limiter to every request but public paths and preflights. The client is the API key when
 * auth is on (keys are checked before this runs, so a present key is a valid one; stored as a digest),
 * else the address. Responses carry X-RateLimit-Limit, -Remaining and -Reset (seconds until a request
 * frees up); a refused request fails with RateLimited, whose Retry-After is the same wait, at least 1 s.
 */
export const rateLimit =
  (options: { readonly keyedByApiKey: boolean; readonly trustProxy: boolean }) =>
  <E, R>(app: HttpApp.Default<E, R>): HttpApp.Default<E | RateLimited, R | RateLimiter> =>
    Effect.gen(function* () {
      const limiter = yield* RateLimiter
      const request = yield* HttpServerRequest.HttpServerRequest
      if (limiter.options.limit === 0 || isPublic(request) || request.method === "OPTIONS") return yield* app
      const token = options.keyedByApiKey ? bearerToken(request) : undefined
      const client =
        token !== undefined
          ? "key:" + createHash("sha256").update(token).digest("hex")
          : "addr:" + clientAddress(request, options.trustProxy)
      const decision = yield* limiter.consume(client)
      const headers = {
        "x-ratelimit-limit": String(decision.limit),
        "x-ratelimit-remaining": String(decision.remaining),
        "x-ratelimit-reset": String(seconds(decision.resetMs))
      }
      yield* HttpApp.appendPreResponseHandler((_request, response) => Effect.succeed(HttpServerResponse.setHeaders(response, headers)))
      if (!decision.allowed) {
        const retryAfterSeconds = Math.max(1, seconds(decision.resetMs))
        return yield* new RateLimited({
          message: `rate limit of ${decision.limit} requests per ${limiter.options.windowMs / 1000} s reached; retry in ${retryAfterSeconds} s`,
          code: "rate_limit_exceeded",
          retryAfterSeconds
        })
      }
      return yield* app
    })
