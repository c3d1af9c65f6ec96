import { describe, expect, it } from "@effect/vitest"
import { Effect, Logger, LogLevel, TestClock } from "effect"
import * as RateLimiter from "../src/http/RateLimiter.js"
import { type Reply, request, settings, startServer } from "./http-helpers.js"

// The server is built inside the test's TestClock, so the limiter's time moves only with TestClock.adjust.
const quiet = Effect.provide(Logger.minimumLogLevel(LogLevel.None))

const serve = (argv: ReadonlyArray<string>) =>
  Effect.gen(function* () {
    const config = yield* Effect.promise(() => settings(argv))
    return (yield* startServer({ config })).url
  })

const limitHeaders = (reply: Reply) => ({
  limit: reply.headers.get("x-ratelimit-limit"),
  remaining: reply.headers.get("x-ratelimit-remaining"),
  reset: reply.headers.get("x-ratelimit-reset")
})

describe("rate limit over HTTP", () => {
  it.scoped("allows exactly N requests per window, then 429 with Retry-After until the window slides", () =>
    Effect.gen(function* () {
      const url = yield* serve(["--rate-limit-requests", "3", "--rate-limit-window", "10"])
      const get = () => request(url + "/v1/models")

      // t = 0 s, 4 s, 8 s: three requests, each counted.
      const first = yield* get()
      expect(first.status).toBe(200)
      expect(limitHeaders(first)).toEqual({ limit: "3", remaining: "2", reset: "10" })
      yield* TestClock.adjust("4 seconds")
      expect(limitHeaders(yield* get())).toEqual({ limit: "3", remaining: "1", reset: "6" })
      yield* TestClock.adjust("4 seconds")
      expect(limitHeaders(yield* get())).toEqual({ limit: "3", remaining: "0", reset: "2" })

      // t = 9 s: the fourth is refused until the request of t = 0 leaves the window at t = 10 s.
      yield* TestClock.adjust("1 second")
      const refused = yield* get()
      expect(refused.status).toBe(429)
      expect(refused.headers.get("retry-after")).toBe("1")
      expect(limitHeaders(refused)).toEqual({ limit: "3", remaining: "0", reset: "1" })
      expect(refused.json.error).toMatchObject({ type: "rate_limit_error", code: "rate_limit_exceeded" })
      expect(refused.json.error.request_id).toBe(refused.headers.get("x-request-id"))

      // t = 9.999 s: still refused (refusals do not count, and do not push the window).
      yield* TestClock.adjust("999 millis")
      expect((yield* get()).status).toBe(429)

      // t = 10 s: one slot is free again; the next one frees at t = 14 s.
      yield* TestClock.adjust("1 millis")
      const again = yield* get()
      expect(again.status).toBe(200)
      expect(limitHeaders(again)).toEqual({ limit: "3", remaining: "0", reset: "4" })
      const wait = yield* get()
      expect(wait.status).toBe(429)
      expect(wait.headers.get("retry-after")).toBe("4")

      // After a whole idle window the client has its full allowance back.
      yield* TestClock.adjust("20 seconds")
      for (let i = 0; i < 3; i++) expect((yield* get()).status).toBe(200)
      expect((yield* get()).status).toBe(429)
    }).pipe(quiet)
  )

  it.scoped("does not limit the probes, /version or /metrics, nor count them", () =>
    Effect.gen(function* () {
      const url = yield* serve(["--rate-limit-requests", "1", "--rate-limit-window", "60"])
      for (let i = 0; i < 5; i++) {
        for (const path of ["/health", "/health/live", "/health/ready", "/version", "/metrics"]) {
          const reply = yield* request(url + path)
          expect(reply.status, path).toBe(200)
          expect(reply.headers.get("x-ratelimit-limit")).toBeNull()
        }
      }
      expect((yield* request(url + "/v1/models")).status).toBe(200)
      expect((yield* request(url + "/v1/models")).status).toBe(429)
    }).pipe(quiet)
  )

  it.scoped("counts each API key apart", () =>
    Effect.gen(function* () {
      const url = yield* serve(["--rate-limit-requests", "2", "--rate-limit-window", "60", "--api-key", "a,b"])
      const as = (key: string) => request(url + "/v1/models", { headers: { authorization: `Bearer ${key}` } })
      expect((yield* as("a")).status).toBe(200)
      expect((yield* as("a")).status).toBe(200)
      expect((yield* as("a")).status).toBe(429)
      expect((yield* as("b")).status).toBe(200)
      expect((yield* as("b")).status).toBe(200)
      expect((yield* as("b")).status).toBe(429)
    }).pipe(quiet)
  )

  it.scoped("keys clients by X-Forwarded-For only with --trust-proxy", () =>
    Effect.gen(function* () {
      const from = (url: string, address: string) => request(url + "/v1/models", { headers: { "x-forwarded-for": `${address}, 10.0.0.1` } })
      const trusting = yield* serve(["--rate-limit-requests", "1", "--trust-proxy"])
      expect((yield* from(trusting, "203.0.113.1")).status).toBe(200)
      expect((yield* from(trusting, "203.0.113.1")).status).toBe(429)
      expect((yield* from(trusting, "203.0.113.2")).status).toBe(200)

      // Without it the header is the client's word and is ignored: everyone here is 127.0.0.1.
      const plain = yield* serve(["--rate-limit-requests", "1"])
      expect((yield* from(plain, "203.0.113.1")).status).toBe(200)
      expect((yield* from(plain, "203.0.113.2")).status).toBe(429)
    }).pipe(quiet)
  )

  it.scoped("limits failed API key attempts per address, then refuses even the right key until the window slides", () =>
    Effect.gen(function* () {
      const url = yield* serve(["--rate-limit-requests", "3", "--rate-limit-window", "10", "--api-key", "right"])
      const as = (key: string | undefined) =>
        request(url + "/v1/models", { headers: key === undefined ? {} : { authorization: `Bearer ${key}` } })

      // t = 0 s, 4 s: three failures (wrong and missing keys alike) are answered as such.
      expect((yield* as("guess-1")).status).toBe(401)
      expect((yield* as(undefined)).status).toBe(401)
      yield* TestClock.adjust("4 seconds")
      expect((yield* as("guess-2")).status).toBe(401)

      // Past the limit every attempt from the address is refused before its key is checked, so a guess
      // that happens to be right cannot be told from a wrong one.
      for (const key of ["guess-3", undefined, "right"]) {
        const refused = yield* as(key)
        expect(refused.status, String(key)).toBe(429)
        expect(refused.headers.get("retry-after")).toBe("6")
        expect(refused.json.error).toMatchObject({ type: "rate_limit_error", code: "rate_limit_exceeded" })
        expect(refused.json.error.message).toMatch(/failed authentication/)
      }

      // t = 10 s: the first two failures have left the window; the right key works again, and the
      // address has two failed attempts left.
      yield* TestClock.adjust("6 seconds")
      expect((yield* as("right")).status).toBe(200)
      expect((yield* as("guess-4")).status).toBe(401)
      expect((yield* as("guess-5")).status).toBe(401)
      expect((yield* as("guess-6")).status).toBe(429)
      // Probes need no key and are never refused.
      expect((yield* request(url + "/health")).status).toBe(200)
    }).pipe(quiet)
  )

  it.scoped("counts failed API key attempts per peer address, and X-Forwarded-For only with --trust-proxy", () =>
    Effect.gen(function* () {
      const guess = (url: string, address: string) =>
        request(url + "/v1/models", { headers: { authorization: "Bearer guess", "x-forwarded-for": address } })
      const trusting = yield* serve(["--rate-limit-requests", "1", "--api-key", "right", "--trust-proxy"])
      expect((yield* guess(trusting, "203.0.113.1")).status).toBe(401)
      expect((yield* guess(trusting, "203.0.113.1")).status).toBe(429)
      expect((yield* guess(trusting, "203.0.113.2")).status).toBe(401)

      // Without it a guesser cannot dodge the limit by changing the header: everyone here is 127.0.0.1.
      const plain = yield* serve(["--rate-limit-requests", "1", "--api-key", "right"])
      expect((yield* guess(plain, "203.0.113.1")).status).toBe(401)
      expect((yield* guess(plain, "203.0.113.2")).status).toBe(429)
    }).pipe(quiet)
  )

  it.scoped("leaves failed API key attempts unlimited with --rate-limit-requests 0", () =>
    Effect.gen(function* () {
      const url = yield* serve(["--api-key", "right"])
      for (let i = 0; i < 20; i++) {
        expect((yield* request(url + "/v1/models", { headers: { authorization: `Bearer guess-${i}` } })).status).toBe(401)
      }
      expect((yield* request(url + "/v1/models", { headers: { authorization: "Bearer right" } })).status).toBe(200)
    }).pipe(quiet)
  )

  it.scoped("is off with --rate-limit-requests 0", () =>
    Effect.gen(function* () {
      const url = yield* serve([])
      for (let i = 0; i < 20; i++) {
        const reply = yield* request(url + "/v1/models")
        expect(reply.status).toBe(200)
        expect(reply.headers.get("x-ratelimit-limit")).toBeNull()
      }
    }).pipe(quiet)
  )
})

describe("RateLimiter", () => {
  it.effect("forgets clients idle for a whole window, so memory stays bounded", () =>
    Effect.gen(function* () {
      const limiter = yield* RateLimiter.make({ limit: 5, windowMs: 1000 })
      for (let i = 0; i < 1000; i++) yield* limiter.consume(`client-${i}`)
      expect(yield* limiter.clients).toBe(1000)
      yield* TestClock.adjust("999 millis")
      yield* limiter.consume("client-0")
      expect(yield* limiter.clients).toBe(1000)
      yield* TestClock.adjust("1 second")
      yield* limiter.consume("late")
      // client-0 was last seen 1 s ago, the rest 2 s ago: all gone but the newcomer.
      expect(yield* limiter.clients).toBe(1)
    })
  )

  it.effect("refuses every request past the limit within the window, however many come", () =>
    Effect.gen(function* () {
      const limiter = yield* RateLimiter.make({ limit: 3, windowMs: 1000 })
      const decisions = []
      for (let i = 0; i < 100; i++) decisions.push(yield* limiter.consume("c"))
      expect(decisions.filter((d) => d.allowed)).toHaveLength(3)
      expect(decisions.at(-1)).toEqual({ allowed: false, limit: 3, remaining: 0, resetMs: 1000 })
    })
  )
})
